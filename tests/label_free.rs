//! The label-free protocol and decisions without test labels (issue 25): normal-only data,
//! held-out normals, the deployed epoch chosen without labels, the threshold calibrated on the
//! held-out normals at a false-positive rate, `detect --fpr` and `--masks`, and the no-teacher
//! and crop-pool protocol flags.

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use common::{demo_data, mtad, read, request, rows, run};
use multi_teacher_ad::config::Protocol;
use multi_teacher_ad::data::demo::{DemoSpec, write_demo_dataset};
use multi_teacher_ad::data::inspect::inspect_folder;
use multi_teacher_ad::inference::detect::{Detector, Heatmaps, ScoreColumn, ThresholdChoice};
use multi_teacher_ad::output::artifact::Artifact;
use multi_teacher_ad::output::run_folder::{ClassProgress, read_progress};
use multi_teacher_ad::scoring::evaluation::image_nor;
use multi_teacher_ad::scoring::threshold::{HELD_OUT, calibrate};
use multi_teacher_ad::teachers::{TeacherChoice, TeacherStatistics, WeightsLocation};
use multi_teacher_ad::training::prepare::TrainRequest;

/// Trainings in one process share the CPU device's random generator (the networks'
/// initialisation): each test here holds this lock so that the same seed gives the same
/// networks whatever runs beside it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A label-free request (the folder default) on `data`'s `classes`.
fn label_free(data: &Path, out: &Path, cache: &Path, classes: &str) -> TrainRequest {
    let mut r = request(data, out, cache);
    r.settings.protocol = None;
    r.settings.classes = classes.into();
    r
}

fn progress(out: &Path, class: &str) -> ClassProgress {
    read_progress(&out.join(class)).unwrap().unwrap()
}

fn artifact(out: &Path, class: &str) -> Artifact {
    Artifact::read(&out.join(class).join("model.mtad")).unwrap()
}

fn detector(model: &Path, choice: ThresholdChoice) -> Detector {
    Detector::from_artifact(
        model,
        ScoreColumn::Nor,
        choice,
        &WeightsLocation::Build,
        Device::flex(),
    )
    .unwrap()
}

