//! Cluster mode's vector index: pgvector's HNSW over the shared `embeddings`
//! table, one partial index per model version over `embedding::vector(dim)`
//! with `vector_cosine_ops`. The store writes the vectors, in the item's own
//! transaction, so there is nothing to insert, delete, save or reconcile
//! here, and every replica searches the same vectors. A label filter runs in
//! SQL, with pgvector's iterative index scans: the walk goes on past the first
//! `ef_search` candidates until `k` rows of the label are found or
//! `hnsw.max_scan_tuples` (20,000 by default) were visited; when it comes back
//! short, the label's rows are searched exactly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use futures::future::{BoxFuture, FutureExt, Shared};
use pgvector::Vector;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{DumpReport, Hit, IndexError, IndexProvider, IndexSource, VectorIndex};
use crate::gallery::pg_connect::with_causes;
use crate::gallery::postgres_unavailable;
use crate::vector::normalized;

/// How often a replica counts a model's vectors again after writes.
const COUNT_INTERVAL: Duration = Duration::from_secs(1);
/// How often a replica asks again for the lock of an index another one builds.
const LOCK_POLL: Duration = Duration::from_millis(200);
/// How long a replica waits for another one's build before it answers
/// `503` (the next request waits again): a build of a million vectors takes
/// minutes, a lock held much longer is a stuck session.
const LOCK_WAIT: Duration = Duration::from_secs(15 * 60);
/// pgvector's largest `hnsw.ef_search`.
const MAX_EF_SEARCH: usize = 1000;
/// The smallest `hnsw.ef_search` (2k above it). pgvector's default, 40, gave
/// recall@10 0.986 at 100k vectors; 64 gave 0.995 for 13 % fewer queries/s,
/// closer to the embedded graph's 0.999 (`make bench-cluster`).
const MIN_EF_SEARCH: usize = 64;

