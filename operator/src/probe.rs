//! Asking a pool's workers which catalog revision they run. Each worker answers
//! `GET /catalog` (no token needed: names and revision only) at its stable DNS name
//! behind the pool's headless Service.

use std::time::Duration;

use futures::future::BoxFuture;
use kube::ResourceExt;
use nexo_api::crd::WorkerPool;
use serde::Deserialize;

use crate::render::{names, workload};

/// Where the operator learns a worker's running catalog revision.
pub trait WorkerProbe: Send + Sync {
    /// The revision worker `ordinal` of `pool` runs; `None` when it cannot be asked
    /// (not started, unreachable, or a network policy in the way).
    fn revision<'a>(&'a self, pool: &'a WorkerPool, ordinal: u32) -> BoxFuture<'a, Option<String>>;
}

/// Asks the worker pods over HTTP.
pub struct HttpProbe {
    client: reqwest::Client,
}

impl Default for HttpProbe {
    fn default() -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("HTTP client builds"),
        }
    }
}

#[derive(Deserialize)]
struct CatalogReport {
    revision: String,
}

impl WorkerProbe for HttpProbe {
    fn revision<'a>(&'a self, pool: &'a WorkerPool, ordinal: u32) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let name = pool.name_any();
            let url = format!(
                "http://{name}-{ordinal}.{}.{}.svc:{}/catalog",
                names::headless_service(&name),
                pool.namespace().unwrap_or_default(),
                workload::HTTP_PORT
            );
            let response = self.client.get(&url).send().await.ok()?;
            let report: CatalogReport = response.error_for_status().ok()?.json().await.ok()?;
            Some(report.revision)
        })
    }
}
