//! Tool providers outside the worker: MCP servers over stdio or streamable HTTP
//! ([`mcp`]) and NATS extensions ([`nats`]). The worker keeps one [`Connection`] per
//! extension its agents use, whatever number of agents use it; agents find it here by
//! name at the start of each turn, so a changed or restarted extension never restarts
//! an agent, and a tool list that changes reaches the next turn.

mod mcp;
mod nats;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nexo_api::ResourceKey;
use nexo_api::config::Resource;
use nexo_api::report::ExtensionReport;
use nexo_api::spec::{AgentSpec, ExtensionSpec, ExtensionUse};
use nexo_api::validate::extension_tool_name;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::llm::ToolDefinition;
use crate::secrets::Secrets;
use crate::tools::{Tool, ToolAnnotations, ToolContext, ToolError, ToolSource};

/// One tool as an extension describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteTool {
    /// The extension's name for it.
    pub name: String,
    pub description: String,
    /// JSON schema of its arguments.
    pub input_schema: Value,
    pub annotations: ToolAnnotations,
}

/// What a connection can offer right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Listing {
    /// Starting, connecting or listing; no tools yet.
    Starting,
    /// Connected; these are its tools (all of them, before any allow-list).
    Ready(Arc<[RemoteTool]>),
    /// Not connected, and why (the last error). It is tried again.
    Failed(String),
}

/// A live link to one extension. Implementations keep it up in a task of their own
/// (restart a dead process, reconnect, follow `tools/list_changed`), publish what it
/// offers through [`Connection::listing`], and end that task when the token given to
/// them is cancelled.
#[async_trait]
pub trait Connection: Send + Sync {
    fn listing(&self) -> watch::Receiver<Listing>;

    /// Calls `tool` with `arguments`; the text of its result. A failing tool, a
    /// process that died mid-call or a lost connection is an error the model sees.
    /// The caller bounds the time (the agent's tool timeout).
    async fn call(&self, tool: &str, arguments: Value) -> Result<String, ToolError>;
}

/// What a connection is made with.
pub struct ConnectContext {
    pub broker: Arc<dyn Broker>,
    pub secrets: Secrets,
}

/// Opens the connection `spec` describes; it connects in the background.
fn connect(
    key: &ResourceKey,
    spec: &ExtensionSpec,
    context: &ConnectContext,
    stop: CancellationToken,
) -> Arc<dyn Connection> {
    if let Some(stdio) = &spec.stdio {
        mcp::stdio(key, stdio, context, stop)
    } else if let Some(http) = &spec.http {
        mcp::http(key, http, context, stop)
    } else {
        nats::discover(key, context, stop)
    }
}

struct Running {
    spec: ExtensionSpec,
    connection: Arc<dyn Connection>,
    stop: CancellationToken,
}

/// The extensions of this worker's agents, each connected once.
pub struct Extensions {
    running: Mutex<BTreeMap<ResourceKey, Running>>,
    context: ConnectContext,
    stop: CancellationToken,
}

impl Extensions {
    /// Connections end when `stop` is cancelled (stdio processes are killed).
    pub fn new(context: ConnectContext, stop: CancellationToken) -> Self {
        Self {
            running: Mutex::default(),
            context,
            stop,
        }
    }

    /// Connects the extensions of `catalog` that `used` names and that are not
    /// connected as they are; closes those no longer used or changed.
    pub fn apply(&self, catalog: &[Resource<ExtensionSpec>], used: &BTreeSet<ResourceKey>) {
        let mut running = self.running.lock().unwrap();
        running.retain(|key, r| {
            let keep = catalog
                .iter()
                .any(|e| &e.key() == key && e.spec == r.spec && used.contains(key));
            if !keep {
                tracing::info!(extension = %key, "closing extension");
                r.stop.cancel();
            }
            keep
        });
        for extension in catalog {
            let key = extension.key();
            if !used.contains(&key) || running.contains_key(&key) {
                continue;
            }
            tracing::info!(extension = %key, transport = extension.spec.transport(), "connecting extension");
            let stop = self.stop.child_token();
            let connection = connect(&key, &extension.spec, &self.context, stop.clone());
            running.insert(
                key,
                Running {
                    spec: extension.spec.clone(),
                    connection,
                    stop,
                },
            );
        }
    }

