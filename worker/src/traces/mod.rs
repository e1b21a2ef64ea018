//! Distributed traces: one trace per user message, from the channel that received it
//! through the router, the agent's turn, its model and tool calls, to the reply the
//! channel delivers, across workers (docs/tracing.md).
//!
//! Spans are `tracing` spans with target [`TARGET`]; only those reach OpenTelemetry
//! (the other spans of the worker are for its logs). [`export`] sends them over
//! OTLP/HTTP when an endpoint is configured, [`context`] carries a span's context
//! through the broker inside the envelope, [`genai`] names what the GenAI semantic
//! conventions say model and tool spans carry.

pub(crate) mod context;
pub(crate) mod export;
pub(crate) mod genai;

/// The `tracing` target of the spans that become OpenTelemetry spans.
pub(crate) const TARGET: &str = "nexo::trace";
