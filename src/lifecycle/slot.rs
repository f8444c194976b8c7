//! The one-at-a-time slot that fine-tunes and activations share: this
//! process's holder, and the lifecycle lock across the replicas.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ports::{Fence, HeldLock, LifecycleLock};
use super::LifecycleError;

/// What holds the one-at-a-time slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotHolder {
    /// A fine-tune job, by id.
    Job(String),
    /// A model activation (`POST /admin/models/{version}/activate`), by id.
    Activation(String),
    /// A model version being deleted (`DELETE /admin/models/{version}`).
    Deletion(String),
}

impl std::fmt::Display for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Job(id) => write!(f, "job {id}"),
            Self::Activation(id) => write!(f, "model activation {id}"),
            Self::Deletion(version) => write!(f, "the deletion of model version {version}"),
        }
    }
}

impl SlotHolder {
    /// How the lifecycle lock names it.
    fn key(&self) -> String {
        match self {
            Self::Job(id) => format!("job:{id}"),
            Self::Activation(id) => format!("activation:{id}"),
            Self::Deletion(version) => format!("deletion:{version}"),
        }
    }

    fn from_key(key: &str) -> Self {
        match key.split_once(':') {
            Some(("activation", id)) => Self::Activation(id.to_string()),
            Some(("deletion", version)) => Self::Deletion(version.to_string()),
            Some((_, id)) => Self::Job(id.to_string()),
            None => Self::Job(key.to_string()),
        }
    }
}

/// How long a claim tries again while the slot is busy, and how often.
const CLAIM_WAIT: Duration = Duration::from_secs(2);
const CLAIM_RETRY: Duration = Duration::from_millis(50);

/// Who holds the slot in this process, and, once the lifecycle lock is
/// taken, the fence its work writes under.
type Held = Arc<Mutex<Option<(SlotHolder, Option<Fence>)>>>;

/// This process's holder of the slot and the lock behind it.
#[derive(Clone)]
pub(super) struct Slots {
    /// A std `Mutex`: held for a field read or write, never across an `.await`.
    held: Held,
    lock: Arc<dyn LifecycleLock>,
}

/// The slot, held; frees it when dropped, with the lifecycle lock.
pub struct Slot {
    held: Held,
    lock: Option<HeldLock>,
}

impl Slot {
    /// The lifecycle lock's fence: its token, and word when it is lost.
    pub fn fence(&self) -> Fence {
        self.lock.as_ref().expect("a claimed slot holds the lock").fence.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Slots {
    pub(super) fn new(lock: Arc<dyn LifecycleLock>) -> Self {
        Self { held: Arc::default(), lock }
    }

    /// Takes the slot for `holder`, or says who has it, here or on another
    /// replica. A run answers as finished a moment before its slot and lock
    /// are free (its final record is written first, and PostgreSQL releases
    /// the lock when the connection has closed), so a busy slot is tried
    /// again for up to `CLAIM_WAIT`: a client that starts the next run when
    /// it reads the last one as finished is not refused.
    pub(super) async fn claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        let started = Instant::now();
        loop {
            match self.try_claim(holder.clone()).await {
                Err(LifecycleError::Busy(_)) if started.elapsed() < CLAIM_WAIT => tokio::time::sleep(CLAIM_RETRY).await,
                claimed => return claimed,
            }
        }
    }

    async fn try_claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        {
            let mut held = self.held();
            if let Some((busy, _)) = held.as_ref() {
                return Err(LifecycleError::Busy(busy.clone()));
            }
            *held = Some((holder.clone(), None));
        }
        let mut slot = Slot { held: self.held.clone(), lock: None }; // dropped on an error: frees the local slot
        match self.lock.acquire(&holder.key()).await? {
            Ok(lock) => {
                self.held().as_mut().expect("claimed above").1 = Some(lock.fence.clone());
                slot.lock = Some(lock);
            }
            Err(other) => return Err(LifecycleError::Busy(SlotHolder::from_key(&other))),
        }
        Ok(slot)
    }

    /// Who holds the slot in this process now.
    pub(super) fn holder(&self) -> Option<SlotHolder> {
        self.held().as_ref().map(|(holder, _)| holder.clone())
    }

    /// The fence of the lock this process holds; an error when it holds none.
    pub(super) fn fence(&self) -> Result<Fence, LifecycleError> {
        let fence = self.held().as_ref().and_then(|(_, fence)| fence.clone());
        fence.ok_or_else(|| LifecycleError::Switch("the lifecycle lock is not held".into()))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<(SlotHolder, Option<Fence>)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}
