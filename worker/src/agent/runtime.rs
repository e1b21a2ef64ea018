//! One agent as a durable-work handler: each delivery from `agent.route.<agent>` is a
//! turn; the reply goes to the envelope's `replyTo` or the channel's outbound subject,
//! and events to `agent.events.<agent>`. Concurrency, retries and the DLQ are the
//! consumer loop's (see `queue::ConsumerLoop`).

use crate::secrets::Secrets;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use nexo_api::event::{AgentEvent, AgentEventKind, EVENT_VERSION};
use nexo_api::report::OverBudget;
use nexo_api::spec::AgentSpec;
use nexo_api::{Envelope, ResourceKey, subject};
use serde::Serialize;
use tracing::Instrument;
use uuid::Uuid;

use super::budget::{self, Spending};
use super::deltas::TurnDeltas;
use super::turn::{self, Turn, TurnError, TurnObserver};
use crate::broker::{Broker, Message};
use crate::llm::{
    ChatMessage, ChatModel, ChatResponse, Fallbacks, LlmError, PassedOver, SharedModels,
};
use crate::memory::{AgentMemory, Exchange, MemoryError, Spent};
use crate::metrics::{self, Metrics};
use crate::queue::{Handler, Outcome};
use crate::tools::{ToolSet, ToolSource, memory_tools};
use crate::traces;

pub struct AgentRuntime {
    key: ResourceKey,
    label: String,
    spec: AgentSpec,
    /// The agent's model and its fallbacks.
    model: Fallbacks,
    /// The worker's breakers and price table.
    models: Arc<SharedModels>,
    /// What the agent spent that its memory does not hold yet, for its budget.
    spending: Spending,
    tools: ToolSet,
    /// Sessions and long-term memory: the agent's memory file.
    memory: Arc<AgentMemory>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
}

/// What `/admin/agents` shows of an agent.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    pub name: String,
    pub namespace: String,
    pub provider: &'static str,
    pub model: String,
    pub tools: Vec<String>,
    /// What the tools that say so say about their effects (MCP annotations).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tool_annotations: std::collections::BTreeMap<String, crate::tools::ToolAnnotations>,
    pub turns_in_flight: i64,
    pub max_concurrency: u32,
}

impl AgentRuntime {
    pub fn new(
        key: ResourceKey,
        spec: AgentSpec,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        secrets: &Secrets,
        memory: Arc<AgentMemory>,
        models: Arc<SharedModels>,
    ) -> Result<Self, LlmError> {
        let model = Fallbacks::from_spec(
            &spec.model,
            secrets,
            &models.breakers,
            spec.observability.record_content,
        )?;
        let mut tools = ToolSet::for_agent(&key, &spec, broker.clone());
        if spec.memory.tools_enabled() {
            for tool in memory_tools(memory.clone()) {
                tools.insert(tool);
            }
        }
        Ok(Self {
            label: key.to_string(),
            memory,
            key,
            spec,
            model,
            models,
            spending: Spending::default(),
            tools,
            broker,
            metrics,
        })
    }

    pub fn key(&self) -> &ResourceKey {
        &self.key
    }

    /// Gives the model the tools of `source` too (an extension's).
    pub(crate) fn add_tool_source(&mut self, source: Arc<dyn ToolSource>) {
        self.tools.add_source(source);
    }

    /// The agent's memory, for the admin API.
    pub fn memory(&self) -> &Arc<AgentMemory> {
        &self.memory
    }

    pub fn info(&self) -> AgentInfo {
        let tools = self.tools.for_turn();
        AgentInfo {
            name: self.key.name.clone(),
            namespace: self.key.namespace.clone(),
            provider: self.model.provider(),
            model: self.spec.model.model.clone(),
            tools: tools.names(),
            tool_annotations: tools.annotations(),
            turns_in_flight: self
                .metrics
                .turns_in_flight
                .with_label_values(&[&self.label])
                .get(),
            max_concurrency: self.spec.limits.max_concurrency,
        }
    }

