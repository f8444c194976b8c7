//! The switch protocol over in-memory ports, in milliseconds: a single node
//! (a one-replica cluster), and three replicas sharing one store, with a
//! replica that lags the flip, one that dies mid-switch, an abandoned switch
//! and a rollback right after a flip. A stand-in encoder (a fixed random
//! projection) and a real store and index in a temporary folder; no libtorch,
//! no PostgreSQL.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::memory::{MemoryCluster, MemoryReplica};
use super::ports::{Membership, SwitchCoordinator};
use super::*;
use crate::catalog::tests::{settings, settings_gated, uploads, Gate};
use crate::catalog::{CatalogSettings, OnDuplicate, Priority};
use crate::gallery::{GalleryStore, SqliteGallery};
use crate::index::LocalIndexes;
use crate::manifest::FASHION_MODEL_DIR;

/// One replica: its catalog, its lifecycle and its handle on the cluster.
struct Replica {
    catalog: Catalog,
    lifecycle: ModelLifecycle,
    handle: Arc<MemoryReplica>,
}

/// A replica over `store` with its own data folder `dir`. `follow`: it
/// follows the cluster by itself; otherwise the test steps its follower.
async fn replica(
    cluster: &Arc<MemoryCluster>,
    store: Arc<dyn GalleryStore>,
    dir: &Path,
    settings: CatalogSettings,
    follow: bool,
) -> Replica {
    let registry = Registry::new(Path::new(FASHION_MODEL_DIR), dir);
    let handle = cluster.join();
    let ports = Ports::of(handle.clone());
    let version = ModelLifecycle::adopt_active_version(&ports, &registry).await.unwrap();
    let indexes: Arc<dyn IndexProvider> = Arc::new(LocalIndexes { dir: dir.join("index"), compact_fraction: 0.1 });
    let (catalog, _) = Catalog::open(store, indexes.as_ref(), version, settings).await.unwrap();
    let lifecycle = ModelLifecycle::new(catalog.clone(), indexes, registry, ports);
    if follow {
        lifecycle.join().await.unwrap();
    } else {
        lifecycle.follower.join().await.unwrap();
    }
    Replica { catalog, lifecycle, handle }
}

/// A single node: one replica that follows by itself.
async fn single(dir: &Path, settings: CatalogSettings) -> (Replica, Arc<SqliteGallery>) {
    let store = Arc::new(SqliteGallery::open(dir).unwrap());
    let registry = Registry::new(Path::new(FASHION_MODEL_DIR), dir);
    let active = registry.active().unwrap();
    let cluster = MemoryCluster::new((!active.bundled).then_some(active.version), store.clone());
    (replica(&cluster, store.clone(), dir, settings, true).await, store)
}

/// Three replicas over one store: the first two follow by themselves, the
/// test steps the third (`lagging`).
async fn three(dir: &Path) -> (Vec<Replica>, Arc<SqliteGallery>) {
    let store = Arc::new(SqliteGallery::open(dir).unwrap());
    let cluster = MemoryCluster::new(None, store.clone());
    let mut replicas = Vec::new();
    for i in 0..3 {
        let own = dir.join(format!("replica-{i}"));
        replicas.push(replica(&cluster, store.clone(), &own, settings(), i < 2).await);
    }
    (replicas, store)
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 10 s: {what}");
}

fn serving(replica: &Replica) -> String {
    replica.lifecycle.active_version().version
}

/// Saves the active encoder again as a new version (same weights, its own
/// key), holding the slot as a fine-tune does.
async fn new_version(replica: &Replica) -> ModelVersion {
    let base = replica.lifecycle.active_version();
    let _slot = replica.lifecycle.claim(SlotHolder::Job("saving".into())).await.unwrap();
    replica.lifecycle.save_version(base.encoder_path(), base.manifest.clone()).await.unwrap()
}

/// Switches to `version`, holding the slot as a fine-tune or an activation does.
async fn switch(
    lifecycle: &ModelLifecycle,
    version: ModelVersion,
    cancel: &AtomicBool,
) -> Result<Switched, LifecycleError> {
    let _slot = lifecycle.claim(SlotHolder::Job("switching".into())).await?;
    lifecycle.switch_to(version, &|_| {}, &|| {}, cancel).await
}

