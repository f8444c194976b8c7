//! Embedding engine: a cheap-clone `Embedder` handle in front of a bounded
//! priority queue, one batcher thread that cuts batches, and one worker thread
//! per model replica (each CUDA device, or the CPU) owning its own encoder.

mod device;
mod encoder;
mod queue;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::Device;
use tokio::sync::{oneshot, Semaphore};

pub use device::{resolve as resolve_devices, CudaInfo, DeviceChoice};
pub use encoder::{Encoder, Precision, TorchEncoder};
pub use queue::{BatchPolicy, Embedded, Priority};

use crate::error_kind::ErrorKind;
use crate::manifest::{Manifest, ENCODER_FILE};
use crate::metrics;
use queue::{Entry, Queue};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("unknown device '{0}': expected auto, cpu or cuda:N[,M...]")]
    UnknownDevice(String),
    #[error("unknown precision '{0}': expected fp32 or fp16")]
    UnknownPrecision(String),
    #[error("cuda:{ordinal} was asked for but libtorch sees {visible} CUDA device(s)")]
    MissingCuda { ordinal: usize, visible: usize },
    #[error("fp16 needs a CUDA device")]
    Fp16NeedsCuda,
    #[error("cannot load the encoder: {0}")]
    Load(String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("the embedding queue is full")]
    Overloaded,
    #[error("the embedding worker has stopped")]
    Stopped,
}

impl EmbedError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Overloaded => ErrorKind::Busy,
            Self::Stopped => ErrorKind::Unavailable,
            Self::UnknownDevice(_)
            | Self::UnknownPrecision(_)
            | Self::MissingCuda { .. }
            | Self::Fp16NeedsCuda
            | Self::Load(_)
            | Self::Forward(_) => ErrorKind::Internal,
        }
    }
}

/// How to start the embedding engine.
#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    pub model_dir: PathBuf,
    pub device: DeviceChoice,
    /// Workers (model copies) per device.
    pub replicas_per_device: usize,
    pub precision: Precision,
    pub policy: BatchPolicy,
    /// libtorch intra-op threads per CPU worker; 0 shares the cores among them.
    pub torch_threads: usize,
}

/// What the engine runs on, for logs and `/health`.
#[derive(Debug, Clone)]
pub struct EmbedderInfo {
    /// Devices, comma-separated (`cpu`, `cuda:0,cuda:1`).
    pub device: String,
    pub workers: usize,
    pub precision: Precision,
    pub cuda: CudaInfo,
    pub model_key: String,
    pub dim: usize,
    pub input_len: usize,
    pub policy: BatchPolicy,
}

/// Cheap-clone handle; the threads stop and are joined when the last one drops.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<Queue>,
    /// Bounds the bulk entries in flight: bulk submitters wait for a slot
    /// instead of being refused.
    bulk_slots: Semaphore,
    threads: Vec<JoinHandle<()>>,
    info: EmbedderInfo,
}

impl Embedder {
    /// Loads one encoder per replica on its own thread, warms each up and
    /// returns once all serve. Blocks: call it from a blocking context.
    pub fn start(config: &EmbedderConfig, manifest: &Manifest) -> Result<Self, EmbedError> {
        configure_interop_threads();
        let cuda = CudaInfo::probe();
        let devices = device::resolve(&config.device, cuda)?;
        let precision = effective_precision(config, &devices)?;
        let replicas = config.replicas_per_device.max(1);
        let cpu_workers = devices.iter().filter(|d| **d == Device::Cpu).count() * replicas;
        let cpu_threads = match config.torch_threads {
            0 => default_torch_threads(cpu_workers),
            n => n,
        };

        let queue = Arc::new(Queue::new(config.policy));
        let policy = queue.policy();
        let input_len = manifest.input.input_len();
        let (handoff, batches) = crossbeam_channel::bounded(0);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for (n, device) in devices.iter().flat_map(|d| std::iter::repeat_n(*d, replicas)).enumerate() {
            let spec = WorkerSpec {
                path: config.model_dir.join(ENCODER_FILE),
                device,
                precision,
                threads: if device == Device::Cpu { cpu_threads } else { 1 },
                size: manifest.input.size,
                dim: manifest.embedding.dim,
                input_len,
                max_batch: policy.max_batch,
            };
            let (queue, batches, ready) = (queue.clone(), batches.clone(), ready_tx.clone());
            let name = format!("embed-{}-{n}", device::describe(device));
            let spawned = std::thread::Builder::new().name(name).spawn(move || spec.run(&queue, batches, ready));
            threads.push(spawned.map_err(|e| EmbedError::Load(format!("cannot spawn a worker thread: {e}")))?);
        }
        drop((batches, ready_tx));
        let started: Result<Vec<()>, EmbedError> = ready_rx.iter().take(threads.len()).collect();
        if let Err(error) = started {
            drop(handoff); // workers that did start see the batcher gone and stop
            for handle in threads {
                let _ = handle.join();
            }
            return Err(error);
        }
        let batcher = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("embed-batcher".into())
                .spawn(move || worker::run_batcher(&queue, handoff, input_len))
                .map_err(|e| EmbedError::Load(format!("cannot spawn the batcher thread: {e}")))?
        };
        threads.push(batcher);

