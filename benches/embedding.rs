//! Embedding throughput, side by side in one run: the raw libtorch forward at
//! every batch size, the service's embedding path (queue, batcher, workers)
//! under saturating load, and preprocessing on its own.
//!
//!     make bench-embed                      # CPU, the bundled model
//!     cargo bench --bench embedding -- --device cuda:0 --precision fp16 --batches 1,2,4,8,16,32,64,128,256
//!
//! Prints a Markdown table; nothing here asserts: targets are read off it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use lookalike::embed::{
    BatchPolicy, DeviceChoice, Embedder, EmbedderConfig, Encoder, Precision, Priority, TorchEncoder,
};
use lookalike::manifest::Manifest;
use lookalike::manifest::BUNDLED_MODEL_DIR;
use lookalike::preprocess::{ImageLimits, PreprocessPool, Preprocessor};
use tch::Device;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = BUNDLED_MODEL_DIR)]
    model: PathBuf,
    /// One device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "fp32")]
    precision: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64")]
    batches: Vec<usize>,
    /// Seconds measured per row.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Skip the preprocessing rows (the GPU check only wants the encoder).
    #[arg(long)]
    no_preprocess: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let manifest = Manifest::load(&args.model)?;
    let choice: DeviceChoice = args.device.parse()?;
    let device = match choice {
        DeviceChoice::Cuda(ref ordinals) if ordinals.len() == 1 => Device::Cuda(ordinals[0]),
        DeviceChoice::Cpu => Device::Cpu,
        _ => anyhow::bail!("give one device: cpu or cuda:N"),
    };
    let precision: Precision = args.precision.parse()?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let duration = Duration::from_secs_f64(args.seconds);

    println!(
        "model {} ({} px), device {}, {precision}, {cores} cores\n",
        manifest.model_key(),
        manifest.input.size,
        args.device
    );
    println!("| path | batch | images/s | ms per batch |");
    println!("| --- | --- | --- | --- |");
    let input_len = manifest.input.input_len();
    // The raw sweep runs on its own thread, which ends before the service
    // starts: libgomp throttles its spin-waits once more OpenMP threads are
    // alive than there are cores, so a lingering team would slow the service.
    let best = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<(usize, f64)> {
                tch::set_num_threads(if device == Device::Cpu { cores as i32 } else { 1 });
                let (size, dim) = (manifest.input.size, manifest.embedding.dim);
                let mut encoder = TorchEncoder::load(
                    &args.model.join(lookalike::manifest::ENCODER_FILE),
                    device,
                    precision,
                    size,
                    dim,
                )?;
                let mut best = (0, 0.0);
                for &batch in &args.batches {
                    let rate = raw_forward(&mut encoder, batch, input_len, duration)?;
                    println!("| raw libtorch forward | {batch} | {rate:.0} | {:.2} |", batch as f64 / rate * 1e3);
                    if rate > best.1 {
                        best = (batch, rate);
                    }
                }
                Ok(best)
            })
            .join()
            .expect("the raw benchmark thread panicked")
    })?;

    let config = EmbedderConfig {
        model_dir: args.model.clone(),
        device: choice,
        replicas_per_device: 1,
        precision,
        policy: BatchPolicy {
            max_batch: best.0,
            max_delay: Duration::from_millis(1),
            capacity: 64 * best.0,
            max_bulk_batch: best.0,
        },
        torch_threads: 0,
    };
    let embedder = Embedder::start(&config, &manifest)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (rate, mean_batch) = runtime.block_on(saturate(&embedder, 4 * best.0, duration));
    println!("| service embedding path, saturated | {mean_batch:.1} (max {}) | {rate:.0} | |", best.0);
    drop(embedder);

    if !args.no_preprocess {
        let preprocessor =
            Preprocessor::new(manifest.input.clone(), ImageLimits { max_side: 8192, max_decoded_bytes: 256 << 20 });
        for (name, bytes) in sample_images()? {
            let one = preprocess_rate(&preprocessor, &bytes, duration)?;
            let pool = PreprocessPool::new(preprocessor.clone(), 0);
            let all = runtime.block_on(pool_rate(&pool, bytes.clone(), 4 * cores, duration));
            println!("| preprocess {name}, 1 thread | 1 | {one:.0} | {:.3} |", 1e3 / one);
            println!("| preprocess {name}, pool of {cores} | 1 | {all:.0} | |");
        }
    }
    println!(
        "\nservice path / best raw forward (batch {}): {:.0} / {:.0} images/s = {:.0}%",
        best.0,
        rate,
        best.1,
        100.0 * rate / best.1
    );
    Ok(())
}