    /// Whether `key` is connected or connecting here.
    pub fn contains(&self, key: &ResourceKey) -> bool {
        self.running.lock().unwrap().contains_key(key)
    }

    /// The first extension `agent` names that is not here (not in the catalog).
    pub fn missing<'a>(&self, agent: &'a Resource<AgentSpec>) -> Option<&'a ExtensionUse> {
        agent
            .spec
            .extensions
            .iter()
            .find(|e| !self.contains(&ResourceKey::new(&agent.namespace, &e.name)))
    }

    fn connection(&self, key: &ResourceKey) -> Option<(Arc<dyn Connection>, Vec<String>)> {
        let running = self.running.lock().unwrap();
        let r = running.get(key)?;
        Some((r.connection.clone(), r.spec.allow_tools.clone()))
    }

    /// What `GET /catalog` says about each extension.
    pub fn report(&self) -> Vec<ExtensionReport> {
        let running = self.running.lock().unwrap();
        running
            .iter()
            .map(|(key, r)| {
                let listing = r.connection.listing().borrow().clone();
                let (ready, mut tools, problem) = match listing {
                    Listing::Ready(tools) => (
                        true,
                        tools
                            .iter()
                            .filter(|t| allowed(&r.spec.allow_tools, &t.name))
                            .map(|t| t.name.clone())
                            .collect(),
                        None,
                    ),
                    Listing::Starting => (false, Vec::new(), None),
                    Listing::Failed(reason) => (false, Vec::new(), Some(reason)),
                };
                tools.sort();
                ExtensionReport {
                    name: key.to_string(),
                    transport: r.spec.transport().to_owned(),
                    ready,
                    tools,
                    problem,
                }
            })
            .collect()
    }

    /// Closes every connection (at shutdown).
    pub fn close(&self) {
        for (_, r) in std::mem::take(&mut *self.running.lock().unwrap()) {
            r.stop.cancel();
        }
    }
}

fn allowed(list: &[String], tool: &str) -> bool {
    list.is_empty() || list.iter().any(|t| t == tool)
}

/// The tools one agent takes from one extension: what the extension offers now,
/// narrowed by the extension's `allowTools` and the agent's own list.
pub struct ExtensionTools {
    extensions: Arc<Extensions>,
    key: ResourceKey,
    agent_allows: Vec<String>,
}

impl ExtensionTools {
    pub fn new(extensions: Arc<Extensions>, namespace: &str, used: &ExtensionUse) -> Self {
        Self {
            extensions,
            key: ResourceKey::new(namespace, &used.name),
            agent_allows: used.tools.clone(),
        }
    }
}

impl ToolSource for ExtensionTools {
    fn tools(&self) -> Vec<Arc<dyn Tool>> {
        let Some((connection, extension_allows)) = self.extensions.connection(&self.key) else {
            return Vec::new();
        };
        let Listing::Ready(tools) = connection.listing().borrow().clone() else {
            return Vec::new();
        };
        tools
            .iter()
            .filter(|t| allowed(&extension_allows, &t.name) && allowed(&self.agent_allows, &t.name))
            .map(|t| {
                Arc::new(ExtensionTool {
                    connection: connection.clone(),
                    exposed: extension_tool_name(&self.key.name, &t.name),
                    remote: t.clone(),
                }) as Arc<dyn Tool>
            })
            .collect()
    }
}

/// One tool of an extension, under the name the model sees.
struct ExtensionTool {
    connection: Arc<dyn Connection>,
    exposed: String,
    remote: RemoteTool,
}

#[async_trait]
impl Tool for ExtensionTool {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: self.exposed.clone(),
            description: self.remote.description.clone(),
            parameters: self.remote.input_schema.clone(),
        }
    }

    fn annotations(&self) -> ToolAnnotations {
        self.remote.annotations
    }

    async fn call(
        &self,
        arguments: Value,
        _context: &ToolContext<'_>,
    ) -> Result<String, ToolError> {
        self.connection.call(&self.remote.name, arguments).await
    }
}
