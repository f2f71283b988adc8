//! `mtad detect`: score new images with a trained class, decide against a threshold calibrated
//! on normal training data only, and draw where the anomaly is.
//!
//! Per image: the image is prepared as in training (MVTec/folder: resized and cut into the full
//! cut's patches; CIFAR-10: resized and centre-cropped), the teachers and the class's best models
//! score every input, the chosen score column (default the leakage-free `nor`) is computed per
//! input and the image's score is the max over its inputs. The default threshold is the score
//! above which about 1% of the class's normal training images fall (from the normal training
//! inputs' scores of the best model, kept in the class's `model.mtad`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::config::TrainConfig;
use crate::data::DatasetKind;
use crate::data::FloatImage;
use crate::data::crops::FullCut;
use crate::data::folder::{decode_rgb8, is_image, list_images, sorted_subfolders};
use crate::data::transform::{center_crop, crop, normalize_rgb8, resize_bilinear};
use crate::output::artifact::{ARTIFACT_FILE, Artifact};
use crate::output::detections::{DETECTIONS_FILE, write_detections};
use crate::output::run_folder::{class_dir, read_config};
use crate::output::write_atomic;
use crate::progress::Progress;
use crate::scoring::Mix;
use crate::scoring::evaluation::{Normaliser, RawScores, column_mixes, column_names};
use crate::scoring::threshold::{Calibration, patch_map};
use crate::teachers::{TeacherStatistics, WeightsLocation};
use crate::training::inputs::images_tensor;
use crate::training::model::{InputBatch, MtadModel};
use crate::training::prepare::load_teachers;
use crate::training::teacher_runner::{TeacherRunner, z_scores_host};
use crate::{Error, Result};

use super::pictures::{heatmap_png, mask_png, residual_png};

/// Subfolders of `detect`'s output folder.
pub const HEATMAPS_DIR: &str = "heatmaps";
pub const MASKS_DIR: &str = "masks";

/// Which score decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreColumn {
    /// The leakage-free score (default).
    Nor,
    /// One of the 69 columns (3 raw scores, 66 mixes).
    Mix(usize, Mix),
}

impl ScoreColumn {
    /// `nor` or a column name of `Eval_<student>.csv`.
    pub fn parse(name: &str) -> Result<Self> {
        if name == "nor" {
            return Ok(Self::Nor);
        }
        let names = column_names();
        names
            .iter()
            .position(|n| n == name)
            .map(|i| Self::Mix(i, column_mixes()[i]))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--column {name}: not a score column (nor, {} ... {})",
                    names[..3].join(", "),
                    names[names.len() - 1]
                ))
            })
    }

    fn score(&self, scores: &RawScores, i: usize, normaliser: &Normaliser) -> f64 {
        match self {
            Self::Nor => normaliser.score(scores, i),
            Self::Mix(_, mix) => scores.mixed(i, mix),
        }
    }
}

/// The result for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub path: PathBuf,
    /// The image score, its decision and its raw scores (those of its highest-scoring input);
    /// or why the image could not be scored.
    pub outcome: std::result::Result<Scored, String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    pub score: f64,
    pub anomalous: bool,
    pub as_z: f64,
    pub as_cossim: f64,
    pub as_rec: f64,
    /// Per input (patch) score, in input order.
    pub patch_scores: Vec<f64>,
    pub heatmap: Option<PathBuf>,
    /// The reconstruction-residual heatmap, when asked for.
    pub residual: Option<PathBuf>,
    /// The binary mask, when asked for.
    pub mask: Option<PathBuf>,
    /// Why a heatmap of this image could not be written (a full disk...): the image was
    /// scored all the same, and the command reports it and fails at the end.
    pub output_error: Option<String>,
}

/// Which heatmaps `mtad detect` draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Heatmaps {
    None,
    /// The patch scores over the image.
    Scores,
    /// And the student's reconstruction residual over the image.
    ScoresAndResiduals,
}

/// A trained class, ready to score images.
pub struct Detector {
    config: TrainConfig,
    model: MtadModel,
    runner: Option<std::sync::Arc<TeacherRunner>>,
    stats: Option<TeacherStatistics>,
    normaliser: Normaliser,
    column: ScoreColumn,
    pub threshold: f64,
    /// Write a binary mask per image (see [`Detector::score`]).
    pub masks: bool,
    /// The rate the threshold was calibrated at (none: given by the user) and on what.
    pub operating_point: Option<(f64, String)>,
    /// The heatmaps' pixel threshold at that rate (full-cut models).
    pub pixel_threshold: Option<f64>,
    /// What limits the calibration (too few images for the rate, training images).
    pub calibration_note: Option<String>,
    device: Device,
}

