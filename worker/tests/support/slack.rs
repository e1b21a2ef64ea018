//! A local Slack Web API (`chat.postMessage`, `chat.update`: bearer token, JSON, HTTP
//! 200 with `ok`, or 429 with `Retry-After`), recording every call and answering as
//! the test scripts; and Events API requests signed as Slack signs them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct SlackCall {
    /// `chat.postMessage` or `chat.update`.
    pub method: String,
    pub authorization: Option<String>,
    pub body: Value,
    pub at: Instant,
    /// The `ts` the fake gave a message it posted.
    pub posted_ts: Option<String>,
    /// Answered by the test's responder (so it changed nothing).
    pub scripted: bool,
}

/// A scripted answer instead of the normal one: `None` answers normally.
pub struct SlackAnswer {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub body: Value,
}

type Responder = dyn Fn(&str, &Value, usize) -> Option<SlackAnswer> + Send + Sync;
type FakeState = (Arc<Mutex<Vec<SlackCall>>>, Arc<Responder>, Arc<AtomicU64>);

#[derive(Clone)]
pub struct FakeSlack {
    pub base_url: String,
    pub calls: Arc<Mutex<Vec<SlackCall>>>,
}

impl FakeSlack {
    pub async fn start() -> Self {
        Self::answering(|_, _, _| None).await
    }

    /// `responder(method, body, index of the call)` may replace the normal answer.
    pub async fn answering(
        responder: impl Fn(&str, &Value, usize) -> Option<SlackAnswer> + Send + Sync + 'static,
    ) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state: FakeState = (
            calls.clone(),
            Arc::new(responder),
            Arc::new(AtomicU64::new(1)),
        );
        let app = axum::Router::new()
            .route(
                "/{method}",
                post(
                    |State((calls, responder, next_ts)): State<FakeState>,
                     Path(method): Path<String>,
                     headers: HeaderMap,
                     Json(body): Json<Value>| async move {
                        let index = {
                            let mut calls = calls.lock().unwrap();
                            calls.push(SlackCall {
                                method: method.clone(),
                                authorization: headers
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                                body: body.clone(),
                                at: Instant::now(),
                                posted_ts: None,
                                scripted: false,
                            });
                            calls.len() - 1
                        };
                        if let Some(answer) = responder(&method, &body, index) {
                            calls.lock().unwrap()[index].scripted = true;
                            let mut response: Response =
                                (answer.status, Json(answer.body)).into_response();
                            if let Some(after) = answer.retry_after {
                                response.headers_mut().insert("retry-after", after.into());
                            }
                            return response;
                        }
                        let answer = match method.as_str() {
                            "chat.postMessage" => {
                                let ts = format!("1700000100.{:06}", next_ts.fetch_add(1, Ordering::SeqCst));
                                calls.lock().unwrap()[index].posted_ts = Some(ts.clone());
                                json!({"ok": true, "channel": body["channel"], "ts": ts, "message": {"text": body["text"]}})
                            }
                            "chat.update" => {
                                json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "text": body["text"]})
                            }
                            _ => json!({"ok": false, "error": "unknown_method"}),
                        };
                        Json(answer).into_response()
                    },
                ),
            )
            .with_state(state);
        Self {
            base_url: super::serve_locally(app).await,
            calls,
        }
    }

    pub fn calls(&self) -> Vec<SlackCall> {
        self.calls.lock().unwrap().clone()
    }

    /// The bot's messages as they stand now (posts with their latest update applied),
    /// by `ts`, each with its channel, thread and text; from successful calls only
    /// (a post answered with an error posted nothing).
    pub fn messages(&self) -> BTreeMap<String, (String, String, String)> {
        let mut messages = BTreeMap::new();
        for call in self.calls().into_iter().filter(|c| !c.scripted) {
            let text = call.body["text"].as_str().unwrap_or_default().to_owned();
            let channel = call.body["channel"].as_str().unwrap_or_default().to_owned();
            match call.method.as_str() {
                "chat.postMessage" => {
                    if let Some(ts) = call.posted_ts {
                        let thread = call.body["thread_ts"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        messages.insert(ts, (channel, thread, text));
                    }
                }
                "chat.update" => {
                    let ts = call.body["ts"].as_str().unwrap_or_default();
                    let entry = messages.get_mut(ts).expect("an update of a posted message");
                    assert_eq!(entry.0, channel, "an update in the message's channel");
                    entry.2 = text;
                }
                _ => {}
            }
        }
        messages
    }
}

/// Headers Slack sends with `body` at `timestamp` (Unix seconds) under `secret`.
pub fn signed_headers(secret: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    vec![
        ("x-slack-request-timestamp", timestamp.to_string()),
        (
            "x-slack-signature",
            format!("v0={}", hex::encode(mac.finalize().into_bytes())),
        ),
        ("content-type", "application/json".to_owned()),
    ]
}

/// An `event_callback` of a `kind` event (`message`, `app_mention`) by `user`.
pub fn event_callback(event_id: &str, event: Value) -> Value {
    json!({
        "token": "legacy-verification-token",
        "team_id": "T0001",
        "api_app_id": "A0001",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_700_000_000,
        "authorizations": [{"team_id": "T0001", "user_id": "UBOT", "is_bot": true}],
        "event": event,
    })
}
