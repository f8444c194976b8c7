//! `ActiveModel`: one model version ready to serve (its embedding workers,
//! its preprocessing and the vector index of its embeddings), swapped as one.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::join_all;

use super::{CatalogError, CatalogSettings};
use crate::embed::{EmbedError, Embedded, Embedder, Priority};
use crate::gallery::GalleryStore;
use crate::index::VectorIndex;
use crate::preprocess::{Prepared, PreprocessPool};
use crate::registry::ModelVersion;

/// Items claimed for embedding at a time: small, so that in cluster mode
/// the work spreads over replicas and a claim's row locks are held briefly;
/// and the most original bytes one claim holds in memory (photos can be
/// megabytes each).
const CLAIM_CHUNK: usize = 32;
const EMBED_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// How `embed_missing` goes about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Beside live traffic: bulk priority.
    Background,
    /// At interactive priority: at start, or while a switch holds the
    /// writers' lock and every add and delete waits on it.
    Final,
}

/// A model version with its workers, preprocessing and index.
pub(crate) struct ActiveModel {
    pub(crate) version: ModelVersion,
    pub(crate) embedder: Embedder,
    pub(crate) preprocess: PreprocessPool,
    pub(crate) index: Arc<dyn VectorIndex>,
    /// Stored items this model's preprocessing refuses (for example after
    /// `--max-image-side` was lowered): left out of its index, not searchable.
    /// Shared by every start of the model (`Unembeddable`).
    pub(crate) unembeddable: Arc<Mutex<BTreeSet<i64>>>,
}

/// The items each model (by key) found it cannot preprocess, kept while the
/// process runs: a model started again (a rollback) knows them, though its
/// claims no longer hand them out. A std `Mutex`: held for a map or set
/// operation, never across an `.await`.
#[derive(Default)]
pub(crate) struct Unembeddable(Mutex<HashMap<String, Arc<Mutex<BTreeSet<i64>>>>>);

impl Unembeddable {
    pub(crate) fn of(&self, key: &str) -> Arc<Mutex<BTreeSet<i64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_string()).or_default().clone()
    }

    /// A deleted item, forgotten by every model.
    pub(crate) fn forget(&self, id: i64) {
        for set in self.0.lock().unwrap_or_else(|e| e.into_inner()).values() {
            set.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }
    }
}

impl ActiveModel {
    /// Starts the workers of a model version beside `index`.
    pub(crate) async fn start(
        version: ModelVersion,
        settings: &CatalogSettings,
        index: Arc<dyn VectorIndex>,
        unembeddable: &Unembeddable,
    ) -> Result<Self, CatalogError> {
        let start = settings.start_embedder.clone();
        let for_workers = version.clone();
        let embedder = tokio::task::spawn_blocking(move || start(&for_workers)).await??;
        let preprocess = settings.preprocess.for_input(version.manifest.input.clone());
        let unembeddable = unembeddable.of(&version.key);
        Ok(Self { version, embedder, preprocess, index, unembeddable })
    }

    /// The key this model's embeddings and index are stored under (it names the encoder's content).
    pub(crate) fn key(&self) -> String {
        self.version.key.clone()
    }

    /// `name@version`, as answers show it.
    pub(crate) fn name(&self) -> String {
        self.version.model.clone()
    }

    /// Embeds, from their stored originals, the items that have no embedding
    /// of this model, claiming them a chunk at a time (in cluster mode every
    /// replica shares the work, and a replica that dies frees its chunk).
    /// Returns how many it embedded. An item whose image no longer
    /// preprocesses is skipped and remembered (`unembeddable`), not an
    /// error: one image must not block a switch or a start.
    pub(crate) async fn embed_missing(
        &self,
        store: &dyn GalleryStore,
        pass: Pass,
        cancel: &AtomicBool,
    ) -> Result<usize, CatalogError> {
        let priority = if pass == Pass::Background { Priority::Bulk } else { Priority::Interactive };
        let mut embedded = 0;
        while let Some(mut claim) = store.claim_missing(self.key(), CLAIM_CHUNK, EMBED_CHUNK_BYTES).await? {
            if cancel.load(Ordering::Relaxed) {
                return Err(CatalogError::Cancelled); // the dropped claim frees its items
            }
            if embedded == 0 {
                tracing::info!(model = %self.key(), "embedding stored images for the model");
            }
            let items = claim.take_items();
            let claimed: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
            let (ids, pixels) = self.prepare_stored(items, priority).await;
            let failed = claimed.into_iter().filter(|id| !ids.contains(id)).collect();
            let vectors = self.embed_all(pixels, priority).await?;
            embedded += ids.len();
            claim.complete(ids.into_iter().zip(vectors).collect(), failed).await?;
        }
        Ok(embedded)
    }

    /// Preprocesses stored images, leaving out (and remembering) those that fail.
    async fn prepare_stored(&self, items: Vec<(i64, Vec<u8>)>, priority: Priority) -> (Vec<i64>, Vec<Vec<f32>>) {
        let prepared = join_all(
            items
                .into_iter()
                .map(|(id, bytes)| async move { (id, self.preprocess.prepare(Bytes::from(bytes), priority).await) }),
        )
        .await;
        let (mut ids, mut pixels) = (Vec::new(), Vec::new());
        for (id, result) in prepared {
            match result {
                Ok(p) => {
                    ids.push(id);
                    pixels.push(p.pixels);
                }
                Err(error) => {
                    tracing::warn!(item = id, model = %self.version.model, %error,
                        "a stored image no longer preprocesses; it is left out of the index");
                    self.lock_unembeddable().insert(id);
                }
            }
        }
        (ids, pixels)
    }

    pub(crate) fn lock_unembeddable(&self) -> std::sync::MutexGuard<'_, BTreeSet<i64>> {
        self.unembeddable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Preprocesses images on the bounded pool, all at once.
    pub(crate) async fn prepare_all(
        &self,
        images: Vec<Bytes>,
        priority: Priority,
    ) -> Result<Vec<Prepared>, CatalogError> {
        let results = join_all(images.into_iter().map(|bytes| self.preprocess.prepare(bytes, priority))).await;
        results
            .into_iter()
            .enumerate()
            .map(|(position, result)| result.map_err(|source| CatalogError::Image { position, source }))
            .collect()
    }

    /// Queues every image at once so they share forward passes.
    pub(crate) async fn embed_all(
        &self,
        pixels: Vec<Vec<f32>>,
        priority: Priority,
    ) -> Result<Vec<Vec<f32>>, CatalogError> {
        let futures = pixels.into_iter().map(|p| self.embedder.embed(p, priority));
        let embedded: Vec<Result<Embedded, EmbedError>> = join_all(futures).await;
        embedded.into_iter().map(|r| r.map(|e| e.vector).map_err(CatalogError::from)).collect()
    }
}

/// Drops a model off the async runtime: its workers stop once the last
/// request using them is done, and joining them blocks.
pub(crate) fn retire<M: Send + 'static>(model: M) {
    tokio::task::spawn_blocking(move || drop(model));
}
