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
use std::path::Path;
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
use support::process::{WorkerProcess, write_worker_config_with};
use support::{DEADLINE, TempDir, get_json, http_client, post_message, wait_for};
use tokio_util::sync::CancellationToken;

const SERVER: &str = env!("CARGO_BIN_EXE_nexo-test-mcp-server");

/// A worker process with one scripted agent `a` behind webhook `api`, and a client.
struct Worker {
    dir: TempDir,
    process: WorkerProcess,
    client: reqwest::Client,
}

impl Worker {
    /// Starts the worker (with `env` added to its environment) with the extension
    /// `extension` writes (a YAML list entry; it is given the test's folder), used by
    /// agent `a`, whose model follows `rules`: a message containing `word` makes it
    /// call `tool` with `{text: <message>}` and reply `tool said: <result>`.
    async fn start(
        extension: impl FnOnce(&Path) -> String,
        uses: &str,
        rules: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = TempDir::new();
        let script: String = rules
            .iter()
            .map(|(word, tool)| {
                format!(
                    "          - {{contains: '{word}', toolCall: {{name: {tool}, arguments: {{text: '{{{{input}}}}'}}}}, reply: 'tool said: {{{{tool_result}}}}'}}\n"
                )
            })
            .collect();
        let resources = format!(
            "extensions:
{extension}
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
            extension = extension(dir.path()),
        );
        let config = write_worker_config_with(dir.path(), "{type: local}", &resources);
        let process = WorkerProcess::spawn(&config, env).await;
        Self {
            dir,
            process,
            client: http_client(),
        }
    }

