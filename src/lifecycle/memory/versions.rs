//! Saved model versions of the in-memory cluster: published by one
//! replica, installed by the others, deleted for all.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::MemoryReplica;
use crate::lifecycle::ports::{PortResult, VersionStore};
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry};

#[async_trait::async_trait]
impl VersionStore for MemoryReplica {
    async fn publish(
        &self,
        registry: &Registry,
        weights: &Path,
        manifest: Manifest,
        fence: i64,
    ) -> PortResult<ModelVersion> {
        let _numbering = self.cluster.numbering.lock().await;
        let published = {
            let shared = self.shared();
            Self::check_fence(&shared, fence)?;
            let deleted = shared.deleted.iter().filter_map(|v| v.parse::<u64>().ok());
            shared.versions.keys().copied().chain(deleted).max().unwrap_or(0)
        };
        let (registry, weights) = (registry.clone(), weights.to_path_buf());
        let saved = tokio::task::spawn_blocking(move || registry.save_above(&weights, &manifest, published))
            .await
            .map_err(std::io::Error::other)??;
        if let Ok(number) = saved.version.parse() {
            self.shared().versions.insert(number, saved.dir.clone());
        }
        Ok(saved)
    }

    async fn delete(&self, registry: &Registry, version: &str, fence: i64) -> PortResult<()> {
        {
            let mut shared = self.shared();
            Self::check_fence(&shared, fence)?;
            shared.versions.retain(|number, _| number.to_string() != version);
            shared.deleted.push(version.to_string());
        }
        let (registry, version) = (registry.clone(), version.to_string());
        tokio::task::spawn_blocking(move || registry.remove(&version)).await.map_err(std::io::Error::other)??;
        Ok(())
    }

    async fn install(&self, registry: &Registry) -> PortResult<()> {
        let (published, deleted): (Vec<PathBuf>, Vec<String>) = {
            let shared = self.shared();
            (shared.versions.values().cloned().collect(), shared.deleted.clone())
        };
        let registry = registry.clone();
        tokio::task::spawn_blocking(move || {
            for version in deleted {
                registry.remove(&version)?;
            }
            let local: Vec<(String, String)> =
                registry.list()?.into_iter().map(|v| (v.version, v.encoder_sha256)).collect();
            for dir in published {
                let manifest = Manifest::load(&dir).map_err(crate::registry::RegistryError::from)?;
                let sha = manifest.extra.get("encoder_sha256").and_then(Value::as_str).unwrap_or_default();
                if local.iter().any(|(v, s)| *v == manifest.version && s == sha) {
                    continue;
                }
                let encoder = std::fs::read(dir.join(crate::manifest::ENCODER_FILE))?;
                registry.install(&encoder, &manifest)?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
