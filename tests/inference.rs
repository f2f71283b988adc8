//! Using trained runs on tiny data: `infer`, the ensemble, `detect` and `report`, every command
//! on the demo runs, and missing or incomplete run directories.

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use common::{demo_data, mtad, read, request, rows, run};
use multi_teacher_ad::inference::detect::{Detector, Heatmaps, ScoreColumn, ThresholdChoice};
use multi_teacher_ad::inference::ensemble;
use multi_teacher_ad::output::artifact::Artifact;
use multi_teacher_ad::teachers::WeightsLocation;

#[test]
fn the_ensemble_combines_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let mut a = request(&data, &tmp.path().join("a"), &cache);
    a.settings.epochs = 1;
    let first = run(a.clone());
    let mut b = a.clone();
    b.settings.seed = 6;
    b.out = tmp.path().join("b");
    run(b);
    let runs = [tmp.path().join("a"), tmp.path().join("b")];

    // A run with itself: per-kind min-max normalisation is monotone, so the raw columns and
    // nor keep the run's own AUCs.
    let same = [runs[0].clone(), runs[0].clone()];
    let (same_rows, _) = ensemble::ensemble(&same, &tmp.path().join("same")).unwrap();
    let own = first.classes[0].evaluation.as_ref().unwrap();
    let same_eval = same_rows[0].evaluation.as_ref().unwrap();
    assert_eq!(same_eval.aucs[..3], own.aucs[..3]);
    assert_eq!(same_eval.nor, own.nor);

    let (ens_rows, path) = ensemble::ensemble(&runs, &tmp.path().join("ens")).unwrap();
    assert_eq!(ens_rows.len(), 1);
    assert_eq!(path, tmp.path().join("ens/eval_folder.csv"));
    let text = read(&path);
    assert!(text.starts_with("# ensemble of resnet + resnet"), "{text}");
    assert_eq!(rows(&text).len(), 2);

    let err = ensemble::ensemble(&runs[..1], &tmp.path().join("x")).unwrap_err();
    assert!(err.to_string().contains("at least two"));
}

