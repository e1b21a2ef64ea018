//! The Extension controller. Workers connect the extensions their agents use and
//! report them (`GET /catalog`); pools gather that into `status.extensions`, and this
//! controller turns it into the Extension's status: `Ready` once a worker lists its
//! tools, with the tool names. A NATS extension with an image also gets a Deployment
//! of its own, connected to its pool's NATS.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::crd::{Agent, Extension, ExtensionStatus, PoolExtension, WorkerPool};

use super::{
    Context, Error, RESYNC, Reconciler, Scope, apply, apply_status, cache, cached, in_namespace,
    matching, now,
};
use crate::render;
use crate::status::{self, Verdict};

/// The Extension controller and the caches its reconciliation reads.
pub struct Extensions {
    pools: Store<WorkerPool>,
    agents: Store<Agent>,
}

impl Reconciler for Extensions {
    type Object = Extension;
    const NAME: &'static str = "extension";

    fn build(scope: &Scope, client: &Client) -> (Controller<Extension>, Self) {
        let config = watcher::Config::default();
        let controller = Controller::new(scope.api::<Extension>(client), config.clone());
        let extensions = controller.store();
        let for_agents = extensions.clone();
        let (pools, pool_events) = cache::<WorkerPool>(scope, client);
        let (agents, agent_events) = cache::<Agent>(scope, client);
        let controller = controller
            .owns(scope.api::<Deployment>(client), config)
            // A pool's status carries what its workers report about extensions (and a
            // pool's NATS settings shape a NATS extension's Deployment).
            .watches_stream(pool_events, move |pool| {
                matching(&extensions, pool.namespace(), |_| true)
            })
            // An agent starting or ceasing to use an extension.
            .watches_stream(agent_events, move |agent| {
                matching(&for_agents, agent.namespace(), |e| {
                    agent.spec.extensions.iter().any(|u| u.name == e.name_any())
                })
            });
        (controller, Self { pools, agents })
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.pools.wait_until_ready(),
            self.agents.wait_until_ready()
        );
    }

    async fn reconcile(&self, extension: Arc<Extension>, ctx: &Context) -> Result<Action, Error> {
        reconcile(self, &extension, ctx).await
    }
}

async fn reconcile(
    caches: &Extensions,
    extension: &Extension,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = extension.namespace().unwrap_or_default();
    let name = extension.name_any();
    let mut missing = Vec::new();
    let mut deployment = None;
    if let Some(nats) = extension.spec.nats.as_ref().filter(|n| n.image.is_some()) {
        match cached(&caches.pools, &namespace, &nats.worker_pool) {
            None => missing.push(format!("WorkerPool `{}`", nats.worker_pool)),
            Some(pool) => {
                let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
                let desired = render::extension::deployment(extension, &pool)
                    .expect("a NATS extension with an image renders a Deployment");
                let applied = apply(&deployments, &desired).await?;
                deployment = Some(
                    applied
                        .status
                        .and_then(|s| s.available_replicas)
                        .unwrap_or(0)
                        > 0,
                );
            }
        }
    }
    let users: Vec<String> = in_namespace(&caches.agents, &namespace)
        .into_iter()
        .filter(|a| a.spec.extensions.iter().any(|u| u.name == name))
        .map(|a| a.spec.worker_pool.clone())
        .collect();
    let reports: Vec<PoolExtension> = in_namespace(&caches.pools, &namespace)
        .into_iter()
        .filter(|p| users.contains(&p.name_any()))
        .filter_map(|p| p.status?.extensions.into_iter().find(|e| e.name == name))
        .collect();
    let observed = status::ExtensionObservation {
        used: !users.is_empty(),
        reports: &reports,
        deployment_available: deployment,
        missing: &missing,
    };
    finish(extension, ctx, status::extension(&observed)).await
}

async fn finish(
    extension: &Extension,
    ctx: &Context,
    (mut verdicts, tools, ready_workers): (Vec<Verdict>, Vec<String>, u32),
) -> Result<Action, Error> {
    verdicts.insert(0, status::accepted());
    let previous = extension
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = extension.metadata.generation;
    let status = ExtensionStatus {
        observed_generation: generation,
        conditions: status::merge(previous, &verdicts, generation, &now()),
        tools,
        ready_workers,
    };
    let api: Api<Extension> = Api::namespaced(
        ctx.client.clone(),
        &extension.namespace().unwrap_or_default(),
    );
    apply_status(&api, &extension.name_any(), &status).await?;
    Ok(Action::requeue(RESYNC))
}
