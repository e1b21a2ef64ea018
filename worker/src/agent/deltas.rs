//! The deltas of one turn's answer: what the model writes goes, numbered and marked
//! with its step, to the subject the envelope's `stream` names (only when it names
//! one), and each model call's first text is timed for
//! `nexo_llm_first_token_seconds` (whether anyone watches or not).
//!
//! The model's stream is never held up by the broker: deltas go into a bounded queue
//! that a task of their own publishes from, and a delta that finds the queue full is
//! dropped. Nothing is lost by that: the reply envelope carries the whole answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexo_api::delta::{DELTA_VERSION, ReplyDelta};
use nexo_api::{Envelope, subject};
use prometheus::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::turn::StepDeltas;
use crate::broker::Broker;
use crate::llm::Deltas;

/// Deltas waiting to be published. A provider sends one per token or word, and a
/// publish is a write to a socket: 256 cover a broker stall of a few hundred ms
/// without growing with a long answer.
const QUEUED_DELTAS: usize = 256;
/// How long the end of a turn waits for its queued deltas to leave before the reply
/// is sent, so they arrive before it on an unloaded broker. Bounded: a stuck broker
/// must not hold the reply.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

pub(crate) struct TurnDeltas {
    message_id: Uuid,
    first_token: Histogram,
    state: Mutex<State>,
    outlet: Option<Outlet>,
}

struct State {
    step: u32,
    seq: u64,
    call_started: Instant,
    /// The current call has sent text (its first token is timed).
    spoke: bool,
    /// The next delta starts the shown text over: the first of a step.
    restart_next: bool,
    dropped: u64,
}

struct Outlet {
    queue: mpsc::Sender<ReplyDelta>,
    pump: JoinHandle<()>,
}

impl TurnDeltas {
    /// The sink of the turn working on `envelope`; `first_token` is the histogram of
    /// the agent's provider.
    pub(crate) fn new(
        envelope: &Envelope,
        broker: &Arc<dyn Broker>,
        first_token: Histogram,
    ) -> Self {
        let outlet = match envelope.stream.as_deref() {
            // Only a subject of the deltas' own shape: an envelope cannot make an agent
            // publish on a route or outbound subject.
            Some(stream) if subject::is_reply_deltas(stream) => {
                Some(Outlet::start(broker.clone(), stream.to_owned()))
            }
            Some(stream) => {
                tracing::warn!(%stream, "ignoring a `stream` that is not a reply-deltas subject");
                None
            }
            None => None,
        };
        Self {
            message_id: envelope.id,
            first_token,
            state: Mutex::new(State {
                step: 0,
                seq: 0,
                call_started: Instant::now(),
                spoke: false,
                restart_next: true,
                dropped: 0,
            }),
            outlet,
        }
    }

    fn send(&self, state: &mut State, text: &str, restart: bool) {
        let Some(outlet) = &self.outlet else { return };
        let delta = ReplyDelta {
            version: DELTA_VERSION,
            message_id: self.message_id,
            seq: state.seq,
            step: state.step,
            text: text.to_owned(),
            restart,
        };
        state.seq += 1;
        if outlet.queue.try_send(delta).is_err() {
            state.dropped += 1;
        }
    }

    /// Waits (at most [`FLUSH_GRACE`]) for the queued deltas to be published: called
    /// before the reply is sent.
    pub(crate) async fn finish(mut self) {
        let dropped = self.state.lock().unwrap().dropped;
        if dropped > 0 {
            tracing::debug!(dropped, "deltas dropped: the broker did not keep up");
        }
        let Some(Outlet { queue, pump }) = self.outlet.take() else {
            return;
        };
        drop(queue);
        if tokio::time::timeout(FLUSH_GRACE, pump).await.is_err() {
            tracing::debug!("deltas still queued at the end of the turn; the reply goes first");
        }
    }
}

impl Outlet {
    fn start(broker: Arc<dyn Broker>, stream: String) -> Self {
        let (queue, mut queued) = mpsc::channel::<ReplyDelta>(QUEUED_DELTAS);
        let pump = tokio::spawn(async move {
            while let Some(delta) = queued.recv().await {
                if let Err(err) = broker.publish(&stream, Bytes::from(delta.to_json())).await {
                    tracing::debug!(%stream, error = %err, "could not publish a delta");
                }
            }
        });
        Self { queue, pump }
    }
}

