//! Agent memory on real SQLite with sqlite-vec: sessions across restarts, recall by
//! keyword, vector and hybrid, export/import, "forget me", broken files and a full
//! database. The only double is the embedding server, a local HTTP server speaking the
//! OpenAI `/v1/embeddings` wire format with fixed vectors.

mod support;

use std::sync::Arc;

use nexo_api::spec::{EmbedderProvider, EmbedderSpec, HistoryOverflow, MemorySpec, RecallMode};
use nexo_worker::memory::embedder::{self, HashingEmbedder};
use nexo_worker::memory::{AgentMemory, Embedder, Exchange, Hit, MemoryError, NewMemory};
use nexo_worker::secrets::Secrets;
use support::TempDir;
use support::embeddings::FakeEmbeddings;

fn exchange(user: &str, agent: &str) -> Exchange {
    Exchange {
        user: user.to_owned(),
        agent: agent.to_owned(),
    }
}

fn hashing() -> Arc<dyn Embedder> {
    Arc::new(HashingEmbedder::new(384))
}

async fn open(dir: &TempDir, file: &str, spec: &MemorySpec) -> AgentMemory {
    open_with(dir, file, spec, hashing()).await
}

async fn open_with(
    dir: &TempDir,
    file: &str,
    spec: &MemorySpec,
    embedder: Arc<dyn Embedder>,
) -> AgentMemory {
    AgentMemory::open(&dir.path().join(file), spec, embedder)
        .await
        .unwrap()
}

fn texts(hits: &[Hit]) -> Vec<String> {
    hits.iter().map(|h| h.item.memory.text.clone()).collect()
}

#[tokio::test]
async fn sessions_survive_a_restart() {
    let dir = TempDir::new();
    let spec = MemorySpec::default();
    {
        let memory = open(&dir, "agent.db", &spec).await;
        memory
            .record_turn("c1", "ada", "m1", exchange("hello", "hi Ada"))
            .await
            .unwrap();
        memory
            .record_turn("c1", "ada", "m2", exchange("my cat is Tom", "noted"))
            .await
            .unwrap();
    }
    let memory = open(&dir, "agent.db", &spec).await;
    let session = memory.session("c1").await.unwrap();
    assert_eq!(session.turns.len(), 2);
    assert_eq!(session.turns[1].user, "my cat is Tom");
    assert!(memory.session("other").await.unwrap().turns.is_empty());
}

#[tokio::test]
async fn histories_are_bounded_by_turns_and_tokens_and_summarised() {
    let dir = TempDir::new();
    let mut spec = MemorySpec {
        history_turns: 2,
        history_overflow: HistoryOverflow::Summarize,
        ..MemorySpec::default()
    };
    let memory = open(&dir, "turns.db", &spec).await;
    for i in 0..4 {
        memory
            .record_turn(
                "c",
                "u",
                "m",
                exchange(&format!("question {i}. more"), "answer"),
            )
            .await
            .unwrap();
    }
    let session = memory.session("c").await.unwrap();
    assert_eq!(session.turns.len(), 2);
    assert_eq!(session.turns[0].user, "question 2. more");
    let summary = session.summary.unwrap();
    assert!(
        summary.contains("question 0.") && summary.contains("question 1."),
        "{summary}"
    );
    assert!(!summary.contains("more"), "only first sentences: {summary}");

    spec.history_turns = 100;
    spec.history_tokens = 30;
    spec.history_overflow = HistoryOverflow::Drop;
    let memory = open(&dir, "tokens.db", &spec).await;
    let long = "x".repeat(40); // 10 tokens each side
    for _ in 0..3 {
        memory
            .record_turn("c", "u", "m", exchange(&long, &long))
            .await
            .unwrap();
    }
    let session = memory.session("c").await.unwrap();
    assert_eq!(session.turns.len(), 1, "20 tokens per turn, 30 allowed");
    assert_eq!(session.summary, None);
}

