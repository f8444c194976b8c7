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
    // 2: the model lifecycle, shared by every replica (`cluster`): saved model
    // versions, which one serves and which one a switch prepares, the live
    // replicas, stored images a model cannot preprocess, and the records of
    // fine-tune jobs and activations.
    "CREATE TABLE model_versions (
        version TEXT PRIMARY KEY,
        manifest JSONB NOT NULL,
        encoder BYTEA NOT NULL,          -- the TorchScript file
        created_at BIGINT NOT NULL
    );
    CREATE TABLE cluster_state (
        singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        active_version TEXT,             -- NULL: the bundled model
        target_version TEXT,             -- the version a switch prepares, if any
        switch_id TEXT,
        epoch BIGINT NOT NULL DEFAULT 0, -- bumped at every flip
        holder TEXT                      -- who holds the lifecycle lock: 'job:<id>' or 'activation:<id>'
    );
    INSERT INTO cluster_state DEFAULT VALUES;
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        seen_at TIMESTAMPTZ NOT NULL,
        serving TEXT NOT NULL,
        ready_for TEXT,                  -- the switch it is ready for
        failed_for TEXT,                 -- the switch it could not prepare, with why
        failure TEXT
    );
    CREATE TABLE unembeddable (
        model TEXT NOT NULL,
        item_id BIGINT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        PRIMARY KEY (model, item_id)
    );
    CREATE TABLE lifecycle_runs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,              -- 'job' or 'activation'
        replica TEXT NOT NULL,
        status JSONB NOT NULL,           -- as GET /admin/finetune/{id} or /admin/activations/{id} shows it
        cancel BOOLEAN NOT NULL DEFAULT FALSE,
        created_at BIGINT NOT NULL
    );",
    // Writes made under a client's Idempotency-Key (gallery/idempotency.rs), kept a day.
    "CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        inserted TEXT NOT NULL,
        answer TEXT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);",
    // 4: the lifecycle lock's fencing token, bumped at every taking of the
    // lock: a holder's switch and version writes are conditional on it. A
    // deleted model version keeps its row (its number stays used), without its encoder.
    "ALTER TABLE cluster_state ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE model_versions ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE;",
    // 5: duplicate scans' records (gallery/scans.rs), the newest few, for every replica to answer.
    "CREATE TABLE duplicate_scans (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,             -- running, done or failed
        record TEXT NOT NULL,            -- as the API shows it, JSON (not JSONB: read back as written)
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL       -- a running scan's heartbeat
    );",
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
