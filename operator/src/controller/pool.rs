//! The WorkerPool controller: renders each pool's catalog, secrets and workload, and
//! reports the pool's status. Agents, channels and Secrets (their metadata) of a
//! namespace trigger the pools they may concern, and fill the caches a
//! reconciliation reads; only the values of referenced Secrets are read from the API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::crd::{
    Agent, Channel, Extension, PoolExtension, PoolHandOff, WorkerOwnership, WorkerPool,
    WorkerPoolStatus, condition,
};
use nexo_api::report::{CatalogReport, ChannelConnection, NotRunning, OverBudget};
use nexo_api::spec::SecretKeySelector;

use super::{
    Context, Error, RESYNC, Reconciler, Scope, SecretMeta, apply, apply_status, cache, cached,
    in_namespace, matching, missing_secrets, now, publish, read_secrets, secret_cache,
};
use crate::render::{self, PoolInputs, catalog, names};
use crate::scale;
use crate::status::{self, Verdict};

/// How soon a pool's workers are asked again while one of them is not on the current
/// catalog revision or reports something it cannot run, or while the pool scales
/// ([`scale`]): workers reload a catalog
/// within seconds of the kubelet's sync and retry what failed, and an agent's `Ready`
/// should follow them in seconds, not at the next [`RESYNC`].
pub const WORKER_RECHECK: Duration = Duration::from_secs(5);

/// The WorkerPool controller and the caches its reconciliation reads.
pub struct Pools {
    agents: Store<Agent>,
    channels: Store<Channel>,
    extensions: Store<Extension>,
    secrets: Store<SecretMeta>,
    /// The pools' StatefulSets, from the watch that also triggers their pools: a
    /// scale starts from the replicas the cluster holds.
    stateful_sets: Store<StatefulSet>,
}

impl Reconciler for Pools {
    type Object = WorkerPool;
    const NAME: &'static str = "workerpool";

    fn build(scope: &Scope, client: &Client) -> (Controller<WorkerPool>, Self) {
        let config = watcher::Config::default();
        let controller = Controller::new(scope.api::<WorkerPool>(client), config.clone());
        let pools = controller.store();
        let by_namespace = |store: Store<WorkerPool>| {
            move |namespace: Option<String>| matching(&store, namespace, |_| true)
        };
        let for_channels = by_namespace(pools.clone());
        let for_extensions = by_namespace(pools.clone());
        let for_secrets = by_namespace(pools);
        let (agents, agent_events) = cache::<Agent>(scope, client);
        let (channels, channel_events) = cache::<Channel>(scope, client);
        let (extensions, extension_events) = cache::<Extension>(scope, client);
        let (secrets, secret_events) = secret_cache(scope, client);
        let (stateful_sets, stateful_set_events) = cache::<StatefulSet>(scope, client);
        let controller = controller
            .owns(scope.api::<ConfigMap>(client), config.clone())
            .owns_stream(stateful_set_events)
            .owns(scope.api::<Service>(client), config.clone())
            .owns(scope.api::<PodDisruptionBudget>(client), config)
            .watches_stream(agent_events, |agent| {
                let pool = ObjectRef::new(&agent.spec.worker_pool);
                Some(match agent.namespace() {
                    Some(ns) => pool.within(&ns),
                    None => pool,
                })
            })
            .watches_stream(channel_events, move |channel| {
                for_channels(channel.namespace())
            })
            .watches_stream(extension_events, move |extension| {
                for_extensions(extension.namespace())
            })
            // Rotated or newly created Secrets a pool references. The pool's own
            // mirrored Secret is skipped (the operator wrote it); a hand edit of it is
            // undone at the next periodic reconcile.
            .watches_stream(secret_events, move |secret| {
                let ours = secret
                    .labels()
                    .get("app.kubernetes.io/managed-by")
                    .is_some_and(|v| v == super::FIELD_MANAGER);
                if ours {
                    Vec::new()
                } else {
                    for_secrets(secret.namespace())
                }
            });
        let pools = Self {
            agents,
            channels,
            extensions,
            secrets,
            stateful_sets,
        };
        (controller, pools)
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.agents.wait_until_ready(),
            self.channels.wait_until_ready(),
            self.extensions.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.stateful_sets.wait_until_ready(),
        );
    }

    async fn reconcile(&self, pool: Arc<WorkerPool>, ctx: &Context) -> Result<Action, Error> {
        reconcile(self, &pool, ctx).await
    }
}

