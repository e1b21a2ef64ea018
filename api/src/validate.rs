//! Checks a [`WorkerConfig`] beyond what its types enforce: names, references between
//! resources and cross-field rules. Each problem carries the path of the offending
//! value in the document, so a loader can point at the line.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::config::{BrokerSettings, Catalog, Resource, WorkerConfig};
use crate::name::{ResourceKey, check_dns_label};
use crate::spec::{
    AgentSpec, BROWSER_TOOLS, ChannelSpec, EmbedderProvider, ExtensionSpec, MEMORY_TOOLS,
    MemorySpec, ModelProvider, ModelSpec, NoFallbacks, SecretRef, TelegramMode, TelegramSpec,
};

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// Location of a value in the config document, e.g. `agents[1].spec.delegates[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocPath(pub Vec<PathSegment>);

impl DocPath {
    fn key(&self, key: &str) -> Self {
        let mut next = self.0.clone();
        next.push(PathSegment::Key(key.to_owned()));
        Self(next)
    }

    fn index(&self, index: usize) -> Self {
        let mut next = self.0.clone();
        next.push(PathSegment::Index(index));
        Self(next)
    }
}

impl fmt::Display for DocPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(key) if i == 0 => write!(f, "{key}")?,
                PathSegment::Key(key) => write!(f, ".{key}")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A rule the config breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: DocPath,
    pub message: String,
}

/// Longest tool name the model providers take: OpenAI and Anthropic both require
/// `^[a-zA-Z0-9_-]{1,64}$`.
pub const MAX_TOOL_NAME: usize = 64;

/// Name of the tool through which an agent delegates to `delegate`: `ask_<delegate>`.
/// An agent name is a DNS label (letters, digits, `-`, at most 63 characters), so only
/// the length can break the providers' rule: a name that would be longer than
/// [`MAX_TOOL_NAME`] keeps its first characters and ends in a hash of the whole name,
/// so it stays unique and stable.
pub fn delegate_tool_name(delegate: &str) -> String {
    fit_tool_name(format!("ask_{delegate}"))
}

/// Name under which the model sees tool `tool` of extension `extension`:
/// `<extension>__<tool>`, with every character outside the providers' set
/// (`[A-Za-z0-9_-]`) replaced by `_`, shortened like [`delegate_tool_name`]. The hash
/// is over the raw names, so two tools that differ only in such characters stay apart.
pub fn extension_tool_name(extension: &str, tool: &str) -> String {
    let raw = format!("{extension}__{tool}");
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == raw {
        fit_tool_name(clean)
    } else {
        with_hash(&clean, &raw)
    }
}

fn fit_tool_name(name: String) -> String {
    if name.len() <= MAX_TOOL_NAME {
        return name;
    }
    with_hash(&name, &name)
}

/// `name` cut to leave room for `_<hash of raw>`, within [`MAX_TOOL_NAME`].
fn with_hash(name: &str, raw: &str) -> String {
    let hash = xxhash_rust::xxh3::xxh3_64(raw.as_bytes());
    let keep = name.len().min(MAX_TOOL_NAME - 9);
    format!("{}_{:08x}", &name[..keep], hash as u32)
}

impl AgentSpec {
    /// Every secret this agent reads: the API keys of its model and fallbacks and the
    /// embedding API key.
    /// The operator mirrors their Secret keys into the pool; the worker reads them.
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretRef> {
        self.model
            .api_key
            .iter()
            .chain(
                self.model
                    .fallbacks
                    .iter()
                    .filter_map(|f| f.api_key.as_ref()),
            )
            .chain(&self.memory.long_term.embedder.api_key)
    }

    /// Names of every tool this agent may call: built-ins, delegation, memory and
    /// browser tools.
    pub fn tool_names(&self) -> Vec<String> {
        self.tools
            .iter()
            .map(|t| t.name().to_owned())
            .chain(self.delegates.iter().map(|d| delegate_tool_name(d)))
            .chain(
                self.memory
                    .tools_enabled()
                    .then_some(MEMORY_TOOLS.map(str::to_owned))
                    .into_iter()
                    .flatten(),
            )
            .chain(
                self.browser
                    .is_some()
                    .then_some(BROWSER_TOOLS.map(str::to_owned))
                    .into_iter()
                    .flatten(),
            )
            .collect()
    }
}

