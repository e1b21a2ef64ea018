//! `nexo_partition_lag`: the messages waiting for the agents this worker runs (pending
//! in their durable consumers plus delivered but not acknowledged), read from
//! JetStream every [`LAG_EVERY`]. Summed over a pool's workers it is the pool's backlog,
//! which an autoscaler (KEDA's Prometheus scaler, an HPA on external metrics) reads
//! without having to find the leader of each JetStream consumer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use nexo_api::subject;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

/// How often the backlog is read: one consumer-info request per agent, so a worker
/// with 300 agents asks 20 times a second.
const LAG_EVERY: Duration = Duration::from_secs(15);

/// Keeps `gauge` at the backlog of the consumers `consumers` names, until `stop`.
pub async fn report(
    jetstream: jetstream::Context,
    consumers: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    gauge: IntGauge,
    stop: CancellationToken,
) {
    let route = subject::DURABLE_STREAMS[0].name;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LAG_EVERY) => {}
        }
        let Ok(stream) = jetstream.get_stream(route).await else {
            continue;
        };
        let mut lag = 0i64;
        let mut complete = true;
        for name in consumers() {
            match stream.consumer_info(&name).await {
                Ok(info) => lag += info.num_pending as i64 + info.num_ack_pending as i64,
                Err(_) => complete = false,
            }
        }
        // A partial sum would look like a drop in the backlog: keep the last figure.
        if complete {
            gauge.set(lag);
        }
    }
}
