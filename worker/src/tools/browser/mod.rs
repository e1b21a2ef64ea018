//! The browser tools (`browser_navigate`, `browser_read`, `browser_click`,
//! `browser_fill`, `browser_screenshot`) of an agent with a `browser` spec: headless
//! Chromium over the DevTools protocol (`docs/browser.md`). The tools act on the
//! agent's current page (its newest); every action is bounded by the spec's
//! `actionTimeoutSeconds`, and every request a page makes by its `allowDomains`.

mod allow;
mod chromium;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::page::ScreenshotParams;
use nexo_api::ResourceKey;
use nexo_api::spec::{AgentSpec, BROWSER_TOOLS, BrowserSpec};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

pub(crate) use chromium::Browsers;
use chromium::Session;

use super::{Tool, ToolAnnotations, ToolContext, ToolError, ToolSource};
use crate::llm::ToolDefinition;

/// Bytes of page text `browser_read` returns at most (further bounded by the agent's
/// `toolOutputBytes`): a long article, a small part of a model's context.
const READ_TEXT_BYTES: usize = 32 * 1024;
/// Room left in `toolOutputBytes` for the lines around the text of a read.
const RESULT_HEADROOM: usize = 512;
/// Characters `browser_fill` types at most: a form field, not a document (each one is
/// a key event, so this also bounds the action's time).
const FILL_CHARS: usize = 4096;
/// Characters of a CSS selector or URL taken from the model.
const ARGUMENT_CHARS: usize = 2048;
/// Screenshots kept per agent; each new one beyond removes the oldest, so a model
/// that keeps taking them cannot fill the disk.
const SCREENSHOTS_KEPT: usize = 20;

/// Reading and screenshots change nothing on the page or elsewhere.
const READ_ONLY: ToolAnnotations = ToolAnnotations {
    read_only_hint: Some(true),
    destructive_hint: None,
    idempotent_hint: None,
    open_world_hint: None,
};

/// The browser tools of `agent`, if its spec has a `browser`; they share
/// `browsers`, the worker's Chromium.
pub(crate) fn browser_tools(
    browsers: &Arc<Browsers>,
    agent: &ResourceKey,
    spec: &AgentSpec,
) -> Option<Arc<dyn ToolSource>> {
    let browser = spec.browser.clone()?;
    let output_bytes = spec.limits.tool_output_bytes as usize;
    let agent = Arc::new(AgentBrowser {
        browsers: browsers.clone(),
        screenshots: browsers.screenshot_dir(agent),
        key: agent.clone(),
        timeout: Duration::from_secs(browser.action_timeout_seconds.max(1)),
        read_bytes: READ_TEXT_BYTES.min(output_bytes.saturating_sub(RESULT_HEADROOM).max(1)),
        spec: browser,
    });
    let tools: Vec<Arc<dyn Tool>> = vec![
        Arc::new(Navigate(agent.clone())),
        Arc::new(Read(agent.clone())),
        Arc::new(Click(agent.clone())),
        Arc::new(Fill(agent.clone())),
        Arc::new(Screenshot(agent)),
    ];
    Some(Arc::new(BrowserTools(tools)))
}

/// The browser tools as a [`ToolSource`]: a fixed list, added next to the agent's
/// own tools the way an extension's are.
struct BrowserTools(Vec<Arc<dyn Tool>>);

impl ToolSource for BrowserTools {
    fn tools(&self) -> Vec<Arc<dyn Tool>> {
        self.0.clone()
    }
}

/// What every browser tool of one agent works with.
struct AgentBrowser {
    browsers: Arc<Browsers>,
    key: ResourceKey,
    spec: BrowserSpec,
    timeout: Duration,
    read_bytes: usize,
    screenshots: PathBuf,
}

