//! Memory through a running worker: conversations survive a restart, recalled
//! memories reach the prompt, the model's memory tools, the admin endpoints (search,
//! export, import, forget), and an agent whose memory file is corrupt or cannot be
//! prepared left out and reported while the rest serves. The model is a local chat-completions server.

mod support;

use std::path::Path;

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Value, json};
use support::{
    ADMIN_TOKEN_ENV, FakeModel, FakeReply, TempDir, TestWorker, WEBHOOK_SECRET_ENV, WorkerOptions,
    last_user_text, next_message,
};

fn config(base_url: &str) -> String {
    format!(
        "agents:
  - name: assistant
    spec:
      systemPrompt: Be brief.
      model: {{provider: openai, model: m, baseUrl: {base_url}, timeoutSeconds: 2, maxRetries: 0}}
channels:
  - name: api
    spec: {{defaultAgent: assistant, webhook: {{replyTimeoutSeconds: 5, signingSecret: {{env: {WEBHOOK_SECRET_ENV}}}}}}}
"
    )
}

/// [`config`] with `memory` (YAML indented by eight spaces) as the agent's memory
/// settings.
fn config_with_memory(base_url: &str, memory: &str) -> String {
    config(base_url).replace(
        "      systemPrompt: Be brief.\n",
        &format!("      systemPrompt: Be brief.\n      memory:\n{memory}"),
    )
}

async fn start(data_dir: &Path, base_url: &str) -> TestWorker {
    TestWorker::start_with(
        WorkerOptions {
            data_dir: Some(data_dir.to_owned()),
            admin_token_env: ADMIN_TOKEN_ENV,
            ..Default::default()
        },
        &config(base_url),
    )
    .await
}

fn echo() -> impl Fn(&Value) -> FakeReply + Send + Sync + 'static {
    |body| FakeReply::text(&format!("echo {}", last_user_text(body)))
}

