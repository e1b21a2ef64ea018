//! Config errors name the file, the line, the path in the document and what was
//! expected; `nexo-worker check` prints them and fails.

use std::path::Path;
use std::process::Command;

use nexo_worker::config::{self, ConfigError, LocatedProblem};

fn problems(yaml: &str) -> Vec<LocatedProblem> {
    match config::parse(Path::new("agents.yaml"), yaml, |_| None) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

const AGENT: &str = "
agents:
  - name: a
    spec:
      model:
        provider: scripted
        script: [{reply: hi}]
";

#[test]
fn the_sample_config_is_valid() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/local.yaml");
    let config = config::load(&sample).expect("sample config is valid");
    assert_eq!(config.agents.len(), 2);
    assert_eq!(config.channels.len(), 2);
}

#[test]
fn unknown_field() {
    let yaml = "
agents:
  - name: a
    spec:
      modle: x
      model:
        provider: scripted
        script: [{reply: hi}]
";
    let found = problems(yaml);
    assert_eq!(found.len(), 1);
    let p = &found[0];
    assert_eq!(p.line, Some(5));
    assert_eq!(p.doc_path, "agents[0].spec.modle");
    assert!(p.message.contains("unknown field `modle`"), "{}", p.message);
    assert!(p.message.contains("expected one of model"), "{}", p.message);
}

#[test]
fn the_local_broker_takes_no_other_key() {
    let yaml = "
worker:
  broker:
    type: local
    urls: [nats://127.0.0.1:4222]
";
    let found = problems(yaml);
    assert_eq!(found.len(), 1, "{found:?}");
    let p = &found[0];
    assert!(p.message.contains("unknown field `urls`"), "{}", p.message);
    assert!(
        p.message.contains("no other key is allowed here"),
        "{}",
        p.message
    );
    // A tagged block is read whole before its variant is known: the error points at it.
    assert_eq!(p.line, Some(3));
    assert_eq!(p.doc_path, "worker.broker");

    // Both spellings without other keys still parse.
    for broker in ["{type: local}", "\n    type: local"] {
        let yaml = format!("worker:\n  broker: {broker}\n{AGENT}");
        let config = config::parse(Path::new("agents.yaml"), &yaml, |_| None).unwrap();
        assert_eq!(
            config.worker.broker,
            nexo_api::config::BrokerSettings::Local {}
        );
    }
    let config = config::parse(Path::new("agents.yaml"), AGENT, |_| None).unwrap();
    assert_eq!(
        config.worker.broker,
        nexo_api::config::BrokerSettings::Local {}
    );
}

#[test]
fn wrong_type() {
    let yaml = "
agents:
  - name: a
    spec:
      model:
        provider: scripted
        timeoutSeconds: soon
        script: [{reply: hi}]
";
    let p = &problems(yaml)[0];
    assert_eq!(p.line, Some(7));
    assert_eq!(p.doc_path, "agents[0].spec.model.timeoutSeconds");
    assert!(p.message.contains("u64"), "{}", p.message);
}

#[test]
fn unknown_enum_value_lists_the_choices() {
    let yaml = "
agents:
  - name: a
    spec:
      model:
        provider: gpt
";
    let p = &problems(yaml)[0];
    assert_eq!(p.line, Some(6));
    assert_eq!(p.doc_path, "agents[0].spec.model.provider");
    assert!(
        p.message
            .contains("unknown variant `gpt`, expected one of openai, anthropic, scripted"),
        "{}",
        p.message
    );
}

#[test]
fn missing_references_point_at_their_lines() {
    let yaml = format!(
        "{AGENT}    \nchannels:\n  - name: web\n    spec:\n      defaultAgent: nobody\n      webchat: {{}}\n"
    )
    .replace("      model:", "      delegates: [ghost]\n      model:");
    let found = problems(&yaml);
    let rendered: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 2, "{rendered:#?}");
    assert_eq!(found[0].doc_path, "agents[0].spec.delegates[0]");
    assert_eq!(found[0].line, Some(5));
    assert_eq!(
        found[0].message,
        "agent `default/ghost` is not defined in `agents`"
    );
    assert_eq!(found[1].doc_path, "channels[0].spec.defaultAgent");
    assert_eq!(found[1].line, Some(13));
    assert_eq!(
        found[1].message,
        "agent `default/nobody` is not defined in `agents`"
    );
}

#[test]
fn cross_field_rules() {
    let yaml = format!(
        "{AGENT}channels:\n  - name: both\n    spec:\n      defaultAgent: a\n      webchat: {{}}\n      webhook: {{}}\n"
    )
    .replace("script: [{reply: hi}]", "script: [{reply: hi, toolCall: {name: ask_nobody}}]");
    let found = problems(&yaml);
    let paths: Vec<&str> = found.iter().map(|p| p.doc_path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "agents[0].spec.model.script[0].toolCall.name",
            "channels[0].spec"
        ]
    );
    assert!(
        found[0]
            .message
            .contains("tool `ask_nobody` is not available"),
        "{}",
        found[0].message
    );
    assert_eq!(
        found[1].message,
        "expected exactly one of `webchat`, `webhook`, `telegram`, `whatsapp` or `slack`"
    );
}

