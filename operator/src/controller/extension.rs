//! The Extension controller. A NATS extension with an image gets a Deployment of its
//! own, connected to its pool's NATS; its readiness is that Deployment's. Workers of
//! this version do not call extensions' tools yet, so every status says so, and an
//! extension without an image to run is accepted but not ready (`NotSupported`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use nexo_api::crd::{Extension, ExtensionStatus, WorkerPool, condition};

use super::{Context, Error, Scope, apply, matching, now, patch_status, record, serve};
use crate::render;
use crate::status::{self, Verdict};

const NAME: &str = "extension";
const NOT_CALLED: &str = "workers of this version do not call extension tools yet";

pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    let config = watcher::Config::default();
    let controller = Controller::new(scope.api::<Extension>(client), config.clone());
    let extensions = controller.store();
    let controller = controller
        .owns(scope.api::<Deployment>(client), config.clone())
        // A pool appearing or changing its NATS settings changes its extensions.
        .watches(scope.api::<WorkerPool>(client), config, move |pool| {
            matching(&extensions, pool.namespace(), |e| {
                e.spec
                    .nats
                    .as_ref()
                    .is_some_and(|n| n.worker_pool == pool.name_any())
            })
        });
    serve(NAME, controller, reconcile, ctx, shutdown).await;
}

pub async fn reconcile(extension: Arc<Extension>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&extension, &ctx).await;
    record(&ctx, NAME, &*extension, started, &result);
    result
}

async fn reconcile_inner(extension: &Extension, ctx: &Context) -> Result<Action, Error> {
    let namespace = extension.namespace().unwrap_or_default();
    let runs_image = extension.spec.nats.as_ref().filter(|n| n.image.is_some());
    let verdicts = match runs_image {
        None => vec![
            status::resolved_refs(&[]),
            Verdict::new(condition::READY, false, "NotSupported", NOT_CALLED),
        ],
        Some(nats) => {
            let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &namespace);
            match pools.get_opt(&nats.worker_pool).await? {
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
                    let deployments: Api<Deployment> =
                        Api::namespaced(ctx.client.clone(), &namespace);
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
            }
        }
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
    };
    let api: Api<Extension> = Api::namespaced(
        ctx.client.clone(),
        &extension.namespace().unwrap_or_default(),
    );
    patch_status(&api, &extension.name_any(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}
