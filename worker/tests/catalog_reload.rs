//! A worker pointed at a catalog file applies changes to it in place: agents and
//! channels appear and disappear without a restart, and an invalid catalog leaves the
//! previous one running. The file is updated the way Kubernetes updates a ConfigMap
//! volume: a new directory and an atomic swap of the `..data` symlink.

mod support;

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use nexo_api::spec::SecretKeySelector;
use serde_json::{Value, json};
use support::{
    ADMIN_TOKEN_ENV, FakeModel, FakeReply, TempDir, TestWorker, WorkerOptions, wait_for,
};

/// A directory laid out like a mounted ConfigMap: `catalog.yaml -> ..data/catalog.yaml`,
/// `..data -> ..<version>`.
struct ConfigMapDir {
    dir: TempDir,
    version: u32,
}

impl ConfigMapDir {
    fn new(catalog: &str) -> Self {
        let mut volume = Self {
            dir: TempDir::new(),
            version: 0,
        };
        volume.update(catalog);
        std::os::unix::fs::symlink("..data/catalog.yaml", volume.file()).unwrap();
        volume
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("catalog.yaml")
    }

    /// Writes a new version and swaps `..data` to it atomically, as the kubelet does.
    fn update(&mut self, catalog: &str) {
        self.version += 1;
        let root = self.dir.path();
        let version = format!("..v{}", self.version);
        std::fs::create_dir(root.join(&version)).unwrap();
        std::fs::write(root.join(&version).join("catalog.yaml"), catalog).unwrap();
        let staged = root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, root.join("..data")).unwrap();
    }
}

fn agent(name: &str, reply: &str) -> String {
    format!(
        "  - name: {name}\n    spec:\n      model: {{provider: scripted, script: [{{reply: '{reply}'}}]}}\n"
    )
}

fn webhook(name: &str, agent: &str) -> String {
    format!("  - name: {name}\n    spec: {{defaultAgent: {agent}, webhook: {{}}}}\n")
}

fn catalog(revision: &str, agents: &[&str], channels: &[&str]) -> String {
    format!(
        "revision: {revision}\nagents:\n{}channels:\n{}",
        agents.concat(),
        channels.concat()
    )
}

async fn start(catalog_file: &Path) -> TestWorker {
    start_with_extra(catalog_file, "").await
}

/// A worker on `catalog_file` with more lines of the `worker:` block.
async fn start_with_extra(catalog_file: &Path, extra: &str) -> TestWorker {
    let options = WorkerOptions {
        admin_token_env: ADMIN_TOKEN_ENV,
        worker_extra: format!("  catalogFile: {}\n{extra}", catalog_file.display()),
        ..Default::default()
    };
    TestWorker::start_with(options, "").await
}

async fn wait_for_revision(worker: &TestWorker, revision: &str) -> Value {
    wait_for(&format!("revision {revision}"), || async {
        let (_, report) = worker.get_json("/catalog").await;
        (report["revision"] == revision).then_some(report)
    })
    .await
}

