//! What owning agents costs the NATS server, per agent or per partition, measured with
//! raw async-nats (no worker code), on nats-servers started here.
//!
//!     cargo bench -p nexo-worker --bench ownership_cost
//!
//! a. Durable pull consumers on a WorkQueue stream over `agent.route.>`: one per agent
//!    (filter `agent.route.<ns>.<name>`, K = `NEXO_BENCH_AGENTS`, 2,000) against one
//!    per partition (filter `agent.route.p<n>.>`, K = `NEXO_BENCH_PARTITIONS`, 64).
//!    For each: creation time, server memory (`/varz` `mem`) before and after, the idle
//!    cost of one pull request outstanding per consumer renewed as the worker renews
//!    it (batch 1, expires 5 s, a new one when the server ends the last; messages per
//!    second and CPU from `/varz` over `NEXO_BENCH_WINDOW_SECONDS`, 15), and the time
//!    a restart takes until the consumers answer again (stopped with SIGTERM, and
//!    killed with SIGKILL). First it counts the consumers the server takes on a
//!    stream that sets no `max_consumers` (nats-server 2.15 applies its
//!    `default_max_consumers`, 1,000, even to -1); the measured stream sets K.
//! b. Leases in a KV bucket (history 1, max_age 10 s), keys `<pool>.<n>`, each renewed
//!    every 10/3 s by an update on its last revision: as many keys as partitions
//!    against as many as agents: updates per second, and p50/p99/max latency of one
//!    update.
//!
//! The default run takes about two minutes. Per-agent consumers cost the server time
//! in proportion to their number or worse (creation, shutdown, recovery), so
//! `NEXO_BENCH_AGENTS=10000` takes about six minutes on two cores.
//!
//! Every server is fresh (its own store and ports, picked by the server as
//! `tests/support/nats.rs` does), and the bench shares the machine's cores with it, so
//! the figures are for comparing the two shapes on one machine, not capacity limits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Agents of the per-agent shape by default; kept to a two-minute run (see the module
/// docs).
const DEFAULT_AGENTS: usize = 2_000;
const DEFAULT_PARTITIONS: usize = 64;
/// Length of each measured idle window; three pull expiries by default.
const DEFAULT_WINDOW_SECONDS: u64 = 15;
const STREAM: &str = "BENCH_AGENT_ROUTE";
/// The worker's pull request: one message, expiring after this (see
/// `broker/nats.rs`, `FETCH_EXPIRY`).
const FETCH_EXPIRY: Duration = Duration::from_secs(5);
/// Consumers tried on a stream without its own limit.
const LIMIT_PROBE: usize = 1_500;
/// Consumer creations in flight at once, as a worker starting many agents has.
const CREATES_IN_FLIGHT: usize = 64;
/// Lease time to live, and how often a holder renews (three times per TTL, so a lease
/// survives two lost renewals).
const LEASE_TTL: Duration = Duration::from_secs(10);
const LEASE_RENEWALS_PER_TTL: u32 = 3;
/// Renewals of one round in flight at once.
const UPDATES_IN_FLIGHT: usize = 256;
/// Lease rounds measured per key count.
const LEASE_ROUNDS: u32 = 3;
/// How long a server may take to start or to recover its consumers.
const SERVER_DEADLINE: Duration = Duration::from_secs(180);
/// How often `/varz` is read during a window (the server refreshes `cpu` each second).
const CPU_SAMPLE: Duration = Duration::from_secs(1);

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
        Err(_) => default,
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

/// Waits for `check` to return `Some`, polling every 10 ms, for at most `within`.
async fn poll<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A nats-server with JetStream and monitoring, on ports it picked on its first start
/// (`-p -1 -m -1`, read from its ports file) and keeps across restarts.
struct Server {
    child: Option<Child>,
    store: PathBuf,
    ports: PathBuf,
    port: u16,
    monitor: u16,
    http: reqwest::Client,
}

