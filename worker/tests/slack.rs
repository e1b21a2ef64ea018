//! The Slack channel end to end: Events API requests into a real worker, the agent
//! answering with a scripted model, and the production Web API client posting to a
//! local fake of Slack (support/slack.rs).

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use nexo_api::{ResourceKey, subject};
use serde_json::{Value, json};
use support::slack::{FakeSlack, SlackAnswer, event_callback, signed_headers};
use support::{
    FakeModel, FakeReply, TestWorker, last_user_text, model_holding_back_its_last_chunk,
    next_message, openai_writer, wait_for,
};

/// The bot token and the signing secret are this variable's value, which cargo sets.
const SECRET: &str = env!("CARGO_PKG_NAME");
const CHANNEL: &str = "C0123456789";

fn config(model: &str, slack: &str) -> String {
    format!(
        "{}channels:
  - name: team
    spec:
      defaultAgent: writer
      slack:
        apiBaseUrl: {slack}
        botToken: {{env: CARGO_PKG_NAME}}
        signingSecret: {{env: CARGO_PKG_NAME}}
",
        openai_writer(model)
    )
}

async fn echo_model() -> FakeModel {
    FakeModel::openai(|body| FakeReply::text(&format!("echo **{}**", last_user_text(body)))).await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// POSTs `body` to the events URL signed with `secret` at `timestamp`, with `extra`
/// headers; status and body.
async fn post_event(
    worker: &TestWorker,
    body: &Value,
    secret: &str,
    timestamp: i64,
    extra: &[(&str, &str)],
) -> (StatusCode, String) {
    let body = body.to_string();
    let mut request = worker.http.post(worker.url("/v1/slack/team/events"));
    for (name, value) in signed_headers(secret, timestamp, body.as_bytes()) {
        request = request.header(name, value);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.body(body).send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    (status, response.text().await.unwrap())
}

fn mention(ts: &str, text: &str) -> Value {
    json!({"type": "app_mention", "user": "U0LAN0Z89", "text": text, "ts": ts, "channel": CHANNEL, "event_ts": ts})
}

/// The bot's messages in `thread` once one of them reads `text`.
async fn thread_once_it_reads(slack: &FakeSlack, thread: &str, text: &str) -> Vec<String> {
    wait_for(&format!("`{text}` in thread {thread}"), || async {
        let texts: Vec<String> = slack
            .messages()
            .into_values()
            .filter(|(channel, t, _)| channel == CHANNEL && t == thread)
            .map(|(_, _, text)| text)
            .collect();
        texts.iter().any(|t| t == text).then_some(texts)
    })
    .await
}

#[tokio::test]
async fn url_verification_is_answered_with_its_challenge() {
    let (model, slack) = (echo_model().await, FakeSlack::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &slack.base_url)).await;
    let challenge = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"});
    let (status, body) = post_event(&worker, &challenge, SECRET, now(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_wrong_signature_or_a_stale_timestamp_is_refused_and_nothing_is_published() {
    let (model, slack) = (echo_model().await, FakeSlack::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &slack.base_url)).await;
    let mut inbound = worker
        .broker
        .subscribe(&subject::inbound(
            "slack",
            &ResourceKey::new("default", "team"),
        ))
        .await
        .unwrap();
    let forged = event_callback("Ev01", mention("1700000000.000100", "forged"));
    let (status, _) = post_event(&worker, &forged, "wrong-secret", now(), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Rightly signed, but six minutes old: a replay.
    let replayed = event_callback("Ev02", mention("1700000000.000200", "replayed"));
    let (status, _) = post_event(&worker, &replayed, SECRET, now() - 6 * 60, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let genuine = event_callback("Ev03", mention("1700000000.000300", "<@UBOT> genuine"));
    let (status, _) = post_event(&worker, &genuine, SECRET, now(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let first = next_message(&mut inbound, "the genuine message").await;
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["text"], "genuine");
    assert_eq!(
        first["conversation"],
        format!("{CHANNEL}:1700000000.000300")
    );
    assert_eq!(first["sender"], "T0001:U0LAN0Z89");
    worker.stop().await;
}

#[tokio::test]
async fn a_mention_is_answered_once_in_its_thread() {
    let (model, slack) = (echo_model().await, FakeSlack::start().await);
    let worker = TestWorker::start(&config(&model.base_url, &slack.base_url)).await;
    let ts = "1700000000.000400";
    let event = event_callback("Ev10", mention(ts, "<@UBOT> hi"));
    assert_eq!(
        post_event(&worker, &event, SECRET, now(), &[]).await.0,
        StatusCode::OK
    );
    // Slack's retry of the same event, and the same message as a `message` event.
    let retry = [
        ("x-slack-retry-num", "1"),
        ("x-slack-retry-reason", "http_timeout"),
    ];
    assert_eq!(
        post_event(&worker, &event, SECRET, now(), &retry).await.0,
        StatusCode::OK
    );
    let as_message = event_callback(
        "Ev11",
        json!({"type": "message", "channel_type": "channel", "user": "U0LAN0Z89", "text": "<@UBOT> hi", "ts": ts, "channel": CHANNEL}),
    );
    assert_eq!(
        post_event(&worker, &as_message, SECRET, now(), &[]).await.0,
        StatusCode::OK
    );
    // Not people speaking: our own (or any bot's) message, an edit.
    for (id, ignored) in [
        (
            "Ev12",
            json!({"type": "message", "bot_id": "B1", "text": "echo", "ts": "1700000000.000500", "channel": CHANNEL, "thread_ts": ts}),
        ),
        (
            "Ev13",
            json!({"type": "message", "subtype": "message_changed", "channel": CHANNEL, "ts": "1700000000.000600", "message": {"text": "edited"}}),
        ),
    ] {
        assert_eq!(
            post_event(&worker, &event_callback(id, ignored), SECRET, now(), &[])
                .await
                .0,
            StatusCode::OK
        );
    }
    // A reply in the thread, which shows that nothing before it was answered twice.
    let in_thread = event_callback(
        "Ev14",
        json!({"type": "message", "user": "U0LAN0Z89", "text": "later", "ts": "1700000000.000700", "thread_ts": ts, "channel": CHANNEL}),
    );
    assert_eq!(
        post_event(&worker, &in_thread, SECRET, now(), &[]).await.0,
        StatusCode::OK
    );

    let thread = wait_for("both answers final", || async {
        let texts = thread_once_it_reads(&slack, ts, "echo *later*").await;
        texts.iter().any(|t| t == "echo *hi*").then_some(texts)
    })
    .await;
    assert_eq!(thread.len(), 2, "{thread:?}");
    assert_eq!(model.request_count(), 2);
    let calls = slack.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {SECRET}")))
    );
    let first_post = calls
        .iter()
        .find(|c| c.method == "chat.postMessage")
        .unwrap();
    assert_eq!(first_post.body["channel"], CHANNEL);
    assert_eq!(first_post.body["thread_ts"], ts);
    worker.stop().await;
}

#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after() {
    let model = echo_model().await;
    let slack = FakeSlack::answering(|_, _, index| {
        (index == 0).then(|| SlackAnswer {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(1),
            body: json!({"ok": false, "error": "ratelimited"}),
        })
    })
    .await;
    let worker = TestWorker::start(&config(&model.base_url, &slack.base_url)).await;
    let ts = "1700000000.000800";
    let event = event_callback("Ev20", mention(ts, "hi"));
    assert_eq!(
        post_event(&worker, &event, SECRET, now(), &[]).await.0,
        StatusCode::OK
    );
    thread_once_it_reads(&slack, ts, "echo *hi*").await;
    let calls = slack.calls();
    assert!(calls.len() >= 2, "{calls:?}");
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "called again after {waited:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_streamed_answer_updates_one_message_at_most_every_one_and_a_half_seconds() {
    let (model, gate) = model_holding_back_its_last_chunk("one two three four five").await;
    let slack = FakeSlack::start().await;
    let worker = TestWorker::start(&config(&model.base_url, &slack.base_url)).await;
    let ts = "1700000000.000900";
    let event = event_callback("Ev30", mention(ts, "count"));
    assert_eq!(
        post_event(&worker, &event, SECRET, now(), &[]).await.0,
        StatusCode::OK
    );

    // Everything but the held-back word is shown before the model finishes.
    thread_once_it_reads(&slack, ts, "one two three four").await;
    let streamed = slack.calls();
    // The first delta is posted at once, the rest waits for the interval.
    assert!(streamed.len() >= 2, "{streamed:?}");
    assert_eq!(streamed[0].method, "chat.postMessage");
    assert!(
        streamed[1..].iter().all(|c| c.method == "chat.update"),
        "{streamed:?}"
    );
    for pair in streamed.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(1500), "updates {gap:?} apart");
    }

    gate.notify_one();
    let thread = thread_once_it_reads(&slack, ts, "one two three four five").await;
    assert_eq!(
        thread,
        ["one two three four five"],
        "one message, replaced by the answer"
    );
    let posts = slack
        .calls()
        .iter()
        .filter(|c| c.method == "chat.postMessage")
        .count();
    assert_eq!(posts, 1);
    worker.stop().await;
}
