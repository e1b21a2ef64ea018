//! One channel instance of the catalog: built (its outbound subscription) apart from
//! being started; served by its HTTP routes, a durable router consumer moving its
//! inbound messages to its agent, and a task handing its agent's answers to it.

use std::sync::Arc;

use axum::Router;
use nexo_api::config::Resource;
use nexo_api::report::ResourceKind;
use nexo_api::spec::ChannelSpec;
use nexo_api::subject;
use tokio_util::sync::CancellationToken;

use super::consumer::{ConsumerSpec, RunningConsumer};
use super::error::BuildError;
use super::shared::Shared;
use super::tasks::Tasks;
use crate::broker::Subscription;
use crate::channels::delivery::DeliverAnswers;
use crate::channels::{self, Channel, Delivery, router::Route};
use crate::lifecycle::Phase;
use crate::secrets::Fingerprint;

/// Concurrent deliveries a channel's router handles.
const ROUTER_CONCURRENCY: usize = 16;
/// Answers of a durable channel instance one worker sends at once (those of one
/// conversation one after another, `queue::lanes`). The platforms limit a bot's rate
/// per chat and overall (Telegram: about 1 message a second per chat, 30 overall), so
/// more would only wait in their limiter.
const DELIVERY_CONCURRENCY: usize = 8;

/// A channel instance built but not started yet.
pub struct BuiltChannel {
    channel: Arc<dyn Channel>,
    /// The answers, for a [`Delivery::Broadcast`] instance (a durable one consumes
    /// them once started).
    outbound: Option<Subscription>,
    /// Closes the instance's intake: cancelled when it is stopped, and when the
    /// worker starts draining.
    intake: CancellationToken,
    /// The mounted secrets (a webhook's signing secret) the instance read.
    fingerprint: Fingerprint,
}

/// Builds the channel instance `resource` describes and subscribes to its answers.
pub async fn build_channel(
    shared: &Shared,
    resource: &Resource<ChannelSpec>,
) -> Result<Option<BuiltChannel>, BuildError> {
    let intake = shared.lifecycle.reached(Phase::Draining).child_token();
    let secrets = shared.secrets.recording();
    let inputs = channels::ChannelInputs {
        broker: shared.broker.clone(),
        metrics: shared.metrics.clone(),
        secrets: &secrets,
        connections: &shared.connections,
        intake: intake.clone(),
        data_dir: &shared.data_dir,
        ownership: shared.ownership.as_deref(),
    };
    let Some(channel) = channels::from_resource(resource, inputs) else {
        return Ok(None);
    };
    let outbound = match channel.context().delivery {
        Delivery::Broadcast => Some(channel.context().subscribe_outbound().await.map_err(
            |source| BuildError::Channel {
                channel: resource.key(),
                source,
            },
        )?),
        Delivery::Durable => None,
    };
    Ok(Some(BuiltChannel {
        channel,
        outbound,
        intake,
        fingerprint: secrets.fingerprint(),
    }))
}

/// A served channel instance.
pub struct RunningChannel {
    pub resource: Resource<ChannelSpec>,
    pub routes: Router,
    router: RunningConsumer,
    /// The durable consumer of a [`Delivery::Durable`] instance's answers.
    delivery: Option<RunningConsumer>,
    /// The router's durable consumer name (a metric label).
    router_name: String,
    /// Stops the outbound delivery (which then closes the channel).
    outbound: CancellationToken,
    intake: CancellationToken,
    fingerprint: Fingerprint,
}

