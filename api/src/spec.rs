//! Specs of the resources a user declares. The same types back the Kubernetes custom
//! resources and the entries of a local worker config file.

// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy reads it as a
// duplicated attribute.
#![cfg_attr(feature = "kube", allow(clippy::duplicated_attributes))]

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An LLM agent: which model it talks to, what it is told, which tools and other
/// agents it may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "nexo.dev",
        version = "v1alpha1",
        kind = "Agent",
        namespaced,
        status = "crate::crd::AgentStatus",
        shortname = "ag",
        category = "nexo",
        doc = "An LLM agent run by a nexo worker pool.",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(name = "Pool", type_ = "string", json_path = ".spec.workerPool"),
        printcolumn(
            name = "Worker",
            type_ = "integer",
            json_path = ".status.placement.worker"
        ),
        printcolumn(
            name = "Partition",
            type_ = "integer",
            json_path = ".status.placement.partition",
            priority = "1"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        ),
    )
)]
pub struct AgentSpec {
    /// The model that answers for this agent.
    pub model: ModelSpec,
    /// Instructions sent as the system prompt of every turn.
    #[serde(default)]
    pub system_prompt: String,
    /// Names of agents (same namespace) this agent may delegate to. Each one becomes a
    /// tool `ask_<name>` that sends the question to that agent and returns its answer.
    #[serde(default)]
    pub delegates: Vec<String>,
    /// Built-in tools this agent may call.
    #[serde(default)]
    pub tools: Vec<BuiltinTool>,
    /// Extensions (same namespace) whose tools this agent may call, each with an
    /// optional allow-list. A tool reaches the model as `<extension>__<tool>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<ExtensionUse>,
    /// A headless browser the model drives through the `browser_*` tools; absent,
    /// the agent has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<BrowserSpec>,
    /// Concurrency and step limits.
    #[serde(default)]
    pub limits: AgentLimits,
    /// Conversation memory.
    #[serde(default)]
    pub memory: MemorySpec,
    /// Tokens and cost the agent may spend per UTC day; absent, no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    /// Worker pool that runs this agent (in a local config: the pool named by
    /// `worker.pool`). Defaults to `default`.
    #[serde(default = "defaults::worker_pool")]
    pub worker_pool: String,
    /// A suspended agent is not run; work sent to it waits in the broker until it is
    /// resumed.
    #[serde(default)]
    pub suspend: bool,
    /// What this agent's traces record, when the worker exports traces.
    #[serde(default, skip_serializing_if = "ObservabilitySpec::is_default")]
    pub observability: ObservabilitySpec,
}

/// What an agent's traces record. Model spans always carry the model, token counts,
/// finish reasons and errors; what was said only when `recordContent` is on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservabilitySpec {
    /// Record the system prompt, the messages sent to the model and its answers
    /// (tool calls and results included) on the model spans, as the GenAI semantic
    /// conventions' `gen_ai.system_instructions`, `gen_ai.input.messages` and
    /// `gen_ai.output.messages`. Off by default: conversations may hold personal
    /// data, and whoever reads the traces would read them too.
    pub record_content: bool,
}

impl ObservabilitySpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// An extension an agent uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionUse {
    /// Name of the Extension (same namespace).
    pub name: String,
    /// Tools of the extension this agent may call, as the extension names them;
    /// empty means every tool the extension offers (after its own `allowTools`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

/// The browser tool: headless Chromium over the DevTools protocol, started when the
/// model first asks for it and closed when idle. Each agent has a profile of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BrowserSpec {
    /// Hosts the browser may load anything from: `example.com` allows that host and
    /// its subdomains. Every other request (pages, scripts, images) is refused.
    pub allow_domains: Vec<String>,
    /// Pages (tabs) open at the same time for this agent.
    pub max_pages: u32,
    /// Seconds one browser action (load, click, fill, read) may take.
    pub action_timeout_seconds: u64,
    /// Seconds without a browser call after which the agent's pages are closed.
    pub idle_seconds: u64,
}

impl Default for BrowserSpec {
    fn default() -> Self {
        Self {
            allow_domains: Vec::new(),
            max_pages: 2,
            action_timeout_seconds: 30,
            idle_seconds: 300,
        }
    }
}

/// Names of the tools an agent with a `browser` gets.
pub const BROWSER_TOOLS: [&str; 5] = [
    "browser_navigate",
    "browser_read",
    "browser_click",
    "browser_fill",
    "browser_screenshot",
];

/// Tools that ship with the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinTool {
    /// Returns the current UTC time in RFC 3339 form.
    CurrentTime,
}

impl BuiltinTool {
    pub fn name(self) -> &'static str {
        match self {
            BuiltinTool::CurrentTime => "current_time",
        }
    }
}

