//! The index at gallery scale: 100k vectors at the model's dimension, on
//! clustered synthetic vectors and on real embeddings (Fashion-MNIST through
//! the bundled model). Build throughput, search queries/s and recall@10
//! against exact brute force at several `ef`, memory per vector, dump and
//! reload time, a few variants of how hnsw_rs is called, and the service's
//! start-up on a 100k-item gallery (reload vs rebuild).
//!
//!     make bench-index      # this, then the same data through hnswlib (bench/index_hnswlib.py)
//!
//! Writes the data sets and its figures under target/bench-index/ for the
//! hnswlib side. Prints Markdown tables; asserts nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hnsw_rs::prelude::{DistCosine, DistL2, Distance, Hnsw};
use lookalike::embed::{Encoder, Precision, TorchEncoder};
use lookalike::eval::fashion_mnist;
use lookalike::index::HnswIndex as Index;
use lookalike::manifest::Manifest;
use lookalike::manifest::FASHION_MODEL_DIR;
use lookalike::preprocess::{ImageLimits, Preprocessor};
use serde_json::json;
use tch::Device;

const N: usize = 100_000;
const QUERIES: usize = 1_000;
const K: usize = 10;
const EFS: &[usize] = &[16, 32, 64, 128, 256];
const M: usize = 16;
const EF_CONSTRUCTION: usize = 200;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-index"));
    std::fs::create_dir_all(&out)?;
    let manifest = Manifest::load(Path::new(FASHION_MODEL_DIR))?;
    let dim = manifest.embedding.dim;
    if std::env::args().any(|a| a == "--profile-search") {
        return profile_search(&manifest);
    }
    // `--clustered-only`: the service's index on the synthetic set, for `make bench-cluster`'s pgvector side.
    let clustered_only = std::env::args().any(|a| a == "--clustered-only");
    let mut datasets = vec![("clustered", clustered(dim))];
    if !clustered_only {
        datasets.push(("fashion-mnist", real_embeddings(&manifest)?));
    }
    let mut results = Vec::new();
    for (name, (base, queries)) in datasets {
        println!(
            "\n## {name}: {} vectors, {} queries, dim {dim}, M {M}, ef_construction {EF_CONSTRUCTION}\n",
            base.len(),
            queries.len()
        );
        let truth = brute_force(&base, &queries);
        write_f32(&out.join(format!("{name}-base.f32")), &base)?;
        write_f32(&out.join(format!("{name}-queries.f32")), &queries)?;
        write_truth(&out.join(format!("{name}-truth.u32")), &truth)?;
        let rows = run_dataset(&base, &queries, &truth, dim, name == "clustered" && !clustered_only)?;
        results.push(json!({ "dataset": name, "dim": dim, "rows": rows }));
    }
    std::fs::write(out.join("hnsw_rs.json"), serde_json::to_vec_pretty(&results)?)?;
    if !clustered_only {
        startup(&manifest)?;
    }
    Ok(())
}

/// Builds the real-embedding index, then searches at ef 32 in a loop for a
/// minute: attach a profiler to see where a query's time goes.
///     cargo bench --bench index_scale -- --profile-search &
///     perf record -F 499 -g -p <pid> -- sleep 20   (once it prints "searching")
fn profile_search(manifest: &Manifest) -> anyhow::Result<()> {
    let (base, queries) = real_embeddings(manifest)?;
    let index = Index::new(manifest.embedding.dim, base.len());
    index.insert(&base.iter().enumerate().map(|(i, v)| (i as i64, v.clone())).collect::<Vec<_>>())?;
    println!("searching (pid {})", std::process::id());
    let started = Instant::now();
    let mut n = 0usize;
    while started.elapsed().as_secs() < 60 {
        for q in &queries {
            n += index.search_with_ef(q, K, 32)?.len();
        }
    }
    println!("{n} results");
    Ok(())
}

