//! The worker's HTTP server: probes, metrics, the catalog report, admin API, the
//! served agents (MCP and A2A, `crate::serve`) and the routes of the channels the
//! worker currently serves.

mod admin;
mod admin_memory;
mod bearer;
mod catalog;
mod probes;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use admin::{AdminToken, DeadLetterQueue};
pub use bearer::BearerToken;

use crate::broker::Broker;
use crate::catalog::Live;
use crate::channels::ChannelRoutes;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::serve::Served;

/// Everything the worker's own endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// Whether the worker serves (`/readyz`).
    pub lifecycle: Lifecycle,
    /// Its connection state is reported (not required) by `/readyz`.
    pub broker: Arc<dyn Broker>,
    /// What runs: `/catalog`, `/readyz` details and the admin API's agents.
    pub catalog: Arc<Live>,
    pub dead_letters: Arc<dyn DeadLetterQueue>,
    pub admin_token: AdminToken,
    pub channels: ChannelRoutes,
    /// `/mcp`, `/a2a/…` and `/.well-known/agent-card.json`.
    pub(crate) serve: Served,
}

impl axum::extract::FromRef<HttpState> for Served {
    fn from_ref(state: &HttpState) -> Self {
        state.serve.clone()
    }
}

/// The worker's routes; every other path goes to the channels' routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
        .route("/catalog", get(catalog::catalog))
        .nest("/admin", admin::routes(state.clone()))
        .merge(crate::serve::routes(&state.serve))
        .fallback(channel_routes)
        .with_state(state)
}

/// The server's fallback: every path the worker itself does not serve goes to the
/// channels'.
async fn channel_routes(
    axum::extract::State(state): axum::extract::State<HttpState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    state.channels.handle(request).await
}
