//! The model versions' lifecycle: listing them, saving a fine-tuned one,
//! activating one, and the one-at-a-time slot that fine-tunes and
//! activations share. Registry calls touch the disk: they run on blocking threads.

use std::path::PathBuf;

use serde_json::Value;

use super::{Catalog, CatalogError, VersionInfo};
use crate::cluster::LifecycleLock;
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry, RegistryError};

/// What holds the one-at-a-time slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotHolder {
    /// A fine-tune job, by id.
    Job(String),
    /// A model activation (`POST /admin/models/{version}/activate`), by id.
    Activation(String),
}

impl std::fmt::Display for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Job(id) => write!(f, "job {id}"),
            Self::Activation(id) => write!(f, "model activation {id}"),
        }
    }
}

impl SlotHolder {
    /// How the cluster's lifecycle row names it.
    fn key(&self) -> String {
        match self {
            Self::Job(id) => format!("job:{id}"),
            Self::Activation(id) => format!("activation:{id}"),
        }
    }

    fn from_key(key: &str) -> Self {
        match key.split_once(':') {
            Some(("activation", id)) => Self::Activation(id.to_string()),
            Some((_, id)) => Self::Job(id.to_string()),
            None => Self::Job(key.to_string()),
        }
    }
}

/// The slot, held; frees it when dropped (in cluster mode, with the cluster's lifecycle lock).
pub struct Slot {
    catalog: Catalog,
    _cluster: Option<LifecycleLock>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.catalog.lifecycle.lock().expect("lifecycle lock") = None;
    }
}

impl Catalog {
    /// Takes the one-at-a-time slot for `holder`, or says who has it. In
    /// cluster mode the slot is the cluster's: one fine-tune or activation
    /// across every replica.
    pub async fn claim(&self, holder: SlotHolder) -> Result<Slot, CatalogError> {
        {
            let mut slot = self.lifecycle.lock().expect("lifecycle lock");
            if let Some(busy) = slot.as_ref() {
                return Err(CatalogError::Busy(busy.clone()));
            }
            *slot = Some(holder.clone());
        }
        let mut slot = Slot { catalog: self.clone(), _cluster: None }; // dropped on an error: frees the local slot
        if let Some(cluster) = &self.cluster {
            match cluster.lock_lifecycle(&holder.key()).await? {
                Ok(lock) => slot._cluster = Some(lock),
                Err(other) => return Err(CatalogError::Busy(SlotHolder::from_key(&other))),
            }
        }
        Ok(slot)
    }

    /// Who holds the slot now.
    pub fn slot_holder(&self) -> Option<SlotHolder> {
        self.lifecycle.lock().expect("lifecycle lock").clone()
    }

    /// Every model version, the bundled one first, with how much of the
    /// gallery each has embedded.
    pub async fn versions(&self) -> Result<Vec<VersionInfo>, CatalogError> {
        if let Some(cluster) = &self.cluster {
            cluster.install_versions(&self.registry).await?;
        }
        let versions = self.with_registry(|registry| registry.list()).await?;
        let active = self.active().version.version.clone();
        let mut infos = Vec::with_capacity(versions.len());
        for v in versions {
            let embedded_items = self.store.count_embedded(v.key.clone()).await?;
            infos.push(VersionInfo {
                active: v.version == active,
                parent: v.manifest.extra.get("parent").and_then(Value::as_str).map(str::to_string),
                verification_threshold: v.manifest.verification_threshold,
                finetune: v.manifest.extra.get("finetune").cloned(),
                embedded_items,
                version: v.version,
                model: v.model,
                bundled: v.bundled,
            });
        }
        Ok(infos)
    }

    /// Saves trained weights as the next version number, with `manifest`
    /// (whose version it sets). Does not activate it.
    pub async fn save_version(&self, weights: PathBuf, mut manifest: Manifest) -> Result<ModelVersion, CatalogError> {
        if let Some(cluster) = &self.cluster {
            return Ok(cluster.publish_version(&self.registry, &weights, manifest).await?);
        }
        self.with_registry(move |registry| {
            manifest.version = registry.next_version()?;
            registry.save(&weights, &manifest)
        })
        .await
    }

    pub(super) async fn with_registry<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, CatalogError> {
        registry_call(&self.registry, f).await
    }
}

/// Runs a registry call (it reads and writes model folders) on a blocking thread.
pub(super) async fn registry_call<T: Send + 'static>(
    registry: &Registry,
    f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, CatalogError> {
    let registry = registry.clone();
    Ok(tokio::task::spawn_blocking(move || f(&registry)).await??)
}
