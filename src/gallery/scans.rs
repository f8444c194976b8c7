//! Duplicate scans' records (`curation::scans`), kept in the store so that any
//! replica can answer for a scan another one runs, and a restart keeps them.
//! The record itself is the JSON the API shows; the store keeps the newest few.

use super::GalleryError;

/// Scans kept; older ones are forgotten as new ones start.
pub const SCANS_KEPT: i64 = 8;

/// A scan's record as stored.
#[derive(Debug, Clone)]
pub struct StoredScan {
    pub id: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The record as `GET /gallery/duplicates/{id}` shows it, JSON.
    pub record: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last write: a running scan's heartbeat.
    pub updated_at: i64,
}

fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredScan> {
    Ok(StoredScan { id: r.get(0)?, state: r.get(1)?, record: r.get(2)?, created_at: r.get(3)?, updated_at: r.get(4)? })
}

fn from_pg(r: &tokio_postgres::Row) -> StoredScan {
    StoredScan { id: r.get(0), state: r.get(1), record: r.get(2), created_at: r.get(3), updated_at: r.get(4) }
}

/// Writes a scan's record (a new one forgets scans beyond the newest `SCANS_KEPT`).
pub(super) fn sqlite_put(conn: &mut rusqlite::Connection, scan: &StoredScan) -> Result<(), GalleryError> {
    let tx = conn.transaction()?;
    let added = tx.execute(
        "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record, updated_at = excluded.updated_at",
        rusqlite::params![scan.id, scan.state, scan.record, scan.created_at, scan.updated_at],
    )?;
    if added == 1 {
        tx.execute(
            "DELETE FROM duplicate_scans WHERE id NOT IN
             (SELECT id FROM duplicate_scans ORDER BY created_at DESC, id LIMIT ?1)",
            [SCANS_KEPT],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn sqlite_get(conn: &rusqlite::Connection, id: &str) -> Result<Option<StoredScan>, GalleryError> {
    use rusqlite::OptionalExtension;
    let sql = "SELECT id, state, record, created_at, updated_at FROM duplicate_scans WHERE id = ?1";
    Ok(conn.query_row(sql, [id], from_sqlite).optional()?)
}

/// The scans recorded as running, newest first.
pub(super) fn sqlite_running(conn: &rusqlite::Connection) -> Result<Vec<StoredScan>, GalleryError> {
    let sql = "SELECT id, state, record, created_at, updated_at FROM duplicate_scans
               WHERE state = 'running' ORDER BY created_at DESC";
    let rows = conn.prepare(sql)?.query_map([], from_sqlite)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// PostgreSQL: as `sqlite_put`.
pub(super) async fn pg_put(client: &mut deadpool_postgres::Client, scan: &StoredScan) -> Result<(), GalleryError> {
    // An upsert reports one row either way; `xmax = 0` tells an insert from an update.
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record,
                                            updated_at = excluded.updated_at
             RETURNING (xmax = 0)",
            &[&scan.id, &scan.state, &scan.record, &scan.created_at, &scan.updated_at],
        )
        .await?;
    if row.get::<_, bool>(0) {
        tx.execute(
            "DELETE FROM duplicate_scans WHERE id NOT IN
             (SELECT id FROM duplicate_scans ORDER BY created_at DESC, id LIMIT $1)",
            &[&SCANS_KEPT],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn pg_get(
    client: &impl deadpool_postgres::GenericClient,
    id: &str,
) -> Result<Option<StoredScan>, GalleryError> {
    let sql = "SELECT id, state, record, created_at, updated_at FROM duplicate_scans WHERE id = $1";
    Ok(client.query_opt(sql, &[&id]).await?.as_ref().map(from_pg))
}

pub(super) async fn pg_running(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Vec<StoredScan>, GalleryError> {
    let sql = "SELECT id, state, record, created_at, updated_at FROM duplicate_scans
               WHERE state = 'running' ORDER BY created_at DESC";
    Ok(client.query(sql, &[]).await?.iter().map(from_pg).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gallery::{GalleryStore, SqliteGallery};

    fn scan(n: i64, state: &str) -> StoredScan {
        StoredScan { id: format!("s{n}"), state: state.into(), record: "{}".into(), created_at: n, updated_at: n }
    }

    /// The newest `SCANS_KEPT` stay; rewriting a record (progress, the end) forgets none.
    #[tokio::test]
    async fn the_newest_scans_are_kept_and_rewrites_forget_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteGallery::open(dir.path()).unwrap();
        for n in 0..SCANS_KEPT + 2 {
            store.put_scan(scan(n, "done")).await.unwrap();
        }
        assert!(store.scan("s0".into()).await.unwrap().is_none());
        assert!(store.scan("s1".into()).await.unwrap().is_none());
        let newest = SCANS_KEPT + 1;
        assert_eq!(store.scan(format!("s{newest}")).await.unwrap().unwrap().state, "done");
        store.put_scan(StoredScan { record: "{\"x\":1}".into(), ..scan(2, "running") }).await.unwrap();
        let rewritten = store.scan("s2".into()).await.unwrap().unwrap();
        assert_eq!((rewritten.state.as_str(), rewritten.record.as_str()), ("running", "{\"x\":1}"));
        assert_eq!(store.running_scans().await.unwrap().iter().map(|s| s.id.clone()).collect::<Vec<_>>(), ["s2"]);
    }
}
