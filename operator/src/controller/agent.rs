//! The Agent controller: resolves an agent's references, places it in its pool and
//! reports that in `status`. Its finalizer holds a deleted agent until the pool's
//! catalog no longer lists it, so the object disappears only once workers were told
//! to stop it.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::Catalog;
use nexo_api::crd::{Agent, Extension, WorkerPool, condition};

use super::{
    Context, Error, RESYNC, Reconciler, Scope, SecretMeta, apply, apply_status, cache, cached,
    matching, missing_secrets, now, publish, read_secrets, secret_cache,
};
use crate::render::{names, workload};
use crate::status::{self, AgentRefs};

/// Finalizer on every Agent.
pub const FINALIZER: &str = "nexo.dev/catalog-cleanup";

/// The Agent controller and the caches its reconciliation reads.
pub struct Agents {
    /// Agents as delegates: filled by a watch of its own, which also triggers the
    /// agents delegating to one that appears or goes (the controller's own watch
    /// triggers only the agent itself).
    delegates: Store<Agent>,
    pools: Store<WorkerPool>,
    secrets: Store<SecretMeta>,
    extensions: Store<Extension>,
}

impl Reconciler for Agents {
    type Object = Agent;
    const NAME: &'static str = "agent";

    fn build(scope: &Scope, client: &Client) -> (Controller<Agent>, Self) {
        let controller = Controller::new(scope.api::<Agent>(client), watcher::Config::default());
        let agents = controller.store();
        let (delegates, delegate_events) = cache::<Agent>(scope, client);
        let (pools, pool_events) = cache::<WorkerPool>(scope, client);
        let (secrets, secret_events) = secret_cache(scope, client);
        let (extensions, extension_events) = cache::<Extension>(scope, client);
        let for_extensions = agents.clone();
        let for_delegates = agents.clone();
        let for_pools = agents.clone();
        let for_secrets = agents;
        let controller = controller
            .watches_stream(delegate_events, move |delegate| {
                matching(&for_delegates, delegate.namespace(), |a| {
                    a.spec.delegates.contains(&delegate.name_any())
                })
            })
            // A pool's status (readiness, replicas, what its workers cannot run)
            // changes its agents' status.
            .watches_stream(pool_events, move |pool| {
                matching(&for_pools, pool.namespace(), |a| {
                    a.spec.worker_pool == pool.name_any()
                })
            })
            // An extension appearing, going, or becoming ready.
            .watches_stream(extension_events, move |extension| {
                matching(&for_extensions, extension.namespace(), |a| {
                    a.spec
                        .extensions
                        .iter()
                        .any(|u| u.name == extension.name_any())
                })
            })
            .watches_stream(secret_events, move |secret| {
                matching(&for_secrets, secret.namespace(), |a| {
                    a.spec
                        .secret_refs()
                        .filter_map(|k| k.secret_key_ref.as_ref())
                        .any(|k| k.name == secret.name_any())
                })
            });
        let reconciler = Self {
            delegates,
            pools,
            secrets,
            extensions,
        };
        (controller, reconciler)
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.delegates.wait_until_ready(),
            self.pools.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.extensions.wait_until_ready(),
        );
    }

    async fn reconcile(&self, agent: Arc<Agent>, ctx: &Context) -> Result<Action, Error> {
        let namespace = agent.namespace().unwrap_or_default();
        let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &namespace);
        finalizer(&api, FINALIZER, agent, |event| async {
            match event {
                Finalizer::Apply(agent) => self.apply_agent(&agent, ctx).await,
                Finalizer::Cleanup(agent) => cleanup(&agent, ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    }
}

impl Agents {
    async fn apply_agent(&self, agent: &Agent, ctx: &Context) -> Result<Action, Error> {
        let client = &ctx.client;
        let namespace = agent.namespace().unwrap_or_default();
        let pool_name = &agent.spec.worker_pool;
        let mut pool = cached(&self.pools, &namespace, pool_name).map(|p| (*p).clone());
        if pool.is_none()
            && let Some(default) = &ctx.default_pool
            && *pool_name == nexo_api::name::DEFAULT_POOL
        {
            let mut created = WorkerPool::new(nexo_api::name::DEFAULT_POOL, default.spec.clone());
            created.metadata.namespace = Some(namespace.clone());
            let pools: Api<WorkerPool> = Api::namespaced(client.clone(), &namespace);
            pool = Some(apply(&pools, &created).await?);
            tracing::info!(namespace, "created the default worker pool");
        }

        let refs = BTreeSet::from_iter(
            agent
                .spec
                .secret_refs()
                .filter_map(|k| k.secret_key_ref.clone()),
        );
        let values = read_secrets(client, &self.secrets, &namespace, &refs).await?;
        let mut missing = missing_secrets(&refs, &values);
        for delegate in &agent.spec.delegates {
            if cached(&self.delegates, &namespace, delegate).is_none() {
                missing.push(format!("Agent `{delegate}` (delegate)"));
            }
        }
        let mut unready = Vec::new();
        for used in &agent.spec.extensions {
            match cached(&self.extensions, &namespace, &used.name) {
                None => missing.push(format!("Extension `{}`", used.name)),
                Some(extension) => {
                    if let Some(why) = status::extension_unready(&extension) {
                        unready.push(format!("Extension `{}` ({why})", used.name));
                    }
                }
            }
        }

        let status = status::agent(
            agent,
            pool.as_ref(),
            &AgentRefs { missing, unready },
            &now(),
        );
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
        let agents: Api<Agent> = Api::namespaced(client.clone(), &namespace);
        apply_status(&agents, &agent.name_any(), &status).await?;
        Ok(Action::requeue(RESYNC))
    }
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
