//! Saved model versions (`model_versions`: TorchScript bytes and manifest)
//! and the fine-tune and activation records of every replica (`lifecycle_runs`).

use std::path::Path;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::mpsc;

use super::coordinator::check_fence;
use super::{finished_sql, PgCluster, RunUpdate, LIVE_WITHIN_SECS, VERSIONS_LOCK};
use crate::clock::now_millis;
use crate::gallery::pg_connect::with_causes;
use crate::gallery::{postgres_unavailable, GalleryError};
use crate::lifecycle::ports::{PortResult, RunKind, RunLog, StoredRun, VersionStore};
use crate::lifecycle::runs::has_finished;
use crate::manifest::Manifest;
use crate::registry::{ModelVersion, Registry};

#[async_trait::async_trait]
impl VersionStore for PgCluster {
    /// Saves trained weights as the next version number across the cluster,
    /// in the database and in this replica's model folder, if `fence` still
    /// holds the lifecycle lock.
    async fn publish(
        &self,
        registry: &Registry,
        weights: &Path,
        manifest: Manifest,
        fence: i64,
    ) -> PortResult<ModelVersion> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&VERSIONS_LOCK]).await?;
        check_fence(&tx, fence).await?;
        let rows = tx.query("SELECT version FROM model_versions", &[]).await?;
        let stored = rows.iter().filter_map(|r| r.get::<_, String>(0).parse::<u64>().ok()).max().unwrap_or(0);
        let (registry, weights_path) = (registry.clone(), weights.to_path_buf());
        let saved = tokio::task::spawn_blocking(move || registry.save_above(&weights_path, &manifest, stored))
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

    async fn delete(&self, registry: &Registry, version: &str, fence: i64) -> PortResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        check_fence(&tx, fence).await?;
        let sql = "UPDATE model_versions SET deleted = TRUE, encoder = ''::bytea WHERE version = $1";
        tx.execute(sql, &[&version]).await?;
        tx.commit().await?;
        let (registry, version) = (registry.clone(), version.to_string());
        tokio::task::spawn_blocking(move || registry.remove(&version)).await.map_err(std::io::Error::other)??;
        Ok(())
    }

    /// Copies into this replica's model folder every version another replica
    /// saved, and removes those another replica deleted.
    async fn install(&self, registry: &Registry) -> PortResult<()> {
        let _installing = self.installing.lock().await;
        let client = self.client().await?;
        let local: Vec<(String, String)> = {
            let registry = registry.clone();
            let list = tokio::task::spawn_blocking(move || registry.list()).await.map_err(std::io::Error::other)??;
            list.into_iter().map(|v| (v.version, v.encoder_sha256)).collect()
        };
        let rows =
            client.query("SELECT version, manifest->>'encoder_sha256', deleted FROM model_versions", &[]).await?;
        for row in rows {
            let (version, sha, deleted): (String, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
            if deleted {
                if local.iter().any(|(v, _)| *v == version) {
                    let registry = registry.clone();
                    tokio::task::spawn_blocking(move || registry.remove(&version))
                        .await
                        .map_err(std::io::Error::other)??;
                }
                continue;
            }
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
}

#[async_trait::async_trait]
impl RunLog for PgCluster {
    /// Records a job's or an activation's first status before its start is
    /// answered, so that a `202` from this replica is readable on every one.
    async fn record(&self, kind: RunKind, id: &str, status: Value) -> PortResult<()> {
        let client = self.client().await?;
        upsert_run(&client, &self.replica, kind, id, &status, self.keep_runs).await?;
        Ok(())
    }

    fn publish(&self, kind: RunKind, id: &str, status: Value) {
        let _ = self.runs.send(RunUpdate { kind, id: id.to_string(), status });
    }

    async fn read(&self, kind: RunKind, id: Option<&str>) -> PortResult<Vec<StoredRun>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT r.status, EXISTS (SELECT 1 FROM replicas p WHERE p.id = r.replica
                    AND p.seen_at > now() - make_interval(secs => $3))
                 FROM lifecycle_runs r WHERE kind = $1 AND ($2::text IS NULL OR id = $2)
                 ORDER BY created_at DESC",
                &[&kind.as_str(), &id, &LIVE_WITHIN_SECS],
            )
            .await?;
        Ok(rows.iter().map(|r| StoredRun { status: r.get(0), replica_live: r.get(1) }).collect())
    }

    async fn request_cancel(&self, id: &str) -> PortResult<bool> {
        let sql = "UPDATE lifecycle_runs SET cancel = TRUE WHERE id = $1";
        Ok(self.client().await?.execute(sql, &[&id]).await? == 1)
    }

    async fn cancel_requested(&self, id: &str) -> PortResult<bool> {
        let row = self.client().await?.query_opt("SELECT cancel FROM lifecycle_runs WHERE id = $1", &[&id]).await?;
        Ok(row.is_some_and(|r| r.get(0)))
    }
}

