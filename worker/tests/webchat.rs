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
    let reply = next_frame(&mut socket).await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["text"], "you said hello");
    assert_eq!(reply["error"], false);

    socket.send(Message::text("not json")).await.unwrap();
    let error = next_frame(&mut socket).await;
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
    assert_eq!(next_frame(&mut again).await["text"], "you said again");
    worker.stop().await;
}
