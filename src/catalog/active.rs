//! `ActiveModel`: one model version ready to serve (its embedding workers,
//! its preprocessing and the vector index of its embeddings), swapped as one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;

use super::{CatalogError, CatalogSettings, Progress};
use crate::embed::{EmbedError, Embedded, Embedder, Priority};
use crate::gallery::GalleryStore;
use crate::index::VectorIndex;
use crate::preprocess::{Prepared, PreprocessPool};
use crate::registry::ModelVersion;

/// Images re-embedded per round trip to the store.
const EMBED_CHUNK: usize = 256;

/// A model version with its workers, preprocessing and index.
pub(super) struct ActiveModel {
    pub(super) version: ModelVersion,
    pub(super) embedder: Embedder,
    pub(super) preprocess: PreprocessPool,
    pub(super) index: Arc<dyn VectorIndex>,
}

impl ActiveModel {
    /// Starts the workers of a model version beside `index`.
    pub(super) async fn start(
        version: ModelVersion,
        settings: &CatalogSettings,
        index: Arc<dyn VectorIndex>,
    ) -> Result<Self, CatalogError> {
        let start = settings.start_embedder.clone();
        let for_workers = version.clone();
        let embedder = tokio::task::spawn_blocking(move || start(&for_workers)).await??;
        let preprocess = settings.preprocess.for_input(version.manifest.input.clone());
        Ok(Self { version, embedder, preprocess, index })
    }

    /// The key this model's embeddings are stored under.
    pub(super) fn key(&self) -> String {
        self.version.model.clone()
    }

    /// Embeds, from their stored originals, the items that have no embedding
    /// of this model, at bulk priority. Returns how many it embedded.
    pub(super) async fn embed_missing(
        &self,
        store: &dyn GalleryStore,
        progress: &(dyn Fn(Progress) + Sync),
        cancel: &AtomicBool,
    ) -> Result<usize, CatalogError> {
        let model = self.key();
        // Saturating: an item added between the two counts is embedded already.
        let to_embed = store.count().await?.saturating_sub(store.count_embedded(model.clone()).await?) as usize;
        if to_embed > 0 {
            tracing::info!(count = to_embed, %model, "embedding stored images for the model");
        }
        let mut embedded = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CatalogError::Cancelled);
            }
            let missing = store.missing_embeddings(model.clone(), EMBED_CHUNK).await?;
            if missing.is_empty() {
                return Ok(embedded);
            }
            let (ids, images): (Vec<i64>, Vec<Bytes>) = missing.into_iter().map(|(id, b)| (id, b.into())).unzip();
            let prepared = self.prepare_all(images).await?;
            let vectors = self.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Bulk).await?;
            embedded += ids.len();
            store.put_embeddings(model.clone(), ids.into_iter().zip(vectors).collect()).await?;
            progress(Progress { embedded, to_embed: to_embed.max(embedded) });
        }
    }

    /// Preprocesses images on the bounded pool, all at once.
    pub(super) async fn prepare_all(&self, images: Vec<Bytes>) -> Result<Vec<Prepared>, CatalogError> {
        let results = join_all(images.into_iter().map(|bytes| self.preprocess.prepare(bytes))).await;
        results
            .into_iter()
            .enumerate()
            .map(|(position, result)| result.map_err(|source| CatalogError::Image { position, source }))
            .collect()
    }

    /// Queues every image at once so they share forward passes.
    pub(super) async fn embed_all(
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
pub(super) fn retire<M: Send + 'static>(model: M) {
    tokio::task::spawn_blocking(move || drop(model));
}
