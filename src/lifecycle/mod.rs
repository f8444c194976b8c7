//! The model lifecycle: which versions exist, which one serves, and changing
//! it without stopping service. It owns the one-at-a-time slot of fine-tunes
//! and activations, saving versions, activations, the two-phase switch
//! (`switch`) and each replica's follower (`follower`); it changes the
//! catalog's serving models, and the catalog only serves requests.
//!
//! What it shares with other replicas goes through five ports (`ports`):
//! `memory` in a single-node service (a one-replica cluster whose switch
//! flips as soon as its own follower is ready) and `crate::cluster` over
//! PostgreSQL. There is one code path for both.

mod activation;
mod deletion;
mod follower;
pub mod memory;
pub mod ports;
pub mod runs;
mod slot;
mod switch;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

pub use activation::{ActivationState, ActivationStatus};
pub use deletion::DeletedVersion;
pub use ports::{PortError, Ports, POLL};
pub use runs::{RunStatus, Runs};
pub use slot::{Finishing, Slot, SlotHolder};

use crate::catalog::{Catalog, CatalogError, Progress, Switched};
use crate::error_kind::ErrorKind;
use crate::index::IndexProvider;
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry, RegistryError};
use activation::Activations;
use follower::Follower;
use slot::Slots;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("no model version `{0}`")]
    UnknownVersion(String),
    #[error("{0} is still running; wait for it or cancel it")]
    Busy(SlotHolder),
    #[error(transparent)]
    Models(#[from] RegistryError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("model switch: {0}")]
    Switch(String),
    #[error("version {0} cannot be deleted: {1}")]
    InUse(String, &'static str),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl LifecycleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Catalog(e) => e.kind(),
            Self::UnknownVersion(_) => ErrorKind::NotFound,
            Self::Busy(_) | Self::InUse(..) => ErrorKind::Conflict,
            Self::Port(e) => e.kind(),
            Self::Models(_) | Self::Switch(_) | Self::Task(_) => ErrorKind::Internal,
        }
    }

    /// A switch given up on request (or one replica's share of it).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Catalog(CatalogError::Cancelled))
    }

    /// A database away for a moment: worth trying again, not a failed
    /// preparation. (An embedding worker that stopped is not coming back.)
    fn worth_retrying(&self) -> bool {
        self.kind() == ErrorKind::Unavailable && !matches!(self, Self::Catalog(CatalogError::Embed(_)))
    }
}

/// One model version, as `GET /admin/models` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub version: String,
    pub model: String,
    pub bundled: bool,
    pub active: bool,
    pub parent: Option<String>,
    pub verification_threshold: Option<f32>,
    /// Gallery items with a stored embedding of this version (activating it re-embeds the rest).
    pub embedded_items: u64,
    /// For fine-tuned versions: the job, its parameters and validation figures.
    pub finetune: Option<Value>,
}

/// What the lifecycle's parts share.
pub(crate) struct Context {
    catalog: Catalog,
    indexes: Arc<dyn IndexProvider>,
    registry: Registry,
    ports: Ports,
}

/// Cheap-clone handle on the model lifecycle of one replica.
#[derive(Clone)]
pub struct ModelLifecycle {
    ctx: Arc<Context>,
    follower: Follower,
    slots: Slots,
    runs: Runs,
    activations: Arc<Activations>,
}

impl ModelLifecycle {
    /// At start, before the catalog opens: installs the versions other
    /// replicas saved and records the replicas' active version as this
    /// one's. Returns the version to open the catalog on.
    pub async fn adopt_active_version(ports: &Ports, registry: &Registry) -> Result<ModelVersion, LifecycleError> {
        ports.versions.install(registry).await?;
        let wanted = ports.coordinator.state().await?.active;
        let version = registry_call(registry, move |r| follower::version_or_bundled(r, wanted)).await?;
        let id = version.version.clone();
        // Written only when it changes: an ACTIVE that names a missing version stays as it is.
        registry_call(registry, move |r| if r.active()?.version == id { Ok(()) } else { r.set_active(&id) }).await?;
        Ok(version)
    }

