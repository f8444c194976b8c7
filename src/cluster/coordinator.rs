//! The switch's rows: who is live and what each serves (`replicas`), the
//! active and target versions (`cluster_state`), and the lifecycle lock (an
//! advisory lock on a connection of its own).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{PgCluster, CHANNEL, CONNECT_WAIT, LIFECYCLE_LOCK, LIVE_WITHIN_SECS};
use crate::gallery::GalleryError;
use crate::lifecycle::ports::{
    ClusterState, HeldLock, LifecycleLock, Membership, PortResult, SwitchCoordinator, SwitchStatus, POLL,
};

/// The lifecycle lock, held on a connection of its own: dropping it (or the
/// process dying) closes the connection, and PostgreSQL releases the lock.
struct PgLock {
    _client: tokio_postgres::Client,
}

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

    /// Phase one: asks every replica to prepare `version`.
    async fn begin(&self, version: &str, switch_id: &str) -> PortResult<()> {
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
    /// transaction, if `switch_id` is still the switch under way.
    async fn flip(&self, switch_id: &str, version: &str) -> PortResult<bool> {
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

#[async_trait::async_trait]
impl LifecycleLock for PgCluster {
    /// Takes the lifecycle lock for `holder` (`job:<id>`, `activation:<id>`),
    /// or says who has it.
    async fn acquire(&self, holder: &str) -> PortResult<Result<HeldLock, String>> {
        let connecting = tokio::time::timeout(CONNECT_WAIT, self.target.config.connect(self.target.tls.clone())).await;
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
        Ok(Ok(Box::new(PgLock { _client: client })))
    }
}
