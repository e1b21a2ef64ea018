//! The Agent controller: resolves an agent's references, places it in its pool and
//! reports that in `status`. Its finalizer holds a deleted agent until the pool's
//! catalog no longer lists it, so the object disappears only once workers were told
//! to stop it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use nexo_api::Catalog;
use nexo_api::crd::{Agent, WorkerPool, condition};

use super::{
    Context, Error, Scope, apply, matching, missing_secrets, now, patch_status, publish,
    read_secrets, record, serve,
};
use crate::render::{names, workload};
use crate::status::{self, AgentRefs};

const NAME: &str = "agent";
/// Finalizer on every Agent.
pub const FINALIZER: &str = "nexo.dev/catalog-cleanup";

pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    let config = watcher::Config::default();
    let controller = Controller::new(scope.api::<Agent>(client), config.clone());
    let agents = controller.store();
    let for_secrets = agents.clone();
    let controller = controller
        // A pool's status (readiness, replicas) changes its agents' status.
        .watches(
            scope.api::<WorkerPool>(client),
            config.clone(),
            move |pool| {
                matching(&agents, pool.namespace(), |a| {
                    a.spec.worker_pool == pool.name_any()
                })
            },
        )
        .watches(scope.api::<Secret>(client), config, move |secret| {
            matching(&for_secrets, secret.namespace(), |a| {
                a.spec
                    .secret_refs()
                    .filter_map(|k| k.secret_key_ref.as_ref())
                    .any(|k| k.name == secret.name_any())
            })
        });
    serve(NAME, controller, reconcile, ctx, shutdown).await;
}

pub async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = agent.namespace().unwrap_or_default();
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, agent.clone(), |event| async {
        match event {
            Finalizer::Apply(agent) => apply_agent(&agent, &ctx).await,
            Finalizer::Cleanup(agent) => cleanup(&agent, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    record(&ctx, NAME, &*agent, started, &result);
    result
}

async fn apply_agent(agent: &Agent, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let namespace = agent.namespace().unwrap_or_default();
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), &namespace);
    let mut pool = pools.get_opt(&agent.spec.worker_pool).await?;
    if pool.is_none()
        && let Some(default) = &ctx.default_pool
        && agent.spec.worker_pool == nexo_api::name::DEFAULT_POOL
    {
        let mut created = WorkerPool::new(nexo_api::name::DEFAULT_POOL, default.spec.clone());
        created.metadata.namespace = Some(namespace.clone());
        pool = Some(apply(&pools, &created).await?);
        tracing::info!(namespace, "created the default worker pool");
    }

    let refs = BTreeSet::from_iter(
        agent
            .spec
            .secret_refs()
            .filter_map(|k| k.secret_key_ref.clone()),
    );
    let values = read_secrets(client, &namespace, &refs).await?;
    let mut missing = missing_secrets(&refs, &values);
    let agents: Api<Agent> = Api::namespaced(client.clone(), &namespace);
    for delegate in &agent.spec.delegates {
        if agents.get_opt(delegate).await?.is_none() {
            missing.push(format!("Agent `{delegate}` (delegate)"));
        }
    }

    let status = status::agent(agent, pool.as_ref(), &AgentRefs { missing }, &now());
    let was_ready = is_ready(agent.status.as_ref().map(|s| s.conditions.as_slice()));
    let ready = is_ready(Some(&status.conditions));
    if was_ready != ready {
        let (type_, reason) = if ready {
            (EventType::Normal, "Ready")
        } else {
            (EventType::Warning, "NotReady")
        };
        let message = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish(ctx, agent, type_, reason, message).await;
    }
    patch_status(&agents, &agent.name_any(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn is_ready(
    conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
) -> bool {
    conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == condition::READY && c.status == "True")
}

/// The agent is deleted: done once its pool's catalog no longer lists it (the pool
/// controller rewrites the catalog as soon as it sees the deletion).
async fn cleanup(agent: &Agent, ctx: &Context) -> Result<Action, Error> {
    let namespace = agent.namespace().unwrap_or_default();
    let pool = &agent.spec.worker_pool;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(config_map) = config_maps.get_opt(&names::catalog(pool)).await? else {
        return Ok(Action::await_change());
    };
    let listed = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(workload::CATALOG_FILE))
        .and_then(|text| serde_saphyr::from_str::<Catalog>(text).ok())
        .is_some_and(|c| c.agents.iter().any(|a| a.name == agent.name_any()));
    if listed {
        return Err(Error::StillInCatalog {
            agent: agent.name_any(),
            pool: pool.clone(),
        });
    }
    publish(
        ctx,
        agent,
        EventType::Normal,
        "Removed",
        format!("removed from the catalog of pool `{pool}`"),
    )
    .await;
    Ok(Action::await_change())
}
