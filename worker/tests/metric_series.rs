//! Metric series stay bounded: labels never take a tool name the model invents,
//! an agent that leaves the worker leaves no series behind, and the turns-in-flight
//! gauge gives its count back when a turn is abandoned at the drain deadline.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use support::prometheus::Sample;
use support::{FakeModel, FakeReply, TempDir, TestWorker, WorkerOptions, wait_for};

fn label<'a>(sample: &'a Sample, key: &str) -> Option<&'a str> {
    sample.labels.get(key).map(String::as_str)
}

#[tokio::test]
async fn a_tool_name_the_model_invents_is_one_fixed_label() {
    let model = FakeModel::openai(|body| {
        if support::has_tool_result(body) {
            FakeReply::text("done")
        } else {
            FakeReply::tool_call("call_1", "invented_tool_4711", json!({}))
        }
    })
    .await;
    let worker = TestWorker::start(&format!(
        "agents:
  - name: a
    spec:
      tools: [current_time]
      model: {{provider: openai, model: m, baseUrl: '{}'}}
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
        model.base_url
    ))
    .await;
    let (status, answer) = worker.post_message("api", json!({"text": "go"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let scrape = worker.metrics().await;
    let calls: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.name == "nexo_tool_calls_total")
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(label(calls[0], "tool"), Some("unknown"));
    assert_eq!(label(calls[0], "outcome"), Some("error"));
    assert_eq!(calls[0].value, 1.0);
    let invented = scrape
        .samples
        .iter()
        .any(|s| s.labels.values().any(|v| v.contains("invented_tool_4711")));
    assert!(!invented, "{scrape:?}");
    worker.stop().await;
}

/// A directory with a catalog file that the test rewrites; the worker polls it.
struct CatalogFile(TempDir);

impl CatalogFile {
    fn new(catalog: &str) -> Self {
        let file = Self(TempDir::new());
        file.write(catalog);
        file
    }

    fn path(&self) -> std::path::PathBuf {
        self.0.path().join("catalog.yaml")
    }

    /// A worker polling this file, with a drain period of `drain_seconds`.
    async fn start_worker(&self, drain_seconds: u64) -> TestWorker {
        let options = WorkerOptions {
            worker_extra: format!("  catalogFile: {}\n", self.path().display()),
            drain_seconds,
            ..Default::default()
        };
        TestWorker::start_with(options, "").await
    }

    /// Replaces the file at once (write and rename), as a ConfigMap update does.
    fn write(&self, catalog: &str) {
        support::replace_file(&self.path(), catalog);
    }
}

async fn wait_for_revision(worker: &TestWorker, revision: &str) {
    wait_for(&format!("revision {revision}"), || async {
        let (_, report) = worker.get_json("/catalog").await;
        (report["revision"] == revision).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_that_leaves_the_worker_leaves_no_series() {
    // Agent a's own model fails, so its fallback's series (tokens, cost, fallbacks)
    // exist too.
    let down = FakeModel::openai(|_| FakeReply::failing(StatusCode::INTERNAL_SERVER_ERROR)).await;
    let catalog = |revision: &str, with_a: bool| {
        let a = format!(
            "  - {{name: a, spec: {{tools: [current_time], model: {{provider: openai, model: down, maxRetries: 0, baseUrl: '{}', fallbacks: [{{provider: scripted, script: [{{reply: from a}}]}}]}}}}}}\n",
            down.base_url
        );
        let to_a = "  - {name: to-a, spec: {defaultAgent: a, webhook: {}}}\n";
        format!(
            "revision: {revision}\nagents:\n{}  - {{name: b, spec: {{model: {{provider: scripted, script: [{{reply: from b}}]}}}}}}\nchannels:\n{}  - {{name: to-b, spec: {{defaultAgent: b, webhook: {{}}}}}}\n",
            if with_a { a.as_str() } else { "" },
            if with_a { to_a } else { "" },
        )
    };
    let file = CatalogFile::new(&catalog("r1", true));
    let options = WorkerOptions {
        worker_extra: format!(
            "  catalogFile: {}\n  models:\n    prices: [{{model: scripted, input: 1, output: 1}}]\n",
            file.path().display()
        ),
        drain_seconds: 1,
        ..Default::default()
    };
    let worker = TestWorker::start_with(options, "").await;
    for channel in ["to-a", "to-b"] {
        let (status, answer) = worker.post_message(channel, json!({"text": "hi"})).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let of_a = |scrape: &support::prometheus::Scrape| {
        scrape
            .samples
            .iter()
            .filter(|s| {
                label(s, "agent") == Some("default/a")
                    || label(s, "instance") == Some("to-a")
                    || label(s, "consumer").is_some_and(|c| c.contains("default_a"))
            })
            .count()
    };
    let before = worker.metrics().await;
    assert!(of_a(&before) > 0, "{before:?}");
    for series in ["nexo_llm_fallbacks_total", "nexo_llm_cost_total"] {
        assert_eq!(
            before.value(series, &[("agent", "default/a"), ("model", "scripted")]),
            Some(if series == "nexo_llm_fallbacks_total" {
                1.0
            } else {
                0.0
            }),
            "{series}"
        );
    }

    file.write(&catalog("r2", false));
    wait_for_revision(&worker, "r2").await;
    let after = wait_for("the series of agent a to go", || async {
        let scrape = worker.metrics().await;
        (of_a(&scrape) == 0).then_some(scrape)
    })
    .await;
    // The agent that stays keeps its series.
    let b_turns = after
        .samples
        .iter()
        .find(|s| s.name == "nexo_agent_turns_total" && label(s, "agent") == Some("default/b"))
        .expect("agent b's turns");
    assert_eq!(b_turns.value, 1.0);
    worker.stop().await;
}

/// A model whose first call hangs past any drain deadline while later ones answer at
/// once, and the number of calls it got.
async fn hanging_once() -> (FakeModel, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let model = FakeModel::openai(move |_| {
        let delay = match seen.fetch_add(1, Ordering::SeqCst) {
            0 => Duration::from_secs(60),
            _ => Duration::ZERO,
        };
        FakeReply::text("answered").after(delay)
    })
    .await;
    (model, calls)
}

/// A turn abandoned at the drain deadline (its agent restarted while the model
/// hangs) gives its count back: the gauge is 0 once the redelivered message is
/// answered by the new version.
#[tokio::test]
async fn an_abandoned_turn_leaves_the_in_flight_gauge() {
    let (model, calls) = hanging_once().await;
    let catalog = |revision: &str| {
        format!(
            "revision: {revision}\nagents:\n  - {{name: a, spec: {{systemPrompt: '{revision}', model: {{provider: openai, model: m, baseUrl: '{}', timeoutSeconds: 120, maxRetries: 0}}}}}}\nchannels:\n  - {{name: api, spec: {{defaultAgent: a, webhook: {{}}}}}}\n",
            model.base_url
        )
    };
    let file = CatalogFile::new(&catalog("r1"));
    let worker = file.start_worker(1).await;
    let id = worker.post_async("api", json!({"text": "hello"})).await;
    let in_flight = |scrape: &support::prometheus::Scrape| {
        scrape.value("nexo_agent_turns_in_flight", &[("agent", "default/a")])
    };
    wait_for("the turn to be running", || async {
        (in_flight(&worker.metrics().await) == Some(1.0)).then_some(())
    })
    .await;

    // A changed agent is restarted: the hanging turn is abandoned after the drain
    // period and its message redelivered to the new version.
    file.write(&catalog("r2"));
    worker.answer_of("api", &id).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "abandoned, then answered");
    wait_for("the gauge to come back to 0", || async {
        (in_flight(&worker.metrics().await) == Some(0.0)).then_some(())
    })
    .await;
    worker.stop().await;
}

/// An agent suspended and resumed while a turn of its old version still runs: the new
/// version waits for the old one's turns (so the memory file is not prepared under
/// them), and the old one's end leaves the new one's series alone.
#[tokio::test]
async fn an_agent_back_before_its_old_version_stopped_keeps_its_series() {
    let (model, calls) = hanging_once().await;
    let catalog = |revision: &str, suspend: bool| {
        format!(
            "revision: {revision}\nagents:\n  - {{name: a, spec: {{suspend: {suspend}, model: {{provider: openai, model: m, baseUrl: '{}', timeoutSeconds: 120, maxRetries: 0}}}}}}\nchannels:\n  - {{name: api, spec: {{defaultAgent: a, webhook: {{}}}}}}\n",
            model.base_url
        )
    };
    let file = CatalogFile::new(&catalog("r1", false));
    let worker = file.start_worker(4).await;
    let id = worker.post_async("api", json!({"text": "hello"})).await;
    let memory_items = |scrape: &support::prometheus::Scrape| {
        scrape.value("nexo_memory_items", &[("agent", "default/a")])
    };
    wait_for("the turn to be running", || async {
        let scrape = worker.metrics().await;
        (scrape.value("nexo_agent_turns_in_flight", &[("agent", "default/a")]) == Some(1.0))
            .then_some(())
    })
    .await;
    assert!(memory_items(&worker.metrics().await).is_some());

    // Suspended, then resumed before the old version's drain period is over.
    file.write(&catalog("r2", true));
    wait_for_revision(&worker, "r2").await;
    file.write(&catalog("r3", false));
    wait_for_revision(&worker, "r3").await;
    // The old version's turn is abandoned at its deadline and answered by the new one.
    worker.answer_of("api", &id).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "abandoned, then answered");
    let scrape = worker.metrics().await;
    assert!(memory_items(&scrape).is_some(), "{scrape:?}");
    worker.stop().await;
}
