//! Model versions: the bundled (configured) model and the versions fine-tuning
//! saved in the data directory, and which one is active.
//!
//! Layout: `<data>/models/<version>/{encoder.pt, manifest.json}` and
//! `<data>/models/ACTIVE` (the active version's id). Every write goes to a
//! temporary name, is fsynced and renamed, so a crash leaves either the old
//! state or the new one.
//!
//! A version's stored embeddings and index dumps are keyed by `name@version`
//! and the encoder file's SHA-256, so a different encoder under a reused name
//! and version never reuses another encoder's vectors; a manifest that
//! records `encoder_sha256` must match its file.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error_kind::ErrorKind as Kind;
use crate::files::{sync_dir, write_atomic};
use crate::manifest::{Manifest, ManifestError, ENCODER_FILE};

pub(crate) const MODELS_DIR: &str = "models";
pub(crate) const ACTIVE_FILE: &str = "ACTIVE";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("model versions: {0}")]
    Io(#[from] std::io::Error),
    #[error("no model version `{0}`")]
    Unknown(String),
    #[error("{dir}: encoder.pt has SHA-256 {actual}, but its manifest records {expected}; re-export the model or fix encoder_sha256")]
    EncoderMismatch { dir: PathBuf, expected: String, actual: String },
    #[error("cannot read the active model version from {path}: {reason}; fix or remove the file")]
    Active { path: PathBuf, reason: String },
}

impl RegistryError {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Unknown(_) => Kind::NotFound,
            Self::Manifest(_) | Self::Io(_) | Self::EncoderMismatch { .. } | Self::Active { .. } => Kind::Internal,
        }
    }
}

/// One model a gallery can be embedded with.
#[derive(Debug, Clone, Serialize)]
pub struct ModelVersion {
    pub version: String,
    /// `name@version`, as answers show it.
    pub model: String,
    /// What its embeddings and index dumps are stored under: `name@version#`
    /// and the first 16 hex digits of the encoder's SHA-256.
    #[serde(skip)]
    pub key: String,
    #[serde(skip)]
    pub encoder_sha256: String,
    /// The configured model the service was started with (not deletable, always listed).
    pub bundled: bool,
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub manifest: Manifest,
}

impl ModelVersion {
    fn read(dir: &Path, bundled: bool) -> Result<Self, RegistryError> {
        let manifest = Manifest::load(dir)?;
        let actual = file_sha256(&dir.join(ENCODER_FILE))?;
        if let Some(expected) = manifest.extra.get("encoder_sha256").and_then(|v| v.as_str()) {
            if expected != actual {
                let (dir, expected) = (dir.into(), expected.to_string());
                return Err(RegistryError::EncoderMismatch { dir, expected, actual });
            }
        }
        let model = manifest.model_key();
        Ok(Self {
            version: manifest.version.clone(),
            key: format!("{model}#{}", &actual[..16]),
            model,
            encoder_sha256: actual,
            bundled,
            dir: dir.into(),
            manifest,
        })
    }

    pub fn encoder_path(&self) -> PathBuf {
        self.dir.join(ENCODER_FILE)
    }
}

/// What marks the number of a deleted version as used.
const DELETED: &str = ".deleted";

/// The bundled model plus the versions saved under the data directory.
#[derive(Debug, Clone)]
pub struct Registry {
    bundled_dir: PathBuf,
    versions_dir: PathBuf,
}

impl Registry {
    pub fn new(bundled_dir: &Path, data_dir: &Path) -> Self {
        Self { bundled_dir: bundled_dir.into(), versions_dir: data_dir.join(MODELS_DIR) }
    }

    /// Every version, the bundled one first, then saved ones by version number.
    /// A saved folder that does not read is skipped with a warning.
    pub fn list(&self) -> Result<Vec<ModelVersion>, RegistryError> {
        let bundled = ModelVersion::read(&self.bundled_dir, true)?;
        let mut saved = Vec::new();
        if self.versions_dir.is_dir() {
            for entry in fs::read_dir(&self.versions_dir)? {
                let path = entry?.path();
                let is_temp = path.extension().is_some_and(|e| e == "tmp");
                if !path.is_dir() || is_temp {
                    continue;
                }
                match ModelVersion::read(&path, false) {
                    Ok(v) if v.version != bundled.version && v.manifest.name == bundled.manifest.name => saved.push(v),
                    Ok(v) => {
                        tracing::warn!(dir = %path.display(), model = %v.model, "skipping a saved model of another base")
                    }
                    Err(error) => tracing::warn!(dir = %path.display(), %error, "skipping an unreadable model version"),
                }
            }
        }
        saved.sort_by_key(|v| (version_number(&v.version), v.version.clone()));
        Ok(std::iter::once(bundled).chain(saved).collect())
    }

