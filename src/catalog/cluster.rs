//! Cluster mode's model switch, in two phases across every replica.
//!
//! 1. The replica that switches (after a fine-tune, or for an activation)
//!    publishes the target version. Every replica, in its follower loop
//!    (`follow_cluster`), loads the target's encoder, from then on embeds
//!    its uploads with both models, helps embed the gallery by claiming
//!    chunks of items that lack the target's embedding (at bulk priority,
//!    `GalleryStore::claim_missing`), and says it is ready once nothing is
//!    left to claim.
//! 2. When every live replica is ready and no item lacks the embedding, the
//!    switching replica flips the active version in one transaction and
//!    notifies; each replica swaps its active model as it learns the flip,
//!    and embeds its uploads with the model it switched from too until no
//!    live replica serves that one: a replica yet to learn the flip finds them.
//!
//! A replica that dies drops its claims with its connection and its
//! heartbeat stops: the others take its chunks and the switch stops waiting
//! for it. A request takes the active model once (`Catalog::active`), so it
//! embeds and searches with one version even while the flip goes on.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::active::{retire, ActiveModel, Pass};
use super::models::registry_call;
use super::{Catalog, CatalogError, Progress, Switched};
use crate::cluster::{ClusterLink, POLL};
use crate::metrics;
use crate::registry::{ModelVersion, Registry};

/// How long the switching replica waits, after the flip, for its own swap
/// before it reports the switch done anyway (its follower goes on trying).
const OWN_SWAP_WAIT: Duration = Duration::from_secs(120);
/// A switch in which no item got embedded and no replica became ready for
/// this long fails (a replica that keeps retrying, say), freeing the lifecycle.
const STALLED: Duration = Duration::from_secs(600);

/// At start: installs the versions other replicas saved and records the
/// cluster's active version as this replica's, so the catalog opens on it.
pub(super) async fn adopt_active_version(cluster: &ClusterLink, registry: &Registry) -> Result<(), CatalogError> {
    cluster.install_versions(registry).await?;
    let wanted = cluster.state().await?.active;
    let version = registry_call(registry, move |r| version_or_bundled(r, wanted)).await?;
    let id = version.version.clone();
    registry_call(registry, move |r| r.set_active(&id)).await?;
    Ok(())
}

/// A saved version by id, or the bundled one for `None`.
fn version_or_bundled(
    registry: &Registry,
    version: Option<String>,
) -> Result<ModelVersion, crate::registry::RegistryError> {
    match version {
        Some(version) => registry.get(&version),
        None => Ok(registry.list()?.remove(0)),
    }
}

impl Catalog {
    /// Cluster mode's lifecycle, if this catalog is a replica's.
    pub fn cluster(&self) -> Option<Arc<ClusterLink>> {
        self.cluster.clone()
    }

    /// Cluster mode, before serving: says this replica is alive and takes
    /// one look at the cluster, so that a switch under way counts it (and it
    /// embeds its uploads with the next model) before its first upload.
    pub async fn join_cluster(&self) -> Result<(), CatalogError> {
        let Some(cluster) = self.cluster.clone() else { return Ok(()) };
        cluster.heartbeat(&self.active().version.version).await?;
        self.cluster_step().await
    }

    /// Cluster mode: says this replica is alive every `POLL`, and follows the
    /// cluster's switches, woken by notifications or the poll. Runs until the
    /// process ends.
    pub async fn follow_cluster(self) {
        let Some(cluster) = self.cluster.clone() else { return };
        let (heartbeat, link) = (self.clone(), cluster.clone());
        tokio::spawn(async move {
            loop {
                let serving = heartbeat.active().version.version.clone();
                if let Err(error) = link.heartbeat(&serving).await {
                    tracing::warn!(%error, "cannot tell the cluster this replica is alive");
                }
                tokio::time::sleep(POLL).await;
            }
        });
        loop {
            let changed = cluster.changed.notified();
            if let Err(error) = self.cluster_step().await {
                tracing::warn!(%error, "cannot follow the cluster's model lifecycle; trying again");
            }
            tokio::select! {
                () = changed => {},
                () = tokio::time::sleep(POLL) => {},
            }
        }
    }

    /// One look at the cluster: swaps to a version that was flipped active,
    /// prepares for a switch under way, drops the previous model once every
    /// replica has swapped, and embeds whatever the active model still lacks
    /// (normally nothing).
    async fn cluster_step(&self) -> Result<(), CatalogError> {
        let cluster = self.cluster.clone().expect("cluster mode");
        let _step = self.cluster_steps.lock().await;
        let state = cluster.state().await?;
        let serving = self.active().version.clone();
        let flipped = match &state.active {
            Some(version) => *version != serving.version,
            None => !serving.bundled,
        };
        if flipped {
            self.follow_flip(&cluster, state.active.clone()).await?;
        }
        let active = self.active();
        match state.target {
            Some((version, switch_id)) if version != active.version.version => {
                // Given up while it prepared: not an error, the next step drops the model.
                match self.prepare_next(&cluster, version, &switch_id).await {
                    Err(CatalogError::Cancelled) => {}
                    other => other?,
                }
            }
            _ => {
                if let Some(next) = self.next.swap(None) {
                    tracing::info!(version = %next.version.version, "the switch was given up; dropping its model");
                    retire(next);
                }
            }
        }
        self.retire_previous(&cluster, &active).await?;
        active.embed_missing(self.store.as_ref(), Pass::Background, &|_| {}, &AtomicBool::new(false)).await?;
        Ok(())
    }

