//! Prometheus metrics of one worker process. One registry, created at start and
//! shared by reference; `/metrics` renders it.

use nexo_api::spec::RecallMode;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Adds one to a gauge for as long as it lives. Work that panics, or is dropped at
/// the drain deadline, still gives its count back, which a hand-written `dec()`
/// after the work does not.
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn enter(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `outcome` of `nexo_agent_turns_total` for a turn that answered.
pub const TURN_OK: &str = "ok";
/// `outcome` of `nexo_agent_turns_total` for a turn answered with an error reply.
pub const TURN_ERROR: &str = "error";
/// `outcome` of `nexo_agent_turns_total` for a delivery that is not a valid envelope.
pub const TURN_MALFORMED: &str = "malformed";
/// `outcome` of `nexo_agent_turns_total` for a message delivered again after its turn
/// was recorded: answered with the recorded answer, not a second turn.
pub const TURN_REPEATED: &str = "repeated";
/// `outcome` of `nexo_agent_turns_total` for a turn whose memory write the journal
/// refused (another worker owns the agent now, or NATS is unreachable): not answered,
/// handed back to the broker.
pub const TURN_HANDED_BACK: &str = "handed_back";
/// `outcome` of `nexo_agent_turns_total` for a turn refused because the agent spent
/// its daily budget: answered with an error reply, no model call.
pub const TURN_BUDGET_EXCEEDED: &str = "budget_exceeded";
/// Every `outcome` of `nexo_agent_turns_total`.
pub const TURN_OUTCOMES: [&str; 6] = [
    TURN_OK,
    TURN_ERROR,
    TURN_MALFORMED,
    TURN_REPEATED,
    TURN_HANDED_BACK,
    TURN_BUDGET_EXCEEDED,
];

/// Kinds of [`Metrics::platform_events`]: a fixed set, never the platform's own words.
pub const PLATFORM_EVENTS: [&str; 8] = [
    "message",
    "duplicate",
    "refused",
    "status_sent",
    "status_delivered",
    "status_read",
    "status_failed",
    "ignored",
];

pub struct Metrics {
    registry: Registry,
    /// Messages users sent, per channel type and instance.
    pub messages_in: IntCounterVec,
    /// Replies handed to channels, per channel type and instance.
    pub messages_out: IntCounterVec,
    /// Second replies to a message a channel instance had already delivered an answer
    /// to, dropped (an agent's message handled twice), per channel type and instance.
    pub duplicate_replies: IntCounterVec,
    /// What a push platform's webhook (WhatsApp, Slack) sent us, by
    /// [`PLATFORM_EVENTS`] kind, per channel type and instance.
    pub platform_events: IntCounterVec,
    /// Turns per agent and outcome: [`TURN_OK`], [`TURN_ERROR`] (answered with an error
    /// reply) or [`TURN_MALFORMED`] (the delivery was not a valid envelope).
    pub turns: IntCounterVec,
    pub turn_duration: HistogramVec,
    /// Model calls per agent, provider and outcome.
    pub llm_requests: IntCounterVec,
    pub llm_duration: HistogramVec,
    /// From the start of a model call to the first text of its answer, per agent and
    /// provider (calls that answer with tool calls only have none).
    pub llm_first_token: HistogramVec,
    /// Tokens per agent, model and kind ([`TOKEN_KINDS`]).
    pub llm_tokens: IntCounterVec,
    /// Cost of the tokens per agent and model, from the price table
    /// (`worker.models.prices`), in its currency.
    pub llm_cost: CounterVec,
    /// Model calls answered by a fallback model (the agent's own model, or the
    /// fallbacks before, failed or had an open circuit), per agent and the model that
    /// answered.
    pub llm_fallbacks: IntCounterVec,
    /// Endpoints of a provider and model whose circuit breaker is open (or letting a
    /// probe through): 1 while the one endpoint is open, 0 once it closed.
    pub llm_circuit_open: IntGaugeVec,
    pub tool_calls: IntCounterVec,
    /// Turns running now, per agent.
    pub turns_in_flight: IntGaugeVec,
    /// Messages stored in the outbox, not yet published.
    pub outbox_depth: IntGauge,
    pub outbox_published: IntCounter,
    /// Messages in the dead-letter queue.
    pub dlq_depth: IntGauge,
    /// Messages moved to the dead-letter queue, by `source` (`publish`, `consume`).
    pub dead_lettered: IntCounterVec,
    /// Durable deliveries by consumer and outcome (`ack`, `retry`, `dead_letter`,
    /// `duplicate`, `abandoned`).
    pub consumed: IntCounterVec,
    /// Catalog changes seen while running, by `result` (`applied`, `invalid`: refused
    /// by validation, `failed`: valid but a component could not be built).
    pub catalog_reloads: IntCounterVec,
    /// 1 for the catalog `revision` this worker runs.
    pub catalog_info: IntGaugeVec,
    /// Time to recall memories for a turn's prompt (embedding the query included), per
    /// agent and `mode` ([`recall_mode`]).
    pub memory_recall_duration: HistogramVec,
    /// Long-term memories stored, per agent (updated after each turn).
    pub memory_items: IntGaugeVec,
    /// Agents and channels of this worker's share that do not run (could not be
    /// built, or cannot start), per `kind`.
    pub components_not_running: IntGaugeVec,
    /// Whether a platform channel instance reached its platform on its last exchange
    /// (1) or not (0), per channel type and instance; absent before it said.
    pub channel_connected: IntGaugeVec,
    // Limits of the outbox and the dead-letter queue (`worker.delivery`), refreshed by
    // the outbox drain from the store's own counts.
    /// Payload bytes in the outbox.
    pub outbox_bytes: IntGauge,
    /// Publishes refused because the outbox was full.
    pub outbox_refused: IntCounter,
    /// Dead letters removed by `reason`: `expired` (older than the retention) or
    /// `overflow` (the oldest, to make room).
    pub dead_letters_removed: IntCounterVec,
    /// Messages the in-process bus dropped for core subscribers that fell behind.
    pub local_bus_dropped: IntCounter,
    /// Synchronous webhook requests waiting for their reply, per instance.
    pub webhook_waiting: IntGaugeVec,
    // Ownership, with several workers on one NATS (`ownership`).
    /// Partition leases acquired and released, by `change`.
    pub ownership_changes: IntCounterVec,
    /// Leases lost: taken by another worker, or given up because they could not be
    /// renewed in time.
    pub leases_lost: IntCounter,
    /// Partitions whose lease this worker holds.
    pub partitions_held: IntGauge,
    /// Time an agent's move took on this worker, by `step` ([`MOVE_STEPS`]).
    pub agent_move_duration: HistogramVec,
    /// Messages waiting for this worker's agents (pending plus delivered but not
    /// acknowledged), per pool: summed over a pool's workers, the backlog an
    /// autoscaler reads.
    pub partition_lag: IntGaugeVec,
    /// Calls of the served agents (`/mcp`, `/a2a/…`), by `surface` and `outcome`
    /// (`crate::serve::Outcome`).
    pub served_calls: IntCounterVec,
    /// Time served calls took, answered or not, by `surface`.
    pub served_call_duration: HistogramVec,
}

/// The `tool` label of `nexo_tool_calls_total` for a name the agent has no tool of:
/// the model chose it, and labels never take what a model says.
pub const UNKNOWN_TOOL: &str = "unknown";
/// `outcome` values of `nexo_llm_requests_total`.
pub const LLM_OUTCOMES: [&str; 3] = ["ok", "timeout", "error"];
/// `outcome` values of `nexo_tool_calls_total`.
pub const TOOL_OUTCOMES: [&str; 2] = ["ok", "error"];
/// `kind` values of `nexo_llm_tokens_total`: every input token, of those the ones
/// read from the provider's prompt cache, and output tokens.
pub const TOKEN_KINDS: [&str; 3] = ["input", "cached_input", "output"];
/// `outcome` values of `nexo_consumed_total`.
pub const CONSUMED_OUTCOMES: [&str; 6] = [
    "ack",
    "retry",
    "dead_letter",
    "duplicate",
    "abandoned",
    "handed_back",
];
/// `change` values of `nexo_ownership_changes_total`.
pub const OWNERSHIP_CHANGES: [&str; 2] = ["acquired", "released"];
/// `step` values of `nexo_agent_move_seconds`: handing an agent off (drain and
/// snapshot on the old owner), taking it over (restore, replay, marker on the new one).
pub const MOVE_STEPS: [&str; 2] = ["hand_off", "take_over"];

/// The series one agent adds: enough to remove all of them when it leaves.
pub struct AgentSeries<'a> {
    /// `namespace/name`.
    pub agent: &'a str,
    /// The providers of the agent's models.
    pub providers: &'a [&'static str],
    /// The agent's models and fallbacks, as the spec names them.
    pub models: &'a [String],
    /// The agent's tool names ([`UNKNOWN_TOOL`] is added).
    pub tools: &'a [String],
    /// The agent's durable consumer.
    pub consumer: &'a str,
}