    /// Name of the durable consumer of this agent's work.
    pub fn consumer(&self) -> String {
        subject::agent_consumer(&self.key)
    }

    pub fn max_concurrency(&self) -> usize {
        self.spec.limits.max_concurrency as usize
    }

    /// Records how long a step of moving this agent between workers took.
    pub fn observe_move(&self, step: &str, took: Duration) {
        self.metrics
            .agent_move_duration
            .with_label_values(&[step])
            .observe(took.as_secs_f64());
    }

    /// Removes the agent's metric series (it left this worker).
    pub fn forget_metrics(&self, metrics: &Metrics) {
        let tools = self.tools.for_turn().names();
        metrics.forget_agent(&metrics::AgentSeries {
            agent: &self.label,
            providers: &self.model.providers(),
            models: &self.model.labels(),
            tools: &tools,
            consumer: &self.consumer(),
        });
    }

    async fn turn(&self, envelope: Envelope) -> Outcome {
        // A message delivered again after its turn was recorded (its ack was lost, or
        // the agent moved to another worker in between) gets the answer already
        // given, not a second turn; channels drop the copy if the first arrived.
        match self.memory.answer_of(&envelope.id.to_string()).await {
            Ok(Some(text)) => {
                self.count(metrics::TURN_REPEATED);
                tracing::info!(
                    "delivered again after its turn was recorded: sending the recorded answer"
                );
                let reply = envelope.reply(self.label.clone(), text);
                self.reply(&envelope, reply).await;
                // The first delivery's event may not have left (a kill right after
                // the turn was written): the turn is finished, without a model call.
                let finished = AgentEventKind::TurnFinished {
                    steps: 0,
                    duration_ms: 0,
                    model: None,
                };
                self.emit(envelope.id, finished).await;
                return Outcome::Ack;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "cannot look up an earlier answer"),
        }
        if let Some(over) = self.check_budget().await {
            self.count(metrics::TURN_BUDGET_EXCEEDED);
            tracing::warn!(limit = %over.limit, tokens = over.tokens, cost = over.cost, "budget spent: turn refused");
            let refused = TurnError::BudgetExceeded {
                limit: over.limit.clone(),
            };
            self.reply_error(&envelope, &refused).await;
            let exceeded = AgentEventKind::BudgetExceeded {
                day: over.day,
                tokens: over.tokens,
                cost: over.cost,
                limit: over.limit,
            };
            self.emit(envelope.id, exceeded).await;
            return Outcome::Ack;
        }
        let _in_flight = metrics::InFlight::enter(
            self.metrics
                .turns_in_flight
                .with_label_values(&[&self.label]),
        );
        let started = Instant::now();
        self.emit(envelope.id, AgentEventKind::TurnStarted).await;
        let observer = Observer {
            agent: self,
            message_id: envelope.id,
            spent: std::sync::Mutex::new(Spent::on(budget::day_of(Utc::now()))),
            answered_by: std::sync::Mutex::default(),
        };
        let deltas = TurnDeltas::new(
            &envelope,
            &self.broker,
            self.metrics
                .llm_first_token
                .with_label_values(&[&self.label, self.model.provider()]),
        );
        let result = self.answer(&envelope, &observer, &deltas).await;
        // The deltas leave before the reply, which replaces them.
        deltas.finish().await;
        if result.is_err() {
            self.spending
                .add_unrecorded(&observer.spent.lock().unwrap().clone());
        }
        if self.spec.budget.is_some() {
            self.check_budget().await;
        }
        let took = started.elapsed();
        self.metrics
            .turn_duration
            .with_label_values(&[&self.label])
            .observe(took.as_secs_f64());
        match result {
            Ok(outcome) => {
                self.count(metrics::TURN_OK);
                let reply = envelope.reply(self.label.clone(), outcome.text);
                self.reply(&envelope, reply).await;
                let duration_ms = took.as_millis() as u64;
                let model = observer.answered_by.lock().unwrap().clone();
                self.emit(
                    envelope.id,
                    AgentEventKind::TurnFinished {
                        steps: outcome.steps,
                        duration_ms,
                        model,
                    },
                )
                .await;
                tracing::info!(steps = outcome.steps, duration_ms, "turn finished");
            }
            // The journal refused the turn's memory write: another worker owns the
            // agent now (its answer would be a second one), or NATS cannot be
            // reached. No reply; the message goes back to the broker.
            Err(TurnError::Memory(MemoryError::Durable(err))) => {
                self.count(metrics::TURN_HANDED_BACK);
                tracing::warn!(error = %err, "turn not committed: handing the message back");
                return Outcome::HandBack {
                    reason: err.to_string(),
                };
            }
            Err(err) => {
                self.count(metrics::TURN_ERROR);
                tracing::warn!(error = %err, "turn failed");
                self.reply_error(&envelope, &err).await;
                self.emit(
                    envelope.id,
                    AgentEventKind::TurnFailed {
                        error: err.to_string(),
                    },
                )
                .await;
            }
        }
        Outcome::Ack
    }

