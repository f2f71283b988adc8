//! One task of a sweep: its state (`mtad sweep status`) and its run (`mtad sweep run`), which
//! starts it, resumes it from its checkpoint, or does nothing when it is finished.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

use super::{ERROR_FILE, Plan, Task};
use crate::output::lock::{LOCK_FILE, host_name, process_alive, read_owner};
use crate::output::run_folder::{CONFIG_FILE, class_dir, read_progress};
use crate::output::{read_json, write_json};
use crate::teachers::WeightsLocation;
use crate::training::prepare::{TrainRequest, prepare};
use crate::training::run::RunSummary;
use crate::{Error, Result};

/// Where a task stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum TaskState {
    /// Not started, or stopped (preempted, killed) and waiting to be resumed.
    Pending {
        /// Where a started task resumes (`epoch 100`), none if it never started.
        resumes_at: Option<String>,
    },
    /// A live process holds its run folder.
    Running { host: String, pid: u32 },
    /// Its class is complete: the deployed evaluation's AUCs.
    Finished {
        oracle: Option<f64>,
        nor: Option<f64>,
    },
    /// Its last attempt ended with an error.
    Failed { error: String },
}

impl TaskState {
    /// `pending`, `running`, `finished` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending { .. } => "pending",
            Self::Running { .. } => "running",
            Self::Finished { .. } => "finished",
            Self::Failed { .. } => "failed",
        }
    }

    /// One line for a person.
    pub fn detail(&self) -> String {
        let n = |v: &Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
        match self {
            Self::Pending { resumes_at: None } => String::new(),
            Self::Pending {
                resumes_at: Some(at),
            } => format!("started; resumes from {at}"),
            Self::Running { host, pid } => format!("pid {pid} on {host}"),
            Self::Finished { oracle, nor } => format!("oracle {}, nor {}", n(oracle), n(nor)),
            Self::Failed { error } => error.clone(),
        }
    }
}

/// `error.json` of a failed task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskError {
    pub error: String,
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// A task's run folder.
pub fn run_dir(sweep: &Path, task: &Task) -> PathBuf {
    sweep.join(&task.run)
}

/// The state of `task`, from its run folder.
pub fn state(sweep: &Path, task: &Task) -> Result<TaskState> {
    let run = run_dir(sweep, task);
    if let Some(owner) = read_owner(&run.join(LOCK_FILE))
        && (owner.host != host_name() || process_alive(owner.pid))
    {
        return Ok(TaskState::Running {
            host: owner.host,
            pid: owner.pid,
        });
    }
    let progress = read_progress(&class_dir(&run, &task.class))?;
    if let Some(p) = &progress
        && p.complete
        && let Some(d) = p.deployed()
    {
        let side = p.side_by_side();
        return Ok(TaskState::Finished {
            oracle: side.reference.map(|r| r.1),
            nor: d.evaluation.as_ref().map(|e| e.nor),
        });
    }
    let error = run.join(ERROR_FILE);
    if error.is_file() {
        let e: TaskError = read_json(&error)?;
        return Ok(TaskState::Failed { error: e.error });
    }
    let resumes_at = run.join(CONFIG_FILE).is_file().then(|| {
        progress
            .and_then(|p| p.checkpoint_epoch)
            .map_or("the start (no checkpoint yet)".into(), |e| {
                format!("the checkpoint of epoch {e}")
            })
    });
    Ok(TaskState::Pending { resumes_at })
}

/// What `mtad sweep run` did.
#[derive(Debug)]
pub enum TaskRun {
    /// The task was finished already: nothing was done.
    AlreadyFinished,
    /// Another live process runs it: nothing was done.
    RunningElsewhere { host: String, pid: u32 },
    /// Trained (started or resumed) to the end.
    Trained(Box<RunSummary>),
}

/// How to run a task here.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub sweep: PathBuf,
    pub index: usize,
    pub device: Device,
    pub device_name: String,
    /// Overrides the plan's `--teacher-weights`.
    pub teacher_weights: Option<PathBuf>,
    pub plain: bool,
}

/// Runs task `index` of the sweep to its end: starts it, resumes it, or does nothing when it is
/// finished or running elsewhere. A failure is recorded in its `error.json` (a stop by a
/// signal is not: the task is pending and resumes); a success removes that file.
pub fn run(request: TaskRequest) -> Result<TaskRun> {
    let plan = Plan::read(&request.sweep)?;
    let task = plan.task(request.index)?.clone();
    let dir = run_dir(&request.sweep, &task);
    match state(&request.sweep, &task)? {
        TaskState::Finished { .. } => return Ok(TaskRun::AlreadyFinished),
        TaskState::Running { host, pid } => return Ok(TaskRun::RunningElsewhere { host, pid }),
        _ => {}
    }
    let resume = dir.join(CONFIG_FILE).is_file();
    tracing::info!(
        "sweep task {} of {}: {} student, class {}, {} in {}",
        task.index,
        plan.tasks.len(),
        task.student,
        task.class,
        if resume { "resuming" } else { "starting" },
        dir.display()
    );
    let weights = request
        .teacher_weights
        .clone()
        .or(plan.cluster.teacher_weights.clone())
        .map_or(WeightsLocation::Build, WeightsLocation::Dir);
    let train = TrainRequest {
        settings: plan.task_settings(&task),
        teacher_weights: weights,
        out: dir.clone(),
        cover: !resume,
        resume,
        device: request.device.clone(),
        device_name: request.device_name.clone(),
        plain: request.plain,
    };
    let result = prepare(train).and_then(|prepared| prepared.run());
    let error_file = dir.join(ERROR_FILE);
    match result {
        Ok(summary) => {
            if error_file.exists() {
                std::fs::remove_file(&error_file).map_err(|e| Error::io(&error_file, e))?;
            }
            Ok(TaskRun::Trained(Box::new(summary)))
        }
        Err(e) => {
            if !matches!(e, Error::Interrupted { .. }) {
                let record = TaskError {
                    error: e.to_string(),
                    host: host_name(),
                    pid: std::process::id(),
                    at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                if let Err(w) = write_json(&error_file, &record) {
                    tracing::warn!("cannot record the failure: {w}");
                }
            }
            Err(e)
        }
    }
}
