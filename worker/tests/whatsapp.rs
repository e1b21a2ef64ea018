//! The WhatsApp channel end to end: Meta's webhook calls into a real worker, the
//! agent answering with a scripted model, and the production Graph client sending to
//! a local fake of the Cloud API (support/whatsapp.rs).

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use nexo_api::{ResourceKey, subject};
use serde_json::{Value, json};
use support::whatsapp::{
    FakeGraph, GraphAnswer, hub_signature, message_notification, text_notification,
};
use support::{
    ADMIN_TOKEN_ENV, FakeModel, FakeReply, TestWorker, WorkerOptions, last_user_text, next_message,
    openai_writer, wait_for,
};

/// Every secret of the channel (token, app secret, verify token) is this
/// variable's value, which cargo sets.
const SECRET: &str = env!("CARGO_PKG_NAME");
const PHONE: &str = "106540352242922";
const USER: &str = "16505551234";

fn config(model: &str, graph: &str, extra: &str) -> String {
    format!(
        "{}channels:
  - name: wa
    spec:
      defaultAgent: writer
      whatsapp:
        apiBaseUrl: {graph}
        apiVersion: v21.0
        phoneNumberId: \"{PHONE}\"
        accessToken: {{env: CARGO_PKG_NAME}}
        appSecret: {{env: CARGO_PKG_NAME}}
        verifyToken: {{env: CARGO_PKG_NAME}}
{extra}",
        openai_writer(model)
    )
}

async fn echo_model() -> FakeModel {
    FakeModel::openai(|body| FakeReply::text(&format!("echo **{}**", last_user_text(body)))).await
}

/// POSTs `notification` signed with `secret`; the status.
async fn notify(worker: &TestWorker, notification: &Value, secret: &str) -> StatusCode {
    let body = notification.to_string();
    let response = worker
        .http
        .post(worker.url("/v1/whatsapp/wa/webhook"))
        .header(
            "x-hub-signature-256",
            hub_signature(secret, body.as_bytes()),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    StatusCode::from_u16(response.status().as_u16()).unwrap()
}

/// The text messages sent to `to`, waiting until there are `count`.
async fn texts_to(graph: &FakeGraph, to: &str, count: usize) -> Vec<Value> {
    wait_for(&format!("{count} messages to {to}"), || async {
        let sent: Vec<Value> = graph
            .sent()
            .into_iter()
            .filter(|c| c.body["to"] == to && c.body["type"] == "text")
            .map(|c| c.body)
            .collect();
        (sent.len() >= count).then_some(sent)
    })
    .await
}

#[tokio::test]
async fn the_verification_handshake_echoes_the_challenge_for_the_verify_token_only() {
    let (model, graph) = (echo_model().await, FakeGraph::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &graph.base_url, "")).await;
    let get = |token: &str| {
        worker
            .http
            .get(worker.url(&format!(
                "/v1/whatsapp/wa/webhook?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444"
            )))
            .send()
    };
    let answer = get(SECRET).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(answer.text().await.unwrap(), "1158201444");
    let refused = get("not-the-token").await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    worker.stop().await;
}

#[tokio::test]
async fn a_wrongly_signed_notification_is_refused_and_nothing_is_published() {
    let (model, graph) = (echo_model().await, FakeGraph::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &graph.base_url, "")).await;
    let mut inbound = worker
        .broker
        .subscribe(&subject::inbound(
            "whatsapp",
            &ResourceKey::new("default", "wa"),
        ))
        .await
        .unwrap();

    let forged = text_notification(PHONE, USER, "wamid.forged", "forged");
    assert_eq!(
        notify(&worker, &forged, "wrong-secret").await,
        StatusCode::UNAUTHORIZED
    );
    let unsigned = worker
        .http
        .post(worker.url("/v1/whatsapp/wa/webhook"))
        .body(forged.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);

    // A good one after them is the first message published.
    let genuine = text_notification(PHONE, USER, "wamid.genuine", "genuine");
    assert_eq!(notify(&worker, &genuine, SECRET).await, StatusCode::OK);
    let first = next_message(&mut inbound, "the genuine message").await;
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["text"], "genuine");
    assert_eq!(first["conversation"], USER);
    assert_eq!(first["metadata"]["whatsapp.messageId"], "wamid.genuine");
    worker.stop().await;
}

#[tokio::test]
async fn a_text_message_is_answered_once_even_when_delivered_twice() {
    let (model, graph) = (echo_model().await, FakeGraph::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &graph.base_url, "")).await;
    let message = text_notification(
        PHONE,
        USER,
        "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUFERjg0NDEzNDdFODU3MUMxMAA=",
        "hi",
    );
    assert_eq!(notify(&worker, &message, SECRET).await, StatusCode::OK);
    // Meta delivers again (our 200 was slow or lost).
    assert_eq!(notify(&worker, &message, SECRET).await, StatusCode::OK);
    // A message of another phone number of the same app is not ours.
    let other = text_notification("999", USER, "wamid.other", "not for us");
    assert_eq!(notify(&worker, &other, SECRET).await, StatusCode::OK);
    // A later message shows that the redelivery was not answered meanwhile.
    let later = text_notification(PHONE, USER, "wamid.later", "later");
    assert_eq!(notify(&worker, &later, SECRET).await, StatusCode::OK);

    let sent = texts_to(&graph, USER, 2).await;
    let bodies: Vec<&str> = sent
        .iter()
        .map(|m| m["text"]["body"].as_str().unwrap())
        .collect();
    // Markdown bold is WhatsApp's `*bold*`.
    assert_eq!(bodies, ["echo *hi*", "echo *later*"]);
    assert_eq!(sent[0]["messaging_product"], "whatsapp");
    assert_eq!(model.request_count(), 2);

    let calls = graph.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.version == "v21.0" && c.phone_number_id == PHONE)
    );
    assert!(
        calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {SECRET}")))
    );
    // Each accepted message was marked read with the typing indicator.
    let receipts: Vec<&Value> = calls
        .iter()
        .map(|c| &c.body)
        .filter(|b| b["status"] == "read")
        .collect();
    assert_eq!(receipts.len(), 2, "{receipts:?}");
    assert_eq!(receipts[0]["typing_indicator"], json!({"type": "text"}));
    worker.stop().await;
}

