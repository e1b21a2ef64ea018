//! `GET /catalog`: what this worker runs. Open without a token: it lists names and
//! the partitioning, never specs or secrets.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::HttpState;

/// The catalog revision a worker runs and its share of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogReport {
    pub revision: String,
    pub pool: String,
    pub shard: u32,
    /// Workers the pool's agents are spread over (the catalog's `placement.workers`
    /// when it has one, else `--shards`).
    pub shards: u32,
    pub partitions: u32,
    /// `namespace/name` of every agent this worker runs, sorted.
    pub agents: Vec<String>,
    /// `namespace/name` of every channel this worker serves, sorted.
    pub channels: Vec<String>,
    /// Agents and channels of this worker's share that could not be built, with why
    /// (a missing API key, say); the rest runs.
    pub failed: Vec<String>,
}

/// Where the catalog endpoint reads the current report.
pub trait CatalogView: Send + Sync {
    fn report(&self) -> CatalogReport;
}

pub(super) async fn catalog(State(state): State<HttpState>) -> Response {
    axum::Json(state.catalog.report()).into_response()
}
