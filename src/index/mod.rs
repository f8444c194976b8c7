//! Nearest-neighbour search over gallery embeddings. `VectorIndex` is what
//! the catalog needs of an index; `IndexProvider` makes one per model
//! version. Embedded mode's implementation (`local`) is an in-memory HNSW
//! graph (`hnsw`) dumped to the data folder (`persist`); cluster mode's
//! (`pgvector`) is pgvector's HNSW in the shared database.

mod hnsw;
mod local;
mod persist;
mod pgvector;

use std::collections::HashSet;
use std::sync::Arc;

use crate::error_kind::ErrorKind;
use serde::Serialize;

pub use hnsw::HnswIndex;
pub use local::{LocalIndex, LocalIndexes};
pub use persist::{DumpReport, Loaded};
pub use pgvector::{PgIndex, PgIndexes};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index holds {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("vector is zero or not finite")]
    NotFinite,
    #[error("index dump: {0}")]
    Dump(String),
    #[error("index task failed: {0}")]
    Task(String),
    /// The database that holds the index cannot be reached now.
    #[error("the vector index is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement: a bug or an unsupported setup (pgvector before 0.8).
    #[error("vector index query: {0}")]
    Database(String),
}

impl IndexError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable(_) => ErrorKind::Unavailable,
            // Embeddings come from our own encoder: a bad one is our bug, not the client's.
            Self::Dimension { .. } | Self::NotFinite | Self::Dump(_) | Self::Task(_) | Self::Database(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// A gallery id and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: i64,
    pub score: f32,
}

/// How an index was made ready: read back from where it was saved, or
/// built empty for the caller to fill from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexSource {
    Reloaded,
    Rebuilt,
}

impl std::fmt::Display for IndexSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reloaded => "reloaded",
            Self::Rebuilt => "rebuilt",
        })
    }
}

/// The vectors of one model version, searchable by cosine similarity. Ids
/// are gallery ids; vectors are checked and made unit length on the way in.
#[async_trait::async_trait]
pub trait VectorIndex: Send + Sync + 'static {
    /// Items a search can return.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every id a search can return, for reconciling with the store.
    fn ids(&self) -> HashSet<i64>;

    async fn insert(&self, items: Vec<(i64, Vec<f32>)>) -> Result<(), IndexError>;

    /// Removes ids from results at once.
    async fn delete(&self, ids: Vec<i64>) -> Result<(), IndexError>;

    /// The `k` nearest items, best first; with `allowed` (ascending ids), only those.
    async fn search(&self, query: &[f32], k: usize, allowed: Option<Arc<Vec<i64>>>) -> Result<Vec<Hit>, IndexError>;

    /// The `k` nearest items of one label, when the index can filter by label
    /// itself (a database); `None` when it cannot, and the catalog filters.
    async fn search_label(&self, _query: &[f32], _k: usize, _label: &str) -> Result<Option<Vec<Hit>>, IndexError> {
        Ok(None)
    }

    /// Makes the index ready for searches before a model switch swaps to it
    /// (a database builds its HNSW index); nothing to do for an in-memory graph.
    async fn prepare(&self) -> Result<(), IndexError> {
        Ok(())
    }

    /// True when the index reads the store's own embeddings (a database):
    /// then there is nothing to reconcile, and `ids` is not listed.
    fn mirrors_store(&self) -> bool {
        false
    }

    /// Saves the index where it keeps one (a dump), when it changed since the
    /// last save; `None` when there was nothing to do.
    async fn save(&self) -> Result<Option<DumpReport>, IndexError>;
}

/// Makes the index of a model version (`model` is its `name@version` key).
#[async_trait::async_trait]
pub trait IndexProvider: Send + Sync + 'static {
    /// An empty index for `dim`-dimensional vectors, sized for `capacity`.
    fn create(&self, model: &str, dim: usize, capacity: usize) -> Arc<dyn VectorIndex>;

    /// The saved index of `model` when there is a usable one, else an empty
    /// one; with how it was made ready and why.
    async fn open(&self, model: &str, dim: usize, capacity: usize) -> (Arc<dyn VectorIndex>, IndexSource, String);

    /// Frees what the index of a deleted model version kept (its dump, its
    /// index in the database).
    async fn forget(&self, model: &str) -> Result<(), IndexError>;
}
