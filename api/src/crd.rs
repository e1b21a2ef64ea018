//! Kubernetes custom resources of group `nexo.dev`, version `v1alpha1`.
//!
//! `Agent`, `Channel` and `Extension` are generated from the specs in [`crate::spec`]
//! (the same types a local worker config holds); `WorkerPool` only exists in a
//! cluster. The status types follow Kubernetes conventions (`observedGeneration`,
//! `metav1.Condition`s) so `kubectl wait`, Argo CD, Flux and kstatus understand them.

// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy reads it as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::report::{ChannelConnection, NotRunning, OverBudget};
use crate::spec::SecretKeySelector;
pub use crate::spec::{Agent, Channel, Extension};

/// API group of every nexo resource.
pub const GROUP: &str = "nexo.dev";
/// API version of every nexo resource.
pub const VERSION: &str = "v1alpha1";

/// Condition types set on every nexo resource.
pub mod condition {
    /// The spec was read and is acceptable.
    pub const ACCEPTED: &str = "Accepted";
    /// Every resource the spec references (Secrets, Channels, Agents, pool) exists.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The resource was assigned a place (a pool, a worker).
    pub const SCHEDULED: &str = "Scheduled";
    /// The resource is serving.
    pub const READY: &str = "Ready";
    /// kstatus: the controller is working towards the spec.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the controller cannot make progress without a change by the user.
    pub const STALLED: &str = "Stalled";
    /// An Agent with a `budget`: `True` while its worker refuses its turns because it
    /// spent a daily limit (until the UTC day ends).
    pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";
    /// A Channel that talks to a platform (Telegram, WhatsApp, Slack): `True` while a
    /// worker of its pool last reached the platform (a poll, a registered webhook, a
    /// send), `False` with why when none did.
    pub const CONNECTED: &str = "Connected";
}

/// Where an agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPlacement {
    /// The worker pool hosting the agent.
    pub pool: String,
    /// The agent's partition within the pool (stable while the pool's partition count
    /// stays the same).
    pub partition: u32,
    /// Ordinal of the worker pod running the agent (`<pool>-<worker>`).
    pub worker: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<AgentPlacement>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The worker pool serving the channel (the pool of its default agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// A polling channel's place in the platform's updates (Telegram: the next
    /// `update_id`), as the worker polling it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// When a worker last reached the platform (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Tools the extension offers agents (after `allowTools`), as workers last listed
    /// them; sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Workers that report the extension connected and its tools listed.
    #[serde(default)]
    pub ready_workers: u32,
}

/// A pool of identical worker pods sharing one NATS. Agents name their pool in
/// `spec.workerPool`; the pool's partitions are spread over its replicas.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "nexo.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    namespaced,
    status = "WorkerPoolStatus",
    shortname = "wp",
    category = "nexo",
    doc = "A pool of nexo worker pods that run agents and serve channels.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Agents", type_ = "integer", json_path = ".status.agents"),
    printcolumn(
        name = "Catalog",
        type_ = "string",
        json_path = ".status.catalogRevision",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.storage) == has(oldSelf.storage) && (!has(self.storage) || self.storage == oldSelf.storage)",
    "message": "storage cannot be added, removed or changed on an existing pool (StatefulSet volume claims are immutable); create a new pool instead"
}]))]
pub struct WorkerPoolSpec {
    /// Worker pods. Each runs the agents of the partitions it owns. At most
    /// `partitions`: more workers than partitions would idle.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Partitions agents are hashed into. Fixed for the life of a pool: changing it
    /// would move almost every agent.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 4096), extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "partitions cannot be changed; create a new pool instead"
    }]))]
    pub partitions: u32,
    /// Worker container image.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; Kubernetes' default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// CPU and memory of each worker container. Defaults: requests 100m / 128Mi,
    /// limit 512Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = check_quantities)]
    pub resources: Option<ResourceRequirements>,
    /// NATS the pool's workers share.
    pub nats: PoolNats,
    /// Persistent volume for each worker's data directory (outbox, dead letters,
    /// memory). Without it the data directory is an `emptyDir`, lost with the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<PoolStorage>,
    /// Seconds a worker gets to finish running turns when it stops.
    #[serde(default = "default_drain_timeout_seconds")]
    pub drain_timeout_seconds: u64,
    /// Name of a Secret whose key `token` is the bearer token of the workers'
    /// `/admin` API. Without it the admin API is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_secret: Option<String>,
    /// Secrets (same namespace) for pulling the worker image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// Extra environment variables of the worker container, for example a model API
    /// key that agents reference as `apiKey: {env: NAME}`, filled with
    /// `valueFrom.secretKeyRef`. A pool-level setting: changing it rolls the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = check_quantities)]
    pub env: Vec<EnvVar>,
    /// The workers' model settings (`worker.models` of their config): circuit
    /// breakers of the model endpoints and the price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<crate::config::ModelSettings>,
}

/// How a pool's workers reach NATS. Secrets are referenced, never inlined; at most one
/// authentication method is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.user), has(self.token), has(self.nkeySeed), has(self.credentials)].filter(x, x).size() <= 1",
    "message": "at most one of user, token, nkeySeed or credentials may be set"
}]))]
pub struct PoolNats {
    /// Server URLs, e.g. `nats://nats.nats.svc:4222`.
    #[schemars(length(min = 1))]
    pub urls: Vec<String>,
    /// User name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<NatsUserAuth>,
    /// Token authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretKeySelector>,
    /// NKey seed (`SU…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<SecretKeySelector>,
    /// A `.creds` file (user JWT and NKey seed), as a Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretKeySelector>,
    /// TLS to NATS. When set, TLS is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PoolNatsTls>,
}

