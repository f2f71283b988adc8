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
use crate::output::{png_bytes, write_atomic};
use crate::progress::Progress;
use crate::scoring::Mix;
use crate::scoring::evaluation::{Normaliser, RawScores, column_mixes, column_names, group_max};
use crate::scoring::threshold::calibrate;
use crate::teachers::{TeacherStatistics, WeightsLocation};
use crate::training::inputs::images_tensor;
use crate::training::model::{InputBatch, MtadModel};
use crate::training::prepare::load_teachers;
use crate::training::teacher_runner::{TeacherRunner, z_scores_host};
use crate::{Error, Result};

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
    device: Device,
}

impl Detector {
    /// Loads class `class` (name or index) of the run in `run` (its `<class>/model.mtad`).
    pub fn load(
        run: &Path,
        class: &str,
        column: ScoreColumn,
        threshold: Option<f64>,
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
        Self::from_artifact(&path, column, threshold, weights, device)
    }

    /// Loads a class's artifact (`model.mtad`), refusing other teachers than its own.
    pub fn from_artifact(
        path: &Path,
        column: ScoreColumn,
        threshold: Option<f64>,
        weights: &WeightsLocation,
        device: Device,
    ) -> Result<Self> {
        if let Some(t) = threshold
            && !t.is_finite()
        {
            return Err(Error::InvalidArgument(format!(
                "--threshold {t}: a threshold must be a finite number"
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
        let normaliser = header.best.normaliser;
        let threshold = match (threshold, column) {
            (Some(t), _) => t,
            (None, ScoreColumn::Nor) => header.threshold,
            (None, _) => {
                let normal = &header.normal;
                let per_input: Vec<f64> = (0..normal.scores.len())
                    .map(|i| column.score(&normal.scores, i, &normaliser))
                    .collect();
                calibrate(
                    &group_max(&per_input, &normal.groups, normal.images),
                    header.threshold_rate,
                )?
            }
        };
        Ok(Self {
            config,
            model,
            runner,
            stats,
            normaliser,
            column,
            threshold,
            device,
        })
    }

    /// The network inputs of an image file, as in training.
    fn inputs(&self, path: &Path) -> Result<(FloatImage, Vec<FloatImage>, Vec<(usize, usize)>)> {
        let rgb = decode_rgb8(path)?;
        let (w, h) = rgb.dimensions();
        let image = normalize_rgb8(rgb.as_raw(), w as usize, h as usize)?;
        let c = &self.config;
        if c.dataset() == DatasetKind::Cifar10 {
            let resized = resize_bilinear(&image, c.cifar_resize, c.cifar_resize)?;
            let input = center_crop(&resized, c.settings.image_size, c.settings.image_size)?;
            return Ok((input.clone(), vec![input], vec![(0, 0)]));
        }
        let full = resize_bilinear(&image, c.full_size, c.full_size)?;
        let cut = FullCut::new(c.full_size, c.settings.image_size, c.stride)?;
        let offsets = cut.offsets();
        let patches = offsets
            .iter()
            .map(|&(y, x)| crop(&full, y, x, c.settings.image_size, c.settings.image_size))
            .collect::<Result<Vec<_>>>()?;
        Ok((full, patches, offsets))
    }

    /// Scores one image; writes its heatmaps into `dir` when given.
    pub fn score(&self, path: &Path, heatmaps: Heatmaps, dir: Option<&Path>) -> Result<Scored> {
        let (full, inputs, offsets) = self.inputs(path)?;
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
        let dir = dir.filter(|_| heatmaps != Heatmaps::None);
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
        Ok(Scored {
            score,
            anomalous: score > self.threshold,
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
        let heatmap_dir = out.join("heatmaps");
        let progress = Progress::start("scoring images", files.len() as u64);
        let detections: Vec<Detection> = files
            .into_iter()
            .map(|path| {
                progress.advance(1);
                let outcome = if path.is_file() && !is_image(&path) {
                    Err("not an image file this build reads".to_string())
                } else {
                    self.score(&path, heatmaps, Some(&heatmap_dir))
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
            "{} class, column {column}, threshold {:e}{}",
            self.config.settings.student,
            self.threshold,
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

/// The image (as the networks saw it) with the patch scores over it: each pixel takes the max
/// score of the patches covering it; scores at or above the threshold are red, lower ones fade
/// from yellow to transparent.
fn heatmap_png(
    image: &FloatImage,
    scores: &[f64],
    offsets: &[(usize, usize)],
    side: usize,
    threshold: f64,
) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let mut map = vec![f64::NEG_INFINITY; h * w];
    for (&s, &(y0, x0)) in scores.iter().zip(offsets) {
        for y in y0..(y0 + side).min(h) {
            for x in x0..(x0 + side).min(w) {
                let m = &mut map[y * w + x];
                *m = m.max(s);
            }
        }
    }
    let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
    overlay_png(image, &map, lo, threshold)
}

/// The image with the student's reconstruction residual over it: per pixel, the squared error
/// averaged over the colour channels and over the patches covering it; red at the image's
/// largest residual, fading to transparent at its smallest.
/// `squared` is `[patches, side, side]` in input order.
fn residual_png(
    image: &FloatImage,
    squared: &[f32],
    offsets: &[(usize, usize)],
    side: usize,
) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let mut sum = vec![0f64; h * w];
    let mut count = vec![0u32; h * w];
    for (p, &(y0, x0)) in offsets.iter().enumerate() {
        for y in 0..side.min(h - y0) {
            for x in 0..side.min(w - x0) {
                let i = (y0 + y) * w + x0 + x;
                sum[i] += squared[(p * side + y) * side + x] as f64;
                count[i] += 1;
            }
        }
    }
    let map: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(&s, &n)| {
            if n > 0 {
                s / n as f64
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let finite = map.iter().copied().filter(|v| v.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    overlay_png(image, &map, lo, hi)
}

/// `image` (values in [-1, 1]) with `map` over it: at or above `high` red, between `low` and
/// `high` from transparent to yellow-orange, not finite: the image alone.
fn overlay_png(image: &FloatImage, map: &[f64], low: f64, high: f64) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let span = (high - low).max(1e-12);
    let mut rgb = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let base: Vec<f64> = (0..3)
                .map(|c| ((image.get(c, y, x) as f64 + 1.0) * 127.5).clamp(0.0, 255.0))
                .collect();
            let v = map[y * w + x];
            let t = if v.is_finite() {
                ((v - low) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (color, alpha) = if v.is_finite() && v >= high {
                ([255.0, 0.0, 0.0], 0.6)
            } else {
                ([255.0, 220.0 * (1.0 - t), 0.0], 0.5 * t)
            };
            let px: Vec<u8> = (0..3)
                .map(|c| (base[c] * (1.0 - alpha) + color[c] * alpha).round() as u8)
                .collect();
            rgb.put_pixel(x as u32, y as u32, image::Rgb([px[0], px[1], px[2]]));
        }
    }
    png_bytes(&rgb, "a heatmap")
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
