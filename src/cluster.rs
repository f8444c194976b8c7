//! Cluster mode's shared model lifecycle, kept in PostgreSQL beside the
//! gallery: saved model versions (TorchScript bytes and manifest), the
//! active version and the one a switch prepares, the live replicas and what
//! each is ready for, the lifecycle lock (one fine-tune or activation at a
//! time across the cluster), and fine-tune and activation records readable
//! from every replica. Replicas coordinate only through these rows, woken by
//! `LISTEN/NOTIFY` and polling every `POLL` in case a notification is lost.
//! The catalog drives the switch (`catalog::cluster`); this module is its SQL.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::clock::now_millis;
use crate::gallery::GalleryError;
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry, RegistryError};

/// How often a replica reads the cluster's state without a notification,
/// and says it is alive.
pub const POLL: Duration = Duration::from_secs(1);
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

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Database(#[from] GalleryError),
    #[error(transparent)]
    Models(#[from] RegistryError),
    #[error("model versions: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for ClusterError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Database(e.into())
    }
}

/// The cluster's lifecycle row.
#[derive(Debug, Clone)]
pub struct ClusterState {
    /// `None`: the bundled model.
    pub active: Option<String>,
    /// The version a switch prepares, with the switch's id.
    pub target: Option<(String, String)>,
}

/// How a switch stands across the cluster, read in one snapshot.
#[derive(Debug, Clone)]
pub struct SwitchStatus {
    pub live: usize,
    pub ready: usize,
    /// Replicas that could not prepare, with why.
    pub failures: Vec<String>,
    /// Items with the target's embedding, and items it still lacks (not
    /// counting those it cannot preprocess).
    pub embedded: u64,
    pub missing: u64,
}

/// One replica's handle on the shared lifecycle.
pub struct ClusterLink {
    pool: Pool,
    config: tokio_postgres::Config,
    /// This process's id in `replicas`.
    pub replica: String,
    /// Woken by every notification on `CHANNEL`.
    pub changed: Arc<Notify>,
    runs: mpsc::UnboundedSender<RunUpdate>,
    /// Set at shutdown: the heartbeat stops, so `leave` sticks.
    left: AtomicBool,
    /// One copy of model versions into the data folder at a time.
    installing: tokio::sync::Mutex<()>,
}

/// A job's or an activation's latest status, for the other replicas.
struct RunUpdate {
    kind: &'static str,
    id: String,
    status: Value,
}

/// The lifecycle lock, held on a connection of its own: dropping it (or the
/// process dying) closes the connection, and PostgreSQL releases the lock.
pub struct LifecycleLock {
    _client: tokio_postgres::Client,
}

impl ClusterLink {
    /// Joins the cluster over `pool` (a migrated database): starts listening
    /// for notifications and the writer of run records.
    pub fn join(pool: Pool, config: tokio_postgres::Config) -> Arc<Self> {
        let (runs, updates) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            pool,
            config,
            replica: uuid::Uuid::new_v4().to_string(),
            changed: Arc::default(),
            runs,
            left: AtomicBool::new(false),
            installing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(listen(link.config.clone(), link.changed.clone()));
        tokio::spawn(write_runs(link.pool.clone(), link.replica.clone(), updates));
        link
    }

    async fn client(&self) -> Result<Object, ClusterError> {
        let client = self.pool.get().await;
        Ok(client.map_err(|e| GalleryError::Unavailable(format!("PostgreSQL: {e}")))?)
    }

    pub async fn state(&self) -> Result<ClusterState, ClusterError> {
        let row = self
            .client()
            .await?
            .query_one("SELECT active_version, target_version, switch_id FROM cluster_state", &[])
            .await?;
        let target = match (row.get::<_, Option<String>>(1), row.get::<_, Option<String>>(2)) {
            (Some(version), Some(id)) => Some((version, id)),
            _ => None,
        };
        Ok(ClusterState { active: row.get(0), target })
    }

    /// Says this replica is alive and which version it serves.
    pub async fn heartbeat(&self, serving: &str) -> Result<(), ClusterError> {
        if self.left.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.client()
            .await?
            .execute(
                "INSERT INTO replicas (id, seen_at, serving) VALUES ($1, now(), $2)
                 ON CONFLICT (id) DO UPDATE SET seen_at = now(), serving = $2",
                &[&self.replica, &serving],
            )
            .await?;
        Ok(())
    }

