//! The nexo operator: controllers for `Agent`, `Channel`, `Extension` and
//! `WorkerPool`. [`render`], [`scale`] and [`status`] are the pure core (specs and
//! observations in, desired objects, scale steps and status out); the controllers
//! around them only read and apply.

pub mod controller;
pub mod crds;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod render;
pub mod scale;
pub mod status;
