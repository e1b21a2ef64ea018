//! The Extension controller. A NATS extension with an image gets a Deployment of its
//! own, connected to its pool's NATS; its readiness is that Deployment's. Workers of
//! this version do not call extensions' tools yet, so every status says so, and an
//! extension without an image to run is accepted but not ready (`NotSupported`).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::crd::{Extension, ExtensionStatus, WorkerPool, condition};

use super::{
    Context, Error, RESYNC, Reconciler, Scope, apply, apply_status, cache, cached, matching, now,
};
use crate::render;
use crate::status::{self, Verdict};

const NOT_CALLED: &str = "workers of this version do not call extension tools yet";

/// The Extension controller and the cache its reconciliation reads.
pub struct Extensions {
    pools: Store<WorkerPool>,
}

impl Reconciler for Extensions {
    type Object = Extension;
    const NAME: &'static str = "extension";

    fn build(scope: &Scope, client: &Client) -> (Controller<Extension>, Self) {
        let config = watcher::Config::default();
        let controller = Controller::new(scope.api::<Extension>(client), config.clone());
        let extensions = controller.store();
        let (pools, pool_events) = cache::<WorkerPool>(scope, client);
        let controller = controller
            .owns(scope.api::<Deployment>(client), config)
            // A pool appearing or changing its NATS settings changes its extensions.
            .watches_stream(pool_events, move |pool| {
                matching(&extensions, pool.namespace(), |e| {
                    e.spec
                        .nats
                        .as_ref()
                        .is_some_and(|n| n.worker_pool == pool.name_any())
                })
            });
        (controller, Self { pools })
    }

    async fn ready(&self) {
        let _ = self.pools.wait_until_ready().await;
    }

    async fn reconcile(&self, extension: Arc<Extension>, ctx: &Context) -> Result<Action, Error> {
        reconcile(&self.pools, &extension, ctx).await
    }
}

async fn reconcile(
    pools: &Store<WorkerPool>,
    extension: &Extension,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = extension.namespace().unwrap_or_default();
    let runs_image = extension.spec.nats.as_ref().filter(|n| n.image.is_some());
    let verdicts = match runs_image {
        None => vec![
            status::resolved_refs(&[]),
            Verdict::new(condition::READY, false, "NotSupported", NOT_CALLED),
        ],
        Some(nats) => match cached(pools, &namespace, &nats.worker_pool) {
            None => {
                let missing = [format!("WorkerPool `{}`", nats.worker_pool)];
                let mut verdicts = vec![
                    status::resolved_refs(&missing),
                    Verdict::new(
                        condition::READY,
                        false,
                        "MissingReferences",
                        format!("not found: WorkerPool `{}`", nats.worker_pool),
                    ),
                ];
                verdicts.extend(status::progress(false, &missing));
                return finish(extension, ctx, verdicts).await;
            }
            Some(pool) => {
                let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
                let desired = render::extension::deployment(extension, &pool)
                    .expect("a NATS extension with an image renders a Deployment");
                let applied = apply(&deployments, &desired).await?;
                let available = applied
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                vec![
                    status::resolved_refs(&[]),
                    if available > 0 {
                        Verdict::new(
                            condition::READY,
                            true,
                            "Running",
                            format!("the extension's Deployment is available; {NOT_CALLED}"),
                        )
                    } else {
                        Verdict::new(
                            condition::READY,
                            false,
                            "DeploymentNotAvailable",
                            "waiting for the extension's Deployment",
                        )
                    },
                ]
            }
        },
    };
    let ready = verdicts.iter().any(|v| v.type_ == condition::READY && v.ok);
    let mut verdicts = verdicts;
    // Without an image there is nothing the cluster can do: stalled, not progressing.
    let stalled = runs_image.is_none();
    verdicts.push(Verdict::new(
        condition::RECONCILING,
        !ready && !stalled,
        if ready || stalled {
            "Settled"
        } else {
            "Progressing"
        },
        "",
    ));
    verdicts.push(Verdict::new(
        condition::STALLED,
        stalled,
        if stalled {
            "NotSupported"
        } else {
            "Progressing"
        },
        if stalled { NOT_CALLED } else { "" },
    ));
    finish(extension, ctx, verdicts).await
}

async fn finish(
    extension: &Extension,
    ctx: &Context,
    mut verdicts: Vec<Verdict>,
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
        tools: Vec::new(),
        ready_workers: 0,
    };
    let api: Api<Extension> = Api::namespaced(
        ctx.client.clone(),
        &extension.namespace().unwrap_or_default(),
    );
    apply_status(&api, &extension.name_any(), &status).await?;
    Ok(Action::requeue(RESYNC))
}
