//! Slack's Web API: `chat.postMessage` and `chat.update` with the bot token.
//! Slack answers HTTP 200 with `{"ok": false, "error": …}` for most failures, and
//! 429 with `Retry-After` when throttled (api.slack.com/apis/rate-limits).

use std::time::Duration;

use serde_json::{Value, json};

use crate::channels::DeliverError;
use crate::channels::retry_after::retry_after;

const DEFAULT_RETRY: Duration = Duration::from_secs(5);
/// After our token was refused: someone must fix it (a rotation restarts the channel).
const TOKEN_RETRY: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// `error` values meaning our token is not (or no longer) good.
const TOKEN_ERRORS: [&str; 5] = [
    "invalid_auth",
    "not_authed",
    "token_revoked",
    "token_expired",
    "account_inactive",
];

pub(super) struct SlackApi {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    /// Until when Slack asked us (429 `Retry-After`) to make no calls: a call before
    /// then is not made but answered `Retry` for the time left.
    quiet_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

#[derive(Debug)]
pub(super) enum ApiError {
    Retry {
        after: Duration,
        reason: String,
        /// Our token was refused or Slack could not be reached.
        down: bool,
    },
    Refused {
        reason: String,
    },
}

impl From<ApiError> for DeliverError {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Retry { after, reason, .. } => DeliverError::Retry { after, reason },
            ApiError::Refused { reason } => DeliverError::Failed { reason },
        }
    }
}

impl SlackApi {
    pub(super) fn new(base_url: &str, token: Option<String>) -> Self {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("an HTTP client with a timeout builds");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            quiet_until: std::sync::Mutex::default(),
        }
    }

    /// Posts `text` in the thread `thread_ts` of `channel`; the new message's `ts`.
    pub(super) async fn post_message(
        &self,
        channel: &str,
        thread_ts: &str,
        text: &str,
    ) -> Result<String, ApiError> {
        let answer = self
            .call(
                "chat.postMessage",
                json!({"channel": channel, "thread_ts": thread_ts, "text": text, "mrkdwn": true}),
            )
            .await?;
        answer["ts"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::Refused {
                reason: "chat.postMessage answered without a `ts`".to_owned(),
            })
    }

    pub(super) async fn update(&self, channel: &str, ts: &str, text: &str) -> Result<(), ApiError> {
        self.call(
            "chat.update",
            json!({"channel": channel, "ts": ts, "text": text}),
        )
        .await
        .map(|_| ())
    }

    async fn call(&self, method: &str, body: Value) -> Result<Value, ApiError> {
        let Some(token) = &self.token else {
            return Err(ApiError::Retry {
                after: TOKEN_RETRY,
                reason: "the Slack bot token is not set".to_owned(),
                down: true,
            });
        };
        let now = tokio::time::Instant::now();
        if let Some(until) = *self.quiet_until.lock().unwrap()
            && until > now
        {
            return Err(ApiError::Retry {
                after: until - now,
                reason: format!("{method}: waiting for Slack's rate limit"),
                down: false,
            });
        }
        let response = self
            .http
            .post(format!("{}/{method}", self.base_url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|err| ApiError::Retry {
                after: DEFAULT_RETRY,
                reason: format!("Slack cannot be reached: {err}"),
                down: true,
            })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        if status.as_u16() == 429 {
            let after = retry_after.unwrap_or(DEFAULT_RETRY);
            *self.quiet_until.lock().unwrap() = Some(tokio::time::Instant::now() + after);
            return Err(ApiError::Retry {
                after,
                reason: format!("{method}: rate limited"),
                down: false,
            });
        }
        if status.is_server_error() {
            return Err(ApiError::Retry {
                after: retry_after.unwrap_or(DEFAULT_RETRY),
                reason: format!("{method}: Slack answered {status}"),
                down: false,
            });
        }
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if answer["ok"] == true {
            return Ok(answer);
        }
        let error = answer["error"]
            .as_str()
            .unwrap_or("no error given")
            .chars()
            .take(100)
            .collect::<String>();
        let reason = format!("{method}: {status} {error}");
        if TOKEN_ERRORS.contains(&error.as_str()) {
            return Err(ApiError::Retry {
                after: TOKEN_RETRY,
                reason,
                down: true,
            });
        }
        if error == "ratelimited" {
            return Err(ApiError::Retry {
                after: retry_after.unwrap_or(DEFAULT_RETRY),
                reason,
                down: false,
            });
        }
        Err(ApiError::Refused { reason })
    }
}