    pub fn get(&self, version: &str) -> Result<ModelVersion, RegistryError> {
        self.list()?.into_iter().find(|v| v.version == version).ok_or_else(|| RegistryError::Unknown(version.into()))
    }

    /// The version recorded as active, or the bundled one when none is
    /// recorded (or the recorded one is gone, with a warning). An `ACTIVE`
    /// file that cannot be read, or is empty, is an error: serving another
    /// model than the operator chose, without a word, would be worse.
    pub fn active(&self) -> Result<ModelVersion, RegistryError> {
        let versions = self.list()?;
        let path = self.versions_dir.join(ACTIVE_FILE);
        let recorded = match fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => {
                return Err(RegistryError::Active { path, reason: "the file is empty".into() })
            }
            Ok(text) => Some(text),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(RegistryError::Active { path, reason: e.to_string() }),
        };
        let wanted = recorded.as_deref().map(str::trim);
        if let Some(found) = wanted.and_then(|w| versions.iter().find(|v| v.version == w)) {
            return Ok(found.clone());
        }
        if let Some(missing) = wanted {
            tracing::warn!(version = missing, "the recorded active model version is missing; using the bundled model");
        }
        Ok(versions.into_iter().next().expect("the bundled version is always listed"))
    }

    /// Records `version` as active, durably.
    pub fn set_active(&self, version: &str) -> Result<(), RegistryError> {
        fs::create_dir_all(&self.versions_dir)?;
        Ok(write_atomic(&self.versions_dir.join(ACTIVE_FILE), version.as_bytes())?)
    }

    /// The id the next saved version gets: one above the highest numeric
    /// version, and above every numbered folder present (readable or not), so
    /// a save never collides with a folder left behind.
    pub fn next_version(&self) -> Result<String, RegistryError> {
        let listed = self.list()?.iter().filter_map(|v| v.version.parse::<u64>().ok()).max().unwrap_or(0);
        let mut highest = listed;
        if self.versions_dir.is_dir() {
            for entry in fs::read_dir(&self.versions_dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Ok(n) = name.trim_end_matches(".tmp").trim_end_matches(DELETED).parse::<u64>() {
                    highest = highest.max(n);
                }
            }
        }
        Ok((highest + 1).to_string())
    }

    /// Saves a new version numbered above both this folder's versions and
    /// `published`, the highest number the shared record of versions knows
    /// (deleted ones included), so no number is given out twice.
    pub fn save_above(
        &self,
        encoder: &Path,
        manifest: &Manifest,
        published: u64,
    ) -> Result<ModelVersion, RegistryError> {
        let local: u64 = self.next_version()?.parse().unwrap_or(1);
        let mut manifest = manifest.clone();
        manifest.version = local.max(published + 1).to_string();
        self.save(encoder, &manifest)
    }

    /// Saves an encoder file with its manifest (which records the file's
    /// SHA-256) as a new version. The folder appears complete or not at all.
    pub fn save(&self, encoder: &Path, manifest: &Manifest) -> Result<ModelVersion, RegistryError> {
        let mut manifest = manifest.clone();
        manifest.extra.insert("encoder_sha256".into(), file_sha256(encoder)?.into());
        let dir = self.versions_dir.join(&manifest.version);
        let temp = self.versions_dir.join(format!("{}.tmp", manifest.version));
        if temp.exists() {
            fs::remove_dir_all(&temp)?;
        }
        fs::create_dir_all(&temp)?;
        fs::copy(encoder, temp.join(ENCODER_FILE))?;
        File::open(temp.join(ENCODER_FILE))?.sync_all()?;
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        write_atomic(&temp.join("manifest.json"), &json)?;
        fs::rename(&temp, &dir)?;
        sync_dir(&self.versions_dir)?;
        ModelVersion::read(&dir, false)
    }
}

impl Registry {
    /// Deletes a saved version's folder, leaving `<version>.deleted` behind
    /// so that its number is never given to another version.
    pub fn remove(&self, version: &str) -> Result<(), RegistryError> {
        fs::create_dir_all(&self.versions_dir)?;
        let tombstone = self.versions_dir.join(format!("{version}{DELETED}"));
        if !tombstone.exists() {
            write_atomic(&tombstone, b"")?;
        }
        let dir = self.versions_dir.join(version);
        if dir.is_dir() {
            fs::remove_dir_all(&dir)?;
        }
        Ok(sync_dir(&self.versions_dir)?)
    }