impl RunningChannel {
    /// Starts the channel; its outbound delivery runs in `tasks` until the worker
    /// closes (or the instance is stopped).
    pub fn start(
        shared: &Shared,
        resource: Resource<ChannelSpec>,
        built: BuiltChannel,
        tasks: &mut Tasks,
    ) -> Self {
        let BuiltChannel {
            channel,
            outbound,
            intake,
            fingerprint,
        } = built;
        let route = Route {
            channel_type: channel.context().kind.as_str(),
            instance: resource.key(),
            spec: resource.spec.clone(),
            broker: shared.broker.clone(),
        };
        let router_name = route.consumer();
        let tracked = Arc::new(shared.health.track(ResourceKind::Channel, resource.key()));
        let router = RunningConsumer::start(
            shared,
            ConsumerSpec {
                name: router_name.clone(),
                filter: route.inbound(),
                concurrency: ROUTER_CONCURRENCY,
                handler: Arc::new(route),
            },
            tracked.clone(),
            |_| async {},
        );
        // A poller stops with the intake: nothing it fetched could be accepted after.
        if let Some(work) = channel.clone().background(intake.clone()) {
            tasks.draining.spawn(work);
        }
        let stop_outbound = shared.lifecycle.reached(Phase::Closing).child_token();
        let delivery = match outbound {
            Some(outbound) => {
                tasks.delivery.spawn(channels::deliver_outbound(
                    channel.clone(),
                    outbound,
                    stop_outbound.clone(),
                ));
                None
            }
            None => {
                let kind = channel.context().kind.as_str();
                let key = resource.key();
                Some(RunningConsumer::start(
                    shared,
                    ConsumerSpec {
                        name: subject::delivery_consumer(kind, &key),
                        filter: subject::delivery(kind, &key),
                        concurrency: DELIVERY_CONCURRENCY,
                        handler: Arc::new(DeliverAnswers::new(channel.clone())),
                    },
                    tracked,
                    |_| async {},
                ))
            }
        };
        Self {
            resource,
            routes: channel.routes(),
            router,
            delivery,
            router_name,
            outbound: stop_outbound,
            intake,
            fingerprint,
        }
    }

    /// Whether this instance serves `resource` as it is, with its current secrets.
    pub fn is_current(&self, shared: &Shared, resource: &Resource<ChannelSpec>) -> bool {
        self.resource == *resource && !shared.secret_watch.rotated(&self.fingerprint)
    }

    /// The mounted secret files the instance was built with.
    pub fn secret_files(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        self.fingerprint.files()
    }

    /// Stops the instance for good (it left this worker), as [`Self::stop_replaced`]
    /// does, and removes its metric series once it has closed, unless it has been
    /// started again meanwhile.
    pub fn stop(self, shared: &Shared, tasks: &mut Tasks) {
        let (metrics, health) = (shared.metrics.clone(), shared.health.clone());
        let key = self.resource.key();
        let kind = self.resource.spec.channel_type();
        let router = self.router_name.clone();
        self.stop_then(shared, tasks, move || {
            // Not if the instance was started again meanwhile: the series are its.
            if let Some(kind) = kind
                && !health.is_started(ResourceKind::Channel, &key)
            {
                metrics.forget_channel(kind.as_str(), &key.name, &router);
            }
        });
    }

    /// Stops routing new messages at once; answers to requests this instance still
    /// holds (a synchronous webhook call, an open chat socket) keep arriving for the
    /// drain period (or until the worker closes), then the instance closes. Its
    /// metric series go on with the version that replaces it.
    pub fn stop_replaced(self, shared: &Shared, tasks: &mut Tasks) {
        self.stop_then(shared, tasks, || {});
    }

    fn stop_then(self, shared: &Shared, tasks: &mut Tasks, closed: impl FnOnce() + Send + 'static) {
        // Requests still reaching this instance (its routes were just replaced) are
        // refused: nothing would route them.
        self.intake.cancel();
        let (routed, router_stopped) = tokio::sync::oneshot::channel();
        let router = self.router.stop();
        // Answers still waiting for a durable instance stay in their stream for the
        // instance that replaces this one, or another worker.
        let delivery = self.delivery.map(RunningConsumer::stop);
        tasks.draining.spawn(async move {
            router.await;
            if let Some(delivery) = delivery {
                delivery.await;
            }
            let _ = routed.send(());
        });
        let drain = shared.drain;
        let closing = shared.lifecycle.reached(Phase::Closing);
        let outbound = self.outbound;
        tasks.delivery.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                () = closing.cancelled() => {}
            }
            outbound.cancel();
            // The router is done too (or the worker is shutting down) before `closed`.
            let _ = router_stopped.await;
            closed();
        });
    }
}
