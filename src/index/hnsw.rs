//! The HNSW graph over gallery embeddings, in memory, backed by `hnsw_rs`.
//! Blocking: every method does graph work on the calling thread.
//!
//! Vectors are unit length, so the dot-product distance `1 - dot` is the
//! cosine distance and the score we report is `1 - distance`. `hnsw_rs`
//! panics on NaN and, with SIMD distances, on any dot product above 1.000002:
//! every vector is checked, renormalised and stored a hair short of unit
//! length (`STORED_NORM`), because two unit vectors of 1,280 mostly positive
//! f32 components (EfficientNet's GeM features) can sum past that in the SIMD
//! order. Scores are scaled back, so a vector still scores 1 against itself.
//!
//! `hnsw_rs` has no delete: a deleted id becomes a tombstone, filtered out of
//! results at once, and the graph is rebuilt without them (compaction) once
//! they pass a fraction of it. Every change goes through one writer lock, so a
//! dump (which holds the graph's read lock throughout) never runs beside an
//! insert, and searches never wait behind a blocked insert. The tombstones
//! are a copy-on-write set: a search reads a snapshot without a lock, so a
//! delete never makes searches (or `len`, which the probes read) wait.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use arc_swap::ArcSwap;

use hnsw_rs::prelude::{DistDot, Hnsw};

use super::{Hit, IndexError};
use crate::vector::normalized;

/// Graph parameters: `M` = 16 links per node and `ef_construction` = 200 are
/// the usual defaults for ~100-dimensional embeddings (see bench/index_scale).
const MAX_CONNECTIONS: usize = 16;
const EF_CONSTRUCTION: usize = 200;
/// `hnsw_rs` can only dump graphs built with its maximum of 16 layers.
const MAX_LAYERS: usize = 16;
/// Smallest search breadth; larger `k` searches wider. At 100k vectors 32
/// gave recall@10 of 0.997 on real embeddings and 0.999 on clustered ones
/// (bench/index_scale), and half the time of 64 for +0.001.
const MIN_EF_SEARCH: usize = 32;
/// Batches at least this large are inserted on all cores (rayon).
const PARALLEL_INSERT_FROM: usize = 256;
/// Up to this many tombstones a search over-fetches and drops them; beyond,
/// it filters inside the graph walk (slower per query, but bounded).
const OVERFETCH_LIMIT: usize = 256;

/// The HNSW graph and the ids deleted from it since it was built.
pub(super) struct Graph {
    pub(super) hnsw: Hnsw<'static, f32, DistDot>,
    /// Persistent (structurally shared): a delete adds to it in O(log n)
    /// while searches go on reading the set they loaded.
    tombstones: ArcSwap<imbl::HashSet<i64>>,
}

impl Graph {
    fn new(capacity: usize) -> Self {
        let hnsw = Hnsw::new(MAX_CONNECTIONS, capacity.max(1024), MAX_LAYERS, EF_CONSTRUCTION, DistDot {});
        Self::from_hnsw(hnsw)
    }

    pub(super) fn from_hnsw(hnsw: Hnsw<'static, f32, DistDot>) -> Self {
        Self { hnsw, tombstones: ArcSwap::default() }
    }

    fn tombstones(&self) -> Arc<imbl::HashSet<i64>> {
        self.tombstones.load_full()
    }

    /// Adds tombstones: a new set replaces the old, sharing all but the
    /// changed nodes with it (writers are serialised by the writer lock).
    fn bury(&self, ids: impl IntoIterator<Item = i64>) {
        let mut dead = imbl::HashSet::clone(&self.tombstones.load());
        dead.extend(ids);
        self.tombstones.store(Arc::new(dead));
    }

    /// Every id in the graph, tombstoned or not.
    fn ids(&self) -> Vec<i64> {
        if self.hnsw.get_nb_point() == 0 {
            return Vec::new(); // hnsw_rs's point iterator needs an entry point
        }
        self.hnsw.get_point_indexation().into_iter().map(|p| p.get_origin_id() as i64).collect()
    }

