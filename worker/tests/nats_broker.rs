//! The NATS broker against a real nats-server: the shared conformance suite, and
//! readiness following the connection.

mod support;

use std::sync::Arc;

use nexo_api::config::NatsSettings;
use nexo_api::spec::SecretRef;
use nexo_worker::broker::{Broker, NatsBroker, conformance};
use support::nats::NatsServer;
use support::wait_for;

#[tokio::test]
async fn conformance_suite_on_nats() {
    let server = NatsServer::start().await;
    let url = server.url();
    conformance::run_all(|| {
        let url = url.clone();
        async move {
            Arc::new(NatsBroker::connect_url(&url).await.expect("connects")) as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test]
async fn connection_state_follows_the_server() {
    let mut server = NatsServer::start().await;
    let broker = NatsBroker::connect_url(&server.url()).await.unwrap();
    wait_for("connected", || async {
        broker.is_connected().then_some(())
    })
    .await;
    server.stop().await;
    wait_for("disconnected", || async {
        (!broker.is_connected()).then_some(())
    })
    .await;
    server.restart().await;
    wait_for("reconnected", || async {
        broker.is_connected().then_some(())
    })
    .await;
}

/// Cargo sets this variable for test processes; it stands in for a secret.
const SECRET_ENV: &str = "CARGO_PKG_NAME";

async fn connects(settings: NatsSettings) -> bool {
    let broker = NatsBroker::connect(&settings).await.unwrap();
    // A refused login keeps the client retrying; connected means it got in.
    tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while !broker.is_connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn user_and_password_come_from_the_environment() {
    let server =
        NatsServer::start_with(&["--user", "nexo", "--pass", env!("CARGO_PKG_NAME")]).await;
    let settings = |user: &str| NatsSettings {
        urls: vec![server.url()],
        user: Some(user.to_owned()),
        password: Some(SecretRef {
            env: SECRET_ENV.to_owned(),
        }),
        ..NatsSettings::default()
    };
    assert!(
        connects(settings("nexo")).await,
        "right credentials refused"
    );
    assert!(!connects(settings("intruder")).await, "wrong user let in");
}

#[tokio::test]
async fn token_comes_from_the_environment() {
    let server = NatsServer::start_with(&["--auth", env!("CARGO_PKG_NAME")]).await;
    let with_token = NatsSettings {
        urls: vec![server.url()],
        token: Some(SecretRef {
            env: SECRET_ENV.to_owned(),
        }),
        ..NatsSettings::default()
    };
    assert!(connects(with_token).await);
    let without = NatsSettings {
        urls: vec![server.url()],
        ..NatsSettings::default()
    };
    assert!(!connects(without).await);
    let err = NatsBroker::connect(&NatsSettings {
        urls: vec![server.url()],
        token: Some(SecretRef {
            env: "NEXO_TEST_UNSET_TOKEN".to_owned(),
        }),
        ..NatsSettings::default()
    })
    .await
    .err()
    .expect("an unset secret is an error");
    assert!(
        err.to_string()
            .contains("`NEXO_TEST_UNSET_TOKEN` is not set"),
        "{err}"
    );
}
