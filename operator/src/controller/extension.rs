//! The Extension controller. Workers of this version do not run extensions yet, so
//! an Extension is accepted (its schema is checked by the API server) and reported
//! as not ready with that reason, rather than silently ignored.

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use nexo_api::crd::{Extension, ExtensionStatus, condition};

use super::{Context, Error, Scope, now, patch_status, record, serve};
use crate::status::{self, Verdict};

const NAME: &str = "extension";

pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::new(
        scope.api::<Extension>(&ctx.client),
        watcher::Config::default(),
    );
    serve(NAME, controller, reconcile, ctx, shutdown).await;
}

pub async fn reconcile(extension: Arc<Extension>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let previous = extension
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = extension.metadata.generation;
    let verdicts = [
        Verdict::new(condition::ACCEPTED, true, "Valid", "spec accepted"),
        Verdict::new(
            condition::READY,
            false,
            "NotSupported",
            "workers of this version do not run extensions yet",
        ),
        Verdict::new(condition::RECONCILING, false, "Settled", ""),
        Verdict::new(
            condition::STALLED,
            true,
            "NotSupported",
            "workers of this version do not run extensions yet",
        ),
    ];
    let status = ExtensionStatus {
        observed_generation: generation,
        conditions: status::merge(previous, &verdicts, generation, &now()),
    };
    let api: Api<Extension> = Api::namespaced(
        ctx.client.clone(),
        &extension.namespace().unwrap_or_default(),
    );
    let result = patch_status(&api, &extension.name_any(), &status)
        .await
        .map(|()| Action::await_change());
    record(&ctx, NAME, &*extension, started, &result);
    result
}