/// All problems in `config`, in document order. Empty means valid.
pub fn validate(config: &WorkerConfig) -> Vec<Problem> {
    let root = DocPath::default();
    let mut problems =
        validate_resources(&config.agents, &config.channels, &config.extensions, &root);
    if config.worker.catalog_file.is_some()
        && !(config.agents.is_empty() && config.channels.is_empty() && config.extensions.is_empty())
    {
        problems.push(Problem {
            path: root.key("worker").key("catalogFile"),
            message: "expected either `catalogFile` or `agents`/`channels`/`extensions` in this file, not both".to_owned(),
        });
    }
    if let Err(message) = check_dns_label(&config.worker.pool) {
        problems.push(Problem {
            path: root.key("worker").key("pool"),
            message,
        });
    }
    check_extension_refs(&config.agents, &config.extensions, &root, &mut problems);
    check_worker(config, &root, &mut problems);
    problems
}

/// All problems in a catalog file, in document order. Empty means valid.
pub fn validate_catalog(catalog: &Catalog) -> Vec<Problem> {
    let mut problems = validate_resources(
        &catalog.agents,
        &catalog.channels,
        &catalog.extensions,
        &DocPath::default(),
    );
    if let Some(placement) = catalog.placement
        && (placement.partitions == 0 || placement.workers == 0)
    {
        problems.push(Problem {
            path: DocPath::default().key("placement"),
            message: "expected `partitions` and `workers` of at least 1".to_owned(),
        });
    }
    problems
}

/// Names, references and per-spec rules of a set of resources (a config file's or a
/// catalog's), under `root`.
fn validate_resources(
    agents: &[Resource<AgentSpec>],
    channels: &[Resource<ChannelSpec>],
    extensions: &[Resource<ExtensionSpec>],
    root: &DocPath,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let agent_keys = check_names(agents, &root.key("agents"), &mut problems);
    check_names(channels, &root.key("channels"), &mut problems);
    check_names(extensions, &root.key("extensions"), &mut problems);

    for (i, agent) in agents.iter().enumerate() {
        let path = root.key("agents").index(i).key("spec");
        check_agent(agent, &agent_keys, &path, &mut problems);
    }
    check_delegation_cycles(agents, &root.key("agents"), &mut problems);

    let mut channel_names = HashSet::new();
    for (i, channel) in channels.iter().enumerate() {
        let path = root.key("channels").index(i);
        if !channel_names.insert(channel.name.as_str()) {
            problems.push(Problem {
                path: path.key("name"),
                message: format!(
                    "channel name `{}` is used twice; channel names are unique per worker because they appear in URLs",
                    channel.name
                ),
            });
        }
        let spec = path.key("spec");
        if channel.spec.channel_type().is_none() {
            problems.push(Problem {
                path: spec.clone(),
                message:
                    "expected exactly one of `webchat`, `webhook`, `telegram`, `whatsapp` or `slack`"
                        .to_owned(),
            });
        }
        let target = ResourceKey::new(&channel.namespace, &channel.spec.default_agent);
        if !agent_keys.contains(&target) {
            problems.push(Problem {
                path: spec.key("defaultAgent"),
                message: format!("agent `{target}` is not defined in `agents`"),
            });
        }
        for (r, route) in channel.spec.routes.iter().enumerate() {
            let path = spec.key("routes").index(r);
            let target = ResourceKey::new(&channel.namespace, &route.agent);
            if !agent_keys.contains(&target) {
                problems.push(Problem {
                    path: path.key("agent"),
                    message: format!("agent `{target}` is not defined in `agents`"),
                });
            }
            if route.when.is_empty() {
                problems.push(Problem {
                    path: path.key("match"),
                    message: "expected at least one of `conversation`, `sender`, `prefix` or `command` (a route without one would take every message; that is `defaultAgent`)".to_owned(),
                });
            }
        }
        if let Some(webhook) = &channel.spec.webhook
            && let Some(secret) = &webhook.signing_secret
        {
            check_secret_ref(
                secret,
                &spec.key("webhook").key("signingSecret"),
                &mut problems,
            );
        }
        if let Some(telegram) = &channel.spec.telegram {
            check_telegram(telegram, &spec.key("telegram"), &mut problems);
        }
        if let Some(whatsapp) = &channel.spec.whatsapp {
            let path = spec.key("whatsapp");
            for (secret, field) in [
                (&whatsapp.access_token, "accessToken"),
                (&whatsapp.app_secret, "appSecret"),
                (&whatsapp.verify_token, "verifyToken"),
            ] {
                check_secret_ref(secret, &path.key(field), &mut problems);
            }
            check_api_base_url(
                &whatsapp.api_base_url,
                &path.key("apiBaseUrl"),
                &mut problems,
            );
            if whatsapp.phone_number_id.is_empty()
                || !whatsapp.phone_number_id.bytes().all(|b| b.is_ascii_digit())
            {
                problems.push(Problem {
                    path: path.key("phoneNumberId"),
                    message: "expected the phone number's numeric id (not the phone number)"
                        .to_owned(),
                });
            }
        }
        if let Some(slack) = &channel.spec.slack {
            let path = spec.key("slack");
            check_secret_ref(&slack.bot_token, &path.key("botToken"), &mut problems);
            check_secret_ref(
                &slack.signing_secret,
                &path.key("signingSecret"),
                &mut problems,
            );
            check_api_base_url(&slack.api_base_url, &path.key("apiBaseUrl"), &mut problems);
        }
    }

    for (i, extension) in extensions.iter().enumerate() {
        let spec = &extension.spec;
        let set = [
            spec.stdio.is_some(),
            spec.http.is_some(),
            spec.nats.is_some(),
        ];
        let path = root.key("extensions").index(i).key("spec");
        if set.iter().filter(|s| **s).count() != 1 {
            problems.push(Problem {
                path: path.clone(),
                message: "expected exactly one of `stdio`, `http` or `nats`".to_owned(),
            });
        }
        check_extension(spec, &path, &mut problems);
    }
    problems
}

