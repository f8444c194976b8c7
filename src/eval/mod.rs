//! `lookalike eval`: retrieval quality of a model, embedded through the
//! service's own decoding, preprocessing and encoder code, next to a raw-pixel
//! baseline, on Fashion-MNIST and on any image folders (one sub-folder per
//! class); and the encoder's throughput at batch 1 and 32.

pub mod fashion;
pub mod fashion_mnist;
pub mod folders;
pub mod metrics;
pub mod near_duplicate;

use std::path::PathBuf;
use std::time::Instant;

use image::DynamicImage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

pub use metrics::{retrieval, verification, RetrievalMetrics, Verification};

use crate::embed::{Encoder, Precision, TorchEncoder};
use crate::manifest::{Manifest, ENCODER_FILE};
use crate::preprocess::{to_rgb_on_white, ImageLimits, Preprocessor};
use folders::FolderSet;

/// Images per forward pass.
const BATCH: usize = 64;
/// Query x gallery pairs scored to calibrate a folder set's verification threshold.
const MAX_PAIRS: usize = 2_000_000;
/// The decoding limits of the service's defaults: a file it would refuse is skipped here.
const LIMITS: ImageLimits = ImageLimits { max_side: 8192, max_decoded_bytes: 256 * 1024 * 1024 };
/// Name of the Fashion-MNIST verification, for `--verification-set`.
const FASHION: &str = "fashion-mnist";