async fn reconcile(caches: &Pools, pool: &WorkerPool, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let agents = in_namespace(&caches.agents, &namespace);
    let channels = in_namespace(&caches.channels, &namespace);
    let extensions = in_namespace(&caches.extensions, &namespace);
    let members = catalog::members(pool, &agents, &channels, &extensions);
    let referenced = catalog::referenced_secrets(&members);
    // Pool-level references too (the NATS and admin Secrets its pods mount): each
    // Secret is read once, whoever references it.
    let pool_refs = pool_secret_refs(pool);
    let wanted: BTreeSet<_> = referenced.union(&pool_refs).cloned().collect();
    let mut secrets = read_secrets(client, &caches.secrets, &namespace, &wanted).await?;
    let mut missing = missing_secrets(&pool_refs, &secrets);
    if let Some(tls) = &pool.spec.nats.tls
        && cached(&caches.secrets, &namespace, &tls.secret_name).is_none()
    {
        missing.push(format!("Secret `{}`", tls.secret_name));
    }
    // The pool's Secret mirrors only what agents and channels reference.
    secrets.retain(|key, _| referenced.contains(key));

    let previous = pool.status.clone().unwrap_or_default();
    let running = cached(&caches.stateful_sets, &namespace, &name);
    let pods = running
        .as_ref()
        .and_then(|s| s.spec.as_ref()?.replicas)
        .map(|r| r.max(0) as u32);
    let wanted = pool.spec.replicas.max(0) as u32;
    // Asked all at once: an unreachable worker costs one time-out, not one each.
    let reports: Vec<Option<CatalogReport>> = futures::future::join_all(
        (0..scale::asked(wanted, pods)).map(|ordinal| ctx.probe.report(pool, ordinal)),
    )
    .await;
    let now = now();
    let step = scale::step(&scale::Observed {
        wanted,
        placed: previous.placement_workers,
        pods,
        ready: running
            .as_ref()
            .and_then(|s| s.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            .max(0) as u32,
        hand_off: previous.hand_off.as_ref(),
        reports: &reports,
        now: &now,
        deadline: scale::hand_off_deadline(pool),
    });

    let objects = render::pool(PoolInputs {
        pool,
        agents: &agents,
        channels: &channels,
        extensions: &extensions,
        secrets: &secrets,
        workers: step.workers,
    });
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.catalog_config_map,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.worker_config_map,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.secrets,
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    apply(&services, &objects.headless_service).await?;
    apply(&services, &objects.http_service).await?;
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.disruption_budget,
    )
    .await?;
    let stateful_set = apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.stateful_set,
    )
    .await?;

    let observed = stateful_set.status.unwrap_or_default();
    let ownership = scale::ownership(&reports);
    let current: Vec<CatalogReport> = reports
        .into_iter()
        .flatten()
        .filter(|r| r.revision == objects.catalog.revision)
        .collect();
    let on_revision = current.len() as i32;
    let extensions = pool_extensions(&current);
    // What workers on the current catalog cannot run; older reports are stale.
    let mut over_budget: Vec<OverBudget> = current
        .iter()
        .flat_map(|r| r.over_budget.iter().cloned())
        .collect();
    over_budget.sort_by(|a, b| a.agent.cmp(&b.agent));
    let mut channel_connections: Vec<ChannelConnection> = current
        .iter()
        .flat_map(|r| r.channel_connections.iter().cloned())
        .collect();
    channel_connections.sort_by(|a, b| (&a.channel, &a.worker).cmp(&(&b.channel, &b.worker)));
    let not_running: Vec<NotRunning> = current.into_iter().flat_map(|r| r.failed).collect();
    // An extension a worker cannot reach yet is checked again soon too: its
    // Extension's status follows this one. So is an agent over its budget: the worker
    // lifts the refusal on its own when the UTC day ends, and the Agent's
    // `BudgetExceeded` should follow within seconds, not at the next resync.
    let settled = on_revision >= pool.spec.replicas
        && not_running.is_empty()
        && step.hand_off.is_none()
        && extensions.iter().all(|e| e.problem.is_none())
        && over_budget.is_empty();
    publish_scale(ctx, pool, &step).await;
    let status = pool_status(
        pool,
        &previous,
        &objects,
        PoolObservation {
            replicas: observed.replicas,
            ready_replicas: observed.ready_replicas.unwrap_or(0),
            workers_on_catalog_revision: on_revision,
            not_running,
            placement_workers: step.workers.placement,
            hand_off: step.hand_off,
            ownership,
            extensions,
            over_budget,
            channel_connections,
        },
        &missing,
    );
    if previous.catalog_revision.as_deref() != Some(objects.catalog.revision.as_str()) {
        publish(
            ctx,
            pool,
            EventType::Normal,
            "CatalogUpdated",
            format!(
                "catalog revision {} with {} agents and {} channels",
                objects.catalog.revision,
                objects.catalog.agents.len(),
                objects.catalog.channels.len()
            ),
        )
        .await;
    }
    apply_status(
        &Api::<WorkerPool>::namespaced(client.clone(), &namespace),
        &name,
        &status,
    )
    .await?;
    // The agent controller watches pools: the status just written moves their `Ready`.
    // A platform channel's `Connected` follows what the workers report: asked often
    // enough that a revoked token shows within a minute.
    let platform_channels = objects
        .catalog
        .channels
        .iter()
        .any(|c| c.spec.channel_type().is_some_and(|t| t.is_platform()));
    Ok(Action::requeue(match (settled, platform_channels) {
        (false, _) => WORKER_RECHECK,
        (true, true) => CONNECTION_RECHECK,
        (true, false) => RESYNC,
    }))
}

