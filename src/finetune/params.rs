//! The parameters of `POST /admin/finetune`, with their defaults and ranges.

use serde::{Deserialize, Serialize};

/// How triplets are chosen within a PK batch (see `train::triplet_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mining {
    SemiHard,
    BatchHard,
    BatchAll,
}

/// The validation metric that picks the best epoch and decides whether the
/// result beats the active model (the other one breaks ties).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectBy {
    /// Ranks every held-out item's whole label: moves smoothly even with a
    /// few dozen held-out items, where Recall@1 moves in steps of 1/n.
    MapAtR,
    #[serde(rename = "recall_at_1")]
    RecallAt1,
}

impl std::fmt::Display for SelectBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MapAtR => "MAP@R",
            Self::RecallAt1 => "Recall@1",
        })
    }
}

/// When a trained encoder becomes a new active version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Commit {
    /// Only when it beats the active model on validation (`select_by`).
    IfBetter,
    /// Whatever validation says (the best epoch, or the last when none was better).
    Always,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneParams {
    /// Passes over the training images (at most; early stopping may end sooner).
    pub epochs: usize,
    /// Steps per epoch; by default enough PK batches to see every training image
    /// once, and at least 10 (few-shot galleries).
    pub steps_per_epoch: Option<usize>,
    pub learning_rate: f64,
    /// Triplet margin, in Euclidean distance between unit embeddings (0 to 2).
    pub margin: f64,
    pub mining: Mining,
    /// Labels per batch.
    pub p: usize,
    /// Images per label per batch.
    pub k: usize,
    /// Train on these labels only (default: every label with two or more images).
    pub labels: Option<Vec<String>>,
    /// Share of each label's images held out to validate (at least two per label stay to train).
    pub validation_fraction: f64,
    pub seed: u64,
    /// Epochs without a better validation before training stops.
    pub patience: usize,
    /// Most labelled images used (drawn at random beyond it); bounds memory and time.
    pub max_images: usize,
    /// Train on random views (resized crops, flips, colour jitter, greyscale).
    pub augment: bool,
    /// Share of the encoder's weights, from the input side, kept fixed (0: train them all).
    pub freeze: f64,
    /// Augmented views of each held-out image that validation also queries with
    /// (0: the held-out images only).
    pub validation_views: usize,
    pub commit: Commit,
    pub select_by: SelectBy,
}

impl Default for FinetuneParams {
    fn default() -> Self {
        Self {
            epochs: 30,
            steps_per_epoch: None,
            learning_rate: 3e-4,
            margin: 0.2,
            mining: Mining::SemiHard,
            p: 8,
            k: 8,
            labels: None,
            validation_fraction: 0.2,
            seed: 0,
            patience: 6,
            max_images: 20_000,
            augment: true,
            freeze: 0.0,
            validation_views: 4,
            commit: Commit::IfBetter,
            select_by: SelectBy::MapAtR,
        }
    }
}

impl FinetuneParams {
    /// A request body (a JSON object; empty or blank for the defaults) over the
    /// model's own defaults (`finetune_defaults` in its manifest), over ours.
    pub fn from_request(
        body: &[u8],
        model_defaults: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, serde_json::Error> {
        let mut merged = model_defaults.clone();
        if !body.iter().all(u8::is_ascii_whitespace) {
            let request: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
            merged.extend(request);
        }
        serde_json::from_value(serde_json::Value::Object(merged))
    }

    /// Whether a manifest's `finetune_defaults` make valid parameters on their
    /// own, so a mistake there is refused at start, not blamed on every request.
    pub fn model_defaults_hold(defaults: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        let params = Self::from_request(b"", defaults).map_err(|e| e.to_string())?;
        params.validate().map_err(|e| e.to_string())
    }

    /// Checks ranges; the message names the offending field.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        let check = |ok: bool, rule: &'static str| if ok { Ok(()) } else { Err(InvalidParams(rule)) };
        check((1..=1000).contains(&self.epochs), "epochs must be between 1 and 1000")?;
        check(
            self.steps_per_epoch.is_none_or(|s| (1..=100_000).contains(&s)),
            "steps_per_epoch must be between 1 and 100000",
        )?;
        check(
            self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= 1.0,
            "learning_rate must be above 0 and at most 1",
        )?;
        check(
            self.margin.is_finite() && self.margin > 0.0 && self.margin <= 2.0,
            "margin must be above 0 and at most 2",
        )?;
        check((2..=64).contains(&self.p), "p must be between 2 and 64")?;
        check((2..=64).contains(&self.k), "k must be between 2 and 64")?;
        check(
            self.p * self.k <= MAX_BATCH,
            "p * k (the batch size) must be at most 256: the triplet loss holds batch^3 values per tensor",
        )?;
        check(
            self.validation_fraction.is_finite() && (0.0..=0.5).contains(&self.validation_fraction),
            "validation_fraction must be between 0 and 0.5",
        )?;
        check((1..=100).contains(&self.patience), "patience must be between 1 and 100")?;
        check((4..=200_000).contains(&self.max_images), "max_images must be between 4 and 200000")?;
        check(self.labels.as_ref().is_none_or(|l| !l.is_empty()), "labels, when given, must not be empty")?;
        check(self.freeze.is_finite() && (0.0..1.0).contains(&self.freeze), "freeze must be at least 0 and below 1")?;
        check(self.validation_views <= 16, "validation_views must be between 0 and 16")?;
        Ok(())
    }
}

