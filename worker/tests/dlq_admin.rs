//! The dead-letter queue through the admin API and the `nexo-worker dlq` command: a
//! malformed envelope is dead-lettered with its reason, can be listed, replayed (it is
//! delivered again) and deleted; the API wants the bearer token.

mod support;

use bytes::Bytes;
use serde_json::Value;
use support::{ADMIN_TOKEN_ENV, TestWorker, WorkerOptions, wait_for};

const AGENT: &str =
    "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: ok}]}\n";

/// Runs the worker binary with `args` without blocking the runtime that serves the
/// in-process worker it talks to.
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nexo-worker"))
            .args(args)
            .output()
    })
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn malformed_work_is_dead_lettered_listed_replayed_and_deleted() {
    let options = WorkerOptions {
        admin_token_env: ADMIN_TOKEN_ENV,
        ..Default::default()
    };
    let worker = TestWorker::start_with(options, AGENT).await;
    worker
        .broker
        .publish(
            "agent.route.default.a",
            Bytes::from_static(b"{not an envelope"),
        )
        .await
        .unwrap();

    let listed = wait_for("the dead letter", || async {
        let items = worker.dead_letters().await;
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(listed.len(), 1);
    let first = &listed[0];
    assert_eq!(first["subject"], "agent.route.default.a");
    assert_eq!(first["payload"], "{not an envelope");
    assert_eq!(first["source"], "consume");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed envelope"),
        "{first}"
    );

    let unauthorized = worker
        .http
        .post(worker.url(&format!("/admin/dlq/{}/replay", first["id"])))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);

    // Replay through the CLI: the message is delivered again and, still malformed,
    // comes back as a new dead letter.
    let url = worker.url("");
    let output = cli([
        "dlq",
        "--url",
        &url,
        "--token-env",
        ADMIN_TOKEN_ENV,
        "replay",
        &first["id"].to_string(),
    ]
    .map(String::from)
    .to_vec())
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let again = wait_for("the replayed message to fail again", || async {
        let items = worker.dead_letters().await;
        items.first().filter(|d| d["id"] != first["id"]).cloned()
    })
    .await;
    assert_eq!(again["payload"], "{not an envelope");

    let missing = worker
        .admin(reqwest::Method::POST, "/admin/dlq/999999/replay")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let listing = cli(
        ["dlq", "--url", &url, "--token-env", ADMIN_TOKEN_ENV, "list"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(listing.status.success());
    let printed: Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(printed["deadLetters"][0]["id"], again["id"]);

    let deleted = worker
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/dlq/{}", again["id"]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    assert!(worker.dead_letters().await.is_empty());

    let metrics = worker.metrics().await;
    assert_eq!(
        metrics.expect("nexo_dead_lettered_total", &[("source", "consume")]),
        2.0
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_dlq_command_explains_a_missing_token() {
    let output = cli(["dlq", "--token-env", "NEXO_TEST_NO_SUCH_TOKEN", "list"]
        .map(String::from)
        .to_vec())
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("environment variable `NEXO_TEST_NO_SUCH_TOKEN` is not set"),
        "{stderr}"
    );
}

/// `deadLetters.maxMessages` bounds the table: a new dead letter beyond it removes the
/// oldest, which `/metrics` counts.
#[tokio::test]
async fn dead_letters_beyond_the_limit_remove_the_oldest_and_are_counted() {
    let options = WorkerOptions {
        admin_token_env: ADMIN_TOKEN_ENV,
        worker_extra: "  delivery: {deadLetters: {maxMessages: 1}}\n".to_owned(),
        ..Default::default()
    };
    let worker = TestWorker::start_with(options, AGENT).await;
    for payload in ["{first", "{second"] {
        worker
            .broker
            .publish("agent.route.default.a", Bytes::from(payload))
            .await
            .unwrap();
    }
    worker
        .wait_for_metric(
            "nexo_dead_letters_removed_total",
            &[("reason", "overflow")],
            1.0,
        )
        .await;
    let kept = worker.dead_letters().await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["payload"], "{second");
    worker.wait_for_metric("nexo_dlq_depth", &[], 1.0).await;
    worker.stop().await;
}
