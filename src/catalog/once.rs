//! Uploads under an idempotency key: the first request with a key stores its
//! items and remembers the write with them (one transaction); a retry with
//! the same key and the same request gets the first answer again, stored
//! nothing more, on whichever replica it lands. The same key with another
//! request is refused.

use super::{AddStatus, Added, Catalog, CatalogError, OnDuplicate, Upload};
use crate::embed::Priority;
use crate::gallery::{content_hash, GalleryError, IdempotencyKey, Remembered};

/// What makes two uploads the same request, for the idempotency key: the
/// duplicate handling, and each upload's label, metadata and bytes, in order.
pub fn request_fingerprint(on_duplicate: OnDuplicate, uploads: &[Upload]) -> String {
    let parts: Vec<String> =
        uploads.iter().map(|u| format!("{:?}\n{}\n{}", u.label, u.metadata, content_hash(&u.bytes))).collect();
    content_hash(format!("{on_duplicate:?}\n{}", parts.join("\n")).as_bytes())
}

/// The answer to an upload under a key, and whether it is a replay.
pub struct AddedOnce {
    pub added: Vec<Added>,
    /// The first request's answer, given again.
    pub replayed: bool,
}

impl Catalog {
    /// `add` under an idempotency key (see the module comment).
    pub async fn add_once(
        &self,
        uploads: Vec<Upload>,
        on_duplicate: OnDuplicate,
        priority: Priority,
        key: IdempotencyKey,
    ) -> Result<AddedOnce, CatalogError> {
        if let Some(first) = self.store.remembered(key.key.clone()).await? {
            return self.replay(&key, first).await;
        }
        match self.add_keyed(uploads, on_duplicate, priority, Some(key.clone())).await {
            Ok(added) => {
                let answer = serde_json::to_value(&added).expect("reports serialise");
                // Best effort: without it a retry's answer is rebuilt from the store's report.
                if let Err(error) = self.store.keep_answer(key.key.clone(), answer).await {
                    tracing::warn!(%error, "could not keep the answer of an upload under an idempotency key");
                }
                Ok(AddedOnce { added, replayed: false })
            }
            // A concurrent request with the key (the first try, still running when its
            // retry came) committed first: this one stored nothing; answer as that one did.
            Err(error) => match self.store.remembered(key.key.clone()).await? {
                Some(first) => self.replay(&key, first).await,
                None if matches!(error, CatalogError::Store(GalleryError::KeyTaken(_))) => {
                    Err(GalleryError::Corrupt(format!("idempotency key {} taken but not kept", key.key)).into())
                }
                None => Err(error),
            },
        }
    }
}

impl Catalog {
    /// The first answer under `key`, if the request is the same and every
    /// item it names is still there (an answer naming deleted items would mislead).
    async fn replay(&self, key: &IdempotencyKey, first: Remembered) -> Result<AddedOnce, CatalogError> {
        if first.fingerprint != key.fingerprint {
            return Err(CatalogError::KeyReused(key.key.clone()));
        }
        let answer = first_answer(first);
        // Every item the answer names, stored by it or found stored (a skipped duplicate).
        let mut named: Vec<i64> = answer.added.iter().map(|a| a.id).collect();
        named.sort_unstable();
        named.dedup();
        if self.store.summaries(named.clone()).await?.len() < named.len() {
            return Err(CatalogError::KeyStale(key.key.clone()));
        }
        Ok(answer)
    }
}

/// The answer kept with a key, or one rebuilt from the store's report.
fn first_answer(first: Remembered) -> AddedOnce {
    let kept = first.answer.and_then(|answer| serde_json::from_value::<Vec<Added>>(answer).ok());
    // Rebuilt from the store's report when the answer was not kept (near duplicates then unknown).
    let added = kept.unwrap_or_else(|| {
        let rebuilt = first.inserted.into_iter().map(|item| Added {
            id: item.id,
            status: if item.stored { AddStatus::Added } else { AddStatus::Skipped },
            content_hash: item.content_hash,
            duplicate_of: item.duplicate_of,
            near_duplicate_of: None,
        });
        rebuilt.collect()
    });
    AddedOnce { added, replayed: true }
}
