//! Decision thresholds calibrated on normal images' scores.

use crate::{Error, Result};

/// Threshold that about `rate` of the normal `scores` exceed: the value with
/// `floor(rate * n)` scores strictly above it.
pub fn calibrate(scores: &[f64], rate: f64) -> Result<f64> {
    if scores.is_empty() {
        return Err(Error::InvalidArgument(
            "no normal training scores to calibrate a threshold on".into(),
        ));
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let above = ((rate * sorted.len() as f64).floor() as usize).min(sorted.len() - 1);
    Ok(sorted[above])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_threshold_flags_about_one_percent() {
        let scores: Vec<f64> = (0..200).map(f64::from).collect();
        let t = calibrate(&scores, 0.01).unwrap();
        assert_eq!(scores.iter().filter(|&&s| s > t).count(), 2);
        // Fewer than 100 images: none of them is flagged.
        assert_eq!(calibrate(&[3.0, 1.0, 2.0], 0.01).unwrap(), 3.0);
        assert!(calibrate(&[], 0.01).is_err());
    }
}
