//! JSON over HTTP with time-outs and retries, shared by the model providers and the
//! embedding client (which is why it belongs to neither): whole JSON answers
//! ([`JsonClient::post`]) and responses whose body the caller reads as it comes
//! ([`JsonClient::open`], for streams).

use std::future::Future;
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
            let request = self
                .request(url, headers, body)
                .timeout(Duration::from_secs(self.timeout_seconds));
            let response = request.send().await.map_err(|e| self.transport(e))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
            if !status.is_success() {
                return Err(status_error(status, &bytes));
            }
            serde_json::from_slice(&bytes).map_err(HttpError::InvalidResponse)
        };
        self.with_retries(url, attempt, HttpError::is_retryable)
            .await
    }

    /// POSTs `body` to `url` and returns the response as soon as its headers came,
    /// within the time-out; its body is the caller's to read, with no time limit of
    /// this client (a stream's events come for as long as the answer takes). A
    /// non-2xx status is [`HttpError::Status`]. Not retried: see
    /// [`JsonClient::with_retries`].
    pub(crate) async fn open<B: Serialize>(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> Result<reqwest::Response, HttpError> {
        let timeout = self.timeout();
        let sent = tokio::time::timeout(timeout, self.request(url, headers, body).send());
        let response = sent
            .await
            .map_err(|_| HttpError::Timeout(self.timeout_seconds))?
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = tokio::time::timeout(timeout, response.bytes())
            .await
            .map_err(|_| HttpError::Timeout(self.timeout_seconds))?
            .map_err(|e| self.transport(e))?;
        Err(status_error(status, &bytes))
    }

    /// Runs `attempt` until it succeeds, fails in a way `retryable` refuses, or the
    /// retries are used up, with exponential backoff and jitter between attempts.
    pub(crate) async fn with_retries<T, E, F, Fut>(
        &self,
        url: &str,
        attempt: F,
        retryable: impl FnMut(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(self.max_retries as usize)
                    .with_jitter(),
            )
            .when(retryable)
            .notify(
                |err, after| tracing::warn!(%url, error = %err, ?after, "request failed, retrying"),
            )
            .await
    }

    /// How long a request may wait for an answer to start (and, for [`JsonClient::post`],
    /// to be read whole).
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }

    fn request<B: Serialize>(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> reqwest::RequestBuilder {
        let mut request = self.client.post(url).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
    }

    /// A failed read of a response: a time-out as such, anything else as transport.
    pub(crate) fn transport(&self, err: reqwest::Error) -> HttpError {
        if err.is_timeout() {
            HttpError::Timeout(self.timeout_seconds)
        } else {
            HttpError::Transport(err)
        }
    }
}

/// The error of a non-2xx answer, with the start of its body.
fn status_error(status: reqwest::StatusCode, body: &[u8]) -> HttpError {
    HttpError::Status {
        status: status.as_u16(),
        body: String::from_utf8_lossy(body).chars().take(500).collect(),
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
