//! A turn's text reaches the user while the model writes it: the webhook channel's
//! Server-Sent Events (`Accept: text/event-stream`) get `delta` events, then the
//! `reply` event, on the local bus and across a real nats-server; a stream nobody
//! watches, or whose watcher goes away, never costs the reply.

mod support;

use bytes::Bytes;
use futures::StreamExt;
use nexo_api::delta::ReplyDelta;
use nexo_api::{Envelope, ResourceKey, subject};
use nexo_worker::broker::new_inbox;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::{DEADLINE, TestWorker, WorkerOptions};

fn scripted(reply: &str) -> String {
    format!(
        "agents:
  - name: writer
    spec:
      model:
        provider: scripted
        script:
          - reply: \"{reply}\"
channels:
  - name: api
    spec:
      defaultAgent: writer
      webhook: {{replyTimeoutSeconds: 10}}
"
    )
}

fn openai(base_url: &str) -> String {
    format!(
        "{}channels:
  - name: api
    spec:
      defaultAgent: writer
      webhook: {{replyTimeoutSeconds: 10}}
",
        support::openai_writer(base_url)
    )
}

/// One Server-Sent Event: its `event:` name and its data as JSON.
type Event = (String, Value);

/// The events of a streamed webhook answer, as they come.
struct Events(futures::stream::BoxStream<'static, Result<sse_stream::Sse, sse_stream::Error>>);

impl Events {
    async fn post(worker: &TestWorker, text: &str) -> Self {
        let response = tokio::time::timeout(
            DEADLINE,
            worker
                .http
                .post(worker.url("/v1/channels/api/messages"))
                .header("accept", "text/event-stream")
                .json(&json!({"text": text}))
                .send(),
        )
        .await
        .expect("the stream starts in time")
        .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Self(sse_stream::SseStream::from_bytes_stream(response.bytes_stream()).boxed())
    }

    /// The next event, `None` at the end of the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let event = tokio::time::timeout(DEADLINE, self.0.next())
                .await
                .expect("the next event, or the end, in time")?
                .expect("a well-formed event");
            // Keep-alive comments have no data.
            let Some(data) = event.data else { continue };
            let name = event.event.unwrap_or_default();
            return Some((name, serde_json::from_str(&data).unwrap()));
        }
    }

    /// Every event up to the end of the stream.
    async fn rest(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// The text the deltas show: appended in order, started over at `restart`.
fn shown(deltas: &[Value]) -> String {
    let mut text = String::new();
    for delta in deltas {
        let delta: ReplyDelta = serde_json::from_value(delta.clone()).unwrap();
        if delta.restart {
            text.clear();
        }
        text.push_str(&delta.text);
    }
    text
}

/// Splits `events` into the deltas and the final `reply`, checking that the reply is
/// last and comes once.
fn deltas_and_reply(events: Vec<Event>) -> (Vec<Value>, Value) {
    let (reply, deltas) = events.split_last().expect("at least the reply");
    assert_eq!(reply.0, "reply", "the last event is the reply: {events:?}");
    let deltas: Vec<Value> = deltas
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "delta", "{events:?}");
            data.clone()
        })
        .collect();
    (deltas, reply.1.clone())
}

