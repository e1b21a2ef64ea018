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

/// Stands in for worker pods, which cannot run here: what each worker reports at
/// `GET /catalog`, as a test sets it.
#[derive(Default)]
pub struct WorkerReports(
    std::sync::Mutex<std::collections::HashMap<(String, u32), nexo_api::report::CatalogReport>>,
);

impl WorkerReports {
    /// Worker `ordinal` of `pool` runs `revision`, and cannot run `failed`.
    pub fn set(
        &self,
        pool: &str,
        ordinal: u32,
        revision: &str,
        failed: Vec<nexo_api::report::NotRunning>,
    ) {
        let report = nexo_api::report::CatalogReport {
            revision: revision.to_owned(),
            pool: pool.to_owned(),
            shard: ordinal,
            failed,
            ..Default::default()
        };
        self.0
            .lock()
            .unwrap()
            .insert((pool.to_owned(), ordinal), report);
    }
}

impl WorkerReports {
    /// Worker `ordinal` of `pool` answers `report`.
    pub fn set_report(&self, pool: &str, ordinal: u32, report: nexo_api::report::CatalogReport) {
        self.0
            .lock()
            .unwrap()
            .insert((pool.to_owned(), ordinal), report);
    }

    /// Worker `ordinal` of `pool` runs `revision` and holds the leases of `held`; it
    /// waits for `acquiring` and hands `releasing` off.
    pub fn owning(
        &self,
        pool: &str,
        ordinal: u32,
        revision: &str,
        held: &[u32],
        acquiring: &[u32],
        releasing: &[u32],
    ) {
        let ownership = nexo_api::report::Ownership {
            worker: format!("{pool}-{ordinal}"),
            held: held
                .iter()
                .map(|&partition| nexo_api::report::HeldPartition {
                    partition,
                    epoch: 1,
                })
                .collect(),
            acquiring: acquiring.to_vec(),
            releasing: releasing.to_vec(),
        };
        let report = nexo_api::report::CatalogReport {
            revision: revision.to_owned(),
            pool: pool.to_owned(),
            shard: ordinal,
            ownership: Some(ownership),
            ..Default::default()
        };
        self.set_report(pool, ordinal, report);
    }

    /// Worker `ordinal` of `pool` cannot be asked any more (its pod is gone, or a
    /// network policy is in the way).
    pub fn silence(&self, pool: &str, ordinal: u32) {
        self.0.lock().unwrap().remove(&(pool.to_owned(), ordinal));
    }
}

impl nexo_operator::probe::WorkerProbe for WorkerReports {
    fn report<'a>(
        &'a self,
        pool: &'a nexo_api::crd::WorkerPool,
        ordinal: u32,
    ) -> futures::future::BoxFuture<'a, Option<nexo_api::report::CatalogReport>> {
        let name = kube::ResourceExt::name_any(pool);
        let report = self.0.lock().unwrap().get(&(name, ordinal)).cloned();
        Box::pin(async move { report })
    }
}
