//! The catalog: the request path over one gallery. It ties preprocessing,
//! the embedder, a vector index and a gallery store together (add, search,
//! verify, delete, list; `write`, `search`) over the models serving now
//! (`serving`). It neither starts nor switches models: the model lifecycle
//! (`crate::lifecycle`) does, through `ServingModels`. HTTP-agnostic; `api/`
//! translates.
//!
//! Order of writes: the store first, then the index. The store is the truth;
//! whatever the index missed in a crash is reconciled at the next start.

pub(crate) mod active;
mod duplicates;
mod edit;
mod explain;
mod labels;
mod once;
pub(crate) mod reconcile;
mod search;
pub(crate) mod serving;
mod suggestions;
#[cfg(test)]
pub(crate) mod tests;
mod types;
mod write;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

pub use crate::gallery::{Edited, IdempotencyKey, ItemEdit, ItemSummary, MetadataEdit, StoredImage};
pub use crate::index::IndexSource;
pub use duplicates::NearPairs;
pub use explain::Explanation;
pub use once::{request_fingerprint, AddedOnce};
pub use suggestions::{Suggestion, Suggestions};
pub use types::*;

pub use crate::embed::Priority;

// The errors a catalog call can carry, part of its interface.
pub use crate::embed::EmbedError;
pub use crate::error_kind::ErrorKind;
pub use crate::gallery::GalleryError;
pub use crate::index::IndexError;
pub use crate::preprocess::PreprocessError;

use crate::embed::Embedder;
use crate::gallery::GalleryStore;
use crate::index::IndexProvider;
use crate::preprocess::{PreprocessPool, Preprocessor};
use crate::registry::ModelVersion;
use active::{ActiveModel, Pass};
use serving::ServingModels;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("image {position}: {source}")]
    Image { position: usize, source: PreprocessError },
    #[error("image {position} duplicates item {existing} (similarity {score:.4})")]
    Duplicate { position: usize, existing: i64, score: f32 },
    #[error("image {position} duplicates image {earlier} of the same request")]
    DuplicateInRequest { position: usize, earlier: usize },
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] GalleryError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cancelled")]
    Cancelled,
    /// A duplicate scan found more close pairs than it keeps.
    #[error("more than {limit} pairs of items lie within distance {distance}: too loose to mean copies; scan again with a smaller distance")]
    TooManyPairs { distance: f32, limit: usize },
    /// An idempotency key already used for a different request.
    #[error("idempotency key `{0}` was used with a different request; a retry must send the same request")]
    KeyReused(String),
    /// Items stored under an idempotency key were deleted since.
    #[error(
        "items stored under idempotency key `{0}` were deleted since; send the upload with a new key to store it again"
    )]
    KeyStale(String),
}

impl CatalogError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Image { .. } | Self::KeyReused(_) | Self::TooManyPairs { .. } => ErrorKind::Invalid,
            Self::Duplicate { .. } | Self::DuplicateInRequest { .. } | Self::Cancelled | Self::KeyStale(_) => {
                ErrorKind::Conflict
            }
            Self::Embed(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Index(e) => e.kind(),
            Self::Task(_) => ErrorKind::Internal,
        }
    }
}

/// Starts the embedding workers of a model version: libtorch workers in the
/// service, any `Encoder` in tests.
pub type StartEmbedder = Arc<dyn Fn(&ModelVersion) -> Result<Embedder, EmbedError> + Send + Sync>;

pub struct CatalogSettings {
    pub start_embedder: StartEmbedder,
    /// Preprocessing thread budget and image limits, shared by every model.
    pub preprocess: PreprocessPool,
    /// Cosine distance under which an upload is a near duplicate (0: off);
    /// `None`: the serving model's calibrated one (`Manifest::near_duplicate_distance`).
    pub near_duplicate_distance: Option<f32>,
    /// Labelled neighbours that vote for a search's predicted label.
    pub knn_k: usize,
    /// Labels with at most this many items are searched exactly; larger ones
    /// by a filtered graph walk.
    pub exact_search_limit: usize,
    /// Cosine distance beyond which the nearest labelled neighbour means
    /// `unknown`; `None` takes 1 - the active model's verification threshold.
    pub unknown_distance: Option<f32>,
}

/// Cheap-clone handle over one gallery and the models serving it.
#[derive(Clone)]
pub struct Catalog {
    models: Arc<ServingModels>,
    store: Arc<dyn GalleryStore>,
    settings: Arc<CatalogSettings>,
    /// The items of each label, for filtered searches.
    labels: Arc<labels::LabelMap>,
}

