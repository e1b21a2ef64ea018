//! NATS subject names and subject matching.
//!
//! Every subject nexo publishes on is built here, so the encoding of agent and channel
//! names lives in one place. A resource key becomes two tokens, `namespace.name`;
//! both parts are DNS-1123 labels, so they never contain `.`, `*`, `>` or spaces.

use crate::name::ResourceKey;

/// A user's message, normalised by a channel instance.
pub fn inbound(channel_type: &str, instance: &ResourceKey) -> String {
    format!("plugin.inbound.{channel_type}.{}", tokens(instance))
}

/// Everything inbound, on every channel.
pub const INBOUND_ALL: &str = "plugin.inbound.>";

/// Whether `subject` carries a user's message into the system (what a channel
/// publishes), as opposed to work that follows from a message already accepted.
pub fn is_inbound(subject: &str) -> bool {
    subject.starts_with("plugin.inbound.")
}

/// A reply to hand to the platform behind a channel instance.
pub fn outbound(channel_type: &str, instance: &ResourceKey) -> String {
    format!("plugin.outbound.{channel_type}.{}", tokens(instance))
}

/// A reply for a channel instance that sends to a platform's API (Telegram, WhatsApp,
/// Slack): durable, and taken by one worker of the pool, which sends it (again, after
/// a failure) until the platform accepted it. Such channels name it as the `replyTo`
/// of their inbound messages.
pub fn delivery(channel_type: &str, instance: &ResourceKey) -> String {
    format!("plugin.delivery.{channel_type}.{}", tokens(instance))
}

/// The durable consumer (shared by a pool's workers) sending a channel instance's
/// [`delivery`] subject.
pub fn delivery_consumer(channel_type: &str, instance: &ResourceKey) -> String {
    format!(
        "delivery_{channel_type}_{}_{}",
        instance.namespace, instance.name
    )
}

/// The health of a channel instance that talks to a platform (see
/// `report::ChannelConnection`), published by the worker that saw it.
pub fn channel_health(channel_type: &str, instance: &ResourceKey) -> String {
    format!("plugin.health.{channel_type}.{}", tokens(instance))
}

/// Whether `subject` is a channel's health report ([`channel_health`]): worth
/// nothing later, so it skips the outbox.
pub fn is_channel_health(subject: &str) -> bool {
    subject.starts_with("plugin.health.")
}

/// Work for one agent.
pub fn agent_route(agent: &ResourceKey) -> String {
    format!("agent.route.{}", tokens(agent))
}

/// What an agent did (turn started / finished, tool calls, errors).
pub fn agent_events(agent: &ResourceKey) -> String {
    format!("agent.events.{}", tokens(agent))
}

/// Prefix of the subjects of reply deltas ([`reply_deltas`]).
pub const REPLY_DELTAS_PREFIX: &str = "reply.deltas";

/// Where the deltas of one reply's text go while the model writes it (the envelope's
/// `stream`): one subject per watched message, `id` chosen by whoever watches. Core
/// NATS only, in no durable stream: a delta is worth nothing later.
pub fn reply_deltas(id: &uuid::Uuid) -> String {
    format!("{REPLY_DELTAS_PREFIX}.{}", id.simple())
}