    /// How many other live replicas serve a version other than `serving`
    /// (they have not learnt the last flip yet, or cannot swap).
    pub async fn lagging(&self, serving: &str) -> Result<usize, ClusterError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM replicas
                 WHERE id <> $1 AND serving <> $2 AND seen_at > now() - make_interval(secs => $3)",
                &[&self.replica, &serving, &LIVE_WITHIN_SECS],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    /// At shutdown: a switch no longer waits for this replica.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.left.store(true, Ordering::Relaxed);
        self.client().await?.execute("DELETE FROM replicas WHERE id = $1", &[&self.replica]).await?;
        Ok(())
    }

    /// This replica has the target's encoder loaded, writes new uploads with
    /// it too, and found nothing left to embed.
    pub async fn ready(&self, switch_id: &str) -> Result<(), ClusterError> {
        let sql = "UPDATE replicas SET ready_for = $2 WHERE id = $1";
        self.client().await?.execute(sql, &[&self.replica, &switch_id]).await?;
        Ok(())
    }

    /// This replica could not prepare the switch.
    pub async fn failed(&self, switch_id: &str, why: &str) -> Result<(), ClusterError> {
        let sql = "UPDATE replicas SET failed_for = $2, failure = $3 WHERE id = $1";
        self.client().await?.execute(sql, &[&self.replica, &switch_id, &why]).await?;
        Ok(())
    }

    /// Phase one: asks every replica to prepare `version`.
    pub async fn begin_switch(&self, version: &str, switch_id: &str) -> Result<(), ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sql = "UPDATE cluster_state SET target_version = $1, switch_id = $2";
        tx.execute(sql, &[&version, &switch_id]).await?;
        // Rows of replicas killed long ago (a clean stop removes its own).
        tx.execute("DELETE FROM replicas WHERE seen_at < now() - interval '1 day'", &[]).await?;
        tx.execute(&format!("NOTIFY {CHANNEL}, 'prepare'"), &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// How far the cluster is with a switch to the model stored under `key`.
    pub async fn switch_status(&self, switch_id: &str, key: &str) -> Result<SwitchStatus, ClusterError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT
                    (SELECT COUNT(*) FROM replicas WHERE seen_at > now() - make_interval(secs => $3)),
                    (SELECT COUNT(*) FROM replicas WHERE seen_at > now() - make_interval(secs => $3) AND ready_for = $1),
                    (SELECT COALESCE(array_agg(failure), '{}') FROM replicas
                        WHERE seen_at > now() - make_interval(secs => $3) AND failed_for = $1),
                    (SELECT COUNT(*) FROM embeddings WHERE model = $2),
                    (SELECT COUNT(*) FROM items i
                        WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.model = $2 AND e.item_id = i.id)
                        AND NOT EXISTS (SELECT 1 FROM unembeddable u WHERE u.model = $2 AND u.item_id = i.id))",
                &[&switch_id, &key, &LIVE_WITHIN_SECS],
            )
            .await?;
        Ok(SwitchStatus {
            live: row.get::<_, i64>(0) as usize,
            ready: row.get::<_, i64>(1) as usize,
            failures: row.get(2),
            embedded: row.get::<_, i64>(3) as u64,
            missing: row.get::<_, i64>(4) as u64,
        })
    }

    /// Phase two: makes `version` active for every replica, in one
    /// transaction, if `switch_id` is still the switch under way.
    pub async fn flip(&self, switch_id: &str, version: &str) -> Result<bool, ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let flipped = tx
            .execute(
                "UPDATE cluster_state SET active_version = $2, target_version = NULL, switch_id = NULL,
                 epoch = epoch + 1 WHERE switch_id = $1",
                &[&switch_id, &version],
            )
            .await?;
        tx.execute(&format!("NOTIFY {CHANNEL}, 'flip'"), &[]).await?;
        tx.commit().await?;
        Ok(flipped == 1)
    }

    /// Gives a switch up (cancelled or failed): replicas drop what they prepared.
    pub async fn abandon(&self, switch_id: &str) -> Result<(), ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sql = "UPDATE cluster_state SET target_version = NULL, switch_id = NULL WHERE switch_id = $1";
        tx.execute(sql, &[&switch_id]).await?;
        tx.execute(&format!("NOTIFY {CHANNEL}, 'abandon'"), &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes the lifecycle lock for `holder` (`job:<id>`, `activation:<id>`),
    /// or says who has it.
    pub async fn lock_lifecycle(&self, holder: &str) -> Result<Result<LifecycleLock, String>, ClusterError> {
        let connecting = tokio::time::timeout(CONNECT_WAIT, self.config.connect(NoTls)).await;
        let (client, connection) =
            connecting.map_err(|_| GalleryError::Unavailable("PostgreSQL: connecting timed out".into()))??;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LIFECYCLE_LOCK]).await?.get(0);
        if !locked {
            let row = client.query_one("SELECT COALESCE(holder, '') FROM cluster_state", &[]).await?;
            return Ok(Err(row.get(0)));
        }
        // A switch still published here lost its switching replica (it died holding the lock): give it up.
        let gave_up = client
            .execute(
                "UPDATE cluster_state SET holder = $1, target_version = NULL, switch_id = NULL
                 WHERE switch_id IS NOT NULL",
                &[&holder],
            )
            .await?;
        if gave_up > 0 {
            client.batch_execute(&format!("NOTIFY {CHANNEL}, 'abandon'")).await?;
        }
        client.execute("UPDATE cluster_state SET holder = $1", &[&holder]).await?;
        Ok(Ok(LifecycleLock { _client: client }))
    }

    /// Saves trained weights as the next version number across the cluster,
    /// in the database and in this replica's model folder.
    pub async fn publish_version(
        &self,
        registry: &Registry,
        weights: &Path,
        mut manifest: Manifest,
    ) -> Result<ModelVersion, ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&VERSIONS_LOCK]).await?;
        let rows = tx.query("SELECT version FROM model_versions", &[]).await?;
        let stored = rows.iter().filter_map(|r| r.get::<_, String>(0).parse::<u64>().ok()).max().unwrap_or(0);
        let (registry, weights_path) = (registry.clone(), weights.to_path_buf());
        let saved = tokio::task::spawn_blocking(move || {
            let local: u64 = registry.next_version()?.parse().unwrap_or(1);
            manifest.version = local.max(stored + 1).to_string();
            registry.save(&weights_path, &manifest)
        })
        .await
        .map_err(std::io::Error::other)??;
        let encoder_path = saved.encoder_path();
        let encoder =
            tokio::task::spawn_blocking(move || std::fs::read(encoder_path)).await.map_err(std::io::Error::other)??;
        let manifest = serde_json::to_value(&saved.manifest).expect("a manifest serialises");
        tx.execute(
            "INSERT INTO model_versions (version, manifest, encoder, created_at) VALUES ($1, $2, $3, $4)",
            &[&saved.version, &manifest, &encoder, &(now_millis() as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(saved)
    }

    /// Copies into this replica's model folder every version another replica saved.
    pub async fn install_versions(&self, registry: &Registry) -> Result<(), ClusterError> {
        let _installing = self.installing.lock().await;
        let client = self.client().await?;
        let local: Vec<(String, String)> = {
            let registry = registry.clone();
            let list = tokio::task::spawn_blocking(move || registry.list()).await.map_err(std::io::Error::other)??;
            list.into_iter().map(|v| (v.version, v.encoder_sha256)).collect()
        };
        let rows = client.query("SELECT version, manifest->>'encoder_sha256' FROM model_versions", &[]).await?;
        for row in rows {
            let (version, sha): (String, Option<String>) = (row.get(0), row.get(1));
            if local.iter().any(|(v, s)| *v == version && Some(s) == sha.as_ref()) {
                continue;
            }
            let row = client
                .query_one("SELECT manifest, encoder FROM model_versions WHERE version = $1", &[&version])
                .await?;
            let manifest: Manifest = serde_json::from_value(row.get(0)).map_err(std::io::Error::other)?;
            let encoder: Vec<u8> = row.get(1);
            let registry = registry.clone();
            tokio::task::spawn_blocking(move || registry.install(&encoder, &manifest))
                .await
                .map_err(std::io::Error::other)??;
            tracing::info!(%version, "model version installed from the database");
        }
        Ok(())
    }

    /// Records a job's or an activation's first status before its start is
    /// answered, so that a `202` from this replica is readable on every one.
    pub async fn record_run(&self, kind: &str, id: &str, status: Value) -> Result<(), ClusterError> {
        let client = self.client().await?;
        upsert_run(&client, &self.replica, kind, id, &status).await?;
        Ok(())
    }

    /// Hands a job's or an activation's later status to the writer, for the other replicas to read.
    pub fn publish_run(&self, kind: &'static str, id: &str, status: Value) {
        let _ = self.runs.send(RunUpdate { kind, id: id.to_string(), status });
    }

    /// A job's or an activation's latest status, from any replica. One that
    /// was running on a replica that is gone reads as failed.
    pub async fn run(&self, kind: &str, id: &str) -> Result<Option<Value>, ClusterError> {
        Ok(self.runs_where(kind, Some(id)).await?.into_iter().next())
    }

    /// Every job's or activation's status, newest first.
    pub async fn runs(&self, kind: &str) -> Result<Vec<Value>, ClusterError> {
        self.runs_where(kind, None).await
    }

    async fn runs_where(&self, kind: &str, id: Option<&str>) -> Result<Vec<Value>, ClusterError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT r.status, EXISTS (SELECT 1 FROM replicas p WHERE p.id = r.replica
                    AND p.seen_at > now() - make_interval(secs => $3))
                 FROM lifecycle_runs r WHERE kind = $1 AND ($2::text IS NULL OR id = $2)
                 ORDER BY created_at DESC",
                &[&kind, &id, &LIVE_WITHIN_SECS],
            )
            .await?;
        Ok(rows.iter().map(|r| settle_orphan(r.get(0), r.get(1))).collect())
    }

    /// Asks the replica running a job to cancel it.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, ClusterError> {
        let sql = "UPDATE lifecycle_runs SET cancel = TRUE WHERE id = $1";
        Ok(self.client().await?.execute(sql, &[&id]).await? == 1)
    }

    /// Whether another replica asked to cancel this job.
    pub async fn cancel_requested(&self, id: &str) -> Result<bool, ClusterError> {
        let row = self.client().await?.query_opt("SELECT cancel FROM lifecycle_runs WHERE id = $1", &[&id]).await?;
        Ok(row.is_some_and(|r| r.get(0)))
    }
}

