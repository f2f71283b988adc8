//! The reference's CSV tables, with its column names: `finTS_<student>.csv` (every evaluation of
//! every class) and `Eval_<student>.csv` (each class's best evaluation: the 69 score columns,
//! then `nor` and the oracle, and a mean row). A run whose setup deviates from the method's
//! starts each table with a `# ...` line saying how. Written through the `csv` crate.

use std::path::{Path, PathBuf};

use super::run_folder::{ClassProgress, SideBySide, class_dir, read_progress};
use crate::config::TrainConfig;
use crate::scoring::evaluation::{ClassEvaluation, column_names};
use crate::students::StudentKind;
use crate::{Error, Result};

/// A run's `Eval_<student>.csv` (`infer` writes one in `<run>/infer/`).
pub fn eval_table_path(dir: &Path, student: StudentKind) -> PathBuf {
    dir.join(format!("Eval_{student}.csv"))
}

/// One class's row of an `Eval_<student>.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub index: usize,
    pub name: String,
    /// The evaluation's epoch (none for an ensemble).
    pub epoch: Option<usize>,
    /// None when the test set lacks good or defect images (its cells are left empty).
    pub evaluation: Option<ClassEvaluation>,
    /// Both protocols' headline numbers, for a run's table.
    pub side_by_side: Option<SideBySide>,
}

/// Rewrites `finTS_<student>.csv` and `Eval_<student>.csv` from every class's progress (with
/// `current` in place of what is on disk for its class).
pub fn write_tables(
    out: &Path,
    config: &TrainConfig,
    current: Option<&ClassProgress>,
) -> Result<()> {
    write_tables_noted(out, config, current, None)
}

/// [`write_tables`], with `extra` added to the tables' note (`mtad sweep gather`: the tasks
/// left out).
pub fn write_tables_noted(
    out: &Path,
    config: &TrainConfig,
    current: Option<&ClassProgress>,
    extra: Option<&str>,
) -> Result<()> {
    let mut classes = Vec::new();
    for &c in &config.class_indices {
        let name = &config.class_names[c];
        let progress = match current {
            Some(p) if p.index == c => Some(p.clone()),
            _ => read_progress(&class_dir(out, name))?,
        };
        if let Some(p) = progress {
            classes.push(p);
        }
    }
    let unlabelled: Vec<&str> = classes
        .iter()
        .filter(|p| !p.history.is_empty() && p.history.iter().all(|r| r.nor.is_none()))
        .map(|p| p.name.as_str())
        .collect();
    let note = match (table_note(config, &unlabelled), extra) {
        (Some(n), Some(e)) => Some(format!("{n}; {e}")),
        (n, e) => n.or(e.map(str::to_string)),
    };
    let student = config.settings.student;
    let number = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));

    let fin_path = out.join(format!("finTS_{student}.csv"));
    let mut fin = Table::new(note.as_deref());
    fin.row(
        &fin_path,
        [
            "Normal Class",
            "Class Name",
            "Epoch",
            "AUC",
            "nor",
            "chosen by",
        ],
    )?;
    for p in &classes {
        let reference = p.best.as_ref().map(|b| b.epoch);
        let label_free = p.history.last().map(|r| r.epoch);
        for r in &p.history {
            let chosen = match (reference == Some(r.epoch), label_free == Some(r.epoch)) {
                (true, true) => "both",
                (true, false) => "reference",
                (false, true) => "label-free",
                (false, false) => "",
            };
            fin.row(
                &fin_path,
                [
                    p.index.to_string(),
                    p.name.clone(),
                    r.epoch.to_string(),
                    number(r.oracle),
                    number(r.nor),
                    chosen.to_string(),
                ],
            )?;
        }
    }
    fin.write(&fin_path)?;

    let rows: Vec<EvalRow> = classes
        .iter()
        .filter_map(|p| {
            p.deployed().map(|d| EvalRow {
                index: p.index,
                name: p.name.clone(),
                epoch: Some(d.epoch),
                evaluation: d.evaluation.clone(),
                side_by_side: Some(p.side_by_side()),
            })
        })
        .collect();
    write_eval_table(&eval_table_path(out, student), note.as_deref(), &rows)
}

