//! The WorkerPool controller: renders each pool's catalog, secrets and workload, and
//! reports the pool's status. Agents, channels and Secrets (their metadata) of a
//! namespace trigger the pools they may concern, and fill the caches a
//! reconciliation reads; only the values of referenced Secrets are read from the API.

use std::collections::BTreeSet;
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
use nexo_api::crd::{Agent, Channel, WorkerPool, WorkerPoolStatus, condition};
use nexo_api::report::{CatalogReport, NotRunning};
use nexo_api::spec::SecretKeySelector;

use super::{
    Context, Error, RESYNC, Reconciler, Scope, SecretMeta, apply, apply_status, cache, cached,
    in_namespace, matching, missing_secrets, now, publish, read_secrets, secret_cache,
};
use crate::render::{self, PoolInputs, catalog, names};
use crate::status::{self, Verdict};

/// How soon a pool's workers are asked again while one of them is not on the current
/// catalog revision or reports something it cannot run: workers reload a catalog
/// within seconds of the kubelet's sync and retry what failed, and an agent's `Ready`
/// should follow them in seconds, not at the next [`RESYNC`].
pub const WORKER_RECHECK: Duration = Duration::from_secs(5);

/// The WorkerPool controller and the caches its reconciliation reads.
pub struct Pools {
    agents: Store<Agent>,
    channels: Store<Channel>,
    secrets: Store<SecretMeta>,
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
        let for_secrets = by_namespace(pools);
        let (agents, agent_events) = cache::<Agent>(scope, client);
        let (channels, channel_events) = cache::<Channel>(scope, client);
        let (secrets, secret_events) = secret_cache(scope, client);
        let controller = controller
            .owns(scope.api::<ConfigMap>(client), config.clone())
            .owns(scope.api::<StatefulSet>(client), config.clone())
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
            secrets,
        };
        (controller, pools)
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.agents.wait_until_ready(),
            self.channels.wait_until_ready(),
            self.secrets.wait_until_ready(),
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
    let (members, served) = catalog::members(pool, &agents, &channels);
    let referenced = catalog::referenced_secrets(&members, &served);
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

    let objects = render::pool(PoolInputs {
        pool,
        agents: &agents,
        channels: &channels,
        secrets: &secrets,
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
    let previous = pool.status.clone().unwrap_or_default();
    // Asked all at once: an unreachable worker costs one time-out, not one each.
    let reports = futures::future::join_all(
        (0..pool.spec.replicas.max(0) as u32).map(|ordinal| ctx.probe.report(pool, ordinal)),
    )
    .await;
    let current: Vec<CatalogReport> = reports
        .into_iter()
        .flatten()
        .filter(|r| r.revision == objects.catalog.revision)
        .collect();
    let on_revision = current.len() as i32;
    // What workers on the current catalog cannot run; older reports are stale.
    let not_running: Vec<NotRunning> = current.into_iter().flat_map(|r| r.failed).collect();
    let settled = on_revision >= pool.spec.replicas && not_running.is_empty();
    let status = pool_status(
        pool,
        &previous,
        &objects,
        PoolObservation {
            replicas: observed.replicas,
            ready_replicas: observed.ready_replicas.unwrap_or(0),
            workers_on_catalog_revision: on_revision,
            not_running,
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
    Ok(Action::requeue(if settled {
        RESYNC
    } else {
        WORKER_RECHECK
    }))
}

/// What the operator saw of a pool's workers.
#[derive(Debug, Clone, Default)]
pub struct PoolObservation {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub workers_on_catalog_revision: i32,
    pub not_running: Vec<NotRunning>,
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
    } = observed;
    let wanted = pool.spec.replicas;
    let resolved = missing.is_empty();
    let ready = resolved && ready_replicas >= wanted && replicas == wanted;
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
    }
}
