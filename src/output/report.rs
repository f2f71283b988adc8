//! `mtad report --run DIR`: a summary of a trained run that a person can read and share.
//!
//! Writes into `<out>` (default `<run>/report`):
//! - `report.md`: the run's settings, the per-class table (best epoch, oracle AUC and its column,
//!   the leakage-free nor AUC side by side, the pixel AUROC where masks exist) with a mean row,
//!   each class's evaluations, and the reference's published numbers (METHOD.md) next to ours;
//! - `roc_<class>.png`: the image-level ROC curves of the best evaluation's nor (blue) and oracle
//!   column (orange) scores, from `<class>/scores_test.csv`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::artifact::{ARTIFACT_FILE, Artifact, Header};
use super::plots::{self, Curve};
use super::run_folder::{ClassProgress, PROGRESS_FILE, class_dir, read_config};
use super::scores::{TEST_SCORES, read_scores};
use super::{read_json, write_atomic};
use crate::data::DatasetKind;
use crate::scoring::evaluation::{column_mixes, column_names, group_max};
use crate::scoring::roc_curve;
use crate::students::StudentKind;
use crate::{Error, Result};

/// The reference's published image AUROC (mean over classes), from METHOD.md.
pub fn published(dataset: DatasetKind, student: StudentKind) -> Option<&'static str> {
    use DatasetKind::*;
    use StudentKind::*;
    Some(match (dataset, student) {
        (Mvtec, Resnet) => "0.944-0.950",
        (Mvtec, Vgg) => "0.908-0.917",
        (Mvtec, Densenet) => "0.941-0.953",
        (Cifar10, Resnet) => "0.923",
        (Cifar10, Vgg) => "0.912-0.914",
        (Cifar10, Densenet) => "0.920",
        (Folder, _) => return None,
    })
}

/// The published multi-student and best results, from METHOD.md.
fn published_others(dataset: DatasetKind) -> Option<(&'static str, &'static str)> {
    match dataset {
        DatasetKind::Mvtec => Some(("0.947-0.948", "0.956")),
        DatasetKind::Cifar10 => Some(("0.925-0.926", "0.928")),
        DatasetKind::Folder => None,
    }
}

/// What the report says about one class.
pub struct ClassReport {
    pub name: String,
    /// None: the class has no evaluation yet.
    pub header: Option<Header>,
    pub roc: Option<PathBuf>,
}

