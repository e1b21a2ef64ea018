//! What moving an agent costs, on a real nats-server (started here; `NEXO_NATS_SERVER`):
//!
//!     cargo bench -p nexo-worker --bench handoff
//!
//! - Hand-off of an agent whose memory file is 1 MB and 50 MB (`NEXO_BENCH_HANDOFF_MB`,
//!   comma-separated): the old owner stores a snapshot (export, upload, index, trim)
//!   and the new owner takes over (download, import, replay, marker, prepare); p50 and
//!   p99 over the runs (p99 of a few runs is their maximum). Baseline in the same run:
//!   a raw object-store put and get of the same bytes.
//! - The per-turn cost of the journal: `record_turn` on a journalled memory beside the
//!   same on a local-only one (same SQLite settings), and a raw conditional JetStream
//!   publish of the same entry size as the floor of the append.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexo_api::ResourceKey;
use nexo_api::spec::MemorySpec;
use nexo_worker::benchmarks::Journals;
use nexo_worker::memory::{AgentMemory, EmbedError, Embedder, Exchange, NewMemory};
use tokio::io::AsyncReadExt;

const DIMENSIONS: usize = 384;
/// Turns timed per variant.
const TURNS: usize = 1000;

struct Hashing;

#[async_trait]
impl Embedder for Hashing {
    fn id(&self) -> String {
        format!("bench/{DIMENSIONS}")
    }
    fn dimensions(&self) -> usize {
        DIMENSIONS
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; DIMENSIONS];
                for (i, b) in t.bytes().enumerate() {
                    v[(i * 31 + b as usize) % DIMENSIONS] += 1.0;
                }
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                v.iter_mut().for_each(|x| *x /= n);
                v
            })
            .collect())
    }
}

/// nats-server with JetStream on a port it picks (read from its ports file); killed on
/// drop.
struct Server {
    child: Child,
    dirs: Vec<PathBuf>,
    url: String,
}

