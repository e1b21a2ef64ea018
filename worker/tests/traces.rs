//! Traces across workers: two worker processes on one nats-server export their spans
//! over OTLP/HTTP to a receiver of the test's own (protobuf, decoded with
//! `opentelemetry-proto`). A webhook message sent to one worker for an agent the other
//! runs is one trace: the channel's span, the router's, the turn, the model and tool
//! calls and the reply's delivery, each child of the one before across the NATS hops.
//! A delegated question joins the caller's trace. Without an endpoint no exporter
//! runs; a worker that shuts down sends what it holds.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use nexo_api::ResourceKey;
use nexo_api::partition::{DEFAULT_PARTITIONS, PartitionMap};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::{WorkerProcess, wait_ready, write_pool_worker_config};
use support::{TempDir, get_json, http_client, post_message, wait_for};

/// One exported span, with what identifies the process that sent it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    kind: i32,
    attributes: BTreeMap<String, any_value::Value>,
    service_name: String,
    instance: String,
    pid: i64,
}

impl Span {
    fn string(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(any_value::Value::StringValue(value)) => Some(value),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(any_value::Value::IntValue(value)) => Some(*value),
            _ => None,
        }
    }

    fn strings(&self, key: &str) -> Option<Vec<String>> {
        match self.attributes.get(key) {
            Some(any_value::Value::ArrayValue(array)) => array
                .values
                .iter()
                .map(|value| match &value.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, any_value::Value> {
    list.iter()
        .filter_map(|kv| {
            let AnyValue { value } = kv.value.clone()?;
            Some((kv.key.clone(), value?))
        })
        .collect()
}

/// An OTLP/HTTP traces endpoint keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    /// Serves `POST /v1/traces`; returns the base URL, what `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// names.
    async fn start() -> (Self, String) {
        let receiver = Self::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(receiver.clone());
        (receiver, support::serve_locally(app).await)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut kept = receiver.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = attributes(
            &resource_spans
                .resource
                .map(|resource| resource.attributes)
                .unwrap_or_default(),
        );
        let text = |key: &str| match resource.get(key) {
            Some(any_value::Value::StringValue(value)) => value.clone(),
            _ => String::new(),
        };
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                kept.push(Span {
                    attributes: attributes(&span.attributes),
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    name: span.name,
                    kind: span.kind,
                    service_name: text("service.name"),
                    instance: text("service.instance.id"),
                    pid: match resource.get("process.pid") {
                        Some(any_value::Value::IntValue(pid)) => *pid,
                        _ => 0,
                    },
                });
            }
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    ([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response()
}

/// A worker process running shard `shard` of 2 on `nats`, with `env`; killed on drop.
struct Shard {
    base: String,
    process: WorkerProcess,
    _dir: TempDir,
}

impl Shard {
    async fn spawn(shard: u32, nats: &NatsServer, catalog: &Path, env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new();
        let config = write_pool_worker_config(dir.path(), &nats.url(), catalog);
        let shard = shard.to_string();
        let mut vars = vec![("NEXO_SHARD", shard.as_str()), ("NEXO_SHARDS", "2")];
        vars.extend_from_slice(env);
        let process = WorkerProcess::spawn(&config, &vars).await;
        Self {
            base: process.base(),
            process,
            _dir: dir,
        }
    }

    /// Threads of the process named like the SDK's batch span processor (`comm` keeps
    /// 15 bytes of "OpenTelemetry.Traces.BatchProcessor").
    fn exporter_threads(&self) -> usize {
        let tasks = format!("/proc/{}/task", self.process.id());
        std::fs::read_dir(tasks)
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "OpenTelemetry.T")
            .count()
    }
}

/// The first name `prefix-<i>` the partition map gives to worker 1 of 2.
fn agent_of_shard_one(prefix: &str) -> String {
    let map = PartitionMap::new(DEFAULT_PARTITIONS, 2);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|name| map.place(&ResourceKey::new("default", name)).worker == 1)
        .unwrap()
}

/// Agent `private` (content not recorded) and agent `open` (`recordContent`), both
/// on shard 1, each calling `current_time` before it answers, behind webhooks `to-…`.
fn catalog(private: &str, open: &str) -> String {
    let agent = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    spec:\n      tools: [current_time]\n{extra}      model: {{provider: scripted, script: [{{toolCall: {{name: current_time}}, reply: '{name} read the clock'}}]}}\n"
        )
    };
    format!(
        "agents:\n{}{}channels:\n  - name: to-{private}\n    spec: {{defaultAgent: {private}, webhook: {{}}}}\n  - name: to-{open}\n    spec: {{defaultAgent: {open}, webhook: {{}}}}\n",
        agent(private, ""),
        agent(open, "      observability: {recordContent: true}\n"),
    )
}

