//! Agents: one task per agent with a bounded mailbox and a concurrency cap, running
//! turns (model + tools) and replying on the broker.

mod runtime;
pub mod session;
pub mod turn;

pub use runtime::{AgentInfo, AgentRuntime, ERROR_METADATA};
