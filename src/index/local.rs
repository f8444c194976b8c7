//! Embedded mode's vector index: an `HnswIndex` in memory, dumped to the
//! data folder (`persist`) and compacted in the background once deletes pile
//! up. Graph work runs on blocking threads, off the async runtime.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::persist::forget_dump;
use super::{DumpReport, Hit, HnswIndex, IndexError, IndexProvider, IndexSource, Loaded, VectorIndex};

/// One model version's graph, with where its dumps go.
#[derive(Clone)]
pub struct LocalIndex {
    graph: HnswIndex,
    /// Its own folder under the provider's: a switch back to an older
    /// version finds that version's dump.
    dir: PathBuf,
    /// Where every model's dump went before each had a folder.
    legacy_dir: PathBuf,
    model: String,
    /// Tombstones, as a fraction of the graph, that trigger a compaction.
    compact_fraction: f64,
}

impl LocalIndex {
    pub fn graph(&self) -> &HnswIndex {
        &self.graph
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalIndex) -> T + Send + 'static,
    ) -> Result<T, IndexError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this)).await.map_err(|e| IndexError::Task(e.to_string()))
    }

    /// Rebuilds the graph without its tombstones on a thread of its own,
    /// when they pass the fraction; searches and writes go on meanwhile.
    fn compact_if_needed(&self) {
        if !self.graph.needs_compaction(self.compact_fraction) {
            return;
        }
        let graph = self.graph.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let purged = graph.compact();
            tracing::info!(purged, seconds = started.elapsed().as_secs_f64(), "index compacted");
        });
    }
}

#[async_trait::async_trait]
impl VectorIndex for LocalIndex {
    fn len(&self) -> usize {
        self.graph.len()
    }

    fn ids(&self) -> HashSet<i64> {
        self.graph.live_ids()
    }

    async fn insert(&self, items: Vec<(i64, Vec<f32>)>) -> Result<(), IndexError> {
        self.blocking(move |index| index.graph.insert(&items)).await?
    }

    async fn delete(&self, ids: Vec<i64>) -> Result<(), IndexError> {
        self.blocking(move |index| index.graph.delete(&ids)).await?;
        self.compact_if_needed();
        Ok(())
    }

    /// On a blocking thread: a graph walk is a fraction of a millisecond to
    /// milliseconds (more with a filter), too long for an async worker.
    async fn search(&self, query: &[f32], k: usize, allowed: Option<Arc<Vec<i64>>>) -> Result<Vec<Hit>, IndexError> {
        let query = query.to_vec();
        self.blocking(move |index| index.graph.search(&query, k, allowed.as_deref().map(Vec::as_slice))).await?
    }

    async fn save(&self) -> Result<Option<DumpReport>, IndexError> {
        if !self.graph.is_dirty() {
            return Ok(None);
        }
        let report = self.blocking(|index| index.graph.dump(&index.dir, &index.model)).await??;
        self.blocking(|index| forget_dump(&index.legacy_dir, &index.model)).await?;
        Ok(Some(report))
    }
}

/// Makes `LocalIndex`es whose dumps live in `dir`.
pub struct LocalIndexes {
    pub dir: PathBuf,
    pub compact_fraction: f64,
}

impl LocalIndexes {
    /// An empty graph for `model`, as `create` makes it.
    pub fn new_index(&self, model: &str, dim: usize, capacity: usize) -> LocalIndex {
        self.wrap(HnswIndex::new(dim, capacity), model)
    }

    fn wrap(&self, graph: HnswIndex, model: &str) -> LocalIndex {
        LocalIndex {
            graph,
            dir: self.folder(model),
            legacy_dir: self.dir.clone(),
            model: model.to_string(),
            compact_fraction: self.compact_fraction,
        }
    }

    /// The folder of `model`'s dumps: `model-` and its key, with what is not
    /// a plain file name character replaced (never named like a dump folder).
    fn folder(&self, model: &str) -> PathBuf {
        let plain = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
        let key: String = model.chars().map(|c| if plain(c) { c } else { '_' }).collect();
        self.dir.join(format!("model-{key}"))
    }
}

#[async_trait::async_trait]
impl IndexProvider for LocalIndexes {
    fn create(&self, model: &str, dim: usize, capacity: usize) -> Arc<dyn VectorIndex> {
        Arc::new(self.new_index(model, dim, capacity))
    }

