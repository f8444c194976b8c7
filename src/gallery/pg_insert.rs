//! Item rows into PostgreSQL: the one insert that uploads and `lookalike
//! migrate` (whole items with their ids) share.

use deadpool_postgres::GenericClient;
use pgvector::Vector;

use super::{ExportedItem, GalleryError, PgGallery};

impl PgGallery {
    /// Writes whole items with their ids, in one transaction, and moves the
    /// id sequence past them (`lookalike migrate`).
    pub async fn import(&self, items: Vec<ExportedItem>) -> Result<(), GalleryError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for item in items {
            let s = &item.summary;
            let row = ItemRow {
                content_hash: &s.content_hash,
                media_type: &s.media_type,
                label: s.label.as_deref(),
                metadata: &s.metadata,
                width: s.width,
                height: s.height,
                created_at: s.created_at,
                image: &item.image,
            };
            insert_row(&tx, Some(s.id), row, item.embeddings).await?;
        }
        tx.execute("SELECT setval(pg_get_serial_sequence('items', 'id'), GREATEST(MAX(id), 1)) FROM items", &[])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// An item's columns, as both insert paths write them.
pub(super) struct ItemRow<'a> {
    pub(super) content_hash: &'a str,
    pub(super) media_type: &'a str,
    pub(super) label: Option<&'a str>,
    pub(super) metadata: &'a serde_json::Value,
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) created_at: i64,
    pub(super) image: &'a [u8],
}

/// Inserts an item with its embeddings (`(model, vector)`); `id: None`
/// takes the next id of the sequence. Returns the item's id.
pub(super) async fn insert_row(
    tx: &impl GenericClient,
    id: Option<i64>,
    row: ItemRow<'_>,
    embeddings: Vec<(String, Vec<f32>)>,
) -> Result<i64, GalleryError> {
    let id: i64 = tx
        .query_one(
            "INSERT INTO items (id, content_hash, media_type, label, metadata, width, height, created_at, image)
             VALUES (COALESCE($1, nextval(pg_get_serial_sequence('items', 'id'))), $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING id",
            &[
                &id,
                &row.content_hash,
                &row.media_type,
                &row.label,
                row.metadata,
                &(row.width as i32),
                &(row.height as i32),
                &row.created_at,
                &row.image,
            ],
        )
        .await?
        .get(0);
    for (model, vector) in embeddings {
        tx.execute(
            "INSERT INTO embeddings (model, item_id, embedding) VALUES ($1, $2, $3)",
            &[&model, &id, &Vector::from(vector)],
        )
        .await?;
    }
    Ok(id)
}
