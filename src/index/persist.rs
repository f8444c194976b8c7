//! Index dumps in the data directory, so a restart reloads the graph instead
//! of rebuilding it.
//!
//! `hnsw_rs` writes its two files without fsync and, after a reload, under a
//! random name. So every dump goes into a fresh directory, is fsynced, renamed
//! into place, and only then named by `CURRENT` (itself written to a temporary
//! file, fsynced and renamed). A crash at any point leaves either the old dump
//! or the new one current, never a half-written one. Which items a dump holds
//! is read off the reloaded graph, and the caller reconciles it with the store.

use std::fs::{self, File};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::{AnnT, DistDot, Hnsw};
use serde::{Deserialize, Serialize};

use super::hnsw::{Graph, HnswIndex};
use super::IndexError;
use crate::clock::now_millis;
use crate::files::{sync_dir, write_atomic};

const CURRENT: &str = "CURRENT";
const FORMAT: u32 = 1;

/// What `CURRENT` says: which dump directory is the index, for which model.
#[derive(Debug, Serialize, Deserialize)]
struct DumpManifest {
    format: u32,
    dir: String,
    basename: String,
    model: String,
    dim: usize,
    points: usize,
    created_at: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct DumpReport {
    pub points: usize,
    pub seconds: f64,
}

/// How loading went; anything but `Reloaded` means "rebuild from the store".
#[derive(Debug)]
pub enum Loaded {
    Reloaded { points: usize, seconds: f64 },
    Missing,
    Stale(String),
    Corrupt(String),
}

impl HnswIndex {
    /// Writes the graph to `dir` atomically. Dumps run one at a time. The
    /// writer lock is held only while the graph is written out (an insert
    /// meanwhile would change what is being written), not through the fsyncs,
    /// renames and `CURRENT` that follow, so adds and deletes wait less;
    /// searches go on throughout.
    pub fn dump(&self, dir: &Path, model: &str) -> Result<DumpReport, IndexError> {
        let started = Instant::now();
        let _one_dump = self.shared.dumping.lock().unwrap_or_else(|e| e.into_inner());
        let io = |what: &str, e: std::io::Error| IndexError::Dump(format!("{what}: {e}"));
        fs::create_dir_all(dir).map_err(|e| io("creating the index directory", e))?;
        let name = format!("dump-{}", uuid::Uuid::new_v4().simple());
        let tmp = dir.join(format!(".tmp-{name}"));
        fs::create_dir(&tmp).map_err(|e| io("creating a dump directory", e))?;
        let (basename, points, changes) = {
            let _writer = self.writer();
            let graph = self.graph();
            let basename = graph.hnsw.file_dump(&tmp, "graph").map_err(|e| IndexError::Dump(e.to_string()))?;
            (basename, graph.hnsw.get_nb_point(), self.shared.changes.load(Ordering::Relaxed))
        };
        for entry in fs::read_dir(&tmp).map_err(|e| io("listing the dump", e))? {
            let path = entry.map_err(|e| io("listing the dump", e))?.path();
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io("syncing the dump", e))?;
        }
        sync_dir(&tmp).map_err(|e| io("syncing the dump", e))?;
        fs::rename(&tmp, dir.join(&name)).map_err(|e| io("renaming the dump", e))?;
        let manifest = DumpManifest {
            format: FORMAT,
            dir: name.clone(),
            basename,
            model: model.into(),
            dim: self.dim(),
            points,
            created_at: (now_millis() / 1000) as i64,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| IndexError::Dump(e.to_string()))?;
        write_atomic(&dir.join(CURRENT), &json).map_err(|e| io("writing CURRENT", e))?;
        self.shared.dumped_changes.store(changes, Ordering::Relaxed);
        remove_other_dumps(dir, &name);
        Ok(DumpReport { points, seconds: started.elapsed().as_secs_f64() })
    }

