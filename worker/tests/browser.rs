//! The web chat page in a real headless Chromium, driven over the DevTools protocol:
//! the page connects, a typed message is sent, and the agent's answer is shown.
//!
//! Needs Chromium: `NEXO_CHROMIUM` or `chromium` on the PATH (`scripts/test.sh`
//! installs it).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{TempDir, TestWorker, wait_for};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: TempDir,
    port: u16,
}

impl Browser {
    async fn launch() -> Self {
        let profile = TempDir::new();
        let child = Command::new(support::chromium_binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Chromium starts");
        // Chromium writes the port it picked into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = wait_for("Chromium's DevTools port", || {
            let text = std::fs::read_to_string(&port_file).ok();
            async move { text?.lines().next()?.parse::<u16>().ok() }
        })
        .await;
        Self {
            child,
            _profile: profile,
            port,
        }
    }

    /// A DevTools session on the browser's first page.
    async fn page(&self) -> DevTools {
        let list_url = format!("http://127.0.0.1:{}/json/list", self.port);
        let client = support::http_client();
        let socket_url = wait_for("a page target", || {
            let request = client.get(&list_url).send();
            async move {
                let targets: Vec<Value> = request.await.ok()?.json().await.ok()?;
                targets
                    .into_iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            }
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(socket_url)
            .await
            .expect("DevTools socket");
        DevTools { socket, next_id: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct DevTools {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl DevTools {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let frame = tokio::time::timeout(support::DEADLINE, self.socket.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools socket open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let message: Value = serde_json::from_str(&text).unwrap();
            // Events have no id; skip them.
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method} failed: {message}");
                return message["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it returns a truthy value.
    async fn eval_until(&mut self, what: &str, expression: &str) -> Value {
        let deadline = tokio::time::Instant::now() + support::DEADLINE;
        loop {
            let value = self.eval(expression).await;
            if !(value.is_null() || value == false || value == "") {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn chat_page_talks_to_the_agent_in_chromium() {
    let worker = TestWorker::start(
        r#"agents:
  - name: concierge
    spec:
      model:
        provider: scripted
        script:
          - reply: "concierge heard: {{input}}"
channels:
  - name: web
    spec:
      defaultAgent: concierge
      webchat: {title: Browser test}
"#,
    )
    .await;
    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.call("Page.navigate", json!({"url": worker.url("/chat/web")}))
        .await;

    page.eval_until(
        "the page to connect",
        "document.getElementById('status')?.textContent === 'connected'",
    )
    .await;
    assert_eq!(page.eval("document.title").await, "Browser test");
    page.eval(
        "const input = document.getElementById('input');
         input.value = 'hello from chromium';
         document.getElementById('form').requestSubmit();",
    )
    .await;
    let answer = page
        .eval_until(
            "the agent's answer on the page",
            "[...document.querySelectorAll('.msg.agent:not(.pending)')].map(e => e.textContent).join('|')",
        )
        .await;
    assert_eq!(answer, "concierge heard: hello from chromium");
    let mine = page
        .eval("[...document.querySelectorAll('.msg.user')].map(e => e.textContent).join('|')")
        .await;
    assert_eq!(mine, "hello from chromium");
    assert_eq!(
        page.eval("document.querySelectorAll('.pending').length")
            .await,
        0
    );

    // The page keeps the id the server issued; a second socket with it takes the
    // conversation over, and the page says so instead of reconnecting.
    let conversation = page
        .eval("localStorage.getItem('nexo.conversation./v1/channels/web/ws')")
        .await;
    let conversation = conversation.as_str().unwrap().to_owned();
    assert!(
        conversation.len() == 32 && conversation.bytes().all(|b| b.is_ascii_hexdigit()),
        "{conversation}"
    );
    let (_other, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/channels/web/ws?conversation={conversation}",
        worker.addr
    ))
    .await
    .unwrap();
    page.eval_until(
        "the page to say another window has the conversation",
        "document.getElementById('status')?.textContent.startsWith('opened in another window')",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('input').disabled").await,
        true
    );

    drop(page);
    drop(browser);
    worker.stop().await;
}