/// Bounds that keep one agent from starving the others on a worker. Work waiting for
/// an agent stays in the broker (JetStream, or the outbox) until a turn can start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentLimits {
    /// Turns this agent runs at the same time.
    pub max_concurrency: u32,
    /// Model calls in one turn (each tool round trip is one more step).
    pub max_steps: u32,
    /// Seconds to wait for a delegated agent's answer.
    pub delegate_timeout_seconds: u64,
    /// Seconds one tool call may take; a call that takes longer is a tool error the
    /// model sees (the turn goes on). A delegation waits for the shorter of this and
    /// `delegateTimeoutSeconds`.
    pub tool_timeout_seconds: u64,
    /// Bytes a tool's result may have; a longer result is a tool error the model sees
    /// (it can ask for less), not a prompt that outgrows the model's context.
    pub tool_output_bytes: u32,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_concurrency: 4,
            max_steps: 8,
            delegate_timeout_seconds: 60,
            tool_timeout_seconds: 60,
            tool_output_bytes: 65_536,
        }
    }
}

/// Memory of an agent: the recent turns of each conversation (short-term, kept on disk
/// so they survive a restart) and a long-term store of facts and past turns searched
/// by keyword and by vector similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct MemorySpec {
    /// Past turns (a user message and the agent's answer) of a conversation sent back
    /// to the model with each new message.
    pub history_turns: u32,
    /// Estimated tokens (4 characters each) the history of one conversation may use;
    /// the oldest turns beyond it are dropped or summarised like those beyond
    /// `historyTurns`. 0 means no token bound.
    pub history_tokens: u32,
    /// What happens to turns that fall out of the history: `drop` forgets them,
    /// `summarize` folds them into a short extractive summary sent before the history.
    pub history_overflow: HistoryOverflow,
    /// The long-term store: facts and past turns recalled into the prompt.
    pub long_term: LongTermMemorySpec,
}

impl Default for MemorySpec {
    fn default() -> Self {
        Self {
            history_turns: 20,
            history_tokens: 4000,
            history_overflow: HistoryOverflow::default(),
            long_term: LongTermMemorySpec::default(),
        }
    }
}

impl MemorySpec {
    /// Whether the model is offered the memory tools ([`MEMORY_TOOLS`]).
    pub fn tools_enabled(&self) -> bool {
        self.long_term.enabled && self.long_term.tools
    }
}

/// Names of the memory tools. The design calls them `memory.remember` and so on, but
/// OpenAI and Anthropic accept only `[a-zA-Z0-9_-]` in tool names.
pub const MEMORY_TOOLS: [&str; 3] = ["memory_remember", "memory_search", "memory_forget"];

/// What happens to turns that no longer fit in a conversation's history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HistoryOverflow {
    /// Forget them.
    #[default]
    Drop,
    /// Keep the first sentence of each in a bounded summary sent before the history.
    Summarize,
}

/// The per-agent long-term memory: a SQLite file with a keyword (FTS5) and a vector
/// (sqlite-vec) index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LongTermMemorySpec {
    /// Whether the agent has a long-term memory at all. Without it nothing is recalled,
    /// recorded or offered as a memory tool; the conversation history is kept anyway.
    pub enabled: bool,
    /// Store every answered turn (the user's message and the answer) as a memory.
    pub record_turns: bool,
    /// Offer the model the tools `memory_remember`, `memory_search` and
    /// `memory_forget`.
    pub tools: bool,
    /// Memories kept at most; the oldest are deleted beyond it.
    pub max_items: u64,
    /// Days a memory is kept; 0 keeps memories until `maxItems` pushes them out.
    pub max_age_days: u32,
    /// How memories are recalled into the prompt of each turn.
    pub recall: RecallSpec,
    /// What turns text into vectors.
    pub embedder: EmbedderSpec,
}

impl Default for LongTermMemorySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            record_turns: true,
            tools: true,
            max_items: 100_000,
            max_age_days: 0,
            recall: RecallSpec::default(),
            embedder: EmbedderSpec::default(),
        }
    }
}

/// Recall of memories into the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RecallSpec {
    /// `keyword` (FTS5 full-text), `vector` (nearest embeddings) or `hybrid` (both,
    /// merged by reciprocal rank fusion).
    pub mode: RecallMode,
    /// Memories recalled per turn at most; 0 recalls nothing into the prompt.
    pub k: u32,
    /// Estimated tokens (4 characters each) the recalled memories may add to the
    /// prompt; memories that do not fit are left out.
    pub token_budget: u32,
}

impl Default for RecallSpec {
    fn default() -> Self {
        Self {
            mode: RecallMode::default(),
            k: 5,
            token_budget: 512,
        }
    }
}

/// How memories are searched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RecallMode {
    /// Full-text match on words (FTS5, BM25 ranking).
    Keyword,
    /// Nearest neighbours of the query's embedding.
    Vector,
    /// Keyword and vector results merged by reciprocal rank fusion.
    #[default]
    Hybrid,
}

