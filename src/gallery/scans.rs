//! Duplicate scans' records (`curation::scans`), kept in the store so that any
//! replica can answer for a scan another one runs, and a restart keeps them.
//! The record itself is the JSON the API shows; the store keeps the newest few.
//! How long ago a record was written is measured by the store's clock
//! (PostgreSQL's, in cluster mode), so replicas' clocks need not agree.

use super::GalleryError;
use crate::clock::now_millis;

/// Scans kept; older ones are forgotten as new ones start.
pub const SCANS_KEPT: i64 = 8;

/// The advisory lock that makes a scan's start atomic across replicas ("dupscan").
const START_LOCK: i64 = 0x0064_7570_7363_616e;

/// PostgreSQL's clock in unix milliseconds.
const PG_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// A scan's record as stored.
#[derive(Debug, Clone)]
pub struct StoredScan {
    pub id: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The record as `GET /gallery/duplicates/{id}` shows it, JSON.
    pub record: String,
    /// Unix milliseconds (the writer's clock), for keeping the newest.
    pub created_at: i64,
    /// Milliseconds since the record was last written, by the store's clock
    /// (read back; ignored on writes): a running scan's heartbeat.
    pub idle_ms: i64,
}

/// What starting a scan found.
#[derive(Debug)]
pub enum ScanStart {
    Started,
    /// A scan written to within the freshness window is running: its id.
    Running(String),
}

fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredScan> {
    let updated_at: i64 = r.get(4)?;
    let idle_ms = now_millis() as i64 - updated_at;
    Ok(StoredScan { id: r.get(0)?, state: r.get(1)?, record: r.get(2)?, created_at: r.get(3)?, idle_ms })
}

fn from_pg(r: &tokio_postgres::Row) -> StoredScan {
    StoredScan { id: r.get(0), state: r.get(1), record: r.get(2), created_at: r.get(3), idle_ms: r.get(4) }
}

const SQLITE_PUT: &str =
    "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record, updated_at = excluded.updated_at";
const SQLITE_TRIM: &str = "DELETE FROM duplicate_scans WHERE id NOT IN
     (SELECT id FROM duplicate_scans ORDER BY created_at DESC, id LIMIT ?1)";
const SQLITE_SELECT: &str = "SELECT id, state, record, created_at, updated_at FROM duplicate_scans";

/// Writes a scan's record, and forgets scans beyond the newest `SCANS_KEPT`.
pub(super) fn sqlite_put(conn: &mut rusqlite::Connection, scan: &StoredScan) -> Result<(), GalleryError> {
    let tx = conn.transaction()?;
    sqlite_upsert(&tx, scan)?;
    tx.commit()?;
    Ok(())
}

fn sqlite_upsert(tx: &rusqlite::Transaction<'_>, scan: &StoredScan) -> Result<(), GalleryError> {
    let params = rusqlite::params![scan.id, scan.state, scan.record, scan.created_at, now_millis() as i64];
    tx.execute(SQLITE_PUT, params)?;
    tx.execute(SQLITE_TRIM, [SCANS_KEPT])?;
    Ok(())
}

/// Writes a new scan's record unless a scan written to within `fresh_ms` is
/// running, in one transaction that takes the write lock first.
pub(super) fn sqlite_start(
    conn: &mut rusqlite::Connection,
    scan: &StoredScan,
    fresh_ms: i64,
) -> Result<ScanStart, GalleryError> {
    use rusqlite::OptionalExtension;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let sql = "SELECT id FROM duplicate_scans WHERE state = 'running' AND updated_at >= ?1 ORDER BY created_at DESC";
    if let Some(id) = tx.query_row(sql, [now_millis() as i64 - fresh_ms], |r| r.get(0)).optional()? {
        return Ok(ScanStart::Running(id));
    }
    sqlite_upsert(&tx, scan)?;
    tx.commit()?;
    Ok(ScanStart::Started)
}

pub(super) fn sqlite_get(conn: &rusqlite::Connection, id: &str) -> Result<Option<StoredScan>, GalleryError> {
    use rusqlite::OptionalExtension;
    Ok(conn.query_row(&format!("{SQLITE_SELECT} WHERE id = ?1"), [id], from_sqlite).optional()?)
}