/// How `detect` sets its threshold: the stored one, a given value, or a new rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThresholdChoice {
    pub threshold: Option<f64>,
    pub fpr: Option<f64>,
}

impl Detector {
    /// Loads class `class` (name or index) of the run in `run` (its `<class>/model.mtad`).
    pub fn load(
        run: &Path,
        class: &str,
        column: ScoreColumn,
        choice: ThresholdChoice,
        weights: &WeightsLocation,
        device: Device,
    ) -> Result<Self> {
        let config = read_config(run)?;
        let index = config
            .class_indices
            .iter()
            .copied()
            .find(|&c| config.class_names[c] == class || c.to_string() == class)
            .ok_or_else(|| {
                let trained: Vec<&str> = config
                    .class_indices
                    .iter()
                    .map(|&c| config.class_names[c].as_str())
                    .collect();
                Error::InvalidArgument(format!(
                    "--class {class}: not trained in {} (its classes: {})",
                    run.display(),
                    trained.join(", ")
                ))
            })?;
        let name = &config.class_names[index];
        let path = class_dir(run, name).join(ARTIFACT_FILE);
        let header = Artifact::read_header(&path)?;
        config.check_model_fits(
            &path,
            &header.config,
            (header.class_index, &header.class_name),
            name,
        )?;
        Self::from_artifact(&path, column, choice, weights, device)
    }

    /// Loads a class's artifact (`model.mtad`), refusing other teachers than its own.
    pub fn from_artifact(
        path: &Path,
        column: ScoreColumn,
        choice: ThresholdChoice,
        weights: &WeightsLocation,
        device: Device,
    ) -> Result<Self> {
        if let Some(t) = choice.threshold
            && !t.is_finite()
        {
            return Err(Error::InvalidArgument(format!(
                "--threshold {t}: a threshold must be a finite number"
            )));
        }
        if let Some(r) = choice.fpr
            && !(r.is_finite() && r > 0.0 && r < 1.0)
        {
            return Err(Error::InvalidArgument(format!(
                "--fpr {r}: a rate above 0 and below 1"
            )));
        }
        let artifact = Artifact::read(path)?;
        let header = &artifact.header;
        if !header.threshold.is_finite() {
            return Err(Error::invalid_file(
                path,
                "its threshold is not a finite number",
            ));
        }
        let config = header.config.clone();
        let runner = load_teachers(&config.settings, weights, &device)?;
        let stats = artifact.statistics(runner.as_deref())?;
        let model = artifact.model(&device)?;
        let normaliser = header.deployed.normaliser;
        // The calibration images' scores in the chosen column, per image and per patch.
        let normal = &header.normal;
        let per_input: Vec<f64> = (0..normal.scores.len())
            .map(|i| column.score(&normal.scores, i, &normaliser))
            .collect();
        let rate = choice.fpr.unwrap_or(header.threshold_rate);
        let source = header.deployed.decision.as_ref().map_or_else(
            || crate::scoring::threshold::TRAINING.to_string(),
            |d| d.calibration.source.clone(),
        );
        // Full-cut models have heatmaps, and so a pixel threshold.
        let offsets = match config.dataset() {
            DatasetKind::Cifar10 => None,
            _ => Some(
                FullCut::new(config.full_size, config.settings.image_size, config.stride)?
                    .offsets(),
            ),
        };
        let cut = offsets
            .as_deref()
            .map(|o| (o, config.full_size, config.settings.image_size));
        let calibration = Calibration::from_inputs(
            &per_input,
            (&normal.groups, normal.images),
            rate,
            &source,
            cut,
        )
        .map_err(|e| Error::invalid_file(path, format!("its calibration scores: {e}")))?;
        let threshold = match (choice.threshold, choice.fpr, column) {
            (Some(t), _, _) => t,
            (None, None, ScoreColumn::Nor) => header.threshold,
            _ => calibration.threshold,
        };
        let pixel_threshold = calibration.pixel_threshold;
        let calibration_note = choice
            .threshold
            .is_none()
            .then_some(calibration.note)
            .flatten();
        Ok(Self {
            config,
            model,
            runner,
            stats,
            normaliser,
            column,
            threshold,
            masks: false,
            operating_point: choice
                .threshold
                .is_none()
                .then(|| (rate, format!("{} {source}", normal.images))),
            pixel_threshold,
            calibration_note,
            device,
        })
    }