/// `lookalike migrate`: stores an embedded service's saved model versions
/// (not the bundled one, which every replica has) and makes `active` the
/// cluster's active version (`None`: the bundled one). Returns how many were stored.
pub async fn import_versions(
    pool: &Pool,
    versions: &[ModelVersion],
    active: Option<&str>,
) -> Result<usize, ClusterError> {
    let mut client = pool.get().await.map_err(|e| GalleryError::Unavailable(format!("PostgreSQL: {e}")))?;
    let tx = client.transaction().await?;
    let mut stored = 0;
    for version in versions.iter().filter(|v| !v.bundled) {
        let encoder = std::fs::read(version.encoder_path())?;
        let manifest = serde_json::to_value(&version.manifest).expect("a manifest serialises");
        stored += tx
            .execute(
                "INSERT INTO model_versions (version, manifest, encoder, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (version) DO NOTHING",
                &[&version.version, &manifest, &encoder, &(now_millis() as i64)],
            )
            .await? as usize;
    }
    tx.execute("UPDATE cluster_state SET active_version = $1", &[&active]).await?;
    tx.commit().await?;
    Ok(stored)
}

/// A run whose replica is gone cannot finish: it reads as failed.
fn settle_orphan(mut status: Value, replica_live: bool) -> Value {
    let running =
        matches!(status["state"].as_str(), Some("running" | "queued" | "training" | "re_embedding" | "swapping"));
    if running && !replica_live {
        status["state"] = "failed".into();
        status["error"] = "the replica running it stopped; nothing was swapped by it".into();
    }
    status
}

