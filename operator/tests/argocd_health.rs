//! The Argo CD health check (deploy/argocd/health.lua) run in Lua 5.1 (Argo CD uses
//! gopher-lua, a 5.1 implementation) on resources whose status the operator's own
//! status functions wrote; and the copies embedded in argocd-cm-health.yaml are the
//! same script.

mod fixtures;

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaSerdeExt, Table};
use nexo_api::crd::{Agent, WorkerPoolStatus};
use nexo_operator::status::{self, AgentRefs};
use serde_json::Value;

fn script() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/argocd/health.lua"),
    )
    .unwrap()
}

/// (status, message) the script gives `object`.
fn health(object: &impl serde::Serialize) -> (String, String) {
    let lua = Lua::new();
    let json = serde_json::to_value(object).unwrap();
    // JSON null must be Lua nil, as Argo CD presents objects.
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.globals()
        .set("obj", lua.to_value_with(&json, options).unwrap())
        .unwrap();
    let hs: Table = lua.load(script()).eval().unwrap();
    (hs.get("status").unwrap(), hs.get("message").unwrap())
}

fn now() -> Time {
    fixtures::time()
}

fn with_status(
    mut agent: Agent,
    pool: Option<&nexo_api::crd::WorkerPool>,
    missing: &[&str],
) -> Agent {
    let refs = AgentRefs {
        missing: missing.iter().map(|m| m.to_string()).collect(),
        unready: Vec::new(),
    };
    agent.status = Some(status::agent(&agent, pool, &refs, &now()));
    agent
}

fn ready_pool() -> nexo_api::crd::WorkerPool {
    let mut pool = fixtures::pool("default", 2);
    pool.status = Some(WorkerPoolStatus {
        ready_replicas: 2,
        replicas: 2,
        ..Default::default()
    });
    pool
}

#[test]
fn a_new_resource_is_progressing() {
    let (status, message) = health(&fixtures::agent("a", "default"));
    assert_eq!(status, "Progressing");
    assert!(message.contains("operator"), "{message}");
}

#[test]
fn a_ready_agent_is_healthy() {
    let agent = with_status(fixtures::agent("a", "default"), Some(&ready_pool()), &[]);
    let (status, message) = health(&agent);
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.contains("running on worker"), "{message}");
}

#[test]
fn a_missing_reference_is_degraded_with_its_name() {
    let agent = with_status(
        fixtures::agent("a", "default"),
        Some(&ready_pool()),
        &["Secret `llm` (key `k`)"],
    );
    let (status, message) = health(&agent);
    assert_eq!(status, "Degraded");
    assert!(message.contains("Secret `llm`"), "{message}");
}

#[test]
fn waiting_for_workers_is_progressing() {
    let pool = fixtures::pool("default", 2); // no ready workers yet
    let agent = with_status(fixtures::agent("a", "default"), Some(&pool), &[]);
    let (status, message) = health(&agent);
    assert_eq!(status, "Progressing");
    assert!(message.contains("no worker"), "{message}");
}

#[test]
fn a_status_for_an_older_generation_is_progressing() {
    let mut agent = with_status(fixtures::agent("a", "default"), Some(&ready_pool()), &[]);
    agent.metadata.generation = Some(2);
    let (status, message) = health(&agent);
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation 2"), "{message}");
}

#[test]
fn a_suspended_agent_is_suspended() {
    let mut agent = fixtures::agent("a", "default");
    agent.spec.suspend = true;
    let agent = with_status(agent, Some(&ready_pool()), &[]);
    assert_eq!(health(&agent).0, "Suspended");
}

#[test]
fn the_config_map_embeds_the_script_for_every_kind() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/argocd/argocd-cm-health.yaml");
    let config_map: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for kind in ["Agent", "Channel", "Extension", "WorkerPool"] {
        let key = format!("resource.customizations.health.nexo.dev_{kind}");
        assert_eq!(
            config_map["data"][&key].as_str(),
            Some(script().as_str()),
            "{key} differs from health.lua"
        );
    }
}
