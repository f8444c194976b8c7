//! The models a request can meet: the active one, and during a cluster-wide
//! switch the next one (uploads are embedded with it too, so none lacks it at
//! the flip) or, after the flip, the previous one (while another replica
//! still searches with it). The request path reads them; the model lifecycle
//! changes them.
//!
//! Each is one value behind an `ArcSwap`: a request takes the active model
//! once and uses it throughout, so a switch never mixes two models'
//! embeddings in one answer.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{watch, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::active::{ActiveModel, Unembeddable};
use crate::metrics;

/// The writers' lock held alone: no add or delete is under way.
pub type Exclusive = OwnedRwLockWriteGuard<()>;

pub struct ServingModels {
    active: ArcSwap<ActiveModel>,
    next: ArcSwapOption<ActiveModel>,
    previous: ArcSwapOption<ActiveModel>,
    /// Adds and deletes hold it shared; a model switch holds it alone while
    /// it catches up with them and swaps.
    writes: Arc<RwLock<()>>,
    /// The version serving now, for whoever waits for a swap.
    serving: watch::Sender<String>,
    /// What each model found it cannot preprocess.
    unembeddable: Arc<Unembeddable>,
}

impl ServingModels {
    pub(crate) fn new(active: ActiveModel, unembeddable: Arc<Unembeddable>) -> Self {
        let info = active.embedder.info();
        metrics::model_info(&info.model_key, &info.device, &info.precision.to_string(), true);
        let (serving, _) = watch::channel(active.version.version.clone());
        Self {
            active: ArcSwap::from_pointee(active),
            next: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            writes: Arc::default(),
            serving,
            unembeddable,
        }
    }

    /// For starting a model: what each model found it cannot preprocess.
    pub(crate) fn unembeddable(&self) -> &Unembeddable {
        &self.unembeddable
    }

    /// The model serving now. Take it once per request and use it throughout.
    pub(crate) fn active(&self) -> Arc<ActiveModel> {
        self.active.load_full()
    }

    pub(crate) fn next(&self) -> Option<Arc<ActiveModel>> {
        self.next.load_full()
    }

    /// Replaces the next model, returning the one it replaces.
    pub(crate) fn replace_next(&self, model: Option<Arc<ActiveModel>>) -> Option<Arc<ActiveModel>> {
        self.next.swap(model)
    }

    pub(crate) fn previous(&self) -> Option<Arc<ActiveModel>> {
        self.previous.load_full()
    }

    /// Keeps the model switched from, returning the one it replaces.
    pub(crate) fn replace_previous(&self, model: Arc<ActiveModel>) -> Option<Arc<ActiveModel>> {
        self.previous.swap(Some(model))
    }

    pub(crate) fn take_previous(&self) -> Option<Arc<ActiveModel>> {
        self.previous.swap(None)
    }

    /// The other models an upload is embedded with besides `active`, each once.
    pub(crate) fn also_writing(&self, active: &ActiveModel) -> Vec<Arc<ActiveModel>> {
        let mut others: Vec<Arc<ActiveModel>> = Vec::new();
        for other in [self.next(), self.previous()].into_iter().flatten() {
            // A rollback soon after a switch: the next version is also the previous one.
            if other.key() != active.key() && others.iter().all(|o| o.key() != other.key()) {
                others.push(other);
            }
        }
        others
    }

    /// Held by every add and delete until it reaches the store and the index.
    pub(crate) async fn write_shared(&self) -> OwnedRwLockReadGuard<()> {
        self.writes.clone().read_owned().await
    }

    /// Waits for every add and delete under way, then holds them off.
    pub(crate) async fn write_exclusive(&self) -> Exclusive {
        self.writes.clone().write_owned().await
    }

    /// Makes `model` the active one (the caller holds the writers' lock
    /// alone); returns the model it replaces, which the caller keeps or retires.
    pub(crate) fn swap_active(&self, model: Arc<ActiveModel>, _writes: &Exclusive) -> Arc<ActiveModel> {
        let previous = self.active.swap(model.clone());
        let (old, new) = (previous.embedder.info(), model.embedder.info());
        metrics::model_info(&old.model_key, &old.device, &old.precision.to_string(), false);
        metrics::model_info(&new.model_key, &new.device, &new.precision.to_string(), true);
        self.serving.send_replace(model.version.version.clone());
        previous
    }

    /// The version serving now, and every swap after.
    pub(crate) fn watch_serving(&self) -> watch::Receiver<String> {
        self.serving.subscribe()
    }
}
