//! Graceful shutdown: intake stops, in-flight turns finish and are answered, turns
//! still running at the drain deadline are abandoned, and the process-wide lock keeps
//! a second worker off the same data directory.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::process::{WorkerProcess, wait_ready};
use support::{FakeModel, FakeReply, TempDir, TestWorker, WorkerOptions, wait_for};

fn slow_worker_yaml(base_url: &str) -> String {
    format!(
        "agents:
  - name: slow
    spec:
      model: {{provider: openai, model: m, baseUrl: {base_url}, timeoutSeconds: 30, maxRetries: 0}}
channels:
  - name: api
    spec:
      defaultAgent: slow
      webhook: {{replyTimeoutSeconds: 30}}
"
    )
}

#[tokio::test]
async fn shutdown_drains_an_in_flight_turn() {
    let model = FakeModel::openai(|_| {
        FakeReply::text("finished after all").after(Duration::from_millis(1500))
    })
    .await;
    let mut worker = TestWorker::start(&slow_worker_yaml(&model.base_url)).await;
    let url = worker.url("/v1/channels/api/messages");
    let client = worker.http.clone();
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"text": "take your time"}))
            .send()
            .await
    });

    wait_for("the model to receive the turn", || async {
        (model.request_count() == 1).then_some(())
    })
    .await;
    worker.shutdown.cancel();

    // Draining: not ready any more, but the running turn is still answered.
    let readyz = worker.http.get(worker.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status().as_u16(), 503);
    let response = request
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reply"], "finished after all");

    tokio::time::timeout(support::DEADLINE, worker.running.take().unwrap().wait())
        .await
        .expect("worker stops after draining")
        .expect("clean stop");
}

/// POSTs `text` asynchronously to the `api` webhook; returns the response.
async fn post_async(worker: &TestWorker, text: &str) -> reqwest::Response {
    worker
        .http
        .post(worker.url("/v1/channels/api/messages"))
        .header("prefer", "respond-async")
        .json(&json!({ "text": text }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn messages_are_refused_once_shutdown_has_begun() {
    let model = FakeModel::openai(|_| {
        FakeReply::text("finished after all").after(Duration::from_millis(1000))
    })
    .await;
    let mut worker = TestWorker::start(&slow_worker_yaml(&model.base_url)).await;
    assert_eq!(post_async(&worker, "before").await.status().as_u16(), 202);
    wait_for("the model to receive the turn", || async {
        (model.request_count() == 1).then_some(())
    })
    .await;
    worker.shutdown.cancel();

    // The running turn keeps the server up while it drains; new messages are refused
    // rather than acknowledged and never handled.
    let refused = post_async(&worker, "after").await;
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    let (status, body) = worker.post_message("api", json!({"text": "sync"})).await;
    assert_eq!(status.as_u16(), 503, "{body}");

    tokio::time::timeout(support::DEADLINE, worker.running.take().unwrap().wait())
        .await
        .expect("worker stops in time")
        .expect("worker stops cleanly");
    assert_eq!(
        model.request_count(),
        1,
        "only the accepted message was handled"
    );
}

/// On the local bus, work accepted before the signal that no consumer took by the end
/// of the drain is kept in the outbox, and handled after the next start.
#[tokio::test]
async fn accepted_work_not_started_by_shutdown_is_handled_after_the_next_start() {
    let model =
        FakeModel::openai(|_| FakeReply::text("done").after(Duration::from_millis(300))).await;
    let yaml = slow_worker_yaml(&model.base_url).replace(
        "maxRetries: 0}",
        "maxRetries: 0}\n      limits: {maxConcurrency: 1}",
    );
    let dir = TempDir::new();
    let options = || WorkerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let worker = TestWorker::start_with(options(), &yaml).await;
    for i in 0..3 {
        let response = post_async(&worker, &format!("job {i}")).await;
        assert_eq!(response.status().as_u16(), 202);
    }
    wait_for("the model to receive the first turn", || async {
        (model.request_count() >= 1).then_some(())
    })
    .await;
    worker.stop().await;
    let handled = model.request_count();
    assert!(handled < 3, "the test needs work left at shutdown");

    let worker = TestWorker::start_with(options(), &yaml).await;
    wait_for("the kept work to be handled", || async {
        (model.request_count() == 3).then_some(())
    })
    .await;
    let texts: std::collections::BTreeSet<_> = (0..3)
        .map(|i| support::last_user_text(&model.request(i)))
        .collect();
    assert_eq!(texts.len(), 3, "each job once: {texts:?}");
    worker.stop().await;
}

#[tokio::test]
async fn turns_past_the_drain_deadline_are_abandoned() {
    let model =
        FakeModel::openai(|_| FakeReply::text("too late").after(Duration::from_secs(20))).await;
    let mut worker = TestWorker::start_with_drain(1, &slow_worker_yaml(&model.base_url)).await;
    let url = worker.url("/v1/channels/api/messages");
    let client = worker.http.clone();
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"text": "never mind"}))
            .send()
            .await
    });
    wait_for("the model to receive the turn", || async {
        (model.request_count() == 1).then_some(())
    })
    .await;

    let started = Instant::now();
    worker.shutdown.cancel();
    tokio::time::timeout(support::DEADLINE, worker.running.take().unwrap().wait())
        .await
        .expect("worker stops at the drain deadline, not when the model answers")
        .expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped only after {:?}",
        started.elapsed()
    );
    // The waiting client is told the worker stopped, not left hanging.
    let response = request
        .await
        .unwrap()
        .expect("the waiting request gets an answer");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("stopped before answering"),
        "{body}"
    );
}

#[tokio::test]
async fn a_second_process_on_the_same_data_directory_is_refused() {
    let dir = TempDir::new();
    let write_config = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "worker:\n  dataDir: {}\n  http: {{listen: '127.0.0.1:0'}}\nagents:\n  - name: a\n    spec:\n      model: {{provider: scripted, script: [{{reply: hi}}]}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        path
    };
    let first_config = write_config("first.yaml");
    let second_config = write_config("second.yaml");
    let binary = env!("CARGO_BIN_EXE_nexo-worker");

    let mut first = WorkerProcess::spawn(&first_config, &[]).await;
    wait_ready(&support::http_client(), &first.base()).await;

    let second = Command::new(binary)
        .args(["run", "--config"])
        .arg(&second_config)
        .output()
        .unwrap();
    first.kill();
    assert!(!second.status.success(), "second worker started");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("is in use by another nexo worker"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("(pid {})", first.id())),
        "{stderr}"
    );
}
