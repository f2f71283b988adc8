//! Sweeps: the whole protocol as independent (class, student) tasks for a cluster's scheduler
//! (Slurm job arrays, Kubernetes Indexed Jobs, AWS Batch array jobs). Burn has no multi-node
//! training; the tasks need none: each is a one-class `train` run of its own.
//!
//! ```text
//! <sweep>/sweep.json                 the plan: base settings, students, classes, tasks
//! <sweep>/slurm.sh                   the Slurm array script (`sbatch slurm.sh`)
//! <sweep>/job.yaml                   the Kubernetes Indexed Job (`kubectl apply -f job.yaml`)
//! <sweep>/Containerfile              builds the image the Job runs
//! <sweep>/cache/                     the teacher-embedding cache the tasks share
//! <sweep>/runs/<student>/<class>/    each task's run folder; error.json when it failed
//! <sweep>/gathered/                  `sweep gather`: per-student tables, ensemble, reports
//! ```
//!
//! [`plan`] writes the plan, [`task`] runs one task and tells each task's state, [`gather`]
//! collects the finished tasks, [`cache_fill`] fills the shared cache once.

pub mod cache_fill;
pub mod gather;
pub mod plan;
pub mod render;
pub mod task;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainSettings;
use crate::output::{read_json, write_json};
use crate::students::StudentKind;
use crate::{Error, Result};

/// The plan's file in a sweep folder.
pub const PLAN_FILE: &str = "sweep.json";
/// A failed task's error, in its run folder.
pub const ERROR_FILE: &str = "error.json";
/// The environment variables that carry an array job's index, in the order they are read.
pub const INDEX_VARIABLES: [&str; 3] = [
    "SLURM_ARRAY_TASK_ID",
    "JOB_COMPLETION_INDEX",
    "AWS_BATCH_JOB_ARRAY_INDEX",
];
const PLAN_VERSION: u32 = 1;

/// A sweep's plan: `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// The settings every task shares (its student and classes are the task's own).
    pub settings: TrainSettings,
    pub students: Vec<StudentKind>,
    /// The classes' names, in the dataset's order.
    pub classes: Vec<String>,
    /// One per (class, student), class-major: the students of a class are neighbours, so the
    /// jobs running at once mostly share their teacher-embedding caches.
    pub tasks: Vec<Task>,
    /// How the generated scripts run the tasks.
    pub cluster: Cluster,
}

/// One (class, student) task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub index: usize,
    pub student: StudentKind,
    pub class: String,
    /// Its run folder, relative to the sweep folder.
    pub run: PathBuf,
}

/// What the generated Slurm script, Kubernetes Job and Containerfile ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Tasks running at once (Slurm's `%N`, the Job's parallelism).
    pub concurrency: usize,
    /// Retries of a failed task (Slurm: in the script; Kubernetes: backoffLimitPerIndex).
    pub retries: usize,
    /// GPUs per task (0: none requested).
    pub gpus: usize,
    /// The `--device` the tasks run with (`auto`, `cuda`, `wgpu`, `cpu`).
    pub device: String,
    /// The cargo feature the Containerfile builds with: `cuda`, `wgpu` or `cpu` (none).
    pub backend: String,
    /// The `mtad` the Slurm script runs (absolute).
    pub mtad: PathBuf,
    /// The container image the Job runs.
    pub image: String,
    /// The PersistentVolumeClaim the Job mounts, and where.
    pub volume_claim: String,
    pub mount: PathBuf,
    /// `--teacher-weights` of the tasks, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_weights: Option<PathBuf>,
    /// Extra `#SBATCH` lines (`--partition=gpu`, `--time=12:00:00`, ...).
    #[serde(default)]
    pub slurm_options: Vec<String>,
}

impl Plan {
    /// Reads `<sweep>/sweep.json`; errors say what to do.
    pub fn read(sweep: &Path) -> Result<Self> {
        let path = sweep.join(PLAN_FILE);
        if !path.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a sweep folder (no {PLAN_FILE}): plan one with `mtad sweep plan`",
                sweep.display()
            )));
        }
        let plan: Self = read_json(&path)?;
        if plan.version != PLAN_VERSION {
            return Err(Error::invalid_file(
                &path,
                format!(
                    "plan version {}, this mtad reads {PLAN_VERSION}",
                    plan.version
                ),
            ));
        }
        if plan.tasks.iter().enumerate().any(|(i, t)| t.index != i) {
            return Err(Error::invalid_file(
                &path,
                "task indices are not 0, 1, 2, ...",
            ));
        }
        Ok(plan)
    }

    /// Writes `<sweep>/sweep.json` atomically.
    pub fn write(&self, sweep: &Path) -> Result<()> {
        write_json(&sweep.join(PLAN_FILE), self)
    }

    /// Task `index`, or an error naming the valid range.
    pub fn task(&self, index: usize) -> Result<&Task> {
        self.tasks.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "task {index} does not exist: the sweep has {} tasks, 0 to {}",
                self.tasks.len(),
                self.tasks.len().saturating_sub(1)
            ))
        })
    }

    /// The settings of a task: the shared ones with its student and class.
    pub fn task_settings(&self, task: &Task) -> TrainSettings {
        TrainSettings {
            student: task.student,
            classes: task.class.clone(),
            ..self.settings.clone()
        }
    }
}

/// The task index: `given`, else the first of [`INDEX_VARIABLES`] that `var` has; with the
/// variable's name (or `--index`). A malformed value is an error naming the variable.
pub fn resolve_index(
    given: Option<usize>,
    var: impl Fn(&str) -> Option<String>,
) -> Result<(usize, &'static str)> {
    if let Some(i) = given {
        return Ok((i, "--index"));
    }
    for name in INDEX_VARIABLES {
        if let Some(value) = var(name).filter(|v| !v.trim().is_empty()) {
            let index = value.trim().parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "{name}={value:?} is not a task index (a number from 0)"
                ))
            })?;
            return Ok((index, name));
        }
    }
    Err(Error::InvalidArgument(format!(
        "which task? Give --index N, or run it as an array job that sets {}",
        INDEX_VARIABLES.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_comes_from_the_option_then_the_schedulers_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            resolve_index(Some(3), env(&[("SLURM_ARRAY_TASK_ID", "1")])).unwrap(),
            (3, "--index")
        );
        for name in INDEX_VARIABLES {
            let pairs: &'static [(&str, &str)] = match name {
                "SLURM_ARRAY_TASK_ID" => &[("SLURM_ARRAY_TASK_ID", "2")],
                "JOB_COMPLETION_INDEX" => &[("JOB_COMPLETION_INDEX", "2")],
                _ => &[("AWS_BATCH_JOB_ARRAY_INDEX", " 2 ")],
            };
            assert_eq!(resolve_index(None, env(pairs)).unwrap(), (2, name));
        }
        let err = resolve_index(None, env(&[("JOB_COMPLETION_INDEX", "x")])).unwrap_err();
        assert!(err.to_string().contains("JOB_COMPLETION_INDEX"), "{err}");
        let err = resolve_index(None, env(&[])).unwrap_err();
        assert!(err.to_string().contains("--index"), "{err}");
    }
}
