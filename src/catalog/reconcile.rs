//! Keeping a model's index in step with the store: at start, and before a
//! model switch swaps.

use std::collections::HashSet;

use super::active::ActiveModel;
use super::CatalogError;
use crate::gallery::GalleryStore;

/// Embeddings read from the store per index insert when reconciling.
const RECONCILE_CHUNK: usize = 4096;

/// Makes a model's index hold exactly the stored items embedded with it:
/// inserts the missing ones from stored embeddings, removes the rest.
/// Returns (added, removed).
pub(crate) async fn reconcile(store: &dyn GalleryStore, model: &ActiveModel) -> Result<(usize, usize), CatalogError> {
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
