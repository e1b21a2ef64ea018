//! The Cloud API's `messages` endpoint: sending text, templates, reply buttons, and
//! marking a message read with the typing indicator.
//! developers.facebook.com/docs/whatsapp/cloud-api/reference/messages

use std::time::Duration;

use serde_json::{Value, json};

use crate::channels::DeliverError;
use crate::channels::retry_after::retry_after;

/// Graph error code of a free-form message outside the 24-hour customer service
/// window ("Re-engagement message").
pub(super) const CLOSED_WINDOW: i64 = 131_047;
/// Graph error codes of throttling: app, account, pair rate and spam limits.
const RATE_LIMITED: [i64; 6] = [4, 80_007, 130_429, 131_048, 131_056, 613];
/// Graph error code of an invalid or expired access token.
const BAD_TOKEN: i64 = 190;
/// When to try again after a refusal that names no time.
const DEFAULT_RETRY: Duration = Duration::from_secs(5);
/// When to try again after our token was refused: someone must fix it (a rotation
/// restarts the channel with the new one).
const TOKEN_RETRY: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) struct Graph {
    http: reqwest::Client,
    messages_url: String,
    token: Option<String>,
}

/// Why a call failed, from the Graph API's answer.
#[derive(Debug)]
pub(super) enum GraphError {
    /// Try again later (throttled, the API unreachable or failing, our token refused).
    Retry {
        after: Duration,
        reason: String,
        /// The API refused our token or could not be reached: the channel is down.
        down: bool,
    },
    /// The API refused this message; `code` is Graph's error code.
    Refused { code: Option<i64>, reason: String },
}

impl From<GraphError> for DeliverError {
    fn from(err: GraphError) -> Self {
        match err {
            GraphError::Retry { after, reason, .. } => DeliverError::Retry { after, reason },
            GraphError::Refused { reason, .. } => DeliverError::Failed { reason },
        }
    }
}

impl Graph {
    pub(super) fn new(
        base_url: &str,
        version: &str,
        phone_number_id: &str,
        token: Option<String>,
    ) -> Self {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("an HTTP client with a timeout builds");
        Self {
            http,
            messages_url: format!(
                "{}/{version}/{phone_number_id}/messages",
                base_url.trim_end_matches('/')
            ),
            token,
        }
    }

    pub(super) async fn send_text(&self, to: &str, body: &str) -> Result<(), GraphError> {
        self.post(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "text",
            "text": {"body": body, "preview_url": false},
        }))
        .await
    }

    pub(super) async fn send_template(
        &self,
        to: &str,
        name: &str,
        language: &str,
    ) -> Result<(), GraphError> {
        self.post(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "template",
            "template": {"name": name, "language": {"code": language}},
        }))
        .await
    }

    /// An interactive message with up to three reply buttons (`(id, title)`).
    #[allow(dead_code)]
    pub(super) async fn send_buttons(
        &self,
        to: &str,
        body: &str,
        buttons: &[(String, String)],
    ) -> Result<(), GraphError> {
        let buttons: Vec<Value> = buttons
            .iter()
            .map(|(id, title)| json!({"type": "reply", "reply": {"id": id, "title": title}}))
            .collect();
        self.post(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "interactive",
            "interactive": {
                "type": "button",
                "body": {"text": body},
                "action": {"buttons": buttons},
            },
        }))
        .await
    }

    /// Marks `message_id` read and shows the user the typing indicator (until the
    /// answer, or 25 s).
    pub(super) async fn mark_read_typing(&self, message_id: &str) -> Result<(), GraphError> {
        self.post(json!({
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": message_id,
            "typing_indicator": {"type": "text"},
        }))
        .await
    }

    async fn post(&self, body: Value) -> Result<(), GraphError> {
        let Some(token) = &self.token else {
            return Err(GraphError::Retry {
                after: TOKEN_RETRY,
                reason: "the WhatsApp access token is not set".to_owned(),
                down: true,
            });
        };
        let response = self
            .http
            .post(&self.messages_url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|err| GraphError::Retry {
                after: DEFAULT_RETRY,
                reason: format!("the Graph API cannot be reached: {err}"),
                down: true,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = retry_after(response.headers());
        // Graph's error object: {"error": {"message", "type", "code", …}}.
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        let code = answer["error"]["code"].as_i64();
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or("no error message")
            .chars()
            .take(300)
            .collect::<String>();
        let reason = format!("Graph API answered {status} (code {code:?}): {message}");
        if status.as_u16() == 429 || code.is_some_and(|c| RATE_LIMITED.contains(&c)) {
            return Err(GraphError::Retry {
                after: retry_after.unwrap_or(DEFAULT_RETRY),
                reason,
                down: false,
            });
        }
        if status.as_u16() == 401 || code == Some(BAD_TOKEN) {
            return Err(GraphError::Retry {
                after: TOKEN_RETRY,
                reason,
                down: true,
            });
        }
        if status.is_server_error() {
            return Err(GraphError::Retry {
                after: retry_after.unwrap_or(DEFAULT_RETRY),
                reason,
                down: false,
            });
        }
        Err(GraphError::Refused { code, reason })
    }
}
