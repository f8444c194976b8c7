//! Edits to stored items in PostgreSQL (`edit.rs`), each one transaction.

use deadpool_postgres::Object;

use super::edit::{Edited, ItemEdit};
use super::postgres::{summary_from_row, SUMMARY_COLUMNS};
use super::GalleryError;

/// Applies `edit` to item `id` if `if_match` admits its current tag.
pub(super) async fn edit(
    client: &mut Object,
    id: i64,
    edit: &ItemEdit,
    if_match: Option<&str>,
) -> Result<Edited, GalleryError> {
    let tx = client.transaction().await?;
    // FOR UPDATE: a concurrent edit of the item waits for this one, then checks its tag against ours.
    let sql = format!("SELECT {SUMMARY_COLUMNS} FROM items WHERE id = $1 FOR UPDATE");
    let Some(row) = tx.query_opt(&sql, &[&id]).await? else { return Ok(Edited::Missing) };
    let item = match edit.decide(summary_from_row(&row), if_match) {
        Ok(item) => item,
        Err(unapplied) => return Ok(*unapplied),
    };
    tx.execute("UPDATE items SET label = $2, metadata = $3 WHERE id = $1", &[&id, &item.label, &item.metadata]).await?;
    tx.commit().await?;
    Ok(Edited::Done(item))
}

/// Sets `label` on every id, or on none when some do not exist (returned).
pub(super) async fn relabel(client: &mut Object, ids: &[i64], label: Option<&str>) -> Result<Vec<i64>, GalleryError> {
    let tx = client.transaction().await?;
    let updated = tx.query("UPDATE items SET label = $2 WHERE id = ANY($1) RETURNING id", &[&ids, &label]).await?;
    let updated: std::collections::HashSet<i64> = updated.iter().map(|r| r.get(0)).collect();
    let mut missing: Vec<i64> = ids.iter().copied().filter(|id| !updated.contains(id)).collect();
    missing.dedup();
    if missing.is_empty() {
        tx.commit().await?;
    }
    Ok(missing)
}
