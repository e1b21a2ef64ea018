//! NATS extensions: services that announce their tools on `ext.announce` and answer
//! calls on `ext.<namespace>.<name>.call` (docs/extensions/nats-protocol.md).
//!
//! Each connection listens to the shared announcement subject, keeps the instances of
//! its own extension that announced within [`MISSED_HEARTBEATS`] of their interval, and
//! offers the tools of the newest of them. Calls are plain requests on the call
//! subject: NATS spreads them over the instances' queue group and says at once when no
//! instance is subscribed.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use nexo_api::ResourceKey;
use nexo_api::subject;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ConnectContext, Connection, Listing, RemoteTool};
use crate::broker::{Broker, BrokerError, Subscription};
use crate::tools::{ToolAnnotations, ToolError};

/// The version of the protocol this worker speaks; announcements of another are
/// ignored (a change that old workers can read keeps the number, see the spec).
pub(crate) const PROTOCOL: u64 = 1;

/// Heartbeats an instance may miss before it is dropped: one late or lost
/// announcement (a pause, a NATS reconnect) must not take its tools from the agents.
pub(crate) const MISSED_HEARTBEATS: u32 = 3;

/// Shortest heartbeat interval taken: shorter ones would make every worker wake up
/// and parse announcements all the time.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Longest heartbeat interval taken: with a longer one a dead instance would stay
/// listed (and its tools called in vain) for many minutes.
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);

/// How long a new connection reports `Starting` before it says nothing has announced.
/// Running instances answer the discovery request at once; this leaves room for one
/// that is starting too.
const FIRST_ANNOUNCEMENT_WAIT: Duration = Duration::from_secs(15);

/// Largest announcement read. NATS bounds a message (1 MiB by default); this keeps
/// what a parsed tool list may cost well below that, per instance.
const MAX_ANNOUNCEMENT_BYTES: usize = 256 * 1024;

/// Most tools one announcement may list: each one is sent to the model on every turn.
const MAX_TOOLS: usize = 128;

/// Largest input schema of one tool, as JSON.
const MAX_SCHEMA_BYTES: usize = 32 * 1024;

/// Longest description of one tool.
const MAX_DESCRIPTION_BYTES: usize = 8 * 1024;

/// Longest tool name (MCP's rule, which providers' function names fit after the
/// extension's prefix), instance id or version.
const MAX_NAME_BYTES: usize = 128;

/// Most live instances of one extension kept: beyond it new instance ids are ignored,
/// so announcements with ever new ids cannot grow a worker's memory.
const MAX_INSTANCES: usize = 64;

/// A call's own time limit. The agent's tool timeout (the caller's) is what ends a
/// call; this only bounds a request whose caller forgot to.
const CALL_BACKSTOP: Duration = Duration::from_secs(3600);

/// At most one warning about bad announcements of an extension this often; the
/// others are counted and logged at debug.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Waits between attempts to subscribe to announcements while the broker refuses.
const SUBSCRIBE_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(200))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

pub(super) fn discover(
    key: &ResourceKey,
    context: &ConnectContext,
    stop: CancellationToken,
) -> Arc<dyn Connection> {
    let (sender, listing) = watch::channel(Listing::Starting);
    let watcher = Watcher {
        key: key.clone(),
        name: key.to_string(),
        broker: context.broker.clone(),
        listing: sender,
        instances: HashMap::new(),
        joined: 0,
        started: Instant::now(),
        gone: None,
        warnings: Throttle::default(),
    };
    tokio::spawn(watcher.run(stop));
    Arc::new(NatsExtension {
        key: key.clone(),
        call_subject: subject::extension_call(key),
        broker: context.broker.clone(),
        listing,
    })
}

struct NatsExtension {
    key: ResourceKey,
    call_subject: String,
    broker: Arc<dyn Broker>,
    listing: watch::Receiver<Listing>,
}

#[async_trait]
impl Connection for NatsExtension {
    fn listing(&self) -> watch::Receiver<Listing> {
        self.listing.clone()
    }

