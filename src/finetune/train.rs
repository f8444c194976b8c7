//! The training loop, on its own thread: a trainable copy of the TorchScript
//! encoder in a `VarStore`, Adam, PK batches with augmentation, triplet loss
//! with online mining, validation after every epoch, early stopping.
//!
//! BatchNorm stays in evaluation mode throughout: its running statistics are
//! frozen (its scale and shift still learn). Fine-tuning batches are small and
//! drawn from a few labels, so batch statistics would be noisy and would drift
//! the statistics the served model relies on; frozen BatchNorm also makes the
//! training forward identical to the serving one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor, TrainableCModule};

use super::data::PkSampler;
use super::params::{Commit, FinetuneParams, Mining, SelectBy};
use crate::eval::metrics::{pair_verification, retrieval};

/// Default steps per epoch when one pass over the training images is fewer:
/// with 5 images a label, one pass is a step or two, and 30 such epochs
/// barely moved the encoder (held-out MAP@R +0.035; +0.14 with 10 steps,
/// `bench/fewshot.py`).
const MIN_STEPS_PER_EPOCH: usize = 10;
/// The smallest share of an image a training view keeps.
const MIN_CROP_AREA: f64 = 0.4;
/// Mixed into the job's seed for the validation views, so they stay fixed across epochs.
const VALIDATION_VIEW_SEED: u64 = 0x76_6965_7773;
/// Images per forward pass when embedding for validation.
const EVAL_BATCH: i64 = 256;
/// Validation pairs scored to calibrate the verification threshold (rows are capped to fit).
const MAX_PAIRS: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("cancelled")]
    Cancelled,
}

/// What the loop trains on: preprocessed images (`n x 3 x size x size`, on
/// the CPU) with label indices, and which positions train and which validate.
pub struct TrainData {
    pub images: Tensor,
    pub labels: Vec<usize>,
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    /// The normalisation the images carry (the manifest's), undone to augment colours.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Retrieval of held-out items among the training items.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Validation {
    pub recall_at_1: f64,
    pub map_at_r: f64,
    /// Cosine similarity that best separates same-label from different-label pairs.
    pub threshold: f32,
}

