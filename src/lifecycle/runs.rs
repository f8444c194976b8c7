//! The run log with types: job and activation statuses go in and come out
//! as themselves, and a run whose replica is gone reads as failed.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ports::{PortResult, RunKind, RunLog};

/// A job's or an activation's status, as the run log keeps it.
pub trait RunStatus: Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: RunKind;
    fn id(&self) -> &str;
    /// Not finished yet.
    fn is_running(&self) -> bool;
    /// Marks a run that cannot finish (its replica is gone) as failed.
    fn orphan(&mut self, why: &str);
}

/// The states a job or an activation ends in, as its stored status says.
pub const FINISHED_STATES: [&str; 3] = ["done", "failed", "cancelled"];

/// Whether a stored status is a run's final one.
pub fn has_finished(status: &serde_json::Value) -> bool {
    status.get("state").and_then(serde_json::Value::as_str).is_some_and(|s| FINISHED_STATES.contains(&s))
}

/// What an orphaned run's error says.
const ORPHANED: &str = "the replica running it stopped; nothing was swapped by it";

#[derive(Clone)]
pub struct Runs {
    log: Arc<dyn RunLog>,
}

impl Runs {
    pub fn new(log: Arc<dyn RunLog>) -> Self {
        Self { log }
    }

    /// Writes a run's first status, so that a `202` from this replica is readable on every one.
    pub async fn record<S: RunStatus>(&self, status: &S) -> PortResult<()> {
        self.log.record(S::KIND, status.id(), to_value(status)).await
    }

    /// Writes a run's final status before its holder lets the lifecycle lock
    /// go, so that the next holder reads the run as ended; when the database
    /// is away, the writer behind `publish` takes it over.
    pub async fn record_final<S: RunStatus>(&self, status: &S) {
        if let Err(error) = self.record(status).await {
            tracing::warn!(%error, run = status.id(), "could not record how a run ended; the writer retries");
            self.publish(status);
        }
    }

    /// Hands a run's later status to the writer, for the other replicas to read.
    pub fn publish<S: RunStatus>(&self, status: &S) {
        self.log.publish(S::KIND, status.id(), to_value(status));
    }

    /// A run's latest status, from any replica.
    pub async fn get<S: RunStatus>(&self, id: &str) -> PortResult<Option<S>> {
        Ok(self.read(Some(id)).await?.into_iter().next())
    }

    /// Every run of this kind, newest first.
    pub async fn list<S: RunStatus>(&self) -> PortResult<Vec<S>> {
        self.read(None).await
    }

    /// Asks the replica running job `id` to cancel it; false when no replica knows it.
    pub async fn request_cancel(&self, id: &str) -> PortResult<bool> {
        self.log.request_cancel(id).await
    }

    /// Whether another replica asked to cancel job `id`.
    pub async fn cancel_requested(&self, id: &str) -> PortResult<bool> {
        self.log.cancel_requested(id).await
    }

    async fn read<S: RunStatus>(&self, id: Option<&str>) -> PortResult<Vec<S>> {
        let stored = self.log.read(S::KIND, id).await?;
        Ok(stored
            .into_iter()
            .filter_map(|run| {
                let mut status: S = serde_json::from_value(run.status)
                    .map_err(
                        |error| tracing::warn!(%error, kind = S::KIND.as_str(), "skipping an unreadable run record"),
                    )
                    .ok()?;
                if status.is_running() && !run.replica_live {
                    status.orphan(ORPHANED);
                }
                Some(status)
            })
            .collect())
    }
}

fn to_value<S: Serialize>(status: &S) -> serde_json::Value {
    serde_json::to_value(status).expect("a run status serialises")
}