    /// The network inputs of an image file, as in training: the image as the networks saw it,
    /// the inputs, their offsets in it, and the file's own size (width, height).
    #[allow(clippy::type_complexity)]
    fn inputs(
        &self,
        path: &Path,
    ) -> Result<(
        FloatImage,
        Vec<FloatImage>,
        Vec<(usize, usize)>,
        (usize, usize),
    )> {
        let rgb = decode_rgb8(path)?;
        let (w, h) = rgb.dimensions();
        let original = (w as usize, h as usize);
        let image = normalize_rgb8(rgb.as_raw(), w as usize, h as usize)?;
        let c = &self.config;
        if c.dataset() == DatasetKind::Cifar10 {
            let resized = resize_bilinear(&image, c.cifar_resize, c.cifar_resize)?;
            let input = center_crop(&resized, c.settings.image_size, c.settings.image_size)?;
            return Ok((input.clone(), vec![input], vec![(0, 0)], original));
        }
        let full = resize_bilinear(&image, c.full_size, c.full_size)?;
        let cut = FullCut::new(c.full_size, c.settings.image_size, c.stride)?;
        let offsets = cut.offsets();
        let patches = offsets
            .iter()
            .map(|&(y, x)| crop(&full, y, x, c.settings.image_size, c.settings.image_size))
            .collect::<Result<Vec<_>>>()?;
        Ok((full, patches, offsets, original))
    }

    /// Scores one image; writes its heatmaps into `<out>/heatmaps` (and, with
    /// [`Detector::masks`], its mask into `<out>/masks`) when `out` is given.
    pub fn score(&self, path: &Path, heatmaps: Heatmaps, out: Option<&Path>) -> Result<Scored> {
        let (full, inputs, offsets, original) = self.inputs(path)?;
        let n = inputs.len();
        let teachers = match (&self.runner, &self.stats) {
            (Some(runner), Some(stats)) => {
                let z = z_scores_host(&runner.raw(&inputs)?, stats);
                Some(Tensor::from_data(
                    TensorData::new(z, [n, runner.len(), crate::students::EMBEDDING_DIM]),
                    &self.device,
                ))
            }
            _ => None,
        };
        let images = images_tensor(&inputs, &self.device);
        let raw = self
            .model
            .scores(InputBatch {
                images: images.clone(),
                teachers,
            })
            .to_host()?;
        let patch_scores: Vec<f64> = (0..n)
            .map(|i| self.column.score(&raw, i, &self.normaliser))
            .collect();
        let top = (0..n)
            .max_by(|&a, &b| patch_scores[a].total_cmp(&patch_scores[b]))
            .expect("at least one input");
        let score = patch_scores[top];
        if !score.is_finite() {
            return Err(Error::Training(format!(
                "the score of {} is not finite",
                path.display()
            )));
        }
        let heatmap_dir = out.map(|o| o.join(HEATMAPS_DIR));
        let dir = heatmap_dir
            .as_deref()
            .filter(|_| heatmaps != Heatmaps::None);
        let mut output_error = None;
        // A heatmap that cannot be written is this command's output problem, not the
        // image's: the score is kept.
        let mut written = |out: PathBuf, png: &[u8]| match write_atomic(&out, png) {
            Ok(()) => Some(out),
            Err(e) => {
                output_error.get_or_insert(e.to_string());
                None
            }
        };
        let heatmap = match dir {
            Some(dir) => {
                let out = dir.join(heatmap_name(path, "heatmap"));
                let png = heatmap_png(
                    &full,
                    &patch_scores,
                    &offsets,
                    self.config.settings.image_size,
                    self.threshold,
                )?;
                written(out, &png)
            }
            None => None,
        };
        let residual = match dir.filter(|_| heatmaps == Heatmaps::ScoresAndResiduals) {
            Some(dir) => {
                let out = dir.join(heatmap_name(path, "residual"));
                let side = self.config.settings.image_size;
                let squared = (self.model.reconstruct(images.clone()) - images)
                    .powi_scalar(2)
                    .mean_dim(1)
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .map_err(|e| Error::Training(format!("reading the residual: {e:?}")))?;
                let png = residual_png(&full, &squared, &offsets, side)?;
                written(out, &png)
            }
            None => None,
        };
        let mask = match (out, self.masks, self.pixel_threshold) {
            (Some(out), true, Some(t)) => {
                let side = self.config.settings.image_size;
                let map = patch_map(&patch_scores, &offsets, full.height, side);
                let png = mask_png(&map, full.height, original, t)?;
                written(out.join(MASKS_DIR).join(heatmap_name(path, "mask")), &png)
            }
            _ => None,
        };
        Ok(Scored {
            score,
            anomalous: score > self.threshold,
            mask,
            as_z: raw.as_z[top],
            as_cossim: raw.as_cossim[top],
            as_rec: raw.as_rec[top],
            patch_scores,
            heatmap,
            residual,
            output_error,
        })
    }

