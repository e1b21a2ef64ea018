//! `/healthz`, `/readyz` and `/metrics`.
//!
//! `/healthz` (liveness) answers as long as the HTTP server does. `/readyz`
//! (readiness) answers for the pod's ability to take traffic: 200 from the moment the
//! first catalog is applied until shutdown begins. It does not depend on the broker
//! or on each agent: during a NATS outage channels go on accepting into the outbox,
//! and an agent that cannot run is reported (`/catalog` `failed`,
//! `nexo_components_not_running`) while the others serve. Taking the pod out of its
//! Service for either would turn one sick part into an outage of every channel on it.
//! What is degraded is listed in the body, for people and tests.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::HttpState;
use crate::lifecycle::Phase;

pub(super) async fn healthz() -> &'static str {
    "ok"
}

pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    let report = state.catalog.report();
    let mut degraded = Vec::new();
    if !state.broker.is_connected() {
        degraded.push("broker is not connected: messages wait in the outbox".to_owned());
    }
    degraded.extend(
        report
            .failed
            .iter()
            .map(|f| format!("{} {} does not run: {}", f.kind.as_str(), f.name, f.reason)),
    );
    let phase = state.lifecycle.phase();
    let status = if phase == Phase::Serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": status == StatusCode::OK,
        "phase": phase.as_str(),
        "degraded": degraded,
        "attaching": report.attaching,
    });
    (status, axum::Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
