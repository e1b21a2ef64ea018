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

/// The admin bearer token; unset, the admin API is disabled.
pub type AdminToken = super::bearer::BearerToken;

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
    match state.admin_token.refusal(
        request.headers(),
        "admin API is disabled: set the admin token environment variable (worker.admin.tokenEnv)",
    ) {
        Some(refused) => refused,
        None => next.run(request).await,
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
