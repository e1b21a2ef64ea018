//! The worker's configuration file: runtime settings plus the same agent, channel and
//! extension specs a cluster holds, so one schema serves a laptop and a pod.

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::name::{DEFAULT_NAMESPACE, ResourceKey};
use crate::spec::{AgentSpec, ChannelSpec, ExtensionSpec, SecretRef};

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

/// The resources a worker pool runs, as the operator writes them into the pool's
/// catalog ConfigMap (`catalog.yaml`). A worker pointed at it with
/// `worker.catalogFile` reloads it in place whenever it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalog {
    /// Identifies this content (a hash, including the referenced Secrets); workers
    /// report the revision they run.
    #[serde(default)]
    pub revision: String,
    /// How the pool spreads agents over its workers. Absent in a hand-written
    /// catalog: the worker's `--shards` (default 1) applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<CatalogPlacement>,
    #[serde(default)]
    pub agents: Vec<Resource<AgentSpec>>,
    #[serde(default)]
    pub channels: Vec<Resource<ChannelSpec>>,
    #[serde(default)]
    pub extensions: Vec<Resource<ExtensionSpec>>,
}

/// Partition count and worker count of a pool (see [`crate::partition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogPlacement {
    pub partitions: u32,
    pub workers: u32,
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
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerSettings {
    /// Directory for the worker's state (lock file, queues, memory). One worker process
    /// per directory.
    pub data_dir: PathBuf,
    pub http: HttpSettings,
    pub broker: BrokerSettings,
    /// Seconds in-flight turns get to finish after a shutdown signal.
    pub drain_timeout_seconds: u64,
    pub admin: AdminSettings,
    /// The worker's agents served to other programs: MCP at `/mcp`, A2A at `/a2a/…`.
    /// Left out when default, so worker configs rendered before it existed (the
    /// operator's, whose hash rolls the pods) stay byte for byte the same.
    #[serde(skip_serializing_if = "ServeSettings::is_default")]
    pub serve: ServeSettings,
    pub delivery: DeliverySettings,
    /// Worker pool this worker belongs to: it runs only agents whose `workerPool`
    /// names it, and channels whose default agent is one of those.
    pub pool: String,
    /// A catalog file (agents, channels, extensions) to run instead of the lists in
    /// this file; watched and reloaded in place. The operator mounts the pool's
    /// catalog ConfigMap here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_file: Option<PathBuf>,
    /// Directory holding the values of `secretKeyRef` references, one file per key
    /// (named by `SecretKeySelector::mounted_file_name`). The operator mounts the
    /// pool's secrets here.
    pub secrets_dir: PathBuf,
    /// The Chromium the agents' browser tools drive.
    #[serde(skip_serializing_if = "BrowserSettings::is_default")]
    pub browser: BrowserSettings,
    /// What the worker's agents share about their models: the circuit breakers of
    /// the model endpoints and the price table.
    #[serde(skip_serializing_if = "ModelSettings::is_default")]
    pub models: ModelSettings,
}

/// Model settings shared by every agent of a worker (`docs/configuration.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSettings {
    /// One breaker per model endpoint (provider, base URL and model), shared by all
    /// agents of the worker that use it.
    pub circuit_breaker: CircuitBreakerSettings,
    /// Prices per million tokens, by model name (as agents' specs write it). They
    /// turn tokens into `nexo_llm_cost_total` and count against `budget.costPerDay`,
    /// in whatever currency the table is written in. A model without a price costs
    /// nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prices: Vec<ModelPrice>,
}

impl ModelSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// When a model endpoint's calls skip it: after `failures` calls in a row failed
/// (each after its retries) the circuit opens and calls go straight to the next
/// model, or fail at once; after `coolDownSeconds` one call is let through, and its
/// success closes the circuit again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Failed calls in a row that open the circuit; 0 never opens it.
    pub failures: u32,
    /// Seconds an open circuit waits before it lets one probe call through.
    pub cool_down_seconds: u64,
}

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            cool_down_seconds: 30,
        }
    }
}

/// What a million tokens of one model cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPrice {
    /// Model name, as agents' `model.model` (or a fallback's) writes it.
    pub model: String,
    /// Per million input tokens not read from the prompt cache.
    #[schemars(range(min = 0))]
    pub input: f64,
    /// Per million output tokens.
    #[schemars(range(min = 0))]
    pub output: f64,
    /// Per million input tokens read from the provider's prompt cache; absent, they
    /// cost as much as other input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cached_input: Option<f64>,
}

impl ModelPrice {
    /// What `input` tokens (of which `cached` from the cache) and `output` tokens cost.
    pub fn cost(&self, input: u64, cached: u64, output: u64) -> f64 {
        let cached = cached.min(input);
        let million = 1_000_000.0;
        ((input - cached) as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + output as f64 * self.output)
            / million
    }
}

/// The Chromium of the browser tools (`docs/browser.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BrowserSettings {
    /// Chromium executable: a path, or a name looked up on `PATH`. Absent: the
    /// `NEXO_CHROMIUM` environment variable, else the first of `chromium`,
    /// `chromium-browser` and `google-chrome` on `PATH`. Looked up at the first
    /// browser call; without one the browser tools answer with an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<PathBuf>,
}

