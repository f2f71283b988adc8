//! The command line of `mtad`: commands and options. Every option is explained in `--help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::device::DeviceChoice;
use crate::students::StudentKind;
use crate::training::run::TeacherChoice;

/// Multi-teacher knowledge distillation for anomaly detection (MVTec AD, CIFAR-10, your folders).
#[derive(Debug, Parser)]
#[command(name = "mtad", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a dataset before a long run: print what was found and every problem; exit non-zero
    /// when it cannot be used.
    Inspect(InspectArgs),
    /// List the teachers compiled into this binary, verify their weights and run them once on a
    /// seeded random batch.
    Teachers(TeachersArgs),
    /// Train students on the normal images of each class and evaluate them (ROC AUC) every
    /// --eval-every epochs; writes models, scores and the reference's CSV tables to --out.
    Train(Box<TrainArgs>),
    /// Rescore a trained run (the reference's inference script): each class's best models and
    /// teacher statistics score its test set again; writes `<run>/infer/Eval_<student>.csv`
    /// with the 69 columns and the leakage-free `nor`.
    Infer(InferArgs),
    /// The multi-student ensemble (the reference's multi-student evaluation): per score kind,
    /// each run's test scores min-max normalised and summed over the runs, then the 69 columns
    /// and the leakage-free nor; writes `<out>/eval_<dataset>.csv`.
    Ensemble(EnsembleArgs),
    /// Score new images with a trained class: per image the score (default the leakage-free
    /// nor), a decision against a threshold calibrated on normal training images only, the raw
    /// scores, and a heatmap PNG of the patch scores over the image.
    Detect(DetectArgs),
    /// Summarise a trained run: per-class ROC curves (PNG) and a Markdown report with the
    /// oracle and leakage-free AUCs side by side, the pixel AUROC where masks exist, and the
    /// reference's published numbers next to ours.
    Report(ReportArgs),
    /// The CPU demo: write the procedural dataset, train all three students for a few epochs
    /// with the tiny teachers at 32x32, print the AUC table (also what `mtad` with no arguments
    /// runs).
    Demo(DemoArgs),
    /// Write the small procedural dataset (MVTec layout: two textures, two objects, local
    /// defects with masks) that the CPU demo trains on.
    DemoData(DemoDataArgs),
}

/// The kinds of dataset the tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// MVTec AD: `<category>/train/good`, `<category>/test/<good|defect>`,
    /// `<category>/ground_truth/<defect>/*_mask.png`, the 15 categories.
    Mvtec,
    /// One-class CIFAR-10: `cifar-10-batches-py` (or `cifar-10-batches-bin`) or its parent.
    Cifar10,
    /// Your own data in the MVTec layout, any category and defect names, masks optional.
    Folder,
}

/// `--device`, shared by every command that computes.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Where to compute: `auto` takes CUDA, then a wgpu GPU, then the CPU, among the backends
    /// compiled in (`cargo build --features cuda` or `--features wgpu` adds them).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

