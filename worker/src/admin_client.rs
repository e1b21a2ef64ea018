//! A client for the worker's admin API, behind `nexo-worker dlq …`.

use reqwest::StatusCode;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("admin token: environment variable `{0}` is not set")]
    MissingToken(String),
    #[error("cannot reach the worker at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("worker answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base` is the worker's HTTP address (`http://127.0.0.1:8080`); the bearer token
    /// is read from `token_env`.
    pub fn new(base: &str, token_env: &str) -> Result<Self, AdminClientError> {
        let token = std::env::var(token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AdminClientError::MissingToken(token_env.to_owned()))?;
        crate::tls::install_provider();
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::new(),
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Value, AdminClientError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| AdminClientError::Unreachable { url, source })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(AdminClientError::Status { status, body });
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Value, AdminClientError> {
        self.call(reqwest::Method::GET, &format!("/admin/dlq?limit={limit}"))
            .await
    }

    pub async fn replay(&self, id: i64) -> Result<(), AdminClientError> {
        self.call(reqwest::Method::POST, &format!("/admin/dlq/{id}/replay"))
            .await
            .map(drop)
    }

    pub async fn delete(&self, id: i64) -> Result<(), AdminClientError> {
        self.call(reqwest::Method::DELETE, &format!("/admin/dlq/{id}"))
            .await
            .map(drop)
    }
}
