//! What a worker reports about the catalog it runs (`GET /catalog`). The worker writes
//! it and the operator reads it, so the type lives here, shared by both.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The catalog revision a worker runs and its share of it. Unknown fields are ignored:
/// during a rollout the operator reads reports of workers newer or older than itself.
/// ([`ResourceKind`] is a closed set: it is also part of the WorkerPool CRD's schema.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogReport {
    pub revision: String,
    pub pool: String,
    pub shard: u32,
    /// Workers the pool's agents are spread over (the catalog's `placement.workers`
    /// when it has one, else `--shards`).
    pub shards: u32,
    pub partitions: u32,
    /// `namespace/name` of every agent this worker runs, sorted.
    pub agents: Vec<String>,
    /// `namespace/name` of every channel this worker serves, sorted.
    pub channels: Vec<String>,
    /// Agents and channels of this worker's share that do not run: they could not be
    /// built, or cannot start (a memory file that cannot be prepared, a broker that
    /// refuses their consumer). The rest runs, and these are tried again.
    #[serde(default, deserialize_with = "known_entries")]
    pub failed: Vec<NotRunning>,
    /// `namespace/name` of the agents and channels started but not taking work yet
    /// (attaching to the broker, preparing their memory), and not failed so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attaching: Vec<String>,
    /// Partition ownership, on a broker shared by several workers (NATS): what this
    /// worker holds a lease on and which moves are under way. Absent on the local bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<Ownership>,
    /// The extensions this worker's agents use, sorted by name.
    #[serde(default, deserialize_with = "known_entries")]
    pub extensions: Vec<ExtensionReport>,
    /// This worker's agents that spent their daily budget: their turns are refused
    /// until the UTC day ends. Sorted by agent.
    #[serde(
        default,
        deserialize_with = "known_entries",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub over_budget: Vec<OverBudget>,
    /// Whether this worker's channel instances that talk to a platform (Telegram,
    /// WhatsApp, Slack) reach it. Sorted by channel.
    #[serde(
        default,
        deserialize_with = "known_entries",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub channel_connections: Vec<ChannelConnection>,
}

/// Whether a channel instance reaches its platform, as one worker last saw it: what
/// `GET /catalog` lists, what the instance publishes on
/// `plugin.health.<type>.<ns>.<name>`, and what the operator turns into the Channel's
/// `Connected` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelConnection {
    /// `namespace/name`.
    pub channel: String,
    /// The channel's type (`telegram`, …).
    #[serde(rename = "type")]
    pub type_: String,
    /// The worker that saw it (its name in the lease table, or its data directory).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker: String,
    /// Whether the last exchange with the platform succeeded.
    pub connected: bool,
    /// What it last did (`polling`, `webhook registered`, …), or why it failed.
    pub detail: String,
    /// When an exchange with the platform last succeeded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<String>,
    /// Where a polling instance is in the platform's stream of updates (Telegram:
    /// the next `update_id` it asks for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// An agent whose turns are refused for today: it reached a limit of its `budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverBudget {
    /// `namespace/name`.
    pub agent: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Tokens spent that day.
    pub tokens: u64,
    /// Cost that day, in the price table's currency.
    pub cost: f64,
    /// Which limit was reached: `tokensPerDay` or `costPerDay`.
    pub limit: String,
}

/// One extension as a worker sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionReport {
    /// `namespace/name`.
    pub name: String,
    /// `stdio`, `http` or `nats`.
    pub transport: String,
    /// Connected and its tools listed.
    pub ready: bool,
    /// The tools it offers agents (after its `allowTools`), as it names them; sorted.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Why it is not ready: the last error of starting, connecting or listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Which partitions a worker owns through a lease, and which are moving. A worker runs
/// the agents of a partition only while it holds the partition's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// The name this worker holds leases under (its pod name, or host and process).
    pub worker: String,
    /// Partitions whose lease this worker holds, with the lease's epoch, sorted.
    pub held: Vec<HeldPartition>,
    /// Partitions this worker should own but another worker still holds: they move
    /// here once that one hands them off (or its lease expires).
    #[serde(default)]
    pub acquiring: Vec<u32>,
    /// Partitions this worker holds but no longer owns: their agents are being
    /// handed off (drained, snapshotted), then the lease is released.
    #[serde(default)]
    pub releasing: Vec<u32>,
}

/// One partition lease held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldPartition {
    pub partition: u32,
    /// The lease's revision when it was taken: grows with every change of owner.
    pub epoch: u64,
}

/// The entries of `failed` this version can read. A newer worker may report a kind
/// this one does not know (during a rolling upgrade of the operator or the workers):
/// that entry is skipped, so the rest of the report still reaches the operator.
fn known_entries<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    let entries = Vec::<serde_json::Value>::deserialize(deserializer)?;
    Ok(entries
        .into_iter()
        .filter_map(|entry| serde_json::from_value(entry).ok())
        .collect())
}

/// An agent or channel a worker should run but cannot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotRunning {
    /// `agent` or `channel`.
    pub kind: ResourceKind,
    /// `namespace/name`.
    pub name: String,
    /// Why, e.g. ``API key: environment variable `ANTHROPIC_API_KEY` is not set``.
    pub reason: String,
}

/// Which kind of resource a report entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Agent,
    Channel,
}

impl ResourceKind {
    /// `agent` or `channel`, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Agent => "agent",
            ResourceKind::Channel => "channel",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_workers_report_is_read() {
        let newer = serde_json::json!({
            "revision": "r2", "pool": "default", "shard": 0, "shards": 1, "partitions": 4,
            "agents": ["default/a"], "channels": [], "schedules": ["default/x"],
            "extensions": [{"name": "default/e", "transport": "grpc", "ready": true, "since": 1}, "x"],
            "failed": [{"kind": "channel", "name": "default/x", "reason": "r", "since": 1}],
        });
        let report: CatalogReport = serde_json::from_value(newer).unwrap();
        assert_eq!(report.revision, "r2");
        assert_eq!(report.failed[0].kind, ResourceKind::Channel);
        assert_eq!(
            report.extensions.len(),
            1,
            "an entry it cannot read is skipped"
        );
        assert!(report.extensions[0].ready);
    }

    #[test]
    fn an_entry_of_a_kind_this_version_does_not_know_is_skipped() {
        let newer = serde_json::json!({
            "revision": "r3", "pool": "default", "shard": 0, "shards": 1, "partitions": 4,
            "agents": [], "channels": [],
            "failed": [
                {"kind": "schedule", "name": "default/daily", "reason": "r"},
                {"kind": "agent", "name": "default/a", "reason": "no key"},
            ],
        });
        let report: CatalogReport = serde_json::from_value(newer).unwrap();
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].name, "default/a");
    }
}