    pub fn new(catalog: Catalog, indexes: Arc<dyn IndexProvider>, registry: Registry, ports: Ports) -> Self {
        let (slots, runs) = (Slots::new(ports.lock.clone()), Runs::new(ports.runs.clone()));
        let ctx = Arc::new(Context { catalog, indexes, registry, ports });
        Self { follower: Follower::new(ctx.clone()), ctx, slots, runs, activations: Arc::default() }
    }

    /// Before serving: joins the replicas and follows their lifecycle from then on.
    pub async fn join(&self) -> Result<(), LifecycleError> {
        self.follower.join().await?;
        tokio::spawn(self.follower.clone().run());
        Ok(())
    }

    /// At shutdown: a switch no longer waits for this replica.
    pub async fn leave(&self) -> Result<(), LifecycleError> {
        Ok(self.ctx.ports.membership.leave().await?)
    }

    /// This replica's id among the replicas.
    pub fn replica(&self) -> &str {
        self.ctx.ports.membership.replica()
    }

    /// Job and activation records readable from every replica.
    pub fn runs(&self) -> &Runs {
        &self.runs
    }

    /// The version serving now.
    pub fn active_version(&self) -> ModelVersion {
        self.ctx.catalog.active_version()
    }

    /// Takes the one-at-a-time slot for `holder` (one fine-tune or
    /// activation across every replica), or says who has it.
    pub async fn claim(&self, holder: SlotHolder) -> Result<Slot, LifecycleError> {
        self.slots.claim(holder).await
    }

    /// Who holds the slot in this process now.
    pub fn slot_holder(&self) -> Option<SlotHolder> {
        self.slots.holder()
    }

