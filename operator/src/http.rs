//! The operator's HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// Set once the operator reached the API server; a standby replica (not leading)
    /// is ready too, so a rollout can proceed while another replica leads.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn probes_and_metrics() {
        // reqwest is built without a default crypto provider; main installs ring, and
        // so must a test that builds a client (else it passes only when another test
        // of this binary happened to install it first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let state = HttpState {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(state.clone())).into_future());
        let get = |path: &'static str| async move {
            let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        };

        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(
            get("/readyz").await.0,
            503,
            "ready before reaching the API server"
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(get("/readyz").await.0, 200);

        state
            .metrics
            .observe("agent", Duration::from_millis(20), Some("kube"));
        let (status, text) = get("/metrics").await;
        assert_eq!(status, 200);
        for line in [
            "nexo_operator_reconciles_total{controller=\"agent\",result=\"error\"} 1",
            "nexo_operator_reconcile_errors_total{controller=\"agent\",error=\"kube\"} 1",
            "nexo_operator_reconcile_duration_seconds_count{controller=\"agent\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
