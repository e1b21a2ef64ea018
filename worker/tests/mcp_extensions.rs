//! MCP servers as extensions, with real processes and rmcp on both sides: the worker
//! binary runs a scripted agent whose model calls the servers' tools.
//!
//! The stdio server is the bin `nexo-test-mcp-server` of this package
//! (src/bin/nexo-test-mcp-server.rs): cargo builds a package's bins before its
//! integration tests and hands them their paths (`CARGO_BIN_EXE_<name>`), which an
//! example would not get. The HTTP server runs in the test process (rmcp's
//! streamable HTTP server in axum).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use nexo_api::report::{CatalogReport, ExtensionReport};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler};
use serde_json::{Value, json};
use support::process::WorkerProcess;
use support::{DEADLINE, TempDir, get_json, http_client, post_message, wait_for};
use tokio_util::sync::CancellationToken;

const SERVER: &str = env!("CARGO_BIN_EXE_nexo-test-mcp-server");

/// A worker config (mounted secrets in `<dir>/secrets`): `extensions` and one scripted agent `a` using extension `uses`
/// behind webhook `api`, with a rule per `(word, tool)`: a message containing `word`
/// makes the model call `tool` (with `{text: <message>}`) and reply
/// `tool said: <result>`.
fn write_config(dir: &Path, extensions: &str, uses: &str, rules: &[(&str, &str)]) -> PathBuf {
    let script: String = rules
        .iter()
        .map(|(word, tool)| {
            format!(
                "          - {{contains: '{word}', toolCall: {{name: {tool}, arguments: {{text: '{{{{input}}}}'}}}}, reply: 'tool said: {{{{tool_result}}}}'}}\n"
            )
        })
        .collect();
    let path = dir.join("worker.yaml");
    std::fs::write(
        &path,
        format!(
            "worker:
  dataDir: {data}
  secretsDir: {secrets}
  http: {{listen: '127.0.0.1:0'}}
  broker: {{type: local}}
extensions:
{extensions}
agents:
  - name: a
    spec:
      extensions: [{{name: {uses}}}]
      limits: {{toolTimeoutSeconds: 30}}
      model:
        provider: scripted
        script:
{script}channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{replyTimeoutSeconds: 60}}}}
",
            data = dir.join("data").display(),
            secrets = dir.join("secrets").display(),
        ),
    )
    .unwrap();
    path
}

/// The stdio test server as extension `echo`, leaving its pid in `dir`, with
/// `MCP_TEST_SECRET` from the worker's `NEXO_TEST_MCP_SECRET`.
fn stdio_extension(dir: &Path) -> String {
    format!(
        "  - name: echo
    spec:
      stdio:
        command: {SERVER}
        env:
          - {{name: NEXO_TEST_MCP_DIR, value: '{dir}'}}
          - {{name: MCP_TEST_SECRET, secret: {{env: NEXO_TEST_MCP_SECRET}}}}",
        dir = dir.display(),
    )
}

const STDIO_RULES: &[(&str, &str)] = &[
    ("say", "echo__echo"),
    ("pid", "echo__pid"),
    ("environment", "echo__env"),
    ("fail", "echo__fail"),
    ("hang", "echo__hang"),
];

