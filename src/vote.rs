//! The label vote (k-NN): a query's likely label from its labelled
//! neighbours by a distance-weighted vote, or `unknown` when even the
//! nearest labelled neighbour is too far. This is how a class is recognised
//! from a few labelled examples without retraining.

use std::collections::HashMap;

use serde::Serialize;

/// What the label of a query is likely to be.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The winning label, or `unknown`.
    pub label: String,
    /// `false` when no labelled neighbour is within the unknown distance (or none exists).
    pub known: bool,
    /// The winner's share of the vote weight, 0 to 1 (0 when unknown).
    pub confidence: f32,
    /// Labelled neighbours that voted.
    pub votes: usize,
    /// Cosine distance to the nearest labelled neighbour, if any.
    pub nearest_distance: Option<f32>,
}

pub const UNKNOWN: &str = "unknown";

/// Votes among the first `k` labelled neighbours (`(cosine similarity, label)`,
/// most similar first), each weighing 1 / cosine distance.
pub fn predict<'a>(
    neighbours: impl IntoIterator<Item = (f32, Option<&'a str>)>,
    k: usize,
    unknown_distance: f32,
) -> Prediction {
    let labelled: Vec<(f32, &str)> =
        neighbours.into_iter().filter_map(|(score, label)| label.map(|l| (1.0 - score, l))).take(k).collect();
    let nearest_distance = labelled.first().map(|(d, _)| d.max(0.0));
    if nearest_distance.is_none_or(|d| d > unknown_distance) {
        return Prediction { label: UNKNOWN.into(), known: false, confidence: 0.0, votes: 0, nearest_distance };
    }
    let mut weights: HashMap<&str, f32> = HashMap::new();
    for (distance, label) in &labelled {
        // Clamped so an exact copy (distance 0) weighs a lot but not infinitely.
        *weights.entry(label).or_default() += 1.0 / distance.max(1e-4);
    }
    let total: f32 = weights.values().sum();
    let (label, weight) = weights
        .into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .expect("at least one labelled neighbour");
    Prediction { label: label.into(), known: true, confidence: weight / total, votes: labelled.len(), nearest_distance }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closer_neighbours_outvote_more_numerous_far_ones() {
        let neighbours = [(0.99, Some("bag")), (0.90, Some("shoe")), (0.89, Some("shoe")), (0.5, None)];
        let p = predict(neighbours, 10, 0.2);
        // bag: 1/0.01 = 100; shoe: 1/0.10 + 1/0.11 = 19.1.
        assert_eq!((p.label.as_str(), p.known, p.votes), ("bag", true, 3));
        assert!((p.confidence - 100.0 / 119.09).abs() < 1e-3, "{p:?}");
        assert!((p.nearest_distance.unwrap() - 0.01).abs() < 1e-6);
    }

    #[test]
    fn only_the_first_k_labelled_neighbours_vote() {
        let neighbours = [(0.95, None), (0.9, Some("a")), (0.89, Some("b")), (0.88, Some("b"))];
        assert_eq!(predict(neighbours, 1, 1.0).label, "a");
        assert_eq!(predict(neighbours, 3, 1.0).label, "b");
    }

    #[test]
    fn too_far_or_unlabelled_is_unknown() {
        let far = predict([(0.6, Some("a"))], 10, 0.2);
        assert_eq!((far.label.as_str(), far.known, far.confidence), (UNKNOWN, false, 0.0));
        assert!((far.nearest_distance.unwrap() - 0.4).abs() < 1e-6);
        let none = predict([(0.99, None)], 10, 0.2);
        assert_eq!((none.known, none.nearest_distance), (false, None));
    }
}
