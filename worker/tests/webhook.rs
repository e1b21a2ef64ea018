//! End to end through HTTP: webhook channel → broker → agent → model → tools → reply,
//! with the OpenAI-compatible provider pointed at a local chat-completions server.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{
    FakeModel, FakeReply, TestWorker, has_tool_result, last_user_text, read_until, wait_for,
    webhook_signature,
};

/// Cargo sets this variable for every test process; it stands in for a secret.
const PRESENT_ENV: &str = "CARGO_PKG_NAME";

fn openai_agent(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        "  - name: {name}
    spec:
      systemPrompt: Be brief.
      tools: [current_time]
{extra}      model:
        provider: openai
        model: test-model
        baseUrl: {base_url}
        apiKey: {{env: {PRESENT_ENV}}}
        timeoutSeconds: 1
        maxRetries: 1
"
    )
}

fn webhook_channel(agent: &str) -> String {
    format!(
        "channels:\n  - name: api\n    spec:\n      defaultAgent: {agent}\n      webhook: {{replyTimeoutSeconds: 5}}\n"
    )
}

#[tokio::test]
async fn openai_tool_call_round_trip() {
    let model = FakeModel::openai(|body| {
        if has_tool_result(body) {
            let result = body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["role"] == "tool")
                .unwrap();
            FakeReply::text(&format!("It is {}.", result["content"].as_str().unwrap()))
        } else {
            FakeReply::tool_call("call_1", "current_time", json!({}))
        }
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, ""),
        webhook_channel("assistant")
    ))
    .await;

    let (status, body) = worker
        .post_message("api", json!({"text": "what time is it?"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reply = body["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("It is 20") && reply.ends_with("Z."),
        "{reply}"
    );

    assert_eq!(model.request_count(), 2);
    let first = model.request(0);
    assert_eq!(first["model"], "test-model");
    assert_eq!(
        first["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(last_user_text(&first), "what time is it?");
    assert_eq!(first["tools"][0]["function"]["name"], "current_time");
    let auth = model.requests.lock().unwrap()[0].1.clone();
    assert_eq!(
        auth.as_deref(),
        Some(format!("Bearer {}", env!("CARGO_PKG_NAME")).as_str())
    );

    let second = model.request(1);
    let messages = second["messages"].as_array().unwrap();
    let assistant = &messages[messages.len() - 2];
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        assistant["tool_calls"][0]["function"]["name"],
        "current_time"
    );
    let tool = &messages[messages.len() - 1];
    assert_eq!(tool["role"], "tool");
    assert_eq!(tool["tool_call_id"], "call_1");

    let metrics = worker.metrics().await;
    let agent = ("agent", "default/assistant");
    let api = [("channel", "webhook"), ("instance", "api")];
    for (name, labels, value) in [
        (
            "nexo_llm_requests_total",
            &[agent, ("outcome", "ok"), ("provider", "openai")][..],
            2.0,
        ),
        (
            "nexo_llm_tokens_total",
            &[agent, ("model", "test-model"), ("kind", "input")],
            22.0,
        ),
        (
            "nexo_tool_calls_total",
            &[agent, ("outcome", "ok"), ("tool", "current_time")],
            1.0,
        ),
        ("nexo_agent_turns_total", &[agent, ("outcome", "ok")], 1.0),
        ("nexo_messages_in_total", &api, 1.0),
        ("nexo_messages_out_total", &api, 1.0),
    ] {
        assert_eq!(metrics.expect(name, labels), value, "{name}{labels:?}");
    }
    worker.stop().await;
}

#[tokio::test]
async fn conversation_history_is_sent_back() {
    let model =
        FakeModel::openai(|body| FakeReply::text(&format!("echo {}", last_user_text(body)))).await;
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, ""),
        webhook_channel("assistant")
    ))
    .await;
    let (_, first) = worker.post_message("api", json!({"text": "one"})).await;
    let conversation = first["conversation"].as_str().unwrap().to_owned();
    let (_, second) = worker
        .post_message("api", json!({"text": "two", "conversation": conversation}))
        .await;
    assert_eq!(second["conversation"], conversation.as_str());
    assert_eq!(second["reply"], "echo two");
    let messages = model.request(1)["messages"].clone();
    let roles_and_text: Vec<(String, String)> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles_and_text[1..],
        [
            ("user".to_owned(), "one".to_owned()),
            ("assistant".to_owned(), "echo one".to_owned()),
            ("user".to_owned(), "two".to_owned()),
        ]
    );
    // Another conversation starts empty.
    worker.post_message("api", json!({"text": "three"})).await;
    assert_eq!(model.request(2)["messages"].as_array().unwrap().len(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn delegating_agent_relays_the_other_agents_answer() {
    let worker = TestWorker::start(&format!(
        "{}channels:\n  - name: api\n    spec: {{defaultAgent: concierge, webhook: {{}}}}\n",
        support::concierge_and_researcher("found facts about <{{input}}>")
    ))
    .await;
    let mut events = worker.broker.subscribe("agent.events.>").await.unwrap();
    let (status, body) = worker.post_message("api", json!({"text": "otters"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["reply"],
        "researcher says: found facts about <look up otters>"
    );

    // The researcher's turn and the concierge's tool call both show up as events.
    let seen: Vec<(String, String)> = read_until(&mut events, |e| {
        e["agent"] == "default/concierge" && e["type"] == "turnFinished"
    })
    .await
    .iter()
    .map(|e| {
        (
            e["agent"].as_str().unwrap().to_owned(),
            e["type"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    for expected in [
        ("default/concierge", "turnStarted"),
        ("default/researcher", "turnFinished"),
        ("default/concierge", "toolCalled"),
    ] {
        assert!(
            seen.iter()
                .any(|(a, k)| (a.as_str(), k.as_str()) == expected),
            "{expected:?} not in {seen:?}"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_with_a_reason() {
    let worker = TestWorker::start(
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: ok}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {}\n",
    )
    .await;
    let url = worker.url("/v1/channels/api/messages");
    let long_conversation = json!({"text": "hi", "conversation": "c".repeat(257)}).to_string();
    let cases: [(&str, StatusCode, &str); 6] = [
        ("not json", StatusCode::BAD_REQUEST, "invalid JSON body"),
        (
            r#"{"sender": "x"}"#,
            StatusCode::BAD_REQUEST,
            "missing field `text`",
        ),
        (
            r#"{"text": "hi", "colour": 1}"#,
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            r#"{"text": "   "}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "`text` must not be empty",
        ),
        (
            &long_conversation,
            StatusCode::BAD_REQUEST,
            "`conversation` is longer than 256 bytes",
        ),
        (
            r#"{"text": "hi", "conversation": ""}"#,
            StatusCode::BAD_REQUEST,
            "`conversation` must not be empty",
        ),
    ];
    for (body, expected_status, reason) in cases {
        let response = worker
            .http
            .post(&url)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            expected_status.as_u16(),
            "{body}"
        );
        let error: Value = response.json().await.unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(reason),
            "{body}: {error}"
        );
    }
    let unknown = worker
        .http
        .post(worker.url("/v1/channels/nope/messages"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    // Still serving after all that.
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    worker.stop().await;
}

/// A worker whose agent `assistant` calls `model` once per step, and its events.
async fn start_assistant_without_retries(
    model: &FakeModel,
) -> (TestWorker, nexo_worker::broker::Subscription) {
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, "").replace("maxRetries: 1", "maxRetries: 0"),
        webhook_channel("assistant")
    ))
    .await;
    let events = worker
        .broker
        .subscribe("agent.events.default.assistant")
        .await
        .unwrap();
    (worker, events)
}

/// Posts `text`, expects a failed turn, returns the body and its error text.
async fn failed_answer(worker: &TestWorker, text: &str) -> (Value, String) {
    let (status, body) = worker.post_message("api", json!({"text": text})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["status"], "failed");
    let error = body["error"].as_str().unwrap().to_owned();
    (body, error)
}

#[tokio::test]
async fn model_timeout_gives_an_error_reply_and_event_and_the_worker_keeps_serving() {
    let model = FakeModel::openai(|body| {
        let reply = FakeReply::text("fast answer");
        if last_user_text(body).contains("slow") {
            reply.after(Duration::from_secs(3))
        } else {
            reply
        }
    })
    .await;
    let (worker, mut events) = start_assistant_without_retries(&model).await;
    let (body, error) = failed_answer(&worker, "be slow").await;
    assert!(error.contains("model did not answer within 1 s"), "{error}");

    let seen = read_until(&mut events, |e| e["type"] == "turnFailed").await;
    let failed = seen.last().unwrap();
    assert_eq!(failed["messageId"], body["id"]);
    assert!(
        failed["error"].as_str().unwrap().contains("did not answer"),
        "{failed}"
    );

    let (status, body) = worker
        .post_message("api", json!({"text": "quick one"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "fast answer");
    worker.stop().await;
}

#[tokio::test]
async fn the_model_providers_error_body_reaches_the_event_not_the_user() {
    const DETAIL: &str = "organization org-internal-42, key sk-proj-abcd…wxyz";
    let model = FakeModel::openai(|_| FakeReply {
        status: StatusCode::UNAUTHORIZED,
        body: json!({"error": {"message": DETAIL}}),
        ..FakeReply::text("")
    })
    .await;
    let (worker, mut events) = start_assistant_without_retries(&model).await;
    let (body, error) = failed_answer(&worker, "hi").await;
    assert!(!error.contains("org-internal-42"), "{error}");
    assert!(!error.contains(&model.base_url), "{error}");
    assert!(!error.contains("401"), "{error}");
    assert!(error.contains("the model service failed"), "{error}");
    assert!(error.contains(body["id"].as_str().unwrap()), "{error}");

    let seen = read_until(&mut events, |e| e["type"] == "turnFailed").await;
    let failed = seen.last().unwrap();
    assert_eq!(failed["messageId"], body["id"]);
    let detail = failed["error"].as_str().unwrap();
    assert!(detail.contains("401"), "{failed}");
    assert!(detail.contains("org-internal-42"), "{failed}");
    worker.stop().await;
}

#[tokio::test]
async fn rate_limited_model_calls_are_retried() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let model = FakeModel::openai(move |_| {
        if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            FakeReply {
                status: StatusCode::TOO_MANY_REQUESTS,
                ..FakeReply::text("")
            }
        } else {
            FakeReply::text("after retry")
        }
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, ""),
        webhook_channel("assistant")
    ))
    .await;
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "after retry");
    assert_eq!(model.request_count(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_synchronous_request_that_times_out_can_be_fetched_later() {
    let model = FakeModel::openai(|body| {
        let reply = FakeReply::text(&format!("late: {}", last_user_text(body)));
        if last_user_text(body).contains("slow") {
            reply.after(Duration::from_millis(1500))
        } else {
            reply
        }
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, "")
            .replace("timeoutSeconds: 1", "timeoutSeconds: 5"),
        webhook_channel("assistant").replace("replyTimeoutSeconds: 5", "replyTimeoutSeconds: 1")
    ))
    .await;

    let (status, timed_out) = worker.post_message("api", json!({"text": "be slow"})).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{timed_out}");
    assert_eq!(timed_out["status"], "pending");
    let id = timed_out["id"].as_str().unwrap();
    let error = timed_out["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("GET /v1/channels/api/messages/{id}")),
        "{error}"
    );
    // Pending until the agent answers, then the answer.
    let path = format!("/v1/channels/api/messages/{id}");
    let (status, _) = worker.get_json(&path).await;
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::OK,
        "{status}"
    );
    let body = worker.answer_of("api", id).await;
    assert_eq!(body["reply"], "late: be slow");
    assert_eq!(body["conversation"], timed_out["conversation"]);

    // A request answered in time is not kept.
    let (status, quick) = worker.post_message("api", json!({"text": "quick"})).await;
    assert_eq!(status, StatusCode::OK, "{quick}");
    let (status, _) = worker
        .get_json(&format!(
            "/v1/channels/api/messages/{}",
            quick["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    worker.stop().await;
}

#[tokio::test]
async fn asynchronous_requests_return_an_id_to_poll() {
    let worker = TestWorker::start(
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: 'later: {{input}}'}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {}\n",
    )
    .await;
    let id = worker.post_async("api", json!({"text": "hello"})).await;
    let body = worker.answer_of("api", &id).await;
    assert_eq!(body["reply"], "later: hello");
    let unknown = worker
        .http
        .get(worker.url(&format!(
            "/v1/channels/api/messages/{}",
            uuid::Uuid::new_v4()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    worker.stop().await;
}

/// A message answered twice (two workers ran it, as after its agent moved between
/// them, and the second run answered differently): the answer the client fetches is
/// the first, the second is dropped and counted.
#[tokio::test]
async fn a_second_answer_to_a_message_is_dropped_and_counted() {
    let worker = TestWorker::start(
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: 'first: {{input}}'}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {}\n",
    )
    .await;
    let mut outbound = worker
        .broker
        .subscribe("plugin.outbound.webhook.default.api")
        .await
        .unwrap();
    let id = worker.post_async("api", json!({"text": "hello"})).await;
    assert_eq!(worker.answer_of("api", &id).await["reply"], "first: hello");
    let published = support::next_message(&mut outbound, "the agent's answer").await;
    let mut second = nexo_api::Envelope::from_json(&published.payload).unwrap();
    assert_eq!(second.correlation_id.unwrap().to_string(), id);
    second.id = uuid::Uuid::now_v7();
    second.text = "second run: hello".to_owned();
    worker
        .broker
        .publish(&published.subject, second.to_json().into())
        .await
        .unwrap();

    let duplicates = [("channel", "webhook"), ("instance", "api")];
    worker
        .wait_for_metric("nexo_channel_duplicate_replies_total", &duplicates, 1.0)
        .await;
    assert_eq!(worker.answer_of("api", &id).await["reply"], "first: hello");
    let metrics = worker.metrics().await;
    assert_eq!(metrics.expect("nexo_messages_out_total", &duplicates), 1.0);
    worker.stop().await;
}

#[tokio::test]
async fn signed_webhooks_refuse_unsigned_requests() {
    let worker = TestWorker::start(&format!(
        "agents:\n  - name: a\n    spec:\n      model: {{provider: scripted, script: [{{reply: signed}}]}}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {{signingSecret: {{env: {PRESENT_ENV}}}}}\n"
    ))
    .await;
    let url = worker.url("/v1/channels/api/messages");
    let body = r#"{"text":"hi"}"#;
    let unsigned = worker.http.post(&url).body(body).send().await.unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    let forged = worker
        .http
        .post(&url)
        .header("x-nexo-signature", "sha256=00ff")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);

    assert_eq!(
        post_signed(&worker, env!("CARGO_PKG_NAME"), body).await,
        200
    );

    // A signed request is trusted with its sender and a conversation of its choosing.
    let mut inbound = worker.broker.subscribe("plugin.inbound.>").await.unwrap();
    let (status, answer) = worker
        .post_signed_message(
            "api",
            json!({"text": "hi", "sender": "ada", "conversation": "c-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["conversation"], "c-1");
    let envelope = read_until(&mut inbound, |_| true).await.remove(0);
    assert_eq!(envelope["sender"], "ada");
    worker.stop().await;
}

/// Without a signing secret nobody is who they say: `sender` is refused, and so is a
/// conversation id the server did not issue, so a caller cannot read another's
/// memories or history by naming them. Each caller's memories are scoped to the
/// conversation the server gave it.
#[tokio::test]
async fn an_unsigned_caller_cannot_speak_as_someone_else() {
    let model = FakeModel::openai(|body| {
        let system = body["messages"][0]["content"].as_str().unwrap_or_default();
        FakeReply::text(&format!("saw {} memories", system.matches("4711").count()))
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}",
        openai_agent("assistant", &model.base_url, ""),
        webhook_channel("assistant")
    ))
    .await;
    let mut inbound = worker.broker.subscribe("plugin.inbound.>").await.unwrap();

    let (status, body) = worker
        .post_message("api", json!({"text": "my code is 4711", "sender": "ada"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("`sender` is accepted only on signed requests"),
        "{body}"
    );
    let (status, body) = worker
        .post_message(
            "api",
            json!({"text": "my code is 4711", "conversation": "c-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("must be an id this channel issued"),
        "{body}"
    );

    let (status, first) = worker
        .post_message("api", json!({"text": "my code is 4711"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let conversation = first["conversation"].as_str().unwrap().to_owned();
    assert_eq!(conversation.len(), 32, "a 128-bit id: {conversation}");
    let envelope = read_until(&mut inbound, |_| true).await.remove(0);
    // The refused requests published nothing: this is the first message.
    assert_eq!(envelope["text"], "my code is 4711");
    assert_eq!(envelope["sender"], format!("anonymous:{conversation}"));

    // Another caller (a new conversation) does not recall the first one's memory…
    let (_, other) = worker
        .post_message("api", json!({"text": "what is my code"}))
        .await;
    assert_ne!(other["conversation"], conversation.as_str());
    assert_eq!(other["reply"], "saw 0 memories", "{other}");
    // …while the first caller, presenting its conversation id, continues it.
    let (_, again) = worker
        .post_message(
            "api",
            json!({"text": "what is my code", "conversation": conversation}),
        )
        .await;
    assert_eq!(again["conversation"], conversation.as_str());
    assert_eq!(model.request_count(), 3);
    let history = model.request(2)["messages"].to_string();
    assert!(history.contains("my code is 4711"), "{history}");
    worker.stop().await;
}

/// POSTs `body` to the `api` webhook signed with `secret`; returns the status.
async fn post_signed(worker: &TestWorker, secret: &str, body: &str) -> u16 {
    let signature = webhook_signature(secret, body.as_bytes());
    let response = worker
        .http
        .post(worker.url("/v1/channels/api/messages"))
        .header("x-nexo-signature", signature)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// A signing secret from a mounted Secret is read when the channel is built; when the
/// kubelet rotates it, the channel is restarted with the new one.
#[tokio::test]
async fn a_rotated_signing_secret_restarts_the_channel() {
    use nexo_api::spec::SecretKeySelector;
    use support::{TempDir, WorkerOptions};

    let secrets = TempDir::new();
    let selector = SecretKeySelector {
        name: "hook".to_owned(),
        key: "secret".to_owned(),
    };
    let file = secrets.path().join(selector.mounted_file_name());
    std::fs::write(&file, "old-secret\n").unwrap();
    let worker = TestWorker::start_with(
        WorkerOptions {
            worker_extra: format!("  secretsDir: {}\n", secrets.path().display()),
            ..Default::default()
        },
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: signed}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {signingSecret: {secretKeyRef: {name: hook, key: secret}}}\n",
    )
    .await;
    let body = r#"{"text":"hi"}"#;
    assert_eq!(post_signed(&worker, "old-secret", body).await, 200);

    std::fs::write(&file, "new-secret\n").unwrap();
    wait_for("the channel to take the new secret", || async {
        (post_signed(&worker, "new-secret", body).await == 200).then_some(())
    })
    .await;
    assert_eq!(post_signed(&worker, "old-secret", body).await, 401);
    worker.stop().await;
}

#[tokio::test]
async fn probes_and_admin_token() {
    let worker = TestWorker::start(
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: ok}]}\n",
    )
    .await;
    let get = |path: &str| worker.http.get(worker.url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    // Ready once the agent has prepared its memory file and attached.
    wait_for("the worker to be ready", || async {
        (get("/readyz").await.unwrap().status().as_u16() == 200).then_some(())
    })
    .await;
    // The test worker's token variable is unset: the admin API is off.
    let admin = get("/admin/agents").await.unwrap();
    assert_eq!(admin.status().as_u16(), 403);
    worker.stop().await;
}

#[tokio::test]
async fn anthropic_tool_use_round_trip() {
    let model = FakeModel::anthropic(|body| {
        let messages = body["messages"].as_array().unwrap();
        let last = &messages[messages.len() - 1];
        match last["content"][0]["type"].as_str() {
            Some("tool_result") => FakeReply::anthropic(json!([
                {"type": "text", "text": format!("Clock says {}", last["content"][0]["content"].as_str().unwrap())}
            ])),
            _ => FakeReply::anthropic(json!([
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {}}
            ])),
        }
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:
  - name: claude
    spec:
      systemPrompt: Be brief.
      tools: [current_time]
      model:
        provider: anthropic
        model: claude-test
        baseUrl: {}
        apiKey: {{env: {PRESENT_ENV}}}
        maxTokens: 200
{}",
        model.base_url,
        webhook_channel("claude")
    ))
    .await;
    let (status, body) = worker.post_message("api", json!({"text": "time?"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["reply"].as_str().unwrap().starts_with("Clock says 20"),
        "{body}"
    );

    assert_eq!(model.request_count(), 2);
    let first = model.request(0);
    assert_eq!(first["model"], "claude-test");
    assert_eq!(first["max_tokens"], 200);
    // One text block, so that it can carry a prompt-cache breakpoint.
    assert_eq!(first["system"][0]["text"], "Be brief.");
    assert_eq!(first["tools"][0]["name"], "current_time");
    assert!(first["tools"][0]["input_schema"].is_object());
    let key = model.requests.lock().unwrap()[0].1.clone();
    assert_eq!(key.as_deref(), Some(env!("CARGO_PKG_NAME")));
    let second = model.request(1);
    let messages = second["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(messages[1]["content"][1]["type"], "tool_use");
    assert_eq!(messages[2]["content"][0]["tool_use_id"], "toolu_1");
    worker.stop().await;
}

/// A channel's routes send a command and a sender's messages to other agents, first
/// match first; the rest goes to the default agent. Through the production router
/// (the channel's durable consumer) and each agent's own turn.
#[tokio::test]
async fn routes_send_commands_and_senders_to_their_agents_and_the_rest_to_the_default() {
    let agent = |name: &str| {
        format!(
            "  - name: {name}\n    spec:\n      model: {{provider: scripted, script: [{{reply: {name} here}}]}}\n"
        )
    };
    let worker = TestWorker::start(&format!(
        "agents:\n{}{}{}channels:\n  - name: api\n    spec:
      defaultAgent: concierge
      webhook: {{signingSecret: {{env: {}}}}}
      routes:
        - {{agent: billing, match: {{command: invoice}}}}
        - {{agent: vip, match: {{sender: ada}}}}
",
        agent("concierge"),
        agent("billing"),
        agent("vip"),
        support::WEBHOOK_SECRET_ENV,
    ))
    .await;
    for (sender, text, answered_by) in [
        ("bob", "/invoice 42", "billing here"),
        ("ada", "/invoice@nexo_bot", "billing here"),
        ("ada", "hello", "vip here"),
        ("bob", "hello", "concierge here"),
        ("bob", "/invoices", "concierge here"),
    ] {
        let (status, answer) = worker
            .post_signed_message("api", json!({"text": text, "sender": sender}))
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["reply"], answered_by, "{sender}: {text}");
    }
    worker.stop().await;
}
