//! Prometheus metrics of the operator.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Reconciliations by controller and result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciliations by controller and error kind.
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
    /// Objects whose last reconciliation failed and that wait for a retry.
    pub retrying: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "nexo_operator_reconciles_total",
                "Reconciliations, by controller and result.",
            ),
            &["controller", "result"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "nexo_operator_reconcile_errors_total",
                "Failed reconciliations, by controller and error kind.",
            ),
            &["controller", "error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nexo_operator_reconcile_duration_seconds",
                "Time one reconciliation took.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )
        .expect("valid metric");
        let retrying = IntGauge::new(
            "nexo_operator_retrying_objects",
            "Objects whose last reconciliation failed, waiting for a retry.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(retrying.clone()),
        ] {
            registry.register(collector).expect("metric registers once");
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            retrying,
        }
    }

    pub fn observe(&self, controller: &str, took: Duration, error: Option<&str>) {
        self.duration
            .with_label_values(&[controller])
            .observe(took.as_secs_f64());
        let result = if error.is_some() { "error" } else { "ok" };
        self.reconciles
            .with_label_values(&[controller, result])
            .inc();
        if let Some(kind) = error {
            self.errors.with_label_values(&[controller, kind]).inc();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}
