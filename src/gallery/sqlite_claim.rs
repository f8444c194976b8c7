//! The embedded store's claims on re-embedding work. One process owns the
//! file, so a claim is a note in memory: the items it holds, and those found
//! unembeddable by a model (not claimed again while the process runs).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::sqlite::SqliteGallery;
use super::{GalleryError, GalleryStore, MissingClaim};

/// Per model: items claimed and not yet completed, and items that failed.
#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<String, BTreeSet<i64>>>);

impl Held {
    /// The ids held for `model` now.
    pub(super) fn of(&self, model: &str) -> BTreeSet<i64> {
        self.lock().get(model).cloned().unwrap_or_default()
    }

    /// Holds those of `ids` nobody holds; returns them.
    pub(super) fn hold(&self, model: &str, ids: Vec<i64>) -> Vec<i64> {
        let mut held = self.lock();
        let set = held.entry(model.to_string()).or_default();
        ids.into_iter().filter(|id| set.insert(*id)).collect()
    }

    fn release(&self, model: &str, ids: impl IntoIterator<Item = i64>) {
        if let Some(set) = self.lock().get_mut(model) {
            for id in ids {
                set.remove(&id);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<i64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Items held for embedding under one model until completed or dropped.
pub(super) struct SqliteClaim {
    pub(super) store: SqliteGallery,
    pub(super) held: Arc<Held>,
    pub(super) model: String,
    pub(super) items: Vec<(i64, Vec<u8>)>,
    /// Released when the claim is dropped unfinished.
    pub(super) ids: Vec<i64>,
}

#[async_trait::async_trait]
impl MissingClaim for SqliteClaim {
    fn take_items(&mut self) -> Vec<(i64, Vec<u8>)> {
        std::mem::take(&mut self.items)
    }

    async fn complete(
        mut self: Box<Self>,
        vectors: Vec<(i64, Vec<f32>)>,
        failed: Vec<i64>,
    ) -> Result<(), GalleryError> {
        self.store.put_embeddings(self.model.clone(), vectors).await?;
        // The failed stay held: not claimed again by this process.
        self.ids.retain(|id| !failed.contains(id));
        Ok(())
    }
}

impl Drop for SqliteClaim {
    fn drop(&mut self) {
        self.held.release(&self.model, self.ids.drain(..));
    }
}
