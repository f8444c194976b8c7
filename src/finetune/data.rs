//! Which labelled items a fine-tune trains and validates on, and the PK batches
//! it draws from them. Pure bookkeeping, seeded, so a job is reproducible.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

/// Labelled items split into training and held-out validation items, as
/// `(id, label index)`.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<(i64, usize)>,
    pub validation: Vec<(i64, usize)>,
    pub summary: DataSummary,
}

/// What a job's data looked like, for its status.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DataSummary {
    /// The labels trained on.
    pub labels: Vec<String>,
    pub train_images: usize,
    pub validation_images: usize,
    /// Labels left out because they have fewer than two images.
    pub ignored_labels: Vec<String>,
}

/// The job's images, preprocessed, as the training loop takes them: the
/// pixels of every image one after another, its label index, and which
/// positions train and which validate.
#[derive(Debug, Default)]
pub struct PreparedImages {
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
}

impl PreparedImages {
    pub fn push(&mut self, pixels: &[f32], label: usize, is_train: bool) {
        let position = self.labels.len();
        self.pixels.extend_from_slice(pixels);
        self.labels.push(label);
        if is_train {
            self.train.push(position)
        } else {
            self.validation.push(position)
        }
    }
}

/// Why the labelled gallery cannot be fine-tuned on.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error(
        "fine-tuning needs at least two labels with two images each; the selection has {images} labelled \
         images in {labels} labels, {usable} of them with two or more images"
    )]
    TooFewLabels { images: usize, labels: usize, usable: usize },
    #[error(
        "no label has enough images to hold one out for validation (a label needs three or more, and \
         validation_fraction must be above 0)"
    )]
    NoValidation,
}

/// Splits labelled items per label: `fraction` of each label's items (rounded,
/// leaving at least two to train on) are held out. At most `max_images` items
/// are used, drawn at random when there are more.
pub fn split(
    items: &[(i64, String)],
    only: Option<&[String]>,
    fraction: f64,
    max_images: usize,
    rng: &mut StdRng,
) -> Result<Split, SplitError> {
    let mut chosen: Vec<&(i64, String)> =
        items.iter().filter(|(_, label)| only.is_none_or(|only| only.contains(label))).collect();
    if chosen.len() > max_images {
        chosen.shuffle(rng);
        chosen.truncate(max_images);
    }
    let mut by_label: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (id, label) in &chosen {
        by_label.entry(label.as_str()).or_default().push(*id);
    }
    let usable = by_label.values().filter(|ids| ids.len() >= 2).count();
    if usable < 2 {
        return Err(SplitError::TooFewLabels { images: chosen.len(), labels: by_label.len(), usable });
    }
    let (mut labels, mut ignored) = (Vec::new(), Vec::new());
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (label, mut ids) in by_label {
        if ids.len() < 2 {
            ignored.push(label.to_string());
            continue;
        }
        ids.sort_unstable();
        ids.shuffle(rng);
        let held_out = ((ids.len() as f64 * fraction).round() as usize).min(ids.len() - 2);
        let index = labels.len();
        labels.push(label.to_string());
        validation.extend(ids[..held_out].iter().map(|&id| (id, index)));
        train.extend(ids[held_out..].iter().map(|&id| (id, index)));
    }
    if validation.is_empty() {
        return Err(SplitError::NoValidation);
    }
    let summary =
        DataSummary { labels, train_images: train.len(), validation_images: validation.len(), ignored_labels: ignored };
    Ok(Split { train, validation, summary })
}

/// Draws PK batches: P labels at random, then K of each label's images
/// (all of them when a label has fewer).
pub struct PkSampler {
    /// Positions (into the training items) per label.
    by_label: Vec<Vec<usize>>,
    p: usize,
    k: usize,
}

impl PkSampler {
    /// `labels[i]` is the label index of training item `i`.
    pub fn new(labels: &[usize], p: usize, k: usize) -> Self {
        let count = labels.iter().max().map_or(0, |m| m + 1);
        let mut by_label = vec![Vec::new(); count];
        for (position, &label) in labels.iter().enumerate() {
            by_label[label].push(position);
        }
        by_label.retain(|positions| positions.len() >= 2);
        Self { by_label, p, k }
    }

    /// Positions of one batch, grouped by label.
    pub fn batch(&self, rng: &mut StdRng) -> Vec<usize> {
        let p = self.p.min(self.by_label.len());
        self.by_label
            .choose_multiple(rng, p)
            .flat_map(|positions| positions.choose_multiple(rng, self.k))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn items(per_label: &[(&str, usize)]) -> Vec<(i64, String)> {
        let mut id = 0;
        let mut out = Vec::new();
        for (label, n) in per_label {
            for _ in 0..*n {
                id += 1;
                out.push((id, label.to_string()));
            }
        }
        out
    }

    #[test]
    fn split_holds_out_a_fraction_per_label_and_keeps_two_to_train() {
        let items = items(&[("a", 10), ("b", 3), ("c", 1)]);
        let split = split(&items, None, 0.2, 1000, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(split.summary.labels, ["a", "b"]);
        assert_eq!(split.summary.ignored_labels, ["c"]);
        let count = |set: &[(i64, usize)], label| set.iter().filter(|(_, l)| *l == label).count();
        assert_eq!((count(&split.train, 0), count(&split.validation, 0)), (8, 2));
        assert_eq!((count(&split.train, 1), count(&split.validation, 1)), (2, 1));
        let again = super::split(&items, None, 0.2, 1000, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(again.validation, split.validation, "the same seed gives the same split");
    }

    #[test]
    fn split_says_what_is_missing() {
        let one_label = items(&[("a", 10), ("b", 1)]);
        assert_eq!(
            split(&one_label, None, 0.2, 1000, &mut StdRng::seed_from_u64(0)).unwrap_err(),
            SplitError::TooFewLabels { images: 11, labels: 2, usable: 1 }
        );
        let pairs = items(&[("a", 2), ("b", 2)]);
        assert_eq!(
            split(&pairs, None, 0.2, 1000, &mut StdRng::seed_from_u64(0)).unwrap_err(),
            SplitError::NoValidation
        );
        let only = ["a".to_string()];
        let filtered = items(&[("a", 5), ("b", 5)]);
        assert!(matches!(
            split(&filtered, Some(&only), 0.2, 1000, &mut StdRng::seed_from_u64(0)),
            Err(SplitError::TooFewLabels { .. })
        ));
    }

    #[test]
    fn batches_have_p_labels_of_k_distinct_images() {
        let labels: Vec<usize> = (0..60).map(|i| i % 6).collect();
        let sampler = PkSampler::new(&labels, 4, 5);
        let batch = sampler.batch(&mut StdRng::seed_from_u64(1));
        assert_eq!(batch.len(), 20);
        let mut per_label = BTreeMap::new();
        for position in &batch {
            *per_label.entry(labels[*position]).or_insert(0) += 1;
        }
        assert_eq!(per_label.len(), 4);
        assert!(per_label.values().all(|&n| n == 5));
        let mut distinct = batch.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), batch.len());
    }
}
