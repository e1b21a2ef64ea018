//! Status of nexo resources, computed from what the controllers observed. Pure:
//! the controllers pass in what they read and the current time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use nexo_api::PartitionMap;
use nexo_api::crd::{
    Agent, AgentPlacement, AgentStatus, Channel, ChannelStatus, Extension, PoolExtension,
    WorkerPool, condition,
};
use nexo_api::report::{ChannelConnection, OverBudget, ResourceKind};

/// One condition as a controller decides it; [`merge`] stamps times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    pub fn new(
        type_: &'static str,
        ok: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            ok,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions after applying `verdicts`: a condition whose status does not
/// change keeps its `lastTransitionTime` (Kubernetes convention), others get `now`.
pub fn merge(
    previous: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.ok { "True" } else { "False" };
            let last = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_owned(),
                status: status.to_owned(),
                reason: v.reason.to_owned(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time: last.unwrap_or_else(|| now.clone()),
            }
        })
        .collect()
}

/// `Accepted`: the API server's schema and CEL rules already checked the spec.
pub fn accepted() -> Verdict {
    Verdict::new(condition::ACCEPTED, true, "Valid", "spec accepted")
}

/// `ResolvedRefs` from the references that did not resolve.
pub fn resolved_refs(missing: &[String]) -> Verdict {
    if missing.is_empty() {
        Verdict::new(
            condition::RESOLVED_REFS,
            true,
            "Resolved",
            "all references resolve",
        )
    } else {
        Verdict::new(
            condition::RESOLVED_REFS,
            false,
            "MissingReferences",
            not_found(missing),
        )
    }
}

fn not_found(missing: &[String]) -> String {
    format!("not found: {}", missing.join(", "))
}

fn not_ready(unready: &[String]) -> String {
    format!("not ready: {}", unready.join(", "))
}

/// kstatus conditions that go with a `Ready` verdict: `Stalled` when only the user can
/// fix it (a missing reference), `Reconciling` while waiting for the cluster.
pub fn progress(ready: bool, missing: &[String]) -> [Verdict; 2] {
    let stalled = !missing.is_empty();
    let reconciling = !ready && !stalled;
    [
        Verdict::new(
            condition::RECONCILING,
            reconciling,
            if reconciling {
                "Progressing"
            } else {
                "Settled"
            },
            if reconciling {
                "waiting for the cluster"
            } else {
                ""
            },
        ),
        if stalled {
            Verdict::new(
                condition::STALLED,
                true,
                "MissingReferences",
                not_found(missing),
            )
        } else {
            Verdict::new(condition::STALLED, false, "Progressing", "")
        },
    ]
}

/// `BudgetExceeded` of an agent with a budget, from its worker's report.
fn budget(over: Option<&OverBudget>) -> Verdict {
    match over {
        Some(over) => Verdict::new(
            condition::BUDGET_EXCEEDED,
            true,
            "DailyBudgetSpent",
            format!(
                "{} reached on {} (UTC): {} tokens, cost {}; turns are refused until the day ends",
                over.limit, over.day, over.tokens, over.cost
            ),
        ),
        None => Verdict::new(
            condition::BUDGET_EXCEEDED,
            false,
            "WithinBudget",
            "turns are answered",
        ),
    }
}

/// What the Extension controller found about one extension.
#[derive(Debug, Clone)]
pub struct ExtensionObservation<'a> {
    /// Whether an agent uses it (only then does a worker connect it).
    pub used: bool,
    /// What the pools of the agents that use it report about it.
    pub reports: &'a [PoolExtension],
    /// For a NATS extension with an image: whether its Deployment is available.
    pub deployment_available: Option<bool>,
    /// References that do not resolve (the pool a NATS extension's Deployment
    /// connects to).
    pub missing: &'a [String],
}

