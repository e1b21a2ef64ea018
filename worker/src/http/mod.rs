//! The worker's HTTP server: probes, metrics, admin API and the routes channels serve.

mod admin;
mod probes;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use admin::{AdminToken, AgentDirectory, DeadLetterQueue};
pub use probes::Readiness;

use crate::metrics::Metrics;

/// Everything the worker's own endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub agents: Arc<dyn AgentDirectory>,
    pub dead_letters: Arc<dyn DeadLetterQueue>,
    pub admin_token: AdminToken,
}

/// The worker's routes merged with those of its channels.
pub fn router(state: HttpState, channels: Vec<Router>) -> Router {
    let own = Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
        .nest("/admin", admin::routes(state.clone()))
        .with_state(state);
    channels.into_iter().fold(own, Router::merge)
}