/// The worker's `/catalog` entry for `extension`, as it is now.
async fn extension_report(
    client: &reqwest::Client,
    worker: &WorkerProcess,
    extension: &str,
) -> Option<ExtensionReport> {
    let (status, body) = get_json(client, &format!("{}/catalog", worker.base())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let report: CatalogReport = serde_json::from_value(body).expect("a catalog report");
    report.extensions.into_iter().find(|e| e.name == extension)
}

/// Waits until `/catalog` reports `extension` ready with exactly `tools`.
async fn wait_ready(
    client: &reqwest::Client,
    worker: &WorkerProcess,
    extension: &str,
    tools: &[&str],
) -> ExtensionReport {
    wait_for(&format!("{extension} ready with {tools:?}"), || async {
        extension_report(client, worker, extension)
            .await
            .filter(|e| e.ready && e.tools == tools)
    })
    .await
}

/// Sends `text` to the agent and returns its reply.
async fn ask(client: &reqwest::Client, worker: &WorkerProcess, text: &str) -> String {
    let (status, answer) = post_message(client, &worker.base(), "api", json!({"text": text})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["reply"].as_str().expect("a reply").to_owned()
}

fn read_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("pid"))
        .expect("the server wrote its pid")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_stdio_server_s_tools_are_listed_and_called_through_the_agent() {
    let dir = TempDir::new();
    let config = write_config(
        dir.path(),
        &stdio_extension(dir.path()),
        "echo",
        STDIO_RULES,
    );
    let worker = WorkerProcess::spawn(&config, &[("NEXO_TEST_MCP_SECRET", "s3cret")]).await;
    let client = http_client();

    let report = wait_ready(
        &client,
        &worker,
        "default/echo",
        &["echo", "env", "fail", "hang", "pid"],
    )
    .await;
    assert_eq!(report.transport, "stdio");
    assert_eq!(report.problem, None);

    assert_eq!(
        ask(&client, &worker, "say hello").await,
        "tool said: echo: say hello"
    );
    assert_eq!(
        ask(&client, &worker, "fail now").await,
        "tool said: error: it failed on purpose"
    );
}

#[tokio::test]
async fn a_stdio_server_sees_only_the_variables_its_spec_names() {
    let dir = TempDir::new();
    let config = write_config(
        dir.path(),
        &stdio_extension(dir.path()),
        "echo",
        STDIO_RULES,
    );
    let worker = WorkerProcess::spawn(
        &config,
        &[
            ("NEXO_TEST_MCP_SECRET", "s3cret"),
            ("NEXO_ADMIN_TOKEN", "not for extensions"),
        ],
    )
    .await;
    let client = http_client();
    wait_ready(
        &client,
        &worker,
        "default/echo",
        &["echo", "env", "fail", "hang", "pid"],
    )
    .await;

    let reply = ask(&client, &worker, "environment").await;
    let env: serde_json::Map<String, Value> =
        serde_json::from_str(reply.strip_prefix("tool said: ").expect("a tool result"))
            .expect("the environment as JSON");
    let mut expected: BTreeSet<String> = ["PATH", "HOME", "LANG", "TZ"]
        .into_iter()
        .filter(|name| std::env::var_os(name).is_some())
        .map(str::to_owned)
        .collect();
    expected.extend(["NEXO_TEST_MCP_DIR".to_owned(), "MCP_TEST_SECRET".to_owned()]);
    assert_eq!(env.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(!env.contains_key("NEXO_ADMIN_TOKEN"));
    assert_eq!(env["MCP_TEST_SECRET"], "s3cret");
    assert_eq!(env["NEXO_TEST_MCP_DIR"], dir.path().display().to_string());
}

#[tokio::test]
async fn a_server_killed_mid_call_fails_that_call_and_a_new_process_serves_the_next() {
    let dir = TempDir::new();
    let config = write_config(
        dir.path(),
        &stdio_extension(dir.path()),
        "echo",
        STDIO_RULES,
    );
    let worker = WorkerProcess::spawn(&config, &[("NEXO_TEST_MCP_SECRET", "s3cret")]).await;
    let client = http_client();
    let tools = ["echo", "env", "fail", "hang", "pid"];
    wait_ready(&client, &worker, "default/echo", &tools).await;

    let first = read_pid(dir.path());
    assert_eq!(
        ask(&client, &worker, "pid").await,
        format!("tool said: {first}")
    );

    let started = Instant::now();
    let hanging = {
        let client = client.clone();
        let base = worker.base();
        tokio::spawn(async move {
            let (status, answer) =
                post_message(&client, &base, "api", json!({"text": "hang"})).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            answer["reply"].as_str().expect("a reply").to_owned()
        })
    };
    wait_for("the server to be in its hanging call", || async {
        dir.path().join("hanging").exists().then_some(())
    })
    .await;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let reply = tokio::time::timeout(Duration::from_secs(10), hanging)
        .await
        .expect("the call ends soon after the process dies")
        .unwrap();
    assert_eq!(
        reply,
        "tool said: error: the extension's process exited during the call"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not the 30 s tool timeout"
    );

    // The restarted server: ready again, with another pid.
    let report = wait_ready(&client, &worker, "default/echo", &tools).await;
    assert_eq!(report.problem, None);
    let second = read_pid(dir.path());
    assert_ne!(second, first);
    assert_eq!(
        ask(&client, &worker, "pid").await,
        format!("tool said: {second}")
    );
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_is_the_problem_until_it_can() {
    let dir = TempDir::new();
    let extension = stdio_extension(dir.path()).replace(
        "secret: {env: NEXO_TEST_MCP_SECRET}",
        "secret: {secretKeyRef: {name: mcp, key: token}}",
    );
    let config = write_config(dir.path(), &extension, "echo", STDIO_RULES);
    let worker = WorkerProcess::spawn(&config, &[]).await;
    let client = http_client();

    let report = wait_for("the unreadable secret in /catalog", || async {
        extension_report(&client, &worker, "default/echo")
            .await
            .filter(|e| e.problem.is_some())
    })
    .await;
    assert!(!report.ready);
    let problem = report.problem.unwrap();
    assert!(
        problem.starts_with("cannot read the secret of variable MCP_TEST_SECRET"),
        "{problem}"
    );
    assert!(
        !dir.path().join("pid").exists(),
        "no process without its secret"
    );

    // Mounted later, as a Secret created after the Extension: taken at the next try.
    let mounted = nexo_api::spec::SecretRef::secret_key("mcp", "token")
        .secret_key_ref
        .unwrap()
        .mounted_file_name();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets").join(mounted), "mounted-value\n").unwrap();
    wait_ready(
        &client,
        &worker,
        "default/echo",
        &["echo", "env", "fail", "hang", "pid"],
    )
    .await;
    let reply = ask(&client, &worker, "environment").await;
    let env: Value = serde_json::from_str(reply.strip_prefix("tool said: ").unwrap()).unwrap();
    assert_eq!(env["MCP_TEST_SECRET"], "mounted-value");
}

/// The HTTP test server's tools, shared by its sessions, and the sessions' peers.
#[derive(Clone, Default)]
struct HttpTools {
    tools: Arc<Mutex<Vec<Tool>>>,
    peers: Arc<Mutex<Vec<Peer<RoleServer>>>>,
}

impl HttpTools {
    fn tool(name: &'static str) -> Tool {
        let schema = json!({"type": "object", "properties": {"text": {"type": "string"}}});
        Tool::new(
            name,
            "A test tool.",
            Arc::new(schema.as_object().unwrap().clone()),
        )
    }

    /// Adds `shout` and tells every session the list changed.
    async fn add_shout(&self) {
        self.tools.lock().unwrap().push(Self::tool("shout"));
        let peers = self.peers.lock().unwrap().clone();
        for peer in peers {
            peer.notify_tool_list_changed().await.unwrap();
        }
    }
}

impl ServerHandler for HttpTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.peers.lock().unwrap().push(context.peer);
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult {
            tools: self.tools.lock().unwrap().clone(),
            ..Default::default()
        })
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let text = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("text"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let answer = match request.name.as_ref() {
            "greet" => format!("hello, {text}"),
            "shout" => text.to_uppercase(),
            other => return Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(answer)]).into())
    }
}

