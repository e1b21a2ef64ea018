//! What the OpenTelemetry GenAI semantic conventions say a tool span carries
//! (`execute_tool {name}`); model spans are made by `llm::traced`.

use tracing::Span;

use super::TARGET;

/// The span of one tool call the model asked for. Record `error.type` on it when the
/// call fails.
pub(crate) fn tool_span(name: &str, call_id: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "execute_tool",
        otel.name = %format_args!("execute_tool {name}"),
        otel.kind = "internal",
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = %name,
        gen_ai.tool.call.id = %call_id,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Marks `span` failed, with `kind` as its `error.type`.
pub(crate) fn failed(span: &Span, kind: &str) {
    span.record("error.type", kind);
    span.record("otel.status_code", "ERROR");
}