/// The production OpenAI-compatible embedder pointed at `server`, 4 dimensions.
fn embedder_of(server: &FakeEmbeddings) -> Arc<dyn Embedder> {
    let spec = EmbedderSpec {
        provider: EmbedderProvider::Openai,
        dimensions: 4,
        model: "fixed".to_owned(),
        base_url: Some(server.base_url.clone()),
        ..EmbedderSpec::default()
    };
    embedder::from_spec(&spec, &Secrets::new("/nonexistent")).unwrap()
}

/// Fixed "semantic" vectors: texts about Ada's colour preference point one way,
/// pets another, travel a third, everything else a fourth.
fn concept_vector(text: &str) -> Vec<f32> {
    let t = text.to_lowercase();
    if t.contains("teal") || t.contains("hue") {
        vec![1.0, 0.1, 0.0, 0.0]
    } else if t.contains("cat") || t.contains("pet") {
        vec![0.0, 1.0, 0.1, 0.0]
    } else if t.contains("train") || t.contains("trip") {
        vec![0.0, 0.0, 1.0, 0.1]
    } else {
        vec![0.1, 0.0, 0.0, 1.0]
    }
}

async fn plant(memory: &AgentMemory, facts: &[&str]) {
    for fact in facts {
        memory.remember(NewMemory::fact(*fact)).await.unwrap();
    }
}

const FACTS: [&str; 6] = [
    "Ada's favourite colour is teal",
    "Ada has a cat named Tom",
    "Ada takes the night train to Vienna",
    "Ada prefers answers in French",
    "The office closes at six",
    "Ada likes jazz",
];

#[tokio::test]
async fn openai_embedder_recalls_a_paraphrase() {
    let server = FakeEmbeddings::start(concept_vector).await;
    let dir = TempDir::new();
    let memory = open_with(&dir, "a.db", &MemorySpec::default(), embedder_of(&server)).await;
    plant(&memory, &FACTS).await;
    // No word in common with the planted fact.
    let query = "which hue appeals to her most?";
    let hits = memory
        .search(query, RecallMode::Vector, 3, None)
        .await
        .unwrap();
    assert_eq!(hits[0].item.memory.text, FACTS[0], "{:?}", texts(&hits));
    let keyword = memory
        .search(query, RecallMode::Keyword, 3, None)
        .await
        .unwrap();
    assert!(!texts(&keyword).contains(&FACTS[0].to_owned()));
    let hybrid = memory
        .search(query, RecallMode::Hybrid, 3, None)
        .await
        .unwrap();
    assert!(texts(&hybrid).contains(&FACTS[0].to_owned()));
    // The production client spoke the wire format: model and a list of inputs.
    let first = server.request(0);
    assert_eq!(first["model"], "fixed");
    assert!(first["input"].is_array());
}

#[tokio::test]
async fn offline_embedder_recalls_a_shared_keyword() {
    let dir = TempDir::new();
    let memory = open(&dir, "a.db", &MemorySpec::default()).await;
    plant(&memory, &FACTS).await;
    let hits = memory
        .search("what is the name of the cat?", RecallMode::Vector, 3, None)
        .await
        .unwrap();
    assert!(
        texts(&hits).contains(&FACTS[1].to_owned()),
        "{:?}",
        texts(&hits)
    );
    let hits = memory
        .search("cat", RecallMode::Hybrid, 1, None)
        .await
        .unwrap();
    assert_eq!(texts(&hits), [FACTS[1]]);
}

/// Vectors that disagree with the words: "zebra" texts point at the query's
/// direction without sharing a word with it.
fn crossed_vector(text: &str) -> Vec<f32> {
    if text.contains("zebra") || text.contains("orbit") {
        vec![1.0, 0.0, 0.0, 0.0]
    } else if text.contains("apple") {
        vec![0.0, 0.0, 0.0, 1.0]
    } else {
        vec![0.0, 1.0, 0.2, 0.0]
    }
}