/// Waits until shard `index` runs exactly `agents` and holds its 32 partitions.
async fn wait_for_agents(client: &reqwest::Client, shard: &Shard, index: usize, agents: &[&str]) {
    let url = format!("{}/catalog", shard.base);
    let expected: BTreeSet<String> = agents.iter().map(|a| format!("default/{a}")).collect();
    wait_for(&format!("shard {index} to run {agents:?}"), || async {
        let (_, report) = get_json(client, &url).await;
        let running: BTreeSet<String> = report["agents"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        (running == expected && report["ownership"]["held"].as_array()?.len() == 32).then_some(())
    })
    .await;
}

/// Two workers of a pool on one nats-server, both started with `env`, once shard 1
/// runs both agents of [`catalog`] (returned as `private`, `open`).
struct TwoWorkers {
    shards: [Shard; 2],
    private: String,
    open: String,
    client: reqwest::Client,
    _nats: NatsServer,
    _files: TempDir,
}

impl TwoWorkers {
    async fn start(env: &[(&str, &str)]) -> Self {
        let nats = NatsServer::start().await;
        let private = agent_of_shard_one("private");
        let open = agent_of_shard_one("open");
        let files = TempDir::new();
        let catalog_file = files.path().join("catalog.yaml");
        std::fs::write(&catalog_file, catalog(&private, &open)).unwrap();
        let shards = [
            Shard::spawn(0, &nats, &catalog_file, env).await,
            Shard::spawn(1, &nats, &catalog_file, env).await,
        ];
        let client = http_client();
        for shard in &shards {
            wait_ready(&client, &shard.base).await;
        }
        wait_for_agents(&client, &shards[0], 0, &[]).await;
        wait_for_agents(&client, &shards[1], 1, &[&private, &open]).await;
        Self {
            shards,
            private,
            open,
            client,
            _nats: nats,
            _files: files,
        }
    }

    /// Sends `text` to shard 0's webhook of `agent` and checks the answer.
    async fn ask(&self, agent: &str, text: &str) {
        let channel = format!("to-{agent}");
        let (status, answer) = post_message(
            &self.client,
            &self.shards[0].base,
            &channel,
            json!({"text": text}),
        )
        .await;
        assert!(status.is_success(), "{status}: {answer}");
        assert_eq!(answer["reply"], format!("{agent} read the clock"));
    }
}

/// The spans of the trace whose root is the channel's span for the message sent on
/// webhook `channel`, once every span of a finished turn has arrived: the reply was
/// delivered on both workers (each serves the channel) and the root is there.
async fn trace_of(receiver: &Receiver, channel: &str) -> Vec<Span> {
    let root_name = format!("send plugin.inbound.webhook.default.{channel}");
    let deliver_name = format!("process plugin.outbound.webhook.default.{channel}");
    wait_for(
        &format!("the spans of the message on {channel}"),
        || async {
            let spans = receiver.spans();
            let root = spans.iter().find(|s| s.name == root_name)?;
            let trace: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            let delivered = trace.iter().filter(|s| s.name == deliver_name).count();
            (delivered == 2).then_some(trace)
        },
    )
    .await
}

fn one<'a>(trace: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one span {name} in {:#?}", names(trace));
    found[0]
}

fn names(trace: &[Span]) -> Vec<&str> {
    trace.iter().map(|s| s.name.as_str()).collect()
}

fn assert_child(child: &Span, parent: &Span) {
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{} is a child of {}",
        child.name, parent.name
    );
    assert_eq!(child.trace_id, parent.trace_id);
}

