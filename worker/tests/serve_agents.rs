//! The worker's agents served to other programs: an MCP client (rmcp, streamable
//! HTTP) lists them as `ask_<agent>` tools and gets their answers from `/mcp`; an
//! A2A client gets them from `message/send` and `message/stream` at
//! `/a2a/<namespace>/<agent>`, found through the agent card. Without the serve
//! token, or with a wrong one, both refuse.

mod support;

use std::time::Duration;

use futures::StreamExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientConfig, NumberOrString, ProgressNotificationParam,
    ProgressToken, RequestMetaObject,
};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Value, json};
use support::{DEADLINE, TempDir, TestWorker, WorkerOptions};
use tokio::sync::mpsc;

/// Like the admin token of the other tests: a variable cargo sets for every test
/// process, so a worker started with it as `serve.tokenEnv` takes [`SERVE_TOKEN`].
const SERVE_TOKEN_ENV: &str = "CARGO_PKG_NAME";
const SERVE_TOKEN: &str = env!("CARGO_PKG_NAME");

/// `echo` answers `heard <question>`; `broken`'s turn always fails.
fn agents() -> String {
    format!(
        r#"agents:
  - name: echo
    spec:
      model:
        provider: scripted
        script:
          - reply: "heard {{{{input}}}}"
{}"#,
        support::agent_whose_turn_fails("broken")
    )
}

fn serving(extra: &str) -> WorkerOptions {
    WorkerOptions {
        worker_extra: format!("  serve:\n    tokenEnv: {SERVE_TOKEN_ENV}\n{extra}"),
        ..Default::default()
    }
}

async fn start(yaml: &str) -> TestWorker {
    TestWorker::start_with(serving(""), yaml).await
}

/// An MCP client of `worker` presenting `token`.
async fn mcp_client<H: ClientHandler>(
    worker: &TestWorker,
    handler: H,
    token: &str,
) -> Result<RunningService<RoleClient, H>, rmcp::service::ClientInitializeError> {
    let transport = StreamableHttpClientTransport::with_client(
        support::http_client(),
        StreamableHttpClientTransportConfig::with_uri(worker.url("/mcp")).auth_header(token),
    );
    tokio::time::timeout(DEADLINE, handler.serve(transport))
        .await
        .expect("the MCP handshake ends in time")
}

async fn call(
    client: &RunningService<RoleClient, impl ClientHandler>,
    tool: &str,
    arguments: Value,
) -> CallToolResult {
    let Value::Object(arguments) = arguments else {
        panic!("arguments are an object")
    };
    let call =
        client.call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments));
    tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the tool call ends in time")
        .expect("the tool call is answered")
}

fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

async fn tool_names(client: &RunningService<RoleClient, impl ClientHandler>) -> Vec<String> {
    let listed = tokio::time::timeout(DEADLINE, client.list_all_tools())
        .await
        .expect("tools/list ends in time")
        .expect("tools are listed");
    let mut names: Vec<String> = listed.into_iter().map(|t| t.name.into_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn an_mcp_client_lists_the_agents_and_gets_their_answers() {
    let worker = start(&agents()).await;
    let client = mcp_client(&worker, ClientConfig::default(), SERVE_TOKEN)
        .await
        .expect("the MCP client connects with the token");
    assert_eq!(tool_names(&client).await, ["ask_broken", "ask_echo"]);

    let answer = call(&client, "ask_echo", json!({"message": "hello"})).await;
    assert_eq!(text_of(&answer), "heard hello");
    assert_ne!(answer.is_error, Some(true), "{answer:?}");

    // A failed turn is a tool error, not an answer.
    let failed = call(&client, "ask_broken", json!({"message": "hello"})).await;
    assert_eq!(failed.is_error, Some(true), "{failed:?}");
    assert!(
        text_of(&failed).contains("still calling tools after 1 steps"),
        "{failed:?}"
    );
    // So is a call without its `message`.
    let invalid = call(&client, "ask_echo", json!({"text": "hello"})).await;
    assert_eq!(invalid.is_error, Some(true), "{invalid:?}");

    for outcome in ["ok", "error", "invalid"] {
        let labels = [("surface", "mcp"), ("outcome", outcome)];
        worker
            .wait_for_metric("nexo_served_calls_total", &labels, 1.0)
            .await;
    }
    client.cancel().await.unwrap();
    worker.stop().await;
}

/// The conversations of the `count` envelopes `calls` sends the agent `echo`, seen
/// on its route subject.
async fn conversations_of(
    worker: &TestWorker,
    count: usize,
    calls: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let mut route = worker
        .broker
        .subscribe("agent.route.default.echo")
        .await
        .unwrap();
    calls.await;
    let mut seen = Vec::new();
    for _ in 0..count {
        let message = support::next_message(&mut route, "a question to echo").await;
        let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
        seen.push(envelope["conversation"].as_str().unwrap().to_owned());
    }
    seen
}

#[tokio::test]
async fn an_mcp_session_is_one_conversation_unless_a_call_names_another() {
    let worker = start(&agents()).await;
    let first = mcp_client(&worker, ClientConfig::default(), SERVE_TOKEN)
        .await
        .unwrap();
    let second = mcp_client(&worker, ClientConfig::default(), SERVE_TOKEN)
        .await
        .unwrap();
    let seen = conversations_of(&worker, 4, async {
        call(&first, "ask_echo", json!({"message": "one"})).await;
        call(&first, "ask_echo", json!({"message": "two"})).await;
        call(&second, "ask_echo", json!({"message": "three"})).await;
        call(
            &second,
            "ask_echo",
            json!({"message": "four", "conversation": "shared-42"}),
        )
        .await;
    })
    .await;
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|c| c.starts_with("mcp:")), "{seen:?}");
    assert_eq!(seen[0], seen[1], "one session, one conversation");
    assert_ne!(seen[1], seen[2], "another session, another conversation");
    assert_eq!(seen[3], "mcp:shared-42");
    first.cancel().await.unwrap();
    second.cancel().await.unwrap();
    worker.stop().await;
}

