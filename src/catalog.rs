//! The product's core operations, tying preprocessing, the embedder, the
//! index and the gallery together: add, search, list, delete, and keeping the
//! index in step with the store across restarts. HTTP-agnostic; `api/`
//! translates.
//!
//! Order of writes: the store first, then the index. The store is the truth;
//! whatever the index missed in a crash is reconciled at the next start.
//!
//! The active model (its embedding workers, preprocessing and index) is one
//! value behind an `ArcSwap`: a request takes it once and uses it throughout,
//! so a model switch never mixes two models' embeddings in one answer.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;

use crate::embed::{EmbedError, Embedded, Embedder, EmbedderConfig, Priority};
use crate::gallery::{content_hash, Gallery, GalleryError, ItemSummary, NewItem};
use crate::index::{Index, IndexError, Loaded};
use crate::knn::{self, Prediction};
use crate::metrics;
use crate::preprocess::{Prepared, PreprocessError, PreprocessPool};
use crate::registry::{ModelVersion, Registry, RegistryError};

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
    #[error(transparent)]
    Models(#[from] RegistryError),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("cancelled")]
    Cancelled,
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
    /// The model that embedded the query.
    pub model: String,
    pub results: Vec<Neighbour>,
    pub prediction: Prediction,
    pub timing: Timing,
}

/// A pair of images compared.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub model: String,
    /// Cosine similarity of the two embeddings, -1 to 1.
    pub similarity: f32,
    /// Euclidean distance between the unit embeddings, 0 to 2 (what training measures).
    pub distance: f32,
    /// Similarity at or above which the pair is the same; from the model's manifest.
    pub threshold: Option<f32>,
    /// `None` when the model has no calibrated threshold.
    pub same: Option<bool>,
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

/// The model that serves, with the index of its embeddings: swapped as one.
pub struct ActiveModel {
    pub version: ModelVersion,
    pub embedder: Embedder,
    pub preprocess: PreprocessPool,
    pub index: Index,
}

/// What a model switch did.
#[derive(Debug, Clone, Serialize)]
pub struct Switched {
    pub version: String,
    pub model: String,
    /// Images embedded because no embedding of this model was stored.
    pub embedded: usize,
    pub items: usize,
    pub seconds: f64,
}

/// Cheap-clone handle over the service's parts.
#[derive(Clone)]
pub struct Catalog {
    active: Arc<ArcSwap<ActiveModel>>,
    pub gallery: Gallery,
    pub registry: Registry,
    pub settings: CatalogSettings,
    /// Adds and deletes hold it shared; a model switch holds it alone while it
    /// catches up with them and swaps.
    writes: Arc<tokio::sync::RwLock<()>>,
}

#[derive(Debug, Clone)]
pub struct CatalogSettings {
    /// How to start the embedding workers of a model (its folder is set per version).
    pub embedder: EmbedderConfig,
    /// Preprocessing thread budget and image limits, shared by every model.
    pub preprocess: PreprocessPool,
    /// Where index dumps live.
    pub index_dir: PathBuf,
    /// Cosine distance under which an upload is a near duplicate.
    pub near_duplicate_distance: f32,
    /// Tombstones, as a fraction of the graph, that trigger a compaction.
    pub compact_fraction: f64,
    /// Labelled neighbours that vote for a search's predicted label.
    pub knn_k: usize,
    /// Cosine distance beyond which the nearest labelled neighbour means
    /// `unknown`; `None` takes 1 - the active model's verification threshold.
    pub unknown_distance: Option<f32>,
}

