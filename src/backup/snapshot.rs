//! Taking a backup while the service runs. Every file the service writes
//! besides the store is written once under a temporary name and renamed into
//! place, never changed after: a hard link to it is a snapshot. So the
//! backup links model versions, index dumps and job records into a staging
//! folder inside the data folder, copies the gallery with SQLite's online
//! backup in one step (one consistent state), and archives the staging folder.
//!
//! Order: `ACTIVE` before the version folders (a version is saved before it
//! is activated, so the active one is in the backup), the store before the
//! index dumps (the service reconciles a dump with the store at start).

use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::Connection;

use super::{at, BackupConfig, BackupError, Contents, FileEntry, Hashing, CONTENTS, FORMAT};
use crate::clock::now_millis;
use crate::files::sync_dir;
use crate::gallery::STORE_FILE;
use crate::registry::{ACTIVE_FILE as ACTIVE, MODELS_DIR};
use crate::startup::{INDEX_DIR, JOBS_DIR};

/// Names of files still being written (`files::write_atomic`, `Registry::save`).
const UNFINISHED: [&str; 2] = [".partial", ".tmp"];

pub struct BackupSummary {
    pub file: PathBuf,
    pub items: u64,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl BackupSummary {
    pub fn render(&self) -> String {
        format!(
            "backed up {} items ({} files, {:.1} MB) to {} in {:.1} s\nrestore with: lookalike restore {} --data-dir <an empty folder>\n",
            self.items,
            self.files,
            self.bytes as f64 / 1e6,
            self.file.display(),
            self.seconds,
            self.file.display()
        )
    }
}

/// Backs up the data folder of an embedded service, serving or not.
pub fn backup(config: &BackupConfig) -> Result<BackupSummary, BackupError> {
    let started = Instant::now();
    let data = &config.data_dir;
    if !data.join(STORE_FILE).is_file() {
        return Err(BackupError::NoGallery(data.clone()));
    }
    if config.to.exists() {
        return Err(BackupError::Exists(config.to.clone()));
    }
    let staging = Staging::new(data.join(format!(".backup-{}", std::process::id())))?;
    let models = data.join(MODELS_DIR);
    link(&models.join(ACTIVE), &staging.0.join(MODELS_DIR).join(ACTIVE))?;
    link_folders(&models, &staging.0.join(MODELS_DIR), |name| name != ACTIVE)?;
    let items = snapshot_store(&data.join(STORE_FILE), &staging.0.join(STORE_FILE))?;
    link_index_dumps(&data.join(INDEX_DIR), &staging.0.join(INDEX_DIR))?;
    link_job_records(&data.join(JOBS_DIR), &staging.0.join(JOBS_DIR))?;
    let files = write_archive(&staging.0, &config.to, items)?;
    Ok(BackupSummary {
        file: config.to.clone(),
        items,
        files: files.len(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The staging folder, removed however the backup ends.
struct Staging(PathBuf);

impl Staging {
    fn new(dir: PathBuf) -> Result<Self, BackupError> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        Ok(Self(dir))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The store in one step of SQLite's online backup: every page under one
/// read transaction, so one committed state, while the service goes on writing.
fn snapshot_store(store: &Path, copy: &Path) -> Result<u64, BackupError> {
    let source = Connection::open(store)?;
    source.busy_timeout(Duration::from_secs(30))?;
    let mut target = Connection::open(copy)?;
    {
        let backup = Backup::new(&source, &mut target)?;
        // -1: every page in one step (rusqlite's run_to_completion takes only positive steps).
        while backup.step(-1)? != StepResult::Done {
            std::thread::sleep(Duration::from_millis(50)); // busy or locked: the service is committing
        }
    }
    // One self-contained file, no write-ahead log beside it; the service turns WAL on again.
    target.pragma_update(None, "journal_mode", "DELETE")?;
    let items: i64 = target.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))?;
    Ok(items as u64)
}

/// Links `from` to `to`, or copies it where links are not possible; `false`
/// when `from` is gone (deleted since it was listed). Never copies onto an
/// existing `to`: that could be a link to `from` itself, which a copy would empty.
fn link(from: &Path, to: &Path) -> Result<bool, BackupError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(at(parent))?;
    }
    match fs::hard_link(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(at(to)(e)),
        Err(_) => match fs::copy(from, to) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(at(from)(e)),
        },
    }
}

/// Every finished file of `dir` and every finished folder whole, of the
/// entries whose name `wanted` admits: a folder deleted while it is linked (a
/// model version) is left out entirely.
fn link_folders(dir: &Path, to: &Path, wanted: impl Fn(&str) -> bool) -> Result<(), BackupError> {
    let named = |p: &PathBuf| p.file_name().is_some_and(|n| wanted(&n.to_string_lossy()));
    for path in finished_entries(dir)?.into_iter().filter(named) {
        let target = to.join(path.file_name().expect("an entry has a name"));
        let whole = if path.is_dir() { link_tree(&path, &target)? } else { link(&path, &target)? };
        if !whole {
            let _ = fs::remove_dir_all(&target);
        }
    }
    Ok(())
}

/// The fine-tune job records (`<id>.json`, written whole and renamed), not
/// the folders of a running job's checkpoints: those are rewritten in place,
/// and a restarted service removes them anyway.
fn link_job_records(dir: &Path, to: &Path) -> Result<(), BackupError> {
    for path in finished_entries(dir)?.into_iter().filter(|p| p.is_file()) {
        link(&path, &to.join(path.file_name().expect("an entry has a name")))?;
    }
    Ok(())
}

/// Links a folder's files; `false` if any was gone.
fn link_tree(dir: &Path, to: &Path) -> Result<bool, BackupError> {
    for path in finished_entries(dir)? {
        let target = to.join(path.file_name().expect("an entry has a name"));
        let whole = if path.is_dir() { link_tree(&path, &target)? } else { link(&path, &target)? };
        if !whole {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The entries of `dir` that are not being written, sorted; none if `dir` is missing.
fn finished_entries(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| !UNFINISHED.iter().any(|suffix| p.to_string_lossy().ends_with(suffix)))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Each model's current index dump (its `CURRENT` and the folder it names).
/// A dump replaced while it is linked is left out: the service rebuilds it.
fn link_index_dumps(index: &Path, to: &Path) -> Result<(), BackupError> {
    let mut folders = vec![index.to_path_buf()];
    folders.extend(finished_entries(index)?.into_iter().filter(|p| p.is_dir()));
    for folder in folders {
        let Ok(current) = fs::read(folder.join("CURRENT")) else { continue };
        let named = serde_json::from_slice::<serde_json::Value>(&current).ok();
        let Some(dump) = named.as_ref().and_then(|c| c["dir"].as_str()) else { continue };
        let relative = folder.strip_prefix(index).expect("under the index folder");
        let target = to.join(relative);
        if !link_tree(&folder.join(dump), &target.join(dump))? {
            let _ = fs::remove_dir_all(target.join(dump));
            continue;
        }
        fs::write(target.join("CURRENT"), &current).map_err(at(&target))?;
    }
    Ok(())
}

/// Archives the staging folder into `file` (written under a temporary name,
/// fsynced, renamed), `backup.json` last; the files it lists.
fn write_archive(staging: &Path, file: &Path, items: u64) -> Result<Vec<FileEntry>, BackupError> {
    let partial = PathBuf::from(format!("{}.partial", file.display()));
    let out = File::create(&partial).map_err(at(&partial))?;
    let mut archive = tar::Builder::new(BufWriter::new(out));
    let mut files = Vec::new();
    for path in walk(staging)? {
        let name = path.strip_prefix(staging).expect("under staging").to_string_lossy().replace('\\', "/");
        let source = File::open(&path).map_err(at(&path))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(source.metadata().map_err(at(&path))?.len());
        header.set_mode(0o644);
        header.set_mtime(now_millis() / 1000);
        let size = header.size().map_err(at(&path))?;
        let mut hashing = Hashing::new(source);
        archive.append_data(&mut header, &name, &mut hashing).map_err(at(&path))?;
        let (bytes, sha256) = hashing.finish();
        if bytes != size {
            // Staged files are links to files never written again; this one was.
            return Err(BackupError::Changed(format!(
                "{name} changed while it was archived ({size} -> {bytes} bytes)"
            )));
        }
        files.push(FileEntry { path: name, bytes, sha256 });
    }
    let contents = Contents {
        format: FORMAT,
        written_by: env!("CARGO_PKG_VERSION").to_string(),
        created_at: now_millis(),
        items,
        files: files.clone(),
    };
    let json = serde_json::to_vec_pretty(&contents).expect("contents serialise");
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(now_millis() / 1000);
    archive.append_data(&mut header, CONTENTS, json.as_slice()).map_err(at(&partial))?;
    let out = archive.into_inner().map_err(at(&partial))?.into_inner().map_err(|e| at(&partial)(e.into_error()))?;
    out.sync_all().map_err(at(&partial))?;
    fs::rename(&partial, file).map_err(at(file))?;
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(parent).map_err(at(parent))?;
    Ok(files)
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut files = Vec::new();
    for path in finished_entries(dir)? {
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}