    /// Scores every image in `paths` (files, or folders searched for images); an image that
    /// fails is a row with its error. Writes `detections.csv` (and heatmaps) into `out`.
    pub fn run(&self, paths: &[PathBuf], out: &Path, heatmaps: Heatmaps) -> Result<Vec<Detection>> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let found = images_below(p)?;
                if found.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: no images in this folder",
                        p.display()
                    )));
                }
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let progress = Progress::start("scoring images", files.len() as u64);
        let detections: Vec<Detection> = files
            .into_iter()
            .map(|path| {
                progress.advance(1);
                let outcome = if path.is_file() && !is_image(&path) {
                    Err("not an image file this build reads".to_string())
                } else {
                    self.score(&path, heatmaps, Some(out))
                        .map_err(|e| e.to_string())
                };
                Detection { path, outcome }
            })
            .collect();
        let column = match self.column {
            ScoreColumn::Nor => "nor".to_string(),
            ScoreColumn::Mix(i, _) => column_names()[i].clone(),
        };
        let note = format!(
            "{} class, column {column}, threshold {:e} ({}){}",
            self.config.settings.student,
            self.threshold,
            self.operating_point
                .as_ref()
                .map_or("given".to_string(), |(rate, on)| format!(
                    "false-positive rate {rate} on {on}"
                )),
            self.config
                .reduced()
                .map_or(String::new(), |n| format!("; {n}"))
        );
        write_detections(&out.join(DETECTIONS_FILE), &note, &detections)?;
        Ok(detections)
    }
}

/// The images in `dir` and its subfolders, sorted, folder by folder; each folder and each
/// file once, however symbolic links lead back to them (a link loop ends the walk there).
fn images_below(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(
        dir: &Path,
        seen_dirs: &mut HashSet<PathBuf>,
        seen_files: &mut HashSet<PathBuf>,
        found: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let real = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if !seen_dirs.insert(real) {
            tracing::warn!(
                "{}: already visited (a symbolic link loop?), skipped",
                dir.display()
            );
            return Ok(());
        }
        for image in list_images(dir)? {
            let real = image.canonicalize().unwrap_or_else(|_| image.clone());
            if seen_files.insert(real) {
                found.push(image);
            }
        }
        for sub in sorted_subfolders(dir)? {
            walk(&dir.join(sub), seen_dirs, seen_files, found)?;
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir, &mut HashSet::new(), &mut HashSet::new(), &mut found)?;
    Ok(found)
}

fn heatmap_name(path: &Path, kind: &str) -> String {
    let stem = path
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().into_owned());
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map_or(String::new(), |s| format!("{}_", s.to_string_lossy()));
    format!("{parent}{stem}_{kind}.png")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn folder_walks_end_at_link_loops_and_visit_each_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let png = crate::output::png_bytes(&image::RgbImage::new(2, 2), "test").unwrap();
        std::fs::write(root.join("a/one.png"), &png).unwrap();
        std::fs::write(root.join("a/b/two.png"), &png).unwrap();
        // A loop back to the top, and a second name for a folder already walked.
        std::os::unix::fs::symlink(&root, root.join("a/b/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("a/b"), root.join("again")).unwrap();
        let found = images_below(&root).unwrap();
        let names: Vec<String> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["one.png", "two.png"]);
    }

    #[test]
    fn columns_parse_by_name() {
        assert_eq!(ScoreColumn::parse("nor").unwrap(), ScoreColumn::Nor);
        assert!(matches!(
            ScoreColumn::parse("AS_rec").unwrap(),
            ScoreColumn::Mix(2, _)
        ));
        let err = ScoreColumn::parse("best").unwrap_err().to_string();
        assert!(err.contains("AS_z"), "{err}");
    }
}
