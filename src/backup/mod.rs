//! `lookalike backup` and `lookalike restore`: an embedded service's data
//! folder as one archive (tar), taken while the service runs, and put back
//! into an empty folder with every file checked.
//!
//! The archive holds the gallery (one consistent SQLite snapshot), the saved
//! model versions and which is active, the index dumps and the fine-tune job
//! records, with `backup.json` listing every file's size and SHA-256.

mod restore;
mod snapshot;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::BUNDLED_MODEL_DIR;

pub use restore::{restore, RestoreSummary};
pub use snapshot::{backup, BackupSummary};

/// The archive's table of contents, its last entry.
const CONTENTS: &str = "backup.json";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Args)]
pub struct BackupConfig {
    /// Data folder of the embedded service (it may be serving).
    #[arg(long, env = "LOOKALIKE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The archive to write; it must not exist yet.
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RestoreConfig {
    /// The archive `lookalike backup` wrote.
    pub from: PathBuf,

    /// The folder to restore into: missing or empty.
    #[arg(long)]
    pub data_dir: PathBuf,

    /// The bundled model the service runs with (its saved versions build on it).
    #[arg(long, env = "LOOKALIKE_MODEL", default_value = BUNDLED_MODEL_DIR)]
    pub model: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("gallery store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}: no gallery here (is this an embedded service's --data-dir?)", .0.display())]
    NoGallery(PathBuf),
    #[error("{}: exists already; back up to a new file", .0.display())]
    Exists(PathBuf),
    #[error("{}: not empty; restore into a new or empty folder", .0.display())]
    NotEmpty(PathBuf),
    #[error("{0}; back up again")]
    Changed(String),
    #[error("the archive is damaged or not a lookalike backup: {0}")]
    Damaged(String),
    #[error("the restored gallery fails SQLite's integrity check: {0}")]
    Integrity(String),
    #[error("restored model versions: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("restored gallery: {0}")]
    Gallery(#[from] crate::gallery::GalleryError),
}

/// `io::Error` with the path it concerns.
fn at(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    format: u32,
    /// The lookalike version that wrote it.
    written_by: String,
    /// Unix milliseconds.
    created_at: u64,
    items: u64,
    files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    /// Relative to the data folder, `/`-separated.
    path: String,
    bytes: u64,
    sha256: String,
}

/// Passes bytes through, counting and hashing them.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