impl Validation {
    /// Better on the chosen metric, or equal on it and better on the other.
    pub fn beats(&self, other: &Validation, by: SelectBy) -> bool {
        const EPS: f64 = 1e-9;
        let (mine, theirs) = match by {
            SelectBy::MapAtR => ((self.map_at_r, self.recall_at_1), (other.map_at_r, other.recall_at_1)),
            SelectBy::RecallAt1 => ((self.recall_at_1, self.map_at_r), (other.recall_at_1, other.map_at_r)),
        };
        mine.0 > theirs.0 + EPS || ((mine.0 - theirs.0).abs() <= EPS && mine.1 > theirs.1 + EPS)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    /// Share of triplets that still violated the margin, over the epoch.
    pub active_triplets: f64,
    pub validation: Validation,
    pub seconds: f64,
}

/// What the loop reports as it goes.
pub enum Event {
    Started { before: Validation, steps_per_epoch: usize },
    Step { epoch: usize, step: usize, loss: f64, seconds_per_step: f64 },
    Epoch(EpochRecord),
}

pub struct Outcome {
    pub before: Validation,
    /// The best epoch's figures, and where its weights were saved (none if no epoch beat `before`).
    pub best: Option<(EpochRecord, PathBuf)>,
    /// The last epoch's weights, for `commit: always` when no epoch beat `before`.
    pub last: Option<(EpochRecord, PathBuf)>,
    pub stopped_early: bool,
}

/// Fine-tunes the encoder at `encoder` on `data`, writing checkpoints into `scratch`.
pub fn train(
    encoder: &Path,
    data: &TrainData,
    params: &FinetuneParams,
    scratch: &Path,
    report: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<Outcome, TrainError> {
    let device = if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu };
    tch::manual_seed(params.seed as i64);
    let mut rng = StdRng::seed_from_u64(params.seed);
    let vs = nn::VarStore::new(device);
    let mut model = TrainableCModule::load(encoder, vs.root())?;
    model.set_eval(); // frozen BatchNorm statistics, see the module comment
    freeze_early_layers(encoder, &vs, params.freeze)?;
    let mut optimizer = nn::Adam::default().build(&vs, params.learning_rate)?;
    let augmenter = Augmenter::new(data.mean, data.std, device);

    let images = data.images.to_device(device);
    let labels: Vec<i64> = data.labels.iter().map(|&l| l as i64).collect();
    let train_labels: Vec<usize> = data.train.iter().map(|&i| data.labels[i]).collect();
    let sampler = PkSampler::new(&train_labels, params.p, params.k);
    let steps_per_epoch = params
        .steps_per_epoch
        .unwrap_or_else(|| data.train.len().div_ceil(params.p * params.k).max(MIN_STEPS_PER_EPOCH))
        .max(1);

    let before = validate(&model, &images, &labels, data, &augmenter, params)?;
    report(Event::Started { before, steps_per_epoch });
    let mut best: Option<(EpochRecord, PathBuf)> = None;
    let mut last_record = None;
    let mut best_so_far = before;
    let mut stale = 0;
    let mut stopped_early = false;
    for epoch in 1..=params.epochs {
        let started = Instant::now();
        let (mut loss_sum, mut active_sum) = (0.0, 0.0);
        for step in 1..=steps_per_epoch {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let positions = sampler.batch(&mut rng);
            let index: Vec<i64> = positions.iter().map(|&p| data.train[p] as i64).collect();
            let batch_labels: Vec<i64> = index.iter().map(|&i| labels[i as usize]).collect();
            let mut x = images.index_select(0, &Tensor::from_slice(&index).to_device(device));
            if params.augment {
                x = augmenter.apply(&x, &mut rng);
            }
            let embeddings = l2_normalized(&model.forward_t(&x, false));
            let y = Tensor::from_slice(&batch_labels).to_device(device);
            let (loss, active) = triplet_loss(&embeddings, &y, params.margin, params.mining);
            optimizer.backward_step(&loss);
            let loss = loss.double_value(&[]);
            (loss_sum, active_sum) = (loss_sum + loss, active_sum + active);
            let seconds_per_step = started.elapsed().as_secs_f64() / step as f64;
            report(Event::Step { epoch, step, loss, seconds_per_step });
        }
        let validation = validate(&model, &images, &labels, data, &augmenter, params)?;
        let record = EpochRecord {
            epoch,
            loss: loss_sum / steps_per_epoch as f64,
            active_triplets: active_sum / steps_per_epoch as f64,
            validation,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            epoch,
            loss = record.loss,
            active_triplets = record.active_triplets,
            recall_at_1 = validation.recall_at_1,
            map_at_r = validation.map_at_r,
            seconds = record.seconds,
            "fine-tune epoch"
        );
        report(Event::Epoch(record.clone()));
        last_record = Some(record.clone());
        if validation.beats(&best_so_far, params.select_by) {
            let path = scratch.join("best.pt");
            model.save(&path)?;
            best_so_far = validation;
            best = Some((record, path));
            stale = 0;
        } else {
            stale += 1;
            if stale >= params.patience {
                stopped_early = epoch < params.epochs;
                break;
            }
        }
    }
    // With `commit: always` and no epoch better than the start, the last weights are the result.
    let last = match (params.commit, &best, last_record) {
        (Commit::Always, None, Some(record)) => {
            let path = scratch.join("last.pt");
            model.save(&path)?;
            Some((record, path))
        }
        _ => None,
    };
    Ok(Outcome { before, best, last, stopped_early })
}

/// Recall@1 and MAP@R of the validation items among the training items, and
/// the verification threshold on their pairs. Each held-out item queries as
/// itself and as `validation_views` augmented views (the same views at every
/// epoch): with a few held-out images per label, one image's luck would
/// otherwise decide the epoch, and views also reward robustness to how
/// real uploads differ.
fn validate(
    model: &TrainableCModule,
    images: &Tensor,
    labels: &[i64],
    data: &TrainData,
    augmenter: &Augmenter,
    params: &FinetuneParams,
) -> Result<Validation, TrainError> {
    let _no_grad = tch::no_grad_guard();
    let mut view_rng = StdRng::seed_from_u64(params.seed ^ VALIDATION_VIEW_SEED);
    let mut embed = |positions: &[usize], view: bool| -> Result<Tensor, TrainError> {
        let mut parts = Vec::new();
        for chunk in positions.chunks(EVAL_BATCH as usize) {
            let index: Vec<i64> = chunk.iter().map(|&p| p as i64).collect();
            let mut x = images.index_select(0, &Tensor::from_slice(&index).to_device(images.device()));
            if view {
                x = augmenter.apply(&x, &mut view_rng);
            }
            parts.push(l2_normalized(&model.forward_ts(&[x])?));
        }
        Ok(Tensor::cat(&parts, 0).to_device(Device::Cpu))
    };
    let mut query_parts = vec![embed(&data.validation, false)?];
    for _ in 0..params.validation_views {
        query_parts.push(embed(&data.validation, true)?);
    }
    let queries = Tensor::cat(&query_parts, 0);
    let gallery = embed(&data.train, false)?;
    let query_labels: Vec<i64> =
        data.validation.iter().map(|&i| labels[i]).cycle().take(data.validation.len() * query_parts.len()).collect();
    let gallery_labels: Vec<i64> = data.train.iter().map(|&i| labels[i]).collect();
    let metrics = retrieval(&queries, &query_labels, &gallery, &gallery_labels);
    let threshold = pair_verification(&queries, &query_labels, &gallery, &gallery_labels, MAX_PAIRS).threshold;
    Ok(Validation { recall_at_1: metrics.recall_at_1, map_at_r: metrics.map_at_r, threshold })
}

/// Keeps the first `fraction` of the encoder's weights (counted in
/// parameters, in the module's own order, from the input side) fixed, so a
/// job can adapt only the last layers. Off by default: measured, it kept
/// few-shot MAP@R the same and cut the gain with many labels (models/README.md).
fn freeze_early_layers(encoder: &Path, vs: &nn::VarStore, fraction: f64) -> Result<(), TrainError> {
    if fraction <= 0.0 {
        return Ok(());
    }
    let ordered = tch::CModule::load(encoder)?.named_parameters()?;
    let total: i64 = ordered.iter().map(|(_, t)| t.numel() as i64).sum();
    let variables = vs.variables();
    let mut seen = 0i64;
    for (name, tensor) in &ordered {
        if (seen as f64) < fraction * total as f64 {
            // TrainableCModule registers each parameter under its name with '.' as '_'.
            if let Some(var) = variables.get(&name.replace('.', "_")) {
                let _ = var.shallow_clone().set_requires_grad(false);
            }
        }
        seen += tensor.numel() as i64;
    }
    Ok(())
}

fn l2_normalized(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12)
}

