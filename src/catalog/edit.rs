//! Changing items' labels and metadata after upload. The store commits; then
//! the label map that filtered searches read follows, in the store's order.
//! The k-NN vote and fine-tuning read labels from the store, so they follow
//! at once; in cluster mode, so does every replica's filtered search (it
//! filters in SQL).

use super::write::detached_write;
use super::{Catalog, CatalogError};
use crate::gallery::{Edited, ItemEdit};

impl Catalog {
    /// Applies `edit` to item `id` if `if_match` admits its current `ETag`.
    pub async fn edit(&self, id: i64, edit: ItemEdit, if_match: Option<String>) -> Result<Edited, CatalogError> {
        let writing = self.models.write_shared().await;
        let (store, labels) = (self.store.clone(), self.labels.clone());
        detached_write(writing, async move {
            let _edits = labels.lock_edits().await;
            let edited = store.edit(id, edit, if_match).await?;
            if let Edited::Done(item) = &edited {
                labels.set(&[id], item.label.as_deref());
            }
            Ok(edited)
        })
        .await
    }

    /// Gives every id `label` (or none), all or none: returns the ids that do
    /// not exist, and then nothing changed.
    pub async fn relabel(&self, mut ids: Vec<i64>, label: Option<String>) -> Result<Vec<i64>, CatalogError> {
        ids.sort_unstable();
        ids.dedup();
        let writing = self.models.write_shared().await;
        let (store, labels) = (self.store.clone(), self.labels.clone());
        detached_write(writing, async move {
            let _edits = labels.lock_edits().await;
            let missing = store.relabel(ids.clone(), label.clone()).await?;
            if missing.is_empty() {
                labels.set(&ids, label.as_deref());
            }
            Ok(missing)
        })
        .await
    }
}
