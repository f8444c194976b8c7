//! Near-copy groups from pairs of close items: every two items of a group
//! are a close pair themselves (complete linkage), so a chain a ~ b ~ c with
//! a and c apart cannot join unrelated pictures into one large group; each
//! group suggests the item to keep (the largest image, then the oldest).

use std::collections::{HashMap, HashSet};

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
    /// The close pairs within the group, closest first.
    pub pairs: Vec<NearPair>,
}

/// Groups the items linked by `pairs`; `items` holds their summaries (an id
/// without one was deleted meanwhile and is left out). Pairs are taken closest
/// first, and two groups merge only when every item of one is paired with
/// every item of the other. Largest groups first.
pub fn group_pairs(pairs: &[NearPair], items: &HashMap<i64, ItemSummary>) -> Vec<DuplicateGroup> {
    let mut live: Vec<NearPair> =
        pairs.iter().filter(|p| items.contains_key(&p.a) && items.contains_key(&p.b)).copied().collect();
    live.sort_by(|x, y| x.distance.total_cmp(&y.distance).then(x.a.cmp(&y.a)).then(x.b.cmp(&y.b)));
    let (group_of, members) = complete_linkage(&live);

    let mut pairs_of: HashMap<usize, Vec<NearPair>> = HashMap::new();
    for pair in live {
        let g = group_of[&pair.a];
        if g == group_of[&pair.b] {
            pairs_of.entry(g).or_default().push(pair);
        }
    }
    let mut groups: Vec<DuplicateGroup> = members
        .into_iter()
        .enumerate()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(g, ids)| one_group(ids, pairs_of.remove(&g).unwrap_or_default(), items))
        .collect();
    groups.sort_by(|x, y| y.items.len().cmp(&x.items.len()).then(x.keeper.cmp(&y.keeper)));
    groups
}

/// Merges groups along `pairs` (closest first) only when every item of one is
/// paired with every item of the other: which group each id is in, and the
/// groups (merged-away ones left empty).
fn complete_linkage(pairs: &[NearPair]) -> (HashMap<i64, usize>, Vec<Vec<i64>>) {
    let close: HashSet<(i64, i64)> = pairs.iter().map(|p| (p.a.min(p.b), p.a.max(p.b))).collect();
    let linked = |x: i64, y: i64| close.contains(&(x.min(y), x.max(y)));
    // Every id starts alone.
    let mut group_of: HashMap<i64, usize> = HashMap::new();
    let mut members: Vec<Vec<i64>> = Vec::new();
    for pair in pairs {
        for id in [pair.a, pair.b] {
            group_of.entry(id).or_insert_with(|| {
                members.push(vec![id]);
                members.len() - 1
            });
        }
        let (g, h) = (group_of[&pair.a], group_of[&pair.b]);
        if g == h || !members[g].iter().all(|&x| members[h].iter().all(|&y| linked(x, y))) {
            continue;
        }
        let (keep, gone) = if members[g].len() >= members[h].len() { (g, h) } else { (h, g) };
        let moved = std::mem::take(&mut members[gone]);
        for id in &moved {
            group_of.insert(*id, keep);
        }
        members[keep].extend(moved);
    }
    (group_of, members)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
    fn pairs_group_and_the_largest_then_oldest_is_kept() {
        let items: HashMap<i64, ItemSummary> =
            [item(1, 64, 10), item(2, 128, 30), item(3, 128, 20), item(7, 32, 1), item(8, 32, 2), item(9, 32, 3)]
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
        // 1, 2 and 3 all close to each other; 7 ~ 8; 9 ~ 42 where 42 was deleted.
        let pairs = [pair(2, 3, 0.02), pair(1, 2, 0.01), pair(1, 3, 0.015), pair(7, 8, 0.005), pair(9, 42, 0.001)];
        let groups = group_pairs(&pairs, &items);
        assert_eq!(groups.len(), 2);
        let ids = |g: &DuplicateGroup| g.items.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(groups[0].keeper, 3, "the largest, and of two equally large, the older");
        assert_eq!(ids(&groups[0]), vec![3, 1, 2]);
        assert_eq!(groups[0].pairs, vec![pair(1, 2, 0.01), pair(1, 3, 0.015), pair(2, 3, 0.02)]);
        assert_eq!((groups[1].keeper, ids(&groups[1])), (7, vec![7, 8]));
        assert!(group_pairs(&[], &items).is_empty());
    }

    #[test]
    fn a_chain_does_not_join_items_that_are_not_close() {
        let items: HashMap<i64, ItemSummary> = (1..=5).map(|id| (id, item(id, 32, id))).collect();
        // A chain 1 ~ 2 ~ 3 ~ 4 ~ 5, closest at 1 ~ 2 and 4 ~ 5; only 3 ~ 4 ~ 5 are close all round.
        let pairs = [pair(1, 2, 0.01), pair(2, 3, 0.03), pair(3, 4, 0.02), pair(4, 5, 0.01), pair(3, 5, 0.025)];
        let groups = group_pairs(&pairs, &items);
        let ids = |g: &DuplicateGroup| g.items.iter().map(|i| i.id).collect::<BTreeSet<_>>();
        assert_eq!(groups.iter().map(ids).collect::<Vec<_>>(), vec![BTreeSet::from([3, 4, 5]), BTreeSet::from([1, 2])]);
        assert_eq!(groups[1].pairs, vec![pair(1, 2, 0.01)], "the pair that links the groups belongs to neither");
    }
}
