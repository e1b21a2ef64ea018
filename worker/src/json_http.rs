//! JSON over HTTP with time-outs and retries, shared by the model providers and the
//! embedding client (which is why it belongs to neither).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a JSON request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("did not answer within {0} s")]
    Timeout(u64),
    #[error("API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("API could not be reached: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("API sent a response that could not be read: {0}")]
    InvalidResponse(#[source] serde_json::Error),
}

impl HttpError {
    /// Rate limits, server errors, time-outs and connection failures may pass.
    pub fn is_retryable(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => *status == 429 || *status >= 500,
            HttpError::Timeout(_) | HttpError::Transport(_) => true,
            HttpError::InvalidResponse(_) => false,
        }
    }
}

pub(crate) struct JsonClient {
    client: reqwest::Client,
    timeout_seconds: u64,
    max_retries: u32,
}

impl JsonClient {
    pub(crate) fn new(timeout_seconds: u64, max_retries: u32) -> Self {
        crate::tls::install_provider();
        Self {
            client: reqwest::Client::new(),
            timeout_seconds,
            max_retries,
        }
    }

    /// POSTs `body` to `url` and decodes the answer, retrying with exponential
    /// backoff while the failure is retryable (see [`HttpError::is_retryable`]).
    pub(crate) async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> Result<R, HttpError> {
        let attempt = || async {
            let mut request = self
                .client
                .post(url)
                .timeout(Duration::from_secs(self.timeout_seconds))
                .json(body);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.map_err(|e| self.transport(e))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
            if !status.is_success() {
                let body = String::from_utf8_lossy(&bytes);
                return Err(HttpError::Status {
                    status: status.as_u16(),
                    body: body.chars().take(500).collect(),
                });
            }
            serde_json::from_slice(&bytes).map_err(HttpError::InvalidResponse)
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(self.max_retries as usize)
                    .with_jitter(),
            )
            .when(HttpError::is_retryable)
            .notify(
                |err, after| tracing::warn!(%url, error = %err, ?after, "request failed, retrying"),
            )
            .await
    }

    fn transport(&self, err: reqwest::Error) -> HttpError {
        if err.is_timeout() {
            HttpError::Timeout(self.timeout_seconds)
        } else {
            HttpError::Transport(err)
        }
    }
}

/// The `authorization` header for `authorization` (`Bearer …`), or none.
pub(crate) fn authorization(authorization: Option<&str>) -> Vec<(&'static str, &str)> {
    authorization
        .map(|auth| ("authorization", auth))
        .into_iter()
        .collect()
}

/// `base` without a trailing slash, followed by `path`.
pub(crate) fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}