    async fn call(&self, tool: &str, arguments: Value) -> Result<String, ToolError> {
        let call_id = uuid::Uuid::new_v4().simple().to_string();
        let request = json!({"tool": tool, "arguments": arguments, "callId": call_id});
        tracing::debug!(extension = %self.key, tool, call_id, "calling extension tool");
        let reply = self
            .broker
            .request(
                &self.call_subject,
                Bytes::from(request.to_string()),
                CALL_BACKSTOP,
            )
            .await
            .map_err(|err| match err {
                BrokerError::NoResponders(_) => ToolError::Failed(format!(
                    "extension {} has no running instance (nothing answers on {})",
                    self.key, self.call_subject
                )),
                BrokerError::Timeout { timeout, .. } => ToolError::Timeout(timeout),
                other => ToolError::Failed(format!("calling extension {}: {other}", self.key)),
            })?;
        let outcome = call_outcome(&reply.payload);
        if let Err(err) = &outcome {
            tracing::debug!(extension = %self.key, tool, call_id, error = %err, "extension tool failed");
        }
        outcome
    }
}

/// A call's reply: `{content}` or `{error}` (the error wins when both are there).
#[derive(Deserialize)]
struct WireReply {
    content: Option<String>,
    error: Option<String>,
}

fn call_outcome(payload: &[u8]) -> Result<String, ToolError> {
    let reply: WireReply = serde_json::from_slice(payload).map_err(|err| {
        ToolError::Failed(format!(
            "the extension's reply is not a protocol {PROTOCOL} reply: {err}"
        ))
    })?;
    match reply {
        WireReply {
            error: Some(error), ..
        } => Err(ToolError::Failed(error)),
        WireReply {
            content: Some(content),
            ..
        } => Ok(content),
        _ => Err(ToolError::Failed(
            "the extension's reply has neither `content` nor `error`".to_owned(),
        )),
    }
}

/// What an instance of this extension said.
#[derive(Debug, PartialEq)]
enum Announcement {
    Alive {
        instance: String,
        version: String,
        heartbeat: Duration,
        tools: Vec<RemoteTool>,
    },
    /// A goodbye: the instance stops now.
    Leaving { instance: String },
}

/// Why an announcement was ignored.
#[derive(Debug, PartialEq, thiserror::Error)]
enum AnnouncementError {
    /// Not JSON naming an extension: nobody's to warn about.
    #[error("not an announcement: {0}")]
    Unaddressed(String),
    #[error("{0} bytes, more than the {MAX_ANNOUNCEMENT_BYTES} an announcement may have")]
    TooLarge(usize),
    #[error("no `protocol`")]
    NoProtocol,
    #[error("protocol {0}; this worker speaks protocol {PROTOCOL}")]
    Protocol(u64),
    #[error("{0}")]
    Json(String),
    #[error("`{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("{0} tools, more than the {MAX_TOOLS} an announcement may list")]
    TooManyTools(usize),
    #[error("tool `{tool}`: {problem}")]
    Tool { tool: String, problem: String },
}

