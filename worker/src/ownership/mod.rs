//! Who runs an agent when several workers share one NATS: partition leases
//! ([`lease`]) decide which worker runs which agents, and each agent's memory lives in
//! a journal and snapshots on JetStream ([`journal`]), so it moves with the agent and a
//! worker that lost an agent cannot commit for it any more. On the local bus (one
//! process) none of this exists: the SQLite file is the memory.
//! See docs/adr/0010-partition-leases-and-memory-journal.md.

pub mod journal;
pub mod lag;
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
    /// The JetStream the leases and journals live in (channels keep state there too).
    pub jetstream: jetstream::Context,
}

impl Ownership {
    /// Starts keeping leases for `pool` as `worker`; returns at once.
    /// `ordinal` is the worker's place in the pool (its shard).
    pub fn start(
        jetstream: jetstream::Context,
        worker: String,
        pool: &str,
        ordinal: u32,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        for change in crate::metrics::OWNERSHIP_CHANGES {
            metrics.ownership_changes.with_label_values(&[change]);
        }
        for step in crate::metrics::MOVE_STEPS {
            metrics.agent_move_duration.with_label_values(&[step]);
        }
        Arc::new(Self {
            leases: PartitionLeases::start(jetstream.clone(), &worker, pool, ordinal, metrics),
            journals: Journals::new(jetstream.clone()),
            jetstream,
            worker,
        })
    }
}
