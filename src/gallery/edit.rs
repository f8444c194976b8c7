//! Changing what is stored about an item after its upload: its label and its
//! metadata (`PATCH /gallery/{id}`, `POST /gallery/labels`). The image and its
//! embeddings never change; an item's `ETag` covers what can.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::ItemSummary;

/// A change to one item. Applied by the store inside the transaction that
/// checks the item's `ETag`, so that two editors cannot overwrite each other.
#[derive(Debug, Clone, Default)]
pub struct ItemEdit {
    /// `None`: unchanged; `Some(None)`: cleared.
    pub label: Option<Option<String>>,
    pub metadata: MetadataEdit,
    /// The most bytes the metadata may take as JSON after the edit (as an
    /// upload's `metadata` part may); 0: no limit.
    pub max_metadata_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub enum MetadataEdit {
    #[default]
    Keep,
    /// The new metadata object, whole.
    Replace(Map<String, Value>),
    /// An RFC 7396 JSON merge patch: its `null`s remove keys, its objects merge.
    Merge(Value),
}

impl ItemEdit {
    /// The label and metadata after the edit.
    pub fn apply(&self, label: Option<String>, metadata: Value) -> (Option<String>, Value) {
        let label = self.label.clone().unwrap_or(label);
        let metadata = match &self.metadata {
            MetadataEdit::Keep => metadata,
            MetadataEdit::Replace(map) => Value::Object(map.clone()),
            MetadataEdit::Merge(patch) => {
                let mut merged = metadata;
                json_patch::merge(&mut merged, patch);
                // A patch of `null` removes the whole object; metadata stays an object.
                if merged.is_object() {
                    merged
                } else {
                    Value::Object(Map::new())
                }
            }
        };
        (label, metadata)
    }

    /// The item after the edit, if `if_match` (an `If-Match` header) admits
    /// its current state and the result fits; else how the edit ends unapplied.
    /// The stores call it between reading the item and writing it back.
    pub fn decide(&self, mut item: ItemSummary, if_match: Option<&str>) -> Result<ItemSummary, Box<Edited>> {
        if if_match.is_some_and(|tags| !if_match_admits(tags, &item.etag())) {
            return Err(Box::new(Edited::Stale(item)));
        }
        (item.label, item.metadata) = self.apply(item.label, item.metadata);
        match self.too_large(&item.metadata) {
            Some(size) => Err(Box::new(Edited::TooLarge(size))),
            None => Ok(item),
        }
    }

    /// `Some(size)` when the metadata is larger than the edit allows.
    pub fn too_large(&self, metadata: &Value) -> Option<usize> {
        let size = metadata.to_string().len();
        (self.max_metadata_bytes > 0 && size > self.max_metadata_bytes).then_some(size)
    }
}

/// How an edit went.
#[derive(Debug, Clone)]
pub enum Edited {
    /// Stored; the item as it is now.
    Done(ItemSummary),
    /// `If-Match` named another state: nothing changed; the item as it is now.
    Stale(ItemSummary),
    /// The metadata would pass `max_metadata_bytes` (its size then): nothing changed.
    TooLarge(usize),
    Missing,
}

/// The entity tag of an item's editable state (label and metadata): equal
/// tags, equal state. Strong, since the rest of the item never changes.
fn etag(label: Option<&str>, metadata: &Value) -> String {
    // serde_json's maps are ordered by key, so equal metadata serialises equally.
    let state = serde_json::json!([label, metadata]).to_string();
    format!("\"{}\"", &hex::encode(Sha256::digest(state.as_bytes()))[..20])
}

impl ItemSummary {
    pub fn etag(&self) -> String {
        etag(self.label.as_deref(), &self.metadata)
    }
}

/// Whether an `If-Match` header value (a list of tags, or `*`) admits `current`.
fn if_match_admits(header: &str, current: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| tag == "*" || tag == current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_sets_and_removes_keys_and_keeps_metadata_an_object() {
        let edit = ItemEdit {
            label: Some(None),
            metadata: MetadataEdit::Merge(json!({"sku": "B-2", "colour": null, "dims": {"w": 3}})),
            max_metadata_bytes: 64,
        };
        let before = json!({"sku": "A-1", "colour": "red", "dims": {"h": 2}});
        let (label, after) = edit.apply(Some("shoe".into()), before);
        assert_eq!(label, None);
        assert_eq!(after, json!({"sku": "B-2", "dims": {"h": 2, "w": 3}}));
        assert_eq!(edit.too_large(&after), None);
        assert_eq!(edit.too_large(&json!({"text": "x".repeat(60)})), Some(71));
        let cleared = ItemEdit { label: None, metadata: MetadataEdit::Merge(Value::Null), max_metadata_bytes: 0 };
        assert_eq!(cleared.apply(Some("x".into()), after), (Some("x".into()), json!({})));
    }

    #[test]
    fn the_tag_follows_the_state_not_the_key_order() {
        let a = etag(Some("cat"), &serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap());
        let b = etag(Some("cat"), &serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, etag(None, &json!({"a": 1, "b": 2})));
        assert_ne!(a, etag(Some("cat"), &json!({"a": 1, "b": 3})));
        assert!(if_match_admits(&format!("\"other\", {a}"), &a));
        assert!(if_match_admits("*", &a));
        assert!(!if_match_admits("\"other\"", &a));
    }
}
