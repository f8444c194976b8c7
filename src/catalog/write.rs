//! Gallery writes: adding uploads (with duplicate handling) and deleting
//! items. The store first, then the index, on a task of their own.

use std::future::Future;
use std::sync::Arc;

use futures::future::join_all;

use super::active::ActiveModel;
use super::labels::LabelMap;
use super::{AddStatus, Added, Catalog, CatalogError, NearDuplicate, OnDuplicate, Upload};
use crate::embed::Priority;
use crate::gallery::{content_hash, GalleryStore, IdempotencyKey, Inserted, NewItem};
use crate::vector::cosine;

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
    fn new_item(&self, on_duplicate: OnDuplicate) -> Option<NewItem> {
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
            unless_stored: on_duplicate == OnDuplicate::Skip,
        })
    }
}

impl Catalog {
    /// Decodes, embeds (at `priority`) and stores the uploads, then indexes
    /// them. Either every stored image is committed or none is.
    pub async fn add(
        &self,
        uploads: Vec<Upload>,
        on_duplicate: OnDuplicate,
        priority: Priority,
    ) -> Result<Vec<Added>, CatalogError> {
        self.add_keyed(uploads, on_duplicate, priority, None).await
    }

    /// `add`, the write remembered under `key` in its transaction (see `add_once`).
    pub(super) async fn add_keyed(
        &self,
        uploads: Vec<Upload>,
        on_duplicate: OnDuplicate,
        priority: Priority,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<Added>, CatalogError> {
        let writing = self.models.write_shared().await;
        let active = self.active();
        let hashes: Vec<String> = uploads.iter().map(|u| content_hash(&u.bytes)).collect();
        let existing = self.store.oldest_with_hashes(hashes.clone()).await?;
        let mut pending: Vec<Pending> = uploads
            .into_iter()
            .zip(hashes.into_iter().zip(existing))
            .map(|(upload, (content_hash, exact))| Pending { upload, content_hash, exact, embedded: None, near: None })
            .collect();
        if on_duplicate == OnDuplicate::Reject {
            refuse_copies_within(&pending, |a, b| a.content_hash == b.content_hash)?;
        }
        embed_uploads(&active, &mut pending, on_duplicate, priority).await?;
        self.find_near_duplicates(&active, &mut pending, on_duplicate).await?;
        let items: Vec<NewItem> = pending.iter().filter_map(|p| p.new_item(on_duplicate)).collect();
        let mut for_others = Vec::new();
        for other in self.models.also_writing(&active) {
            // Best effort: an item the other model lacks is embedded by the switch's own passes.
            match embed_with_other(&other, &items, priority).await {
                Ok(vectors) => for_others.push(vectors),
                Err(error) => {
                    tracing::warn!(%error, model = %other.name(), "could not embed uploads with the next model")
                }
            }
        }
        let inserted = self.store_and_index(writing, &active, items, for_others, key).await?;
        Ok(reports(pending, inserted))
    }

    /// Notes each embedded upload's nearest stored item when it is a near
    /// duplicate; with `reject`, refuses the request on any duplicate, of a
    /// stored item or of another upload of the request.
    async fn find_near_duplicates(
        &self,
        active: &ActiveModel,
        pending: &mut [Pending],
        on_duplicate: OnDuplicate,
    ) -> Result<(), CatalogError> {
        for (position, upload) in pending.iter_mut().enumerate() {
            let Some(embedded) = &upload.embedded else { continue };
            upload.near = self.nearest_duplicate(active, &embedded.embedding).await?;
            let duplicate = upload.exact.map(|id| (id, 1.0)).or(upload.near.map(|n| (n.id, n.score)));
            if let (OnDuplicate::Reject, Some((existing, score))) = (on_duplicate, duplicate) {
                return Err(CatalogError::Duplicate { position, existing, score });
            }
        }
        let distance = self.near_duplicate_distance(active);
        if on_duplicate != OnDuplicate::Reject || distance <= 0.0 {
            return Ok(());
        }
        refuse_copies_within(pending, |a, b| match (&a.embedded, &b.embedded) {
            (Some(a), Some(b)) => cosine(&a.embedding, &b.embedding) >= 1.0 - distance,
            _ => false,
        })
    }

    /// Stores the items, then indexes (and labels) those stored, on a task of
    /// their own holding `writing`; then stores other models' vectors of
    /// them (`for_others`: each model's key and one vector per item): the
    /// next one while a cluster switch prepares, the previous one after it.
    async fn store_and_index(
        &self,
        writing: tokio::sync::OwnedRwLockReadGuard<()>,
        active: &ActiveModel,
        items: Vec<NewItem>,
        for_others: Vec<(String, Vec<Option<Vec<f32>>>)>,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<Inserted>, CatalogError> {
        let (store, index, model, labels) =
            (self.store.clone(), active.index.clone(), active.key(), self.labels.clone());
        detached_write(writing, async move {
            let described: Vec<(Vec<f32>, Option<String>)> =
                items.iter().map(|i| (i.embedding.clone(), i.label.clone())).collect();
            let inserted = store.insert(items, model, key).await?;
            let mut stored = Vec::new();
            let mut labelled = Vec::new();
            for (item, (vector, label)) in inserted.iter().zip(described).filter(|(i, _)| i.stored) {
                labelled.extend(label.map(|label| (item.id, label)));
                stored.push((item.id, vector));
            }
            label_stored(store.as_ref(), &labels, labelled).await;
            // Committed: from here the upload succeeds, and what fails is finished later.
            if let Err(error) = index.insert(stored.clone()).await {
                tracing::error!(%error, items = stored.len(), "stored uploads could not be indexed; retrying");
                tokio::spawn(index_later(index.clone(), stored));
            }
            for (other, vectors) in for_others {
                let stored =
                    inserted.iter().zip(vectors).filter(|(i, _)| i.stored).filter_map(|(i, v)| Some((i.id, v?)));
                // The items are stored and indexed: a failure here leaves them to the switch's passes.
                if let Err(error) = store.put_embeddings(other.clone(), stored.collect()).await {
                    tracing::warn!(%error, model = %other, "could not store uploads' embeddings of the next model");
                }
            }
            Ok(inserted)
        })
        .await
    }

    /// The configured near-duplicate distance, else the serving model's calibrated one, else 0 (off).
    fn near_duplicate_distance(&self, active: &ActiveModel) -> f32 {
        self.settings
            .near_duplicate_distance
            .unwrap_or_else(|| active.version.manifest.near_duplicate_distance.unwrap_or(0.0))
    }

    /// The most similar stored item, when it is within the near-duplicate
    /// distance (a distance of 0 turns this off).
    async fn nearest_duplicate(
        &self,
        active: &ActiveModel,
        embedding: &[f32],
    ) -> Result<Option<NearDuplicate>, CatalogError> {
        let distance = self.near_duplicate_distance(active);
        if distance <= 0.0 {
            return Ok(None);
        }
        let threshold = 1.0 - distance;
        let best = active.index.search(embedding, 1, None).await?.into_iter().next();
        Ok(best.filter(|hit| hit.score >= threshold).map(|hit| NearDuplicate { id: hit.id, score: hit.score }))
    }

    /// Deletes an item: from the store (committed), then from results at once.
    pub async fn delete(&self, id: i64) -> Result<bool, CatalogError> {
        let writing = self.models.write_shared().await;
        let active = self.active();
        let (store, index, labels) = (self.store.clone(), active.index.clone(), self.labels.clone());
        let deleted = detached_write(writing, async move {
            let edits = labels.lock_edits().await;
            if !store.delete(id).await? {
                return Ok(false);
            }
            labels.remove(id);
            drop(edits);
            index.delete(vec![id]).await?;
            Ok(true)
        })
        .await?;
        self.models.unembeddable().forget(id);
        Ok(deleted)
    }
}

/// Puts stored uploads' labels in the label map. An edit may have relabelled
/// them since they were committed (they have ids from then on), so under the
/// edits' lock their labels are read back from the store; if that read fails,
/// the uploaded labels are used.
async fn label_stored(store: &dyn GalleryStore, labels: &LabelMap, uploaded: Vec<(i64, String)>) {
    if uploaded.is_empty() {
        return;
    }
    let _edits = labels.lock_edits().await;
    match store.summaries(uploaded.iter().map(|(id, _)| *id).collect()).await {
        Ok(now) => {
            for (id, _) in &uploaded {
                labels.set(&[*id], now.get(id).and_then(|item| item.label.as_deref()));
            }
        }
        Err(error) => {
            tracing::warn!(%error, "could not read uploads' labels back; using the uploaded ones");
            for (id, label) in &uploaded {
                labels.set(&[*id], Some(label));
            }
        }
    }
}

/// Decodes and embeds every upload that will be stored, all at once so they
/// share forward passes; byte duplicates that `skip` leaves out are not decoded.
async fn embed_uploads(
    active: &Arc<ActiveModel>,
    pending: &mut [Pending],
    on_duplicate: OnDuplicate,
    priority: Priority,
) -> Result<(), CatalogError> {
    let todo: Vec<usize> =
        (0..pending.len()).filter(|&i| !(on_duplicate == OnDuplicate::Skip && pending[i].exact.is_some())).collect();
    let images = todo.iter().map(|&i| pending[i].upload.bytes.clone()).collect();
    let prepared = active.prepare_all(images, priority).await.map_err(|e| match e {
        CatalogError::Image { position, source } => CatalogError::Image { position: todo[position], source },
        other => other,
    })?;
    let shapes: Vec<_> = prepared.iter().map(|p| (p.format.to_mime_type(), p.width, p.height)).collect();
    let vectors = active.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), priority).await?;
    for ((i, (media_type, width, height)), embedding) in todo.into_iter().zip(shapes).zip(vectors) {
        pending[i].embedded = Some(EmbeddedUpload { media_type, width, height, embedding });
    }
    Ok(())
}