fn check_telegram(spec: &TelegramSpec, path: &DocPath, problems: &mut Vec<Problem>) {
    check_secret_ref(&spec.bot_token, &path.key("botToken"), problems);
    check_api_base_url(&spec.api_base_url, &path.key("apiBaseUrl"), problems);
    match (&spec.mode, &spec.webhook) {
        (TelegramMode::Webhook, None) => problems.push(Problem {
            path: path.key("webhook"),
            message: "`mode: webhook` needs a `webhook` block with its `secretToken`".to_owned(),
        }),
        (_, Some(webhook)) => check_secret_ref(
            &webhook.secret_token,
            &path.key("webhook").key("secretToken"),
            problems,
        ),
        (TelegramMode::Polling, None) => {}
    }
    for (name, rate) in [
        ("perChatPerSecond", spec.limits.per_chat_per_second),
        ("globalPerSecond", spec.limits.global_per_second),
    ] {
        if !(rate.is_finite() && rate > 0.0) {
            problems.push(Problem {
                path: path.key("limits").key(name),
                message: "expected a positive number of messages per second".to_owned(),
            });
        }
    }
}

/// A platform's API address: an absolute `http(s)` URL.
fn check_api_base_url(url: &str, path: &DocPath, problems: &mut Vec<Problem>) {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("http" | "https")) || url.len() <= "https://".len() {
        problems.push(Problem {
            path: path.clone(),
            message: format!("expected an http(s) URL, got `{url}`"),
        });
    }
}

fn check_extension(spec: &ExtensionSpec, path: &DocPath, problems: &mut Vec<Problem>) {
    if let Some(stdio) = &spec.stdio {
        let path = path.key("stdio");
        if stdio.command.trim().is_empty() {
            problems.push(Problem {
                path: path.key("command"),
                message: "expected a program to start".to_owned(),
            });
        }
        if stdio.image.is_some() && !stdio.command.starts_with('/') {
            problems.push(Problem {
                path: path.key("command"),
                message: "expected an absolute path: with `image`, `command` names the program inside that image".to_owned(),
            });
        }
        for (i, env) in stdio.env.iter().enumerate() {
            let path = path.key("env").index(i);
            match (&env.value, &env.secret) {
                (Some(_), None) => {}
                (None, Some(secret)) => check_secret_ref(secret, &path.key("secret"), problems),
                _ => problems.push(Problem {
                    path,
                    message: "expected exactly one of `value` or `secret`".to_owned(),
                }),
            }
        }
    }
    if let Some(http) = &spec.http {
        let path = path.key("http");
        if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
            problems.push(Problem {
                path: path.key("url"),
                message: format!("expected an http:// or https:// URL, not `{}`", http.url),
            });
        }
        if let Some(token) = &http.bearer_token {
            check_secret_ref(token, &path.key("bearerToken"), problems);
        }
    }
}

/// Extensions an agent names must be in the same file. Only a config file is held to
/// this: in a pool's catalog the operator leaves out an Extension that does not exist
/// (and says so in the Agent's status), and the worker reports the agent as not
/// running rather than refusing the whole catalog.
fn check_extension_refs(
    agents: &[Resource<AgentSpec>],
    extensions: &[Resource<ExtensionSpec>],
    root: &DocPath,
    problems: &mut Vec<Problem>,
) {
    let known: HashSet<ResourceKey> = extensions.iter().map(|e| e.key()).collect();
    for (i, agent) in agents.iter().enumerate() {
        let mut seen = HashSet::new();
        for (j, used) in agent.spec.extensions.iter().enumerate() {
            let key = ResourceKey::new(&agent.namespace, &used.name);
            let message = if !known.contains(&key) {
                format!("extension `{key}` is not defined in `extensions`")
            } else if !seen.insert(&used.name) {
                format!("`{}` is listed twice", used.name)
            } else {
                continue;
            };
            problems.push(Problem {
                path: root
                    .key("agents")
                    .index(i)
                    .key("spec")
                    .key("extensions")
                    .index(j)
                    .key("name"),
                message,
            });
        }
    }
}