/// Random views as real uploads differ: a random resized crop (`MIN_CROP_AREA`
/// to all of the image, aspect 3/4 to 4/3, resized back), a horizontal flip,
/// colour jitter (brightness, contrast, saturation) and sometimes greyscale.
/// Colours are jittered in pixel space: the manifest's normalisation is
/// undone first and redone after.
pub struct Augmenter {
    mean: Tensor,
    std: Tensor,
}

impl Augmenter {
    pub fn new(mean: [f32; 3], std: [f32; 3], device: Device) -> Self {
        let column = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
        Self { mean: column(mean), std: column(std) }
    }

    pub fn apply(&self, x: &Tensor, rng: &mut StdRng) -> Tensor {
        let size = x.size()[2];
        let pixels = (x * &self.std + &self.mean).clamp(0.0, 1.0);
        let views: Vec<Tensor> = (0..x.size()[0]).map(|i| self.view(&pixels.get(i), size, rng)).collect();
        (Tensor::stack(&views, 0) - &self.mean) / &self.std
    }

    fn view(&self, image: &Tensor, size: i64, rng: &mut StdRng) -> Tensor {
        let area = rng.random_range(MIN_CROP_AREA..=1.0);
        let aspect = rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln()).exp();
        let w = ((area * aspect).sqrt() * size as f64).round().clamp(8.0, size as f64) as i64;
        let h = ((area / aspect).sqrt() * size as f64).round().clamp(8.0, size as f64) as i64;
        let (top, left) = (rng.random_range(0..=size - h), rng.random_range(0..=size - w));
        let crop = image.narrow(1, top, h).narrow(2, left, w).unsqueeze(0);
        let mut view = crop.upsample_bilinear2d([size, size], false, None, None).squeeze_dim(0);
        if rng.random_bool(0.5) {
            view = view.flip([2]);
        }
        if rng.random_bool(0.8) {
            view = jitter(&view, rng);
        }
        if rng.random_bool(0.1) {
            view = grey(&view).expand([3, size, size], false);
        }
        view.clamp(0.0, 1.0)
    }
}

