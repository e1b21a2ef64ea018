//! Tools that need nothing but the worker itself.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use nexo_api::spec::BuiltinTool;
use serde_json::{Value, json};

use super::{Tool, ToolContext, ToolError};
use crate::llm::ToolDefinition;

pub(super) fn tool(builtin: BuiltinTool) -> Arc<dyn Tool> {
    match builtin {
        BuiltinTool::CurrentTime => Arc::new(CurrentTime),
    }
}

struct CurrentTime;

#[async_trait]
impl Tool for CurrentTime {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: BuiltinTool::CurrentTime.name().to_owned(),
            description: "Current date and time in UTC, RFC 3339.".to_owned(),
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    async fn call(
        &self,
        _arguments: Value,
        _context: &ToolContext<'_>,
    ) -> Result<String, ToolError> {
        Ok(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}
