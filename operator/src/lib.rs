//! The nexo operator: controllers for `Agent`, `Channel`, `Extension` and
//! `WorkerPool`. [`render`] and [`status`] are the pure core (specs in, desired
//! objects and status out); the controllers around them only read and apply.

pub mod controller;
pub mod crds;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod render;
pub mod status;