/// The embedding model of the long-term memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbedderSpec {
    /// `hashing`: offline feature hashing of words and character trigrams (lexical
    /// similarity, not meaning); `openai`: any OpenAI-compatible `/embeddings` API
    /// (OpenAI, Ollama, vLLM).
    pub provider: EmbedderProvider,
    /// Length of the vectors. For `openai` it must be the size the model returns
    /// (384 for all-MiniLM-L6-v2, 768 for nomic-embed-text, 1536 for
    /// text-embedding-3-small); a mismatch fails the embedding with that message.
    pub dimensions: u32,
    /// Embedding model name (`text-embedding-3-small`, `nomic-embed-text`); required
    /// for `openai`.
    pub model: String,
    /// API base URL for `openai`; the worker posts to `<baseUrl>/embeddings`. Defaults
    /// to `https://api.openai.com/v1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Where the API key comes from (optional: Ollama and vLLM need none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretRef>,
    /// Seconds one embedding request may take.
    pub timeout_seconds: u64,
}

impl Default for EmbedderSpec {
    fn default() -> Self {
        Self {
            provider: EmbedderProvider::default(),
            dimensions: 384,
            model: String::new(),
            base_url: None,
            api_key: None,
            timeout_seconds: 30,
        }
    }
}

/// Where embeddings come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EmbedderProvider {
    /// Offline feature hashing: no network, lexical rather than semantic.
    #[default]
    Hashing,
    /// An OpenAI-compatible embeddings API.
    Openai,
}

/// Where OpenAI-compatible requests (chat completions, embeddings) go when a spec
/// names no `baseUrl`.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

// The same type describes a fallback model, with `NoFallbacks` in place of the list:
// a CRD schema cannot be recursive, and one struct keeps the fields written once
// (`#[serde(flatten)]` would lose `deny_unknown_fields`).
/// Which LLM answers, and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    bound(
        serialize = "Fallbacks: FallbackList + Serialize",
        deserialize = "Fallbacks: FallbackList + Deserialize<'de>"
    )
)]
#[schemars(transform = without_nested_fallbacks, bound = "Fallbacks: FallbackList + JsonSchema")]
pub struct ModelSpec<Fallbacks = Vec<FallbackModelSpec>> {
    /// API the model is reached through: `openai` (any OpenAI-compatible server),
    /// `anthropic`, or `scripted` (offline, deterministic replies from `script`).
    pub provider: ModelProvider,
    /// Model name as the provider knows it (`gpt-4o-mini`, `claude-sonnet-4-5`,
    /// `llama3.2`). Required except for `scripted`.
    #[serde(default)]
    pub model: String,
    /// API base URL. Defaults: `https://api.openai.com/v1` for `openai`,
    /// `https://api.anthropic.com` for `anthropic`. Point `openai` at Ollama, vLLM or
    /// OpenRouter by changing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Where the API key comes from. Keys are never written in the spec itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretRef>,
    /// Seconds to wait for the model's answer to start, and then for each next
    /// event of its stream (answers are streamed, so a long one may take longer in
    /// all while its events keep coming).
    #[serde(default = "defaults::model_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Retries after a rate limit (429), a server error (5xx) or a connection failure,
    /// with exponential backoff.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// Upper bound on tokens generated per model call.
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature; the provider's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Rules of the `scripted` provider, tried in order; the first that matches answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub script: Vec<ScriptRule>,
    /// Models tried in order, each call on its own, when the one before fails with a
    /// rate limit (429), a server error (5xx), a time-out or a connection failure
    /// after its retries, or while its endpoint's circuit breaker is open. Other
    /// failures (a refused request, a missing key) are answered as they are. Each
    /// entry takes the fields of `model` except `fallbacks`.
    #[serde(default, skip_serializing_if = "FallbackList::is_empty")]
    pub fallbacks: Fallbacks,
}

/// A model tried when the agent's model (or the fallback before it) fails.
pub type FallbackModelSpec = ModelSpec<NoFallbacks>;

/// What a [`ModelSpec`] may hold as its fallbacks: a list, or nothing at all.
pub trait FallbackList: Default {
    fn is_empty(&self) -> bool;
}

impl FallbackList for Vec<FallbackModelSpec> {
    fn is_empty(&self) -> bool {
        <[_]>::is_empty(self)
    }
}

/// The fallbacks of a fallback model: none. Reads only an empty list, so a nested
/// `fallbacks` is refused with a sentence saying where the models go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoFallbacks;

impl FallbackList for NoFallbacks {
    fn is_empty(&self) -> bool {
        true
    }
}

impl Serialize for NoFallbacks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(std::iter::empty::<()>())
    }
}

impl<'de> Deserialize<'de> for NoFallbacks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<serde::de::IgnoredAny>::deserialize(deserializer)?;
        if entries.is_empty() {
            Ok(NoFallbacks)
        } else {
            Err(serde::de::Error::custom(
                "a fallback model has no fallbacks of its own: list every fallback, in \
                 order, under the agent's `model.fallbacks`",
            ))
        }
    }
}

