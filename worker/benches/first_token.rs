//! First-token latency that nexo adds, on a real nats-server (started here;
//! `NEXO_NATS_SERVER`):
//!
//!     cargo bench -p nexo-worker --bench first_token
//!
//! The model is a local server speaking OpenAI's streaming wire format (the tests'
//! `FakeModel`), which sends its first chunk as soon as a request arrives. Each round
//! measures, one after the other:
//! - **model**: a bare HTTP client streaming from the model server: the time from
//!   sending the request to its first content chunk, the model's own first-token time.
//! - **path**: the same question through a worker whose channel and agent talk over
//!   NATS: a webhook request with `Accept: text/event-stream` → the inbound subject
//!   (JetStream, through the outbox) → the router → the agent's route subject
//!   (JetStream) → the turn → the model → the first delta on a core NATS subject →
//!   the channel → the first `delta` event on the client's stream.
//!
//! It prints p50/p99 of both and of the per-round difference (path − model), the
//! latency nexo adds to the first token. `NEXO_BENCH_ROUNDS` sets the rounds (default
//! 300, after 30 warm-up rounds).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use support::nats::NatsServer;
use support::{FakeModel, FakeReply, TestWorker, WorkerOptions};

const WARM_UP: usize = 30;
/// How long one measured request may take before the benchmark fails.
const TIMEOUT: Duration = Duration::from_secs(10);

fn rounds() -> usize {
    std::env::var("NEXO_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

/// Time from sending `request` to the first SSE event whose data satisfies `first`.
async fn first_event(
    request: reqwest::RequestBuilder,
    first: impl Fn(Option<&str>, &str) -> bool,
) -> Duration {
    let started = Instant::now();
    let response = tokio::time::timeout(TIMEOUT, request.send())
        .await
        .expect("the stream starts in time")
        .expect("the server answers");
    assert!(response.status().is_success(), "{}", response.status());
    let mut events = sse_stream::SseStream::from_bytes_stream(response.bytes_stream());
    loop {
        let event = tokio::time::timeout(TIMEOUT, events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on until the first token")
            .expect("a well-formed event");
        if let Some(data) = &event.data
            && first(event.event.as_deref(), data)
        {
            let took = started.elapsed();
            // Read the rest, so the next round starts on an idle connection and model.
            while let Ok(Some(_)) = tokio::time::timeout(TIMEOUT, events.next()).await {}
            return took;
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index]
}

fn report(name: &str, mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    println!(
        "{name:<28} p50 {:>8.3} ms   p99 {:>8.3} ms   min {:>8.3} ms   max {:>8.3} ms",
        quantile(&samples, 0.5) * 1e3,
        quantile(&samples, 0.99) * 1e3,
        samples[0] * 1e3,
        samples[samples.len() - 1] * 1e3,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = NatsServer::start().await;
    let model = FakeModel::openai(|_| {
        FakeReply::text("The first token of a longer answer, streamed word by word.")
    })
    .await;
    let worker = TestWorker::start_with(
        WorkerOptions {
            broker: format!("{{type: nats, urls: ['{}']}}", server.url()),
            ..Default::default()
        },
        &format!(
            "agents:
  - name: writer
    spec:
      model: {{provider: openai, model: bench, baseUrl: '{}', maxRetries: 0}}
channels:
  - name: api
    spec: {{defaultAgent: writer, webhook: {{replyTimeoutSeconds: 10}}}}
",
            model.base_url
        ),
    )
    .await;
    let client = reqwest::Client::new();
    let direct = || {
        client
            .post(format!("{}/chat/completions", model.base_url))
            .json(&json!({
                "model": "bench",
                "stream": true,
                "messages": [{"role": "user", "content": "hello"}],
            }))
    };
    let through_nexo = || {
        client
            .post(worker.url("/v1/channels/api/messages"))
            .header("accept", "text/event-stream")
            // No conversation named: each request starts a new one, so the history
            // the model gets stays the same.
            .json(&json!({"text": "hello"}))
    };
    let content_chunk = |_: Option<&str>, data: &str| {
        serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|chunk| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::len)
            })
            .is_some_and(|len| len > 0)
    };
    let delta_event = |event: Option<&str>, _: &str| event == Some("delta");

    let rounds = rounds();
    let (mut own, mut path, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..WARM_UP + rounds {
        let model_first = first_event(direct(), content_chunk).await;
        let path_first = first_event(through_nexo(), delta_event).await;
        if round >= WARM_UP {
            own.push(model_first.as_secs_f64());
            path.push(path_first.as_secs_f64());
            added.push(path_first.as_secs_f64() - model_first.as_secs_f64());
        }
    }
    println!("first-token latency, {rounds} rounds (2 worker threads, one request at a time):");
    report("model (bare HTTP client)", own);
    report("path (webhook → NATS → agent)", path);
    report("added by nexo (path − model)", added);
    worker.stop().await;
}