/// Another model's vectors of the items to store, with its key; `None` for
/// an image that model cannot preprocess (the upload still succeeds: a
/// switch's own pass records it as unembeddable by that model).
async fn embed_with_other(
    other: &ActiveModel,
    items: &[NewItem],
    priority: Priority,
) -> Result<(String, Vec<Option<Vec<f32>>>), CatalogError> {
    let prepared = join_all(items.iter().map(|i| other.preprocess.prepare(i.image.clone(), priority))).await;
    let pixels: Vec<Vec<f32>> = prepared.iter().flatten().map(|p| p.pixels.clone()).collect();
    let mut vectors = other.embed_all(pixels, priority).await?.into_iter();
    let vectors = prepared.iter().map(|p| p.as_ref().ok().and_then(|_| vectors.next())).collect();
    Ok((other.key(), vectors))
}

/// With `reject`, refuses the request when one upload copies an earlier one
/// of the same request (`same`: byte-identical, or near duplicates).
fn refuse_copies_within(pending: &[Pending], same: impl Fn(&Pending, &Pending) -> bool) -> Result<(), CatalogError> {
    for (position, upload) in pending.iter().enumerate() {
        if let Some(earlier) = pending[..position].iter().position(|other| same(other, upload)) {
            return Err(CatalogError::DuplicateInRequest { position, earlier });
        }
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
                let item = stored.next().expect("one insert report per embedded upload");
                // The store's answer also covers byte duplicates inside this very request,
                // and uploads a concurrent request stored first.
                Added {
                    id: item.id,
                    status: if item.stored { AddStatus::Added } else { AddStatus::Skipped },
                    content_hash: upload.content_hash,
                    duplicate_of: item.duplicate_of,
                    near_duplicate_of: upload.near,
                }
            }
        })
        .collect()
}

/// Indexes stored items an insert could not, retrying for a minute; past it
/// the next start's reconciliation adds them.
async fn index_later(index: Arc<dyn crate::index::VectorIndex>, items: Vec<(i64, Vec<f32>)>) {
    for attempt in 1..=6 {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        match index.insert(items.clone()).await {
            Ok(()) => return tracing::info!(attempt, "stored uploads indexed on a later try"),
            Err(error) => tracing::warn!(%error, attempt, "stored uploads still not indexed"),
        }
    }
    tracing::error!(items = items.len(), "stored uploads not indexed; the next start adds them to the index");
}

/// Runs a write's store-then-index steps on a task of their own, holding the
/// writers' lock: a request dropped meanwhile (timeout, client gone) cannot
/// leave the index behind the store.
pub(super) async fn detached_write<T: Send + 'static>(
    writing: tokio::sync::OwnedRwLockReadGuard<()>,
    steps: impl Future<Output = Result<T, CatalogError>> + Send + 'static,
) -> Result<T, CatalogError> {
    let task = tokio::spawn(async move {
        let _writing = writing;
        steps.await
    });
    task.await?
}
