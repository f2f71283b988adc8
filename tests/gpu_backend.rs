//! Every command on a GPU backend (wgpu; Mesa's software Vulkan in CI), against the CPU backend
//! with the same seed: what `train`, `infer`, `detect` and `ensemble` run, and one training step
//! of the same model on both backends. `MTAD_REQUIRE_WGPU=1` (set by CI) makes a
//! missing adapter a failure instead of a skip.
//!
//! What must agree, and how closely (measured on lavapipe, then given headroom; the figures are
//! in docs/PERFORMANCE.md, "GPU backends"):
//! - the teacher statistics of a class (the same images through the same tiny teachers),
//!   relative L2 below [`STATS_TOLERANCE`];
//! - the first step's losses and a gradient of one model initialised on the CPU and copied to
//!   the GPU, relative below [`LOSS_TOLERANCE`];
//! - `detect`'s scores of one trained model on both backends, relative below
//!   [`SCORE_TOLERANCE`], and the same decisions where a score is not at the threshold.
//!
//! The two training runs themselves are not compared number for number: the networks'
//! initial weights come from each backend's own random generator.
#![cfg(feature = "wgpu")]

mod common;

use std::path::Path;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::{demo_data, read, relative_l2, request, rows, run};
use multi_teacher_ad::device::{DeviceChoice, select_device, wgpu_kind};
use multi_teacher_ad::inference::detect::{Detector, Heatmaps, ScoreColumn, ThresholdChoice};
use multi_teacher_ad::inference::ensemble;
use multi_teacher_ad::students::StudentKind;
use multi_teacher_ad::teachers::TeacherStatistics;
use multi_teacher_ad::teachers::WeightsLocation;
use multi_teacher_ad::training::model::{InputBatch, MtadModelConfig};
use multi_teacher_ad::training::prepare::Prepared;

const STATS_TOLERANCE: f64 = 1e-4;
const LOSS_TOLERANCE: f64 = 1e-4;
const SCORE_TOLERANCE: f64 = 1e-3;

/// The wgpu device the tests run on (lavapipe in CI), or `None` (skip) where there is none and
/// none is required.
fn wgpu() -> Option<Device> {
    match wgpu_kind(DeviceKind::Cpu).or_else(|_| wgpu_kind(DeviceKind::DefaultDevice)) {
        Ok(selected) => Some(selected.device),
        Err(e) if std::env::var_os("MTAD_REQUIRE_WGPU").is_none() => {
            eprintln!("skipped: no wgpu adapter ({e}); set MTAD_REQUIRE_WGPU=1 to fail instead");
            None
        }
        Err(e) => panic!("MTAD_REQUIRE_WGPU is set but wgpu cannot start: {e}"),
    }
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// Held by the tests that seed Burn's random generator (a process-wide one): run side by side,
/// one test's draws interleaved with the other's seeding, and the first step's data and model
/// were not the seeded ones (a CI run compared another batch, with a decoder gradient 4.8e-3
/// apart where the seeded one is 2e-5).
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_first_training_step_agrees_with_the_cpu() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = wgpu() else { return };
    let cpu = Device::flex().autodiff();
    let gpu = gpu.autodiff();
    cpu.seed(11);
    let model = MtadModelConfig::new(StudentKind::Resnet, 32, 3)
        .init(&cpu)
        .unwrap();
    let images = Tensor::<4>::random([4, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), &cpu);
    let teachers = Tensor::<3>::random([4, 3, 1000], Distribution::Default, &cpu);
    let step = |model: &multi_teacher_ad::training::model::MtadModel, device: &Device| {
        let batch = InputBatch {
            images: Tensor::from_data(images.clone().into_data(), device),
            teachers: Some(Tensor::from_data(teachers.clone().into_data(), device)),
        };
        let losses = model.losses(batch);
        let reconstruction = losses.reconstruction.clone().into_scalar::<f32>() as f64;
        let total = losses.total();
        let value = total.clone().into_scalar::<f32>() as f64;
        let grads = total.backward();
        let grad = model
            .decoder
            .linear1
            .weight
            .val()
            .grad(&grads)
            .expect("a gradient")
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        (value, reconstruction, grad)
    };
    let on_gpu = model.clone().fork(&gpu);
    let (cpu_total, cpu_rec, cpu_grad) = step(&model, &cpu);
    let (gpu_total, gpu_rec, gpu_grad) = step(&on_gpu, &gpu);
    let grad_error = relative_l2(&gpu_grad, &cpu_grad);
    println!(
        "first step: loss {cpu_total:.6} (cpu) vs {gpu_total:.6} (wgpu), reconstruction \
         {cpu_rec:.6} vs {gpu_rec:.6}, decoder gradient relative L2 {grad_error:.2e}"
    );
    assert!(relative(cpu_total, gpu_total) < LOSS_TOLERANCE);
    assert!(relative(cpu_rec, gpu_rec) < LOSS_TOLERANCE);
    assert!(grad_error < LOSS_TOLERANCE * 10.0, "{grad_error}");
}

