//! The score files of a class: `scores_test.csv` (every test input, with its image's label) and
//! `scores_train.csv` (the normal training inputs that `nor` is normalised on). One row per
//! network input: `input,path,patch_y,patch_x,label,AS_z,AS_cossim,AS_rec`; the patch offset is
//! empty for whole images (CIFAR-10). Read and written through the `csv` crate.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::write_atomic;
use crate::scoring::evaluation::RawScores;
use crate::{Error, Result};

/// A class's test inputs' scores, in its class folder.
pub const TEST_SCORES: &str = "scores_test.csv";
/// A class's normal training inputs' scores (what `nor` is normalised on).
pub const TRAIN_SCORES: &str = "scores_train.csv";

/// One row of a score file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub input: usize,
    pub path: String,
    pub patch_y: Option<usize>,
    pub patch_x: Option<usize>,
    pub label: u8,
    #[serde(rename = "AS_z")]
    pub as_z: f64,
    #[serde(rename = "AS_cossim")]
    pub as_cossim: f64,
    #[serde(rename = "AS_rec")]
    pub as_rec: f64,
}

/// The inputs of a score file: `(path, patch y, patch x)` and label of each row.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreFile {
    pub inputs: Vec<(String, Option<usize>, Option<usize>)>,
    pub labels: Vec<u8>,
    pub scores: RawScores,
}

/// Writes a score file: per row the input's image path and patch offset, its label and scores.
pub fn write_scores(
    path: &Path,
    inputs: &[(String, Option<(usize, usize)>)],
    labels: &[u8],
    scores: &RawScores,
) -> Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for (row, (name, offset)) in inputs.iter().enumerate() {
        writer
            .serialize(ScoreRow {
                input: row,
                path: name.clone(),
                patch_y: offset.map(|o| o.0),
                patch_x: offset.map(|o| o.1),
                label: labels[row],
                as_z: scores.as_z[row],
                as_cossim: scores.as_cossim[row],
                as_rec: scores.as_rec[row],
            })
            .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Reads a `scores_test.csv` or `scores_train.csv` written by a run.
pub fn read_scores(path: &Path) -> Result<ScoreFile> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| csv_error(path, e))?;
    let mut file = ScoreFile {
        inputs: Vec::new(),
        labels: Vec::new(),
        scores: RawScores::default(),
    };
    for row in reader.deserialize() {
        let row: ScoreRow = row.map_err(|e| csv_error(path, e))?;
        file.inputs.push((row.path, row.patch_y, row.patch_x));
        file.labels.push(row.label);
        file.scores
            .extend(&[row.as_z], &[row.as_cossim], &[row.as_rec]);
    }
    Ok(file)
}

/// A `csv` error as this crate's, naming the file (and the line, where csv knows it).
pub(crate) fn csv_error(path: &Path, e: csv::Error) -> Error {
    match e.kind() {
        csv::ErrorKind::Io(_) => Error::io(path, std::io::Error::other(e.to_string())),
        _ => Error::invalid_file(path, e.to_string()),
    }
}

impl ScoreFile {
    /// Image index of each input (inputs of one image are consecutive) and each image's label.
    pub fn image_groups(&self) -> (Vec<usize>, Vec<u8>) {
        let mut groups = Vec::with_capacity(self.inputs.len());
        let mut labels = Vec::new();
        for (i, (path, _, _)) in self.inputs.iter().enumerate() {
            if i == 0 || self.inputs[i - 1].0 != *path {
                labels.push(self.labels[i]);
            }
            groups.push(labels.len() - 1);
        }
        (groups, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_files_read_back_with_quoted_paths_and_image_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores_test.csv");
        let mut scores = RawScores::default();
        scores.extend(&[1.0, 4.0, 7.0], &[2.0, 5.0, 8.0], &[0.3, 0.6, 0.9]);
        let inputs = [
            ("a,b\"c.png".to_string(), Some((0, 0))),
            ("a,b\"c.png".to_string(), Some((0, 4))),
            ("c.png".to_string(), None),
        ];
        write_scores(&path, &inputs, &[1, 1, 0], &scores).unwrap();
        let file = read_scores(&path).unwrap();
        assert_eq!(file.inputs[1], ("a,b\"c.png".into(), Some(0), Some(4)));
        assert_eq!(file.inputs[2], ("c.png".into(), None, None));
        assert_eq!(file.scores, scores);
        assert_eq!(file.image_groups(), (vec![0, 0, 1], vec![1, 0]));
    }

    #[test]
    fn files_of_earlier_versions_and_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores_test.csv");
        // The hand-written format before the csv crate: floats as `1e0`.
        let text = "input,path,patch_y,patch_x,label,AS_z,AS_cossim,AS_rec\n\
                    0,\"a,b.png\",0,0,1,1e0,2e0,3e-1\n\
                    1,c.png,,,0,7e0,8e0,9e-1\n";
        std::fs::write(&path, text).unwrap();
        let file = read_scores(&path).unwrap();
        assert_eq!(file.scores.as_rec, [0.3, 0.9]);
        assert_eq!(file.inputs[1].1, None);
        std::fs::write(&path, "input,path\n0,x,1\n").unwrap();
        let err = read_scores(&path).unwrap_err().to_string();
        assert!(err.contains("scores_test.csv"), "{err}");
    }
}
