//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::HttpState;
use crate::broker::Broker;

/// Ready when the broker is connected, every durable consumer is attached and the
/// worker is not stopping.
pub struct Readiness {
    broker: Arc<dyn Broker>,
    started: AtomicBool,
    detached: Arc<AtomicUsize>,
}

/// A durable consumer the worker waits for: the worker is not ready until it has
/// attached or has been dropped (a consumer stopped by a catalog reload before it
/// ever attached must not keep the worker unready).
pub struct ConsumerAttachment {
    detached: Option<Arc<AtomicUsize>>,
}

impl ConsumerAttachment {
    pub fn attached(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(detached) = self.detached.take() {
            detached.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for ConsumerAttachment {
    fn drop(&mut self) {
        self.release();
    }
}

impl Readiness {
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            started: AtomicBool::new(false),
            detached: Arc::default(),
        }
    }

    /// Counts a consumer that is about to attach.
    pub fn expect_consumer(&self) -> ConsumerAttachment {
        self.detached.fetch_add(1, Ordering::SeqCst);
        ConsumerAttachment {
            detached: Some(self.detached.clone()),
        }
    }

    pub fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::SeqCst);
    }

    /// Reasons the worker is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.broker.is_connected() {
            reasons.push("broker is not connected");
        }
        if self.detached.load(Ordering::SeqCst) > 0 {
            reasons.push("some agents or channels are not attached to the broker yet");
        }
        if !self.started.load(Ordering::SeqCst) {
            reasons.push("agents and channels are not started (or are stopping)");
        }
        reasons
    }
}

pub(super) async fn healthz() -> &'static str {
    "ok"
}

pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    let reasons = state.readiness.not_ready();
    if reasons.is_empty() {
        (StatusCode::OK, axum::Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reasons": reasons })),
        )
            .into_response()
    }
}

pub(super) async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
