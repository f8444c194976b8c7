//! Model versions: the bundled (configured) model and the versions fine-tuning
//! saved in the data directory, and which one is active.
//!
//! Layout: `<data>/models/<version>/{encoder.pt, manifest.json}` and
//! `<data>/models/ACTIVE` (the active version's id). Every write goes to a
//! temporary name, is fsynced and renamed, so a crash leaves either the old
//! state or the new one.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::files::{sync_dir, write_atomic};
use crate::manifest::{Manifest, ManifestError, ENCODER_FILE};

const MODELS_DIR: &str = "models";
const ACTIVE_FILE: &str = "ACTIVE";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("model versions: {0}")]
    Io(#[from] std::io::Error),
    #[error("no model version `{0}`")]
    Unknown(String),
}

/// One model a gallery can be embedded with.
#[derive(Debug, Clone, Serialize)]
pub struct ModelVersion {
    pub version: String,
    /// `name@version`: the key its embeddings are stored under.
    pub model: String,
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
        Ok(Self { version: manifest.version.clone(), model: manifest.model_key(), bundled, dir: dir.into(), manifest })
    }

    pub fn encoder_path(&self) -> PathBuf {
        self.dir.join(ENCODER_FILE)
    }
}

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

    /// The version recorded as active, or the bundled one when none is (or the
    /// recorded one is gone).
    pub fn active(&self) -> Result<ModelVersion, RegistryError> {
        let versions = self.list()?;
        let recorded = fs::read_to_string(self.versions_dir.join(ACTIVE_FILE)).ok();
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

    /// The id the next saved version gets: one above the highest numeric one.
    pub fn next_version(&self) -> Result<String, RegistryError> {
        let highest = self.list()?.iter().filter_map(|v| v.version.parse::<u64>().ok()).max().unwrap_or(0);
        Ok((highest + 1).to_string())
    }

    /// Saves an encoder file with its manifest as a new version. The folder
    /// appears complete or not at all.
    pub fn save(&self, encoder: &Path, manifest: &Manifest) -> Result<ModelVersion, RegistryError> {
        let dir = self.versions_dir.join(&manifest.version);
        let temp = self.versions_dir.join(format!("{}.tmp", manifest.version));
        if temp.exists() {
            fs::remove_dir_all(&temp)?;
        }
        fs::create_dir_all(&temp)?;
        fs::copy(encoder, temp.join(ENCODER_FILE))?;
        File::open(temp.join(ENCODER_FILE))?.sync_all()?;
        let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
        write_atomic(&temp.join("manifest.json"), &json)?;
        fs::rename(&temp, &dir)?;
        sync_dir(&self.versions_dir)?;
        ModelVersion::read(&dir, false)
    }
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
}
