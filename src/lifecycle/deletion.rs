//! Deleting a saved model version for every replica, with its embeddings
//! and its index, unless something still needs it.

use serde::Serialize;
use serde_json::Value;

use super::{follower, registry_call, LifecycleError, ModelLifecycle, SlotHolder};
use crate::catalog::CatalogError;
use crate::registry::ModelVersion;

/// A deleted model version, as `DELETE /admin/models/{version}` answers.
#[derive(Debug, Clone, Serialize)]
pub struct DeletedVersion {
    pub version: String,
    pub model: String,
    /// Its embeddings of gallery items, deleted with it.
    pub embeddings_deleted: u64,
}

impl ModelLifecycle {
    /// Deletes a saved version with its embeddings and its index, for every
    /// replica. Refused for the bundled model, the replicas' active version
    /// and its parent (the rollback target), a version a switch prepares and
    /// one a live replica still serves; holds the one-at-a-time slot
    /// meanwhile, so no switch can pick it. Runs on a task of its own: a
    /// client that goes away cannot stop it halfway. The embeddings and the
    /// index go first, so a deletion cut short by a failure can be asked again.
    pub async fn delete_version(&self, version: &str) -> Result<DeletedVersion, LifecycleError> {
        let (lifecycle, version) = (self.clone(), version.to_string());
        tokio::spawn(async move { lifecycle.delete_here(&version).await }).await?
    }

    async fn delete_here(&self, version: &str) -> Result<DeletedVersion, LifecycleError> {
        self.saved_version(version).await?;
        let slot = self.claim(SlotHolder::Deletion(version.to_string())).await?;
        let target = self.saved_version(version).await?; // a deletion may have run meanwhile
        if let Some(why) = self.in_use(&target).await? {
            return Err(LifecycleError::InUse(target.version, why));
        }
        let embeddings_deleted =
            self.ctx.catalog.store().forget_model(target.key.clone()).await.map_err(CatalogError::from)?;
        if let Err(error) = self.ctx.indexes.forget(&target.key).await {
            tracing::warn!(%error, version = %target.version, "could not remove the deleted version's index");
        }
        self.ctx.ports.versions.delete(&self.ctx.registry, &target.version, slot.fence().token).await?;
        tracing::info!(version = %target.version, embeddings_deleted, "model version deleted");
        Ok(DeletedVersion { version: target.version, model: target.model, embeddings_deleted })
    }

    /// Why `target` must not be deleted now, if it must not.
    async fn in_use(&self, target: &ModelVersion) -> Result<Option<&'static str>, LifecycleError> {
        let state = self.ctx.ports.coordinator.state().await?;
        let wanted = state.active.clone();
        let active = registry_call(&self.ctx.registry, move |r| follower::version_or_bundled(r, wanted)).await?;
        let parent = active.manifest.extra.get("parent").and_then(Value::as_str);
        let models = self.ctx.catalog.models();
        let here =
            [models.next(), models.previous()].into_iter().flatten().any(|m| m.version.version == target.version);
        let served = self.ctx.ports.membership.served().await?.contains(&target.version);
        Ok(if target.bundled {
            Some("it is the bundled model")
        } else if active.version == target.version || self.active_version().version == target.version {
            Some("it is the active version")
        } else if parent == Some(target.version.as_str()) {
            Some("it is the active version's parent, the rollback target")
        } else if state.target.is_some_and(|(v, _)| v == target.version) || here || served {
            Some("a replica serves it or is preparing it")
        } else {
            None
        })
    }
}
