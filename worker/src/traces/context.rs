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
    let span = messaging_span(Operation::Send, subject, Some(envelope.id));
    inject(&span, &mut envelope.trace);
    span
}

/// The consumer span of processing `envelope` that came on `subject`: a child of the
/// span that sent it.
pub(crate) fn process(subject: &str, envelope: &Envelope) -> Span {
    let span = messaging_span(Operation::Process, subject, Some(envelope.id));
    adopt(&span, &envelope.trace);
    span
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
    let span = messaging_span(Operation::Process, subject, carried.id);
    adopt(&span, &carried.trace);
    span
}

/// What a messaging span does, as the messaging conventions name it.
#[derive(Clone, Copy)]
enum Operation {
    Send,
    Process,
}

/// `send {subject}` (producer) or `process {subject}` (consumer).
fn messaging_span(operation: Operation, subject: &str, id: Option<uuid::Uuid>) -> Span {
    let (name, kind) = match operation {
        Operation::Send => ("send", "producer"),
        Operation::Process => ("process", "consumer"),
    };
    let span = tracing::info_span!(
        target: TARGET,
        "message",
        otel.name = %format_args!("{name} {subject}"),
        otel.kind = kind,
        messaging.operation.type = name,
        messaging.destination.name = %subject,
        messaging.message.id = tracing::field::Empty,
    );
    if let Some(id) = id {
        span.record("messaging.message.id", tracing::field::display(id));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use serde_json::json;
    use tracing_subscriber::layer::SubscriberExt;

    /// Runs `f` with spans of [`TARGET`] recorded (no exporter: only ids are made).
    fn traced<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f)
    }

    fn traceparent(envelope: &Envelope) -> &str {
        envelope
            .trace
            .get("traceparent")
            .map(String::as_str)
            .unwrap()
    }

    #[test]
    fn a_consumer_span_continues_the_trace_of_the_sender() {
        traced(|| {
            let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
            let sent = send("plugin.inbound.webhook.default.api", &mut envelope);
            let sender = sent.context().span().span_context().clone();
            // `00-<trace id>-<span id>-01`
            assert_eq!(
                traceparent(&envelope),
                format!("00-{}-{}-01", sender.trace_id(), sender.span_id())
            );
            let received = Envelope::from_json(&envelope.to_json()).unwrap();
            let processed = process("plugin.inbound.webhook.default.api", &received);
            let consumer = processed.context().span().span_context().clone();
            assert_eq!(consumer.trace_id(), sender.trace_id());
            assert_ne!(consumer.span_id(), sender.span_id());
        });
    }

    #[test]
    fn relaying_replaces_the_context_and_keeps_fields_this_release_does_not_know() {
        traced(|| {
            let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
            let _sent = send("in", &mut envelope);
            let mut value: Value = serde_json::from_slice(&envelope.to_json()).unwrap();
            value["attachments"] = json!([{"url": "https://x.invalid/a.png"}]);
            let payload = Bytes::from(serde_json::to_vec(&value).unwrap());

            let router = process_payload("in", &payload);
            let relayed: Value = serde_json::from_slice(&relay(&router, &payload)).unwrap();
            assert_eq!(relayed["attachments"], value["attachments"]);
            assert_eq!(relayed["id"], value["id"]);
            let router_id = router.context().span().span_context().span_id();
            let parent = relayed["trace"]["traceparent"].as_str().unwrap();
            assert!(parent.contains(&router_id.to_string()), "{parent}");
            assert_ne!(relayed["trace"], value["trace"]);
        });
    }

    #[test]
    fn with_traces_off_nothing_is_written_and_payloads_pass_unchanged() {
        let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
        let _sent = send("in", &mut envelope);
        assert!(envelope.trace.is_empty());
        let payload = Bytes::from_static(b"{\"id\":\"not read\",\"extra\":1}");
        let router = process_payload("in", &payload);
        assert_eq!(relay(&router, &payload), payload);
    }

    #[test]
    fn an_unreadable_context_starts_a_new_trace() {
        traced(|| {
            let mut envelope = Envelope::inbound("webhook", "api", "c", "s", "hi");
            envelope
                .trace
                .insert("traceparent".into(), "00-not-a-context-01".into());
            let span = process("in", &envelope);
            assert!(span.context().span().span_context().is_valid());
        });
    }
}
