//! Versioned schema of the gallery store, applied as ordered migrations.
//! `PRAGMA user_version` records how many have run.

use rusqlite::Connection;

use super::GalleryError;

/// Migration `i` brings the schema from version `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: items with their original bytes, and embeddings per model.
    "CREATE TABLE items (
        id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, even after a delete
        content_hash TEXT NOT NULL,           -- sha256 of the original bytes, hex
        media_type TEXT NOT NULL,
        label TEXT,
        metadata TEXT NOT NULL,               -- a JSON object
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        created_at INTEGER NOT NULL,          -- unix milliseconds
        image BLOB NOT NULL
    );
    CREATE INDEX items_by_hash ON items(content_hash);
    CREATE INDEX items_by_label ON items(label);
    CREATE TABLE embeddings (
        item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
        model TEXT NOT NULL,                  -- manifest name@version
        vector BLOB NOT NULL,                 -- little-endian f32
        PRIMARY KEY (item_id, model)
    );",
    // 2: writes made under a client's Idempotency-Key (gallery/idempotency.rs), kept a day.
    "CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,            -- a digest of the request
        inserted TEXT NOT NULL,               -- the store's report, JSON
        answer TEXT,                          -- the answer the client got, JSON
        created_at INTEGER NOT NULL           -- unix milliseconds
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys(created_at);",
    // 3: duplicate scans' records (gallery/scans.rs), the newest few.
    "CREATE TABLE duplicate_scans (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,                  -- running, done or failed
        record TEXT NOT NULL,                 -- as the API shows it, JSON
        created_at INTEGER NOT NULL,          -- unix milliseconds
        updated_at INTEGER NOT NULL           -- a running scan's heartbeat
    );",
];

pub fn migrate(conn: &mut Connection) -> Result<(), GalleryError> {
    let current: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(GalleryError::Schema(format!(
            "the store has schema version {current}, newer than this build's {}; upgrade lookalike",
            MIGRATIONS.len()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(version = version + 1, "gallery schema migrated");
    }
    Ok(())
}