    /// Phase one on this replica: loads the target (once), embeds uploads
    /// with it too, helps embed the gallery, and says it is ready.
    async fn prepare_next(
        &self,
        cluster: &Arc<ClusterLink>,
        version: String,
        switch_id: &str,
    ) -> Result<(), CatalogError> {
        let given_up = watch_switch(cluster.clone(), switch_id.to_string());
        let prepared = async {
            let model = match self.next.load_full() {
                Some(next) if next.version.version == version => next,
                _ => {
                    tracing::info!(%version, switch = switch_id, "preparing a cluster-wide model switch");
                    let model = match self.previous.load_full() {
                        // A rollback soon after a switch: the model switched from is still loaded.
                        Some(previous) if previous.version.version == version => previous,
                        _ => self.start_model(cluster, Some(version.clone())).await?,
                    };
                    // Uploads under way finish first: every later one is embedded with both models.
                    let exclusive = self.writes.clone().write_owned().await;
                    if let Some(old) = self.next.swap(Some(model.clone())) {
                        retire(old);
                    }
                    drop(exclusive);
                    model
                }
            };
            model.embed_missing(self.store.as_ref(), Pass::Background, &|_| {}, &given_up.0).await?;
            model.index.prepare().await?;
            cluster.ready(switch_id).await?;
            Ok::<_, CatalogError>(())
        }
        .await;
        given_up.1.abort();
        if let Err(error) = &prepared {
            if !unavailable(error) && !matches!(error, CatalogError::Cancelled) {
                tracing::error!(%error, %version, "cannot prepare the model switch");
                cluster.failed(switch_id, &error.to_string()).await?;
            }
        }
        prepared
    }

    /// Phase two on this replica: serves the version the cluster flipped to.
    async fn follow_flip(&self, cluster: &ClusterLink, version: Option<String>) -> Result<(), CatalogError> {
        let model = match self.next.swap(None) {
            Some(next) if Some(&next.version.version) == version.as_ref() => next,
            other => {
                // This replica did not prepare it (it was not live then): embed what it lacks first.
                if let Some(other) = other {
                    retire(other);
                }
                let model = self.start_model(cluster, version).await?;
                let store = self.store.as_ref();
                model.embed_missing(store, Pass::Background, &|_| {}, &AtomicBool::new(false)).await?;
                model
            }
        };
        let exclusive = self.writes.clone().write_owned().await;
        let caught_up = async {
            // Uploads this replica acknowledged before it dual-wrote (normally none).
            model.embed_missing(self.store.as_ref(), Pass::Final, &|_| {}, &AtomicBool::new(false)).await?;
            model.index.prepare().await?;
            let id = model.version.version.clone();
            self.with_registry(move |r| r.set_active(&id)).await
        }
        .await;
        if let Err(error) = caught_up {
            self.next.store(Some(model)); // kept for the next try, a second later
            return Err(error);
        }
        let previous = self.active.swap(model.clone());
        let (old, new) = (previous.embedder.info(), model.embedder.info());
        metrics::model_info(&old.model_key, &old.device, &old.precision.to_string(), false);
        metrics::model_info(&new.model_key, &new.device, &new.precision.to_string(), true);
        // Kept for uploads until no other replica serves it (`retire_previous`).
        if let Some(older) = self.previous.swap(Some(previous)) {
            retire(older);
        }
        drop(exclusive);
        tracing::info!(version = %model.version.version, model = %model.name(), "model switched with the cluster");
        Ok(())
    }

    /// Drops the model switched from once no other live replica serves it:
    /// until then its searches are among that model's vectors, so this
    /// replica's uploads are embedded with it too.
    async fn retire_previous(&self, cluster: &ClusterLink, active: &ActiveModel) -> Result<(), CatalogError> {
        if self.previous.load().is_none() || cluster.lagging(&active.version.version).await? > 0 {
            return Ok(());
        }
        if let Some(previous) = self.previous.swap(None) {
            tracing::info!(version = %previous.version.version, "every replica serves the new version; dropping the previous model");
            retire(previous);
        }
        Ok(())
    }

    /// Starts the workers of a version (`None`: the bundled one), installing it from the database first.
    async fn start_model(
        &self,
        cluster: &ClusterLink,
        version: Option<String>,
    ) -> Result<Arc<ActiveModel>, CatalogError> {
        cluster.install_versions(&self.registry).await?;
        let version = self.with_registry(move |r| version_or_bundled(r, version)).await?;
        let capacity = self.store.count().await? as usize;
        let index = self.indexes.create(&version.key, version.manifest.embedding.dim, capacity);
        Ok(Arc::new(ActiveModel::start(version, &self.settings, index).await?))
    }

