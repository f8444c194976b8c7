//! Vector maths on embeddings, shared by the encoder, the index and the catalog.
//! Embeddings are unit length, so cosine similarity is a dot product.

/// The vector is zero or holds NaN or infinity: it has no direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the vector is zero or not finite")]
pub struct NotFinite;

/// `v` scaled to unit length; refuses vectors without a direction.
pub fn normalized(v: &[f32]) -> Result<Vec<f32>, NotFinite> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(NotFinite);
    }
    Ok(v.iter().map(|x| x / norm).collect())
}

/// Cosine similarity of two unit vectors, -1 to 1.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>().clamp(-1.0, 1.0)
}

/// Euclidean distance between two unit vectors of cosine similarity
/// `similarity`, 0 to 2: what training measures.
pub fn unit_distance(similarity: f32) -> f32 {
    (2.0 - 2.0 * similarity).max(0.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_measures() {
        let v = normalized(&[3.0, 4.0]).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(&[0.0, 0.0]), Err(NotFinite));
        assert_eq!(normalized(&[f32::NAN, 1.0]), Err(NotFinite));
        assert!((cosine(&v, &v) - 1.0).abs() < 1e-6);
        assert!((unit_distance(0.0) - 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(unit_distance(1.0), 0.0);
    }
}
