//! The durable gallery: every image's original bytes, label, metadata and its
//! embedding per model version. It is the source of truth; a vector index is
//! a view rebuilt from it. `GalleryStore` is what the catalog needs of a
//! store; `SqliteGallery` is embedded mode's, `PgGallery` cluster mode's
//! (PostgreSQL with pgvector, shared by every replica).

mod edit;
mod idempotency;
pub mod pg_connect;
mod pg_edit;
mod pg_insert;
mod pg_schema;
mod postgres;
mod scans;
mod schema;
mod sqlite;
mod sqlite_claim;
mod sqlite_edit;

use std::collections::HashMap;

use crate::error_kind::ErrorKind;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use edit::{Edited, ItemEdit, MetadataEdit};
pub use idempotency::{IdempotencyKey, Remembered};
pub use postgres::PgGallery;
pub use scans::{ScanStart, StoredScan, SCANS_KEPT};
pub use sqlite::SqliteGallery;
pub(crate) use sqlite::STORE_FILE;

#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store schema: {0}")]
    Schema(String),
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached now (down, restarting, no free
    /// connection): worth a retry.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Another write under the same idempotency key committed first.
    #[error("idempotency key `{0}` was taken by another write")]
    KeyTaken(String),
}

impl GalleryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::KeyTaken(_) => ErrorKind::Conflict,
            Self::Sqlite(_) | Self::Schema(_) | Self::Io(_) | Self::Corrupt(_) | Self::Postgres(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<tokio_postgres::Error> for GalleryError {
    fn from(e: tokio_postgres::Error) -> Self {
        if postgres_unavailable(&e) {
            Self::Unavailable(e.to_string())
        } else {
            Self::Postgres(e)
        }
    }
}

/// Whether a PostgreSQL error is worth a retry (answered 503): the connection
/// is gone or failed (I/O), or the server says so: a connection exception
/// (08), insufficient resources such as too many connections (53), a
/// shutdown or restart (57P), a deadlock or serialization failure (40).
/// Anything else (a bad statement, a type mismatch) is our bug: 500.
pub fn postgres_unavailable(e: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let sqlstate = e.code().map(|c| c.code()).unwrap_or_default();
    e.is_closed() || io || ["08", "53", "57P", "40"].iter().any(|class| sqlstate.starts_with(class))
}

/// An image to add, already embedded.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub image: bytes::Bytes,
    /// `content_hash(&image)`, computed once by the caller.
    pub content_hash: String,
    pub media_type: String,
    pub width: u32,
    pub height: u32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
    pub embedding: Vec<f32>,
    /// Not stored when a byte-identical item exists when the insert commits
    /// (checked inside its transaction, so two concurrent uploads of new bytes
    /// store them once).
    pub unless_stored: bool,
}

/// What an insert reports for each item.
#[derive(Debug, Clone, Serialize)]
pub struct Inserted {
    /// The new item, or the existing one when `stored` is false.
    pub id: i64,
    pub content_hash: String,
    /// An older item with byte-identical content, if any.
    pub duplicate_of: Option<i64>,
    /// False when `unless_stored` found the bytes stored already.
    pub stored: bool,
}

/// Hex SHA-256 of an image's bytes: how exact duplicates are recognised.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An item without its image bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemSummary {
    pub id: i64,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
    pub media_type: String,
    pub width: u32,
    pub height: u32,
    pub content_hash: String,
    pub created_at: i64,
}

/// One item with everything stored about it, for moving a gallery from one
/// store to another (`lookalike migrate`).
#[derive(Debug, Clone)]
pub struct ExportedItem {
    pub summary: ItemSummary,
    pub image: Vec<u8>,
    /// `(model key, vector)` for every model that embedded it.
    pub embeddings: Vec<(String, Vec<f32>)>,
}

/// An item's original bytes, as uploaded.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// Items one process holds for embedding under a model, until it completes
/// the claim or drops it (then, or when the process dies, another can claim them).
#[async_trait::async_trait]
pub trait MissingClaim: Send {
    /// The claimed items with their original bytes (once).
    fn take_items(&mut self) -> Vec<(i64, Vec<u8>)>;

    /// Stores the vectors and notes the items that `failed` to preprocess as
    /// unembeddable by the model, in one transaction, and frees the claim.
    async fn complete(self: Box<Self>, vectors: Vec<(i64, Vec<f32>)>, failed: Vec<i64>) -> Result<(), GalleryError>;
}

