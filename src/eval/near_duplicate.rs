//! Calibrates a model's near-duplicate distance: how close an altered copy
//! (cropped, framed, recoloured, re-encoded) stays to its original, against how
//! close two *different* images of one class come. Class-mates are the pairs a
//! duplicate check must not flag, so the distance is set where at most
//! `max_false_positive_rate` of them fall within it, and the report says what
//! share of the copies it then catches.

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
    /// Share of the copies within `distance` of their original.
    pub recall: f64,
    /// Share of the class-mate pairs within `distance`.
    pub false_positive_rate: f64,
    pub copy_pairs: usize,
    pub classmate_pairs: usize,
}

/// Cosine similarities of query x gallery pairs that share a class.
fn same_class_scores(set: &Embedded) -> Vec<f32> {
    let scores = set.queries.matmul(&set.gallery.tr()).contiguous().view([-1]);
    let scores = Vec::<f32>::try_from(&scores).expect("a 1-d float tensor converts; this is a bug");
    let columns = set.gallery_labels.len();
    scores
        .iter()
        .enumerate()
        .filter(|(k, _)| set.query_labels[k / columns] == set.gallery_labels[k % columns])
        .map(|(_, s)| *s)
        .collect()
}

pub fn calibrate(
    copies: (&str, &Embedded),
    classmates: (&str, &Embedded),
    max_false_positive_rate: f64,
) -> NearDuplicateCalibration {
    let positives = same_class_scores(copies.1);
    let mut negatives = same_class_scores(classmates.1);
    negatives.sort_by(|a, b| b.total_cmp(a));
    let allowed = (max_false_positive_rate * negatives.len() as f64).floor() as usize;
    // Similarity a pair must exceed: the first class-mate pair past the allowance.
    let floor = negatives.get(allowed).copied().unwrap_or(-1.0);
    let within = |s: &f32| *s > floor;
    NearDuplicateCalibration {
        copies_set: copies.0.to_string(),
        classmates_set: classmates.0.to_string(),
        distance: (1.0 - floor).max(0.0),
        recall: positives.iter().filter(|s| within(s)).count() as f64 / positives.len().max(1) as f64,
        false_positive_rate: negatives.iter().filter(|s| within(s)).count() as f64 / negatives.len().max(1) as f64,
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
        // Copies: two originals, each copy at a different angle from its own.
        let (a, b) = (0.1f32, 0.6f32);
        let copies = Embedded {
            queries: rows(&[[a.cos(), a.sin()], [b.cos(), b.sin()]]),
            query_labels: vec![0, 1],
            gallery: rows(&[[1.0, 0.0], [1.0, 0.0]]),
            gallery_labels: vec![0, 1],
        };
        // Class-mates: one pair at angle 0.3 (similarity 0.955).
        let c = 0.3f32;
        let classmates = Embedded {
            queries: rows(&[[c.cos(), c.sin()]]),
            query_labels: vec![5],
            gallery: rows(&[[1.0, 0.0], [0.0, 1.0]]),
            gallery_labels: vec![5, 6],
        };
        let calibrated = calibrate(("copies", &copies), ("classes", &classmates), 0.0);
        assert!((calibrated.distance - (1.0 - c.cos())).abs() < 1e-6);
        assert_eq!((calibrated.copy_pairs, calibrated.classmate_pairs), (2, 1));
        assert_eq!(calibrated.recall, 0.5, "the copy at 0.1 rad is caught, the one at 0.6 rad is not");
        assert_eq!(calibrated.false_positive_rate, 0.0);
    }
}