impl JsonSchema for NoFallbacks {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NoFallbacks".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "array", "maxItems": 0, "items": {"type": "string"}})
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Leaves `fallbacks` out of a fallback model's schema (it can only be empty there).
fn without_nested_fallbacks(schema: &mut schemars::Schema) {
    let nested = schema
        .get("properties")
        .and_then(|p| p.get("fallbacks"))
        .and_then(|f| f.get("maxItems"))
        == Some(&serde_json::json!(0));
    if nested
        && let Some(properties) = schema
            .get_mut("properties")
            .and_then(serde_json::Value::as_object_mut)
    {
        properties.remove("fallbacks");
    }
}

impl<Fallbacks> ModelSpec<Fallbacks> {
    /// The same model with other fallbacks (a fallback entry as a model of its own).
    pub fn with_fallbacks<Other>(self, fallbacks: Other) -> ModelSpec<Other> {
        let ModelSpec {
            provider,
            model,
            base_url,
            api_key,
            timeout_seconds,
            max_retries,
            max_tokens,
            temperature,
            script,
            fallbacks: _,
        } = self;
        ModelSpec {
            provider,
            model,
            base_url,
            api_key,
            timeout_seconds,
            max_retries,
            max_tokens,
            temperature,
            script,
            fallbacks,
        }
    }

    /// The name metrics and events use for this model: its `model`, or the provider's
    /// name for a model without one (`scripted`).
    pub fn label(&self) -> &str {
        if self.model.is_empty() {
            self.provider.as_str()
        } else {
            &self.model
        }
    }
}

impl ModelSpec {
    /// The agent's model and its fallbacks, in the order they are tried.
    pub fn chain(&self) -> Vec<ModelSpec<NoFallbacks>> {
        std::iter::once(self.clone().with_fallbacks(NoFallbacks))
            .chain(self.fallbacks.iter().cloned())
            .collect()
    }
}

/// Spending limits of an agent per UTC day. Once a limit is reached, the agent's
/// next turns are refused (an error reply, no model call) until the day ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// Tokens (input, cached input included, plus output) the agent's model calls may
    /// use per UTC day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Cost the agent's model calls may reach per UTC day, in the currency of the
    /// worker's price table (`worker.models.prices`); models without a price cost
    /// nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_day: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelProvider {
    /// OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, OpenRouter, …).
    Openai,
    /// Anthropic Messages API.
    Anthropic,
    /// Deterministic offline replies from `script`; no network, no key.
    Scripted,
}

impl ModelProvider {
    /// The name a spec writes.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelProvider::Openai => "openai",
            ModelProvider::Anthropic => "anthropic",
            ModelProvider::Scripted => "scripted",
        }
    }
}

/// One rule of a scripted model.
///
/// A rule matches when the latest user message contains `contains` (case-insensitive;
/// a rule without it always matches). If it names a `toolCall`, the model first calls
/// that tool and then answers with `reply`; otherwise it answers with `reply` at once.
/// In `reply` and in string arguments, the placeholder `input` in double curly braces
/// stands for the user's message and `tool_result` for the tool's output. (Spelled out
/// here because these docs become CRD descriptions, which Helm templates render.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptRule {
    /// Text the latest user message must contain (case-insensitive) for this rule to
    /// answer; a rule without it always matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// A tool to call before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call: Option<ScriptToolCall>,
    /// The answer. Placeholders in double curly braces: `input` (the user's message),
    /// `tool_result` (the tool's output), `history` (the user's earlier messages in the
    /// conversation, joined by ` | `).
    pub reply: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptToolCall {
    /// Name of a tool available to the agent (`current_time`, `ask_<delegate>`).
    pub name: String,
    /// JSON arguments of the call; string values may use the `input` placeholder.
    #[serde(default)]
    #[schemars(schema_with = "free_form_object")]
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

/// Any JSON object. Kubernetes wants this spelled with
/// `x-kubernetes-preserve-unknown-fields` rather than `additionalProperties: true`.
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "JSON arguments of the call; string values may use the `input` placeholder."
    })
}

/// A reference to a secret value; the value itself never appears in a spec. Exactly
/// one of `env` and `secretKeyRef` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.env) != has(self.secretKeyRef)",
    "message": "exactly one of env or secretKeyRef must be set"
}]))]
pub struct SecretRef {
    /// Name of an environment variable of the worker process holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A key of a Kubernetes Secret in the resource's namespace. The operator mounts
    /// it into the pool's workers, which read it from `worker.secretsDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
}

impl SecretRef {
    /// A reference to an environment variable.
    pub fn env(name: impl Into<String>) -> Self {
        Self {
            env: Some(name.into()),
            secret_key_ref: None,
        }
    }

    /// A reference to a key of a Kubernetes Secret.
    pub fn secret_key(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            env: None,
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
            }),
        }
    }
}

/// One key of a Kubernetes Secret.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeySelector {
    /// Name of the Secret (same namespace as the resource).
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

impl SecretKeySelector {
    /// File name under `worker.secretsDir` that holds this key's value. The operator
    /// writes every key a pool needs into one Secret mounted there; a hash keeps the
    /// names unambiguous and valid as Secret data keys whatever the inputs are.
    pub fn mounted_file_name(&self) -> String {
        let hash = xxhash_rust::xxh3::xxh3_64(format!("{}\0{}", self.name, self.key).as_bytes());
        format!("secret-{hash:016x}")
    }
}