/// Process settings: delivery and broker.
fn check_worker(config: &WorkerConfig, root: &DocPath, problems: &mut Vec<Problem>) {
    let delivery = &config.worker.delivery;
    for (path, value) in [
        (&["maxAttempts"][..], u64::from(delivery.max_attempts)),
        (&["ackWaitSeconds"][..], delivery.ack_wait_seconds),
        (&["outbox", "maxMessages"][..], delivery.outbox.max_messages),
        (&["outbox", "maxBytes"][..], delivery.outbox.max_bytes),
        (
            &["deadLetters", "maxMessages"][..],
            delivery.dead_letters.max_messages,
        ),
        (
            &["deadLetters", "maxAgeSeconds"][..],
            delivery.dead_letters.max_age_seconds,
        ),
    ] {
        if value == 0 {
            let path = path
                .iter()
                .fold(root.key("worker").key("delivery"), |p, k| p.key(k));
            problems.push(Problem {
                path,
                message: "expected a number of at least 1".to_owned(),
            });
        }
    }

    let models = root.key("worker").key("models");
    let mut priced = HashSet::new();
    for (i, price) in config.worker.models.prices.iter().enumerate() {
        let path = models.key("prices").index(i);
        if !priced.insert(price.model.as_str()) {
            problems.push(Problem {
                path: path.key("model"),
                message: format!("model `{}` has a price already", price.model),
            });
        }
        for (field, value) in [
            ("input", Some(price.input)),
            ("output", Some(price.output)),
            ("cachedInput", price.cached_input),
        ] {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                problems.push(Problem {
                    path: path.key(field),
                    message: "expected a price of 0 or more".to_owned(),
                });
            }
        }
    }
    let breaker = &config.worker.models.circuit_breaker;
    if breaker.failures > 0 && breaker.cool_down_seconds == 0 {
        problems.push(Problem {
            path: models.key("circuitBreaker").key("coolDownSeconds"),
            message: "expected a number of at least 1".to_owned(),
        });
    }

    if let BrokerSettings::Nats(nats) = &config.worker.broker {
        let path = root.key("worker").key("broker");
        let methods = [
            nats.user.is_some() || nats.password.is_some(),
            nats.token.is_some(),
            nats.nkey_seed.is_some(),
            nats.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            problems.push(Problem {
                path: path.clone(),
                message: "expected at most one of `user`/`password`, `token`, `nkeySeed` or `credentialsFile`".to_owned(),
            });
        }
        if nats.user.is_some() != nats.password.is_some() {
            problems.push(Problem {
                path: path.clone(),
                message: "`user` and `password` go together".to_owned(),
            });
        }
        if nats.urls.is_empty() {
            problems.push(Problem {
                path: path.key("urls"),
                message: "expected at least one server URL".to_owned(),
            });
        }
        for (field, secret) in [
            ("password", &nats.password),
            ("token", &nats.token),
            ("nkeySeed", &nats.nkey_seed),
        ] {
            if let Some(secret) = secret {
                check_secret_ref(secret, &path.key(field), problems);
            }
        }
        if let Some(tls) = &nats.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            problems.push(Problem {
                path: path.key("tls"),
                message: "`certFile` and `keyFile` go together".to_owned(),
            });
        }
    }
}

/// Exactly one source per secret reference.
fn check_secret_ref(secret: &SecretRef, path: &DocPath, problems: &mut Vec<Problem>) {
    if secret.env.is_some() == secret.secret_key_ref.is_some() {
        problems.push(Problem {
            path: path.clone(),
            message: "expected exactly one of `env` or `secretKeyRef`".to_owned(),
        });
    }
}

fn check_names<T>(
    resources: &[Resource<T>],
    path: &DocPath,
    problems: &mut Vec<Problem>,
) -> HashSet<ResourceKey> {
    let mut keys = HashSet::new();
    for (i, resource) in resources.iter().enumerate() {
        let item = path.index(i);
        if let Err(message) = check_dns_label(&resource.name) {
            problems.push(Problem {
                path: item.key("name"),
                message,
            });
        }
        if let Err(message) = check_dns_label(&resource.namespace) {
            problems.push(Problem {
                path: item.key("namespace"),
                message,
            });
        }
        if !keys.insert(resource.key()) {
            problems.push(Problem {
                path: item.key("name"),
                message: format!("`{}` is defined twice", resource.key()),
            });
        }
    }
    keys
}

