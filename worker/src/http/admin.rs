//! `/admin/*`: operator endpoints behind a bearer token.

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::HttpState;
use crate::queue::{DeadLetter, OUTBOX_FULL_RETRY_AFTER, QueueError};

/// The dead-letter queue, as the admin API manages it.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// `false` when there is no such dead letter.
    async fn replay(&self, id: i64) -> Result<bool, QueueError>;
    /// `false` when there is no such dead letter.
    async fn delete(&self, id: i64) -> Result<bool, QueueError>;
}

/// The admin bearer token; `None` disables the admin API.
#[derive(Clone)]
pub struct AdminToken(Option<String>);

impl AdminToken {
    /// Reads the token from `env`; unset or empty disables the admin API.
    pub fn from_env(env: &str) -> Self {
        Self(std::env::var(env).ok().filter(|t| !t.is_empty()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn accepts(&self, presented: &str) -> bool {
        let Some(expected) = &self.0 else {
            return false;
        };
        // Constant time, so timing does not reveal how much of a guess was right
        // (`ct_eq` on slices of different lengths is false; the length is no secret).
        bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }
}

pub(super) fn routes(state: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/agents", get(list_agents))
        .route("/dlq", get(list_dead_letters))
        .route("/dlq/{id}", delete(delete_dead_letter))
        .route("/dlq/{id}/replay", post(replay_dead_letter))
        .merge(super::admin_memory::routes())
        .route_layer(middleware::from_fn_with_state(state, require_token))
}

async fn require_token(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    if !state.admin_token.is_set() {
        return (StatusCode::FORBIDDEN, axum::Json(json!({ "error": "admin API is disabled: set the admin token environment variable (worker.admin.tokenEnv)" }))).into_response();
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if state.admin_token.accepts(token) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(
                json!({ "error": "a valid `Authorization: Bearer <token>` header is required" }),
            ),
        )
            .into_response(),
    }
}

async fn list_agents(State(state): State<HttpState>) -> Response {
    axum::Json(json!({ "agents": state.catalog.agents() })).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// 503 with `Retry-After` when a replay finds the outbox full (the dead letter
/// stays), 500 for a failing database.
fn failure(error: QueueError) -> Response {
    let body = axum::Json(json!({ "error": error.to_string() }));
    match error {
        QueueError::OutboxFull { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::RETRY_AFTER,
                OUTBOX_FULL_RETRY_AFTER.as_secs().to_string(),
            )],
            body,
        )
            .into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, body).into_response(),
    }
}

async fn list_dead_letters(
    State(state): State<HttpState>,
    Query(query): Query<ListQuery>,
) -> Response {
    match state.dead_letters.list(query.limit.min(10_000)).await {
        Ok(items) => axum::Json(json!({ "deadLetters": items })).into_response(),
        Err(error) => failure(error),
    }
}

async fn replay_dead_letter(State(state): State<HttpState>, Path(id): Path<i64>) -> Response {
    match state.dead_letters.replay(id).await {
        Ok(true) => (StatusCode::ACCEPTED, axum::Json(json!({ "replayed": id }))).into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": format!("no dead letter {id}") })),
        )
            .into_response(),
        Err(error) => failure(error),
    }
}

async fn delete_dead_letter(State(state): State<HttpState>, Path(id): Path<i64>) -> Response {
    match state.dead_letters.delete(id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": format!("no dead letter {id}") })),
        )
            .into_response(),
        Err(error) => failure(error),
    }
}

#[cfg(test)]
mod tests {
    use super::AdminToken;

    #[test]
    fn the_token_must_match_exactly() {
        let token = AdminToken(Some("s3cret-token".to_owned()));
        assert!(token.accepts("s3cret-token"));
        for wrong in [
            "",
            "s3cret",
            "s3cret-tokeN",
            "s3cret-token ",
            "x3cret-token",
        ] {
            assert!(!token.accepts(wrong), "{wrong:?}");
        }
        assert!(!AdminToken(None).accepts(""));
    }
}
