//! `detections.csv`, what `mtad detect` decided: a `# class, column, threshold` line, then per
//! image its path, score, decision, raw scores, heatmap and mask files, or the error that kept it from
//! being scored. Written through the `csv` crate.

use std::path::Path;

use serde::Serialize;

use crate::inference::detect::Detection;
use crate::{Error, Result};

#[derive(Serialize)]
struct DetectionRow {
    path: String,
    score: Option<f64>,
    decision: &'static str,
    #[serde(rename = "AS_z")]
    as_z: Option<f64>,
    #[serde(rename = "AS_cossim")]
    as_cossim: Option<f64>,
    #[serde(rename = "AS_rec")]
    as_rec: Option<f64>,
    heatmap: Option<String>,
    residual: Option<String>,
    mask: Option<String>,
    error: Option<String>,
}

/// The file's name in `detect`'s output folder.
pub const DETECTIONS_FILE: &str = "detections.csv";

/// Writes `detections` with `note` as the first line.
pub fn write_detections(path: &Path, note: &str, detections: &[Detection]) -> Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let shown = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    for d in detections {
        let path_text = d.path.display().to_string();
        let row = match &d.outcome {
            Ok(s) => DetectionRow {
                path: path_text,
                score: Some(s.score),
                decision: if s.anomalous { "anomalous" } else { "normal" },
                as_z: Some(s.as_z),
                as_cossim: Some(s.as_cossim),
                as_rec: Some(s.as_rec),
                heatmap: shown(&s.heatmap),
                residual: shown(&s.residual),
                mask: shown(&s.mask),
                error: None,
            },
            Err(e) => DetectionRow {
                path: path_text,
                score: None,
                decision: "error",
                as_z: None,
                as_cossim: None,
                as_rec: None,
                heatmap: None,
                residual: None,
                mask: None,
                error: Some(e.clone()),
            },
        };
        writer
            .serialize(row)
            .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    }
    let body = writer
        .into_inner()
        .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    super::write_atomic_parts(path, &[format!("# {note}\n").as_bytes(), &body])
}
