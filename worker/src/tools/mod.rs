//! Tools an agent's model may call. Each agent gets a [`ToolSet`] built from its spec:
//! built-ins, one delegation tool per delegate agent, the memory tools, the browser
//! tools, and the tools of its extensions ([`ToolSource`]s, whose lists change while the agent runs). A
//! turn works on [`ToolSet::for_turn`]: the tools as they are when it starts.

mod browser;
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

pub(crate) use browser::{Browsers, browser_tools};
pub use delegate::Delegate;
pub(crate) use delegate::{ask_description, ask_parameters, message_argument};
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

/// What a tool says about its effects (MCP's tool annotations). They are hints from
/// the tool's author, kept with the tool for policies (confirmation before a
/// destructive call, say); nothing enforces them yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolAnnotations {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destructive_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_world_hint: Option<bool>,
}

#[async_trait]
pub trait Tool: Send + Sync {
    fn definition(&self) -> ToolDefinition;
    fn annotations(&self) -> ToolAnnotations {
        ToolAnnotations::default()
    }
    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError>;
}

/// Tools that come and go while an agent runs: an extension's current list.
pub trait ToolSource: Send + Sync {
    fn tools(&self) -> Vec<Arc<dyn Tool>>;
}

/// The tools one agent may call, by name, and the bounds of one call.
#[derive(Clone)]
pub struct ToolSet {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    sources: Vec<Arc<dyn ToolSource>>,
    timeout: Duration,
    output_bytes: usize,
}

impl Default for ToolSet {
    fn default() -> Self {
        let limits = nexo_api::spec::AgentLimits::default();
        Self {
            tools: BTreeMap::new(),
            sources: Vec::new(),
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

    /// Adds tools whose list may change; [`ToolSet::for_turn`] reads it.
    pub fn add_source(&mut self, source: Arc<dyn ToolSource>) {
        self.sources.push(source);
    }

    /// The tools as they are now, for one turn: a tool an extension drops during the
    /// turn stays callable (and fails if the extension refuses), one it adds waits for
    /// the next turn. A source's tool never replaces a tool of the agent's own.
    pub fn for_turn(&self) -> ToolSet {
        let mut tools = self.tools.clone();
        for source in &self.sources {
            for tool in source.tools() {
                tools.entry(tool.definition().name).or_insert(tool);
            }
        }
        ToolSet {
            tools,
            sources: Vec::new(),
            timeout: self.timeout,
            output_bytes: self.output_bytes,
        }
    }

    /// Whether the set has a tool called `name`; for a source's tools, ask the
    /// snapshot of [`ToolSet::for_turn`].
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The names of the tools, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// The tools that say something about their effects, with what they say.
    pub fn annotations(&self) -> BTreeMap<String, ToolAnnotations> {
        self.tools
            .iter()
            .map(|(name, tool)| (name.clone(), tool.annotations()))
            .filter(|(_, a)| *a != ToolAnnotations::default())
            .collect()
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
