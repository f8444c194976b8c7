//! Fashion-MNIST retrieval: test images query the training images of the same
//! class set, for the seen classes (0-6, which the Fashion-MNIST model trained
//! on), the unseen ones (7-9, never trained on) and all ten; pair
//! verification on seen-class test pairs.

use std::path::Path;

use image::DynamicImage;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::fashion_mnist;
use super::metrics::{retrieval, verification, Verification};
use super::{unit_rows, SetReport, SplitMix, BATCH};
use crate::embed::{Encoder, TorchEncoder};
use crate::preprocess::Preprocessor;

const SEEN: std::ops::Range<i64> = 0..7;
const UNSEEN: std::ops::Range<i64> = 7..10;
/// Same-class and different-class pairs, each.
const PAIRS_PER_KIND: usize = 10_000;

#[derive(Debug, Serialize)]
pub struct FashionReport {
    pub seen: SetReport,
    pub unseen: SetReport,
    pub all: SetReport,
    /// On seen-class test pairs.
    pub verification: Verification,
    pub raw_pixels_verification: Verification,
}

/// Embedded images of one split, with the raw-pixel baseline vectors beside them.
struct Embedded {
    model: Tensor,
    raw: Tensor,
    labels: Vec<i64>,
}

/// `every`: keep every `every`-th image of each split (1: all of them).
pub fn evaluate(
    dir: &Path,
    every: usize,
    pre: &Preprocessor,
    encoder: &mut TorchEncoder,
) -> anyhow::Result<FashionReport> {
    let train = embed_split(dir, "train", every, pre, encoder)?;
    let test = embed_split(dir, "t10k", every, pre, encoder)?;
    Ok(FashionReport {
        seen: split_report("Fashion-MNIST seen 0-6", &test, &train, |l| SEEN.contains(&l)),
        unseen: split_report("Fashion-MNIST unseen 7-9", &test, &train, |l| UNSEEN.contains(&l)),
        all: split_report("Fashion-MNIST all 0-9", &test, &train, |_| true),
        verification: seen_pair_verification(&test.model, &test.labels),
        raw_pixels_verification: seen_pair_verification(&test.raw, &test.labels),
    })
}

fn embed_split(
    dir: &Path,
    prefix: &str,
    every: usize,
    pre: &Preprocessor,
    encoder: &mut TorchEncoder,
) -> anyhow::Result<Embedded> {
    let mut split = fashion_mnist::load(dir, prefix)?;
    split.images = split.images.into_iter().step_by(every).collect();
    split.labels = split.labels.into_iter().step_by(every).collect();
    let mut model = Vec::with_capacity(split.images.len());
    for chunk in split.images.chunks(BATCH) {
        let mut pixels = Vec::with_capacity(chunk.len() * pre.input_len());
        for image in chunk {
            pixels.extend(pre.prepare_decoded(DynamicImage::ImageLuma8(image.clone()))?);
        }
        model.extend(encoder.encode(&pixels, chunk.len())?);
    }
    let raw: Vec<Vec<f32>> =
        split.images.iter().map(|im| im.as_raw().iter().map(|p| *p as f32 / 255.0).collect()).collect();
    Ok(Embedded { model: unit_rows(&model), raw: unit_rows(&raw), labels: split.labels })
}

fn split_report(name: &str, test: &Embedded, train: &Embedded, keep: impl Fn(i64) -> bool) -> SetReport {
    let pick = |e: &Embedded| -> (Tensor, Tensor, Vec<i64>) {
        let idx: Vec<i64> = (0..e.labels.len() as i64).filter(|i| keep(e.labels[*i as usize])).collect();
        let idx_t = Tensor::from_slice(&idx);
        let labels = idx.iter().map(|i| e.labels[*i as usize]).collect();
        (e.model.index_select(0, &idx_t), e.raw.index_select(0, &idx_t), labels)
    };
    let (q_model, q_raw, q_labels) = pick(test);
    let (g_model, g_raw, g_labels) = pick(train);
    SetReport {
        name: name.into(),
        queries: q_labels.len(),
        gallery: g_labels.len(),
        skipped: 0,
        model: retrieval(&q_model, &q_labels, &g_model, &g_labels),
        raw_pixels: retrieval(&q_raw, &q_labels, &g_raw, &g_labels),
        verification: None,
    }
}

/// Cosine similarity of fixed, seeded pairs of seen-class test images.
fn seen_pair_verification(vectors: &Tensor, labels: &[i64]) -> Verification {
    let seen: Vec<usize> = (0..labels.len()).filter(|i| SEEN.contains(&labels[*i])).collect();
    let mut rng = SplitMix(0x5eed);
    let (mut same_pairs, mut diff_pairs) = (Vec::new(), Vec::new());
    while same_pairs.len() < PAIRS_PER_KIND || diff_pairs.len() < PAIRS_PER_KIND {
        let (a, b) = (seen[rng.below(seen.len())], seen[rng.below(seen.len())]);
        if a == b {
            continue;
        }
        let bucket = if labels[a] == labels[b] { &mut same_pairs } else { &mut diff_pairs };
        if bucket.len() < PAIRS_PER_KIND {
            bucket.push((a as i64, b as i64));
        }
    }
    let pairs: Vec<(i64, i64)> = same_pairs.iter().chain(&diff_pairs).copied().collect();
    let a = vectors.index_select(0, &Tensor::from_slice(&pairs.iter().map(|p| p.0).collect::<Vec<_>>()));
    let b = vectors.index_select(0, &Tensor::from_slice(&pairs.iter().map(|p| p.1).collect::<Vec<_>>()));
    let scores = Vec::<f32>::try_from((a * b).sum_dim_intlist([1i64].as_slice(), false, Kind::Float))
        .expect("a 1-d float tensor converts; this is a bug");
    let same: Vec<bool> = (0..pairs.len()).map(|i| i < same_pairs.len()).collect();
    verification(&scores, &same)
}