impl Catalog {
    /// Decodes, embeds and stores the uploads, then indexes them. Either every
    /// stored image is committed or none is.
    pub async fn add(&self, uploads: Vec<Upload>, on_duplicate: OnDuplicate) -> Result<Vec<Added>, CatalogError> {
        let writing = self.writes.clone().read_owned().await;
        let active = self.active();
        let hashes: Vec<String> = uploads.iter().map(|u| content_hash(&u.bytes)).collect();
        let existing = self.gallery.oldest_with_hashes(hashes.clone()).await?;
        let exact: Vec<(String, Option<i64>)> = hashes.into_iter().zip(existing).collect();
        // Byte-identical uploads that will be skipped are never decoded or embedded.
        let todo: Vec<usize> =
            (0..uploads.len()).filter(|&i| !(on_duplicate == OnDuplicate::Skip && exact[i].1.is_some())).collect();
        let prepared = active.prepare_all(todo.iter().map(|&i| uploads[i].bytes.clone()).collect()).await.map_err(
            |e| match e {
                CatalogError::Image { position, source } => CatalogError::Image { position: todo[position], source },
                other => other,
            },
        )?;
        let (pixels, shapes): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.pixels, (p.format, p.width, p.height))).unzip();
        let vectors = active.embed_all(pixels, Priority::Interactive).await?;
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
            let near = self.nearest_duplicate(&active.index, &embedding)?;
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
        let (gallery, index, model) = (self.gallery.clone(), active.index.clone(), active.version.model.clone());
        let inserted = store_then_index(writing, async move {
            let inserted = gallery.insert(items, model).await?;
            let entries: Vec<(i64, Vec<f32>)> = inserted.iter().map(|i| i.id).zip(vectors).collect();
            blocking_index(&index, move |index| index.insert(&entries)).await??;
            Ok(inserted)
        })
        .await?;
        let mut stored = inserted.iter();
        for report in reports.iter_mut().filter(|r| r.status == "added") {
            let item = stored.next().expect("one stored item per added report");
            // The store's answer also covers byte duplicates inside this very request.
            (report.id, report.duplicate_of) = (item.id, item.duplicate_of);
        }
        Ok(reports)
    }

    /// The most similar stored item, when it is within the near-duplicate
    /// distance (a distance of 0 turns this off).
    fn nearest_duplicate(&self, index: &Index, embedding: &[f32]) -> Result<Option<NearDuplicate>, CatalogError> {
        if self.settings.near_duplicate_distance <= 0.0 {
            return Ok(None);
        }
        let threshold = 1.0 - self.settings.near_duplicate_distance;
        let best = index.search(embedding, 1, None)?.into_iter().next();
        Ok(best.filter(|hit| hit.score >= threshold).map(|hit| NearDuplicate { id: hit.id, score: hit.score }))
    }

    /// The gallery items most similar to the image, and the label its labelled neighbours vote for.
    pub async fn search(&self, bytes: Bytes, query: &SearchQuery) -> Result<SearchOutcome, CatalogError> {
        let start = Instant::now();
        let active = self.active();
        let prepared = active.prepare_all(vec![bytes]).await?.remove(0);
        let preprocessed = Instant::now();
        let embedded = active.embedder.embed(prepared.pixels, Priority::Interactive).await?;
        let after_embed = Instant::now();
        let (results, prediction) = self.neighbours(&active, &embedded.vector, query, None).await?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timing = Timing {
            preprocess_ms: ms(start, preprocessed),
            embed_ms: ms(preprocessed, after_embed),
            queue_ms: embedded.queue_wait.as_secs_f64() * 1e3,
            batch_size: embedded.batch_size,
            search_ms: ms(after_embed, Instant::now()),
            total_ms: ms(start, Instant::now()),
        };
        Ok(SearchOutcome { model: active.version.model.clone(), results, prediction, timing })
    }

    /// The items most similar to a stored item (itself left out), from its
    /// stored embedding; `None` if there is no such item.
    pub async fn search_by_id(&self, id: i64, query: &SearchQuery) -> Result<Option<SearchOutcome>, CatalogError> {
        let start = Instant::now();
        let active = self.active();
        let Some((_, vector)) = self.gallery.embeddings_of(active.version.model.clone(), vec![id]).await?.pop() else {
            return Ok(None);
        };
        let (results, prediction) = self.neighbours(&active, &vector, query, Some(id)).await?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        let timing = Timing { search_ms: total_ms, total_ms, ..Timing::default() };
        Ok(Some(SearchOutcome { model: active.version.model.clone(), results, prediction, timing }))
    }

    /// Searches the index (fetching enough for the label vote), reads the
    /// hits' labels and metadata, votes, then applies `min_score` and `k`.
    async fn neighbours(
        &self,
        active: &ActiveModel,
        vector: &[f32],
        query: &SearchQuery,
        exclude: Option<i64>,
    ) -> Result<(Vec<Neighbour>, Prediction), CatalogError> {
        let allowed = match &query.label {
            Some(label) => Some(self.gallery.ids_with_label(label.clone()).await?),
            None => None,
        };
        let fetch = query.k.max(self.settings.knn_k) + usize::from(exclude.is_some());
        let mut hits = active.index.search(vector, fetch, allowed.as_deref())?;
        hits.retain(|hit| Some(hit.id) != exclude);
        let summaries = self.gallery.summaries(hits.iter().map(|h| h.id).collect()).await?;
        // An item deleted between the index search and here is simply left out.
        let found: Vec<Neighbour> =
            hits.into_iter().filter_map(|hit| summaries.get(&hit.id).map(|item| neighbour(hit.score, item))).collect();
        let unknown_distance = self
            .settings
            .unknown_distance
            .or(active.version.manifest.verification_threshold.map(|t| 1.0 - t))
            .unwrap_or(f32::INFINITY);
        let votes = found.iter().map(|n| (n.score, n.label.as_deref()));
        let prediction = knn::predict(votes, self.settings.knn_k, unknown_distance);
        let min_score = query.min_score.unwrap_or(f32::NEG_INFINITY);
        let results = found.into_iter().filter(|n| n.score >= min_score).take(query.k).collect();
        Ok((results, prediction))
    }

    /// Whether two images show the same thing: their similarity against the
    /// active model's verification threshold.
    pub async fn verify(&self, a: Bytes, b: Bytes) -> Result<Verified, CatalogError> {
        let active = self.active();
        let prepared = active.prepare_all(vec![a, b]).await?;
        let vectors = active.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Interactive).await?;
        let similarity = vectors[0].iter().zip(&vectors[1]).map(|(x, y)| x * y).sum::<f32>().clamp(-1.0, 1.0);
        let threshold = active.version.manifest.verification_threshold;
        Ok(Verified {
            model: active.version.model.clone(),
            similarity,
            distance: (2.0 - 2.0 * similarity).max(0.0).sqrt(),
            same: threshold.map(|t| similarity >= t),
            threshold,
        })
    }

    /// Deletes an item: from the store (committed), then from results at once;
    /// compacts the index in the background once tombstones pile up.
    pub async fn delete(&self, id: i64) -> Result<bool, CatalogError> {
        let writing = self.writes.clone().read_owned().await;
        let active = self.active();
        let (gallery, index) = (self.gallery.clone(), active.index.clone());
        let deleted = store_then_index(writing, async move {
            if !gallery.delete(id).await? {
                return Ok(false);
            }
            blocking_index(&index, move |index| index.delete(&[id])).await?;
            Ok(true)
        })
        .await?;
        if !deleted {
            return Ok(false);
        }
        if active.index.needs_compaction(self.settings.compact_fraction) {
            let index = active.index.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let purged = index.compact();
                tracing::info!(purged, seconds = started.elapsed().as_secs_f64(), "index compacted");
            });
        }
        Ok(true)
    }

    /// Opens the catalog on the active model version: starts its workers,
    /// embeds stored images that lack its embedding, then reloads the last
    /// index dump and reconciles it with the store, or rebuilds the index from
    /// stored embeddings.
    pub async fn open(
        gallery: Gallery,
        registry: Registry,
        settings: CatalogSettings,
    ) -> Result<(Self, IndexStartup), CatalogError> {
        let started = Instant::now();
        let version = {
            let registry = registry.clone();
            run_blocking(move || registry.active()).await??
        };
        let model = ActiveModel::start(version, &settings, gallery.count().await? as usize).await?;
        model.embed_missing(&gallery, &|_| {}, &AtomicBool::new(false)).await?;
        let (dir, key, dim) = (settings.index_dir.clone(), model.version.model.clone(), model.dim());
        let (loaded, outcome) = run_blocking(move || Index::load(&dir, &key, dim)).await?;
        let (source, reason, index) = match (loaded, outcome) {
            (Some(index), Loaded::Reloaded { points, seconds }) => {
                ("reloaded", format!("dump of {points} points read in {seconds:.2} s"), index)
            }
            (_, Loaded::Missing) => ("rebuilt", "no index dump".to_string(), model.index),
            (_, Loaded::Stale(why)) => ("rebuilt", format!("stale dump: {why}"), model.index),
            (_, other) => ("rebuilt", format!("unusable dump: {other:?}"), model.index),
        };
        let model = ActiveModel { index, ..model };
        let (added, removed) = reconcile(&gallery, &model).await?;
        let startup = IndexStartup {
            source,
            reason,
            items: model.index.len(),
            added,
            removed,
            seconds: started.elapsed().as_secs_f64(),
        };
        let info = model.embedder.info();
        metrics::model_info(&info.model_key, &info.device, &info.precision.to_string(), true);
        let catalog = Self {
            active: Arc::new(ArcSwap::from_pointee(model)),
            gallery,
            registry,
            settings,
            writes: Arc::default(),
        };
        Ok((catalog, startup))
    }

    /// The model serving now. Take it once per request and use it throughout.
    pub fn active(&self) -> Arc<ActiveModel> {
        self.active.load_full()
    }

    /// Makes `version` the active model without stopping service: starts its
    /// workers, embeds (at bulk priority) every stored image that lacks its
    /// embedding, builds its index from stored embeddings, then, with adds
    /// and deletes held for the moment it takes, catches up with what changed
    /// meanwhile, records the version as active and swaps. `progress` gets
    /// the images embedded so far, `swapping` is called once the bulk of the
    /// work is done; `cancel` stops the work before the swap.
    pub async fn switch_to(
        &self,
        version: ModelVersion,
        progress: &(dyn Fn(Progress) + Sync),
        swapping: &(dyn Fn() + Sync),
        cancel: &AtomicBool,
    ) -> Result<Switched, CatalogError> {
        let started = Instant::now();
        let model = ActiveModel::start(version, &self.settings, self.gallery.count().await? as usize).await?;
        let (embedded, exclusive) = match self.prepare_switch(&model, progress, swapping, cancel).await {
            Ok(prepared) => prepared,
            Err(error) => {
                retire(model);
                return Err(error);
            }
        };
        let info = model.embedder.info().clone();
        let switched = Switched {
            version: model.version.version.clone(),
            model: model.version.model.clone(),
            embedded,
            items: model.index.len(),
            seconds: started.elapsed().as_secs_f64(),
        };
        let previous = self.active.swap(Arc::new(model));
        drop(exclusive);
        let old = previous.embedder.info();
        metrics::model_info(&old.model_key, &old.device, &old.precision.to_string(), false);
        metrics::model_info(&switched.model, &info.device, &info.precision.to_string(), true);
        tracing::info!(version = %switched.version, model = %switched.model, embedded, items = switched.items,
            seconds = switched.seconds, "model switched");
        retire(previous);
        if let Err(error) = self.dump_index().await {
            tracing::error!(%error, "could not dump the new index; the next start rebuilds it");
        }
        Ok(switched)
    }

    /// Everything before the swap: embeds and indexes the gallery with the new
    /// model, then takes the writers' lock, catches up with what changed
    /// meanwhile and records the version as active. Returns the images
    /// embedded and the lock, to be held until the swap. Once it holds the
    /// lock it no longer looks at `cancel`: the switch completes.
    async fn prepare_switch(
        &self,
        model: &ActiveModel,
        progress: &(dyn Fn(Progress) + Sync),
        swapping: &(dyn Fn() + Sync),
        cancel: &AtomicBool,
    ) -> Result<(usize, tokio::sync::OwnedRwLockWriteGuard<()>), CatalogError> {
        let mut embedded = model.embed_missing(&self.gallery, progress, cancel).await?;
        reconcile(&self.gallery, model).await?;
        if cancel.load(Ordering::Relaxed) {
            return Err(CatalogError::Cancelled);
        }
        swapping();
        let exclusive = self.writes.clone().write_owned().await;
        embedded += model.embed_missing(&self.gallery, progress, &AtomicBool::new(false)).await?;
        reconcile(&self.gallery, model).await?;
        let registry = self.registry.clone();
        let version = model.version.version.clone();
        run_blocking(move || registry.set_active(&version)).await??;
        Ok((embedded, exclusive))
    }

    /// Waits for writes under way (including those whose request is gone) to
    /// reach the store and the index.
    pub async fn settle(&self) {
        drop(self.writes.write().await);
    }

    /// Dumps the active index if it changed since the last dump.
    pub async fn dump_index(&self) -> Result<(), CatalogError> {
        let active = self.active();
        if !active.index.is_dirty() {
            return Ok(());
        }
        let (dir, model) = (self.settings.index_dir.clone(), active.version.model.clone());
        let report = blocking_index(&active.index, move |index| index.dump(&dir, &model)).await??;
        tracing::info!(points = report.points, seconds = report.seconds, "index dumped");
        Ok(())
    }
}

