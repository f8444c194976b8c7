//! Scanning the whole gallery for near-copies: each stored item's nearest
//! neighbours in the serving model's index, kept when within a distance.
//! One search at a time, so searches and uploads go on beside a scan.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Catalog, CatalogError};
use crate::curation::NearPair;

/// Items whose stored vectors are read at once.
const PAGE: usize = 256;
/// Neighbours asked of the index per item: a group, every two of whose items are a close
/// pair, holds at most 2 x this + 1 (n items need n(n-1)/2 pairs, each item brings at most this many).
const NEIGHBOURS: usize = 10;
/// Close pairs a scan keeps at most: beyond, the distance is too loose to mean copies.
pub const MAX_PAIRS: usize = 100_000;

/// What a scan found: under which model, and the close pairs.
pub struct NearPairs {
    pub model: String,
    pub pairs: Vec<NearPair>,
}

impl Catalog {
    /// The distance under which two items count as copies when none is
    /// asked for: `--near-duplicate-distance`, else the serving model's
    /// (its manifest's, else the one its evaluation calibrated: at most 1%
    /// of distinct class-mate pairs within it). `None` for a model with neither.
    pub fn copy_distance(&self) -> Option<f32> {
        let manifest = &self.active().version.manifest;
        let configured = self.settings.near_duplicate_distance.filter(|d| *d > 0.0);
        configured.or(manifest.near_duplicate_distance).or_else(|| manifest.calibrated_copy_distance())
    }

    /// Every pair of stored items within cosine `distance` of each other
    /// under the serving model; `progress(scanned, total)` after each page.
    pub async fn near_pairs(
        &self,
        distance: f32,
        progress: impl Fn(usize, usize) + Send,
        cancelled: &AtomicBool,
    ) -> Result<NearPairs, CatalogError> {
        // One model throughout, even if another is activated meanwhile.
        let active = self.active();
        let ids = self.store.embedded_ids(active.key()).await?;
        let mut closest: HashMap<(i64, i64), f32> = HashMap::new();
        let mut scanned = 0;
        for page in ids.chunks(PAGE) {
            if cancelled.load(Ordering::Relaxed) {
                return Err(CatalogError::Cancelled);
            }
            for (id, vector) in self.store.embeddings_of(active.key(), page.to_vec()).await? {
                for hit in active.index.search(&vector, NEIGHBOURS + 1, None).await? {
                    let apart = 1.0 - hit.score;
                    if hit.id != id && apart <= distance {
                        let entry = closest.entry((id.min(hit.id), id.max(hit.id))).or_insert(apart);
                        *entry = entry.min(apart);
                    }
                }
                if closest.len() > MAX_PAIRS {
                    return Err(CatalogError::TooManyPairs { distance, limit: MAX_PAIRS });
                }
            }
            scanned += page.len();
            progress(scanned, ids.len());
        }
        let pairs = closest.into_iter().map(|((a, b), distance)| NearPair { a, b, distance }).collect();
        Ok(NearPairs { model: active.name(), pairs })
    }
}
