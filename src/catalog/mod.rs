//! The catalog: the product's core operations over one gallery. It ties
//! preprocessing, the embedder, a vector index and a gallery store together
//! (add, search, verify, delete; `write`, `search`), keeps the index in step
//! with the store across restarts and model switches (`switch`), and owns the
//! model versions' lifecycle (`models`, activations as jobs in `activation`).
//! HTTP-agnostic; `api/` translates.
//!
//! Order of writes: the store first, then the index. The store is the truth;
//! whatever the index missed in a crash is reconciled at the next start.
//!
//! The active model (its embedding workers, preprocessing and index) is one
//! value behind an `ArcSwap`: a request takes it once and uses it throughout,
//! so a model switch never mixes two models' embeddings in one answer.

mod activation;
mod active;
mod cluster;
mod labels;
mod models;
mod search;
mod switch;
#[cfg(test)]
mod tests;
mod types;
mod write;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

pub use crate::gallery::{ItemSummary, StoredImage};
pub use crate::index::IndexSource;
pub use activation::{ActivationState, ActivationStatus};
pub use models::{Slot, SlotHolder};
pub use types::*;

pub use crate::embed::Priority;

// The errors a catalog call can carry, part of its interface.
pub use crate::cluster::ClusterError;
pub use crate::embed::EmbedError;
pub use crate::gallery::GalleryError;
pub use crate::index::IndexError;
pub use crate::preprocess::PreprocessError;
pub use crate::registry::RegistryError;

use crate::cluster::ClusterLink;
use crate::embed::Embedder;
use crate::gallery::GalleryStore;
use crate::index::IndexProvider;
use crate::metrics;
use crate::preprocess::{PreprocessPool, Preprocessor};
use crate::registry::{ModelVersion, Registry};
use active::{ActiveModel, Pass};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("image {position}: {source}")]
    Image { position: usize, source: PreprocessError },
    #[error("image {position} duplicates item {existing} (similarity {score:.4})")]
    Duplicate { position: usize, existing: i64, score: f32 },
    #[error("image {position} duplicates image {earlier} of the same request")]
    DuplicateInRequest { position: usize, earlier: usize },
    #[error("no model version `{0}`")]
    UnknownVersion(String),
    #[error("{0} is still running; wait for it or cancel it")]
    Busy(SlotHolder),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] GalleryError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Models(#[from] RegistryError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("model switch across the cluster: {0}")]
    Switch(String),
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

/// Cheap-clone handle over one gallery and the model serving it.
#[derive(Clone)]
pub struct Catalog {
    active: Arc<ArcSwap<ActiveModel>>,
    store: Arc<dyn GalleryStore>,
    indexes: Arc<dyn IndexProvider>,
    registry: Registry,
    settings: Arc<CatalogSettings>,
    /// Adds and deletes hold it shared; a model switch holds it alone while it
    /// catches up with them and swaps.
    writes: Arc<tokio::sync::RwLock<()>>,
    /// The items of each label, for filtered searches.
    labels: Arc<labels::LabelMap>,
    /// Who holds the one-at-a-time slot of fine-tunes and activations. A std
    /// `Mutex`: held for a field read or write, never across an `.await`.
    lifecycle: Arc<Mutex<Option<SlotHolder>>>,
    activations: Arc<activation::Activations>,
    /// Cluster mode: the lifecycle shared with the other replicas.
    cluster: Option<Arc<ClusterLink>>,
    /// Cluster mode, while a switch prepares: the next model, with which
    /// uploads are embedded too, so that none lacks it at the flip.
    next: Arc<ArcSwapOption<ActiveModel>>,
    /// Cluster mode, after a flip: the model switched from, with which
    /// uploads are embedded too while another replica still serves it, so
    /// that its searches find them as well.
    previous: Arc<ArcSwapOption<ActiveModel>>,
    /// One cluster step at a time (the follower's loop and a switch's own).
    cluster_steps: Arc<tokio::sync::Mutex<()>>,
}

impl Catalog {
    /// Opens the catalog on the active model version: starts its workers,
    /// embeds stored images that lack its embedding, then reloads its saved
    /// index and reconciles it with the store, or builds it from stored embeddings.
    pub async fn open(
        store: Arc<dyn GalleryStore>,
        indexes: Arc<dyn IndexProvider>,
        registry: Registry,
        settings: CatalogSettings,
        cluster: Option<Arc<ClusterLink>>,
    ) -> Result<(Self, IndexStartup), CatalogError> {
        let started = Instant::now();
        if let Some(cluster) = &cluster {
            cluster::adopt_active_version(cluster, &registry).await?;
        }
        let version = models::registry_call(&registry, |registry| registry.active()).await?;
        let (dim, capacity) = (version.manifest.embedding.dim, store.count().await? as usize);
        let (index, source, reason) = indexes.open(&version.key, dim, capacity).await;
        let model = ActiveModel::start(version, &settings, index).await?;
        model.embed_missing(store.as_ref(), Pass::Final, &|_| {}, &AtomicBool::new(false)).await?;
        let (added, removed) = switch::reconcile(store.as_ref(), &model).await?;
        let labels = Arc::new(labels::LabelMap::new(store.labelled().await?));
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
            store,
            indexes,
            registry,
            settings: Arc::new(settings),
            writes: Arc::default(),
            labels,
            lifecycle: Arc::default(),
            activations: Arc::default(),
            cluster,
            next: Arc::default(),
            previous: Arc::default(),
            cluster_steps: Arc::default(),
        };
        Ok((catalog, startup))
    }

    /// The model serving now. Take it once per request and use it throughout.
    fn active(&self) -> Arc<ActiveModel> {
        self.active.load_full()
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

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), CatalogError> {
        Ok(self.store.ping().await?)
    }

    /// Waits for writes under way (including those whose request is gone) to
    /// reach the store and the index.
    pub async fn settle(&self) {
        drop(self.writes.write().await);
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
