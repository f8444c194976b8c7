//! Gallery writes: adding uploads (with duplicate handling) and deleting
//! items. The store first, then the index, on a task of their own.

use std::future::Future;
use std::sync::Arc;

use super::active::ActiveModel;
use super::{AddStatus, Added, Catalog, CatalogError, NearDuplicate, OnDuplicate, Upload};
use crate::embed::Priority;
use crate::gallery::{content_hash, Inserted, NewItem};

/// One upload on its way to the store.
struct Pending {
    upload: Upload,
    content_hash: String,
    /// The oldest stored item with the same bytes.
    exact: Option<i64>,
    /// `None` for a byte duplicate that `skip` leaves out (never decoded).
    embedded: Option<EmbeddedUpload>,
    near: Option<NearDuplicate>,
}

/// What decoding and embedding an upload found.
struct EmbeddedUpload {
    media_type: &'static str,
    width: u32,
    height: u32,
    embedding: Vec<f32>,
}

impl Pending {
    fn new_item(&self) -> Option<NewItem> {
        let embedded = self.embedded.as_ref()?;
        Some(NewItem {
            image: self.upload.bytes.clone(),
            content_hash: self.content_hash.clone(),
            media_type: embedded.media_type.to_string(),
            width: embedded.width,
            height: embedded.height,
            label: self.upload.label.clone(),
            metadata: self.upload.metadata.clone(),
            embedding: embedded.embedding.clone(),
        })
    }
}

impl Catalog {
    /// Decodes, embeds and stores the uploads, then indexes them. Either every
    /// stored image is committed or none is.
    pub async fn add(&self, uploads: Vec<Upload>, on_duplicate: OnDuplicate) -> Result<Vec<Added>, CatalogError> {
        let writing = self.writes.clone().read_owned().await;
        let active = self.active();
        let hashes: Vec<String> = uploads.iter().map(|u| content_hash(&u.bytes)).collect();
        let existing = self.store.oldest_with_hashes(hashes.clone()).await?;
        let mut pending: Vec<Pending> = uploads
            .into_iter()
            .zip(hashes.into_iter().zip(existing))
            .map(|(upload, (content_hash, exact))| Pending { upload, content_hash, exact, embedded: None, near: None })
            .collect();
        embed_uploads(&active, &mut pending, on_duplicate).await?;
        for (position, upload) in pending.iter_mut().enumerate() {
            let Some(embedded) = &upload.embedded else { continue };
            upload.near = self.nearest_duplicate(&active, &embedded.embedding).await?;
            let duplicate = upload.exact.map(|id| (id, 1.0)).or(upload.near.map(|n| (n.id, n.score)));
            if let (OnDuplicate::Reject, Some((existing, score))) = (on_duplicate, duplicate) {
                return Err(CatalogError::Duplicate { position, existing, score });
            }
        }
        let items: Vec<NewItem> = pending.iter().filter_map(Pending::new_item).collect();
        let (store, index, model) = (self.store.clone(), active.index.clone(), active.key());
        let inserted = store_then_index(writing, async move {
            let vectors: Vec<Vec<f32>> = items.iter().map(|i| i.embedding.clone()).collect();
            let inserted = store.insert(items, model).await?;
            index.insert(inserted.iter().map(|i| i.id).zip(vectors).collect()).await?;
            Ok(inserted)
        })
        .await?;
        Ok(reports(pending, inserted))
    }

    /// The most similar stored item, when it is within the near-duplicate
    /// distance (a distance of 0 turns this off).
    async fn nearest_duplicate(
        &self,
        active: &ActiveModel,
        embedding: &[f32],
    ) -> Result<Option<NearDuplicate>, CatalogError> {
        if self.settings.near_duplicate_distance <= 0.0 {
            return Ok(None);
        }
        let threshold = 1.0 - self.settings.near_duplicate_distance;
        let best = active.index.search(embedding, 1, None).await?.into_iter().next();
        Ok(best.filter(|hit| hit.score >= threshold).map(|hit| NearDuplicate { id: hit.id, score: hit.score }))
    }

    /// Deletes an item: from the store (committed), then from results at once.
    pub async fn delete(&self, id: i64) -> Result<bool, CatalogError> {
        let writing = self.writes.clone().read_owned().await;
        let (store, index) = (self.store.clone(), self.active().index.clone());
        store_then_index(writing, async move {
            if !store.delete(id).await? {
                return Ok(false);
            }
            index.delete(vec![id]).await?;
            Ok(true)
        })
        .await
    }
}

/// Decodes and embeds every upload that will be stored, all at once so they
/// share forward passes; byte duplicates that `skip` leaves out are not decoded.
async fn embed_uploads(
    active: &Arc<ActiveModel>,
    pending: &mut [Pending],
    on_duplicate: OnDuplicate,
) -> Result<(), CatalogError> {
    let todo: Vec<usize> =
        (0..pending.len()).filter(|&i| !(on_duplicate == OnDuplicate::Skip && pending[i].exact.is_some())).collect();
    let images = todo.iter().map(|&i| pending[i].upload.bytes.clone()).collect();
    let prepared = active.prepare_all(images).await.map_err(|e| match e {
        CatalogError::Image { position, source } => CatalogError::Image { position: todo[position], source },
        other => other,
    })?;
    let shapes: Vec<_> = prepared.iter().map(|p| (p.format.to_mime_type(), p.width, p.height)).collect();
    let vectors = active.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Interactive).await?;
    for ((i, (media_type, width, height)), embedding) in todo.into_iter().zip(shapes).zip(vectors) {
        pending[i].embedded = Some(EmbeddedUpload { media_type, width, height, embedding });
    }
    Ok(())
}

/// One report per upload, in order, with the ids the store gave the added ones.
fn reports(pending: Vec<Pending>, inserted: Vec<Inserted>) -> Vec<Added> {
    let mut stored = inserted.into_iter();
    pending
        .into_iter()
        .map(|upload| match upload.embedded {
            None => Added {
                id: upload.exact.expect("only byte duplicates are left unembedded"),
                status: AddStatus::Skipped,
                content_hash: upload.content_hash,
                duplicate_of: upload.exact,
                near_duplicate_of: None,
            },
            Some(_) => {
                let item = stored.next().expect("one stored item per embedded upload");
                // The store's answer also covers byte duplicates inside this very request.
                Added {
                    id: item.id,
                    status: AddStatus::Added,
                    content_hash: upload.content_hash,
                    duplicate_of: item.duplicate_of,
                    near_duplicate_of: upload.near,
                }
            }
        })
        .collect()
}

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
    task.await?
}
