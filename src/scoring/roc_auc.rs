//! Exact image-level ROC AUC, equal to scikit-learn's `roc_auc_score`: the probability that an
//! anomalous input scores higher than a normal one, ties counted as 1/2 (Mann-Whitney U with
//! average ranks), computed on the host in O(n log n).

use crate::{Error, Result};

/// ROC AUC of `scores` against binary `labels` (1 = anomalous, the positive class).
pub fn roc_auc(scores: &[f64], labels: &[u8]) -> Result<f64> {
    let (positives, negatives) = super::metrics::check("ROC AUC", scores, labels)?;
    if positives == 0 || negatives == 0 {
        return Err(Error::InvalidArgument(
            "ROC AUC is undefined when only one class is present in the labels".to_string(),
        ));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end]
            .iter()
            .filter(|&&i| labels[i] == 1)
            .count();
        rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let p = positives as f64;
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// The ROC curve: `(false positive rate, true positive rate)` points from `(0, 0)` to `(1, 1)`,
/// one per distinct score (tied scores move both rates at once, a diagonal step). The area under
/// it (trapezoids) is [`roc_auc`].
pub fn roc_curve(scores: &[f64], labels: &[u8]) -> Result<Vec<(f64, f64)>> {
    roc_auc(scores, labels)?;
    let positives = labels.iter().filter(|&&l| l == 1).count() as f64;
    let negatives = labels.len() as f64 - positives;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            if labels[order[end]] == 1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            end += 1;
        }
        points.push((fp / negatives, tp / positives));
        start = end;
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_area_under_the_curve_is_the_auc() {
        let scores = [0.9, 0.7, 0.5, 0.3, 0.3, 0.1, 0.5];
        let labels = [1, 0, 1, 1, 0, 0, 0];
        let curve = roc_curve(&scores, &labels).unwrap();
        assert_eq!(curve[0], (0.0, 0.0));
        assert_eq!(*curve.last().unwrap(), (1.0, 1.0));
        // One point per distinct score.
        assert_eq!(curve.len(), 1 + 5);
        let area: f64 = curve
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum();
        let auc = roc_auc(&scores, &labels).unwrap();
        assert!((area - auc).abs() < 1e-12, "{area} vs {auc}");
        assert!(roc_curve(&[0.1, 0.2], &[1, 1]).is_err());
    }

    #[test]
    fn hand_worked_cases() {
        // Perfect and reversed separation.
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]).unwrap(), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[0, 0, 1, 1]).unwrap(), 0.0);
        // scikit-learn's documented example: roc_auc_score([0,0,1,1], [0.1,0.4,0.35,0.8]) = 0.75.
        assert_eq!(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap(),
            0.75
        );
        // Six points (as linfa's test): pairs (pos > neg) = 7 of 9, one tie counted 1/2.
        // positives 0.9, 0.5, 0.3; negatives 0.7, 0.3, 0.1
        // 0.9 beats 3; 0.5 beats 2; 0.3 beats 1 and ties 1 -> 6.5 / 9
        let auc = roc_auc(&[0.9, 0.7, 0.5, 0.3, 0.3, 0.1], &[1, 0, 1, 1, 0, 0]).unwrap();
        assert!((auc - 6.5 / 9.0).abs() < 1e-15, "{auc}");
        // All scores tied: 0.5.
        assert_eq!(roc_auc(&[1.0; 5], &[0, 1, 0, 1, 1]).unwrap(), 0.5);
    }

    #[test]
    fn agrees_with_counting_pairs() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            state >> 33
        };
        for _ in 0..20 {
            let n = 2 + (next() % 60) as usize;
            // Few distinct values so that ties are common.
            let scores: Vec<f64> = (0..n).map(|_| (next() % 7) as f64).collect();
            let mut labels: Vec<u8> = (0..n).map(|_| (next() % 2) as u8).collect();
            labels[0] = 0;
            labels[1] = 1;
            let mut wins = 0.0;
            let (mut p, mut q) = (0.0, 0.0);
            for i in 0..n {
                if labels[i] == 1 {
                    p += 1.0;
                }
                if labels[i] == 0 {
                    q += 1.0;
                }
                for j in 0..n {
                    if labels[i] == 1 && labels[j] == 0 {
                        wins += if scores[i] > scores[j] {
                            1.0
                        } else if scores[i] == scores[j] {
                            0.5
                        } else {
                            0.0
                        };
                    }
                }
            }
            let auc = roc_auc(&scores, &labels).unwrap();
            assert!((auc - wins / (p * q)).abs() < 1e-12);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(roc_auc(&[0.1, 0.2], &[1, 1]).is_err());
        assert!(roc_auc(&[0.1], &[1, 0]).is_err());
        assert!(roc_auc(&[f64::NAN, 0.2], &[0, 1]).is_err());
        assert!(roc_auc(&[0.1, 0.2], &[0, 2]).is_err());
    }
}
