//! The catalog: the agents and channels a worker runs, read from a file, narrowed to
//! this worker's pool and shard, and reloaded in place when the file changes.
//!
//! - [`source`]: where the catalog comes from, and polling it for changes;
//! - [`selection`]: this worker's share of a catalog (a pure function);
//! - [`components`]: starting and stopping one agent or channel;
//! - [`reconcile`]: making the running components match a selection;
//! - [`live`]: what the HTTP endpoints report of it;
//! - [`reload`]: the loop tying them together.

pub mod components;
pub mod live;
pub mod reconcile;
pub mod reload;
pub mod selection;
pub mod source;

pub use components::{BuildError, Env};
pub use live::Live;
pub use reconcile::Reconciler;
pub use reload::Reloader;
pub use selection::{Shard, ShardError};
pub use source::CatalogSource;
