//! Per-agent limits: the concurrency cap (work beyond it waits in the broker), the
//! step limit, and the bounds of one tool call (time, result size, the agent's tools).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use support::{FakeModel, FakeReply, TestWorker};

fn agent_yaml(base_url: &str, limits: &str) -> String {
    format!(
        "agents:
  - name: busy
    spec:
      tools: [current_time]
      limits: {limits}
      model: {{provider: openai, model: m, baseUrl: {base_url}, timeoutSeconds: 10, maxRetries: 0}}
channels:
  - name: api
    spec:
      defaultAgent: busy
      webhook: {{replyTimeoutSeconds: 10}}
"
    )
}

#[tokio::test]
async fn no_more_turns_run_at_once_than_the_cap() {
    let model =
        FakeModel::openai(|_| FakeReply::text("done").after(Duration::from_millis(300))).await;
    let worker = TestWorker::start(&agent_yaml(&model.base_url, "{maxConcurrency: 2}")).await;
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let client = worker.http.clone();
            let url = worker.url("/v1/channels/api/messages");
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"text": format!("job {i}")}))
                    .send()
                    .await
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status().as_u16(), 200);
    }
    assert_eq!(model.request_count(), 6);
    assert_eq!(
        model.peak_in_flight.load(Ordering::SeqCst),
        2,
        "model calls in flight at once"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_model_that_keeps_calling_tools_is_stopped_at_the_step_limit() {
    let model =
        FakeModel::openai(|_| FakeReply::tool_call("again", "current_time", json!({}))).await;
    let worker = TestWorker::start(&agent_yaml(&model.base_url, "{maxSteps: 3}")).await;
    let (status, body) = worker.post_message("api", json!({"text": "loop"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("still calling tools after 3 steps"),
        "{body}"
    );
    assert_eq!(model.request_count(), 3);
    worker.stop().await;
}

#[tokio::test]
async fn a_delivery_that_is_not_an_envelope_counts_as_a_malformed_turn() {
    let model = FakeModel::openai(|_| FakeReply::text("unused")).await;
    let worker = TestWorker::start(&agent_yaml(&model.base_url, "{}")).await;
    let route = nexo_api::subject::agent_route(&nexo_api::ResourceKey::new("default", "busy"));
    worker
        .broker
        .publish(&route, bytes::Bytes::from_static(b"not an envelope"))
        .await
        .unwrap();
    let labels = [
        ("agent", "default/busy"),
        ("outcome", nexo_worker::metrics::TURN_MALFORMED),
    ];
    worker
        .wait_for_metric("nexo_agent_turns_total", &labels, 1.0)
        .await;
    assert_eq!(model.request_count(), 0);
    worker.stop().await;
}

/// A scripted agent with `limits` that calls `tool` on every message and answers with
/// what the tool returned; `delegates` it may ask.
fn tool_caller(tool: &str, limits: &str, delegates: &str) -> String {
    format!(
        "agents:
  - name: caller
    spec:
      tools: [current_time]
      delegates: [{delegates}]
      limits: {limits}
      model:
        provider: scripted
        script:
          - {{toolCall: {{name: {tool}, arguments: {{message: hi}}}}, reply: 'tool said: {{{{tool_result}}}}'}}
  - name: nobody
    spec:
      suspend: true
      model: {{provider: scripted, script: [{{reply: never}}]}}
channels:
  - name: api
    spec: {{defaultAgent: caller, webhook: {{}}}}
"
    )
}

#[tokio::test]
async fn a_tool_call_beyond_its_timeout_is_a_tool_error_and_the_turn_answers() {
    // The delegate is suspended: its answer never comes.
    let worker = TestWorker::start(&tool_caller(
        "ask_nobody",
        "{toolTimeoutSeconds: 1, delegateTimeoutSeconds: 60}",
        "nobody",
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, answer) = worker.post_message("api", json!({"text": "go"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["reply"],
        "tool said: error: the tool did not answer within 1s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the turn did not wait for the delegate's 60 s"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_tool_result_beyond_the_output_limit_is_a_tool_error() {
    let worker = TestWorker::start(&tool_caller("current_time", "{toolOutputBytes: 8}", "")).await;
    let (status, answer) = worker.post_message("api", json!({"text": "go"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let reply = answer["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("tool said: error: the tool's result has ")
            && reply.ends_with("bytes, more than the 8 this agent takes; ask for less"),
        "{reply}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_model_asking_for_a_tool_the_agent_does_not_have_gets_a_tool_error() {
    // The model asks for a tool the agent does not have, then answers with what the
    // tool call returned.
    let model = FakeModel::openai(|request| {
        let messages = request["messages"].as_array().unwrap();
        match messages.iter().rev().find(|m| m["role"] == "tool") {
            Some(result) => FakeReply::text(&format!(
                "tool said: {}",
                result["content"].as_str().unwrap()
            )),
            None => FakeReply::tool_call("c1", "shell_exec", json!({"command": "rm -rf /"})),
        }
    })
    .await;
    let worker = TestWorker::start(&agent_yaml(&model.base_url, "{}")).await;
    let (status, answer) = worker.post_message("api", json!({"text": "go"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["reply"],
        "tool said: error: no tool named `shell_exec`"
    );
    worker.stop().await;
}