fn check_agent(
    agent: &Resource<AgentSpec>,
    agent_keys: &HashSet<ResourceKey>,
    path: &DocPath,
    problems: &mut Vec<Problem>,
) {
    let spec = &agent.spec;
    let model = path.key("model");
    // The agent's model and each fallback are checked alike, at their own path.
    let models: Vec<(DocPath, ModelSpec<NoFallbacks>)> = spec
        .model
        .chain()
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = match i {
                0 => model.clone(),
                _ => model.key("fallbacks").index(i - 1),
            };
            (at, m)
        })
        .collect();
    for (at, entry) in &models {
        check_model(entry, at, problems);
    }
    if let Err(message) = check_dns_label(&spec.worker_pool) {
        problems.push(Problem {
            path: path.key("workerPool"),
            message,
        });
    }
    if let Some(budget) = &spec.budget
        && let Some(cost) = budget.cost_per_day
        && !(cost.is_finite() && cost >= 0.0)
    {
        problems.push(Problem {
            path: path.key("budget").key("costPerDay"),
            message: "expected a cost of 0 or more".to_owned(),
        });
    }

    if let Some(browser) = &spec.browser {
        let path = path.key("browser");
        if browser.max_pages == 0 || browser.action_timeout_seconds == 0 {
            problems.push(Problem {
                path: path.clone(),
                message: "expected `maxPages` and `actionTimeoutSeconds` of at least 1".to_owned(),
            });
        }
        for (i, domain) in browser.allow_domains.iter().enumerate() {
            let host = domain.trim_start_matches("*.");
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                problems.push(Problem {
                    path: path.key("allowDomains").index(i),
                    message: format!("expected a host name such as `example.com`, not `{domain}`"),
                });
            }
        }
    }

    let mut seen = HashSet::new();
    for (i, delegate) in spec.delegates.iter().enumerate() {
        let key = ResourceKey::new(&agent.namespace, delegate);
        let message = if key == agent.key() {
            Some("an agent cannot delegate to itself".to_owned())
        } else if !agent_keys.contains(&key) {
            Some(format!("agent `{key}` is not defined in `agents`"))
        } else if !seen.insert(delegate) {
            Some(format!("`{delegate}` is listed twice"))
        } else {
            None
        };
        if let Some(message) = message {
            problems.push(Problem {
                path: path.key("delegates").index(i),
                message,
            });
        }
    }

    let tools = spec.tool_names();
    // An extension's tools are known once it lists them: a rule may name any tool
    // of an extension the agent uses (within the agent's list of its tools, if any).
    let extension_tool = |name: &str| {
        spec.extensions.iter().any(|e| {
            if e.tools.is_empty() {
                name.starts_with(&format!("{}__", e.name))
            } else {
                e.tools
                    .iter()
                    .any(|t| extension_tool_name(&e.name, t) == name)
            }
        })
    };
    let rules = models.iter().flat_map(|(at, m)| {
        m.script
            .iter()
            .enumerate()
            .map(move |(i, rule)| (at.key("script").index(i), rule))
    });
    for (at, rule) in rules {
        if let Some(call) = &rule.tool_call
            && !tools.contains(&call.name)
            && !extension_tool(&call.name)
        {
            problems.push(Problem {
                path: at.key("toolCall").key("name"),
                message: format!(
                    "tool `{}` is not available to this agent (available: {})",
                    call.name,
                    if tools.is_empty() {
                        "none".to_owned()
                    } else {
                        tools.join(", ")
                    }
                ),
            });
        }
    }

    validate_memory(&spec.memory, &path.key("memory"), problems);

    let limits = path.key("limits");
    for (field, value) in [
        ("maxConcurrency", spec.limits.max_concurrency),
        ("maxSteps", spec.limits.max_steps),
    ] {
        if value == 0 {
            problems.push(Problem {
                path: limits.key(field),
                message: "expected a number of at least 1".to_owned(),
            });
        }
    }
}

/// One model of an agent (its own or a fallback): what its provider needs.
fn check_model(model: &ModelSpec<NoFallbacks>, path: &DocPath, problems: &mut Vec<Problem>) {
    if let Some(secret) = &model.api_key {
        check_secret_ref(secret, &path.key("apiKey"), problems);
    }
    match model.provider {
        ModelProvider::Openai | ModelProvider::Anthropic if model.model.trim().is_empty() => {
            problems.push(Problem {
                path: path.key("model"),
                message: "expected a model name for this provider".to_owned(),
            });
        }
        ModelProvider::Scripted if model.script.is_empty() => problems.push(Problem {
            path: path.key("script"),
            message: "expected at least one rule for the `scripted` provider".to_owned(),
        }),
        _ => {}
    }
}

