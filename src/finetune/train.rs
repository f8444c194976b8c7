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

use super::data::{PkSampler, PreparedImages};
use super::loss::{finite, triplet_loss};
use super::params::{Commit, FinetuneParams, SelectBy};
use crate::embed::{resolve_devices, CudaInfo, DeviceChoice, EmbedError};
use crate::eval::metrics::{pair_verification, retrieval};
use crate::preprocess::Preprocessor;

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
    #[error("training device: {0}")]
    Device(#[from] EmbedError),
    #[error("too few of the selected images could be read")]
    TooFewImages,
    #[error("cancelled")]
    Cancelled,
    /// The loss or the validation figures stopped being numbers: the weights
    /// diverged. Nothing of the run is saved.
    #[error(
        "training diverged: the {what} became {value} at epoch {epoch}, step {step}; nothing was saved \
         (try a lower learning_rate)"
    )]
    Diverged { what: &'static str, value: f64, epoch: usize, step: usize },
}

/// Where and how wide training runs.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// The service's `--device`: training takes the first device it resolves to.
    pub device: DeviceChoice,
    /// libtorch intra-op threads of the training thread; 0: half the cores.
    pub threads: usize,
}

impl Trainer {
    /// The configured threads, or half the cores (at least one). Measured on
    /// 2 cores (`make bench-finetune-threads`): one thread trained as fast as
    /// two (17 s against 19 s) and kept search p99 at 26 ms instead of 38 ms,
    /// since training no longer takes the core the embedding worker needs.
    pub fn intra_op_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        if self.threads > 0 {
            self.threads
        } else {
            (cores / 2).max(1)
        }
    }
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

impl TrainData {
    /// The prepared images as one tensor, normalised as `preprocessor` left them.
    pub fn new(prepared: PreparedImages, preprocessor: &Preprocessor) -> Result<Self, TrainError> {
        let PreparedImages { pixels, labels, train, validation } = prepared;
        if validation.is_empty() || train.len() < 4 {
            return Err(TrainError::TooFewImages);
        }
        let size = preprocessor.size() as i64;
        let images = Tensor::from_slice(&pixels).view([labels.len() as i64, 3, size, size]);
        let spec = preprocessor.spec();
        Ok(Self { images, labels, train, validation, mean: spec.mean, std: spec.std })
    }
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
    trainer: &Trainer,
    encoder: &Path,
    data: &TrainData,
    params: &FinetuneParams,
    scratch: &Path,
    report: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<Outcome, TrainError> {
    let device = resolve_devices(&trainer.device, CudaInfo::probe())?.into_iter().next().unwrap_or(Device::Cpu);
    // Per calling thread (OpenMP): the embedding workers keep their own.
    tch::set_num_threads(trainer.intra_op_threads() as i32);
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
            // Checked before the step: a NaN gradient would make every weight NaN.
            let value = finite("loss", loss.double_value(&[]), epoch, step)?;
            optimizer.backward_step(&loss);
            let loss = value;
            (loss_sum, active_sum) = (loss_sum + loss, active_sum + active);
            let seconds_per_step = started.elapsed().as_secs_f64() / step as f64;
            report(Event::Step { epoch, step, loss, seconds_per_step });
        }
        let validation = validate(&model, &images, &labels, data, &augmenter, params)?;
        finite("validation MAP@R", validation.map_at_r, epoch, steps_per_epoch)?;
        finite("validation threshold", f64::from(validation.threshold), epoch, steps_per_epoch)?;
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