/// `lookalike migrate`: stores an embedded service's saved model versions
/// (not the bundled one, which every replica has) and makes `active` the
/// cluster's active version (`None`: the bundled one). Returns how many were stored.
pub async fn import_versions(pool: &Pool, versions: &[ModelVersion], active: Option<&str>) -> PortResult<usize> {
    let mut client =
        pool.get().await.map_err(|e| GalleryError::Unavailable(format!("PostgreSQL: {}", with_causes(&e))))?;
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

/// Writes run updates in order, the latest of each run when several wait.
/// An update the database does not take stays waiting and is written again
/// (unless a newer one of its run replaces it) until it is: a final state
/// must reach every replica, however long the database was away.
pub(super) async fn write_runs(
    pool: Pool,
    replica: String,
    keep_runs: usize,
    mut updates: mpsc::UnboundedReceiver<RunUpdate>,
) {
    let mut waiting: Vec<RunUpdate> = Vec::new();
    let mut backoff = RETRY_FIRST;
    loop {
        if waiting.is_empty() {
            let Some(first) = updates.recv().await else { return };
            waiting.push(first);
        }
        while let Ok(more) = updates.try_recv() {
            waiting.retain(|u| u.id != more.id);
            waiting.push(more);
        }
        waiting = write_waiting(&pool, &replica, keep_runs, waiting).await;
        if waiting.is_empty() {
            backoff = RETRY_FIRST;
            continue;
        }
        // Newer updates may come meanwhile; a closed channel still flushes what waits.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MOST);
    }
}

/// The first and the longest wait before writing refused run updates again.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(200);
const RETRY_MOST: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes the updates in order; returns those the database did not take.
async fn write_waiting(pool: &Pool, replica: &str, keep_runs: usize, waiting: Vec<RunUpdate>) -> Vec<RunUpdate> {
    let client = match pool.get().await {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, waiting = waiting.len(), "cannot reach the database to record runs' progress; retrying");
            return waiting;
        }
    };
    let mut refused = Vec::new();
    for update in waiting {
        match upsert_run(&client, replica, update.kind, &update.id, &update.status, keep_runs).await {
            Ok(()) => {}
            Err(error) if postgres_unavailable(&error) => {
                tracing::warn!(%error, run = %update.id, "could not record a run's progress in the database; retrying");
                refused.push(update);
            }
            // Refused for good (a bug): writing it again would hold up every later update.
            Err(error) => tracing::error!(%error, run = %update.id, "the database refused a run's progress"),
        }
    }
    refused
}

/// A run's status, inserted or replaced; a run that has ended keeps its
/// final status (an update still queued behind it never brings it back).
/// When it ends, finished runs of its kind beyond the newest `keep` go.
async fn upsert_run(
    client: &tokio_postgres::Client,
    replica: &str,
    kind: RunKind,
    id: &str,
    status: &Value,
    keep: usize,
) -> Result<(), tokio_postgres::Error> {
    let (kind, finished) = (kind.as_str(), finished_sql());
    let upsert = format!(
        "INSERT INTO lifecycle_runs (id, kind, replica, status, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status
         WHERE lifecycle_runs.status->>'state' NOT IN {finished}"
    );
    client.execute(&upsert, &[&id, &kind, &replica, status, &(now_millis() as i64)]).await?;
    if has_finished(status) {
        let prune = format!(
            "DELETE FROM lifecycle_runs WHERE kind = $1 AND id IN (SELECT id FROM lifecycle_runs
             WHERE kind = $1 AND status->>'state' IN {finished} ORDER BY created_at DESC OFFSET $2)"
        );
        client.execute(&prune, &[&kind, &(keep as i64)]).await?;
    }
    Ok(())
}