#[tokio::test]
async fn hybrid_finds_facts_only_one_method_ranks() {
    let server = FakeEmbeddings::start(crossed_vector).await;
    let dir = TempDir::new();
    let memory = open_with(&dir, "h.db", &MemorySpec::default(), embedder_of(&server)).await;
    let word_only = "the apple harvest was late"; // shares "apple", vector far away
    let vector_only = "a zebra crossed the road"; // no shared word, vector identical
    plant(
        &memory,
        &[
            word_only,
            vector_only,
            "noise one",
            "noise two",
            "noise three",
        ],
    )
    .await;
    let query = "apple orbit";
    let k = 2;
    let keyword = texts(
        &memory
            .search(query, RecallMode::Keyword, k, None)
            .await
            .unwrap(),
    );
    let vector = texts(
        &memory
            .search(query, RecallMode::Vector, k, None)
            .await
            .unwrap(),
    );
    assert!(keyword.contains(&word_only.to_owned()) && !keyword.contains(&vector_only.to_owned()));
    assert!(vector.contains(&vector_only.to_owned()));
    let hybrid = texts(
        &memory
            .search(query, RecallMode::Hybrid, k, None)
            .await
            .unwrap(),
    );
    assert!(hybrid.contains(&word_only.to_owned()), "{hybrid:?}");
    assert!(hybrid.contains(&vector_only.to_owned()), "{hybrid:?}");

    // One that only the keyword index ranks in its top k, found by hybrid with the
    // same k: the vector list is full of better neighbours.
    plant(&memory, &["zebra one", "zebra two", "zebra three"]).await;
    let vector = texts(
        &memory
            .search(query, RecallMode::Vector, 3, None)
            .await
            .unwrap(),
    );
    assert!(!vector.contains(&word_only.to_owned()), "{vector:?}");
    let hybrid = texts(
        &memory
            .search(query, RecallMode::Hybrid, 3, None)
            .await
            .unwrap(),
    );
    assert!(hybrid.contains(&word_only.to_owned()), "{hybrid:?}");
}

#[tokio::test]
async fn export_then_import_gives_identical_results() {
    let dir = TempDir::new();
    let spec = MemorySpec::default();
    let source = open(&dir, "source.db", &spec).await;
    plant(&source, &FACTS).await;
    for i in 0..50 {
        source
            .remember(
                NewMemory::fact(format!("filler memory number {i} about topic {}", i % 7))
                    .from_sender("bob"),
            )
            .await
            .unwrap();
    }
    source
        .record_turn(
            "c",
            "ada",
            "m1",
            exchange("where does Ada travel?", "Vienna"),
        )
        .await
        .unwrap();
    let file = source.export().await.unwrap();

    let target = open(&dir, "target.db", &spec).await;
    target.import(file).await.unwrap();
    for query in ["cat", "Ada travel Vienna", "topic 3", "jazz music"] {
        for mode in [RecallMode::Keyword, RecallMode::Vector, RecallMode::Hybrid] {
            let before = source.search(query, mode, 5, None).await.unwrap();
            let after = target.search(query, mode, 5, None).await.unwrap();
            assert_eq!(before, after, "{query} {mode:?}");
            assert!(!after.is_empty());
        }
    }
    assert_eq!(
        target.session("c").await.unwrap(),
        source.session("c").await.unwrap()
    );
    assert_eq!(target.count().await.unwrap(), source.count().await.unwrap());

    let err = target.import(b"not a database".to_vec()).await.unwrap_err();
    assert!(matches!(err, MemoryError::InvalidExport(_)), "{err}");
    assert_eq!(target.count().await.unwrap(), source.count().await.unwrap());
}

