//! One class's evaluation from per-input scores: the 3 raw scores and the reference's 66 mixes
//! (69 columns), image scores as the max over an image's inputs (MVTec: its 25 patches), the
//! ROC AUC of each column, the oracle max over the columns (the reference protocol, which picks
//! the column with the test labels) and the leakage-free `nor` score (min-max normalised on the
//! normal training inputs, summed).

use super::{Mix, reference_mixes, roc_auc};
use crate::{Error, Result};

/// The three raw scores of a list of inputs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RawScores {
    pub as_z: Vec<f64>,
    pub as_cossim: Vec<f64>,
    pub as_rec: Vec<f64>,
}

impl RawScores {
    pub fn len(&self) -> usize {
        self.as_rec.len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_rec.is_empty()
    }

    pub fn extend(&mut self, as_z: &[f64], as_cossim: &[f64], as_rec: &[f64]) {
        self.as_z.extend_from_slice(as_z);
        self.as_cossim.extend_from_slice(as_cossim);
        self.as_rec.extend_from_slice(as_rec);
    }

    /// The first input with a score that is not finite, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        (0..self.len()).find(|&i| {
            !(self.as_z[i].is_finite()
                && self.as_cossim[i].is_finite()
                && self.as_rec[i].is_finite())
        })
    }

    /// `mix` of input `i`.
    pub fn mixed(&self, i: usize, mix: &Mix) -> f64 {
        mix.z * self.as_z[i] + mix.cossim * self.as_cossim[i] + mix.rec * self.as_rec[i]
    }
}

/// Names of the 69 columns, in the reference's order: the 3 raw scores, then the 66 mixes.
pub fn column_names() -> Vec<String> {
    let mut names = vec![
        "AS_z".to_string(),
        "AS_cossim".to_string(),
        "AS_rec".to_string(),
    ];
    names.extend(
        reference_mixes()
            .iter()
            .map(|m| format!("mix_z{:.1}_cos{:.1}_rec{:.1}", m.z, m.cossim, m.rec.abs())),
    );
    names
}

/// The mixes of the 69 columns (the raw scores as mixes with one weight of 1).
pub fn column_mixes() -> Vec<Mix> {
    let mut mixes = vec![
        Mix {
            z: 1.0,
            cossim: 0.0,
            rec: 0.0,
        },
        Mix {
            z: 0.0,
            cossim: 1.0,
            rec: 0.0,
        },
        Mix {
            z: 0.0,
            cossim: 0.0,
            rec: 1.0,
        },
    ];
    mixes.extend(reference_mixes());
    mixes
}

/// Min and max of each raw score over the normal training inputs: the leakage-free
/// normalisation (the reference's inference script).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normaliser {
    pub min: [f64; 3],
    pub max: [f64; 3],
}

impl Normaliser {
    pub fn fit(train: &RawScores) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::InvalidArgument(
                "the leakage-free normalisation needs scores of normal training inputs".into(),
            ));
        }
        let range = |v: &[f64]| {
            v.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let (a, b, c) = (
            range(&train.as_z),
            range(&train.as_cossim),
            range(&train.as_rec),
        );
        Ok(Self {
            min: [a.0, b.0, c.0],
            max: [a.1, b.1, c.1],
        })
    }

    /// `sum_k (s_k - min_k) / (max_k - min_k)`; a score whose training range is empty (all
    /// equal, as AS_z and AS_cossim in the no-teacher ablation) contributes `s_k - min_k`.
    pub fn score(&self, scores: &RawScores, i: usize) -> f64 {
        let raw = [scores.as_z[i], scores.as_cossim[i], scores.as_rec[i]];
        (0..3)
            .map(|k| {
                let range = self.max[k] - self.min[k];
                let shifted = raw[k] - self.min[k];
                if range > 0.0 {
                    shifted / range
                } else {
                    shifted
                }
            })
            .sum()
    }
}

/// Max of `values` within each group; `groups[i]` is input `i`'s image, images numbered from
/// 0 in order.
pub fn group_max(values: &[f64], groups: &[usize], images: usize) -> Vec<f64> {
    let mut out = vec![f64::NEG_INFINITY; images];
    for (&v, &g) in values.iter().zip(groups) {
        out[g] = out[g].max(v);
    }
    out
}

/// One class's evaluation (of a test set with both good and defect images).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassEvaluation {
    /// ROC AUC of each of the 69 columns ([`column_names`]).
    pub aucs: Vec<f64>,
    /// ROC AUC of the leakage-free score.
    pub nor: f64,
    /// Pixel-level ROC AUC of the leakage-free score's heatmaps, where masks exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_nor: Option<f64>,
    /// The no-teacher ablation: the oracle is the AS_rec column's AUC alone (the reference's
    /// no-teacher script), not a max over 69 columns most of which are constant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rec_only: bool,
    /// Image-level average precision (AUPR) and best F1 of `nor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aupr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f1_max: Option<f64>,
    /// Pixel-level AUPRO of the `nor` heatmaps up to a false-positive rate of 0.3 (MVTec AD's
    /// protocol), where masks exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_aupro: Option<f64>,
    /// ROC AUC of `nor` for each defect type (its images against the good ones).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub per_defect: std::collections::BTreeMap<String, f64>,
}

