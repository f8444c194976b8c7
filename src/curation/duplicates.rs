//! Near-copy groups from pairs of close items: pairs join transitively
//! (a ~ b and b ~ c put a, b and c in one group), and each group suggests
//! the item to keep (the largest image, then the oldest).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::gallery::ItemSummary;

/// Two stored items whose embeddings are within the scan's distance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearPair {
    pub a: i64,
    pub b: i64,
    /// Cosine distance, 1 - similarity.
    pub distance: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// The suggested item to keep: the most pixels, then the oldest.
    pub keeper: i64,
    /// Every item of the group, the keeper first, then by id.
    pub items: Vec<ItemSummary>,
    /// The close pairs that joined the group, closest first.
    pub pairs: Vec<NearPair>,
}

/// Groups the items linked by `pairs`; `items` holds their summaries (an id
/// without one was deleted meanwhile and is left out). Largest groups first.
pub fn group_pairs(pairs: &[NearPair], items: &HashMap<i64, ItemSummary>) -> Vec<DuplicateGroup> {
    let live: Vec<&NearPair> = pairs.iter().filter(|p| items.contains_key(&p.a) && items.contains_key(&p.b)).collect();
    let mut parent: HashMap<i64, i64> = HashMap::new();
    for pair in &live {
        let (a, b) = (root(&mut parent, pair.a), root(&mut parent, pair.b));
        if a != b {
            parent.insert(a.max(b), a.min(b));
        }
    }
    let mut members: HashMap<i64, Vec<i64>> = HashMap::new();
    for id in parent.keys().copied().collect::<Vec<_>>() {
        let group = root(&mut parent, id);
        members.entry(group).or_default().push(id);
    }
    let mut pairs_of: HashMap<i64, Vec<NearPair>> = HashMap::new();
    for pair in live {
        pairs_of.entry(root(&mut parent, pair.a)).or_default().push(*pair);
    }
    let mut groups: Vec<DuplicateGroup> = members
        .into_iter()
        .map(|(group, ids)| {
            let mut pairs = pairs_of.remove(&group).unwrap_or_default();
            pairs.sort_by(|x, y| x.distance.total_cmp(&y.distance).then(x.a.cmp(&y.a)).then(x.b.cmp(&y.b)));
            one_group(ids, pairs, items)
        })
        .collect();
    groups.sort_by(|x, y| y.items.len().cmp(&x.items.len()).then(x.keeper.cmp(&y.keeper)));
    groups
}

fn one_group(mut ids: Vec<i64>, pairs: Vec<NearPair>, items: &HashMap<i64, ItemSummary>) -> DuplicateGroup {
    let rank = |id: &i64| {
        let item = &items[id];
        (std::cmp::Reverse(u64::from(item.width) * u64::from(item.height)), item.created_at, item.id)
    };
    let keeper = *ids.iter().min_by_key(|id| rank(id)).expect("a group has items");
    ids.sort_unstable_by_key(|id| (*id != keeper, *id));
    DuplicateGroup { keeper, items: ids.iter().map(|id| items[id].clone()).collect(), pairs }
}

/// The representative of `id`'s set, halving the path on the way.
fn root(parent: &mut HashMap<i64, i64>, id: i64) -> i64 {
    let mut node = *parent.entry(id).or_insert(id);
    let mut current = id;
    while node != current {
        let grand = parent[&node];
        parent.insert(current, grand);
        current = node;
        node = grand;
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: i64, side: u32, created_at: i64) -> ItemSummary {
        ItemSummary {
            id,
            label: None,
            metadata: serde_json::json!({}),
            media_type: "image/png".into(),
            width: side,
            height: side,
            content_hash: String::new(),
            created_at,
        }
    }

    fn pair(a: i64, b: i64, distance: f32) -> NearPair {
        NearPair { a, b, distance }
    }

    #[test]
    fn pairs_join_transitively_and_the_largest_then_oldest_is_kept() {
        let items: HashMap<i64, ItemSummary> =
            [item(1, 64, 10), item(2, 128, 30), item(3, 128, 20), item(7, 32, 1), item(8, 32, 2), item(9, 32, 3)]
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
        // 1 ~ 2 ~ 3 through a chain; 7 ~ 8; 9 ~ 42 where 42 was deleted.
        let pairs = [pair(2, 3, 0.02), pair(1, 2, 0.01), pair(7, 8, 0.005), pair(9, 42, 0.001)];
        let groups = group_pairs(&pairs, &items);
        assert_eq!(groups.len(), 2);
        let ids = |g: &DuplicateGroup| g.items.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(groups[0].keeper, 3, "the largest, and of two equally large, the older");
        assert_eq!(ids(&groups[0]), vec![3, 1, 2]);
        assert_eq!(groups[0].pairs, vec![pair(1, 2, 0.01), pair(2, 3, 0.02)]);
        assert_eq!((groups[1].keeper, ids(&groups[1])), (7, vec![7, 8]));
        assert!(group_pairs(&[], &items).is_empty());
    }
}