#[tokio::test]
async fn a_new_embedder_embeds_every_memory_again() {
    let dir = TempDir::new();
    let path = dir.path().join("e.db");
    let spec = MemorySpec::default();
    {
        let memory = AgentMemory::open(&path, &spec, hashing()).await.unwrap();
        plant(&memory, &FACTS).await;
    }
    // Same file, a 4-dimensional model behind an OpenAI-compatible server.
    let server = FakeEmbeddings::start(concept_vector).await;
    let memory = AgentMemory::open(&path, &spec, embedder_of(&server))
        .await
        .unwrap();
    let embedded: usize = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(body, _)| body["input"].as_array().unwrap().len())
        .sum();
    assert_eq!(embedded, FACTS.len());
    let hits = memory
        .search(
            "which hue appeals to her most?",
            RecallMode::Vector,
            1,
            None,
        )
        .await
        .unwrap();
    assert_eq!(texts(&hits), [FACTS[0]]);

    // An export from the hashing worker, imported here, is embedded again too.
    let other = open(&dir, "other.db", &spec).await;
    plant(&other, &["Ada's pet is a cat called Tom"]).await;
    memory.import(other.export().await.unwrap()).await.unwrap();
    let hits = memory
        .search("pet", RecallMode::Vector, 1, None)
        .await
        .unwrap();
    assert_eq!(texts(&hits), ["Ada's pet is a cat called Tom"]);
}

#[tokio::test]
async fn forget_by_sender_removes_every_row() {
    let dir = TempDir::new();
    let path = dir.path().join("f.db");
    let memory = AgentMemory::open(&path, &MemorySpec::default(), hashing())
        .await
        .unwrap();
    for i in 0..5 {
        memory
            .remember(NewMemory::fact(format!("carol secret {i}")).from_sender("carol"))
            .await
            .unwrap();
        memory
            .record_turn(
                &format!("c{i}"),
                "carol",
                "m",
                exchange("carol here", "hi carol"),
            )
            .await
            .unwrap();
    }
    memory
        .remember(NewMemory::fact("dave fact").from_sender("dave"))
        .await
        .unwrap();
    assert!(memory.rows_of_sender("carol").await.unwrap() >= 15);

    let removed = memory.forget_sender("carol").await.unwrap();
    assert!(removed >= 15, "{removed}");
    assert_eq!(memory.rows_of_sender("carol").await.unwrap(), 0);
    let hits = memory
        .search("carol secret", RecallMode::Hybrid, 10, None)
        .await
        .unwrap();
    assert_eq!(texts(&hits), ["dave fact"]);
    assert_eq!(memory.count().await.unwrap(), 1);

    // Straight from the file: no table, index included, still holds carol's text.
    let conn = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "SELECT count(*) FROM memories WHERE sender = 'carol' OR text LIKE '%carol%'",
        "SELECT count(*) FROM memory_keywords WHERE memory_keywords MATCH 'carol'",
        "SELECT count(*) FROM session_turns WHERE sender = 'carol' OR user LIKE '%carol%'",
        "SELECT count(*) FROM sessions WHERE sender = 'carol'",
        "SELECT count(*) FROM memory_owners WHERE sender = 'carol'",
    ] {
        let n: i64 = conn.query_row(sql, [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "{sql}");
    }
}

#[tokio::test]
async fn a_scoped_search_sees_only_that_sender_and_the_agent() {
    let dir = TempDir::new();
    let memory = open(&dir, "s.db", &MemorySpec::default()).await;
    for sender in ["ada", "bob", "carol"] {
        for i in 0..20 {
            memory
                .remember(
                    NewMemory::fact(format!("{sender} note {i} about the garden"))
                        .from_sender(sender),
                )
                .await
                .unwrap();
        }
    }
    memory
        .remember(NewMemory::fact("the garden gate is green"))
        .await
        .unwrap();
    let owners = Some(vec!["bob".to_owned(), String::new()]);
    for mode in [RecallMode::Keyword, RecallMode::Vector, RecallMode::Hybrid] {
        let hits = memory
            .search("garden note", mode, 30, owners.clone())
            .await
            .unwrap();
        assert_eq!(hits.len(), 21, "{mode:?}");
        assert!(
            hits.iter()
                .all(|h| matches!(h.item.memory.sender.as_deref(), Some("bob") | None)),
            "{mode:?}: {:?}",
            texts(&hits)
        );
    }
    // A sender with no memories sees only the agent's.
    let hits = memory
        .search(
            "garden",
            RecallMode::Vector,
            5,
            Some(vec!["dave".to_owned(), String::new()]),
        )
        .await
        .unwrap();
    assert_eq!(texts(&hits), ["the garden gate is green"]);
}

