//! The model folder's `manifest.json`: how to preprocess images for the encoder
//! and what it outputs. The service reads it and never guesses.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default model folder: the bundled general encoder (colour images of any
/// kind), found relative to the crate so `make run` and the tests work from a
/// fresh clone without configuration.
pub const BUNDLED_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default");

/// The bundled Fashion-MNIST encoder (28 px grey clothes), for that domain and
/// for tests whose fixtures are Fashion-MNIST images: `--model models/fashion-mnist`.
pub const FASHION_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion-mnist");

/// The TorchScript encoder's file name inside a model folder, beside `manifest.json`.
pub const ENCODER_FILE: &str = "encoder.pt";

/// The manifest format this build understands.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid manifest {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("manifest {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub trained: bool,
    pub input: InputSpec,
    pub embedding: EmbeddingSpec,
    /// Cosine similarity above which two images are "the same"; set by evaluation.
    #[serde(default)]
    pub verification_threshold: Option<f32>,
    /// Cosine distance within which an upload is flagged as a near duplicate,
    /// calibrated by evaluation (at most 1% of distinct class-mate pairs within
    /// it); absent where the model does not separate copies from class-mates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_duplicate_distance: Option<f32>,
    /// Defaults of `POST /admin/finetune` that suit this model (any field of the
    /// request, for example a higher `freeze` for a large pretrained backbone);
    /// the request's own fields win.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub finetune_defaults: serde_json::Map<String, serde_json::Value>,
    /// Everything else (architecture, training, evaluation) is kept for display.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    /// Square side, in pixels, of the encoder's input.
    pub size: u32,
    pub channels: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: ResizePolicy,
    pub filter: ResizeFilter,
}

/// How an image of any shape becomes a `size` x `size` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Scale both sides to `size`, ignoring the aspect ratio.
    Stretch,
    /// Crop the largest centred square, then scale it.
    CenterCrop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingSpec {
    pub dim: usize,
    pub metric: String,
    pub normalized: bool,
}

impl InputSpec {
    /// Number of `f32` values in one preprocessed image (3 x size x size).
    pub fn input_len(&self) -> usize {
        3 * (self.size as usize).pow(2)
    }
}

impl Manifest {
    /// The near-duplicate distance the model's evaluation calibrated on
    /// held-out copies (at most 1% of distinct class-mate pairs within it),
    /// whether or not uploads use it by default (`near_duplicate_distance`).
    pub fn calibrated_copy_distance(&self) -> Option<f32> {
        let distance = self.extra.get("evaluation")?.get("near_duplicate")?.get("distance")?.as_f64()?;
        Some(distance as f32).filter(|d| *d > 0.0)
    }

    /// Reads and checks `manifest.json` in `model_dir`.
    pub fn load(model_dir: &Path) -> Result<Self, ManifestError> {
        let path = model_dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| ManifestError::Read { path: path.clone(), source })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path: path.clone(), source })?;
        manifest.validate().map_err(|reason| ManifestError::Invalid { path, reason })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format_version != MANIFEST_FORMAT {
            return Err(format!("format_version {} (this build reads {MANIFEST_FORMAT})", self.format_version));
        }
        if self.input.channels != 3 {
            return Err(format!("input.channels must be 3, got {}", self.input.channels));
        }
        if self.input.size == 0 || self.input.size > 1024 {
            return Err(format!("input.size {} out of range 1..=1024", self.input.size));
        }
        if self.input.std.iter().any(|s| *s <= 0.0) {
            return Err("input.std must be positive".into());
        }
        if self.embedding.dim == 0 || self.embedding.metric != "cosine" || !self.embedding.normalized {
            return Err("embedding must be a non-empty, L2-normalised cosine embedding".into());
        }
        Ok(())
    }

    /// The key under which embeddings of this model are stored: embeddings of
    /// different models are never mixed.
    pub fn model_key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}
