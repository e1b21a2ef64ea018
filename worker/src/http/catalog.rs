//! `GET /catalog`: what this worker runs. Open without a token: it lists names and
//! the partitioning, never specs or secrets.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::HttpState;

pub(super) async fn catalog(State(state): State<HttpState>) -> Response {
    axum::Json(state.catalog.report()).into_response()
}
