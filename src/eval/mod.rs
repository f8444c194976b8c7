//! `lookalike eval`: retrieval quality of a model on Fashion-MNIST, embedded
//! through the service's own preprocessing and encoder code, next to a
//! raw-pixel cosine baseline.
//!
//! Queries are test images, the gallery is training images of the same class
//! set, for the seen classes (0-6, trained on), the unseen ones (7-9, never
//! trained on) and all ten. Verification pairs come from seen-class test images.

pub mod dataset;
pub mod metrics;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::DynamicImage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

pub use metrics::{retrieval, verification, RetrievalMetrics, Verification};

use crate::embed::{Encoder, Precision, TorchEncoder};
use crate::manifest::Manifest;
use crate::preprocess::{ImageLimits, Preprocessor};

const SEEN: std::ops::Range<i64> = 0..7;
const UNSEEN: std::ops::Range<i64> = 7..10;
const BATCH: usize = 256;
/// Same-class and different-class pairs, each.
const PAIRS_PER_KIND: usize = 10_000;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalConfig {
    /// Model folder to evaluate.
    #[arg(long, env = "LOOKALIKE_MODEL", default_value = crate::config::BUNDLED_MODEL_DIR)]
    pub model: PathBuf,
    /// Folder with the Fashion-MNIST IDX files.
    #[arg(long, default_value = dataset::DEFAULT_DIR)]
    pub data: PathBuf,
    /// Also write the report as JSON to this file (models/export.py --evaluation reads it).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct SplitReport {
    pub classes: String,
    pub queries: usize,
    pub gallery: usize,
    pub model: RetrievalMetrics,
    pub raw_pixels: RetrievalMetrics,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub seen: SplitReport,
    pub unseen: SplitReport,
    pub all: SplitReport,
    /// On seen-class test pairs.
    pub verification: Verification,
    pub raw_pixels_verification: Verification,
    pub seconds: f64,
}

/// Embedded images of one split, with the raw-pixel baseline vectors beside them.
struct Embedded {
    model: Tensor,
    raw: Tensor,
    labels: Vec<i64>,
}

pub fn run(config: &EvalConfig) -> anyhow::Result<EvalReport> {
    let started = Instant::now();
    let manifest = Manifest::load(&config.model)?;
    // The limits guard byte decoding, which evaluation skips (IDX pixels are already decoded).
    let unused_limits = ImageLimits { max_side: u32::MAX, max_decoded_bytes: u64::MAX };
    let preprocessor = Preprocessor::new(manifest.input.clone(), unused_limits);
    let mut encoder = TorchEncoder::load(
        &config.model.join("encoder.pt"),
        Device::Cpu,
        Precision::Fp32,
        manifest.input.size,
        manifest.embedding.dim,
    )?;
    let train = embed_split(&config.data, "train", &preprocessor, &mut encoder)?;
    let test = embed_split(&config.data, "t10k", &preprocessor, &mut encoder)?;
    let report = EvalReport {
        model: manifest.model_key(),
        seen: split_report("seen 0-6", &test, &train, |l| SEEN.contains(&l)),
        unseen: split_report("unseen 7-9", &test, &train, |l| UNSEEN.contains(&l)),
        all: split_report("all 0-9", &test, &train, |_| true),
        verification: pair_verification(&test.model, &test.labels),
        raw_pixels_verification: pair_verification(&test.raw, &test.labels),
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(path) = &config.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(report)
}

fn embed_split(dir: &Path, prefix: &str, pre: &Preprocessor, encoder: &mut TorchEncoder) -> anyhow::Result<Embedded> {
    let split = dataset::load(dir, prefix)?;
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

fn unit_rows(rows: &[Vec<f32>]) -> Tensor {
    let dim = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let t = Tensor::from_slice(&flat).view([rows.len() as i64, dim]);
    let norms = t.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    t / norms
}

fn split_report(classes: &str, test: &Embedded, train: &Embedded, keep: impl Fn(i64) -> bool) -> SplitReport {
    let pick = |e: &Embedded| -> (Tensor, Tensor, Vec<i64>) {
        let idx: Vec<i64> = (0..e.labels.len() as i64).filter(|i| keep(e.labels[*i as usize])).collect();
        let idx_t = Tensor::from_slice(&idx);
        let labels = idx.iter().map(|i| e.labels[*i as usize]).collect();
        (e.model.index_select(0, &idx_t), e.raw.index_select(0, &idx_t), labels)
    };
    let (q_model, q_raw, q_labels) = pick(test);
    let (g_model, g_raw, g_labels) = pick(train);
    SplitReport {
        classes: classes.into(),
        queries: q_labels.len(),
        gallery: g_labels.len(),
        model: retrieval(&q_model, &q_labels, &g_model, &g_labels),
        raw_pixels: retrieval(&q_raw, &q_labels, &g_raw, &g_labels),
    }
}

/// Cosine similarity of fixed, seeded pairs of seen-class test images.
fn pair_verification(vectors: &Tensor, labels: &[i64]) -> Verification {
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

/// A tiny deterministic generator (SplitMix64): the pairs must be the same on every run and machine.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// The report as a Markdown table, as the README's model card shows it.
pub fn render(report: &EvalReport) -> String {
    let mut out = format!("model {}\n\n", report.model);
    out += "| classes | queries | gallery | Recall@1 | Recall@5 | MAP@R | raw Recall@1 | raw Recall@5 | raw MAP@R |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for s in [&report.seen, &report.unseen, &report.all] {
        out += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            s.classes,
            s.queries,
            s.gallery,
            s.model.recall_at_1,
            s.model.recall_at_5,
            s.model.map_at_r,
            s.raw_pixels.recall_at_1,
            s.raw_pixels.recall_at_5,
            s.raw_pixels.map_at_r
        );
    }
    let (v, r) = (&report.verification, &report.raw_pixels_verification);
    out += &format!(
        "\nverification on {} seen-class test pairs: ROC AUC {:.4} (raw pixels {:.4}), threshold {:.4} at balanced accuracy {:.4}\n",
        v.pairs, v.roc_auc, r.roc_auc, v.threshold, v.balanced_accuracy
    );
    out += &format!("evaluated in {:.0} s\n", report.seconds);
    out
}