        let names: Vec<String> = devices.iter().map(|d| device::describe(*d)).collect();
        let info = EmbedderInfo {
            device: names.join(","),
            workers: devices.len() * replicas,
            precision,
            cuda,
            model_key: manifest.model_key(),
            dim: manifest.embedding.dim,
            input_len,
            policy,
        };
        let bulk_slots = Semaphore::new(4 * policy.max_batch);
        Ok(Self { inner: Arc::new(Inner { queue, bulk_slots, threads, info }) })
    }

    /// Serves `encoder` on one worker thread under `policy`, with the shapes
    /// of `manifest`: the whole queue and batcher in front of a stand-in for
    /// the TorchScript model (fast tests of what sits above the embedder).
    pub fn with_encoder(
        encoder: impl Encoder + Send + 'static,
        manifest: &Manifest,
        policy: BatchPolicy,
    ) -> Result<Self, EmbedError> {
        let queue = Arc::new(Queue::new(policy));
        let input_len = manifest.input.input_len();
        let (handoff, batches) = crossbeam_channel::bounded(0);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| EmbedError::Load(format!("cannot spawn a thread: {e}")))
        };
        let worker_queue = queue.clone();
        let worker =
            spawn("embed-test-0", Box::new(move || worker::run_worker(encoder, &worker_queue, batches, "cpu")))?;
        let batcher_queue = queue.clone();
        let batcher =
            spawn("embed-batcher", Box::new(move || worker::run_batcher(&batcher_queue, handoff, input_len)))?;
        let info = EmbedderInfo {
            device: "cpu".into(),
            workers: 1,
            precision: Precision::Fp32,
            cuda: CudaInfo { available: false, device_count: 0 },
            model_key: manifest.model_key(),
            dim: manifest.embedding.dim,
            input_len,
            policy: queue.policy(),
        };
        let bulk_slots = Semaphore::new(4 * policy.max_batch);
        Ok(Self { inner: Arc::new(Inner { queue, bulk_slots, threads: vec![worker, batcher], info }) })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.inner.info
    }

    /// Whether every worker and the batcher are still running (a thread that
    /// ended would leave its share of requests unanswered).
    pub fn is_running(&self) -> bool {
        self.inner.threads.iter().all(|thread| !thread.is_finished())
    }

    /// Embeds one preprocessed image. Interactive requests fail fast with
    /// `Overloaded` when the queue is full; bulk ones wait for room.
    pub async fn embed(&self, pixels: Vec<f32>, priority: Priority) -> Result<Embedded, EmbedError> {
        let expected = self.inner.info.input_len;
        if pixels.len() != expected {
            return Err(EmbedError::Forward(format!("input has {} values, expected {expected}", pixels.len())));
        }
        let (reply, answer) = oneshot::channel();
        let entry = Entry { pixels, reply, enqueued: Instant::now(), priority };
        let _slot = match priority {
            Priority::Interactive => None,
            Priority::Bulk => Some(self.inner.bulk_slots.acquire().await.map_err(|_| EmbedError::Stopped)?),
        };
        if let Err(error) = self.inner.queue.push(entry) {
            if matches!(error, EmbedError::Overloaded) {
                metrics::rejected();
            }
            return Err(error);
        }
        answer.await.map_err(|_| EmbedError::Stopped)?
    }
}

/// What one worker thread needs to load and run its encoder.
struct WorkerSpec {
    path: PathBuf,
    device: Device,
    precision: Precision,
    threads: usize,
    size: u32,
    dim: usize,
    input_len: usize,
    max_batch: usize,
}

type Ready = std::sync::mpsc::Sender<Result<(), EmbedError>>;

