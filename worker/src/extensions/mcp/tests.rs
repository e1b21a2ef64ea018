use std::sync::Arc;

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
    assert_eq!(remote_tool(tool(&"n".repeat(MAX_TOOL_NAME_BYTES + 1))), None);
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
struct Paged {
    tools: usize,
    per_page: usize,
    endless: bool,
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
        let start: usize = request
            .and_then(|r| r.cursor)
            .map_or(0, |c| c.parse().unwrap());
        let end = (start + self.per_page).min(self.tools);
        let mut page = ListToolsResult::default();
        page.tools = (start..end).map(|i| tool(&format!("t{i}"))).collect();
        page.next_cursor = (self.endless || end < self.tools).then(|| end.to_string());
        Ok(page)
    }
}

async fn listed(server: Paged) -> Vec<RemoteTool> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { server.serve(server_io).await.unwrap().waiting().await });
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
        endless: false,
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
        endless: false,
    })
    .await;
    assert_eq!(tools.len(), MAX_TOOLS);
}

#[tokio::test]
async fn endless_cursors_are_followed_only_up_to_the_page_bound() {
    let tools = listed(Paged {
        tools: 0,
        per_page: 1,
        endless: true,
    })
    .await;
    assert!(tools.is_empty());
}