/// Images per second of back-to-back forwards at one batch size.
fn raw_forward(encoder: &mut TorchEncoder, batch: usize, input_len: usize, duration: Duration) -> anyhow::Result<f64> {
    let pixels: Vec<f32> = (0..batch * input_len).map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5).collect();
    for _ in 0..3 {
        encoder.encode(&pixels, batch)?;
    }
    let started = Instant::now();
    let mut images = 0;
    while started.elapsed() < duration {
        encoder.encode(&pixels, batch)?;
        images += batch;
    }
    Ok(images as f64 / started.elapsed().as_secs_f64())
}

/// Keeps `clients` embeddings in flight for `duration`; images/s and the mean batch size.
async fn saturate(embedder: &Embedder, clients: usize, duration: Duration) -> (f64, f64) {
    let input_len = embedder.info().input_len;
    let done = Arc::new(AtomicBool::new(false));
    let images = Arc::new(AtomicUsize::new(0));
    let batch_sum = Arc::new(AtomicUsize::new(0));
    // Warm the path, then measure.
    let _ = embedder.embed(vec![0.1; input_len], Priority::Interactive).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (embedder, done, images, batch_sum) =
                (embedder.clone(), done.clone(), images.clone(), batch_sum.clone());
            tokio::spawn(async move {
                let pixels = vec![c as f32 / clients as f32; input_len];
                while !done.load(Ordering::Relaxed) {
                    if let Ok(e) = embedder.embed(pixels.clone(), Priority::Interactive).await {
                        images.fetch_add(1, Ordering::Relaxed);
                        batch_sum.fetch_add(e.batch_size, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    done.store(true, Ordering::Relaxed);
    let (counted, batched) = (images.load(Ordering::Relaxed), batch_sum.load(Ordering::Relaxed));
    let elapsed = started.elapsed();
    for task in tasks {
        let _ = task.await;
    }
    // Each image reports the size of its batch: this is the image-weighted mean.
    let mean_batch = batched as f64 / counted.max(1) as f64;
    (counted as f64 / elapsed.as_secs_f64(), mean_batch)
}

fn preprocess_rate(pre: &Preprocessor, bytes: &[u8], duration: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut images = 0;
    while started.elapsed() < duration {
        pre.prepare(bytes)?;
        images += 1;
    }
    Ok(images as f64 / started.elapsed().as_secs_f64())
}

async fn pool_rate(pool: &PreprocessPool, bytes: Bytes, clients: usize, duration: Duration) -> f64 {
    let started = Instant::now();
    let images = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (pool, bytes, images) = (pool.clone(), bytes.clone(), images.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    if pool.prepare(bytes.clone(), Priority::Interactive).await.is_ok() {
                        images.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    images.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// A Fashion-MNIST PNG as uploaded in the tests, and a phone-sized JPEG.
fn sample_images() -> anyhow::Result<Vec<(&'static str, Bytes)>> {
    let png = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fmnist/tshirt-0.png"))?;
    let photo = image::RgbImage::from_fn(1280, 960, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(photo).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)?;
    Ok(vec![("28x28 PNG", Bytes::from(png)), ("1280x960 JPEG", Bytes::from(jpeg))])
}
