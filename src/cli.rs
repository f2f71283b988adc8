//! The command line of `mtad`: commands and options. Every option is explained in `--help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::device::DeviceChoice;

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