#[tokio::test]
async fn retention_bounds_items_and_age() {
    let dir = TempDir::new();
    let mut spec = MemorySpec::default();
    spec.long_term.max_items = 3;
    let memory = open(&dir, "r.db", &spec).await;
    plant(&memory, &FACTS).await;
    assert_eq!(memory.count().await.unwrap(), 3);
    let kept = texts(
        &memory
            .list(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|item| Hit { item, score: 0.0 })
            .collect::<Vec<_>>(),
    );
    assert_eq!(kept, [FACTS[5], FACTS[4], FACTS[3]]);

    // By age: memories written 40 days ago go at the next write when 30 are kept.
    spec.long_term.max_items = 100;
    spec.long_term.max_age_days = 30;
    let path = dir.path().join("age.db");
    let memory = AgentMemory::open(&path, &spec, hashing()).await.unwrap();
    plant(&memory, &FACTS[..3]).await;
    let old = (chrono::Utc::now() - chrono::Duration::days(40)).timestamp_millis();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE memories SET created_at = ?1 WHERE id <= 2", [old])
        .unwrap();
    plant(&memory, &FACTS[3..4]).await;
    let left: Vec<String> = memory
        .list(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.memory.text)
        .collect();
    assert_eq!(left, [FACTS[3], FACTS[2]]);
    let hits = memory
        .search("cat", RecallMode::Hybrid, 5, None)
        .await
        .unwrap();
    assert!(
        !texts(&hits).contains(&FACTS[1].to_owned()),
        "gone from the indexes too"
    );
}

#[tokio::test]
async fn a_corrupt_file_is_an_error_naming_it() {
    let dir = TempDir::new();
    let path = dir.path().join("broken.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = AgentMemory::open(&path, &MemorySpec::default(), hashing())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not a database"), "{err}");

    // A memory directory that cannot be created: a file is in the way.
    let blocked = dir.path().join("memory");
    std::fs::write(&blocked, "").unwrap();
    let err = AgentMemory::open(&blocked.join("a.db"), &MemorySpec::default(), hashing())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&blocked.display().to_string()), "{err}");
}

#[tokio::test]
async fn a_full_database_fails_the_write_and_keeps_the_session() {
    let dir = TempDir::new();
    let memory = open(&dir, "full.db", &MemorySpec::default()).await;
    memory
        .record_turn("c", "ada", "m1", exchange("first", "one"))
        .await
        .unwrap();
    let before = memory.session("c").await.unwrap();
    let count = memory.count().await.unwrap();

    // SQLite's max_page_count stands in for a full disk: the file may not grow.
    memory.cap_pages(Some(0)).await.unwrap();
    let big = "word ".repeat(20_000);
    let err = memory
        .record_turn("c", "ada", "m2", exchange(&big, "two"))
        .await
        .unwrap_err();
    assert!(matches!(err, MemoryError::Full { .. }), "{err}");
    assert!(err.to_string().contains("full.db"), "{err}");
    assert_eq!(memory.session("c").await.unwrap(), before);
    assert_eq!(memory.count().await.unwrap(), count);

    memory.cap_pages(None).await.unwrap();
    memory
        .record_turn("c", "ada", "m3", exchange("third", "three"))
        .await
        .unwrap();
    assert_eq!(memory.session("c").await.unwrap().turns.len(), 2);
}
