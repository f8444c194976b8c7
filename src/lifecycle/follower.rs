//! A replica's side of the two-phase switch (`switch` is the switching
//! replica's side). Every replica, the switching one included, runs a
//! follower:
//!
//! 1. When a target version is published, it loads the target's encoder,
//!    from then on embeds its uploads with both models, helps embed the
//!    gallery (with a shared store, by claiming chunks of items that lack
//!    the target's embedding, at bulk priority), and says it is ready once
//!    nothing is left.
//! 2. When the active version flips, it swaps its active model, and embeds
//!    its uploads with the model it switched from too until no live replica
//!    serves that one: a replica yet to learn the flip finds them.
//!
//! A replica that dies drops its claims with its connection and its
//! heartbeat stops: the others take its chunks and the switch stops waiting
//! for it. A request takes the active model once, so it embeds and searches
//! with one version even while the flip goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::ports::{ClusterState, POLL};
use super::{registry_call, Context, LifecycleError};
use crate::catalog::active::{retire, ActiveModel, Pass};
use crate::catalog::reconcile::reconcile;
use crate::registry::{ModelVersion, Registry, RegistryError};

/// Follows the replicas' model lifecycle; cheap to clone.
#[derive(Clone)]
pub(super) struct Follower {
    ctx: Arc<Context>,
    /// One step at a time (the follower's loop and a switch's own).
    steps: Arc<tokio::sync::Mutex<()>>,
    /// While this replica prepares a switch: its work is progress even
    /// when no embedding is stored (an index built from stored ones).
    preparing: Arc<AtomicBool>,
}

