//! Model activations as background jobs: `POST /admin/models/{version}/activate`
//! answers `202` at once, the switch goes on by itself (a client that leaves
//! cannot stop it halfway), and its progress and result are read by id.
//! Activations are kept in memory, the most recent `KEPT`: a restart ends any
//! that was running, and `ACTIVE` says which version serves.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

use super::models::SlotHolder;
use super::{Catalog, CatalogError, Progress, Switched};
use crate::clock::now_millis;
use crate::registry::RegistryError;

/// Finished activations remembered for `GET /admin/activations`.
const KEPT: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationState {
    Running,
    Done,
    Failed,
}

/// One activation, as `GET /admin/activations/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationStatus {
    pub id: String,
    pub version: String,
    pub state: ActivationState,
    /// Images of the gallery embedded with the version so far, of those it lacked.
    pub progress: Progress,
    pub result: Option<Switched>,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    pub finished_at: Option<u64>,
}

/// The activations this process has run, newest last.
#[derive(Default)]
pub(super) struct Activations {
    runs: Mutex<VecDeque<watch::Receiver<ActivationStatus>>>,
}

impl Activations {
    /// Random, like job ids: behind a load balancer an id never names another replica's activation.
    fn new_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    fn begin(&self, id: &str, version: &str) -> watch::Sender<ActivationStatus> {
        let status = ActivationStatus {
            id: id.to_string(),
            version: version.to_string(),
            state: ActivationState::Running,
            progress: Progress { embedded: 0, to_embed: 0 },
            result: None,
            error: None,
            started_at: now_millis(),
            finished_at: None,
        };
        let (sender, receiver) = watch::channel(status);
        let mut runs = self.lock();
        runs.push_back(receiver);
        while runs.len() > KEPT {
            runs.pop_front();
        }
        sender
    }

    fn find(&self, id: &str) -> Option<watch::Receiver<ActivationStatus>> {
        self.lock().iter().find(|r| r.borrow().id == id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<watch::Receiver<ActivationStatus>>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn finish(sender: &watch::Sender<ActivationStatus>, outcome: Result<Switched, CatalogError>) {
    sender.send_modify(|status| {
        status.finished_at = Some(now_millis());
        match outcome {
            Ok(switched) => {
                status.state = ActivationState::Done;
                status.progress.embedded = status.progress.embedded.max(switched.embedded);
                status.result = Some(switched);
            }
            Err(error) => {
                tracing::error!(%error, version = %status.version, "model activation failed");
                status.state = ActivationState::Failed;
                status.error = Some(error.to_string());
            }
        }
    });
}

impl Catalog {
    /// Starts switching to a saved version (embedding the gallery with it
    /// first where its embeddings are not stored), holding the one-at-a-time
    /// slot until the switch ends. Returns at once: an unknown version or a
    /// busy slot is an error now, anything later is in the activation's status.
    pub async fn activate(&self, version: &str) -> Result<ActivationStatus, CatalogError> {
        if let Some(cluster) = &self.cluster {
            cluster.install_versions(&self.registry).await?;
        }
        let wanted = version.to_string();
        let target = self.with_registry(move |registry| registry.get(&wanted)).await.map_err(|e| match e {
            CatalogError::Models(RegistryError::Unknown(v)) => CatalogError::UnknownVersion(v),
            other => other,
        })?;
        let id = self.activations.new_id();
        let slot = self.claim(SlotHolder::Activation(id.clone())).await?;
        let sender = self.activations.begin(&id, &target.version);
        if let Some(cluster) = &self.cluster {
            let first = serde_json::to_value(&*sender.borrow()).expect("a status serialises");
            if let Err(error) = cluster.record_run("activation", &id, first).await {
                finish(&sender, Err(CatalogError::Switch(format!("could not record the activation: {error}"))));
                return Err(error.into());
            }
        }
        self.publish_activation(&sender);
        let active = self.active();
        if active.version.version == target.version {
            let (items, unembeddable) = (active.index.len(), active.lock_unembeddable().iter().copied().collect());
            let (version, model) = (target.version, target.model);
            finish(&sender, Ok(Switched { version, model, embedded: 0, items, unembeddable, seconds: 0.0 }));
            return Ok(sender.borrow().clone());
        }
        tracing::info!(activation = %id, version = %target.version, "model activation started");
        let catalog = self.clone();
        let progress_sender = sender.clone();
        let switch = tokio::spawn(async move {
            let progress = move |p: Progress| progress_sender.send_modify(|status| status.progress = p);
            catalog.switch_to(target, &progress, &|| {}, &AtomicBool::new(false)).await
        });
        // Awaited by a second task, so that even a switch that panics ends its activation as failed.
        tokio::spawn(async move {
            let _slot = slot;
            let outcome = switch.await.map_err(CatalogError::from).and_then(|outcome| outcome);
            finish(&sender, outcome);
        });
        Ok(self.activation(&id).expect("just begun"))
    }

    /// Cluster mode: copies an activation's status to the database at every
    /// change until it ends, for the other replicas to show.
    fn publish_activation(&self, sender: &watch::Sender<ActivationStatus>) {
        let Some(cluster) = self.cluster.clone() else { return };
        let mut receiver = sender.subscribe();
        tokio::spawn(async move {
            loop {
                let status = receiver.borrow_and_update().clone();
                let value = serde_json::to_value(&status).expect("a status serialises");
                cluster.publish_run("activation", &status.id, value);
                // A last change before the sender is dropped is still seen.
                if status.state != ActivationState::Running || receiver.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// An activation of this process, by id.
    pub fn activation(&self, id: &str) -> Option<ActivationStatus> {
        self.activations.find(id).map(|r| r.borrow().clone())
    }

    /// The activations this process remembers, newest first.
    pub fn activations(&self) -> Vec<ActivationStatus> {
        self.activations.lock().iter().rev().map(|r| r.borrow().clone()).collect()
    }

    /// Cluster mode: an activation another replica runs or ran; every
    /// replica's activations, newest first (`None` in embedded mode).
    pub async fn remote_activation(&self, id: &str) -> Result<Option<serde_json::Value>, CatalogError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        Ok(cluster.run("activation", id).await?)
    }

    pub async fn cluster_activations(&self) -> Result<Option<Vec<serde_json::Value>>, CatalogError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        Ok(Some(cluster.runs("activation").await?))
    }

    /// Waits for an activation to end and returns how it ended.
    pub async fn activation_finished(&self, id: &str) -> Option<ActivationStatus> {
        let mut receiver = self.activations.find(id)?;
        let status = receiver.wait_for(|s| s.state != ActivationState::Running).await.ok()?.clone();
        Some(status)
    }
}