const HTTP_TOKEN: &str = "t0ken-for-the-test";

/// Serves `tools` over streamable HTTP at `http://127.0.0.1:<port>/mcp`, answering 401
/// to a request without `Authorization: Bearer <HTTP_TOKEN>`.
async fn serve_http(tools: HttpTools) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(http_server(listener, tools, CancellationToken::new()));
    url
}

/// Serves until `stop`; then its sessions end and the port is free again.
async fn http_server(listener: tokio::net::TcpListener, tools: HttpTools, stop: CancellationToken) {
    let service: StreamableHttpService<HttpTools, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Default::default(),
        // Sessions, so the server can tell a client its tool list changed.
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(true)
            .with_cancellation_token(stop.child_token()),
    );
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(
            |request: axum::extract::Request, next: axum::middleware::Next| async move {
                let expected = format!("Bearer {HTTP_TOKEN}");
                let authorized = request
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                if authorized {
                    next.run(request).await
                } else {
                    // With the challenge RFC 6750 asks for.
                    axum::response::IntoResponse::into_response((
                        StatusCode::UNAUTHORIZED,
                        [("www-authenticate", "Bearer")],
                    ))
                }
            },
        ));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .unwrap();
}

fn http_extension(url: &str) -> String {
    format!(
        "  - name: web
    spec:
      http:
        url: {url}
        bearerToken: {{env: NEXO_TEST_MCP_TOKEN}}"
    )
}