impl Server {
    async fn start() -> Self {
        let mut server = Self {
            child: None,
            store: temp_dir("js"),
            ports: temp_dir("ports"),
            port: 0,
            monitor: 0,
            http: reqwest::Client::new(),
        };
        server.spawn().await;
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it accepts connections; returns when it
    /// was spawned.
    async fn spawn(&mut self) -> Instant {
        let port = |p: u16| {
            if p == 0 {
                "-1".to_owned()
            } else {
                p.to_string()
            }
        };
        let spawned = Instant::now();
        let child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", &port(self.port), "-m"])
            .arg(port(self.monitor))
            .args(["-js", "-sd"])
            .arg(&self.store)
            .arg("--ports_file_dir")
            .arg(&self.ports)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (set NEXO_NATS_SERVER)");
        let name = binary().file_name().unwrap().to_string_lossy().into_owned();
        let ports_file = self.ports.join(format!("{name}_{}.ports", child.id()));
        self.child = Some(child);
        let (port, monitor) = poll("the ports file", SERVER_DEADLINE, || {
            let ports = read_ports(&ports_file);
            async move { ports }
        })
        .await;
        (self.port, self.monitor) = (port, monitor);
        poll("nats-server to accept connections", SERVER_DEADLINE, || {
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            async move { connect.await.ok().map(|_| ()) }
        })
        .await;
        spawned
    }

    /// Stops the server (SIGTERM, a clean shutdown, or SIGKILL) and waits until the
    /// process is gone.
    async fn stop(&mut self, kill: bool) {
        let mut child = self.child.take().expect("the server runs");
        if kill {
            child.kill().unwrap();
        } else {
            let signalled = Command::new(binary())
                .args(["--signal", &format!("term={}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(signalled.success(), "nats-server --signal term");
        }
        poll("nats-server to exit", SERVER_DEADLINE, || {
            let exited = child.try_wait().unwrap().map(|_| ());
            async move { exited }
        })
        .await;
    }

    async fn varz(&self) -> Varz {
        let url = format!("http://127.0.0.1:{}/varz", self.monitor);
        let body: Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("/varz answers")
            .json()
            .await
            .expect("/varz is JSON");
        let number = |field: &str| {
            body[field]
                .as_f64()
                .unwrap_or_else(|| panic!("/varz has no number `{field}`: {body}"))
        };
        Varz {
            mem: number("mem"),
            cpu: number("cpu"),
            in_msgs: number("in_msgs"),
            out_msgs: number("out_msgs"),
            version: body["version"].as_str().unwrap_or("?").to_owned(),
            cores: number("cores"),
        }
    }

    /// Runs `work` while reading `/varz` every [`CPU_SAMPLE`], for at least `window`
    /// and until `work` is done: messages per second (in, out) and the mean CPU
    /// (percent of one core) over that time, and what `work` returned.
    async fn measure<T>(&self, window: Duration, work: impl Future<Output = T>) -> (T, Load) {
        let start = self.varz().await;
        let started = Instant::now();
        let sampling = async {
            let mut cpu = Vec::new();
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + CPU_SAMPLE, CPU_SAMPLE);
            while started.elapsed() < window {
                ticks.tick().await;
                cpu.push(self.varz().await.cpu);
            }
            cpu
        };
        let (done, cpu) = tokio::join!(work, sampling);
        let end = self.varz().await;
        let seconds = started.elapsed().as_secs_f64();
        let load = Load {
            seconds,
            in_per_s: (end.in_msgs - start.in_msgs) / seconds,
            out_per_s: (end.out_msgs - start.out_msgs) / seconds,
            cpu: cpu.iter().sum::<f64>() / cpu.len().max(1) as f64,
        };
        (done, load)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.store);
        let _ = std::fs::remove_dir_all(&self.ports);
    }
}

/// Client and monitoring ports of a complete ports file.
fn read_ports(path: &Path) -> Option<(u16, u16)> {
    let ports: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let port = |key: &str| -> Option<u16> {
        ports[key]
            .get(0)?
            .as_str()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()
    };
    Some((port("nats")?, port("monitoring")?))
}

struct Varz {
    mem: f64,
    cpu: f64,
    in_msgs: f64,
    out_msgs: f64,
    version: String,
    cores: f64,
}

struct Load {
    /// Length of the measured window.
    seconds: f64,
    in_per_s: f64,
    out_per_s: f64,
    cpu: f64,
}

/// How many consumers a stream created with `max_consumers` set to `max_consumers`
/// (0: unset, -1: "unlimited") accepts, trying up to [`LIMIT_PROBE`]: nats-server 2.15
/// applies its `default_max_consumers` to such streams, while their configuration
/// still reads -1. Says how many were accepted and why the first refused one was.
async fn accepted_consumers(js: &jetstream::Context, max_consumers: i32) -> String {
    let name = format!("BENCH_LIMIT_{}", max_consumers.unsigned_abs());
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("bench.{name}.>")],
            max_consumers,
            ..Default::default()
        })
        .await
        .unwrap();
    let creates = (0..LIMIT_PROBE).map(|i| {
        let (stream, name) = (stream.clone(), name.clone());
        async move {
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("c{i}")),
                    filter_subject: format!("bench.{name}.{i}"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    });
    let created: Vec<Result<(), String>> = futures::stream::iter(creates)
        .buffer_unordered(CREATES_IN_FLIGHT)
        .collect()
        .await;
    js.delete_stream(&name).await.unwrap();
    let accepted = created.iter().filter(|c| c.is_ok()).count();
    match created.into_iter().find_map(Result::err) {
        Some(refused) => format!("{accepted} (then: {refused})"),
        None => format!("all {LIMIT_PROBE} tried"),
    }
}

