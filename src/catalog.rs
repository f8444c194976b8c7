//! The product's core operations, tying preprocessing, the embedder, the
//! index and the gallery together: add, search, list, delete, and keeping the
//! index in step with the store across restarts. HTTP-agnostic; `api/`
//! translates.
//!
//! Order of writes: the store first, then the index. The store is the truth;
//! whatever the index missed in a crash is reconciled at the next start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;

use crate::embed::{EmbedError, Embedded, Embedder, Priority};
use crate::gallery::{content_hash, Gallery, GalleryError, ItemSummary, NewItem};
use crate::index::{Index, IndexError, Loaded};
use crate::preprocess::{Prepared, PreprocessError, PreprocessPool};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("image {position}: {source}")]
    Image { position: usize, source: PreprocessError },
    #[error("image {position} duplicates item {existing} (similarity {score:.4})")]
    Duplicate { position: usize, existing: i64, score: f32 },
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] GalleryError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("background task failed: {0}")]
    Task(String),
}

/// An uploaded image with what the client said about it.
#[derive(Debug, Clone)]
pub struct Upload {
    pub bytes: Bytes,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// What to do with an upload that duplicates a stored item. Both kinds are
/// always reported: byte-identical (`duplicate_of`) and near duplicates, an
/// embedding within the near-duplicate distance (`near_duplicate_of`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDuplicate {
    /// Store it anyway.
    #[default]
    Allow,
    /// Do not store byte-identical uploads; report the existing item instead
    /// (what a resumed import wants). Near duplicates are stored.
    Skip,
    /// Refuse the whole request (409) if any upload is a duplicate of either kind.
    Reject,
}

/// A stored item close to an upload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NearDuplicate {
    pub id: i64,
    pub score: f32,
}

/// What `add` reports for each upload, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// The new item, or for a skipped upload the item that already holds it.
    pub id: i64,
    /// `added` or `skipped`.
    pub status: &'static str,
    pub content_hash: String,
    /// An older item with byte-identical content.
    pub duplicate_of: Option<i64>,
    /// The most similar older item, when closer than the near-duplicate distance.
    pub near_duplicate_of: Option<NearDuplicate>,
}

/// One search result: the item and its cosine similarity to the query.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: i64,
    pub score: f32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// What a search asks for besides the image.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub k: usize,
    /// Only items with this label.
    pub label: Option<String>,
    /// Only results at least this similar.
    pub min_score: Option<f32>,
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

/// How the index was made ready at start.
#[derive(Debug, Clone, Serialize)]
pub struct IndexStartup {
    /// `reloaded` or `rebuilt`.
    pub source: &'static str,
    pub reason: String,
    pub items: usize,
    /// Items the dump lacked (added from stored embeddings) or held in excess (tombstoned).
    pub added: usize,
    pub removed: usize,
    pub seconds: f64,
}

/// Cheap-clone handle over the service's parts.
#[derive(Clone)]
pub struct Catalog {
    pub embedder: Embedder,
    pub index: Index,
    pub gallery: Gallery,
    pub preprocess: PreprocessPool,
    pub settings: CatalogSettings,
}

#[derive(Debug, Clone)]
pub struct CatalogSettings {
    /// Where index dumps live.
    pub index_dir: PathBuf,
    /// Cosine distance under which an upload is a near duplicate.
    pub near_duplicate_distance: f32,
    /// Tombstones, as a fraction of the graph, that trigger a compaction.
    pub compact_fraction: f64,
}

