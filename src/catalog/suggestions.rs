//! What to label next: unlabelled items where one label would help most.
//! A search predicts a label from the labelled items among its `--knn-k`
//! nearest, so labelling an item reaches the unlabelled items that have it
//! among theirs (within the unknown distance). Each item has an uncertainty,
//! and a candidate is worth its own plus that of the items it reaches. A vote is certain when it is unanimous and its nearest labelled
//! neighbour is close: certainty = the winner's share x (1 - that distance /
//! the unknown distance), 0 when no labelled item is within it. (The share
//! alone would call every vote certain while only one label exists.) Picks
//! are greedy: what an earlier pick reaches counts no more, so the
//! suggestions cover different uncertain parts of the gallery.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::active::ActiveModel;
use super::{Catalog, CatalogError, ItemSummary};
use crate::vote::{self, Prediction};

/// Unlabelled items examined at most (evenly spread by id): one search each.
const MAX_EXAMINED: usize = 2000;

#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    pub item: ItemSummary,
    /// What its labelled neighbours vote for now: accept it, or type another.
    pub prediction: Prediction,
    /// Unlabelled items its label would reach: itself and those that have it among their nearest.
    pub cluster_size: usize,
    /// `unknown` (no labelled item near), `uncertain` (a split vote, or its
    /// labelled neighbours far) or `cluster` (many unlabelled items like it).
    pub reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Suggestions {
    pub model: String,
    pub unlabelled: usize,
    pub examined: usize,
    pub suggestions: Vec<Suggestion>,
}

struct Candidate {
    id: i64,
    prediction: Prediction,
    /// The unlabelled items that have it among their nearest (within the
    /// unknown distance): whose vote its label would join.
    covers: Vec<i64>,
    /// 0 (no labelled item near) to 1 (a unanimous vote from right beside it).
    certainty: f32,
}

impl Catalog {
    /// Up to `n` unlabelled items worth labelling next, most valuable first.
    pub async fn suggestions(&self, n: usize) -> Result<Suggestions, CatalogError> {
        let active = self.active();
        let labels: HashMap<i64, String> = self.store.labelled().await?.into_iter().collect();
        let embedded = self.store.embedded_ids(active.key()).await?;
        let unlabelled: Vec<i64> = embedded.into_iter().filter(|id| !labels.contains_key(id)).collect();
        let step = unlabelled.len().div_ceil(MAX_EXAMINED).max(1);
        let examined: Vec<i64> = unlabelled.iter().step_by(step).copied().collect();
        let radius = self.unknown_distance(&active);
        let mut candidates = Vec::with_capacity(examined.len());
        // Whose unlabelled neighbour each item is: whom its label would reach.
        let mut reached: HashMap<i64, Vec<i64>> = HashMap::new();
        for chunk in examined.chunks(256) {
            for (id, vector) in self.store.embeddings_of(active.key(), chunk.to_vec()).await? {
                let (candidate, neighbours) = self.candidate(&active, id, &vector, &labels, radius).await?;
                for neighbour in neighbours {
                    reached.entry(neighbour).or_default().push(id);
                }
                candidates.push(candidate);
            }
        }
        for candidate in &mut candidates {
            candidate.covers = reached.remove(&candidate.id).unwrap_or_default();
        }
        let picked = pick(candidates, n);
        let items = self.store.summaries(picked.iter().map(|c| c.id).collect()).await?;
        let suggestions = picked
            .into_iter()
            .filter_map(|c| {
                let reason = match (c.prediction.known, c.certainty) {
                    (false, _) => "unknown",
                    (true, certainty) if certainty < 0.6 => "uncertain",
                    _ => "cluster",
                };
                let item = items.get(&c.id)?.clone();
                Some(Suggestion { item, prediction: c.prediction, cluster_size: c.covers.len() + 1, reason })
            })
            .collect();
        Ok(Suggestions { model: active.name(), unlabelled: unlabelled.len(), examined: examined.len(), suggestions })
    }

