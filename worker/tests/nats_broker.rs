//! The NATS broker against a real nats-server: the shared conformance suite, and
//! readiness following the connection.

mod support;

use std::sync::Arc;

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