    /// A worker whose agent uses the stdio test server, once that is ready.
    async fn with_stdio_server(env: &[(&str, &str)]) -> Self {
        let worker = Self::start(stdio_extension, "echo", STDIO_RULES, env).await;
        let report = worker.wait_ready("default/echo", STDIO_TOOLS).await;
        assert_eq!(report.transport, "stdio");
        worker
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `/catalog` entry of `extension`, as it is now.
    async fn report(&self, extension: &str) -> Option<ExtensionReport> {
        let (status, body) =
            get_json(&self.client, &format!("{}/catalog", self.process.base())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let report: CatalogReport = serde_json::from_value(body).expect("a catalog report");
        report.extensions.into_iter().find(|e| e.name == extension)
    }

    /// Waits until the `/catalog` entry of `extension` is `what` (`wanted` holds).
    async fn wait_report(
        &self,
        extension: &str,
        what: &str,
        wanted: impl Fn(&ExtensionReport) -> bool,
    ) -> ExtensionReport {
        wait_for(&format!("{extension}: {what}"), || async {
            self.report(extension).await.filter(&wanted)
        })
        .await
    }

    /// Waits until `/catalog` reports `extension` ready with exactly `tools`.
    async fn wait_ready(&self, extension: &str, tools: &[&str]) -> ExtensionReport {
        self.wait_report(extension, &format!("ready with {tools:?}"), |e| {
            e.ready && e.tools == tools
        })
        .await
    }

    /// Sends `text` to the agent and returns its reply.
    async fn ask(&self, text: &str) -> String {
        ask(&self.client, &self.process.base(), text).await
    }
}

async fn ask(client: &reqwest::Client, base: &str, text: &str) -> String {
    let (status, answer) = post_message(client, base, "api", json!({"text": text})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["reply"].as_str().expect("a reply").to_owned()
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

const STDIO_TOOLS: &[&str] = &["echo", "env", "fail", "hang", "pid"];

const STDIO_RULES: &[(&str, &str)] = &[
    ("say", "echo__echo"),
    ("pid", "echo__pid"),
    ("environment", "echo__env"),
    ("fail", "echo__fail"),
    ("hang", "echo__hang"),
];

const SECRET: (&str, &str) = ("NEXO_TEST_MCP_SECRET", "s3cret");

fn read_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("pid"))
        .expect("the server wrote its pid")
        .parse()
        .unwrap()
}

/// The environment the `env` tool reported in `reply`.
fn reported_env(reply: &str) -> serde_json::Map<String, Value> {
    let result = reply.strip_prefix("tool said: ").expect("a tool result");
    serde_json::from_str(result).expect("the environment as JSON")
}

#[tokio::test]
async fn a_stdio_server_s_tools_are_listed_and_called_through_the_agent() {
    let worker = Worker::with_stdio_server(&[SECRET]).await;
    assert_eq!(worker.report("default/echo").await.unwrap().problem, None);
    assert_eq!(worker.ask("say hello").await, "tool said: echo: say hello");
    assert_eq!(
        worker.ask("fail now").await,
        "tool said: error: it failed on purpose"
    );
}

#[tokio::test]
async fn a_tool_outside_the_allow_list_is_not_offered_and_a_call_to_it_is_a_tool_error() {
    // The extension lets agents have `echo` only. (A scripted rule may not name a
    // tool outside the agent's own list, `extensions[].tools`: the config check
    // refuses that; a real model can still ask for one, as here.)
    let allow_echo = |dir: &Path| format!("{}\n      allowTools: [echo]", stdio_extension(dir));
    let worker = Worker::start(allow_echo, "echo", STDIO_RULES, &[SECRET]).await;
    worker.wait_ready("default/echo", &["echo"]).await;
    assert_eq!(worker.ask("say hi").await, "tool said: echo: say hi");
    assert_eq!(
        worker.ask("pid please").await,
        "tool said: error: no tool named `echo__pid`"
    );
}

#[tokio::test]
async fn a_stdio_server_sees_only_the_variables_its_spec_names() {
    let worker =
        Worker::with_stdio_server(&[SECRET, ("NEXO_ADMIN_TOKEN", "not for extensions")]).await;

    let env = reported_env(&worker.ask("environment").await);
    let mut expected: BTreeSet<String> = ["PATH", "HOME", "LANG", "TZ"]
        .into_iter()
        .filter(|name| std::env::var_os(name).is_some())
        .map(str::to_owned)
        .collect();
    expected.extend(["NEXO_TEST_MCP_DIR".to_owned(), "MCP_TEST_SECRET".to_owned()]);
    assert_eq!(env.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(!env.contains_key("NEXO_ADMIN_TOKEN"));
    assert_eq!(env["MCP_TEST_SECRET"], "s3cret");
    assert_eq!(env["NEXO_TEST_MCP_DIR"], worker.dir().display().to_string());
}

#[tokio::test]
async fn a_server_killed_mid_call_fails_that_call_and_a_new_process_serves_the_next() {
    let worker = Worker::with_stdio_server(&[SECRET]).await;
    let first = read_pid(worker.dir());
    assert_eq!(worker.ask("pid").await, format!("tool said: {first}"));

    let started = Instant::now();
    let hanging = tokio::spawn({
        let (client, base) = (worker.client.clone(), worker.process.base());
        async move { ask(&client, &base, "hang").await }
    });
    wait_for("the server to be in its hanging call", || async {
        worker.dir().join("hanging").exists().then_some(())
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
    let report = worker.wait_ready("default/echo", STDIO_TOOLS).await;
    assert_eq!(report.problem, None);
    let second = read_pid(worker.dir());
    assert_ne!(second, first);
    assert_eq!(worker.ask("pid").await, format!("tool said: {second}"));
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_is_the_problem_until_it_can() {
    let mounted_secret = |dir: &Path| {
        stdio_extension(dir).replace(
            "secret: {env: NEXO_TEST_MCP_SECRET}",
            "secret: {secretKeyRef: {name: mcp, key: token}}",
        )
    };
    let worker = Worker::start(mounted_secret, "echo", STDIO_RULES, &[]).await;

    let report = worker
        .wait_report("default/echo", "a problem", |e| e.problem.is_some())
        .await;
    assert!(!report.ready);
    let problem = report.problem.unwrap();
    assert!(
        problem.starts_with("cannot read the secret of variable MCP_TEST_SECRET"),
        "{problem}"
    );
    assert!(
        !worker.dir().join("pid").exists(),
        "no process without its secret"
    );

    // Mounted later, as a Secret created after the Extension: taken at the next try.
    let mounted = nexo_api::spec::SecretRef::secret_key("mcp", "token")
        .secret_key_ref
        .unwrap()
        .mounted_file_name();
    let secrets = worker.dir().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join(mounted), "mounted-value\n").unwrap();
    worker.wait_ready("default/echo", STDIO_TOOLS).await;
    let env = reported_env(&worker.ask("environment").await);
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

/// A worker whose agent uses the HTTP server at `url`, with `token` as its bearer token.
async fn with_http_server(url: &str, token: &str) -> Worker {
    let extension = |_: &Path| http_extension(url);
    Worker::start(
        extension,
        "web",
        HTTP_RULES,
        &[("NEXO_TEST_MCP_TOKEN", token)],
    )
    .await
}

fn greeting_server() -> HttpTools {
    let tools = HttpTools::default();
    tools.tools.lock().unwrap().push(HttpTools::tool("greet"));
    tools
}

#[tokio::test]
async fn an_http_server_is_called_with_the_bearer_token_and_a_tool_it_adds_is_called_next() {
    let tools = greeting_server();
    let worker = with_http_server(&serve_http(tools.clone()).await, HTTP_TOKEN).await;

    let report = worker.wait_ready("default/web", &["greet"]).await;
    assert_eq!(report.transport, "http");
    assert_eq!(worker.ask("greet bob").await, "tool said: hello, greet bob");

    tools.add_shout().await;
    worker.wait_ready("default/web", &["greet", "shout"]).await;
    assert_eq!(worker.ask("shout it").await, "tool said: SHOUT IT");
}

#[tokio::test]
async fn an_http_server_refusing_the_token_is_reported_not_ready_with_a_problem() {
    let worker = with_http_server(&serve_http(greeting_server()).await, "wr0ng-t0ken").await;

    let report = worker
        .wait_report("default/web", "a problem", |e| e.problem.is_some())
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
    let tools = greeting_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(http_server(listener, tools.clone(), stop.clone()));
    let worker = with_http_server(&format!("http://{addr}/mcp"), HTTP_TOKEN).await;
    worker.wait_ready("default/web", &["greet"]).await;
    assert_eq!(worker.ask("greet one").await, "tool said: hello, greet one");

    stop.cancel();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the server stops")
        .unwrap();
    // The server is gone: the call fails (or, if the worker noticed first, the tool is
    // not offered).
    let reply = worker.ask("greet two").await;
    assert!(reply.starts_with("tool said: error: "), "{reply}");
    // A new session was tried, and could not connect.
    worker
        .wait_report("default/web", "down, reconnecting", |e| {
            !e.ready
                && e.problem
                    .as_deref()
                    .is_some_and(|p| p.starts_with("initialize failed"))
        })
        .await;

    // Back on the same address: the worker connects again by itself.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(http_server(listener, tools, CancellationToken::new()));
    worker.wait_ready("default/web", &["greet"]).await;
    assert_eq!(
        worker.ask("greet three").await,
        "tool said: hello, greet three"
    );
}