    /// Live (id, vector) pairs, for rebuilding without the tombstones.
    fn live_vectors(&self) -> Vec<(i64, Vec<f32>)> {
        if self.hnsw.get_nb_point() == 0 {
            return Vec::new();
        }
        let dead = self.tombstones();
        self.hnsw
            .get_point_indexation()
            .into_iter()
            .map(|p| (p.get_origin_id() as i64, p.get_v().to_vec()))
            .filter(|(id, _)| !dead.contains(id))
            .collect()
    }
}

/// A change made while a compaction builds its new graph, replayed onto it.
enum Change {
    Insert(i64, Vec<f32>),
    Delete(i64),
}

#[derive(Default)]
pub(super) struct WriterState {
    /// `Some` while a compaction runs.
    journal: Option<Vec<Change>>,
}

/// Cheap-clone handle over one graph.
#[derive(Clone)]
pub struct HnswIndex {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    dim: usize,
    graph: RwLock<Arc<Graph>>,
    writer: Mutex<WriterState>,
    /// Counts changes, so a dump knows whether it is needed.
    pub(super) changes: AtomicU64,
    pub(super) dumped_changes: AtomicU64,
    /// Held through a whole dump, so two never interleave their files and `CURRENT`.
    pub(super) dumping: Mutex<()>,
}

impl HnswIndex {
    pub fn new(dim: usize, capacity: usize) -> Self {
        Self::with_graph(dim, Graph::new(capacity))
    }

    pub(super) fn with_graph(dim: usize, graph: Graph) -> Self {
        let shared = Shared {
            dim,
            graph: RwLock::new(Arc::new(graph)),
            writer: Mutex::new(WriterState::default()),
            changes: AtomicU64::new(0),
            dumped_changes: AtomicU64::new(0),
            dumping: Mutex::default(),
        };
        Self { shared: Arc::new(shared) }
    }

    pub fn dim(&self) -> usize {
        self.shared.dim
    }