    /// An unlabelled item's vote as a search of it sees it (its `--knn-k`
    /// nearest items, the labelled ones voting), and its unlabelled
    /// neighbours among them within the unknown distance.
    async fn candidate(
        &self,
        active: &ActiveModel,
        id: i64,
        vector: &[f32],
        labels: &HashMap<i64, String>,
        radius: f32,
    ) -> Result<(Candidate, Vec<i64>), CatalogError> {
        let mut near = active.index.search(vector, self.settings.knn_k + 1, None).await?;
        near.retain(|h| h.id != id);
        let votes = near.iter().map(|h| (h.score, labels.get(&h.id).map(String::as_str)));
        let prediction = vote::predict(votes, self.settings.knn_k, radius);
        let neighbours: Vec<i64> = near
            .iter()
            .filter(|h| h.id != id && !labels.contains_key(&h.id) && 1.0 - h.score <= radius)
            .map(|h| h.id)
            .collect();
        let closeness = prediction.nearest_distance.map_or(0.0, |d| (1.0 - d / radius).max(0.0));
        let certainty = if prediction.known { prediction.confidence * closeness } else { 0.0 };
        Ok((Candidate { id, prediction, covers: Vec::new(), certainty }, neighbours))
    }

    /// The distance beyond which the nearest labelled neighbour means `unknown`.
    pub(super) fn unknown_distance(&self, active: &ActiveModel) -> f32 {
        let threshold = active.version.manifest.verification_threshold;
        self.settings.unknown_distance.or(threshold.map(|t| 1.0 - t)).unwrap_or(f32::INFINITY)
    }
}

/// `n` candidates by greedy coverage: each pick is the one whose own
/// uncertainty plus that of the unlabelled items it reaches, not yet
/// reached by an earlier pick, is largest. An item not examined weighs
/// what the candidate covering it does.
fn pick(candidates: Vec<Candidate>, n: usize) -> Vec<Candidate> {
    let weight: HashMap<i64, f32> = candidates.iter().map(|c| (c.id, 1.0 - c.certainty)).collect();
    let mut covered: HashSet<i64> = HashSet::new();
    let mut left = candidates;
    let mut picked = Vec::new();
    while picked.len() < n {
        let gain = |c: &Candidate| -> f32 {
            let own = if covered.contains(&c.id) { 0.0 } else { 1.0 - c.certainty };
            let others = c.covers.iter().filter(|id| !covered.contains(id));
            own + others.map(|id| weight.get(id).copied().unwrap_or(1.0 - c.certainty)).sum::<f32>()
        };
        let best = left
            .iter()
            .enumerate()
            .filter(|(_, c)| !covered.contains(&c.id))
            .map(|(i, c)| (i, gain(c)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(left[b.0].id.cmp(&left[a.0].id)));
        let Some((index, _)) = best.filter(|(_, gain)| *gain > 0.0) else { break };
        let chosen = left.swap_remove(index);
        covered.insert(chosen.id);
        covered.extend(chosen.covers.iter().copied());
        picked.push(chosen);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: i64, certainty: f32, covers: &[i64]) -> Candidate {
        let prediction = vote::predict(std::iter::empty(), 10, 0.5);
        Candidate { id, prediction, covers: covers.to_vec(), certainty }
    }

    #[test]
    fn picks_what_covers_most_uncertainty_and_counts_what_a_pick_covers_no_more() {
        let candidates = vec![
            candidate(1, 0.0, &[2]),
            candidate(2, 0.1, &[1]),
            candidate(3, 0.0, &[4, 5]),
            candidate(4, 0.5, &[3]),
            candidate(6, 1.0, &[]),
            candidate(7, 0.5, &[]),
        ];
        let picked: Vec<i64> = pick(candidates, 5).iter().map(|c| c.id).collect();
        // 3 covers 1 + 0.5 + 1 (5 was not examined: it weighs what 3 does); then 1 and 2 tie at
        // 1.9 (the lower id first) and 2 is covered; then 7; a certain item (6) is never suggested.
        assert_eq!(picked, vec![3, 1, 7]);
    }
}