    /// Answers `envelope` with the error reply of `err`.
    async fn reply_error(&self, envelope: &Envelope, err: &TurnError) {
        let error = err.reply_error();
        let text = format!(
            "Sorry, I could not answer: {}. (message {})",
            error.message, envelope.id
        );
        let reply = envelope.error_reply(self.label.clone(), error, text);
        self.reply(envelope, reply).await;
    }

    /// Today's spending against the agent's budget (what its memory recorded plus
    /// what failed turns spent since), remembered for `/catalog`: the entry of
    /// `overBudget` when a limit is reached. Without a budget, or when the memory
    /// cannot be read (logged), nothing is refused.
    async fn check_budget(&self) -> Option<OverBudget> {
        let limits = self.spec.budget.as_ref()?;
        let day = budget::day_of(Utc::now());
        let mut total = self
            .memory
            .spent_on(&day)
            .await
            .inspect_err(|err| tracing::warn!(error = %err, "cannot read today's spending"))
            .ok()?;
        total.add(&self.spending.unrecorded(&day));
        let reached = budget::reached(limits, &total);
        self.spending.know(total, reached);
        self.spending.over_budget(&self.label, &day)
    }

    /// The `overBudget` entry of `/catalog` for this agent, when its turns are
    /// refused today.
    pub fn over_budget(&self) -> Option<OverBudget> {
        self.spending
            .over_budget(&self.label, &budget::day_of(Utc::now()))
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .turns
            .with_label_values(&[&self.label, outcome])
            .inc();
    }

    /// Loads the conversation, recalls memories, runs the turn and writes it to
    /// memory. The answer counts only once it is written: if the write fails (a full
    /// disk) the turn fails and the conversation stays as it was.
    async fn answer(
        &self,
        envelope: &Envelope,
        observer: &Observer<'_>,
        deltas: &TurnDeltas,
    ) -> Result<turn::TurnOutcome, TurnError> {
        let session = self.memory.session(&envelope.conversation).await?;
        let mut system_prompt = self.spec.system_prompt.clone();
        let mut add = |block: String| {
            if !system_prompt.is_empty() {
                system_prompt.push_str("\n\n");
            }
            system_prompt.push_str(&block);
        };
        if let Some(summary) = session.summary {
            add(format!("Earlier in this conversation:\n{summary}"));
        }
        if let Some(recalled) = self.recall(envelope).await {
            add(recalled);
        }
        let outcome = turn::run(
            Turn {
                agent: &self.key,
                system_prompt: &system_prompt,
                history: session
                    .turns
                    .into_iter()
                    .flat_map(|turn| {
                        [
                            ChatMessage::User(turn.user),
                            ChatMessage::Assistant {
                                text: turn.agent,
                                tool_calls: Vec::new(),
                            },
                        ]
                    })
                    .collect(),
                message: envelope,
                max_steps: self.spec.limits.max_steps,
                deltas,
            },
            &self.model,
            &self.tools,
            observer,
        )
        .await?;
        // What this turn spent, and failed turns before it, counts with the turn.
        let mut spent = observer.spent.lock().unwrap().clone();
        spent.add(&self.spending.unrecorded(&spent.day));
        let day = spent.day.clone();
        self.memory
            .record_turn_spent(
                &envelope.conversation,
                &envelope.sender,
                &envelope.id.to_string(),
                Exchange {
                    user: envelope.text.clone(),
                    agent: outcome.text.clone(),
                },
                (!spent.is_nothing()).then_some(spent),
            )
            .await?;
        self.spending.recorded(&day);
        Ok(outcome)
    }

