//! Anomaly scores and their evaluation (METHOD.md, "Scores and evaluation").

pub mod evaluation;
pub mod metrics;
pub mod pixel;
pub mod roc_auc;
pub mod threshold;

pub use metrics::{average_precision, f1_max, rates_at};
pub use roc_auc::{roc_auc, roc_curve};

/// One weighting of the three raw scores: `r1 * AS_z + r2 * AS_cossim + r3 * AS_rec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub z: f64,
    pub cossim: f64,
    pub rec: f64,
}

/// numpy's `linspace(start, stop, num)`: `start + i * step`, the last value exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut values: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
            values[num - 1] = stop;
            values
        }
    }
}

/// The reference's 66 mixes, in its order: `r1` in `linspace(0, 1, 11)`, `r2` in
/// `linspace(0, 1 - r1, round((1 - r1) / 0.1) + 1)`, `r3 = 1 - r1 - r2`.
pub fn reference_mixes() -> Vec<Mix> {
    let mut mixes = Vec::with_capacity(66);
    for r1 in linspace(0.0, 1.0, 11) {
        // Python's round() rounds half to even; (1 - r1) / 0.1 is never near a half here.
        let count = ((1.0 - r1) / 0.1).round() as usize + 1;
        for r2 in linspace(0.0, 1.0 - r1, count) {
            mixes.push(Mix {
                z: r1,
                cossim: r2,
                rec: 1.0 - r1 - r2,
            });
        }
    }
    mixes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_66_mixes_summing_to_one() {
        let mixes = reference_mixes();
        assert_eq!(mixes.len(), 66);
        for m in &mixes {
            assert!((m.z + m.cossim + m.rec - 1.0).abs() < 1e-12);
            assert!(m.z >= 0.0 && m.cossim >= 0.0 && m.rec >= -1e-12);
        }
        // First the r1 = 0 block of 11, last the pure AS_z mix.
        assert_eq!(
            mixes[0],
            Mix {
                z: 0.0,
                cossim: 0.0,
                rec: 1.0
            }
        );
        assert_eq!(mixes[10].cossim, 1.0);
        assert_eq!(
            mixes[65],
            Mix {
                z: 1.0,
                cossim: 0.0,
                rec: 0.0
            }
        );
        // r1 = 0.7 (not exactly representable) still gets 4 values of r2.
        assert_eq!(mixes.iter().filter(|m| (m.z - 0.7).abs() < 1e-9).count(), 4);
    }
}