/// What one consumer shape cost.
struct ConsumerFigures {
    count: usize,
    create: Duration,
    mem_before: f64,
    mem_created: f64,
    mem_idle: f64,
    idle: Load,
    /// Pull requests the server ended (expired) per second, seen by the client.
    expiries_per_s: f64,
    term_stop: Duration,
    term_ready: Duration,
    kill_ready: Duration,
    mem_restarted: f64,
}

async fn connect(url: &str) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(url).await.expect("connects");
    let mut js = jetstream::new(client.clone());
    // Thousands of requests queue at the server at once.
    js.set_timeout(Duration::from_secs(60));
    (client, js)
}

/// Creates a WorkQueue stream and one durable pull consumer per filter, then holds a
/// pull request on each for a window, then restarts the server twice.
async fn consumers(filters: Vec<String>, window: Duration) -> ConsumerFigures {
    let mut server = Server::start().await;
    let (client, js) = connect(&server.url()).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["agent.route.>".to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            // Explicit: nats-server 2.15 limits a stream that sets no limit (see
            // `accepted_consumers`).
            max_consumers: i32::try_from(filters.len()).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Arc<Vec<String>> = Arc::new((0..filters.len()).map(|i| format!("c{i}")).collect());
    let mem_before = server.varz().await.mem;

    let started = Instant::now();
    let creates = filters.iter().zip(names.iter()).map(|(filter, name)| {
        let stream = stream.clone();
        async move {
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: filter.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_deliver: -1,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("consumer {name}: {e}"));
        }
    });
    futures::stream::iter(creates)
        .buffer_unordered(CREATES_IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    let create = started.elapsed();
    let mem_created = server.varz().await.mem;

    let stop = CancellationToken::new();
    let expiries = Arc::new(AtomicU64::new(0));
    let pulls = tokio::spawn(hold_pulls(
        client.clone(),
        names.clone(),
        expiries.clone(),
        stop.clone(),
    ));
    // Every consumer has its request before the window opens.
    let outstanding = poll("pull requests to be outstanding", SERVER_DEADLINE, || {
        let (stream, last) = (stream.clone(), names.last().cloned().unwrap());
        async move {
            let info = stream.consumer_info(&last).await.ok()?;
            (info.num_waiting > 0).then_some(())
        }
    });
    outstanding.await;
    // The renewals come in bursts, one per expiry; the window starts between two, so
    // it holds whole bursts.
    tokio::time::sleep(FETCH_EXPIRY / 2).await;
    let seen = expiries.load(Ordering::SeqCst);
    let ((), idle) = server.measure(window, async {}).await;
    let expiries_per_s = (expiries.load(Ordering::SeqCst) - seen) as f64 / idle.seconds;
    let mem_idle = server.varz().await.mem;
    stop.cancel();
    pulls.await.unwrap();
    drop((client, js, stream));

    let count = names.len();
    let last = names.last().unwrap().clone();
    let stopping = Instant::now();
    server.stop(false).await;
    let term_stop = stopping.elapsed();
    let spawned = server.spawn().await;
    ready(&server, count, &last).await;
    let term_ready = spawned.elapsed();
    let mem_restarted = server.varz().await.mem;
    server.stop(true).await;
    let spawned = server.spawn().await;
    ready(&server, count, &last).await;
    let kill_ready = spawned.elapsed();

    ConsumerFigures {
        count,
        create,
        mem_before,
        mem_created,
        mem_idle,
        idle,
        expiries_per_s,
        term_stop,
        term_ready,
        kill_ready,
        mem_restarted,
    }
}

/// Keeps one pull request (batch 1, expires [`FETCH_EXPIRY`]) outstanding on every
/// consumer, answered on one inbox subscription per consumer, and sends the next as
/// soon as the server ends the last: what an idle worker does for each of its
/// consumers. Counts the requests the server ended.
async fn hold_pulls(
    client: async_nats::Client,
    names: Arc<Vec<String>>,
    expiries: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let request = Bytes::from(
        serde_json::json!({"batch": 1, "expires": FETCH_EXPIRY.as_nanos() as u64}).to_string(),
    );
    let mut inboxes = Vec::with_capacity(names.len());
    let mut subscriptions = Vec::with_capacity(names.len());
    for index in 0..names.len() {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(inbox.clone()).await.unwrap();
        subscriptions.push(subscription.map(move |message| (index, message)));
        inboxes.push(inbox);
    }
    let pull = |index: usize| {
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{}", names[index]);
        let (client, inbox, request) = (client.clone(), inboxes[index].clone(), request.clone());
        async move {
            client
                .publish_with_reply(subject, inbox, request)
                .await
                .unwrap()
        }
    };
    for index in 0..names.len() {
        pull(index).await;
    }
    let mut replies = futures::stream::select_all(subscriptions);
    loop {
        let (index, message) = tokio::select! {
            () = stop.cancelled() => return,
            reply = replies.next() => reply.expect("subscriptions stay open"),
        };
        // An idle consumer only ever answers with a status (408: the request expired).
        if message.status.is_some() {
            expiries.fetch_add(1, Ordering::Relaxed);
            pull(index).await;
        }
    }
}

/// Waits until the restarted server's JetStream answers with all `count` consumers
/// and the last one created answers its info.
async fn ready(server: &Server, count: usize, last: &str) {
    let url = server.url();
    poll("JetStream with its consumers", SERVER_DEADLINE, || {
        let url = url.clone();
        async move {
            let client = tokio::time::timeout(Duration::from_secs(1), async_nats::connect(&url))
                .await
                .ok()?
                .ok()?;
            let js = jetstream::new(client);
            let account = js.query_account().await.ok()?;
            if account.consumers < count {
                return None;
            }
            let stream = js.get_stream(STREAM).await.ok()?;
            stream.consumer_info(last).await.ok().map(|_| ())
        }
    })
    .await;
}

/// What renewing `count` leases cost.
struct LeaseFigures {
    count: usize,
    updates_per_s: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Longest time to renew every key once.
    round: Duration,
    load: Load,
}

/// Creates `count` keys `<pool>.<n>` in a KV bucket (history 1, max_age
/// [`LEASE_TTL`]) and renews each every TTL / [`LEASE_RENEWALS_PER_TTL`] by an update
/// on its last revision, for [`LEASE_ROUNDS`] rounds.
async fn leases(count: usize) -> LeaseFigures {
    let server = Server::start().await;
    let (_client, js) = connect(&server.url()).await;
    let bucket = js
        .create_key_value(kv::Config {
            bucket: "bench_leases".to_owned(),
            history: 1,
            max_age: LEASE_TTL,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let holder = Bytes::from_static(b"worker-0");
    let keys: Vec<String> = (0..count).map(|n| format!("pool-a.{n}")).collect();
    let creates = keys.iter().map(|key| {
        let (bucket, holder) = (bucket.clone(), holder.clone());
        async move { bucket.create(key, holder).await.unwrap() }
    });
    let mut revisions: Vec<u64> = futures::stream::iter(creates)
        .buffered(UPDATES_IN_FLIGHT)
        .collect()
        .await;

    let period = LEASE_TTL / LEASE_RENEWALS_PER_TTL;
    let window = period * LEASE_ROUNDS;
    let renewing = async {
        let mut latencies = Vec::with_capacity(count * LEASE_ROUNDS as usize);
        let mut round_max = Duration::ZERO;
        let mut rounds = tokio::time::interval(period);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..LEASE_ROUNDS {
            rounds.tick().await;
            let round = Instant::now();
            let updates = keys.iter().zip(revisions.iter()).map(|(key, revision)| {
                let (bucket, holder, revision) = (bucket.clone(), holder.clone(), *revision);
                async move {
                    let sent = Instant::now();
                    let revision = bucket
                        .update(key, holder, revision)
                        .await
                        .unwrap_or_else(|e| panic!("renewing {key}: {e}"));
                    (revision, sent.elapsed())
                }
            });
            let renewed: Vec<(u64, Duration)> = futures::stream::iter(updates)
                .buffered(UPDATES_IN_FLIGHT)
                .collect()
                .await;
            round_max = round_max.max(round.elapsed());
            for (slot, (revision, latency)) in revisions.iter_mut().zip(renewed) {
                *slot = revision;
                latencies.push(latency);
            }
        }
        (latencies, round_max)
    };
    let ((mut latencies, round), load) = server.measure(window, renewing).await;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    LeaseFigures {
        count,
        updates_per_s: latencies.len() as f64 / load.seconds,
        p50: at(0.50),
        p99: at(0.99),
        max: *latencies.last().unwrap(),
        round,
        load,
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agents = env_number("NEXO_BENCH_AGENTS", DEFAULT_AGENTS as u64) as usize;
    let partitions = env_number("NEXO_BENCH_PARTITIONS", DEFAULT_PARTITIONS as u64) as usize;
    let window = Duration::from_secs(env_number(
        "NEXO_BENCH_WINDOW_SECONDS",
        DEFAULT_WINDOW_SECONDS,
    ));
    let total = Instant::now();

    let (about, unset_limit, minus_one_limit) = {
        let server = Server::start().await;
        let (_client, js) = connect(&server.url()).await;
        (
            server.varz().await,
            accepted_consumers(&js, 0).await,
            accepted_consumers(&js, -1).await,
        )
    };
    let per_agent = consumers(
        (0..agents)
            .map(|i| format!("agent.route.ns{}.agent{i}", i % 10))
            .collect(),
        window,
    )
    .await;
    let per_partition = consumers(
        (0..partitions)
            .map(|p| format!("agent.route.p{p}.>"))
            .collect(),
        window,
    )
    .await;
    let few_leases = leases(partitions).await;
    let many_leases = leases(agents).await;

    println!(
        "nats-server {}, {} cores shared with the bench, loopback, file storage",
        about.version, about.cores
    );
    println!();
    println!("a. durable pull consumers (explicit ack) on a WorkQueue stream `agent.route.>`");
    println!(
        "   idle: one pull (batch 1, expires {} s) outstanding per consumer, renewed when it expires; window {} s",
        FETCH_EXPIRY.as_secs(),
        window.as_secs()
    );
    println!("   consumers a stream takes with max_consumers unset: {unset_limit}");
    println!("   consumers a stream takes with max_consumers -1:    {minus_one_limit}");
    println!("   (the measured stream sets max_consumers = K)");
    let a = &per_agent;
    let p = &per_partition;
    let header_a = format!("per agent (K={})", a.count);
    let header_p = format!("per partition (K={})", p.count);
    let row = |label: &str, x: String, y: String| println!("   {label:<38} {x:>22} {y:>22}");
    row("", header_a, header_p);
    row(
        &format!("create ({CREATES_IN_FLIGHT} in flight)"),
        secs(a.create),
        secs(p.create),
    );
    row(
        "create rate",
        format!("{:.0}/s", a.count as f64 / a.create.as_secs_f64()),
        format!("{:.0}/s", p.count as f64 / p.create.as_secs_f64()),
    );
    row(
        "server mem: stream only",
        mib(a.mem_before),
        mib(p.mem_before),
    );
    row(
        "server mem: consumers created",
        mib(a.mem_created),
        mib(p.mem_created),
    );
    row(
        "server mem: idle, pulls outstanding",
        mib(a.mem_idle),
        mib(p.mem_idle),
    );
    row(
        "server mem per consumer (idle)",
        format!(
            "{:.1} KiB",
            (a.mem_idle - a.mem_before) / a.count as f64 / 1024.0
        ),
        format!(
            "{:.1} KiB",
            (p.mem_idle - p.mem_before) / p.count as f64 / 1024.0
        ),
    );
    row(
        "idle: server msgs in/s",
        format!("{:.0}", a.idle.in_per_s),
        format!("{:.1}", p.idle.in_per_s),
    );
    row(
        "idle: server msgs out/s",
        format!("{:.0}", a.idle.out_per_s),
        format!("{:.1}", p.idle.out_per_s),
    );
    row(
        "idle: pull expiries seen/s",
        format!("{:.0}", a.expiries_per_s),
        format!("{:.1}", p.expiries_per_s),
    );
    row(
        "idle: server CPU (varz, mean)",
        format!("{:.1} %", a.idle.cpu),
        format!("{:.1} %", p.idle.cpu),
    );
    row(
        "restart: SIGTERM until exit",
        secs(a.term_stop),
        secs(p.term_stop),
    );
    row(
        "restart: start until consumers answer",
        secs(a.term_ready),
        secs(p.term_ready),
    );
    row(
        "server mem after restart",
        mib(a.mem_restarted),
        mib(p.mem_restarted),
    );
    row(
        "after SIGKILL: start until answer",
        secs(a.kill_ready),
        secs(p.kill_ready),
    );
    println!();
    println!(
        "b. leases: KV bucket (history 1, max_age {} s), keys `<pool>.<n>`, each updated on its revision every {:.2} s, {UPDATES_IN_FLIGHT} in flight, {LEASE_ROUNDS} rounds",
        LEASE_TTL.as_secs(),
        (LEASE_TTL / LEASE_RENEWALS_PER_TTL).as_secs_f64()
    );
    println!(
        "   {:>7} {:>10} {:>10} {:>10} {:>10} {:>14} {:>12} {:>11}",
        "keys", "updates/s", "p50", "p99", "max", "round (all)", "server in/s", "server CPU"
    );
    for lease in [&few_leases, &many_leases] {
        println!(
            "   {:>7} {:>10.1} {:>10} {:>10} {:>10} {:>14} {:>12.0} {:>9.1} %",
            lease.count,
            lease.updates_per_s,
            ms(lease.p50),
            ms(lease.p99),
            ms(lease.max),
            ms(lease.round),
            lease.load.in_per_s,
            lease.load.cpu
        );
    }
    println!();
    println!("total run {}", secs(total.elapsed()));
}
