//! Cluster mode's vector index: pgvector's HNSW over the shared `embeddings`
//! table, one partial index per model version over `embedding::vector(dim)`
//! with `vector_cosine_ops`. The store writes the vectors, in the item's own
//! transaction, so there is nothing to insert, delete, save or reconcile
//! here, and every replica searches the same vectors. A label filter runs in
//! SQL, with pgvector's iterative index scans so a rare label still fills `k`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use pgvector::Vector;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{DumpReport, Hit, IndexError, IndexProvider, IndexSource, VectorIndex};
use crate::vector::normalized;

/// pgvector's largest `hnsw.ef_search`.
const MAX_EF_SEARCH: usize = 1000;
/// The same search breadth as the embedded graph (`hnsw::MIN_EF_SEARCH`, 2k).
const MIN_EF_SEARCH: usize = 40;

/// Makes the index of each model version in the database.
pub struct PgIndexes {
    pub pool: Pool,
}

/// One model version's vectors in the database.
pub struct PgIndex {
    pool: Pool,
    /// The model key as a quoted SQL literal: a partial index is used only
    /// when the query's predicate is the same constant.
    model_literal: String,
    dim: usize,
    index_name: String,
    ready: OnceCell<()>,
    /// Vectors of this model, as last counted (for `/health`): other
    /// replicas add and delete too, so it is refreshed after every write here.
    count: AtomicUsize,
}

impl PgIndex {
    fn new(pool: Pool, model: &str, dim: usize) -> Self {
        let digest = hex::encode(Sha256::digest(model.as_bytes()));
        Self {
            pool,
            model_literal: format!("'{}'", model.replace('\'', "''")),
            dim,
            index_name: format!("embeddings_hnsw_{}", &digest[..16]),
            ready: OnceCell::new(),
            count: AtomicUsize::new(0),
        }
    }

    async fn client(&self) -> Result<Object, IndexError> {
        self.pool.get().await.map_err(|e| IndexError::Unavailable(format!("PostgreSQL: {e}")))
    }

    /// Builds the model's HNSW index once (concurrently, so writes go on;
    /// under an advisory lock, so replicas build it once), then counts.
    async fn ensure(&self) -> Result<(), IndexError> {
        self.ready
            .get_or_try_init(|| async {
                let client = self.client().await?;
                let lock = format!("SELECT pg_advisory_lock(hashtextextended('{}', 0))", self.index_name);
                client.batch_execute(&lock).await.map_err(db)?;
                let built = self.build(&client).await;
                let unlock = format!("SELECT pg_advisory_unlock(hashtextextended('{}', 0))", self.index_name);
                client.batch_execute(&unlock).await.map_err(db)?;
                built
            })
            .await?;
        self.refresh_count().await
    }