/// Which teachers, and where their weights are.
#[derive(Debug, Clone, Args)]
pub struct TeacherArgs {
    /// Use the tiny random fixture teachers instead of the real ImageNet ones (quick CPU trials;
    /// every output of such a run says so).
    #[arg(long)]
    pub tiny_teachers: bool,
    /// Folder holding the teachers' `<name>.bpk` weights. Default: the files `cargo build` wrote
    /// next to the generated code (or embedded, for the tiny teachers). Also read from the
    /// environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// What kind of dataset `--data-root` holds.
    #[arg(long, value_enum)]
    pub dataset: DatasetKind,
    /// The dataset's root folder.
    #[arg(long, value_name = "DIR")]
    pub data_root: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct DemoDataArgs {
    /// Folder to write the dataset into (created if needed; existing files are replaced).
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    pub out: PathBuf,
    /// Seed of the generator: the same seed writes the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(32..=1024))]
    pub image_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct TeachersArgs {
    #[command(flatten)]
    pub teachers: TeacherArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Batch size of the check's random input.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: u32,
    /// Height and width of the check's random input (the method uses 224).
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(32..=1024))]
    pub image_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// What kind of dataset --data-root holds.
    #[arg(long, value_enum)]
    pub dataset: DatasetKind,
    /// The dataset's root folder (MVTec/folder: the folder of categories; CIFAR-10:
    /// cifar-10-batches-py, cifar-10-batches-bin or their parent).
    #[arg(long, value_name = "DIR")]
    pub data_root: PathBuf,
    /// Student architecture: resnet (resnet18), vgg (vgg11) or densenet (densenet121).
    #[arg(long, value_enum, default_value_t = StudentKind::Resnet)]
    pub student: StudentKind,
    /// Normal classes to train, one after the other: `all`, indices and ranges (`0-14`,
    /// `3,5-7`) or names (`bottle,screw`; CIFAR-10: `airplane,cat`; folder: category names).
    #[arg(long, default_value = "all")]
    pub classes: String,
    /// Training epochs per class.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,
    /// Evaluate (ROC AUC on the test set, keep the best models, checkpoint) every N epochs and
    /// at the last epoch.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_every: u32,
    /// CIFAR-10 batch size for training and evaluation. MVTec/folder batches are always the
    /// reference's 4 images, each giving 16 random crops (64 inputs).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub batch_size: u32,
    /// Adam learning rate (PyTorch defaults otherwise: betas 0.9/0.999, eps 1e-8).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the data order and the random crops (the networks' initialisation is random).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run directory to write. Without --cover an existing directory is kept and a numeric
    /// suffix is added (`models/exp_1`), as the reference does.
    #[arg(long, value_name = "DIR", default_value = "models/exp")]
    pub out: PathBuf,
    /// Write into --out even if it exists (files of the same name are replaced).
    #[arg(long, conflicts_with = "resume")]
    pub cover: bool,
    /// Continue an interrupted run in --out from its last checkpoint (same options as the first
    /// time); finished classes are skipped.
    #[arg(long)]
    pub resume: bool,
    /// Also keep the models of every evaluation in `<class>/epoch-<N>/` (the best evaluation's
    /// are always kept, with all scoring needs, in `<class>/model.mtad`).
    #[arg(long)]
    pub save_model: bool,
    /// Teachers: `all` (the method), `resnet152` (single-teacher ablation) or `none` (no-teacher
    /// ablation: an autoencoder scored by AS_rec).
    #[arg(long, value_enum, default_value_t = TeacherChoice::All)]
    pub teachers: TeacherChoice,
    /// Side of the network inputs. The method uses 224; smaller multiples of 32 (with
    /// --tiny-teachers) make quick CPU trials. MVTec images are resized and cut to scale
    /// (224 -> 1024 images, stride 200; 32 -> 148, stride 29).
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(32..=1024))]
    pub image_size: u32,
    /// MVTec/folder: draw N crop offsets per image once and cache their teacher embeddings, so
    /// the teachers never run during training (default: the reference's fresh random crops,
    /// teachers run on every batch).
    #[arg(long, value_name = "N")]
    pub crop_pool: Option<u32>,
    /// MVTec/folder: random crops per training batch of 4 images (each offset cuts all 4).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub crops_per_batch: u32,
    /// Folder of the teacher-embedding caches, shared by runs.
    #[arg(long, value_name = "DIR", default_value = "models/cache")]
    pub cache_dir: PathBuf,
    #[command(flatten)]
    pub teacher_source: TeacherArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct InferArgs {
    /// The run directory `mtad train` wrote (holds config.json).
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// The dataset's root folder, if it moved since training (default: the one in config.json).
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// Folder holding the teachers' `<name>.bpk` weights (default: the build's). Also read from
    /// the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct EnsembleArgs {
    /// Run directories of `mtad train`, one per student, on the same data and classes.
    #[arg(long, value_name = "DIR", num_args = 2.., required = true)]
    pub runs: Vec<PathBuf>,
    /// Folder to write `eval_<dataset>.csv` into.
    #[arg(long, value_name = "DIR", default_value = "models/ensemble")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// The run directory `mtad train` wrote.
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// Folder for report.md and the roc_<class>.png curves (default: <run>/report).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DetectArgs {
    /// The run directory `mtad train` wrote (with --class).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "model",
        requires = "class"
    )]
    pub run: Option<PathBuf>,
    /// The trained class of --run to score against, by name or index.
    #[arg(long, value_name = "NAME", requires = "run")]
    pub class: Option<String>,
    /// A class's self-contained model file (`<run>/<class>/model.mtad`), instead of --run and
    /// --class.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["run", "class"])]
    pub model: Option<PathBuf>,
    /// Image files, or folders whose images are all scored.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The score that decides: `nor` (leakage-free, default) or any column of
    /// Eval_<student>.csv (AS_z, AS_cossim, AS_rec, mix_z0.5_cos0.2_rec0.3, ...).
    #[arg(long, default_value = "nor")]
    pub column: String,
    /// Decision threshold: scores above it are anomalous. Default: the score that about 1% of
    /// the class's normal training images exceed.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Folder for detections.csv and heatmaps/ (default: <run>/detect/<class>, or
    /// detect/ beside --model).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not write heatmap PNGs.
    #[arg(long, conflicts_with = "residuals")]
    pub no_heatmaps: bool,
    /// Also write, per image, the student's reconstruction residual (squared error per pixel,
    /// averaged over the colour channels and over the patches covering the pixel) over the
    /// image as `<name>_residual.png`.
    #[arg(long)]
    pub residuals: bool,
    /// Folder holding the teachers' `<name>.bpk` weights (default: the build's). Also read from
    /// the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where to write the demo dataset.
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    pub data: PathBuf,
    /// Where to write the runs (one per student, replaced each time).
    #[arg(long, value_name = "DIR", default_value = "models/demo")]
    pub out: PathBuf,
    /// Training epochs per class (evaluated after the last).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_option_has_help() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "{} --{id} has no help",
                    cmd.get_name()
                );
            }
            for sub in cmd.get_subcommands() {
                assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
                check(sub);
            }
        }
        check(&Cli::command());
    }

    #[test]
    fn a_bad_device_is_rejected_by_the_parser() {
        let err = Cli::try_parse_from(["mtad", "teachers", "--device", "tpu"]).unwrap_err();
        assert!(err.to_string().contains("tpu"));
    }
}