/// MVTec AD's AUPRO integrates up to this false-positive rate.
pub const AUPRO_MAX_FPR: f64 = 0.3;

/// Whether `labels` hold both classes (what the AUROC and the other ranking metrics need).
pub fn has_both_labels(labels: &[u8]) -> bool {
    labels.contains(&0) && labels.contains(&1)
}

/// The `nor` score of each image: the max over its inputs of [`Normaliser::score`].
pub fn image_nor(test: &RawScores, groups: &[usize], images: usize, n: &Normaliser) -> Vec<f64> {
    let per_input: Vec<f64> = (0..test.len()).map(|i| n.score(test, i)).collect();
    group_max(&per_input, groups, images)
}

impl ClassEvaluation {
    /// Adds the image AUPR, F1-max and per-defect AUROC of the `nor` image scores
    /// (`defects[g]`: image `g`'s folder, `good` for normal ones).
    pub fn add_nor_metrics(
        &mut self,
        nor: &[f64],
        labels: &[u8],
        defects: &[String],
    ) -> Result<()> {
        self.aupr = Some(super::metrics::average_precision(nor, labels)?);
        self.f1_max = Some(super::metrics::f1_max(nor, labels)?.0);
        let mut kinds: Vec<&String> = defects
            .iter()
            .zip(labels)
            .filter(|(_, l)| **l == 1)
            .map(|(d, _)| d)
            .collect();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let (scores, kept): (Vec<f64>, Vec<u8>) = nor
                .iter()
                .zip(labels)
                .zip(defects)
                .filter(|((_, l), d)| **l == 0 || *d == kind)
                .map(|((s, l), _)| (*s, *l))
                .unzip();
            self.per_defect
                .insert(kind.clone(), roc_auc(&scores, &kept)?);
        }
        Ok(())
    }

    /// The oracle: the max over the 69 columns (the reference's "max AUC") and its column; for
    /// the no-teacher ablation, the AS_rec column.
    pub fn oracle(&self) -> (f64, usize) {
        if self.rec_only {
            return (self.aucs[2], 2);
        }
        self.aucs
            .iter()
            .enumerate()
            .fold((f64::NEG_INFINITY, 0), |best, (i, &a)| {
                if a > best.0 { (a, i) } else { best }
            })
    }
}

/// Evaluates `test` scores (one per input; `groups[i]` = image of input `i`, `labels` per
/// image) with the normalisation fitted on the normal training inputs' scores.
pub fn evaluate(
    test: &RawScores,
    groups: &[usize],
    labels: &[u8],
    normaliser: &Normaliser,
) -> Result<ClassEvaluation> {
    let nor_inputs: Vec<f64> = (0..test.len()).map(|i| normaliser.score(test, i)).collect();
    evaluate_with_nor(test, groups, labels, &nor_inputs)
}

/// [`evaluate`] with the leakage-free score of each input given.
pub fn evaluate_with_nor(
    test: &RawScores,
    groups: &[usize],
    labels: &[u8],
    nor_inputs: &[f64],
) -> Result<ClassEvaluation> {
    if groups.len() != test.len() || nor_inputs.len() != test.len() {
        return Err(Error::InvalidArgument(format!(
            "{} test scores for {} inputs",
            test.len(),
            groups.len()
        )));
    }
    if let Some(g) = groups.iter().find(|&&g| g >= labels.len()) {
        return Err(Error::InvalidArgument(format!(
            "input of image {g}, but only {} labels",
            labels.len()
        )));
    }
    let images = labels.len();
    let aucs = column_mixes()
        .iter()
        .map(|mix| {
            let per_input: Vec<f64> = (0..test.len()).map(|i| test.mixed(i, mix)).collect();
            roc_auc(&group_max(&per_input, groups, images), labels)
        })
        .collect::<Result<Vec<_>>>()?;
    let nor = roc_auc(&group_max(nor_inputs, groups, images), labels)?;
    Ok(ClassEvaluation {
        aucs,
        nor,
        ..ClassEvaluation::default()
    })
}

