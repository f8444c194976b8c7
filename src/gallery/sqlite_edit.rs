//! Edits to stored items in SQLite (`edit.rs`), each one transaction.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::edit::{if_match_admits, Edited, ItemEdit};
use super::sqlite::summary_from_row;
use super::GalleryError;

const SELECT_SUMMARY: &str =
    "SELECT id, label, metadata, media_type, width, height, content_hash, created_at FROM items WHERE id = ?1";

/// Applies `edit` to item `id` if `if_match` admits its current tag.
pub(super) fn edit(
    conn: &mut Connection,
    id: i64,
    edit: &ItemEdit,
    if_match: Option<&str>,
) -> Result<Edited, GalleryError> {
    // IMMEDIATE: the read and the write see one state, whatever else writes.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut item) = tx.query_row(SELECT_SUMMARY, [id], summary_from_row).optional()? else {
        return Ok(Edited::Missing);
    };
    if if_match.is_some_and(|tags| !if_match_admits(tags, &item.etag())) {
        return Ok(Edited::Stale(item));
    }
    (item.label, item.metadata) = edit.apply(item.label, item.metadata);
    if let Some(size) = edit.too_large(&item.metadata) {
        return Ok(Edited::TooLarge(size));
    }
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
