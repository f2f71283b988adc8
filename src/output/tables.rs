//! The reference's CSV tables, with its column names: `finTS_<student>.csv` (every evaluation of
//! every class) and `Eval_<student>.csv` (each class's best evaluation: the 69 score columns,
//! then `nor` and the oracle, and a mean row). A run whose setup deviates from the method's
//! starts each table with a `# ...` line saying how. Written through the `csv` crate.

use std::path::{Path, PathBuf};

use super::run_folder::{ClassProgress, class_dir, read_progress};
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
    pub evaluation: ClassEvaluation,
}

/// Rewrites `finTS_<student>.csv` and `Eval_<student>.csv` from every class's progress (with
/// `current` in place of what is on disk for its class).
pub fn write_tables(
    out: &Path,
    config: &TrainConfig,
    current: Option<&ClassProgress>,
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
    let note = config.reduced();
    let student = config.settings.student;

    let fin_path = out.join(format!("finTS_{student}.csv"));
    let mut fin = Table::new(note.as_deref());
    fin.row(
        &fin_path,
        ["Normal Class", "Class Name", "Epoch", "AUC", "nor"],
    )?;
    for p in &classes {
        for r in &p.history {
            fin.row(
                &fin_path,
                [
                    p.index.to_string(),
                    p.name.clone(),
                    r.epoch.to_string(),
                    format!("{:.6}", r.oracle),
                    format!("{:.6}", r.nor),
                ],
            )?;
        }
    }
    fin.write(&fin_path)?;

    let rows: Vec<EvalRow> = classes
        .iter()
        .filter_map(|p| {
            p.best.as_ref().map(|b| EvalRow {
                index: p.index,
                name: p.name.clone(),
                epoch: Some(b.epoch),
                evaluation: b.evaluation.clone(),
            })
        })
        .collect();
    write_eval_table(&eval_table_path(out, student), note.as_deref(), &rows)
}

/// Writes an `Eval_<student>.csv` (or an ensemble's `eval_<dataset>.csv`): a `# note` line or
/// nothing, the header, one row per class (the 69 columns, nor, oracle, and the pixel AUROC of
/// nor where masks exist) and a mean row.
pub fn write_eval_table(path: &Path, note: Option<&str>, rows: &[EvalRow]) -> Result<()> {
    let columns = column_names();
    let pixel = rows.iter().any(|r| r.evaluation.pixel_nor.is_some());
    let mut table = Table::new(note);
    let mut header: Vec<String> = ["Normal Class", "Class Name", "Epoch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(columns.iter().cloned());
    header.extend(["nor".into(), "oracle (reference protocol)".into()]);
    if pixel {
        header.push("pixel AUROC (nor)".into());
    }
    table.row(path, &header)?;
    let line = |index: String,
                name: String,
                epoch: String,
                aucs: &[f64],
                nor: f64,
                oracle: f64,
                p: Option<f64>| {
        let mut fields = vec![index, name, epoch];
        fields.extend(aucs.iter().map(|a| format!("{a:.6}")));
        fields.push(format!("{nor:.6}"));
        fields.push(format!("{oracle:.6}"));
        if pixel {
            fields.push(p.map_or(String::new(), |p| format!("{p:.6}")));
        }
        fields
    };
    for r in rows {
        let e = &r.evaluation;
        table.row(
            path,
            line(
                r.index.to_string(),
                r.name.clone(),
                r.epoch.map_or(String::new(), |e| e.to_string()),
                &e.aucs,
                e.nor,
                e.oracle().0,
                e.pixel_nor,
            ),
        )?;
    }
    if !rows.is_empty() {
        let mean = |f: &dyn Fn(&ClassEvaluation) -> Option<f64>| {
            let values: Vec<f64> = rows.iter().filter_map(|r| f(&r.evaluation)).collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let aucs: Vec<f64> = (0..columns.len())
            .map(|i| mean(&|e| Some(e.aucs[i])).unwrap_or(f64::NAN))
            .collect();
        table.row(
            path,
            line(
                "mean".into(),
                format!("mean of {} classes", rows.len()),
                String::new(),
                &aucs,
                mean(&|e| Some(e.nor)).unwrap_or(f64::NAN),
                mean(&|e| Some(e.oracle().0)).unwrap_or(f64::NAN),
                mean(&|e| e.pixel_nor),
            ),
        )?;
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
                evaluation: evaluation(0.25, Some(0.5)),
            },
            EvalRow {
                index: 4,
                name: "c".into(),
                epoch: Some(6),
                evaluation: evaluation(0.75, None),
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
}
