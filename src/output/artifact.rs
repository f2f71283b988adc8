//! One self-contained file per trained class, `<run>/<class>/model.mtad`: everything scoring
//! needs, so that a class can be copied elsewhere and used by `mtad detect --model FILE`
//! without its run directory.
//!
//! ```text
//! b"MTAD-MODEL\n"  magic
//! u32 LE           format version
//! u64 LE           length of the header
//! header           JSON: class, the run's config (with the teachers' names and sha256s), the
//!                  deployed evaluation and its score normalisation, the calibrated threshold, the
//!                  calibration images' scores (the held-out normals), and each part's name,
//!                  length and sha256
//! 32 bytes         the sha256 of the header
//! parts            in header order: student.bpk, decoder.bpk, [weighting.bpk],
//!                  [teacher_stats.bin]
//! ```
//!
//! The header is checked against its sha256 whenever the file is read (a changed threshold or
//! setting is refused, not used), every part against its own when loaded, and loading with other teachers than
//! the class was trained with is refused.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::run_folder::BestRecord;
use super::write_atomic_parts;
use crate::config::TrainConfig;
use crate::scoring::evaluation::{RawScores, group_max};
use crate::scoring::threshold::calibrate;
use crate::teachers::{TeacherStatistics, hex};
use crate::training::model::{MtadModel, MtadModelConfig};
use crate::training::teacher_runner::TeacherRunner;
use crate::{Error, Result};

/// File name of a class's artifact inside its class folder.
pub const ARTIFACT_FILE: &str = "model.mtad";
const MAGIC: &[u8] = b"MTAD-MODEL\n";
/// 2: the run settings in the header are `config.json`'s (the settings declared once), and the
/// header is followed by its sha256.
/// 3: the deployed evaluation (`deployed`, was `best`) may lack AUCs (normal-only test sets)
/// and holds its operating point; `normal` holds the calibration images' scores. Version 2
/// files are still read.
const VERSION: u32 = 3;
/// Share of normal images the default threshold flags.
pub const DEFAULT_FLAG_RATE: f64 = crate::config::DEFAULT_FPR;

const STUDENT: &str = "student.bpk";
const DECODER: &str = "decoder.bpk";
const WEIGHTING: &str = "weighting.bpk";
const STATISTICS: &str = "teacher_stats.bin";

/// One stored part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The scores of the normal training inputs by the stored models, for thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalScores {
    /// Image of each input (MVTec: 25 consecutive patches per image).
    pub groups: Vec<usize>,
    pub images: usize,
    pub scores: RawScores,
}

/// What the artifact says besides the network weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Class index and name in the run's dataset.
    pub class_index: usize,
    pub class_name: String,
    pub config: TrainConfig,
    /// The deployed evaluation (its epoch, AUCs where the test set had both labels, its
    /// operating point) and the `nor` normalisation fitted then.
    #[serde(alias = "best")]
    pub deployed: BestRecord,
    /// Threshold on `nor` flagging `threshold_rate` of the calibration images (`normal`).
    pub threshold: f64,
    pub threshold_rate: f64,
    /// The scores of the images the threshold was calibrated on: the held-out normals (the
    /// normal training images when nothing was held out, and in older files).
    pub normal: NormalScores,
    pub parts: Vec<Part>,
}

impl Header {
    /// Checks what the header's values must satisfy before anything is sized from them (a
    /// header whose checksum is right can still have been written by another program).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = &self.config;
        c.validate()?;
        if c.settings.dataset.is_none() {
            return Err("no dataset".into());
        }
        if c.class_names.get(self.class_index) != Some(&self.class_name) {
            return Err(format!(
                "class {} ({}) is not in its run's classes",
                self.class_index, self.class_name
            ));
        }
        if !self.threshold.is_finite() || !(self.threshold_rate > 0.0 && self.threshold_rate < 1.0)
        {
            return Err(format!(
                "threshold {} at rate {} (a finite threshold, a rate in (0, 1))",
                self.threshold, self.threshold_rate
            ));
        }
        let n = &self.deployed.normaliser;
        if n.min.iter().chain(&n.max).any(|v| !v.is_finite()) {
            return Err("the normaliser's bounds are not finite".into());
        }
        let normal = &self.normal;
        let s = &normal.scores;
        let len = s.len();
        if s.as_z.len() != len || s.as_cossim.len() != len || normal.groups.len() != len {
            return Err("the normal scores' lists differ in length".into());
        }
        if normal.images == 0
            || normal.images > len
            || normal.groups.iter().any(|&g| g >= normal.images)
        {
            return Err("the normal scores' images do not match their groups".into());
        }
        if s.as_z
            .iter()
            .chain(&s.as_cossim)
            .chain(&s.as_rec)
            .any(|v| !v.is_finite())
        {
            return Err("the normal scores are not finite".into());
        }
        Ok(())
    }
}

