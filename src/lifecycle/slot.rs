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

/// Who holds the slot in this process: the holder, once the lifecycle lock
/// is taken the fence its work writes under, and whether its run is
/// finishing (about to answer as ended, its slot freed a moment later).
struct HeldSlot {
    holder: SlotHolder,
    fence: Option<Fence>,
    finishing: bool,
}

type Held = Arc<Mutex<Option<HeldSlot>>>;

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

    /// A handle that marks this slot's run as finishing.
    pub fn finishing(&self) -> Finishing {
        Finishing(self.held.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Marks the held slot's run as finishing, just before the run answers as
/// ended: a claim meanwhile waits for the slot instead of being refused.
#[derive(Clone)]
pub struct Finishing(Held);

impl Finishing {
    pub fn mark(&self) {
        if let Some(held) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            held.finishing = true;
        }
    }
}

impl Slots {
    pub(super) fn new(lock: Arc<dyn LifecycleLock>) -> Self {
        Self { held: Arc::default(), lock }
    }

    /// Takes the slot for `holder`, or says who has it, here or on another
    /// replica. A run answers as ended a moment before its slot and lock are
    /// free (its final record is written first), so a slot whose run is
    /// finishing is waited for, up to `CLAIM_WAIT`: a client that starts the
    /// next run when it reads the last one as ended is not refused. (The
    /// PostgreSQL lock waits the same way for a holder whose run is recorded
    /// as ended.)
    pub(super) async fn claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        let started = Instant::now();
        loop {
            let finishing = self.held().as_ref().is_some_and(|held| held.finishing);
            if finishing && started.elapsed() < CLAIM_WAIT {
                tokio::time::sleep(CLAIM_RETRY).await;
                continue;
            }
            return self.try_claim(holder).await;
        }
    }

    async fn try_claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        {
            let mut held = self.held();
            if let Some(busy) = held.as_ref() {
                return Err(LifecycleError::Busy(busy.holder.clone()));
            }
            *held = Some(HeldSlot { holder: holder.clone(), fence: None, finishing: false });
        }
        let mut slot = Slot { held: self.held.clone(), lock: None }; // dropped on an error: frees the local slot
        match self.lock.acquire(&holder.key()).await? {
            Ok(lock) => {
                self.held().as_mut().expect("claimed above").fence = Some(lock.fence.clone());
                slot.lock = Some(lock);
            }
            Err(other) => return Err(LifecycleError::Busy(SlotHolder::from_key(&other))),
        }
        Ok(slot)
    }

    /// Who holds the slot in this process now.
    pub(super) fn holder(&self) -> Option<SlotHolder> {
        self.held().as_ref().map(|held| held.holder.clone())
    }

    /// The fence of the lock this process holds; an error when it holds none.
    pub(super) fn fence(&self) -> Result<Fence, LifecycleError> {
        let fence = self.held().as_ref().and_then(|held| held.fence.clone());
        fence.ok_or_else(|| LifecycleError::Switch("the lifecycle lock is not held".into()))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<HeldSlot>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}
