//! The Channel controller: checks a channel's default agent and signing secret and
//! reports where it is served. The pool controller puts it into the catalog.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use nexo_api::crd::{Agent, Channel};

use super::{
    Context, Error, Scope, matching, missing_secrets, now, patch_status, read_secrets, record,
    serve,
};
use crate::status;

const NAME: &str = "channel";

pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    let config = watcher::Config::default();
    let controller = Controller::new(scope.api::<Channel>(client), config.clone());
    let channels = controller.store();
    let controller = controller
        // The default agent's readiness is part of the channel's.
        .watches(scope.api::<Agent>(client), config, move |agent| {
            matching(&channels, agent.namespace(), |c| {
                c.spec.default_agent == agent.name_any()
            })
        });
    serve(NAME, controller, reconcile, ctx, shutdown).await;
}

pub async fn reconcile(channel: Arc<Channel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&channel, &ctx).await;
    record(&ctx, NAME, &*channel, started, &result);
    result
}

async fn reconcile_inner(channel: &Channel, ctx: &Context) -> Result<Action, Error> {
    let namespace = channel.namespace().unwrap_or_default();
    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), &namespace);
    let agent = agents.get_opt(&channel.spec.default_agent).await?;
    let refs = BTreeSet::from_iter(
        channel
            .spec
            .webhook
            .as_ref()
            .and_then(|w| w.signing_secret.as_ref())
            .and_then(|s| s.secret_key_ref.clone()),
    );
    let values = read_secrets(&ctx.client, &namespace, &refs).await?;
    let missing = missing_secrets(&refs, &values);
    let status = status::channel(channel, agent.as_ref(), &missing, &now());
    patch_status(
        &Api::<Channel>::namespaced(ctx.client.clone(), &namespace),
        &channel.name_any(),
        &status,
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}
