//! The ports of the model lifecycle: what it needs from the replicas it
//! shares a gallery with. Two implementations: `memory` (one process; a
//! single-node service is a one-replica cluster whose flip happens at once)
//! and `crate::cluster` (PostgreSQL, shared by every replica).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::error_kind::ErrorKind;
use crate::gallery::GalleryError;
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry, RegistryError};

/// How often a replica says it is alive, and how soon a failed step of the
/// follower is tried again.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(transparent)]
    Database(#[from] GalleryError),
    #[error(transparent)]
    Models(#[from] RegistryError),
    #[error("model versions: {0}")]
    Io(#[from] std::io::Error),
    /// The lifecycle lock is gone (its connection closed, or another holder
    /// took it): the work under it stops, and its writes are refused.
    #[error("lost the lifecycle lock ({0}); stopped, so that no two fine-tunes or activations run at once")]
    LockLost(String),
}

impl PortError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Database(e) => e.kind(),
            Self::Models(_) | Self::Io(_) => ErrorKind::Internal,
            Self::LockLost(_) => ErrorKind::Conflict,
        }
    }
}

pub type PortResult<T> = Result<T, PortError>;

/// The version every replica serves, and the switch under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    /// `None`: the bundled model.
    pub active: Option<String>,
    /// The version a switch prepares, with the switch's id.
    pub target: Option<(String, String)>,
}

/// How a switch stands across the replicas, read in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct SwitchStatus {
    pub live: usize,
    pub ready: usize,
    /// Replicas that could not prepare, with why.
    pub failures: Vec<String>,
    /// Items with the target's embedding, and items it still lacks (not
    /// counting those it cannot preprocess).
    pub embedded: u64,
    pub missing: u64,
}

/// Who is live and what each serves.
#[async_trait::async_trait]
pub trait Membership: Send + Sync {
    /// This replica's id.
    fn replica(&self) -> &str;
    /// Says this replica is alive and which version it serves.
    async fn heartbeat(&self, serving: &str) -> PortResult<()>;
    /// How many other live replicas serve a version other than `serving`.
    async fn lagging(&self, serving: &str) -> PortResult<usize>;
    /// At shutdown: a switch no longer waits for this replica.
    async fn leave(&self) -> PortResult<()>;
    /// The versions live replicas serve.
    async fn served(&self) -> PortResult<Vec<String>>;
    /// How often to read the state without a notification; `None` when it
    /// changes only through this replica (nothing to poll).
    fn poll_interval(&self) -> Option<Duration>;
}

/// The two-phase switch: publish a target, each replica reports ready (or
/// failed), the switching replica flips or abandons.
#[async_trait::async_trait]
pub trait SwitchCoordinator: Send + Sync {
    /// Woken at every step of a switch.
    fn changed(&self) -> Arc<Notify>;
    async fn state(&self) -> PortResult<ClusterState>;
    /// Phase one: asks every replica to prepare `version`; refused
    /// (`LockLost`) unless `fence` is the lifecycle lock's latest.
    async fn begin(&self, version: &str, switch_id: &str, fence: i64) -> PortResult<()>;
    /// This replica has the target loaded, embeds uploads with it too, and
    /// found nothing left to embed.
    async fn ready(&self, switch_id: &str) -> PortResult<()>;
    /// This replica could not prepare the switch.
    async fn failed(&self, switch_id: &str, why: &str) -> PortResult<()>;
    /// How far the replicas are with the switch to the model stored under `key`.
    async fn status(&self, switch_id: &str, key: &str) -> PortResult<SwitchStatus>;
    /// Phase two: makes `version` active for every replica if `switch_id` is
    /// still the switch under way; false when another replaced it. Refused
    /// (`LockLost`) unless `fence` is the lifecycle lock's latest.
    async fn flip(&self, switch_id: &str, version: &str, fence: i64) -> PortResult<bool>;
    /// Gives a switch up: replicas drop what they prepared.
    async fn abandon(&self, switch_id: &str) -> PortResult<()>;
}

