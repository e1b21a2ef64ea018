//! At-least-once delivery with a real nats-server: the outbox keeps publishing through
//! an outage in order, JetStream and the consumer's seen-set drop duplicates, and a
//! message whose handler keeps failing ends in the dead-letter queue after exactly
//! `maxAttempts` tries, from where a replay delivers it again.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::Envelope;
use nexo_worker::broker::{Broker, ConsumeOptions, LocalBroker, Message, NatsBroker, Transport};
use nexo_worker::metrics::Metrics;
use nexo_worker::queue::{ConsumerLoop, Handler, Outcome, QueueStore, QueuedBroker, run_drain};
use support::conformance;
use support::nats::NatsServer;
use support::prometheus::Scrape;
use support::{TempDir, TestWorker, WorkerOptions, wait_for, wait_for_within};
use tokio_util::sync::CancellationToken;

/// A broker whose publishes go through an outbox in a temporary directory, drained
/// by a running drain task.
struct Durable {
    broker: Arc<QueuedBroker>,
    store: QueueStore,
    metrics: Arc<Metrics>,
    _dir: TempDir,
}

fn durable<B: Broker + Transport>(inner: Arc<B>) -> Durable {
    let durable = undrained(inner.clone());
    tokio::spawn(run_drain(
        durable.store.clone(),
        inner,
        durable.metrics.clone(),
        CancellationToken::new(),
    ));
    durable
}

/// [`durable`] without the drain task: what is published stays in the outbox, as in
/// a worker killed before its outbox sent it.
fn undrained<B: Broker>(inner: Arc<B>) -> Durable {
    let dir = TempDir::new();
    let store = QueueStore::open(&dir.path().join("queue.db"), 3).unwrap();
    let metrics = Arc::new(Metrics::new());
    Durable {
        broker: Arc::new(QueuedBroker::new(inner, store.clone())),
        store,
        metrics,
        _dir: dir,
    }
}

#[tokio::test]
async fn conformance_through_the_outbox_on_the_local_bus() {
    let keep = Arc::new(Mutex::new(Vec::new()));
    conformance::run_all(|| {
        let keep = keep.clone();
        async move {
            let durable = durable(Arc::new(LocalBroker::new()));
            let broker: Arc<dyn Broker> = durable.broker.clone();
            keep.lock().unwrap().push(durable);
            broker
        }
    })
    .await;
}

#[tokio::test]
async fn conformance_through_the_outbox_on_nats() {
    let server = NatsServer::start().await;
    let url = server.url();
    let keep = Arc::new(Mutex::new(Vec::new()));
    conformance::run_all(|| {
        let (keep, url) = (keep.clone(), url.clone());
        async move {
            let durable = durable(Arc::new(NatsBroker::connect_url(&url).await.unwrap()));
            let broker: Arc<dyn Broker> = durable.broker.clone();
            keep.lock().unwrap().push(durable);
            broker
        }
    })
    .await;
}

/// Records the text of every envelope it handles, per subject.
#[derive(Default)]
struct Recorder {
    by_subject: Mutex<HashMap<String, Vec<u32>>>,
    handled: AtomicUsize,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message, _attempt: u32) -> Outcome {
        let envelope = Envelope::from_json(&message.payload).unwrap();
        let seq: u32 = envelope.text.parse().unwrap();
        self.by_subject
            .lock()
            .unwrap()
            .entry(message.subject.clone())
            .or_default()
            .push(seq);
        self.handled.fetch_add(1, Ordering::SeqCst);
        Outcome::Ack
    }
}

fn consumer(
    name: &str,
    store: &QueueStore,
    metrics: &Arc<Metrics>,
    concurrency: usize,
) -> ConsumerLoop {
    ConsumerLoop {
        name: name.to_owned(),
        concurrency,
        max_attempts: 3,
        drain: Duration::from_secs(1),
        progress_every: Duration::from_secs(1),
        dead_letters: store.clone(),
        metrics: metrics.clone(),
    }
}

