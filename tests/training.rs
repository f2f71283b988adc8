//! Training end to end on tiny data: the Learner step's gradient separation, a whole run and
//! its run directory, the teacher-embedding cache, resume after a kill, and bad input.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use common::{demo_data, mtad, read, request, rows, run};
use multi_teacher_ad::data::DatasetKind;
use multi_teacher_ad::output::artifact::Artifact;
use multi_teacher_ad::scoring::roc_auc;
use multi_teacher_ad::students::StudentKind;
use multi_teacher_ad::teachers::{TeacherChoice, TeacherStatistics, WeightsLocation};
use multi_teacher_ad::training::model::{InputBatch, MtadModelConfig};
use multi_teacher_ad::training::prepare::{Prepared, TrainRequest, prepare};
use multi_teacher_ad::training::run::RunSummary;

/// Counts the float parameters of a module that have, and that lack, a gradient.
struct GradCount<'a> {
    grads: &'a burn::tensor::Gradients,
    with: usize,
    without: usize,
}

impl ModuleVisitor for GradCount<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        match param.val().grad(self.grads) {
            Some(_) => self.with += 1,
            None => self.without += 1,
        }
    }
}

fn count<M: Module>(module: &M, grads: &burn::tensor::Gradients) -> (usize, usize) {
    let mut c = GradCount {
        grads,
        with: 0,
        without: 0,
    };
    module.visit(&mut c);
    (c.with, c.without)
}

#[test]
fn each_loss_trains_only_its_own_networks() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let model = MtadModelConfig::new(StudentKind::Resnet, 32, 3)
        .init(&device)
        .unwrap();
    let batch = InputBatch {
        images: Tensor::random([2, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), &device),
        teachers: Some(Tensor::random([2, 3, 1000], Distribution::Default, &device)),
    };
    let weighting = model
        .weighting
        .as_ref()
        .expect("three teachers are weighted");

    let losses = model.losses(batch.clone());
    let grads = losses.reconstruction.backward();
    let student = count(&model.student, &grads);
    let decoder = count(&model.decoder, &grads);
    let weights = count(weighting, &grads);
    assert_eq!(student.0, 0, "the reconstruction loss reached the student");
    assert!(student.1 > 0);
    assert_eq!(decoder.1, 0, "some decoder parameter got no gradient");
    assert_eq!(weights, (1, 0));

    let losses = model.losses(batch);
    let grads = losses.distillation.expect("teachers given").backward();
    let student = count(&model.student, &grads);
    assert_eq!(student.1, 0, "some student parameter got no gradient");
    assert_eq!(
        count(&model.decoder, &grads).0,
        0,
        "distillation reached the decoder"
    );
    assert_eq!(
        count(weighting, &grads).0,
        0,
        "distillation reached the weighting"
    );
}

