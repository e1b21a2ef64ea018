//! The in-process bus against the shared broker conformance suite.

mod support;

use std::sync::Arc;

use nexo_worker::broker::{Broker, LocalBroker};
use support::conformance;

#[tokio::test]
async fn conformance_suite_on_the_local_bus() {
    conformance::run_all(|| async { Arc::new(LocalBroker::new()) as Arc<dyn Broker> }).await;
}
