//! The OTLP/HTTP exporter: off unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and then a batch span processor sending
//! protobuf through the worker's reqwest.
//!
//! The SDK's batch processor exports from a thread of its own, blocking on the
//! export; reqwest's async client needs a tokio reactor, so each request is run on
//! the worker's runtime ([`OnRuntime`]) rather than building a blocking client (a
//! second runtime) or a second HTTP stack.

use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES`
/// names one.
pub const DEFAULT_SERVICE_NAME: &str = "nexo-worker";

/// How long one export may take; the SDK's own default (10 s) too.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Traces::shutdown`] waits for the last spans to leave: a worker that
/// stops must not hang on an unreachable collector.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP exporter HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Whether the environment asks for traces: an OTLP endpoint is set, and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns them off.
pub fn enabled(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).is_some_and(|value| !value.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter =
        env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        && !disabled
        && !no_exporter
}

/// The running exporter: spans go out until [`Traces::shutdown`].
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the exporter from the standard `OTEL_*` environment (endpoint, headers,
    /// `OTEL_BSP_*` batching, resource attributes); its HTTP requests run on
    /// `runtime`.
    pub fn start(runtime: tokio::runtime::Handle) -> Result<Self, ExportError> {
        crate::tls::install_provider();
        let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(OnRuntime { client, runtime })
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        Ok(Self { provider })
    }

    pub(crate) fn tracer(&self) -> SdkTracer {
        self.provider.tracer("nexo-worker")
    }

    /// Sends what is still buffered (for at most 5 s) and stops the exporter. Call it
    /// outside the runtime's worker threads: it blocks until the export returns, and
    /// the export runs on the runtime.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown_with_timeout(SHUTDOWN_GRACE) {
            eprintln!("traces: the last spans may not have been exported: {err}");
        }
    }
}

/// What identifies this process in every span it exports: `service.name` (default
/// [`DEFAULT_SERVICE_NAME`]), `service.instance.id` (a UUID per process, as the
/// resource conventions recommend: a pod restarted under the same name is a new
/// instance), `host.name` (the pod's name in Kubernetes) and `process.pid`, plus
/// what `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let has = |key: &'static str| {
        detected
            .get(&opentelemetry::Key::from_static_str(key))
            .is_some()
    };
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if !has("service.instance.id") {
        builder = builder.with_attribute(KeyValue::new(
            "service.instance.id",
            uuid::Uuid::new_v4().to_string(),
        ));
    }
    if !has("host.name")
        && let Some(host) = host_name()
    {
        builder = builder.with_attribute(KeyValue::new("host.name", host));
    }
    builder
        .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
        .build()
}

/// The kernel's host name (a pod's name), or `HOSTNAME`.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
}

/// reqwest's async client, run on the worker's runtime whatever thread awaits it.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn traces_are_off_without_an_endpoint() {
        assert!(!enabled(env(&[])));
        assert!(!enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(!enabled(env(&[("OTEL_SERVICE_NAME", "x")])));
    }

    #[test]
    fn either_endpoint_turns_traces_on_unless_disabled() {
        let general = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        );
        assert!(enabled(env(&[general])));
        assert!(enabled(env(&[traces])));
        assert!(!enabled(env(&[general, ("OTEL_SDK_DISABLED", "TRUE")])));
        assert!(!enabled(env(&[traces, ("OTEL_TRACES_EXPORTER", "none")])));
        assert!(enabled(env(&[general, ("OTEL_SDK_DISABLED", "false")])));
    }
}
