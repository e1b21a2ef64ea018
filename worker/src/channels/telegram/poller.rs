//! Long polling (`getUpdates`). One poller per channel instance: on NATS it runs only
//! on the worker holding the lease `channel.<namespace>.<name>` of the lease bucket
//! (acquired, renewed and released like the partitions' leases, see
//! `ownership::lease`), and its offset lives in the KV bucket of [`super::state`], so
//! a poller that moves (a restart, a lost lease) goes on from where the last one
//! stopped. On the local bus the one process polls, its offset in its data directory.
//!
//! The next offset is stored only once every update of a batch was accepted (in the
//! outbox or the stream), and `getUpdates` is then called with it, which is what
//! confirms the batch to Telegram: a crash before that fetches the batch again, and
//! the updates this process already took are known by their id.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::ApiError;
use super::state::{StateError, StoredOffset};
use super::{Placement, Telegram};
use crate::ownership::lease::{GIVE_UP_AFTER, LeaseError, LeaseTable, RENEW_EVERY};

/// How often a lease held by another worker is tried.
const ACQUIRE_EVERY: Duration = Duration::from_secs(1);
/// Between failed polls (the API unreachable or refusing).
const POLL_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(500))
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();

/// Polls for `bot` until `stop`.
pub(super) async fn run(bot: Arc<Telegram>, stop: CancellationToken) {
    match &bot.placement {
        Placement::Local { .. } => poll(&bot, &stop).await,
        Placement::Pool { jetstream, worker } => {
            let table = loop {
                match LeaseTable::open(jetstream, worker).await {
                    Ok(table) => break table,
                    Err(err) => {
                        tracing::warn!(channel = %bot.context.key, error = %err, "cannot open the lease bucket; trying again");
                        if !pause(&stop, ACQUIRE_EVERY).await {
                            return;
                        }
                    }
                }
            };
            leased(&bot, &table, &stop).await;
        }
    }
}

/// Polls whenever this worker holds the channel's lease.
async fn leased(bot: &Arc<Telegram>, table: &LeaseTable, stop: &CancellationToken) {
    let key = format!(
        "channel.{}.{}",
        bot.context.key.namespace, bot.context.key.name
    );
    loop {
        let revision = match table.acquire(&key).await {
            Ok(revision) => revision,
            Err(err) => {
                if let LeaseError::Unavailable(_) = err {
                    tracing::debug!(channel = %bot.context.key, error = %err, "cannot acquire the poller's lease");
                }
                if !pause(stop, ACQUIRE_EVERY).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(channel = %bot.context.key, epoch = revision, "polling Telegram: this worker holds the poller's lease");
        let held = stop.child_token();
        let renewer = tokio::spawn(renew(table.clone(), key.clone(), revision, held.clone()));
        poll(bot, &held).await;
        held.cancel();
        if let Ok(Some(revision)) = renewer.await
            && let Err(err) = table.release(&key, revision).await
        {
            tracing::warn!(channel = %bot.context.key, error = %err, "cannot release the poller's lease; it expires on its own");
        }
        if stop.is_cancelled() {
            return;
        }
        tracing::warn!(channel = %bot.context.key, "stopped polling Telegram: the poller's lease was lost");
    }
}

/// Renews the lease until `held` is cancelled (then returns the revision to release)
/// or the lease is lost (then cancels `held`).
async fn renew(
    table: LeaseTable,
    key: String,
    mut revision: u64,
    held: CancellationToken,
) -> Option<u64> {
    let mut renewed = Instant::now();
    loop {
        if !pause(&held, RENEW_EVERY).await {
            return Some(revision);
        }
        let sent = Instant::now();
        match table.renew(&key, revision).await {
            Ok(next) => {
                revision = next;
                renewed = sent;
            }
            Err(LeaseError::Taken) => break,
            Err(err) => {
                tracing::warn!(key, error = %err, "cannot renew the poller's lease");
                if renewed.elapsed() >= GIVE_UP_AFTER {
                    break;
                }
            }
        }
    }
    held.cancel();
    None
}

/// Sleeps `wait`; `false` when `stop` came first.
async fn pause(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// The poll loop, until `stop` or the offset is fenced by another poller.
async fn poll(bot: &Arc<Telegram>, stop: &CancellationToken) {
    let Some(api) = &bot.api else { return };
    let key = &bot.context.key;
    let timeout = Duration::from_secs(bot.spec.poll_timeout_seconds);
    let mut backoff = POLL_BACKOFF.build();
    let (state, mut stored) = loop {
        match read_offset(bot).await {
            Ok(read) => break read,
            Err(err) => {
                tracing::warn!(channel = %key, error = %err, "cannot read the poller's offset; trying again");
                if !pause(stop, backoff.next().unwrap_or(timeout)).await {
                    return;
                }
            }
        }
    };
    // `getUpdates` is refused while a webhook is set.
    if let Err(err) = api.delete_webhook().await {
        tracing::warn!(channel = %key, error = %err, "cannot remove a webhook before polling");
    }
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            polled = api.get_updates(stored.offset, timeout) => polled,
        };
        let updates = match polled {
            Ok(updates) => {
                backoff = POLL_BACKOFF.build();
                let cursor = stored.offset.map(|o| o.to_string());
                bot.context.connected("polling", cursor);
                updates
            }
            Err(err) => {
                tracing::warn!(channel = %key, error = %err, "cannot poll Telegram");
                bot.context.disconnected(&err.to_string());
                let wait = match err {
                    ApiError::RateLimited { retry_after, .. } => retry_after,
                    _ => backoff.next().unwrap_or(Duration::from_secs(30)),
                };
                if !pause(stop, wait).await {
                    return;
                }
                continue;
            }
        };
        let Some(last) = updates.iter().filter_map(|u| u["update_id"].as_i64()).max() else {
            continue;
        };
        loop {
            match bot.accept_all(&updates).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(channel = %key, error = %err, "cannot take Telegram updates; trying again");
                    if !pause(stop, err.retry_after()).await {
                        return;
                    }
                }
            }
        }
        let next = last + 1;
        match state.save_offset(next, stored.revision).await {
            Ok(revision) => {
                stored = StoredOffset {
                    offset: Some(next),
                    revision,
                }
            }
            Err(StateError::Fenced) => {
                tracing::error!(channel = %key, "another poller stored the offset meanwhile; stopping");
                return;
            }
            // Polled from it all the same: kept in memory, stored with the next batch.
            Err(err) => {
                tracing::warn!(channel = %key, error = %err, "cannot store the poller's offset");
                stored.offset = Some(next);
            }
        }
    }
}

async fn read_offset(
    bot: &Telegram,
) -> Result<(Arc<dyn super::state::BotState>, StoredOffset), StateError> {
    let state = bot.state().await?.clone();
    let stored = state.offset().await?;
    Ok((state, stored))
}
