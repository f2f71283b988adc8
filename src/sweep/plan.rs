//! `mtad sweep plan`: checks the settings and the dataset, then writes the sweep folder: the
//! plan (`sweep.json`), the Slurm array script, the Kubernetes Indexed Job and the
//! Containerfile (see [`super::render`]).

use std::path::{Path, PathBuf};

use super::{Cluster, PLAN_FILE, PLAN_VERSION, Plan, Task, render};
use crate::config::{TrainSettings, check_decision_settings};
use crate::output::write_atomic;
use crate::students::StudentKind;
use crate::training::prepare::{check_writable, open_dataset};
use crate::{Error, Result};

/// What `mtad sweep plan` was asked for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// `train`'s settings (`student` is replaced by each of `students`; `classes` lists the
    /// classes of the sweep). A `cache_dir` of `None` means `<out>/cache`.
    pub settings: TrainSettings,
    pub cache_dir: Option<PathBuf>,
    pub students: Vec<StudentKind>,
    pub out: PathBuf,
    pub cluster: Cluster,
}

/// Absolute `path` (relative to the current folder), without touching the filesystem.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path, e))
}

/// Checks the request, writes the sweep folder and returns the plan. Planning the same sweep
/// again rewrites the scripts; a different sweep in a planned folder is refused.
pub fn plan(request: PlanRequest) -> Result<Plan> {
    let r = request;
    let invalid = |m: String| Error::InvalidArgument(m);
    let mut students = Vec::new();
    for s in &r.students {
        if !students.contains(s) {
            students.push(*s);
        }
    }
    if students.is_empty() {
        return Err(invalid("--students: name at least one student".into()));
    }
    let c = &r.cluster;
    if c.concurrency == 0 {
        return Err(invalid("--concurrency must be at least 1".into()));
    }
    if !["cuda", "wgpu", "cpu"].contains(&c.backend.as_str()) {
        return Err(invalid(format!(
            "--backend {}: cuda, wgpu or cpu",
            c.backend
        )));
    }
    let s = &r.settings;
    let dataset = s
        .dataset
        .ok_or_else(|| invalid("--dataset is missing: give it, or a --config FILE".into()))?;
    let data_root = s
        .data_root
        .clone()
        .ok_or_else(|| invalid("--data-root is missing: give it, or a --config FILE".into()))?;
    if !(s.lr.is_finite() && s.lr > 0.0) {
        return Err(invalid(format!("--lr {} must be a positive number", s.lr)));
    }
    if s.image_size % 32 != 0 {
        return Err(invalid(format!(
            "--image-size {} must be a multiple of 32",
            s.image_size
        )));
    }
    check_decision_settings(s).map_err(invalid)?;
    let data_root = absolute(&data_root)?;
    let (_, names, indices) = open_dataset(dataset, &data_root, &s.classes)?;
    let classes: Vec<String> = indices.iter().map(|&i| names[i].clone()).collect();

    let out = absolute(&r.out)?;
    let cache_dir = absolute(&r.cache_dir.clone().unwrap_or_else(|| out.join("cache")))?;
    check_writable(&out)?;
    check_writable(&cache_dir)?;
    let mut tasks = Vec::new();
    for class in &classes {
        for &student in &students {
            tasks.push(Task {
                index: tasks.len(),
                student,
                class: class.clone(),
                run: Path::new("runs")
                    .join(student.name())
                    .join(file_safe(class)),
            });
        }
    }
    let mut cluster = r.cluster.clone();
    cluster.mtad = absolute(&cluster.mtad)?;
    cluster.teacher_weights = cluster
        .teacher_weights
        .as_deref()
        .map(absolute)
        .transpose()?;
    let plan = Plan {
        version: PLAN_VERSION,
        settings: TrainSettings {
            dataset: Some(dataset),
            data_root: Some(data_root),
            student: students[0],
            classes: classes.join(","),
            cache_dir,
            ..s.clone()
        },
        students,
        classes,
        tasks,
        cluster,
    };
    if out.join(PLAN_FILE).is_file() {
        let old = Plan::read(&out)?;
        if old.tasks != plan.tasks || old.settings != plan.settings {
            return Err(invalid(format!(
                "{} already holds another sweep ({} tasks): plan into a new --out, or delete \
                 its {PLAN_FILE} if none of its tasks matter",
                out.display(),
                old.tasks.len()
            )));
        }
    }
    plan.write(&out)?;
    write_atomic(&out.join("slurm.sh"), render::slurm(&plan, &out).as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let script = out.join("slurm.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(&script, e))?;
    }
    write_atomic(&out.join("job.yaml"), render::job(&plan, &out).as_bytes())?;
    write_atomic(
        &out.join("Containerfile"),
        render::containerfile(&plan).as_bytes(),
    )?;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out.join("logs"), e))?;
    Ok(plan)
}

/// A class name as a folder name (the dataset's names are folder names already; CIFAR-10's
/// are plain words): anything but letters, digits, `-`, `_` and `.` becomes `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