/// A build task's outcome, awaited by every request that needs the index.
type Build = Shared<BoxFuture<'static, Result<(), IndexError>>>;

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
    /// The build under way, awaited by every caller of `ensure`: one task
    /// polls for the lock, however many requests wait or give up.
    building: Mutex<Option<Build>>,
    /// Vectors of this model, as last counted (for `/health`): other
    /// replicas add and delete too, so it is refreshed after writes here.
    count: AtomicUsize,
    counted: Mutex<Option<Instant>>,
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
            building: Mutex::new(None),
            count: AtomicUsize::new(0),
            counted: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Object, IndexError> {
        connection(&self.pool).await
    }

    /// Builds the model's HNSW index once, then counts. The build runs on a
    /// task of its own, so a search that times out or whose client leaves
    /// cannot cut it short holding the advisory lock, and a later request
    /// awaits the same task instead of starting another.
    async fn ensure(&self) -> Result<(), IndexError> {
        self.ready
            .get_or_try_init(|| async {
                let build = self.build_task();
                let built = build.await;
                if built.is_err() {
                    // Tried again by the next request, with a task of its own.
                    self.building.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                built?;
                self.refresh_count().await
            })
            .await?;
        Ok(())
    }

    /// The build task under way, or a new one.
    fn build_task(&self) -> Build {
        let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let build = building.get_or_insert_with(|| {
            let build = IndexBuild {
                pool: self.pool.clone(),
                name: self.index_name.clone(),
                dim: self.dim,
                model_literal: self.model_literal.clone(),
            };
            let task = tokio::spawn(build.run());
            let joined = async move { task.await.map_err(|e| IndexError::Task(e.to_string()))? };
            joined.boxed().shared()
        });
        build.clone()
    }

    /// Counts again after a committed write, at most once a second; a
    /// database gone meanwhile does not turn the committed write into an error.
    async fn after_write(&self) {
        let due = {
            let mut last = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= COUNT_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            return;
        }
        if let Err(error) = self.prepare().await {
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
        scan: Scan,
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
        // The HNSW index serves only its own expression: the exact scan writes the distance another way.
        let column = match scan {
            Scan::Graph => format!("e.embedding::vector({})", self.dim),
            Scan::Exact => "e.embedding".to_string(),
        };
        let sql = format!(
            "WITH nearest AS MATERIALIZED (
                SELECT e.item_id, {column} <=> $1::vector({dim}) AS distance
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

/// How a search finds its nearest items.
#[derive(Clone, Copy)]
enum Scan {
    /// The HNSW index: approximate, fast.
    Graph,
    /// Every row the condition admits: exact, for a label the graph walk gave up on.
    Exact,
}

/// One model's HNSW index, built concurrently (writes go on) by one replica
/// at a time: replicas wait for the advisory lock between short polls, never
/// inside a statement, since a concurrent build waits for every open snapshot.
struct IndexBuild {
    pool: Pool,
    name: String,
    dim: usize,
    model_literal: String,
}

impl IndexBuild {
    async fn run(self) -> Result<(), IndexError> {
        let client = connection(&self.pool).await?;
        let lock = format!("hashtextextended('{}', 0)", self.name);
        let waited = Instant::now();
        loop {
            let row = client.query_one(&format!("SELECT pg_try_advisory_lock({lock})"), &[]).await.map_err(db)?;
            if row.get::<_, bool>(0) {
                break;
            }
            if waited.elapsed() >= LOCK_WAIT {
                return Err(IndexError::Unavailable(format!(
                    "another replica has been building the index {} for over {} s",
                    self.name,
                    LOCK_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
        let built = self.build(&client).await;
        client.batch_execute(&format!("SELECT pg_advisory_unlock({lock})")).await.map_err(db)?;
        built
    }

    async fn build(&self, client: &Object) -> Result<(), IndexError> {
        // A concurrent build that was interrupted leaves an invalid index behind: drop it and build again.
        let invalid = client
            .query_opt(
                "SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid
                 WHERE pg_class.relname = $1 AND NOT pg_index.indisvalid",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        if invalid.is_some() {
            client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", self.name)).await.map_err(db)?;
        }
        let sql = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON embeddings
             USING hnsw ((embedding::vector({})) vector_cosine_ops) WHERE model = {}",
            self.name, self.dim, self.model_literal
        );
        client.batch_execute(&sql).await.map_err(db)
    }
}

/// A connection from the pool; none within the pool's wait is worth a retry.
async fn connection(pool: &Pool) -> Result<Object, IndexError> {
    pool.get().await.map_err(|e| IndexError::Unavailable(format!("PostgreSQL: {}", with_causes(&e))))
}

/// A PostgreSQL error as the index reports it: worth a retry, or our bug.
fn db(e: tokio_postgres::Error) -> IndexError {
    if postgres_unavailable(&e) {
        IndexError::Unavailable(format!("PostgreSQL: {}", with_causes(&e)))
    } else {
        IndexError::Database(e.to_string())
    }
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

    /// Builds the model's HNSW index if no replica has, and counts.
    async fn prepare(&self) -> Result<(), IndexError> {
        self.ensure().await?;
        self.refresh_count().await
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
            None => self.nearest(query, k, Scan::Graph, "", None).await,
            Some(ids) => {
                let ids: Vec<i64> = ids.to_vec();
                self.nearest(query, k, Scan::Graph, "AND e.item_id = ANY($3)", Some(&ids)).await
            }
        }
    }

    async fn search_label(&self, query: &[f32], k: usize, label: &str) -> Result<Option<Vec<Hit>>, IndexError> {
        let label = label.to_string();
        let hits = self.nearest(query, k, Scan::Graph, "AND i.label = $3", Some(&label)).await?;
        if hits.len() >= k {
            return Ok(Some(hits));
        }
        // Fewer than k: the label is that small, or the iterative scan stopped at
        // `hnsw.max_scan_tuples` before it found k. The label's own rows, exactly.
        Ok(Some(self.nearest(query, k, Scan::Exact, "AND i.label = $3", Some(&label)).await?))
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

    async fn forget(&self, model: &str) -> Result<(), IndexError> {
        let name = PgIndex::new(self.pool.clone(), model, 0).index_name;
        let client = connection(&self.pool).await?;
        client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}")).await.map_err(db)
    }
}