/// What the catalog needs of a durable store. Embeddings are kept per model
/// key (`name@version`). Every write is one transaction: when it returns,
/// it is durable. Ids are assigned by the store, ascending.
#[async_trait::async_trait]
pub trait GalleryStore: Send + Sync + 'static {
    /// Adds items with their embeddings under `model`, all or none; with
    /// `key`, remembers the write under it in the same transaction (`KeyTaken`
    /// when another write has the key, and then nothing is stored).
    async fn insert(
        &self,
        items: Vec<NewItem>,
        model: String,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<Inserted>, GalleryError>;

    /// The write remembered under an idempotency key, within its day.
    async fn remembered(&self, key: String) -> Result<Option<Remembered>, GalleryError>;

    /// Keeps the answer a write under `key` got, for its retries.
    async fn keep_answer(&self, key: String, answer: serde_json::Value) -> Result<(), GalleryError>;

    /// Applies `edit` to an item in one transaction, if `if_match` (an
    /// `If-Match` header) admits the item's current `ETag`; any state without one.
    async fn edit(&self, id: i64, edit: ItemEdit, if_match: Option<String>) -> Result<Edited, GalleryError>;

    /// Sets (or clears) the label of every id in one transaction, all or
    /// none: returns the ids that do not exist, and then nothing changed.
    async fn relabel(&self, ids: Vec<i64>, label: Option<String>) -> Result<Vec<i64>, GalleryError>;

    /// Deletes an item and its embeddings; `false` if there was none.
    async fn delete(&self, id: i64) -> Result<bool, GalleryError>;

    /// Summaries of the given ids that exist.
    async fn summaries(&self, ids: Vec<i64>) -> Result<HashMap<i64, ItemSummary>, GalleryError>;

    /// One item's summary.
    async fn summary(&self, id: i64) -> Result<Option<ItemSummary>, GalleryError> {
        Ok(self.summaries(vec![id]).await?.remove(&id))
    }

    /// A page of items in id order, after `after` (a cursor), optionally of one label.
    async fn list(&self, label: Option<String>, after: i64, limit: usize) -> Result<Vec<ItemSummary>, GalleryError>;

    /// The original bytes and media type of an item.
    async fn image(&self, id: i64) -> Result<Option<StoredImage>, GalleryError>;

    /// The original bytes of the given items (those that still exist).
    async fn images(&self, ids: Vec<i64>) -> Result<Vec<(i64, Vec<u8>)>, GalleryError>;

    async fn count(&self) -> Result<u64, GalleryError>;

    /// Every labelled item as `(id, label)`, ascending by id: the fine-tuning data.
    async fn labelled(&self) -> Result<Vec<(i64, String)>, GalleryError>;

    /// For each hash, the oldest item with those exact bytes, if any.
    async fn oldest_with_hashes(&self, hashes: Vec<String>) -> Result<Vec<Option<i64>>, GalleryError>;

    /// Ids of the items that have an embedding under `model`.
    async fn embedded_ids(&self, model: String) -> Result<Vec<i64>, GalleryError>;

    /// How many items have an embedding under `model`.
    async fn count_embedded(&self, model: String) -> Result<u64, GalleryError>;

    /// Deletes every embedding under `model` (a deleted model version), and
    /// what the store noted about it; returns how many embeddings went.
    async fn forget_model(&self, model: String) -> Result<u64, GalleryError>;

    /// The embeddings under `model` of the given ids (those that have one).
    async fn embeddings_of(&self, model: String, ids: Vec<i64>) -> Result<Vec<(i64, Vec<f32>)>, GalleryError>;

    /// Stores embeddings computed later (for another model), in one
    /// transaction; ids of items deleted meanwhile are skipped.
    async fn put_embeddings(&self, model: String, vectors: Vec<(i64, Vec<f32>)>) -> Result<(), GalleryError>;

    /// Claims up to `limit` items that lack an embedding under `model` (and
    /// were not found unembeddable by it), among those no other claim holds
    /// (in cluster mode, no other replica); fewer once their bytes reach
    /// `max_bytes` (at least one). `None` when nothing is left to claim.
    async fn claim_missing(
        &self,
        model: String,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<Box<dyn MissingClaim>>, GalleryError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), GalleryError>;

    /// Forgets idempotency keys past their day; returns how many.
    async fn forget_expired_keys(&self) -> Result<u64, GalleryError>;

    /// Writes a duplicate scan's record (`curation::scans`), and forgets all
    /// but the newest `SCANS_KEPT`.
    async fn put_scan(&self, scan: StoredScan) -> Result<(), GalleryError>;

    /// Writes a new scan's record, unless a scan written to within `fresh_ms`
    /// (by the store's clock) is running: one scan at a time, across replicas.
    async fn start_scan(&self, scan: StoredScan, fresh_ms: i64) -> Result<ScanStart, GalleryError>;

    async fn scan(&self, id: String) -> Result<Option<StoredScan>, GalleryError>;

    /// Brings the store to a tidy state at shutdown (SQLite folds its log in).
    async fn checkpoint(&self) -> Result<(), GalleryError>;
}