#[tokio::test]
async fn a_webhook_message_to_an_agent_on_another_worker_is_one_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Spans leave 50 ms after they end instead of 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let pool = TwoWorkers::start(&env).await;
    let (shards, private, open) = (&pool.shards, &pool.private, &pool.open);
    for shard in shards {
        assert_eq!(shard.exporter_threads(), 1, "each worker runs one exporter");
    }

    pool.ask(private, "what time is it?").await;
    let channel = format!("to-{private}");
    let trace = trace_of(&receiver, &channel).await;
    let everything = receiver.spans();
    let ids: BTreeSet<&Vec<u8>> = everything.iter().map(|s| &s.trace_id).collect();
    assert_eq!(ids.len(), 1, "one message, one trace: {everything:#?}");

    let root = one(
        &trace,
        &format!("send plugin.inbound.webhook.default.{channel}"),
    );
    let routed = one(
        &trace,
        &format!("process plugin.inbound.webhook.default.{channel}"),
    );
    let turn = one(&trace, &format!("invoke_agent default/{private}"));
    let chats: Vec<&Span> = trace.iter().filter(|s| s.name == "chat").collect();
    let tool = one(&trace, "execute_tool current_time");
    let reply = one(
        &trace,
        &format!("send plugin.outbound.webhook.default.{channel}"),
    );
    let delivered: Vec<&Span> = trace
        .iter()
        .filter(|s| s.name == format!("process plugin.outbound.webhook.default.{channel}"))
        .collect();

    assert!(
        root.parent_span_id.is_empty(),
        "the channel's span is the root"
    );
    assert_eq!(root.kind, SpanKind::Producer as i32);
    assert_eq!(
        root.pid,
        i64::from(shards[0].process.id()),
        "the channel that was asked"
    );
    assert_child(routed, root);
    assert_eq!(routed.kind, SpanKind::Consumer as i32);
    assert_child(turn, routed);
    assert_eq!(turn.kind, SpanKind::Consumer as i32);
    assert_eq!(turn.string("gen_ai.operation.name"), Some("invoke_agent"));
    assert_eq!(
        turn.pid,
        i64::from(shards[1].process.id()),
        "the agent's worker"
    );
    assert_ne!(turn.instance, root.instance, "one instance id per process");
    assert_eq!(turn.service_name, "nexo-worker");
    assert_eq!(root.service_name, "nexo-worker");

    // The scripted model is called twice: for the tool call, then for the answer.
    assert_eq!(chats.len(), 2, "{:#?}", names(&trace));
    for chat in &chats {
        assert_child(chat, turn);
        assert_eq!(chat.kind, SpanKind::Client as i32);
        assert_eq!(chat.instance, turn.instance);
        assert_eq!(chat.string("gen_ai.operation.name"), Some("chat"));
        assert_eq!(chat.string("gen_ai.provider.name"), Some("scripted"));
        assert_eq!(chat.string("gen_ai.system"), Some("scripted"));
        assert!(chat.int("gen_ai.usage.input_tokens").is_some(), "{chat:?}");
        assert!(chat.int("gen_ai.usage.output_tokens").is_some(), "{chat:?}");
        assert!(chat.string("error.type").is_none());
        // Not opted in: nothing that was said.
        for key in [
            "gen_ai.input.messages",
            "gen_ai.output.messages",
            "gen_ai.system_instructions",
        ] {
            assert!(!chat.attributes.contains_key(key), "{key} on {chat:?}");
        }
    }

    // The scripted model gives a finish reason with its answer, not its tool call.
    assert_eq!(
        chats[1].strings("gen_ai.response.finish_reasons"),
        Some(vec!["stop".to_owned()])
    );
    assert_child(tool, turn);
    assert_eq!(tool.string("gen_ai.operation.name"), Some("execute_tool"));
    assert_eq!(tool.string("gen_ai.tool.name"), Some("current_time"));
    assert_child(reply, turn);
    assert_eq!(reply.kind, SpanKind::Producer as i32);
    // Both workers serve the channel and get the reply; the one holding the request
    // (shard 0) hands it over.
    let instances: BTreeSet<&str> = delivered.iter().map(|s| s.instance.as_str()).collect();
    assert_eq!(instances.len(), 2, "{delivered:#?}");
    for span in &delivered {
        assert_child(span, reply);
        assert_eq!(span.kind, SpanKind::Consumer as i32);
    }
    let every_span: BTreeSet<&Vec<u8>> = trace.iter().map(|s| &s.span_id).collect();
    for span in &trace {
        assert!(
            span.parent_span_id.is_empty() || every_span.contains(&span.parent_span_id),
            "{} has its parent in the trace",
            span.name
        );
    }

    // The agent that opted in: its model spans hold what was said, in the
    // conventions' message shape.
    pool.ask(open, "the time, please").await;
    let channel = format!("to-{open}");
    let trace = trace_of(&receiver, &channel).await;
    let chats: Vec<&Span> = trace.iter().filter(|s| s.name == "chat").collect();
    assert_eq!(chats.len(), 2, "{:#?}", names(&trace));
    let parse = |span: &Span, key: &str| -> Value {
        serde_json::from_str(
            span.string(key)
                .unwrap_or_else(|| panic!("{key} on {span:?}")),
        )
        .unwrap()
    };
    let first_input = parse(chats[0], "gen_ai.input.messages");
    assert_eq!(
        first_input,
        json!([{"role": "user", "parts": [{"type": "text", "content": "the time, please"}]}])
    );
    let first_output = parse(chats[0], "gen_ai.output.messages");
    assert_eq!(first_output[0]["role"], "assistant");
    assert_eq!(first_output[0]["parts"][0]["type"], "tool_call");
    assert_eq!(first_output[0]["parts"][0]["name"], "current_time");
    let second_input = parse(chats[1], "gen_ai.input.messages");
    assert_eq!(second_input[2]["role"], "tool");
    assert_eq!(second_input[2]["parts"][0]["type"], "tool_call_response");
    let second_output = parse(chats[1], "gen_ai.output.messages");
    assert_eq!(
        second_output,
        json!([{
            "role": "assistant",
            "parts": [{"type": "text", "content": format!("{open} read the clock")}],
            "finish_reason": "stop",
        }])
    );
}

