//! The browser tools in a real headless Chromium: a scripted agent loads a page from
//! a local server and reads it, while the allow-list keeps every request to another
//! host (the page's own image and WebSocket, a navigation the model asks for) from
//! ever reaching a server.
//!
//! Needs Chromium: `NEXO_CHROMIUM` or `chromium` on the PATH (`scripts/test.sh`
//! installs it).

mod support;

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;
use support::{TestWorker, WorkerOptions, serve_locally, wait_for};

/// Every request the page server saw: (`Host` header, path).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A server on `127.0.0.1:<port>` whose page loads an image and opens a WebSocket
/// from `localhost:<port>`, the same server under a host name the agent may not
/// use. Returns its port and what it saw.
async fn page_server() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, uri: Uri| {
        let record = record.clone();
        async move {
            let host = headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            record
                .lock()
                .unwrap()
                .push((host.clone(), uri.path().to_owned()));
            let port = host.rsplit(':').next().unwrap_or_default().to_owned();
            match uri.path() {
                "/page" => Html(format!(
                    r#"<!doctype html><html><head><title>Browser test page</title></head><body>
<p>The secret word is marmalade.</p>
<p id="ws">websocket pending</p>
<img src="http://localhost:{port}/pixel.png">
<script>
  const ws = new WebSocket("ws://localhost:{port}/socket");
  ws.onopen = () => document.getElementById("ws").textContent = "websocket open";
  ws.onclose = () => {{
    if (document.getElementById("ws").textContent === "websocket pending")
      document.getElementById("ws").textContent = "websocket failed";
  }};
</script>
</body></html>"#
                ))
                .into_response(),
                // Shows the cookies the page's origin has, after setting
                // `who=<query>` if there is a query.
                "/cookie" => Html(format!(
                    r#"<!doctype html><html><head><title>cookie</title></head><body><p id="c"></p>
<script>
  if ("{query}") document.cookie = "who={query}";
  document.getElementById("c").textContent = "cookies: [" + document.cookie + "]";
</script></body></html>"#,
                    query = uri.query().unwrap_or_default()
                ))
                .into_response(),
                _ => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(axum::body::Body::from("not here"))
                    .unwrap(),
            }
        }
    });
    let base = serve_locally(app).await;
    let port = base.rsplit(':').next().unwrap().parse().unwrap();
    (port, seen)
}

/// A scripted agent whose browser may load only from `127.0.0.1`: a message with a
/// URL navigates there, `read page` reads the whole page, `read ws` the WebSocket
/// line.
fn browser_agent() -> String {
    r##"agents:
  - name: surfer
    spec:
      browser: {allowDomains: ["127.0.0.1"], actionTimeoutSeconds: 20}
      limits: {toolTimeoutSeconds: 30}
      model:
        provider: scripted
        script:
          - contains: "read ws"
            toolCall: {name: browser_read, arguments: {selector: "#ws"}}
            reply: "ws: {{tool_result}}"
          - contains: "read page"
            toolCall: {name: browser_read}
            reply: "the page says: {{tool_result}}"
          - contains: ":"
            toolCall: {name: browser_navigate, arguments: {url: "{{input}}"}}
            reply: "navigated: {{tool_result}}"
channels:
  - name: api
    spec:
      defaultAgent: surfer
      webhook: {replyTimeoutSeconds: 40}
"##
    .to_owned()
}

/// Two agents like [`browser_agent`]'s, `a` (channel `a`) and `b` (channel `b`),
/// whose profiles close after `idle_seconds` without a call; a URL with `?tab` opens
/// a new page, of at most 2.
fn two_agents(idle_seconds: u64) -> String {
    let agent = |name: &str| {
        format!(
            r#"  - name: {name}
    spec:
      browser: {{allowDomains: ["127.0.0.1"], idleSeconds: {idle_seconds}, maxPages: 2}}
      model:
        provider: scripted
        script:
          - contains: "read page"
            toolCall: {{name: browser_read}}
            reply: "{{{{tool_result}}}}"
          - contains: "?tab"
            toolCall: {{name: browser_navigate, arguments: {{url: "{{{{input}}}}", newPage: true}}}}
            reply: "{{{{tool_result}}}}"
          - contains: ":"
            toolCall: {{name: browser_navigate, arguments: {{url: "{{{{input}}}}"}}}}
            reply: "{{{{tool_result}}}}"
"#
        )
    };
    let channel = |name: &str| {
        format!(
            "  - name: {name}\n    spec:\n      defaultAgent: {name}\n      webhook: {{replyTimeoutSeconds: 40}}\n"
        )
    };
    format!(
        "agents:\n{}{}channels:\n{}{}",
        agent("a"),
        agent("b"),
        channel("a"),
        channel("b")
    )
}

async fn start_worker(executable: &str) -> TestWorker {
    start_worker_with(executable, &browser_agent(), None).await
}

async fn start_worker_with(
    executable: &str,
    yaml: &str,
    data_dir: Option<&std::path::Path>,
) -> TestWorker {
    TestWorker::start_with(
        WorkerOptions {
            worker_extra: format!("  browser:\n    executable: {executable}\n"),
            data_dir: data_dir.map(ToOwned::to_owned),
            ..Default::default()
        },
        yaml,
    )
    .await
}

async fn say(worker: &TestWorker, text: &str) -> String {
    say_to(worker, "api", text).await
}

