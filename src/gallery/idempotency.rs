//! Idempotency keys: a write made under a client's `Idempotency-Key` is
//! remembered in the transaction that stores its items, so a retry (after a
//! timeout, a dropped connection, a 5xx) finds it and gets the first answer
//! instead of storing the items again, on any replica. Keys are kept a day.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{GalleryError, Inserted};
use crate::clock::now_millis;

/// How long a key answers for its write.
pub const KEY_KEPT_MS: i64 = 24 * 60 * 60 * 1000;

/// A client's key for one write, and what identifies the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    /// A digest of the request: the same key with another request is refused.
    pub fingerprint: String,
}

/// What a write under a key left.
#[derive(Debug, Clone)]
pub struct Remembered {
    pub fingerprint: String,
    /// The store's report of the write.
    pub inserted: Vec<Inserted>,
    /// The answer the client was given, once it was kept.
    pub answer: Option<Value>,
}

/// The report as stored with the key.
#[derive(Serialize, Deserialize)]
struct StoredReport {
    id: i64,
    content_hash: String,
    duplicate_of: Option<i64>,
    stored: bool,
}

fn to_json(inserted: &[Inserted]) -> String {
    let reports: Vec<StoredReport> = inserted
        .iter()
        .map(|i| StoredReport {
            id: i.id,
            content_hash: i.content_hash.clone(),
            duplicate_of: i.duplicate_of,
            stored: i.stored,
        })
        .collect();
    serde_json::to_string(&reports).expect("reports serialise")
}

fn from_json(text: &str) -> Result<Vec<Inserted>, GalleryError> {
    let reports: Vec<StoredReport> =
        serde_json::from_str(text).map_err(|e| GalleryError::Corrupt(format!("an idempotency key's record: {e}")))?;
    Ok(reports
        .into_iter()
        .map(|r| Inserted { id: r.id, content_hash: r.content_hash, duplicate_of: r.duplicate_of, stored: r.stored })
        .collect())
}

fn remembered(fingerprint: String, inserted: &str, answer: Option<String>) -> Result<Remembered, GalleryError> {
    let answer = answer.map(|a| serde_json::from_str(&a)).transpose();
    let answer = answer.map_err(|e| GalleryError::Corrupt(format!("an idempotency key's answer: {e}")))?;
    Ok(Remembered { fingerprint, inserted: from_json(inserted)?, answer })
}

/// SQLite, inside the insert's transaction: records the key (false when
/// another write took it first) and forgets keys past their day.
pub(super) fn sqlite_remember(
    tx: &rusqlite::Transaction<'_>,
    key: &IdempotencyKey,
    inserted: &[Inserted],
) -> Result<bool, GalleryError> {
    let now = now_millis() as i64;
    tx.execute("DELETE FROM idempotency_keys WHERE created_at < ?1", [now - KEY_KEPT_MS])?;
    let added = tx.execute(
        "INSERT INTO idempotency_keys (key, fingerprint, inserted, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO NOTHING",
        rusqlite::params![key.key, key.fingerprint, to_json(inserted), now],
    )?;
    Ok(added == 1)
}

pub(super) fn sqlite_remembered(conn: &rusqlite::Connection, key: &str) -> Result<Option<Remembered>, GalleryError> {
    use rusqlite::OptionalExtension;
    let since = now_millis() as i64 - KEY_KEPT_MS;
    let row = conn
        .query_row(
            "SELECT fingerprint, inserted, answer FROM idempotency_keys WHERE key = ?1 AND created_at >= ?2",
            rusqlite::params![key, since],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?)),
        )
        .optional()?;
    row.map(|(fingerprint, inserted, answer)| remembered(fingerprint, &inserted, answer)).transpose()
}

pub(super) fn sqlite_keep_answer(conn: &rusqlite::Connection, key: &str, answer: &Value) -> Result<(), GalleryError> {
    conn.execute("UPDATE idempotency_keys SET answer = ?2 WHERE key = ?1", rusqlite::params![key, answer.to_string()])?;
    Ok(())
}

/// SQLite: forgets every key past its day (also done by each keyed insert;
/// this is for a gallery that gets none for a while).
pub(super) fn sqlite_forget_expired(conn: &rusqlite::Connection) -> Result<u64, GalleryError> {
    let before = now_millis() as i64 - KEY_KEPT_MS;
    Ok(conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?1", [before])? as u64)
}

/// PostgreSQL: as `sqlite_forget_expired`.
pub(super) async fn pg_forget_expired(client: &impl deadpool_postgres::GenericClient) -> Result<u64, GalleryError> {
    let before = now_millis() as i64 - KEY_KEPT_MS;
    Ok(client.execute("DELETE FROM idempotency_keys WHERE created_at < $1", &[&before]).await?)
}

/// PostgreSQL, inside the insert's transaction: as `sqlite_remember`.
pub(super) async fn pg_remember(
    tx: &tokio_postgres::Transaction<'_>,
    key: &IdempotencyKey,
    inserted: &[Inserted],
) -> Result<bool, GalleryError> {
    let now = now_millis() as i64;
    tx.execute("DELETE FROM idempotency_keys WHERE created_at < $1", &[&(now - KEY_KEPT_MS)]).await?;
    let added = tx
        .execute(
            "INSERT INTO idempotency_keys (key, fingerprint, inserted, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key) DO NOTHING",
            &[&key.key, &key.fingerprint, &to_json(inserted), &now],
        )
        .await?;
    Ok(added == 1)
}

pub(super) async fn pg_remembered(
    client: &impl deadpool_postgres::GenericClient,
    key: &str,
) -> Result<Option<Remembered>, GalleryError> {
    let since = now_millis() as i64 - KEY_KEPT_MS;
    let row = client
        .query_opt(
            "SELECT fingerprint, inserted, answer FROM idempotency_keys WHERE key = $1 AND created_at >= $2",
            &[&key, &since],
        )
        .await?;
    row.map(|r| remembered(r.get(0), r.get::<_, &str>(1), r.get(2))).transpose()
}

pub(super) async fn pg_keep_answer(
    client: &impl deadpool_postgres::GenericClient,
    key: &str,
    answer: &Value,
) -> Result<(), GalleryError> {
    client.execute("UPDATE idempotency_keys SET answer = $2 WHERE key = $1", &[&key, &answer.to_string()]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gallery::{GalleryStore, SqliteGallery};

    /// Keys past their day go without a keyed upload to sweep them; a fresh one stays.
    #[tokio::test]
    async fn expired_keys_are_forgotten_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteGallery::open(dir.path()).unwrap();
        let raw = rusqlite::Connection::open(dir.path().join("gallery.sqlite3")).unwrap();
        let now = now_millis() as i64;
        for (key, at) in [("old", now - KEY_KEPT_MS - 1), ("fresh", now)] {
            raw.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, inserted, created_at) VALUES (?1, 'f', '[]', ?2)",
                rusqlite::params![key, at],
            )
            .unwrap();
        }
        assert_eq!(store.forget_expired_keys().await.unwrap(), 1);
        let left: Vec<String> = raw
            .prepare("SELECT key FROM idempotency_keys")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(left, ["fresh"]);
    }
}
