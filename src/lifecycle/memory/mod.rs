//! The lifecycle's ports in memory: replicas in one process. A single-node
//! service is a one-replica `MemoryCluster` (its switch flips as soon as its
//! own follower is ready); the switch protocol's tests join three.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Notify};

mod versions;

use crate::gallery::GalleryStore;
use crate::lifecycle::ports::{
    ClusterState, Fence, HeldLock, LifecycleLock, Membership, PortError, PortResult, RunKind, RunLog, StoredRun,
    SwitchCoordinator, SwitchStatus,
};
use crate::lifecycle::runs::has_finished;

/// Finished runs remembered per kind unless `keep_runs` says fewer (a single
/// node also keeps its jobs on disk), as many as `GET /admin/activations` lists.
const RUNS_KEPT: usize = 32;

/// The state replicas in one process share.
pub struct MemoryCluster {
    shared: Mutex<Shared>,
    changed: Arc<Notify>,
    /// Counts the target's embeddings for a switch's progress.
    store: Arc<dyn GalleryStore>,
    /// One version number chosen at a time.
    numbering: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Shared {
    active: Option<String>,
    target: Option<(String, String)>,
    replicas: BTreeMap<String, Replica>,
    holder: Option<String>,
    /// The lifecycle lock's fencing token: bumped at every taking.
    fence: i64,
    /// Tells the holder when the lock is taken from it (`MemoryReplica::revoke_lock`).
    lost: Option<watch::Sender<Option<String>>>,
    /// Newest last.
    runs: Vec<Run>,
    /// Published versions and the folder each was saved in.
    versions: BTreeMap<u64, PathBuf>,
    /// Deleted versions: every replica removes its copy.
    deleted: Vec<String>,
    /// Finished runs kept per kind.
    keep_runs: usize,
    /// Tests: while set, a run's first record waits for a permit of it.
    record_gate: Option<Arc<tokio::sync::Semaphore>>,
}

struct Replica {
    serving: String,
    ready_for: Option<String>,
    failed: Option<(String, String)>,
}

struct Run {
    kind: RunKind,
    id: String,
    replica: String,
    status: Value,
    cancel: bool,
}

impl MemoryCluster {
    /// A cluster whose active version is `active` (`None`: the bundled one).
    pub fn new(active: Option<String>, store: Arc<dyn GalleryStore>) -> Arc<Self> {
        let shared = Shared { active, keep_runs: RUNS_KEPT, ..Shared::default() };
        Arc::new(Self {
            shared: Mutex::new(shared),
            changed: Arc::default(),
            store,
            numbering: tokio::sync::Mutex::new(()),
        })
    }

    /// Keeps at most `keep` finished runs of each kind (`--keep-runs`, up to `RUNS_KEPT`).
    pub fn keep_runs(&self, keep: usize) {
        self.lock().keep_runs = keep.min(RUNS_KEPT);
    }