impl WorkerSpec {
    fn run(self, queue: &Queue, batches: crossbeam_channel::Receiver<worker::Batch>, ready: Ready) {
        // OpenMP's thread count is per calling thread: set it where the forwards run.
        tch::set_num_threads(self.threads as i32);
        let sizes = warm_up_sizes(self.max_batch);
        let loaded = TorchEncoder::load(&self.path, self.device, self.precision, self.size, self.dim).and_then(|enc| {
            // A GPU runs a few padded shapes fast; a CPU gains nothing from padding.
            let mut enc = if self.device == Device::Cpu { enc } else { enc.pad_to(sizes.clone()) };
            warm_up(&mut enc, &sizes, self.input_len).map(|_| enc)
        });
        match loaded {
            Ok(encoder) => {
                let _ = ready.send(Ok(()));
                drop(ready);
                worker::run_worker(encoder, queue, batches, &device::describe(self.device));
            }
            Err(error) => {
                let _ = ready.send(Err(error));
            }
        }
    }
}

/// fp16 needs CUDA. Asked for explicitly on a CPU, that is an error; with
/// `auto` on a machine without a GPU it falls back to fp32, so one
/// configuration serves both kinds of host.
fn effective_precision(config: &EmbedderConfig, devices: &[Device]) -> Result<Precision, EmbedError> {
    let on_cpu = devices.contains(&Device::Cpu);
    match (config.precision, on_cpu, &config.device) {
        (Precision::Fp16, true, DeviceChoice::Auto) => {
            tracing::warn!("fp16 needs CUDA and none is available: running the CPU in fp32");
            Ok(Precision::Fp32)
        }
        (Precision::Fp16, true, _) => Err(EmbedError::Fp16NeedsCuda),
        (precision, _, _) => Ok(precision),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The batcher serves what is queued, then its hand-off closes and the workers end.
        self.queue.close();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Powers of two up to `max_batch`, and `max_batch` itself.
fn warm_up_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(1usize), |n| Some(n * 2)).take_while(|&n| n < max_batch).collect();
    sizes.push(max_batch);
    sizes
}

/// The first calls of a TorchScript module are slow (profiling executor, and
/// cuDNN autotuning on a GPU): run every batch size the worker pads to, twice,
/// before taking traffic.
fn warm_up(encoder: &mut TorchEncoder, sizes: &[usize], input_len: usize) -> Result<(), EmbedError> {
    for _ in 0..2 {
        for &n in sizes {
            encoder.encode(&vec![0.5; n * input_len], n)?;
        }
    }
    Ok(())
}

/// libtorch's inter-op pool can be sized once, before any parallel work. Each
/// worker is already its own thread, so inter-op parallelism would only
/// oversubscribe the cores.
fn configure_interop_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tch::set_num_interop_threads(1));
}

/// Intra-op threads per CPU worker when not configured: every core but one,
/// shared among the workers. The core left over decodes uploads and runs the
/// HTTP front and the store; on 2 cores, giving libtorch both was slower at
/// every concurrency (`make bench-http`) and let an import triple search
/// latency (`make bench-import-latency`), as its threads wait on each other.
fn default_torch_threads(cpu_workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores.saturating_sub(1) / cpu_workers.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(device: DeviceChoice, precision: Precision) -> EmbedderConfig {
        EmbedderConfig {
            model_dir: PathBuf::new(),
            device,
            replicas_per_device: 1,
            precision,
            policy: BatchPolicy { max_batch: 8, max_delay: std::time::Duration::ZERO, capacity: 8, max_bulk_batch: 8 },
            torch_threads: 0,
        }
    }

    #[test]
    fn fp16_needs_cuda_unless_the_device_was_left_to_auto() {
        let cpu = [Device::Cpu];
        let gpu = [Device::Cuda(0)];
        let auto_fp16 = config(DeviceChoice::Auto, Precision::Fp16);
        assert_eq!(effective_precision(&auto_fp16, &cpu).unwrap(), Precision::Fp32);
        assert_eq!(effective_precision(&auto_fp16, &gpu).unwrap(), Precision::Fp16);
        assert!(effective_precision(&config(DeviceChoice::Cpu, Precision::Fp16), &cpu).is_err());
        assert_eq!(effective_precision(&config(DeviceChoice::Cpu, Precision::Fp32), &cpu).unwrap(), Precision::Fp32);
    }

    #[test]
    fn warm_up_covers_powers_of_two_and_the_largest_batch() {
        assert_eq!(warm_up_sizes(1), vec![1]);
        assert_eq!(warm_up_sizes(32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(warm_up_sizes(24), vec![1, 2, 4, 8, 16, 24]);
    }
}
