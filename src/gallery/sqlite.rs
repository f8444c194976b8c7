//! The embedded mode's gallery store: SQLite in WAL mode, one file in the
//! data directory, every write one transaction with `synchronous = FULL`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::idempotency::{self, IdempotencyKey, Remembered};
use super::scans::{self, ScanStart, StoredScan};
use super::sqlite_claim::{self, Held, SqliteClaim};
use super::sqlite_edit;
use super::{
    schema, Edited, ExportedItem, GalleryError, GalleryStore, Inserted, ItemEdit, ItemSummary, MissingClaim, NewItem,
    StoredImage,
};
use crate::clock::now_millis;

pub(crate) const STORE_FILE: &str = "gallery.sqlite3";

/// The columns `summary_from_row` reads, in its order.
pub(super) const SUMMARY_COLUMNS: &str = "id, label, metadata, media_type, width, height, content_hash, created_at";

/// Cheap-clone handle. A std `Mutex` is right here: every call is short, runs
/// on a blocking thread and never holds the lock across an `.await`.
#[derive(Clone)]
pub struct SqliteGallery {
    conn: Arc<Mutex<Connection>>,
    /// Items held for re-embedding, per model.
    held: Arc<Held>,
}

impl SqliteGallery {
    /// Opens (creating if needed) the store in `data_dir` and migrates it.
    pub fn open(data_dir: &Path) -> Result<Self, GalleryError> {
        std::fs::create_dir_all(data_dir)?;
        let mut conn = Connection::open(data_dir.join(STORE_FILE))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed insert survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), held: Arc::default() })
    }

    /// At the serving process's start: duplicate scans its predecessor left
    /// running read failed at once (one process serves an embedded store).
    pub async fn abandon_running_scans(&self) -> Result<usize, GalleryError> {
        self.with_conn(|conn| scans::sqlite_abandon_running(conn)).await
    }

    /// Opens the store in `data_dir`, which must exist already.
    pub fn open_existing(data_dir: &Path) -> Result<Self, GalleryError> {
        let file = data_dir.join(STORE_FILE);
        if !file.is_file() {
            let message = format!("no gallery at {}", file.display());
            return Err(GalleryError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, message)));
        }
        Self::open(data_dir)
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, GalleryError> + Send + 'static,
    ) -> Result<T, GalleryError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| GalleryError::Corrupt("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| GalleryError::Corrupt(format!("store task failed: {e}")))?
    }
}