    /// Saves a version another process made (cluster mode) from its
    /// encoder's bytes and manifest, under the manifest's version, replacing
    /// a folder of that version.
    pub fn install(&self, encoder: &[u8], manifest: &Manifest) -> Result<ModelVersion, RegistryError> {
        fs::create_dir_all(&self.versions_dir)?;
        let staged = self.versions_dir.join(format!("{}.encoder.tmp", manifest.version));
        write_atomic(&staged, encoder)?;
        let dir = self.versions_dir.join(&manifest.version);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        let saved = self.save(&staged, manifest);
        let _ = fs::remove_file(&staged);
        saved
    }
}

/// Hex SHA-256 of a file, read in a stream.
fn file_sha256(path: &Path) -> Result<String, RegistryError> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn version_number(version: &str) -> u64 {
    version.parse().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BUNDLED_MODEL_DIR;

    #[test]
    fn saved_versions_are_numbered_listed_and_activated() {
        let data = tempfile::tempdir().unwrap();
        let registry = Registry::new(Path::new(BUNDLED_MODEL_DIR), data.path());
        let bundled = registry.active().unwrap();
        assert!(bundled.bundled);
        assert_eq!(registry.list().unwrap().len(), 1);

        let version = registry.next_version().unwrap();
        assert_eq!(version.parse::<u64>().unwrap(), bundled.version.parse::<u64>().unwrap() + 1);
        let mut manifest = bundled.manifest.clone();
        manifest.version = version.clone();
        let saved = registry.save(&bundled.encoder_path(), &manifest).unwrap();
        assert_eq!(saved.model, format!("{}@{version}", manifest.name));
        assert_eq!(registry.list().unwrap().len(), 2);
        // Saving does not activate.
        assert_eq!(registry.active().unwrap().version, bundled.version);

        registry.set_active(&version).unwrap();
        assert_eq!(registry.active().unwrap().version, version);
        fs::remove_dir_all(&saved.dir).unwrap();
        assert_eq!(registry.active().unwrap().version, bundled.version, "a missing active version falls back");
        assert!(matches!(registry.get("nope"), Err(RegistryError::Unknown(_))));
    }

    #[test]
    fn a_left_over_folder_is_numbered_past_and_a_bad_active_file_is_an_error() {
        let data = tempfile::tempdir().unwrap();
        let registry = Registry::new(Path::new(BUNDLED_MODEL_DIR), data.path());
        let bundled = registry.active().unwrap();
        let skipped = bundled.version.parse::<u64>().unwrap() + 1;
        // An unreadable folder with the next number (a crash, or a hand-made copy).
        fs::create_dir_all(data.path().join(MODELS_DIR).join(skipped.to_string())).unwrap();
        assert_eq!(registry.next_version().unwrap(), (skipped + 1).to_string());

        fs::write(data.path().join(MODELS_DIR).join(ACTIVE_FILE), "  \n").unwrap();
        let error = registry.active().unwrap_err();
        assert!(matches!(error, RegistryError::Active { .. }) && error.to_string().contains("empty"), "{error}");
    }

    #[test]
    fn versions_are_keyed_by_their_encoder_and_checked_against_the_manifest() {
        let data = tempfile::tempdir().unwrap();
        let registry = Registry::new(Path::new(BUNDLED_MODEL_DIR), data.path());
        let bundled = registry.active().unwrap();
        assert!(
            bundled.key.starts_with(&format!("{}#", bundled.model))
                && bundled.key.ends_with(&bundled.encoder_sha256[..16])
        );

        // Another encoder under the bundled name and version: another key; a wrong recorded hash: refused.
        let copy = data.path().join("copy");
        fs::create_dir_all(&copy).unwrap();
        let mut manifest = bundled.manifest.clone();
        manifest.extra.remove("encoder_sha256");
        fs::write(copy.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let mut encoder = fs::read(bundled.encoder_path()).unwrap();
        encoder.extend_from_slice(b"another encoder");
        fs::write(copy.join(ENCODER_FILE), &encoder).unwrap();
        let other = Registry::new(&copy, data.path()).active().unwrap();
        assert_eq!(other.model, bundled.model);
        assert_ne!(other.key, bundled.key);
        manifest.extra.insert("encoder_sha256".into(), bundled.encoder_sha256.clone().into());
        fs::write(copy.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let refused = Registry::new(&copy, data.path()).active().unwrap_err();
        assert!(matches!(refused, RegistryError::EncoderMismatch { .. }), "{refused}");
    }
}
