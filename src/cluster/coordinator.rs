//! The switch's rows: who is live and what each serves (`replicas`), the
//! active and target versions (`cluster_state`), and the lifecycle lock (an
//! advisory lock on a connection of its own, watched, with a fencing token
//! in `cluster_state.fence` that the switch's writes are conditional on).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};

use super::{finished_sql, PgCluster, CHANNEL, CONNECT_WAIT, LIFECYCLE_LOCK, LIVE_WITHIN_SECS};
use crate::gallery::pg_connect::with_causes;
use crate::gallery::GalleryError;
use crate::lifecycle::ports::{
    ClusterState, Fence, HeldLock, LifecycleLock, Membership, PortError, PortResult, SwitchCoordinator, SwitchStatus,
    POLL,
};

#[async_trait::async_trait]
impl Membership for PgCluster {
    fn replica(&self) -> &str {
        &self.replica
    }

    /// Says this replica is alive and which version it serves.
    async fn heartbeat(&self, serving: &str) -> PortResult<()> {
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
    async fn lagging(&self, serving: &str) -> PortResult<usize> {
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
    async fn leave(&self) -> PortResult<()> {
        self.left.store(true, Ordering::Relaxed);
        self.client().await?.execute("DELETE FROM replicas WHERE id = $1", &[&self.replica]).await?;
        Ok(())
    }

    async fn served(&self) -> PortResult<Vec<String>> {
        let sql = "SELECT DISTINCT serving FROM replicas WHERE seen_at > now() - make_interval(secs => $1)";
        let rows = self.client().await?.query(sql, &[&LIVE_WITHIN_SECS]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(POLL) // in case a notification is lost
    }
}

#[async_trait::async_trait]
impl SwitchCoordinator for PgCluster {
    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    async fn state(&self) -> PortResult<ClusterState> {
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

    /// Phase one: asks every replica to prepare `version`, if `fence` still
    /// holds the lifecycle lock.
    async fn begin(&self, version: &str, switch_id: &str, fence: i64) -> PortResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        check_fence(&tx, fence).await?;
        let sql = "UPDATE cluster_state SET target_version = $1, switch_id = $2";
        tx.execute(sql, &[&version, &switch_id]).await?;
        // Rows of replicas killed long ago (a clean stop removes its own).
        tx.execute("DELETE FROM replicas WHERE seen_at < now() - interval '1 day'", &[]).await?;
        tx.execute(&format!("NOTIFY {CHANNEL}, 'prepare'"), &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// This replica has the target's encoder loaded, writes new uploads with
    /// it too, and found nothing left to embed.
    async fn ready(&self, switch_id: &str) -> PortResult<()> {
        let sql = "UPDATE replicas SET ready_for = $2 WHERE id = $1";
        self.client().await?.execute(sql, &[&self.replica, &switch_id]).await?;
        Ok(())
    }

    /// This replica could not prepare the switch.
    async fn failed(&self, switch_id: &str, why: &str) -> PortResult<()> {
        let sql = "UPDATE replicas SET failed_for = $2, failure = $3 WHERE id = $1";
        self.client().await?.execute(sql, &[&self.replica, &switch_id, &why]).await?;
        Ok(())
    }

    /// How far the cluster is with a switch to the model stored under `key`.
    async fn status(&self, switch_id: &str, key: &str) -> PortResult<SwitchStatus> {
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
    /// transaction, if `switch_id` is still the switch under way and `fence`
    /// still holds the lifecycle lock.
    async fn flip(&self, switch_id: &str, version: &str, fence: i64) -> PortResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        check_fence(&tx, fence).await?;
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
    async fn abandon(&self, switch_id: &str) -> PortResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sql = "UPDATE cluster_state SET target_version = NULL, switch_id = NULL WHERE switch_id = $1";
        tx.execute(sql, &[&switch_id]).await?;
        tx.execute(&format!("NOTIFY {CHANNEL}, 'abandon'"), &[]).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Refuses, within `tx`, a write made under a fence older than the
/// lifecycle lock's latest (its holder lost the lock; another has taken it).
/// Locks the row, so no new holder can take over before `tx` ends.
pub(super) async fn check_fence(tx: &tokio_postgres::Transaction<'_>, fence: i64) -> PortResult<()> {
    let latest: i64 = tx.query_one("SELECT fence FROM cluster_state FOR UPDATE", &[]).await?.get(0);
    match latest == fence {
        true => Ok(()),
        false => Err(PortError::LockLost("another replica has taken it".into())),
    }
}

#[async_trait::async_trait]
impl LifecycleLock for PgCluster {
    /// Takes the lifecycle lock for `holder` (`job:<id>`, `activation:<id>`),
    /// or says who has it: the holder in PostgreSQL, or the previous holder
    /// when it lost the lock but its run has not ended yet.
    async fn acquire(&self, holder: &str) -> PortResult<Result<HeldLock, String>> {
        let (mut client, closed) = self.lock_connection().await?;
        let started = std::time::Instant::now();
        loop {
            let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LIFECYCLE_LOCK]).await?.get(0);
            if locked {
                break;
            }
            // A holder whose run is recorded as ended lets the lock go in a moment: wait for it.
            let row = client.query_one(&holder_and_ended(), &[]).await?;
            let (holder, ended): (String, bool) = (row.get(0), row.get(1));
            if !ended || started.elapsed() >= HOLDER_ENDING_WAIT {
                return Ok(Err(holder));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Dropping `client` from here on closes the connection, which releases the lock.
        if let Some(previous) = client.query_opt(&previous_still_running(), &[&LIVE_WITHIN_SECS]).await? {
            return Ok(Err(previous.get(0)));
        }
        let tx = client.transaction().await?;
        let published: bool =
            tx.query_one("SELECT switch_id IS NOT NULL FROM cluster_state FOR UPDATE", &[]).await?.get(0);
        // A switch still published lost its switching replica (it died, or lost the lock): give it up.
        let sql = "UPDATE cluster_state SET holder = $1, fence = fence + 1, target_version = NULL, switch_id = NULL
                   RETURNING fence";
        let fence: i64 = tx.query_one(sql, &[&holder]).await?.get(0);
        if published {
            tx.batch_execute(&format!("NOTIFY {CHANNEL}, 'abandon'")).await?;
        }
        tx.commit().await?;
        let (lost, watch_lost) = watch::channel(None);
        let (release, released) = oneshot::channel::<()>();
        tokio::spawn(keep_lock(client, released, closed, lost));
        Ok(Ok(HeldLock { fence: Fence::new(fence, watch_lost), guard: Box::new(release) }))
    }
}

/// The lock's holder, and whether its run is recorded as ended.
fn holder_and_ended() -> String {
    format!(
        "SELECT COALESCE(s.holder, ''), COALESCE(r.status->>'state' IN {}, FALSE)
         FROM cluster_state s LEFT JOIN lifecycle_runs r ON s.holder = r.kind || ':' || r.id",
        finished_sql()
    )
}

/// How long a claim waits for a holder whose run has ended to let the lock go.
const HOLDER_ENDING_WAIT: Duration = Duration::from_secs(2);

/// The previous holder of the lifecycle lock, when its run is still going on
/// a live replica: it lost the lock (its connection closed) and has not
/// stopped yet. The next holder waits for it, so two never run at once.
fn previous_still_running() -> String {
    format!(
        "SELECT s.holder FROM cluster_state s
         JOIN lifecycle_runs r ON s.holder = r.kind || ':' || r.id
         WHERE r.status->>'state' NOT IN {}
           AND EXISTS (SELECT 1 FROM replicas p WHERE p.id = r.replica
                       AND p.seen_at > now() - make_interval(secs => $1))",
        finished_sql()
    )
}

impl PgCluster {
    /// A connection of its own for the lifecycle lock, named for operators
    /// (`pg_stat_activity`), with what bounds how long a silent holder keeps
    /// the lock: TCP keepalives and a user timeout on both ends, and the
    /// server ending the session once it has been idle for `LOCK_IDLE_LIMIT`
    /// (the holder asks every `LOCK_BEAT`). Also returns a receiver told why
    /// the connection closed.
    async fn lock_connection(&self) -> PortResult<(tokio_postgres::Client, oneshot::Receiver<String>)> {
        let mut config = self.target.config.clone();
        config
            .application_name("lookalike lifecycle lock")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(LOCK_IDLE_LIMIT);
        let connecting = tokio::time::timeout(CONNECT_WAIT, config.connect(self.target.tls.clone())).await;
        let (client, connection) =
            connecting.map_err(|_| GalleryError::Unavailable("PostgreSQL: connecting timed out".into()))??;
        let (closed, watch_closed) = oneshot::channel();
        tokio::spawn(async move {
            let why = match connection.await {
                Ok(()) => "its connection to PostgreSQL closed".to_string(),
                Err(error) => format!("its connection to PostgreSQL failed: {}", with_causes(&error)),
            };
            let _ = closed.send(why);
        });
        let ms = LOCK_IDLE_LIMIT.as_millis();
        let limits = [
            "SET tcp_keepalives_idle = 10".to_string(),
            "SET tcp_keepalives_interval = 5".into(),
            "SET tcp_keepalives_count = 3".into(),
            format!("SET tcp_user_timeout = {ms}"),
            format!("SET idle_session_timeout = {ms}"),
        ];
        // One at a time: PostgreSQL before 14 has no idle_session_timeout, and the others still hold.
        for limit in limits {
            if let Err(error) = client.batch_execute(&limit).await {
                tracing::warn!(%error, limit, "could not bound the lifecycle lock's session on the server");
            }
        }
        Ok((client, watch_closed))
    }
}

/// How often the holder of the lifecycle lock checks its connection.
const LOCK_BEAT: Duration = Duration::from_secs(2);
/// How long a check may take before the holder takes the lock as lost.
const LOCK_ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long the server keeps the lock of a holder it does not hear from.
/// Above `LOCK_BEAT + LOCK_ANSWER_WITHIN`: a holder cut off stops its work
/// before the server lets another replica take the lock.
const LOCK_IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Holds the lifecycle lock's connection until `released`, checking it
/// every `LOCK_BEAT`; tells `lost` why when it closes or stops answering.
async fn keep_lock(
    client: tokio_postgres::Client,
    mut released: oneshot::Receiver<()>,
    mut closed: oneshot::Receiver<String>,
    lost: watch::Sender<Option<String>>,
) {
    let why = loop {
        tokio::select! {
            _ = &mut released => return, // dropping `client` closes the connection: PostgreSQL releases the lock
            why = &mut closed => break why.unwrap_or_else(|_| "its connection to PostgreSQL closed".into()),
            _ = tokio::time::sleep(LOCK_BEAT) => {}
        }
        match tokio::time::timeout(LOCK_ANSWER_WITHIN, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => break format!("its connection to PostgreSQL failed: {}", with_causes(&error)),
            Err(_) => break format!("PostgreSQL did not answer within {} s", LOCK_ANSWER_WITHIN.as_secs()),
        }
    };
    tracing::error!(why, "lost the lifecycle lock; stopping the work under it");
    lost.send_replace(Some(why));
}
