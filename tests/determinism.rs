//! The same command with the same seed gives the same bytes, whatever the thread count: on
//! MVTec-layout data (random crops, the teachers run during training) and on CIFAR-10.
//! (A run killed and resumed gives the same bytes too: `training.rs`.)

mod common;

use std::path::Path;

use common::{assert_same_files, demo_data, mtad_env};

/// Runs `train` with `args` and `--out DIR` on `threads` threads.
fn train(args: &[&str], out: &Path, threads: &str) {
    let mut args = args.to_vec();
    args.extend(["--out", out.to_str().unwrap()]);
    let output = mtad_env(&args, &[("RAYON_NUM_THREADS", threads)]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The tables and the class's score files of two runs are the same bytes.
fn assert_same_results(a: &Path, b: &Path, class: &str) {
    let (test, train) = (
        format!("{class}/scores_test.csv"),
        format!("{class}/scores_train.csv"),
    );
    let files = ["Eval_resnet.csv", "finTS_resnet.csv", &test, &train];
    assert_same_files(a, b, &files);
}

/// `train` with `dataset` options: three epochs, an evaluation after each, tiny teachers,
/// 32-pixel inputs, seed 3.
fn quick<'a>(dataset: &[&'a str], cache: &'a Path) -> Vec<&'a str> {
    let mut args = vec!["train"];
    args.extend(dataset);
    args.extend(["--epochs", "3", "--eval-every", "1", "--image-size", "32"]);
    args.extend(["--tiny-teachers", "--device", "cpu", "--seed", "3", "-q"]);
    args.extend(["--cache-dir", cache.to_str().unwrap()]);
    args
}

#[test]
fn crops_give_the_same_bytes_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    // 64 crops per step (the reference's batch) and three epochs: before the reductions were
    // ordered, runs parted from the third step on.
    let data = data.to_str().unwrap();
    let args = quick(
        &[
            "--dataset",
            "folder",
            "--data-root",
            data,
            "--classes",
            "grain",
        ],
        &cache,
    );
    let (one, three, again) = (
        tmp.path().join("one"),
        tmp.path().join("three"),
        tmp.path().join("again"),
    );
    train(&args, &one, "1");
    train(&args, &three, "3");
    train(&args, &again, "3");
    assert_same_results(&one, &three, "grain");
    assert_same_results(&three, &again, "grain");
}

#[test]
fn cifar_gives_the_same_bytes_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let cifar = common::repo().join("tests/fixtures/cifar");
    let cache = tmp.path().join("cache");
    let cifar = cifar.to_str().unwrap();
    let dataset = [
        "--dataset",
        "cifar10",
        "--data-root",
        cifar,
        "--classes",
        "airplane",
    ];
    let mut args = quick(&dataset, &cache);
    args.extend(["--batch-size", "2"]);
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    train(&args, &one, "1");
    train(&args, &three, "3");
    assert_same_results(&one, &three, "airplane");
}