/// Whether `subject` is one [`reply_deltas`] builds: the only subjects an agent
/// publishes deltas on, whatever an envelope's `stream` says.
pub fn is_reply_deltas(subject: &str) -> bool {
    subject
        .strip_prefix(REPLY_DELTAS_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Calls to a NATS extension's tools (request/reply).
pub fn extension_call(extension: &ResourceKey) -> String {
    format!("ext.{}.call", tokens(extension))
}

/// Where NATS extensions announce themselves and the tools they offer.
pub const EXTENSION_ANNOUNCE: &str = "ext.announce";

/// Where a worker that starts asks NATS extensions to announce at once, rather than
/// wait up to a heartbeat interval for their next announcement.
pub const EXTENSION_DISCOVER: &str = "ext.discover";

/// Durable consumer (JetStream consumer name, local queue group) of one agent's
/// work, shared by every worker that may run the agent. `_` never occurs in
/// DNS-1123 names, so the encoding cannot collide.
pub fn agent_consumer(agent: &ResourceKey) -> String {
    format!("agent_{}_{}", agent.namespace, agent.name)
}

/// The memory journal of one agent: every change to its memory, in order, appended
/// by the worker that owns the agent (see `MEMORY_JOURNAL_STREAM`).
pub fn memory_journal(agent: &ResourceKey) -> String {
    format!("memory.journal.{}", tokens(agent))
}

/// The JetStream stream of every agent's memory journal. Not a work queue: entries
/// stay until a snapshot that includes them is stored.
pub const MEMORY_JOURNAL_STREAM: &str = "NEXO_MEMORY_JOURNAL";

/// Subjects of [`MEMORY_JOURNAL_STREAM`].
pub const MEMORY_JOURNAL_ALL: &str = "memory.journal.>";

/// The JetStream object store holding each agent's newest memory snapshot, named
/// [`memory_snapshot`].
pub const MEMORY_SNAPSHOT_BUCKET: &str = "nexo-memory-snapshots";

/// The object name of an agent's memory snapshot.
pub fn memory_snapshot(agent: &ResourceKey) -> String {
    format!("{}.{}", agent.namespace, agent.name)
}

/// The JetStream key-value bucket of partition leases.
pub const LEASE_BUCKET: &str = "nexo-leases";

/// The key of the lease on partition `partition` of pool `pool` (pool names are
/// DNS labels, so no `.` occurs inside one).
pub fn partition_lease(pool: &str, partition: u32) -> String {
    format!("{pool}.{partition}")
}

/// The key of worker `ordinal`'s presence in [`LEASE_BUCKET`]: held like a lease by
/// the live worker of that ordinal; the others adopt the partitions of an ordinal that
/// is absent.
pub fn worker_presence(pool: &str, ordinal: u32) -> String {
    format!("{pool}.worker-{ordinal}")
}

/// Durable consumer that routes one channel instance's inbound messages.
pub fn inbound_consumer(channel_type: &str, instance: &ResourceKey) -> String {
    format!(
        "router_{channel_type}_{}_{}",
        instance.namespace, instance.name
    )
}

/// A JetStream stream that keeps messages of durable subjects until a consumer has
/// handled them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableStream {
    pub name: &'static str,
    pub subjects: &'static str,
}

/// Work for agents and users' messages are kept until handled; replies and events
/// are not.
pub const DURABLE_STREAMS: [DurableStream; 3] = [
    DurableStream {
        name: "NEXO_AGENT_ROUTE",
        subjects: "agent.route.>",
    },
    DurableStream {
        name: "NEXO_PLUGIN_INBOUND",
        subjects: INBOUND_ALL,
    },
    DurableStream {
        name: "NEXO_PLUGIN_DELIVERY",
        subjects: "plugin.delivery.>",
    },
];

/// The durable stream `subject` belongs to, if any.
pub fn durable_stream(subject: &str) -> Option<&'static DurableStream> {
    DURABLE_STREAMS
        .iter()
        .find(|s| matches(s.subjects, subject))
}

/// Prefix of reply inboxes used for request/reply.
pub const INBOX_PREFIX: &str = "_INBOX";

fn tokens(key: &ResourceKey) -> String {
    format!("{}.{}", key.namespace, key.name)
}

/// Why a subject or a subscription pattern is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject `{0}` has an empty token")]
    EmptyToken(String),
    #[error("subject `{0}` contains whitespace")]
    Whitespace(String),
    #[error("subject `{0}` contains a wildcard; only subscriptions may use `*` and `>`")]
    WildcardInPublish(String),
    #[error("in `{0}`, `>` must be a whole token and the last one")]
    MisplacedTail(String),
    #[error("in `{0}`, `*` must be a whole token")]
    MisplacedStar(String),
}

/// Checks a subject a message may be published on: non-empty tokens, no wildcards.
pub fn check_publish(subject: &str) -> Result<(), SubjectError> {
    check_tokens(subject)?;
    if subject.split('.').any(|t| t.contains(['*', '>'])) {
        return Err(SubjectError::WildcardInPublish(subject.to_owned()));
    }
    Ok(())
}

/// Checks a subscription pattern: `*` matches one whole token, `>` one or more
/// trailing tokens and only as the last token.
pub fn check_pattern(pattern: &str) -> Result<(), SubjectError> {
    check_tokens(pattern)?;
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.contains('>') && (*token != ">" || i + 1 != tokens.len()) {
            return Err(SubjectError::MisplacedTail(pattern.to_owned()));
        }
        if token.contains('*') && *token != "*" {
            return Err(SubjectError::MisplacedStar(pattern.to_owned()));
        }
    }
    Ok(())
}

