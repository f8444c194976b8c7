//! Putting a backup back: into a missing or empty folder only, every file
//! checked against `backup.json` (size and SHA-256, none missing, none
//! extra), the gallery against SQLite's integrity check and this build's
//! schema, the model versions against their manifests. Anything wrong and
//! the folder is emptied again. Index dumps the backup lacks are rebuilt
//! from the stored embeddings when the service starts.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use rusqlite::Connection;

use super::{at, BackupError, Contents, FileEntry, Hashing, RestoreConfig, CONTENTS, FORMAT};
use crate::gallery::{SqliteGallery, STORE_FILE};
use crate::registry::Registry;

pub struct RestoreSummary {
    pub data_dir: PathBuf,
    pub items: u64,
    pub files: usize,
    pub versions: usize,
    pub active: String,
    pub seconds: f64,
}

impl RestoreSummary {
    pub fn render(&self) -> String {
        format!(
            "restored {} items ({} files checked, {} saved model versions, version {} active) into {} in {:.1} s\n\
             serve it with: lookalike serve --data-dir {}\n",
            self.items,
            self.files,
            self.versions,
            self.active,
            self.data_dir.display(),
            self.seconds,
            self.data_dir.display()
        )
    }
}

pub fn restore(config: &RestoreConfig) -> Result<RestoreSummary, BackupError> {
    let started = Instant::now();
    let dir = &config.data_dir;
    let existed = dir.exists();
    if existed && fs::read_dir(dir).map_err(at(dir))?.next().is_some() {
        return Err(BackupError::NotEmpty(dir.clone()));
    }
    fs::create_dir_all(dir).map_err(at(dir))?;
    match unpack_and_check(config) {
        Ok((items, files, versions, active)) => {
            let seconds = started.elapsed().as_secs_f64();
            Ok(RestoreSummary { data_dir: dir.clone(), items, files, versions, active, seconds })
        }
        Err(error) => {
            empty(dir, existed);
            Err(error)
        }
    }
}

/// Unpacks the archive and checks it; the items and files restored, the
/// saved model versions and the active one.
fn unpack_and_check(config: &RestoreConfig) -> Result<(u64, usize, usize, String), BackupError> {
    let dir = &config.data_dir;
    let archive = File::open(&config.from).map_err(at(&config.from))?;
    let mut archive = tar::Archive::new(BufReader::new(archive));
    let mut unpacked: BTreeMap<String, FileEntry> = BTreeMap::new();
    let mut contents = None;
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry.path().map_err(damaged)?.to_string_lossy().to_string();
        if name == CONTENTS {
            let mut json = Vec::new();
            entry.read_to_end(&mut json).map_err(damaged)?;
            contents = Some(serde_json::from_slice::<Contents>(&json).map_err(damaged)?);
            continue;
        }
        let target = dir.join(safe_relative(&name)?);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(at(parent))?;
        }
        let mut out = Hashing::new(File::create(&target).map_err(at(&target))?);
        std::io::copy(&mut entry, &mut out).map_err(damaged)?;
        out.inner.sync_all().map_err(at(&target))?;
        let (bytes, sha256) = out.finish();
        unpacked.insert(name.clone(), FileEntry { path: name, bytes, sha256 });
    }
    let contents = contents.ok_or_else(|| BackupError::Damaged(format!("no {CONTENTS}")))?;
    if contents.format != FORMAT {
        return Err(BackupError::Damaged(format!("format {} (this build reads {FORMAT})", contents.format)));
    }
    check_files(&contents.files, unpacked)?;
    let items = check_store(dir)?;
    let registry = Registry::new(&config.model, dir);
    let versions = registry.list()?.iter().filter(|v| !v.bundled).count();
    let active = registry.active()?.version;
    Ok((items, contents.files.len(), versions, active))
}

/// Every listed file unpacked with its size and checksum, and nothing else.
fn check_files(listed: &[FileEntry], mut unpacked: BTreeMap<String, FileEntry>) -> Result<(), BackupError> {
    for entry in listed {
        match unpacked.remove(&entry.path) {
            None => return Err(BackupError::Damaged(format!("{} is missing", entry.path))),
            Some(found) if found != *entry => {
                return Err(BackupError::Damaged(format!("{} fails its checksum", entry.path)));
            }
            Some(_) => {}
        }
    }
    match unpacked.into_keys().next() {
        Some(extra) => Err(BackupError::Damaged(format!("{extra} is not listed in {CONTENTS}"))),
        None => Ok(()),
    }
}

/// SQLite's own check, then this build's schema (an older backup is migrated).
fn check_store(dir: &Path) -> Result<u64, BackupError> {
    let conn = Connection::open(dir.join(STORE_FILE))?;
    let verdict: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(BackupError::Integrity(verdict));
    }
    let items: i64 = conn.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))?;
    drop(conn);
    SqliteGallery::open(dir)?;
    Ok(items as u64)
}

/// An archive path as a plain relative path (no root, no `..`).
fn safe_relative(name: &str) -> Result<PathBuf, BackupError> {
    let path = PathBuf::from(name);
    if path.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(path)
    } else {
        Err(BackupError::Damaged(format!("unsafe path {name:?}")))
    }
}

/// Empties the folder again (removes it if restore made it).
fn empty(dir: &Path, existed: bool) {
    if !existed {
        let _ = fs::remove_dir_all(dir);
        return;
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
    }
}

fn damaged(e: impl std::fmt::Display) -> BackupError {
    BackupError::Damaged(e.to_string())
}
