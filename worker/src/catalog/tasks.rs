//! Background work of stopped components, awaited in two steps at shutdown.

use tokio::task::JoinSet;

#[derive(Default)]
pub struct Tasks {
    /// Consumers of stopped components finishing their work: awaited before the
    /// outbox is flushed.
    pub draining: JoinSet<()>,
    /// Channels' outbound delivery: runs until the worker closes, after the flush.
    pub delivery: JoinSet<()>,
}

impl Tasks {
    /// Forgets tasks that have finished.
    pub fn reap(&mut self) {
        while self.draining.try_join_next().is_some() {}
        while self.delivery.try_join_next().is_some() {}
    }
}