/// The multi-student ensemble's raw scores: for each score kind, each student's test scores
/// min-max normalised over the test inputs, summed over the students (a kind with one value
/// everywhere contributes 0).
pub fn ensemble_scores(students: &[RawScores]) -> Result<RawScores> {
    let n = students.first().map_or(0, RawScores::len);
    if students.iter().any(|s| s.len() != n) {
        return Err(Error::InvalidArgument(
            "the students scored different numbers of test inputs".into(),
        ));
    }
    let normalised_sum = |kind: fn(&RawScores) -> &Vec<f64>| {
        let mut sum = vec![0.0; n];
        for student in students {
            let values = kind(student);
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
            let range = hi - lo;
            for (acc, &v) in sum.iter_mut().zip(values) {
                if range > 0.0 {
                    *acc += (v - lo) / range;
                }
            }
        }
        sum
    };
    Ok(RawScores {
        as_z: normalised_sum(|s| &s.as_z),
        as_cossim: normalised_sum(|s| &s.as_cossim),
        as_rec: normalised_sum(|s| &s.as_rec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The artifact stores the normaliser as JSON and `detect` recomputes scores and the
    /// threshold with it: every f64 must come back bit for bit (serde_json's
    /// `float_roundtrip`; its default parser can be one unit in the last place off).
    #[test]
    fn the_normaliser_survives_json_bit_for_bit() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64 * 10.0
            };
            let n = Normaliser {
                min: [next(), next() * 1e-3, next() * 1e3],
                max: [next(), next(), next()],
            };
            let back: Normaliser =
                serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
            let bits = |n: &Normaliser| {
                n.min
                    .iter()
                    .chain(&n.max)
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&back), bits(&n), "{n:?}");
        }
    }

    fn scores(z: &[f64], c: &[f64], r: &[f64]) -> RawScores {
        RawScores {
            as_z: z.to_vec(),
            as_cossim: c.to_vec(),
            as_rec: r.to_vec(),
        }
    }

    #[test]
    fn sixty_nine_distinct_columns() {
        let names = column_names();
        assert_eq!(names.len(), 69);
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 69, "{names:?}");
        assert_eq!(names[3], "mix_z0.0_cos0.0_rec1.0");
        assert_eq!(names[68], "mix_z1.0_cos0.0_rec0.0");
    }

    #[test]
    fn image_score_is_the_max_over_its_patches() {
        // Two images of 2 patches each; image 0 normal, image 1 anomalous.
        // AS_z per patch: image 0 [0.1, 0.9], image 1 [0.5, 0.6] -> max 0.9 vs 0.6: AUC 0.
        // AS_rec: image 0 [0.2, 0.1], image 1 [0.3, 0.0] -> 0.2 vs 0.3: AUC 1.
        // AS_cossim equal everywhere: AUC 0.5 (a tie).
        let test = scores(&[0.1, 0.9, 0.5, 0.6], &[1.0; 4], &[0.2, 0.1, 0.3, 0.0]);
        let groups = [0, 0, 1, 1];
        let labels = [0, 1];
        let normaliser = Normaliser {
            min: [0.0; 3],
            max: [1.0; 3],
        };
        let eval = evaluate(&test, &groups, &labels, &normaliser).unwrap();
        assert_eq!(eval.aucs[0], 0.0);
        assert_eq!(eval.aucs[1], 0.5);
        assert_eq!(eval.aucs[2], 1.0);
        assert_eq!(eval.oracle(), (1.0, 2));
        // nor per patch = z + 1 + rec: image 0 max(1.3, 2.0) = 2.0; image 1 max(1.8, 1.6) = 1.8.
        assert_eq!(eval.nor, 0.0);
    }

    #[test]
    fn the_normaliser_uses_training_minima_and_maxima_only() {
        let train = scores(&[1.0, 3.0], &[0.5, 0.5], &[10.0, 20.0]);
        let n = Normaliser::fit(&train).unwrap();
        assert_eq!(n.min, [1.0, 0.5, 10.0]);
        assert_eq!(n.max, [3.0, 0.5, 20.0]);
        let test = scores(&[2.0], &[0.75], &[30.0]);
        // (2-1)/2 + (0.75-0.5) (empty range: shifted only) + (30-10)/10
        assert!((n.score(&test, 0) - (0.5 + 0.25 + 2.0)).abs() < 1e-12);
        assert!(Normaliser::fit(&RawScores::default()).is_err());
    }

    #[test]
    fn the_ensemble_sums_min_max_normalised_students() {
        let a = scores(&[0.0, 5.0, 10.0], &[1.0, 1.0, 1.0], &[2.0, 4.0, 3.0]);
        let b = scores(&[1.0, 3.0, 2.0], &[0.0, 4.0, 2.0], &[7.0, 7.0, 7.0]);
        let e = ensemble_scores(&[a, b]).unwrap();
        // AS_z: a -> [0, .5, 1], b -> [0, 1, .5]; AS_cossim: a constant -> 0, b -> [0, 1, .5];
        // AS_rec: a -> [0, 1, .5], b constant -> 0.
        assert_eq!(e.as_z, [0.0, 1.5, 1.5]);
        assert_eq!(e.as_cossim, [0.0, 1.0, 0.5]);
        assert_eq!(e.as_rec, [0.0, 1.0, 0.5]);
        let short = scores(&[1.0], &[1.0], &[1.0]);
        assert!(ensemble_scores(&[e, short]).is_err());
    }

    #[test]
    fn mismatched_groups_are_errors() {
        let test = scores(&[0.1], &[0.1], &[0.1]);
        let n = Normaliser {
            min: [0.0; 3],
            max: [1.0; 3],
        };
        assert!(evaluate(&test, &[0, 1], &[0, 1], &n).is_err());
        assert!(evaluate(&test, &[3], &[0, 1], &n).is_err());
    }
}