async fn ask(worker: &TestWorker, channel: &str) -> String {
    let (status, body) = worker.post_message(channel, json!({"text": "hello"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["reply"].as_str().unwrap().to_owned()
}

async fn admin_agents(worker: &TestWorker) -> Vec<String> {
    let listing: Value = worker
        .admin(reqwest::Method::GET, "/admin/agents")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listing["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The value of `nexo_catalog_reloads_total{result}` on `/metrics`.
async fn reloads(worker: &TestWorker, result: &str) -> u64 {
    let metrics = worker.metrics().await;
    metrics
        .value("nexo_catalog_reloads_total", &[("result", result)])
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn agents_and_channels_come_and_go_without_a_restart() {
    let a = agent("a", "A answers");
    let b = agent("b", "B answers");
    let (to_a, to_b) = (webhook("to-a", "a"), webhook("to-b", "b"));
    let mut volume = ConfigMapDir::new(&catalog("r1", &[&a], &[&to_a]));
    let worker = start(&volume.file()).await;

    assert_eq!(ask(&worker, "to-a").await, "A answers");
    let report = wait_for_revision(&worker, "r1").await;
    assert_eq!(
        report,
        json!({"revision": "r1", "pool": "default", "shard": 0, "shards": 1,
               "partitions": 64, "agents": ["default/a"], "channels": ["default/to-a"],
               "failed": [], "extensions": []})
    );

    // Add B and its channel.
    volume.update(&catalog("r2", &[&a, &b], &[&to_a, &to_b]));
    let report = wait_for_revision(&worker, "r2").await;
    assert_eq!(report["agents"], json!(["default/a", "default/b"]));
    assert_eq!(ask(&worker, "to-b").await, "B answers");
    assert_eq!(ask(&worker, "to-a").await, "A answers");

    // Remove A and its channel.
    volume.update(&catalog("r3", &[&b], &[&to_b]));
    let report = wait_for_revision(&worker, "r3").await;
    assert_eq!(report["channels"], json!(["default/to-b"]));
    let gone = worker
        .http
        .post(worker.url("/v1/channels/to-a/messages"))
        .json(&json!({"text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    assert_eq!(admin_agents(&worker).await, ["b"]);
    assert_eq!(ask(&worker, "to-b").await, "B answers");

    // An invalid catalog (a channel for an agent that does not exist) is refused.
    volume.update(&catalog("r4", &[&b], &[&to_b, &webhook("to-x", "x")]));
    wait_for("the invalid change to be counted", || async {
        (reloads(&worker, "invalid").await == 1).then_some(())
    })
    .await;
    assert_eq!(worker.get_json("/catalog").await.1["revision"], "r3");
    assert_eq!(ask(&worker, "to-b").await, "B answers");
    assert_eq!(reloads(&worker, "applied").await, 2);
    let (status, _) = worker.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK);

    worker.stop().await;
}

#[tokio::test]
async fn a_changed_agent_is_restarted_and_keeps_its_conversations() {
    let model = FakeModel::openai(|body| {
        FakeReply::text(&format!(
            "seen {}",
            body["messages"].as_array().unwrap().len()
        ))
    })
    .await;
    let catalog_text = |prompt: &str| {
        format!(
            "revision: {prompt}
agents:
  - name: a
    spec:
      systemPrompt: {prompt}
      model: {{provider: openai, model: m, baseUrl: '{}', apiKey: {{env: {ADMIN_TOKEN_ENV}}}}}
channels:
{}",
            model.base_url,
            webhook("to-a", "a")
        )
    };
    let mut volume = ConfigMapDir::new(&catalog_text("first"));
    let worker = start(&volume.file()).await;
    let (status, body) = worker
        .post_message("to-a", json!({"text": "remember me"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // System prompt and the user's message.
    assert_eq!(body["reply"], "seen 2");
    let conversation = body["conversation"].as_str().unwrap().to_owned();

    volume.update(&catalog_text("second"));
    wait_for_revision(&worker, "second").await;
    let (status, body) = worker
        .post_message(
            "to-a",
            json!({"text": "still there?", "conversation": conversation}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The new prompt, the first exchange, the new message.
    assert_eq!(body["reply"], "seen 4");
    assert_eq!(model.request(1)["messages"][0]["content"], "second");
    assert_eq!(reloads(&worker, "applied").await, 1);

    worker.stop().await;
}

#[tokio::test]
async fn a_rotated_api_key_restarts_the_agent_that_uses_it() {
    let model = FakeModel::openai(|_| FakeReply::text("ok")).await;
    let secrets = TempDir::new();
    let key = SecretKeySelector {
        name: "llm".to_owned(),
        key: "apiKey".to_owned(),
    };
    let key_file = secrets.path().join(key.mounted_file_name());
    std::fs::write(&key_file, "old-key\n").unwrap();
    let volume = ConfigMapDir::new(&format!(
        "agents:
  - name: a
    spec:
      model: {{provider: openai, model: m, baseUrl: '{}', apiKey: {{secretKeyRef: {{name: llm, key: apiKey}}}}}}
channels:
{}",
        model.base_url,
        webhook("to-a", "a")
    ));
    let extra = format!("  secretsDir: {}\n", secrets.path().display());
    let worker = start_with_extra(&volume.file(), &extra).await;
    let bearer = |index: usize| model.requests.lock().unwrap()[index].1.clone();

    assert_eq!(ask(&worker, "to-a").await, "ok");
    assert_eq!(bearer(0).as_deref(), Some("Bearer old-key"));
    std::fs::write(&key_file, "new-key\n").unwrap();
    wait_for("the agent to use the new key", || async {
        ask(&worker, "to-a").await;
        let last = model.request_count() - 1;
        (bearer(last).as_deref() == Some("Bearer new-key")).then_some(())
    })
    .await;

    worker.stop().await;
}

#[tokio::test]
async fn an_agent_that_cannot_be_built_does_not_keep_the_others_from_running() {
    let secrets = TempDir::new();
    let key = SecretKeySelector {
        name: "llm".to_owned(),
        key: "apiKey".to_owned(),
    };
    // Agent `a` needs a key that is not there yet (a Secret the kubelet has not
    // written); `b` needs nothing.
    let mut volume = ConfigMapDir::new(&format!(
        "revision: r1
agents:
  - name: a
    spec:
      model: {{provider: anthropic, model: m, baseUrl: 'http://127.0.0.1:9', apiKey: {{secretKeyRef: {{name: llm, key: apiKey}}}}}}
{}channels:
{}",
        agent("b", "B answers"),
        webhook("to-b", "b")
    ));
    let extra = format!("  secretsDir: {}\n", secrets.path().display());
    let worker = start_with_extra(&volume.file(), &extra).await;

    let report = wait_for_revision(&worker, "r1").await;
    assert_eq!(report["agents"], json!(["default/b"]));
    assert_eq!(report["failed"][0]["kind"], "agent");
    assert_eq!(report["failed"][0]["name"], "default/a");
    let reason = report["failed"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("API key"), "{reason}");
    assert_eq!(ask(&worker, "to-b").await, "B answers");

    // The key arrives: the left-out agent is tried again and starts.
    // An invalid change meanwhile is refused, and does not cancel the retry.
    volume.update("agents: [oops\n");
    wait_for("the invalid change to be refused", || async {
        (reloads(&worker, "invalid").await >= 1).then_some(())
    })
    .await;
    std::fs::write(secrets.path().join(key.mounted_file_name()), "sk-late\n").unwrap();
    wait_for("agent a to start once its key exists", || async {
        let (_, report) = worker.get_json("/catalog").await;
        (report["agents"] == json!(["default/a", "default/b"]) && report["failed"] == json!([]))
            .then_some(())
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn an_agent_whose_extension_is_not_in_the_catalog_is_reported() {
    let uses_text = "  - name: a
    spec:
      extensions: [{name: text}]
      model: {provider: scripted, script: [{reply: 'A answers'}]}
";
    let text = "extensions:\n  - name: text\n    spec: {nats: {}}\n";
    let with_text = |revision: &str| {
        format!(
            "{}{text}",
            catalog(revision, &[uses_text], &[&webhook("to-a", "a")])
        )
    };
    let mut volume = ConfigMapDir::new(&with_text("r1"));
    let worker = start(&volume.file()).await;
    let report = wait_for_revision(&worker, "r1").await;
    assert_eq!(report["agents"], json!(["default/a"]));
    assert_eq!(report["failed"], json!([]));
    assert_eq!(report["extensions"][0]["name"], "default/text");

    // The extension leaves the catalog while the agent still names it: the agent is
    // reported (the version that ran keeps answering), and the extension is closed.
    volume.update(&catalog("r2", &[uses_text], &[&webhook("to-a", "a")]));
    let report = wait_for_revision(&worker, "r2").await;
    assert_eq!(report["failed"][0]["name"], "default/a", "{report}");
    let reason = report["failed"][0]["reason"].as_str().unwrap();
    assert_eq!(reason, "extension `text` is not in the catalog");
    assert_eq!(report["extensions"], json!([]));
    assert_eq!(ask(&worker, "to-a").await, "A answers");

    // It comes back: the agent runs with it again.
    volume.update(&with_text("r3"));
    let report = wait_for_revision(&worker, "r3").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    assert_eq!(report["extensions"][0]["name"], "default/text");
    worker.stop().await;
}