    /// A new replica's handle.
    pub fn join(self: &Arc<Self>) -> Arc<MemoryReplica> {
        Arc::new(MemoryReplica {
            cluster: self.clone(),
            id: uuid::Uuid::new_v4().to_string(),
            gone: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One replica's handle on a `MemoryCluster`.
pub struct MemoryReplica {
    cluster: Arc<MemoryCluster>,
    id: String,
    /// Left or killed: its heartbeat no longer brings it back.
    gone: AtomicBool,
}

impl MemoryReplica {
    /// Tests: runs' first records wait for permits of `gate` (a slow database).
    pub fn gate_records(&self, gate: Arc<tokio::sync::Semaphore>) {
        self.shared().record_gate = Some(gate);
    }

    /// Tests: the replica dies where it stands, holding whatever it held.
    pub fn kill(&self) {
        self.gone.store(true, Ordering::Relaxed);
        self.cluster.lock().replicas.remove(&self.id);
        self.cluster.changed.notify_waiters();
    }

    /// Tests: the lifecycle lock is taken from its holder (as when the
    /// connection holding it in PostgreSQL closes), which is told why.
    pub fn revoke_lock(&self, why: &str) {
        let mut shared = self.shared();
        shared.holder = None;
        shared.fence += 1;
        if let Some(lost) = shared.lost.take() {
            lost.send_replace(Some(why.to_string()));
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.cluster.lock()
    }

    /// Refuses a write made under a fence older than the lock's latest.
    fn check_fence(shared: &Shared, fence: i64) -> PortResult<()> {
        match shared.fence == fence {
            true => Ok(()),
            false => Err(PortError::LockLost("another holder has taken it".into())),
        }
    }

    fn notify(&self) {
        self.cluster.changed.notify_waiters();
    }
}

#[async_trait::async_trait]
impl Membership for MemoryReplica {
    fn replica(&self) -> &str {
        &self.id
    }

    async fn heartbeat(&self, serving: &str) -> PortResult<()> {
        if self.gone.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut shared = self.shared();
        let row = shared.replicas.entry(self.id.clone()).or_insert_with(|| Replica {
            serving: String::new(),
            ready_for: None,
            failed: None,
        });
        row.serving = serving.to_string();
        Ok(())
    }

    async fn lagging(&self, serving: &str) -> PortResult<usize> {
        Ok(self.shared().replicas.iter().filter(|(id, r)| **id != self.id && r.serving != serving).count())
    }

    async fn leave(&self) -> PortResult<()> {
        self.gone.store(true, Ordering::Relaxed);
        self.shared().replicas.remove(&self.id);
        Ok(())
    }

    async fn served(&self) -> PortResult<Vec<String>> {
        Ok(self.shared().replicas.values().map(|r| r.serving.clone()).collect())
    }

    fn poll_interval(&self) -> Option<Duration> {
        None // every change comes through this process, and notifies
    }
}

#[async_trait::async_trait]
impl SwitchCoordinator for MemoryReplica {
    fn changed(&self) -> Arc<Notify> {
        self.cluster.changed.clone()
    }

    async fn state(&self) -> PortResult<ClusterState> {
        let shared = self.shared();
        Ok(ClusterState { active: shared.active.clone(), target: shared.target.clone() })
    }

    async fn begin(&self, version: &str, switch_id: &str, fence: i64) -> PortResult<()> {
        {
            let mut shared = self.shared();
            Self::check_fence(&shared, fence)?;
            shared.target = Some((version.to_string(), switch_id.to_string()));
        }
        self.notify();
        Ok(())
    }

    // Readiness and failures are read by the switching replica's polling, not
    // notified: a notification would wake the followers for nothing.
    async fn ready(&self, switch_id: &str) -> PortResult<()> {
        if let Some(row) = self.shared().replicas.get_mut(&self.id) {
            row.ready_for = Some(switch_id.to_string());
        }
        Ok(())
    }

    async fn failed(&self, switch_id: &str, why: &str) -> PortResult<()> {
        if let Some(row) = self.shared().replicas.get_mut(&self.id) {
            row.failed = Some((switch_id.to_string(), why.to_string()));
        }
        Ok(())
    }

    /// With no shared record of the items a model cannot preprocess, the
    /// replicas' readiness says when nothing is left to embed.
    async fn status(&self, switch_id: &str, key: &str) -> PortResult<SwitchStatus> {
        let embedded = self.cluster.store.count_embedded(key.to_string()).await?;
        let count = self.cluster.store.count().await?;
        let shared = self.shared();
        let live = shared.replicas.len();
        let ready = shared.replicas.values().filter(|r| r.ready_for.as_deref() == Some(switch_id)).count();
        let failures = shared
            .replicas
            .values()
            .filter_map(|r| r.failed.as_ref().filter(|(id, _)| id == switch_id).map(|(_, why)| why.clone()))
            .collect();
        let missing = if live > 0 && ready >= live { 0 } else { count.saturating_sub(embedded) };
        Ok(SwitchStatus { live, ready, failures, embedded, missing })
    }

    async fn flip(&self, switch_id: &str, version: &str, fence: i64) -> PortResult<bool> {
        let flipped = {
            let mut shared = self.shared();
            Self::check_fence(&shared, fence)?;
            let current = shared.target.as_ref().is_some_and(|(_, id)| id == switch_id);
            if current {
                (shared.active, shared.target) = (Some(version.to_string()), None);
            }
            current
        };
        self.notify();
        Ok(flipped)
    }

    async fn abandon(&self, switch_id: &str) -> PortResult<()> {
        {
            let mut shared = self.shared();
            if shared.target.as_ref().is_some_and(|(_, id)| id == switch_id) {
                shared.target = None;
            }
        }
        self.notify();
        Ok(())
    }
}

/// The lifecycle lock, held: frees it when dropped, unless it was taken
/// from this holder meanwhile.
struct MemoryLock {
    cluster: Arc<MemoryCluster>,
    fence: i64,
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        let mut shared = self.cluster.lock();
        if shared.fence == self.fence {
            shared.holder = None;
            shared.lost = None;
        }
    }
}

#[async_trait::async_trait]
impl LifecycleLock for MemoryReplica {
    async fn acquire(&self, holder: &str) -> PortResult<Result<HeldLock, String>> {
        let (lost, watch_lost) = watch::channel(None);
        let (fence, gave_up) = {
            let mut shared = self.shared();
            if let Some(other) = &shared.holder {
                return Ok(Err(other.clone()));
            }
            shared.holder = Some(holder.to_string());
            shared.fence += 1;
            shared.lost = Some(lost);
            // A switch still published lost its switching replica: give it up.
            (shared.fence, shared.target.take().is_some())
        };
        if gave_up {
            self.notify();
        }
        let guard = Box::new(MemoryLock { cluster: self.cluster.clone(), fence });
        Ok(Ok(HeldLock { fence: Fence::new(fence, watch_lost), guard }))
    }
}

#[async_trait::async_trait]
impl RunLog for MemoryReplica {
    async fn record(&self, kind: RunKind, id: &str, status: Value) -> PortResult<()> {
        let gate = self.shared().record_gate.clone();
        if let Some(gate) = gate {
            let _permit = gate.acquire().await;
        }
        RunLog::publish(self, kind, id, status);
        Ok(())
    }

    fn publish(&self, kind: RunKind, id: &str, status: Value) {
        let mut shared = self.shared();
        match shared.runs.iter_mut().find(|r| r.kind == kind && r.id == id) {
            Some(run) => run.status = status,
            None => shared.runs.push(Run { kind, id: id.to_string(), replica: self.id.clone(), status, cancel: false }),
        }
        let finished = |r: &Run| r.kind == kind && has_finished(&r.status);
        while shared.runs.iter().filter(|r| finished(r)).count() > shared.keep_runs {
            let oldest = shared.runs.iter().position(finished).expect("one finished run of this kind");
            shared.runs.remove(oldest);
        }
    }

    async fn read(&self, kind: RunKind, id: Option<&str>) -> PortResult<Vec<StoredRun>> {
        let shared = self.shared();
        let runs = shared.runs.iter().rev().filter(|r| r.kind == kind && id.is_none_or(|id| r.id == id));
        Ok(runs
            .map(|r| StoredRun { status: r.status.clone(), replica_live: shared.replicas.contains_key(&r.replica) })
            .collect())
    }

    async fn request_cancel(&self, id: &str) -> PortResult<bool> {
        let mut shared = self.shared();
        let run = shared.runs.iter_mut().find(|r| r.id == id);
        Ok(run.map(|r| r.cancel = true).is_some())
    }

    async fn cancel_requested(&self, id: &str) -> PortResult<bool> {
        Ok(self.shared().runs.iter().any(|r| r.id == id && r.cancel))
    }
}