/// The variants measured on one data set; the first is what the service runs.
fn run_dataset(
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    truth: &[Vec<u32>],
    dim: usize,
    variants: bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    println!("| variant | build s | inserts/s | kB/vector | ef | recall@10 | queries/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    // The service's index is kept (a cheap handle) for the dump and reload below.
    let mut built = None;
    rows.extend(variant("service: lookalike Index (DistDot, parallel build)", base, queries, truth, |items| {
        let index = Index::new(dim, items.len());
        index.insert(items).unwrap();
        built = Some(index.clone());
        Box::new(move |q: &[f32], ef: usize| {
            index.search_with_ef(q, K, ef).unwrap().into_iter().map(|h| h.id as u32).collect()
        })
    }));
    // The distance variants on the first data set only: each 100k build takes minutes here.
    if variants {
        rows.extend(raw_variant("hnsw_rs DistL2, parallel_insert", base, queries, truth, DistL2, true));
        rows.extend(raw_variant("hnsw_rs DistCosine, parallel_insert", base, queries, truth, DistCosine, true));
    }
    dump_and_reload(&built.expect("the service variant builds an index"))?;
    Ok(rows)
}

type Searcher = Box<dyn Fn(&[f32], usize) -> Vec<u32>>;

/// Builds with `build`, then measures every `ef`; one table row per `ef`.
fn variant(
    name: &str,
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    truth: &[Vec<u32>],
    build: impl FnOnce(&[(i64, Vec<f32>)]) -> Searcher,
) -> Vec<serde_json::Value> {
    let items: Vec<(i64, Vec<f32>)> = base.iter().enumerate().map(|(i, v)| (i as i64, v.clone())).collect();
    let rss_before = rss_bytes();
    let started = Instant::now();
    let search = build(&items);
    let build_s = started.elapsed().as_secs_f64();
    drop(items);
    let bytes_per_vector = rss_bytes().saturating_sub(rss_before) as f64 / base.len() as f64;
    let mut rows = Vec::new();
    for &ef in EFS {
        let started = Instant::now();
        let found: Vec<Vec<u32>> = queries.iter().map(|q| search(q, ef)).collect();
        let qps = queries.len() as f64 / started.elapsed().as_secs_f64();
        let recall = recall_at_k(&found, truth);
        println!(
            "| {name} | {build_s:.1} | {:.0} | {:.2} | {ef} | {recall:.4} | {qps:.0} |",
            base.len() as f64 / build_s,
            bytes_per_vector / 1000.0
        );
        rows.push(json!({ "variant": name, "build_s": build_s, "bytes_per_vector": bytes_per_vector, "ef": ef, "recall": recall, "qps": qps }));
    }
    rows
}

fn raw_variant<D: Distance<f32> + Send + Sync + 'static>(
    name: &str,
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    truth: &[Vec<u32>],
    dist: D,
    parallel: bool,
) -> Vec<serde_json::Value> {
    variant(name, base, queries, truth, move |items| {
        let hnsw: Hnsw<'static, f32, D> = Hnsw::new(M, items.len(), 16, EF_CONSTRUCTION, dist);
        if parallel {
            let refs: Vec<(&Vec<f32>, usize)> = items.iter().map(|(id, v)| (v, *id as usize)).collect();
            hnsw.parallel_insert(&refs);
        } else {
            for (id, v) in items {
                hnsw.insert((v, *id as usize));
            }
        }
        Box::new(move |q: &[f32], ef: usize| hnsw.search(q, K, ef).into_iter().map(|n| n.d_id as u32).collect())
    })
}

fn dump_and_reload(index: &Index) -> anyhow::Result<()> {
    let dim = index.dim();
    let dir = tempfile::tempdir()?;
    let dump = index.dump(dir.path(), "bench@1")?;
    let size: u64 = walk_size(dir.path());
    let started = Instant::now();
    let (reloaded, _) = Index::load(dir.path(), "bench@1", dim);
    let reload_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(reloaded.is_some_and(|r| r.len() == index.len()), "the reload lost points");
    println!("\ndump {:.2} s ({:.0} MB on disk, fsynced), reload {reload_s:.2} s\n", dump.seconds, size as f64 / 1e6);
    Ok(())
}

/// Service start-up on a 100k-item gallery: the store filled directly (tiny
/// images, real-sized embeddings), then `Application::build` with no dump
/// (rebuild from stored embeddings) and again after a graceful stop (reload).
fn startup(manifest: &Manifest) -> anyhow::Result<()> {
    use lookalike::gallery::{GalleryStore, NewItem, SqliteGallery as Gallery};
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let (base, _) = clustered(manifest.embedding.dim);
    let png = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fmnist/bag-0.png"))?;
    runtime.block_on(async {
        let gallery = Gallery::open(dir.path())?;
        for (chunk_no, chunk) in base.chunks(5_000).enumerate() {
            let items = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    // Distinct bytes per item, as in a real gallery.
                    let mut image = png.clone();
                    image.extend_from_slice(&((chunk_no * 5_000 + i) as u64).to_le_bytes());
                    NewItem {
                        content_hash: lookalike::gallery::content_hash(&image),
                        image: image.into(),
                        media_type: "image/png".into(),
                        width: 28,
                        height: 28,
                        label: None,
                        metadata: json!({}),
                        embedding: v.clone(),
                        unless_stored: false,
                    }
                })
                .collect();
            gallery.insert(items, manifest.model_key(), None).await?;
        }
        anyhow::Ok(())
    })?;
    println!("| service start-up, {N}-item gallery | index | seconds to serving |");
    println!("| --- | --- | --- |");
    for attempt in ["first start: no dump", "second start: after a graceful stop"] {
        let config = lookalike_config(dir.path());
        let started = Instant::now();
        let app = runtime.block_on(lookalike::startup::Application::build(config))?;
        let seconds = started.elapsed().as_secs_f64();
        let source = app.index_startup().source;
        println!("| {attempt} | {source} | {seconds:.1} |");
        runtime.block_on(app.run_until_stopped(async {}))?;
    }
    Ok(())
}