impl Server {
    async fn start() -> Self {
        let binary = std::env::var_os("NEXO_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let (store, ports) = (temp_dir("js"), temp_dir("ports"));
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(&store)
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (set NEXO_NATS_SERVER)");
        let name = binary.file_name().unwrap().to_string_lossy().into_owned();
        let file = ports.join(format!("{name}_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let found = std::fs::read_to_string(&file).ok().and_then(|text| {
                let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
                ports["nats"][0].as_str().map(str::to_owned)
            });
            if let Some(url) = found {
                break url;
            }
            assert!(Instant::now() < deadline, "nats-server wrote no ports file");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Self {
            child,
            dirs: vec![store, ports],
            url,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nexo-bench-{label}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn open(path: &std::path::Path) -> AgentMemory {
    AgentMemory::open(path, &MemorySpec::default(), Arc::new(Hashing))
        .await
        .unwrap()
}

/// Fills a local-only memory file until its export is at least `bytes` long.
async fn fill(path: &std::path::Path, bytes: usize) -> usize {
    let memory = open(path).await;
    let text = "a remembered fact of some length, ".repeat(30);
    let mut n = 0;
    loop {
        // Small batches at first, so a 1 MB target is not overshot by much.
        let batch = if n < 1000 { 25 } else { 500 };
        let memories: Vec<NewMemory> = (0..batch)
            .map(|i| NewMemory::fact(format!("{n}-{i}: {text}")))
            .collect();
        memory.remember_all(memories).await.unwrap();
        n += batch;
        let wal = path.with_extension("db-wal");
        let on_disk = std::fs::metadata(path).map_or(0, |m| m.len())
            + std::fs::metadata(&wal).map_or(0, |m| m.len());
        if on_disk as usize >= bytes {
            let size = memory.export().await.unwrap().len();
            if size >= bytes {
                return size;
            }
        }
    }
}

async fn handoff(
    journals: &Arc<Journals>,
    client: &async_nats::Client,
    megabytes: usize,
    runs: usize,
) {
    let dir = temp_dir("handoff");
    let key = ResourceKey::new("bench", format!("agent-{megabytes}mb"));
    let durable = Arc::new(journals.agent(&key));
    let paths = [dir.join("a.db"), dir.join("b.db")];
    let size = fill(&paths[0], megabytes << 20).await;
    let mut owner = open(&paths[0]).await.with_durable(durable.clone());
    owner.take_over("w0").await.unwrap();
    let (mut hand, mut take, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // A few changes since the last snapshot, as a live agent has.
        for t in 0..5 {
            owner
                .record_turn(
                    "c",
                    "ada",
                    &format!("m{run}-{t}"),
                    Exchange {
                        user: "hello".to_owned(),
                        agent: "hi".to_owned(),
                    },
                )
                .await
                .unwrap();
        }
        let next = &paths[(run + 1) % 2];
        let _ = std::fs::remove_file(next);
        let started = Instant::now();
        owner.store_snapshot().await.unwrap();
        let handed = started.elapsed();
        let successor = open(next).await.with_durable(durable.clone());
        successor.take_over(&format!("w{}", run + 1)).await.unwrap();
        let took = started.elapsed();
        hand.push(handed);
        take.push(took - handed);
        total.push(took);
        owner = successor;
    }
    // Baseline: the same bytes through a raw object store, put then get.
    let bytes = owner.export().await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let store = jetstream
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: format!("bench-raw-{megabytes}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut raw = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        store.put("blob", &mut bytes.as_slice()).await.unwrap();
        let mut object = store.get("blob").await.unwrap();
        let mut back = Vec::new();
        object.read_to_end(&mut back).await.unwrap();
        raw.push(started.elapsed());
    }
    println!(
        "{:>6} MB  {:>5}  {:>12} {:>12}  {:>12} {:>12}  {:>12} {:>12}  {:>12} {:>12}",
        size >> 20,
        runs,
        ms(quantile(&mut hand, 0.5)),
        ms(quantile(&mut hand, 0.99)),
        ms(quantile(&mut take, 0.5)),
        ms(quantile(&mut take, 0.99)),
        ms(quantile(&mut total, 0.5)),
        ms(quantile(&mut total, 0.99)),
        ms(quantile(&mut raw, 0.5)),
        ms(quantile(&mut raw, 0.99)),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn turns(memory: &AgentMemory, label: &str) -> Vec<Duration> {
    let mut samples = Vec::new();
    for t in 0..TURNS {
        let started = Instant::now();
        memory
            .record_turn(
                &format!("c{}", t % 20),
                "ada",
                &format!("{label}-{t}"),
                Exchange {
                    user: "what is the weather like today in the city".to_owned(),
                    agent: "it is sunny with a light breeze and about twenty degrees".to_owned(),
                },
            )
            .await
            .unwrap();
        samples.push(started.elapsed());
    }
    samples
}

async fn journal_cost(journals: &Arc<Journals>, client: &async_nats::Client) {
    let dir = temp_dir("turns");
    let local = open(&dir.join("local.db")).await;
    let mut plain = turns(&local, "local").await;
    let key = ResourceKey::new("bench", "journalled");
    let journalled = open(&dir.join("journalled.db"))
        .await
        .with_durable(Arc::new(journals.agent(&key)));
    journalled.take_over("w0").await.unwrap();
    let mut with = turns(&journalled, "journalled").await;
    // Raw: a conditional JetStream publish of an entry of the same size.
    let jetstream = async_nats::jetstream::new(client.clone());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_RAW".to_owned(),
            subjects: vec!["bench.raw".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    let entry = vec![b'x'; 4096];
    let mut raw = Vec::new();
    let mut last = 0u64;
    for _ in 0..TURNS {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        let started = Instant::now();
        let ack = jetstream
            .publish_with_headers("bench.raw", headers, entry.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        raw.push(started.elapsed());
        last = ack.sequence;
    }
    for (name, samples) in [
        ("record_turn, local SQLite only", &mut plain),
        ("record_turn, journalled", &mut with),
        ("raw conditional JetStream publish, 4 KiB", &mut raw),
    ] {
        let total: Duration = samples.iter().sum();
        println!(
            "  {name:<42} p50 {:>9}  p99 {:>9}  {:>7.0} turns/s",
            ms(quantile(samples, 0.5)),
            ms(quantile(samples, 0.99)),
            TURNS as f64 / total.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::main]
async fn main() {
    let server = Server::start().await;
    let client = async_nats::connect(&server.url).await.unwrap();
    let journals = Journals::new(async_nats::jetstream::new(client.clone()));
    let sizes: Vec<usize> = std::env::var("NEXO_BENCH_HANDOFF_MB")
        .unwrap_or_else(|_| "1,50".to_owned())
        .split(',')
        .map(|s| s.trim().parse().expect("sizes in MB"))
        .collect();
    println!(
        "hand-off of one agent (old owner: snapshot; new owner: take-over), nats-server file storage, loopback"
    );
    println!(
        "{:>9}  {:>5}  {:>25}  {:>25}  {:>25}  {:>25}",
        "memory",
        "runs",
        "hand off p50 / p99",
        "take over p50 / p99",
        "total p50 / p99",
        "raw put+get p50 / p99"
    );
    for mb in sizes {
        let runs = if mb >= 10 { 5 } else { 20 };
        handoff(&journals, &client, mb, runs).await;
    }
    println!("\nper-turn cost of the journal ({TURNS} turns, one at a time)");
    journal_cost(&journals, &client).await;
    drop(server);
}