impl SqliteGallery {
    /// Up to `limit` whole items after id `after`, ascending by id (`lookalike migrate`).
    pub async fn export_page(&self, after: i64, limit: usize) -> Result<Vec<ExportedItem>, GalleryError> {
        self.with_conn(move |conn| {
            let mut items = conn.prepare_cached(
                "SELECT id, label, metadata, media_type, width, height, content_hash, created_at, image
                 FROM items WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut vectors = conn.prepare_cached("SELECT model, vector FROM embeddings WHERE item_id = ?1")?;
            let rows = items.query_map(params![after, limit as i64], |r| Ok((summary_from_row(r)?, r.get(8)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (summary, image): (ItemSummary, Vec<u8>) = row?;
                let stored = vectors.query_map([summary.id], |r| Ok((r.get(0)?, r.get::<_, Vec<u8>>(1)?)))?;
                let mut embeddings = Vec::new();
                for pair in stored {
                    let (model, blob): (String, Vec<u8>) = pair?;
                    embeddings.push((model, decode_vector(&blob)?));
                }
                out.push(ExportedItem { summary, image, embeddings });
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait::async_trait]
impl GalleryStore for SqliteGallery {
    /// Adds items with their embeddings under `model` in one transaction:
    /// when this returns, all of them are on disk, or none is.
    async fn insert(
        &self,
        items: Vec<NewItem>,
        model: String,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<Inserted>, GalleryError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(insert_one(&tx, item, &model)?);
            }
            if let Some(key) = key {
                if !idempotency::sqlite_remember(&tx, &key, &out)? {
                    return Err(GalleryError::KeyTaken(key.key)); // dropped: rolled back
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn remembered(&self, key: String) -> Result<Option<Remembered>, GalleryError> {
        self.with_conn(move |conn| idempotency::sqlite_remembered(conn, &key)).await
    }

    async fn keep_answer(&self, key: String, answer: serde_json::Value) -> Result<(), GalleryError> {
        self.with_conn(move |conn| idempotency::sqlite_keep_answer(conn, &key, &answer)).await
    }

    /// Summaries of the given ids that exist.
    async fn summaries(&self, ids: Vec<i64>) -> Result<HashMap<i64, ItemSummary>, GalleryError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(&format!("SELECT {SUMMARY_COLUMNS} FROM items WHERE id = ?1"))?;
            let mut out = HashMap::with_capacity(ids.len());
            for id in ids {
                if let Some(item) = stmt.query_row([id], summary_from_row).optional()? {
                    out.insert(id, item);
                }
            }
            Ok(out)
        })
        .await
    }

    /// A page of items in id order, after `after` (a cursor), optionally of one label.
    async fn list(&self, label: Option<String>, after: i64, limit: usize) -> Result<Vec<ItemSummary>, GalleryError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM items WHERE id > ?1 AND (?2 IS NULL OR label = ?2) ORDER BY id LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![after, label, limit as i64], summary_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The original bytes and media type of an item.
    async fn image(&self, id: i64) -> Result<Option<StoredImage>, GalleryError> {
        self.with_conn(move |conn| {
            let row = conn
                .query_row("SELECT media_type, image FROM items WHERE id = ?1", [id], |r| {
                    Ok(StoredImage { media_type: r.get(0)?, bytes: r.get(1)? })
                })
                .optional()?;
            Ok(row)
        })
        .await
    }

    /// A trivial query: whether the store answers.
    async fn ping(&self) -> Result<(), GalleryError> {
        self.with_conn(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    /// Folds the write-ahead log into the database file, so a stopped service
    /// leaves one self-contained file; later calls still work (the connection stays open).
    async fn checkpoint(&self) -> Result<(), GalleryError> {
        self.with_conn(|conn| Ok(conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?)).await
    }

    async fn forget_expired_keys(&self) -> Result<u64, GalleryError> {
        self.with_conn(|conn| idempotency::sqlite_forget_expired(conn)).await
    }

    async fn put_scan(&self, scan: StoredScan) -> Result<(), GalleryError> {
        self.with_conn(move |conn| scans::sqlite_put(conn, &scan)).await
    }

    async fn scan(&self, id: String) -> Result<Option<StoredScan>, GalleryError> {
        self.with_conn(move |conn| scans::sqlite_get(conn, &id)).await
    }

    async fn start_scan(&self, scan: StoredScan, fresh_ms: i64) -> Result<ScanStart, GalleryError> {
        self.with_conn(move |conn| scans::sqlite_start(conn, &scan, fresh_ms)).await
    }

    async fn edit(&self, id: i64, edit: ItemEdit, if_match: Option<String>) -> Result<Edited, GalleryError> {
        self.with_conn(move |conn| sqlite_edit::edit(conn, id, &edit, if_match.as_deref())).await
    }

    async fn relabel(&self, ids: Vec<i64>, label: Option<String>) -> Result<Vec<i64>, GalleryError> {
        self.with_conn(move |conn| sqlite_edit::relabel(conn, &ids, label.as_deref())).await
    }

    /// Deletes an item and its embeddings; `false` if there was none.
    async fn delete(&self, id: i64) -> Result<bool, GalleryError> {
        self.with_conn(move |conn| Ok(conn.execute("DELETE FROM items WHERE id = ?1", [id])? > 0)).await
    }

    /// For each hash, the oldest item with those exact bytes, if any.
    async fn oldest_with_hashes(&self, hashes: Vec<String>) -> Result<Vec<Option<i64>>, GalleryError> {
        self.with_conn(move |conn| hashes.iter().map(|hash| oldest_with_hash(conn, hash)).collect()).await
    }

    /// Ids of the items that have an embedding under `model`.
    async fn embedded_ids(&self, model: String) -> Result<Vec<i64>, GalleryError> {
        self.with_conn(move |conn| ids(conn, "SELECT item_id FROM embeddings WHERE model = ?1 ORDER BY item_id", model))
            .await
    }

    /// The embeddings under `model` of the given ids (those that have one).
    async fn embeddings_of(&self, model: String, ids: Vec<i64>) -> Result<Vec<(i64, Vec<f32>)>, GalleryError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT vector FROM embeddings WHERE model = ?1 AND item_id = ?2")?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(blob) = stmt.query_row(params![model, id], |r| r.get::<_, Vec<u8>>(0)).optional()? {
                    out.push((id, decode_vector(&blob)?));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Every labelled item as `(id, label)`, ascending by id: the fine-tuning data.
    async fn labelled(&self) -> Result<Vec<(i64, String)>, GalleryError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT id, label FROM items WHERE label IS NOT NULL ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The original bytes of the given items (those that still exist).
    async fn images(&self, ids: Vec<i64>) -> Result<Vec<(i64, Vec<u8>)>, GalleryError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT image FROM items WHERE id = ?1")?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(image) = stmt.query_row([id], |r| r.get::<_, Vec<u8>>(0)).optional()? {
                    out.push((id, image));
                }
            }
            Ok(out)
        })
        .await
    }

    /// How many items have an embedding under `model`.
    async fn count_embedded(&self, model: String) -> Result<u64, GalleryError> {
        self.with_conn(move |conn| {
            Ok(conn.query_row("SELECT COUNT(*) FROM embeddings WHERE model = ?1", [model], |r| r.get(0))?)
        })
        .await
    }

    async fn forget_model(&self, model: String) -> Result<u64, GalleryError> {
        self.with_conn(move |conn| Ok(conn.execute("DELETE FROM embeddings WHERE model = ?1", [model])? as u64)).await
    }

    async fn count(&self) -> Result<u64, GalleryError> {
        self.with_conn(|conn| Ok(conn.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))?)).await
    }

    /// Claims up to `limit` items that lack an embedding under `model`, after
    /// those earlier claims of this process took (`Held`).
    async fn claim_missing(
        &self,
        model: String,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<Box<dyn MissingClaim>>, GalleryError> {
        let (key, after) = (model.clone(), self.held.after(&model));
        let items = self.with_conn(move |conn| sqlite_claim::unembedded(conn, &key, after, limit, max_bytes)).await?;
        let ids = self.held.hold(&model, items.iter().map(|(id, _)| *id).collect());
        let items: Vec<(i64, Vec<u8>)> = items.into_iter().filter(|(id, _)| ids.contains(id)).collect();
        if items.is_empty() {
            return Ok(None);
        }
        let claim = SqliteClaim { store: self.clone(), held: self.held.clone(), model, items, ids };
        Ok(Some(Box::new(claim)))
    }

    async fn put_embeddings(&self, model: String, vectors: Vec<(i64, Vec<f32>)>) -> Result<(), GalleryError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            for (id, v) in vectors {
                // An item deleted since it was read is skipped, not a foreign-key failure.
                tx.execute(
                    "INSERT OR REPLACE INTO embeddings (item_id, model, vector)
                     SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM items WHERE id = ?1)",
                    params![id, model, encode_vector(&v)],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn insert_one(tx: &rusqlite::Transaction<'_>, item: NewItem, model: &str) -> Result<Inserted, GalleryError> {
    let content_hash = item.content_hash;
    let duplicate_of = oldest_with_hash(tx, &content_hash)?;
    if let (true, Some(existing)) = (item.unless_stored, duplicate_of) {
        return Ok(Inserted { id: existing, content_hash, duplicate_of, stored: false });
    }
    tx.execute(
        "INSERT INTO items (content_hash, media_type, label, metadata, width, height, created_at, image)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            content_hash,
            item.media_type,
            item.label,
            item.metadata.to_string(),
            item.width,
            item.height,
            now_millis() as i64,
            &item.image[..]
        ],
    )?;
    let id = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO embeddings (item_id, model, vector) VALUES (?1, ?2, ?3)",
        params![id, model, encode_vector(&item.embedding)],
    )?;
    Ok(Inserted { id, content_hash, duplicate_of, stored: true })
}

fn oldest_with_hash(conn: &Connection, content_hash: &str) -> Result<Option<i64>, GalleryError> {
    let mut stmt = conn.prepare_cached("SELECT MIN(id) FROM items WHERE content_hash = ?1")?;
    Ok(stmt.query_row([content_hash], |r| r.get(0)).optional()?.flatten())
}

/// Runs a query with one parameter whose rows are single ids.
fn ids(conn: &Connection, sql: &str, param: String) -> Result<Vec<i64>, GalleryError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([param], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn summary_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemSummary> {
    let metadata: String = r.get(2)?;
    Ok(ItemSummary {
        id: r.get(0)?,
        label: r.get(1)?,
        // Written by us from a serde_json::Value, so it parses; fall back to null if not.
        metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
        media_type: r.get(3)?,
        width: r.get(4)?,
        height: r.get(5)?,
        content_hash: r.get(6)?,
        created_at: r.get(7)?,
    })
}

fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode_vector(blob: &[u8]) -> Result<Vec<f32>, GalleryError> {
    if !blob.len().is_multiple_of(4) {
        return Err(GalleryError::Corrupt(format!("embedding blob of {} bytes", blob.len())));
    }
    Ok(blob.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}
