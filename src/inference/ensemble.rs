//! The multi-student ensemble (the reference's multi-student evaluation): for each score kind,
//! each student's test scores min-max normalised over the test set and summed over the
//! students, then the 69 columns; beside them the leakage-free `nor`, summed over the students
//! (each normalised on its own normal training inputs).

use std::path::{Path, PathBuf};

use crate::config::TrainConfig;
use crate::output::run_folder::{class_dir, read_config};
use crate::output::scores::{TEST_SCORES, TRAIN_SCORES, read_scores};
use crate::output::tables::{EvalRow, write_eval_table};
use crate::scoring::evaluation::{Normaliser, ensemble_scores, evaluate_with_nor, has_both_labels};
use crate::{Error, Result};

/// Evaluates the ensemble of `runs` (one per student) and writes `<out>/eval_<dataset>.csv`.
pub fn ensemble(runs: &[PathBuf], out: &Path) -> Result<(Vec<EvalRow>, PathBuf)> {
    let (rows, note, first) = ensemble_rows(runs)?;
    let path = out.join(format!("eval_{}.csv", first.dataset().name()));
    write_eval_table(&path, Some(&note), &rows)?;
    Ok((rows, path))
}

/// The ensemble's rows of `runs`, its table's note and the first run's config (`mtad sweep
/// gather` puts the rows of several ensembles in one table).
pub fn ensemble_rows(runs: &[PathBuf]) -> Result<(Vec<EvalRow>, String, TrainConfig)> {
    if runs.len() < 2 {
        return Err(Error::InvalidArgument(
            "--runs: an ensemble needs at least two runs".into(),
        ));
    }
    let configs = runs
        .iter()
        .map(|r| read_config(r))
        .collect::<Result<Vec<TrainConfig>>>()?;
    let first = &configs[0];
    for (run, c) in runs.iter().zip(&configs).skip(1) {
        if c.dataset() != first.dataset()
            || c.class_names != first.class_names
            || c.class_indices != first.class_indices
            || c.settings.image_size != first.settings.image_size
        {
            return Err(Error::InvalidArgument(format!(
                "{} was trained on other data, classes or image size than {}",
                run.display(),
                runs[0].display()
            )));
        }
    }
    let mut rows = Vec::new();
    for &class in &first.class_indices {
        let name = &first.class_names[class];
        let mut tests = Vec::new();
        let mut nor = Vec::new();
        let mut layout: Option<(Vec<usize>, Vec<u8>)> = None;
        let mut inputs: Option<Vec<(String, Option<usize>, Option<usize>)>> = None;
        for run in runs {
            let dir = class_dir(run, name);
            let test = read_scores(&dir.join(TEST_SCORES))?;
            let train = read_scores(&dir.join(TRAIN_SCORES))?;
            match &inputs {
                Some(known) if *known != test.inputs => {
                    return Err(Error::InvalidArgument(format!(
                        "class {name}: {} scored other test inputs than {}",
                        run.display(),
                        runs[0].display()
                    )));
                }
                Some(_) => {}
                None => {
                    layout = Some(test.image_groups());
                    inputs = Some(test.inputs.clone());
                }
            }
            let normaliser = Normaliser::fit(&train.scores)?;
            let student_nor: Vec<f64> = (0..test.scores.len())
                .map(|i| normaliser.score(&test.scores, i))
                .collect();
            if nor.is_empty() {
                nor = student_nor;
            } else {
                nor.iter_mut().zip(student_nor).for_each(|(a, b)| *a += b);
            }
            tests.push(test.scores);
        }
        let (groups, labels) = layout.expect("at least two runs");
        // A test set without both labels has no AUC: its row is left empty.
        let evaluation = if has_both_labels(&labels) {
            Some(evaluate_with_nor(
                &ensemble_scores(&tests)?,
                &groups,
                &labels,
                &nor,
            )?)
        } else {
            None
        };
        rows.push(EvalRow {
            index: class,
            name: name.clone(),
            epoch: None,
            evaluation,
            side_by_side: None,
        });
    }
    let students: Vec<String> = configs
        .iter()
        .map(|c| c.settings.student.to_string())
        .collect();
    let mut note = format!("ensemble of {}", students.join(" + "));
    if let Some(reduced) = first.reduced() {
        note.push_str(&format!("; {reduced}"));
    }
    Ok((rows, note, first.clone()))
}
