//! Per-agent limits: the concurrency cap, the bounded mailbox and the step limit.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use support::{FakeModel, FakeReply, TestWorker, wait_for};

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
    let worker = TestWorker::start(&agent_yaml(
        &model.base_url,
        "{maxConcurrency: 2, mailbox: 10}",
    ))
    .await;
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
async fn a_full_mailbox_refuses_with_a_busy_reply() {
    let model =
        FakeModel::openai(|_| FakeReply::text("done").after(Duration::from_millis(800))).await;
    let worker = TestWorker::start(&agent_yaml(
        &model.base_url,
        "{maxConcurrency: 1, mailbox: 1}",
    ))
    .await;
    let post = |text: &'static str| {
        let client = worker.http.clone();
        let url = worker.url("/v1/channels/api/messages");
        tokio::spawn(async move {
            let response = client
                .post(url)
                .json(&json!({ "text": text }))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        })
    };
    // The first turn runs; of the next two, one waits in the mailbox and one is refused.
    let first = post("first");
    wait_for("the first turn to reach the model", || async {
        (model.request_count() == 1).then_some(())
    })
    .await;
    let (second, third) = (post("second"), post("third"));
    let mut outcomes = vec![second.await.unwrap(), third.await.unwrap()];
    outcomes.sort_by_key(|(status, _)| *status);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(outcomes[0].0, 200, "{outcomes:?}");
    assert_eq!(
        outcomes[1].0,
        StatusCode::BAD_GATEWAY.as_u16(),
        "{outcomes:?}"
    );
    assert!(
        outcomes[1].1["error"].as_str().unwrap().contains("is busy"),
        "{outcomes:?}"
    );
    let metrics = worker
        .http
        .get(worker.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"nexo_agent_turns_total{agent="default/busy",outcome="rejected"} 1"#),
        "{metrics}"
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