/// Enough of an announcement to tell whose it is. Everything else is skipped without
/// being kept, whatever its size.
#[derive(Deserialize)]
struct Head {
    extension: String,
    protocol: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAnnouncement {
    protocol: u64,
    instance: String,
    #[serde(default)]
    leaving: bool,
    version: Option<String>,
    heartbeat_interval_ms: Option<u64>,
    tools: Option<Vec<WireTool>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTool {
    name: String,
    #[serde(default)]
    description: String,
    input_schema: Value,
    #[serde(default)]
    annotations: WireAnnotations,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAnnotations {
    read_only_hint: Option<bool>,
    destructive_hint: Option<bool>,
    idempotent_hint: Option<bool>,
    open_world_hint: Option<bool>,
}

/// Reads an announcement on the shared subject: `None` when it is another
/// extension's.
fn parse(payload: &[u8], extension: &str) -> Result<Option<Announcement>, AnnouncementError> {
    let head: Head = serde_json::from_slice(payload)
        .map_err(|err| AnnouncementError::Unaddressed(err.to_string()))?;
    if head.extension != extension {
        return Ok(None);
    }
    if payload.len() > MAX_ANNOUNCEMENT_BYTES {
        return Err(AnnouncementError::TooLarge(payload.len()));
    }
    if head.protocol.is_none() {
        return Err(AnnouncementError::NoProtocol);
    }
    let wire: WireAnnouncement =
        serde_json::from_slice(payload).map_err(|err| AnnouncementError::Json(err.to_string()))?;
    if wire.protocol != PROTOCOL {
        return Err(AnnouncementError::Protocol(wire.protocol));
    }
    check_label("instance", &wire.instance)?;
    if wire.leaving {
        return Ok(Some(Announcement::Leaving {
            instance: wire.instance,
        }));
    }
    let missing = |field| AnnouncementError::Field {
        field,
        problem: "is missing".to_owned(),
    };
    let version = wire.version.ok_or_else(|| missing("version"))?;
    check_label("version", &version)?;
    let heartbeat = Duration::from_millis(
        wire.heartbeat_interval_ms
            .ok_or_else(|| missing("heartbeatIntervalMs"))?,
    );
    if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&heartbeat) {
        return Err(AnnouncementError::Field {
            field: "heartbeatIntervalMs",
            problem: format!(
                "is {heartbeat:?}; it must be from {MIN_HEARTBEAT:?} to {MAX_HEARTBEAT:?}"
            ),
        });
    }
    let wire_tools = wire.tools.ok_or_else(|| missing("tools"))?;
    if wire_tools.len() > MAX_TOOLS {
        return Err(AnnouncementError::TooManyTools(wire_tools.len()));
    }
    let mut names = HashSet::new();
    let mut tools = Vec::with_capacity(wire_tools.len());
    for tool in wire_tools {
        let problem = |problem: String| AnnouncementError::Tool {
            tool: tool.name.chars().take(MAX_NAME_BYTES).collect(),
            problem,
        };
        if let Err(reason) = check_tool_name(&tool.name) {
            return Err(problem(reason));
        }
        if !names.insert(tool.name.clone()) {
            return Err(problem("is listed twice".to_owned()));
        }
        if tool.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(problem(format!(
                "its description has more than {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
        if !tool.input_schema.is_object() {
            return Err(problem("its inputSchema is not a JSON object".to_owned()));
        }
        let schema_bytes = tool.input_schema.to_string().len();
        if schema_bytes > MAX_SCHEMA_BYTES {
            return Err(problem(format!(
                "its inputSchema has {schema_bytes} bytes, more than {MAX_SCHEMA_BYTES}"
            )));
        }
        let annotations = ToolAnnotations {
            read_only_hint: tool.annotations.read_only_hint,
            destructive_hint: tool.annotations.destructive_hint,
            idempotent_hint: tool.annotations.idempotent_hint,
            open_world_hint: tool.annotations.open_world_hint,
        };
        tools.push(RemoteTool {
            name: tool.name,
            description: tool.description,
            input_schema: tool.input_schema,
            annotations,
        });
    }
    Ok(Some(Announcement::Alive {
        instance: wire.instance,
        version,
        heartbeat,
        tools,
    }))
}

/// An instance id or version: printable, 1 to [`MAX_NAME_BYTES`] bytes (it is logged).
fn check_label(field: &'static str, value: &str) -> Result<(), AnnouncementError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
        return Err(AnnouncementError::Field {
            field,
            problem: format!("must have 1 to {MAX_NAME_BYTES} bytes and no control characters"),
        });
    }
    Ok(())
}

/// MCP's rule for tool names: 1 to 128 of `A-Z a-z 0-9 _ - .`.
fn check_tool_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.chars().all(ok) {
        return Err(format!(
            "the name must have 1 to {MAX_NAME_BYTES} characters of A-Z, a-z, 0-9, `_`, `-` and `.`"
        ));
    }
    Ok(())
}

/// One live instance of the extension.
struct Instance {
    version: String,
    tools: Arc<[RemoteTool]>,
    /// Dropped once this passes without a new announcement.
    expires: Instant,
    heartbeat: Duration,
    /// Order of first announcement: the newest instance's tools are offered.
    joined: u64,
}

/// Counts warnings so that at most one is logged per [`WARN_EVERY`].
#[derive(Default)]
struct Throttle {
    next: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + WARN_EVERY);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Follows one extension's announcements and publishes what it offers.
struct Watcher {
    key: ResourceKey,
    /// `namespace/name`, as announcements name it.
    name: String,
    broker: Arc<dyn Broker>,
    listing: watch::Sender<Listing>,
    instances: HashMap<String, Instance>,
    /// Instances that joined so far.
    joined: u64,
    started: Instant,
    /// Why the last instance went, once one went and none is left.
    gone: Option<String>,
    warnings: Throttle,
}

impl Watcher {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let mut announcements = tokio::select! {
                () = stop.cancelled() => return,
                subscribed = self.subscribe() => subscribed,
            };
            self.expire(Instant::now());
            self.ask_to_announce().await;
            loop {
                let deadline = self.next_deadline();
                tokio::select! {
                    () = stop.cancelled() => return,
                    message = announcements.next() => match message {
                        Some(message) => self.receive(&message.payload, Instant::now()),
                        None => {
                            tracing::warn!(extension = %self.key, "the announcement subscription ended; subscribing again");
                            break;
                        }
                    },
                    () = sleep_until(deadline) => self.expire(Instant::now()),
                }
            }
        }
    }