/// How often a settled pool with platform channels asks its workers again (their
/// channels' connections).
const CONNECTION_RECHECK: Duration = Duration::from_secs(30);

/// Events of a scale: when one begins, and when its deadline removed pods that still
/// held partitions.
async fn publish_scale(ctx: &Context, pool: &WorkerPool, step: &scale::Step) {
    if step.started
        && let Some(hand_off) = &step.hand_off
    {
        publish(
            ctx,
            pool,
            EventType::Normal,
            "Scaling",
            format!(
                "from {} to {} workers; partitions move before pods go and after new pods run",
                hand_off.from, hand_off.to
            ),
        )
        .await;
    }
    if !step.deadline_passed.is_empty() {
        publish(
            ctx,
            pool,
            EventType::Warning,
            "HandOffDeadlinePassed",
            format!(
                "removing workers that still hold partitions (or cannot be asked): {}; their shutdown hands off what they hold",
                ordinals(&step.deadline_passed)
            ),
        )
        .await;
    }
}

/// `3, 4` for ordinals 3 and 4.
fn ordinals(ordinals: &[u32]) -> String {
    ordinals
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the operator saw of a pool's workers, and where its scale stands.
#[derive(Debug, Clone, Default)]
pub struct PoolObservation {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub workers_on_catalog_revision: i32,
    pub not_running: Vec<NotRunning>,
    /// The catalog's `placement.workers` as written.
    pub placement_workers: u32,
    /// The scale under way ([`scale::step`]).
    pub hand_off: Option<PoolHandOff>,
    pub ownership: Vec<WorkerOwnership>,
    pub extensions: Vec<PoolExtension>,
    /// Agents the workers refuse turns of today (their budget is spent).
    pub over_budget: Vec<OverBudget>,
    /// What the workers report of their platform channels' connections.
    pub channel_connections: Vec<ChannelConnection>,
}

/// The extensions workers report, merged per extension: how many list its tools,
/// which tools (their union), and the first problem one reports.
pub fn pool_extensions(reports: &[CatalogReport]) -> Vec<PoolExtension> {
    let mut merged: BTreeMap<String, PoolExtension> = BTreeMap::new();
    for report in reports.iter().flat_map(|r| &r.extensions) {
        // Reports name `namespace/name`; a pool and its extensions share a namespace.
        let name = report
            .name
            .split_once('/')
            .map_or(report.name.as_str(), |(_, n)| n);
        let entry = merged
            .entry(name.to_owned())
            .or_insert_with(|| PoolExtension {
                name: name.to_owned(),
                ready_workers: 0,
                tools: Vec::new(),
                problem: None,
            });
        if report.ready {
            entry.ready_workers += 1;
            entry.tools.extend(report.tools.iter().cloned());
        } else if entry.problem.is_none() {
            entry.problem = Some(
                report
                    .problem
                    .clone()
                    .unwrap_or_else(|| "connecting".to_owned()),
            );
        }
    }
    merged
        .into_values()
        .map(|mut e| {
            e.tools.sort();
            e.tools.dedup();
            e
        })
        .collect()
}

/// Secret keys the pool's pods read directly (NATS credentials, admin token).
fn pool_secret_refs(pool: &WorkerPool) -> BTreeSet<SecretKeySelector> {
    let nats = &pool.spec.nats;
    let admin = pool
        .spec
        .admin_token_secret
        .as_ref()
        .map(|name| SecretKeySelector {
            name: name.clone(),
            key: "token".into(),
        });
    // Secrets the pool's extra `env` reads (unless marked optional).
    let env = pool.spec.env.iter().filter_map(|var| {
        let selector = var.value_from.as_ref()?.secret_key_ref.as_ref()?;
        (selector.optional != Some(true)).then(|| SecretKeySelector {
            name: selector.name.clone(),
            key: selector.key.clone(),
        })
    });
    [
        nats.user.as_ref().map(|u| u.password.clone()),
        nats.token.clone(),
        nats.nkey_seed.clone(),
        nats.credentials.clone(),
        admin,
    ]
    .into_iter()
    .flatten()
    .chain(env)
    .collect()
}

/// The pool's status from what was rendered and what the StatefulSet reports.
pub fn pool_status(
    pool: &WorkerPool,
    previous: &WorkerPoolStatus,
    objects: &render::PoolObjects,
    observed: PoolObservation,
    missing: &[String],
) -> WorkerPoolStatus {
    let PoolObservation {
        replicas,
        ready_replicas,
        workers_on_catalog_revision,
        not_running,
        placement_workers,
        hand_off,
        ownership,
        extensions,
        over_budget,
        channel_connections,
    } = observed;
    let wanted = pool.spec.replicas;
    let resolved = missing.is_empty();
    let ready = resolved && ready_replicas >= wanted && replicas == wanted && hand_off.is_none();
    let mut verdicts = vec![
        status::accepted(),
        status::resolved_refs(missing),
        Verdict::new(
            condition::SCHEDULED,
            true,
            "Rendered",
            format!("catalog revision {}", objects.catalog.revision),
        ),
        if ready {
            Verdict::new(
                condition::READY,
                true,
                "WorkersReady",
                format!("{ready_replicas}/{wanted} workers ready"),
            )
        } else if let Some(hand_off) = hand_off.as_ref().filter(|_| resolved) {
            Verdict::new(
                condition::READY,
                false,
                "Scaling",
                hand_off_message(hand_off),
            )
        } else {
            Verdict::new(
                condition::READY,
                false,
                "WorkersNotReady",
                format!("{ready_replicas}/{wanted} workers ready"),
            )
        },
    ];
    verdicts.extend(status::progress(ready, missing));
    if let Some(hand_off) = &hand_off
        && resolved
        && let Some(reconciling) = verdicts
            .iter_mut()
            .find(|v| v.type_ == condition::RECONCILING)
    {
        *reconciling = Verdict::new(
            condition::RECONCILING,
            true,
            "HandingOff",
            hand_off_message(hand_off),
        );
    }
    WorkerPoolStatus {
        observed_generation: pool.metadata.generation,
        conditions: status::merge(
            &previous.conditions,
            &verdicts,
            pool.metadata.generation,
            &now(),
        ),
        replicas,
        ready_replicas,
        selector: names::selector_string(&pool.name_any()),
        agents: objects.agent_count(),
        catalog_revision: Some(objects.catalog.revision.clone()),
        workers_on_catalog_revision,
        not_running,
        placement_workers: Some(placement_workers),
        hand_off,
        ownership,
        extensions,
        over_budget,
        channel_connections,
    }
}

/// What `Reconciling` says while a pool scales.
fn hand_off_message(hand_off: &PoolHandOff) -> String {
    let mut message = format!("scaling from {} to {} workers", hand_off.from, hand_off.to);
    if !hand_off.waiting_for.is_empty() {
        let what = if hand_off.to < hand_off.from {
            "to hand their partitions off"
        } else {
            "to run"
        };
        message.push_str(&format!(
            "; waiting for workers {} {what}",
            ordinals(&hand_off.waiting_for)
        ));
    }
    if let Some(deadline) = &hand_off.deadline {
        message.push_str(&format!(" (until {})", deadline.0));
    }
    message
}
