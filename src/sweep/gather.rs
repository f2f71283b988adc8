//! `mtad sweep gather`: the finished tasks of a sweep as the tables of whole runs. Per student,
//! `<out>/<student>/` is a run folder over its finished classes (each class folder a link to its
//! task's), with the reference's `finTS_`/`Eval_` tables written as a run writes them, so the
//! means are recomputed over the classes present, and its report; `<out>/eval_<dataset>.csv` is
//! the multi-student ensemble of every class whose students all finished; `summary.md` and
//! `gather.json` give each task's state. Tasks not finished are named in the tables' notes and
//! the summary, never averaged in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::task::{TaskState, run_dir, state};
use super::{Plan, Task};
use crate::inference::ensemble::ensemble_rows;
use crate::output::report::write_report;
use crate::output::run_folder::{class_dir, read_config, write_config};
use crate::output::tables::{EvalRow, eval_table_path, write_eval_table, write_tables_noted};
use crate::output::{write_atomic, write_json};
use crate::students::StudentKind;
use crate::{Error, Result};

/// One task and its state.
#[derive(Debug, Clone, Serialize)]
pub struct TaskLine {
    pub index: usize,
    pub student: StudentKind,
    pub class: String,
    #[serde(flatten)]
    pub state: TaskState,
}

/// What `gather` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Gathered {
    pub out: PathBuf,
    pub tasks: Vec<TaskLine>,
    /// Per student with a finished task: its `Eval_<student>.csv` and report.
    pub tables: Vec<(StudentKind, PathBuf, PathBuf)>,
    /// The ensemble's table and rows (two students or more, a class finished by all).
    pub ensemble: Option<PathBuf>,
    #[serde(skip)]
    pub ensemble_rows: Vec<EvalRow>,
    pub summary: PathBuf,
}

impl Gathered {
    /// The tasks not finished.
    pub fn missing(&self) -> impl Iterator<Item = &TaskLine> {
        self.tasks
            .iter()
            .filter(|t| !matches!(t.state, TaskState::Finished { .. }))
    }
}

/// Every task's state, in the plan's order.
pub fn states(sweep: &Path, plan: &Plan) -> Result<Vec<TaskLine>> {
    plan.tasks
        .iter()
        .map(|t| {
            Ok(TaskLine {
                index: t.index,
                student: t.student,
                class: t.class.clone(),
                state: state(sweep, t)?,
            })
        })
        .collect()
}

/// `task (student, class): state` for a note.
fn left_out(lines: &[&TaskLine]) -> String {
    lines
        .iter()
        .map(|l| format!("{} ({})", l.class, l.state.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Gathers the sweep in `sweep` into `out` (default `<sweep>/gathered`).
pub fn gather(sweep: &Path, out: Option<&Path>) -> Result<Gathered> {
    let plan = Plan::read(sweep)?;
    let sweep = super::plan::absolute(sweep)?;
    let out =
        super::plan::absolute(&out.map_or_else(|| sweep.join("gathered"), Path::to_path_buf))?;
    let tasks = states(&sweep, &plan)?;
    let finished = |t: &TaskLine| matches!(t.state, TaskState::Finished { .. });
    let task_of = |l: &TaskLine| &plan.tasks[l.index];
    let mut tables = Vec::new();
    for &student in &plan.students {
        let mine: Vec<&TaskLine> = tasks.iter().filter(|t| t.student == student).collect();
        let done: Vec<&Task> = mine
            .iter()
            .filter(|t| finished(t))
            .map(|t| task_of(t))
            .collect();
        let missing: Vec<&TaskLine> = mine.iter().copied().filter(|t| !finished(t)).collect();
        let dir = out.join(student.name());
        if done.is_empty() {
            tracing::warn!("{student}: no finished task, no table");
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut config = read_config(&run_dir(&sweep, done[0]))?;
        let mut indices = Vec::new();
        for task in &done {
            let task_config = read_config(&run_dir(&sweep, task))?;
            indices.extend(task_config.class_indices.iter().copied());
        }
        config.class_indices = indices;
        config.settings.classes = done
            .iter()
            .map(|t| t.class.as_str())
            .collect::<Vec<_>>()
            .join(",");
        // Each task hashed its own class's files; the gathered folder has no single hash.
        config.data_sha256 = String::new();
        for class in &plan.classes {
            link_class(&dir, class, None)?;
        }
        for task in &done {
            let target = class_dir(&run_dir(&sweep, task), &task.class);
            link_class(&dir, &task.class, Some(&target))?;
        }
        write_config(&dir, &config)?;
        let note = (!missing.is_empty()).then(|| {
            format!(
                "sweep tasks not finished, left out of the table and its mean: {}",
                left_out(&missing)
            )
        });
        write_tables_noted(&dir, &config, None, note.as_deref())?;
        let (report, _) = write_report(&dir, &dir.join("report"))?;
        tables.push((student, eval_table_path(&dir, student), report));
    }

    let mut ensemble = None;
    let mut ensemble_rows_all = Vec::new();
    if plan.students.len() >= 2 {
        let mut note = String::new();
        let mut incomplete = Vec::new();
        for class in &plan.classes {
            let lines: Vec<&TaskLine> = tasks.iter().filter(|t| &t.class == class).collect();
            if !lines.iter().all(|l| finished(l)) {
                let not: Vec<String> = lines
                    .iter()
                    .filter(|l| !finished(l))
                    .map(|l| format!("{} {}", l.student, l.state.name()))
                    .collect();
                incomplete.push(format!("{class} ({})", not.join(", ")));
                continue;
            }
            let runs: Vec<PathBuf> = lines.iter().map(|l| run_dir(&sweep, task_of(l))).collect();
            let (rows, class_note, _) = ensemble_rows(&runs)?;
            note = class_note;
            ensemble_rows_all.extend(rows);
        }
        if !ensemble_rows_all.is_empty() {
            if !incomplete.is_empty() {
                note.push_str(&format!(
                    "; sweep classes left out (not every student finished): {}",
                    incomplete.join(", ")
                ));
            }
            let dataset = plan.settings.dataset.map_or("folder", |d| d.name());
            let path = out.join(format!("eval_{dataset}.csv"));
            write_eval_table(&path, Some(&note), &ensemble_rows_all)?;
            ensemble = Some(path);
        }
    }
    let summary = out.join("summary.md");
    let gathered = Gathered {
        out: out.clone(),
        tasks,
        tables,
        ensemble,
        ensemble_rows: ensemble_rows_all,
        summary: summary.clone(),
    };
    write_atomic(
        &summary,
        summary_markdown(&plan, &sweep, &gathered).as_bytes(),
    )?;
    write_json(&out.join("gather.json"), &gathered)?;
    Ok(gathered)
}

/// Makes `<dir>/<class>` a link to `target`, or removes the link with `None` (never a real
/// folder: a gathered folder holds links only).
fn link_class(dir: &Path, class: &str, target: Option<&Path>) -> Result<()> {
    let link = class_dir(dir, class);
    if let Ok(meta) = std::fs::symlink_metadata(&link) {
        if !meta.file_type().is_symlink() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a link that gather made: gather into another --out",
                link.display()
            )));
        }
        std::fs::remove_file(&link).map_err(|e| Error::io(&link, e))?;
    }
    if let Some(target) = target {
        #[cfg(unix)]
        std::os::unix::fs::symlink(target, &link).map_err(|e| Error::io(&link, e))?;
        #[cfg(not(unix))]
        return Err(Error::InvalidArgument(format!(
            "gathering links {} to {}: only on Unix",
            link.display(),
            target.display()
        )));
    }
    Ok(())
}