/// The conditions of an extension (without `Accepted`), its tools and the workers
/// that list them. `Ready` means a worker connected it and listed its tools.
pub fn extension(observed: &ExtensionObservation<'_>) -> (Vec<Verdict>, Vec<String>, u32) {
    let ready_workers: u32 = observed.reports.iter().map(|r| r.ready_workers).sum();
    let mut tools: Vec<String> = observed
        .reports
        .iter()
        .flat_map(|r| r.tools.iter().cloned())
        .collect();
    tools.sort();
    tools.dedup();
    let problem = observed.reports.iter().find_map(|r| r.problem.clone());
    let ready = ready_workers > 0;
    let (reason, message) = if !observed.missing.is_empty() {
        ("MissingReferences", not_found(observed.missing))
    } else if ready {
        (
            "ToolsListed",
            format!(
                "{ready_workers} worker(s) list its tools: {}",
                if tools.is_empty() {
                    "(none)".to_owned()
                } else {
                    tools.join(", ")
                }
            ),
        )
    } else if !observed.used {
        (
            "NotUsed",
            "no agent uses this extension, so no worker connects it".to_owned(),
        )
    } else if observed.deployment_available == Some(false) {
        (
            "DeploymentNotAvailable",
            "waiting for the extension's Deployment".to_owned(),
        )
    } else if let Some(problem) = problem {
        ("NotConnected", format!("workers cannot use it: {problem}"))
    } else {
        (
            "Connecting",
            "waiting for a worker to connect it and list its tools".to_owned(),
        )
    };
    let mut verdicts = vec![
        resolved_refs(observed.missing),
        Verdict::new(condition::READY, ready, reason, message),
    ];
    // Unused, there is nothing to wait for: settled, not stalled.
    let waiting = !ready && observed.used;
    verdicts.extend(progress(!waiting, observed.missing));
    (verdicts, tools, ready_workers)
}

/// Why an agent cannot count on an extension that exists: it is not ready (with its
/// `Ready` message). `None` when it is ready.
pub fn extension_unready(extension: &Extension) -> Option<String> {
    let ready = extension
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY));
    match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => Some(c.message.clone()),
        None => Some("no status yet".to_owned()),
    }
}

/// What an agent's controller found about the agent's references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRefs {
    /// Human-readable names of references that do not resolve, e.g.
    /// "Secret `llm` (key `api-key`)".
    pub missing: Vec<String>,
    /// Extensions that exist but are not ready, with why, e.g. "Extension `github`
    /// (waiting for a worker to connect it)". They do not resolve either, but the
    /// cluster may still fix them: the agent is reconciling, not stalled.
    pub unready: Vec<String>,
}

/// Status of `agent`, placed in `pool` (when it exists). A pool is ready when at least
/// one worker is.
pub fn agent(
    agent: &Agent,
    pool: Option<&WorkerPool>,
    refs: &AgentRefs,
    now: &Time,
) -> AgentStatus {
    let previous = agent
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let pool_name = &agent.spec.worker_pool;
    let mut missing = refs.missing.clone();
    if pool.is_none() {
        missing.push(format!("WorkerPool `{pool_name}`"));
    }
    let resolved = missing.is_empty();
    let placement = pool.map(|pool| {
        // The workers the catalog places on, which trail `spec.replicas` while the
        // pool scales (partitions move only to workers that run, and away from
        // workers before they stop).
        let workers = pool
            .status
            .as_ref()
            .and_then(|s| s.placement_workers)
            .unwrap_or(pool.spec.replicas.max(0) as u32);
        let map = PartitionMap::new(pool.spec.partitions, workers);
        let placed = map.place(&nexo_api::ResourceKey::new(
            agent.namespace().unwrap_or_default(),
            agent.name_any(),
        ));
        AgentPlacement {
            pool: pool_name.clone(),
            partition: placed.partition,
            worker: placed.worker,
        }
    });
    let pool_ready = pool
        .and_then(|p| p.status.as_ref())
        .is_some_and(|s| s.ready_replicas > 0);
    // What the agent's worker says about it (reported in the pool's status).
    let key = format!(
        "{}/{}",
        agent.namespace().unwrap_or_default(),
        agent.name_any()
    );
    let not_running = pool.and_then(|p| p.status.as_ref()).and_then(|s| {
        s.not_running
            .iter()
            .find(|n| n.kind == ResourceKind::Agent && n.name == key)
    });
    let (ready, reason, message) = if agent.spec.suspend {
        (false, "Suspended", "spec.suspend is true".to_owned())
    } else if !resolved {
        (false, "MissingReferences", not_found(&missing))
    } else if !refs.unready.is_empty() {
        (false, "ExtensionNotReady", not_ready(&refs.unready))
    } else if let Some(problem) = not_running {
        (
            false,
            "WorkerCannotRun",
            format!("its worker cannot run it (retrying): {}", problem.reason),
        )
    } else if !pool_ready {
        (
            false,
            "PoolNotReady",
            format!("no worker of pool `{pool_name}` is ready"),
        )
    } else {
        let worker = placement.as_ref().map(|p| p.worker).unwrap_or_default();
        (
            true,
            "Running",
            format!("running on worker {pool_name}-{worker}"),
        )
    };
    let refs_verdict = if missing.is_empty() && !refs.unready.is_empty() {
        Verdict::new(
            condition::RESOLVED_REFS,
            false,
            "ExtensionNotReady",
            not_ready(&refs.unready),
        )
    } else {
        resolved_refs(&missing)
    };
    let mut verdicts = vec![
        accepted(),
        refs_verdict,
        match &placement {
            Some(p) => Verdict::new(
                condition::SCHEDULED,
                true,
                "Placed",
                format!(
                    "pool `{}`, partition {}, worker {}",
                    p.pool, p.partition, p.worker
                ),
            ),
            None => Verdict::new(
                condition::SCHEDULED,
                false,
                "PoolNotFound",
                format!("WorkerPool `{pool_name}` does not exist"),
            ),
        },
        Verdict::new(condition::READY, ready, reason, message),
    ];
    verdicts.extend(progress(ready || agent.spec.suspend, &missing));
    if agent.spec.budget.is_some() {
        let over = pool
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.over_budget.iter().find(|o| o.agent == key));
        verdicts.push(budget(over));
    }
    AgentStatus {
        observed_generation: agent.metadata.generation,
        conditions: merge(previous, &verdicts, agent.metadata.generation, now),
        placement,
    }
}