impl Catalog {
    /// Decodes, embeds and stores the uploads, then indexes them. Either every
    /// stored image is committed or none is.
    pub async fn add(&self, uploads: Vec<Upload>, on_duplicate: OnDuplicate) -> Result<Vec<Added>, CatalogError> {
        let hashes: Vec<String> = uploads.iter().map(|u| content_hash(&u.bytes)).collect();
        let existing = self.gallery.oldest_with_hashes(hashes.clone()).await?;
        let exact: Vec<(String, Option<i64>)> = hashes.into_iter().zip(existing).collect();
        // Byte-identical uploads that will be skipped are never decoded or embedded.
        let todo: Vec<usize> =
            (0..uploads.len()).filter(|&i| !(on_duplicate == OnDuplicate::Skip && exact[i].1.is_some())).collect();
        let prepared =
            self.prepare_all(todo.iter().map(|&i| uploads[i].bytes.clone()).collect()).await.map_err(|e| match e {
                CatalogError::Image { position, source } => CatalogError::Image { position: todo[position], source },
                other => other,
            })?;
        let (pixels, shapes): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.pixels, (p.format, p.width, p.height))).unzip();
        let vectors = self.embed_all(pixels, Priority::Interactive).await?;
        let mut embeddings = todo.iter().copied().zip(shapes.into_iter().zip(vectors)).peekable();
        let mut reports = Vec::with_capacity(uploads.len());
        let mut items = Vec::new();
        for (position, (upload, (hash, exact))) in uploads.into_iter().zip(exact).enumerate() {
            let Some((_, ((format, width, height), embedding))) = embeddings.next_if(|(i, _)| *i == position) else {
                let existing = exact.expect("only byte duplicates are left unembedded");
                let report = Added {
                    id: existing,
                    status: "skipped",
                    content_hash: hash,
                    duplicate_of: exact,
                    near_duplicate_of: None,
                };
                reports.push(report);
                continue;
            };
            let near = self.nearest_duplicate(&embedding)?;
            if on_duplicate == OnDuplicate::Reject {
                if let Some((existing, score)) = exact.map(|id| (id, 1.0)).or(near.map(|n| (n.id, n.score))) {
                    return Err(CatalogError::Duplicate { position, existing, score });
                }
            }
            reports.push(Added {
                id: 0,
                status: "added",
                content_hash: hash,
                duplicate_of: exact,
                near_duplicate_of: near,
            });
            items.push(NewItem {
                image: upload.bytes,
                content_hash: reports.last().expect("just pushed").content_hash.clone(),
                media_type: format.to_mime_type().to_string(),
                width,
                height,
                label: upload.label,
                metadata: upload.metadata,
                embedding,
            });
        }
        let vectors: Vec<Vec<f32>> = items.iter().map(|i| i.embedding.clone()).collect();
        let inserted = self.gallery.insert(items, self.model()).await?;
        let mut stored = inserted.iter();
        for report in reports.iter_mut().filter(|r| r.status == "added") {
            let item = stored.next().expect("one stored item per added report");
            // The store's answer also covers byte duplicates inside this very request.
            (report.id, report.duplicate_of) = (item.id, item.duplicate_of);
        }
        let entries: Vec<(i64, Vec<f32>)> = inserted.iter().map(|i| i.id).zip(vectors).collect();
        self.blocking_index(move |index| index.insert(&entries)).await??;
        Ok(reports)
    }

    /// The most similar stored item, when it is within the near-duplicate
    /// distance (a distance of 0 turns this off).
    fn nearest_duplicate(&self, embedding: &[f32]) -> Result<Option<NearDuplicate>, CatalogError> {
        if self.settings.near_duplicate_distance <= 0.0 {
            return Ok(None);
        }
        let threshold = 1.0 - self.settings.near_duplicate_distance;
        let best = self.index.search(embedding, 1, None)?.into_iter().next();
        Ok(best.filter(|hit| hit.score >= threshold).map(|hit| NearDuplicate { id: hit.id, score: hit.score }))
    }

    /// The gallery items most similar to the image.
    pub async fn search(&self, bytes: Bytes, query: &SearchQuery) -> Result<SearchOutcome, CatalogError> {
        let start = Instant::now();
        let prepared = self.prepare_all(vec![bytes]).await?.remove(0);
        let preprocessed = Instant::now();
        let embedded = self.embedder.embed(prepared.pixels, Priority::Interactive).await?;
        let after_embed = Instant::now();
        let allowed = match &query.label {
            Some(label) => Some(self.gallery.ids_with_label(label.clone()).await?),
            None => None,
        };
        let mut hits = self.index.search(&embedded.vector, query.k, allowed.as_deref())?;
        if let Some(min) = query.min_score {
            hits.retain(|hit| hit.score >= min);
        }
        let searched = Instant::now();
        let summaries = self.gallery.summaries(hits.iter().map(|h| h.id).collect()).await?;
        // An item deleted between the index search and here is simply left out.
        let results =
            hits.into_iter().filter_map(|hit| summaries.get(&hit.id).map(|item| neighbour(hit.score, item))).collect();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timing = Timing {
            preprocess_ms: ms(start, preprocessed),
            embed_ms: ms(preprocessed, after_embed),
            queue_ms: embedded.queue_wait.as_secs_f64() * 1e3,
            batch_size: embedded.batch_size,
            search_ms: ms(after_embed, searched),
            total_ms: ms(start, Instant::now()),
        };
        Ok(SearchOutcome { results, timing })
    }

    /// Deletes an item: from the store (committed), then from results at once;
    /// compacts the index in the background once tombstones pile up.
    pub async fn delete(&self, id: i64) -> Result<bool, CatalogError> {
        if !self.gallery.delete(id).await? {
            return Ok(false);
        }
        self.blocking_index(move |index| index.delete(&[id])).await?;
        if self.index.needs_compaction(self.settings.compact_fraction) {
            let index = self.index.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let purged = index.compact();
                tracing::info!(purged, seconds = started.elapsed().as_secs_f64(), "index compacted");
            });
        }
        Ok(true)
    }

    /// Makes the index match the store at start: reload the last dump of the
    /// active model and reconcile it, or rebuild from stored embeddings. Images
    /// are re-embedded only for items with no embedding of the active model.
    pub async fn open_index(&mut self) -> Result<IndexStartup, CatalogError> {
        let started = Instant::now();
        self.embed_missing().await?;
        let model = self.model();
        let (dir, dim) = (self.settings.index_dir.clone(), self.embedder.info().dim);
        let (loaded, outcome) = tokio::task::spawn_blocking(move || Index::load(&dir, &model, dim))
            .await
            .map_err(|e| CatalogError::Task(e.to_string()))?;
        let stored: HashSet<i64> = self.gallery.embedded_ids(self.model()).await?.into_iter().collect();
        let (source, reason, index) = match (loaded, outcome) {
            (Some(index), Loaded::Reloaded { points, seconds }) => {
                ("reloaded", format!("dump of {points} points read in {seconds:.2} s"), index)
            }
            (_, Loaded::Missing) => ("rebuilt", "no index dump".to_string(), Index::new(dim, stored.len())),
            (_, Loaded::Stale(why)) => ("rebuilt", format!("stale dump: {why}"), Index::new(dim, stored.len())),
            (_, other) => ("rebuilt", format!("unusable dump: {other:?}"), Index::new(dim, stored.len())),
        };
        self.index = index;
        let in_index = self.index.live_ids();
        let missing: Vec<i64> = stored.difference(&in_index).copied().collect();
        let extra: Vec<i64> = in_index.difference(&stored).copied().collect();
        for chunk in missing.chunks(4096) {
            let vectors = self.gallery.embeddings_of(self.model(), chunk.to_vec()).await?;
            self.blocking_index(move |index| index.insert(&vectors)).await??;
        }
        let removed = extra.len();
        self.blocking_index(move |index| index.delete(&extra)).await?;
        Ok(IndexStartup {
            source,
            reason,
            items: self.index.len(),
            added: missing.len(),
            removed,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Dumps the index if it changed since the last dump.
    pub async fn dump_index(&self) -> Result<(), CatalogError> {
        if !self.index.is_dirty() {
            return Ok(());
        }
        let (dir, model) = (self.settings.index_dir.clone(), self.model());
        let report = self.blocking_index(move |index| index.dump(&dir, &model)).await??;
        tracing::info!(points = report.points, seconds = report.seconds, "index dumped");
        Ok(())
    }

    /// Embeds, from their stored originals, the items that have no embedding
    /// of the active model (a new model), at bulk priority.
    async fn embed_missing(&self) -> Result<(), CatalogError> {
        let model = self.model();
        const CHUNK: usize = 64;
        loop {
            let missing = self.gallery.missing_embeddings(model.clone(), CHUNK).await?;
            if missing.is_empty() {
                return Ok(());
            }
            tracing::info!(count = missing.len(), %model, "embedding stored images for the active model");
            let (ids, images): (Vec<i64>, Vec<Bytes>) = missing.into_iter().map(|(id, b)| (id, b.into())).unzip();
            let prepared = self.prepare_all(images).await?;
            let vectors = self.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Bulk).await?;
            self.gallery.put_embeddings(model.clone(), ids.into_iter().zip(vectors).collect()).await?;
        }
    }

    fn model(&self) -> String {
        self.embedder.info().model_key.clone()
    }

    /// Runs index work (graph inserts, dumps) off the async runtime.
    async fn blocking_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> T + Send + 'static,
    ) -> Result<T, CatalogError> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || f(&index)).await.map_err(|e| CatalogError::Task(e.to_string()))
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
