//! Nearest-neighbour index over gallery embeddings, backed by `hnsw_rs`.
//!
//! Vectors are unit length, so the dot-product distance `1 - dot` is the
//! cosine distance and the score we report is `1 - distance`. `hnsw_rs`
//! panics on NaN and, with SIMD distances, on vectors that are not unit
//! length: every vector is checked and renormalised before it gets there.

use std::sync::Arc;

use hnsw_rs::prelude::{DistDot, Hnsw};

use crate::embed::normalized;

/// Graph parameters: `M` = 16 links per node and `ef_construction` = 200 are
/// the usual defaults for ~100-dimensional embeddings (the scale issue tunes them).
const MAX_CONNECTIONS: usize = 16;
const EF_CONSTRUCTION: usize = 200;
/// `hnsw_rs` can only dump graphs built with its maximum of 16 layers.
const MAX_LAYERS: usize = 16;
/// Smallest search breadth; larger `k` searches wider.
const MIN_EF_SEARCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index holds {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("vector is zero or not finite")]
    NotFinite,
}

/// A gallery id and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: i64,
    pub score: f32,
}

/// Cheap-clone handle. `hnsw_rs` locks internally, so inserts and searches
/// may run concurrently from any thread.
#[derive(Clone)]
pub struct Index {
    inner: Arc<Hnsw<'static, f32, DistDot>>,
    dim: usize,
}

impl Index {
    pub fn new(dim: usize, expected_items: usize) -> Self {
        let hnsw = Hnsw::new(MAX_CONNECTIONS, expected_items.max(1024), MAX_LAYERS, EF_CONSTRUCTION, DistDot {});
        Self { inner: Arc::new(hnsw), dim }
    }

    pub fn len(&self) -> usize {
        self.inner.get_nb_point()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&self, id: i64, vector: &[f32]) -> Result<(), IndexError> {
        let v = self.checked(vector)?;
        self.inner.insert((&v, id as usize));
        Ok(())
    }

    /// The `k` nearest items, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let q = self.checked(query)?;
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let ef = MIN_EF_SEARCH.max(2 * k);
        let mut hits: Vec<Hit> = self
            .inner
            .search(&q, k, ef)
            .into_iter()
            .map(|n| Hit { id: n.d_id as i64, score: 1.0 - n.distance })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(hits)
    }

    fn checked(&self, v: &[f32]) -> Result<Vec<f32>, IndexError> {
        if v.len() != self.dim {
            return Err(IndexError::Dimension { got: v.len(), expected: self.dim });
        }
        normalized(v).map_err(|_| IndexError::NotFinite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(i: usize, dim: usize) -> Vec<f32> {
        let mut v = vec![0.01; dim];
        v[i % dim] = 1.0;
        v
    }

    #[test]
    fn finds_itself_first_and_tolerates_duplicates() {
        let index = Index::new(8, 10);
        for i in 0..8 {
            index.insert(i as i64 + 100, &unit(i, 8)).unwrap();
        }
        index.insert(200, &unit(3, 8)).unwrap(); // an exact duplicate must not panic
        let hits = index.search(&unit(5, 8), 3).unwrap();
        assert_eq!(hits[0].id, 105);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn rejects_bad_vectors_and_searches_empty() {
        let index = Index::new(4, 1);
        assert!(index.search(&[1.0, 0.0, 0.0, 0.0], 5).unwrap().is_empty());
        assert!(matches!(index.insert(1, &[f32::NAN, 0.0, 0.0, 1.0]), Err(IndexError::NotFinite)));
        assert!(matches!(index.insert(1, &[1.0, 0.0]), Err(IndexError::Dimension { .. })));
        // Not unit length: renormalised rather than tripping hnsw_rs's assertions.
        index.insert(1, &[3.0, 0.0, 0.0, 4.0]).unwrap();
        assert_eq!(index.search(&[0.0, 0.0, 0.0, 2.0], 1).unwrap()[0].id, 1);
    }
}