impl Catalog {
    /// Opens the catalog on `version`: starts its workers, embeds stored
    /// images that lack its embedding, then reloads its saved index and
    /// reconciles it with the store, or builds it from stored embeddings.
    pub async fn open(
        store: Arc<dyn GalleryStore>,
        indexes: &dyn IndexProvider,
        version: ModelVersion,
        settings: CatalogSettings,
    ) -> Result<(Self, IndexStartup), CatalogError> {
        let started = Instant::now();
        let (dim, capacity) = (version.manifest.embedding.dim, store.count().await? as usize);
        let (index, source, reason) = indexes.open(&version.key, dim, capacity).await;
        let unembeddable = Arc::new(active::Unembeddable::default());
        let model = ActiveModel::start(version, &settings, index, &unembeddable).await?;
        model.embed_missing(store.as_ref(), Pass::Final, &AtomicBool::new(false)).await?;
        let (added, removed) = reconcile::reconcile(store.as_ref(), &model).await?;
        let labels = Arc::new(labels::LabelMap::new(store.labelled().await?));
        let startup = IndexStartup {
            source,
            reason,
            items: model.index.len(),
            added,
            removed,
            seconds: started.elapsed().as_secs_f64(),
        };
        let models = Arc::new(ServingModels::new(model, unembeddable));
        Ok((Self { models, store, settings: Arc::new(settings), labels }, startup))
    }

    /// The model serving now. Take it once per request and use it throughout.
    fn active(&self) -> Arc<ActiveModel> {
        self.models.active()
    }

    /// What the model lifecycle changes.
    pub(crate) fn models(&self) -> &Arc<ServingModels> {
        &self.models
    }

    pub(crate) fn store(&self) -> &Arc<dyn GalleryStore> {
        &self.store
    }

    pub(crate) fn settings(&self) -> &CatalogSettings {
        &self.settings
    }

    /// The version serving now.
    pub fn active_version(&self) -> ModelVersion {
        self.active().version.clone()
    }

    /// How the serving model's images are decoded and normalised.
    pub fn preprocessor(&self) -> Preprocessor {
        self.active().preprocess.preprocessor().clone()
    }

    /// The serving model, its workers and its index, in one reading.
    pub fn serving(&self) -> Serving {
        let active = self.active();
        let info = active.embedder.info();
        let unembeddable_items = active.lock_unembeddable().len();
        Serving {
            model: info.model_key.clone(),
            version: active.version.version.clone(),
            bundled: active.version.bundled,
            trained: active.version.manifest.trained,
            device: info.device.clone(),
            workers: info.workers,
            precision: info.precision.to_string(),
            max_batch: info.policy.max_batch,
            max_delay: info.policy.max_delay,
            cuda_available: info.cuda.available,
            cuda_devices: info.cuda.device_count,
            workers_running: active.embedder.is_running(),
            indexed_items: active.index.len(),
            unembeddable_items,
        }
    }

    /// A page of items in id order after `after`, optionally of one label.
    pub async fn list(
        &self,
        label: Option<String>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<ItemSummary>, CatalogError> {
        Ok(self.store.list(label, after, limit).await?)
    }

    pub async fn item(&self, id: i64) -> Result<Option<ItemSummary>, CatalogError> {
        Ok(self.store.summary(id).await?)
    }

    /// Summaries of the given ids that exist.
    pub async fn summaries(&self, ids: Vec<i64>) -> Result<std::collections::HashMap<i64, ItemSummary>, CatalogError> {
        Ok(self.store.summaries(ids).await?)
    }

    /// An item's original bytes, as uploaded.
    pub async fn image(&self, id: i64) -> Result<Option<StoredImage>, CatalogError> {
        Ok(self.store.image(id).await?)
    }

    /// Every labelled item as `(id, label)`, ascending by id.
    pub async fn labelled(&self) -> Result<Vec<(i64, String)>, CatalogError> {
        Ok(self.store.labelled().await?)
    }

    /// The original bytes of the given items (those that still exist).
    pub async fn images(&self, ids: Vec<i64>) -> Result<Vec<(i64, Vec<u8>)>, CatalogError> {
        Ok(self.store.images(ids).await?)
    }

    /// Items with a stored embedding of the model stored under `key`.
    pub(crate) async fn count_embedded(&self, key: String) -> Result<u64, CatalogError> {
        Ok(self.store.count_embedded(key).await?)
    }

    /// Stored items the serving model cannot preprocess, by id.
    pub(crate) fn unembeddable(&self) -> Vec<i64> {
        self.active().lock_unembeddable().iter().copied().collect()
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), CatalogError> {
        Ok(self.store.ping().await?)
    }

    /// Waits for writes under way (including those whose request is gone) to
    /// reach the store and the index.
    pub async fn settle(&self) {
        drop(self.models.write_exclusive().await);
    }

    /// Saves the active index if it changed since the last save.
    pub async fn dump_index(&self) -> Result<(), CatalogError> {
        if let Some(report) = self.active().index.save().await? {
            tracing::info!(points = report.points, seconds = report.seconds, "index dumped");
        }
        Ok(())
    }

    /// At shutdown, once writes have settled: leaves the store tidy.
    pub async fn close_store(&self) -> Result<(), CatalogError> {
        Ok(self.store.checkpoint().await?)
    }
}
