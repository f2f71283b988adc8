//! Every command that reads a run folder, on run folders damaged in each way we can think of:
//! files truncated or filled with garbage, a `model.mtad` of another image size, class or
//! dataset. Each answer is a clear error that names the file (exit 1), never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{demo_data, mtad};

fn train(args: &[&str]) {
    let mut all = vec![
        "train",
        "--tiny-teachers",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "-q",
    ];
    all.extend(args);
    let out = mtad(&all, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs every command that reads `run`, and checks that none panics and that each one that
/// fails names `named` (the damaged file) and exits 1. Returns how many failed.
fn every_command(run: &Path, clean: &Path, image: &Path, named: &str, tmp: &Path) -> usize {
    let run_s = run.to_str().unwrap();
    let out = |name: &str| tmp.join(name).to_str().unwrap().to_string();
    let (detect_out, report_out, ensemble_out) = (out("d"), out("r"), out("e"));
    let commands: Vec<Vec<&str>> = vec![
        vec!["infer", "--run", run_s, "--device", "cpu"],
        vec![
            "detect",
            "--run",
            run_s,
            "--class",
            "grain",
            "--device",
            "cpu",
            "--out",
            &detect_out,
            image.to_str().unwrap(),
        ],
        vec!["report", "--run", run_s, "--out", &report_out],
        vec![
            "ensemble",
            "--runs",
            run_s,
            clean.to_str().unwrap(),
            "--out",
            &ensemble_out,
        ],
        vec!["train", "--resume", "--out", run_s],
    ];
    let mut failed = 0;
    for command in commands {
        let output = mtad(&command, None);
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            !err.contains("internal error") && !err.contains("panicked"),
            "{command:?} on {named}: {err}"
        );
        if !output.status.success() {
            failed += 1;
            assert_eq!(
                output.status.code(),
                Some(1),
                "{command:?} on {named}: {err}"
            );
            assert!(
                err.contains(named),
                "{command:?} does not name {named}: {err}"
            );
        }
    }
    failed
}

#[test]
fn every_command_refuses_a_damaged_run_folder_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let data_s = data.to_str().unwrap();
    let cache = tmp.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let folder = |out: &Path, size: &str| {
        let common = [
            "--dataset",
            "folder",
            "--data-root",
            data_s,
            "--cache-dir",
            cache_s,
        ];
        let mut args = common.to_vec();
        args.extend(["--classes", "grain,weave", "--image-size", size]);
        args.extend(["--crops-per-batch", "4", "--out", out.to_str().unwrap()]);
        train(&args);
    };
    let clean = tmp.path().join("clean");
    folder(&clean, "32");
    let big = tmp.path().join("big");
    folder(&big, "64");
    let cifar_run = tmp.path().join("cifar");
    let cifar = common::repo().join("tests/fixtures/cifar");
    train(&[
        "--dataset",
        "cifar10",
        "--data-root",
        cifar.to_str().unwrap(),
        "--classes",
        "airplane",
        "--batch-size",
        "2",
        "--cache-dir",
        cache_s,
        "--out",
        cifar_run.to_str().unwrap(),
    ]);
    let image = data.join("grain/test/good/000.png");
    let model = "grain/model.mtad";

    type Damage = Box<dyn Fn(&Path)>;
    let truncate = |file: &'static str| -> Damage {
        Box::new(move |run: &Path| {
            let path = run.join(file);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        })
    };
    let garbage = |file: &'static str| -> Damage {
        Box::new(move |run: &Path| {
            let path = run.join(file);
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
        })
    };
    let replaced = |from: PathBuf| -> Damage {
        Box::new(move |run: &Path| {
            std::fs::copy(&from, run.join("grain/model.mtad")).unwrap();
        })
    };
    // (damage, the file the errors must name, commands that must fail at least)
    let cases: Vec<(&str, Damage, &str, usize)> = vec![
        ("truncated model", truncate(model), "model.mtad", 2),
        ("garbage model", garbage(model), "model.mtad", 2),
        (
            "other image size",
            replaced(big.join(model)),
            "model.mtad",
            2,
        ),
        (
            "other class",
            replaced(clean.join("weave/model.mtad")),
            "model.mtad",
            2,
        ),
        (
            "other dataset",
            replaced(cifar_run.join("airplane/model.mtad")),
            "model.mtad",
            2,
        ),
        (
            "truncated config",
            truncate("config.json"),
            "config.json",
            5,
        ),
        ("garbage config", garbage("config.json"), "config.json", 5),
        (
            "truncated progress",
            truncate("grain/progress.json"),
            "progress.json",
            2,
        ),
        (
            "garbage progress",
            garbage("grain/progress.json"),
            "progress.json",
            2,
        ),
        (
            "truncated scores",
            truncate("grain/scores_test.csv"),
            "scores_test.csv",
            1,
        ),
        (
            "garbage scores",
            garbage("grain/scores_test.csv"),
            "scores_test.csv",
            1,
        ),
    ];
    // Heatmaps that cannot be written (here `heatmaps` is a file, as a full disk would refuse
    // them): the image is still scored and reported, and the command fails at the end.
    let blocked = tmp.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("heatmaps"), b"in the way").unwrap();
    let output = mtad(
        &[
            "detect",
            "--run",
            clean.to_str().unwrap(),
            "--class",
            "grain",
            "--device",
            "cpu",
            "--out",
            blocked.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
        None,
    );
    let (stdout, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(1), "{stdout}{err}");
    assert!(
        stdout.contains("000.png") && !stdout.contains("ERROR"),
        "{stdout}"
    );
    assert!(stdout.contains("0 unreadable"), "{stdout}");
    assert!(err.contains("1 heatmap(s) could not be written"), "{err}");
    assert!(
        std::fs::read_to_string(blocked.join("detections.csv"))
            .unwrap()
            .contains("000.png")
    );

    for (i, (name, damage, named, at_least)) in cases.into_iter().enumerate() {
        let run = tmp.path().join(format!("damaged-{i}"));
        copy_dir(&clean, &run);
        damage(&run);
        let failed = every_command(
            &run,
            &clean,
            &image,
            named,
            &tmp.path().join(format!("o{i}")),
        );
        assert!(
            failed >= at_least,
            "{name}: only {failed} commands refused it"
        );
    }
}
