//! Asking a pool's workers what they run. Each worker answers `GET /catalog` (no token
//! needed: names, revision and what it cannot run, never specs or secrets) at its
//! stable DNS name behind the pool's headless Service, which publishes workers that
//! are not ready too: a worker that cannot run part of its share is asked all the same.

use std::time::Duration;

use futures::future::BoxFuture;
use kube::ResourceExt;
use nexo_api::crd::WorkerPool;
use nexo_api::report::CatalogReport;

use crate::render::{names, workload};

/// Where the operator learns what a worker runs.
pub trait WorkerProbe: Send + Sync {
    /// The report of worker `ordinal` of `pool`; `None` when it cannot be asked (not
    /// started, unreachable, or a network policy in the way).
    fn report<'a>(
        &'a self,
        pool: &'a WorkerPool,
        ordinal: u32,
    ) -> BoxFuture<'a, Option<CatalogReport>>;
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

impl WorkerProbe for HttpProbe {
    fn report<'a>(
        &'a self,
        pool: &'a WorkerPool,
        ordinal: u32,
    ) -> BoxFuture<'a, Option<CatalogReport>> {
        Box::pin(async move {
            let name = pool.name_any();
            let url = format!(
                "http://{name}-{ordinal}.{}.{}.svc:{}/catalog",
                names::headless_service(&name),
                pool.namespace().unwrap_or_default(),
                workload::HTTP_PORT
            );
            let response = self.client.get(&url).send().await.ok()?;
            response.error_for_status().ok()?.json().await.ok()
        })
    }
}
