//! The embedded store's claims on re-embedding work. One process owns the
//! file, so a claim is a note in memory: the items it holds, and those found
//! unembeddable by a model (not claimed again while the process runs; the
//! catalog remembers them).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::sqlite::SqliteGallery;
use super::{GalleryError, GalleryStore, MissingClaim};

/// Per model: the items claimed and not completed or found unembeddable,
/// and how far the claims have got. Ids are never reused (AUTOINCREMENT) and
/// new items come after the cursor, so everything at or before it that lacks
/// an embedding is held: claims read onwards from it, not the whole table.
#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<String, Progress>>);

#[derive(Default)]
pub(super) struct Progress {
    held: BTreeSet<i64>,
    after: i64,
}

impl Held {
    /// Where the next claim of `model` reads from.
    pub(super) fn after(&self, model: &str) -> i64 {
        self.lock().get(model).map_or(0, |p| p.after)
    }

    /// Holds those of `ids` (read after `after`) nobody holds, and moves the
    /// cursor past them; returns them.
    pub(super) fn hold(&self, model: &str, ids: Vec<i64>) -> Vec<i64> {
        let mut held = self.lock();
        let progress = held.entry(model.to_string()).or_default();
        let ids: Vec<i64> = ids.into_iter().filter(|id| *id > progress.after && progress.held.insert(*id)).collect();
        progress.after = ids.iter().copied().max().unwrap_or(progress.after).max(progress.after);
        ids
    }

    /// Frees ids of a claim dropped unfinished: the cursor goes back before them.
    fn release(&self, model: &str, ids: impl IntoIterator<Item = i64>) {
        if let Some(progress) = self.lock().get_mut(model) {
            for id in ids {
                progress.held.remove(&id);
                progress.after = progress.after.min(id - 1);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Progress>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Items held for embedding under one model until completed or dropped.
pub(super) struct SqliteClaim {
    pub(super) store: SqliteGallery,
    pub(super) held: Arc<Held>,
    pub(super) model: String,
    pub(super) items: Vec<(i64, Vec<u8>)>,
    /// Released when the claim is dropped unfinished.
    pub(super) ids: Vec<i64>,
}

#[async_trait::async_trait]
impl MissingClaim for SqliteClaim {
    fn take_items(&mut self) -> Vec<(i64, Vec<u8>)> {
        std::mem::take(&mut self.items)
    }

    async fn complete(
        mut self: Box<Self>,
        vectors: Vec<(i64, Vec<f32>)>,
        failed: Vec<i64>,
    ) -> Result<(), GalleryError> {
        self.store.put_embeddings(self.model.clone(), vectors).await?;
        // The failed stay held: not claimed again by this process.
        self.ids.retain(|id| !failed.contains(id));
        Ok(())
    }
}

impl Drop for SqliteClaim {
    fn drop(&mut self) {
        self.held.release(&self.model, self.ids.drain(..));
    }
}

/// Up to `limit` items after `after` with no embedding under `model`, with
/// their bytes, stopping once `max_bytes` are read.
pub(super) fn unembedded(
    conn: &rusqlite::Connection,
    model: &str,
    after: i64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<(i64, Vec<u8>)>, GalleryError> {
    let mut stmt = conn.prepare(
        "SELECT id, image FROM items
         WHERE id > ?2 AND id NOT IN (SELECT item_id FROM embeddings WHERE model = ?1)
         ORDER BY id LIMIT ?3",
    )?;
    let mut rows = stmt.query(rusqlite::params![model, after, limit as i64])?;
    let (mut out, mut bytes) = (Vec::new(), 0);
    while let Some(row) = rows.next()? {
        let image: Vec<u8> = row.get(1)?;
        bytes += image.len();
        out.push((row.get(0)?, image));
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{content_hash, NewItem};
    use super::*;

    fn item(n: u8) -> NewItem {
        let image = bytes::Bytes::from(vec![n; 8]);
        NewItem {
            content_hash: content_hash(&image),
            image,
            media_type: "image/png".into(),
            width: 1,
            height: 1,
            label: None,
            metadata: serde_json::json!({}),
            embedding: vec![1.0, 0.0],
            unless_stored: false,
        }
    }

    async fn claim(store: &SqliteGallery, limit: usize) -> Option<Box<dyn MissingClaim>> {
        store.claim_missing("other".into(), limit, usize::MAX).await.unwrap()
    }

    fn ids(claim: &mut Box<dyn MissingClaim>) -> Vec<i64> {
        claim.take_items().into_iter().map(|(id, _)| id).collect()
    }

    #[tokio::test]
    async fn claims_hand_each_item_out_once_and_take_back_what_a_dropped_claim_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteGallery::open(dir.path()).unwrap();
        let added = store.insert((1..=5).map(item).collect(), "first".into(), None).await.unwrap();
        let all: Vec<i64> = added.iter().map(|i| i.id).collect();

        let mut first = claim(&store, 2).await.unwrap();
        let mut second = claim(&store, 2).await.unwrap();
        assert_eq!((ids(&mut first), ids(&mut second)), (all[..2].to_vec(), all[2..4].to_vec()));
        drop(first); // its items go back
        let mut again = claim(&store, 2).await.unwrap();
        assert_eq!(ids(&mut again), all[..2].to_vec());
        // One embedded, one found unembeddable: neither is handed out again.
        again.complete(vec![(all[0], vec![0.0, 1.0])], vec![all[1]]).await.unwrap();
        second.complete(vec![(all[2], vec![0.0, 1.0]), (all[3], vec![0.0, 1.0])], vec![]).await.unwrap();
        let mut last = claim(&store, 10).await.unwrap();
        assert_eq!(ids(&mut last), vec![all[4]]);
        last.complete(vec![(all[4], vec![0.0, 1.0])], vec![]).await.unwrap();
        assert!(claim(&store, 10).await.is_none(), "nothing is left to claim");
        assert_eq!(store.count_embedded("other".into()).await.unwrap(), 4);
    }
}
