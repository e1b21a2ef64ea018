//! A NATS outage does not take the pod out of its Service: `/readyz` stays 200 and
//! says the broker is not connected, the webhook channel accepts messages into the
//! outbox, and they are answered once NATS is back. A worker also starts, serves and
//! stops while NATS has never been reachable.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::ClosedPort;
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

/// Nothing listens where NATS should be, from the start: the worker still starts
/// (subscribing its channels' replies does not wait for the server), is ready and
/// accepts messages into the outbox, and stops within its drain period plus the
/// graces instead of waiting for a server that never comes.
#[tokio::test]
async fn a_worker_starts_serves_and_stops_while_nats_is_unreachable() {
    let nowhere = ClosedPort::new();
    let start = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        TestWorker::start_with(
            WorkerOptions {
                broker: format!(
                    "{{type: nats, urls: ['nats://127.0.0.1:{}']}}",
                    nowhere.port
                ),
                drain_seconds: 1,
                ..Default::default()
            },
            "agents:
  - name: a
    spec:
      model: {provider: scripted, script: [{reply: ok}]}
channels:
  - name: api
    spec: {defaultAgent: a, webhook: {}}
  - name: other
    spec: {defaultAgent: a, webhook: {}}
",
        ),
    )
    .await;
    let worker = start.expect("the worker starts without NATS");
    let (status, ready) = worker.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let degraded = ready["degraded"].as_array().unwrap();
    assert!(
        degraded
            .iter()
            .filter_map(Value::as_str)
            .any(|reason| reason.starts_with("broker is not connected")),
        "{ready}"
    );
    worker.post_async("api", json!({"text": "queued"})).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), worker.stop())
        .await
        .expect("the worker stops while NATS is unreachable");
}
