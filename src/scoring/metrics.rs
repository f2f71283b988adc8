//! Image-level metrics beside the ROC AUC: the average precision (area under the
//! precision-recall curve, as scikit-learn's `average_precision_score`), the best F1 over
//! thresholds (anomalib's `F1Max`, from scikit-learn's `precision_recall_curve`) and the error
//! rates of a fixed threshold. Label 1 is the positive (anomalous) class.

use crate::{Error, Result};

/// The input checks of every image metric here and of [`roc_auc`](super::roc_auc): equal lengths, finite scores,
/// labels 0 or 1. Returns the number of positives and negatives.
pub(crate) fn check(what: &str, scores: &[f64], labels: &[u8]) -> Result<(usize, usize)> {
    if scores.len() != labels.len() {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} scores but {} labels",
            scores.len(),
            labels.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "{what}: score {i} is {} (not finite)",
            scores[i]
        )));
    }
    if let Some(i) = labels.iter().position(|&l| l > 1) {
        return Err(Error::InvalidArgument(format!(
            "{what}: label {i} is {}, labels must be 0 or 1",
            labels[i]
        )));
    }
    let positives = labels.iter().filter(|&&l| l == 1).count();
    Ok((positives, labels.len() - positives))
}

/// [`check`], and both classes must be present.
fn check_both(what: &str, scores: &[f64], labels: &[u8]) -> Result<(usize, usize)> {
    let (positives, negatives) = check(what, scores, labels)?;
    if positives == 0 || negatives == 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} is undefined when only one class is present in the labels"
        )));
    }
    Ok((positives, negatives))
}

/// The confusion counts `(score, true positives, false positives)` of "positive iff
/// score >= t" for each distinct score `t`, highest `t` first (scikit-learn's
/// `_binary_clf_curve`, ties grouped).
fn counts_at_thresholds(scores: &[f64], labels: &[u8]) -> Vec<(f64, usize, usize)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            if labels[order[end]] == 1 {
                tp += 1;
            } else {
                fp += 1;
            }
            end += 1;
        }
        points.push((scores[order[start]], tp, fp));
        start = end;
    }
    points
}