#[test]
fn normal_only_data_trains_calibrates_and_detects() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    // weave: train/good only; grain: a test set of good images only.
    std::fs::remove_dir_all(data.join("weave/test")).unwrap();
    std::fs::remove_dir_all(data.join("weave/ground_truth")).unwrap();
    for defect in ["hole", "patch"] {
        std::fs::remove_dir_all(data.join("grain/test").join(defect)).unwrap();
    }
    std::fs::remove_dir_all(data.join("grain/ground_truth")).unwrap();

    // inspect accepts both and says what each can measure.
    let report = inspect_folder(&data, false);
    let text = report.to_string();
    assert!(report.is_usable(), "{text}");
    assert!(
        text.contains("weave can measure: threshold at --fpr on held-out normals\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "grain can measure: threshold at --fpr on held-out normals, test false-positive rate\n"
        ),
        "{text}"
    );
    assert!(text.contains("weave: no test images"), "{text}");
    assert!(
        text.contains(
            "disc can measure: threshold at --fpr on held-out normals, test \
             false-positive rate, test true-positive rate, image AUROC, AUPR, F1-max, AUROC per \
             defect type, pixel AUROC, AUPRO"
        ),
        "{text}"
    );

    let out = tmp.path().join("run");
    let cache = tmp.path().join("cache");
    let summary = run(label_free(&data, &out, &cache, "weave,grain"));
    let config: serde_json::Value = serde_json::from_str(&read(&out.join("config.json"))).unwrap();
    assert_eq!(config["protocol"], "label-free");
    assert_eq!(config["holdout"], 0.2);
    assert_eq!(config["deployed"], "last evaluation (no test labels)");
    for class in &summary.classes {
        assert!(class.evaluation.is_none(), "{}: a fake AUC", class.name);
        assert_eq!(class.deployed_epoch, 2, "the last evaluation is deployed");
    }

    // The tables: the rows are there, the AUC cells empty, the note says why.
    let eval = read(&out.join("Eval_resnet.csv"));
    assert!(
        eval.lines().next().unwrap().contains(
            "no AUC for weave, grain (the test set lacks good or defect images): those cells \
             are empty"
        ),
        "{eval}"
    );
    let table = rows(&eval);
    assert_eq!(table.len(), 2, "no mean row without AUCs: {eval}");
    assert_eq!(table[0][..3], ["3".to_string(), "weave".into(), "2".into()]);
    assert!(table[0][3..].iter().all(String::is_empty), "{eval}");
    let fin = read(&out.join("finTS_resnet.csv"));
    assert!(
        rows(&fin)
            .iter()
            .all(|r| r[3].is_empty() && r[4].is_empty()),
        "{fin}"
    );

    for (class, test_fpr) in [("weave", None), ("grain", Some(()))] {
        // 8 training images: 2 held out (recorded), 6 train and enter the statistics.
        let held: Vec<String> = read(&out.join(class).join("holdout.txt"))
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(held.len(), 2, "{class}");
        for file in &held {
            assert!(data.join(file).is_file(), "{file}");
            assert!(file.starts_with(&format!("{class}/train/good/")), "{file}");
        }
        let trained = read(&out.join(class).join("scores_train.csv"));
        assert_eq!(trained.lines().count(), 1 + 6 * 25);
        assert!(held.iter().all(|f| !trained.contains(f.as_str())));
        let stats = TeacherStatistics::load(&out.join(class).join("teacher_stats.bin")).unwrap();
        assert_eq!(
            stats.count,
            6 * 25,
            "{class}: held-out images in the statistics"
        );

        // The model is usable: calibrated on the 2 held-out images, too few for 1%, said so.
        let a = artifact(&out, class);
        let decision = a.header.deployed.decision.clone().unwrap();
        assert_eq!(decision.calibration.source, HELD_OUT);
        assert_eq!(
            (decision.calibration.images, a.header.normal.images),
            (2, 2)
        );
        assert!(decision.calibration.note.unwrap().contains("too few"));
        assert_eq!(decision.test_fpr.is_some(), test_fpr.is_some(), "{class}");
        assert_eq!(decision.test_tpr, None);
        let d = detector(&a.path, ThresholdChoice::default());
        let note = d.calibration_note.clone().unwrap_or_default();
        assert!(note.contains("too few"), "{note}");
        let found = d
            .run(
                &[data.join(&held[0])],
                &tmp.path().join("det").join(class),
                Heatmaps::None,
            )
            .unwrap();
        // A held-out image scores at most the threshold (the max of the two at 1%).
        assert!(!found[0].outcome.as_ref().unwrap().anomalous);
    }

    // report and infer work on it.
    let run_arg = out.to_str().unwrap();
    for args in [
        vec!["report", "--run", run_arg],
        vec!["infer", "--run", run_arg],
    ] {
        let done = mtad(&args, None);
        assert!(
            done.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    let md = read(&out.join("report/report.md"));
    assert!(md.contains("| weave | 2 | - | - | - | - |"), "{md}");
    assert!(md.contains("2 held-out normal images"), "{md}");
    assert!(out.join("report/hist_weave.png").is_file());
    assert!(!out.join("report/roc_weave.png").exists());
}

/// A copy of `data` with weave's test labels flipped: its good test images become defects and
/// its defect images good (their masks dropped). The other categories are copied as they are
/// (a class's seeds follow its index).
fn flipped_copy(data: &Path, to: &Path) {
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    };
    for category in std::fs::read_dir(data).unwrap() {
        let category = category.unwrap().path();
        let target = to.join(category.file_name().unwrap());
        copy(&category.join("train/good"), &target.join("train/good"));
        for entry in std::fs::read_dir(category.join("test")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let into = match (category.ends_with("weave"), name.as_str()) {
                (true, "good") => "flipped".to_string(),
                (true, _) => "good".to_string(),
                (false, _) => name,
            };
            copy(&path, &target.join("test").join(into));
        }
    }
}

#[test]
fn flipping_the_test_labels_does_not_change_the_deployed_model() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let flipped = tmp.path().join("flipped");
    flipped_copy(&data, &flipped);
    let cache = tmp.path().join("cache");
    let mut outcomes = Vec::new();
    for (root, out) in [(&data, "a"), (&flipped, "b")] {
        let out = tmp.path().join(out);
        let mut r = label_free(root, &out, &cache, "weave");
        r.settings.epochs = 3;
        run(r);
        outcomes.push((artifact(&out, "weave").header, progress(&out, "weave")));
    }
    let ((a, pa), (b, pb)) = (&outcomes[0], &outcomes[1]);
    // The labels did reach the evaluations: each epoch's nor AUC is flipped...
    for (ra, rb) in pa.history.iter().zip(&pb.history) {
        let (na, nb) = (ra.nor.unwrap(), rb.nor.unwrap());
        assert!(
            (na + nb - 1.0).abs() < 1e-9,
            "epoch {}: {na} vs {nb}",
            ra.epoch
        );
    }
    // ... but not the deployed model: the same epoch, the same scores of the held-out and the
    // training normals (bit for bit: the same network), so the same normalisation and
    // threshold. (Burn's record bytes are not compared: they differ between any two runs.)
    assert_eq!(a.deployed.epoch, 3);
    assert_eq!(a.deployed.epoch, b.deployed.epoch);
    assert_eq!(a.normal, b.normal, "the held-out normals' scores differ");
    assert_eq!(a.deployed.normaliser, b.deployed.normaliser);
    assert_eq!(a.threshold, b.threshold);
    // The reference protocol's choice did see the labels: it is tracked in both runs.
    assert!(pa.best.is_some() && pb.best.is_some());
}

