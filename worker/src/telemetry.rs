//! Logging and traces: structured JSON logs for machines or readable lines for
//! people, and, when an OTLP endpoint is configured, the spans of `crate::traces`
//! exported over OTLP/HTTP.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, filter};

use crate::traces;
use crate::traces::export::Traces;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// What [`init`] started; [`Telemetry::shutdown`] sends the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    traces: Option<Traces>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter (at most 5 s). Call it after the worker
    /// stopped, outside the runtime given to [`init`] but before that runtime is
    /// dropped: the last export runs on it.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces {
            traces.shutdown();
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level of
/// the logs. With `traces` (the runtime the exporter sends from), spans are exported
/// when the environment names an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); without one no exporter is built.
pub fn init(format: LogFormat, traces: Option<tokio::runtime::Handle>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => logs.compact().with_filter(filter).boxed(),
    };
    let wanted = traces.filter(|_| traces::export::enabled(|name| std::env::var(name).ok()));
    let (exporter, failed) = match wanted.map(Traces::start) {
        Some(Ok(exporter)) => (Some(exporter), None),
        Some(Err(err)) => (None, Some(err)),
        None => (None, None),
    };
    let spans = exporter.as_ref().map(|exporter| {
        tracing_opentelemetry::layer()
            .with_tracer(exporter.tracer())
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            // Only the spans made for traces; logs stay logs.
            .with_filter(filter::filter_fn(|meta| meta.target() == traces::TARGET))
    });
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    if let Some(err) = failed {
        tracing::error!(error = %err, "traces are not exported");
    }
    Telemetry { traces: exporter }
}