#[test]
fn a_run_writes_its_directory_and_reuses_the_teacher_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");

    let first = run(request(&data, &out, &cache));
    // Teachers ran on the 8 train and 4 test images' 25 patches (the caches), then on 2 epochs
    // x 2 batches x 16 random crops (4 offsets x 4 images).
    assert_eq!(first.teacher_inputs, (8 + 4) * 25 + 2 * 2 * 16);
    assert_eq!(first.classes.len(), 1);
    let eval = first.classes[0].evaluation.as_ref().unwrap();
    assert_eq!(eval.aucs.len(), 69);
    assert!(
        eval.aucs
            .iter()
            .chain([&eval.nor])
            .all(|a| (0.0..=1.0).contains(a))
    );

    // The run directory.
    let config: serde_json::Value = serde_json::from_str(&read(&out.join("config.json"))).unwrap();
    assert_eq!(config["teacher_sha256"].as_array().unwrap().len(), 3);
    assert_eq!(config["tiny_teachers"], true);
    assert_eq!(config["epochs"], 2);
    let fin = read(&out.join("finTS_resnet.csv"));
    assert!(fin.starts_with("# TINY RANDOM TEACHERS"), "{fin}");
    let fin_rows = rows(&fin);
    assert_eq!(fin_rows.len(), 2);
    assert_eq!(
        fin_rows[1][..3],
        ["3".to_string(), "weave".into(), "2".into()]
    );
    let eval_csv = read(&out.join("Eval_resnet.csv"));
    let header = eval_csv.lines().find(|l| !l.starts_with('#')).unwrap();
    // The reference's columns first, unchanged; then, the demo data having masks, the pixel
    // metrics, nor's AUPR and F1-max, and both protocols' headline numbers.
    let columns: Vec<&str> = header.split(',').collect();
    assert_eq!(
        columns[3 + 69..],
        [
            "nor",
            "oracle (reference protocol)",
            "pixel AUROC (nor)",
            "AUPR (nor)",
            "F1-max (nor)",
            "pixel AUPRO@0.3 (nor)",
            "reference: epoch",
            "reference: oracle AUC",
            "label-free: epoch",
            "label-free: nor AUC"
        ]
    );
    let eval_rows = rows(&eval_csv);
    assert_eq!(eval_rows.len(), 2);
    assert_eq!(eval_rows[1][0], "mean");
    let cell = |name: &str| -> f64 {
        let i = columns.iter().position(|c| *c == name).unwrap();
        eval_rows[0][i].parse().unwrap()
    };
    assert!((cell("oracle (reference protocol)") - eval.oracle().0).abs() < 1e-6);
    assert!((cell("pixel AUROC (nor)") - eval.pixel_nor.unwrap()).abs() < 1e-6);
    assert!((cell("pixel AUPRO@0.3 (nor)") - eval.pixel_aupro.unwrap()).abs() < 1e-6);
    assert!((cell("AUPR (nor)") - eval.aupr.unwrap()).abs() < 1e-6);
    // The AUROC of nor per defect type: the demo's weave has scratches and stains.
    let kinds: Vec<&String> = eval.per_defect.keys().collect();
    assert_eq!(kinds, ["scratch", "stain"]);
    assert!(eval.per_defect.values().all(|a| (0.0..=1.0).contains(a)));
    let class_dir = out.join("weave");
    for file in ["model.mtad", "progress.json", "scores_train.csv"] {
        assert!(class_dir.join(file).is_file(), "{file} missing");
    }
    assert!(!class_dir.join("best").exists());
    check_artifact(&class_dir.join("model.mtad"), &first);
    let scores = read(&class_dir.join("scores_test.csv"));
    assert_eq!(scores.lines().count(), 1 + 4 * 25);
    let stats = TeacherStatistics::load(&class_dir.join("teacher_stats.bin")).unwrap();
    assert_eq!(stats.count, 8 * 25);
    // A finished class keeps no checkpoint (model.mtad holds its best evaluation).
    assert!(!class_dir.join("checkpoint").exists());

    // Inference with the saved best models reproduces the training-time table exactly.
    let prepared = Prepared::for_run(&out, None, &WeightsLocation::Build, Device::flex()).unwrap();
    let rows = prepared.infer().unwrap();
    assert_eq!(rows[0].evaluation.as_ref(), Some(eval));
    assert_eq!(read(&out.join("infer/Eval_resnet.csv")), eval_csv);
    // The run folder is infer's while `prepared` lives (its lock); a training waits for it.
    let mut busy = request(&data, &out, &cache);
    busy.cover = true;
    let err = prepare(busy).err().unwrap().to_string();
    assert!(err.contains("is in use by `mtad infer`"), "{err}");
    drop(prepared);

    // Same data and teachers again, into the same --out: a numeric suffix, and the caches are
    // reused, so the teachers only see the random crops.
    let second = run(request(&data, &out, &cache));
    assert_eq!(second.out, tmp.path().join("run_1"));
    assert_eq!(second.teacher_inputs, 2 * 2 * 16);
    assert!(second.reference_teacher_inputs > second.teacher_inputs);

    // A crop pool: its embeddings are cached once (8 images x 6 offsets), after which training
    // runs no teacher at all.
    let mut pooled = request(&data, &tmp.path().join("pool"), &cache);
    pooled.settings.crop_pool = Some(6);
    assert_eq!(run(pooled.clone()).teacher_inputs, 8 * 6);
    pooled.cover = true;
    assert_eq!(run(pooled).teacher_inputs, 0);

    // A damaged cache is detected and rebuilt.
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("weave-test"))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();
    let mut again = request(&data, &out, &cache);
    again.cover = true;
    assert_eq!(run(again).teacher_inputs, 4 * 25 + 2 * 2 * 16);
}