    /// Every model version, the bundled one first, with how much of the
    /// gallery each has embedded.
    pub async fn versions(&self) -> Result<Vec<VersionInfo>, LifecycleError> {
        self.ctx.ports.versions.install(&self.ctx.registry).await?;
        let versions = registry_call(&self.ctx.registry, |registry| registry.list()).await?;
        let active = self.active_version().version;
        let mut infos = Vec::with_capacity(versions.len());
        for v in versions {
            let embedded_items = self.ctx.catalog.count_embedded(v.key.clone()).await?;
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
    /// (whose version it sets), for every replica. Does not activate it.
    /// The caller holds the slot.
    pub async fn save_version(&self, weights: PathBuf, manifest: Manifest) -> Result<ModelVersion, LifecycleError> {
        let fence = self.slots.fence()?.token;
        Ok(self.ctx.ports.versions.publish(&self.ctx.registry, &weights, manifest, fence).await?)
    }

    /// A saved version (or the bundled one) by its name, after copying in
    /// those other replicas saved.
    async fn saved_version(&self, version: &str) -> Result<ModelVersion, LifecycleError> {
        self.ctx.ports.versions.install(&self.ctx.registry).await?;
        let wanted = version.to_string();
        registry_call(&self.ctx.registry, move |r| r.get(&wanted)).await.map_err(|e| match e {
            LifecycleError::Models(RegistryError::Unknown(v)) => LifecycleError::UnknownVersion(v),
            other => other,
        })
    }

    /// Makes `version` the active model on every replica without stopping
    /// service (`switch`). The caller holds the slot.
    pub async fn switch_to(
        &self,
        version: ModelVersion,
        progress: &(dyn Fn(Progress) + Sync),
        swapping: &(dyn Fn() + Sync),
        cancel: &AtomicBool,
    ) -> Result<Switched, LifecycleError> {
        let fence = self.slots.fence()?;
        switch::switch_to(&self.ctx, &self.follower, version, &fence, progress, swapping, cancel).await
    }

    /// Starts switching to a saved version (embedding the gallery with it
    /// first where its embeddings are not stored), holding the one-at-a-time
    /// slot until the switch ends. Returns at once: an unknown version or a
    /// busy slot is an error now, anything later is in the activation's status.
    /// Runs on a task of its own: a client that goes away while the activation
    /// is being recorded leaves it started, not queued forever.
    pub async fn activate(&self, version: &str) -> Result<ActivationStatus, LifecycleError> {
        let (lifecycle, version) = (self.clone(), version.to_string());
        tokio::spawn(async move { lifecycle.activate_here(&version).await }).await?
    }

    async fn activate_here(&self, version: &str) -> Result<ActivationStatus, LifecycleError> {
        self.saved_version(version).await?;
        let id = self.activations.new_id();
        let slot = self.claim(SlotHolder::Activation(id.clone())).await?;
        let target = self.saved_version(version).await?; // a deletion may have run meanwhile
        let sender = self.activations.begin(&id, &target.version);
        let first = sender.borrow().clone();
        if let Err(error) = self.runs.record(&first).await {
            let why = format!("could not record the activation: {error}");
            activation::finish(&sender, Err(LifecycleError::Switch(why)));
            return Err(error.into());
        }
        self.publish_activation(&sender);
        let active = self.ctx.catalog.serving();
        if active.version == target.version {
            let unembeddable = self.ctx.catalog.unembeddable();
            let (version, model) = (target.version, target.model);
            let items = active.indexed_items;
            slot.finishing().mark();
            activation::finish(
                &sender,
                Ok(Switched { version, model, embedded: 0, items, unembeddable, seconds: 0.0 }),
            );
            let done = sender.borrow().clone();
            self.runs.record_final(&done).await;
            drop(slot);
            return Ok(done);
        }
        tracing::info!(activation = %id, version = %target.version, "model activation started");
        let lifecycle = self.clone();
        let progress_sender = sender.clone();
        let switch = tokio::spawn(async move {
            let progress = move |p: Progress| progress_sender.send_modify(|status| status.progress = p);
            lifecycle.switch_to(target, &progress, &|| {}, &AtomicBool::new(false)).await
        });
        // Awaited by a second task, so that even a switch that panics ends its activation as failed.
        let runs = self.runs.clone();
        tokio::spawn(async move {
            let outcome = switch.await.map_err(LifecycleError::from).and_then(|outcome| outcome);
            slot.finishing().mark();
            activation::finish(&sender, outcome);
            let last = sender.borrow().clone();
            runs.record_final(&last).await;
            drop(slot);
        });
        Ok(self.activations.find(&id).expect("just begun").borrow().clone())
    }

    /// Copies an activation's status to the run log at every change until it ends.
    fn publish_activation(&self, sender: &tokio::sync::watch::Sender<ActivationStatus>) {
        let (runs, mut receiver) = (self.runs.clone(), sender.subscribe());
        tokio::spawn(async move {
            loop {
                let status = receiver.borrow_and_update().clone();
                runs.publish(&status);
                // A last change before the sender is dropped is still seen.
                if status.state != ActivationState::Running || receiver.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// An activation of any replica, by id (this process's live one first).
    pub async fn activation(&self, id: &str) -> Result<Option<ActivationStatus>, LifecycleError> {
        if let Some(status) = self.activations.find(id) {
            return Ok(Some(status.borrow().clone()));
        }
        Ok(self.runs.get(id).await?)
    }

    /// Every replica's activations, newest first.
    pub async fn activations(&self) -> Result<Vec<ActivationStatus>, LifecycleError> {
        let here = self.activations.list();
        let mut all: Vec<ActivationStatus> = self.runs.list().await?;
        for status in here {
            // This process's own, as it stands now, over what the log last recorded.
            all.retain(|r| r.id != status.id);
            all.push(status);
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.started_at));
        Ok(all)
    }

    /// Waits for an activation of this process to end and returns how it ended.
    pub async fn activation_finished(&self, id: &str) -> Option<ActivationStatus> {
        let mut receiver = self.activations.find(id)?;
        let status = receiver.wait_for(|s| s.state != ActivationState::Running).await.ok()?.clone();
        Some(status)
    }
}

/// Runs a registry call (it reads and writes model folders) on a blocking thread.
pub(crate) async fn registry_call<T: Send + 'static>(
    registry: &Registry,
    f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, LifecycleError> {
    let registry = registry.clone();
    Ok(tokio::task::spawn_blocking(move || f(&registry)).await??)
}
