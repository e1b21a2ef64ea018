//! Fallback models, the circuit breakers of model endpoints, token and cost
//! accounting, and daily budgets: through the webhook channel, with the OpenAI
//! provider against local chat-completions servers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{
    FakeModel, FakeReply, TempDir, TestWorker, WorkerOptions, has_tool_result, read_until, wait_for,
};

const AGENT: (&str, &str) = ("agent", "default/a");

/// Agent `a` on model `primary` with fallback `backup`, behind webhook channel `api`.
fn with_fallback(primary: &FakeModel, backup: &FakeModel, extra: &str) -> String {
    format!(
        "agents:
  - name: a
    spec:
{extra}      model:
        provider: openai
        model: primary
        baseUrl: {}
        maxRetries: 1
        timeoutSeconds: 5
        fallbacks:
          - provider: openai
            model: backup
            baseUrl: {}
            maxRetries: 0
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
        primary.base_url, backup.base_url
    )
}

#[tokio::test]
async fn a_primary_answering_429_then_500_falls_back_to_the_second_model_and_the_events_say_so() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let primary = FakeModel::openai(move |_| match counted.fetch_add(1, Ordering::SeqCst) {
        0 => FakeReply::failing(StatusCode::TOO_MANY_REQUESTS),
        _ => FakeReply::failing(StatusCode::INTERNAL_SERVER_ERROR),
    })
    .await;
    let backup = FakeModel::openai(|_| FakeReply::text("from the backup")).await;
    let worker = TestWorker::start(&with_fallback(&primary, &backup, "")).await;
    let mut events = worker.broker.subscribe("agent.events.>").await.unwrap();

    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "from the backup");
    // The primary's retry ran before the fallback: 429, then 500.
    assert_eq!(primary.request_count(), 2);
    assert_eq!(backup.request_count(), 1);

    let seen = read_until(&mut events, |e| e["type"] == "turnFinished").await;
    let fell_back: Vec<&Value> = seen
        .iter()
        .filter(|e| e["type"] == "modelFellBack")
        .collect();
    assert_eq!(fell_back.len(), 1, "{seen:#?}");
    assert_eq!(fell_back[0]["from"], "primary");
    assert_eq!(fell_back[0]["to"], "backup");
    assert!(
        fell_back[0]["error"].as_str().unwrap().contains("500"),
        "{seen:#?}"
    );
    assert_eq!(seen.last().unwrap()["model"], "backup");

    let metrics = worker.metrics().await;
    assert_eq!(
        metrics.expect("nexo_llm_fallbacks_total", &[AGENT, ("model", "backup")]),
        1.0
    );
    assert_eq!(
        metrics.expect(
            "nexo_llm_tokens_total",
            &[AGENT, ("model", "backup"), ("kind", "input")]
        ),
        11.0
    );
    assert_eq!(
        metrics.value(
            "nexo_llm_tokens_total",
            &[AGENT, ("model", "primary"), ("kind", "input")]
        ),
        None,
        "the primary answered nothing"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_refused_request_is_answered_as_it_is_without_a_fallback() {
    let primary = FakeModel::openai(|_| FakeReply::failing(StatusCode::BAD_REQUEST)).await;
    let backup = FakeModel::openai(|_| FakeReply::text("unused")).await;
    let worker = TestWorker::start(&with_fallback(&primary, &backup, "")).await;
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(primary.request_count(), 1);
    assert_eq!(backup.request_count(), 0);
    worker.stop().await;
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_closes_after_a_good_probe() {
    let healthy = Arc::new(AtomicBool::new(false));
    let is_healthy = healthy.clone();
    let primary = FakeModel::openai(move |_| {
        if is_healthy.load(Ordering::SeqCst) {
            FakeReply::text("from the primary")
        } else {
            FakeReply::failing(StatusCode::SERVICE_UNAVAILABLE)
        }
    })
    .await;
    let backup = FakeModel::openai(|_| FakeReply::text("from the backup")).await;
    let options = WorkerOptions {
        worker_extra: "  models:\n    circuitBreaker: {failures: 2, coolDownSeconds: 1}\n"
            .to_owned(),
        ..Default::default()
    };
    let yaml = with_fallback(&primary, &backup, "").replace("maxRetries: 1", "maxRetries: 0");
    let worker = TestWorker::start_with(options, &yaml).await;
    let circuit = [("provider", "openai"), ("model", "primary")];

    for _ in 0..2 {
        let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["reply"], "from the backup");
    }
    assert_eq!(primary.request_count(), 2);
    assert_eq!(
        worker
            .metrics()
            .await
            .expect("nexo_llm_circuit_open", &circuit),
        1.0
    );

    // Open: the primary is not asked at all.
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "from the backup");
    assert_eq!(primary.request_count(), 2, "a call went to an open circuit");

    // After the cool-down one probe goes through; it succeeds and closes the circuit.
    healthy.store(true, Ordering::SeqCst);
    wait_for("a probe of the primary after the cool-down", || async {
        let (_, body) = worker.post_message("api", json!({"text": "hi"})).await;
        (body["reply"] == "from the primary").then_some(())
    })
    .await;
    assert_eq!(primary.request_count(), 3, "exactly one probe");
    worker
        .wait_for_metric("nexo_llm_circuit_open", &circuit, 0.0)
        .await;
    let (_, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(body["reply"], "from the primary");
    worker.stop().await;
}

#[tokio::test]
async fn a_fallback_after_a_tool_call_does_not_run_the_tool_again() {
    // The primary asks for the tool, then fails once the result is in.
    let primary = FakeModel::openai(|body| {
        if has_tool_result(body) {
            FakeReply::failing(StatusCode::BAD_GATEWAY)
        } else {
            FakeReply::tool_call("call_1", "ask_helper", json!({"message": "q"}))
        }
    })
    .await;
    let backup = FakeModel::openai(|body| {
        assert!(has_tool_result(body), "the fallback gets the tool's result");
        FakeReply::text("done by the backup")
    })
    .await;
    let yaml = with_fallback(&primary, &backup, "      delegates: [helper]\n").replace(
        "channels:",
        "  - name: helper
    spec:
      model: {provider: scripted, script: [{reply: helped}]}
channels:",
    );
    let worker = TestWorker::start(&yaml).await;
    let (status, body) = worker.post_message("api", json!({"text": "go"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "done by the backup");
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics.expect(
            "nexo_agent_turns_total",
            &[("agent", "default/helper"), ("outcome", "ok")]
        ),
        1.0,
        "the delegated tool ran once"
    );
    assert_eq!(
        metrics.expect(
            "nexo_tool_calls_total",
            &[AGENT, ("tool", "ask_helper"), ("outcome", "ok")]
        ),
        1.0
    );
    // The fallback was sent the tool's result as the primary would have been.
    let request = backup.request(0);
    let messages = request["messages"].as_array().unwrap();
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["tool_call_id"], "call_1");
    assert_eq!(tool["content"], "helped");
    worker.stop().await;
}

/// Agent `a` on model `m` (11 input and 7 output tokens a call) with `budget`.
fn budgeted(model: &FakeModel, budget: &str) -> String {
    format!(
        "agents:
  - name: a
    spec:
      budget: {budget}
      model: {{provider: openai, model: m, baseUrl: '{}'}}
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
        model.base_url
    )
}

#[tokio::test]
async fn a_spent_budget_refuses_the_next_turn_with_the_documented_message() {
    let model = FakeModel::openai(|_| FakeReply::text("ok")).await;
    let data = TempDir::new();
    let options = || WorkerOptions {
        data_dir: Some(data.path().to_owned()),
        ..Default::default()
    };
    let yaml = budgeted(&model, "{tokensPerDay: 30}");
    let worker = TestWorker::start_with(options(), &yaml).await;
    let mut events = worker.broker.subscribe("agent.events.>").await.unwrap();
    // 18 tokens a turn: the second turn starts below 30 and ends above it.
    for _ in 0..2 {
        let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, catalog) = worker.get_json("/catalog").await;
    assert!(catalog.get("overBudget").is_some(), "{catalog}");

    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "Sorry, I could not answer: {}.",
            "this agent has used up its budget for today (UTC); try again tomorrow"
        )),
        "{body}"
    );
    assert_eq!(model.request_count(), 2, "no model call for a refused turn");

    let seen = read_until(&mut events, |e| e["type"] == "budgetExceeded").await;
    let refused = seen.last().unwrap();
    assert_eq!(refused["tokens"], 36);
    assert_eq!(refused["limit"], "tokensPerDay");
    let day = refused["day"].as_str().unwrap().to_owned();
    assert_eq!(day, chrono::Utc::now().format("%Y-%m-%d").to_string());

    let (_, catalog) = worker.get_json("/catalog").await;
    let over = catalog["overBudget"].as_array().unwrap();
    assert_eq!(over.len(), 1, "{catalog}");
    assert_eq!(over[0]["agent"], "default/a");
    assert_eq!(over[0]["tokens"], 36);
    assert_eq!(over[0]["limit"], "tokensPerDay");
    assert_eq!(
        worker.metrics().await.expect(
            "nexo_agent_turns_total",
            &[AGENT, ("outcome", "budget_exceeded")]
        ),
        1.0
    );
    worker.stop().await;

    // The spending is in the agent's memory: a restarted worker refuses too.
    let worker = TestWorker::start_with(options(), &yaml).await;
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(model.request_count(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn the_price_table_turns_tokens_into_cost_and_a_cost_budget() {
    let model = FakeModel::openai(|_| FakeReply::text("ok")).await;
    let options = WorkerOptions {
        worker_extra: "  models:\n    prices:\n      - {model: m, input: 2.0, output: 10.0}\n"
            .to_owned(),
        ..Default::default()
    };
    // A call: 11 input tokens at 2 and 7 output tokens at 10 per million.
    let per_call = (11.0 * 2.0 + 7.0 * 10.0) / 1e6;
    let worker = TestWorker::start_with(options, &budgeted(&model, "{costPerDay: 0.0001}")).await;
    for _ in 0..2 {
        let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let metrics = worker.metrics().await;
    let cost = metrics.expect("nexo_llm_cost_total", &[AGENT, ("model", "m")]);
    assert!((cost - 2.0 * per_call).abs() < 1e-12, "{cost}");
    for (kind, tokens) in [("input", 22.0), ("output", 14.0), ("cached_input", 0.0)] {
        assert_eq!(
            metrics.expect(
                "nexo_llm_tokens_total",
                &[AGENT, ("model", "m"), ("kind", kind)]
            ),
            tokens,
            "{kind}"
        );
    }
    let (status, body) = worker.post_message("api", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let (_, catalog) = worker.get_json("/catalog").await;
    assert_eq!(catalog["overBudget"][0]["limit"], "costPerDay", "{catalog}");
    worker.stop().await;
}
