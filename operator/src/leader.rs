//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager), so two
//! operator replicas never reconcile at once.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;

/// Name of the Lease in the operator's namespace.
pub const LEASE_NAME: &str = "nexo-operator";

/// Seconds a lease is held without renewal before another replica may take it.
const LEASE_SECONDS: u64 = 15;
/// Seconds before expiry the holder renews.
const GRACE_SECONDS: u64 = 5;

/// Starts competing for the lease; the receiver says whether this replica leads.
pub async fn campaign(
    client: Client,
    namespace: &str,
    identity: String,
) -> Result<watch::Receiver<bool>, kube_lease_manager::LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_parameters(LeaseParams::new(identity, LEASE_SECONDS, GRACE_SECONDS))
        .build()
        .await?;
    let (leading, _task) = manager.watch().await;
    Ok(leading)
}