impl AgentBrowser {
    /// Runs `action` on the agent's pages within the action timeout, in a span
    /// naming the agent and the tool.
    async fn act<F>(&self, tool: &'static str, action: F) -> Result<String, ToolError>
    where
        F: AsyncFnOnce(&mut Session) -> Result<String, ToolError>,
    {
        let span = tracing::info_span!("browser", agent = %self.key, tool);
        let run = async {
            let mut session = self
                .browsers
                .session(&self.key, &self.spec)
                .await
                .map_err(failed)?;
            action(&mut session).await
        };
        match tokio::time::timeout(self.timeout, run.instrument(span.clone())).await {
            Ok(result) => {
                if let Err(err) = &result {
                    span.in_scope(|| tracing::debug!(error = %err, "browser action failed"));
                }
                result
            }
            Err(_) => Err(ToolError::Failed(format!(
                "the browser action did not finish within {:?} (browser.actionTimeoutSeconds)",
                self.timeout
            ))),
        }
    }
}

fn failed(err: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(err.to_string())
}

fn arguments<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, ToolError> {
    serde_json::from_value(value).map_err(|e| ToolError::InvalidArguments(e.to_string()))
}

/// `value`, refused if longer than `max` characters.
fn bounded<'a>(what: &str, value: &'a str, max: usize) -> Result<&'a str, ToolError> {
    if value.chars().count() > max {
        return Err(ToolError::InvalidArguments(format!(
            "`{what}` is longer than {max} characters"
        )));
    }
    Ok(value)
}

/// The page the tools act on, or the error saying to navigate first.
fn current(session: &Session) -> Result<&chromium::AgentPage, ToolError> {
    session
        .current()
        .ok_or_else(|| ToolError::Failed("no page is open: call browser_navigate first".to_owned()))
}

/// The first element of `page` matching `selector`.
async fn find(
    page: &chromiumoxide::Page,
    selector: &str,
) -> Result<chromiumoxide::Element, ToolError> {
    page.find_element(selector)
        .await
        .map_err(|e| ToolError::Failed(format!("no element matches `{selector}`: {e}")))
}

/// `Title: …` and `URL: …` of `page`.
async fn where_now(page: &chromiumoxide::Page) -> Result<String, ToolError> {
    let title = page.get_title().await.map_err(failed)?.unwrap_or_default();
    let url = page.url().await.map_err(failed)?.unwrap_or_default();
    Ok(format!("Title: {title}\nURL: {url}"))
}

struct Navigate(Arc<AgentBrowser>);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NavigateArgs {
    url: String,
    #[serde(default)]
    new_page: bool,
}

#[async_trait]
impl Tool for Navigate {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BROWSER_TOOLS[0].to_owned(),
            description: format!(
                "Load a web page (http or https, on an allowed host) in the browser and return its title and final URL. Loads into the current page unless newPage is true; at most {} pages stay open (a new one beyond closes the oldest).",
                self.0.spec.max_pages
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "Absolute http(s) URL."},
                    "newPage": {"type": "boolean", "description": "Open it in a new page (tab) instead of the current one."}
                },
                "required": ["url"]
            }),
        }
    }

    async fn call(&self, arguments_: Value, _: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: NavigateArgs = arguments(arguments_)?;
        let url = bounded("url", args.url.trim(), ARGUMENT_CHARS)?.to_owned();
        self.0
            .act("browser_navigate", async |session| {
                // Refused before anything is loaded: the host hears nothing.
                session.allow().check(&url).map_err(|refusal| {
                    ToolError::Failed(format!("refused to load {url}: {refusal}"))
                })?;
                let (page, opened) = session
                    .page_for_navigation(args.new_page)
                    .await
                    .map_err(failed)?;
                page.refused.lock().unwrap().clear();
                let loaded = page.page.goto(url.as_str()).await;
                let refused = page.refused.lock().unwrap().summary();
                if let Err(err) = loaded {
                    let mut message = format!("could not load {url}: {err}");
                    if let Some(refused) = refused {
                        message.push_str(&format!(
                            " ({refused}; a redirect to one of them fails the load)"
                        ));
                    }
                    return Err(ToolError::Failed(message));
                }
                let mut result = where_now(&page.page).await?;
                if let Some(refused) = refused {
                    result.push('\n');
                    result.push_str(&refused);
                }
                if let Some(closed) = opened.closed {
                    result.push_str(&format!(
                        "\nClosed the oldest page ({closed}) to stay within {} open pages.",
                        self.0.spec.max_pages
                    ));
                }
                Ok(result)
            })
            .await
    }

    fn annotations(&self) -> ToolAnnotations {
        ToolAnnotations {
            open_world_hint: Some(true),
            ..READ_ONLY
        }
    }
}

