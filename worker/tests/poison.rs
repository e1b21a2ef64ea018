//! A message that takes its worker down every time (here: the worker is killed while
//! the model works on it, as a crash in the turn would) is tried exactly
//! `maxAttempts` times through the real agent handler, then dead-lettered instead of
//! crash-looping the pool.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::{WorkerProcess, wait_ready};
use support::{FakeModel, FakeReply, TempDir, wait_for};

const TOKEN_ENV: &str = "NEXO_TEST_POISON_ADMIN_TOKEN";
const TOKEN: &str = "poison-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_its_worker_is_dead_lettered_after_max_attempts() {
    let server = NatsServer::start().await;
    // The model never answers in time: every attempt is still running at the kill.
    let model =
        FakeModel::openai(|_| FakeReply::text("never seen").after(Duration::from_secs(120))).await;
    let dir = TempDir::new();
    let config = dir.path().join("worker.yaml");
    std::fs::write(
        &config,
        format!(
            "worker:
  dataDir: {data}
  http: {{listen: '127.0.0.1:0'}}
  broker: {{type: nats, urls: ['{nats}']}}
  delivery: {{ackWaitSeconds: 2, maxAttempts: 3}}
  admin: {{tokenEnv: {TOKEN_ENV}}}
agents:
  - name: a
    spec:
      model: {{provider: openai, model: m, baseUrl: '{model}', timeoutSeconds: 300, maxRetries: 0}}
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
            data = dir.path().join("data").display(),
            nats = server.url(),
            model = model.base_url,
        ),
    )
    .unwrap();
    let client = support::http_client();
    let env = [(TOKEN_ENV, TOKEN)];

    for attempt in 1..=3 {
        let mut worker = WorkerProcess::spawn(&config, &env).await;
        let base = worker.base();
        wait_ready(&client, &base).await;
        if attempt == 1 {
            support::post_async(&client, &base, "api", json!({"text": "poison"})).await;
        }
        wait_for(&format!("attempt {attempt} to reach the model"), || async {
            (model.request_count() == attempt).then_some(())
        })
        .await;
        worker.kill();
    }

    let worker = WorkerProcess::spawn(&config, &env).await;
    let base = worker.base();
    wait_ready(&client, &base).await;
    let dead = wait_for("the message in the dead-letter queue", || async {
        let body: Value = client
            .get(format!("{base}/admin/dlq"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let items = body["deadLetters"].as_array()?.clone();
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["subject"], "agent.route.default.a");
    assert_eq!(dead[0]["source"], "consume");
    let payload: Value = serde_json::from_str(dead[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload["text"], "poison");
    // Three attempts reached the model; the fourth delivery went to the DLQ instead.
    assert_eq!(model.request_count(), 3);
    drop(worker);
}
