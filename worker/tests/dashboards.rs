//! The Grafana dashboard and the alert rules the Helm chart ships query metrics that a
//! running worker really serves: every `nexo_*` name in their expressions (taken from
//! the chart's files, not from a second list here) is a sample of `/metrics` once a
//! worker on NATS has answered a message through a failing model and its fallback
//! (which calls a tool) and dead-lettered a malformed one, and every label a selector
//! matches on is a label of that metric.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nexo_api::{ResourceKey, subject};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::prometheus::Scrape;
use support::{FakeModel, FakeReply, TestWorker, WorkerOptions, wait_for};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/nexo")
}

/// The PromQL expressions of the dashboard's panels and of the alert rules, each with
/// where it comes from.
fn expressions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/nexo-workers.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            found.push((
                format!("dashboard panel `{title}`"),
                target["expr"]
                    .as_str()
                    .expect("a target has an expr")
                    .to_owned(),
            ));
        }
    }
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("alerts/nexo-workers.rules.yaml")).unwrap(),
    )
    .expect("the rules are YAML");
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            found.push((
                format!("alert {}", rule["alert"].as_str().unwrap_or_default()),
                rule["expr"]
                    .as_str()
                    .expect("a rule has an expr")
                    .to_owned(),
            ));
        }
    }
    found
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Each `nexo_*` metric an expression selects, with the label names its `{…}` matchers
/// use. Every metric of ours starts with `nexo_`; PromQL functions, keywords and label
/// names do not.
fn selectors(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("nexo_") {
        let starts_a_name = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_name_char(c));
        let tail = &rest[at..];
        let end = tail.find(|c| !is_name_char(c)).unwrap_or(tail.len());
        if !starts_a_name {
            rest = &tail[end..];
            continue;
        }
        let name = tail[..end].to_owned();
        let after = &tail[end..];
        let mut labels = BTreeSet::new();
        if let Some(matchers) = after.strip_prefix('{') {
            let close = matchers.find('}').expect("a selector's `{` is closed");
            for matcher in matchers[..close].split(',') {
                let label = matcher
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap_or_default()
                    .trim();
                if !label.is_empty() {
                    labels.insert(label.to_owned());
                }
            }
        }
        found.push((name, labels));
        rest = after;
    }
    found
}

#[test]
fn selectors_are_read_from_promql() {
    assert_eq!(
        selectors(
            r#"histogram_quantile(0.5, sum by (le) (rate(nexo_a_bucket{agent=~"$agent", outcome!="ok"}[5m]))) / nexo_b"#
        ),
        [
            (
                "nexo_a_bucket".to_owned(),
                BTreeSet::from(["agent".to_owned(), "outcome".to_owned()])
            ),
            ("nexo_b".to_owned(), BTreeSet::new()),
        ]
    );
    // A name that merely contains `nexo_` is not ours.
    assert!(selectors("not_nexo_x + 1").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_exists_on_a_running_worker() {
    let expressions = expressions();
    assert!(
        expressions.len() >= 20,
        "the dashboard and the rules hold {} expressions",
        expressions.len()
    );

    let server = NatsServer::start().await;
    // The primary model fails every call; the fallback answers, so the fallback and
    // breaker metrics exist too.
    let primary =
        FakeModel::openai(|_| FakeReply::failing(StatusCode::INTERNAL_SERVER_ERROR)).await;
    let worker = TestWorker::start_with(
        WorkerOptions {
            broker: format!("{{type: nats, urls: ['{}']}}", server.url()),
            // One failure opens the primary's circuit: the breaker's gauge has a series.
            worker_extra: "  models:\n    circuitBreaker: {failures: 1}\n    prices:\n      - {model: scripted, input: 1, output: 2}\n"
                .to_owned(),
            ..Default::default()
        },
        &format!(
            "agents:
  - name: a
    spec:
      model:
        provider: openai
        model: primary
        baseUrl: {base}
        maxRetries: 0
        fallbacks:
          - provider: scripted
            script:
              - {{toolCall: {{name: current_time}}, reply: 'You said: {{{{input}}}}'}}
      tools: [current_time]
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
            base = primary.base_url,
        ),
    )
    .await;
    let (status, reply) = worker
        .post_message("api", json!({"text": "hello there"}))
        .await;
    assert!(status.is_success(), "{status}: {reply}");
    assert_eq!(reply["reply"], "You said: hello there", "{reply}");

    // A message no agent can read goes to the dead-letter queue.
    let route = subject::agent_route(&ResourceKey::new("default", "a"));
    worker
        .broker
        .publish(&route, Bytes::from_static(b"not an envelope"))
        .await
        .unwrap();
    wait_for("the malformed message in the dead-letter queue", || async {
        let scrape = worker.metrics().await;
        (scrape.value("nexo_dlq_depth", &[]) == Some(1.0)).then_some(())
    })
    .await;

    let scrape: Scrape = worker.metrics().await;
    let mut labels: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for sample in &scrape.samples {
        labels
            .entry(sample.name.as_str())
            .or_default()
            .extend(sample.labels.keys().map(String::as_str));
    }
    let mut missing = Vec::new();
    for (source, expr) in &expressions {
        for (name, matched) in selectors(expr) {
            match labels.get(name.as_str()) {
                None => missing.push(format!("{source}: `{name}` is not served")),
                Some(has) => {
                    for label in matched.iter().filter(|l| !has.contains(l.as_str())) {
                        missing.push(format!("{source}: `{name}` has no label `{label}`"));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "what the chart queries and a worker does not serve:\n{}",
        missing.join("\n")
    );
    worker.stop().await;
}