/// Status of `channel`: its default agent must exist (its pool serves the channel);
/// a platform channel is `Connected` when a worker of the pool last reached the
/// platform.
pub fn channel(
    channel: &Channel,
    default_agent: Option<&Agent>,
    served_by: Option<&WorkerPool>,
    missing_secrets: &[String],
    now: &Time,
) -> ChannelStatus {
    let previous = channel
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut missing = missing_secrets.to_vec();
    if default_agent.is_none() {
        missing.push(format!("Agent `{}`", channel.spec.default_agent));
    }
    let resolved = missing.is_empty();
    let pool = default_agent.map(|a| a.spec.worker_pool.clone());
    let agent_ready = default_agent
        .and_then(|a| a.status.as_ref())
        .is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::READY && c.status == "True")
        });
    let (ready, reason, message) = if channel.spec.suspend {
        (false, "Suspended", "spec.suspend is true".to_owned())
    } else if !resolved {
        (false, "MissingReferences", not_found(&missing))
    } else if !agent_ready {
        (
            false,
            "AgentNotReady",
            format!("agent `{}` is not ready", channel.spec.default_agent),
        )
    } else {
        (
            true,
            "Serving",
            format!("served by pool `{}`", pool.clone().unwrap_or_default()),
        )
    };
    let mut verdicts = vec![
        accepted(),
        resolved_refs(&missing),
        Verdict::new(
            condition::SCHEDULED,
            pool.is_some(),
            if pool.is_some() {
                "Placed"
            } else {
                "AgentNotFound"
            },
            pool.as_ref()
                .map(|p| format!("pool `{p}`"))
                .unwrap_or_default(),
        ),
        Verdict::new(condition::READY, ready, reason, message),
    ];
    verdicts.extend(progress(ready || channel.spec.suspend, &missing));
    let key = format!(
        "{}/{}",
        channel.metadata.namespace.as_deref().unwrap_or_default(),
        channel.metadata.name.as_deref().unwrap_or_default()
    );
    let reports: Vec<&ChannelConnection> = served_by
        .and_then(|p| p.status.as_ref())
        .map(|s| {
            s.channel_connections
                .iter()
                .filter(|c| c.channel == key)
                .collect()
        })
        .unwrap_or_default();
    let is_platform = channel.spec.channel_type().is_some_and(|t| t.is_platform());
    if is_platform && !channel.spec.suspend {
        verdicts.push(connected(&reports));
    }
    // The latest success and the cursor of the worker that had it.
    let latest = reports
        .iter()
        .filter(|c| c.last_success_at.is_some())
        .max_by(|a, b| a.last_success_at.cmp(&b.last_success_at));
    ChannelStatus {
        observed_generation: channel.metadata.generation,
        conditions: merge(previous, &verdicts, channel.metadata.generation, now),
        pool,
        cursor: latest.and_then(|c| c.cursor.clone()),
        last_success_at: latest.and_then(|c| c.last_success_at.clone()),
    }
}