    async fn open(&self, model: &str, dim: usize, capacity: usize) -> (Arc<dyn VectorIndex>, IndexSource, String) {
        let (dir, legacy_dir, key) = (self.folder(model), self.dir.clone(), model.to_string());
        let loaded = tokio::task::spawn_blocking(move || match HnswIndex::load(&dir, &key, dim) {
            (_, Loaded::Missing) => HnswIndex::load(&legacy_dir, &key, dim), // dumped by an older build
            loaded => loaded,
        })
        .await;
        let (graph, source, reason) = match loaded {
            Ok((Some(graph), Loaded::Reloaded { points, seconds })) => {
                (graph, IndexSource::Reloaded, format!("dump of {points} points read in {seconds:.2} s"))
            }
            Ok((_, Loaded::Missing)) => (HnswIndex::new(dim, capacity), IndexSource::Rebuilt, "no index dump".into()),
            Ok((_, Loaded::Stale(why))) => {
                (HnswIndex::new(dim, capacity), IndexSource::Rebuilt, format!("stale dump: {why}"))
            }
            Ok((_, other)) => {
                (HnswIndex::new(dim, capacity), IndexSource::Rebuilt, format!("unusable dump: {other:?}"))
            }
            Err(e) => (HnswIndex::new(dim, capacity), IndexSource::Rebuilt, format!("reading the dump failed: {e}")),
        };
        (Arc::new(self.wrap(graph, model)), source, reason)
    }

    async fn forget(&self, model: &str) -> Result<(), IndexError> {
        let (dir, legacy_dir, key) = (self.folder(model), self.dir.clone(), model.to_string());
        let removed = tokio::task::spawn_blocking(move || {
            forget_dump(&legacy_dir, &key);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        });
        removed.await.map_err(|e| IndexError::Task(e.to_string()))?.map_err(|e| IndexError::Dump(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a switch from one version to another, each keeps its own dump:
    /// switching back reloads the old graph instead of rebuilding it. A
    /// deleted version's dump goes with it.
    #[tokio::test]
    async fn each_model_version_keeps_its_own_dump_until_it_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let indexes = LocalIndexes { dir: dir.path().into(), compact_fraction: 0.1 };
        for (model, points) in [("m@1#aa", 3), ("m@2#bb", 5)] {
            let index = indexes.new_index(model, 4, 8);
            index.insert((0..points).map(|i| (i, vec![1.0, i as f32, 0.5, 0.25])).collect()).await.unwrap();
            index.save().await.unwrap().expect("dumped");
        }
        for (model, points) in [("m@1#aa", 3), ("m@2#bb", 5)] {
            let (index, source, reason) = indexes.open(model, 4, 8).await;
            assert_eq!((source, index.len()), (IndexSource::Reloaded, points), "{model}: {reason}");
        }
        indexes.forget("m@1#aa").await.unwrap();
        assert_eq!(indexes.open("m@1#aa", 4, 8).await.1, IndexSource::Rebuilt);
        assert_eq!(indexes.open("m@2#bb", 4, 8).await.1, IndexSource::Reloaded);
    }

    /// Deletes past the fraction start a compaction on its own thread; it
    /// purges the tombstones while the deleted ids stay out of results.
    #[tokio::test]
    async fn deletes_past_the_fraction_compact_the_graph() {
        let dir = tempfile::tempdir().unwrap();
        let indexes = LocalIndexes { dir: dir.path().into(), compact_fraction: 0.1 };
        let index = indexes.new_index("m@1", 16, 32);
        let vector = |i: usize| (0..16).map(|j| ((i + 1) * (j + 1)) as f32 * 0.37).map(f32::sin).collect::<Vec<_>>();
        index.insert((0..32).map(|i| (i as i64, vector(i))).collect()).await.unwrap();
        index.delete(vec![3]).await.unwrap();
        assert_eq!((index.graph().tombstones(), index.len()), (1, 31), "one delete in 32 is under the fraction");
        index.delete(vec![4, 5, 6]).await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while index.graph().tombstones() > 0 {
            assert!(Instant::now() < deadline, "no compaction within 10 s");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(index.len(), 28);
        let hits = index.search(&vector(4), 32, None).await.unwrap();
        let only = index.search(&vector(4), 32, Some(Arc::new(vec![1, 4, 7]))).await.unwrap();
        let mut ids: Vec<i64> = only.iter().map(|h| h.id).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 7], "4 is deleted: {only:?}");
        assert!(hits.iter().all(|h| ![3, 4, 5, 6].contains(&h.id)) && hits.len() == 28);
    }
}