/// Average precision of `scores` against binary `labels` (1 = anomalous), equal to
/// scikit-learn's `average_precision_score`: the step-wise sum `sum_k (R_k - R_{k-1}) P_k`
/// over the distinct scores taken as thresholds ("positive iff score >= t"), highest first,
/// tied scores entering together, with `R_0 = 0`. Errors as [`roc_auc`](super::roc_auc)'s:
/// mismatched lengths, a score that is not finite, a label other than 0 or 1, one class only.
pub fn average_precision(scores: &[f64], labels: &[u8]) -> Result<f64> {
    let (positives, _) = check_both("average precision", scores, labels)?;
    let mut area = 0.0;
    let mut previous_recall = 0.0;
    for (_, tp, fp) in counts_at_thresholds(scores, labels) {
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = tp as f64 / positives as f64;
        area += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    Ok(area.max(0.0))
}

/// The best F1 score over the thresholds "anomalous iff score >= t", `t` each distinct score,
/// and the threshold that gives it: `(f1, t)`. As anomalib's `F1Max` on scikit-learn's
/// `precision_recall_curve`: `F1 = 2 P R / (P + R)` with `P = TP / (TP + FP)`,
/// `R = TP / positives`; a threshold where `P + R = 0` (no true positive) is skipped; among
/// thresholds with the same (largest) F1 the lowest wins (the first maximum in the curve's
/// increasing-threshold order). Errors as [`average_precision`]'s.
pub fn f1_max(scores: &[f64], labels: &[u8]) -> Result<(f64, f64)> {
    let (positives, _) = check_both("F1 max", scores, labels)?;
    let mut best: Option<(f64, f64)> = None;
    // Lowest threshold first, so that only a strictly larger F1 replaces the best.
    for (t, tp, fp) in counts_at_thresholds(scores, labels).into_iter().rev() {
        if tp == 0 {
            continue;
        }
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = tp as f64 / positives as f64;
        // The same operations, in the same order, as `2 * precision * recall /
        // (precision + recall)` in numpy, so that equal F1s compare equal.
        let f1 = 2.0 * precision * recall / (precision + recall);
        if best.is_none_or(|(b, _)| f1 > b) {
            best = Some((f1, t));
        }
    }
    // Both classes are present: the lowest threshold has every positive, TP > 0.
    best.ok_or_else(|| Error::InvalidArgument("F1 max: no threshold has a true positive".into()))
}

/// `(false positive rate, true positive rate)` of the decision "anomalous iff
/// score > threshold" (strictly greater, the tool's decision rule): the share of normal
/// inputs (label 0) and of anomalous ones (label 1) above the threshold. A rate is `None` when
/// its class is absent. Errors on mismatched lengths, a score or threshold that is not finite,
/// a label other than 0 or 1.
pub fn rates_at(
    scores: &[f64],
    labels: &[u8],
    threshold: f64,
) -> Result<(Option<f64>, Option<f64>)> {
    let (positives, negatives) = check("rates at a threshold", scores, labels)?;
    if !threshold.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "rates at a threshold: the threshold is {threshold} (not finite)"
        )));
    }
    let (mut tp, mut fp) = (0usize, 0usize);
    for (&s, &l) in scores.iter().zip(labels) {
        if s > threshold {
            if l == 1 {
                tp += 1;
            } else {
                fp += 1;
            }
        }
    }
    let rate = |count: usize, total: usize| (total > 0).then(|| count as f64 / total as f64);
    Ok((rate(fp, negatives), rate(tp, positives)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn average_precision_hand_worked_cases() {
        // scikit-learn's documented example: AP([0,0,1,1], [0.1,0.4,0.35,0.8]) = 0.8333...
        let ap = average_precision(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap();
        assert!(close(ap, 5.0 / 6.0), "{ap}");
        // Perfect separation: 1.
        assert_eq!(
            average_precision(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]).unwrap(),
            1.0
        );
        // Ties: scores 0.9 (1), 0.5 (1, 0), 0.3 (1, 0), 0.1 (0); 3 positives.
        // t = 0.9: P = 1, R = 1/3; t = 0.5: P = 2/3, R = 2/3; t = 0.3: P = 3/5, R = 1.
        // AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = (15 + 10 + 9) / 45 = 34/45.
        let scores = [0.5, 0.9, 0.3, 0.5, 0.3, 0.1];
        let labels = [1, 1, 1, 0, 0, 0];
        let ap = average_precision(&scores, &labels).unwrap();
        assert!(close(ap, 34.0 / 45.0), "{ap}");
        // All tied: the share of positives.
        let ap = average_precision(&[2.0; 5], &[0, 1, 0, 1, 1]).unwrap();
        assert!(close(ap, 0.6), "{ap}");
    }

    #[test]
    fn f1_max_hand_worked_cases() {
        // As above: t = 0.9: F1 = 2 * 1/3 / (4/3) = 1/2; t = 0.5: 2/3; t = 0.3:
        // 2 * 3/5 / (8/5) = 3/4; t = 0.1: P = 1/2, R = 1, F1 = 2/3. Best 3/4 at 0.3.
        let scores = [0.5, 0.9, 0.3, 0.5, 0.3, 0.1];
        let labels = [1, 1, 1, 0, 0, 0];
        let (f1, t) = f1_max(&scores, &labels).unwrap();
        assert!(close(f1, 0.75), "{f1}");
        assert_eq!(t, 0.3);
        // The highest score is normal: t = 0.9 has no true positive (skipped);
        // t = 0.8: P = 1/2, R = 1/2; t = 0.2: P = 2/3, R = 1, F1 = 0.8; t = 0.1: 2/3.
        let (f1, t) = f1_max(&[0.9, 0.8, 0.2, 0.1], &[0, 1, 1, 0]).unwrap();
        assert!(close(f1, 0.8), "{f1}");
        assert_eq!(t, 0.2);
        // Positives 0.9, 0.5; negatives 0.7, 0.1. t = 0.9: P 1, R 1/2, F1 2/3; t = 0.7:
        // P 1/2, R 1/2, F1 1/2; t = 0.5: P 2/3, R 1, F1 4/5; t = 0.1: P 1/2, R 1, F1 2/3.
        let (f1, t) = f1_max(&[0.9, 0.7, 0.5, 0.1], &[1, 0, 1, 0]).unwrap();
        assert!(close(f1, 0.8), "{f1}");
        assert_eq!(t, 0.5);
        // Equal best F1s: the lowest threshold wins. Positives 3 and 1, negatives 2 and 1:
        // t = 3 (TP 1 of 2, FP 0): F1 = 2/3; t = 1 (TP 2, FP 2): P 1/2, R 1: F1 = 2/3.
        let (f1, t) = f1_max(&[3.0, 2.0, 1.0, 1.0], &[1, 0, 1, 0]).unwrap();
        assert!(close(f1, 2.0 / 3.0), "{f1}");
        assert_eq!(t, 1.0);
    }

    #[test]
    fn rates_at_a_threshold_are_strictly_above_it() {
        let scores = [0.1, 0.5, 0.5, 0.9, 0.3];
        let labels = [0, 0, 1, 1, 1];
        // Above 0.5: the positive 0.9 only.
        let (fpr, tpr) = rates_at(&scores, &labels, 0.5).unwrap();
        assert_eq!(fpr, Some(0.0));
        assert!(close(tpr.unwrap(), 1.0 / 3.0));
        let (fpr, tpr) = rates_at(&scores, &labels, 0.2).unwrap();
        assert_eq!(fpr, Some(0.5));
        assert_eq!(tpr, Some(1.0));
        let (fpr, tpr) = rates_at(&scores, &labels, -1.0).unwrap();
        assert_eq!((fpr, tpr), (Some(1.0), Some(1.0)));
        // One class only: the other rate is None.
        assert_eq!(
            rates_at(&[0.1, 0.7], &[0, 0], 0.5).unwrap(),
            (Some(0.5), None)
        );
        assert_eq!(rates_at(&[0.7], &[1], 0.5).unwrap(), (None, Some(1.0)));
        assert_eq!(rates_at(&[], &[], 0.5).unwrap(), (None, None));
    }

    #[test]
    fn equal_to_scikit_learn() {
        // tests/fixtures/metrics/make_metrics.py: average_precision_score, roc_auc_score and
        // the best F1 of precision_recall_curve.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics/metrics.json"
        ))
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sets = json["images"].as_array().unwrap();
        assert!(!sets.is_empty());
        for set in sets {
            let scores: Vec<f64> = set["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let labels: Vec<u8> = set["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let value = |key: &str| set[key].as_f64().unwrap();
            let ap = average_precision(&scores, &labels).unwrap();
            assert!((ap - value("average_precision")).abs() < 1e-9, "AP {ap}");
            let auc = super::super::roc_auc(&scores, &labels).unwrap();
            assert!((auc - value("roc_auc")).abs() < 1e-9, "ROC AUC {auc}");
            let (f1, t) = f1_max(&scores, &labels).unwrap();
            assert!((f1 - value("f1_max")).abs() < 1e-9, "F1 {f1}");
            assert_eq!(t, value("f1_threshold"));
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        for f in [average_precision, |s: &[f64], l: &[u8]| {
            f1_max(s, l).map(|r| r.0)
        }] {
            assert!(f(&[0.1, 0.2], &[1, 1]).is_err());
            assert!(f(&[0.1], &[1, 0]).is_err());
            assert!(f(&[f64::NAN, 0.2], &[0, 1]).is_err());
            assert!(f(&[0.1, 0.2], &[0, 2]).is_err());
        }
        assert!(rates_at(&[0.1], &[1, 0], 0.5).is_err());
        assert!(rates_at(&[f64::INFINITY], &[1], 0.5).is_err());
        assert!(rates_at(&[0.1], &[3], 0.5).is_err());
        assert!(rates_at(&[0.1], &[1], f64::NAN).is_err());
    }
}
