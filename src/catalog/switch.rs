//! Switching the serving model without stopping service, and keeping a
//! model's index in step with the store.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::active::{retire, ActiveModel, Pass};
use super::{Catalog, CatalogError, Progress, Switched};
use crate::gallery::GalleryStore;
use crate::metrics;
use crate::registry::ModelVersion;

/// Embeddings read from the store per index insert when reconciling.
const RECONCILE_CHUNK: usize = 4096;

/// The writers' lock, held alone.
type Exclusive = tokio::sync::OwnedRwLockWriteGuard<()>;

impl Catalog {
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
        if let Some(cluster) = self.cluster.clone() {
            return self.switch_cluster(&cluster, version, progress, swapping, cancel).await;
        }
        let started = Instant::now();
        let capacity = self.store.count().await? as usize;
        let index = self.indexes.create(&version.key, version.manifest.embedding.dim, capacity);
        let model = ActiveModel::start(version, &self.settings, index).await?;
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
            model: model.name(),
            embedded,
            items: model.index.len(),
            unembeddable: model.lock_unembeddable().iter().copied().collect(),
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
    ) -> Result<(usize, Exclusive), CatalogError> {
        let before = self.store.change_sequence();
        let mut embedded = model.embed_missing(self.store.as_ref(), Pass::Background, progress, cancel).await?;
        reconcile(self.store.as_ref(), model).await?;
        model.index.prepare().await?;
        if cancel.load(Ordering::Relaxed) {
            return Err(CatalogError::Cancelled);
        }
        swapping();
        let exclusive = self.writes.clone().write_owned().await;
        // Every add and delete holds the writers' lock: with it held alone and
        // the sequence unchanged, nothing happened since the pass began.
        if self.store.change_sequence() != before {
            let store = self.store.as_ref();
            embedded += model.embed_missing(store, Pass::Final, progress, &AtomicBool::new(false)).await?;
            reconcile(self.store.as_ref(), model).await?;
        }
        let version = model.version.version.clone();
        super::models::registry_call(&self.registry, move |registry| registry.set_active(&version)).await?;
        Ok((embedded, exclusive))
    }
}

/// Makes a model's index hold exactly the stored items embedded with it:
/// inserts the missing ones from stored embeddings, removes the rest.
/// Returns (added, removed).
pub(super) async fn reconcile(store: &dyn GalleryStore, model: &ActiveModel) -> Result<(usize, usize), CatalogError> {
    if model.index.mirrors_store() {
        return Ok((0, 0));
    }
    let key = model.key();
    let stored: HashSet<i64> = store.embedded_ids(key.clone()).await?.into_iter().collect();
    let in_index = model.index.ids();
    let missing: Vec<i64> = stored.difference(&in_index).copied().collect();
    let extra: Vec<i64> = in_index.difference(&stored).copied().collect();
    for chunk in missing.chunks(RECONCILE_CHUNK) {
        let vectors = store.embeddings_of(key.clone(), chunk.to_vec()).await?;
        model.index.insert(vectors).await?;
    }
    let removed = extra.len();
    if !extra.is_empty() {
        model.index.delete(extra).await?;
    }
    Ok((missing.len(), removed))
}