/// Delegation cycles (`a → b → a`): each turn would wait on the next until every
/// delegation timed out. One problem per cycle, at the `delegates` entry that closes
/// it, naming the whole cycle. Self-delegation is reported by [`check_agent`].
fn check_delegation_cycles(
    agents: &[Resource<AgentSpec>],
    path: &DocPath,
    problems: &mut Vec<Problem>,
) {
    let index: HashMap<ResourceKey, usize> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| (agent.key(), i))
        .collect();
    // Edges of agent `i`: (position in its `delegates`, index of the delegate).
    let edges: Vec<Vec<(usize, usize)>> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            agent
                .spec
                .delegates
                .iter()
                .enumerate()
                .filter_map(|(j, d)| {
                    let to = *index.get(&ResourceKey::new(&agent.namespace, d))?;
                    (to != i).then_some((j, to))
                })
                .collect()
        })
        .collect();

    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        OnPath,
        Done,
    }
    let mut state = vec![State::New; agents.len()];
    let mut reported: HashSet<Vec<usize>> = HashSet::new();
    for start in 0..agents.len() {
        if state[start] != State::New {
            continue;
        }
        // Iterative depth-first search: the current path, each with its next edge.
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = State::OnPath;
        while let Some((node, next)) = stack.last_mut() {
            let node = *node;
            let Some(&(position, to)) = edges[node].get(*next) else {
                state[node] = State::Done;
                stack.pop();
                continue;
            };
            *next += 1;
            match state[to] {
                State::New => {
                    state[to] = State::OnPath;
                    stack.push((to, 0));
                }
                State::OnPath => {
                    let from = stack.iter().position(|(n, _)| *n == to).expect("on path");
                    let cycle: Vec<usize> = stack[from..].iter().map(|(n, _)| *n).collect();
                    let mut canonical = cycle.clone();
                    let min = (0..canonical.len())
                        .min_by_key(|k| canonical[*k])
                        .expect("a cycle has a node");
                    canonical.rotate_left(min);
                    if reported.insert(canonical) {
                        let names: Vec<String> = cycle
                            .iter()
                            .chain(std::iter::once(&to))
                            .map(|n| agents[*n].name.clone())
                            .collect();
                        problems.push(Problem {
                            path: path.index(node).key("spec").key("delegates").index(position),
                            message: format!(
                                "delegation cycle: {}; agents must not delegate back to one that asked them",
                                names.join(" → ")
                            ),
                        });
                    }
                }
                State::Done => {}
            }
        }
    }
}

/// Bounds of the memory settings: what the worker could not honour (a vector table of
/// 0 dimensions, an `openai` embedder without a model) is refused here, with the path.
fn validate_memory(memory: &MemorySpec, path: &DocPath, problems: &mut Vec<Problem>) {
    let long_term = path.key("longTerm");
    if memory.long_term.max_items == 0 {
        problems.push(Problem {
            path: long_term.key("maxItems"),
            message: "expected a number of at least 1".to_owned(),
        });
    }
    if memory.long_term.recall.k > MAX_RECALL_K {
        problems.push(Problem {
            path: long_term.key("recall").key("k"),
            message: format!("expected at most {MAX_RECALL_K}"),
        });
    }
    let embedder = &memory.long_term.embedder;
    let embedder_path = long_term.key("embedder");
    if let Some(secret) = &embedder.api_key {
        check_secret_ref(secret, &embedder_path.key("apiKey"), problems);
    }
    if !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&embedder.dimensions) {
        problems.push(Problem {
            path: embedder_path.key("dimensions"),
            message: format!("expected a number from 1 to {MAX_EMBEDDING_DIMENSIONS}"),
        });
    }
    if embedder.provider == EmbedderProvider::Openai && embedder.model.trim().is_empty() {
        problems.push(Problem {
            path: embedder_path.key("model"),
            message: "expected an embedding model name for the `openai` embedder".to_owned(),
        });
    }
}

/// Memories one recall may return at most.
const MAX_RECALL_K: u32 = 100;
/// Longest vectors the memory accepts (sqlite-vec's own limit is 8192).
const MAX_EMBEDDING_DIMENSIONS: u32 = 8192;