    /// Items a search can return (points minus tombstones).
    pub fn len(&self) -> usize {
        let graph = self.graph();
        let dead = graph.tombstones().len();
        graph.hnsw.get_nb_point().saturating_sub(dead)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn tombstones(&self) -> usize {
        let graph = self.graph();
        graph.tombstones().len()
    }

    /// Every id in the graph that is not tombstoned.
    pub fn live_ids(&self) -> HashSet<i64> {
        let graph = self.graph();
        let dead = graph.tombstones();
        graph.ids().into_iter().filter(|id| !dead.contains(id)).collect()
    }

    /// Adds vectors. Blocking (graph work): call it off the async runtime.
    pub fn insert(&self, items: &[(i64, Vec<f32>)]) -> Result<(), IndexError> {
        let checked: Vec<(i64, Vec<f32>)> =
            items.iter().map(|(id, v)| Ok((*id, self.checked(v)?))).collect::<Result<_, IndexError>>()?;
        let mut writer = self.writer();
        let graph = self.graph();
        if checked.len() >= PARALLEL_INSERT_FROM {
            let refs: Vec<(&Vec<f32>, usize)> = checked.iter().map(|(id, v)| (v, *id as usize)).collect();
            graph.hnsw.parallel_insert(&refs);
        } else {
            for (id, v) in &checked {
                graph.hnsw.insert((v, *id as usize));
            }
        }
        if let Some(journal) = writer.journal.as_mut() {
            journal.extend(checked.into_iter().map(|(id, v)| Change::Insert(id, v)));
        }
        self.shared.changes.fetch_add(items.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Removes ids from results at once (tombstones).
    pub fn delete(&self, ids: &[i64]) {
        let mut writer = self.writer();
        let graph = self.graph();
        graph.bury(ids.iter().copied());
        if let Some(journal) = writer.journal.as_mut() {
            journal.extend(ids.iter().map(|&id| Change::Delete(id)));
        }
        self.shared.changes.fetch_add(ids.len() as u64, Ordering::Relaxed);
    }

    /// Whether tombstones are more than `fraction` of the graph.
    pub fn needs_compaction(&self, fraction: f64) -> bool {
        let graph = self.graph();
        let dead = graph.tombstones().len();
        dead > 0 && dead as f64 > fraction * graph.hnsw.get_nb_point() as f64
    }

    /// Rebuilds the graph without its tombstones while searches and writes go
    /// on against the old one; writes made meanwhile are replayed onto the new
    /// graph before the swap. Blocking: run it on its own thread.
    pub fn compact(&self) -> usize {
        let live = {
            let mut writer = self.writer();
            if writer.journal.is_some() {
                return 0; // a compaction is already running
            }
            writer.journal = Some(Vec::new());
            self.graph().live_vectors()
        };
        let fresh = Graph::new(live.len());
        let refs: Vec<(&Vec<f32>, usize)> = live.iter().map(|(id, v)| (v, *id as usize)).collect();
        fresh.hnsw.parallel_insert(&refs);
        let mut writer = self.writer();
        for change in writer.journal.take().unwrap_or_default() {
            match change {
                Change::Insert(id, v) => fresh.hnsw.insert((&v, id as usize)),
                Change::Delete(id) => fresh.bury([id]),
            }
        }
        let purged = self.graph().hnsw.get_nb_point().saturating_sub(fresh.hnsw.get_nb_point());
        *self.shared.graph.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        self.shared.changes.fetch_add(1, Ordering::Relaxed);
        drop(writer);
        purged
    }

    /// The `k` nearest live items, best first; with `allowed` (sorted ids),
    /// only those.
    pub fn search(&self, query: &[f32], k: usize, allowed: Option<&[i64]>) -> Result<Vec<Hit>, IndexError> {
        self.search_inner(query, k, MIN_EF_SEARCH.max(2 * k), allowed)
    }

    /// `search` with an explicit search breadth (benchmarks, tuning).
    pub fn search_with_ef(&self, query: &[f32], k: usize, ef: usize) -> Result<Vec<Hit>, IndexError> {
        self.search_inner(query, k, ef.max(k), None)
    }

    fn search_inner(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        allowed: Option<&[i64]>,
    ) -> Result<Vec<Hit>, IndexError> {
        let q = self.checked(query)?;
        let graph = self.graph();
        if graph.hnsw.get_nb_point() == 0 || k == 0 {
            return Ok(Vec::new());
        }
        let dead = graph.tombstones();
        let live = |id: &usize| !dead.contains(&(*id as i64));
        let neighbours = match allowed {
            Some(allowed) => {
                let filter = |id: &usize| live(id) && allowed.binary_search(&(*id as i64)).is_ok();
                graph.hnsw.search_filter(&q, k, 2 * ef, Some(&filter))
            }
            None if dead.len() <= OVERFETCH_LIMIT => {
                let fetch = k + dead.len();
                graph.hnsw.search(&q, fetch, ef.max(fetch))
            }
            None => graph.hnsw.search_filter(&q, k, ef, Some(&live)),
        };
        let mut hits: Vec<Hit> = neighbours
            .into_iter()
            .filter(|n| live(&n.d_id))
            .map(|n| Hit { id: n.d_id as i64, score: ((1.0 - n.distance) / (STORED_NORM * STORED_NORM)).min(1.0) })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
        Ok(hits)
    }

    /// Whether something changed since the last dump.
    pub fn is_dirty(&self) -> bool {
        self.shared.changes.load(Ordering::Relaxed) != self.shared.dumped_changes.load(Ordering::Relaxed)
    }

    pub(super) fn graph(&self) -> Arc<Graph> {
        self.shared.graph.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn writer(&self) -> MutexGuard<'_, WriterState> {
        self.shared.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checked(&self, v: &[f32]) -> Result<Vec<f32>, IndexError> {
        if v.len() != self.shared.dim {
            return Err(IndexError::Dimension { got: v.len(), expected: self.shared.dim });
        }
        let unit = normalized(v).map_err(|_| IndexError::NotFinite)?;
        Ok(unit.into_iter().map(|x| x * STORED_NORM).collect())
    }
}

/// Length of the stored and searched vectors: short enough of 1 that the
/// rounding of a 1,280-term f32 dot product never passes `hnsw_rs`'s 1.000002.
const STORED_NORM: f32 = 1.0 - 1e-5;

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(i: usize, dim: usize) -> Vec<f32> {
        let mut v = vec![0.01; dim];
        v[i % dim] = 1.0;
        v
    }

    /// `n` items with distinct directions when `dim >= n` (ids from 100).
    fn filled(n: usize, dim: usize) -> HnswIndex {
        let index = HnswIndex::new(dim, n);
        let items: Vec<_> = (0..n).map(|i| (i as i64 + 100, unit(i, dim))).collect();
        index.insert(&items).unwrap();
        index
    }

    #[test]
    fn finds_itself_first_and_tolerates_duplicates() {
        let index = filled(8, 8);
        index.insert(&[(200, unit(3, 8))]).unwrap(); // an exact duplicate must not panic
        let hits = index.search(&unit(5, 8), 3, None).unwrap();
        assert_eq!(hits[0].id, 105);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn wide_positive_vectors_never_trip_the_dot_product_assertion() {
        // Like GeM-pooled ReLU6 features after a fine-tune that drew them
        // together: 1,280 non-negative components, all nearly one direction.
        // As plain unit vectors, their f32 dot products pass 1.000002 and
        // hnsw_rs panics while inserting them.
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let base: Vec<f32> = (0..1280).map(|_| next() * next() * 6.0).collect();
        let items: Vec<(i64, Vec<f32>)> =
            (0..300).map(|i| (i, base.iter().map(|x| x + next() * 1e-3).collect())).collect();
        let index = HnswIndex::new(1280, items.len());
        index.insert(&items).unwrap();
        for (_, v) in &items {
            let hits = index.search(v, 1, None).unwrap();
            assert!((hits[0].score - 1.0).abs() < 1e-5, "the nearest scores 1: {}", hits[0].score);
        }
    }

    #[test]
    fn rejects_bad_vectors_and_searches_empty() {
        let index = HnswIndex::new(4, 1);
        assert!(index.search(&[1.0, 0.0, 0.0, 0.0], 5, None).unwrap().is_empty());
        assert!(matches!(index.insert(&[(1, vec![f32::NAN, 0.0, 0.0, 1.0])]), Err(IndexError::NotFinite)));
        assert!(matches!(index.insert(&[(1, vec![1.0, 0.0])]), Err(IndexError::Dimension { .. })));
        // Not unit length: renormalised rather than tripping hnsw_rs's assertions.
        index.insert(&[(1, vec![3.0, 0.0, 0.0, 4.0])]).unwrap();
        assert_eq!(index.search(&[0.0, 0.0, 0.0, 2.0], 1, None).unwrap()[0].id, 1);
    }

    #[test]
    fn deleted_ids_vanish_from_results_and_compaction_purges_them() {
        let index = filled(32, 32);
        index.delete(&[105, 121]);
        assert_eq!(index.len(), 30);
        let hits = index.search(&unit(5, 32), 32, None).unwrap();
        assert!(hits.iter().all(|h| h.id != 105 && h.id != 121), "{hits:?}");
        assert_eq!(hits.len(), 30);
        assert!(index.needs_compaction(0.05) && !index.needs_compaction(0.1));
        assert_eq!(index.compact(), 2);
        assert_eq!((index.len(), index.tombstones()), (30, 0));
        assert_eq!(index.search(&unit(6, 32), 1, None).unwrap()[0].id, 106);
        assert!(!index.live_ids().contains(&105));
    }

    #[test]
    fn an_allowed_list_restricts_results() {
        let index = filled(32, 32);
        let allowed = [103, 110, 119];
        let hits = index.search(&unit(10, 32), 5, Some(&allowed)).unwrap();
        let ids: Vec<i64> = hits.iter().map(|h| h.id).collect();
        assert_eq!(ids[0], 110);
        assert!(ids.iter().all(|id| allowed.contains(id)), "{ids:?}");
    }
}