#[derive(Debug, Clone, clap::Args)]
pub struct EvalConfig {
    /// Model folder to evaluate.
    #[arg(long, env = "LOOKALIKE_MODEL", default_value = crate::manifest::BUNDLED_MODEL_DIR)]
    pub model: PathBuf,
    /// Folder with the Fashion-MNIST IDX files.
    #[arg(long, default_value = fashion_mnist::DEFAULT_DIR)]
    pub data: PathBuf,
    /// Skip Fashion-MNIST (evaluate folder sets only).
    #[arg(long)]
    pub no_fashion_mnist: bool,
    /// Keep every Nth Fashion-MNIST image of each split (1: all 70,000); for
    /// models too slow on a CPU for the whole set (the 224 px teacher).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub fashion_mnist_every: u32,
    /// An image-folder set, repeatable: `NAME=DIR` (each class sub-folder split into
    /// gallery and queries with `--seed`) or `NAME=GALLERY_DIR,QUERY_DIR`. A gallery
    /// class with no queries is a distractor (copy detection: one original per class).
    #[arg(long = "set")]
    pub sets: Vec<FolderSet>,
    /// Share of each class that becomes queries when a set is one folder.
    #[arg(long, default_value_t = 0.2)]
    pub query_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Set whose pairs calibrate the verification threshold written to the report
    /// (default: fashion-mnist when evaluated, else the first set).
    #[arg(long)]
    pub verification_set: Option<String>,
    /// Calibrate the near-duplicate distance: `COPIES,CLASSMATES`, two evaluated
    /// sets (altered copies of their gallery's originals; classes whose distinct
    /// images must not count as duplicates).
    #[arg(long)]
    pub near_duplicate: Option<String>,
    /// Skip the throughput measurement.
    #[arg(long)]
    pub no_throughput: bool,
    /// Also write the report as JSON to this file (models/export.py --evaluation reads it).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Retrieval of one query set among its gallery.
#[derive(Debug, Serialize)]
pub struct SetReport {
    pub name: String,
    pub queries: usize,
    pub gallery: usize,
    /// Files that could not be decoded within the service's default limits.
    pub skipped: usize,
    pub model: RetrievalMetrics,
    pub raw_pixels: RetrievalMetrics,
    /// Query x gallery pairs, same = same class (folder sets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// Encoder images per second on this machine, fp32 on the CPU.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub batch_1: f64,
    pub batch_32: f64,
    pub threads: i64,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fashion_mnist: Option<fashion::FashionReport>,
    pub sets: Vec<SetReport>,
    /// The verification threshold's calibration (see `verification_set`).
    pub verification: Verification,
    pub verification_set: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near_duplicate: Option<near_duplicate::NearDuplicateCalibration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
    pub seconds: f64,
}

pub fn run(config: &EvalConfig) -> anyhow::Result<EvalReport> {
    let started = Instant::now();
    let manifest = Manifest::load(&config.model)?;
    let preprocessor = Preprocessor::new(manifest.input.clone(), LIMITS);
    let mut encoder = TorchEncoder::load(
        &config.model.join(ENCODER_FILE),
        Device::Cpu,
        Precision::Fp32,
        manifest.input.size,
        manifest.embedding.dim,
    )?;
    let fashion = if config.no_fashion_mnist {
        None
    } else {
        Some(fashion::evaluate(&config.data, config.fashion_mnist_every as usize, &preprocessor, &mut encoder)?)
    };
    let (mut sets, mut embedded) = (Vec::new(), Vec::new());
    for set in &config.sets {
        let (report, vectors) = evaluate_set(set, config, &preprocessor, &mut encoder)?;
        sets.push(report);
        embedded.push((set.name.clone(), vectors));
    }
    let near_duplicate =
        config.near_duplicate.as_deref().map(|spec| calibrate_near_duplicate(spec, &embedded)).transpose()?;
    let (verification_set, verification) = chosen_verification(config, fashion.as_ref(), &sets)?;
    let throughput =
        if config.no_throughput { None } else { Some(throughput(&mut encoder, preprocessor.input_len())?) };
    let report = EvalReport {
        model: manifest.model_key(),
        fashion_mnist: fashion,
        sets,
        verification,
        verification_set,
        near_duplicate,
        throughput,
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(path) = &config.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(report)
}

fn chosen_verification(
    config: &EvalConfig,
    fashion: Option<&fashion::FashionReport>,
    sets: &[SetReport],
) -> anyhow::Result<(String, Verification)> {
    let default =
        if fashion.is_some() { FASHION.to_string() } else { sets.first().map(|s| s.name.clone()).unwrap_or_default() };
    let name = config.verification_set.clone().unwrap_or(default);
    if name == FASHION {
        if let Some(f) = fashion {
            return Ok((name, f.verification));
        }
    }
    let found = sets.iter().find(|s| s.name == name).and_then(|s| s.verification);
    let verification =
        found.ok_or_else(|| anyhow::anyhow!("no evaluated set named '{name}' to calibrate verification"))?;
    Ok((name, verification))
}

/// The share of class-mate pairs the calibrated near-duplicate distance may flag.
const NEAR_DUPLICATE_MAX_FALSE_POSITIVES: f64 = 0.01;

fn calibrate_near_duplicate(
    spec: &str,
    embedded: &[(String, near_duplicate::Embedded)],
) -> anyhow::Result<near_duplicate::NearDuplicateCalibration> {
    let (copies, classmates) =
        spec.split_once(',').ok_or_else(|| anyhow::anyhow!("--near-duplicate takes COPIES,CLASSMATES"))?;
    let find = |name: &str| {
        embedded
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e)
            .ok_or_else(|| anyhow::anyhow!("--near-duplicate: no evaluated set named '{name}'"))
    };
    Ok(near_duplicate::calibrate(
        (copies, find(copies)?),
        (classmates, find(classmates)?),
        NEAR_DUPLICATE_MAX_FALSE_POSITIVES,
    ))
}

/// One decoded file: the encoder's input and the raw-pixel vector.
struct Prepared {
    pixels: Vec<f32>,
    raw: Vec<f32>,
}

fn evaluate_set(
    set: &FolderSet,
    config: &EvalConfig,
    pre: &Preprocessor,
    encoder: &mut TorchEncoder,
) -> anyhow::Result<(SetReport, near_duplicate::Embedded)> {
    let files = folders::list(set, config.query_fraction, config.seed)?;
    let (gallery, g_labels, g_skipped) = prepare_all(&files.gallery, pre);
    let (queries, q_labels, q_skipped) = prepare_all(&files.queries, pre);
    anyhow::ensure!(!gallery.is_empty() && !queries.is_empty(), "set {}: no gallery or no query images", set.name);
    let embed = |encoder: &mut TorchEncoder, items: &[Prepared]| -> anyhow::Result<Tensor> {
        let mut rows = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let pixels: Vec<f32> = chunk.iter().flat_map(|p| p.pixels.iter().copied()).collect();
            rows.extend(encoder.encode(&pixels, chunk.len())?);
        }
        Ok(unit_rows(&rows))
    };
    let (g_model, q_model) = (embed(encoder, &gallery)?, embed(encoder, &queries)?);
    let (g_raw, q_raw) = centred_raw(&gallery, &queries);
    let report = SetReport {
        name: set.name.clone(),
        queries: q_labels.len(),
        gallery: g_labels.len(),
        skipped: g_skipped + q_skipped,
        model: retrieval(&q_model, &q_labels, &g_model, &g_labels),
        raw_pixels: retrieval(&q_raw, &q_labels, &g_raw, &g_labels),
        verification: Some(metrics::pair_verification(&q_model, &q_labels, &g_model, &g_labels, MAX_PAIRS)),
    };
    let vectors = near_duplicate::Embedded {
        queries: q_model,
        query_labels: q_labels,
        gallery: g_model,
        gallery_labels: g_labels,
    };
    Ok((report, vectors))
}