/// A messaging channel instance: where users talk to agents. Exactly one of the
/// per-type blocks (`webchat`, `webhook`, `telegram`, `whatsapp`, `slack`) is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.webchat), has(self.webhook), has(self.telegram), has(self.whatsapp), has(self.slack)].filter(x, x).size() == 1",
    "message": "exactly one of webchat, webhook, telegram, whatsapp or slack must be set"
}]))]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "nexo.dev",
        version = "v1alpha1",
        kind = "Channel",
        namespaced,
        status = "crate::crd::ChannelStatus",
        shortname = "ch",
        category = "nexo",
        doc = "Where users talk to agents: a web chat page, a webhook, …",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(name = "Agent", type_ = "string", json_path = ".spec.defaultAgent"),
        printcolumn(name = "Pool", type_ = "string", json_path = ".status.pool"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        ),
    )
)]
pub struct ChannelSpec {
    /// Agent (same namespace) that receives this channel's messages no route matches.
    /// The channel is served by every worker of that agent's pool.
    pub default_agent: String,
    /// Rules that send some messages to another agent of the default agent's pool:
    /// the first rule that matches a message wins; a message none matches goes to
    /// `defaultAgent`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub routes: Vec<ChannelRoute>,
    /// A suspended channel is not served (its endpoints answer 404).
    #[serde(default)]
    pub suspend: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webchat: Option<WebchatSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram: Option<TelegramSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whatsapp: Option<WhatsappSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackSpec>,
}

/// The type of a channel, as it appears in subjects and envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelType {
    Webchat,
    Webhook,
    Telegram,
    Whatsapp,
    Slack,
}

impl ChannelType {
    /// Whether the channel talks to a platform's API (sends answers to it, polls it or
    /// registers a webhook with it): its answers are delivered durably, and it reports
    /// whether it reaches the platform (the Channel's `Connected` condition).
    pub fn is_platform(self) -> bool {
        match self {
            ChannelType::Webchat | ChannelType::Webhook => false,
            ChannelType::Telegram | ChannelType::Whatsapp | ChannelType::Slack => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::Webchat => "webchat",
            ChannelType::Webhook => "webhook",
            ChannelType::Telegram => "telegram",
            ChannelType::Whatsapp => "whatsapp",
            ChannelType::Slack => "slack",
        }
    }
}

/// Messages a [`RouteMatch`] matches go to `agent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelRoute {
    /// An agent of the same namespace and pool as the channel's default agent.
    pub agent: String,
    #[serde(rename = "match")]
    pub when: RouteMatch,
}

/// What a message must be to match a route: every field that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.conversation) || has(self.sender) || has(self.prefix) || has(self.command)",
    "message": "a route matches on at least one of conversation, sender, prefix or command"
}]))]
pub struct RouteMatch {
    /// The conversation, exactly as the channel names it (a Telegram chat id, a Slack
    /// `channel:thread`, the webhook's `conversation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// The sender, exactly as the channel names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The text starts with this (case-sensitive, after leading whitespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub prefix: Option<String>,
    /// The text is the command `/<command>`, alone or followed by a space (Telegram's
    /// `/<command>@<bot>` too). Without the slash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_]{1,32}$"))]
    pub command: Option<String>,
}

impl RouteMatch {
    /// Whether nothing is set (such a route would match every message).
    pub fn is_empty(&self) -> bool {
        self.conversation.is_none()
            && self.sender.is_none()
            && self.prefix.is_none()
            && self.command.is_none()
    }

    /// Whether a message of `sender` in `conversation` saying `text` matches.
    pub fn matches(&self, conversation: &str, sender: &str, text: &str) -> bool {
        let text = text.trim_start();
        !self.is_empty()
            && self
                .conversation
                .as_deref()
                .is_none_or(|c| c == conversation)
            && self.sender.as_deref().is_none_or(|s| s == sender)
            && self.prefix.as_deref().is_none_or(|p| text.starts_with(p))
            && self.command.as_deref().is_none_or(|c| is_command(text, c))
    }
}

/// Whether `text` is `/<command>`, `/<command>@<bot>`, either followed by whitespace
/// or nothing.
fn is_command(text: &str, command: &str) -> bool {
    let Some(rest) = text.strip_prefix('/').and_then(|t| t.strip_prefix(command)) else {
        return false;
    };
    let rest = match rest.strip_prefix('@') {
        Some(bot) => bot.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_'),
        None => rest,
    };
    rest.is_empty() || rest.starts_with(char::is_whitespace)
}

impl ChannelSpec {
    /// The agent (by name, in the channel's namespace) that answers a message of
    /// `sender` in `conversation` saying `text`: the first matching route's, else the
    /// default agent.
    pub fn agent_for(&self, conversation: &str, sender: &str, text: &str) -> &str {
        self.routes
            .iter()
            .find(|r| r.when.matches(conversation, sender, text))
            .map_or(&self.default_agent, |r| &r.agent)
    }