    /// Subscribes to announcements, trying again while the broker refuses.
    async fn subscribe(&self) -> Subscription {
        let subscribe = || self.broker.subscribe(subject::EXTENSION_ANNOUNCE);
        subscribe
            .retry(SUBSCRIBE_BACKOFF)
            .notify(|err, wait| {
                tracing::warn!(extension = %self.key, error = %err, ?wait, "cannot subscribe to extension announcements; trying again");
            })
            .await
            .expect("retried without limit")
    }

    /// Asks running instances to announce now; without it the tools would come with
    /// the next heartbeat.
    async fn ask_to_announce(&self) {
        let request = json!({"protocol": PROTOCOL, "extension": self.name});
        if let Err(err) = self
            .broker
            .publish(
                subject::EXTENSION_DISCOVER,
                Bytes::from(request.to_string()),
            )
            .await
        {
            tracing::warn!(extension = %self.key, error = %err, "cannot ask the extension to announce; waiting for its heartbeat");
        }
    }

    fn receive(&mut self, payload: &[u8], now: Instant) {
        match parse(payload, &self.name) {
            Ok(None) => return,
            Ok(Some(Announcement::Alive {
                instance,
                version,
                heartbeat,
                tools,
            })) => self.alive(instance, version, heartbeat, tools, now),
            Ok(Some(Announcement::Leaving { instance })) => {
                if let Some(gone) = self.instances.remove(&instance) {
                    tracing::info!(extension = %self.key, instance, version = gone.version, "extension instance left");
                    self.gone = Some(format!(
                        "the last instance ({instance}, version {}) left",
                        gone.version
                    ));
                }
            }
            Err(AnnouncementError::Unaddressed(err)) => {
                tracing::debug!(extension = %self.key, error = err, "ignoring a message on the announcement subject");
                return;
            }
            Err(err) => self.warn(now, &format!("ignoring an announcement: {err}")),
        }
        self.publish_listing(now);
    }

    fn alive(
        &mut self,
        instance: String,
        version: String,
        heartbeat: Duration,
        tools: Vec<RemoteTool>,
        now: Instant,
    ) {
        let expires = now + heartbeat * MISSED_HEARTBEATS;
        if let Some(known) = self.instances.get_mut(&instance) {
            known.expires = expires;
            known.heartbeat = heartbeat;
            if known.version != version || *known.tools != *tools {
                tracing::info!(extension = %self.key, instance, version, tools = tools.len(), "extension instance changed its tools");
                known.version = version;
                known.tools = tools.into();
            }
            return;
        }
        if self.instances.len() >= MAX_INSTANCES {
            self.warn(
                now,
                &format!(
                    "ignoring instance {instance}: {MAX_INSTANCES} instances already announce"
                ),
            );
            return;
        }
        tracing::info!(extension = %self.key, instance, version, tools = tools.len(), ?heartbeat, "extension instance announced");
        // Instances of one version announce the same tools: they share one list.
        let tools = self
            .instances
            .values()
            .find(|other| *other.tools == *tools)
            .map_or_else(|| tools.into(), |other| other.tools.clone());
        self.joined += 1;
        self.instances.insert(
            instance,
            Instance {
                version,
                tools,
                expires,
                heartbeat,
                joined: self.joined,
            },
        );
    }

    /// Drops the instances whose heartbeats stopped.
    fn expire(&mut self, now: Instant) {
        let key = &self.key;
        let mut gone = None;
        self.instances.retain(|id, instance| {
            let alive = instance.expires > now;
            if !alive {
                tracing::info!(extension = %key, instance = id, version = instance.version, "extension instance dropped: its heartbeats stopped");
                gone = Some(format!(
                    "heartbeats stopped: the last instance ({id}, version {}) missed {MISSED_HEARTBEATS} heartbeats of {:?}",
                    instance.version, instance.heartbeat
                ));
            }
            alive
        });
        if gone.is_some() {
            self.gone = gone;
        }
        self.publish_listing(now);
    }

