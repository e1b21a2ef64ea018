//! Leader election (kube-lease-manager on a `coordination.k8s.io` Lease) against the
//! in-process API server double: one of two replicas leads, the other waits while the
//! leader renews, and takes over when the leader lets go.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use nexo_operator::leader;
use support::apiserver::ApiServer;
use support::eventually;

const NAMESPACE: &str = "nexo-system";

async fn renew_time(leases: &Api<Lease>) -> Option<String> {
    let lease = leases.get_opt(leader::LEASE_NAME).await.ok()??;
    Some(serde_json::to_string(&lease.spec?.renew_time?).unwrap())
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(leader::LEASE_NAME)
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_lets_go() {
    let server = ApiServer::start().await;
    let client = server.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);

    let first = leader::campaign(client.clone(), NAMESPACE, "operator-a".into())
        .await
        .unwrap();
    eventually(
        "the first replica leads",
        Duration::from_secs(30),
        || async { first.borrow().then_some(()) },
    )
    .await;
    let second = leader::campaign(client.clone(), NAMESPACE, "operator-b".into())
        .await
        .unwrap();

    // While the leader renews its lease, the second replica does not lead.
    let renewed = renew_time(&leases).await;
    eventually("the leader renews", Duration::from_secs(30), || async {
        let now = renew_time(&leases).await;
        (now.is_some() && now != renewed).then_some(())
    })
    .await;
    assert!(
        *first.borrow(),
        "the leader lost its lease while renewing it"
    );
    assert!(!*second.borrow(), "two replicas lead at once");
    assert_eq!(holder(&leases).await.as_deref(), Some("operator-a"));

    // The leader stops (its receiver goes away, the lease is released): the other
    // replica takes over.
    drop(first);
    eventually(
        "the second replica leads",
        Duration::from_secs(40),
        || async { second.borrow().then_some(()) },
    )
    .await;
    assert_eq!(holder(&leases).await.as_deref(), Some("operator-b"));
}