    /// Every agent the channel sends messages to: the default agent, then the
    /// routes' agents, each once.
    pub fn agents(&self) -> Vec<&str> {
        let mut agents = vec![self.default_agent.as_str()];
        for route in &self.routes {
            if !agents.contains(&route.agent.as_str()) {
                agents.push(&route.agent);
            }
        }
        agents
    }

    /// The channel's type: the one per-type block that is set. `None` when zero or
    /// several are set (validation reports that).
    pub fn channel_type(&self) -> Option<ChannelType> {
        let set = [
            self.webchat.as_ref().map(|_| ChannelType::Webchat),
            self.webhook.as_ref().map(|_| ChannelType::Webhook),
            self.telegram.as_ref().map(|_| ChannelType::Telegram),
            self.whatsapp.as_ref().map(|_| ChannelType::Whatsapp),
            self.slack.as_ref().map(|_| ChannelType::Slack),
        ];
        let mut set = set.into_iter().flatten();
        match (set.next(), set.next()) {
            (Some(kind), None) => Some(kind),
            _ => None,
        }
    }

    /// Every secret this channel reads: the webhook's signing secret, the Telegram
    /// bot's token and webhook secret token, WhatsApp's and Slack's tokens and
    /// secrets. The operator mirrors their Secret keys into the pool; the worker reads
    /// them.
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretRef> {
        let webhook = self
            .webhook
            .as_ref()
            .and_then(|w| w.signing_secret.as_ref());
        let telegram = self.telegram.iter().flat_map(|t| {
            std::iter::once(&t.bot_token).chain(t.webhook.as_ref().map(|w| &w.secret_token))
        });
        let whatsapp = self
            .whatsapp
            .iter()
            .flat_map(|w| [&w.access_token, &w.app_secret, &w.verify_token]);
        let slack = self
            .slack
            .iter()
            .flat_map(|s| [&s.bot_token, &s.signing_secret]);
        webhook
            .into_iter()
            .chain(telegram)
            .chain(whatsapp)
            .chain(slack)
    }
}

/// A chat page served by the worker at `/chat/<channel>`, talking to the agent over a
/// WebSocket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebchatSpec {
    /// Title shown on the page. Defaults to the channel name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// What the agent behind this chat does, in a sentence or two: shown on the page
    /// while the conversation is still empty. Plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// An HTTP API: `POST /v1/channels/<channel>/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSpec {
    /// Shared secret for HMAC-SHA256 request signatures (header
    /// `X-Nexo-Signature: sha256=<hex>` over the raw body). When set, unsigned or
    /// wrongly signed requests are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SecretRef>,
    /// Seconds a synchronous request waits for the agent's answer.
    pub reply_timeout_seconds: u64,
}

impl Default for WebhookSpec {
    fn default() -> Self {
        Self {
            signing_secret: None,
            reply_timeout_seconds: 30,
        }
    }
}

/// A Telegram bot (Bot API): users write to the bot, the agent answers in the same
/// chat. See docs/channels/telegram.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelegramSpec {
    /// The bot's token from @BotFather. It is part of every Bot API URL, so it is
    /// never logged.
    pub bot_token: SecretRef,
    /// Base URL of the Bot API: Telegram's, or a self-hosted Bot API server.
    #[serde(default = "defaults::telegram_api_base_url")]
    pub api_base_url: String,
    /// How updates reach the bot: `polling` (one worker of the pool long-polls
    /// `getUpdates`) or `webhook` (Telegram posts them to any worker).
    #[serde(default)]
    pub mode: TelegramMode,
    /// Settings of `mode: webhook`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<TelegramWebhookSpec>,
    /// Outbound rate limits.
    #[serde(default)]
    pub limits: TelegramLimits,
    /// Show the answer while it is written (a draft in private chats).
    #[serde(default = "defaults::enabled")]
    pub streaming: bool,
    /// Seconds one `getUpdates` long poll waits for updates.
    #[serde(default = "defaults::telegram_poll_timeout_seconds")]
    pub poll_timeout_seconds: u64,
}

/// How a Telegram bot receives its updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TelegramMode {
    #[default]
    Polling,
    Webhook,
}

/// Telegram posts updates to `POST /v1/telegram/<channel>` of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelegramWebhookSpec {
    /// Sent by Telegram in `X-Telegram-Bot-Api-Secret-Token` with every update;
    /// requests without it are refused. 1-256 characters `A-Z`, `a-z`, `0-9`, `_`, `-`.
    pub secret_token: SecretRef,
    /// Public HTTPS URL of this channel's endpoint (`…/v1/telegram/<channel>`): when
    /// set, the worker registers it with `setWebhook` at start. Without it, register
    /// it yourself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Outbound messages per second; Telegram's documented limits are about one per
/// second in a chat and 30 per second overall. Each worker keeps its own count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TelegramLimits {
    /// Messages per second into one chat.
    pub per_chat_per_second: f64,
    /// Messages per second over all chats.
    pub global_per_second: f64,
}

impl Default for TelegramLimits {
    fn default() -> Self {
        Self {
            per_chat_per_second: 1.0,
            global_per_second: 30.0,
        }
    }
}