/// How far a model switch's embedding has got.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Progress {
    pub embedded: usize,
    /// Images that had no embedding of the model when the switch looked.
    pub to_embed: usize,
}

impl ActiveModel {
    /// Starts the workers of a model version, with an empty index sized for `capacity` items.
    async fn start(version: ModelVersion, settings: &CatalogSettings, capacity: usize) -> Result<Self, CatalogError> {
        let mut config = settings.embedder.clone();
        config.model_dir = version.dir.clone();
        let manifest = version.manifest.clone();
        let embedder = run_blocking(move || Embedder::start(&config, &manifest)).await??;
        let preprocess = settings.preprocess.for_input(version.manifest.input.clone());
        let index = Index::new(version.manifest.embedding.dim, capacity);
        Ok(Self { version, embedder, preprocess, index })
    }

    pub fn dim(&self) -> usize {
        self.version.manifest.embedding.dim
    }

    /// Embeds, from their stored originals, the items that have no embedding
    /// of this model, at bulk priority. Returns how many it embedded.
    async fn embed_missing(
        &self,
        gallery: &Gallery,
        progress: &(dyn Fn(Progress) + Sync),
        cancel: &AtomicBool,
    ) -> Result<usize, CatalogError> {
        let model = self.version.model.clone();
        // Saturating: an item added between the two counts is embedded already.
        let to_embed = gallery.count().await?.saturating_sub(gallery.count_embedded(model.clone()).await?) as usize;
        if to_embed > 0 {
            tracing::info!(count = to_embed, %model, "embedding stored images for the model");
        }
        const CHUNK: usize = 256;
        let mut embedded = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CatalogError::Cancelled);
            }
            let missing = gallery.missing_embeddings(model.clone(), CHUNK).await?;
            if missing.is_empty() {
                return Ok(embedded);
            }
            let (ids, images): (Vec<i64>, Vec<Bytes>) = missing.into_iter().map(|(id, b)| (id, b.into())).unzip();
            let prepared = self.prepare_all(images).await?;
            let vectors = self.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Bulk).await?;
            embedded += ids.len();
            gallery.put_embeddings(model.clone(), ids.into_iter().zip(vectors).collect()).await?;
            progress(Progress { embedded, to_embed: to_embed.max(embedded) });
        }
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