fn summary_markdown(plan: &Plan, sweep: &Path, g: &Gathered) -> String {
    let mut md = String::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &g.tasks {
        *counts.entry(t.state.name()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(md, "# mtad sweep: {}\n", sweep.display());
    let _ = writeln!(
        md,
        "{} tasks ({} classes x {} students): {}.\n",
        g.tasks.len(),
        plan.classes.len(),
        plan.students.len(),
        counts.join(", ")
    );
    let _ = writeln!(
        md,
        "Image ROC AUC, oracle (reference protocol) / nor (label-free); `-`: not finished or \
         no AUC. Means over the finished classes only.\n"
    );
    let mut header = "| class |".to_string();
    let mut rule = "| --- |".to_string();
    for s in &plan.students {
        let _ = write!(header, " {s} |");
        rule.push_str(" --- |");
    }
    if g.ensemble.is_some() {
        header.push_str(" ensemble |");
        rule.push_str(" --- |");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    let n = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    let mut sums: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); plan.students.len() + 1];
    for class in &plan.classes {
        let mut line = format!("| {class} |");
        for (i, s) in plan.students.iter().enumerate() {
            let cell = g
                .tasks
                .iter()
                .find(|t| &t.class == class && t.student == *s)
                .and_then(|t| match &t.state {
                    TaskState::Finished { oracle, nor } => Some((*oracle, *nor)),
                    _ => None,
                });
            let (o, r) = cell.unwrap_or((None, None));
            sums[i].0.extend(o);
            sums[i].1.extend(r);
            let _ = write!(line, " {} / {} |", n(o), n(r));
        }
        if g.ensemble.is_some() {
            let row = g.ensemble_rows.iter().find(|r| &r.name == class);
            let e = row.and_then(|r| r.evaluation.as_ref());
            let (o, r) = (e.map(|e| e.oracle().0), e.map(|e| e.nor));
            let last = sums.len() - 1;
            sums[last].0.extend(o);
            sums[last].1.extend(r);
            let _ = write!(line, " {} / {} |", n(o), n(r));
        }
        let _ = writeln!(md, "{line}");
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut line = "| mean |".to_string();
    let columns = plan.students.len() + usize::from(g.ensemble.is_some());
    for (o, r) in sums.iter().take(columns) {
        let _ = write!(line, " {} / {} |", n(mean(o)), n(mean(r)));
    }
    let _ = writeln!(md, "{line}\n");
    let missing: Vec<&TaskLine> = g.missing().collect();
    if missing.is_empty() {
        let _ = writeln!(md, "Every task finished.\n");
    } else {
        let _ = writeln!(md, "## Not gathered (left out of every mean)\n");
        for t in missing {
            let _ = writeln!(
                md,
                "- task {} ({}, {}): {} {}",
                t.index,
                t.student,
                t.class,
                t.state.name(),
                t.state.detail()
            );
        }
        md.push('\n');
    }
    let _ = writeln!(md, "## Files\n");
    for (s, table, report) in &g.tables {
        let _ = writeln!(md, "- {s}: {} and {}", table.display(), report.display());
    }
    if let Some(e) = &g.ensemble {
        let _ = writeln!(md, "- ensemble: {}", e.display());
    }
    md
}