    fn publish_listing(&mut self, now: Instant) {
        let listing = match self.instances.values().max_by_key(|i| i.joined) {
            Some(newest) => Listing::Ready(newest.tools.clone()),
            None => match &self.gone {
                Some(reason) => Listing::Failed(reason.clone()),
                None if now >= self.started + FIRST_ANNOUNCEMENT_WAIT => Listing::Failed(format!(
                    "no instance announced within {}s",
                    FIRST_ANNOUNCEMENT_WAIT.as_secs()
                )),
                None => Listing::Starting,
            },
        };
        self.listing.send_if_modified(|current| {
            let changed = match (&*current, &listing) {
                (Listing::Ready(a), Listing::Ready(b)) => !Arc::ptr_eq(a, b) && a != b,
                (a, b) => a != b,
            };
            if changed {
                *current = listing;
            }
            changed
        });
    }

    /// When to look at the instances again: the first expiry, or the end of the wait
    /// for a first announcement.
    fn next_deadline(&self) -> Option<Instant> {
        let first_wait = (self.joined == 0).then_some(self.started + FIRST_ANNOUNCEMENT_WAIT);
        self.instances
            .values()
            .map(|i| i.expires)
            .chain(first_wait.filter(|_| matches!(*self.listing.borrow(), Listing::Starting)))
            .min()
    }