/// Counts `notifications/tools/list_changed`.
struct ListWatcher(mpsc::UnboundedSender<()>);

impl ClientHandler for ListWatcher {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        let _ = self.0.send(());
    }
}

#[tokio::test]
async fn the_tool_list_follows_the_catalog() {
    let dir = TempDir::new();
    let catalog = dir.path().join("catalog.yaml");
    let agent = |name: &str| {
        format!(
            "  - name: {name}\n    spec:\n      model: {{provider: scripted, script: [{{reply: '{name} here'}}]}}\n"
        )
    };
    std::fs::write(
        &catalog,
        format!("revision: r1\nagents:\n{}", agent("echo")),
    )
    .unwrap();
    let worker = TestWorker::start_with(
        serving(&format!("  catalogFile: {}\n", catalog.display())),
        "",
    )
    .await;
    let (changed, mut changes) = mpsc::unbounded_channel();
    let client = mcp_client(&worker, ListWatcher(changed), SERVE_TOKEN)
        .await
        .unwrap();
    assert_eq!(tool_names(&client).await, ["ask_echo"]);

    support::replace_file(
        &catalog,
        &format!("revision: r2\nagents:\n{}{}", agent("echo"), agent("later")),
    );
    tokio::time::timeout(DEADLINE, changes.recv())
        .await
        .expect("tools/list_changed is sent when an agent is added")
        .unwrap();
    assert_eq!(tool_names(&client).await, ["ask_echo", "ask_later"]);
    let answer = call(&client, "ask_later", json!({"message": "hi"})).await;
    assert_eq!(text_of(&answer), "later here");

    // Agents of two namespaces: every tool names its namespace.
    support::replace_file(
        &catalog,
        &format!(
            "revision: r3\nagents:\n{}  - name: echo\n    namespace: other\n    spec:\n      model: {{provider: scripted, script: [{{reply: 'other echo'}}]}}\n",
            agent("echo")
        ),
    );
    tokio::time::timeout(DEADLINE, changes.recv())
        .await
        .expect("tools/list_changed is sent when the agents change")
        .unwrap();
    assert_eq!(
        tool_names(&client).await,
        ["ask_default__echo", "ask_other__echo"]
    );
    let answer = call(&client, "ask_other__echo", json!({"message": "hi"})).await;
    assert_eq!(text_of(&answer), "other echo");
    client.cancel().await.unwrap();
    worker.stop().await;
}

/// A JSON-RPC request to the A2A endpoint of `agent`.
fn a2a(worker: &TestWorker, agent: &str, body: &Value) -> reqwest::RequestBuilder {
    worker
        .http
        .post(worker.url(&format!("/a2a/default/{agent}")))
        .bearer_auth(SERVE_TOKEN)
        .json(body)
}

fn send(method: &str, text: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": 7,
        "method": method,
        "params": {"message": {
            "kind": "message",
            "role": "user",
            "messageId": "m-1",
            "parts": [{"kind": "text", "text": text}],
        }},
    })
}