#[tokio::test]
async fn nats_outage_mid_burst_loses_nothing_and_keeps_order() {
    const PUBLISHERS: u32 = 100;
    const PER_PUBLISHER: u32 = 100;
    const TOTAL: usize = (PUBLISHERS * PER_PUBLISHER) as usize;
    let mut server = NatsServer::start().await;
    let nats = Arc::new(NatsBroker::connect_url(&server.url()).await.unwrap());
    let durable = durable(nats.clone());

    let recorder = Arc::new(Recorder::default());
    let options = ConsumeOptions {
        ack_wait: Duration::from_secs(2),
    };
    let source = durable
        .broker
        .consume("agent.route.burst.>", "burst", options)
        .await
        .unwrap();
    // One at a time, so handling order is stream order.
    tokio::spawn(consumer("burst", &durable.store, &durable.metrics, 1).run(
        source,
        recorder.clone(),
        CancellationToken::new(),
    ));

    // Each publisher sends its own subject in order; together they make a burst.
    let published = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, published) = (durable.broker.clone(), published.clone());
            tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    let envelope = Envelope::inbound("test", "burst", "c", "s", i.to_string());
                    broker
                        .publish(
                            &format!("agent.route.burst.p{p}"),
                            Bytes::from(envelope.to_json()),
                        )
                        .await
                        .expect("accepted into the outbox");
                    published.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    wait_for("a third of the burst", || async {
        (published.load(Ordering::SeqCst) >= TOTAL / 3).then_some(())
    })
    .await;
    server.stop().await;
    for publisher in publishers {
        publisher.await.unwrap();
    }
    // NATS is down: the rest waits in the outbox.
    let (waiting, _) = durable.store.depths();
    assert!(waiting > 0, "nothing was held back in the outbox");
    server.restart().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while recorder.handled.load(Ordering::SeqCst) < TOTAL {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {TOTAL} delivered",
            recorder.handled.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_subject = recorder.by_subject.lock().unwrap().clone();
    assert_eq!(by_subject.len(), PUBLISHERS as usize);
    for (subject, seqs) in by_subject.iter() {
        let expected: Vec<u32> = (0..PER_PUBLISHER).collect();
        assert_eq!(
            seqs, &expected,
            "{subject}: out of order, missing or duplicated"
        );
    }
    assert_eq!(durable.store.depths(), (0, 0));
}

/// Fails until told otherwise, counting calls.
struct Flaky {
    calls: AtomicUsize,
    healthy: AtomicBool,
}

#[async_trait]
impl Handler for Flaky {
    async fn handle(&self, _message: &Message, _attempt: u32) -> Outcome {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.healthy.load(Ordering::SeqCst) {
            Outcome::Ack
        } else {
            Outcome::Retry {
                after: Duration::from_millis(50),
                reason: "downstream said no".to_owned(),
            }
        }
    }
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_exactly_three_attempts_and_replays() {
    let server = NatsServer::start().await;
    let durable = durable(Arc::new(
        NatsBroker::connect_url(&server.url()).await.unwrap(),
    ));
    let handler = Arc::new(Flaky {
        calls: AtomicUsize::new(0),
        healthy: AtomicBool::new(false),
    });
    let source = durable
        .broker
        .consume("agent.route.poison.x", "poison", ConsumeOptions::default())
        .await
        .unwrap();
    tokio::spawn(consumer("poison", &durable.store, &durable.metrics, 4).run(
        source,
        handler.clone(),
        CancellationToken::new(),
    ));
    let envelope = Envelope::inbound("test", "poison", "c", "s", "boom");
    durable
        .broker
        .publish("agent.route.poison.x", Bytes::from(envelope.to_json()))
        .await
        .unwrap();

    let store = durable.store.clone();
    let dead = wait_for("the dead letter", || {
        let store = store.clone();
        async move { store.dead_letters(10).await.unwrap().into_iter().next() }
    })
    .await;
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.error, "downstream said no");
    assert_eq!(dead.source, "consume");
    assert_eq!(dead.subject, "agent.route.poison.x");
    assert_eq!(
        Envelope::from_json(dead.payload.as_bytes()).unwrap().id,
        envelope.id
    );

    // Fixed downstream; replay delivers it once more and it is handled.
    handler.healthy.store(true, Ordering::SeqCst);
    assert!(durable.store.replay(dead.id).await.unwrap());
    wait_for("the replayed message to be handled", || async {
        (handler.calls.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    assert_eq!(durable.store.depths(), (0, 0));
    let metrics = Scrape::parse(&durable.metrics.render());
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "poison"), ("outcome", "retry")]
        ),
        2.0
    );
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "poison"), ("outcome", "dead_letter")]
        ),
        1.0
    );
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "poison"), ("outcome", "ack")]
        ),
        1.0
    );
}

/// Panics on its first call, then handles everything.
#[derive(Default)]
struct PanicsOnce {
    calls: AtomicUsize,
}

#[async_trait]
impl Handler for PanicsOnce {
    async fn handle(&self, _message: &Message, attempt: u32) -> Outcome {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("handler bug on attempt {attempt}");
        }
        Outcome::Ack
    }
}

