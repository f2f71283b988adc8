//! The command line of `mtad`: commands and options. Every option is explained in `--help`.
//! Part of the binary: the library never imports from here.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use multi_teacher_ad::config::TrainSettings;
use multi_teacher_ad::data::DatasetKind;
use multi_teacher_ad::device::DeviceChoice;

/// The exit codes, as `--help` and the README list them.
pub mod exit {
    /// Everything asked for was done.
    pub const SUCCESS: u8 = 0;
    /// An error stopped the command (its message says what and which file).
    pub const ERROR: u8 = 1;
    /// The command line was wrong (clap's code; clap exits with it itself).
    #[cfg_attr(not(test), allow(dead_code))]
    pub const USAGE: u8 = 2;
    /// Some inputs could not be read (`detect`: the others were scored).
    pub const UNREADABLE: u8 = 3;
    /// `detect --fail-on-anomaly` found an anomalous image.
    pub const ANOMALY: u8 = 4;
}

const EXIT_CODES: &str = "Exit codes: 0 success; 1 error; 2 usage error; 3 some inputs could not \
be read (detect); 4 anomalies found (detect --fail-on-anomaly); 130 or 143 training stopped by \
Ctrl-C or SIGTERM after writing a checkpoint of its current step (continue with train --resume).

Logging: -v/-q or RUST_LOG (e.g. RUST_LOG=debug); progress bars on standard error when it is a \
terminal; results on standard output.";

/// Multi-teacher knowledge distillation for anomaly detection (MVTec AD, CIFAR-10, your folders).
#[derive(Debug, Parser)]
#[command(name = "mtad", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// More log detail on standard error (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less log detail (-q warnings and errors only, -qq errors only).
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
}

/// How results are printed on standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Lines and tables for a person.
    #[default]
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// `--format`, for the commands whose results scripts read.
#[derive(Debug, Clone, Args)]
pub struct FormatArgs {
    /// How to print the results: `text` or `json` (one JSON document on standard output).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
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
    /// nor), a decision against a threshold calibrated on held-out normal images at a
    /// false-positive rate, the raw scores, a heatmap PNG of the patch scores over the image
    /// and, with --masks, a binary defect mask.
    Detect(DetectArgs),
    /// Summarise a trained run: per-class ROC curves and score histograms (PNG) and a
    /// Markdown report with both protocols' AUCs side by side (reference oracle, label-free
    /// nor), AUPR, F1-max, pixel AUROC and AUPRO where masks exist, AUROC per defect type, the
    /// test FPR and TPR at each threshold, and the reference's published numbers next to ours.
    Report(ReportArgs),
    /// The CPU demo: write the procedural dataset, train all three students for a few epochs
    /// with the tiny teachers at 32x32, print the AUC table (also what `mtad` with no arguments
    /// runs).
    Demo(DemoArgs),
    /// Write the small procedural dataset (MVTec layout: two textures, two objects, local
    /// defects with masks) that the CPU demo trains on.
    DemoData(DemoDataArgs),
    /// List the devices this binary can compute on (`--device` values, backend, name, kind):
    /// the CPU, then each CUDA device and wgpu adapter of the backends compiled in.
    Devices(FormatArgs),
    /// Many machines: plan the protocol as (class, student) tasks for a Slurm array or a
    /// Kubernetes Indexed Job, run one task, follow them, gather their tables (docs/CLUSTER.md).
    Sweep(SweepArgs),
    /// The teacher-embedding cache that runs and sweep tasks share.
    Cache(CacheArgs),
}