/// The `# note` line of a run's tables: how the run deviates from the method
/// ([`TrainConfig::reduced`]) and which classes have no AUC (`unlabelled`).
pub fn table_note(config: &TrainConfig, unlabelled: &[&str]) -> Option<String> {
    let mut notes: Vec<String> = config.reduced().into_iter().collect();
    if !unlabelled.is_empty() {
        notes.push(format!(
            "no AUC for {} (the test set lacks good or defect images): those cells are empty",
            unlabelled.join(", ")
        ));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// Writes an `Eval_<student>.csv` (or an ensemble's `eval_<dataset>.csv`): a `# note` line or
/// nothing, the header, one row per class and a mean row. The columns: the 69 score columns
/// (AS_rec alone for the no-teacher ablation), nor, the oracle; where any row has them, the
/// pixel AUROC of nor, nor's AUPR and F1-max, the pixel AUPRO of nor, and both protocols'
/// headline numbers (the reference's epoch and oracle AUC, the label-free epoch and nor AUC).
pub fn write_eval_table(path: &Path, note: Option<&str>, rows: &[EvalRow]) -> Result<()> {
    let names = column_names();
    let evaluations = || rows.iter().filter_map(|r| r.evaluation.as_ref());
    let columns: Vec<usize> = if evaluations().any(|e| e.rec_only) {
        vec![2]
    } else {
        (0..names.len()).collect()
    };
    type Extra = fn(&ClassEvaluation) -> Option<f64>;
    let optional: Vec<(&str, Extra)> = [
        ("pixel AUROC (nor)", (|e| e.pixel_nor) as Extra),
        ("AUPR (nor)", |e| e.aupr),
        ("F1-max (nor)", |e| e.f1_max),
        ("pixel AUPRO@0.3 (nor)", |e| e.pixel_aupro),
    ]
    .into_iter()
    .filter(|(_, f)| evaluations().any(|e| f(e).is_some()))
    .collect();
    let side = rows.iter().any(|r| r.side_by_side.is_some());
    let mut table = Table::new(note);
    let mut header: Vec<String> = ["Normal Class", "Class Name", "Epoch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(columns.iter().map(|&c| names[c].clone()));
    header.extend(["nor".into(), "oracle (reference protocol)".into()]);
    header.extend(optional.iter().map(|(n, _)| n.to_string()));
    if side {
        header.extend(
            [
                "reference: epoch",
                "reference: oracle AUC",
                "label-free: epoch",
                "label-free: nor AUC",
            ]
            .map(String::from),
        );
    }
    table.row(path, &header)?;
    let number = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let whole = |v: Option<usize>| v.map_or(String::new(), |v| v.to_string());
    for r in rows {
        let e = r.evaluation.as_ref();
        let mut fields = vec![r.index.to_string(), r.name.clone(), whole(r.epoch)];
        fields.extend(columns.iter().map(|&c| number(e.map(|e| e.aucs[c]))));
        fields.push(number(e.map(|e| e.nor)));
        fields.push(number(e.map(|e| e.oracle().0)));
        fields.extend(optional.iter().map(|(_, f)| number(e.and_then(f))));
        if side {
            let s = r.side_by_side.unwrap_or_default();
            fields.push(whole(s.reference.map(|r| r.0)));
            fields.push(number(s.reference.map(|r| r.1)));
            fields.push(whole(s.label_free.map(|r| r.0)));
            fields.push(number(s.label_free.map(|r| r.1)));
        }
        table.row(path, fields)?;
    }
    let measured: Vec<&ClassEvaluation> = evaluations().collect();
    if !measured.is_empty() {
        let mean = |values: Vec<f64>| {
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let over = |f: &dyn Fn(&ClassEvaluation) -> Option<f64>| {
            mean(measured.iter().filter_map(|e| f(e)).collect())
        };
        let mut fields = vec![
            "mean".to_string(),
            format!("mean of {} classes", measured.len()),
            String::new(),
        ];
        fields.extend(columns.iter().map(|&c| number(over(&|e| Some(e.aucs[c])))));
        fields.push(number(over(&|e| Some(e.nor))));
        fields.push(number(over(&|e| Some(e.oracle().0))));
        fields.extend(optional.iter().map(|(_, f)| number(over(f))));
        if side {
            let sides: Vec<SideBySide> = rows.iter().filter_map(|r| r.side_by_side).collect();
            fields.push(String::new());
            fields.push(number(mean(
                sides.iter().filter_map(|s| Some(s.reference?.1)).collect(),
            )));
            fields.push(String::new());
            fields.push(number(mean(
                sides.iter().filter_map(|s| Some(s.label_free?.1)).collect(),
            )));
        }
        table.row(path, fields)?;
    }
    table.write(path)
}

/// A CSV table being built in memory: an optional `# note` line, then the records.
struct Table {
    note: Option<String>,
    writer: csv::Writer<Vec<u8>>,
}

impl Table {
    fn new(note: Option<&str>) -> Self {
        Self {
            note: note.map(str::to_string),
            writer: csv::WriterBuilder::new()
                .flexible(false)
                .from_writer(Vec::new()),
        }
    }

    fn row<I, T>(&mut self, path: &Path, fields: I) -> Result<()>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.writer
            .write_record(fields)
            .map_err(|e| Error::invalid_file(path, e.to_string()))
    }

    fn write(self, path: &Path) -> Result<()> {
        let body = self
            .writer
            .into_inner()
            .map_err(|e| Error::invalid_file(path, e.to_string()))?;
        let note = self.note.map_or(String::new(), |n| format!("# {n}\n"));
        super::write_atomic_parts(path, &[note.as_bytes(), &body])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation(nor: f64, pixel: Option<f64>) -> ClassEvaluation {
        ClassEvaluation {
            aucs: vec![0.5; column_names().len()],
            nor,
            pixel_nor: pixel,
            ..ClassEvaluation::default()
        }
    }

    #[test]
    fn eval_tables_keep_the_reference_columns_quote_names_and_average() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Eval_resnet.csv");
        let rows = [
            EvalRow {
                index: 3,
                name: "a,b".into(),
                epoch: Some(5),
                evaluation: Some(evaluation(0.25, Some(0.5))),
                side_by_side: None,
            },
            EvalRow {
                index: 4,
                name: "c".into(),
                epoch: Some(6),
                evaluation: Some(evaluation(0.75, None)),
                side_by_side: None,
            },
        ];
        write_eval_table(&path, Some("reduced"), &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# reduced");
        assert!(lines[1].starts_with("Normal Class,Class Name,Epoch,AS_z,"));
        assert!(lines[1].ends_with(",nor,oracle (reference protocol),pixel AUROC (nor)"));
        assert_eq!(lines[1].split(',').count(), 3 + 69 + 3);
        assert!(
            lines[2].starts_with("3,\"a,b\",5,0.500000,"),
            "{}",
            lines[2]
        );
        assert!(lines[2].ends_with(",0.250000,0.500000,0.500000"));
        assert!(lines[3].ends_with(",0.750000,0.500000,"), "{}", lines[3]);
        assert!(
            lines[4].starts_with("mean,mean of 2 classes,,0.500000,"),
            "{}",
            lines[4]
        );
        assert!(
            lines[4].ends_with(",0.500000,0.500000,0.500000"),
            "{}",
            lines[4]
        );
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn rows_without_labels_are_empty_and_the_no_teacher_table_keeps_as_rec_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Eval_resnet.csv");
        let mut rec = evaluation(0.25, None);
        rec.rec_only = true;
        rec.aucs[2] = 0.75;
        let side = SideBySide {
            reference: Some((4, 0.75)),
            label_free: Some((6, 0.25)),
        };
        let rows = [
            EvalRow {
                index: 0,
                name: "a".into(),
                epoch: Some(6),
                evaluation: Some(rec),
                side_by_side: Some(side),
            },
            EvalRow {
                index: 1,
                name: "b".into(),
                epoch: Some(6),
                evaluation: None,
                side_by_side: Some(SideBySide::default()),
            },
        ];
        write_eval_table(&path, None, &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "Normal Class,Class Name,Epoch,AS_rec,nor,oracle (reference protocol),\
             reference: epoch,reference: oracle AUC,label-free: epoch,label-free: nor AUC"
        );
        // The oracle of the no-teacher ablation is AS_rec's AUC, not a max over columns.
        assert_eq!(
            lines[1],
            "0,a,6,0.750000,0.250000,0.750000,4,0.750000,6,0.250000"
        );
        assert_eq!(lines[2], "1,b,6,,,,,,,");
        assert_eq!(
            lines[3],
            "mean,mean of 1 classes,,0.750000,0.250000,0.750000,,0.750000,,0.250000"
        );
        assert_eq!(lines.len(), 4);
    }
}
