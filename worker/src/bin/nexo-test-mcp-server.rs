//! An MCP server over stdio for the worker's tests (tests/mcp_extensions.rs); not
//! part of a release. Tools:
//! - `echo {text}`: answers `echo: <text>`;
//! - `pid`: the process id;
//! - `env`: the process's whole environment, as a JSON object;
//! - `fail`: an error result (`isError`);
//! - `hang`: never answers; first creates `hanging` in `NEXO_TEST_MCP_DIR`.
//!
//! At start it writes its pid to `NEXO_TEST_MCP_DIR/pid` (when that is set) and a
//! line to stderr.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

/// Folder where the server leaves its pid and the `hanging` marker.
const DIR_ENV: &str = "NEXO_TEST_MCP_DIR";

struct TestServer;

fn tool(name: &'static str, description: &'static str, schema: Value) -> Tool {
    let Value::Object(schema) = schema else {
        unreachable!("schemas are objects")
    };
    Tool::new(name, description, Arc::new(schema))
}

fn no_arguments() -> Value {
    json!({"type": "object", "properties": {}})
}

fn text(text: impl Into<String>) -> Result<CallToolResponse, ErrorData> {
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
}

impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let echo = tool(
            "echo",
            "Answers with the text it is given.",
            json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
        )
        .with_annotations(ToolAnnotations::new().read_only(true).open_world(false));
        Ok(ListToolsResult {
            tools: vec![
                echo,
                tool("pid", "The server's process id.", no_arguments()),
                tool("env", "The server's environment.", no_arguments()),
                tool("fail", "Always fails.", no_arguments()),
                tool("hang", "Never answers.", no_arguments()),
            ],
            ..Default::default()
        })
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = request.arguments.unwrap_or_default();
        match request.name.as_ref() {
            "echo" => text(format!(
                "echo: {}",
                arguments.get("text").and_then(Value::as_str).unwrap_or("")
            )),
            "pid" => text(std::process::id().to_string()),
            "env" => {
                let env: serde_json::Map<String, Value> = std::env::vars()
                    .map(|(name, value)| (name, Value::String(value)))
                    .collect();
                text(Value::Object(env).to_string())
            }
            "fail" => {
                Ok(CallToolResult::error(vec![ContentBlock::text("it failed on purpose")]).into())
            }
            "hang" => {
                if let Some(dir) = std::env::var_os(DIR_ENV) {
                    let _ = std::fs::write(std::path::Path::new(&dir).join("hanging"), "");
                }
                std::future::pending().await
            }
            other => Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        // Written beside, then renamed: a reader never sees half a pid.
        let dir = std::path::Path::new(&dir);
        std::fs::write(dir.join("pid.new"), std::process::id().to_string())?;
        std::fs::rename(dir.join("pid.new"), dir.join("pid"))?;
    }
    eprintln!("test MCP server {} started", std::process::id());
    // Ends when stdin closes: the client went away.
    TestServer
        .serve(rmcp::transport::stdio())
        .await?
        .waiting()
        .await?;
    Ok(())
}
