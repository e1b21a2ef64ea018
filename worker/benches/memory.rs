//! Long-term memory recall and insert, against raw sqlite-vec in the same run.
//!
//!     cargo bench -p nexo-worker --bench memory
//!
//! For 10,000 and 100,000 memories with 384-dimensional vectors: insert throughput of
//! the memory store (memory row + FTS5 + vec0, 1,000 per transaction) beside raw
//! `vec0` inserts, and recall latency (p50/p99) by vector, keyword and hybrid search
//! beside a raw `vec0` KNN query of the same table size. Vectors come from a seeded
//! generator, so the figures measure storage and search, not an embedding model.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexo_api::spec::{MemorySpec, RecallMode};
use nexo_worker::memory::{AgentMemory, EmbedError, Embedder, NewMemory, register_sqlite_vec};
use rusqlite::{Connection, params};
use xxhash_rust::xxh3::xxh3_64_with_seed;

const DIMENSIONS: usize = 384;
const BATCH: usize = 1000;
const K: usize = 10;

/// Syllables of the synthetic vocabulary: 40 × 40 = 1,600 two-syllable words, so a
/// word occurs in about 0.4% of the memories (six words each), as a fairly specific
/// word of real text would.
const SYLLABLES: [&str; 40] = [
    "ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qui", "ro", "su",
    "ta", "ve", "wi", "xo", "yu", "za", "bre", "cli", "dro", "fla", "gri", "kle", "mon", "nor",
    "pla", "sta", "tri", "vor", "wen", "zel", "ark", "est", "ion", "ult", "ym",
];

fn word(n: usize) -> String {
    format!("{}{}", SYLLABLES[n % 40], SYLLABLES[(n / 40) % 40])
}

/// Unit vectors derived from the text's hash: deterministic, spread over the sphere.
struct SeededEmbedder;

fn vector(text: &str) -> Vec<f32> {
    let seed = xxh3_64_with_seed(text.as_bytes(), 7);
    let mut v: Vec<f32> = (0..DIMENSIONS as u64)
        .map(|i| (xxh3_64_with_seed(&i.to_le_bytes(), seed) as f64 / u64::MAX as f64) as f32 - 0.5)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

#[async_trait]
impl Embedder for SeededEmbedder {
    fn id(&self) -> String {
        format!("bench-seeded/{DIMENSIONS}")
    }
    fn dimensions(&self) -> usize {
        DIMENSIONS
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| vector(t)).collect())
    }
}

fn text(i: usize) -> String {
    let h = xxh3_64_with_seed(&(i as u64).to_le_bytes(), 1) as usize;
    let words: Vec<String> = (0..6).map(|j| word((h >> (j * 10)) % 1600)).collect();
    format!("memory {i}: {}", words.join(" "))
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    Latency {
        p50: percentile(&mut samples, 0.50),
        p99: percentile(&mut samples, 0.99),
    }
}

fn queries(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{} {}", word(i * 7), word(i * 13 + 5)))
        .collect()
}

/// Raw sqlite-vec: a bare `vec0` table, the same vectors, 1,000 per transaction.
fn raw_baseline(dir: &Path, n: usize, queries: &[String]) -> (f64, Latency) {
    register_sqlite_vec();
    let mut conn = Connection::open(dir.join("raw.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE raw USING vec0(embedding float[{DIMENSIONS}])"
    ))
    .unwrap();
    let started = Instant::now();
    for start in (0..n).step_by(BATCH) {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO raw(rowid, embedding) VALUES (?1, ?2)")
                .unwrap();
            for i in start..(start + BATCH).min(n) {
                let blob: Vec<u8> = vector(&text(i))
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect();
                stmt.execute(params![i as i64 + 1, blob]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let mut stmt = conn
        .prepare(
            "SELECT rowid, distance FROM raw WHERE embedding MATCH ?1 AND k = ?2 ORDER BY distance",
        )
        .unwrap();
    let samples = queries
        .iter()
        .map(|q| {
            let blob: Vec<u8> = vector(q).iter().flat_map(|f| f.to_le_bytes()).collect();
            let started = Instant::now();
            let rows: Vec<(i64, f64)> = stmt
                .query_map(params![blob, K as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(rows.len(), K);
            started.elapsed()
        })
        .collect();
    (rate, latency(samples))
}

async fn run(n: usize, query_count: usize) {
    let dir = TempDir::new();
    let queries = queries(query_count);
    let (raw_rate, raw) = raw_baseline(&dir.0, n, &queries);

    let mut spec = MemorySpec::default();
    spec.long_term.max_items = n as u64;
    let memory = AgentMemory::open(&dir.0.join("memory.db"), &spec, Arc::new(SeededEmbedder))
        .await
        .unwrap();
    let started = Instant::now();
    for start in (0..n).step_by(BATCH) {
        let batch = (start..(start + BATCH).min(n))
            .map(|i| NewMemory::fact(text(i)).from_sender(format!("user-{}", i % 100)))
            .collect();
        memory.remember_all(batch).await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(memory.count().await.unwrap(), n as u64);
    let bytes = memory.export().await.unwrap().len();

    println!(
        "\n{n} memories of 100 senders, {DIMENSIONS}-d vectors, k = {K}, {query_count} two-word queries"
    );
    println!(
        "  insert: memory store {rate:>9.0}/s   raw vec0 {raw_rate:>9.0}/s   ratio {:.2}",
        raw_rate / rate
    );
    println!(
        "  file: {:.0} MB exported, {:.2} KB per memory",
        bytes as f64 / 1e6,
        bytes as f64 / n as f64 / 1e3
    );
    println!(
        "  raw vec0 KNN         p50 {:>8.2} ms   p99 {:>8.2} ms",
        ms(raw.p50),
        ms(raw.p99)
    );
    for mode in [RecallMode::Vector, RecallMode::Keyword, RecallMode::Hybrid] {
        let mut samples = Vec::with_capacity(queries.len());
        for q in &queries {
            let started = Instant::now();
            let hits = memory.search(q, mode, K, None).await.unwrap();
            samples.push(started.elapsed());
            assert!(!hits.is_empty());
        }
        let l = latency(samples);
        println!(
            "  recall {:<8}      p50 {:>8.2} ms   p99 {:>8.2} ms   p50 ratio to raw KNN {:.2}",
            format!("{mode:?}").to_lowercase(),
            ms(l.p50),
            ms(l.p99),
            l.p50.as_secs_f64() / raw.p50.as_secs_f64()
        );
    }
    // A turn's recall: scoped to one sender and the agent's own memories.
    let mut samples = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let owners = Some(vec![format!("user-{}", i % 100), String::new()]);
        let started = Instant::now();
        memory
            .search(q, RecallMode::Hybrid, K, owners)
            .await
            .unwrap();
        samples.push(started.elapsed());
    }
    let l = latency(samples);
    println!(
        "  recall hybrid, one sender's memories p50 {:>8.2} ms   p99 {:>8.2} ms",
        ms(l.p50),
        ms(l.p99)
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("nexo-bench-memory-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    run(10_000, 300).await;
    run(100_000, 100).await;
}
