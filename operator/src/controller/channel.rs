//! The Channel controller: checks a channel's default agent and signing secret and
//! reports where it is served. The pool controller puts it into the catalog.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::crd::{Agent, Channel};

use super::{
    Context, Error, RESYNC, Reconciler, Scope, SecretMeta, apply_status, cache, cached, matching,
    missing_secrets, now, read_secrets, secret_cache,
};
use crate::status;

/// The Channel controller and the caches its reconciliation reads.
pub struct Channels {
    agents: Store<Agent>,
    secrets: Store<SecretMeta>,
}

impl Reconciler for Channels {
    type Object = Channel;
    const NAME: &'static str = "channel";

    fn build(scope: &Scope, client: &Client) -> (Controller<Channel>, Self) {
        let controller = Controller::new(scope.api::<Channel>(client), watcher::Config::default());
        let for_agents = controller.store();
        let for_secrets = controller.store();
        let (agents, agent_events) = cache::<Agent>(scope, client);
        let (secrets, secret_events) = secret_cache(scope, client);
        let controller = controller
            // The default agent's readiness is part of the channel's.
            .watches_stream(agent_events, move |agent| {
                matching(&for_agents, agent.namespace(), |c| {
                    c.spec.default_agent == agent.name_any()
                })
            })
            // The signing Secret appearing resolves the channel's reference.
            .watches_stream(secret_events, move |secret| {
                matching(&for_secrets, secret.namespace(), |c| {
                    signing_secret(c).is_some_and(|k| k.name == secret.name_any())
                })
            });
        (controller, Self { agents, secrets })
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.agents.wait_until_ready(),
            self.secrets.wait_until_ready(),
        );
    }

    async fn reconcile(&self, channel: Arc<Channel>, ctx: &Context) -> Result<Action, Error> {
        let namespace = channel.namespace().unwrap_or_default();
        let agent = cached(&self.agents, &namespace, &channel.spec.default_agent);
        let refs = BTreeSet::from_iter(signing_secret(&channel).cloned());
        let values = read_secrets(&ctx.client, &self.secrets, &namespace, &refs).await?;
        let missing = missing_secrets(&refs, &values);
        let status = status::channel(&channel, agent.as_deref(), &missing, &now());
        apply_status(
            &Api::<Channel>::namespaced(ctx.client.clone(), &namespace),
            &channel.name_any(),
            &status,
        )
        .await?;
        Ok(Action::requeue(RESYNC))
    }
}

/// The Secret key a webhook channel verifies signatures with.
fn signing_secret(channel: &Channel) -> Option<&nexo_api::spec::SecretKeySelector> {
    channel
        .spec
        .webhook
        .as_ref()?
        .signing_secret
        .as_ref()?
        .secret_key_ref
        .as_ref()
}