/// Keeps a connection that listens on `CHANNEL` and wakes `changed` at every
/// notification; reconnects after a failure (polling covers the gap).
async fn listen(config: tokio_postgres::Config, changed: Arc<Notify>) {
    loop {
        match config.connect(NoTls).await {
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

/// Writes run updates in order, the latest of each run when several wait.
async fn write_runs(pool: Pool, replica: String, mut updates: mpsc::UnboundedReceiver<RunUpdate>) {
    while let Some(first) = updates.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = updates.try_recv() {
            batch.retain(|u| u.id != more.id);
            batch.push(more);
        }
        let Ok(client) = pool.get().await else {
            tracing::warn!("cannot reach the database to record a job's or activation's progress");
            continue;
        };
        for update in batch {
            if let Err(error) = upsert_run(&client, &replica, update.kind, &update.id, &update.status).await {
                tracing::warn!(%error, run = %update.id, "could not record a run's progress in the database");
            }
        }
    }
}

/// A run's status, inserted or replaced.
async fn upsert_run(
    client: &tokio_postgres::Client,
    replica: &str,
    kind: &str,
    id: &str,
    status: &Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO lifecycle_runs (id, kind, replica, status, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status",
            &[&id, &kind, &replica, status, &(now_millis() as i64)],
        )
        .await?;
    Ok(())
}
