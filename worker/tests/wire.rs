//! The envelope on the wire, through a running worker: a newer release's envelope
//! (higher `version`, fields this release does not know) published on an agent's
//! route subject is answered, and a delegated message that has been handed on too
//! often gets a tool error instead of another delegation.

mod support;

use bytes::Bytes;
use nexo_api::Envelope;
use nexo_api::envelope::{ENVELOPE_VERSION, MAX_DELEGATION_HOPS};
use nexo_worker::broker::{Subscription, new_inbox};
use serde_json::{Value, json};
use support::TestWorker;

/// The next message on `inbox`, parsed, within the deadline.
async fn next_json(inbox: &mut Subscription) -> Value {
    let message = support::next_message(inbox, "a JSON message").await;
    serde_json::from_slice(&message.payload).expect("JSON reply")
}

/// Publishes `envelope` (raw JSON) on `agent.route.default.<agent>` with a reply inbox
/// and returns the reply.
async fn ask(worker: &TestWorker, agent: &str, mut envelope: Value) -> Value {
    let inbox = new_inbox();
    let mut replies = worker.broker.subscribe(&inbox).await.unwrap();
    envelope["replyTo"] = json!(inbox);
    worker
        .broker
        .publish(
            &format!("agent.route.default.{agent}"),
            Bytes::from(envelope.to_string()),
        )
        .await
        .unwrap();
    next_json(&mut replies).await
}

#[tokio::test]
async fn an_envelope_from_a_newer_release_is_answered() {
    let worker = TestWorker::start(
        r#"agents:
  - name: echo
    spec:
      model:
        provider: scripted
        script:
          - reply: "heard {{input}}"
"#,
    )
    .await;
    let id = uuid::Uuid::now_v7();
    let newer = json!({
        "version": ENVELOPE_VERSION + 1,
        "id": id,
        "channel": "webhook", "instance": "api", "conversation": "c1", "sender": "ada",
        "text": "hello from the future", "createdAt": "2026-01-01T00:00:00Z",
        // Fields a later release might add.
        "priority": "high",
        "trace": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "attachments": [{"url": "https://example.invalid/a.png"}],
    });
    let reply = ask(&worker, "echo", newer).await;
    assert_eq!(reply["text"], "heard hello from the future", "{reply}");
    assert_eq!(reply["correlationId"], json!(id));
    assert_eq!(reply["version"], ENVELOPE_VERSION);
    assert!(reply.get("error").is_none(), "{reply}");
    // And today's type reads it back.
    let reply: Envelope = serde_json::from_value(reply).unwrap();
    assert_eq!(reply.correlation_id, Some(id));
    worker.stop().await;
}

#[tokio::test]
async fn a_message_handed_on_too_often_is_not_delegated_again() {
    let worker = TestWorker::start(&support::concierge_and_researcher("found facts")).await;
    let mut envelope = serde_json::to_value(Envelope::inbound(
        "agent",
        "x",
        "c1",
        "default/other",
        "otters",
    ))
    .unwrap();

    // Below the limit the delegate is asked, and the request it gets counts one more hop.
    let mut research = worker
        .broker
        .subscribe("agent.route.default.researcher")
        .await
        .unwrap();
    envelope["hops"] = json!(MAX_DELEGATION_HOPS - 1);
    let reply = ask(&worker, "concierge", envelope.clone()).await;
    assert_eq!(reply["text"], "researcher says: found facts", "{reply}");
    let handed_on = next_json(&mut research).await;
    assert_eq!(handed_on["hops"], MAX_DELEGATION_HOPS);

    // At the limit the model gets a tool error and answers without the delegate.
    envelope["id"] = json!(uuid::Uuid::now_v7());
    envelope["hops"] = json!(MAX_DELEGATION_HOPS);
    let reply = ask(&worker, "concierge", envelope).await;
    let text = reply["text"].as_str().unwrap();
    assert!(
        text.starts_with("researcher says: error: cannot ask agent `default/researcher`")
            && text.contains(&format!("at most {MAX_DELEGATION_HOPS}")),
        "{reply}"
    );
    worker.stop().await;
}

/// A delegate's failed turn comes back as a typed `error`, which the delegation tool
/// turns into a tool error: the caller's model is not handed the apology as if it
/// were the answer.
#[tokio::test]
async fn a_delegate_whose_turn_failed_is_a_tool_error() {
    let concierge = r#"agents:
  - name: concierge
    spec:
      delegates: [researcher]
      model:
        provider: scripted
        script:
          - toolCall: {name: ask_researcher, arguments: {message: "{{input}}"}}
            reply: "researcher says: {{tool_result}}"
"#;
    let worker = TestWorker::start(&format!(
        "{concierge}{}",
        support::agent_whose_turn_fails("researcher")
    ))
    .await;
    let envelope =
        serde_json::to_value(Envelope::inbound("webhook", "api", "c1", "ada", "otters")).unwrap();
    let reply = ask(&worker, "concierge", envelope).await;
    assert_eq!(
        reply["text"],
        "researcher says: error: agent `default/researcher`: the model was still calling tools after 1 steps",
        "{reply}"
    );
    assert!(
        reply.get("error").is_none(),
        "the caller's turn itself succeeded: {reply}"
    );
    worker.stop().await;
}
