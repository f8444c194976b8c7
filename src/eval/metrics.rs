//! Retrieval and verification metrics, computed with libtorch tensors so a
//! 10k x 60k similarity matrix takes seconds.

use std::collections::HashMap;

use serde::Serialize;
use tch::{Kind, Tensor};

/// Queries scored per block: keeps the similarity block around 60 MB.
const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RetrievalMetrics {
    pub recall_at_1: f64,
    pub recall_at_5: f64,
    /// Mean average precision at R (Musgrave et al., 2020): R = how many gallery
    /// items share the query's label; precision is counted at every relevant
    /// item among the first R retrieved.
    pub map_at_r: f64,
}

/// Ranks `gallery` (rows: unit vectors) by cosine similarity for every query.
pub fn retrieval(queries: &Tensor, query_labels: &[i64], gallery: &Tensor, gallery_labels: &[i64]) -> RetrievalMetrics {
    let mut per_label: HashMap<i64, i64> = HashMap::new();
    for l in gallery_labels {
        *per_label.entry(*l).or_default() += 1;
    }
    let depth = query_labels.iter().map(|l| per_label.get(l).copied().unwrap_or(0)).max().unwrap_or(0).max(5);
    let depth = depth.min(gallery_labels.len() as i64);
    let gallery_labels_t = Tensor::from_slice(gallery_labels);
    let gallery_t = gallery.tr();
    let (mut r1, mut r5, mut map) = (0.0, 0.0, 0.0);
    for start in (0..query_labels.len()).step_by(QUERY_BLOCK) {
        let labels = &query_labels[start..(start + QUERY_BLOCK).min(query_labels.len())];
        let n = labels.len() as i64;
        let sims = queries.narrow(0, start as i64, n).matmul(&gallery_t);
        let (_, order) = sims.topk(depth, 1, true, true);
        let retrieved = gallery_labels_t.index_select(0, &order.view([-1])).view([n, depth]);
        let relevant = retrieved.eq_tensor(&Tensor::from_slice(labels).unsqueeze(1)).to_kind(Kind::Float);
        r1 += relevant.narrow(1, 0, 1).sum(Kind::Double).double_value(&[]);
        r5 += relevant.narrow(1, 0, 5).amax([1], false).sum(Kind::Double).double_value(&[]);
        let r: Vec<i64> = labels.iter().map(|l| per_label.get(l).copied().unwrap_or(0)).collect();
        map += map_at_r_block(&relevant, &r, depth);
    }
    let q = query_labels.len().max(1) as f64;
    RetrievalMetrics { recall_at_1: r1 / q, recall_at_5: r5 / q, map_at_r: map / q }
}

/// Sum over the block's queries of their average precision at R.
fn map_at_r_block(relevant: &Tensor, r: &[i64], depth: i64) -> f64 {
    let ranks = Tensor::arange_start(1, depth + 1, (Kind::Float, relevant.device()));
    let r_t = Tensor::from_slice(r).to_kind(Kind::Float).unsqueeze(1);
    let within_r = ranks.unsqueeze(0).le_tensor(&r_t).to_kind(Kind::Float);
    let precision = relevant.cumsum(1, Kind::Float) / &ranks;
    let ap = (precision * relevant * within_r).sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        / r_t.squeeze_dim(1).clamp_min(1.0).to_kind(Kind::Double);
    ap.sum(Kind::Double).double_value(&[])
}

/// Verification over query x gallery pairs (same = same label), on at most
/// `max_pairs` of them (whole query rows, the first ones).
pub fn pair_verification(
    queries: &Tensor,
    query_labels: &[i64],
    gallery: &Tensor,
    gallery_labels: &[i64],
    max_pairs: usize,
) -> Verification {
    let rows = (max_pairs / gallery_labels.len().max(1)).max(1).min(query_labels.len());
    let scores = queries.narrow(0, 0, rows as i64).matmul(&gallery.tr()).contiguous().view([-1]);
    let scores = Vec::<f32>::try_from(&scores).expect("a 1-d float tensor converts; this is a bug");
    let same: Vec<bool> =
        query_labels[..rows].iter().flat_map(|q| gallery_labels.iter().map(move |g| g == q)).collect();
    verification(&scores, &same)
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Verification {
    pub pairs: usize,
    pub roc_auc: f64,
    /// Cosine similarity at or above which a pair is called "same".
    pub threshold: f32,
    pub balanced_accuracy: f64,
}

/// ROC AUC (probability that a same pair outscores a different pair, ties
/// counting half) and the threshold with the best balanced accuracy.
pub fn verification(scores: &[f32], same: &[bool]) -> Verification {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let positives = same.iter().filter(|s| **s).count() as f64;
    let negatives = same.len() as f64 - positives;
    // Rank sum of the positives with average ranks over ties (Mann-Whitney U).
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|k| same[**k]).count() as f64 * average_rank;
        i = j + 1;
    }
    let roc_auc = (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives).max(1.0);

    // Sweep thresholds from the top: everything at or above the score is "same".
    let (mut true_pos, mut false_pos) = (0.0, 0.0);
    let (mut best, mut threshold) = (0.0, f32::INFINITY);
    for (rank, &k) in order.iter().rev().enumerate() {
        if same[k] {
            true_pos += 1.0
        } else {
            false_pos += 1.0
        }
        let next_is_tie = order.len() > rank + 1 && scores[order[order.len() - rank - 2]] == scores[k];
        if next_is_tie {
            continue;
        }
        let balanced = 0.5 * (true_pos / positives.max(1.0) + (negatives - false_pos) / negatives.max(1.0));
        if balanced > best {
            (best, threshold) = (balanced, scores[k]);
        }
    }
    Verification { pairs: scores.len(), roc_auc, threshold, balanced_accuracy: best }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_rows(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                let n = (r[0] * r[0] + r[1] * r[1]).sqrt();
                [r[0] / n, r[1] / n]
            })
            .collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 2])
    }

    #[test]
    fn retrieval_on_a_hand_worked_example() {
        // Gallery: two of label 0 near (1, 0), two of label 1 near (0, 1), one 1 mislaid near (1, 0).
        let gallery = unit_rows(&[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05]]);
        let labels = [0, 0, 1, 1, 1];
        let queries = unit_rows(&[[1.0, 0.02], [0.05, 1.0]]);
        let m = retrieval(&queries, &[0, 1], &gallery, &labels);
        // Query 0 ranks [0, 4(label 1), 1]: R = 2 -> AP@R = (1/1 + 0) / 2 = 0.5.
        // Query 1 ranks [3, 2, 1..]: R = 3 -> AP@R = (1 + 1 + 0) / 3.
        assert_eq!(m.recall_at_1, 1.0);
        assert_eq!(m.recall_at_5, 1.0);
        assert!((m.map_at_r - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn verification_separable_and_random() {
        let v = verification(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]);
        assert_eq!(v.roc_auc, 1.0);
        assert_eq!(v.balanced_accuracy, 1.0);
        assert_eq!(v.threshold, 0.8);
        let tied = verification(&[0.5, 0.5, 0.5, 0.5], &[true, false, true, false]);
        assert_eq!(tied.roc_auc, 0.5);
    }
}