    async fn build(&self, client: &Object) -> Result<(), IndexError> {
        // A concurrent build that was interrupted leaves an invalid index behind: drop it and build again.
        let invalid = client
            .query_opt(
                "SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid
                 WHERE pg_class.relname = $1 AND NOT pg_index.indisvalid",
                &[&self.index_name],
            )
            .await
            .map_err(db)?;
        if invalid.is_some() {
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", self.index_name))
                .await
                .map_err(db)?;
        }
        let sql = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON embeddings
             USING hnsw ((embedding::vector({})) vector_cosine_ops) WHERE model = {}",
            self.index_name, self.dim, self.model_literal
        );
        client.batch_execute(&sql).await.map_err(db)
    }

    /// Counts again after a committed write; a database gone meanwhile
    /// does not turn the committed write into an error.
    async fn after_write(&self) {
        if let Err(error) = self.ensure().await {
            tracing::warn!(%error, "could not count the vectors after a write");
        }
    }

    async fn refresh_count(&self) -> Result<(), IndexError> {
        let sql = format!("SELECT COUNT(*) FROM embeddings WHERE model = {}", self.model_literal);
        let row = self.client().await?.query_one(&sql, &[]).await.map_err(db)?;
        self.count.store(row.get::<_, i64>(0) as usize, Ordering::Relaxed);
        Ok(())
    }

    /// The nearest `k` under an optional extra condition on `items i` / `embeddings e`.
    async fn nearest(
        &self,
        query: &[f32],
        k: usize,
        condition: &str,
        param: Option<&(dyn tokio_postgres::types::ToSql + Sync)>,
    ) -> Result<Vec<Hit>, IndexError> {
        self.ensure().await?;
        let query = normalized(query).map_err(|_| IndexError::NotFinite)?;
        if query.len() != self.dim {
            return Err(IndexError::Dimension { got: query.len(), expected: self.dim });
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let ef = (2 * k).clamp(MIN_EF_SEARCH, MAX_EF_SEARCH);
        tx.batch_execute(&format!("SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = relaxed_order"))
            .await
            .map_err(db)?;
        // Materialised, then sorted again: an iterative scan may return rows slightly out of order.
        let sql = format!(
            "WITH nearest AS MATERIALIZED (
                SELECT e.item_id, e.embedding::vector({dim}) <=> $1::vector({dim}) AS distance
                FROM embeddings e JOIN items i ON i.id = e.item_id
                WHERE e.model = {model} {condition}
                ORDER BY distance LIMIT $2)
             SELECT item_id, distance FROM nearest ORDER BY distance",
            dim = self.dim,
            model = self.model_literal,
        );
        let vector = Vector::from(query);
        let limit = k as i64;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&vector, &limit];
        params.extend(param);
        let rows = tx.query(&sql, &params).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(rows.iter().map(|r| Hit { id: r.get(0), score: 1.0 - r.get::<_, f64>(1) as f32 }).collect())
    }
}

fn db(e: tokio_postgres::Error) -> IndexError {
    IndexError::Unavailable(format!("PostgreSQL: {e}"))
}

#[async_trait::async_trait]
impl VectorIndex for PgIndex {
    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Not listed: the database is both store and index (`mirrors_store`).
    fn ids(&self) -> HashSet<i64> {
        HashSet::new()
    }

    fn mirrors_store(&self) -> bool {
        true
    }

    /// The store has written (committed) the vectors: this only refreshes the count.
    async fn insert(&self, _items: Vec<(i64, Vec<f32>)>) -> Result<(), IndexError> {
        self.after_write().await;
        Ok(())
    }

    /// The store's delete removed the vectors: this only refreshes the count.
    async fn delete(&self, _ids: Vec<i64>) -> Result<(), IndexError> {
        self.after_write().await;
        Ok(())
    }

    async fn search(&self, query: &[f32], k: usize, allowed: Option<Arc<Vec<i64>>>) -> Result<Vec<Hit>, IndexError> {
        match allowed {
            None => self.nearest(query, k, "", None).await,
            Some(ids) => {
                let ids: Vec<i64> = ids.to_vec();
                self.nearest(query, k, "AND e.item_id = ANY($3)", Some(&ids)).await
            }
        }
    }

    async fn search_label(&self, query: &[f32], k: usize, label: &str) -> Result<Option<Vec<Hit>>, IndexError> {
        let label = label.to_string();
        Ok(Some(self.nearest(query, k, "AND i.label = $3", Some(&label)).await?))
    }

    async fn save(&self) -> Result<Option<DumpReport>, IndexError> {
        Ok(None)
    }
}

#[async_trait::async_trait]
impl IndexProvider for PgIndexes {
    fn create(&self, model: &str, dim: usize, _capacity: usize) -> Arc<dyn VectorIndex> {
        Arc::new(PgIndex::new(self.pool.clone(), model, dim))
    }

    async fn open(&self, model: &str, dim: usize, _capacity: usize) -> (Arc<dyn VectorIndex>, IndexSource, String) {
        let index = PgIndex::new(self.pool.clone(), model, dim);
        let reason = match index.ensure().await {
            Ok(()) => "the database holds the vectors".to_string(),
            Err(error) => format!("the database index is not ready yet ({error}); it is built at first use"),
        };
        (Arc::new(index), IndexSource::Reloaded, reason)
    }
}
