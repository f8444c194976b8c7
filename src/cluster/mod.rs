//! Cluster mode's shared model lifecycle, kept in PostgreSQL beside the
//! gallery: saved model versions (TorchScript bytes and manifest), the
//! active version and the one a switch prepares, the live replicas and what
//! each is ready for, the lifecycle lock (one fine-tune or activation at a
//! time across the cluster), and fine-tune and activation records readable
//! from every replica. Replicas coordinate only through these rows, woken by
//! `LISTEN/NOTIFY` and polling every `POLL` in case a notification is lost.
//! `PgCluster` implements the lifecycle's ports (`crate::lifecycle::ports`):
//! membership, the switch coordinator and the lock (`coordinator`), the run
//! log and the version store (`records`).

mod coordinator;
mod records;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;

pub use records::import_versions;

use crate::gallery::pg_connect::{with_causes, PgTarget};
use crate::gallery::GalleryError;
use crate::lifecycle::ports::{PortError, RunKind, POLL};
use crate::lifecycle::runs::FINISHED_STATES;

/// A replica not heard from for this long is taken as gone: a switch no
/// longer waits for it, and its running job or activation reads as failed.
/// Well above the pool's 5 s connection wait, so a busy replica is not taken as gone.
const LIVE_WITHIN_SECS: f64 = 10.0;
/// How long opening a connection of its own may take.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// The channel replicas notify on at every switch step.
const CHANNEL: &str = "lookalike_lifecycle";
/// The advisory lock of the lifecycle, held by the replica running a
/// fine-tune or an activation ("lifecycl" in ASCII).
const LIFECYCLE_LOCK: i64 = 0x6c69_6665_6379_636c;
/// The advisory lock under which a version number is chosen ("versions").
const VERSIONS_LOCK: i64 = 0x7665_7273_696f_6e73;

/// `FINISHED_STATES` as an SQL list, for `status->>'state' IN …`.
fn finished_sql() -> String {
    let quoted: Vec<String> = FINISHED_STATES.iter().map(|s| format!("'{s}'")).collect();
    format!("({})", quoted.join(", "))
}

impl From<tokio_postgres::Error> for PortError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Database(e.into())
    }
}

/// One replica's handle on the shared lifecycle.
pub struct PgCluster {
    pool: Pool,
    target: PgTarget,
    /// This process's id in `replicas`.
    replica: String,
    /// Woken by every notification on `CHANNEL`.
    changed: Arc<Notify>,
    runs: mpsc::UnboundedSender<RunUpdate>,
    /// Set at shutdown: the heartbeat stops, so `leave` sticks.
    left: AtomicBool,
    /// One copy of model versions into the data folder at a time.
    installing: tokio::sync::Mutex<()>,
    /// Finished runs kept per kind (`--keep-runs`).
    keep_runs: usize,
}

/// A job's or an activation's latest status, for the other replicas.
struct RunUpdate {
    kind: RunKind,
    id: String,
    status: Value,
}

impl PgCluster {
    /// Joins the cluster over `pool` (a migrated database): starts listening
    /// for notifications and the writer of run records.
    pub fn join(pool: Pool, target: PgTarget, keep_runs: usize) -> Arc<Self> {
        let (runs, updates) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            pool,
            target,
            replica: uuid::Uuid::new_v4().to_string(),
            changed: Arc::default(),
            runs,
            left: AtomicBool::new(false),
            installing: tokio::sync::Mutex::new(()),
            keep_runs,
        });
        tokio::spawn(listen(link.target.clone(), link.changed.clone()));
        tokio::spawn(records::write_runs(link.pool.clone(), link.replica.clone(), keep_runs, updates));
        link
    }

    async fn client(&self) -> Result<Object, PortError> {
        let client = self.pool.get().await;
        Ok(client.map_err(|e| GalleryError::Unavailable(format!("PostgreSQL: {}", with_causes(&e))))?)
    }
}

/// Keeps a connection that listens on `CHANNEL` and wakes `changed` at every
/// notification; reconnects after a failure (polling covers the gap).
async fn listen(target: PgTarget, changed: Arc<Notify>) {
    loop {
        match target.config.connect(target.tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listening = async {
                    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                    Ok::<_, tokio_postgres::Error>(())
                };
                let pump = async {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => changed.notify_waiters(),
                            Ok(_) => {}
                            Err(error) => return error.to_string(),
                        }
                    }
                    "the connection closed".to_string()
                };
                let (listened, why) = tokio::join!(listening, pump);
                if let Err(error) = listened {
                    tracing::debug!(%error, "LISTEN failed");
                }
                tracing::debug!(why, "the notification connection ended; reconnecting");
            }
            Err(error) => tracing::debug!(%error, "cannot open the notification connection; retrying"),
        }
        changed.notify_waiters(); // whatever was missed meanwhile: read the state again
        tokio::time::sleep(POLL).await;
    }
}