/// WhatsApp through Meta's Cloud API (the Graph API): the worker serves the webhook
/// `/v1/whatsapp/<channel>/webhook` (verification `GET`, signed `POST`s) and sends
/// answers with `POST <apiBaseUrl>/<apiVersion>/<phoneNumberId>/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WhatsappSpec {
    /// The Graph API's address; a test or a proxy may change it.
    #[serde(default = "default_graph_api_base_url")]
    pub api_base_url: String,
    /// Graph API version in request paths.
    #[serde(default = "default_graph_api_version")]
    pub api_version: String,
    /// Id of the business phone number that sends (from the app's WhatsApp setup).
    pub phone_number_id: String,
    /// A (permanent, system user) access token with `whatsapp_business_messaging`.
    pub access_token: SecretRef,
    /// The Meta app's secret: `X-Hub-Signature-256` of every webhook `POST`.
    pub app_secret: SecretRef,
    /// The token typed into the app's webhook setup, echoed by the verification `GET`.
    pub verify_token: SecretRef,
    /// Template sent instead of an answer when the user's 24-hour customer service
    /// window has closed (free-form messages are refused then). Without one, such an
    /// answer fails (dead-letter queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_on_closed_window: Option<WhatsappTemplate>,
}

/// An approved WhatsApp message template without parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WhatsappTemplate {
    /// The template's name, as approved in the WhatsApp Manager.
    pub name: String,
    /// Language code of the template, such as `en_US`.
    pub language: String,
}

fn default_graph_api_base_url() -> String {
    "https://graph.facebook.com".to_owned()
}

fn default_graph_api_version() -> String {
    "v21.0".to_owned()
}

/// Slack through the Events API over HTTP: the worker serves
/// `/v1/slack/<channel>/events` (the app's Request URL) and answers in the thread
/// with `chat.postMessage` / `chat.update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlackSpec {
    /// Slack's Web API address; a test or a proxy may change it.
    #[serde(default = "default_slack_api_base_url")]
    pub api_base_url: String,
    /// The bot's OAuth token (`xoxb-…`).
    pub bot_token: SecretRef,
    /// The app's signing secret: `X-Slack-Signature` of every request.
    pub signing_secret: SecretRef,
}

fn default_slack_api_base_url() -> String {
    "https://slack.com/api".to_owned()
}

/// A tool provider outside the worker. Exactly one of `stdio`, `http`, `nats` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.stdio), has(self.http), has(self.nats)].filter(x, x).size() == 1",
    "message": "exactly one of stdio, http or nats must be set"
}]))]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "nexo.dev",
        version = "v1alpha1",
        kind = "Extension",
        namespaced,
        status = "crate::crd::ExtensionStatus",
        shortname = "ext",
        category = "nexo",
        doc = "A tool provider for agents: a process (stdio), an HTTP server or a NATS service.",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        ),
    )
)]
pub struct ExtensionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioExtension>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpExtension>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsExtension>,
    /// Tools of this extension agents may call; empty means all it announces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_tools: Vec<String>,
}

/// An MCP server the worker starts as a child process and speaks to over
/// stdin/stdout. Each worker runs one such process per extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StdioExtension {
    /// Program to start: a path, or a name looked up on the worker's `PATH`. With
    /// `image`, the absolute path of the program inside that image.
    pub command: String,
    /// Arguments passed to the program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The process's whole environment: nothing of the worker's is passed on but
    /// `PATH`, `HOME`, `LANG` and `TZ`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<ExtensionEnv>,
    /// In a worker pool: an image holding the program at `command`. The operator
    /// copies the program into the pool's workers with an init container (which runs
    /// `cp` from that image), so it must run on the worker image's base (glibc, no
    /// shell). Without it, the program must be in the worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// One environment variable of a stdio extension: a literal value or a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.value) != has(self.secret)",
    "message": "exactly one of value or secret must be set"
}]))]
pub struct ExtensionEnv {
    /// Name of the variable.
    pub name: String,
    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value from a secret (a Kubernetes Secret key, or a variable of the worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
}

/// An MCP server reached over streamable HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpExtension {
    /// URL of the server's MCP endpoint, e.g. `https://tools.example.com/mcp`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` with every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SecretRef>,
}

/// A tool server on the broker (`ext.<name>.call`), optionally run from an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsExtension {
    /// Container image that serves the extension; the operator runs it as a
    /// Deployment. Without one, the extension is expected to run elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Worker pool (same namespace) whose NATS the extension's Deployment connects
    /// to, with the pool's credentials.
    #[serde(default = "defaults::worker_pool")]
    pub worker_pool: String,
}

impl ExtensionSpec {
    /// Every secret this extension reads: its environment's and its bearer token.
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretRef> {
        let env = self
            .stdio
            .iter()
            .flat_map(|s| &s.env)
            .filter_map(|e| e.secret.as_ref());
        env.chain(self.http.iter().filter_map(|h| h.bearer_token.as_ref()))
    }