/// Sends `text` from `sender` in `conversation` (signed, so both are taken) and
/// returns the answer.
async fn say(worker: &TestWorker, conversation: &str, sender: &str, text: &str) -> Value {
    let body = json!({"text": text, "conversation": conversation, "sender": sender});
    let (status, answer) = worker.post_signed_message("api", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn system_prompt(body: &Value) -> String {
    body["messages"][0]["content"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_restart_keeps_conversations_and_recalls_other_ones() {
    let data = TempDir::new();
    let model = FakeModel::openai(echo()).await;
    let worker = start(data.path(), &model.base_url).await;
    say(&worker, "c1", "ada", "my locker code is 4711").await;
    worker.stop().await;

    let worker = start(data.path(), &model.base_url).await;
    let answer = say(&worker, "c1", "ada", "and now?").await;
    assert_eq!(answer["reply"], "echo and now?");
    let request = model.request(1);
    let messages = request["messages"].as_array().unwrap();
    assert_eq!(messages[1]["content"], "my locker code is 4711");
    assert_eq!(messages[2]["content"], "echo my locker code is 4711");

    // Another conversation of the same sender recalls it from long-term memory.
    say(&worker, "c2", "ada", "what is my locker code").await;
    let request = model.request(2);
    assert_eq!(request["messages"].as_array().unwrap().len(), 2);
    let system = system_prompt(&request);
    assert!(
        system.starts_with("Be brief.\n\nRelevant memories"),
        "{system}"
    );
    assert!(system.contains("my locker code is 4711"), "{system}");
    // ...but another sender does not see it.
    say(&worker, "c3", "bob", "what is my locker code").await;
    assert!(!system_prompt(&model.request(3)).contains("4711"));
    let metrics = worker.metrics().await;
    let recalls = metrics.expect(
        "nexo_memory_recall_duration_seconds_count",
        &[("agent", "default/assistant"), ("mode", "hybrid")],
    );
    assert!(recalls >= 1.0, "{recalls} recalls");
    assert_eq!(
        metrics.expect("nexo_memory_items", &[("agent", "default/assistant")]),
        4.0
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_model_remembers_and_forgets_through_its_memory_tools() {
    let data = TempDir::new();
    // "forget N" makes the model call memory_forget, anything else memory_remember.
    let model = FakeModel::openai(|body| {
        let last = body["messages"].as_array().unwrap().last().unwrap().clone();
        if last["role"] == "tool" {
            return FakeReply::text(&format!("done: {}", last["content"].as_str().unwrap()));
        }
        match last_user_text(body).strip_prefix("forget ") {
            Some(id) => FakeReply::tool_call(
                "call-2",
                "memory_forget",
                json!({"id": id.parse::<i64>().unwrap()}),
            ),
            None => FakeReply::tool_call(
                "call-1",
                "memory_remember",
                json!({"text": "Ada is allergic to peanuts"}),
            ),
        }
    })
    .await;
    let worker = start(data.path(), &model.base_url).await;
    let answer = say(&worker, "c1", "ada", "remember my allergy").await;
    let reply = answer["reply"].as_str().unwrap();
    let id = reply
        .strip_prefix("done: remembered as memory ")
        .unwrap_or_else(|| panic!("{answer}"));
    let tools: Vec<String> = model.request(0)["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tools, ["memory_forget", "memory_remember", "memory_search"]);

    let peanuts = "/memory?query=peanuts&mode=keyword&k=3";
    let (status, found) = admin(&worker, reqwest::Method::GET, peanuts).await;
    assert_eq!(status, StatusCode::OK);
    let hit = &found["hits"][0];
    assert_eq!(hit["text"], "Ada is allergic to peanuts");
    assert_eq!(hit["kind"], "fact");
    assert_eq!(hit["sender"], "ada");
    assert_eq!(hit["conversation"], "c1");
    assert!(
        hit["sourceId"].is_string() && hit["createdAt"].is_string(),
        "{hit}"
    );

    // Another sender cannot make the model forget it; ada can.
    let answer = say(&worker, "c2", "bob", &format!("forget {id}")).await;
    assert_eq!(
        answer["reply"],
        format!("done: error: no memory {id} of this user")
    );
    let (_, found) = admin(&worker, reqwest::Method::GET, peanuts).await;
    assert_eq!(found["hits"][0]["text"], "Ada is allergic to peanuts");
    let answer = say(&worker, "c1", "ada", &format!("forget {id}")).await;
    assert_eq!(answer["reply"], format!("done: forgot memory {id}"));
    let (_, found) = admin(&worker, reqwest::Method::GET, peanuts).await;
    assert_eq!(found["hits"], json!([]));
    worker.stop().await;
}

/// A request to `/admin/agents/default/{agent}{path}`, with the token or without.
fn admin_request(
    worker: &TestWorker,
    method: reqwest::Method,
    agent: &str,
    path: &str,
    token: bool,
) -> reqwest::RequestBuilder {
    let path = format!("/admin/agents/default/{agent}{path}");
    if token {
        worker.admin(method, &path)
    } else {
        worker.http.request(method, worker.url(&path))
    }
}

async fn admin(worker: &TestWorker, method: reqwest::Method, path: &str) -> (StatusCode, Value) {
    let response = admin_request(worker, method, "assistant", path, true)
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn admin_endpoints_search_export_import_and_forget() {
    let model = FakeModel::openai(echo()).await;
    let first_dir = TempDir::new();
    let worker = start(first_dir.path(), &model.base_url).await;
    for (sender, text) in [
        ("ada", "ada likes tea"),
        ("ada", "ada lives in Lyon"),
        ("bob", "bob likes coffee"),
    ] {
        worker
            .post_signed_message("api", json!({"text": text, "sender": sender}))
            .await;
    }
    let (_, listed) = admin(&worker, reqwest::Method::GET, "/memory").await;
    assert_eq!(listed["total"], 3);
    let (_, found) = admin(
        &worker,
        reqwest::Method::GET,
        "/memory?query=likes%20tea&k=2",
    )
    .await;
    assert!(
        found["hits"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ada likes tea"),
        "{found}"
    );

    // Export, then import into a worker with an empty memory: same search results.
    let export = admin_request(
        &worker,
        reqwest::Method::GET,
        "assistant",
        "/memory/export",
        true,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(export.headers()["content-type"], "application/vnd.sqlite3");
    let file = export.bytes().await.unwrap();
    let second_dir = TempDir::new();
    let second = start(second_dir.path(), &model.base_url).await;
    let import = |body: Bytes| {
        admin_request(
            &second,
            reqwest::Method::POST,
            "assistant",
            "/memory/import",
            true,
        )
        .body(body)
        .send()
    };
    let imported = import(file).await.unwrap();
    assert_eq!(imported.status().as_u16(), 200);
    for query in [
        "/memory?query=likes%20tea&k=2",
        "/memory?query=coffee&mode=vector&k=3",
    ] {
        assert_eq!(
            admin(&second, reqwest::Method::GET, query).await,
            admin(&worker, reqwest::Method::GET, query).await
        );
    }
    let refused = import(Bytes::from_static(b"garbage")).await.unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    second.stop().await;

    // Forget me: every row of ada goes.
    let (status, forgot) = admin(&worker, reqwest::Method::DELETE, "/memory?sender=ada").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        forgot["deleted"], 7,
        "two memories, two history turns, two conversations, the sender's owner id"
    );
    let (_, listed) = admin(&worker, reqwest::Method::GET, "/memory?sender=ada").await;
    assert_eq!(listed["items"], json!([]));
    let (status, _) = admin(&worker, reqwest::Method::DELETE, "/memory").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // One memory by id.
    let (_, listed) = admin(&worker, reqwest::Method::GET, "/memory").await;
    let id = listed["items"][0]["id"].as_i64().unwrap();
    let (status, _) = admin(&worker, reqwest::Method::DELETE, &format!("/memory/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = admin(&worker, reqwest::Method::DELETE, &format!("/memory/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for (agent, token, status) in [("nobody", true, 404), ("assistant", false, 401)] {
        let request = admin_request(&worker, reqwest::Method::GET, agent, "/memory", token);
        assert_eq!(request.send().await.unwrap().status().as_u16(), status);
    }
    worker.stop().await;
}

/// The agent runtime on the local bus, with its memory file capped (SQLite's
/// `max_page_count`, standing in for a full disk): the turn that cannot be written
/// answers with an error reply and a `turnFailed` event, and the conversation keeps
/// what it had.
#[tokio::test]
async fn a_full_memory_fails_the_turn_and_keeps_the_conversation() {
    use std::sync::Arc;

    use nexo_api::spec::AgentSpec;
    use nexo_api::{Envelope, ErrorKind, ResourceKey, subject};
    use nexo_worker::AgentRuntime;
    use nexo_worker::SharedModels;
    use nexo_worker::broker::{Broker, LocalBroker, Message, new_inbox};
    use nexo_worker::memory::{AgentMemory, embedder::HashingEmbedder};
    use nexo_worker::metrics::Metrics;
    use nexo_worker::queue::Handler;
    use nexo_worker::secrets::Secrets;

    let data = TempDir::new();
    let key = ResourceKey::new("default", "assistant");
    let spec: AgentSpec = serde_json::from_value(
        json!({"model": {"provider": "scripted", "script": [{"reply": "noted: {{input}}"}]}}),
    )
    .unwrap();
    let file = nexo_worker::memory::database_path(data.path(), &key);
    let memory = Arc::new(
        AgentMemory::open(&file, &spec.memory, Arc::new(HashingEmbedder::new(384)))
            .await
            .unwrap(),
    );
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
    let metrics = Arc::new(Metrics::new());
    let models = Arc::new(SharedModels::new(&Default::default(), &metrics));
    let runtime = AgentRuntime::new(
        key.clone(),
        spec,
        broker.clone(),
        metrics,
        &Secrets::new("/nonexistent"),
        memory.clone(),
        models,
    )
    .unwrap();
    let mut events = broker
        .subscribe(&subject::agent_events(&key))
        .await
        .unwrap();
    let inbox = new_inbox();
    let mut replies = broker.subscribe(&inbox).await.unwrap();
    let turn = |text: &str| {
        let mut envelope = Envelope::inbound("webhook", "api", "c1", "ada", text);
        envelope.reply_to = Some(inbox.clone());
        Message {
            subject: subject::agent_route(&key),
            reply: None,
            payload: Bytes::from(envelope.to_json()),
        }
    };

    runtime.handle(&turn("first"), 1).await;
    let reply =
        Envelope::from_json(&next_message(&mut replies, "first reply").await.payload).unwrap();
    assert_eq!(reply.text, "noted: first");
    let before = memory.session("c1").await.unwrap();
    assert_eq!(before.turns.len(), 1);

    memory.cap_pages(Some(0)).await.unwrap();
    runtime
        .handle(&turn(&"long words ".repeat(20_000)), 1)
        .await;
    let reply =
        Envelope::from_json(&next_message(&mut replies, "error reply").await.payload).unwrap();
    let error = reply.error.as_ref().expect("an error reply");
    assert_eq!(error.kind, ErrorKind::Memory);
    assert!(error.message.contains("memory is full"), "{error:?}");
    assert!(reply.text.contains("memory is full"), "{}", reply.text);
    assert!(
        !reply.text.contains(".db"),
        "no file names to users: {}",
        reply.text
    );
    let failed = loop {
        let event: Value =
            serde_json::from_slice(&next_message(&mut events, "turn events").await.payload)
                .unwrap();
        if event["type"] == "turnFailed" {
            break event;
        }
    };
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&file.display().to_string()) && error.contains("full"),
        "{error}"
    );
    assert_eq!(memory.session("c1").await.unwrap(), before);

    // Room again: the next turn is kept.
    memory.cap_pages(None).await.unwrap();
    runtime.handle(&turn("third"), 1).await;
    let reply =
        Envelope::from_json(&next_message(&mut replies, "third reply").await.payload).unwrap();
    assert_eq!(reply.text, "noted: third");
    assert_eq!(memory.session("c1").await.unwrap().turns.len(), 2);
}

/// The embedding API key is a secret reference: read from the mounted Secret, sent
/// as a bearer token, and a rotated key restarts the agent with the new one.
#[tokio::test]
async fn the_embedding_key_comes_from_a_secret_and_follows_its_rotation() {
    use nexo_api::spec::SecretKeySelector;
    use support::embeddings::FakeEmbeddings;
    use support::wait_for;

    let model = FakeModel::openai(echo()).await;
    let embeddings = FakeEmbeddings::start(|_| vec![1.0, 0.0, 0.0]).await;
    let secrets = TempDir::new();
    let selector = SecretKeySelector {
        name: "embeddings".to_owned(),
        key: "apiKey".to_owned(),
    };
    let key_file = secrets.path().join(selector.mounted_file_name());
    std::fs::write(&key_file, "old-key\n").unwrap();
    let data = TempDir::new();
    let yaml = config_with_memory(
        &model.base_url,
        &format!(
            "        longTerm:
          embedder:
            provider: openai
            model: fixed
            dimensions: 3
            baseUrl: {}
            apiKey: {{secretKeyRef: {{name: embeddings, key: apiKey}}}}
",
            embeddings.base_url
        ),
    );
    let worker = TestWorker::start_with(
        WorkerOptions {
            data_dir: Some(data.path().to_owned()),
            worker_extra: format!("  secretsDir: {}\n", secrets.path().display()),
            ..Default::default()
        },
        &yaml,
    )
    .await;
    say(&worker, "c1", "ada", "hello").await;
    assert_eq!(embeddings.request(0)["model"], "fixed");
    assert_eq!(
        embeddings.last_authorization().as_deref(),
        Some("Bearer old-key")
    );

    std::fs::write(&key_file, "new-key\n").unwrap();
    wait_for("the agent to embed with the new key", || async {
        say(&worker, "c1", "ada", "again").await;
        (embeddings.last_authorization().as_deref() == Some("Bearer new-key")).then_some(())
    })
    .await;
    worker.stop().await;
}

/// A corrupt memory file leaves that agent out, reported with the file's name, and
/// the worker serves the rest: in a pool (agents from a catalog file) and on a
/// laptop (agents in the config file) alike.
#[tokio::test]
async fn from_a_catalog_file_a_corrupt_memory_file_leaves_only_that_agent_out() {
    a_corrupt_memory_file_leaves_only_that_agent_out(true).await;
}

#[tokio::test]
async fn from_the_config_file_a_corrupt_memory_file_leaves_only_that_agent_out() {
    a_corrupt_memory_file_leaves_only_that_agent_out(false).await;
}

async fn a_corrupt_memory_file_leaves_only_that_agent_out(from_catalog_file: bool) {
    let model = FakeModel::openai(echo()).await;
    let data = TempDir::new();
    let file = data.path().join("memory").join("default_broken.db");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, vec![7u8; 4096]).unwrap();
    let model_spec = format!(
        "{{provider: openai, model: m, baseUrl: {}}}",
        model.base_url
    );
    let agents = format!(
        "agents:
  - {{name: assistant, spec: {{model: {model_spec}}}}}
  - {{name: broken, spec: {{model: {model_spec}}}}}
channels:
  - {{name: api, spec: {{defaultAgent: assistant, webhook: {{signingSecret: {{env: {WEBHOOK_SECRET_ENV}}}}}}}}}
"
    );
    let catalog = TempDir::new();
    let catalog_file = catalog.path().join("catalog.yaml");
    let (worker_extra, config) = if from_catalog_file {
        std::fs::write(&catalog_file, format!("revision: r1\n{agents}")).unwrap();
        (
            format!("  catalogFile: {}\n", catalog_file.display()),
            String::new(),
        )
    } else {
        (String::new(), agents)
    };
    let worker = TestWorker::start_with(
        WorkerOptions {
            data_dir: Some(data.path().to_owned()),
            worker_extra,
            ..Default::default()
        },
        &config,
    )
    .await;
    let (_, report) = worker.get_json("/catalog").await;
    assert_eq!(report["agents"], json!(["default/assistant"]), "{report}");
    assert_eq!(report["failed"][0]["name"], "default/broken");
    let reason = report["failed"][0]["reason"].as_str().unwrap();
    assert!(reason.contains(&file.display().to_string()), "{reason}");
    let (status, ready) = worker.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    say(&worker, "c1", "ada", "hello").await;
    worker.stop().await;
}

/// An agent that cannot attach (its memories must be embedded again for a new
/// embedder, and the embedding server is down) is reported — `/catalog` `failed`,
/// `nexo_components_not_running` — while the pod stays ready and another agent
/// answers on its channel; once the server is back the agent attaches and the
/// report clears.
#[tokio::test]
async fn an_agent_that_cannot_attach_is_reported_and_the_pod_serves_the_others() {
    let data = TempDir::new();
    remember_before_start(data.path(), 16, &["tea, no sugar"]).await;
    let embeddings = support::embeddings::FakeEmbeddings::start(|_| vec![1.0, 0.0, 0.0]).await;
    embeddings.set_failing(true);
    let model = FakeModel::openai(echo()).await;
    let yaml = format!(
        "{}  - name: other
    spec:
      model: {{provider: openai, model: m, baseUrl: {}, timeoutSeconds: 2, maxRetries: 0}}
  - name: to-other
    spec: {{defaultAgent: other, webhook: {{replyTimeoutSeconds: 5}}}}
",
        config_with_memory(
            &model.base_url,
            &format!(
                "        longTerm:
          embedder: {{provider: openai, model: m, dimensions: 3, baseUrl: '{}', timeoutSeconds: 1}}
",
                embeddings.base_url
            ),
        ),
        model.base_url,
    );
    // The second agent goes with the agents, its channel with the channels.
    let (agents, channels) = yaml.split_at(yaml.find("channels:").unwrap());
    let (channels, other) = channels.split_at(channels.find("  - name: other").unwrap());
    let (other_agent, other_channel) = other.split_at(other.find("  - name: to-other").unwrap());
    let yaml = format!("{agents}{other_agent}{channels}{other_channel}");
    let worker = TestWorker::start_with(
        WorkerOptions {
            data_dir: Some(data.path().to_owned()),
            ..Default::default()
        },
        &yaml,
    )
    .await;

    let report = support::wait_for("the agent to be reported not running", || async {
        let (_, report) = worker.get_json("/catalog").await;
        (!report["failed"].as_array().unwrap().is_empty()).then_some(report)
    })
    .await;
    assert_eq!(report["failed"][0]["kind"], "agent", "{report}");
    assert_eq!(report["failed"][0]["name"], "default/assistant", "{report}");
    let reason = report["failed"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("cannot prepare its memory"), "{reason}");
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics.expect("nexo_components_not_running", &[("kind", "agent")]),
        1.0
    );
    let (status, ready) = worker.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["ready"], true);
    let (status, answer) = worker
        .post_message("to-other", json!({"text": "still there?"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["reply"], "echo still there?");

    embeddings.set_failing(false);
    support::wait_for("the agent to attach once the server is back", || async {
        let (_, report) = worker.get_json("/catalog").await;
        let clear =
            report["failed"].as_array().unwrap().is_empty() && report.get("attaching").is_none();
        clear.then_some(())
    })
    .await;
    worker
        .wait_for_metric("nexo_components_not_running", &[("kind", "agent")], 0.0)
        .await;
    say(&worker, "c1", "ada", "hello").await;
    worker.stop().await;
}

/// `nexo_memory_items` is the number of memories from the start (before any turn) and
/// after every write, an admin "forget" included.
#[tokio::test]
async fn the_memory_gauge_follows_every_write() {
    let data = TempDir::new();
    let dimensions = nexo_api::spec::MemorySpec::default()
        .long_term
        .embedder
        .dimensions;
    let ids = remember_before_start(data.path(), dimensions, &["tea, no sugar", "Lyon"]).await;
    let id = ids[0];

    let model = FakeModel::openai(echo()).await;
    let worker = start(data.path(), &model.base_url).await;
    let agent = [("agent", "default/assistant")];
    worker
        .wait_for_metric("nexo_memory_items", &agent, 2.0)
        .await;
    let (status, _) = admin(&worker, reqwest::Method::DELETE, &format!("/memory/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    worker
        .wait_for_metric("nexo_memory_items", &agent, 1.0)
        .await;
    worker.stop().await;
}

/// Stores `facts` in the memory file of `default/assistant` under `data_dir`, embedded
/// by the hashing embedder of `dimensions`, as a worker that ran before left them.
async fn remember_before_start(data_dir: &Path, dimensions: u32, facts: &[&str]) -> Vec<i64> {
    use std::sync::Arc;

    use nexo_api::ResourceKey;
    use nexo_worker::memory::{AgentMemory, NewMemory, embedder::HashingEmbedder};

    let key = ResourceKey::new("default", "assistant");
    let file = nexo_worker::memory::database_path(data_dir, &key);
    let embedder = Arc::new(HashingEmbedder::new(dimensions as usize));
    let spec = nexo_api::spec::MemorySpec::default();
    let memory = AgentMemory::open(&file, &spec, embedder).await.unwrap();
    let mut ids = Vec::new();
    for fact in facts {
        ids.push(memory.remember(NewMemory::fact(*fact)).await.unwrap());
    }
    ids
}
