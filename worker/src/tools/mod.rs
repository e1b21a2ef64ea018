//! Tools an agent's model may call. Each agent gets a [`ToolSet`] built from its spec:
//! built-ins and one delegation tool per delegate agent.

mod builtin;
mod delegate;
mod memory;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nexo_api::spec::AgentSpec;
use nexo_api::{Envelope, ResourceKey};
use serde_json::Value;

use crate::broker::Broker;
use crate::llm::ToolDefinition;

pub use delegate::Delegate;
pub use memory::memory_tools;

/// What a tool knows about the turn that called it.
pub struct ToolContext<'a> {
    /// The agent whose model asked for the call.
    pub agent: &'a ResourceKey,
    /// The message the turn answers.
    pub message: &'a Envelope,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("no tool named `{0}`")]
    Unknown(String),
    #[error("{0}")]
    Failed(String),
    #[error("the tool did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the tool's result has {size} bytes, more than the {limit} this agent takes; ask for less"
    )]
    TooLarge { size: usize, limit: usize },
}

#[async_trait]
pub trait Tool: Send + Sync {
    fn definition(&self) -> ToolDefinition;
    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError>;
}

/// The tools one agent may call, by name, and the bounds of one call.
#[derive(Clone)]
pub struct ToolSet {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    timeout: Duration,
    output_bytes: usize,
}

impl Default for ToolSet {
    fn default() -> Self {
        let limits = nexo_api::spec::AgentLimits::default();
        Self {
            tools: BTreeMap::new(),
            timeout: Duration::from_secs(limits.tool_timeout_seconds),
            output_bytes: limits.tool_output_bytes as usize,
        }
    }
}

impl ToolSet {
    /// Built-ins named in the spec plus `ask_<delegate>` for each delegate.
    pub fn for_agent(agent: &ResourceKey, spec: &AgentSpec, broker: Arc<dyn Broker>) -> Self {
        let mut set = Self {
            timeout: Duration::from_secs(spec.limits.tool_timeout_seconds),
            output_bytes: spec.limits.tool_output_bytes as usize,
            ..Self::default()
        };
        for builtin in &spec.tools {
            set.insert(builtin::tool(*builtin));
        }
        let timeout = Duration::from_secs(spec.limits.delegate_timeout_seconds);
        for delegate in &spec.delegates {
            let target = ResourceKey::new(&agent.namespace, delegate);
            set.insert(Arc::new(Delegate::new(target, broker.clone(), timeout)));
        }
        set
    }

    pub fn insert(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.definition().name, tool);
    }

    /// Whether the set has a tool called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The names of the tools, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    pub fn definitions(&self) -> Vec<ToolDefinition> {
        self.tools.values().map(|t| t.definition()).collect()
    }

    pub async fn call(
        &self,
        name: &str,
        arguments: Value,
        context: &ToolContext<'_>,
    ) -> Result<String, ToolError> {
        let tool = self
            .tools
            .get(name)
            .ok_or_else(|| ToolError::Unknown(name.to_owned()))?;
        let output = tokio::time::timeout(self.timeout, tool.call(arguments, context))
            .await
            .map_err(|_| ToolError::Timeout(self.timeout))??;
        if output.len() > self.output_bytes {
            return Err(ToolError::TooLarge {
                size: output.len(),
                limit: self.output_bytes,
            });
        }
        Ok(output)
    }
}