#[tokio::test]
async fn a_choice_of_a_reply_button_reaches_the_agent_as_its_title() {
    let (model, graph) = (echo_model().await, FakeGraph::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &graph.base_url, "")).await;
    let choice = message_notification(
        PHONE,
        USER,
        json!({"from": USER, "id": "wamid.choice", "timestamp": "1700000000", "type": "interactive",
               "interactive": {"type": "button_reply", "button_reply": {"id": "yes-1", "title": "Yes please"}}}),
    );
    assert_eq!(notify(&worker, &choice, SECRET).await, StatusCode::OK);
    let sent = texts_to(&graph, USER, 1).await;
    assert_eq!(sent[0]["text"]["body"], "echo *Yes please*");
    worker.stop().await;
}

#[tokio::test]
async fn a_throttled_send_is_sent_again_after_retry_after() {
    let model = echo_model().await;
    let graph = FakeGraph::answering(|body, _| {
        static THROTTLED: std::sync::Once = std::sync::Once::new();
        let mut answer = GraphAnswer::accepted(body["to"].as_str().unwrap_or(""));
        if body["type"] == "text" {
            THROTTLED.call_once(|| {
                answer = GraphAnswer {
                    retry_after: Some(1),
                    ..GraphAnswer::error(StatusCode::TOO_MANY_REQUESTS, 130_429, "Rate limit hit")
                };
            });
        }
        answer
    })
    .await;
    let worker = TestWorker::start(&config(&model.base_url, &graph.base_url, "")).await;
    let message = text_notification(PHONE, USER, "wamid.t1", "hi");
    assert_eq!(notify(&worker, &message, SECRET).await, StatusCode::OK);
    let sent = wait_for("the send and its retry", || async {
        let sent: Vec<_> = graph
            .sent()
            .into_iter()
            .filter(|c| c.body["type"] == "text")
            .collect();
        (sent.len() >= 2).then_some(sent)
    })
    .await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body, sent[1].body);
    let waited = sent[1].at - sent[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "sent again after {waited:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn outside_the_24_hour_window_the_template_is_sent() {
    let model = echo_model().await;
    let graph = FakeGraph::answering(|body, _| match body["type"].as_str() {
        Some("text") => GraphAnswer::error(
            StatusCode::BAD_REQUEST,
            131_047,
            "Re-engagement message: more than 24 hours have passed since the recipient last replied",
        ),
        _ => GraphAnswer::accepted(body["to"].as_str().unwrap_or("")),
    })
    .await;
    let worker = TestWorker::start(&config(
        &model.base_url,
        &graph.base_url,
        "        templateOnClosedWindow: {name: hello_again, language: en_US}\n",
    ))
    .await;
    let message = text_notification(PHONE, USER, "wamid.old", "hi");
    assert_eq!(notify(&worker, &message, SECRET).await, StatusCode::OK);
    let template = wait_for("the template", || async {
        graph
            .sent()
            .into_iter()
            .find(|c| c.body["type"] == "template")
    })
    .await;
    assert_eq!(template.body["to"], USER);
    assert_eq!(
        template.body["template"],
        json!({"name": "hello_again", "language": {"code": "en_US"}})
    );
    worker.stop().await;
}

/// Without a template, an answer refused because the 24-hour window is closed is not
/// retried: it is dead-lettered with the reason, and nothing else is sent.
#[tokio::test]
async fn outside_the_24_hour_window_without_a_template_the_answer_is_dead_lettered() {
    let model = echo_model().await;
    let graph = FakeGraph::answering(|body, _| match body["type"].as_str() {
        Some("text") => GraphAnswer::error(
            StatusCode::BAD_REQUEST,
            131_047,
            "Re-engagement message: more than 24 hours have passed since the recipient last replied",
        ),
        _ => GraphAnswer::accepted(body["to"].as_str().unwrap_or("")),
    })
    .await;
    let options = WorkerOptions {
        admin_token_env: ADMIN_TOKEN_ENV,
        ..Default::default()
    };
    let worker =
        TestWorker::start_with(options, &config(&model.base_url, &graph.base_url, "")).await;
    let message = text_notification(PHONE, USER, "wamid.old", "hi");
    assert_eq!(notify(&worker, &message, SECRET).await, StatusCode::OK);
    let dead = wait_for("the answer in the dead-letter queue", || async {
        worker.dead_letters().await.into_iter().next()
    })
    .await;
    assert_eq!(dead["subject"], "plugin.delivery.whatsapp.default.wa");
    let reason = dead["error"].as_str().unwrap();
    assert!(
        reason.contains("24-hour customer service window is closed"),
        "{reason}"
    );
    let texts = graph
        .sent()
        .into_iter()
        .filter(|c| c.body["type"] == "text")
        .count();
    assert_eq!(texts, 1, "tried once, not retried");
    assert!(graph.sent().iter().all(|c| c.body["type"] != "template"));
    worker.stop().await;
}
