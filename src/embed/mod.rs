//! Embedding engine: a cheap-clone `Embedder` handle in front of a bounded
//! queue and a worker thread that owns the TorchScript encoder.

mod device;
mod encoder;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub use device::{CudaInfo, DeviceChoice};
pub use encoder::{normalized, Encoder, TorchEncoder};

use crate::manifest::Manifest;
use worker::Job;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("device: {0}")]
    Device(String),
    #[error("cannot load the encoder: {0}")]
    Load(String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("the embedding queue is full")]
    Overloaded,
    #[error("the embedding worker has stopped")]
    Stopped,
}

/// How to start the embedding engine.
#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    pub model_dir: PathBuf,
    pub device: DeviceChoice,
    pub max_batch: usize,
    /// Jobs that may wait; beyond this `embed` fails fast with `Overloaded`.
    pub queue_capacity: usize,
    /// libtorch intra-op threads; 0 means one per core.
    pub torch_threads: usize,
}

/// What the engine runs on, for logs and `/health`.
#[derive(Debug, Clone)]
pub struct EmbedderInfo {
    pub device: String,
    pub cuda: CudaInfo,
    pub model_key: String,
    pub dim: usize,
    pub input_len: usize,
}

/// Cheap-clone handle; the worker thread stops and is joined when the last one drops.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    info: EmbedderInfo,
}

impl Embedder {
    /// Loads the encoder on its own thread, warms it up and returns once it
    /// serves. Blocks: call it from a blocking context.
    pub fn start(config: &EmbedderConfig, manifest: &Manifest) -> Result<Self, EmbedError> {
        configure_torch_threads(config.torch_threads);
        let cuda = CudaInfo::probe();
        let device = device::resolve(config.device, cuda)?;
        let size = manifest.input.size;
        let input_len = manifest.input.input_len();
        let dim = manifest.embedding.dim;
        let max_batch = config.max_batch.max(1);
        let path = config.model_dir.join("encoder.pt");
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name(format!("embed-{}", device::describe(device)))
            .spawn(move || {
                let loaded = TorchEncoder::load(&path, device, size, dim)
                    .and_then(|mut enc| warm_up(&mut enc, max_batch, input_len).map(|_| enc));
                match loaded {
                    Ok(encoder) => {
                        let _ = ready_tx.send(Ok(()));
                        worker::run(encoder, rx, max_batch, input_len);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| EmbedError::Load(format!("cannot spawn the worker thread: {e}")))?;
        ready_rx.recv().map_err(|_| EmbedError::Stopped)??;
        let info =
            EmbedderInfo { device: device::describe(device), cuda, model_key: manifest.model_key(), dim, input_len };
        Ok(Self { inner: Arc::new(Inner { jobs: Some(tx), worker: Some(worker), info }) })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.inner.info
    }

    /// Embeds one preprocessed image. Fails fast when the queue is full.
    pub async fn embed(&self, pixels: Vec<f32>) -> Result<Vec<f32>, EmbedError> {
        if pixels.len() != self.inner.info.input_len {
            return Err(EmbedError::Forward(format!(
                "input has {} values, expected {}",
                pixels.len(),
                self.inner.info.input_len
            )));
        }
        let (reply, answer) = oneshot::channel();
        let jobs = self.inner.jobs.as_ref().expect("the job sender lives until drop; this is a bug");
        jobs.try_send(Job { pixels, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EmbedError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => EmbedError::Stopped,
        })?;
        answer.await.map_err(|_| EmbedError::Stopped)?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the worker's loop; then wait for it.
        self.jobs.take();
        if let Some(handle) = self.worker.take() {
            let _ = handle.join();
        }
    }
}

/// The first calls of a TorchScript module are slow (profiling executor): run
/// the batch sizes the worker will see before taking traffic.
fn warm_up(encoder: &mut TorchEncoder, max_batch: usize, input_len: usize) -> Result<(), EmbedError> {
    for n in [1, max_batch, 1, max_batch] {
        encoder.encode(&vec![0.5; n * input_len], n).map(|_| ())?;
    }
    Ok(())
}

/// libtorch's thread pools can be sized once, before any parallel work.
fn configure_torch_threads(requested: usize) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = if requested == 0 { cores } else { requested };
        tch::set_num_threads(threads as i32);
        // One worker drives the CPU; inter-op parallelism would only oversubscribe it.
        tch::set_num_interop_threads(1);
    });
}