#[test]
fn the_held_out_threshold_holds_its_rate_where_the_training_one_does_not() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let spec = DemoSpec {
        image_size: 64,
        train: 12,
        test_good: 24,
        test_defect: 1,
        ..DemoSpec::default()
    };
    write_demo_dataset(&data, &spec).unwrap();
    let out = tmp.path().join("run");
    let mut r = label_free(&data, &out, &tmp.path().join("cache"), "weave");
    // 6 images train for 60 epochs (the student learns them), 6 are held out; a 20% rate.
    r.settings.holdout = Some(0.5);
    r.settings.fpr = 0.2;
    r.settings.epochs = 60;
    r.settings.eval_every = 60;
    run(r);
    let a = artifact(&out, "weave");
    let normaliser = a.header.deployed.normaliser;
    // Image nor scores of a score file's images, with their labels.
    let images = |file: &str| {
        let scores =
            multi_teacher_ad::output::scores::read_scores(&out.join("weave").join(file)).unwrap();
        let (groups, labels) = scores.image_groups();
        (
            image_nor(&scores.scores, &groups, labels.len(), &normaliser),
            labels,
        )
    };
    let (trained, _) = images("scores_train.csv");
    assert_eq!(trained.len(), 6);
    let (test, labels) = images("scores_test.csv");
    let unseen: Vec<f64> = test
        .iter()
        .zip(&labels)
        .filter(|(_, l)| **l == 0)
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(unseen.len(), 24);
    let flagged = |t: f64| unseen.iter().filter(|&&s| s > t).count();
    let from_training = calibrate(&trained, 0.2).unwrap();
    let from_held_out = a.header.threshold;
    let (by_training, by_held_out) = (flagged(from_training), flagged(from_held_out));
    eprintln!(
        "unseen normal images flagged at a 20% rate: {by_training}/24 with the training \
         images' threshold {from_training:.4}, {by_held_out}/24 with the held-out one \
         {from_held_out:.4}"
    );
    // Measured (AVX2 machine): 16 of 24 with the training images' threshold, 8 with the
    // held-out one; with the kernels written over pulp (other kernel paths on AVX2, so another
    // training trajectory), 9 and 1. The images the model was fitted on score lower than new
    // normal ones: a "20%" threshold taken on them flags far more new normal parts than 20%.
    // At a true 20% rate, 24 images flag 4.8 on average (standard deviation 1.96): 9 or more is
    // beyond two standard deviations above it; the held-out threshold stays within them.
    assert!(by_training >= 9, "{by_training}/24");
    assert!(
        by_held_out <= 8 && by_held_out * 2 <= by_training,
        "{by_held_out}/24"
    );
    let decision = a.header.deployed.decision.unwrap();
    assert_eq!(decision.calibration.images, 6);
    assert_eq!(decision.test_fpr, Some(by_held_out as f64 / 24.0));

    // detect --fpr moves the operating point from the stored held-out scores; --masks writes
    // a mask per image at the image's size, flagging about the rate of held-out pixels.
    let held: Vec<PathBuf> = read(&out.join("weave/holdout.txt"))
        .lines()
        .map(|f| data.join(f))
        .collect();
    let mut loose = detector(
        &a.path,
        ThresholdChoice {
            threshold: None,
            fpr: Some(0.5),
        },
    );
    let strict = detector(&a.path, ThresholdChoice::default());
    assert_eq!(strict.threshold, a.header.threshold);
    let normal = &a.header.normal;
    let held_out = image_nor(&normal.scores, &normal.groups, normal.images, &normaliser);
    assert_eq!(loose.threshold, calibrate(&held_out, 0.5).unwrap());
    assert_eq!(a.header.threshold, calibrate(&held_out, 0.2).unwrap());
    assert!(loose.threshold <= strict.threshold);
    let pixel = loose.pixel_threshold.unwrap();
    loose.masks = true;
    let det = tmp.path().join("det");
    let found = loose.run(&held, &det, Heatmaps::None).unwrap();
    let (mut white, mut all) = (0usize, 0usize);
    for d in &found {
        let mask = d.outcome.as_ref().unwrap().mask.clone().unwrap();
        assert!(mask.starts_with(det.join("masks")));
        let mask = image::open(mask).unwrap().to_luma8();
        assert_eq!(mask.dimensions(), (64, 64));
        white += mask.pixels().filter(|p| p.0[0] == 255).count();
        all += mask.pixels().count();
        assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    }
    let share = white as f64 / all as f64;
    eprintln!("held-out pixels flagged at 50%: {share:.3} (pixel threshold {pixel:.4})");
    assert!(share > 0.3 && share <= 0.55, "{share}");
    let csv = read(&det.join("detections.csv"));
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .contains("false-positive rate 0.5 on 6 held-out"),
        "{csv}"
    );
}

