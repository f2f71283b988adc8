//! `mtad report --run DIR`: a summary of a trained run that a person can read and share.
//!
//! Writes into `<out>` (default `<run>/report`):
//! - `report.md`: the run's settings and protocol, the per-class table (the deployed epoch, the
//!   reference protocol's oracle AUC and the label-free nor AUC side by side, AUPR, F1-max, the
//!   pixel AUROC and AUPRO where masks exist, AUROC per defect type) with a mean row, the
//!   decision at each threshold (test FPR and TPR), each class's evaluations, and the
//!   reference's published numbers (METHOD.md) next to ours;
//! - `roc_<class>.png`: the image-level ROC curves of the deployed evaluation's nor (blue) and
//!   oracle column (orange) scores, from `<class>/scores_test.csv` (with both labels only);
//! - `hist_<class>.png`: the histogram of the normal and defect image scores, with the
//!   threshold.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::artifact::{ARTIFACT_FILE, Artifact, Header};
use super::plots::{self, Curve};
use super::run_folder::{ClassProgress, PROGRESS_FILE, SideBySide, class_dir, read_config};
use super::scores::{TEST_SCORES, read_scores};
use super::{read_json, write_atomic};
use crate::data::DatasetKind;
use crate::scoring::evaluation::{column_mixes, column_names, group_max, image_nor};
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
    /// The ROC curves (none without both labels) and the score histogram.
    pub roc: Option<PathBuf>,
    pub histogram: Option<PathBuf>,
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
                histogram: None,
            });
            continue;
        }
        let header = Artifact::read_header(&path)?;
        let roc = match roc_png(&dir, &name, &header)? {
            Some(png) => {
                let roc = out.join(format!("roc_{}.png", file_safe(&name)));
                write_atomic(&roc, &png)?;
                Some(roc)
            }
            None => None,
        };
        let histogram = out.join(format!("hist_{}.png", file_safe(&name)));
        write_atomic(&histogram, &histogram_png(&dir, &name, &header)?)?;
        classes.push(ClassReport {
            name,
            header: Some(header),
            roc,
            histogram: Some(histogram),
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
         evaluation every {}, lr {}, seed {}\n- image size {}{}\n- protocol: {} (deployed \
         evaluation: {}); {:.0}% of the normal training images held out; threshold at a \
         false-positive rate of {}\n- written by mtad {}\n",
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
        c.protocol().name(),
        c.protocol().selection(),
        c.holdout() * 100.0,
        c.settings.fpr,
        c.version
    );
    let progress: Vec<Option<ClassProgress>> = classes
        .iter()
        .map(|r| {
            let path = class_dir(run, &r.name).join(PROGRESS_FILE);
            if path.is_file() {
                read_json(&path).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<_>>()?;
    let sides: Vec<SideBySide> = progress
        .iter()
        .map(|p| {
            p.as_ref()
                .map(ClassProgress::side_by_side)
                .unwrap_or_default()
        })
        .collect();
    per_class_table(&mut md, &classes, &sides);
    decision_table(&mut md, &classes);
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mean_oracle = mean(sides.iter().filter_map(|s| Some(s.reference?.1)).collect());
    let mean_nor = mean(sides.iter().filter_map(|s| Some(s.label_free?.1)).collect());
    let missing = classes.iter().filter(|r| r.header.is_none()).count();
    if missing > 0 {
        let _ = writeln!(
            md,
            "{missing} of {} classes have no evaluation yet; the means are over the others.\n",
            classes.len()
        );
    }

    let _ = writeln!(md, "## Against the published results\n");
    let number = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    match (
        published(c.dataset(), c.settings.student),
        published_others(c.dataset()),
    ) {
        (Some(ours), Some((multi, best))) => {
            let _ = writeln!(
                md,
                "| | image AUROC, mean over classes |\n|---|---:|\n| this run, oracle \
                 (reference protocol) | {} |\n| this run, nor (label-free epoch) | {} |\n| \
                 published, {} student | {ours} |\n| published, multi-student | {multi} |\n| \
                 published, best | {best} |\n",
                number(mean_oracle),
                number(mean_nor),
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
    for (r, progress) in classes.iter().zip(&progress) {
        let Some(progress) = progress else {
            continue;
        };
        let list: Vec<String> = progress
            .history
            .iter()
            .map(|e| {
                format!(
                    "epoch {}: oracle {}, nor {}",
                    e.epoch,
                    number(e.oracle),
                    number(e.nor)
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
        "\nROC curves (where the test set has both labels): false positive rate across, true \
         positive rate up; blue: nor, orange: the oracle column, grey: chance. Histograms: the \
         image scores (nor) of the normal (blue) and defect (orange) test images, the red line \
         at the threshold; without normal test images, the blue bars are the calibration \
         images'."
    );
    let path = out.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok((path, classes))
}

/// A Markdown link to a file beside the report, or `-`.
fn link(path: Option<&Path>, label: &str) -> String {
    path.and_then(Path::file_name).map_or("-".to_string(), |f| {
        format!("[{label}]({})", f.to_string_lossy())
    })
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

/// The ROC curves of a class's deployed evaluation, from its test scores (none when the test
/// set lacks good or defect images).
fn roc_png(dir: &Path, class: &str, header: &Header) -> Result<Option<Vec<u8>>> {
    let Some(evaluation) = &header.deployed.evaluation else {
        return Ok(None);
    };
    let file = read_scores(&dir.join(TEST_SCORES))?;
    let (groups, labels) = file.image_groups();
    let normaliser = &header.deployed.normaliser;
    let (_, column) = evaluation.oracle();
    let mix = column_mixes()[column];
    let n = file.scores.len();
    let nor: Vec<f64> = (0..n).map(|i| normaliser.score(&file.scores, i)).collect();
    let oracle: Vec<f64> = (0..n).map(|i| file.scores.mixed(i, &mix)).collect();
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
    let title = format!("{class}: image ROC, epoch {}", header.deployed.epoch);
    plots::roc_png(&title, &curves).map(Some)
}

/// The histogram of a class's test image scores (`nor`) by label, with the threshold; the
/// calibration images stand for the normal ones when the test set has none.
fn histogram_png(dir: &Path, class: &str, header: &Header) -> Result<Vec<u8>> {
    let file = read_scores(&dir.join(TEST_SCORES))?;
    let (groups, labels) = file.image_groups();
    let normaliser = &header.deployed.normaliser;
    let images = image_nor(&file.scores, &groups, labels.len(), normaliser);
    let pick = |label: u8| -> Vec<f64> {
        images
            .iter()
            .zip(&labels)
            .filter(|(_, l)| **l == label)
            .map(|(s, _)| *s)
            .collect()
    };
    let (mut normal, defect) = (pick(0), pick(1));
    if normal.is_empty() {
        let c = &header.normal;
        normal = image_nor(&c.scores, &c.groups, c.images, normaliser);
    }
    let title = format!(
        "{class}: image scores (nor), epoch {}",
        header.deployed.epoch
    );
    plots::histogram_png(&title, &normal, &defect, Some(header.threshold))
}

/// The per-class table: the deployed epoch, both protocols' headline numbers side by side and
/// the deployed evaluation's other metrics.
fn per_class_table(md: &mut String, classes: &[ClassReport], sides: &[SideBySide]) {
    let _ = writeln!(md, "## Image AUROC per class: both protocols\n");
    let _ = writeln!(
        md,
        "**oracle** is the reference's protocol: the best of 69 score columns at the evaluation \
         where it is best, both chosen with the test labels. **nor** is label-free: the three \
         raw scores min-max normalised on the normal training images and summed, at the last \
         evaluation; no test label chooses anything. AUPR, F1-max, the pixel metrics (AUROC, \
         AUPRO to a false-positive rate of 0.3) and the ROC curves are the deployed \
         evaluation's `nor`. '-': the test set lacks good or defect images (or masks).\n"
    );
    let _ = writeln!(
        md,
        "| class | deployed epoch | oracle (reference) | at epoch | nor (label-free) | at epoch \
         | AUPR | F1-max | pixel AUROC | AUPRO@0.3 | ROC |\n|---|---:|---:|---:|---:|---:|---:|\
         ---:|---:|---:|---|"
    );
    let number = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let epoch = |v: Option<(usize, f64)>| v.map_or("-".to_string(), |v| v.0.to_string());
    for (r, side) in classes.iter().zip(sides) {
        let Some(h) = &r.header else {
            let _ = writeln!(md, "| {} | no evaluation yet | | | | | | | | | |", r.name);
            continue;
        };
        let e = h.deployed.evaluation.as_ref();
        let roc = link(r.roc.as_deref(), "roc");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {roc} |",
            r.name,
            h.deployed.epoch,
            number(side.reference.map(|s| s.1)),
            epoch(side.reference),
            number(side.label_free.map(|s| s.1)),
            epoch(side.label_free),
            number(e.and_then(|e| e.aupr)),
            number(e.and_then(|e| e.f1_max)),
            number(e.and_then(|e| e.pixel_nor)),
            number(e.and_then(|e| e.pixel_aupro)),
        );
    }
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let over =
        |f: &dyn Fn(&ClassReport) -> Option<f64>| mean(classes.iter().filter_map(f).collect());
    let metric = |f: fn(&crate::scoring::evaluation::ClassEvaluation) -> Option<f64>| {
        move |r: &ClassReport| r.header.as_ref()?.deployed.evaluation.as_ref().and_then(f)
    };
    let _ = writeln!(
        md,
        "| **mean** | | **{}** | | **{}** | | {} | {} | {} | {} | |\n",
        number(mean(
            sides.iter().filter_map(|s| Some(s.reference?.1)).collect()
        )),
        number(mean(
            sides.iter().filter_map(|s| Some(s.label_free?.1)).collect()
        )),
        number(over(&metric(|e| e.aupr))),
        number(over(&metric(|e| e.f1_max))),
        number(over(&metric(|e| e.pixel_nor))),
        number(over(&metric(|e| e.pixel_aupro))),
    );
    let defects: Vec<String> = classes
        .iter()
        .filter_map(|r| {
            let e = r.header.as_ref()?.deployed.evaluation.as_ref()?;
            let list: Vec<String> = e
                .per_defect
                .iter()
                .map(|(d, a)| format!("{d} {a:.4}"))
                .collect();
            (!list.is_empty()).then(|| format!("- {}: {}", r.name, list.join(", ")))
        })
        .collect();
    if !defects.is_empty() {
        let _ = writeln!(
            md,
            "AUROC of nor per defect type (its images against the good ones):\n\n{}\n",
            defects.join("\n")
        );
    }
}

/// The operating point of each deployed model and what it gives on the test set.
fn decision_table(md: &mut String, classes: &[ClassReport]) {
    let _ = writeln!(md, "## Decisions at the threshold\n");
    let _ = writeln!(
        md,
        "The threshold is the `nor` image score that the asked share of the calibration \
         images exceed; `detect` flags an image above it (`detect --fpr` moves it, \
         `--threshold` sets it). The test rates are measured on the test images.\n"
    );
    let _ = writeln!(
        md,
        "| class | threshold | asked FPR | calibrated on | test FPR | test TPR | histogram |\n\
         |---|---:|---:|---|---:|---:|---|"
    );
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    let mut notes = Vec::new();
    for r in classes {
        let Some(h) = &r.header else { continue };
        let decision = h.deployed.decision.as_ref();
        let source = decision.map_or("normal training images".to_string(), |d| {
            format!("{} {}", d.calibration.images, d.calibration.source)
        });
        let histogram = link(r.histogram.as_deref(), "histogram");
        let _ = writeln!(
            md,
            "| {} | {:.4} | {} | {source} | {} | {} | {histogram} |",
            r.name,
            h.threshold,
            h.threshold_rate,
            rate(decision.and_then(|d| d.test_fpr)),
            rate(decision.and_then(|d| d.test_tpr)),
        );
        if let Some(note) = decision.and_then(|d| d.calibration.note.as_ref()) {
            notes.push(format!("- {}: {note}", r.name));
        }
    }
    let _ = writeln!(md);
    if !notes.is_empty() {
        let _ = writeln!(md, "{}\n", notes.join("\n"));
    }
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