#[tokio::test]
async fn a_single_node_switch_embeds_everything_and_a_cancelled_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, store) = single(dir.path(), settings()).await;
    let lifecycle = &node.lifecycle;
    node.catalog.add(uploads(&[1, 2, 3, 4, 5]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let base = lifecycle.active_version();
    let saved = new_version(&node).await;
    assert_ne!(saved.version, base.version);

    let cancelled = switch(lifecycle, saved.clone(), &AtomicBool::new(true)).await;
    assert!(cancelled.as_ref().is_err_and(LifecycleError::is_cancelled), "{cancelled:?}");
    assert_eq!(lifecycle.active_version().version, base.version);

    let claimed = lifecycle.claim(SlotHolder::Job("j".into())).await.unwrap();
    assert!(matches!(lifecycle.activate(&saved.version).await, Err(LifecycleError::Busy(SlotHolder::Job(_)))));
    drop(claimed);
    assert!(matches!(lifecycle.activate("nope").await, Err(LifecycleError::UnknownVersion(_))));
    let started = lifecycle.activate(&saved.version).await.unwrap();
    let finished = lifecycle.activation_finished(&started.id).await.unwrap();
    assert_eq!(finished.state, ActivationState::Done, "{finished:?}");
    assert_eq!(finished.progress.embedded, 5);
    let switched = finished.result.unwrap();
    assert_eq!((switched.items, lifecycle.active_version().version), (5, saved.version.clone()));
    assert_eq!(lifecycle.activations().await.unwrap()[0].id, started.id);
    assert_eq!(store.count_embedded(saved.key.clone()).await.unwrap(), 5);
    eventually("the slot is free again", || async { lifecycle.slot_holder().is_none() }).await;
    assert!(node.catalog.models().previous().is_none(), "no other replica serves the old version");

    // A restart comes back on the switched version, with its index.
    drop(node);
    let (node, _) = single(dir.path(), settings()).await;
    assert_eq!((node.lifecycle.active_version().version, node.catalog.serving().indexed_items), (saved.version, 5));
}

/// Items deleted while a switch re-embeds them (read from the store, not yet
/// written back) neither fail the switch nor come back in its index.
#[tokio::test]
async fn deletes_during_a_single_node_switch_leave_it_complete_with_only_live_items() {
    let dir = tempfile::tempdir().unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Arc::new(Gate { entered: Mutex::new(entered_tx), release: Mutex::new(release_rx) });
    let (node, store) = single(dir.path(), settings_gated(Some(gate))).await;
    let added = node.catalog.add(uploads(&[1, 2, 3, 4, 5]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let saved = new_version(&node).await;

    let switching = tokio::spawn({
        let (lifecycle, saved) = (node.lifecycle.clone(), saved.clone());
        async move { switch(&lifecycle, saved, &AtomicBool::new(false)).await }
    });
    tokio::task::spawn_blocking(move || entered.recv().unwrap()).await.unwrap();
    for item in &added[..2] {
        assert!(node.catalog.delete(item.id).await.unwrap());
    }
    release.send(()).unwrap();
    let switched = switching.await.unwrap().expect("the switch completes");
    assert_eq!((switched.items, node.catalog.serving().indexed_items), (3, 3));
    assert_eq!(store.count_embedded(saved.key).await.unwrap(), 3);
}

/// The third replica learns the flip late: until it does, the others embed
/// their uploads with the old model too (its searches find them), and it
/// embeds its own with both; once it swaps, the old model is dropped.
#[tokio::test]
async fn a_replica_that_lags_the_flip_misses_no_upload() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, store) = three(dir.path()).await;
    let (a, lagging) = (&replicas[0], &replicas[2]);
    a.catalog.add(uploads(&[1, 2, 3]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let (old, new) = (a.lifecycle.active_version(), new_version(a).await);

    let switching = tokio::spawn({
        let (lifecycle, new) = (a.lifecycle.clone(), new.clone());
        async move { switch(&lifecycle, new, &AtomicBool::new(false)).await }
    });
    eventually("the switch is published", || async { a.handle.state().await.unwrap().target.is_some() }).await;
    lagging.lifecycle.follower.step().await.unwrap(); // prepares; it will not look again until told
    let switched = switching.await.unwrap().unwrap();
    assert_eq!((switched.items, serving(a)), (3, new.version.clone()));
    eventually("the second replica swaps", || async { serving(&replicas[1]) == new.version }).await;
    assert_eq!(serving(lagging), old.version, "the third has not looked since it prepared");

    let from_a = a.catalog.add(uploads(&[4]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let from_lagging = lagging.catalog.add(uploads(&[5]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    for key in [&old.key, &new.key] {
        let embedded = store.embedded_ids(key.clone()).await.unwrap();
        assert!(embedded.contains(&from_a[0].id) && embedded.contains(&from_lagging[0].id), "{key}: {embedded:?}");
    }
    assert!(a.catalog.models().previous().is_some(), "kept while a replica serves it");

    lagging.lifecycle.follower.step().await.unwrap();
    assert_eq!((serving(lagging), lagging.catalog.serving().indexed_items), (new.version.clone(), 5));
    for replica in &replicas[1..] {
        replica.handle.heartbeat(&serving(replica)).await.unwrap(); // as their next heartbeat will
    }
    a.lifecycle.follower.step().await.unwrap();
    assert!(a.catalog.models().previous().is_none(), "dropped once every replica serves the new version");
}

/// A replica that never gets ready holds the switch until it dies; then the
/// switch completes without it.
#[tokio::test]
async fn a_replica_that_dies_mid_switch_is_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, _) = three(dir.path()).await;
    let (a, silent) = (&replicas[0], &replicas[2]);
    a.catalog.add(uploads(&[1, 2]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let new = new_version(a).await;

    let mut switching = tokio::spawn({
        let (lifecycle, new) = (a.lifecycle.clone(), new.clone());
        async move { switch(&lifecycle, new, &AtomicBool::new(false)).await }
    });
    eventually("two replicas are ready", || async {
        let (_, id) = a.handle.state().await.unwrap().target.unwrap_or_default();
        a.handle.status(&id, &new.key).await.unwrap().ready == 2
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut switching).await.is_err(), "it waits for the third");
    silent.handle.kill();
    let switched = switching.await.unwrap().unwrap();
    assert_eq!(switched.version, new.version);
    eventually("the second replica swaps", || async { serving(&replicas[1]) == new.version }).await;
}

/// A switch given up before its flip: every replica drops what it prepared
/// and keeps serving the old version.
#[tokio::test]
async fn an_abandoned_switch_changes_nothing_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, _) = three(dir.path()).await;
    let (a, silent) = (&replicas[0], &replicas[2]);
    a.catalog.add(uploads(&[1, 2]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let (old, new) = (a.lifecycle.active_version(), new_version(a).await);
    let cancel = Arc::new(AtomicBool::new(false));

    let switching = tokio::spawn({
        let (lifecycle, new, cancel) = (a.lifecycle.clone(), new.clone(), cancel.clone());
        async move { switch(&lifecycle, new, &cancel).await }
    });
    eventually("the second replica prepared", || async { replicas[1].catalog.models().next().is_some() }).await;
    cancel.store(true, std::sync::atomic::Ordering::Relaxed); // the third never got ready: no flip yet
    let outcome = switching.await.unwrap();
    assert!(outcome.as_ref().is_err_and(LifecycleError::is_cancelled), "{outcome:?}");
    assert_eq!(a.handle.state().await.unwrap().target, None);
    silent.lifecycle.follower.step().await.unwrap();
    for replica in &replicas {
        eventually("the prepared model is dropped", || async { replica.catalog.models().next().is_none() }).await;
        assert_eq!(serving(replica), old.version);
    }
}

/// Switching back right after a flip, while a replica still serves the old
/// version: the old model, still loaded, is prepared again and served.
#[tokio::test]
async fn a_rollback_right_after_a_flip_serves_the_old_version_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, store) = three(dir.path()).await;
    let (a, lagging) = (&replicas[0], &replicas[2]);
    a.catalog.add(uploads(&[1, 2, 3]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let (old, new) = (a.lifecycle.active_version(), new_version(a).await);

    let forward = tokio::spawn({
        let (lifecycle, new) = (a.lifecycle.clone(), new.clone());
        async move { switch(&lifecycle, new, &AtomicBool::new(false)).await }
    });
    eventually("the switch is published", || async { a.handle.state().await.unwrap().target.is_some() }).await;
    lagging.lifecycle.follower.step().await.unwrap();
    forward.await.unwrap().unwrap();

    let back = tokio::spawn({
        let (lifecycle, old) = (a.lifecycle.clone(), old.clone());
        async move { switch(&lifecycle, old, &AtomicBool::new(false)).await }
    });
    eventually("the rollback is published", || async {
        a.handle.state().await.unwrap().target.is_some_and(|(v, _)| v == old.version)
    })
    .await;
    lagging.lifecycle.follower.step().await.unwrap(); // follows the first flip, then prepares the rollback
    let switched = back.await.unwrap().unwrap();
    assert_eq!((switched.version, switched.items), (old.version.clone(), 3));
    eventually("the second replica swaps back", || async { serving(&replicas[1]) == old.version }).await;
    lagging.lifecycle.follower.step().await.unwrap();
    for replica in &replicas {
        assert_eq!(serving(replica), old.version);
    }
    assert_eq!(store.count_embedded(old.key.clone()).await.unwrap(), 3);
}

/// A client that goes away while its activation is being recorded (the
/// handler's future dropped) leaves the activation running to its end.
#[tokio::test]
async fn an_activation_whose_client_leaves_while_it_is_recorded_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = single(dir.path(), settings()).await;
    node.catalog.add(uploads(&[1, 2, 3]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let saved = new_version(&node).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    node.handle.gate_records(gate.clone());

    let request = node.lifecycle.activate(&saved.version);
    assert!(tokio::time::timeout(Duration::from_millis(100), request).await.is_err(), "the record waits");
    gate.add_permits(2); // its first record, and its last before the lock goes
    let lifecycle = &node.lifecycle;
    eventually("the activation to finish", || async {
        let listed = lifecycle.activations().await.unwrap();
        listed.first().is_some_and(|a| a.state == ActivationState::Done)
    })
    .await;
    assert_eq!(lifecycle.active_version().version, saved.version);
    eventually("the slot is free again", || async { lifecycle.slot_holder().is_none() }).await;
}

/// A holder whose lifecycle lock is taken from it (in PostgreSQL: its
/// connection closed) gives its switch up, and the shared state refuses
/// what it still tries to write under the old fence; the next holder keeps
/// the lock when the old one lets its slot go.
#[tokio::test]
async fn a_holder_that_lost_the_lock_stops_its_switch_and_its_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, _) = three(dir.path()).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    a.catalog.add(uploads(&[1, 2]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    let (old, new) = (a.lifecycle.active_version(), new_version(a).await);

    let slot = a.lifecycle.claim(SlotHolder::Job("first".into())).await.unwrap();
    let fence = slot.fence();
    let switching = tokio::spawn({
        let (lifecycle, new) = (a.lifecycle.clone(), new.clone());
        async move { lifecycle.switch_to(new, &|_| {}, &|| {}, &AtomicBool::new(false)).await }
    });
    eventually("the switch is published", || async { a.handle.state().await.unwrap().target.is_some() }).await;
    a.handle.revoke_lock("its connection to PostgreSQL closed"); // the third replica never got ready: no flip yet
    let outcome = switching.await.unwrap();
    let error = outcome.as_ref().err().map(ToString::to_string).unwrap_or_default();
    assert!(error.contains("lost the lifecycle lock (its connection to PostgreSQL closed)"), "{outcome:?}");
    assert_eq!(fence.lost().as_deref(), Some("its connection to PostgreSQL closed"));

    let next = b.lifecycle.claim(SlotHolder::Job("second".into())).await.unwrap();
    assert!(next.fence().token > fence.token);
    for refused in [
        a.handle.begin(&new.version, "stale", fence.token).await.err(),
        a.handle.flip("stale", &new.version, fence.token).await.err(),
        a.lifecycle.save_version(old.encoder_path(), old.manifest.clone()).await.err().map(|e| match e {
            LifecycleError::Port(e) => e,
            other => panic!("{other}"),
        }),
    ] {
        assert!(matches!(refused, Some(PortError::LockLost(_))), "{refused:?}");
    }
    drop(slot);
    let third = replicas[2].lifecycle.claim(SlotHolder::Job("third".into())).await;
    let busy = third.err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(busy, "job second is still running; wait for it or cancel it");
    for replica in &replicas[..2] {
        assert_eq!(serving(replica), old.version);
    }
}