#[cfg(test)]
mod tests {
    #[test]
    fn delegate_tool_names_fit_the_providers_rule() {
        assert_eq!(super::delegate_tool_name("researcher"), "ask_researcher");
        let long = "a".repeat(63);
        let name = super::delegate_tool_name(&long);
        assert_eq!(name.len(), super::MAX_TOOL_NAME);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
        let other = super::delegate_tool_name(&format!("{}b", "a".repeat(62)));
        assert_ne!(name, other, "two long names stay apart");
        assert_eq!(name, super::delegate_tool_name(&long), "and stable");
    }

    #[test]
    fn extension_tool_names_fit_the_providers_rule() {
        assert_eq!(
            super::extension_tool_name("github", "create_issue"),
            "github__create_issue"
        );
        let dotted = super::extension_tool_name("fs", "files.read");
        let underscored = super::extension_tool_name("fs", "files_read");
        assert!(dotted.starts_with("fs__files_read_"), "{dotted}");
        assert_ne!(dotted, underscored, "a replaced character changes the name");
        let long = super::extension_tool_name(&"e".repeat(63), &"t".repeat(80));
        assert_eq!(long.len(), super::MAX_TOOL_NAME);
    }

    use crate::config::{Catalog, WorkerConfig};
    use crate::spec::{AgentSpec, SecretRef};

    fn catalog(delegates: &[(&str, &[&str])]) -> Catalog {
        let agents: Vec<serde_json::Value> = delegates
            .iter()
            .map(|(name, to)| {
                serde_json::json!({
                    "name": name,
                    "spec": {
                        "delegates": to,
                        "model": {"provider": "scripted", "script": [{"reply": "x"}]},
                    },
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "agents": agents })).unwrap()
    }

    fn messages(catalog: &Catalog) -> Vec<(String, String)> {
        super::validate_catalog(catalog)
            .into_iter()
            .map(|p| (p.path.to_string(), p.message))
            .collect()
    }

    #[test]
    fn fallback_models_are_checked_at_their_own_path() {
        let config: WorkerConfig = serde_json::from_value(serde_json::json!({
            "worker": {"models": {
                "prices": [{"model": "m", "input": -1.0, "output": 1.0}, {"model": "m", "input": 1.0, "output": 1.0}],
                "circuitBreaker": {"failures": 3, "coolDownSeconds": 0},
            }},
            "agents": [{"name": "a", "spec": {
                "budget": {"costPerDay": -2.0},
                "model": {"provider": "openai", "model": "m", "fallbacks": [
                    {"provider": "anthropic"},
                    {"provider": "scripted", "script": [{"reply": "x", "toolCall": {"name": "nope"}}]},
                    {"provider": "openai", "model": "n", "apiKey": {}},
                ]},
            }}],
        }))
        .unwrap();
        let problems: Vec<(String, String)> = super::validate(&config)
            .into_iter()
            .map(|p| (p.path.to_string(), p.message))
            .collect();
        let paths: Vec<&str> = problems.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "agents[0].spec.model.fallbacks[0].model",
                "agents[0].spec.model.fallbacks[2].apiKey",
                "agents[0].spec.budget.costPerDay",
                "agents[0].spec.model.fallbacks[1].script[0].toolCall.name",
                "worker.models.prices[0].input",
                "worker.models.prices[1].model",
                "worker.models.circuitBreaker.coolDownSeconds",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn a_fallback_of_a_fallback_is_refused_with_where_to_put_it() {
        let err = serde_json::from_value::<AgentSpec>(serde_json::json!({
            "model": {"provider": "openai", "model": "m", "fallbacks": [
                {"provider": "openai", "model": "n", "fallbacks": [{"provider": "openai", "model": "o"}]},
            ]},
        }))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("list every fallback, in order, under the agent's `model.fallbacks`"),
            "{err}"
        );
        let typo = serde_json::from_value::<AgentSpec>(serde_json::json!({
            "model": {"provider": "openai", "model": "m", "fallbacks": [{"provider": "openai", "modle": "n"}]},
        }))
        .unwrap_err();
        assert!(typo.to_string().contains("unknown field `modle`"), "{typo}");
    }

    #[test]
    fn secret_refs_include_the_fallbacks_keys() {
        let spec: AgentSpec = serde_json::from_value(serde_json::json!({
            "model": {"provider": "openai", "model": "m", "apiKey": {"env": "A"}, "fallbacks": [
                {"provider": "anthropic", "model": "c", "apiKey": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ]},
        }))
        .unwrap();
        let refs: Vec<&SecretRef> = spec.secret_refs().collect();
        assert_eq!(
            refs,
            [&SecretRef::env("A"), &SecretRef::secret_key("s", "k")]
        );
    }

    #[test]
    fn extensions_and_the_references_to_them_are_checked_where_they_are_written() {
        let config: WorkerConfig = serde_json::from_value(serde_json::json!({
            "agents": [{"name": "a", "spec": {
                "model": {"provider": "scripted", "script": [{"reply": "x"}]},
                "extensions": [{"name": "fs"}, {"name": "nope"}, {"name": "fs"}],
            }}],
            "extensions": [
                {"name": "fs", "spec": {"stdio": {
                    "command": "bin/fs", "image": "fs:1",
                    "env": [{"name": "A"}, {"name": "B", "value": "1", "secret": {"env": "B"}}],
                }}},
                {"name": "web", "spec": {"http": {"url": "ftp://x"}}},
            ],
        }))
        .unwrap();
        let problems: Vec<(String, String)> = super::validate(&config)
            .into_iter()
            .map(|p| (p.path.to_string(), p.message))
            .collect();
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "extensions[0].spec.stdio.command",
                "extensions[0].spec.stdio.env[0]",
                "extensions[0].spec.stdio.env[1]",
                "extensions[1].spec.http.url",
                "agents[0].spec.extensions[1].name",
                "agents[0].spec.extensions[2].name",
            ],
            "{problems:?}"
        );
        assert!(
            problems[4].1.contains("`default/nope` is not defined"),
            "{problems:?}"
        );
        assert!(problems[5].1.contains("listed twice"), "{problems:?}");
    }