async fn say_to(worker: &TestWorker, channel: &str, text: &str) -> String {
    let (status, body) = worker.post_message(channel, json!({"text": text})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["reply"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_agent_reads_an_allowed_page_and_nothing_reaches_other_hosts() {
    let chromium = support::chromium_binary();
    let (port, seen) = page_server().await;
    let worker = start_worker(&chromium.display().to_string()).await;

    let page = format!("http://127.0.0.1:{port}/page");
    let reply = say(&worker, &page).await;
    assert!(reply.contains("Title: Browser test page"), "{reply}");
    assert!(reply.contains(&format!("URL: {page}")), "{reply}");
    assert!(
        reply.contains("Refused") && reply.contains("localhost"),
        "the image from localhost is refused and named: {reply}"
    );

    let reply = say(&worker, "read page").await;
    assert!(
        reply.starts_with("the page says: ") && reply.contains("The secret word is marmalade."),
        "{reply}"
    );

    // The WebSocket is not a request the Fetch domain pauses: the context's proxy
    // rules stop it. The page says when it has given up.
    let ws = wait_for("the page's WebSocket to localhost to fail", || async {
        let reply = say(&worker, "read ws").await;
        (!reply.contains("pending")).then_some(reply)
    })
    .await;
    assert_eq!(ws, "ws: websocket failed");

    // A navigation the model asks for outside the allow-list, and other schemes,
    // are refused before anything is loaded.
    let elsewhere = format!("http://localhost:{port}/elsewhere");
    let reply = say(&worker, &elsewhere).await;
    assert!(
        reply.starts_with(&format!("navigated: error: refused to load {elsewhere}: host `localhost` is not allowed by this agent's `browser.allowDomains` [127.0.0.1]")),
        "{reply}"
    );
    let reply = say(&worker, "file:///etc/passwd").await;
    assert!(
        reply.contains("error: refused to load file:///etc/passwd: `file:` URLs are not loaded"),
        "{reply}"
    );

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(host, _)| host == &format!("127.0.0.1:{port}")),
        "only the allowed host was asked for anything: {seen:?}"
    );
    assert!(
        seen.iter().any(|(_, path)| path == "/page"),
        "the page was loaded from the server: {seen:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn without_chromium_the_tools_fail_and_the_agent_still_answers() {
    let worker = start_worker("/nonexistent/chromium").await;
    let reply = say(&worker, "http://127.0.0.1:9/").await;
    assert!(
        reply.starts_with("navigated: error: no Chromium to run: `worker.browser.executable` (/nonexistent/chromium) is not an executable file"),
        "{reply}"
    );
    let reply = say(&worker, "read page").await;
    assert!(reply.contains("no Chromium to run"), "{reply}");
    worker.stop().await;
}

/// Processes (Chromium's, and its children that carry the flag) started with the
/// worker's user-data-dir under `data_dir`.
fn chromium_processes(data_dir: &std::path::Path) -> usize {
    let flag = format!(
        "--user-data-dir={}",
        data_dir.join("browser").join("chromium").display()
    );
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == flag.as_bytes()))
        .count()
}

#[tokio::test]
async fn chromium_starts_on_first_use_and_closes_when_idle_and_at_shutdown() {
    let chromium = support::chromium_binary();
    let (port, _) = page_server().await;
    let dir = support::TempDir::new();
    let worker = start_worker_with(
        &chromium.display().to_string(),
        &two_agents(3),
        Some(dir.path()),
    )
    .await;
    assert_eq!(
        chromium_processes(dir.path()),
        0,
        "not started before a call"
    );

    let page = format!("http://127.0.0.1:{port}/page");
    assert!(
        say_to(&worker, "a", &page)
            .await
            .contains("Title: Browser test page")
    );
    assert!(
        chromium_processes(dir.path()) > 0,
        "started by the first call"
    );
    wait_for(
        "Chromium to close after the agent's idle seconds",
        || async { (chromium_processes(dir.path()) == 0).then_some(()) },
    )
    .await;

    // Started again by the next call; gone once the worker stops.
    assert!(
        say_to(&worker, "a", &page)
            .await
            .contains("Title: Browser test page")
    );
    assert!(chromium_processes(dir.path()) > 0);
    worker.stop().await;
    wait_for("Chromium to be gone after the worker stopped", || async {
        (chromium_processes(dir.path()) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn each_agent_has_a_profile_of_its_own_and_at_most_max_pages() {
    let chromium = support::chromium_binary();
    let (port, _) = page_server().await;
    let worker = start_worker_with(&chromium.display().to_string(), &two_agents(60), None).await;
    let cookie = format!("http://127.0.0.1:{port}/cookie");

    say_to(&worker, "a", &format!("{cookie}?from-a")).await;
    say_to(&worker, "a", &cookie).await;
    let read = say_to(&worker, "a", "read page").await;
    assert_eq!(read, "cookies: [who=from-a]", "a keeps its cookie");
    say_to(&worker, "b", &cookie).await;
    assert_eq!(
        say_to(&worker, "b", "read page").await,
        "cookies: []",
        "b does not see a's cookie"
    );

    // Two pages open; a third closes the oldest.
    let first = say_to(&worker, "b", &format!("{cookie}?tab")).await;
    assert!(!first.contains("Closed"), "{first}");
    let third = say_to(&worker, "b", &format!("http://127.0.0.1:{port}/page?tab")).await;
    assert!(
        third.contains(&format!(
            "Closed the oldest page ({cookie}) to stay within 2 open pages."
        )),
        "{third}"
    );
    worker.stop().await;
}
