//! JSON over HTTP with time-outs and retries, shared by the HTTP providers.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::LlmError;

pub(crate) struct JsonClient {
    client: reqwest::Client,
    timeout_seconds: u64,
    max_retries: u32,
}

impl JsonClient {
    pub(crate) fn new(timeout_seconds: u64, max_retries: u32) -> Self {
        // reqwest is built without a default TLS provider; install ring once per
        // process (later calls find it installed and change nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            client: reqwest::Client::new(),
            timeout_seconds,
            max_retries,
        }
    }

    /// POSTs `body` to `url` and decodes the answer, retrying with exponential
    /// backoff while the failure is retryable (see [`LlmError::is_retryable`]).
    pub(crate) async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> Result<R, LlmError> {
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
                return Err(LlmError::Status {
                    status: status.as_u16(),
                    body: body.chars().take(500).collect(),
                });
            }
            serde_json::from_slice(&bytes).map_err(|e| LlmError::InvalidResponse(e.to_string()))
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(self.max_retries as usize)
                    .with_jitter(),
            )
            .when(LlmError::is_retryable)
            .notify(
                |err, after| tracing::warn!(error = %err, ?after, "model call failed, retrying"),
            )
            .await
    }

    fn transport(&self, err: reqwest::Error) -> LlmError {
        if err.is_timeout() {
            LlmError::Timeout(self.timeout_seconds)
        } else {
            LlmError::Transport(err.to_string())
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
