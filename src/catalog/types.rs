//! What the catalog takes and answers: plain data, serialisable for the API.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::index::IndexSource;
use crate::vote::Prediction;

/// An uploaded image with what the client said about it.
#[derive(Debug, Clone)]
pub struct Upload {
    pub bytes: Bytes,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// What to do with an upload that duplicates a stored item. Both kinds are
/// always reported: byte-identical (`duplicate_of`) and near duplicates, an
/// embedding within the near-duplicate distance (`near_duplicate_of`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDuplicate {
    /// Store it anyway.
    #[default]
    Allow,
    /// Do not store byte-identical uploads; report the existing item instead
    /// (what a resumed import wants). Near duplicates are stored.
    Skip,
    /// Refuse the whole request (409) if any upload is a duplicate of either kind.
    Reject,
}

/// A stored item close to an upload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct NearDuplicate {
    pub id: i64,
    pub score: f32,
}

/// Whether an upload was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddStatus {
    Added,
    /// A byte-identical item exists and `on_duplicate=skip` asked not to store it again.
    Skipped,
}

/// What `add` reports for each upload, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Added {
    /// The new item, or for a skipped upload the item that already holds it.
    pub id: i64,
    pub status: AddStatus,
    pub content_hash: String,
    /// An older item with byte-identical content.
    pub duplicate_of: Option<i64>,
    /// The most similar older item, when closer than the near-duplicate distance.
    pub near_duplicate_of: Option<NearDuplicate>,
}

/// One search result: the item and its cosine similarity to the query.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: i64,
    pub score: f32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
}

/// What a search asks for besides the image.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub k: usize,
    /// Only items with this label.
    pub label: Option<String>,
    /// Only results at least this similar.
    pub min_score: Option<f32>,
}

/// Where a search spent its time, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub preprocess_ms: f64,
    /// Queue wait plus forward pass.
    pub embed_ms: f64,
    /// Of `embed_ms`, the time waiting for a batch to form and a worker.
    pub queue_ms: f64,
    /// Images in the forward pass that embedded this query.
    pub batch_size: usize,
    pub search_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    /// The model that embedded the query.
    pub model: String,
    pub results: Vec<Neighbour>,
    pub prediction: Prediction,
    pub timing: Timing,
}

/// A pair of images compared.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub model: String,
    /// Cosine similarity of the two embeddings, -1 to 1.
    pub similarity: f32,
    /// Euclidean distance between the unit embeddings, 0 to 2 (what training measures).
    pub distance: f32,
    /// Similarity at or above which the pair is the same; from the model's manifest.
    pub threshold: Option<f32>,
    /// `None` when the model has no calibrated threshold.
    pub same: Option<bool>,
}

/// How the index was made ready at start.
#[derive(Debug, Clone, Serialize)]
pub struct IndexStartup {
    pub source: IndexSource,
    pub reason: String,
    pub items: usize,
    /// Items the dump lacked (added from stored embeddings) or held in excess (removed).
    pub added: usize,
    pub removed: usize,
    pub seconds: f64,
}

/// What a model switch did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Switched {
    pub version: String,
    pub model: String,
    /// Images embedded because no embedding of this model was stored.
    pub embedded: usize,
    pub items: usize,
    /// Ids of stored items whose image this model's preprocessing refuses
    /// (left out of its index; for example after `--max-image-side` was lowered).
    pub unembeddable: Vec<i64>,
    pub seconds: f64,
}

/// How far a model switch's embedding has got.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Progress {
    pub embedded: usize,
    /// Images that had no embedding of the model when the switch looked.
    pub to_embed: usize,
}

/// The serving model and its workers, for `/health`, `/ready` and logs.
#[derive(Debug, Clone)]
pub struct Serving {
    pub model: String,
    pub version: String,
    pub bundled: bool,
    pub trained: bool,
    pub device: String,
    pub workers: usize,
    pub precision: String,
    pub max_batch: usize,
    pub max_delay: std::time::Duration,
    pub cuda_available: bool,
    pub cuda_devices: usize,
    /// Whether every embedding worker is still running.
    pub workers_running: bool,
    pub indexed_items: usize,
    /// Stored items the serving model could not preprocess, so not searchable.
    pub unembeddable_items: usize,
}
