//! Cluster mode's gallery store: PostgreSQL with pgvector, shared by every
//! replica. Every write is one transaction; when a call returns, the write is
//! committed and visible to every replica.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use pgvector::Vector;
use tokio_postgres::Row;

use super::idempotency::{self, IdempotencyKey, Remembered};
use super::pg_connect::{with_causes, PgTarget};
use super::pg_insert::{insert_row, ItemRow};
use super::scans::{self, ScanStart, StoredScan};

use super::pg_edit;
use super::{
    pg_schema, Edited, GalleryError, GalleryStore, Inserted, ItemEdit, ItemSummary, MissingClaim, NewItem, StoredImage,
};
use crate::clock::now_millis;

/// Connections per replica.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection before it is answered 503.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

pub(super) const SUMMARY_COLUMNS: &str = "id, label, metadata, media_type, width, height, content_hash, created_at";

/// Cheap-clone handle over a connection pool.
#[derive(Clone)]
pub struct PgGallery {
    pool: Pool,
    target: PgTarget,
}

impl PgGallery {
    /// Connects to `url` and migrates the database (under an advisory lock).
    pub async fn connect(url: &str) -> Result<Self, GalleryError> {
        let target = PgTarget::parse(url)?;
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = Manager::from_config(target.config.clone(), target.tls.clone(), recycling);
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_WAIT))
            .create_timeout(Some(CONNECT_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| GalleryError::Unavailable(e.to_string()))?;
        let store = Self { pool, target };
        let mut client = store.client().await?;
        pg_schema::migrate(&mut client).await?;
        drop(client);
        Ok(store)
    }

    /// The connection settings and TLS, for connections of their own (notifications, the lifecycle lock).
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The pool, for the vector index that reads the same tables.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(super) async fn client(&self) -> Result<Object, GalleryError> {
        self.pool.get().await.map_err(|e| GalleryError::Unavailable(format!("PostgreSQL: {}", with_causes(&e))))
    }
}

#[async_trait::async_trait]
impl GalleryStore for PgGallery {
    async fn insert(
        &self,
        items: Vec<NewItem>,
        model: String,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<Inserted>, GalleryError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Uploads of the same bytes wait for each other here, so `unless_stored` holds across
        // replicas; every hash at once and in order, so two uploads cannot deadlock.
        let mut hashes: Vec<&String> = items.iter().map(|i| &i.content_hash).collect();
        hashes.sort();
        hashes.dedup();
        for hash in hashes {
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[hash]).await?;
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let duplicate_of = oldest_with_hash(&tx, &item.content_hash).await?;
            let content_hash = item.content_hash.clone();
            if let (true, Some(existing)) = (item.unless_stored, duplicate_of) {
                out.push(Inserted { id: existing, content_hash, duplicate_of, stored: false });
                continue;
            }
            let row = ItemRow {
                content_hash: &item.content_hash,
                media_type: &item.media_type,
                label: item.label.as_deref(),
                metadata: &item.metadata,
                width: item.width,
                height: item.height,
                created_at: now_millis() as i64,
                image: &item.image,
            };
            let id = insert_row(&tx, None, row, vec![(model.clone(), item.embedding)]).await?;
            out.push(Inserted { id, content_hash, duplicate_of, stored: true });
        }
        if let Some(key) = key {
            if !idempotency::pg_remember(&tx, &key, &out).await? {
                return Err(GalleryError::KeyTaken(key.key)); // dropped: rolled back
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn remembered(&self, key: String) -> Result<Option<Remembered>, GalleryError> {
        idempotency::pg_remembered(&self.client().await?, &key).await
    }

    async fn keep_answer(&self, key: String, answer: serde_json::Value) -> Result<(), GalleryError> {
        idempotency::pg_keep_answer(&self.client().await?, &key, &answer).await
    }

    async fn edit(&self, id: i64, edit: ItemEdit, if_match: Option<String>) -> Result<Edited, GalleryError> {
        pg_edit::edit(&mut self.client().await?, id, &edit, if_match.as_deref()).await
    }

    async fn relabel(&self, ids: Vec<i64>, label: Option<String>) -> Result<Vec<i64>, GalleryError> {
        pg_edit::relabel(&mut self.client().await?, &ids, label.as_deref()).await
    }

    async fn delete(&self, id: i64) -> Result<bool, GalleryError> {
        Ok(self.client().await?.execute("DELETE FROM items WHERE id = $1", &[&id]).await? > 0)
    }

    async fn summaries(&self, ids: Vec<i64>) -> Result<HashMap<i64, ItemSummary>, GalleryError> {
        let sql = format!("SELECT {SUMMARY_COLUMNS} FROM items WHERE id = ANY($1)");
        let rows = self.client().await?.query(&sql, &[&ids]).await?;
        Ok(rows.iter().map(summary_from_row).map(|s| (s.id, s)).collect())
    }

    async fn list(&self, label: Option<String>, after: i64, limit: usize) -> Result<Vec<ItemSummary>, GalleryError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM items WHERE id > $1 AND ($2::text IS NULL OR label = $2)
             ORDER BY id LIMIT $3"
        );
        let rows = self.client().await?.query(&sql, &[&after, &label, &(limit as i64)]).await?;
        Ok(rows.iter().map(summary_from_row).collect())
    }