/// `Connected` from what the pool's workers report of a platform channel: `True` when
/// one reached the platform on its last exchange, else `False` with the first
/// reason, or `False` (`NotReported`) before any reported.
fn connected(reports: &[&ChannelConnection]) -> Verdict {
    if let Some(up) = reports.iter().find(|c| c.connected) {
        return Verdict::new(
            condition::CONNECTED,
            true,
            "Connected",
            format!("{} (worker {})", up.detail, up.worker),
        );
    }
    match reports.first() {
        Some(down) => Verdict::new(
            condition::CONNECTED,
            false,
            "Disconnected",
            format!("{} (worker {})", down.detail, down.worker),
        ),
        None => Verdict::new(
            condition::CONNECTED,
            false,
            "NotReported",
            "no worker of the pool has reported on the platform yet",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Time {
        Time(text.parse().unwrap())
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = merge(&[], &[accepted()], Some(1), &at("2026-01-01T00:00:00Z"));
        let same = merge(&first, &[accepted()], Some(2), &at("2026-01-02T00:00:00Z"));
        assert_eq!(same[0].last_transition_time, at("2026-01-01T00:00:00Z"));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = Verdict::new(condition::ACCEPTED, false, "Invalid", "no");
        let changed = merge(&same, &[flipped], Some(3), &at("2026-01-03T00:00:00Z"));
        assert_eq!(changed[0].last_transition_time, at("2026-01-03T00:00:00Z"));
        assert_eq!(changed[0].status, "False");
    }

    #[test]
    fn missing_references_stall_and_waiting_reconciles() {
        let [reconciling, stalled] = progress(false, &["Secret `x`".to_owned()]);
        assert!(!reconciling.ok && stalled.ok);
        assert!(stalled.message.contains("Secret `x`"));
        let [reconciling, stalled] = progress(false, &[]);
        assert!(reconciling.ok && !stalled.ok);
        let [reconciling, stalled] = progress(true, &[]);
        assert!(!reconciling.ok && !stalled.ok);
        assert!(resolved_refs(&[]).ok);
        assert!(!resolved_refs(&["a".into()]).ok);
    }

    fn connection(worker: &str, connected: bool, at: &str, cursor: &str) -> ChannelConnection {
        ChannelConnection {
            channel: "team/bot".to_owned(),
            type_: "telegram".to_owned(),
            worker: worker.to_owned(),
            connected,
            detail: if connected {
                "polling"
            } else {
                "401 Unauthorized"
            }
            .to_owned(),
            last_success_at: Some(at.to_owned()),
            cursor: Some(cursor.to_owned()),
        }
    }

    /// A Telegram channel is `Connected` while a worker of its pool reached Telegram,
    /// `Disconnected` with the reason when none did, `NotReported` before any said;
    /// the cursor is the latest success's. A web chat has no `Connected`.
    #[test]
    fn a_platform_channel_is_connected_as_its_pools_workers_report() {
        let channel: Channel = serde_json::from_value(serde_json::json!({
            "apiVersion": "nexo.dev/v1alpha1", "kind": "Channel",
            "metadata": {"name": "bot", "namespace": "team", "generation": 1},
            "spec": {"defaultAgent": "a", "telegram": {"botToken": {"env": "T"}}},
        }))
        .unwrap();
        let agent: Agent = serde_json::from_value(serde_json::json!({
            "apiVersion": "nexo.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "a", "namespace": "team"},
            "spec": {"model": {"provider": "scripted", "script": [{"reply": "x"}]}},
        }))
        .unwrap();
        let mut pool: WorkerPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "nexo.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "default", "namespace": "team"},
            "spec": {"image": "nexo-worker:test", "nats": {"urls": ["nats://nats:4222"]}},
        }))
        .unwrap();
        let now = at("2026-12-01T00:00:00Z");
        let connected = |status: &ChannelStatus| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == condition::CONNECTED)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };

        let status = super::channel(&channel, Some(&agent), Some(&pool), &[], &now);
        let (state, reason, _) = connected(&status).unwrap();
        assert_eq!((state.as_str(), reason.as_str()), ("False", "NotReported"));

        pool.status = Some(Default::default());
        pool.status.as_mut().unwrap().channel_connections = vec![
            connection("worker-0", false, "2026-12-01T00:00:05Z", "41"),
            connection("worker-1", true, "2026-12-01T00:00:09Z", "43"),
        ];
        let status = super::channel(&channel, Some(&agent), Some(&pool), &[], &now);
        let (state, reason, message) = connected(&status).unwrap();
        assert_eq!((state.as_str(), reason.as_str()), ("True", "Connected"));
        assert_eq!(message, "polling (worker worker-1)");
        assert_eq!(status.cursor.as_deref(), Some("43"));
        assert_eq!(
            status.last_success_at.as_deref(),
            Some("2026-12-01T00:00:09Z")
        );

        pool.status.as_mut().unwrap().channel_connections.remove(1);
        let status = super::channel(&channel, Some(&agent), Some(&pool), &[], &now);
        let (state, reason, message) = connected(&status).unwrap();
        assert_eq!((state.as_str(), reason.as_str()), ("False", "Disconnected"));
        assert_eq!(message, "401 Unauthorized (worker worker-0)");

        let mut web = channel.clone();
        web.spec.telegram = None;
        web.spec.webchat = Some(Default::default());
        let status = super::channel(&web, Some(&agent), Some(&pool), &[], &now);
        assert_eq!(connected(&status), None);
    }
}