#[tokio::test]
async fn a_panicking_handler_is_retried_and_the_consumer_survives() {
    let local = Arc::new(LocalBroker::new());
    let durable = durable(local);
    let handler = Arc::new(PanicsOnce::default());
    let source = durable
        .broker
        .consume("agent.route.panic.x", "panic", ConsumeOptions::default())
        .await
        .unwrap();
    tokio::spawn(consumer("panic", &durable.store, &durable.metrics, 1).run(
        source,
        handler.clone(),
        CancellationToken::new(),
    ));
    for text in ["first", "second"] {
        let envelope = Envelope::inbound("test", "panic", "c", "s", text);
        durable
            .broker
            .publish("agent.route.panic.x", Bytes::from(envelope.to_json()))
            .await
            .unwrap();
    }
    // Attempt 1 of "first" panics; its retry and "second" are handled.
    wait_for("three calls", || async {
        (handler.calls.load(Ordering::SeqCst) == 3).then_some(())
    })
    .await;
    let metrics = Scrape::parse(&durable.metrics.render());
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "panic"), ("outcome", "retry")]
        ),
        1.0
    );
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "panic"), ("outcome", "ack")]
        ),
        2.0
    );
}

/// Counts the messages it takes and never finishes any of them.
#[derive(Default)]
struct Hangs {
    taken: AtomicUsize,
}

