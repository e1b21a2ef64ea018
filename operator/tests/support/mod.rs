//! Helpers shared by the operator's integration tests.

#![allow(dead_code)]

pub mod apiserver;

use std::future::Future;
use std::time::Duration;

/// Polls `check` until it yields a value, failing the test after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stands in for worker pods, which cannot run here: the catalog revision each
/// worker reports, as a test sets it.
#[derive(Default)]
pub struct ReportedRevisions(std::sync::Mutex<std::collections::HashMap<(String, u32), String>>);

impl ReportedRevisions {
    pub fn set(&self, pool: &str, ordinal: u32, revision: &str) {
        self.0
            .lock()
            .unwrap()
            .insert((pool.to_owned(), ordinal), revision.to_owned());
    }
}

impl nexo_operator::probe::WorkerProbe for ReportedRevisions {
    fn revision<'a>(
        &'a self,
        pool: &'a nexo_api::crd::WorkerPool,
        ordinal: u32,
    ) -> futures::future::BoxFuture<'a, Option<String>> {
        let name = kube::ResourceExt::name_any(pool);
        let revision = self.0.lock().unwrap().get(&(name, ordinal)).cloned();
        Box::pin(async move { revision })
    }
}
