//! The worker's configuration file: runtime settings plus the same agent, channel and
//! extension specs a cluster holds, so one schema serves a laptop and a pod.

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::name::{DEFAULT_NAMESPACE, ResourceKey};
use crate::spec::{AgentSpec, ChannelSpec, ExtensionSpec};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Process-level settings.
    #[serde(default)]
    pub worker: WorkerSettings,
    #[serde(default)]
    pub agents: Vec<Resource<AgentSpec>>,
    #[serde(default)]
    pub channels: Vec<Resource<ChannelSpec>>,
    #[serde(default)]
    pub extensions: Vec<Resource<ExtensionSpec>>,
}

/// A named spec, as a cluster stores it: `name`, optional `namespace`, `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<T> {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub spec: T,
}

impl<T> Resource<T> {
    pub fn key(&self) -> ResourceKey {
        ResourceKey::new(&self.namespace, &self.name)
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerSettings {
    /// Directory for the worker's state (lock file, queues, memory). One worker process
    /// per directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub broker: BrokerSettings,
    /// Seconds in-flight turns get to finish after a shutdown signal.
    #[serde(default = "default_drain_timeout_seconds")]
    pub drain_timeout_seconds: u64,
    #[serde(default)]
    pub admin: AdminSettings,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            http: HttpSettings::default(),
            broker: BrokerSettings::default(),
            drain_timeout_seconds: default_drain_timeout_seconds(),
            admin: AdminSettings::default(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".nexo-data")
}

fn default_drain_timeout_seconds() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the HTTP server (health, metrics, admin, channels).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Which broker connects the worker's components.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", tag = "type", deny_unknown_fields)]
pub enum BrokerSettings {
    /// In-process bus: a single worker, no NATS.
    #[default]
    Local,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminSettings {
    /// Environment variable holding the bearer token for `/admin/*`. While it is unset
    /// or empty, the admin endpoints answer 403.
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token_env: default_admin_token_env(),
        }
    }
}

fn default_admin_token_env() -> String {
    "NEXO_ADMIN_TOKEN".to_owned()
}