    #[test]
    fn a_two_agent_delegation_cycle_is_refused_with_its_names() {
        let problems = messages(&catalog(&[("a", &["b"]), ("b", &["a"])]));
        assert_eq!(
            problems,
            [(
                "agents[1].spec.delegates[0]".to_owned(),
                "delegation cycle: a → b → a; agents must not delegate back to one that asked them"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn a_longer_cycle_is_reported_once_and_chains_are_fine() {
        let problems = messages(&catalog(&[
            ("a", &["b", "d"]),
            ("b", &["c"]),
            ("c", &["a", "d"]),
            ("d", &[]),
        ]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "agents[2].spec.delegates[0]");
        assert!(problems[0].1.contains("a → b → c → a"), "{problems:?}");

        assert_eq!(
            messages(&catalog(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])])),
            []
        );
    }

    #[test]
    fn a_scripted_rule_may_call_the_tools_of_the_agents_extensions() {
        let with_script = |uses: serde_json::Value, tool: &str| {
            let catalog: Catalog = serde_json::from_value(serde_json::json!({
                "extensions": [{"name": "text", "spec": {"nats": {}}}],
                "agents": [{"name": "a", "spec": {
                    "extensions": [uses],
                    "model": {"provider": "scripted", "script": [
                        {"toolCall": {"name": tool, "arguments": {}}, "reply": "x"},
                    ]},
                }}],
            }))
            .unwrap();
            messages(&catalog)
        };
        assert_eq!(
            with_script(serde_json::json!({"name": "text"}), "text__any"),
            []
        );
        let only_reverse = serde_json::json!({"name": "text", "tools": ["reverse"]});
        assert_eq!(with_script(only_reverse.clone(), "text__reverse"), []);
        assert_eq!(with_script(only_reverse, "text__word_count").len(), 1);
        assert_eq!(
            with_script(serde_json::json!({"name": "text"}), "other__any").len(),
            1
        );
    }

    #[test]
    fn an_agent_with_a_browser_has_the_browser_tools() {
        let with = |browser: serde_json::Value| {
            let spec: AgentSpec = serde_json::from_value(serde_json::json!({
                "model": {"provider": "scripted", "script": [{"reply": "x"}]},
                "browser": browser,
            }))
            .unwrap();
            spec.tool_names()
        };
        let names = with(serde_json::json!({"allowDomains": ["example.com"]}));
        for tool in crate::spec::BROWSER_TOOLS {
            assert!(names.iter().any(|n| n == tool), "{tool} in {names:?}");
        }
        let names = with(serde_json::Value::Null);
        assert!(
            !names.iter().any(|n| n.starts_with("browser_")),
            "{names:?}"
        );
    }

    #[test]
    fn secret_refs_include_the_embedding_key() {
        let mut spec: AgentSpec = serde_json::from_value(serde_json::json!({
            "model": {"provider": "openai", "model": "m", "apiKey": {"env": "MODEL_KEY"}},
        }))
        .unwrap();
        spec.memory.long_term.embedder.api_key = Some(SecretRef::secret_key("embed", "key"));
        let refs: Vec<&SecretRef> = spec.secret_refs().collect();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].env.as_deref(), Some("MODEL_KEY"));
        assert_eq!(refs[1].secret_key_ref.as_ref().unwrap().name, "embed");
    }
}