/// TLS material in a Secret laid out as cert-manager writes it: `ca.crt`, and for
/// mutual TLS `tls.crt` and `tls.key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolNatsTls {
    /// Secret (same namespace) holding `ca.crt`, and `tls.crt` / `tls.key` for a
    /// client certificate.
    pub secret_name: String,
    /// Present the Secret's `tls.crt` / `tls.key` as a client certificate.
    #[serde(default)]
    pub client_certificate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsUserAuth {
    /// NATS user name.
    pub name: String,
    /// The user's password, as a Secret key.
    pub password: SecretKeySelector,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolStorage {
    /// Size of each worker's volume, a Kubernetes quantity such as `1Gi` or `500Mi`.
    #[schemars(transform = check_quantities)]
    pub size: Quantity,
    /// Storage class; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs`, `Scheduled`, `Ready`, `Reconciling` and `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Worker pods that exist (the `/scale` subresource reads this).
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pool's pods, for the `/scale` subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Agents assigned to this pool.
    #[serde(default)]
    pub agents: u32,
    /// Revision of the catalog (agents, channels, extensions, referenced Secrets) the
    /// operator last wrote for this pool; workers reload it in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_revision: Option<String>,
    /// Workers that report running `catalogRevision` (asked over HTTP at
    /// `GET /catalog`); below `replicas` while a change is being picked up.
    #[serde(default)]
    pub workers_on_catalog_revision: i32,
    /// Agents and channels the pool's workers report they cannot run (a key that
    /// is not set, an unreadable memory file), with why. They are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_running: Vec<NotRunning>,
    /// Workers the catalog spreads the pool's partitions over (its
    /// `placement.workers`). It trails `spec.replicas` while a scale is under way: on
    /// a scale-up it grows once the new workers answer, on a scale-down it shrinks
    /// first and the pods go once they handed their partitions off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_workers: Option<u32>,
    /// The scale under way, while the catalog's placement or the StatefulSet's
    /// replicas still differ from `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hand_off: Option<PoolHandOff>,
    /// What each worker reports owning (partition leases), by ordinal; workers that
    /// cannot be asked or report no ownership are left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ownership: Vec<WorkerOwnership>,
    /// The extensions the pool's workers use, as they report them; sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<PoolExtension>,
    /// Agents whose turns the pool's workers refuse today: they spent a limit of
    /// their `budget`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub over_budget: Vec<OverBudget>,
    /// Whether the pool's platform channels reach their platforms, one entry per
    /// channel and worker that reports it; sorted by channel, then worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_connections: Vec<ChannelConnection>,
}

/// One extension as the workers of a pool report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolExtension {
    /// The Extension's name (same namespace as the pool).
    pub name: String,
    /// Workers that report it connected with its tools listed.
    pub ready_workers: u32,
    /// Tools the workers listed (their union), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Why a worker that uses it cannot (the first such report), while one cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A scale of a pool under way: partitions move between workers before pods go, and
/// after new pods are up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolHandOff {
    /// Worker pods when the scale began.
    pub from: u32,
    /// Worker pods wanted (`spec.replicas`).
    pub to: u32,
    /// When the scale began.
    pub started_at: Time,
    /// On a scale-down: when the operator removes the pods even if they still hold
    /// partitions (their shutdown still hands the agents off). A scale-up has none:
    /// partitions move only to workers that answer or are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// Ordinals of the workers the scale waits for: on a scale-down those that still
    /// hold partitions (or cannot be asked), on a scale-up the new ones that neither
    /// answer nor are ready yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<u32>,
}

/// The partition leases one worker reports (`GET /catalog`, `ownership`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerOwnership {
    /// The worker's ordinal: pod `<pool>-<worker>`.
    pub worker: u32,
    /// Partitions whose lease the worker holds.
    pub held: u32,
    /// Partitions the worker should own but another worker still holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acquiring: Vec<u32>,
    /// Partitions the worker holds but no longer owns: it is handing their agents off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releasing: Vec<u32>,
}

/// The grammar of a Kubernetes quantity (`1Gi`, `500m`, `1.5`, `2e3`), the pattern
/// kubebuilder puts on `resource.Quantity` fields. k8s-openapi's schema of a quantity
/// is only `x-kubernetes-int-or-string`, so without it the API server would take
/// `size: lots` and the pool's StatefulSet would be refused later, out of the user's
/// sight.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Adds [`QUANTITY_PATTERN`] to every int-or-string schema within a field's schema.
/// Only for fields whose int-or-strings are all quantities: a `Quantity`, and
/// Kubernetes' `ResourceRequirements` and `EnvVar` (whose only one is
/// `resourceFieldRef.divisor`).
fn check_quantities(schema: &mut schemars::Schema) {
    fn walk(map: &mut serde_json::Map<String, serde_json::Value>) {
        if map.get("x-kubernetes-int-or-string") == Some(&serde_json::Value::Bool(true)) {
            map.insert("pattern".into(), QUANTITY_PATTERN.into());
        }
        for value in map.values_mut() {
            match value {
                serde_json::Value::Object(child) => walk(child),
                serde_json::Value::Array(items) => items
                    .iter_mut()
                    .filter_map(|v| v.as_object_mut())
                    .for_each(walk),
                _ => {}
            }
        }
    }
    if let Some(map) = schema.as_object_mut() {
        walk(map);
    }
}

fn default_replicas() -> i32 {
    1
}

fn default_partitions() -> u32 {
    crate::partition::DEFAULT_PARTITIONS
}

fn default_drain_timeout_seconds() -> u64 {
    30
}