#[test]
fn detect_scores_new_images_like_the_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let out = tmp.path().join("run");
    let mut r = request(&data, &out, &tmp.path().join("cache"));
    r.settings.epochs = 1;
    run(r);
    let load = |threshold: Option<f64>| {
        Detector::load(
            &out,
            "weave",
            ScoreColumn::Nor,
            ThresholdChoice {
                threshold,
                fpr: None,
            },
            &WeightsLocation::Build,
            Device::flex(),
        )
        .unwrap()
    };
    let detector = load(None);
    let test_dir = data.join("weave/test");
    let unreadable = tmp.path().join("broken.png");
    std::fs::write(&unreadable, b"not a png").unwrap();
    let det_out = tmp.path().join("detect");
    let found = detector
        .run(
            &[test_dir.clone(), unreadable],
            &det_out,
            Heatmaps::ScoresAndResiduals,
        )
        .unwrap();
    assert_eq!(found.len(), 4 + 1);
    assert!(found[4].outcome.as_ref().unwrap_err().contains("decode"));
    let csv = read(&det_out.join("detections.csv"));
    assert_eq!(rows(&csv).len(), 5);
    assert!(csv.contains(",error,"));

    // The image score is the max over its patches of the leakage-free score, as at evaluation
    // (scores_test.csv holds the best evaluation's per-patch scores).
    let artifact = Artifact::read(&out.join("weave/model.mtad")).unwrap();
    let (min, max) = (
        artifact.header.deployed.normaliser.min,
        artifact.header.deployed.normaliser.max,
    );
    let scores = read(&out.join("weave/scores_test.csv"));
    for d in &found[..4] {
        let path = d.path.display().to_string();
        let expected = scores
            .lines()
            .filter(|l| l.contains(&format!(",{path},")))
            .map(|l| {
                let f: Vec<f64> = l
                    .rsplitn(4, ',')
                    .take(3)
                    .map(|v| v.parse().unwrap())
                    .collect();
                let raw = [f[2], f[1], f[0]];
                (0..3)
                    .map(|k| (raw[k] - min[k]) / (max[k] - min[k]))
                    .sum::<f64>()
            })
            .fold(f64::NEG_INFINITY, f64::max);
        let got = d.outcome.as_ref().unwrap();
        assert!(
            (got.score - expected).abs() <= 1e-4 * expected.abs().max(1.0),
            "{path}: {} vs {expected}",
            got.score
        );
        assert_eq!(got.patch_scores.len(), 25);
        for map in [&got.heatmap, &got.residual] {
            let map = image::open(map.as_ref().unwrap()).unwrap();
            assert_eq!((map.width(), map.height()), (148, 148));
        }
    }

    // The model file alone scores the same, from anywhere.
    let moved = tmp.path().join("elsewhere/weave.mtad");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::copy(out.join("weave/model.mtad"), &moved).unwrap();
    let alone = Detector::from_artifact(
        &moved,
        ScoreColumn::Nor,
        ThresholdChoice::default(),
        &WeightsLocation::Build,
        Device::flex(),
    )
    .unwrap();
    assert_eq!(alone.threshold, detector.threshold);
    let again = alone
        .run(
            std::slice::from_ref(&test_dir),
            &tmp.path().join("d2"),
            Heatmaps::None,
        )
        .unwrap();
    for (a, b) in again.iter().zip(&found) {
        let (a, b) = (a.outcome.as_ref().unwrap(), b.outcome.as_ref().unwrap());
        assert_eq!(a.score, b.score);
        assert!(a.heatmap.is_none());
    }
    // ... but not with other teachers than it was trained with.
    let sha = artifact.header.config.teacher_sha256[0].clone();
    let bytes = std::fs::read(&moved).unwrap();
    // A byte search: the artifact starts with a binary length, so offsets in a lossy UTF-8
    // string can be off.
    let at = bytes
        .windows(sha.len())
        .position(|w| w == sha.as_bytes())
        .unwrap();
    let mut changed = bytes.clone();
    changed[at..at + 64].copy_from_slice("0".repeat(64).as_bytes());
    // Why a model file is refused (with the default threshold, or `threshold`).
    let refused = |path: &std::path::Path, threshold: Option<f64>| {
        let loaded = Detector::from_artifact(
            path,
            ScoreColumn::Nor,
            ThresholdChoice {
                threshold,
                fpr: None,
            },
            &WeightsLocation::Build,
            Device::flex(),
        );
        loaded.err().expect("must be refused").to_string()
    };
    // A changed header is refused by its checksum...
    std::fs::write(&moved, &changed).unwrap();
    let err = refused(&moved, None);
    assert!(err.contains("header checksum mismatch"), "{err}");
    // ... and one made for other teachers (its checksum right) by the teachers' check.
    // Layout: magic (11 bytes), version (4), header length (8), header, its sha256 (32).
    let length = u64::from_le_bytes(changed[15..23].try_into().unwrap()) as usize;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&changed[23..23 + length]);
    changed[23 + length..23 + length + 32].copy_from_slice(&digest);
    std::fs::write(&moved, &changed).unwrap();
    let err = refused(&moved, None);
    assert!(err.contains("trained with the teachers"), "{err}");

    // A threshold must be a number.
    for bad in [f64::NAN, f64::INFINITY] {
        let err = refused(&out.join("weave/model.mtad"), Some(bad));
        assert!(err.contains("finite"), "{err}");
    }
    // --threshold really decides.
    let all = load(Some(-1e30))
        .run(std::slice::from_ref(&test_dir), &det_out, Heatmaps::None)
        .unwrap();
    assert!(all.iter().all(|d| d.outcome.as_ref().unwrap().anomalous));
    let none = load(Some(1e30))
        .run(std::slice::from_ref(&test_dir), &det_out, Heatmaps::None)
        .unwrap();
    assert!(none.iter().all(|d| !d.outcome.as_ref().unwrap().anomalous));

    let err = Detector::load(
        &out,
        "grain",
        ScoreColumn::Nor,
        ThresholdChoice::default(),
        &WeightsLocation::Build,
        Device::flex(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("not trained") && err.contains("weave"),
        "{err}"
    );

    // mtad report: the table, the published-numbers section and a ROC curve per class.
    let run_arg = out.to_str().unwrap();
    let done = mtad(&["report", "--run", run_arg], None);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report = read(&out.join("report/report.md"));
    // One evaluation: both protocols choose it.
    let e = artifact.header.deployed.evaluation.as_ref().unwrap();
    let epoch = artifact.header.deployed.epoch;
    let row = format!(
        "| weave | {epoch} | {:.4} | {epoch} | {:.4} | {epoch} | {:.4} | {:.4} | {:.4} | {:.4} \
         | [roc](roc_weave.png) |",
        e.oracle().0,
        e.nor,
        e.aupr.unwrap(),
        e.f1_max.unwrap(),
        e.pixel_nor.unwrap(),
        e.pixel_aupro.unwrap()
    );
    assert!(report.contains(&row), "{row}\n{report}");
    assert!(report.contains("TINY RANDOM TEACHERS"), "{report}");
    assert!(
        report.contains("no published numbers for a folder dataset"),
        "{report}"
    );
    assert!(report.contains("[histogram](hist_weave.png)"), "{report}");
    assert!(image::open(out.join("report/hist_weave.png")).is_ok());
    // The decision at the threshold, with its test rates.
    let decision = artifact.header.deployed.decision.as_ref().unwrap();
    let rate = |v: Option<f64>| format!("{:.1}%", v.unwrap() * 100.0);
    assert!(
        report.contains(&format!(
            "| {} | {} | [histogram]",
            rate(decision.test_fpr),
            rate(decision.test_tpr)
        )),
        "{report}"
    );
    let roc = image::open(out.join("report/roc_weave.png")).unwrap();
    assert_eq!(
        (roc.width(), roc.height()),
        multi_teacher_ad::output::plots::ROC_SIZE
    );

    // A missing or incomplete run directory is a clear error for every command.
    let incomplete = tmp.path().join("incomplete");
    std::fs::create_dir_all(&incomplete).unwrap();
    let inc = incomplete.to_str().unwrap();
    let image = first_file(&data.join("weave/test/good"));
    let image = image.to_str().unwrap();
    for args in [
        vec!["report", "--run", inc],
        vec!["infer", "--run", inc],
        vec!["detect", "--run", inc, "--class", "weave", image],
    ] {
        let failed = mtad(&args, None);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success() && err.contains("not a run directory"),
            "{args:?}: {err}"
        );
    }
    std::fs::copy(out.join("config.json"), incomplete.join("config.json")).unwrap();
    for (args, says) in [
        (
            vec!["report", "--run", inc],
            "no class has a trained model yet",
        ),
        (vec!["infer", "--run", inc], "model.mtad does not exist"),
        (
            vec!["detect", "--run", inc, "--class", "weave", image],
            "model.mtad does not exist",
        ),
    ] {
        let failed = mtad(&args, None);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn every_command_works_on_the_demo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, models) = (tmp.path().join("data"), tmp.path().join("models"));
    let (data_arg, models_arg) = (data.to_str().unwrap(), models.to_str().unwrap());
    let demo = mtad(
        &[
            "demo", "--epochs", "1", "--data", data_arg, "--out", models_arg, "--device", "cpu",
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    assert!(stdout.contains("Demo results"), "{stdout}");
    let runs: Vec<PathBuf> = ["resnet", "vgg", "densenet"]
        .iter()
        .map(|s| models.join(s))
        .collect();
    for run in &runs {
        assert!(run.join("report/report.md").is_file());
        for class in ["weave", "grain", "disc", "washer"] {
            assert!(run.join(class).join("model.mtad").is_file(), "{class}");
        }
    }
    let ok = |args: &[&str]| {
        let out = mtad(args, None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let vgg = runs[1].to_str().unwrap();
    ok(&["infer", "--run", vgg, "--device", "cpu"]);
    assert_eq!(
        read(&runs[1].join("infer/Eval_vgg.csv")),
        read(&runs[1].join("Eval_vgg.csv"))
    );
    let ens = tmp.path().join("ens");
    let run_args: Vec<&str> = runs.iter().map(|r| r.to_str().unwrap()).collect();
    let mut args = vec!["ensemble", "--out", ens.to_str().unwrap(), "--runs"];
    args.extend(&run_args);
    ok(&args);
    assert_eq!(rows(&read(&ens.join("eval_folder.csv"))).len(), 4 + 1);
    let test = data.join("disc/test");
    ok(&[
        "detect",
        "--run",
        run_args[2],
        "--class",
        "disc",
        test.to_str().unwrap(),
    ]);
    let detections = read(&runs[2].join("detect/disc/detections.csv"));
    let images = std::fs::read_dir(&test)
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum::<usize>();
    assert_eq!(rows(&detections).len(), images);

    // Scripts: --format json on standard output, and the exit codes of --help.
    let json = |args: &[&str]| -> (Option<i32>, serde_json::Value) {
        let out = mtad(args, None);
        let value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), value)
    };
    let disc = [
        "detect",
        "--run",
        run_args[2],
        "--class",
        "disc",
        "--device",
        "cpu",
    ];
    let test_arg = test.to_str().unwrap();
    let mut args = disc.to_vec();
    args.extend([
        "--no-heatmaps",
        "--format",
        "json",
        "--fail-on-anomaly",
        test_arg,
    ]);
    let (code, value) = json(&args);
    let found = value["images"].as_array().unwrap();
    assert_eq!(found.len(), images);
    let anomalous = value["anomalous"].as_u64().unwrap();
    let flagged = found
        .iter()
        .filter(|i| i["decision"] == "anomalous")
        .count();
    assert_eq!(anomalous as usize, flagged);
    assert_eq!(code, Some(if anomalous > 0 { 4 } else { 0 }), "{value}");
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let mut args = disc.to_vec();
    args.extend([
        "--no-heatmaps",
        "--format",
        "json",
        broken.to_str().unwrap(),
    ]);
    let (code, value) = json(&args);
    assert_eq!(code, Some(3), "{value}");
    assert_eq!(value["images"][0]["decision"], "error");
    assert_eq!(value["unreadable"], 1);
    let (code, value) = json(&["infer", "--run", vgg, "--device", "cpu", "--format", "json"]);
    assert_eq!(code, Some(0));
    assert_eq!(value["classes"].as_array().unwrap().len(), 4);
    let (code, value) = json(&[
        "inspect",
        "--dataset",
        "folder",
        "--data-root",
        data_arg,
        "--format",
        "json",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(value["usable"], true);
    assert_eq!(value["report"]["categories"].as_array().unwrap().len(), 4);
    let usage = mtad(&["detect", "--run", vgg, "--format", "yaml"], None);
    assert_eq!(usage.status.code(), Some(2));

    ok(&[
        "report",
        "--run",
        run_args[0],
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert!(tmp.path().join("r/roc_washer.png").is_file());

    // Another class's model in a class folder is refused by infer and detect, both named.
    let resnet = &runs[0];
    std::fs::copy(
        resnet.join("grain/model.mtad"),
        resnet.join("weave/model.mtad"),
    )
    .unwrap();
    let image = first_file(&data.join("weave/test/good"));
    for args in [
        vec!["infer", "--run", run_args[0], "--device", "cpu"],
        vec![
            "detect",
            "--run",
            run_args[0],
            "--class",
            "weave",
            "--device",
            "cpu",
            image.to_str().unwrap(),
        ],
    ] {
        let out = mtad(&args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("class grain") && err.contains("not weave"),
            "{args:?}: {err}"
        );
    }
}

/// A file of `dir` (the first that the folder lists).
fn first_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}
