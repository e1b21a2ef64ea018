//! Watching a reply being written: a subscription on a fresh `reply.deltas.<id>`
//! subject, named in the envelope's `stream` before the envelope is published, whose
//! deltas ([`ReplyDelta`]) the channel shows until the reply itself arrives.
//!
//! Everything here is bounded and nothing here can hold a turn up: a watch hands on at
//! most [`MAX_DELTAS`] deltas and lives at most [`MAX_WATCH`]; a reader that falls
//! [`BUFFERED_DELTAS`] behind is dropped (its watch ends; the reply still comes). The
//! agent side never waits for a watcher either: deltas are core publishes.

use std::future::Future;
use std::time::Duration;

use futures::Stream;
use nexo_api::delta::ReplyDelta;
use nexo_api::subject;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError};

/// Deltas a watch holds for a reader that has not taken them yet.
pub(crate) const BUFFERED_DELTAS: usize = 256;
/// Deltas one watch hands on: a long answer a token at a time stays well below; past
/// it the reader waits for the reply.
pub(crate) const MAX_DELTAS: usize = 16_384;
/// The longest a watch lives, for a reply that never comes to this reader (the reader
/// gave up, the turn was handed to another worker and answered elsewhere).
const MAX_WATCH: Duration = Duration::from_secs(30 * 60);

/// The deltas of one reply, as they come. Dropping it unsubscribes.
pub(crate) struct ReplyDeltas {
    subject: String,
    deltas: mpsc::Receiver<ReplyDelta>,
    pump: JoinHandle<()>,
}

impl ReplyDeltas {
    /// Subscribes to a fresh subject; name it in the envelope's `stream` before the
    /// envelope is published.
    pub(crate) async fn watch(broker: &dyn Broker) -> Result<Self, BrokerError> {
        let subject = subject::reply_deltas(&Uuid::new_v4());
        let mut subscription = broker.subscribe(&subject).await?;
        let (tx, deltas) = mpsc::channel(BUFFERED_DELTAS);
        let watched = subject.clone();
        let pump = tokio::spawn(async move {
            let pumped = async {
                let mut handed = 0;
                while handed < MAX_DELTAS {
                    let Some(message) = subscription.next().await else {
                        return;
                    };
                    let delta = match ReplyDelta::from_json(&message.payload) {
                        Ok(delta) => delta,
                        Err(err) => {
                            tracing::debug!(subject = %watched, error = %err, "dropping a malformed delta");
                            continue;
                        }
                    };
                    match tx.try_send(delta) {
                        Ok(()) => handed += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!(subject = %watched, "reader of the deltas fell behind; it waits for the reply");
                            return;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            };
            let _ = tokio::time::timeout(MAX_WATCH, pumped).await;
        });
        Ok(Self {
            subject,
            deltas,
            pump,
        })
    }

    /// What the envelope's `stream` is set to.
    pub(crate) fn subject(&self) -> &str {
        &self.subject
    }

    /// The next delta; `None` once the watch has ended.
    pub(crate) async fn next(&mut self) -> Option<ReplyDelta> {
        self.deltas.recv().await
    }

    /// A delta already here, without waiting.
    fn ready(&mut self) -> Option<ReplyDelta> {
        self.deltas.try_recv().ok()
    }
}

impl Drop for ReplyDeltas {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// What a streamed answer is made of: deltas, then the answer.
pub(crate) enum Streamed<T> {
    Delta(ReplyDelta),
    Answer(T),
}

/// Every delta of `deltas` as it comes until `answer` is ready, then the deltas that
/// had already arrived, then the answer; then the stream ends. The watch ends with
/// the stream.
pub(crate) fn until_answer<T: Send + 'static>(
    deltas: ReplyDeltas,
    answer: impl Future<Output = T> + Send + 'static,
) -> impl Stream<Item = Streamed<T>> + Send {
    enum State<T, F> {
        Watching(ReplyDeltas, std::pin::Pin<Box<F>>),
        Draining(ReplyDeltas, T),
        Done,
    }
    let start = State::Watching(deltas, Box::pin(answer));
    futures::stream::unfold(start, |state| async move {
        match state {
            State::Watching(mut deltas, mut answer) => {
                tokio::select! {
                    biased;
                    answered = &mut answer => Some(match deltas.ready() {
                        Some(delta) => (Streamed::Delta(delta), State::Draining(deltas, answered)),
                        None => (Streamed::Answer(answered), State::Done),
                    }),
                    delta = deltas.next() => Some(match delta {
                        Some(delta) => (Streamed::Delta(delta), State::Watching(deltas, answer)),
                        // The watch ended (limit, slow reader): only the answer is left.
                        None => {
                            let answered = answer.await;
                            (Streamed::Answer(answered), State::Done)
                        }
                    }),
                }
            }
            State::Draining(mut deltas, answered) => Some(match deltas.ready() {
                Some(delta) => (Streamed::Delta(delta), State::Draining(deltas, answered)),
                None => (Streamed::Answer(answered), State::Done),
            }),
            State::Done => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use bytes::Bytes;
    use futures::StreamExt;
    use nexo_api::delta::DELTA_VERSION;

    fn delta(seq: u64) -> Bytes {
        let delta = ReplyDelta {
            version: DELTA_VERSION,
            message_id: Uuid::nil(),
            seq,
            step: 1,
            text: seq.to_string(),
            restart: false,
        };
        Bytes::from(delta.to_json())
    }

    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("in time")
    }

    /// A reader that takes nothing while deltas pour in is dropped once
    /// [`BUFFERED_DELTAS`] wait for it: it keeps those, then its watch ends.
    #[tokio::test]
    async fn a_reader_that_falls_behind_is_dropped_after_the_buffer() {
        let broker = LocalBroker::new();
        let mut watch = ReplyDeltas::watch(&broker).await.unwrap();
        let subject = watch.subject().to_owned();
        broker
            .publish(&subject, Bytes::from("not json"))
            .await
            .unwrap();
        for seq in 0..(BUFFERED_DELTAS as u64 + 10) {
            broker.publish(&subject, delta(seq)).await.unwrap();
        }
        let mut got = Vec::new();
        while let Some(delta) = within(watch.next()).await {
            got.push(delta.seq);
        }
        let expected: Vec<u64> = (0..BUFFERED_DELTAS as u64).collect();
        assert_eq!(got, expected);
    }

    /// Deltas already here when the answer is ready still come before it.
    #[tokio::test]
    async fn the_answer_comes_after_the_deltas_that_arrived_before_it() {
        let broker = LocalBroker::new();
        let watch = ReplyDeltas::watch(&broker).await.unwrap();
        let subject = watch.subject().to_owned();
        for seq in 0..3 {
            broker.publish(&subject, delta(seq)).await.unwrap();
        }
        // Let the watch take them in before the answer is ready.
        let taken = async {
            while watch.deltas.len() < 3 {
                tokio::task::yield_now().await;
            }
        };
        within(taken).await;
        let items: Vec<String> = within(
            until_answer(watch, async { "answer" })
                .map(|item| match item {
                    Streamed::Delta(delta) => delta.text,
                    Streamed::Answer(answer) => answer.to_owned(),
                })
                .collect(),
        )
        .await;
        assert_eq!(items, ["0", "1", "2", "answer"]);
    }
}