/// The `mode` label of `nexo_memory_recall_duration_seconds`.
pub fn recall_mode(mode: RecallMode) -> &'static str {
    match mode {
        RecallMode::Keyword => "keyword",
        RecallMode::Vector => "vector",
        RecallMode::Hybrid => "hybrid",
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram_in = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        // Turns and model calls: tens of milliseconds to minutes.
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let buckets = vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ];
            histogram_in(name, help, labels, buckets)
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let int_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        Self {
            outbox_depth: int_gauge(
                "nexo_outbox_depth",
                "Messages in the outbox waiting to be published.",
            ),
            outbox_published: int_counter(
                "nexo_outbox_published_total",
                "Messages published from the outbox.",
            ),
            dlq_depth: int_gauge("nexo_dlq_depth", "Messages in the dead-letter queue."),
            consumed: counter(
                "nexo_consumed_total",
                "Durable deliveries by consumer and outcome.",
                &["consumer", "outcome"],
            ),
            dead_lettered: counter(
                "nexo_dead_lettered_total",
                "Messages moved to the dead-letter queue.",
                &["source"],
            ),
            messages_in: counter(
                "nexo_messages_in_total",
                "Messages received from users.",
                &["channel", "instance"],
            ),
            messages_out: counter(
                "nexo_messages_out_total",
                "Replies delivered to channels.",
                &["channel", "instance"],
            ),
            duplicate_replies: counter(
                "nexo_channel_duplicate_replies_total",
                "Replies dropped because the channel had delivered one to the same message.",
                &["channel", "instance"],
            ),
            platform_events: counter(
                "nexo_channel_platform_events_total",
                "Webhook calls of a messaging platform by kind (message, duplicate, status_*, refused).",
                &["channel", "instance", "event"],
            ),
            turns: counter(
                "nexo_agent_turns_total",
                "Agent turns by outcome.",
                &["agent", "outcome"],
            ),
            turn_duration: histogram(
                "nexo_agent_turn_duration_seconds",
                "Duration of agent turns.",
                &["agent"],
            ),
            llm_requests: counter(
                "nexo_llm_requests_total",
                "Model calls by provider and outcome.",
                &["agent", "provider", "outcome"],
            ),
            llm_duration: histogram(
                "nexo_llm_request_duration_seconds",
                "Duration of model calls, retries included.",
                &["agent", "provider"],
            ),
            llm_first_token: histogram(
                "nexo_llm_first_token_seconds",
                "Time from the start of a model call to the first text of its answer.",
                &["agent", "provider"],
            ),
            llm_tokens: counter(
                "nexo_llm_tokens_total",
                "Tokens used by model and kind (input, cached_input, output).",
                &["agent", "model", "kind"],
            ),
            llm_cost: {
                let c = CounterVec::new(
                    Opts::new(
                        "nexo_llm_cost_total",
                        "Cost of the tokens used, from the price table, in its currency.",
                    ),
                    &["agent", "model"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            llm_fallbacks: counter(
                "nexo_llm_fallbacks_total",
                "Model calls answered by a fallback model, by the model that answered.",
                &["agent", "model"],
            ),
            llm_circuit_open: gauge(
                "nexo_llm_circuit_open",
                "Model endpoints whose circuit breaker is open.",
                &["provider", "model"],
            ),
            tool_calls: counter(
                "nexo_tool_calls_total",
                "Tool calls by tool and outcome.",
                &["agent", "tool", "outcome"],
            ),
            catalog_reloads: counter(
                "nexo_catalog_reloads_total",
                "Catalog changes seen while running, by result.",
                &["result"],
            ),
            catalog_info: gauge(
                "nexo_catalog_info",
                "The catalog revision this worker runs (value 1).",
                &["revision"],
            ),
            memory_recall_duration: histogram_in(
                "nexo_memory_recall_duration_seconds",
                "Time to recall memories into a turn's prompt, query embedding included.",
                &["agent", "mode"],
                // Recall is local SQLite work plus, with a remote embedder, one request.
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ],
            ),
            memory_items: gauge(
                "nexo_memory_items",
                "Long-term memories stored.",
                &["agent"],
            ),
            outbox_bytes: int_gauge(
                "nexo_outbox_bytes",
                "Payload bytes in the outbox waiting to be published.",
            ),
            outbox_refused: int_counter(
                "nexo_outbox_refused_total",
                "Publishes refused because the outbox was full.",
            ),
            dead_letters_removed: counter(
                "nexo_dead_letters_removed_total",
                "Dead letters removed by reason (expired, overflow).",
                &["reason"],
            ),
            turns_in_flight: gauge(
                "nexo_agent_turns_in_flight",
                "Turns running now.",
                &["agent"],
            ),
            webhook_waiting: gauge(
                "nexo_webhook_waiting_requests",
                "Synchronous webhook requests waiting for the agent's reply.",
                &["instance"],
            ),
            ownership_changes: counter(
                "nexo_ownership_changes_total",
                "Partition leases acquired and released by this worker.",
                &["change"],
            ),
            leases_lost: int_counter(
                "nexo_leases_lost_total",
                "Partition leases lost: taken over, or not renewed in time.",
            ),
            partitions_held: int_gauge(
                "nexo_partitions_held",
                "Partitions whose lease this worker holds.",
            ),
            agent_move_duration: histogram_in(
                "nexo_agent_move_seconds",
                "Time an agent's move took on this worker, by step (hand_off, take_over).",
                &["step"],
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            partition_lag: gauge(
                "nexo_partition_lag",
                "Messages waiting for this worker's agents: pending plus unacknowledged.",
                &["pool"],
            ),
            local_bus_dropped: int_counter(
                "nexo_local_bus_dropped_total",
                "Messages the in-process bus dropped for subscribers that fell behind.",
            ),
            components_not_running: gauge(
                "nexo_components_not_running",
                "Agents and channels of this worker's share that do not run.",
                &["kind"],
            ),
            channel_connected: gauge(
                "nexo_channel_connected",
                "Whether a platform channel reached its platform on its last exchange (1) or not (0).",
                &["channel", "instance"],
            ),
            served_calls: counter(
                "nexo_served_calls_total",
                "Calls of the served agents (MCP, A2A) by surface and outcome.",
                &["surface", "outcome"],
            ),
            served_call_duration: histogram(
                "nexo_served_call_duration_seconds",
                "Duration of calls of the served agents, by surface.",
                &["surface"],
            ),
            registry,
        }
    }

    /// Removes every series of an agent that left this worker. Every label value it
    /// can have is known (none comes from model or user input), so each one is named;
    /// a series that was never created is skipped.
    pub fn forget_agent(&self, series: &AgentSeries<'_>) {
        let agent = series.agent;
        let _ = self.turns_in_flight.remove_label_values(&[agent]);
        let _ = self.turn_duration.remove_label_values(&[agent]);
        let _ = self.memory_items.remove_label_values(&[agent]);
        for outcome in TURN_OUTCOMES {
            let _ = self.turns.remove_label_values(&[agent, outcome]);
        }
        for provider in series.providers {
            let _ = self.llm_duration.remove_label_values(&[agent, provider]);
            let _ = self.llm_first_token.remove_label_values(&[agent, provider]);
            for outcome in LLM_OUTCOMES {
                let _ = self
                    .llm_requests
                    .remove_label_values(&[agent, provider, outcome]);
            }
        }
        for model in series.models {
            for kind in TOKEN_KINDS {
                let _ = self.llm_tokens.remove_label_values(&[agent, model, kind]);
            }
            let _ = self.llm_cost.remove_label_values(&[agent, model]);
            let _ = self.llm_fallbacks.remove_label_values(&[agent, model]);
        }
        let tools = series.tools.iter().map(String::as_str);
        for tool in tools.chain([UNKNOWN_TOOL]) {
            for outcome in TOOL_OUTCOMES {
                let _ = self.tool_calls.remove_label_values(&[agent, tool, outcome]);
            }
        }
        for mode in [RecallMode::Keyword, RecallMode::Vector, RecallMode::Hybrid] {
            let _ = self
                .memory_recall_duration
                .remove_label_values(&[agent, recall_mode(mode)]);
        }
        self.forget_consumer(series.consumer);
    }

    /// Removes every series of a channel instance that left this worker.
    pub fn forget_channel(&self, channel: &str, instance: &str, router: &str) {
        let _ = self.messages_in.remove_label_values(&[channel, instance]);
        let _ = self
            .channel_connected
            .remove_label_values(&[channel, instance]);
        let _ = self.messages_out.remove_label_values(&[channel, instance]);
        let _ = self
            .duplicate_replies
            .remove_label_values(&[channel, instance]);
        let _ = self.webhook_waiting.remove_label_values(&[instance]);
        for event in PLATFORM_EVENTS {
            let _ = self
                .platform_events
                .remove_label_values(&[channel, instance, event]);
        }
        self.forget_consumer(router);
    }

    fn forget_consumer(&self, consumer: &str) {
        for outcome in CONSUMED_OUTCOMES {
            let _ = self.consumed.remove_label_values(&[consumer, outcome]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