/// `--device`, shared by every command that computes.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Where to compute: `auto`, `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`. `auto` takes
    /// CUDA, then a wgpu GPU, then the CPU (never a CPU-emulated wgpu adapter), among the
    /// backends compiled in (`cargo build --features cuda` or `--features wgpu` adds them);
    /// `mtad devices` lists the numbered devices.
    #[arg(long, value_name = "DEVICE", default_value_t = DeviceChoice::Auto)]
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
    #[command(flatten)]
    pub format: FormatArgs,
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
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Read the settings from a TOML or JSON file (keys: the long options' names, with `-` or
    /// `_`, e.g. `epochs = 100`, `data_root = "/data/mvtec"`); options given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run directory to write. Without --cover an existing directory is kept and a numeric
    /// suffix is added (`models/exp_1`), as the reference does.
    #[arg(long, value_name = "DIR", default_value = "models/exp")]
    pub out: PathBuf,
    /// Write into --out even if it exists (files of the same name are replaced).
    #[arg(long, conflicts_with = "resume")]
    pub cover: bool,
    /// Continue an interrupted run in --out from its last checkpoint; its settings are read from
    /// `--out`'s config.json (no other option is needed); finished classes are skipped.
    #[arg(long)]
    pub resume: bool,
    /// Folder holding the teachers' `<name>.bpk` weights (default: the build's). Also read from
    /// the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
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
    #[command(flatten)]
    pub format: FormatArgs,
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
    /// Decision threshold: scores above it are anomalous. Default: the one calibrated at
    /// training (the score that --fpr of the held-out normal images exceed).
    #[arg(long, conflicts_with = "fpr")]
    pub threshold: Option<f64>,
    /// Move the operating point: the threshold becomes the score that this share of the
    /// class's calibration images (its held-out normals, stored in model.mtad) exceed.
    #[arg(long, value_name = "RATE")]
    pub fpr: Option<f64>,
    /// Also write, per image, a binary mask PNG (white: anomalous pixels) at the image's own
    /// size into masks/: the heatmap above a pixel threshold calibrated on the held-out
    /// normals' heatmaps at the same false-positive rate (share of normal pixels flagged).
    #[arg(long)]
    pub masks: bool,
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
    /// Exit with code 4 when any image is anomalous (for scripts and CI gates).
    #[arg(long)]
    pub fail_on_anomaly: bool,
    #[command(flatten)]
    pub format: FormatArgs,
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

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: SweepCommand,
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Write a sweep folder: one task per (class, student) with its own run folder, the plan
    /// (sweep.json), a Slurm array script (slurm.sh), a Kubernetes Indexed Job (job.yaml) and
    /// the Containerfile of its image.
    Plan(Box<SweepPlanArgs>),
    /// Run one task: the index given, or the scheduler's (SLURM_ARRAY_TASK_ID,
    /// JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX). A started task resumes from its
    /// checkpoint; a finished one is left as it is.
    Run(SweepRunArgs),
    /// List every task: pending, running, finished (its AUCs) or failed (its error).
    Status(SweepStatusArgs),
    /// Collect the finished tasks: per student the reference's tables with the means
    /// recomputed and a report, the multi-student ensemble per class, a summary; tasks not
    /// finished are listed, never averaged in.
    Gather(SweepGatherArgs),
}

/// The backend a sweep's container image is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// NVIDIA GPUs (`--features cuda`).
    Cuda,
    /// Any GPU through Vulkan (`--features wgpu`).
    Wgpu,
    /// The CPU only.
    Cpu,
}