#[test]
fn single_teacher_and_no_teacher_ablations_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let mut single = request(&data, &tmp.path().join("single"), &cache);
    single.settings.teachers = TeacherChoice::Resnet152;
    single.settings.epochs = 1;
    let summary = run(single);
    assert_eq!(summary.config.teacher_names, ["tiny_resnet"]);
    let artifact = Artifact::read(&tmp.path().join("single/weave/model.mtad")).unwrap();
    let parts: Vec<&str> = artifact
        .header
        .parts
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(parts, ["student.bpk", "decoder.bpk", "teacher_stats.bin"]);
    // Its models reload (no weighting), but not with other teachers than it was trained with.
    let run_dir = tmp.path().join("single");
    let reopen = || Prepared::for_run(&run_dir, None, &WeightsLocation::Build, Device::flex());
    assert_eq!(
        reopen().unwrap().infer().unwrap()[0].evaluation,
        summary.classes[0].evaluation
    );
    let config_path = run_dir.join("config.json");
    let config = read(&config_path);
    let sha = &summary.config.teacher_sha256[0];
    std::fs::write(&config_path, config.replace(sha.as_str(), &"0".repeat(64))).unwrap();
    let err = reopen().err().expect("other teachers").to_string();
    assert!(err.contains("other teachers"), "{err}");

    let mut none = request(&data, &tmp.path().join("none"), &cache);
    none.settings.teachers = TeacherChoice::None;
    none.settings.epochs = 1;
    let summary = run(none);
    assert_eq!(summary.teacher_inputs, 0);
    assert!(summary.config.teacher_sha256.is_empty());
}

fn train_args<'a>(data: &'a str, out: &'a str, cache: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--dataset",
        "folder",
        "--data-root",
        data,
        "--classes",
        "grain",
        "--student",
        "resnet",
        "--epochs",
        "4",
        "--eval-every",
        "1",
        "--image-size",
        "32",
        "--tiny-teachers",
        "--crops-per-batch",
        "4",
        "--device",
        "cpu",
        "--seed",
        "11",
        "--out",
        out,
        "--cache-dir",
        cache,
    ]
}

