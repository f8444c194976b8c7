//! What to label next: unlabelled items where one label would help most.
//! Each candidate is worth its vote's uncertainty times the unlabelled items
//! it stands for (itself and its unlabelled neighbours within the unknown
//! distance). A vote is certain when it is unanimous and its nearest labelled
//! neighbour is close: certainty = the winner's share x (1 - that distance /
//! the unknown distance), 0 when no labelled item is within it. (The share
//! alone would call every vote certain while only one label exists.) The
//! most valuable are picked greedily, skipping items a pick already stands
//! for, so the suggestions cover different parts of the gallery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::active::ActiveModel;
use super::{Catalog, CatalogError, ItemSummary};
use crate::vote::{self, Prediction};

/// Unlabelled items examined at most (evenly spread by id): two searches each.
const MAX_EXAMINED: usize = 2000;
/// Neighbours looked at for an item's cluster.
const CLUSTER_NEIGHBOURS: usize = 32;

#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    pub item: ItemSummary,
    /// What its labelled neighbours vote for now: accept it, or type another.
    pub prediction: Prediction,
    /// Unlabelled items it stands for: itself and its unlabelled neighbours within the unknown distance.
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
    /// Unlabelled neighbours within the unknown distance.
    covers: Vec<i64>,
    /// 0 (no labelled item near) to 1 (a unanimous vote from right beside it).
    certainty: f32,
    value: f32,
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
        let labelled_ids = Arc::new({
            let mut ids: Vec<i64> = labels.keys().copied().collect();
            ids.sort_unstable();
            ids
        });
        let radius = self.unknown_distance(&active);
        let mut candidates = Vec::with_capacity(examined.len());
        for chunk in examined.chunks(256) {
            for (id, vector) in self.store.embeddings_of(active.key(), chunk.to_vec()).await? {
                candidates.push(self.candidate(&active, id, &vector, &labels, &labelled_ids, radius).await?);
            }
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

    /// An unlabelled item's vote among the labelled items, and its unlabelled neighbourhood.
    async fn candidate(
        &self,
        active: &ActiveModel,
        id: i64,
        vector: &[f32],
        labels: &HashMap<i64, String>,
        labelled_ids: &Arc<Vec<i64>>,
        radius: f32,
    ) -> Result<Candidate, CatalogError> {
        let prediction = if labelled_ids.is_empty() {
            vote::predict(std::iter::empty(), self.settings.knn_k, radius)
        } else {
            let hits = active.index.search(vector, self.settings.knn_k, Some(labelled_ids.clone())).await?;
            let votes = hits.iter().map(|h| (h.score, labels.get(&h.id).map(String::as_str)));
            vote::predict(votes, self.settings.knn_k, radius)
        };
        let near = active.index.search(vector, CLUSTER_NEIGHBOURS, None).await?;
        let covers: Vec<i64> = near
            .iter()
            .filter(|h| h.id != id && !labels.contains_key(&h.id) && 1.0 - h.score <= radius)
            .map(|h| h.id)
            .collect();
        let closeness = prediction.nearest_distance.map_or(0.0, |d| (1.0 - d / radius).max(0.0));
        let certainty = if prediction.known { prediction.confidence * closeness } else { 0.0 };
        let value = (1.0 - certainty) * (1 + covers.len()) as f32;
        Ok(Candidate { id, prediction, covers, certainty, value })
    }

    /// The distance beyond which the nearest labelled neighbour means `unknown`.
    pub(super) fn unknown_distance(&self, active: &ActiveModel) -> f32 {
        let threshold = active.version.manifest.verification_threshold;
        self.settings.unknown_distance.or(threshold.map(|t| 1.0 - t)).unwrap_or(f32::INFINITY)
    }
}

/// The `n` most valuable candidates, each skipping what an earlier pick stands for.
fn pick(mut candidates: Vec<Candidate>, n: usize) -> Vec<Candidate> {
    candidates.sort_by(|a, b| b.value.total_cmp(&a.value).then(a.id.cmp(&b.id)));
    let mut covered = HashSet::new();
    let mut picked = Vec::new();
    for candidate in candidates {
        if picked.len() == n {
            break;
        }
        if covered.contains(&candidate.id) || candidate.value <= 0.0 {
            continue;
        }
        covered.extend(candidate.covers.iter().copied());
        picked.push(candidate);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: i64, value: f32, covers: &[i64]) -> Candidate {
        let prediction = vote::predict(std::iter::empty(), 10, 0.5);
        Candidate { id, prediction, covers: covers.to_vec(), certainty: 0.0, value }
    }

    #[test]
    fn picks_the_most_valuable_and_skips_what_a_pick_stands_for() {
        let candidates = vec![
            candidate(1, 2.0, &[2]),
            candidate(2, 1.9, &[1]),
            candidate(3, 5.0, &[4, 5]),
            candidate(4, 3.0, &[3]),
            candidate(6, 0.0, &[]),
            candidate(7, 0.5, &[]),
        ];
        let picked: Vec<i64> = pick(candidates, 3).iter().map(|c| c.id).collect();
        assert_eq!(
            picked,
            vec![3, 1, 7],
            "4 and 2 are covered by 3 and 1; a certain item (value 0) is never suggested"
        );
    }
}
