//! nexo worker: one process hosting agents, channels, tools and the broker client.
//! See `docs/architecture.md` (at the repository root) for how the pieces fit; each module documents its part.

pub mod admin_client;
pub(crate) mod agent;
mod app;
pub(crate) mod ask;
pub mod broker;
pub(crate) mod catalog;
pub(crate) mod channels;
pub mod config;
pub(crate) mod extensions;
pub(crate) mod http;
mod json_http;
pub(crate) mod lifecycle;
pub(crate) mod llm;
pub(crate) mod lock;
pub mod memory;
pub mod metrics;
pub(crate) mod ownership;
pub mod queue;
pub mod secrets;
pub(crate) mod serve;
pub mod telemetry;
mod tls;
pub(crate) mod tools;
pub(crate) mod traces;

pub use agent::AgentRuntime;
pub use app::{AppError, Application, Running, shutdown_signal};
pub use catalog::{Shard, ShardError};
pub use llm::SharedModels;

/// The memory journal on JetStream, for `benches/handoff.rs` (it links the crate as a
/// user does; the ownership module stays private).
#[doc(hidden)]
pub mod benchmarks {
    pub use crate::ownership::journal::Journals;
}

/// Entry points for the fuzz targets in `fuzz/`: the parsers of what clients send,
/// without making the channel modules public.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::channels::webchat::fuzz_client_frame;
    pub use crate::channels::webhook::fuzz_post_body;
}

/// The model clients, for `tests/model_streaming.rs`: the production clients driven
/// against a local server speaking each provider's wire format, without making the
/// llm module public.
#[doc(hidden)]
pub mod models {
    pub use crate::llm::{
        ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, MAX_ANSWER_BYTES,
        MAX_EVENT_BYTES, StreamError, ToolCall, ToolDefinition, Usage, from_spec,
    };
}