/// Luma of a (3, h, w) image in [0, 1], as (1, h, w).
fn grey(image: &Tensor) -> Tensor {
    let weights = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([3, 1, 1]).to_device(image.device());
    (image * weights).sum_dim_intlist([0i64].as_slice(), true, Kind::Float)
}

fn jitter(image: &Tensor, rng: &mut StdRng) -> Tensor {
    let brightness = rng.random_range(0.7..=1.3);
    let contrast = rng.random_range(0.7..=1.3);
    let saturation = rng.random_range(0.6..=1.4);
    let x = image * brightness;
    let mean = grey(&x).mean(Kind::Float);
    let x = (x - &mean) * contrast + &mean;
    let luma = grey(&x);
    (x - &luma) * saturation + luma
}

/// Euclidean distances between rows of unit vectors.
fn pairwise_distance(e: &Tensor) -> Tensor {
    let similarity = e.matmul(&e.tr());
    (similarity * -2.0 + 2.0).clamp_min(1e-12).sqrt()
}

/// The triplet loss `max(d(a,p) - d(a,n) + margin, 0)` over the batch's
/// mined triplets, and the share of candidate triplets that violate the margin.
///
/// - `batch_hard`: per anchor, its farthest positive and nearest negative.
/// - `semi_hard` (FaceNet): per anchor-positive pair, the nearest negative
///   that is still farther than the positive; when there is none, the
///   farthest negative. Avoids the collapse batch-hard can cause.
/// - `batch_all`: every valid triplet, averaged over those with a positive loss.
pub fn triplet_loss(e: &Tensor, labels: &Tensor, margin: f64, mining: Mining) -> (Tensor, f64) {
    let d = pairwise_distance(e);
    let n = labels.size()[0];
    let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    let eye = Tensor::eye(n, (Kind::Bool, e.device()));
    let positive = same.logical_and(&eye.logical_not());
    let negative = same.logical_not();
    // (a, p, n): d(a,p) - d(a,n) + margin, and which triplets are valid.
    let gap = d.unsqueeze(2) - d.unsqueeze(1) + margin;
    let valid = positive.unsqueeze(2).logical_and(&negative.unsqueeze(1));
    let violated = gap.gt(0.0).logical_and(&valid).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
    let active = violated / valid.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]).max(1.0);
    let loss = match mining {
        Mining::BatchAll => {
            let losses = gap.clamp_min(0.0) * valid.to_kind(Kind::Float);
            losses.sum(Kind::Float) / (violated.max(1.0))
        }
        Mining::BatchHard => {
            let hardest_positive = (&d * positive.to_kind(Kind::Float)).amax([1i64].as_slice(), false);
            let hardest_negative = d.masked_fill(&negative.logical_not(), f64::INFINITY).amin([1i64].as_slice(), false);
            let has_both = positive.any_dim(1, false).logical_and(&negative.any_dim(1, false)).to_kind(Kind::Float);
            let losses = (hardest_positive - hardest_negative + margin).clamp_min(0.0) * &has_both;
            losses.sum(Kind::Float) / has_both.sum(Kind::Float).clamp_min(1.0)
        }
        Mining::SemiHard => {
            let d_ap = d.unsqueeze(2);
            let d_an = d.unsqueeze(1).expand([n, n, n], false);
            let semi_hard = valid.logical_and(&d_an.gt_tensor(&d_ap));
            let nearest_semi_hard =
                d_an.masked_fill(&semi_hard.logical_not(), f64::INFINITY).amin([2i64].as_slice(), false);
            let farthest = d_an.masked_fill(&valid.logical_not(), f64::NEG_INFINITY).amax([2i64].as_slice(), false);
            let has_semi_hard = semi_hard.any_dim(2, false);
            let chosen = nearest_semi_hard.where_self(&has_semi_hard, &farthest);
            let pairs = positive.logical_and(&negative.any_dim(1, true)).to_kind(Kind::Float);
            let losses = (&d - chosen.nan_to_num(0.0, 0.0, 0.0) + margin).clamp_min(0.0) * &pairs;
            losses.sum(Kind::Float) / pairs.sum(Kind::Float).clamp_min(1.0)
        }
    };
    (loss, active)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit vectors at the given angles (radians) on a circle.
    fn on_circle(angles: &[f64]) -> Tensor {
        let flat: Vec<f32> = angles.iter().flat_map(|a| [a.cos() as f32, a.sin() as f32]).collect();
        Tensor::from_slice(&flat).view([angles.len() as i64, 2])
    }

    fn chord(angle: f64) -> f64 {
        2.0 * (angle / 2.0).sin()
    }

    fn loss(e: &Tensor, labels: &[i64], mining: Mining) -> f64 {
        triplet_loss(e, &Tensor::from_slice(labels), 0.2, mining).0.double_value(&[])
    }

    #[test]
    fn well_separated_classes_cost_nothing() {
        let e = on_circle(&[0.0, 0.05, 3.0, 3.05]);
        for mining in [Mining::BatchAll, Mining::BatchHard, Mining::SemiHard] {
            assert!(loss(&e, &[0, 0, 1, 1], mining).abs() < 1e-6, "{mining:?}");
        }
    }

    #[test]
    fn batch_hard_takes_the_farthest_positive_and_nearest_negative() {
        // Anchor 0 at 0 rad; its positive at 0.6; a negative at 0.3 (closer than the positive).
        let e = on_circle(&[0.0, 0.6, 0.3, 3.0]);
        let labels = [0, 0, 1, 1];
        let d = |a: f64, b: f64| chord((a - b).abs());
        let per_anchor = [
            (d(0.0, 0.6) - d(0.0, 0.3) + 0.2).max(0.0),
            (d(0.6, 0.0) - d(0.6, 0.3) + 0.2).max(0.0),
            (d(0.3, 3.0) - d(0.3, 0.0) + 0.2).max(0.0),
            (d(3.0, 0.3) - d(3.0, 0.6) + 0.2).max(0.0),
        ];
        let expected = per_anchor.iter().sum::<f64>() / 4.0;
        assert!((loss(&e, &labels, Mining::BatchHard) - expected).abs() < 1e-5);
    }

    #[test]
    fn semi_hard_prefers_a_negative_beyond_the_positive() {
        // Anchor 0 at 0; positive at 0.2; negatives at 0.1 (hard) and 0.3 (semi-hard).
        let e = on_circle(&[0.0, 0.2, 0.1, 0.3]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let (semi, _) = triplet_loss(&e, &labels, 0.2, Mining::SemiHard);
        let (hard, _) = triplet_loss(&e, &labels, 0.2, Mining::BatchHard);
        assert!(semi.double_value(&[]) > 0.0);
        assert!(semi.double_value(&[]) < hard.double_value(&[]), "semi-hard negatives are easier than the hardest");
        // Pair (0, 1): semi-hard negative is 0.3 -> d(0,0.2) - d(0,0.3) + 0.2.
        let expected_01 = chord(0.2) - chord(0.3) + 0.2;
        assert!(expected_01 > 0.0);
    }

    #[test]
    fn loss_has_gradients_for_training() {
        let e = on_circle(&[0.0, 0.6, 0.3, 3.0]).set_requires_grad(true);
        let (l, active) = triplet_loss(&e, &Tensor::from_slice(&[0i64, 0, 1, 1]), 0.2, Mining::SemiHard);
        l.backward();
        assert!(active > 0.0);
        assert!(e.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
