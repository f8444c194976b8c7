//! Edits to stored items in SQLite (`edit.rs`), each one transaction.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::edit::{Edited, ItemEdit};
use super::sqlite::{summary_from_row, SUMMARY_COLUMNS};
use super::GalleryError;

/// Applies `edit` to item `id` if `if_match` admits its current tag.
pub(super) fn edit(
    conn: &mut Connection,
    id: i64,
    edit: &ItemEdit,
    if_match: Option<&str>,
) -> Result<Edited, GalleryError> {
    // IMMEDIATE: the read and the write see one state, whatever else writes.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let sql = format!("SELECT {SUMMARY_COLUMNS} FROM items WHERE id = ?1");
    let Some(item) = tx.query_row(&sql, [id], summary_from_row).optional()? else { return Ok(Edited::Missing) };
    let item = match edit.decide(item, if_match) {
        Ok(item) => item,
        Err(unapplied) => return Ok(*unapplied),
    };
    tx.execute(
        "UPDATE items SET label = ?2, metadata = ?3 WHERE id = ?1",
        params![id, item.label, item.metadata.to_string()],
    )?;
    tx.commit()?;
    Ok(Edited::Done(item))
}

/// Sets `label` on every id, or on none when some do not exist (returned).
pub(super) fn relabel(conn: &mut Connection, ids: &[i64], label: Option<&str>) -> Result<Vec<i64>, GalleryError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut missing = Vec::new();
    {
        let mut update = tx.prepare_cached("UPDATE items SET label = ?2 WHERE id = ?1")?;
        for &id in ids {
            if update.execute(params![id, label])? == 0 {
                missing.push(id);
            }
        }
    }
    if missing.is_empty() {
        tx.commit()?;
    }
    Ok(missing)
}
