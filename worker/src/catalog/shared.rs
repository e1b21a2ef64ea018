//! What every agent and channel of the catalog is built and run with: the worker's
//! broker, stores, settings and lifecycle, handed to each component by reference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nexo_api::config::DeliverySettings;

use super::health::Health;
use crate::broker::{Broker, ConsumeOptions};
use crate::channels::connection::Connections;
use crate::extensions::Extensions;
use crate::lifecycle::Lifecycle;
use crate::llm::SharedModels;
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use crate::queue::QueueStore;
use crate::secrets::{SecretWatch, Secrets};
use crate::tools::Browsers;

/// The worker's parts the catalog's components share.
pub struct Shared {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    /// Dead letters of consumers.
    pub queue: QueueStore,
    pub secrets: Secrets,
    /// Reads the mounted secret files of running components again, to restart those
    /// whose keys were rotated.
    pub secret_watch: SecretWatch,
    /// The worker's data directory; agents keep their memory under `memory/`.
    pub data_dir: PathBuf,
    /// What each component is doing, for the report.
    pub health: Arc<Health>,
    /// Whether the platform channels reach their platforms, for the report.
    pub connections: Arc<Connections>,
    pub delivery: DeliverySettings,
    /// Time running work gets once its consumer is stopped.
    pub drain: Duration,
    /// Consumers and channel intake stop at `Draining`, channels' delivery at
    /// `Closing`.
    pub lifecycle: Lifecycle,
    /// Leases and memory journals, when several workers share the broker (NATS):
    /// agents run only on the lease holder, and their memory moves with them.
    pub ownership: Option<Arc<Ownership>>,
    /// The connected extensions of this worker's agents.
    pub extensions: Arc<Extensions>,
    /// The worker's Chromium, for the agents with a `browser`.
    pub browser: Arc<Browsers>,
    /// The circuit breakers of the model endpoints and the price table, shared by
    /// every agent.
    pub models: Arc<SharedModels>,
}

impl Shared {
    pub(super) fn consume_options(&self) -> ConsumeOptions {
        ConsumeOptions {
            ack_wait: Duration::from_secs(self.delivery.ack_wait_seconds),
        }
    }
}
