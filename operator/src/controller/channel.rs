//! The Channel controller: checks a channel's default agent and secrets, reports where
//! it is served and, for a platform channel, whether the pool's workers reach the
//! platform. The pool controller puts it into the catalog.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use nexo_api::crd::{Agent, Channel, WorkerPool};

use super::{
    Context, Error, RESYNC, Reconciler, Scope, SecretMeta, apply_status, cache, cached, matching,
    missing_secrets, now, read_secrets, secret_cache,
};
use crate::status;

/// The Channel controller and the caches its reconciliation reads.
pub struct Channels {
    agents: Store<Agent>,
    pools: Store<WorkerPool>,
    secrets: Store<SecretMeta>,
}

impl Reconciler for Channels {
    type Object = Channel;
    const NAME: &'static str = "channel";

    fn build(scope: &Scope, client: &Client) -> (Controller<Channel>, Self) {
        let controller = Controller::new(scope.api::<Channel>(client), watcher::Config::default());
        let for_agents = controller.store();
        let for_pools = controller.store();
        let for_secrets = controller.store();
        let (agents, agent_events) = cache::<Agent>(scope, client);
        let agents_of_pools = agents.clone();
        let (pools, pool_events) = cache::<WorkerPool>(scope, client);
        let (secrets, secret_events) = secret_cache(scope, client);
        let controller = controller
            // The default agent's readiness is part of the channel's, and the
            // routes' agents are its references.
            .watches_stream(agent_events, move |agent| {
                matching(&for_agents, agent.namespace(), |c| {
                    c.spec.agents().contains(&agent.name_any().as_str())
                })
            })
            // What the pool's workers report of a platform channel's connection is
            // its `Connected` condition: the pool's status moves the platform
            // channels it serves (through their default agent), no others.
            .watches_stream(pool_events, move |pool| {
                let namespace = pool.namespace();
                matching(&for_pools, namespace.clone(), |c| {
                    c.spec.channel_type().is_some_and(|t| t.is_platform())
                        && cached(
                            &agents_of_pools,
                            namespace.as_deref().unwrap_or_default(),
                            &c.spec.default_agent,
                        )
                        .is_some_and(|a| a.spec.worker_pool == pool.name_any())
                })
            })
            // A Secret appearing resolves the channel's reference to it.
            .watches_stream(secret_events, move |secret| {
                matching(&for_secrets, secret.namespace(), |c| {
                    secret_keys(c).any(|k| k.name == secret.name_any())
                })
            });
        (
            controller,
            Self {
                agents,
                pools,
                secrets,
            },
        )
    }

    async fn ready(&self) {
        let _ = futures::join!(
            self.agents.wait_until_ready(),
            self.pools.wait_until_ready(),
            self.secrets.wait_until_ready(),
        );
    }

    async fn reconcile(&self, channel: Arc<Channel>, ctx: &Context) -> Result<Action, Error> {
        let namespace = channel.namespace().unwrap_or_default();
        let agent = cached(&self.agents, &namespace, &channel.spec.default_agent);
        let pool = agent
            .as_ref()
            .and_then(|a| cached(&self.pools, &namespace, &a.spec.worker_pool));
        let refs = BTreeSet::from_iter(secret_keys(&channel).cloned());
        let values = read_secrets(&ctx.client, &self.secrets, &namespace, &refs).await?;
        let missing = missing_secrets(&refs, &values);
        let pool_name = agent.as_ref().map(|a| a.spec.worker_pool.clone());
        let mut missing = missing;
        for routed in channel.spec.routes.iter().map(|r| &r.agent) {
            match cached(&self.agents, &namespace, routed) {
                None => missing.push(format!("Agent `{routed}` (a route's)")),
                Some(a) if Some(&a.spec.worker_pool) != pool_name.as_ref() => missing.push(format!(
                    "Agent `{routed}` in pool `{}` (a route's agent must be in the default agent's pool `{}`)",
                    a.spec.worker_pool,
                    pool_name.as_deref().unwrap_or_default()
                )),
                Some(_) => {}
            }
        }
        let status = status::channel(
            &channel,
            agent.as_deref(),
            pool.as_deref(),
            &missing,
            &now(),
        );
        apply_status(
            &Api::<Channel>::namespaced(ctx.client.clone(), &namespace),
            &channel.name_any(),
            &status,
        )
        .await?;
        Ok(Action::requeue(RESYNC))
    }
}

/// The Secret keys a channel reads (a webhook's signing secret, a bot's token, …).
fn secret_keys(channel: &Channel) -> impl Iterator<Item = &nexo_api::spec::SecretKeySelector> {
    channel
        .spec
        .secret_refs()
        .filter_map(|r| r.secret_key_ref.as_ref())
}
