//! `GET /catalog`: what this worker runs. Open without a token: it lists names and
//! the partitioning, never specs or secrets.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
pub use nexo_api::report::{CatalogReport, NotRunning, ResourceKind};

use super::HttpState;

/// Where the catalog endpoint reads the current report.
pub trait CatalogView: Send + Sync {
    fn report(&self) -> CatalogReport;
}

pub(super) async fn catalog(State(state): State<HttpState>) -> Response {
    axum::Json(state.catalog.report()).into_response()
}