/// At an embedded start: scans left running by this store's last process
/// lost it (one process serves an embedded store); they read failed at once.
pub(super) fn sqlite_abandon_running(conn: &rusqlite::Connection) -> Result<usize, GalleryError> {
    Ok(conn.execute("UPDATE duplicate_scans SET updated_at = 0 WHERE state = 'running'", [])?)
}

/// PostgreSQL: as `sqlite_put`, stamped with the database's clock.
pub(super) async fn pg_put(client: &mut deadpool_postgres::Client, scan: &StoredScan) -> Result<(), GalleryError> {
    let tx = client.transaction().await?;
    pg_upsert(&tx, scan).await?;
    tx.commit().await?;
    Ok(())
}

/// PostgreSQL: as `sqlite_start`, under a transaction-scoped advisory lock so
/// that two replicas cannot both start one.
pub(super) async fn pg_start(
    client: &mut deadpool_postgres::Client,
    scan: &StoredScan,
    fresh_ms: i64,
) -> Result<ScanStart, GalleryError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&START_LOCK]).await?;
    let sql = format!(
        "SELECT id FROM duplicate_scans WHERE state = 'running' AND updated_at >= {PG_NOW_MS} - $1
         ORDER BY created_at DESC LIMIT 1"
    );
    if let Some(row) = tx.query_opt(&sql, &[&fresh_ms]).await? {
        return Ok(ScanStart::Running(row.get(0)));
    }
    pg_upsert(&tx, scan).await?;
    tx.commit().await?;
    Ok(ScanStart::Started)
}

async fn pg_upsert(tx: &tokio_postgres::Transaction<'_>, scan: &StoredScan) -> Result<(), GalleryError> {
    let upsert = format!(
        "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at) VALUES ($1, $2, $3, $4, {PG_NOW_MS})
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record,
                                        updated_at = excluded.updated_at"
    );
    tx.execute(&upsert, &[&scan.id, &scan.state, &scan.record, &scan.created_at]).await?;
    let trim = "DELETE FROM duplicate_scans WHERE id NOT IN
                (SELECT id FROM duplicate_scans ORDER BY created_at DESC, id LIMIT $1)";
    tx.execute(trim, &[&SCANS_KEPT]).await?;
    Ok(())
}

pub(super) async fn pg_get(
    client: &impl deadpool_postgres::GenericClient,
    id: &str,
) -> Result<Option<StoredScan>, GalleryError> {
    let sql =
        format!("SELECT id, state, record, created_at, {PG_NOW_MS} - updated_at FROM duplicate_scans WHERE id = $1");
    Ok(client.query_opt(&sql, &[&id]).await?.as_ref().map(from_pg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gallery::{GalleryStore, SqliteGallery};

    fn scan(n: i64, state: &str) -> StoredScan {
        StoredScan { id: format!("s{n}"), state: state.into(), record: "{}".into(), created_at: n, idle_ms: 0 }
    }

    /// The newest `SCANS_KEPT` stay, and rewriting a record (progress, the end) forgets none.
    /// A start is refused while a fresh scan runs, and allowed once it went quiet.
    #[tokio::test]
    async fn the_newest_scans_are_kept_and_one_runs_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteGallery::open(dir.path()).unwrap();
        for n in 0..SCANS_KEPT + 2 {
            store.put_scan(scan(n, "done")).await.unwrap();
        }
        assert!(store.scan("s0".into()).await.unwrap().is_none());
        assert!(store.scan("s1".into()).await.unwrap().is_none());
        store.put_scan(StoredScan { record: "{\"x\":1}".into(), ..scan(2, "running") }).await.unwrap();
        let rewritten = store.scan("s2".into()).await.unwrap().unwrap();
        assert_eq!((rewritten.state.as_str(), rewritten.record.as_str()), ("running", "{\"x\":1}"));
        assert!(store.scan(format!("s{}", SCANS_KEPT + 1)).await.unwrap().is_some(), "a rewrite forgets none");

        let next = scan(SCANS_KEPT + 2, "running");
        assert!(matches!(store.start_scan(next.clone(), 60_000).await.unwrap(), ScanStart::Running(id) if id == "s2"));
        assert!(store.scan(next.id.clone()).await.unwrap().is_none(), "a refused start writes nothing");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(store.start_scan(next.clone(), 10).await.unwrap(), ScanStart::Started));
        assert_eq!(store.scan(next.id).await.unwrap().unwrap().state, "running");
    }
}
