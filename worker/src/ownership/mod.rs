//! Who runs an agent when several workers share one NATS: partition leases
//! ([`lease`]) decide which worker runs which agents, and each agent's memory lives in
//! a journal and snapshots on JetStream ([`journal`]), so it moves with the agent and a
//! worker that lost an agent cannot commit for it any more. On the local bus (one
//! process) none of this exists: the SQLite file is the memory.
//! See docs/adr/0010-partition-leases.md.

pub mod journal;
pub mod lease;

use std::sync::Arc;

use async_nats::jetstream;

use crate::metrics::Metrics;
pub use journal::Journals;
pub use lease::{Held, PartitionLeases};

/// A worker's leases and its agents' journals.
pub struct Ownership {
    /// The name this worker holds leases under.
    pub worker: String,
    pub leases: PartitionLeases,
    pub journals: Arc<Journals>,
}

impl Ownership {
    /// Starts keeping leases for `pool` as `worker`; returns at once.
    pub fn start(
        jetstream: jetstream::Context,
        worker: String,
        pool: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            leases: PartitionLeases::start(jetstream.clone(), &worker, pool, metrics),
            journals: Journals::new(jetstream),
            worker,
        })
    }
}
