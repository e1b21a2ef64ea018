//! Durable publishing: every publish lands in an SQLite outbox first, a drain task
//! sends it in order and deletes it once the broker has it; messages that keep
//! failing end in a dead-letter queue that can be listed, replayed and purged.

mod consumer;
mod drain;
mod queued;
mod store;

pub use consumer::{ConsumerLoop, Handler, Outcome};
pub use drain::{SendError, SendReport, Transport, run_drain};
pub use queued::QueuedBroker;
pub use store::{AfterFailure, DeadLetter, Pending, QueueError, QueueStore};
