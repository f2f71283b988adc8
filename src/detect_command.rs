//! `mtad detect`: score new images with a trained class and print the decisions. Part of the
//! binary.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::cli::{DetectArgs, Format, exit};
use super::{log_to, print_json, weights_location};
use multi_teacher_ad::device::select_device;
use multi_teacher_ad::inference::detect::{Detector, Heatmaps, ScoreColumn, ThresholdChoice};
use multi_teacher_ad::output::detections::DETECTIONS_FILE;

pub fn detect(args: &DetectArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    tracing::info!("device: {device}");
    let weights = weights_location(&args.teacher_weights);
    let column = ScoreColumn::parse(&args.column)?;
    let choice = ThresholdChoice {
        threshold: args.threshold,
        fpr: args.fpr,
    };
    let (mut detector, default_out) = match (&args.model, &args.run, &args.class) {
        (Some(model), _, _) => (
            Detector::from_artifact(model, column, choice, &weights, device.device)
                .with_context(|| format!("loading {}", model.display()))?,
            model.parent().unwrap_or(Path::new(".")).join("detect"),
        ),
        (None, Some(run), Some(class)) => (
            Detector::load(run, class, column, choice, &weights, device.device)
                .with_context(|| format!("loading class {class} of {}", run.display()))?,
            run.join("detect").join(class),
        ),
        _ => anyhow::bail!("give --model FILE, or --run DIR and --class NAME"),
    };
    if args.masks && detector.pixel_threshold.is_none() {
        anyhow::bail!(
            "--masks needs a model of image patches (MVTec or folder data): a CIFAR-10 model \
             scores each image whole"
        );
    }
    detector.masks = args.masks;
    let out = args.out.clone().unwrap_or(default_out);
    log_to(&out);
    let threshold_source = match &detector.operating_point {
        None => "given".to_string(),
        Some((rate, on)) => format!("flags {rate} of the {on}"),
    };
    tracing::info!("threshold {:.6} ({threshold_source})", detector.threshold);
    if let Some(note) = &detector.calibration_note {
        tracing::warn!("threshold: {note}");
    }
    let heatmaps = match (args.no_heatmaps, args.residuals) {
        (true, _) => Heatmaps::None,
        (false, false) => Heatmaps::Scores,
        (false, true) => Heatmaps::ScoresAndResiduals,
    };
    let detections = detector.run(&args.paths, &out, heatmaps)?;
    let failed = detections.iter().filter(|d| d.outcome.is_err()).count();
    let anomalous = detections
        .iter()
        .filter(|d| matches!(&d.outcome, Ok(s) if s.anomalous))
        .count();
    let unwritten: Vec<String> = detections
        .iter()
        .filter_map(|d| d.outcome.as_ref().ok()?.output_error.clone())
        .collect();
    let table = out.join(DETECTIONS_FILE);
    match args.format.format {
        Format::Text => {
            for d in &detections {
                match &d.outcome {
                    Ok(s) => println!(
                        "{:<10} {:>12.6}  {}",
                        if s.anomalous { "ANOMALOUS" } else { "normal" },
                        s.score,
                        d.path.display()
                    ),
                    Err(e) => println!("{:<10} {:>12}  {e}", "ERROR", ""),
                }
            }
            println!(
                "{} images: {anomalous} anomalous, {} normal, {failed} unreadable; wrote {}",
                detections.len(),
                detections.len() - anomalous - failed,
                table.display()
            );
        }
        Format::Json => print_json(&serde_json::json!({
            "threshold": detector.threshold,
            "threshold_source": threshold_source,
            "threshold_note": detector.calibration_note,
            "images": detections.iter().map(|d| match &d.outcome {
                Ok(s) => serde_json::json!({
                    "path": d.path,
                    "decision": if s.anomalous { "anomalous" } else { "normal" },
                    "score": s.score,
                    "as_z": s.as_z,
                    "as_cossim": s.as_cossim,
                    "as_rec": s.as_rec,
                    "heatmap": s.heatmap,
                    "residual": s.residual,
                    "mask": s.mask,
                    "heatmap_error": s.output_error,
                }),
                Err(e) => serde_json::json!({"path": d.path, "decision": "error", "error": e}),
            }).collect::<Vec<_>>(),
            "anomalous": anomalous,
            "unreadable": failed,
            "table": table,
        }))?,
    }
    if let Some(first) = unwritten.first() {
        tracing::error!(
            "{} heatmap(s) could not be written (first: {first}); the images were scored: \
             their scores are above and in {}",
            unwritten.len(),
            table.display()
        );
        return Ok(ExitCode::from(exit::ERROR));
    }
    Ok(if failed > 0 {
        ExitCode::from(exit::UNREADABLE)
    } else if args.fail_on_anomaly && anomalous > 0 {
        ExitCode::from(exit::ANOMALY)
    } else {
        ExitCode::from(exit::SUCCESS)
    })
}