#[test]
fn a_killed_run_resumes_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let data = data.to_str().unwrap();
    let cache = tmp.path().join("cache");
    let cache = cache.to_str().unwrap();
    let straight = tmp.path().join("straight");
    let killed = tmp.path().join("killed");

    // The uninterrupted run takes its settings from a TOML file (the same as train_args'
    // flags, written with `-` and `_` both), and one flag that overrides the file's.
    let settings = tmp.path().join("settings.toml");
    std::fs::write(
        &settings,
        format!(
            "dataset = \"folder\"\ndata_root = {data:?}\nclasses = \"grain\"\n\
             student = \"resnet\"\nepochs = 4\neval-every = 1\nimage_size = 32\n\
             tiny_teachers = true\ncrops_per_batch = 4\nseed = 99\ncache_dir = {cache:?}\n"
        ),
    )
    .unwrap();
    let straight_str = straight.to_str().unwrap();
    let settings_str = settings.to_str().unwrap();
    let from_file = [
        "train",
        "--config",
        settings_str,
        "--seed",
        "11",
        "--out",
        straight_str,
        "--device",
        "cpu",
    ];
    let out = mtad(&from_file, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = read(&straight.join("config.json"));
    assert!(config.contains("\"seed\": 11"), "the flag wins: {config}");

    // Killed in the middle of epoch 3 (after its first step), after the checkpoint of epoch 2.
    let args = train_args(data, killed.to_str().unwrap(), cache);
    let out = mtad(&args, Some("3:1"));
    assert!(!out.status.success(), "the abort hook did not fire");
    let progress = read(&killed.join("grain/progress.json"));
    assert!(progress.contains("\"checkpoint_epoch\": 2"), "{progress}");
    assert!(!progress.contains("\"complete\": true"));
    // Checkpoints at every evaluation (each epoch here); only the latest is kept.
    let mut checkpoints: Vec<String> = std::fs::read_dir(killed.join("grain/checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    checkpoints.sort();
    assert_eq!(
        checkpoints,
        ["model-2.bpk", "optim-2.bpk", "scheduler-2.bpk"]
    );

    // Resuming needs no other option: the settings come from the run's config.json.
    let resume = vec!["train", "--resume", "--out", killed.to_str().unwrap()];
    let out = mtad(&resume, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The log (standard error and the run folder's run.log) says where it resumed.
    assert!(
        stderr.contains("resuming from the checkpoint of epoch 2"),
        "{stderr}"
    );
    let log = read(&killed.join("run.log"));
    assert!(
        log.contains("resuming from the checkpoint of epoch 2"),
        "{log}"
    );
    let results = [
        "Eval_resnet.csv",
        "finTS_resnet.csv",
        "grain/scores_test.csv",
        "grain/scores_train.csv",
    ];
    common::assert_same_files(&straight, &killed, &results);
    assert!(!killed.join("grain/checkpoint").exists());

    // Resuming with other settings is refused.
    let mut other = resume.clone();
    other.extend(["--lr", "0.01"]);
    let out = mtad(&other, None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lr"));
}

#[test]
fn a_diverging_loss_stops_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let mut bad = request(&data, &tmp.path().join("nan"), &tmp.path().join("cache"));
    bad.settings.lr = 1e30;
    bad.settings.epochs = 3;
    let err = prepare(bad).unwrap().run().unwrap_err().to_string();
    assert!(
        err.contains("loss became") || err.contains("not finite"),
        "{err}"
    );
}

#[test]
fn bad_input_is_reported_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    let err = |r: TrainRequest| prepare(r).err().expect("must fail").to_string();

    let mut r = request(&data, &out, &cache);
    r.settings.classes = "weave,rust".into();
    assert!(err(r).contains("unknown class 'rust'"));

    let mut r = request(&data, &out, &cache);
    r.settings.data_root = Some(tmp.path().join("nowhere"));
    assert!(err(r).contains("nowhere"));

    let mut r = request(&data, &out, &cache);
    r.settings.image_size = 48;
    assert!(err(r).contains("multiple of 32"));

    // Sizes are bounded before anything is allocated, and the error says the limit.
    let mut r = request(&data, &out, &cache);
    r.settings.image_size = 100_000;
    assert!(err(r).contains("at most 512"));
    let mut r = request(&data, &out, &cache);
    r.settings.crops_per_batch = 1_000_000;
    assert!(err(r).contains("from 1 to 256"));
    let mut r = request(&data, &out, &cache);
    r.settings.batch_size = Some(1 << 40);
    assert!(err(r).contains("to 1024"));
    let mut r = request(&data, &out, &cache);
    r.settings.epochs = usize::MAX;
    assert!(err(r).contains("at most 1000000"));
    let mut r = request(&data, &out, &cache);
    r.settings.crop_pool = Some(100_000);
    assert!(err(r).contains("from 1 to 1024"));

    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let r = request(&data, &blocker.join("run"), &cache);
    assert!(err(r).contains("file"));

    let mut r = request(&data, &out, &cache);
    r.resume = true;
    assert!(err(r).contains("not a run directory"));
    let missing = Prepared::for_run(&out, None, &WeightsLocation::Build, Device::flex());
    assert!(
        missing
            .err()
            .unwrap()
            .to_string()
            .contains("not a run directory")
    );

    // Real teachers: at 224 they must be compiled in (a fresh clone has only the tiny ones) and
    // their weights present.
    let mut r = request(&data, &out, &cache);
    r.settings.tiny_teachers = false;
    r.settings.image_size = 224;
    r.teacher_weights = WeightsLocation::Dir(tmp.path().join("no-weights"));
    assert!(err(r).contains("teacher"));
    assert!(
        !out.exists(),
        "nothing may be written before the checks pass"
    );
}

#[test]
fn cifar_runs_the_teachers_once_per_image_of_the_trained_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let cifar = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar");
    let cache = tmp.path().join("cache");
    let mut r = request(&cifar, &tmp.path().join("cifar"), &cache);
    r.settings.dataset = Some(DatasetKind::Cifar10);
    r.settings.classes = "airplane,1".into();
    r.settings.batch_size = Some(2);
    r.settings.epochs = 2;
    let first = run(r.clone());
    // Each class's 2 training images and the 10 test images (shared), once; none per epoch.
    // (The fixture has 15 training images: the other classes' are not forwarded.)
    assert_eq!(first.teacher_inputs, 2 + 2 + 10);
    assert_eq!(first.classes.len(), 2);
    assert_eq!(first.classes[1].name, "automobile");
    let scores = read(&tmp.path().join("cifar/airplane/scores_test.csv"));
    assert_eq!(scores.lines().count(), 1 + 10);
    assert!(scores.contains("cifar[5]"));
    // The reference would run them on every epoch and evaluation: per class 2 training images
    // for the statistics, 2 per epoch, 10 per evaluation.
    assert_eq!(first.reference_teacher_inputs, 2 * (2 + 2 * 2 + 10 * 2));

    r.cover = true;
    assert_eq!(run(r).teacher_inputs, 0);
}

/// The class artifact of the tiny run: its parts, calibration, pixel AUROC, and its checks.
fn check_artifact(path: &Path, summary: &RunSummary) {
    let artifact = Artifact::read(path).unwrap();
    let h = &artifact.header;
    let names: Vec<&str> = h.parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "student.bpk",
            "decoder.bpk",
            "weighting.bpk",
            "teacher_stats.bin"
        ]
    );
    assert_eq!(h.class_name, "weave");
    assert_eq!(h.config, summary.config);
    assert_eq!(h.deployed.evaluation, summary.classes[0].evaluation);
    // 8 normal training images of 25 patches; the threshold flags floor(1% of 8) = 0 of them.
    assert_eq!((h.normal.images, h.normal.scores.len()), (8, 8 * 25));
    let nor: Vec<f64> = (0..h.normal.scores.len())
        .map(|i| h.deployed.normaliser.score(&h.normal.scores, i))
        .collect();
    let top = nor.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(h.threshold, top);

    // The pixel AUROC equals a pixel-by-pixel computation over the 148x148 resized images:
    // each pixel scores the max nor of the patches covering it (scores_test.csv).
    let run = path.parent().unwrap();
    let scores = read(&run.join("scores_test.csv"));
    let mut per_image: Vec<(String, Vec<(usize, usize, f64)>)> = Vec::new();
    for line in scores.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let raw: Vec<f64> = f[5..8].iter().map(|v| v.parse().unwrap()).collect();
        let n = &h.deployed.normaliser;
        let s: f64 = (0..3)
            .map(|k| (raw[k] - n.min[k]) / (n.max[k] - n.min[k]))
            .sum();
        let (y, x) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        match per_image.last_mut() {
            Some((p, v)) if *p == f[1] => v.push((y, x, s)),
            _ => per_image.push((f[1].to_string(), vec![(y, x, s)])),
        }
    }
    let (side, patch) = (148usize, 32usize);
    let (mut pixel_scores, mut pixel_labels) = (Vec::new(), Vec::new());
    for (image, patches) in &per_image {
        let image = PathBuf::from(image);
        let defect = image
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mask = (defect != "good").then(|| {
            let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
            let category = image.parent().unwrap().parent().unwrap().parent().unwrap();
            image::open(category.join(format!("ground_truth/{defect}/{stem}_mask.png")))
                .unwrap()
                .to_luma8()
        });
        for y in 0..side {
            for x in 0..side {
                let s = patches
                    .iter()
                    .filter(|(py, px, _)| *py <= y && y < py + patch && *px <= x && x < px + patch)
                    .map(|p| p.2)
                    .fold(f64::NEG_INFINITY, f64::max);
                let label = mask.as_ref().map_or(0, |m| {
                    let (w, hh) = (m.width() as usize, m.height() as usize);
                    u8::from(m.get_pixel((x * w / side) as u32, (y * hh / side) as u32).0[0] > 127)
                });
                pixel_scores.push(s);
                pixel_labels.push(label);
            }
        }
    }
    let expected = roc_auc(&pixel_scores, &pixel_labels).unwrap();
    let got = h.deployed.evaluation.as_ref().unwrap().pixel_nor.unwrap();
    assert!(
        (got - expected).abs() < 1e-9,
        "pixel AUROC {got} vs {expected}"
    );

    // A damaged or truncated file is refused with what is wrong.
    let bytes = std::fs::read(path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("model.mtad");
    let mut flipped = bytes.clone();
    let end = flipped.len() - 10;
    flipped[end] ^= 1;
    std::fs::write(&broken, &flipped).unwrap();
    let err = Artifact::read(&broken).err().unwrap().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let err = Artifact::read(&broken).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
    let err = Artifact::read(&dir.path().join("none.mtad"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}