    async fn image(&self, id: i64) -> Result<Option<StoredImage>, GalleryError> {
        let row = self.client().await?.query_opt("SELECT media_type, image FROM items WHERE id = $1", &[&id]).await?;
        Ok(row.map(|r| StoredImage { media_type: r.get(0), bytes: r.get(1) }))
    }

    async fn images(&self, ids: Vec<i64>) -> Result<Vec<(i64, Vec<u8>)>, GalleryError> {
        let rows =
            self.client().await?.query("SELECT id, image FROM items WHERE id = ANY($1) ORDER BY id", &[&ids]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn count(&self) -> Result<u64, GalleryError> {
        let row = self.client().await?.query_one("SELECT COUNT(*) FROM items", &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn labelled(&self) -> Result<Vec<(i64, String)>, GalleryError> {
        let rows =
            self.client().await?.query("SELECT id, label FROM items WHERE label IS NOT NULL ORDER BY id", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn oldest_with_hashes(&self, hashes: Vec<String>) -> Result<Vec<Option<i64>>, GalleryError> {
        let client = self.client().await?;
        let mut out = Vec::with_capacity(hashes.len());
        for hash in &hashes {
            out.push(oldest_with_hash(&client, hash).await?);
        }
        Ok(out)
    }

    async fn embedded_ids(&self, model: String) -> Result<Vec<i64>, GalleryError> {
        let rows = self
            .client()
            .await?
            .query("SELECT item_id FROM embeddings WHERE model = $1 ORDER BY item_id", &[&model])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn count_embedded(&self, model: String) -> Result<u64, GalleryError> {
        let row = self.client().await?.query_one("SELECT COUNT(*) FROM embeddings WHERE model = $1", &[&model]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn forget_model(&self, model: String) -> Result<u64, GalleryError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let deleted = tx.execute("DELETE FROM embeddings WHERE model = $1", &[&model]).await?;
        tx.execute("DELETE FROM unembeddable WHERE model = $1", &[&model]).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn embeddings_of(&self, model: String, ids: Vec<i64>) -> Result<Vec<(i64, Vec<f32>)>, GalleryError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT item_id, embedding FROM embeddings WHERE model = $1 AND item_id = ANY($2) ORDER BY item_id",
                &[&model, &ids],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, Vector>(1).to_vec())).collect())
    }

    async fn put_embeddings(&self, model: String, vectors: Vec<(i64, Vec<f32>)>) -> Result<(), GalleryError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let statement = tx
            .prepare(
                // An item deleted since it was read is skipped, not a foreign-key failure.
                "INSERT INTO embeddings (model, item_id, embedding)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM items WHERE id = $2)
                 ON CONFLICT (model, item_id) DO UPDATE SET embedding = EXCLUDED.embedding",
            )
            .await?;
        for (id, v) in vectors {
            tx.execute(&statement, &[&model, &id, &Vector::from(v)]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_missing(
        &self,
        model: String,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<Box<dyn MissingClaim>>, GalleryError> {
        let client = self.client().await?;
        client.batch_execute("BEGIN").await?;
        // From here on, a claim dropped before it completes closes its connection, ending the transaction.
        let mut claim = PgClaim { client: Some(client), model: model.clone(), items: Vec::new() };
        let client = claim.client.as_ref().expect("just set");
        // The row locks are the claim: other replicas skip these rows, and a
        // replica that dies drops its connection and with it the locks.
        let rows = client
            .query(
                "SELECT id, octet_length(image) FROM items i
                 WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.model = $1 AND e.item_id = i.id)
                 AND NOT EXISTS (SELECT 1 FROM unembeddable u WHERE u.model = $1 AND u.item_id = i.id)
                 ORDER BY id LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
                &[&model, &(limit as i64)],
            )
            .await?;
        let (mut ids, mut bytes) = (Vec::new(), 0usize);
        for row in &rows {
            if !ids.is_empty() && bytes >= max_bytes {
                break; // the rest stay locked until this claim ends; the next claim takes them
            }
            ids.push(row.get::<_, i64>(0));
            bytes += row.get::<_, i32>(1) as usize;
        }
        if ids.is_empty() {
            client.batch_execute("COMMIT").await?;
            claim.release();
            return Ok(None);
        }
        let rows = client.query("SELECT id, image FROM items WHERE id = ANY($1) ORDER BY id", &[&ids]).await?;
        claim.items = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(Some(Box::new(claim)))
    }

    async fn ping(&self) -> Result<(), GalleryError> {
        self.client().await?.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    /// Nothing to tidy: PostgreSQL owns its files.
    async fn checkpoint(&self) -> Result<(), GalleryError> {
        Ok(())
    }

    async fn forget_expired_keys(&self) -> Result<u64, GalleryError> {
        idempotency::pg_forget_expired(&self.client().await?).await
    }

    async fn put_scan(&self, scan: StoredScan) -> Result<(), GalleryError> {
        scans::pg_put(&mut self.client().await?, &scan).await
    }

    async fn scan(&self, id: String) -> Result<Option<StoredScan>, GalleryError> {
        scans::pg_get(&self.client().await?, &id).await
    }

    async fn start_scan(&self, scan: StoredScan, fresh_ms: i64) -> Result<ScanStart, GalleryError> {
        scans::pg_start(&mut self.client().await?, &scan, fresh_ms).await
    }
}

/// Items claimed for embedding: a transaction holding their row locks.
struct PgClaim {
    /// `None` once the claim ended and the connection went back to the pool.
    client: Option<Object>,
    model: String,
    items: Vec<(i64, Vec<u8>)>,
}

impl PgClaim {
    /// The transaction ended: the connection can serve others again.
    fn release(&mut self) {
        self.client = None;
    }
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        // Ended without a commit (an error, a cancel): close the connection rather than
        // return it mid-transaction; PostgreSQL rolls back and frees the rows.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[async_trait::async_trait]
impl MissingClaim for PgClaim {
    fn take_items(&mut self) -> Vec<(i64, Vec<u8>)> {
        std::mem::take(&mut self.items)
    }

    async fn complete(
        mut self: Box<Self>,
        vectors: Vec<(i64, Vec<f32>)>,
        failed: Vec<i64>,
    ) -> Result<(), GalleryError> {
        let client = self.client.as_ref().expect("a claim completes once");
        // Another replica may have embedded an item between this claim's snapshot and its lock.
        let statement = client
            .prepare(
                "INSERT INTO embeddings (model, item_id, embedding) VALUES ($1, $2, $3)
                 ON CONFLICT (model, item_id) DO UPDATE SET embedding = EXCLUDED.embedding",
            )
            .await?;
        for (id, v) in vectors {
            client.execute(&statement, &[&self.model, &id, &Vector::from(v)]).await?;
        }
        client
            .execute(
                "INSERT INTO unembeddable (model, item_id) SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING",
                &[&self.model, &failed],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        self.release();
        Ok(())
    }
}

async fn oldest_with_hash(client: &impl GenericClient, hash: &str) -> Result<Option<i64>, GalleryError> {
    let row = client.query_one("SELECT MIN(id) FROM items WHERE content_hash = $1", &[&hash]).await?;
    Ok(row.get(0))
}

pub(super) fn summary_from_row(r: &Row) -> ItemSummary {
    ItemSummary {
        id: r.get(0),
        label: r.get(1),
        metadata: r.try_get(2).unwrap_or_else(|error| unreadable_metadata(r, &error)),
        media_type: r.get(3),
        width: r.get::<_, i32>(4) as u32,
        height: r.get::<_, i32>(5) as u32,
        content_hash: r.get(6),
        created_at: r.get(7),
    }
}

/// Metadata PostgreSQL holds that serde_json cannot read back: logged with
/// its text, answered as `{}` rather than failing every read of the item.
fn unreadable_metadata(r: &Row, error: &tokio_postgres::Error) -> serde_json::Value {
    let raw = r.try_get::<_, tokio_postgres::types::Json<Box<serde_json::value::RawValue>>>(2);
    let raw: String = raw.map(|json| json.0.get().chars().take(400).collect()).unwrap_or_default();
    let id: i64 = r.get(0);
    tracing::error!(id, error = %with_causes(error), raw, "stored metadata cannot be read back; answering {{}}");
    serde_json::json!({})
}
