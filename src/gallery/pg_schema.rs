//! Versioned schema of cluster mode's PostgreSQL database, applied as
//! ordered migrations under an advisory lock, so replicas starting together
//! migrate once. `lookalike_schema` records how many have run.

use deadpool_postgres::Client;

use super::GalleryError;

/// The advisory lock key that migrations hold ("lookalike" in ASCII, folded).
const MIGRATION_LOCK: i64 = 0x6c6f_6f6b_616c_696b;

/// Migration `i` brings the schema from version `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: items with their original bytes, and one embedding per item per model.
    // Embeddings of every model share a table with an untyped `vector` column;
    // each model gets a partial HNSW index over `embedding::vector(dim)` (see
    // `index::pgvector`), as pgvector's documentation suggests for mixed dimensions.
    "CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE items (
        id BIGSERIAL PRIMARY KEY,
        content_hash TEXT NOT NULL,      -- sha256 of the original bytes, hex
        media_type TEXT NOT NULL,
        label TEXT,
        metadata JSONB NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        created_at BIGINT NOT NULL,      -- unix milliseconds
        image BYTEA NOT NULL
    );
    CREATE INDEX items_by_hash ON items (content_hash);
    CREATE INDEX items_by_label ON items (label);
    CREATE TABLE embeddings (
        model TEXT NOT NULL,             -- the model version's key
        item_id BIGINT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        embedding vector NOT NULL,
        PRIMARY KEY (model, item_id)
    );
    CREATE INDEX embeddings_by_item ON embeddings (item_id);",
];

/// Brings the database to this build's schema; refuses one migrated by a newer build.
pub async fn migrate(client: &mut Client) -> Result<(), GalleryError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result?;
    unlocked?;
    Ok(())
}

async fn migrate_locked(client: &mut Client) -> Result<(), GalleryError> {
    client.batch_execute("CREATE TABLE IF NOT EXISTS lookalike_schema (version INTEGER NOT NULL)").await?;
    let row = client.query_opt("SELECT version FROM lookalike_schema", &[]).await?;
    let current = row.map(|r| r.get::<_, i32>(0) as usize).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(GalleryError::Schema(format!(
            "the database has schema version {current}, newer than this build's {}; upgrade lookalike",
            MIGRATIONS.len()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("DELETE FROM lookalike_schema", &[]).await?;
        tx.execute("INSERT INTO lookalike_schema (version) VALUES ($1)", &[&((version + 1) as i32)]).await?;
        tx.commit().await?;
        tracing::info!(version = version + 1, "database schema migrated");
    }
    Ok(())
}
