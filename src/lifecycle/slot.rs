//! The one-at-a-time slot that fine-tunes and activations share: this
//! process's holder, and the lifecycle lock across the replicas.

use std::sync::{Arc, Mutex};

use super::ports::{HeldLock, LifecycleLock};
use super::LifecycleError;

/// What holds the one-at-a-time slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotHolder {
    /// A fine-tune job, by id.
    Job(String),
    /// A model activation (`POST /admin/models/{version}/activate`), by id.
    Activation(String),
}

impl std::fmt::Display for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Job(id) => write!(f, "job {id}"),
            Self::Activation(id) => write!(f, "model activation {id}"),
        }
    }
}

impl SlotHolder {
    /// How the lifecycle lock names it.
    fn key(&self) -> String {
        match self {
            Self::Job(id) => format!("job:{id}"),
            Self::Activation(id) => format!("activation:{id}"),
        }
    }

    fn from_key(key: &str) -> Self {
        match key.split_once(':') {
            Some(("activation", id)) => Self::Activation(id.to_string()),
            Some((_, id)) => Self::Job(id.to_string()),
            None => Self::Job(key.to_string()),
        }
    }
}

/// This process's holder of the slot and the lock behind it.
#[derive(Clone)]
pub(super) struct Slots {
    /// A std `Mutex`: held for a field read or write, never across an `.await`.
    holder: Arc<Mutex<Option<SlotHolder>>>,
    lock: Arc<dyn LifecycleLock>,
}

/// The slot, held; frees it when dropped, with the lifecycle lock.
pub struct Slot {
    holder: Arc<Mutex<Option<SlotHolder>>>,
    _lock: Option<HeldLock>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Slots {
    pub(super) fn new(lock: Arc<dyn LifecycleLock>) -> Self {
        Self { holder: Arc::default(), lock }
    }

    /// Takes the slot for `holder`, or says who has it, here or on another replica.
    pub(super) async fn claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        {
            let mut slot = self.holder.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(busy) = slot.as_ref() {
                return Err(LifecycleError::Busy(busy.clone()));
            }
            *slot = Some(holder.clone());
        }
        let mut slot = Slot { holder: self.holder.clone(), _lock: None }; // dropped on an error: frees the local slot
        match self.lock.acquire(&holder.key()).await? {
            Ok(lock) => slot._lock = Some(lock),
            Err(other) => return Err(LifecycleError::Busy(SlotHolder::from_key(&other))),
        }
        Ok(slot)
    }

    /// Who holds the slot in this process now.
    pub(super) fn holder(&self) -> Option<SlotHolder> {
        self.holder.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
