//! The same command with the same seed gives the same bytes, whatever the thread count: on
//! MVTec-layout data (random crops, the teachers run during training) and on CIFAR-10.
//! (A run killed and resumed gives the same bytes too: `training.rs`.)

mod common;

use std::path::Path;

use common::{demo_data, mtad_env, read};

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

/// The tables and every class's score files of two runs are the same bytes.
fn assert_same_results(a: &Path, b: &Path, classes: &[&str]) {
    let mut files = vec![
        "Eval_resnet.csv".to_string(),
        "finTS_resnet.csv".to_string(),
    ];
    for class in classes {
        files.push(format!("{class}/scores_test.csv"));
        files.push(format!("{class}/scores_train.csv"));
    }
    for file in files {
        assert!(
            read(&a.join(&file)) == read(&b.join(&file)),
            "{file} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn crops_give_the_same_bytes_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let cache = tmp.path().join("cache");
    // 64 crops per step (the reference's batch) and three epochs: before the reductions were
    // ordered, runs parted from the third step on.
    let args = [
        "train",
        "--dataset",
        "folder",
        "--data-root",
        data.to_str().unwrap(),
        "--classes",
        "grain",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--image-size",
        "32",
        "--tiny-teachers",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--cache-dir",
        cache.to_str().unwrap(),
        "-q",
    ];
    let (one, three, again) = (
        tmp.path().join("one"),
        tmp.path().join("three"),
        tmp.path().join("again"),
    );
    train(&args, &one, "1");
    train(&args, &three, "3");
    train(&args, &again, "3");
    assert_same_results(&one, &three, &["grain"]);
    assert_same_results(&three, &again, &["grain"]);
}

#[test]
fn cifar_gives_the_same_bytes_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let cifar = common::repo().join("tests/fixtures/cifar");
    let cache = tmp.path().join("cache");
    let args = [
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        cifar.to_str().unwrap(),
        "--classes",
        "airplane",
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--image-size",
        "32",
        "--tiny-teachers",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--cache-dir",
        cache.to_str().unwrap(),
        "-q",
    ];
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    train(&args, &one, "1");
    train(&args, &three, "3");
    assert_same_results(&one, &three, &["airplane"]);
}
