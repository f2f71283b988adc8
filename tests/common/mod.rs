//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use multi_teacher_ad::data::demo::{DemoSpec, write_demo_dataset};
use multi_teacher_ad::training::prepare::{TrainRequest, prepare};
use multi_teacher_ad::training::run::RunSummary;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a raw little-endian f32 file.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{} is not f32 data", path.display());
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// ||a - b|| / ||b||, in f64.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// Index of the largest value in each row of length `width`.
pub fn argmax_rows(values: &[f32], width: usize) -> Vec<usize> {
    values
        .chunks_exact(width)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0
        })
        .collect()
}

/// One stored onnxruntime reference: an input and the output it gave.
#[derive(Debug, serde::Deserialize)]
pub struct ReferenceCase {
    pub teacher: String,
    pub input_file: String,
    pub input_shape: Vec<usize>,
    pub output_file: String,
    pub output_shape: Vec<usize>,
}

#[derive(Debug, serde::Deserialize)]
struct ReferenceFile {
    cases: Vec<ReferenceCase>,
}

/// The cases of `<dir>/reference.json`, with their files resolved against `dir`.
pub fn reference_cases(dir: &Path) -> Vec<(ReferenceCase, Vec<f32>, Vec<f32>)> {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file: ReferenceFile = serde_json::from_str(&text).unwrap();
    file.cases
        .into_iter()
        .map(|case| {
            let input = read_f32(&dir.join(&case.input_file));
            let output = read_f32(&dir.join(&case.output_file));
            assert_eq!(input.len(), case.input_shape.iter().product::<usize>());
            assert_eq!(output.len(), case.output_shape.iter().product::<usize>());
            (case, input, output)
        })
        .collect()
}

/// A `[N, C, H, W]` tensor from host values.
pub fn tensor4(values: &[f32], shape: &[usize], device: &Device) -> Tensor<4> {
    let shape: [usize; 4] = shape.try_into().expect("a 4-d shape");
    Tensor::<4>::from_data(TensorData::new(values.to_vec(), shape), device)
}

// Tiny training runs and the `mtad` binary (tests/training.rs, tests/inference.rs).

pub fn demo_data(dir: &Path) -> PathBuf {
    demo_data_with(dir, 8)
}

/// [`demo_data`] with `train` normal training images per category.
pub fn demo_data_with(dir: &Path, train: usize) -> PathBuf {
    let root = dir.join("data");
    let spec = DemoSpec {
        image_size: 64,
        train,
        test_good: 2,
        test_defect: 1,
        ..DemoSpec::default()
    };
    write_demo_dataset(&root, &spec).unwrap();
    root
}

pub fn request(data: &Path, out: &Path, cache: &Path) -> TrainRequest {
    let mut r = TrainRequest::tiny_folder(data, out, cache, Device::flex());
    r.settings.classes = "weave".into();
    r.settings.epochs = 2;
    r.settings.eval_every = 1;
    r.settings.seed = 5;
    // The mechanics tests count every training image: the reference protocol (nothing held
    // out). tests/label_free.rs runs the label-free one.
    r.settings.protocol = Some(multi_teacher_ad::config::Protocol::Reference);
    r
}

pub fn run(request: TrainRequest) -> RunSummary {
    prepare(request).unwrap().run().unwrap()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Data lines of a CSV (no `#` note, no header).
pub fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

pub fn mtad(args: &[&str], abort_at: Option<&str>) -> std::process::Output {
    let env: Vec<(&str, &str)> = abort_at
        .map(|at| ("MTAD_ABORT_AT", at))
        .into_iter()
        .collect();
    mtad_env(args, &env)
}

/// Runs the binary with `args` and the environment variables `env` added.
pub fn mtad_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mtad"));
    cmd.args(args).envs(env.iter().copied());
    cmd.output().unwrap()
}

/// Asserts that each of `files` (paths relative to the run folders) has the same bytes in `a`
/// and in `b`.
pub fn assert_same_files(a: &Path, b: &Path, files: &[&str]) {
    for file in files {
        assert!(
            read(&a.join(file)) == read(&b.join(file)),
            "{file} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}