fn check_tokens(subject: &str) -> Result<(), SubjectError> {
    if subject.is_empty() {
        return Err(SubjectError::Empty);
    }
    if subject.contains(char::is_whitespace) {
        return Err(SubjectError::Whitespace(subject.to_owned()));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(SubjectError::EmptyToken(subject.to_owned()));
    }
    Ok(())
}

/// Whether `subject` (a concrete subject) matches `pattern` (which may hold wildcards),
/// with NATS semantics. Both are assumed valid (see [`check_publish`], [`check_pattern`]).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let agent = ResourceKey::new("default", "concierge");
        assert_eq!(agent_route(&agent), "agent.route.default.concierge");
        assert_eq!(agent_events(&agent), "agent.events.default.concierge");
        let web = ResourceKey::new("team-a", "web");
        assert_eq!(
            inbound("webchat", &web),
            "plugin.inbound.webchat.team-a.web"
        );
        assert_eq!(
            outbound("webchat", &web),
            "plugin.outbound.webchat.team-a.web"
        );
        assert!(matches(INBOUND_ALL, &inbound("webchat", &web)));
        assert_eq!(
            durable_stream(&agent_route(&agent)).unwrap().name,
            "NEXO_AGENT_ROUTE"
        );
        assert_eq!(
            durable_stream(&inbound("webchat", &web)).unwrap().name,
            "NEXO_PLUGIN_INBOUND"
        );
        assert_eq!(durable_stream(&outbound("webchat", &web)), None);
        assert_eq!(
            durable_stream(&delivery("telegram", &web)).unwrap().name,
            "NEXO_PLUGIN_DELIVERY"
        );
        assert_eq!(durable_stream(&agent_events(&agent)), None);
        let weather = ResourceKey::new("team-a", "weather");
        assert_eq!(extension_call(&weather), "ext.team-a.weather.call");
        assert_eq!(durable_stream(&extension_call(&weather)), None);
        let deltas = reply_deltas(&uuid::Uuid::now_v7());
        assert!(check_publish(&deltas).is_ok());
        assert!(is_reply_deltas(&deltas), "{deltas}");
        assert_eq!(durable_stream(&deltas), None);
        assert!(!is_reply_deltas("reply.deltas.x"));
        assert!(!is_reply_deltas(&agent_route(&agent)));
    }

    #[test]
    fn matching_edge_cases() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.b", "a.b.c", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*", "a.b.c", false),
            ("a.*", "a", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            // `>` needs at least one token after the prefix.
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*.>", "a.b", true),
            ("*.>", "a", false),
            ("a.*.>", "a.b.c", true),
            ("a.*.>", "a.b", false),
            // Tokens compare whole, not as prefixes.
            ("ab.c", "a.c", false),
            ("a.b", "a.bc", false),
            ("a.b*", "a.bc", false),
        ];
        for (pattern, subject, expected) in cases {
            assert_eq!(
                matches(pattern, subject),
                expected,
                "{pattern} vs {subject}"
            );
        }
    }

    #[test]
    fn invalid_patterns_and_subjects() {
        assert_eq!(check_publish(""), Err(SubjectError::Empty));
        assert!(matches!(
            check_publish("a..b"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            check_publish(".a"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            check_publish("a."),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            check_publish("a b"),
            Err(SubjectError::Whitespace(_))
        ));
        assert!(matches!(
            check_publish("a.*"),
            Err(SubjectError::WildcardInPublish(_))
        ));
        assert!(matches!(
            check_publish("a.>"),
            Err(SubjectError::WildcardInPublish(_))
        ));
        assert!(matches!(
            check_pattern("a.>.b"),
            Err(SubjectError::MisplacedTail(_))
        ));
        assert!(matches!(
            check_pattern("a.b>"),
            Err(SubjectError::MisplacedTail(_))
        ));
        assert!(matches!(
            check_pattern("a.b*"),
            Err(SubjectError::MisplacedStar(_))
        ));
        assert!(check_pattern("a.*.>").is_ok());
        assert!(check_publish("_INBOX.abc.1").is_ok());
    }
}