/// Makes a model's index hold exactly the stored items embedded with it:
/// inserts the missing ones from stored embeddings, tombstones the rest.
/// Returns (added, removed).
async fn reconcile(gallery: &Gallery, model: &ActiveModel) -> Result<(usize, usize), CatalogError> {
    let key = model.version.model.clone();
    let stored: HashSet<i64> = gallery.embedded_ids(key.clone()).await?.into_iter().collect();
    let in_index = model.index.live_ids();
    let missing: Vec<i64> = stored.difference(&in_index).copied().collect();
    let extra: Vec<i64> = in_index.difference(&stored).copied().collect();
    for chunk in missing.chunks(4096) {
        let vectors = gallery.embeddings_of(key.clone(), chunk.to_vec()).await?;
        blocking_index(&model.index, move |index| index.insert(&vectors)).await??;
    }
    let removed = extra.len();
    blocking_index(&model.index, move |index| index.delete(&extra)).await?;
    Ok((missing.len(), removed))
}

/// Runs index work (graph inserts, dumps) off the async runtime.
/// Runs a write's store-then-index steps on a task of their own, holding the
/// writers' lock: a request dropped meanwhile (timeout, client gone) cannot
/// leave the index behind the store.
async fn store_then_index<T: Send + 'static>(
    writing: tokio::sync::OwnedRwLockReadGuard<()>,
    steps: impl Future<Output = Result<T, CatalogError>> + Send + 'static,
) -> Result<T, CatalogError> {
    let task = tokio::spawn(async move {
        let _writing = writing;
        steps.await
    });
    task.await.map_err(|e| CatalogError::Task(e.to_string()))?
}

async fn blocking_index<T: Send + 'static>(
    index: &Index,
    f: impl FnOnce(&Index) -> T + Send + 'static,
) -> Result<T, CatalogError> {
    let index = index.clone();
    run_blocking(move || f(&index)).await
}

/// Drops a model off the async runtime: its workers stop once the last
/// request using them is done, and joining them blocks.
fn retire<M: Send + 'static>(model: M) {
    tokio::task::spawn_blocking(move || drop(model));
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CatalogError::Task(e.to_string()))
}

fn neighbour(score: f32, item: &ItemSummary) -> Neighbour {
    Neighbour { id: item.id, score, label: item.label.clone(), metadata: item.metadata.clone() }
}