/// Writes the report of `run` into `out`; returns the Markdown file and the classes.
pub fn write_report(run: &Path, out: &Path) -> Result<(PathBuf, Vec<ClassReport>)> {
    let config = read_config(run)?;
    let mut classes = Vec::new();
    for &c in &config.class_indices {
        let name = config.class_names[c].clone();
        let dir = class_dir(run, &name);
        let path = dir.join(ARTIFACT_FILE);
        if !path.is_file() {
            classes.push(ClassReport {
                name,
                header: None,
                roc: None,
            });
            continue;
        }
        let header = Artifact::read_header(&path)?;
        let roc = out.join(format!("roc_{}.png", file_safe(&name)));
        write_atomic(&roc, &roc_png(&dir, &name, &header)?)?;
        classes.push(ClassReport {
            name,
            header: Some(header),
            roc: Some(roc),
        });
    }
    if classes.iter().all(|c| c.header.is_none()) {
        return Err(Error::InvalidArgument(format!(
            "{}: no class has a trained model yet (no <class>/{ARTIFACT_FILE}): train it, or \
             let its training reach an evaluation",
            run.display()
        )));
    }
    let mut md = String::new();
    let c = &config;
    let _ = writeln!(md, "# mtad report: {}\n", run.display());
    if let Some(note) = c.reduced() {
        let _ = writeln!(
            md,
            "> **{note}.** These numbers are not comparable with the published ones.\n"
        );
    }
    let _ = writeln!(
        md,
        "- dataset: {:?} at `{}`\n- student: {}\n- teachers: {} ({})\n- epochs: {}, \
         evaluation every {}, lr {}, seed {}\n- image size {}{}\n- written by mtad {}\n",
        c.dataset(),
        c.data_root().display(),
        c.settings.student,
        if c.teacher_names.is_empty() {
            "none (autoencoder ablation)".to_string()
        } else {
            c.teacher_names.join(", ")
        },
        c.teacher_sha256
            .iter()
            .map(|s| format!("sha256 {}", &s[..12.min(s.len())]))
            .collect::<Vec<_>>()
            .join(", "),
        c.settings.epochs,
        c.settings.eval_every,
        c.settings.lr,
        c.settings.seed,
        c.settings.image_size,
        if c.dataset() == DatasetKind::Cifar10 {
            String::new()
        } else {
            format!(
                " (full cut of {}x{} at stride {})",
                c.full_size, c.full_size, c.stride
            )
        },
        c.version
    );
    let pixel = classes.iter().any(|r| {
        r.header
            .as_ref()
            .is_some_and(|h| h.best.evaluation.pixel_nor.is_some())
    });
    let _ = writeln!(md, "## Image AUROC per class (best evaluation)\n");
    let _ = writeln!(
        md,
        "**oracle** is the reference's protocol: the best of 69 score columns, chosen with the \
         test labels. **nor** is leakage-free: the three raw scores min-max normalised on normal \
         training data and summed. Report nor when the test labels must not choose the score.\n"
    );
    let _ = writeln!(
        md,
        "| class | best epoch | oracle | oracle column | nor |{} ROC |",
        if pixel { " pixel AUROC (nor) |" } else { "" }
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---|---:|{}---|",
        if pixel { "---:|" } else { "" }
    );
    let names = column_names();
    let (mut oracles, mut nors, mut pixels) = (Vec::new(), Vec::new(), Vec::new());
    for r in &classes {
        match &r.header {
            Some(h) => {
                let e = &h.best.evaluation;
                let (oracle, column) = e.oracle();
                oracles.push(oracle);
                nors.push(e.nor);
                let pixel_cell = match (pixel, e.pixel_nor) {
                    (false, _) => String::new(),
                    (true, Some(p)) => {
                        pixels.push(p);
                        format!(" {p:.4} |")
                    }
                    (true, None) => " - |".to_string(),
                };
                let roc = r
                    .roc
                    .as_ref()
                    .and_then(|p| p.file_name())
                    .map_or(String::new(), |f| format!("[roc]({})", f.to_string_lossy()));
                let _ = writeln!(
                    md,
                    "| {} | {} | {oracle:.4} | {} | {:.4} |{pixel_cell} {roc} |",
                    r.name, h.best.epoch, names[column], e.nor
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {} | no evaluation yet | | | |{} |",
                    r.name,
                    if pixel { " |" } else { "" }
                );
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let _ = writeln!(
        md,
        "| **mean of {}** | | **{:.4}** | | **{:.4}** |{} |\n",
        oracles.len(),
        mean(&oracles),
        mean(&nors),
        if pixel && !pixels.is_empty() {
            format!(" **{:.4}** |", mean(&pixels))
        } else if pixel {
            " |".to_string()
        } else {
            String::new()
        }
    );
    let missing = classes.iter().filter(|r| r.header.is_none()).count();
    if missing > 0 {
        let _ = writeln!(
            md,
            "{missing} of {} classes have no evaluation yet; the means are over the others.\n",
            classes.len()
        );
    }

    let _ = writeln!(md, "## Against the published results\n");
    match (
        published(c.dataset(), c.settings.student),
        published_others(c.dataset()),
    ) {
        (Some(ours), Some((multi, best))) => {
            let _ = writeln!(
                md,
                "| | image AUROC, mean over classes |\n|---|---:|\n| this run, oracle \
                 (reference protocol) | {:.4} |\n| this run, nor (leakage-free) | {:.4} |\n| \
                 published, {} student | {ours} |\n| published, multi-student | {multi} |\n| \
                 published, best | {best} |\n",
                mean(&oracles),
                mean(&nors),
                c.settings.student
            );
            let _ = writeln!(
                md,
                "The published numbers use the oracle protocol, the ImageNet teachers, 224x224 \
                 inputs, all classes and 500 epochs; compare them with the oracle row of a run \
                 like that.\n"
            );
        }
        _ => {
            let _ = writeln!(
                md,
                "There are no published numbers for a folder dataset (the reference reports \
                 MVTec AD and CIFAR-10).\n"
            );
        }
    }

    let _ = writeln!(md, "## Evaluations\n");
    for r in &classes {
        let path = class_dir(run, &r.name).join(PROGRESS_FILE);
        if !path.is_file() {
            continue;
        }
        let progress: ClassProgress = read_json(&path)?;
        let list: Vec<String> = progress
            .history
            .iter()
            .map(|e| {
                format!(
                    "epoch {}: oracle {:.4}, nor {:.4}",
                    e.epoch, e.oracle, e.nor
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "- {}{}: {}",
            r.name,
            if progress.complete {
                ""
            } else {
                " (training not finished)"
            },
            list.join("; ")
        );
    }
    let _ = writeln!(
        md,
        "\nROC curves: false positive rate across, true positive rate up; blue: nor, orange: the \
         oracle column, grey: chance."
    );
    let path = out.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok((path, classes))
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The ROC curves of a class's best evaluation, from its test scores.
fn roc_png(dir: &Path, class: &str, header: &Header) -> Result<Vec<u8>> {
    let file = read_scores(&dir.join(TEST_SCORES))?;
    let (groups, labels) = file.image_groups();
    let normaliser = &header.best.normaliser;
    let (_, column) = header.best.evaluation.oracle();
    let mix = column_mixes()[column];
    let n = file.scores.len();
    let nor: Vec<f64> = (0..n).map(|i| normaliser.score(&file.scores, i)).collect();
    let oracle: Vec<f64> = (0..n).map(|i| file.scores.mixed(i, &mix)).collect();
    let evaluation = &header.best.evaluation;
    let curves = [
        Curve {
            label: format!("nor, leakage-free (AUC {:.3})", evaluation.nor),
            points: roc_curve(&group_max(&nor, &groups, labels.len()), &labels)?,
            rgb: [31, 119, 180],
        },
        Curve {
            label: format!(
                "oracle: {} (AUC {:.3})",
                column_names()[column],
                evaluation.oracle().0
            ),
            points: roc_curve(&group_max(&oracle, &groups, labels.len()), &labels)?,
            rgb: [255, 127, 14],
        },
    ];
    let title = format!("{class}: image ROC, epoch {}", header.best.epoch);
    plots::roc_png(&title, &curves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_numbers_are_those_of_method_md() {
        assert_eq!(
            published(DatasetKind::Mvtec, StudentKind::Resnet),
            Some("0.944-0.950")
        );
        assert_eq!(
            published(DatasetKind::Cifar10, StudentKind::Densenet),
            Some("0.920")
        );
        assert_eq!(published(DatasetKind::Folder, StudentKind::Vgg), None);
    }
}
