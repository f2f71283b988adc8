//! The run folder's layout and its JSON files: `config.json` and each class's `progress.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{read_json, write_json};
use crate::config::TrainConfig;
use crate::scoring::evaluation::{ClassEvaluation, Normaliser};
use crate::scoring::threshold::Calibration;
use crate::{Error, Result};

/// A run's settings, in its folder.
pub const CONFIG_FILE: &str = "config.json";
/// A class's evaluations and checkpoint, in its class folder.
pub const PROGRESS_FILE: &str = "progress.json";

/// The `config.json` of a run directory.
pub fn read_config(run: &Path) -> Result<TrainConfig> {
    let path = run.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a run directory (no config.json)",
            run.display()
        )));
    }
    let config: TrainConfig = read_json(&path)?;
    if config.settings.dataset.is_none() || config.settings.data_root.is_none() {
        return Err(Error::invalid_file(&path, "no dataset or data_root"));
    }
    config
        .validate()
        .map_err(|m| Error::invalid_file(&path, format!("{m} (the file was changed?)")))?;
    Ok(config)
}

/// Writes a run's `config.json`.
pub fn write_config(run: &Path, config: &TrainConfig) -> Result<()> {
    write_json(&run.join(CONFIG_FILE), config)
}

/// One evaluation of a class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub epoch: usize,
    /// The oracle AUC (max over the 69 columns) and the leakage-free AUC; none when the test
    /// set lacks good or defect images.
    pub oracle: Option<f64>,
    pub nor: Option<f64>,
}

/// An evaluation whose models were kept, with what scoring needs besides the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub epoch: usize,
    /// None when the test set lacks good or defect images.
    pub evaluation: Option<ClassEvaluation>,
    pub normaliser: Normaliser,
    /// The threshold calibrated then, and its test rates where labels exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// A deployed evaluation's operating point and what it gives on the test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub calibration: Calibration,
    /// Test false- and true-positive rates at the threshold (none without good, defect
    /// test images).
    pub test_fpr: Option<f64>,
    pub test_tpr: Option<f64>,
}

/// `progress.json` of a class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassProgress {
    pub index: usize,
    pub name: String,
    /// The latest complete checkpoint.
    pub checkpoint_epoch: Option<usize>,
    /// The sha256 of each of its files (`model-3.bpk` -> hex), checked before resuming.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub checkpoint_sha256: std::collections::BTreeMap<String, String>,
    /// Set when that checkpoint was written in the middle of its epoch (a stop asked by a
    /// signal): how far the epoch had gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
    pub history: Vec<EvalRecord>,
    /// The reference protocol's choice: the evaluation with the best oracle AUC (where the test
    /// set has both labels).
    pub best: Option<BestRecord>,
    /// The evaluation `model.mtad` holds: the run's protocol's choice (runs written before
    /// it was recorded deployed `best`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<BestRecord>,
    pub complete: bool,
}

impl ClassProgress {
    /// The evaluation `model.mtad` holds.
    pub fn deployed(&self) -> Option<&BestRecord> {
        self.deployed.as_ref().or(self.best.as_ref())
    }

    /// Both protocols' headline numbers: the reference's (epoch and oracle AUC of its best
    /// evaluation) and the label-free one (epoch and `nor` AUC of the last evaluation).
    pub fn side_by_side(&self) -> SideBySide {
        SideBySide {
            reference: self
                .best
                .as_ref()
                .and_then(|b| Some((b.epoch, b.evaluation.as_ref()?.oracle().0))),
            label_free: self.history.last().and_then(|r| Some((r.epoch, r.nor?))),
        }
    }
}

/// See [`ClassProgress::side_by_side`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SideBySide {
    pub reference: Option<(usize, f64)>,
    pub label_free: Option<(usize, f64)>,
}

/// An epoch stopped after `steps` training steps; the checkpoint of `epoch` holds the models
/// and optimizer after them, and the sums are its losses so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    pub epoch: usize,
    pub steps: usize,
    pub loss_sum: f64,
    pub reconstruction_sum: f64,
    pub distillation_sum: Option<f64>,
    pub seconds: f64,
}

/// A class's folder name in the run directory.
pub fn class_dir(out: &Path, name: &str) -> PathBuf {
    out.join(name)
}

/// A class's `progress.json`, if it has one.
pub fn read_progress(dir: &Path) -> Result<Option<ClassProgress>> {
    let path = dir.join(PROGRESS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    read_json(&path).map(Some)
}

/// Writes a class's `progress.json`.
pub fn write_progress(dir: &Path, progress: &ClassProgress) -> Result<()> {
    write_json(&dir.join(PROGRESS_FILE), progress)
}