#[tokio::test]
async fn an_sse_client_gets_the_deltas_then_the_reply_they_add_up_to() {
    let worker = TestWorker::start(&scripted("I heard {{input}} loud and clear")).await;
    let mut events = Events::post(&worker, "you").await;
    let (deltas, reply) = deltas_and_reply(events.rest().await);

    assert_eq!(reply["status"], "answered", "{reply}");
    assert_eq!(reply["httpStatus"], 200, "{reply}");
    assert_eq!(reply["reply"], "I heard you loud and clear");
    // The scripted model writes word by word.
    assert_eq!(deltas.len(), 6, "{deltas:?}");
    assert_eq!(shown(&deltas), "I heard you loud and clear");
    let seqs: Vec<u64> = deltas.iter().map(|d| d["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5]);
    assert!(
        deltas
            .iter()
            .all(|d| d["messageId"] == reply["id"] && d["step"] == 1),
        "{deltas:?}"
    );
    assert_eq!(
        deltas[0]["restart"], true,
        "a step's first delta starts over"
    );

    // Without the header the answer is plain JSON, as always.
    let (status, body) = worker.post_message("api", json!({"text": "me"})).await;
    assert_eq!(status.as_u16(), 200);
    assert_eq!(body["reply"], "I heard me loud and clear");
    worker.stop().await;
}

/// The model's last chunk is held back: the client must already have the first
/// words, and the reply comes only after the model finished.
#[tokio::test]
async fn sse_deltas_arrive_before_the_model_has_finished() {
    let (model, gate) =
        support::model_holding_back_its_last_chunk("first words, then the rest").await;
    let worker = TestWorker::start(&openai(&model.base_url)).await;
    let mut events = Events::post(&worker, "go").await;
    let (name, first) = events.next().await.expect("a first event");
    assert_eq!(name, "delta", "{first}");
    assert_eq!(first["text"], "first ", "{first}");
    gate.notify_one();
    let mut all = vec![(name, first)];
    all.extend(events.rest().await);
    let (deltas, reply) = deltas_and_reply(all);
    assert_eq!(reply["reply"], "first words, then the rest");
    assert_eq!(shown(&deltas), "first words, then the rest");
    worker.stop().await;
}

/// The same over a real nats-server: the deltas cross it (a plain NATS client sees
/// them on their subject), and the client's stream still ends with the reply.
#[tokio::test]
async fn deltas_cross_nats_to_the_sse_client() {
    let server = NatsServer::start().await;
    let observer = async_nats::connect(server.url()).await.unwrap();
    let mut seen = observer
        .subscribe(format!("{}.>", subject::REPLY_DELTAS_PREFIX))
        .await
        .unwrap();
    observer.flush().await.unwrap();
    let worker = TestWorker::start_with(
        WorkerOptions {
            broker: format!("{{type: nats, urls: ['{}']}}", server.url()),
            ..Default::default()
        },
        &scripted("over the wire {{input}}"),
    )
    .await;
    let mut events = Events::post(&worker, "now").await;
    let (deltas, reply) = deltas_and_reply(events.rest().await);
    assert_eq!(reply["reply"], "over the wire now");
    assert_eq!(shown(&deltas), "over the wire now");

    let crossed = tokio::time::timeout(DEADLINE, seen.next())
        .await
        .expect("a delta on NATS in time")
        .unwrap();
    assert!(
        subject::is_reply_deltas(&crossed.subject),
        "{}",
        crossed.subject
    );
    let delta = ReplyDelta::from_json(&crossed.payload).unwrap();
    assert_eq!(delta.text, "over ");
    worker.stop().await;
}

/// An envelope whose `stream` nobody subscribed to, and one whose watcher goes away
/// after the first delta: both replies come, whole.
#[tokio::test]
async fn a_stream_nobody_watches_never_costs_the_reply() {
    let worker = TestWorker::start(&scripted("whole answer to {{input}}")).await;
    let agent = ResourceKey::new("default", "writer");
    for watched in [false, true] {
        let inbox = new_inbox();
        let mut replies = worker.broker.subscribe(&inbox).await.unwrap();
        let stream = subject::reply_deltas(&uuid::Uuid::new_v4());
        let watcher = match watched {
            true => Some(worker.broker.subscribe(&stream).await.unwrap()),
            false => None,
        };
        let mut envelope = Envelope::inbound("webhook", "api", "c", "s", format!("q{watched}"));
        envelope.reply_to = Some(inbox);
        envelope.stream = Some(stream);
        worker
            .broker
            .publish(
                &subject::agent_route(&agent),
                Bytes::from(envelope.to_json()),
            )
            .await
            .unwrap();
        if let Some(mut watcher) = watcher {
            support::next_message(&mut watcher, "the first delta").await;
            drop(watcher);
        }
        let reply = support::next_message(&mut replies, "the reply").await;
        let reply = Envelope::from_json(&reply.payload).unwrap();
        assert_eq!(reply.correlation_id, Some(envelope.id));
        assert_eq!(reply.text, format!("whole answer to q{watched}"));
    }
    worker.stop().await;
}

/// A delegating agent's watcher sees the delegate's answer being written while the
/// caller waits for it, then the caller's own answer in its place.
#[tokio::test]
async fn a_delegates_text_streams_through_the_agent_that_asked() {
    let worker = TestWorker::start(&format!(
        "{}channels:
  - name: api
    spec:
      defaultAgent: concierge
      webhook: {{replyTimeoutSeconds: 10}}
",
        support::concierge_and_researcher("found {{input}}")
    ))
    .await;
    let mut events = Events::post(&worker, "hotels").await;
    let (deltas, reply) = deltas_and_reply(events.rest().await);
    assert_eq!(reply["reply"], "researcher says: found look up hotels");
    assert_eq!(shown(&deltas), "researcher says: found look up hotels");

    // First the researcher's text (its own message, step 1), then the concierge's
    // second step, which starts the shown text over.
    let delegate: Vec<&Value> = deltas
        .iter()
        .filter(|d| d["messageId"] != reply["id"])
        .collect();
    assert_eq!(
        shown(&delegate.iter().map(|d| (*d).clone()).collect::<Vec<_>>()),
        "found look up hotels"
    );
    let first_own = deltas
        .iter()
        .position(|d| d["messageId"] == reply["id"])
        .expect("the concierge's own deltas");
    assert_eq!(
        first_own,
        delegate.len(),
        "the delegate's deltas come first: {deltas:?}"
    );
    assert_eq!(deltas[first_own]["step"], 2);
    assert_eq!(deltas[first_own]["restart"], true);

    // Every model call that wrote text was timed to its first token.
    let metrics = worker.metrics().await;
    for agent in ["default/concierge", "default/researcher"] {
        let labels = [("agent", agent), ("provider", "scripted")];
        assert_eq!(
            metrics.expect("nexo_llm_first_token_seconds_count", &labels),
            1.0,
            "{agent}"
        );
    }
    worker.stop().await;
}