struct Read(Arc<AgentBrowser>);

#[derive(Deserialize)]
struct ReadArgs {
    #[serde(default)]
    selector: Option<String>,
}

/// What the page script of `browser_read` returns.
#[derive(Deserialize)]
struct PageText {
    text: String,
    /// Length of the whole text, in UTF-16 units.
    total: u64,
}

#[async_trait]
impl Tool for Read {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BROWSER_TOOLS[1].to_owned(),
            description: format!(
                "The visible text of the current page, or of the first element matching a CSS selector; at most {} bytes (longer text is cut, and says so).",
                self.0.read_bytes
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "selector": {"type": "string", "description": "CSS selector of the element to read; the whole page if absent."}
                }
            }),
        }
    }

    async fn call(&self, arguments_: Value, _: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: ReadArgs = arguments(arguments_)?;
        let selector = match &args.selector {
            Some(s) if !s.trim().is_empty() => Some(bounded("selector", s, ARGUMENT_CHARS)?),
            _ => None,
        };
        let limit = self.0.read_bytes;
        self.0
            .act("browser_read", async |session| {
                let page = &current(session)?.page;
                // Cut in the page, so a huge page never crosses the DevTools
                // connection whole; UTF-16 units are at most 3 bytes of UTF-8 each.
                let script = format!(
                    "(() => {{ const sel = {}; const el = sel === null ? document.body : document.querySelector(sel); if (!el) return null; const t = el.innerText ?? el.textContent ?? ''; return {{ text: t.slice(0, {}), total: t.length }}; }})()",
                    serde_json::to_string(&selector).expect("a string serializes"),
                    limit
                );
                let value: Option<PageText> = page
                    .evaluate(script)
                    .await
                    .map_err(failed)?
                    .into_value()
                    .map_err(failed)?;
                let Some(PageText { mut text, total }) = value else {
                    return Err(ToolError::Failed(format!(
                        "no element matches `{}`",
                        selector.unwrap_or_default()
                    )));
                };
                let mut cut = (text.encode_utf16().count() as u64) < total;
                if text.len() > limit {
                    let mut end = limit;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    cut = true;
                }
                if cut {
                    text.push_str(&format!(
                        "\n[cut at {limit} bytes; read a smaller part with a selector]"
                    ));
                }
                Ok(text)
            })
            .await
    }

    fn annotations(&self) -> ToolAnnotations {
        READ_ONLY
    }
}

struct Click(Arc<AgentBrowser>);

#[derive(Deserialize)]
struct ClickArgs {
    selector: String,
}

#[async_trait]
impl Tool for Click {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BROWSER_TOOLS[2].to_owned(),
            description: "Click the first element of the current page matching a CSS selector; waits for a page load the click starts. Returns the page's title and URL after it.".to_owned(),
            parameters: json!({
                "type": "object",
                "properties": {"selector": {"type": "string", "description": "CSS selector of the element."}},
                "required": ["selector"]
            }),
        }
    }

    async fn call(&self, arguments_: Value, _: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: ClickArgs = arguments(arguments_)?;
        let selector = bounded("selector", &args.selector, ARGUMENT_CHARS)?;
        self.0
            .act("browser_click", async |session| {
                let page = current(session)?;
                page.refused.lock().unwrap().clear();
                let element = find(&page.page, selector).await?;
                element.click().await.map_err(failed)?;
                // Resolves at once unless the click started a load.
                page.page.wait_for_navigation().await.map_err(failed)?;
                let mut result = format!("Clicked `{selector}`.\n{}", where_now(&page.page).await?);
                if let Some(refused) = page.refused.lock().unwrap().summary() {
                    result.push('\n');
                    result.push_str(&refused);
                }
                Ok(result)
            })
            .await
    }
}

