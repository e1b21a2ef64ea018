//! The worker's HTTP server: probes, metrics, the catalog report, admin API and the
//! routes of the channels the worker currently serves.

mod admin;
mod admin_memory;
mod catalog;
mod channel_routes;
mod probes;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use admin::{AdminToken, AgentDirectory, DeadLetterQueue};
pub use catalog::{CatalogReport, CatalogView, NotRunning, ResourceKind};
pub use channel_routes::ChannelRoutes;
pub use probes::{ConsumerAttachment, Readiness};

use crate::metrics::Metrics;

/// Everything the worker's own endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub agents: Arc<dyn AgentDirectory>,
    pub catalog: Arc<dyn CatalogView>,
    pub dead_letters: Arc<dyn DeadLetterQueue>,
    pub admin_token: AdminToken,
    pub channels: ChannelRoutes,
}

/// The worker's routes; every other path goes to the channels' routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
        .route("/catalog", get(catalog::catalog))
        .nest("/admin", admin::routes(state.clone()))
        .fallback(channel_routes::serve)
        .with_state(state)
}