#[async_trait]
impl Handler for Hangs {
    async fn handle(&self, _message: &Message, _attempt: u32) -> Outcome {
        self.taken.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// Records the text and attempt of every message it handles.
#[derive(Default)]
struct Records {
    seen: Mutex<Vec<(String, u32)>>,
}

#[async_trait]
impl Handler for Records {
    async fn handle(&self, message: &Message, attempt: u32) -> Outcome {
        let envelope = Envelope::from_json(&message.payload).unwrap();
        self.seen.lock().unwrap().push((envelope.text, attempt));
        Outcome::Ack
    }
}

#[tokio::test]
async fn work_unfinished_at_the_drain_deadline_goes_to_another_worker() {
    let server = NatsServer::start().await;
    let subject = "agent.route.handover.x";
    // An ack wait far beyond the test's deadline: only the nak on abandon can explain
    // a prompt redelivery.
    let options = ConsumeOptions {
        ack_wait: Duration::from_secs(120),
    };
    let first = durable(Arc::new(
        NatsBroker::connect_url(&server.url()).await.unwrap(),
    ));
    let source = first
        .broker
        .consume(subject, "handover", options)
        .await
        .unwrap();
    let stop_first = CancellationToken::new();
    let mut draining = consumer("handover", &first.store, &first.metrics, 1);
    draining.drain = Duration::from_millis(200);
    let hangs = Arc::new(Hangs::default());
    let first_loop = tokio::spawn(draining.run(source, hangs.clone(), stop_first.clone()));
    let envelope = Envelope::inbound("test", "handover", "c", "s", "unfinished");
    first
        .broker
        .publish(subject, Bytes::from(envelope.to_json()))
        .await
        .unwrap();
    wait_for("the first worker to take the message", || async {
        (hangs.taken.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    stop_first.cancel();
    first_loop.await.unwrap();
    let metrics = Scrape::parse(&first.metrics.render());
    assert_eq!(
        metrics.expect(
            "nexo_consumed_total",
            &[("consumer", "handover"), ("outcome", "abandoned")]
        ),
        1.0
    );

    let second = durable(Arc::new(
        NatsBroker::connect_url(&server.url()).await.unwrap(),
    ));
    let source = second
        .broker
        .consume(subject, "handover", options)
        .await
        .unwrap();
    let records = Arc::new(Records::default());
    tokio::spawn(consumer("handover", &second.store, &second.metrics, 1).run(
        source,
        records.clone(),
        CancellationToken::new(),
    ));
    let seen = wait_for("the second worker to get the message", || async {
        let seen = records.seen.lock().unwrap().clone();
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert_eq!(seen, vec![("unfinished".to_owned(), 2)]);
}

/// Answers every message on `replies` through `broker`, and records the attempt.
struct Answers {
    broker: Arc<dyn Broker>,
    attempts: Mutex<Vec<u32>>,
}

#[async_trait]
impl Handler for Answers {
    async fn handle(&self, message: &Message, attempt: u32) -> Outcome {
        self.attempts.lock().unwrap().push(attempt);
        let answer = Bytes::from(format!("answer to attempt {attempt}"));
        match self.broker.publish("replies.acked", answer).await {
            Ok(()) => Outcome::Ack,
            Err(err) => panic!("{}: {err}", message.subject),
        }
    }
}

/// A worker killed after its handler stored the answer in its outbox, but before the
/// outbox sent it, must not have acknowledged the message: it is delivered again, to
/// another worker, which answers. (Acknowledged at once, the answer would stay on the
/// dead worker's disk.)
#[tokio::test]
async fn a_worker_killed_before_its_outbox_sent_the_answer_leaves_the_message_to_another() {
    let server = NatsServer::start().await;
    let subject = "agent.route.acked.x";
    let options = ConsumeOptions {
        ack_wait: Duration::from_secs(2),
    };
    let raw = NatsBroker::connect_url(&server.url()).await.unwrap();
    let mut replies = raw.subscribe("replies.acked").await.unwrap();
    let first = undrained(Arc::new(
        NatsBroker::connect_url(&server.url()).await.unwrap(),
    ));
    let second = durable(Arc::new(
        NatsBroker::connect_url(&server.url()).await.unwrap(),
    ));
    let source = first
        .broker
        .consume(subject, "acked", options)
        .await
        .unwrap();
    let answers = Arc::new(Answers {
        broker: first.broker.clone(),
        attempts: Mutex::default(),
    });
    let first_loop = tokio::spawn(consumer("acked", &first.store, &first.metrics, 1).run(
        source,
        answers.clone(),
        CancellationToken::new(),
    ));
    let envelope = Envelope::inbound("test", "acked", "c", "s", "question");
    second
        .broker
        .publish(subject, Bytes::from(envelope.to_json()))
        .await
        .unwrap();
    wait_for("the first worker's answer in its outbox", || async {
        let stored = first.store.peek(10).await.unwrap();
        (answers.attempts.lock().unwrap().len() == 1 && stored.len() == 1).then_some(())
    })
    .await;

    // The kill: the consumer stops without settling anything.
    first_loop.abort();
    let _ = first_loop.await;
    let source = second
        .broker
        .consume(subject, "acked", options)
        .await
        .unwrap();
    let answers = Arc::new(Answers {
        broker: second.broker.clone(),
        attempts: Mutex::default(),
    });
    tokio::spawn(consumer("acked", &second.store, &second.metrics, 1).run(
        source,
        answers.clone(),
        CancellationToken::new(),
    ));
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("the second worker answered")
        .unwrap();
    assert_eq!(reply.payload, Bytes::from("answer to attempt 2"));
}

/// What a crash left in the outbox of a local-bus worker is handled after the next
/// start: the drain starts only once consumers are attached, and durable work waits
/// for its consumer. Several threads, as in the worker binary, so the drain could run
/// while the worker is still starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_left_in_the_outbox_are_handled_after_a_start_on_the_local_bus() {
    use nexo_api::{ResourceKey, subject};
    let api = ResourceKey::new("default", "api");
    let agent = ResourceKey::new("default", "a");
    let envelope = |text: &str| Envelope::inbound("webhook", "api", "c", "u", text).to_json();
    let outbox = vec![
        (
            subject::inbound("webhook", &api),
            envelope("through the router"),
        ),
        (
            subject::agent_route(&agent),
            envelope("straight to the agent"),
        ),
        (subject::agent_route(&agent), envelope("and another")),
    ];
    let worker = support::TestWorker::start_with(
        support::WorkerOptions {
            outbox,
            ..Default::default()
        },
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: ok}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {}\n",
    )
    .await;
    worker
        .wait_for_metric(
            "nexo_agent_turns_total",
            &[("agent", "default/a"), ("outcome", "ok")],
            3.0,
        )
        .await;
    worker.stop().await;
}

/// While NATS is down the outbox fills up to `outbox.maxMessages`; then the webhook
/// answers 503 with `Retry-After` instead of taking more, a dead letter replay is
/// refused the same way (the dead letter stays), and what it accepted is all answered
/// once NATS is back.
#[tokio::test]
async fn a_full_outbox_refuses_messages_with_retry_after_and_loses_none() {
    let mut server = NatsServer::start().await;
    let data = TempDir::new();
    let earlier = QueueStore::open(&data.path().join("queue.db"), 3).unwrap();
    earlier
        .dead_letter("agent.route.default.a", None, b"{}", 3, "failed before")
        .await
        .unwrap();
    drop(earlier);
    let worker = TestWorker::start_with(
        WorkerOptions {
            broker: format!("{{type: nats, urls: ['{}']}}", server.url()),
            worker_extra: "  delivery: {outbox: {maxMessages: 2}}\n".to_owned(),
            data_dir: Some(data.path().to_owned()),
            admin_token_env: support::ADMIN_TOKEN_ENV,
            ..Default::default()
        },
        "agents:\n  - name: a\n    spec:\n      model: {provider: scripted, script: [{reply: ok}]}\nchannels:\n  - name: api\n    spec:\n      defaultAgent: a\n      webhook: {}\n",
    )
    .await;
    support::process::wait_ready(&worker.http, &worker.url("")).await;
    server.stop().await;

    let post = || {
        worker
            .http
            .post(worker.url("/v1/channels/api/messages"))
            .header("prefer", "respond-async")
            .json(&serde_json::json!({"text": "hello"}))
            .send()
    };
    let mut accepted = Vec::new();
    let refused = loop {
        let response = post().await.unwrap();
        if response.status().as_u16() != 202 {
            break response;
        }
        let body: serde_json::Value = response.json().await.unwrap();
        accepted.push(body["id"].as_str().unwrap().to_owned());
        assert!(accepted.len() <= 2, "the outbox took more than its limit");
    };
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused.headers()["retry-after"],
        nexo_worker::queue::OUTBOX_FULL_RETRY_AFTER
            .as_secs()
            .to_string()
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("outbox is full"),
        "{body}"
    );
    // Both are copied into /metrics about once a second: wait for each.
    worker
        .wait_for_metric("nexo_outbox_refused_total", &[], 1.0)
        .await;
    worker
        .wait_for_metric("nexo_outbox_depth", &[], accepted.len() as f64)
        .await;

    let before = worker.dead_letters().await;
    assert_eq!(before.len(), 1, "{before:?}");
    let replay = worker
        .admin(
            reqwest::Method::POST,
            &format!("/admin/dlq/{}/replay", before[0]["id"]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status().as_u16(), 503);
    assert!(replay.headers().contains_key("retry-after"));
    assert_eq!(worker.dead_letters().await, before, "the dead letter stays");

    server.restart().await;
    for id in &accepted {
        let url = worker.url(&format!("/v1/channels/api/messages/{id}"));
        // After the outage: the client reconnects, the drain and the consumers' pulls
        // come back on their own schedules.
        let recovery = Duration::from_secs(60);
        let answer = wait_for_within(recovery, "an accepted message to be answered", || async {
            let (status, body) = support::get_json(&worker.http, &url).await;
            (status == 200).then_some(body)
        })
        .await;
        assert_eq!(answer["reply"], "ok", "{answer}");
    }
    assert_eq!(post().await.unwrap().status().as_u16(), 202);
    worker.stop().await;
}

/// Holds the first message of conversation `a` until released; records the order.
#[derive(Default)]
struct HoldsFirst {
    order: Mutex<Vec<String>>,
    release: tokio::sync::Notify,
}

#[async_trait]
impl Handler for HoldsFirst {
    async fn handle(&self, message: &Message, _attempt: u32) -> Outcome {
        let envelope = Envelope::from_json(&message.payload).unwrap();
        if envelope.text == "a1" {
            self.release.notified().await;
        }
        self.order.lock().unwrap().push(envelope.text);
        Outcome::Ack
    }
}

/// Messages of different conversations are handled side by side, those of one
/// conversation in the order they came: `a2` waits for `a1`, `b1` does not.
#[tokio::test]
async fn a_conversations_messages_are_handled_in_order_and_others_meanwhile() {
    let local = durable(Arc::new(LocalBroker::new()));
    let subject = "agent.route.lanes.x";
    let source = local
        .broker
        .consume(subject, "lanes", ConsumeOptions::default())
        .await
        .unwrap();
    let handler = Arc::new(HoldsFirst::default());
    tokio::spawn(consumer("lanes", &local.store, &local.metrics, 4).run(
        source,
        handler.clone(),
        CancellationToken::new(),
    ));
    for (conversation, text) in [("a", "a1"), ("a", "a2"), ("b", "b1")] {
        let envelope = Envelope::inbound("test", "lanes", conversation, "s", text);
        local
            .broker
            .publish(subject, Bytes::from(envelope.to_json()))
            .await
            .unwrap();
    }
    wait_for("b1 handled while a1 is held", || async {
        (*handler.order.lock().unwrap() == ["b1"]).then_some(())
    })
    .await;
    handler.release.notify_one();
    wait_for("a1 then a2", || async {
        (*handler.order.lock().unwrap() == ["b1", "a1", "a2"]).then_some(())
    })
    .await;
}
