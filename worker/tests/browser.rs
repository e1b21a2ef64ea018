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

    /// A DevTools session on the worker's chat page `/chat/web`, once it is
    /// connected.
    async fn open_chat(&self, worker: &TestWorker) -> DevTools {
        let mut page = self.page().await;
        page.call("Page.navigate", json!({"url": worker.url("/chat/web")}))
            .await;
        page.eval_until(
            "the page to connect",
            "document.getElementById('status')?.textContent === 'connected'",
        )
        .await;
        page
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
      webchat: {title: Browser test, description: "Answers questions about <b>hotels</b>."}
"#,
    )
    .await;
    let browser = Browser::launch().await;
    let mut page = browser.open_chat(&worker).await;
    assert_eq!(page.eval("document.title").await, "Browser test");
    // While the chat is empty the page says what the agent does, as text.
    assert_eq!(
        page.eval("document.getElementById('empty')?.textContent")
            .await,
        "Answers questions about <b>hotels</b>."
    );
    page.eval(
        "const input = document.getElementById('input');
         input.value = 'hello from chromium';
         document.getElementById('form').requestSubmit();",
    )
    .await;
    let answer = page
        .eval_until(
            "the agent's answer on the page",
            "[...document.querySelectorAll('.msg.agent:not(.pending):not(.streaming)')].map(e => e.textContent).join('|')",
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

/// Types `text` into the page's box and presses Enter, as a user does.
async fn type_and_press_enter(page: &mut DevTools, text: &str) {
    page.eval("document.getElementById('input').focus()").await;
    page.call("Input.insertText", json!({"text": text})).await;
    for kind in ["keyDown", "keyUp"] {
        page.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}),
        )
        .await;
    }
}

/// The model's last chunk is held back: the page must already show the first words
/// of the answer, then the whole answer once the model finished.
#[tokio::test]
async fn chat_page_shows_the_first_tokens_before_the_model_has_finished() {
    let (model, gate) =
        support::model_holding_back_its_last_chunk("Streaming starts here and ends now").await;
    let worker = TestWorker::start(&format!(
        "{}channels:
  - name: web
    spec:
      defaultAgent: writer
      webchat: {{}}
",
        support::openai_writer(&model.base_url)
    ))
    .await;
    let browser = Browser::launch().await;
    let mut page = browser.open_chat(&worker).await;
    type_and_press_enter(&mut page, "go").await;
    let partial = page
        .eval_until(
            "the first words on the page",
            "document.querySelector('.msg.agent.streaming')?.textContent",
        )
        .await;
    let partial = partial.as_str().unwrap().to_owned();
    assert!(
        "Streaming starts here and ends now".starts_with(&partial)
            && partial.len() < "Streaming starts here and ends now".len(),
        "{partial}"
    );
    gate.notify_one();
    let answer = page
        .eval_until(
            "the whole answer",
            "document.querySelector('.msg.agent.md')?.textContent",
        )
        .await;
    assert_eq!(answer, "Streaming starts here and ends now");
    assert_eq!(
        page.eval("document.querySelectorAll('.msg.agent').length")
            .await,
        1
    );
    drop(page);
    drop(browser);
    worker.stop().await;
}

/// The reply's Markdown is rendered (lists, code, web links) and nothing the model
/// wrote runs: its HTML is text and a `javascript:` link is none. Enter sends,
/// Shift+Enter makes a new line.
#[tokio::test]
async fn chat_page_renders_markdown_safely_and_takes_multi_line_input() {
    let worker = TestWorker::start(
        r#"agents:
  - name: writer
    spec:
      model:
        provider: scripted
        script:
          - reply: "**Sure**:\n\n- one\n- two\n\n`code` [docs](https://example.com/d) [x](javascript:window.hacked=1) <img src=x onerror=\"window.hacked=1\">"
channels:
  - name: web
    spec:
      defaultAgent: writer
      webchat: {}
"#,
    )
    .await;
    let browser = Browser::launch().await;
    let mut page = browser.open_chat(&worker).await;
    page.eval("document.getElementById('input').focus()").await;
    page.call("Input.insertText", json!({"text": "line one"}))
        .await;
    for kind in ["keyDown", "keyUp"] {
        page.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": 8, "text": "\r"}),
        )
        .await;
    }
    // Shift+Enter sent nothing: the text is still in the box.
    assert_eq!(
        page.eval("document.querySelectorAll('.msg.user').length")
            .await,
        0
    );
    type_and_press_enter(&mut page, "line two").await;
    let mine = page
        .eval_until(
            "the message on the page",
            "document.querySelector('.msg.user')?.textContent",
        )
        .await;
    assert_eq!(mine, "line one\nline two");

    let rendered = page
        .eval_until(
            "the rendered answer",
            "(() => { const m = document.querySelector('.msg.agent.md'); return m && {
                strong: m.querySelector('strong')?.textContent,
                items: [...m.querySelectorAll('li')].map(e => e.textContent),
                code: m.querySelector('code')?.textContent,
                links: [...m.querySelectorAll('a')].map(a => a.getAttribute('href')),
                imgs: m.querySelectorAll('img').length,
                text: m.textContent,
            }; })()",
        )
        .await;
    assert_eq!(rendered["strong"], "Sure");
    assert_eq!(rendered["items"], json!(["one", "two"]));
    assert_eq!(rendered["code"], "code");
    assert_eq!(rendered["links"], json!(["https://example.com/d"]));
    assert_eq!(rendered["imgs"], 0);
    assert!(
        rendered["text"].as_str().unwrap().contains("<img src=x"),
        "the model's HTML is shown as text: {rendered}"
    );
    assert_eq!(page.eval("window.hacked === undefined").await, true);
    drop(page);
    drop(browser);
    worker.stop().await;
}