    fn warn(&mut self, now: Instant, what: &str) {
        match self.warnings.allow(now) {
            Some(suppressed) => {
                tracing::warn!(extension = %self.key, suppressed, "{what}")
            }
            None => tracing::debug!(extension = %self.key, "{what}"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;

    const TEXT: &str = "default/text";

    fn announcement(tools: Value) -> Value {
        json!({
            "protocol": 1,
            "extension": TEXT,
            "instance": "i-1",
            "version": "1.0.0",
            "heartbeatIntervalMs": 200,
            "tools": tools,
            "someFutureField": {"ignored": true},
        })
    }

    fn word_count() -> Value {
        json!({
            "name": "word_count",
            "description": "Counts words.",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
            "annotations": {"readOnlyHint": true, "title": "unknown to this worker"},
        })
    }

    fn parsed(value: &Value) -> Result<Option<Announcement>, AnnouncementError> {
        parse(value.to_string().as_bytes(), TEXT)
    }

    #[test]
    fn an_announcement_is_read_with_unknown_fields_and_annotations() {
        let Some(Announcement::Alive {
            instance,
            version,
            heartbeat,
            tools,
        }) = parsed(&announcement(json!([word_count()]))).unwrap()
        else {
            panic!("not an alive announcement");
        };
        assert_eq!((instance.as_str(), version.as_str()), ("i-1", "1.0.0"));
        assert_eq!(heartbeat, Duration::from_millis(200));
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].name, "word_count");
        assert_eq!(tools[0].annotations.read_only_hint, Some(true));
        assert_eq!(tools[0].annotations.destructive_hint, None);
    }

    #[test]
    fn other_extensions_and_non_announcements_are_told_apart() {
        let mut other = announcement(json!([]));
        other["extension"] = json!("default/other");
        assert_eq!(parsed(&other), Ok(None));
        // Another extension's announcement is not judged, even a bad one.
        other["tools"] = json!("nonsense");
        assert_eq!(parsed(&other), Ok(None));
        assert!(matches!(
            parse(b"not json", TEXT),
            Err(AnnouncementError::Unaddressed(_))
        ));
        assert!(matches!(
            parse(br#"{"protocol": 1}"#, TEXT),
            Err(AnnouncementError::Unaddressed(_))
        ));
    }

    #[test]
    fn announcements_beyond_the_bounds_are_refused() {
        let too_many: Vec<Value> = (0..=MAX_TOOLS)
            .map(|i| {
                let mut tool = word_count();
                tool["name"] = json!(format!("t{i}"));
                tool
            })
            .collect();
        assert_eq!(
            parsed(&announcement(Value::Array(too_many))),
            Err(AnnouncementError::TooManyTools(MAX_TOOLS + 1))
        );

        let mut big_schema = word_count();
        big_schema["inputSchema"]["description"] = json!("x".repeat(MAX_SCHEMA_BYTES));
        assert!(matches!(
            parsed(&announcement(json!([big_schema]))),
            Err(AnnouncementError::Tool { problem, .. }) if problem.contains("inputSchema has")
        ));

        let mut huge = announcement(json!([]));
        huge["padding"] = json!("x".repeat(MAX_ANNOUNCEMENT_BYTES));
        assert!(matches!(parsed(&huge), Err(AnnouncementError::TooLarge(_))));

        let mut fast = announcement(json!([]));
        fast["heartbeatIntervalMs"] = json!(10);
        assert!(matches!(
            parsed(&fast),
            Err(AnnouncementError::Field {
                field: "heartbeatIntervalMs",
                ..
            })
        ));
    }

    #[test]
    fn malformed_announcements_of_this_extension_are_errors() {
        let mut twice = announcement(json!([word_count(), word_count()]));
        assert!(matches!(
            parsed(&twice),
            Err(AnnouncementError::Tool { problem, .. }) if problem == "is listed twice"
        ));
        twice["tools"] = json!([{"name": "bad name", "inputSchema": {}}]);
        assert!(matches!(
            parsed(&twice),
            Err(AnnouncementError::Tool { .. })
        ));
        twice["tools"] = json!([{"name": "t", "inputSchema": "a string"}]);
        assert!(matches!(
            parsed(&twice),
            Err(AnnouncementError::Tool { .. })
        ));
        let mut newer = announcement(json!([]));
        newer["protocol"] = json!(2);
        assert_eq!(parsed(&newer), Err(AnnouncementError::Protocol(2)));
        newer.as_object_mut().unwrap().remove("protocol");
        assert_eq!(parsed(&newer), Err(AnnouncementError::NoProtocol));
        let mut no_version = announcement(json!([]));
        no_version.as_object_mut().unwrap().remove("version");
        assert!(matches!(
            parsed(&no_version),
            Err(AnnouncementError::Field {
                field: "version",
                ..
            })
        ));
        // A goodbye needs no tools.
        let leaving = json!({"protocol": 1, "extension": TEXT, "instance": "i-1", "leaving": true});
        assert_eq!(
            parsed(&leaving),
            Ok(Some(Announcement::Leaving {
                instance: "i-1".to_owned()
            }))
        );
    }

    #[test]
    fn replies_are_content_or_errors() {
        assert_eq!(
            call_outcome(br#"{"content": "3", "extra": 1}"#).unwrap(),
            "3"
        );
        assert!(matches!(
            call_outcome(br#"{"error": "no such city", "content": "x"}"#),
            Err(ToolError::Failed(e)) if e == "no such city"
        ));
        assert!(matches!(call_outcome(b"{}"), Err(ToolError::Failed(_))));
        assert!(matches!(call_outcome(b"[1]"), Err(ToolError::Failed(_))));
    }

    async fn wait_for_listing(
        listing: &mut watch::Receiver<Listing>,
        wanted: impl Fn(&Listing) -> bool,
    ) -> Listing {
        tokio::time::timeout(Duration::from_secs(5), listing.wait_for(|l| wanted(l)))
            .await
            .expect("the listing changes in time")
            .expect("the watcher runs")
            .clone()
    }

    /// On the in-process bus: a discovery request is answered with an announcement,
    /// a call without an instance is a clear tool error, and the tools go when the
    /// heartbeats stop.
    #[tokio::test]
    async fn discovery_calls_and_expiry_on_the_local_bus() {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let mut asks = broker.subscribe(subject::EXTENSION_DISCOVER).await.unwrap();
        let stop = CancellationToken::new();
        let context = ConnectContext {
            broker: broker.clone(),
            secrets: crate::secrets::Secrets::new("/nonexistent"),
        };
        let key = ResourceKey::new("default", "text");
        let connection = discover(&key, &context, stop.clone());
        let mut listing = connection.listing();
        assert_eq!(*listing.borrow(), Listing::Starting);

        let asked = tokio::time::timeout(Duration::from_secs(5), asks.next())
            .await
            .unwrap()
            .unwrap();
        let asked: Value = serde_json::from_slice(&asked.payload).unwrap();
        assert_eq!(asked["extension"], TEXT);
        broker
            .publish(
                subject::EXTENSION_ANNOUNCE,
                Bytes::from(announcement(json!([word_count()])).to_string()),
            )
            .await
            .unwrap();
        let ready = wait_for_listing(&mut listing, |l| matches!(l, Listing::Ready(_))).await;
        let Listing::Ready(tools) = ready else {
            unreachable!()
        };
        assert_eq!(tools[0].name, "word_count");

        let err = connection.call("word_count", json!({})).await.unwrap_err();
        assert!(
            matches!(&err, ToolError::Failed(e) if e.contains("has no running instance")),
            "{err:?}"
        );

        let failed = wait_for_listing(&mut listing, |l| matches!(l, Listing::Failed(_))).await;
        assert!(
            matches!(&failed, Listing::Failed(e) if e.starts_with("heartbeats stopped")),
            "{failed:?}"
        );
        stop.cancel();
    }
}