    /// The memories recalled for `envelope`, as a prompt block. Recall is a help, not
    /// a requirement: when it fails (an embedding server down) the turn goes on
    /// without it.
    async fn recall(&self, envelope: &Envelope) -> Option<String> {
        let started = Instant::now();
        let result = self
            .memory
            .recall_for_prompt(&envelope.text, &envelope.sender, &envelope.conversation)
            .await;
        let mode = self.spec.memory.long_term.recall.mode;
        self.metrics
            .memory_recall_duration
            .with_label_values(&[&self.label, metrics::recall_mode(mode)])
            .observe(started.elapsed().as_secs_f64());
        result
            .inspect_err(|err: &MemoryError| tracing::warn!(error = %err, "memory recall failed"))
            .ok()
            .flatten()
    }

    /// Answers on the envelope's `replyTo`, or else the channel instance's outbound
    /// subject.
    async fn reply(&self, envelope: &Envelope, mut reply: Envelope) {
        let subject = envelope.reply_to.clone().unwrap_or_else(|| {
            let instance = ResourceKey::new(&self.key.namespace, &envelope.instance);
            subject::outbound(&envelope.channel, &instance)
        });
        let span = traces::context::send(&subject, &mut reply);
        // One answer per message: the recorded answer sent again for a message
        // delivered again (its first answer reached the bus, its ack did not) is
        // dropped while the first is known (JetStream's duplicate window), so a
        // platform channel does not send it twice.
        let once = format!("answer:{}", envelope.id);
        if let Err(err) = self
            .broker
            .publish_once(&subject, Bytes::from(reply.to_json()), &once)
            .instrument(span)
            .await
        {
            tracing::error!(%subject, error = %err, "could not publish the reply");
        }
    }

    async fn emit(&self, message_id: Uuid, kind: AgentEventKind) {
        let event = AgentEvent {
            version: EVENT_VERSION,
            agent: self.label.clone(),
            message_id,
            at: Utc::now(),
            kind,
        };
        let subject = subject::agent_events(&self.key);
        if let Err(err) = self
            .broker
            .publish(&subject, Bytes::from(event.to_json()))
            .await
        {
            tracing::warn!(%subject, error = %err, "could not publish an agent event");
        }
    }
}

#[async_trait]
impl Handler for AgentRuntime {
    async fn handle(&self, message: &Message, _attempt: u32) -> Outcome {
        let envelope = match Envelope::from_json(&message.payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                self.count(metrics::TURN_MALFORMED);
                return Outcome::Nack {
                    requeue: false,
                    reason: format!("malformed envelope: {err}"),
                };
            }
        };
        let span = tracing::info_span!(
            target: traces::TARGET,
            "turn",
            otel.name = %format_args!("invoke_agent {}", self.key),
            otel.kind = "consumer",
            gen_ai.operation.name = "invoke_agent",
            gen_ai.agent.name = %self.key,
            agent = %self.key,
            message_id = %envelope.id,
            channel = %envelope.channel,
            instance = %envelope.instance,
            conversation = %envelope.conversation,
        );
        traces::context::continue_in(&span, &envelope);
        // A failed turn is answered with an error reply: handled, not retried.
        self.turn(envelope).instrument(span).await
    }
}

