//! The encoder behind a small synchronous trait, so the worker loop does not
//! care whether it drives TorchScript or a test double.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use super::EmbedError;
use crate::vector::normalized;

/// Maps a batch of preprocessed images to L2-normalised embeddings.
pub trait Encoder {
    /// `pixels` holds `n` images of `input_len` values each, in CHW order.
    fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Numeric precision of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// Half precision: CUDA only; the embeddings come back as f32.
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = EmbedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float32" => Ok(Self::Fp32),
            "fp16" | "half" | "float16" => Ok(Self::Fp16),
            _ => Err(EmbedError::UnknownPrecision(s.to_string())),
        }
    }
}

/// A TorchScript encoder loaded through libtorch on one device.
pub struct TorchEncoder {
    module: CModule,
    device: Device,
    kind: Kind,
    size: i64,
    dim: usize,
    /// Batch sizes to pad to (empty: run every size as it comes).
    buckets: Vec<usize>,
}

impl TorchEncoder {
    pub fn load(path: &Path, device: Device, precision: Precision, size: u32, dim: usize) -> Result<Self, EmbedError> {
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        let kind = match precision {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
        };
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        module.set_eval();
        Ok(Self { module, device, kind, size: size as i64, dim, buckets: Vec::new() })
    }

    /// Pads every batch up to the next of these sizes, so a GPU only ever sees
    /// a few shapes (each warmed up and autotuned once).
    pub fn pad_to(mut self, mut buckets: Vec<usize>) -> Self {
        buckets.sort_unstable();
        self.buckets = buckets;
        self
    }

    fn padded(&self, n: usize) -> usize {
        self.buckets.iter().copied().find(|&b| b >= n).unwrap_or(n)
    }
}

impl Encoder for TorchEncoder {
    fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let padded = self.padded(n);
        let output = tch::no_grad(|| -> Result<Tensor, EmbedError> {
            let mut input = Tensor::from_slice(pixels).view([n as i64, 3, self.size, self.size]);
            if padded > n {
                let zeros = Tensor::zeros([(padded - n) as i64, 3, self.size, self.size], (Kind::Float, Device::Cpu));
                input = Tensor::cat(&[input, zeros], 0);
            }
            let input = input.to_device(self.device).to_kind(self.kind);
            let out = self.module.forward_ts(&[input]).map_err(|e| EmbedError::Forward(e.to_string()))?;
            let out = out.f_narrow(0, 0, n as i64).map_err(|e| EmbedError::Forward(e.to_string()))?;
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
        // Re-normalised (the index relies on unit vectors); NaN or inf is a failed forward.
        let unit = |v: &[f32]| {
            normalized(v).map_err(|_| EmbedError::Forward("the encoder produced a zero or non-finite embedding".into()))
        };
        flat.chunks_exact(self.dim).map(unit).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, BUNDLED_MODEL_DIR, ENCODER_FILE};

    #[test]
    fn parses_precisions() {
        assert_eq!("FP16".parse::<Precision>().unwrap(), Precision::Fp16);
        assert_eq!("fp32".parse::<Precision>().unwrap().to_string(), "fp32");
        assert!("int8".parse::<Precision>().is_err());
    }

    /// The padding a GPU worker applies, run on the CPU: the padded rows must
    /// neither change nor leak into the real ones (BatchNorm is in eval mode).
    #[test]
    fn padding_a_batch_leaves_its_embeddings_unchanged() {
        let manifest = Manifest::load(Path::new(BUNDLED_MODEL_DIR)).unwrap();
        let path = Path::new(BUNDLED_MODEL_DIR).join(ENCODER_FILE);
        let (size, dim, len) = (manifest.input.size, manifest.embedding.dim, manifest.input.input_len());
        let load = || TorchEncoder::load(&path, Device::Cpu, Precision::Fp32, size, dim).unwrap();
        let (mut plain, mut padded) = (load(), load().pad_to(vec![1, 2, 4, 8]));
        let pixels: Vec<f32> = (0..3 * len).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
        let (a, b) = (plain.encode(&pixels, 3).unwrap(), padded.encode(&pixels, 3).unwrap());
        assert_eq!((a.len(), b.len()), (3, 3));
        for (x, y) in a.iter().zip(&b) {
            let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "padding changed an embedding by {diff}");
        }
        assert!(a[0] != a[1], "different images must embed differently");
    }
}