impl Follower {
    pub(super) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx, steps: Arc::default(), preparing: Arc::default() }
    }

    /// Whether this replica is preparing a switch now.
    pub(super) fn is_preparing(&self) -> bool {
        self.preparing.load(Ordering::Relaxed)
    }

    /// Before serving: says this replica is alive and takes one look, so
    /// that a switch under way counts it (and it embeds its uploads with the
    /// next model) before its first upload.
    pub(super) async fn join(&self) -> Result<(), LifecycleError> {
        let serving = self.ctx.catalog.models().active().version.version.clone();
        self.ctx.ports.membership.heartbeat(&serving).await?;
        self.step().await
    }

    /// Says this replica is alive every `POLL`, and follows the switches,
    /// woken by the coordinator or its poll interval (or `POLL` after a
    /// failed step). Runs until the process ends.
    pub(super) async fn run(self) {
        let heartbeat = self.clone();
        tokio::spawn(async move {
            loop {
                let serving = heartbeat.ctx.catalog.models().active().version.version.clone();
                if let Err(error) = heartbeat.ctx.ports.membership.heartbeat(&serving).await {
                    tracing::warn!(%error, "cannot tell the cluster this replica is alive");
                }
                tokio::time::sleep(POLL).await;
            }
        });
        let changed = self.ctx.ports.coordinator.changed();
        loop {
            let notified = changed.notified();
            let wait = match self.step().await {
                Ok(()) => self.ctx.ports.membership.poll_interval(),
                Err(error) => {
                    tracing::warn!(%error, "cannot follow the cluster's model lifecycle; trying again");
                    Some(POLL)
                }
            };
            match wait {
                Some(wait) => tokio::select! {
                    () = notified => {},
                    () = tokio::time::sleep(wait) => {},
                },
                None => notified.await,
            }
        }
    }

    /// One look: swaps to a version that was flipped active, prepares for a
    /// switch under way, drops the previous model once every replica has
    /// swapped, and embeds whatever the active model still lacks (normally nothing).
    pub(super) async fn step(&self) -> Result<(), LifecycleError> {
        let _step = self.steps.lock().await;
        let models = self.ctx.catalog.models();
        let state = self.ctx.ports.coordinator.state().await?;
        let serving = models.active().version.clone();
        if flipped(&state, &serving) {
            self.follow_flip(state.active.clone()).await?;
        }
        let active = models.active();
        match state.target {
            Some((version, switch_id)) if version != active.version.version => {
                // Given up while it prepared: not an error, the next step drops the model.
                match self.prepare_next(version, &switch_id).await {
                    Err(e) if e.is_cancelled() => {}
                    other => other?,
                }
            }
            _ => {
                if let Some(next) = models.replace_next(None) {
                    tracing::info!(version = %next.version.version, "the switch was given up; dropping its model");
                    retire(next);
                }
            }
        }
        self.retire_previous(&active).await?;
        let store = self.ctx.catalog.store().as_ref();
        active.embed_missing(store, Pass::Background, &AtomicBool::new(false)).await?;
        Ok(())
    }

    /// Phase one on this replica: loads the target (once), embeds uploads
    /// with it too, helps embed the gallery, and says it is ready.
    async fn prepare_next(&self, version: String, switch_id: &str) -> Result<(), LifecycleError> {
        let coordinator = &self.ctx.ports.coordinator;
        let given_up = watch_switch(self.ctx.clone(), switch_id.to_string());
        self.preparing.store(true, Ordering::Relaxed);
        let prepared = async {
            let models = self.ctx.catalog.models();
            let model = match models.next() {
                Some(next) if next.version.version == version => next,
                _ => {
                    tracing::info!(%version, switch = switch_id, "preparing a model switch");
                    let model = match models.previous() {
                        // A rollback soon after a switch: the model switched from is still loaded.
                        Some(previous) if previous.version.version == version => previous,
                        _ => self.start_model(Some(version.clone())).await?,
                    };
                    // Uploads under way finish first: every later one is embedded with both models.
                    let exclusive = models.write_exclusive().await;
                    if let Some(old) = models.replace_next(Some(model.clone())) {
                        retire(old);
                    }
                    drop(exclusive);
                    model
                }
            };
            let store = self.ctx.catalog.store().as_ref();
            model.embed_missing(store, Pass::Background, &given_up.0).await?;
            reconcile(store, &model).await?;
            model.index.prepare().await.map_err(crate::catalog::CatalogError::from)?;
            coordinator.ready(switch_id).await?;
            Ok::<_, LifecycleError>(())
        }
        .await;
        self.preparing.store(false, Ordering::Relaxed);
        given_up.1.abort();
        if let Err(error) = &prepared {
            if !error.worth_retrying() && !error.is_cancelled() {
                tracing::error!(%error, %version, "cannot prepare the model switch");
                coordinator.failed(switch_id, &error.to_string()).await?;
            }
        }
        prepared
    }

    /// Phase two on this replica: serves the version the cluster flipped to.
    async fn follow_flip(&self, version: Option<String>) -> Result<(), LifecycleError> {
        let (models, store) = (self.ctx.catalog.models(), self.ctx.catalog.store().as_ref());
        let model = match models.replace_next(None) {
            Some(next) if Some(&next.version.version) == version.as_ref() => next,
            other => {
                // This replica did not prepare it (it was not live then): embed what it lacks first.
                if let Some(other) = other {
                    retire(other);
                }
                let model = self.start_model(version).await?;
                model.embed_missing(store, Pass::Background, &AtomicBool::new(false)).await?;
                model
            }
        };
        let exclusive = models.write_exclusive().await;
        let caught_up = async {
            // Uploads acknowledged before this replica embedded them with both
            // models, and deletes since it prepared (normally none).
            model.embed_missing(store, Pass::Final, &AtomicBool::new(false)).await?;
            reconcile(store, &model).await?;
            model.index.prepare().await.map_err(crate::catalog::CatalogError::from)?;
            let id = model.version.version.clone();
            registry_call(&self.ctx.registry, move |r| r.set_active(&id)).await
        }
        .await;
        if let Err(error) = caught_up {
            models.replace_next(Some(model)); // kept for the next try
            return Err(error);
        }
        let previous = models.swap_active(model.clone(), &exclusive);
        // Kept for uploads until no other replica serves it (`retire_previous`).
        if let Some(older) = models.replace_previous(previous) {
            retire(older);
        }
        drop(exclusive);
        tracing::info!(version = %model.version.version, model = %model.name(), "model switched");
        // At once, not at the next heartbeat: the others (and a deletion) read what it serves.
        if let Err(error) = self.ctx.ports.membership.heartbeat(&model.version.version).await {
            tracing::warn!(%error, "cannot tell the cluster which version this replica serves");
        }
        Ok(())
    }

    /// Drops the model switched from once no other live replica serves it:
    /// until then its searches are among that model's vectors, so this
    /// replica's uploads are embedded with it too.
    async fn retire_previous(&self, active: &ActiveModel) -> Result<(), LifecycleError> {
        let models = self.ctx.catalog.models();
        if models.previous().is_none() || self.ctx.ports.membership.lagging(&active.version.version).await? > 0 {
            return Ok(());
        }
        if let Some(previous) = models.take_previous() {
            tracing::info!(version = %previous.version.version, "every replica serves the new version; dropping the previous model");
            retire(previous);
        }
        Ok(())
    }

    /// Starts the workers of a version (`None`: the bundled one), installing it from the other replicas first.
    async fn start_model(&self, version: Option<String>) -> Result<Arc<ActiveModel>, LifecycleError> {
        self.ctx.ports.versions.install(&self.ctx.registry).await?;
        let version = registry_call(&self.ctx.registry, move |r| version_or_bundled(r, version)).await?;
        let store = self.ctx.catalog.store();
        let capacity = store.count().await.map_err(crate::catalog::CatalogError::from)? as usize;
        let index = self.ctx.indexes.create(&version.key, version.manifest.embedding.dim, capacity);
        let (settings, unembeddable) = (self.ctx.catalog.settings(), self.ctx.catalog.models().unembeddable());
        Ok(Arc::new(ActiveModel::start(version, settings, index, unembeddable).await?))
    }
}

/// Whether the cluster's active version is not the one serving here.
fn flipped(state: &ClusterState, serving: &ModelVersion) -> bool {
    match &state.active {
        Some(version) => *version != serving.version,
        None => !serving.bundled,
    }
}

/// A saved version by id, or the bundled one for `None`.
pub(super) fn version_or_bundled(registry: &Registry, version: Option<String>) -> Result<ModelVersion, RegistryError> {
    match version {
        Some(version) => registry.get(&version),
        None => Ok(registry.list()?.remove(0)),
    }
}

/// Watches the coordinator and sets the flag once `switch_id` is no longer
/// the switch under way (cancelled, failed, or replaced): a replica's share
/// of the work stops at its next chunk.
fn watch_switch(ctx: Arc<Context>, switch_id: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let given_up = Arc::new(AtomicBool::new(false));
    let flag = given_up.clone();
    let watcher = tokio::spawn(async move {
        let changed = ctx.ports.coordinator.changed();
        loop {
            let notified = changed.notified();
            if let Ok(state) = ctx.ports.coordinator.state().await {
                if state.target.is_none_or(|(_, id)| id != switch_id) {
                    flag.store(true, Ordering::Relaxed);
                    return;
                }
            }
            tokio::select! {
                () = notified => {},
                () = tokio::time::sleep(POLL) => {},
            }
        }
    });
    (given_up, watcher)
}
