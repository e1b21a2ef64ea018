//! Agents: each one a durable consumer of its route subject, running turns (model +
//! tools) under a concurrency cap and replying on the broker.

mod deltas;
mod runtime;
pub mod turn;

pub use runtime::{AgentInfo, AgentRuntime};
