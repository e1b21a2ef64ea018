//! The web chat channel: the page is served, and a WebSocket conversation reaches the
//! agent and comes back, keeping its session across reconnects.

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::TestWorker;
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = r#"agents:
  - name: concierge
    spec:
      model:
        provider: scripted
        script:
          - reply: "you said {{input}}"
channels:
  - name: web
    spec:
      defaultAgent: concierge
      webchat: {title: "Test <chat>"}
"#;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(support::DEADLINE, socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("valid frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The next frame that is not a delta (the answer's text as it is written): a
/// reply, an error, a ready.
async fn next_answer_frame(socket: &mut Socket) -> Value {
    next_answer_with_deltas(socket).await.0
}

/// [`next_answer_frame`] and the delta frames that came before it.
async fn next_answer_with_deltas(socket: &mut Socket) -> (Value, Vec<Value>) {
    let mut deltas = Vec::new();
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] != "delta" {
            return (frame, deltas);
        }
        deltas.push(frame);
    }
}

#[tokio::test]
async fn page_is_served_with_an_escaped_title() {
    let worker = TestWorker::start(CONFIG).await;
    let page = worker
        .http
        .get(worker.url("/chat/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>Test &lt;chat&gt;</title>"), "{html}");
    assert!(html.contains(r#"const socketPath = "/v1/channels/web/ws";"#));
    worker.stop().await;
}

#[tokio::test]
async fn a_socket_conversation_round_trips_and_reports_bad_frames() {
    let worker = TestWorker::start(CONFIG).await;
    let url = format!("ws://{}/v1/channels/web/ws", worker.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let ready = next_frame(&mut socket).await;
    assert_eq!(ready["type"], "ready");
    let conversation = ready["conversation"].as_str().unwrap().to_owned();

    socket
        .send(Message::text(json!({"text": "hello"}).to_string()))
        .await
        .unwrap();
    let (reply, deltas) = next_answer_with_deltas(&mut socket).await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["text"], "you said hello");
    assert_eq!(reply["html"], "<p>you said hello</p>");
    assert_eq!(reply["error"], false);
    // The text came word by word first, each delta naming the message answered.
    let words: Vec<&str> = deltas.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(words, ["you ", "said ", "hello"]);
    assert!(
        deltas.iter().all(|d| d["message"] == reply["answers"]),
        "{deltas:?}"
    );
    assert_eq!(deltas[0]["restart"], true);

    socket.send(Message::text("not json")).await.unwrap();
    let error = next_answer_frame(&mut socket).await;
    assert_eq!(error["type"], "error");
    assert!(
        error["text"]
            .as_str()
            .unwrap()
            .starts_with("invalid message"),
        "{error}"
    );
    drop(socket);

    // Reconnecting with the conversation id continues the same conversation.
    let (mut again, _) =
        tokio_tungstenite::connect_async(format!("{url}?conversation={conversation}"))
            .await
            .unwrap();
    assert_eq!(
        next_frame(&mut again).await["conversation"],
        conversation.as_str()
    );
    again
        .send(Message::text(json!({"text": "again"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_answer_frame(&mut again).await["text"],
        "you said again"
    );
    worker.stop().await;
}

fn is_issued_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Conversation ids are the server's: 128 random bits. A client can resume only with
/// an id of that shape; one it made up (like `a`) gets a new conversation instead of
/// someone else's.
#[tokio::test]
async fn only_ids_of_the_issued_shape_resume_a_conversation() {
    let worker = TestWorker::start(CONFIG).await;
    let url = format!("ws://{}/v1/channels/web/ws", worker.addr);
    let (mut fresh, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let issued = next_frame(&mut fresh).await["conversation"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(is_issued_id(&issued), "{issued}");
    drop(fresh);

    for chosen in [
        "a",
        "0192d3c4-0000-7000-8000-000000000000",
        &issued.to_uppercase(),
    ] {
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("{url}?conversation={chosen}"))
                .await
                .unwrap();
        let given = next_frame(&mut socket).await["conversation"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            is_issued_id(&given) && given != chosen,
            "{chosen} → {given}"
        );
        assert_ne!(given, issued);
    }
    let (mut resumed, _) = tokio_tungstenite::connect_async(format!("{url}?conversation={issued}"))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut resumed).await["conversation"],
        issued.as_str()
    );
    worker.stop().await;
}

/// Two sockets with one conversation id: the newer takes over (it gets the replies),
/// and the older is closed with code 4001 and a reason, which the page shows instead
/// of reconnecting.
#[tokio::test]
async fn a_second_socket_takes_over_and_the_first_is_closed_with_a_reason() {
    let worker = TestWorker::start(CONFIG).await;
    let url = format!("ws://{}/v1/channels/web/ws", worker.addr);
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let conversation = next_frame(&mut first).await["conversation"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut second, _) =
        tokio_tungstenite::connect_async(format!("{url}?conversation={conversation}"))
            .await
            .unwrap();
    assert_eq!(
        next_frame(&mut second).await["conversation"],
        conversation.as_str()
    );

    let closed = loop {
        let message = tokio::time::timeout(support::DEADLINE, first.next())
            .await
            .expect("the first socket is closed in time");
        match message {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let closed = closed.expect("a close frame with a code");
    assert_eq!(u16::from(closed.code), 4001);
    assert_eq!(
        closed.reason.as_str(),
        "this conversation was opened in another window"
    );

    second
        .send(Message::text(json!({"text": "still here"}).to_string()))
        .await
        .unwrap();
    let reply = next_answer_frame(&mut second).await;
    assert_eq!(reply["text"], "you said still here");
    worker.stop().await;
}

/// An answer published twice (two workers ran the message, as after its agent moved
/// between them) reaches the page once; the second copy is counted.
#[tokio::test]
async fn an_answer_published_twice_reaches_the_page_once() {
    let worker = TestWorker::start(CONFIG).await;
    let mut outbound = worker
        .broker
        .subscribe("plugin.outbound.webchat.default.web")
        .await
        .unwrap();
    let url = format!("ws://{}/v1/channels/web/ws", worker.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(next_frame(&mut socket).await["type"], "ready");
    socket
        .send(Message::text(json!({"text": "hello"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_answer_frame(&mut socket).await["text"],
        "you said hello"
    );

    let answer = support::next_message(&mut outbound, "the agent's answer").await;
    worker
        .broker
        .publish(&answer.subject, answer.payload.clone())
        .await
        .unwrap();
    let labels = [("channel", "webchat"), ("instance", "web")];
    worker
        .wait_for_metric("nexo_channel_duplicate_replies_total", &labels, 1.0)
        .await;

    // The next frame is the answer to the next message, not the copy.
    socket
        .send(Message::text(json!({"text": "again"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_answer_frame(&mut socket).await["text"],
        "you said again"
    );
    let metrics = worker.metrics().await;
    assert_eq!(metrics.expect("nexo_messages_out_total", &labels), 2.0);
    assert_eq!(
        metrics.expect("nexo_channel_duplicate_replies_total", &labels),
        1.0
    );
    worker.stop().await;
}