    /// Reloads the current dump of `model` from `dir`, or says why not.
    pub fn load(dir: &Path, model: &str, dim: usize) -> (Option<HnswIndex>, Loaded) {
        let started = Instant::now();
        let manifest: DumpManifest = match fs::read(dir.join(CURRENT)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, Loaded::Missing),
            Err(e) => return (None, Loaded::Corrupt(format!("reading CURRENT: {e}"))),
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(m) => m,
                Err(e) => return (None, Loaded::Corrupt(format!("CURRENT: {e}"))),
            },
        };
        if manifest.format != FORMAT || manifest.model != model || manifest.dim != dim {
            let why = format!("the dump is of {} ({}-d, format {})", manifest.model, manifest.dim, manifest.format);
            return (None, Loaded::Stale(why));
        }
        // The reloaded graph borrows its loader: the loader (paths and options,
        // a few hundred bytes) is leaked once per reload, i.e. once per start.
        let loader = HnswIo::new(&dir.join(&manifest.dir), &manifest.basename);
        // hnsw_rs asserts on malformed files: a panic here is a corrupt dump.
        let loaded = catch_unwind(AssertUnwindSafe(move || read_graph(loader)));
        let hnsw: Hnsw<'static, f32, DistDot> = match loaded {
            Ok(Ok(hnsw)) => hnsw,
            Ok(Err(e)) => return (None, Loaded::Corrupt(e.to_string())),
            Err(_) => return (None, Loaded::Corrupt("the dump files are malformed".into())),
        };
        let points = hnsw.get_nb_point();
        if points != manifest.points {
            return (None, Loaded::Corrupt(format!("{points} points, CURRENT says {}", manifest.points)));
        }
        let index = HnswIndex::with_graph(dim, Graph::from_hnsw(hnsw));
        (Some(index), Loaded::Reloaded { points, seconds: started.elapsed().as_secs_f64() })
    }
}

fn read_graph(loader: HnswIo) -> anyhow::Result<Hnsw<'static, f32, DistDot>> {
    Box::leak(Box::new(loader)).load_hnsw::<f32, DistDot>()
}

/// Removes the dump in `dir` if `CURRENT` names `model` (the dump of a
/// deleted version, or one that a newer place supersedes).
pub fn forget_dump(dir: &Path, model: &str) {
    let current = fs::read(dir.join(CURRENT)).ok().and_then(|b| serde_json::from_slice::<DumpManifest>(&b).ok());
    if current.is_some_and(|c| c.model == model) {
        let _ = fs::remove_file(dir.join(CURRENT));
        remove_other_dumps(dir, "");
    }
}

/// Older dumps and leftovers of interrupted ones; failures only cost disk.
fn remove_other_dumps(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != keep && (name.starts_with("dump-") || name.starts_with(".tmp-dump-")) {
            if let Err(error) = fs::remove_dir_all(entry.path()) {
                tracing::warn!(%error, dump = %name, "cannot remove an old index dump");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct direction per `i`.
    fn vector(i: usize) -> Vec<f32> {
        (0..8).map(|j| ((i + 1) as f32 * (j + 1) as f32 * 0.618).sin()).collect()
    }

    #[test]
    fn a_dump_reloads_with_its_items_and_replaces_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let index = HnswIndex::new(8, 64);
        index.insert(&(0..50).map(|i| (i as i64, vector(i))).collect::<Vec<_>>()).unwrap();
        index.dump(dir.path(), "m@1").unwrap();
        index.insert(&[(50, vector(50))]).unwrap();
        assert!(index.is_dirty());
        index.dump(dir.path(), "m@1").unwrap();
        assert!(!index.is_dirty());
        let dumps = fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
        assert_eq!(dumps, 1, "the older dump is removed");

        let (reloaded, outcome) = HnswIndex::load(dir.path(), "m@1", 8);
        assert!(matches!(outcome, Loaded::Reloaded { points: 51, .. }), "{outcome:?}");
        let reloaded = reloaded.unwrap();
        assert_eq!(reloaded.live_ids().len(), 51);
        assert_eq!(reloaded.search(&vector(17), 1, None).unwrap()[0].id, 17);
        // A reloaded graph takes inserts and dumps again.
        reloaded.insert(&[(51, vector(51))]).unwrap();
        reloaded.dump(dir.path(), "m@1").unwrap();
        assert!(matches!(HnswIndex::load(dir.path(), "m@1", 8).1, Loaded::Reloaded { points: 52, .. }));
    }

    #[test]
    fn missing_stale_and_corrupt_dumps_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(HnswIndex::load(dir.path(), "m@1", 8).1, Loaded::Missing));
        let index = HnswIndex::new(8, 16);
        index.insert(&(0..10).map(|i| (i as i64, vector(i))).collect::<Vec<_>>()).unwrap();
        index.dump(dir.path(), "m@1").unwrap();
        assert!(matches!(HnswIndex::load(dir.path(), "m@2", 8).1, Loaded::Stale(_)));
        // Truncate the graph file: the loader must fail, not crash the process.
        let dump = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
        for file in fs::read_dir(&dump).unwrap() {
            let path = file.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        }
        assert!(matches!(HnswIndex::load(dir.path(), "m@1", 8).1, Loaded::Corrupt(_)));
    }
}
