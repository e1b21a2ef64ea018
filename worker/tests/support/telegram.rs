//! A local Bot API server (https://core.telegram.org/bots/api) for the Telegram
//! channel's tests: `POST /bot<token>/<method>` with a JSON body, answered with
//! `{"ok": true, "result": …}` or `{"ok": false, "error_code", "description",
//! "parameters"}`. It records every call.
//!
//! `getUpdates` returns the updates with an id at or above the offset asked for, and
//! keeps them all, as Telegram keeps an update until a later offset confirms it: a
//! poller that forgot its offset would get them again. A new `getUpdates` ends one
//! still waiting with `409 Conflict`, as Telegram does.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Longest a `getUpdates` is held here, whatever timeout it asks for.
const MAX_HOLD: Duration = Duration::from_secs(2);

/// One call the fake answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub token: String,
    pub method: String,
    pub body: Value,
    pub at: Instant,
    /// What the fake answered (`ok`).
    pub ok: bool,
}

#[derive(Default)]
struct Fake {
    updates: Mutex<Vec<Value>>,
    next_update: AtomicI64,
    calls: Mutex<Vec<Call>>,
    /// Counts `getUpdates` calls: a waiting one ends when it changes.
    polls: AtomicUsize,
    /// `sendMessage` calls still to refuse with 429.
    refuse_sends: AtomicU32,
    new_update: Notify,
}

pub struct FakeBotApi {
    pub url: String,
    fake: Arc<Fake>,
}

impl FakeBotApi {
    pub async fn start() -> Self {
        let fake = Arc::new(Fake {
            next_update: AtomicI64::new(1000),
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/{bot}/{method}", post(answer))
            .with_state(fake.clone());
        Self {
            url: super::serve_locally(app).await,
            fake,
        }
    }

    /// A text message from user `user` in chat `chat` (`private` or `group`); returns
    /// its update id.
    pub fn push_text(&self, chat: i64, kind: &str, user: i64, text: &str) -> i64 {
        let id = self.fake.next_update.fetch_add(1, Ordering::SeqCst);
        self.fake
            .updates
            .lock()
            .unwrap()
            .push(update(id, chat, kind, user, text));
        self.fake.new_update.notify_waiters();
        id
    }

    /// The calls of `method` so far, in order.
    pub fn calls(&self, method: &str) -> Vec<Call> {
        self.fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// The messages sent (accepted) to `chat`, their texts in order.
    pub fn sent_texts(&self, chat: i64) -> Vec<String> {
        self.calls("sendMessage")
            .into_iter()
            .filter(|c| c.ok && c.body["chat_id"].as_i64() == Some(chat))
            .map(|c| c.body["text"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until `chat` got `count` messages; returns their texts.
    pub async fn wait_for_texts(&self, chat: i64, count: usize) -> Vec<String> {
        super::wait_for_within(
            Duration::from_secs(30),
            &format!("{count} messages in chat {chat}"),
            || async {
                let texts = self.sent_texts(chat);
                (texts.len() >= count).then_some(texts)
            },
        )
        .await
    }

    pub fn refuse_next_sends(&self, count: u32) {
        self.fake.refuse_sends.store(count, Ordering::SeqCst);
    }
}

/// An update as Telegram sends it (with fields the channel does not read).
pub fn update(id: i64, chat: i64, kind: &str, user: i64, text: &str) -> Value {
    json!({
        "update_id": id,
        "message": {
            "message_id": id * 10,
            "date": 1_700_000_000,
            "from": {"id": user, "is_bot": false, "first_name": "Ada", "language_code": "en"},
            "chat": {"id": chat, "type": kind, "first_name": "Ada"},
            "text": text,
        }
    })
}

fn ok(result: Value) -> Response {
    Json(json!({"ok": true, "result": result})).into_response()
}

fn refused(status: StatusCode, description: &str, parameters: Option<Value>) -> Response {
    let mut body = json!({"ok": false, "error_code": status.as_u16(), "description": description});
    if let Some(parameters) = parameters {
        body["parameters"] = parameters;
    }
    (status, Json(body)).into_response()
}

async fn answer(
    State(fake): State<Arc<Fake>>,
    Path((bot, method)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let Some(token) = bot.strip_prefix("bot").map(str::to_owned) else {
        return refused(StatusCode::NOT_FOUND, "Not Found", None);
    };
    let at = Instant::now();
    let (ok_answer, response) = match method.as_str() {
        "getUpdates" => get_updates(&fake, &body).await,
        "sendMessage" => {
            if fake
                .refuse_sends
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                (
                    false,
                    refused(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too Many Requests: retry after 1",
                        Some(json!({"retry_after": 1})),
                    ),
                )
            } else {
                let chat = body["chat_id"].clone();
                (
                    true,
                    ok(json!({
                        "message_id": fake.calls.lock().unwrap().len() + 1,
                        "date": 1_700_000_000,
                        "chat": {"id": chat, "type": "private"},
                        "text": body["text"],
                    })),
                )
            }
        }
        "sendChatAction" | "sendMessageDraft" | "editMessageText" | "setWebhook"
        | "deleteWebhook" => (true, ok(json!(true))),
        _ => (
            false,
            refused(StatusCode::NOT_FOUND, "Not Found: method not found", None),
        ),
    };
    fake.calls.lock().unwrap().push(Call {
        token,
        method,
        body,
        at,
        ok: ok_answer,
    });
    response
}

async fn get_updates(fake: &Fake, body: &Value) -> (bool, Response) {
    let poll = fake.polls.fetch_add(1, Ordering::SeqCst) + 1;
    // Wakes a poll still waiting, which then ends.
    fake.new_update.notify_waiters();
    let offset = body["offset"].as_i64().unwrap_or(i64::MIN);
    let hold = Duration::from_secs(body["timeout"].as_u64().unwrap_or(0)).min(MAX_HOLD);
    let deadline = Instant::now() + hold;
    let pending = loop {
        let waiting = fake.new_update.notified();
        let pending: Vec<Value> = fake
            .updates
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u["update_id"].as_i64().unwrap() >= offset)
            .cloned()
            .collect();
        if fake.polls.load(Ordering::SeqCst) != poll {
            return (
                false,
                refused(
                    StatusCode::CONFLICT,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                    None,
                ),
            );
        }
        if !pending.is_empty() || Instant::now() >= deadline {
            break pending;
        }
        let _ = tokio::time::timeout_at(deadline, waiting).await;
    };
    (true, ok(Value::Array(pending)))
}