fn lookalike_config(data_dir: &Path) -> lookalike::config::ServeConfig {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: lookalike::config::ServeConfig,
    }
    let args = ["bench", "--port", "0", "--data-dir", data_dir.to_str().unwrap()];
    Wrapper::parse_from(args).serve
}

/// Gallery vectors and query vectors.
type DataSet = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// 100k unit vectors around 1,000 random centres, and held-out queries from the same mixture.
fn clustered(dim: usize) -> DataSet {
    let mut rng = SplitMix(42);
    let centres: Vec<Vec<f32>> = (0..1_000).map(|_| unit((0..dim).map(|_| rng.gaussian()).collect())).collect();
    let sample = |rng: &mut SplitMix| {
        let c = &centres[rng.next() as usize % centres.len()];
        unit(c.iter().map(|x| x + 0.35 * rng.gaussian() / (dim as f32).sqrt()).collect())
    };
    let base = (0..N).map(|_| sample(&mut rng)).collect();
    let queries = (0..QUERIES).map(|_| sample(&mut rng)).collect();
    (base, queries)
}

/// Embeddings of Fashion-MNIST through the bundled model: the 60k training
/// images and 40k of them mirrored make the gallery, test images the queries.
/// Cached under target/bench-index (embedding 101k images takes a minute or two).
fn real_embeddings(manifest: &Manifest) -> anyhow::Result<DataSet> {
    let dim = manifest.embedding.dim;
    let cache = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-index/fmnist-embeddings.cache"));
    if let Ok(bytes) = std::fs::read(&cache) {
        if bytes.len() == (N + QUERIES) * dim * 4 {
            let all = read_f32(&bytes, dim);
            return Ok((all[..N].to_vec(), all[N..].to_vec()));
        }
    }
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    let train = fashion_mnist::load(data, "train")?.images;
    let test = fashion_mnist::load(data, "t10k")?.images;
    let mirrored: Vec<image::GrayImage> =
        train.iter().take(N - train.len()).map(image::imageops::flip_horizontal).collect();
    let images: Vec<&image::GrayImage> = train.iter().chain(&mirrored).chain(test.iter().take(QUERIES)).collect();
    tch::set_num_threads(std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
    let path = Path::new(FASHION_MODEL_DIR).join(lookalike::manifest::ENCODER_FILE);
    let mut encoder = TorchEncoder::load(&path, Device::Cpu, Precision::Fp32, manifest.input.size, dim)?;
    let pre = Preprocessor::new(manifest.input.clone(), ImageLimits { max_side: 64, max_decoded_bytes: 1 << 20 });
    let mut all = Vec::with_capacity(images.len());
    for chunk in images.chunks(256) {
        let mut pixels = Vec::new();
        for img in chunk {
            pixels.extend(pre.prepare_decoded(image::DynamicImage::ImageLuma8((*img).clone()))?);
        }
        all.extend(encoder.encode(&pixels, chunk.len())?);
    }
    let flat: Vec<f32> = all.iter().flatten().copied().collect();
    std::fs::write(&cache, flat.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    Ok((all[..N].to_vec(), all[N..].to_vec()))
}

/// Exact top-k by dot product (the vectors are unit length).
fn brute_force(base: &[Vec<f32>], queries: &[Vec<f32>]) -> Vec<Vec<u32>> {
    queries
        .iter()
        .map(|q| {
            let mut scored: Vec<(f32, u32)> =
                base.iter().enumerate().map(|(i, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum(), i as u32)).collect();
            scored.select_nth_unstable_by(K, |a, b| b.0.total_cmp(&a.0));
            let mut top: Vec<(f32, u32)> = scored[..K].to_vec();
            top.sort_by(|a, b| b.0.total_cmp(&a.0));
            top.into_iter().map(|(_, i)| i).collect()
        })
        .collect()
}

fn recall_at_k(found: &[Vec<u32>], truth: &[Vec<u32>]) -> f64 {
    let hits: usize = found.iter().zip(truth).map(|(f, t)| f.iter().filter(|id| t.contains(id)).count()).sum();
    hits as f64 / (truth.len() * K) as f64
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn walk_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn write_f32(path: &Path, rows: &[Vec<f32>]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for row in rows {
        for x in row {
            file.write_all(&x.to_le_bytes())?;
        }
    }
    file.flush()
}

fn write_truth(path: &Path, rows: &[Vec<u32>]) -> std::io::Result<()> {
    std::fs::write(path, rows.iter().flatten().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
}

fn read_f32(bytes: &[u8], dim: usize) -> Vec<Vec<f32>> {
    let flat: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    flat.chunks(dim).map(<[f32]>::to_vec).collect()
}

/// A small deterministic generator (SplitMix64), so runs compare.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Box-Muller.
    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}