/// Metrics and events for what happens inside a turn, and what its model calls
/// spent.
struct Observer<'a> {
    agent: &'a AgentRuntime,
    message_id: Uuid,
    /// Tokens and cost of the turn's model calls so far.
    spent: std::sync::Mutex<Spent>,
    /// The model that answered the turn's last call.
    answered_by: std::sync::Mutex<Option<String>>,
}

impl Observer<'_> {
    /// Counts the tokens of one answered call, and their cost when the model has a
    /// price.
    fn spend(&self, response: &ChatResponse) {
        let agent = self.agent;
        let model = response.answered.model.as_str();
        let usage = &response.usage;
        for (kind, tokens) in [
            ("input", usage.input_tokens),
            ("cached_input", usage.cached_input_tokens),
            ("output", usage.output_tokens),
        ] {
            agent
                .metrics
                .llm_tokens
                .with_label_values(&[&agent.label, model, kind])
                .inc_by(tokens);
        }
        let cost = agent.models.cost(model, usage);
        if let Some(cost) = cost {
            agent
                .metrics
                .llm_cost
                .with_label_values(&[&agent.label, model])
                .inc_by(cost);
        }
        let mut spent = self.spent.lock().unwrap();
        spent.tokens += usage.input_tokens + usage.output_tokens;
        spent.cost += cost.unwrap_or_default();
    }

    /// A `modelFellBack` event for each step from one model to the next.
    async fn fell_back(&self, passed_over: &[PassedOver], answered: Option<&str>) {
        let next = passed_over
            .iter()
            .skip(1)
            .map(|p| p.model.as_str())
            .chain(answered);
        for (from, to) in passed_over.iter().zip(next) {
            let event = AgentEventKind::ModelFellBack {
                from: from.model.clone(),
                to: to.to_owned(),
                error: from.error.clone(),
            };
            self.agent.emit(self.message_id, event).await;
        }
    }
}

#[async_trait]
impl TurnObserver for Observer<'_> {
    async fn model_called(&self, result: Result<&ChatResponse, &LlmError>, took: Duration) {
        let agent = self.agent;
        let provider = match result {
            Ok(response) => response.answered.provider,
            Err(_) => agent.model.provider(),
        };
        let metrics = &agent.metrics;
        metrics
            .llm_duration
            .with_label_values(&[&agent.label, provider])
            .observe(took.as_secs_f64());
        let outcome = match result {
            Ok(_) => "ok",
            Err(err) if err.is_timeout() => "timeout",
            Err(_) => "error",
        };
        metrics
            .llm_requests
            .with_label_values(&[&agent.label, provider, outcome])
            .inc();
        match result {
            Ok(response) => {
                self.spend(response);
                let answered = &response.answered;
                *self.answered_by.lock().unwrap() = Some(answered.model.clone());
                if !answered.passed_over.is_empty() {
                    metrics
                        .llm_fallbacks
                        .with_label_values(&[&agent.label, &answered.model])
                        .inc();
                }
                self.fell_back(&answered.passed_over, Some(&answered.model))
                    .await;
            }
            Err(err) => self.fell_back(err.passed_over(), None).await,
        }
    }

    async fn tool_called(&self, tool: &str, known: bool, ok: bool) {
        let agent = self.agent;
        let outcome = if ok { "ok" } else { "error" };
        // The model names the tool: a name the agent has no tool of is one series.
        let label = if known { tool } else { metrics::UNKNOWN_TOOL };
        agent
            .metrics
            .tool_calls
            .with_label_values(&[&agent.label, label, outcome])
            .inc();
        agent
            .emit(
                self.message_id,
                AgentEventKind::ToolCalled {
                    tool: tool.to_owned(),
                    ok,
                },
            )
            .await;
    }
}
