//! `/admin/*`: operator endpoints behind a bearer token.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::HttpState;
use crate::agent::AgentInfo;

/// The agents this worker hosts, as the admin API lists them.
pub trait AgentDirectory: Send + Sync {
    fn agents(&self) -> Vec<AgentInfo>;
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
        // Compare without an early exit so timing does not reveal the prefix.
        expected.len() == presented.len()
            && expected
                .bytes()
                .zip(presented.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

pub(super) fn routes(state: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/agents", get(list_agents))
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
    axum::Json(json!({ "agents": state.agents.agents() })).into_response()
}
