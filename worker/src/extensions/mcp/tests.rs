use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rmcp::model::{
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

use super::*;

fn tool(name: &str) -> Tool {
    Tool::new(
        name.to_owned(),
        "does a thing",
        Arc::new(json!({"type": "object"}).as_object().unwrap().clone()),
    )
}

#[test]
fn annotations_and_schema_are_kept() {
    let mut t = tool("lookup");
    t.annotations = Some(
        rmcp::model::ToolAnnotations::new()
            .read_only(true)
            .destructive(false)
            .idempotent(true)
            .open_world(false),
    );
    let remote = remote_tool(t).unwrap();
    assert_eq!(remote.name, "lookup");
    assert_eq!(remote.description, "does a thing");
    assert_eq!(remote.input_schema, json!({"type": "object"}));
    assert_eq!(
        remote.annotations,
        ToolAnnotations {
            read_only_hint: Some(true),
            destructive_hint: Some(false),
            idempotent_hint: Some(true),
            open_world_hint: Some(false),
        }
    );
    assert_eq!(
        remote_tool(tool("plain")).unwrap().annotations,
        ToolAnnotations::default()
    );
}

#[test]
fn a_long_description_is_cut_and_tools_out_of_bounds_are_left_out() {
    let mut long = tool("long");
    long.description = Some("é".repeat(MAX_DESCRIPTION_BYTES).into());
    let description = remote_tool(long).unwrap().description;
    assert!(description.len() <= MAX_DESCRIPTION_BYTES + '…'.len_utf8());
    assert!(description.ends_with('…'));

    let mut huge_schema = tool("huge");
    huge_schema.input_schema = Arc::new(
        json!({"type": "object", "description": "x".repeat(MAX_SCHEMA_BYTES)})
            .as_object()
            .unwrap()
            .clone(),
    );
    assert_eq!(remote_tool(huge_schema), None);
    assert_eq!(
        remote_tool(tool(&"n".repeat(MAX_TOOL_NAME_BYTES + 1))),
        None
    );
    assert_eq!(remote_tool(tool("")), None);
}

fn result(content: Vec<ContentBlock>, is_error: bool) -> CallToolResult {
    if is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

#[test]
fn text_is_joined_and_other_content_described() {
    let text = call_result(result(
        vec![
            ContentBlock::text("first"),
            ContentBlock::image("aGVsbG8=", "image/png"),
            ContentBlock::text("second"),
            ContentBlock::embedded_text("file:///notes.txt", "noted"),
        ],
        false,
    ))
    .unwrap();
    assert_eq!(
        text,
        "first\n[image image/png, 5 bytes]\nsecond\n[resource file:///notes.txt]\nnoted"
    );
}

#[test]
fn an_error_result_is_a_tool_error_with_its_text() {
    match call_result(result(vec![ContentBlock::text("no such city")], true)) {
        Err(ToolError::Failed(text)) => assert_eq!(text, "no such city"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn structured_content_stands_in_for_missing_content() {
    let mut r = result(Vec::new(), false);
    r.structured_content = Some(json!({"temperature": 21}));
    assert_eq!(call_result(r).unwrap(), r#"{"temperature":21}"#);
}

#[test]
fn base64_sizes() {
    assert_eq!(base64_bytes(""), 0);
    assert_eq!(base64_bytes("aGVsbG8="), 5);
    assert_eq!(base64_bytes("aGVsbG8h"), 6);
    assert_eq!(base64_bytes("aGVsbA=="), 4);
}

/// Hands out its tools `per_page` at a time; `endless` keeps giving cursors.
#[derive(Default)]
struct Paged {
    tools: usize,
    per_page: usize,
    endless: bool,
    /// Pages asked for.
    pages: Arc<AtomicUsize>,
}

impl ServerHandler for Paged {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.pages.fetch_add(1, Ordering::SeqCst);
        let start: usize = request
            .and_then(|r| r.cursor)
            .map_or(0, |c| c.parse().unwrap());
        let end = (start + self.per_page).min(self.tools);
        Ok(ListToolsResult {
            tools: (start..end).map(|i| tool(&format!("t{i}"))).collect(),
            next_cursor: (self.endless || end < self.tools).then(|| end.to_string()),
            ..Default::default()
        })
    }
}

async fn listed(server: Paged) -> Vec<RemoteTool> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let server =
        tokio::spawn(async move { server.serve(server_io).await.unwrap().waiting().await });
    let client = ().serve(client_io).await.unwrap();
    let tools = list_tools(client.peer()).await.unwrap();
    drop(client);
    server.abort();
    tools
}

#[tokio::test]
async fn every_page_is_listed() {
    let tools = listed(Paged {
        tools: 25,
        per_page: 10,
        ..Paged::default()
    })
    .await;
    assert_eq!(tools.len(), 25);
    assert_eq!(tools[24].name, "t24");
}

#[tokio::test]
async fn the_listing_stops_at_the_tool_bound() {
    let tools = listed(Paged {
        tools: MAX_TOOLS + 500,
        per_page: 300,
        ..Paged::default()
    })
    .await;
    assert_eq!(tools.len(), MAX_TOOLS);
}

#[tokio::test]
async fn endless_cursors_are_followed_only_up_to_the_page_bound() {
    let pages = Arc::new(AtomicUsize::new(0));
    let tools = listed(Paged {
        per_page: 1,
        endless: true,
        pages: pages.clone(),
        ..Paged::default()
    })
    .await;
    assert!(tools.is_empty());
    assert_eq!(pages.load(Ordering::SeqCst), MAX_LIST_PAGES);
}

/// Whether process `pid` is gone (or a zombie: it ran its course, only its parent
/// has not collected it yet).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn closing_kills_the_server_s_process_group_even_when_it_ignores_its_stdin() {
    let dir = std::env::temp_dir().join(format!("nexo-mcp-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // Never answers `initialize`, ignores stdin closing, and leaves a child of its own.
    let script = format!(
        "sleep 300 & echo $! > {dir}/child.new; mv {dir}/child.new {dir}/child; echo $$ > {dir}/pid.new; mv {dir}/pid.new {dir}/pid; wait",
        dir = dir.display()
    );
    let spec = StdioExtension {
        command: "sh".to_owned(),
        args: vec!["-c".to_owned(), script],
        env: Vec::new(),
        image: None,
    };
    let stop = CancellationToken::new();
    let key = ResourceKey::new("default", "stubborn");
    let opener = stdio::Stdio::new(key.to_string(), spec, crate::secrets::Secrets::new(&dir));
    let _connection = McpConnection::start(&key, opener, "lost", stop.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (server, child) = loop {
        if let (Some(server), Some(child)) = (read("pid"), read("child")) {
            break (server.trim().to_owned(), child.trim().to_owned());
        }
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!gone(&server) && !gone(&child));

    stop.cancel();
    while !(gone(&server) && gone(&child)) {
        assert!(
            Instant::now() < deadline,
            "the server's group is still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_server_that_exits_at_start_is_reported_with_its_exit_status() {
    let spec = StdioExtension {
        command: "sh".to_owned(),
        args: vec!["-c".to_owned(), "echo 'no config' >&2; exit 3".to_owned()],
        env: Vec::new(),
        image: None,
    };
    let stop = CancellationToken::new();
    let key = ResourceKey::new("default", "broken");
    let opener = stdio::Stdio::new(key.to_string(), spec, crate::secrets::Secrets::new("/"));
    let connection = McpConnection::start(&key, opener, "lost", stop.clone());
    let mut listing = connection.listing();
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        listing.wait_for(|l| matches!(l, Listing::Failed(_))),
    )
    .await
    .expect("the failure is reported")
    .unwrap()
    .clone();
    assert_eq!(
        failed,
        Listing::Failed("the process exited (exit status: 3)".to_owned())
    );
    stop.cancel();
}
