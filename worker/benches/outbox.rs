//! Durable publishing through the outbox against raw async-nats, in one run on one
//! nats-server (started here on a free port; `NEXO_NATS_SERVER` or `nats-server` on
//! the PATH).
//!
//!     cargo bench -p nexo-worker --bench outbox
//!
//! Prints messages per second for: raw core publish, raw JetStream publish (acks
//! awaited), and the worker's durable publish (accepted = on disk; delivered = acked by
//! JetStream), with their ratios.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexo_worker::broker::{Broker, NatsBroker};
use nexo_worker::metrics::Metrics;
use nexo_worker::queue::{QueueStore, QueuedBroker, run_drain};
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 20_000;
const PUBLISHERS: usize = 64;
const PAYLOAD: usize = 512;
/// JetStream publishes in flight at once in the raw baseline.
const WINDOW: usize = 512;

struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn binary() -> PathBuf {
    std::env::var_os("NEXO_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nexo-bench-{label}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start_server() -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = temp_dir("js");
    let child = Command::new(binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (set NEXO_NATS_SERVER)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (Server(child, store), format!("nats://127.0.0.1:{port}"))
}

fn subject(run: &str, i: usize) -> String {
    format!("agent.route.{run}.p{}", i % PUBLISHERS)
}

fn rate(count: usize, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let (_server, url) = start_server().await;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);

    let nats = Arc::new(NatsBroker::connect_url(&url).await.unwrap());
    nats.ensure_streams().await.unwrap();
    let client = nats.client().clone();

    // Raw core publishes, confirmed by one flush.
    let started = Instant::now();
    for i in 0..MESSAGES {
        client
            .publish(format!("bench.core.p{}", i % PUBLISHERS), payload.clone())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let core = rate(MESSAGES, started.elapsed());

    // Raw JetStream publishes, pipelined in windows (the client caps acks in flight),
    // every ack awaited.
    let jetstream = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    let mut acks = Vec::with_capacity(WINDOW);
    for i in 0..MESSAGES {
        acks.push(
            jetstream
                .publish(subject("rawjs", i), payload.clone())
                .await
                .unwrap(),
        );
        if acks.len() == WINDOW {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let raw_js = rate(MESSAGES, started.elapsed());

    // The worker's durable publish: into the outbox (fsync per group commit), drained
    // to JetStream by the drain task.
    let dir = temp_dir("outbox");
    let store = QueueStore::open(&dir.join("queue.db"), 3).unwrap();
    let queued = Arc::new(QueuedBroker::new(nats.clone(), store.clone()));
    tokio::spawn(run_drain(
        store.clone(),
        nats.clone(),
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    ));
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (queued, payload) = (queued.clone(), payload.clone());
            tokio::spawn(async move {
                for i in (p..MESSAGES).step_by(PUBLISHERS) {
                    queued
                        .publish(&subject("outbox", i), payload.clone())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let accepted = started.elapsed();
    while store.depths().0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);

    let accepted_rate = rate(MESSAGES, accepted);
    let delivered_rate = rate(MESSAGES, delivered);
    println!(
        "{MESSAGES} messages of {PAYLOAD} bytes, {PUBLISHERS} subjects/publishers, nats-server on loopback"
    );
    println!("raw core publish (flushed)         {core:>10.0} msg/s");
    println!("raw JetStream publish (acked)      {raw_js:>10.0} msg/s");
    println!("outbox accepted (durable on disk)  {accepted_rate:>10.0} msg/s");
    println!("outbox delivered (acked by JS)     {delivered_rate:>10.0} msg/s");
    println!(
        "ratio delivered / raw JetStream    {:>10.2}",
        delivered_rate / raw_js
    );
    println!(
        "ratio delivered / raw core         {:>10.2}",
        delivered_rate / core
    );
}