#[test]
fn the_no_teacher_ablation_is_judged_by_as_rec_and_crop_pools_are_flagged() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("none");
    let mut r = request(&data, &out, &cache);
    r.settings.teachers = TeacherChoice::None;
    r.settings.epochs = 3;
    let summary = run(r);
    let e = summary.classes[0].evaluation.clone().unwrap();
    assert_eq!(
        e.oracle(),
        (e.aucs[2], 2),
        "the oracle is AS_rec's AUC alone"
    );
    let p = progress(&out, "weave");
    let best = p
        .history
        .iter()
        .fold(None::<(usize, f64)>, |b, r| match b {
            Some((_, o)) if o >= r.oracle.unwrap() => b,
            _ => Some((r.epoch, r.oracle.unwrap())),
        })
        .unwrap();
    assert_eq!(summary.classes[0].deployed_epoch, best.0);
    let eval = read(&out.join("Eval_resnet.csv"));
    let header = eval.lines().find(|l| !l.starts_with('#')).unwrap();
    assert!(
        header.starts_with("Normal Class,Class Name,Epoch,AS_rec,nor,"),
        "{header}"
    );

    let out = tmp.path().join("pool");
    let mut r = request(&data, &out, &cache);
    r.settings.crop_pool = Some(2);
    r.settings.epochs = 1;
    run(r);
    let flag = "REDUCED PROTOCOL: --crop-pool 2 (the same 2 crop offsets for every image";
    assert!(read(&out.join("finTS_resnet.csv")).starts_with(&format!("# TINY")));
    assert!(
        read(&out.join("finTS_resnet.csv"))
            .lines()
            .next()
            .unwrap()
            .contains(flag)
    );
    assert!(
        read(&out.join("Eval_resnet.csv"))
            .lines()
            .next()
            .unwrap()
            .contains(flag)
    );
    let config: serde_json::Value = serde_json::from_str(&read(&out.join("config.json"))).unwrap();
    assert!(config["notes"].as_str().unwrap().contains(flag), "{config}");
    let done = mtad(&["report", "--run", out.to_str().unwrap()], None);
    assert!(done.status.success());
    assert!(read(&out.join("report/report.md")).contains(flag));
    let help = mtad(&["train", "--help"], None);
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    assert!(
        help.contains("shared by every image and every epoch"),
        "{help}"
    );
}

#[test]
fn the_protocols_and_their_settings_are_checked() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let refused = |edit: &dyn Fn(&mut TrainRequest)| {
        let mut r = label_free(&data, &tmp.path().join("x"), &cache, "weave");
        edit(&mut r);
        multi_teacher_ad::training::prepare::prepare(r)
            .err()
            .expect("refused")
            .to_string()
    };
    let err = refused(&|r| {
        r.settings.protocol = Some(Protocol::Reference);
        r.settings.holdout = Some(0.2);
    });
    assert!(
        err.contains("--holdout 0.2 with --protocol reference"),
        "{err}"
    );
    let err = refused(&|r| r.settings.holdout = Some(0.7));
    assert!(
        err.contains("--holdout 0.7: a share from 0 to 0.5"),
        "{err}"
    );
    let err = refused(&|r| r.settings.fpr = 0.0);
    assert!(err.contains("--fpr 0"), "{err}");
    // 8 images at 0.5: 4 held out (recorded), 4 train.
    let mut r = label_free(&data, &tmp.path().join("y"), &cache, "weave");
    r.settings.holdout = Some(0.5);
    r.settings.epochs = 1;
    run(r);
    assert_eq!(
        read(&tmp.path().join("y/weave/holdout.txt"))
            .lines()
            .count(),
        4
    );
    // A run written before the protocols existed (no protocol in its config.json) resumes
    // under the reference protocol it used.
    let old = tmp.path().join("old");
    let mut r = request(&data, &old, &cache);
    r.settings.epochs = 1;
    run(r.clone());
    let path = old.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    for key in ["protocol", "holdout", "deployed", "notes"] {
        config.as_object_mut().unwrap().remove(key);
    }
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    r.settings.protocol = None;
    r.resume = true;
    run(r);
    // 2 images cannot hold one out and train on 2: refused before anything is written.
    for entry in std::fs::read_dir(data.join("weave/train/good")).unwrap() {
        let path = entry.unwrap().path();
        if !["000.png", "001.png"].iter().any(|k| path.ends_with(k)) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let err = refused(&|_| {});
    assert!(
        err.contains("--holdout 0.2: 2 normal training images are too few"),
        "{err}"
    );
    assert!(!tmp.path().join("x").exists());
}
