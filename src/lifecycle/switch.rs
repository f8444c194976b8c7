//! Switching the serving model without stopping service, in two phases
//! across every replica (a single node is a one-replica cluster):
//!
//! 1. The switching replica publishes the target version; every replica's
//!    follower prepares it (`follower`), this one's among them, while the
//!    switch reports the replicas' progress.
//! 2. When every live replica is ready and no item lacks the target's
//!    embedding, it flips the active version in one step, swaps its own
//!    model at once and reports; the others swap as they learn the flip.
//!
//! `cancel` gives the switch up before the flip; after it, the switch
//! completes. So does losing the lifecycle lock, and the shared state
//! refuses the switch's writes once another holder has taken it (`Fence`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::follower::Follower;
use super::ports::{Fence, PortError};
use super::{Context, LifecycleError};
use crate::catalog::{CatalogError, Progress, Switched};
use crate::registry::ModelVersion;

/// How long the switching replica waits, after the flip, for its own swap
/// when its first try failed (its follower goes on trying).
const OWN_SWAP_WAIT: Duration = Duration::from_secs(120);
/// A switch in which no item got embedded and no replica became ready for
/// this long fails (a replica that keeps retrying, say), freeing the lifecycle.
const STALLED: Duration = Duration::from_secs(600);
/// How often the switching replica reads the replicas' progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Makes `version` the active model on every replica. `progress` gets the
/// images embedded so far, `swapping` is called once every replica is ready.
pub(super) async fn switch_to(
    ctx: &Context,
    follower: &Follower,
    version: ModelVersion,
    fence: &Fence,
    progress: &(dyn Fn(Progress) + Sync),
    swapping: &(dyn Fn() + Sync),
    cancel: &AtomicBool,
) -> Result<Switched, LifecycleError> {
    let started = Instant::now();
    let coordinator = &ctx.ports.coordinator;
    let switch_id = uuid::Uuid::new_v4().to_string();
    // Embeddings stored before the switch (an earlier activation of the version) are not counted.
    let stored_before = ctx.catalog.store().count_embedded(version.key.clone()).await.map_err(CatalogError::from)?;
    tracing::info!(version = %version.version, switch = %switch_id, "model switch started");
    coordinator.begin(&version.version, &switch_id, fence.token).await?;
    coordinator.changed().notify_waiters(); // this replica's follower starts at once
                                            // Why to give the switch up before its flip, if at all.
    let stop = || match fence.lost() {
        Some(why) => Some(LifecycleError::from(PortError::LockLost(why))),
        None => cancel.load(Ordering::Relaxed).then(|| CatalogError::Cancelled.into()),
    };
    let embedded = match await_ready(ctx, follower, &version, &switch_id, stored_before, progress, &stop).await {
        Ok(embedded) => embedded,
        Err(error) => {
            if let Err(abandon) = coordinator.abandon(&switch_id).await {
                tracing::error!(%abandon, "could not give the switch up; the next switch replaces it");
            }
            return Err(error);
        }
    };
    swapping();
    match coordinator.flip(&switch_id, &version.version, fence.token).await {
        Ok(true) => {}
        Ok(false) => return Err(LifecycleError::Switch("another switch replaced this one before its flip".into())),
        Err(error) => {
            if let Err(abandon) = coordinator.abandon(&switch_id).await {
                tracing::error!(%abandon, "could not give the switch up; the next lifecycle lock holder does");
            }
            return Err(error.into());
        }
    }
    swap_here(ctx, follower, &version).await?;
    let active = ctx.catalog.models().active();
    let unembeddable = active.lock_unembeddable().iter().copied().collect();
    let switched = Switched {
        version: version.version.clone(),
        model: version.model.clone(),
        embedded,
        items: active.index.len(),
        unembeddable,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(version = %switched.version, model = %switched.model, embedded, items = switched.items,
        seconds = switched.seconds, "model switch done");
    if let Err(error) = ctx.catalog.dump_index().await {
        tracing::error!(%error, "could not dump the new index; the next start rebuilds it");
    }
    Ok(switched)
}

/// After the flip: this replica swaps now, or, when that fails, waits a
/// while for its follower to (it tries again every `POLL`). Fails if it has
/// not swapped by then: the flip stands, and the follower goes on trying.
async fn swap_here(ctx: &Context, follower: &Follower, version: &ModelVersion) -> Result<(), LifecycleError> {
    let Err(error) = follower.step().await else { return Ok(()) };
    tracing::warn!(%error, "could not swap to the flipped version at once; the follower tries again");
    let mut serving = ctx.catalog.models().watch_serving();
    let swapped = serving.wait_for(|serving| *serving == version.version);
    if let Ok(Ok(_)) = tokio::time::timeout(OWN_SWAP_WAIT, swapped).await {
        return Ok(());
    }
    let why = format!("version {} is active, but this replica could not swap to it yet ({error})", version.version);
    Err(LifecycleError::Switch(format!("{why}; it keeps trying")))
}

/// Waits until every live replica is ready and no item lacks the target's
/// embedding; returns how many items were embedded for it.
async fn await_ready(
    ctx: &Context,
    follower: &Follower,
    version: &ModelVersion,
    switch_id: &str,
    stored_before: u64,
    progress: &(dyn Fn(Progress) + Sync),
    stop: &(dyn Fn() -> Option<LifecycleError> + Sync),
) -> Result<usize, LifecycleError> {
    let (mut last, mut moved) = ((0, 0), Instant::now());
    loop {
        if let Some(why) = stop() {
            return Err(why);
        }
        let status = ctx.ports.coordinator.status(switch_id, &version.key).await?;
        let embedded = status.embedded.saturating_sub(stored_before) as usize;
        if (embedded, status.ready) != last || follower.is_preparing() {
            (last, moved) = ((embedded, status.ready), Instant::now());
        } else if moved.elapsed() > STALLED {
            let why =
                format!("no progress for {} s: {} of {} replicas ready", STALLED.as_secs(), status.ready, status.live);
            return Err(LifecycleError::Switch(why));
        }
        progress(Progress { embedded, to_embed: embedded + status.missing as usize });
        if let Some(failure) = status.failures.first() {
            let why = format!("a replica could not prepare version {}: {failure}", version.version);
            return Err(LifecycleError::Switch(why));
        }
        if status.live > 0 && status.ready >= status.live && status.missing == 0 {
            return Ok(embedded);
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
}