async fn json_of(request: reqwest::RequestBuilder) -> Value {
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("the worker answers in time")
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.expect("a JSON body")
}

#[tokio::test]
async fn a2a_message_send_answers_with_a_completed_task() {
    let worker = start(&agents()).await;
    let reply = json_of(a2a(&worker, "echo", &send("message/send", "hello"))).await;
    assert_eq!(reply["id"], 7, "{reply}");
    let task = &reply["result"];
    assert_eq!(task["kind"], "task", "{reply}");
    assert_eq!(task["status"]["state"], "completed", "{reply}");
    assert_eq!(
        task["artifacts"][0]["parts"][0]["text"], "heard hello",
        "{reply}"
    );
    assert_eq!(task["status"]["message"]["role"], "agent");
    assert_eq!(task["status"]["message"]["parts"][0]["text"], "heard hello");
    let context = task["contextId"].as_str().expect("a context id").to_owned();

    // The context continues: the same conversation reaches the agent.
    let mut again = send("message/send", "more");
    again["params"]["message"]["contextId"] = json!(context);
    let seen = conversations_of(&worker, 1, async {
        let reply = json_of(a2a(&worker, "echo", &again)).await;
        assert_eq!(reply["result"]["contextId"], context.as_str());
    })
    .await;
    assert_eq!(seen, [format!("a2a:{context}")]);

    // A failed turn is a failed task.
    let reply = json_of(a2a(&worker, "broken", &send("message/send", "hello"))).await;
    assert_eq!(reply["result"]["status"]["state"], "failed", "{reply}");
    let reason = reply["result"]["status"]["message"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    assert!(reason.contains("still calling tools"), "{reply}");
    worker
        .wait_for_metric(
            "nexo_served_calls_total",
            &[("surface", "a2a"), ("outcome", "ok")],
            2.0,
        )
        .await;
    worker.stop().await;
}

#[tokio::test]
async fn a2a_message_stream_sends_the_text_as_artifact_deltas_then_the_answer() {
    let worker = start(&agents()).await;
    let response = tokio::time::timeout(
        DEADLINE,
        a2a(&worker, "echo", &send("message/stream", "hello")).send(),
    )
    .await
    .expect("the stream starts in time")
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = sse_stream::SseStream::from_bytes_stream(response.bytes_stream());
    let mut results = Vec::new();
    loop {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("the next event, or the end, comes in time");
        let Some(event) = event else { break };
        let Some(data) = event.expect("a well-formed event").data else {
            continue; // a keep-alive comment
        };
        let message: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(message["id"], 7, "{message}");
        results.push(message["result"].clone());
    }
    let kinds: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["status"]["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    // The scripted model writes word by word: two deltas, then the whole answer.
    assert_eq!(
        kinds,
        [
            ("task", "submitted"),
            ("status-update", "working"),
            ("artifact-update", ""),
            ("artifact-update", ""),
            ("artifact-update", ""),
            ("status-update", "completed"),
        ]
    );
    let artifact = |i: usize| {
        let r = &results[i];
        (
            r["artifact"]["parts"][0]["text"].as_str().unwrap(),
            r["append"].as_bool().unwrap(),
            r["lastChunk"].as_bool().unwrap(),
        )
    };
    assert_eq!(artifact(2), ("heard ", false, false));
    assert_eq!(artifact(3), ("hello", true, false));
    assert_eq!(artifact(4), ("heard hello", false, true));
    let answer_ids: Vec<&Value> = (2..5)
        .map(|i| &results[i]["artifact"]["artifactId"])
        .collect();
    assert!(
        answer_ids.iter().all(|id| *id == answer_ids[0]),
        "{answer_ids:?}"
    );
    assert_eq!(results[5]["final"], true);
    assert_eq!(
        results[5]["status"]["message"]["parts"][0]["text"],
        "heard hello"
    );
    let task = results[0]["id"].as_str().unwrap();
    assert!(
        results.iter().skip(1).all(|r| r["taskId"] == task),
        "{results:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn malformed_a2a_requests_get_json_rpc_errors() {
    let worker = start(&agents()).await;
    let post = |body: String| {
        worker
            .http
            .post(worker.url("/a2a/default/echo"))
            .bearer_auth(SERVE_TOKEN)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases = [
        ("{not json".to_owned(), -32700),
        (
            json!({"jsonrpc": "2.0", "method": "message/send"}).to_string(),
            -32600,
        ),
        (
            json!({"jsonrpc": "2.0", "id": 1, "method": "nope"}).to_string(),
            -32601,
        ),
        (
            json!({"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message": 3}})
                .to_string(),
            -32602,
        ),
        (
            json!({"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "t"}})
                .to_string(),
            -32001,
        ),
    ];
    for (body, code) in cases {
        let reply = json_of(post(body.clone())).await;
        assert_eq!(reply["error"]["code"], code, "{body} -> {reply}");
    }
    // Too large a body is refused before it is read whole.
    let huge =
        json!({"jsonrpc": "2.0", "id": 1, "method": "message/send", "blob": "x".repeat(300_000)});
    let response = post(huge.to_string()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 413);
    // An agent this worker does not serve.
    let response = a2a(&worker, "ghost", &send("message/send", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    worker.stop().await;
}

#[tokio::test]
async fn the_agent_card_names_the_endpoint_and_the_bearer_scheme() {
    let worker = start(&agents()).await;
    let card = json_of(
        worker
            .http
            .get(worker.url("/a2a/default/echo/.well-known/agent-card.json"))
            .bearer_auth(SERVE_TOKEN),
    )
    .await;
    assert_eq!(card["name"], "echo");
    assert_eq!(card["protocolVersion"], "0.3.0");
    assert_eq!(card["preferredTransport"], "JSONRPC");
    assert_eq!(card["capabilities"]["streaming"], true);
    assert_eq!(card["securitySchemes"]["bearer"]["type"], "http");
    assert_eq!(card["securitySchemes"]["bearer"]["scheme"], "bearer");
    let url = card["url"].as_str().unwrap();
    assert_eq!(url, worker.url("/a2a/default/echo"));
    // The endpoint it names answers.
    let reply = json_of(
        worker
            .http
            .post(url)
            .bearer_auth(SERVE_TOKEN)
            .json(&send("message/send", "via the card")),
    )
    .await;
    assert_eq!(
        reply["result"]["artifacts"][0]["parts"][0]["text"],
        "heard via the card"
    );

    // Two agents: the root names both cards instead of choosing one.
    let response = worker
        .http
        .get(worker.url("/.well-known/agent-card.json"))
        .bearer_auth(SERVE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let listing: Value = response.json().await.unwrap();
    assert_eq!(
        listing["agentCards"].as_array().unwrap().len(),
        2,
        "{listing}"
    );
    worker.stop().await;

    // One agent: the root is its card, at the URL the operator configured.
    let worker = TestWorker::start_with(
        serving("    publicUrl: https://agents.example.com/\n"),
        "agents:\n  - name: solo\n    spec:\n      model: {provider: scripted, script: [{reply: hi}]}\n",
    )
    .await;
    let card = json_of(
        worker
            .http
            .get(worker.url("/.well-known/agent-card.json"))
            .bearer_auth(SERVE_TOKEN),
    )
    .await;
    assert_eq!(card["name"], "solo");
    assert_eq!(card["url"], "https://agents.example.com/a2a/default/solo");
    worker.stop().await;
}

/// Every served endpoint with a body that would be answered with the right token.
fn served_requests(worker: &TestWorker) -> Vec<reqwest::RequestBuilder> {
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    });
    vec![
        worker
            .http
            .post(worker.url("/mcp"))
            .header("accept", "application/json, text/event-stream")
            .json(&initialize),
        worker
            .http
            .post(worker.url("/a2a/default/echo"))
            .json(&send("message/send", "hi")),
        worker
            .http
            .post(worker.url("/a2a/default/echo"))
            .json(&send("message/stream", "hi")),
        worker
            .http
            .get(worker.url("/a2a/default/echo/.well-known/agent-card.json")),
        worker.http.get(worker.url("/.well-known/agent-card.json")),
    ]
}

#[tokio::test]
async fn without_the_token_or_with_a_wrong_one_nothing_is_served() {
    let worker = start(&agents()).await;
    let mut route = worker
        .broker
        .subscribe("agent.route.default.echo")
        .await
        .unwrap();
    for (token, what) in [
        (None, "no token"),
        (Some("nexo-worker-x"), "a wrong token"),
        (Some(""), "an empty token"),
    ] {
        for request in served_requests(&worker) {
            let request = match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status().as_u16(),
                401,
                "{what}: {:?}",
                response.url().path()
            );
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
        }
    }
    let refused = mcp_client(&worker, ClientConfig::default(), "wrong").await;
    assert!(
        refused.is_err(),
        "an MCP client with a wrong token is refused"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), route.next())
            .await
            .is_err(),
        "no question reached the agent"
    );
    worker.stop().await;

    // While no token is set, serving is off.
    let unset = WorkerOptions {
        worker_extra: "  serve:\n    tokenEnv: NEXO_TEST_SERVE_TOKEN_UNSET\n".to_owned(),
        ..Default::default()
    };
    let worker = TestWorker::start_with(unset, &agents()).await;
    for request in served_requests(&worker) {
        let response = request.bearer_auth(SERVE_TOKEN).send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            403,
            "{:?}",
            response.url().path()
        );
    }
    worker.stop().await;
}

/// Two worker processes of one pool on NATS: each lists every agent of the pool, and
/// a question to one worker for an agent the other runs is answered, over MCP and
/// A2A.
#[tokio::test]
async fn every_worker_of_a_pool_serves_all_of_its_agents() {
    const AGENT_COUNT: usize = 6;
    let mut pool = support::pool::Pool::new(AGENT_COUNT, 2).await;
    // The workers inherit this process's environment, so the token variable too.
    pool.worker_settings = format!("  serve: {{tokenEnv: {SERVE_TOKEN_ENV}}}\n");
    pool.add_worker(0).await;
    pool.add_worker(1).await;
    let owners = pool.wait_settled(&[0, 1], Duration::from_secs(30)).await;
    let remote = owners
        .iter()
        .find_map(|(agent, worker)| (*worker == 1).then(|| agent.trim_start_matches("default/")))
        .expect("worker 1 runs an agent");
    let first = pool.workers[0].base();
    let client = support::http_client();

    let transport = StreamableHttpClientTransport::with_client(
        client.clone(),
        StreamableHttpClientTransportConfig::with_uri(format!("{first}/mcp"))
            .auth_header(SERVE_TOKEN),
    );
    let mcp = tokio::time::timeout(DEADLINE, ClientConfig::default().serve(transport))
        .await
        .expect("the MCP handshake ends in time")
        .unwrap();
    let expected: Vec<String> = (0..AGENT_COUNT)
        .map(|i| format!("ask_{}", support::pool::agent(i)))
        .collect();
    assert_eq!(tool_names(&mcp).await, expected);
    let answer = call(&mcp, &format!("ask_{remote}"), json!({"message": "hi"})).await;
    assert_eq!(text_of(&answer), "echo hi");
    mcp.cancel().await.unwrap();

    let reply = json_of(
        client
            .post(format!("{first}/a2a/default/{remote}"))
            .bearer_auth(SERVE_TOKEN)
            .json(&send("message/send", "hi")),
    )
    .await;
    assert_eq!(
        reply["result"]["artifacts"][0]["parts"][0]["text"], "echo hi",
        "{reply}"
    );
}

/// Records the progress notifications an MCP client is sent.
struct ProgressWatcher(mpsc::UnboundedSender<ProgressNotificationParam>);

impl ClientHandler for ProgressWatcher {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self.0.send(params);
    }
}

/// A call with a progress token is sent the answer's text as it is written, in
/// progress notifications carrying the token, before the result.
#[tokio::test]
async fn an_mcp_call_with_a_progress_token_gets_the_text_as_progress() {
    let worker = start(&agents()).await;
    let (tx, mut notes) = mpsc::unbounded_channel();
    let client = mcp_client(&worker, ProgressWatcher(tx), SERVE_TOKEN)
        .await
        .expect("the MCP client connects with the token");
    let mut params = CallToolRequestParams::new("ask_echo")
        .with_arguments(json!({"message": "hello"}).as_object().unwrap().clone());
    let mut meta = RequestMetaObject::default();
    meta.set_progress_token(ProgressToken(NumberOrString::String("p1".into())));
    params.meta = Some(meta);
    let answer = tokio::time::timeout(DEADLINE, client.call_tool(params))
        .await
        .expect("the tool call ends in time")
        .expect("the tool call is answered");
    assert_eq!(text_of(&answer), "heard hello");
    // The notifications are sent before the answer but handled by the client's own
    // task: they may come in just after it.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(DEADLINE, notes.recv()).await {
            Ok(Some(note)) => seen.push(note),
            _ => break,
        }
    }
    while let Ok(note) = notes.try_recv() {
        seen.push(note);
    }
    let pieces: Vec<(f64, String)> = seen
        .iter()
        .map(|n| (n.progress, n.message.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        pieces,
        [(1.0, "heard ".to_owned()), (2.0, "hello".to_owned())]
    );
    // rmcp's client puts in a token of its own; every notification carries it.
    assert!(
        seen.iter()
            .all(|n| n.progress_token == seen[0].progress_token),
        "{seen:?}"
    );
    client.cancel().await.unwrap();
    worker.stop().await;
}