#[test]
fn every_command_runs_on_wgpu_and_agrees_with_the_cpu() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = wgpu() else { return };
    // In this process, as the binary's commands run them: on a software rasterizer autotune's
    // first look at each kernel shape takes seconds, and a process tunes each shape once.
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let train = |device: &Device, name: &str| {
        // Each backend fills its own teacher cache: the statistics below are then each's own.
        let out = tmp.path().join(name);
        let mut r = request(&data, &out, &tmp.path().join(format!("cache-{name}")));
        r.device = device.clone();
        r.device_name = name.to_string();
        r.settings.epochs = 1;
        r.settings.batch_size = Some(2);
        r.settings.crops_per_batch = 2;
        let started = std::time::Instant::now();
        run(r);
        println!("train on {name}: {:.1} s", started.elapsed().as_secs_f64());
        out
    };
    let cpu_run = train(&Device::flex(), "cpu");
    let gpu_run = train(&gpu, "wgpu");
    let config = read(&gpu_run.join("config.json"));
    assert!(config.contains("\"device\": \"wgpu"), "{config}");
    assert!(config.contains("\"images_per_step\": 2"), "{config}");
    for run in [&cpu_run, &gpu_run] {
        assert!(run.join("weave/model.mtad").is_file());
        assert_eq!(rows(&read(&run.join("Eval_resnet.csv"))).len(), 2);
    }

    // The same images through the same teachers.
    let stats = |run: &Path| TeacherStatistics::load(&run.join("weave/teacher_stats.bin")).unwrap();
    let (a, b) = (stats(&cpu_run), stats(&gpu_run));
    assert_eq!(a.count, b.count);
    let flat = |s: &TeacherStatistics| -> Vec<f32> {
        s.mean.iter().chain(&s.std).flatten().copied().collect()
    };
    let error = relative_l2(&flat(&b), &flat(&a));
    println!("teacher statistics, wgpu vs cpu: relative L2 {error:.2e}");
    assert!(error < STATS_TOLERANCE, "{error}");

    // One trained model scored on both backends.
    let test = data.join("weave/test");
    let detect = |device: &Device, name: &str| {
        let detector = Detector::load(
            &cpu_run,
            "weave",
            ScoreColumn::Nor,
            ThresholdChoice {
                threshold: None,
                fpr: None,
            },
            &WeightsLocation::Build,
            device.clone(),
        )
        .unwrap();
        let found = detector
            .run(
                std::slice::from_ref(&test),
                &tmp.path().join(format!("detect-{name}")),
                Heatmaps::Scores,
            )
            .unwrap();
        (detector.threshold, found)
    };
    let (threshold, on_cpu) = detect(&Device::flex(), "cpu");
    let (_, on_gpu) = detect(&gpu, "wgpu");
    assert_eq!(on_cpu.len(), on_gpu.len());
    assert!(!on_cpu.is_empty());
    let mut worst: f64 = 0.0;
    for (c, g) in on_cpu.iter().zip(&on_gpu) {
        assert_eq!(c.path, g.path);
        let (c, g) = (c.outcome.as_ref().unwrap(), g.outcome.as_ref().unwrap());
        for (x, y) in [
            (c.score, g.score),
            (c.as_z, g.as_z),
            (c.as_cossim, g.as_cossim),
            (c.as_rec, g.as_rec),
        ] {
            worst = worst.max(relative(x, y));
        }
        if relative(c.score, threshold) > SCORE_TOLERANCE {
            assert_eq!(c.anomalous, g.anomalous);
        }
    }
    println!("detect scores, wgpu vs cpu: largest relative difference {worst:.2e}");
    assert!(worst < SCORE_TOLERANCE, "{worst}");

    // infer on the GPU reproduces the run's own evaluation table (the AUCs of the same scores).
    Prepared::for_run(&cpu_run, None, &WeightsLocation::Build, gpu.clone())
        .unwrap()
        .infer()
        .unwrap();
    let (own, again) = (
        rows(&read(&cpu_run.join("Eval_resnet.csv"))),
        rows(&read(&cpu_run.join("infer/Eval_resnet.csv"))),
    );
    assert_eq!(own.len(), again.len());
    for (x, y) in own[0].iter().zip(&again[0]).skip(1) {
        if let (Ok(x), Ok(y)) = (x.parse::<f64>(), y.parse::<f64>()) {
            assert!((x - y).abs() < 1e-6, "infer's AUC {y} vs the run's {x}");
        }
    }
    // The ensemble of the CPU-trained and the GPU-trained runs.
    let (rows_, _) = ensemble::ensemble(&[cpu_run, gpu_run], &tmp.path().join("ens")).unwrap();
    assert_eq!(rows_.len(), 1);
}

#[test]
fn mtad_devices_lists_the_cpu_and_the_adapter_that_wgpu_n_selects() {
    if wgpu().is_none() {
        return;
    }
    let out = common::mtad(&["devices", "--format", "json"], None);
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(devices[0]["choice"], "cpu");
    let first = devices
        .iter()
        .find(|d| d["backend"] == "wgpu")
        .expect("a wgpu adapter in the list");
    assert_eq!(first["choice"], "wgpu:0");
    let selected = select_device(DeviceChoice::Wgpu(Some(0))).unwrap();
    let name = first["name"].as_str().unwrap();
    assert!(selected.description.contains(name), "{selected} vs {name}");
    if std::env::var_os("MTAD_EXPECT_NO_GPU").is_some() {
        // CI's only adapter is the software one: listed as such, and never `auto`'s choice.
        assert!(first["kind"].as_str().unwrap().contains("CPU-emulated"));
    }
}
