//! A local Graph API speaking the Cloud API's `messages` endpoint
//! (`POST /<version>/<phone number id>/messages`, bearer token, JSON), recording every
//! call and answering as the test scripts; and the webhook notifications Meta sends,
//! signed as Meta signs them.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One call the fake got.
#[derive(Debug, Clone)]
pub struct GraphCall {
    pub version: String,
    pub phone_number_id: String,
    pub authorization: Option<String>,
    pub body: Value,
    pub at: Instant,
}

/// What the fake answers to one call.
pub struct GraphAnswer {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub body: Value,
}

impl GraphAnswer {
    /// The Cloud API's answer to an accepted message.
    pub fn accepted(to: &str) -> Self {
        Self {
            status: StatusCode::OK,
            retry_after: None,
            body: json!({
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": format!("wamid.out-{}", uuid::Uuid::new_v4())}],
            }),
        }
    }

    /// A Graph error object with `status` and `code`.
    pub fn error(status: StatusCode, code: i64, message: &str) -> Self {
        Self {
            status,
            retry_after: None,
            body: json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "test"}}),
        }
    }
}

type Responder = dyn Fn(&Value, usize) -> GraphAnswer + Send + Sync;
type FakeState = (Arc<Mutex<Vec<GraphCall>>>, Arc<Responder>);

#[derive(Clone)]
pub struct FakeGraph {
    pub base_url: String,
    pub calls: Arc<Mutex<Vec<GraphCall>>>,
}

impl FakeGraph {
    /// Accepts everything.
    pub async fn start() -> Self {
        Self::answering(|body, _| GraphAnswer::accepted(body["to"].as_str().unwrap_or(""))).await
    }

    /// Answers each call with `responder(body, index of the call)`.
    pub async fn answering(
        responder: impl Fn(&Value, usize) -> GraphAnswer + Send + Sync + 'static,
    ) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state = (calls.clone(), Arc::new(responder) as Arc<Responder>);
        let app = axum::Router::new()
            .route(
                "/{version}/{phone}/messages",
                post(
                    |State((calls, responder)): State<FakeState>,
                     Path((version, phone_number_id)): Path<(String, String)>,
                     headers: HeaderMap,
                     Json(body): Json<Value>| async move {
                        let index = {
                            let mut calls = calls.lock().unwrap();
                            calls.push(GraphCall {
                                version,
                                phone_number_id,
                                authorization: headers
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                                body: body.clone(),
                                at: Instant::now(),
                            });
                            calls.len() - 1
                        };
                        let answer = responder(&body, index);
                        let mut response: Response =
                            (answer.status, Json(answer.body)).into_response();
                        if let Some(after) = answer.retry_after {
                            response.headers_mut().insert("retry-after", after.into());
                        }
                        response
                    },
                ),
            )
            .with_state(state);
        Self {
            base_url: super::serve_locally(app).await,
            calls,
        }
    }

    pub fn calls(&self) -> Vec<GraphCall> {
        self.calls.lock().unwrap().clone()
    }

    /// The messages sent (not read receipts), in order.
    pub fn sent(&self) -> Vec<GraphCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.body.get("to").is_some())
            .collect()
    }
}

/// A webhook notification of one text message from `from` to `phone_number_id`.
pub fn text_notification(phone_number_id: &str, from: &str, message_id: &str, text: &str) -> Value {
    message_notification(
        phone_number_id,
        from,
        json!({"from": from, "id": message_id, "timestamp": "1700000000", "type": "text", "text": {"body": text}}),
    )
}

/// A webhook notification carrying `message` (one element of `messages`).
pub fn message_notification(phone_number_id: &str, from: &str, message: Value) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
                    "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": from}],
                    "messages": [message],
                }
            }]
        }]
    })
}

/// `X-Hub-Signature-256` of `body` under the app secret.
pub fn hub_signature(app_secret: &str, body: &[u8]) -> String {
    super::webhook_signature(app_secret, body)
}