    /// Cluster mode's `switch_to`: publishes the target, reports the
    /// cluster's progress while the replicas prepare (this one's follower
    /// among them), flips when all are ready, then waits for this replica's
    /// own swap. `cancel` gives the switch up before the flip.
    pub(super) async fn switch_cluster(
        &self,
        cluster: &ClusterLink,
        version: ModelVersion,
        progress: &(dyn Fn(Progress) + Sync),
        swapping: &(dyn Fn() + Sync),
        cancel: &AtomicBool,
    ) -> Result<Switched, CatalogError> {
        let started = Instant::now();
        let switch_id = uuid::Uuid::new_v4().to_string();
        tracing::info!(version = %version.version, switch = %switch_id, "cluster-wide model switch started");
        cluster.begin_switch(&version.version, &switch_id).await?;
        let embedded = match self.await_ready(cluster, &version, &switch_id, progress, cancel).await {
            Ok(embedded) => embedded,
            Err(error) => {
                if let Err(abandon) = cluster.abandon(&switch_id).await {
                    tracing::error!(%abandon, "could not give the switch up; the next switch replaces it");
                }
                return Err(error);
            }
        };
        swapping();
        match cluster.flip(&switch_id, &version.version).await {
            Ok(true) => {}
            Ok(false) => return Err(CatalogError::Switch("another switch replaced this one before its flip".into())),
            Err(error) => {
                if let Err(abandon) = cluster.abandon(&switch_id).await {
                    tracing::error!(%abandon, "could not give the switch up; the next lifecycle lock holder does");
                }
                return Err(error.into());
            }
        }
        // The flip's NOTIFY wakes this replica's follower too; wake it now in case it is lost.
        cluster.changed.notify_waiters();
        let deadline = Instant::now() + OWN_SWAP_WAIT;
        while self.active().version.version != version.version && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let active = self.active();
        let unembeddable = active.lock_unembeddable().iter().copied().collect();
        Ok(Switched {
            version: version.version.clone(),
            model: version.model.clone(),
            embedded,
            items: active.index.len(),
            unembeddable,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Waits until every live replica is ready and no item lacks the
    /// target's embedding; returns how many items have it.
    async fn await_ready(
        &self,
        cluster: &ClusterLink,
        version: &ModelVersion,
        switch_id: &str,
        progress: &(dyn Fn(Progress) + Sync),
        cancel: &AtomicBool,
    ) -> Result<usize, CatalogError> {
        cluster.changed.notify_waiters(); // this replica's follower starts at once
        let mut stored_before = None;
        let (mut last, mut moved) = ((0, 0), Instant::now());
        loop {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(CatalogError::Cancelled);
            }
            let status = cluster.switch_status(switch_id, &version.key).await?;
            // Embeddings stored before the switch (an earlier activation of the version) are not counted.
            let embedded = status.embedded.saturating_sub(*stored_before.get_or_insert(status.embedded)) as usize;
            if (embedded, status.ready) != last {
                (last, moved) = ((embedded, status.ready), Instant::now());
            } else if moved.elapsed() > STALLED {
                let why = format!(
                    "no progress for {} s: {} of {} replicas ready",
                    STALLED.as_secs(),
                    status.ready,
                    status.live
                );
                return Err(CatalogError::Switch(why));
            }
            progress(Progress { embedded, to_embed: embedded + status.missing as usize });
            if let Some(failure) = status.failures.first() {
                return Err(CatalogError::Switch(format!(
                    "a replica could not prepare version {}: {failure}",
                    version.version
                )));
            }
            if status.live > 0 && status.ready >= status.live && status.missing == 0 {
                return Ok(embedded);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Watches the cluster's state every `POLL` and sets the flag once
/// `switch_id` is no longer the switch under way (cancelled, failed, or
/// replaced): a replica's share of the work stops at its next chunk.
fn watch_switch(cluster: Arc<ClusterLink>, switch_id: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let given_up = Arc::new(AtomicBool::new(false));
    let flag = given_up.clone();
    let watcher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            if let Ok(state) = cluster.state().await {
                if state.target.is_none_or(|(_, id)| id != switch_id) {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    (given_up, watcher)
}

/// Whether an error is the database being away: worth trying again, not a failed preparation.
fn unavailable(error: &CatalogError) -> bool {
    use crate::cluster::ClusterError;
    use crate::gallery::GalleryError;
    use crate::index::IndexError;
    matches!(
        error,
        CatalogError::Store(GalleryError::Unavailable(_))
            | CatalogError::Cluster(ClusterError::Database(GalleryError::Unavailable(_)))
            | CatalogError::Index(IndexError::Unavailable(_))
    )
}
