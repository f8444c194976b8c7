//! The product's core operations, tying preprocessing, the embedder, the
//! index and the gallery together: add images, search by image, rebuild the
//! index at start. HTTP-agnostic; `api/` translates.

use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;

use crate::embed::{EmbedError, Embedded, Embedder, Priority};
use crate::gallery::{Gallery, GalleryError, Inserted, ItemSummary, NewItem};
use crate::index::{Index, IndexError};
use crate::preprocess::{Prepared, PreprocessError, PreprocessPool};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("image {position}: {source}")]
    Image { position: usize, source: PreprocessError },
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] GalleryError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// An uploaded image with what the client said about it.
#[derive(Debug, Clone)]
pub struct Upload {
    pub bytes: Bytes,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// One search result: the item and its cosine similarity to the query.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: i64,
    pub score: f32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// Where a search spent its time, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub preprocess_ms: f64,
    /// Queue wait plus forward pass.
    pub embed_ms: f64,
    /// Of `embed_ms`, the time waiting for a batch to form and a worker.
    pub queue_ms: f64,
    /// Images in the forward pass that embedded this query.
    pub batch_size: usize,
    pub search_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    pub results: Vec<Neighbour>,
    pub timing: Timing,
}

/// Cheap-clone handle over the service's parts.
#[derive(Clone)]
pub struct Catalog {
    pub embedder: Embedder,
    pub index: Index,
    pub gallery: Gallery,
    pub preprocess: PreprocessPool,
}

impl Catalog {
    /// Decodes, embeds and stores the uploads, then indexes them. Either every
    /// image is accepted or none is stored.
    pub async fn add(&self, uploads: Vec<Upload>) -> Result<Vec<Inserted>, CatalogError> {
        let prepared = self.prepare_all(uploads.iter().map(|u| u.bytes.clone()).collect()).await?;
        let (pixels, shapes): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.pixels, (p.format, p.width, p.height))).unzip();
        let embeddings = self.embed_all(pixels, Priority::Interactive).await?;
        let items = uploads
            .into_iter()
            .zip(shapes)
            .zip(embeddings)
            .map(|((upload, (format, width, height)), embedding)| NewItem {
                image: upload.bytes,
                media_type: format.to_mime_type().to_string(),
                width,
                height,
                label: upload.label,
                metadata: upload.metadata,
                embedding,
            })
            .collect::<Vec<_>>();
        let vectors: Vec<Vec<f32>> = items.iter().map(|i| i.embedding.clone()).collect();
        let inserted = self.gallery.insert(items, self.embedder.info().model_key.clone()).await?;
        for (item, vector) in inserted.iter().zip(&vectors) {
            self.index.insert(item.id, vector)?;
        }
        Ok(inserted)
    }

    /// The `k` gallery items most similar to the image.
    pub async fn search(&self, bytes: Bytes, k: usize) -> Result<SearchOutcome, CatalogError> {
        let start = Instant::now();
        let prepared = self.prepare_all(vec![bytes]).await?.remove(0);
        let preprocessed = Instant::now();
        let query = self.embedder.embed(prepared.pixels, Priority::Interactive).await?;
        let embedded = Instant::now();
        let hits = self.index.search(&query.vector, k)?;
        let searched = Instant::now();
        let summaries = self.gallery.summaries(hits.iter().map(|h| h.id).collect()).await?;
        let results =
            hits.into_iter().filter_map(|hit| summaries.get(&hit.id).map(|item| neighbour(hit.score, item))).collect();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timing = Timing {
            preprocess_ms: ms(start, preprocessed),
            embed_ms: ms(preprocessed, embedded),
            queue_ms: query.queue_wait.as_secs_f64() * 1e3,
            batch_size: query.batch_size,
            search_ms: ms(embedded, searched),
            total_ms: ms(start, Instant::now()),
        };
        Ok(SearchOutcome { results, timing })
    }

    /// Fills the index from stored embeddings of the active model, embedding
    /// (from the stored originals) only the items that have none yet.
    pub async fn rebuild_index(&self) -> Result<usize, CatalogError> {
        let model = self.embedder.info().model_key.clone();
        const CHUNK: usize = 64;
        loop {
            let missing = self.gallery.missing_embeddings(model.clone(), CHUNK).await?;
            if missing.is_empty() {
                break;
            }
            tracing::info!(count = missing.len(), %model, "embedding stored images for the active model");
            let (ids, images): (Vec<i64>, Vec<Bytes>) = missing.into_iter().map(|(id, b)| (id, b.into())).unzip();
            let prepared = self.prepare_all(images).await?;
            let vectors = self.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Bulk).await?;
            self.gallery.put_embeddings(model.clone(), ids.into_iter().zip(vectors).collect()).await?;
        }
        let stored = self.gallery.embeddings(model).await?;
        for (id, vector) in &stored {
            self.index.insert(*id, vector)?;
        }
        Ok(stored.len())
    }

    /// Preprocesses images on the bounded pool, all at once.
    async fn prepare_all(&self, images: Vec<Bytes>) -> Result<Vec<Prepared>, CatalogError> {
        let results = join_all(images.into_iter().map(|bytes| self.preprocess.prepare(bytes))).await;
        results
            .into_iter()
            .enumerate()
            .map(|(position, result)| result.map_err(|source| CatalogError::Image { position, source }))
            .collect()
    }

    /// Queues every image at once so they share forward passes.
    async fn embed_all(&self, pixels: Vec<Vec<f32>>, priority: Priority) -> Result<Vec<Vec<f32>>, CatalogError> {
        let futures = pixels.into_iter().map(|p| self.embedder.embed(p, priority));
        let embedded: Vec<Result<Embedded, EmbedError>> = join_all(futures).await;
        embedded.into_iter().map(|r| r.map(|e| e.vector).map_err(CatalogError::from)).collect()
    }
}

fn neighbour(score: f32, item: &ItemSummary) -> Neighbour {
    Neighbour { id: item.id, score, label: item.label.clone(), metadata: item.metadata.clone() }
}
