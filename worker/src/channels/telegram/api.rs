//! A Bot API client: `POST <base>/bot<token>/<method>` with a JSON body, answered by
//! `{"ok": true, "result": …}` or `{"ok": false, "error_code", "description",
//! "parameters": {"retry_after"}}` (https://core.telegram.org/bots/api#making-requests).
//!
//! The token is part of every URL, so no URL is ever shown: errors carry the method
//! name and reqwest's error without its URL.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Time for a call other than a long poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A long poll's HTTP timeout beyond the time the server is asked to hold it.
const POLL_MARGIN: Duration = Duration::from_secs(10);
/// Longest description of a refusal kept (it is the server's text).
const MAX_DESCRIPTION: usize = 300;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("Bot API `{method}`: cannot reach the server: {reason}")]
    Unreachable {
        method: &'static str,
        reason: String,
    },
    #[error("Bot API `{method}`: too many requests; retry after {retry_after:?}")]
    RateLimited {
        method: &'static str,
        retry_after: Duration,
    },
    #[error("Bot API `{method}` refused the call ({code}): {description}")]
    Refused {
        method: &'static str,
        code: u16,
        description: String,
    },
    #[error("Bot API `{method}`: unreadable answer: {reason}")]
    Malformed {
        method: &'static str,
        reason: String,
    },
}

impl ApiError {
    /// Whether the same call can succeed later (the server was unreachable, busy or
    /// failing), as opposed to a refusal of the call itself.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } | ApiError::RateLimited { .. } => true,
            ApiError::Refused { code, .. } => *code >= 500,
            ApiError::Malformed { .. } => false,
        }
    }
}

/// One update (https://core.telegram.org/bots/api#update); only messages are read,
/// and unknown fields are ignored. (Its `update_id` is read from the raw JSON, so an
/// update of an unknown shape still moves the offset.)
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Update {
    #[serde(default)]
    pub message: Option<Message>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Message {
    pub message_id: i64,
    pub chat: Chat,
    #[serde(default)]
    pub from: Option<User>,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Chat {
    pub id: i64,
    /// `private`, `group`, `supergroup` or `channel`.
    #[serde(rename = "type", default)]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct User {
    pub id: i64,
}

#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Debug, Deserialize)]
struct Parameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

/// What `sendMessage` answers, as far as the channel reads it.
#[derive(Debug, Deserialize)]
pub(crate) struct SentMessage {
    pub message_id: i64,
}

#[derive(Debug, Serialize)]
pub(crate) struct SendMessage<'a> {
    pub chat_id: i64,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_mode: Option<&'static str>,
}

pub(crate) struct BotApi {
    http: reqwest::Client,
    /// `<base>/bot<token>/`: secret, never shown.
    prefix: String,
}

impl BotApi {
    pub(crate) fn new(base_url: &str, token: &str) -> Self {
        crate::tls::install_provider();
        Self {
            http: reqwest::Client::builder()
                .build()
                .expect("an HTTP client with default settings builds"),
            prefix: format!("{}/bot{token}/", base_url.trim_end_matches('/')),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &'static str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let unreachable = |err: reqwest::Error| ApiError::Unreachable {
            method,
            reason: err.without_url().to_string(),
        };
        let response = self
            .http
            .post(format!("{}{method}", self.prefix))
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        let answer: Answer = match serde_json::from_slice(&bytes) {
            Ok(answer) => answer,
            Err(_) if status >= 500 => {
                return Err(ApiError::Refused {
                    method,
                    code: status,
                    description: "server error".to_owned(),
                });
            }
            Err(err) => {
                return Err(ApiError::Malformed {
                    method,
                    reason: err.to_string(),
                });
            }
        };
        if !answer.ok {
            let code = answer.error_code.unwrap_or(status);
            if let Some(seconds) = answer.parameters.and_then(|p| p.retry_after) {
                return Err(ApiError::RateLimited {
                    method,
                    retry_after: Duration::from_secs(seconds),
                });
            }
            let mut description = answer.description.unwrap_or_default();
            if let Some((end, _)) = description.char_indices().nth(MAX_DESCRIPTION) {
                description.truncate(end);
            }
            return Err(ApiError::Refused {
                method,
                code,
                description,
            });
        }
        serde_json::from_value(answer.result.unwrap_or(Value::Null)).map_err(|err| {
            ApiError::Malformed {
                method,
                reason: err.to_string(),
            }
        })
    }

    /// Updates from `offset` on, waiting up to `timeout` for the first.
    pub(crate) async fn get_updates(
        &self,
        offset: Option<i64>,
        timeout: Duration,
    ) -> Result<Vec<Value>, ApiError> {
        let body = json!({
            "offset": offset,
            "timeout": timeout.as_secs(),
            "allowed_updates": ["message"],
        });
        self.call("getUpdates", &body, timeout + POLL_MARGIN).await
    }

    pub(crate) async fn send_message(
        &self,
        message: &SendMessage<'_>,
    ) -> Result<SentMessage, ApiError> {
        self.call("sendMessage", message, CALL_TIMEOUT).await
    }

    /// Replaces the text of message `message_id` (one this bot sent).
    pub(crate) async fn edit_message_text(
        &self,
        message_id: i64,
        message: &SendMessage<'_>,
    ) -> Result<serde::de::IgnoredAny, ApiError> {
        let mut body = serde_json::to_value(message).expect("a message serialises");
        body["message_id"] = json!(message_id);
        self.call("editMessageText", &body, CALL_TIMEOUT).await
    }

    pub(crate) async fn send_chat_action(
        &self,
        chat_id: i64,
        action: &str,
    ) -> Result<bool, ApiError> {
        let body = json!({"chat_id": chat_id, "action": action});
        self.call("sendChatAction", &body, CALL_TIMEOUT).await
    }

    /// Shows `text` as the draft `draft_id` of a private chat while an answer is
    /// written (the message itself is sent with `sendMessage` at the end).
    pub(crate) async fn send_message_draft(
        &self,
        chat_id: i64,
        draft_id: i64,
        text: &str,
    ) -> Result<bool, ApiError> {
        let body = json!({"chat_id": chat_id, "draft_id": draft_id, "text": text});
        self.call("sendMessageDraft", &body, CALL_TIMEOUT).await
    }

    pub(crate) async fn set_webhook(
        &self,
        url: &str,
        secret_token: &str,
    ) -> Result<bool, ApiError> {
        let body = json!({
            "url": url,
            "secret_token": secret_token,
            "allowed_updates": ["message"],
        });
        self.call("setWebhook", &body, CALL_TIMEOUT).await
    }

    /// Removes a webhook, which `getUpdates` needs gone; pending updates are kept.
    pub(crate) async fn delete_webhook(&self) -> Result<bool, ApiError> {
        let body = json!({"drop_pending_updates": false});
        self.call("deleteWebhook", &body, CALL_TIMEOUT).await
    }
}
