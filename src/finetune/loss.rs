//! The triplet loss with online mining, on a batch of unit embeddings, and
//! the check that stops a run whose loss is no longer a number.

use tch::{Kind, Tensor};

use super::params::Mining;
use super::train::TrainError;

/// Euclidean distances between rows of unit vectors.
fn pairwise_distance(e: &Tensor) -> Tensor {
    let similarity = e.matmul(&e.tr());
    (similarity * -2.0 + 2.0).clamp_min(1e-12).sqrt()
}

/// The triplet loss `max(d(a,p) - d(a,n) + margin, 0)` over the batch's
/// mined triplets, and the share of candidate triplets that violate the margin.
///
/// - `batch_hard`: per anchor, its farthest positive and nearest negative.
/// - `semi_hard` (FaceNet): per anchor-positive pair, the nearest negative
///   that is still farther than the positive; when there is none, the
///   farthest negative. Avoids the collapse batch-hard can cause.
/// - `batch_all`: every valid triplet, averaged over those with a positive loss.
pub fn triplet_loss(e: &Tensor, labels: &Tensor, margin: f64, mining: Mining) -> (Tensor, f64) {
    let d = pairwise_distance(e);
    let n = labels.size()[0];
    let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    let eye = Tensor::eye(n, (Kind::Bool, e.device()));
    let positive = same.logical_and(&eye.logical_not());
    let negative = same.logical_not();
    // (a, p, n): d(a,p) - d(a,n) + margin, and which triplets are valid.
    let gap = d.unsqueeze(2) - d.unsqueeze(1) + margin;
    let valid = positive.unsqueeze(2).logical_and(&negative.unsqueeze(1));
    let violated = gap.gt(0.0).logical_and(&valid).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
    let active = violated / valid.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]).max(1.0);
    let loss = match mining {
        Mining::BatchAll => {
            let losses = gap.clamp_min(0.0) * valid.to_kind(Kind::Float);
            losses.sum(Kind::Float) / (violated.max(1.0))
        }
        Mining::BatchHard => {
            let hardest_positive = (&d * positive.to_kind(Kind::Float)).amax([1i64].as_slice(), false);
            let hardest_negative = d.masked_fill(&negative.logical_not(), f64::INFINITY).amin([1i64].as_slice(), false);
            let has_both = positive.any_dim(1, false).logical_and(&negative.any_dim(1, false)).to_kind(Kind::Float);
            let losses = (hardest_positive - hardest_negative + margin).clamp_min(0.0) * &has_both;
            losses.sum(Kind::Float) / has_both.sum(Kind::Float).clamp_min(1.0)
        }
        Mining::SemiHard => {
            let d_ap = d.unsqueeze(2);
            let d_an = d.unsqueeze(1).expand([n, n, n], false);
            let semi_hard = valid.logical_and(&d_an.gt_tensor(&d_ap));
            let nearest_semi_hard =
                d_an.masked_fill(&semi_hard.logical_not(), f64::INFINITY).amin([2i64].as_slice(), false);
            let farthest = d_an.masked_fill(&valid.logical_not(), f64::NEG_INFINITY).amax([2i64].as_slice(), false);
            let has_semi_hard = semi_hard.any_dim(2, false);
            let chosen = nearest_semi_hard.where_self(&has_semi_hard, &farthest);
            let pairs = positive.logical_and(&negative.any_dim(1, true)).to_kind(Kind::Float);
            let losses = (&d - chosen.nan_to_num(0.0, 0.0, 0.0) + margin).clamp_min(0.0) * &pairs;
            losses.sum(Kind::Float) / pairs.sum(Kind::Float).clamp_min(1.0)
        }
    };
    (loss, active)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit vectors at the given angles (radians) on a circle.
    fn on_circle(angles: &[f64]) -> Tensor {
        let flat: Vec<f32> = angles.iter().flat_map(|a| [a.cos() as f32, a.sin() as f32]).collect();
        Tensor::from_slice(&flat).view([angles.len() as i64, 2])
    }

    fn chord(angle: f64) -> f64 {
        2.0 * (angle / 2.0).sin()
    }

    fn loss(e: &Tensor, labels: &[i64], mining: Mining) -> f64 {
        triplet_loss(e, &Tensor::from_slice(labels), 0.2, mining).0.double_value(&[])
    }

    #[test]
    fn well_separated_classes_cost_nothing() {
        let e = on_circle(&[0.0, 0.05, 3.0, 3.05]);
        for mining in [Mining::BatchAll, Mining::BatchHard, Mining::SemiHard] {
            assert!(loss(&e, &[0, 0, 1, 1], mining).abs() < 1e-6, "{mining:?}");
        }
    }

    #[test]
    fn batch_hard_takes_the_farthest_positive_and_nearest_negative() {
        // Anchor 0 at 0 rad; its positive at 0.6; a negative at 0.3 (closer than the positive).
        let e = on_circle(&[0.0, 0.6, 0.3, 3.0]);
        let labels = [0, 0, 1, 1];
        let d = |a: f64, b: f64| chord((a - b).abs());
        let per_anchor = [
            (d(0.0, 0.6) - d(0.0, 0.3) + 0.2).max(0.0),
            (d(0.6, 0.0) - d(0.6, 0.3) + 0.2).max(0.0),
            (d(0.3, 3.0) - d(0.3, 0.0) + 0.2).max(0.0),
            (d(3.0, 0.3) - d(3.0, 0.6) + 0.2).max(0.0),
        ];
        let expected = per_anchor.iter().sum::<f64>() / 4.0;
        assert!((loss(&e, &labels, Mining::BatchHard) - expected).abs() < 1e-5);
    }

    #[test]
    fn semi_hard_prefers_a_negative_beyond_the_positive() {
        // Anchor 0 at 0; positive at 0.2; negatives at 0.1 (hard) and 0.3 (semi-hard).
        let e = on_circle(&[0.0, 0.2, 0.1, 0.3]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let (semi, _) = triplet_loss(&e, &labels, 0.2, Mining::SemiHard);
        let (hard, _) = triplet_loss(&e, &labels, 0.2, Mining::BatchHard);
        assert!(semi.double_value(&[]) > 0.0);
        assert!(semi.double_value(&[]) < hard.double_value(&[]), "semi-hard negatives are easier than the hardest");
        // Pair (0, 1): semi-hard negative is 0.3 -> d(0,0.2) - d(0,0.3) + 0.2.
        let expected_01 = chord(0.2) - chord(0.3) + 0.2;
        assert!(expected_01 > 0.0);
    }

    #[test]
    fn loss_has_gradients_for_training() {
        let e = on_circle(&[0.0, 0.6, 0.3, 3.0]).set_requires_grad(true);
        let (l, active) = triplet_loss(&e, &Tensor::from_slice(&[0i64, 0, 1, 1]), 0.2, Mining::SemiHard);
        l.backward();
        assert!(active > 0.0);
        assert!(e.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

/// `value` if it is a finite number, else the `Diverged` error that stops a
/// run before a NaN reaches the weights.
pub fn finite(what: &'static str, value: f64, epoch: usize, step: usize) -> Result<f64, TrainError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(TrainError::Diverged { what, value, epoch, step })
    }
}

#[cfg(test)]
mod finite_tests {
    use super::*;

    #[test]
    fn a_loss_or_figure_that_is_not_a_number_stops_the_run() {
        assert_eq!(finite("loss", 0.25, 1, 1).unwrap(), 0.25);
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let error = finite("loss", value, 2, 7).unwrap_err().to_string();
            assert!(error.contains("diverged") && error.contains("epoch 2, step 7"), "{error}");
        }
    }
}
