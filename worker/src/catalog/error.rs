//! Why a component of the catalog could not be built.

use nexo_api::ResourceKey;
use nexo_api::report::ResourceKind;

use crate::broker::BrokerError;
use crate::llm::LlmError;
use crate::memory::MemoryError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("agent `{agent}`: {source}")]
    Agent {
        agent: ResourceKey,
        source: LlmError,
    },
    #[error("agent `{agent}`: {source}")]
    Memory {
        agent: ResourceKey,
        source: MemoryError,
    },
    #[error("agent `{agent}`: extension `{extension}` is not in the catalog")]
    MissingExtension {
        agent: ResourceKey,
        extension: String,
    },
    #[error("channel `{channel}`: {source}")]
    Channel {
        channel: ResourceKey,
        source: BrokerError,
    },
}

impl BuildError {
    /// Which resource failed, and why (the error without the resource's name).
    pub fn parts(&self) -> (ResourceKind, &ResourceKey, String) {
        match self {
            BuildError::Agent { agent, source } => (ResourceKind::Agent, agent, source.to_string()),
            BuildError::Memory { agent, source } => {
                (ResourceKind::Agent, agent, source.to_string())
            }
            BuildError::MissingExtension { agent, extension } => (
                ResourceKind::Agent,
                agent,
                format!("extension `{extension}` is not in the catalog"),
            ),
            BuildError::Channel { channel, source } => {
                (ResourceKind::Channel, channel, source.to_string())
            }
        }
    }
}