/// What a holder of the lifecycle lock works under. `token` grows at every
/// taking of the lock across the replicas, and the shared state refuses a
/// write made under an older one (a fencing token): a holder that lost the
/// lock without knowing it yet cannot overwrite its successor's switch.
/// `lost` says, once the lock is gone, why.
#[derive(Clone, Debug)]
pub struct Fence {
    pub token: i64,
    lost: watch::Receiver<Option<String>>,
}

impl Fence {
    pub fn new(token: i64, lost: watch::Receiver<Option<String>>) -> Self {
        Self { token, lost }
    }

    /// Why the lock was lost, once it is.
    pub fn lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Waits until the lock is lost (with why) or released (`None`).
    pub async fn wait_lost(mut self) -> Option<String> {
        self.lost.wait_for(Option::is_some).await.ok().and_then(|why| why.clone())
    }
}

/// A held lock: dropping `guard` releases it.
pub struct HeldLock {
    pub fence: Fence,
    pub guard: Box<dyn Send + Sync>,
}

/// One fine-tune or activation at a time across the replicas.
#[async_trait::async_trait]
pub trait LifecycleLock: Send + Sync {
    /// Takes the lock for `holder` (`job:<id>`, `activation:<id>`), or says
    /// who has it. Taking it gives up a switch its last holder left published.
    async fn acquire(&self, holder: &str) -> PortResult<Result<HeldLock, String>>;
}

/// Which records a run log entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Job,
    Activation,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Activation => "activation",
        }
    }
}

/// A run's latest status as stored, and whether the replica that runs it is live.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub status: Value,
    pub replica_live: bool,
}

/// Fine-tune and activation records readable from every replica, as JSON
/// (`runs::Runs` gives them their types).
#[async_trait::async_trait]
pub trait RunLog: Send + Sync {
    /// Writes a run's first status before its start is answered.
    async fn record(&self, kind: RunKind, id: &str, status: Value) -> PortResult<()>;
    /// Hands a later status to a writer, in order, without waiting.
    fn publish(&self, kind: RunKind, id: &str, status: Value);
    /// Newest first; one run when `id` is given.
    async fn read(&self, kind: RunKind, id: Option<&str>) -> PortResult<Vec<StoredRun>>;
    /// Asks the replica running a job to cancel it; false when no replica knows it.
    async fn request_cancel(&self, id: &str) -> PortResult<bool>;
    async fn cancel_requested(&self, id: &str) -> PortResult<bool>;
}

/// Saved model versions, shared by the replicas.
#[async_trait::async_trait]
pub trait VersionStore: Send + Sync {
    /// Saves trained weights as the next version number (setting the
    /// manifest's version), in `registry` and for every replica; refused
    /// (`LockLost`) unless `fence` is the lifecycle lock's latest.
    async fn publish(
        &self,
        registry: &Registry,
        weights: &Path,
        manifest: Manifest,
        fence: i64,
    ) -> PortResult<ModelVersion>;
    /// Deletes a saved version for every replica (its number stays used),
    /// from `registry` too; refused (`LockLost`) unless `fence` is the
    /// lifecycle lock's latest.
    async fn delete(&self, registry: &Registry, version: &str, fence: i64) -> PortResult<()>;
    /// Copies into `registry` every version another replica saved, and
    /// removes those another replica deleted.
    async fn install(&self, registry: &Registry) -> PortResult<()>;
}

/// The five ports, chosen once at start.
#[derive(Clone)]
pub struct Ports {
    pub membership: Arc<dyn Membership>,
    pub coordinator: Arc<dyn SwitchCoordinator>,
    pub lock: Arc<dyn LifecycleLock>,
    pub runs: Arc<dyn RunLog>,
    pub versions: Arc<dyn VersionStore>,
}

impl Ports {
    /// All five from one value that implements them.
    pub fn of<T>(all: Arc<T>) -> Self
    where
        T: Membership + SwitchCoordinator + LifecycleLock + RunLog + VersionStore + 'static,
    {
        Self { membership: all.clone(), coordinator: all.clone(), lock: all.clone(), runs: all.clone(), versions: all }
    }
}