/// Decodes and prepares files on every core; returns the prepared ones, their
/// classes, and how many were skipped.
fn prepare_all(files: &[folders::Labelled], pre: &Preprocessor) -> (Vec<Prepared>, Vec<i64>, usize) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = files.len().div_ceil(threads).max(1);
    let results: Vec<Option<Prepared>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|f| prepare_one(&f.path, pre)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a preparing thread panicked; this is a bug")).collect()
    });
    let mut prepared = Vec::new();
    let mut labels = Vec::new();
    for (file, result) in files.iter().zip(results) {
        if let Some(p) = result {
            prepared.push(p);
            labels.push(file.class);
        }
    }
    let skipped = files.len() - prepared.len();
    (prepared, labels, skipped)
}

fn prepare_one(path: &std::path::Path, pre: &Preprocessor) -> Option<Prepared> {
    let prepared = folders::load(path, LIMITS).and_then(|image| {
        // Composited once, for both the baseline and the encoder's input.
        let rgb = DynamicImage::ImageRgb8(to_rgb_on_white(image));
        let raw = folders::raw_pixels(&rgb);
        Ok(Prepared { pixels: pre.prepare_decoded(rgb)?, raw })
    });
    prepared.map_err(|e| tracing::warn!("skipped {}: {e}", path.display())).ok()
}

/// Raw-pixel vectors of both sides, centred on their common mean, as unit rows.
fn centred_raw(gallery: &[Prepared], queries: &[Prepared]) -> (Tensor, Tensor) {
    let rows = |items: &[Prepared]| {
        let flat: Vec<f32> = items.iter().flat_map(|p| p.raw.iter().copied()).collect();
        Tensor::from_slice(&flat).view([items.len() as i64, -1])
    };
    let (g, q) = (rows(gallery), rows(queries));
    let mean = Tensor::cat(&[&g, &q], 0).mean_dim(0, true, Kind::Float);
    (normalized_rows(g - &mean), normalized_rows(q - &mean))
}

/// Images per second through the encoder at batch 1 and 32 (about 3 s each).
fn throughput(encoder: &mut TorchEncoder, input_len: usize) -> anyhow::Result<Throughput> {
    let mut rate = |batch: usize| -> anyhow::Result<f64> {
        let pixels = vec![0.1f32; batch * input_len];
        for _ in 0..3 {
            encoder.encode(&pixels, batch)?;
        }
        let (started, mut images) = (Instant::now(), 0);
        while started.elapsed().as_secs_f64() < 3.0 {
            encoder.encode(&pixels, batch)?;
            images += batch;
        }
        Ok(images as f64 / started.elapsed().as_secs_f64())
    };
    Ok(Throughput { batch_1: rate(1)?, batch_32: rate(32)?, threads: tch::get_num_threads() as i64 })
}

fn unit_rows(rows: &[Vec<f32>]) -> Tensor {
    let dim = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    normalized_rows(Tensor::from_slice(&flat).view([rows.len() as i64, dim]))
}

fn normalized_rows(t: Tensor) -> Tensor {
    let norms = t.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    t / norms
}

/// A tiny deterministic generator (SplitMix64): pairs and splits must be the same on every run and machine.
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

/// The report as one Markdown table, as the model card shows it.
pub fn render(report: &EvalReport) -> String {
    let mut out = format!("model {}\n\n", report.model);
    out += "| set | queries | gallery | Recall@1 | Recall@5 | MAP@R | raw Recall@1 | raw Recall@5 | raw MAP@R |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    let fashion = report.fashion_mnist.iter().flat_map(|f| [&f.seen, &f.unseen, &f.all]);
    for s in fashion.chain(&report.sets) {
        out += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            s.name,
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
    let skipped: usize = report.sets.iter().map(|s| s.skipped).sum();
    if skipped > 0 {
        out += &format!("\n{skipped} files skipped (not decodable within the service's default limits)\n");
    }
    if let Some(f) = &report.fashion_mnist {
        out += &format!(
            "\nFashion-MNIST verification on {} seen-class test pairs: ROC AUC {:.4} (raw pixels {:.4})\n",
            f.verification.pairs, f.verification.roc_auc, f.raw_pixels_verification.roc_auc
        );
    }
    let v = &report.verification;
    out += &format!(
        "verification threshold {:.4} (balanced accuracy {:.4}, ROC AUC {:.4}) calibrated on {}\n",
        v.threshold, v.balanced_accuracy, v.roc_auc, report.verification_set
    );
    if let Some(n) = &report.near_duplicate {
        out += &format!(
            "near-duplicate distance {:.4}: {:.3} of {} altered copies ({}) within it, {:.4} of {} class-mate pairs ({})\n",
            n.distance, n.recall, n.copy_pairs, n.copies_set, n.false_positive_rate, n.classmate_pairs, n.classmates_set
        );
    }
    if let Some(t) = &report.throughput {
        out += &format!(
            "throughput: {:.0} images/s at batch 1, {:.0} at batch 32 ({} threads, CPU, fp32)\n",
            t.batch_1, t.batch_32, t.threads
        );
    }
    out += &format!("evaluated in {:.0} s\n", report.seconds);
    out
}
