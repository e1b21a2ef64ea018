//! The README's "change it while it runs": `nexo-worker run --config <file>` (agents
//! in the config file itself, no `catalogFile`) applies an edit of the file without a
//! restart, and an invalid edit leaves the running version alone.

mod support;

use serde_json::{Value, json};
use support::process::{WorkerProcess, wait_ready, write_worker_config};
use support::prometheus::Scrape;
use support::{TempDir, replace_file, wait_for};

/// Asks agent `a` through webhook `api` and returns its reply.
async fn ask(client: &reqwest::Client, base: &str, text: &str) -> String {
    let answer: Value = client
        .post(format!("{base}/v1/channels/api/messages"))
        .json(&json!({ "text": text }))
        .send()
        .await
        .expect("the worker answers")
        .json()
        .await
        .expect("a JSON answer");
    answer["reply"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_edit_of_the_config_file_is_applied_while_the_worker_runs() {
    let dir = TempDir::new();
    let config = write_worker_config(dir.path(), "{type: local}", "first {{input}}");
    let worker = WorkerProcess::spawn(&config, &[]).await;
    let base = worker.base();
    let client = support::http_client();
    wait_ready(&client, &base).await;
    assert_eq!(ask(&client, &base, "hi").await, "first hi");

    let original = std::fs::read_to_string(&config).unwrap();
    replace_file(
        &config,
        &original.replace("first {{input}}", "second {{input}}"),
    );
    wait_for("the edited agent to answer", || async {
        (ask(&client, &base, "hi").await == "second hi").then_some(())
    })
    .await;

    // An edit that does not validate (a channel for an agent that does not exist) is
    // refused: the running version keeps answering.
    let edited = std::fs::read_to_string(&config).unwrap();
    replace_file(
        &config,
        &edited.replace("defaultAgent: a", "defaultAgent: nobody"),
    );
    wait_for("the invalid edit to be counted", || async {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let invalid =
            Scrape::parse(&metrics).value("nexo_catalog_reloads_total", &[("result", "invalid")]);
        (invalid == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(ask(&client, &base, "still?").await, "second still?");

    drop(worker);
}