impl BrowserSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            http: HttpSettings::default(),
            broker: BrokerSettings::default(),
            drain_timeout_seconds: default_drain_timeout_seconds(),
            admin: AdminSettings::default(),
            serve: ServeSettings::default(),
            delivery: DeliverySettings::default(),
            pool: default_pool(),
            catalog_file: None,
            secrets_dir: default_secrets_dir(),
            browser: BrowserSettings::default(),
            models: ModelSettings::default(),
        }
    }
}

/// At-least-once delivery: how often a message is tried before it goes to the
/// dead-letter queue, how long a delivery may go unacknowledged, and how much the
/// outbox and the dead-letter queue may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliverySettings {
    /// Attempts (publishing, or handling) before a message is dead-lettered.
    pub max_attempts: u32,
    /// Seconds without an acknowledgement or progress signal after which a delivery
    /// is sent again (to this or another worker).
    pub ack_wait_seconds: u64,
    pub outbox: OutboxLimits,
    pub dead_letters: DeadLetterLimits,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            ack_wait_seconds: default_ack_wait_seconds(),
            outbox: OutboxLimits::default(),
            dead_letters: DeadLetterLimits::default(),
        }
    }
}

/// How much the outbox (messages accepted but not yet taken by the broker) may hold.
/// Once either limit is reached channels' new messages are refused (they answer 503
/// with `Retry-After`) until it drains; replies, events and hand-offs of messages
/// already accepted are still stored, so nothing accepted is dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboxLimits {
    /// Messages waiting to be published, at most.
    pub max_messages: u64,
    /// Payload bytes waiting to be published, at most.
    pub max_bytes: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_messages: default_outbox_max_messages(),
            max_bytes: default_outbox_max_bytes(),
        }
    }
}

/// How many dead letters are kept, and for how long. Older ones, and the oldest
/// beyond the count, are removed (counted by `nexo_dead_letters_removed_total`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterLimits {
    /// Dead letters kept, at most; a new one beyond it removes the oldest.
    pub max_messages: u64,
    /// Seconds a dead letter is kept after it failed.
    pub max_age_seconds: u64,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        Self {
            max_messages: default_dead_letter_max_messages(),
            max_age_seconds: default_dead_letter_max_age_seconds(),
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}

fn default_ack_wait_seconds() -> u64 {
    30
}

/// About a day of traffic of a busy worker during an outage, small next to a disk.
fn default_outbox_max_messages() -> u64 {
    100_000
}

/// 256 MiB of payloads.
fn default_outbox_max_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Enough to investigate a failure; a flood of failures cannot fill the disk.
fn default_dead_letter_max_messages() -> u64 {
    10_000
}

/// A week: past a weekend without anyone looking.
fn default_dead_letter_max_age_seconds() -> u64 {
    7 * 24 * 60 * 60
}

fn default_pool() -> String {
    crate::name::DEFAULT_POOL.to_owned()
}

fn default_secrets_dir() -> PathBuf {
    PathBuf::from("/var/run/nexo/secrets")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".nexo-data")
}

fn default_drain_timeout_seconds() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the HTTP server (health, metrics, admin, channels).
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
// `deny_unknown_fields` applies to the struct variant `Local {}`: without it a unit
// variant would accept and ignore any other key (`{type: local, urls: [...]}`).
// `Nats` refuses unknown keys through `NatsSettings`.
#[serde(rename_all = "lowercase", tag = "type", deny_unknown_fields)]
// Read once at start; boxing would only make the config awkward to build.
#[allow(clippy::large_enum_variant)]
pub enum BrokerSettings {
    /// In-process bus: a single worker, no NATS. Takes no other key.
    Local {},
    /// A NATS server or cluster (JetStream enabled), shared by every worker of a pool.
    Nats(NatsSettings),
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self::Local {}
    }
}

/// How to reach NATS. At most one of `user`/`password`, `token`, `nkeySeed` and
/// `credentialsFile` is set; secrets are references (an environment variable, or a
/// Secret key mounted under `worker.secretsDir`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URLs (`nats://host:4222`, `tls://host:4222`); the client fails over
    /// between them and reconnects with backoff.
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretRef>,
    /// NKey seed (`SU…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<SecretRef>,
    /// A `.creds` file holding a user JWT and its NKey seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// TLS; when present, TLS is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
    /// Seconds to wait for each connection attempt.
    pub connect_timeout_seconds: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            urls: default_nats_urls(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            credentials_file: None,
            tls: None,
            connect_timeout_seconds: default_connect_timeout_seconds(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of CA certificates to trust, in addition to the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

fn default_nats_urls() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".to_owned()]
}

fn default_connect_timeout_seconds() -> u64 {
    5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminSettings {
    /// Environment variable holding the bearer token for `/admin/*`. While it is unset
    /// or empty, the admin endpoints answer 403.
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

/// Serving the worker's agents to other programs (MCP clients, A2A agents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServeSettings {
    /// Environment variable holding the bearer token for `/mcp`, `/a2a/*` and
    /// `/.well-known/agent-card.json`. While it is unset or empty, those endpoints
    /// answer 403.
    pub token_env: String,
    /// Seconds a served call waits for the agent's answer.
    pub answer_timeout_seconds: u64,
    /// The base URL callers reach this worker at (`https://agents.example.com`), named
    /// in the A2A agent cards. Unset, a card names the address the request for it
    /// was sent to (its `Host` header, over `http`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

impl ServeSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            token_env: "NEXO_SERVE_TOKEN".to_owned(),
            answer_timeout_seconds: 120,
            public_url: None,
        }
    }
}
