//! The catalog: the agents and channels a worker runs, read from a file, narrowed to
//! this worker's pool and shard, and reloaded in place when the file changes.
//!
//! - [`source`]: where the catalog comes from, and polling it for changes;
//! - [`selection`]: this worker's share of a catalog (a pure function);
//! - [`shared`]: the worker's parts every component is built with;
//! - [`agent`] and [`channel`]: building, starting and stopping one agent or one
//!   channel instance; [`consumer`]: the durable consumer each of them runs;
//! - [`health`]: what each started component is doing (running, attaching, failed);
//! - [`reconcile`]: making the running components match a selection;
//! - [`live`]: what the HTTP endpoints report of it;
//! - [`reload`]: the loop tying them together.

pub mod agent;
pub mod channel;
mod consumer;
mod error;
pub mod health;
pub mod live;
pub mod reconcile;
pub mod reload;
pub mod selection;
pub mod shared;
pub mod source;
mod tasks;

pub use error::BuildError;
pub use health::Health;
pub use live::Live;
pub use reconcile::Reconciler;
pub use reload::Reloader;
pub use selection::{Shard, ShardError};
pub use shared::Shared;
pub use source::CatalogSource;