impl Drop for TurnDeltas {
    fn drop(&mut self) {
        // A turn that ends without `finish` (it was cancelled) leaves no publisher.
        if let Some(outlet) = &self.outlet {
            outlet.pump.abort();
        }
    }
}

impl Deltas for TurnDeltas {
    fn text(&self, chunk: &str) {
        if chunk.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap();
        if !state.spoke {
            state.spoke = true;
            self.first_token
                .observe(state.call_started.elapsed().as_secs_f64());
        }
        let restart = std::mem::take(&mut state.restart_next);
        self.send(&mut state, chunk, restart);
    }

    fn restart(&self) {
        let mut state = self.state.lock().unwrap();
        // Said at once, so the void text does not stay on screen until the call's
        // next text.
        state.restart_next = false;
        self.send(&mut state, "", true);
    }
}

impl StepDeltas for TurnDeltas {
    fn step(&self, step: u32) {
        let mut state = self.state.lock().unwrap();
        state.step = step;
        state.call_started = Instant::now();
        state.spoke = false;
        state.restart_next = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use prometheus::HistogramOpts;

    fn histogram() -> Histogram {
        Histogram::with_opts(HistogramOpts::new("first_token", "test")).unwrap()
    }

    /// Steps number the deltas and start the text over; a restart is said at once;
    /// every call's first text is timed once.
    #[tokio::test]
    async fn deltas_are_numbered_scoped_to_their_step_and_restarts_are_forwarded() {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
        let stream = subject::reply_deltas(&Uuid::new_v4());
        envelope.stream = Some(stream.clone());
        let mut watching = broker.subscribe(&stream).await.unwrap();
        let first_token = histogram();
        let deltas = TurnDeltas::new(&envelope, &broker, first_token.clone());
        deltas.step(1);
        deltas.text("Let me ");
        deltas.restart();
        deltas.text("Let me check");
        deltas.step(2);
        deltas.text("");
        deltas.text("Done");
        deltas.finish().await;

        let mut seen = Vec::new();
        for _ in 0..4 {
            let message = tokio::time::timeout(Duration::from_secs(5), watching.next())
                .await
                .unwrap()
                .unwrap();
            let delta = ReplyDelta::from_json(&message.payload).unwrap();
            assert_eq!(delta.message_id, envelope.id);
            seen.push((delta.seq, delta.step, delta.text, delta.restart));
        }
        let expected = [
            (0, 1, "Let me ", true),
            (1, 1, "", true),
            (2, 1, "Let me check", false),
            (3, 2, "Done", true),
        ];
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(seq, step, text, restart)| (seq, step, text.to_owned(), restart))
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(first_token.get_sample_count(), 2);
    }

    /// Without a `stream`, or with one that is not a deltas subject, nothing is
    /// published, and first tokens are still timed.
    #[tokio::test]
    async fn only_a_deltas_subject_is_published_on() {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let mut everything = broker.subscribe(">").await.unwrap();
        for stream in [None, Some("agent.route.default.other".to_owned())] {
            let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
            envelope.stream = stream;
            let first_token = histogram();
            let deltas = TurnDeltas::new(&envelope, &broker, first_token.clone());
            deltas.step(1);
            deltas.text("hello");
            deltas.finish().await;
            assert_eq!(first_token.get_sample_count(), 1);
        }
        let nothing = tokio::time::timeout(Duration::from_millis(200), everything.next()).await;
        assert!(nothing.is_err(), "{nothing:?}");
    }

    /// A model faster than the broker never waits: deltas beyond the queue are
    /// dropped, counted, and the turn goes on.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_deltas_instead_of_waiting() {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
        envelope.stream = Some(subject::reply_deltas(&Uuid::new_v4()));
        let deltas = TurnDeltas::new(&envelope, &broker, histogram());
        deltas.step(1);
        // On one thread the publishing task cannot run in between.
        for _ in 0..QUEUED_DELTAS + 10 {
            deltas.text("x");
        }
        assert_eq!(deltas.state.lock().unwrap().dropped, 10);
        deltas.finish().await;
    }
}