#[tokio::test]
async fn without_an_endpoint_no_exporter_runs() {
    // Every other setting of the exporter, but no endpoint.
    let env = [
        ("OTEL_SERVICE_NAME", "nexo-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let pool = TwoWorkers::start(&env).await;
    pool.ask(&pool.open, "time?").await;
    let shards = &pool.shards;
    for shard in shards {
        assert_eq!(
            shard.exporter_threads(),
            0,
            "no exporter without an endpoint"
        );
    }
}

#[tokio::test]
async fn a_worker_that_shuts_down_sends_the_spans_it_still_holds() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = TempDir::new();
    let config = support::process::write_worker_config(dir.path(), "{type: local}", "done");
    // Batches would leave after an hour: only the shutdown sends them.
    let env = [
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            &*format!("{endpoint}/v1/traces"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
        ("OTEL_SERVICE_NAME", "nexo-under-test"),
    ];
    let mut worker = WorkerProcess::spawn(&config, &env).await;
    let client = http_client();
    wait_ready(&client, &worker.base()).await;
    let (status, answer) =
        post_message(&client, &worker.base(), "api", json!({"text": "hello"})).await;
    assert!(status.is_success(), "{status}: {answer}");
    assert!(
        receiver.spans().is_empty(),
        "nothing sent before the shutdown"
    );

    let exit = worker.terminate().await;
    assert!(exit.success(), "{exit}");
    let spans = receiver.spans();
    let turn = one(&spans, "invoke_agent default/a");
    assert_eq!(turn.service_name, "nexo-under-test");
    one(&spans, "send plugin.inbound.webhook.default.api");
    let ids: BTreeSet<&Vec<u8>> = spans.iter().map(|s| &s.trace_id).collect();
    assert_eq!(ids.len(), 1, "{spans:#?}");
}

#[tokio::test]
async fn a_delegated_question_is_part_of_the_callers_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = TempDir::new();
    let resources = format!(
        "{}channels:\n  - name: api\n    spec: {{defaultAgent: concierge, webhook: {{}}}}\n",
        support::concierge_and_researcher("found it")
    );
    let config =
        support::process::write_worker_config_with(dir.path(), "{type: local}", &resources);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let worker = WorkerProcess::spawn(&config, &env).await;
    let client = http_client();
    wait_ready(&client, &worker.base()).await;
    let (status, answer) = post_message(
        &client,
        &worker.base(),
        "api",
        json!({"text": "the weather"}),
    )
    .await;
    assert!(status.is_success(), "{status}: {answer}");
    assert_eq!(answer["reply"], "researcher says: found it");

    let spans = wait_for("the researcher's reply to be delivered", || async {
        let spans = receiver.spans();
        spans
            .iter()
            .any(|s| s.name == "process plugin.outbound.webhook.default.api")
            .then_some(spans)
    })
    .await;
    let ids: BTreeSet<&Vec<u8>> = spans.iter().map(|s| &s.trace_id).collect();
    assert_eq!(ids.len(), 1, "{:#?}", names(&spans));
    let caller = one(&spans, "invoke_agent default/concierge");
    let tool = one(&spans, "execute_tool ask_researcher");
    let asked = one(&spans, "send agent.route.default.researcher");
    let callee = one(&spans, "invoke_agent default/researcher");
    assert_child(tool, caller);
    assert_child(asked, tool);
    assert_eq!(asked.kind, SpanKind::Producer as i32);
    assert_child(callee, asked);
    // The researcher answers the concierge's inbox, inside its own turn.
    let answered = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Producer as i32 && s.parent_span_id == callee.span_id)
        .count();
    assert_eq!(answered, 1, "the researcher's reply: {:#?}", names(&spans));
}
