//! How a run decides what it deploys: the protocol, the held-out share and the operating
//! point (METHOD.md, "Beyond the reference").

use serde::{Deserialize, Serialize};

use super::TrainSettings;
use crate::data::DatasetKind;

/// The most of the normal training images `--holdout` may set aside.
pub const MAX_HOLDOUT: f64 = 0.5;
/// The held-out share of the label-free protocol when `--holdout` is not given: a fifth of the
/// normal images (20 of 100 calibrate a 5% operating point to one image; see `--fpr`).
pub const DEFAULT_HOLDOUT: f64 = 0.2;
/// The default operating point: the share of new normal images the threshold flags.
pub const DEFAULT_FPR: f64 = 0.01;

pub(super) fn default_fpr() -> f64 {
    DEFAULT_FPR
}

/// How a run decides what it deploys (METHOD.md, "Beyond the reference").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The reference's: every training image trains; the deployed epoch is the evaluation with
    /// the best oracle AUC (chosen with the test labels).
    #[default]
    Reference,
    /// No test label decides: normal images are held out before anything is fitted, the last
    /// evaluation is deployed and the threshold is calibrated on the held-out normals.
    LabelFree,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Reference => "reference",
            Protocol::LabelFree => "label-free",
        }
    }

    /// The protocol of a dataset when `--protocol` is not given: the benchmarks keep the
    /// reference's, a user's own folder gets the label-free one.
    pub fn default_for(dataset: DatasetKind) -> Self {
        match dataset {
            DatasetKind::Folder => Protocol::LabelFree,
            DatasetKind::Mvtec | DatasetKind::Cifar10 => Protocol::Reference,
        }
    }

    /// How the deployed evaluation is chosen, as `config.json` and the report name it.
    pub fn selection(self) -> &'static str {
        match self {
            Protocol::Reference => "best oracle AUC (uses the test labels)",
            Protocol::LabelFree => "last evaluation (no test labels)",
        }
    }
}

/// Checks `--protocol`, `--holdout` and `--fpr` together; the error names the flag.
pub fn check_decision_settings(s: &TrainSettings) -> std::result::Result<(), String> {
    if !(s.fpr.is_finite() && s.fpr > 0.0 && s.fpr <= 0.5) {
        return Err(format!("--fpr {}: a rate above 0, at most 0.5", s.fpr));
    }
    if let Some(h) = s.holdout {
        if !(h.is_finite() && (0.0..=MAX_HOLDOUT).contains(&h)) {
            return Err(format!("--holdout {h}: a share from 0 to {MAX_HOLDOUT}"));
        }
        if h > 0.0 && s.protocol == Some(Protocol::Reference) {
            return Err(format!(
                "--holdout {h} with --protocol reference: the reference's protocol trains on \
                 every training image (use --protocol label-free to hold images out)"
            ));
        }
    }
    Ok(())
}