#[derive(Debug, Clone, Args)]
pub struct SweepPlanArgs {
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Read the settings from a TOML or JSON file, as `train --config`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The students, comma-separated (default: all three; or the one --student names).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub students: Option<Vec<multi_teacher_ad::students::StudentKind>>,
    /// The sweep folder to write, on a filesystem every job sees.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tasks running at once (Slurm's array limit, the Job's parallelism).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Retries of a failed task (preempted tasks are requeued and resume, not counted).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// GPUs requested per task (0: none; for CPU clusters).
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// The backend the Containerfile builds in.
    #[arg(long, value_enum, default_value_t = Backend::Cuda)]
    pub backend: Backend,
    /// The container image the Kubernetes Job runs (build it with the Containerfile).
    #[arg(long, default_value = "mtad:latest")]
    pub image: String,
    /// The PersistentVolumeClaim the Job mounts: it holds the dataset and the sweep folder.
    #[arg(long, default_value = "mtad-data")]
    pub volume_claim: String,
    /// Where the Job mounts the claim (plan with the paths the pods see under it).
    #[arg(long, value_name = "DIR", default_value = "/data")]
    pub mount: PathBuf,
    /// The mtad binary the Slurm script runs (default: this one).
    #[arg(long, value_name = "FILE")]
    pub mtad: Option<PathBuf>,
    /// An extra `#SBATCH` line for the Slurm script (repeatable), e.g. `--partition=gpu`.
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub slurm_option: Vec<String>,
    /// Folder holding the teachers' `<name>.bpk` weights, for the tasks (default: the
    /// build's). Also read from the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
    /// Where the tasks compute (passed to `sweep run --device`).
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `--sweep`, shared by the sweep commands.
#[derive(Debug, Clone, Args)]
pub struct SweepFolder {
    /// The sweep folder `mtad sweep plan` wrote. Also read from MTAD_SWEEP.
    #[arg(long, env = "MTAD_SWEEP", value_name = "DIR")]
    pub sweep: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct SweepRunArgs {
    #[command(flatten)]
    pub sweep: SweepFolder,
    /// The task to run (default: from SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or
    /// AWS_BATCH_JOB_ARRAY_INDEX).
    #[arg(long)]
    pub index: Option<usize>,
    /// Folder holding the teachers' `<name>.bpk` weights (default: the plan's, else the
    /// build's). Also read from the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SweepStatusArgs {
    #[command(flatten)]
    pub sweep: SweepFolder,
    #[command(flatten)]
    pub format: FormatArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SweepGatherArgs {
    #[command(flatten)]
    pub sweep: SweepFolder,
    /// Folder to write the gathered tables into (default: <sweep>/gathered).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub format: FormatArgs,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Fill the teacher-embedding cache of a dataset's classes once (train's options, or a
    /// sweep's), so that the jobs sharing it only read it.
    Build(Box<CacheBuildArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct CacheBuildArgs {
    #[command(flatten)]
    pub settings: TrainSettings,
    /// Read the settings from a TOML or JSON file, as `train --config`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Take the settings, classes and cache folder of this sweep's plan instead.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub sweep: Option<PathBuf>,
    /// Folder holding the teachers' `<name>.bpk` weights (default: the build's). Also read
    /// from the environment variable MTAD_TEACHER_WEIGHTS.
    #[arg(long, env = "MTAD_TEACHER_WEIGHTS", value_name = "DIR")]
    pub teacher_weights: Option<PathBuf>,
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
    fn train_settings_are_the_flags_and_every_setting_is_a_flag() {
        let cli = Cli::try_parse_from([
            "mtad",
            "train",
            "--dataset",
            "folder",
            "--data-root",
            "d",
            "--eval-every",
            "7",
            "--tiny-teachers",
        ])
        .unwrap();
        let Some(Command::Train(args)) = cli.command else {
            panic!("not train")
        };
        assert_eq!(args.settings.eval_every, 7);
        assert!(args.settings.tiny_teachers);
        let train = Cli::command();
        let train = train.find_subcommand("train").unwrap();
        for key in TrainSettings::keys() {
            assert!(
                train.get_arguments().any(|a| a.get_id() == key.as_str()),
                "the setting {key} is not a flag of train"
            );
        }
    }

    #[test]
    fn exit_codes_are_in_the_help_and_usage_errors_use_clap_s() {
        let usage = Cli::try_parse_from(["mtad", "train", "--epochs", "zero"]).unwrap_err();
        assert_eq!(usage.exit_code(), i32::from(exit::USAGE));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3 some inputs could not"), "{help}");
        assert!(help.contains("4 anomalies found"), "{help}");
    }

    #[test]
    fn a_bad_device_is_rejected_by_the_parser() {
        let err = Cli::try_parse_from(["mtad", "teachers", "--device", "tpu"]).unwrap_err();
        assert!(err.to_string().contains("tpu"));
    }
}
