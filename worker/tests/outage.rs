//! A NATS outage does not take the pod out of its Service: `/readyz` stays 200 and
//! says the broker is not connected, the webhook channel accepts messages into the
//! outbox, and they are answered once NATS is back.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::{TestWorker, WorkerOptions, wait_for};

#[tokio::test]
async fn during_a_nats_outage_the_webhook_queues_and_the_pod_stays_ready() {
    let mut server = NatsServer::start().await;
    let worker = TestWorker::start_with(
        WorkerOptions {
            broker: format!("{{type: nats, urls: ['{}']}}", server.url()),
            ..Default::default()
        },
        "agents:
  - name: a
    spec:
      model: {provider: scripted, script: [{reply: 'answer: {{input}}'}]}
channels:
  - name: api
    spec: {defaultAgent: a, webhook: {replyTimeoutSeconds: 10}}
",
    )
    .await;
    // Streams and consumers exist: the first message is answered.
    let (status, answer) = worker.post_message("api", json!({"text": "first"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    server.stop().await;
    let ready = wait_for("/readyz to report the outage", || async {
        let (status, body) = worker.get_json("/readyz").await;
        let degraded = body["degraded"].as_array().cloned().unwrap_or_default();
        let reported = degraded
            .iter()
            .filter_map(Value::as_str)
            .any(|reason| reason.starts_with("broker is not connected"));
        reported.then_some((status, body))
    })
    .await;
    assert_eq!(ready.0, StatusCode::OK, "{}", ready.1);
    assert_eq!(ready.1["ready"], true);

    let id = worker
        .post_async("api", json!({"text": "during the outage"}))
        .await;
    // It waits in the outbox: nothing can deliver it.
    wait_for("the message to wait in the outbox", || async {
        let depth = worker.metrics().await.value("nexo_outbox_depth", &[]);
        depth.is_some_and(|depth| depth >= 1.0).then_some(())
    })
    .await;

    server.restart().await;
    let reply = worker.answer_of("api", &id).await;
    assert_eq!(reply["reply"], "answer: during the outage");
    worker.stop().await;
}