    /// Which transport the extension speaks: `stdio`, `http` or `nats`.
    pub fn transport(&self) -> &'static str {
        if self.stdio.is_some() {
            "stdio"
        } else if self.http.is_some() {
            "http"
        } else {
            "nats"
        }
    }
}

pub(crate) mod defaults {
    pub fn telegram_api_base_url() -> String {
        "https://api.telegram.org".to_owned()
    }
    pub fn telegram_poll_timeout_seconds() -> u64 {
        25
    }
    pub fn enabled() -> bool {
        true
    }
    pub fn worker_pool() -> String {
        crate::name::DEFAULT_POOL.to_owned()
    }
    pub fn model_timeout_seconds() -> u64 {
        60
    }
    pub fn max_retries() -> u32 {
        3
    }
    pub fn max_tokens() -> u32 {
        1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed() -> ChannelSpec {
        serde_json::from_value(serde_json::json!({
            "defaultAgent": "concierge",
            "webhook": {},
            "routes": [
                {"agent": "billing", "match": {"command": "invoice"}},
                {"agent": "vip", "match": {"sender": "ada", "conversation": "c1"}},
                {"agent": "ops", "match": {"prefix": "!ops"}},
                {"agent": "never", "match": {"command": "invoice"}},
            ],
        }))
        .unwrap()
    }

    /// The first matching route wins; every field of a match must hold; anything else
    /// goes to the default agent.
    #[test]
    fn a_message_goes_to_the_first_route_it_matches_or_the_default_agent() {
        let spec = routed();
        assert_eq!(spec.agent_for("c9", "bob", "/invoice 42"), "billing");
        assert_eq!(spec.agent_for("c9", "bob", "/invoice@nexo_bot"), "billing");
        assert_eq!(spec.agent_for("c9", "bob", "/invoices"), "concierge");
        assert_eq!(spec.agent_for("c9", "bob", "please /invoice"), "concierge");
        assert_eq!(spec.agent_for("c1", "ada", "/invoice"), "billing");
        assert_eq!(spec.agent_for("c1", "ada", "hello"), "vip");
        assert_eq!(spec.agent_for("c2", "ada", "hello"), "concierge");
        assert_eq!(spec.agent_for("c9", "bob", "  !ops restart"), "ops");
        assert_eq!(spec.agent_for("c9", "bob", "hello"), "concierge");
        assert_eq!(
            spec.agents(),
            ["concierge", "billing", "vip", "ops", "never"]
        );
    }

    #[test]
    fn a_route_without_a_condition_and_an_unknown_field_are_refused() {
        let empty: RouteMatch = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(empty.is_empty() && !empty.matches("c", "s", "t"));
        let unknown = serde_json::from_value::<ChannelRoute>(
            serde_json::json!({"agent": "a", "match": {"regex": ".*"}}),
        );
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("unknown field `regex`")
        );
    }

    /// Defaults are written once, in `Default`: a missing block and a missing field
    /// inside a block both take them.
    #[test]
    fn omitted_settings_take_the_default_values() {
        let empty: MemorySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(empty, MemorySpec::default());
        let partial: MemorySpec =
            serde_json::from_value(serde_json::json!({"longTerm": {"recall": {"k": 2}}})).unwrap();
        assert_eq!(partial.long_term.recall.k, 2);
        assert_eq!(partial.long_term.recall.token_budget, 512);
        assert!(partial.long_term.enabled && partial.long_term.tools);
        assert_eq!(partial.history_turns, 20);
        let limits: AgentLimits =
            serde_json::from_value(serde_json::json!({"maxSteps": 3})).unwrap();
        assert_eq!((limits.max_concurrency, limits.max_steps), (4, 3));
        let webhook: WebhookSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(webhook, WebhookSpec::default());
    }

    #[test]
    fn a_fallback_models_schema_has_no_fallbacks_and_round_trips() {
        let schema = serde_json::to_value(schemars::schema_for!(ModelSpec)).unwrap();
        assert!(schema["properties"].get("fallbacks").is_some());
        let entry = serde_json::to_value(schemars::schema_for!(FallbackModelSpec)).unwrap();
        assert!(entry["properties"].get("fallbacks").is_none(), "{entry}");
        assert!(entry["properties"].get("baseUrl").is_some());
        let spec: ModelSpec = serde_json::from_value(serde_json::json!({
            "provider": "openai", "model": "m",
            "fallbacks": [{"provider": "scripted", "script": [{"reply": "x"}]}],
        }))
        .unwrap();
        let written = serde_json::to_value(&spec).unwrap();
        assert!(
            written["fallbacks"][0].get("fallbacks").is_none(),
            "{written}"
        );
        assert_eq!(serde_json::from_value::<ModelSpec>(written).unwrap(), spec);
        let labels: Vec<String> = spec.chain().iter().map(|m| m.label().to_owned()).collect();
        assert_eq!(labels, ["m", "scripted"]);
    }

    #[test]
    fn unknown_settings_are_still_refused() {
        let err = serde_json::from_value::<RecallSpec>(serde_json::json!({"kk": 1})).unwrap_err();
        assert!(err.to_string().contains("unknown field `kk`"), "{err}");
    }
}
