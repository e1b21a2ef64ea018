//! Shared vocabulary of nexo: the resource specs a user declares (`Agent`, `Channel`,
//! `Extension`), the worker's configuration file, the `Envelope` every message travels
//! in, the events agents emit, and the NATS subject names built from them.
//!
//! Pure data and pure functions: no IO, no async. The worker and the operator both
//! depend on this crate, never on each other.

pub mod config;
#[cfg(feature = "kube")]
pub mod crd;
pub mod delta;
pub mod envelope;
pub mod event;
pub mod name;
pub mod partition;
pub mod report;
pub mod spec;
pub mod subject;
pub mod validate;

pub use config::{Catalog, WorkerConfig};
pub use envelope::{Envelope, ErrorKind, ReplyError};
pub use name::ResourceKey;
pub use partition::{PartitionMap, Placement};
