//! Calibrates a model's near-duplicate distance: how close an altered copy
//! (cropped, framed, recoloured, re-encoded) stays to its original, against how
//! close two *different* images of one class come. Class-mates are the pairs a
//! duplicate check must not flag, so the distance is set where at most
//! `max_false_positive_rate` of them fall within it. The recall and false
//! positive rate reported are two-fold: calibrated on half of the queries of
//! each set, measured on the other half, and averaged; the distance itself
//! comes from all of them.

use serde::Serialize;
use tch::Tensor;

/// A set's embeddings (unit rows) and classes, as `evaluate_set` computed them.
pub struct Embedded {
    pub queries: Tensor,
    pub query_labels: Vec<i64>,
    pub gallery: Tensor,
    pub gallery_labels: Vec<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NearDuplicateCalibration {
    /// The set of altered copies (each query's class holds its original).
    pub copies_set: String,
    /// The set whose same-class pairs are the negatives.
    pub classmates_set: String,
    /// Cosine distance within which an upload is a near duplicate (`--near-duplicate-distance`).
    pub distance: f32,
    /// Share of the copies within the distance of their original (two-fold, see the module doc).
    pub recall: f64,
    /// Share of the class-mate pairs within the distance (two-fold).
    pub false_positive_rate: f64,
    pub copy_pairs: usize,
    pub classmate_pairs: usize,
}

/// Cosine similarities of the query x gallery pairs that share a class, each
/// with its query's position (the folds split on it).
fn same_class_scores(set: &Embedded) -> Vec<(usize, f32)> {
    let scores = set.queries.matmul(&set.gallery.tr()).contiguous().view([-1]);
    let scores = Vec::<f32>::try_from(&scores).expect("a 1-d float tensor converts; this is a bug");
    let columns = set.gallery_labels.len();
    scores
        .into_iter()
        .enumerate()
        .filter(|(k, _)| set.query_labels[k / columns] == set.gallery_labels[k % columns])
        .map(|(k, s)| (k / columns, s))
        .collect()
}

/// The scores whose query position `keep` selects.
fn of_queries(scores: &[(usize, f32)], keep: impl Fn(usize) -> bool) -> Vec<f32> {
    scores.iter().filter(|(q, _)| keep(*q)).map(|(_, s)| *s).collect()
}

/// The similarity a pair must exceed so that at most `rate` of `negatives` do.
fn floor_for(mut negatives: Vec<f32>, rate: f64) -> f32 {
    negatives.sort_by(|a, b| b.total_cmp(a));
    let allowed = (rate * negatives.len() as f64).floor() as usize;
    negatives.get(allowed).copied().unwrap_or(-1.0)
}

fn share_above(scores: &[f32], floor: f32) -> f64 {
    scores.iter().filter(|s| **s > floor).count() as f64 / scores.len().max(1) as f64
}

pub fn calibrate(
    copies: (&str, &Embedded),
    classmates: (&str, &Embedded),
    max_false_positive_rate: f64,
) -> NearDuplicateCalibration {
    let positives = same_class_scores(copies.1);
    let negatives = same_class_scores(classmates.1);
    let (mut recall, mut false_positive_rate) = (0.0, 0.0);
    for fold in 0..2 {
        let part = |q: usize| q % 2 == fold;
        let floor = floor_for(of_queries(&negatives, part), max_false_positive_rate);
        recall += share_above(&of_queries(&positives, |q| !part(q)), floor) / 2.0;
        false_positive_rate += share_above(&of_queries(&negatives, |q| !part(q)), floor) / 2.0;
    }
    let floor = floor_for(of_queries(&negatives, |_| true), max_false_positive_rate);
    NearDuplicateCalibration {
        copies_set: copies.0.to_string(),
        classmates_set: classmates.0.to_string(),
        distance: (1.0 - floor).max(0.0),
        recall,
        false_positive_rate,
        copy_pairs: positives.len(),
        classmate_pairs: negatives.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = values.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([values.len() as i64, 2])
    }

    #[test]
    fn the_distance_keeps_classmates_out_and_reports_the_copies_it_catches() {
        let at = |a: f32| [a.cos(), a.sin()];
        // Four copies, each at its own angle from its original (all originals at angle 0).
        let copies = Embedded {
            queries: rows(&[at(0.1), at(0.6), at(0.1), at(0.6)]),
            query_labels: vec![0, 1, 2, 3],
            gallery: rows(&[at(0.0), at(0.0), at(0.0), at(0.0)]),
            gallery_labels: vec![0, 1, 2, 3],
        };
        // Class-mates: two pairs at angle 0.3 (similarity 0.955), one a fold.
        let classmates = Embedded {
            queries: rows(&[at(0.3), at(0.3)]),
            query_labels: vec![5, 5],
            gallery: rows(&[at(0.0), at(1.5)]),
            gallery_labels: vec![5, 6],
        };
        let calibrated = calibrate(("copies", &copies), ("classes", &classmates), 0.0);
        assert!((calibrated.distance - (1.0 - 0.3f32.cos())).abs() < 1e-6);
        assert_eq!((calibrated.copy_pairs, calibrated.classmate_pairs), (4, 2));
        assert_eq!(calibrated.recall, 0.5, "copies at 0.1 rad are caught, those at 0.6 rad are not");
        assert_eq!(calibrated.false_positive_rate, 0.0);
    }
}