const HTTP_RULES: &[(&str, &str)] = &[("greet", "web__greet"), ("shout", "web__shout")];

#[tokio::test]
async fn an_http_server_is_called_with_the_bearer_token_and_a_tool_it_adds_is_called_next() {
    let tools = HttpTools::default();
    tools.tools.lock().unwrap().push(HttpTools::tool("greet"));
    let url = serve_http(tools.clone()).await;
    let dir = TempDir::new();
    let config = write_config(dir.path(), &http_extension(&url), "web", HTTP_RULES);
    let worker = WorkerProcess::spawn(&config, &[("NEXO_TEST_MCP_TOKEN", HTTP_TOKEN)]).await;
    let client = http_client();

    let report = wait_ready(&client, &worker, "default/web", &["greet"]).await;
    assert_eq!(report.transport, "http");
    assert_eq!(
        ask(&client, &worker, "greet bob").await,
        "tool said: hello, greet bob"
    );

    tools.add_shout().await;
    wait_ready(&client, &worker, "default/web", &["greet", "shout"]).await;
    assert_eq!(
        ask(&client, &worker, "shout it").await,
        "tool said: SHOUT IT"
    );
}

#[tokio::test]
async fn an_http_server_refusing_the_token_is_reported_not_ready_with_a_problem() {
    let tools = HttpTools::default();
    tools.tools.lock().unwrap().push(HttpTools::tool("greet"));
    let url = serve_http(tools).await;
    let dir = TempDir::new();
    let config = write_config(dir.path(), &http_extension(&url), "web", HTTP_RULES);
    let worker = WorkerProcess::spawn(&config, &[("NEXO_TEST_MCP_TOKEN", "wr0ng-t0ken")]).await;
    let client = http_client();

    let report = wait_for("the extension's problem in /catalog", || async {
        extension_report(&client, &worker, "default/web")
            .await
            .filter(|e| e.problem.is_some())
    })
    .await;
    assert!(!report.ready);
    assert!(report.tools.is_empty());
    let problem = report.problem.unwrap();
    assert!(problem.contains("refused the bearer token"), "{problem}");
    assert!(
        !problem.contains("wr0ng-t0ken"),
        "the token is not shown: {problem}"
    );
}

#[tokio::test]
async fn a_worker_reconnects_to_an_http_server_that_went_away_and_came_back() {
    let tools = HttpTools::default();
    tools.tools.lock().unwrap().push(HttpTools::tool("greet"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(http_server(listener, tools.clone(), stop.clone()));
    let dir = TempDir::new();
    let url = format!("http://{addr}/mcp");
    let config = write_config(dir.path(), &http_extension(&url), "web", HTTP_RULES);
    let worker = WorkerProcess::spawn(&config, &[("NEXO_TEST_MCP_TOKEN", HTTP_TOKEN)]).await;
    let client = http_client();
    wait_ready(&client, &worker, "default/web", &["greet"]).await;
    assert_eq!(
        ask(&client, &worker, "greet one").await,
        "tool said: hello, greet one"
    );

    stop.cancel();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the server stops")
        .unwrap();
    // The server is gone: the call fails (or, if the worker noticed first, the tool is
    // not offered), and the extension is reported down.
    let reply = ask(&client, &worker, "greet two").await;
    assert!(reply.starts_with("tool said: error: "), "{reply}");
    // A new session was tried, and could not connect.
    wait_for("the extension reported down", || async {
        extension_report(&client, &worker, "default/web")
            .await
            .filter(|e| {
                !e.ready
                    && e.problem
                        .as_deref()
                        .is_some_and(|p| p.starts_with("initialize failed"))
            })
    })
    .await;

    // Back on the same address: the worker connects again by itself.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(http_server(listener, tools, CancellationToken::new()));
    wait_ready(&client, &worker, "default/web", &["greet"]).await;
    assert_eq!(
        ask(&client, &worker, "greet three").await,
        "tool said: hello, greet three"
    );
}