/// A class's models, statistics and calibration.
pub struct Artifact {
    pub path: PathBuf,
    pub header: Header,
    parts: Vec<Vec<u8>>,
}

/// The record bytes of a model's parts.
fn record_bytes<M: Module>(module: &M, name: &str) -> Result<burn::tensor::Bytes> {
    module
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| Error::Training(format!("saving {name}: {e}")))
}

impl Artifact {
    /// Writes the artifact of a class's deployed evaluation: `model` and `normal` (its scores
    /// of the calibration images) must be that evaluation's; the threshold is the record's.
    pub fn write(
        path: &Path,
        (class_index, class_name): (usize, &str),
        config: &TrainConfig,
        best: &BestRecord,
        model: &MtadModel,
        stats: Option<&TeacherStatistics>,
        normal: NormalScores,
    ) -> Result<()> {
        let (threshold, threshold_rate) = match &best.decision {
            Some(d) => (d.calibration.threshold, d.calibration.fpr),
            None => {
                let per_input: Vec<f64> = (0..normal.scores.len())
                    .map(|i| best.normaliser.score(&normal.scores, i))
                    .collect();
                let images = group_max(&per_input, &normal.groups, normal.images);
                (calibrate(&images, DEFAULT_FLAG_RATE)?, DEFAULT_FLAG_RATE)
            }
        };
        let mut blobs: Vec<(&str, burn::tensor::Bytes)> = vec![
            (STUDENT, record_bytes(&model.student, STUDENT)?),
            (DECODER, record_bytes(&model.decoder, DECODER)?),
        ];
        if let Some(w) = &model.weighting {
            blobs.push((WEIGHTING, record_bytes(w, WEIGHTING)?));
        }
        let stats_bytes = stats.map(TeacherStatistics::to_bytes);
        let mut slices: Vec<(&str, &[u8])> = blobs.iter().map(|(n, b)| (*n, &b[..])).collect();
        if let Some(s) = &stats_bytes {
            slices.push((STATISTICS, s));
        }
        let header = Header {
            class_index,
            class_name: class_name.to_string(),
            config: config.clone(),
            deployed: best.clone(),
            threshold,
            threshold_rate,
            normal,
            parts: slices
                .iter()
                .map(|(name, bytes)| Part {
                    name: name.to_string(),
                    bytes: bytes.len() as u64,
                    sha256: hex(&Sha256::digest(bytes)),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| Error::Training(format!("encoding {}: {e}", path.display())))?;
        let version = VERSION.to_le_bytes();
        let length = (json.len() as u64).to_le_bytes();
        let header_sha256: [u8; 32] = Sha256::digest(&json).into();
        let mut all: Vec<&[u8]> = vec![MAGIC, &version, &length, &json, &header_sha256];
        all.extend(slices.iter().map(|(_, b)| *b));
        write_atomic_parts(path, &all)
    }

    /// Reads an artifact and checks every part against its sha256.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_parts(path, true)
    }

    /// Reads only an artifact's header (without loading or checking its parts).
    pub fn read_header(path: &Path) -> Result<Header> {
        Self::read_parts(path, false).map(|a| a.header)
    }

    fn read_parts(path: &Path, with_parts: bool) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::InvalidArgument(format!(
                    "{} does not exist: the class has no trained model yet (did its training \
                     reach an evaluation?)",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
        let bad = |m: String| Error::invalid_file(path, m);
        let truncated = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("truncated: the file ends before its last part".into())
            } else {
                Error::io(path, e)
            }
        };
        let mut magic = vec![0u8; MAGIC.len()];
        file.read_exact(&mut magic).map_err(truncated)?;
        if magic != MAGIC {
            return Err(bad("not an mtad model file".into()));
        }
        let mut word = [0u8; 4];
        file.read_exact(&mut word).map_err(truncated)?;
        let version = u32::from_le_bytes(word);
        if version != VERSION && version != 2 {
            return Err(bad(format!(
                "format version {version}; this mtad reads versions 2 and {VERSION}"
            )));
        }
        let mut long = [0u8; 8];
        file.read_exact(&mut long).map_err(truncated)?;
        let length = u64::from_le_bytes(long);
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if length > size {
            return Err(bad("truncated or corrupt header".into()));
        }
        let mut json = vec![0u8; length as usize];
        file.read_exact(&mut json).map_err(truncated)?;
        let mut sha256 = [0u8; 32];
        file.read_exact(&mut sha256).map_err(truncated)?;
        if Sha256::digest(&json)[..] != sha256[..] {
            return Err(bad(
                "header checksum mismatch: the file was changed or is corrupt (retrain the \
                 class, or copy the file again)"
                    .into(),
            ));
        }
        let header: Header =
            serde_json::from_slice(&json).map_err(|e| bad(format!("header: {e}")))?;
        header.validate().map_err(|m| bad(format!("header: {m}")))?;
        let mut parts = Vec::with_capacity(header.parts.len());
        // Checked sums: a hostile header's sizes must not wrap around to the file's size.
        let described = header
            .parts
            .iter()
            .try_fold(MAGIC.len() as u64 + 12 + 32 + length, |sum, p| {
                sum.checked_add(p.bytes)
            })
            .unwrap_or(u64::MAX);
        if described != size {
            return Err(bad(format!(
                "truncated or corrupt: {size} bytes, its header describes {described}"
            )));
        }
        if !with_parts {
            return Ok(Self {
                path: path.to_path_buf(),
                header,
                parts,
            });
        }
        for part in &header.parts {
            let mut bytes = vec![0u8; part.bytes as usize];
            file.read_exact(&mut bytes).map_err(truncated)?;
            if hex(&Sha256::digest(&bytes)) != part.sha256 {
                return Err(bad(format!(
                    "{}: checksum mismatch (the file is corrupt)",
                    part.name
                )));
            }
            parts.push(bytes);
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            parts,
        })
    }

    fn part(&self, name: &str) -> Option<&[u8]> {
        self.header
            .parts
            .iter()
            .position(|p| p.name == name)
            .map(|i| self.parts[i].as_slice())
    }

    /// Loads part `name` into `module`.
    fn load<M: Module>(&self, module: M, name: &str) -> Result<M> {
        let bytes = self
            .part(name)
            .ok_or_else(|| Error::invalid_file(&self.path, format!("{name} is missing")))?;
        let record = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(
            bytes.to_vec(),
        ))
        .and_then(|record| module.try_load_record(record));
        record.map_err(|e| Error::invalid_file(&self.path, format!("{name}: {e}")))
    }

    /// The student, decoder and weighting, in inference mode.
    pub fn model(&self, device: &Device) -> Result<MtadModel> {
        let c = &self.header.config;
        let model = MtadModelConfig::new(
            c.settings.student,
            c.settings.image_size,
            c.teacher_names.len(),
        )
        .init(device)?;
        let model = MtadModel {
            student: self.load(model.student, STUDENT)?,
            decoder: self.load(model.decoder, DECODER)?,
            weighting: match model.weighting {
                Some(w) => Some(self.load(w, WEIGHTING)?),
                None => None,
            },
        };
        Ok(model.valid())
    }

    /// The teacher statistics, after checking that `runner`'s teachers are the ones the class
    /// was trained with (`None` for a run without teachers).
    pub fn statistics(&self, runner: Option<&TeacherRunner>) -> Result<Option<TeacherStatistics>> {
        let c = &self.header.config;
        let have: Vec<String> = runner.map_or(Vec::new(), |r| r.sha256s().to_vec());
        if have != c.teacher_sha256 {
            let names: Vec<String> = runner.map_or(Vec::new(), |r| r.names().to_vec());
            return Err(Error::Teacher {
                name: c.teacher_names.join(", "),
                message: format!(
                    "{} was trained with the teachers {:?} (sha256 {:?}); the teachers loaded \
                     now are {:?} (sha256 {:?}). Its scores are only valid with the teachers it \
                     was trained with: load those (--teacher-weights, or a build with the same \
                     ONNX exports)",
                    self.path.display(),
                    c.teacher_names,
                    c.teacher_sha256,
                    names,
                    have
                ),
            });
        }
        match self.part(STATISTICS) {
            Some(bytes) => {
                let stats = TeacherStatistics::from_bytes(bytes)
                    .map_err(|m| Error::invalid_file(&self.path, format!("{STATISTICS}: {m}")))?;
                if stats.teacher_sha256 != c.teacher_sha256 {
                    return Err(Error::invalid_file(
                        &self.path,
                        "its teacher statistics are of other teachers than its config's",
                    ));
                }
                Ok(Some(stats))
            }
            None if runner.is_some() => Err(Error::invalid_file(
                &self.path,
                format!("{STATISTICS} is missing"),
            )),
            None => Ok(None),
        }
    }
}
