//! A span's context through the broker: written into the envelope's `trace` map
//! (W3C `traceparent` / `tracestate`) where a message is sent, read back where it is
//! consumed, so the spans of one user message form one trace across workers.

use std::collections::BTreeMap;

use bytes::Bytes;
use nexo_api::Envelope;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde_json::Value;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TARGET;

/// The envelope's field holding the context (see `Envelope::trace`).
const FIELD: &str = "trace";

struct Carrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Fields<'a>(&'a BTreeMap<String, String>);

impl Extractor for Fields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the context of `span` into `trace`, in place of the one it came with.
/// Nothing is written when the span is not recorded (traces are off).
fn inject(span: &Span, trace: &mut BTreeMap<String, String>) {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return;
    }
    trace.clear();
    TraceContextPropagator::new().inject_context(&context, &mut Carrier(trace));
}

/// Makes the context in `trace` the parent of `span` (a span not started yet). A
/// missing or unreadable context leaves `span` where it is: a root, or the child of
/// the current span.
fn adopt(span: &Span, trace: &BTreeMap<String, String>) {
    let parent = TraceContextPropagator::new().extract(&Fields(trace));
    if parent.span().span_context().is_valid() {
        // Fails only when traces are off: nothing to parent then.
        let _ = span.set_parent(parent);
    }
}

/// The producer span of sending `envelope` on `subject`, its context written into the
/// envelope. Instrument the publish with it.
pub(crate) fn send(subject: &str, envelope: &mut Envelope) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "send",
        otel.name = %format_args!("send {subject}"),
        otel.kind = "producer",
        messaging.operation.type = "send",
        messaging.destination.name = %subject,
        messaging.message.id = %envelope.id,
    );
    inject(&span, &mut envelope.trace);
    span
}

/// The consumer span of processing `envelope` that came on `subject`: a child of the
/// span that sent it.
pub(crate) fn process(subject: &str, envelope: &Envelope) -> Span {
    process_message(subject, Some(envelope.id), &envelope.trace)
}

/// [`process`] for a payload handed on without being read as an envelope (the
/// router's): its `id` and `trace` are read, nothing else.
pub(crate) fn process_payload(subject: &str, payload: &[u8]) -> Span {
    #[derive(Default, serde::Deserialize)]
    struct Carried {
        #[serde(default)]
        id: Option<uuid::Uuid>,
        #[serde(default)]
        trace: BTreeMap<String, String>,
    }
    let carried: Carried = serde_json::from_slice(payload).unwrap_or_default();
    process_message(subject, carried.id, &carried.trace)
}

fn process_message(
    subject: &str,
    id: Option<uuid::Uuid>,
    trace: &BTreeMap<String, String>,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = %format_args!("process {subject}"),
        otel.kind = "consumer",
        messaging.operation.type = "process",
        messaging.destination.name = %subject,
        messaging.message.id = tracing::field::Empty,
    );
    if let Some(id) = id {
        span.record("messaging.message.id", tracing::field::display(id));
    }
    adopt(&span, trace);
    span
}

/// Makes the context `envelope` carries the parent of `span`, for a consumer with a
/// span of its own (an agent's turn).
pub(crate) fn continue_in(span: &Span, envelope: &Envelope) {
    adopt(span, &envelope.trace);
}

/// The payload of a message handed on unchanged but for its trace context: the
/// context of `span` in place of the sender's. The JSON is edited as a value, not
/// read into an [`Envelope`], so fields of a newer release pass through. Returns
/// `payload` itself when traces are off or it is not a JSON object.
pub(crate) fn relay(span: &Span, payload: &Bytes) -> Bytes {
    let mut trace = BTreeMap::new();
    inject(span, &mut trace);
    if trace.is_empty() {
        return payload.clone();
    }
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(payload) else {
        return payload.clone();
    };
    let trace = trace
        .into_iter()
        .map(|(key, value)| (key, Value::String(value)))
        .collect();
    fields.insert(FIELD.to_owned(), Value::Object(trace));
    Bytes::from(serde_json::to_vec(&fields).expect("a JSON object serialises"))
}