/// Largest P x K batch. The triplet loss builds [n, n, n] tensors (gaps,
/// masks and their gradients): 64 MiB each at 256, 4 GiB each at 1,024.
pub const MAX_BATCH: usize = 256;

/// A parameter out of its range: the rule it broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParams(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_are_enforced() {
        assert!(FinetuneParams::default().validate().is_ok());
        let bad = FinetuneParams { learning_rate: 0.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().0.contains("learning_rate"));
        let bad = FinetuneParams { p: 32, k: 32, ..Default::default() };
        assert!(bad.validate().unwrap_err().0.starts_with("p * k"));
        let bad = FinetuneParams { p: 1, ..Default::default() };
        assert!(bad.validate().unwrap_err().0.starts_with("p "));
        let parsed: FinetuneParams = serde_json::from_str(r#"{"epochs": 3, "mining": "batch_hard"}"#).unwrap();
        assert_eq!((parsed.epochs, parsed.mining, parsed.k), (3, Mining::BatchHard, 8));
        assert!(serde_json::from_str::<FinetuneParams>(r#"{"epoch": 3}"#).is_err(), "unknown fields are refused");
        let by_recall: FinetuneParams = serde_json::from_str(r#"{"select_by": "recall_at_1"}"#).unwrap();
        assert_eq!(by_recall.select_by, SelectBy::RecallAt1);
    }

    fn object(json: &str) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_request_lies_over_the_model_defaults_which_lie_over_ours() {
        let model = object(r#"{"freeze": 0.6, "epochs": 8}"#);
        let empty = FinetuneParams::from_request(b" \n", &model).unwrap();
        assert_eq!((empty.freeze, empty.epochs, empty.k), (0.6, 8, 8), "model defaults, then ours");
        let request = FinetuneParams::from_request(br#"{"epochs": 2, "freeze": 0}"#, &model).unwrap();
        assert_eq!((request.freeze, request.epochs), (0.0, 2), "the request wins");
        let cleared =
            FinetuneParams::from_request(br#"{"steps_per_epoch": null}"#, &object(r#"{"steps_per_epoch": 5}"#));
        assert_eq!(cleared.unwrap().steps_per_epoch, None, "null clears a model default");
        let unknown = FinetuneParams::from_request(br#"{"epoch": 2}"#, &model).unwrap_err();
        assert_eq!(unknown.classify(), serde_json::error::Category::Data, "an unknown field is a 422, not a 400");
        let syntax = FinetuneParams::from_request(b"{", &model).unwrap_err();
        assert_eq!(syntax.classify(), serde_json::error::Category::Eof);
        let not_object = FinetuneParams::from_request(b"[1]", &model).unwrap_err();
        assert_eq!(not_object.classify(), serde_json::error::Category::Data);
    }

    #[test]
    fn broken_model_defaults_are_caught_before_any_request() {
        assert!(FinetuneParams::model_defaults_hold(&object(r#"{"freeze": 0.6}"#)).is_ok());
        assert!(FinetuneParams::model_defaults_hold(&object(r#"{"freez": 0.6}"#)).unwrap_err().contains("freez"));
        assert!(FinetuneParams::model_defaults_hold(&object(r#"{"freeze": 1.5}"#)).unwrap_err().contains("freeze"));
    }
}
