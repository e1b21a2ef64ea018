//! One durable consumer run in its own task: attached in the background (again, with
//! backoff, while the broker refuses), reported in [`Health`](super::health::Health) while it is
//! not taking work, and stopped on its own or when the worker starts draining.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::health::Tracked;
use super::shared::Shared;
use crate::broker::{Broker, BrokerError, ConsumeOptions};
use crate::lifecycle::Phase;
use crate::queue::{ConsumerLoop, Handler};

/// Waits between attempts to attach a consumer the broker refused (NATS unreachable,
/// say): short at first, since most outages are blips, and never more than a few
/// seconds, so a consumer is back soon after the broker is.
const ATTACH_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(200))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

/// What a durable consumer is and what it runs.
pub(super) struct ConsumerSpec {
    /// The durable consumer's name (shared by the workers of a pool).
    pub name: String,
    /// The subject it consumes.
    pub filter: String,
    pub concurrency: usize,
    pub handler: Arc<dyn Handler>,
}

/// A durable consumer running in its own task.
pub struct RunningConsumer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningConsumer {
    /// Runs the consumer in its own task, which first waits for `before` (an agent's
    /// memory preparation; nothing for a channel's router), then attaches (again,
    /// with backoff, while the broker refuses) and runs the handler on its
    /// deliveries. Returns at once: nothing here waits on the broker, so a start
    /// during a NATS outage is not held up; work published meanwhile waits in the
    /// broker (the stream, or the local bus's unclaimed work). `before` reports
    /// through the component's [`Tracked`] while it cannot finish (the consumers of
    /// one component, a channel's router and its delivery, share it).
    pub(super) fn start<F, Fut>(
        shared: &Shared,
        spec: ConsumerSpec,
        tracked: impl Into<Arc<Tracked>>,
        before: F,
    ) -> Self
    where
        F: FnOnce(Arc<Tracked>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracked = tracked.into();
        let before = before(tracked.clone());
        let (stop, serve) = Serve::new(shared, spec, tracked);
        let cancel = stop.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = before => {}
            }
            serve.run().await;
        });
        Self { stop, task }
    }

    /// Stops fetching; the returned future resolves once running work has finished,
    /// or at the drain deadline, when what did not finish has been handed back to the
    /// broker (so another worker, or this one, gets it again).
    pub fn stop(self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.cancel();
        async move {
            if let Err(err) = self.task.await {
                tracing::error!(error = %err, "consumer task failed");
            }
        }
    }
}

/// One durable consumer, ready to run.
struct Serve {
    broker: Arc<dyn Broker>,
    name: String,
    filter: String,
    options: ConsumeOptions,
    tracked: Arc<Tracked>,
    consumer: ConsumerLoop,
    handler: Arc<dyn Handler>,
    cancel: CancellationToken,
}

impl Serve {
    /// The consumer's stop token (it also stops when the worker starts draining),
    /// and what serves it.
    fn new(
        shared: &Shared,
        spec: ConsumerSpec,
        tracked: Arc<Tracked>,
    ) -> (CancellationToken, Self) {
        let options = shared.consume_options();
        let consumer = ConsumerLoop {
            name: spec.name.clone(),
            concurrency: spec.concurrency,
            max_attempts: shared.delivery.max_attempts,
            drain: shared.drain,
            progress_every: (options.ack_wait / 3).max(Duration::from_secs(1)),
            dead_letters: shared.queue.clone(),
            metrics: shared.metrics.clone(),
        };
        let stop = shared.lifecycle.reached(Phase::Draining).child_token();
        let serve = Serve {
            broker: shared.broker.clone(),
            name: spec.name,
            filter: spec.filter,
            options,
            tracked,
            consumer,
            handler: spec.handler,
            cancel: stop.clone(),
        };
        (stop, serve)
    }

    /// Runs the consumer until cancelled, attaching (again) while the broker refuses.
    async fn run(self) {
        let attach = || self.broker.consume(&self.filter, &self.name, self.options);
        let attached = attach
            .retry(ATTACH_BACKOFF)
            .notify(|err, wait| self.refused(err, wait));
        let source = tokio::select! {
            () = self.cancel.cancelled() => return,
            attached = attached => match attached {
                Ok(source) => source,
                // Only after unlimited retries: not reached.
                Err(err) => {
                    self.tracked.failed(format!("cannot attach to the broker: {err}"));
                    return;
                }
            },
        };
        self.tracked.running();
        self.consumer.run(source, self.handler, self.cancel).await;
    }

    fn refused(&self, err: &BrokerError, wait: Duration) {
        tracing::warn!(consumer = %self.name, error = %err, retry_in = ?wait, "cannot attach the consumer; retrying");
        self.tracked
            .failed(format!("cannot attach to the broker: {err}"));
    }
}