#[test]
fn bad_names_and_duplicates() {
    let yaml = format!(
        "{AGENT}{}",
        AGENT
            .replace("agents:\n", "")
            .replace("name: a", "name: Bad_Name")
    );
    let yaml = format!("{yaml}{}", AGENT.replace("agents:\n", ""));
    let found = problems(&yaml);
    let summary: Vec<(String, String)> = found
        .iter()
        .map(|p| (p.doc_path.clone(), p.message.clone()))
        .collect();
    assert_eq!(found.len(), 2, "{summary:#?}");
    assert_eq!(found[0].doc_path, "agents[1].name");
    assert!(
        found[0].message.contains("DNS-1123"),
        "{}",
        found[0].message
    );
    assert_eq!(found[1].doc_path, "agents[2].name");
    assert_eq!(found[1].message, "`default/a` is defined twice");
}

#[test]
fn unset_variable_without_default() {
    let yaml = "worker:\n  http:\n    listen: ${NOT_SET_ANYWHERE}\n";
    let p = &problems(yaml)[0];
    assert_eq!(p.line, Some(3));
    assert!(
        p.message.contains("`NOT_SET_ANYWHERE` is not set"),
        "{}",
        p.message
    );
}

#[test]
fn check_command_prints_file_line_and_path() {
    let dir = std::env::temp_dir().join(format!("nexo-check-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        "agents:\n  - name: a\n    spec:\n      model:\n        provider: gpt\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nexo-worker"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:5:19: agents[0].spec.model.provider: unknown variant `gpt`",
        file.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn missing_file_is_named() {
    let err = config::load(Path::new("/nonexistent/nexo.yaml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/nexo.yaml: cannot read the config file"),
        "{err}"
    );
}

#[test]
fn memory_settings_are_checked() {
    let yaml = format!(
        "{AGENT}      memory:
        longTerm:
          maxItems: 0
          recall: {{k: 500}}
          embedder: {{provider: openai, dimensions: 0, apiKey: {{}}}}
"
    );
    let found = problems(&yaml);
    let described: Vec<(&str, &str)> = found
        .iter()
        .map(|p| (p.doc_path.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        described,
        [
            (
                "agents[0].spec.memory.longTerm.maxItems",
                "expected a number of at least 1"
            ),
            (
                "agents[0].spec.memory.longTerm.recall.k",
                "expected at most 100"
            ),
            (
                "agents[0].spec.memory.longTerm.embedder.apiKey",
                "expected exactly one of `env` or `secretKeyRef`"
            ),
            (
                "agents[0].spec.memory.longTerm.embedder.dimensions",
                "expected a number from 1 to 8192"
            ),
            (
                "agents[0].spec.memory.longTerm.embedder.model",
                "expected an embedding model name for the `openai` embedder"
            ),
        ]
    );
    assert!(found.iter().all(|p| p.line.is_some()), "{found:?}");

    let unknown = config::parse(
        Path::new("agents.yaml"),
        &format!("{AGENT}      memory: {{longTerm: {{recall: {{mode: semantic}}}}}}\n"),
        |_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        unknown.contains("agents.yaml:") && unknown.contains("keyword, vector, hybrid"),
        "{unknown}"
    );
}

#[test]
fn a_delegation_cycle_is_located_and_named() {
    let yaml = "
agents:
  - name: a
    spec:
      delegates: [b]
      model: {provider: scripted, script: [{reply: hi}]}
  - name: b
    spec:
      delegates: [a]
      model: {provider: scripted, script: [{reply: hi}]}
";
    let found = problems(yaml);
    assert_eq!(found.len(), 1, "{found:?}");
    let p = &found[0];
    assert_eq!(p.doc_path, "agents[1].spec.delegates[0]");
    assert_eq!(p.line, Some(9));
    assert!(
        p.message.starts_with("delegation cycle: a → b → a"),
        "{}",
        p.message
    );
}

#[test]
fn queue_limits_are_checked() {
    let yaml = format!(
        "worker:\n  delivery:\n    outbox: {{maxMessages: 0, maxRows: 5}}\n    deadLetters: {{maxAgeSeconds: 0}}\n{AGENT}"
    );
    let found = problems(&yaml);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].doc_path, "worker.delivery.outbox.maxRows");
    assert!(
        found[0].message.contains("unknown field `maxRows`"),
        "{}",
        found[0].message
    );

    let found = problems(&yaml.replace(", maxRows: 5", ""));
    let paths: Vec<&str> = found.iter().map(|p| p.doc_path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "worker.delivery.outbox.maxMessages",
            "worker.delivery.deadLetters.maxAgeSeconds"
        ]
    );
    assert_eq!(found[0].message, "expected a number of at least 1");
}
