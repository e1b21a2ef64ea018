//! Agents: each one a durable consumer of its route subject, running turns (model +
//! tools) under a concurrency cap and replying on the broker.

mod budget;
mod deltas;
mod runtime;
pub mod turn;

pub use budget::BUDGET_MESSAGE;
pub use runtime::{AgentInfo, AgentRuntime};
