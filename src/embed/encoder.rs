//! The encoder behind a small synchronous trait, so the worker loop does not
//! care whether it drives TorchScript or a test double.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use super::EmbedError;

/// Maps a batch of preprocessed images to L2-normalised embeddings.
pub trait Encoder {
    /// `pixels` holds `n` images of `input_len` values each, in CHW order.
    fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// A TorchScript encoder loaded through libtorch on one device.
pub struct TorchEncoder {
    module: CModule,
    device: Device,
    size: i64,
    dim: usize,
}

impl TorchEncoder {
    pub fn load(path: &Path, device: Device, size: u32, dim: usize) -> Result<Self, EmbedError> {
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        module.set_eval();
        Ok(Self { module, device, size: size as i64, dim })
    }
}

impl Encoder for TorchEncoder {
    fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let output = tch::no_grad(|| -> Result<Tensor, EmbedError> {
            let input = Tensor::from_slice(pixels).view([n as i64, 3, self.size, self.size]).to_device(self.device);
            let out = self.module.forward_ts(&[input]).map_err(|e| EmbedError::Forward(e.to_string()))?;
            Ok(out.to_device(Device::Cpu).to_kind(Kind::Float).contiguous())
        })?;
        if output.size() != [n as i64, self.dim as i64] {
            return Err(EmbedError::Forward(format!(
                "encoder returned shape {:?}, expected [{n}, {}]",
                output.size(),
                self.dim
            )));
        }
        let flat = Vec::<f32>::try_from(output.view([-1])).map_err(|e| EmbedError::Forward(e.to_string()))?;
        flat.chunks_exact(self.dim).map(normalized).collect()
    }
}

/// Re-normalises an embedding (the index relies on unit vectors) and rejects NaN/inf.
pub fn normalized(v: &[f32]) -> Result<Vec<f32>, EmbedError> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(EmbedError::Forward("the encoder produced a zero or non-finite embedding".into()));
    }
    Ok(v.iter().map(|x| x / norm).collect())
}