struct Fill(Arc<AgentBrowser>);

#[derive(Deserialize)]
struct FillArgs {
    selector: String,
    text: String,
}

#[async_trait]
impl Tool for Fill {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BROWSER_TOOLS[3].to_owned(),
            description: format!(
                "Replace the value of the input or text area of the current page matching a CSS selector by typing text (at most {FILL_CHARS} characters) into it."
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "selector": {"type": "string", "description": "CSS selector of the field."},
                    "text": {"type": "string", "description": "What to type."}
                },
                "required": ["selector", "text"]
            }),
        }
    }

    async fn call(&self, arguments_: Value, _: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: FillArgs = arguments(arguments_)?;
        let selector = bounded("selector", &args.selector, ARGUMENT_CHARS)?;
        let text = bounded("text", &args.text, FILL_CHARS)?;
        self.0
            .act("browser_fill", async |session| {
                let page = &current(session)?.page;
                let element = find(page, selector).await?;
                // Typed, not assigned, so the page's own input handlers run; what the
                // field held is selected first so the typing replaces it.
                element
                    .call_js_fn(
                        "function() { this.focus(); if (typeof this.select === 'function') this.select(); }",
                        false,
                    )
                    .await
                    .map_err(failed)?;
                element.type_str(text).await.map_err(failed)?;
                Ok(format!(
                    "Typed {} characters into `{selector}`.",
                    text.chars().count()
                ))
            })
            .await
    }
}

struct Screenshot(Arc<AgentBrowser>);

#[async_trait]
impl Tool for Screenshot {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BROWSER_TOOLS[4].to_owned(),
            description: "Take a PNG screenshot of the visible part of the current page. The image is saved on the worker for the operator (the model does not see it); returns where, its size and the page's title and URL.".to_owned(),
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    async fn call(&self, _: Value, _: &ToolContext<'_>) -> Result<String, ToolError> {
        let dir = self.0.screenshots.clone();
        self.0
            .act("browser_screenshot", async |session| {
                let page = &current(session)?.page;
                let png = page
                    .screenshot(
                        ScreenshotParams::builder()
                            .format(CaptureScreenshotFormat::Png)
                            .build(),
                    )
                    .await
                    .map_err(failed)?;
                let file = save_screenshot(&dir, &png).await.map_err(|e| {
                    ToolError::Failed(format!(
                        "cannot save the screenshot in {}: {e}",
                        dir.display()
                    ))
                })?;
                let size = png_size(&png)
                    .map(|(w, h)| format!("{w}x{h} pixels, "))
                    .unwrap_or_default();
                Ok(format!(
                    "Saved a PNG screenshot ({size}{} bytes) to {}.\n{}",
                    png.len(),
                    file.display(),
                    where_now(page).await?
                ))
            })
            .await
    }

    fn annotations(&self) -> ToolAnnotations {
        READ_ONLY
    }
}

/// Writes `png` into `dir` under a name that sorts by time, keeping the newest
/// [`SCREENSHOTS_KEPT`].
async fn save_screenshot(dir: &Path, png: &[u8]) -> std::io::Result<PathBuf> {
    tokio::fs::create_dir_all(dir).await?;
    let name = format!(
        "{}-{}.png",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let file = dir.join(name);
    tokio::fs::write(&file, png).await?;
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".png") {
            names.push(name);
        }
    }
    names.sort();
    let excess = names.len().saturating_sub(SCREENSHOTS_KEPT);
    for old in &names[..excess] {
        let _ = tokio::fs::remove_file(dir.join(old)).await;
    }
    Ok(file)
}

/// Width and height from a PNG's header (`IHDR`, the first chunk).
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    let header = png.get(12..24)?;
    if &header[..4] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(header[4..8].try_into().ok()?);
    let height = u32::from_be_bytes(header[8..12].try_into().ok()?);
    Some((width, height))
}
