//! Stops and damage around a training run: SIGTERM in the middle of an epoch writes a
//! checkpoint of that step and exits 143, and the resumed run gives the same bytes as an
//! uninterrupted one; changed data and a damaged checkpoint are refused before resuming; a run
//! folder in use by another process is refused.

mod common;

use std::path::Path;

use common::{assert_same_files, demo_data, mtad, mtad_env, read};

fn args<'a>(data: &'a str, cache: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--dataset",
        "folder",
        "--data-root",
        data,
        "--classes",
        "grain",
        "--epochs",
        "3",
        "--eval-every",
        "3",
        "--image-size",
        "32",
        "--tiny-teachers",
        "--crops-per-batch",
        "4",
        "--device",
        "cpu",
        "--seed",
        "2",
        "--cache-dir",
        cache,
        "--out",
        out,
    ]
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Trains into `out`, stopped by SIGTERM after step 1 of epoch 2 (of 2 steps: 8 images, 4 per
/// batch), and checks what the stop leaves.
fn stopped_run(data: &str, cache: &str, out: &Path) {
    let out_str = out.to_str().unwrap();
    let output = mtad_env(&args(data, cache, out_str), &[("MTAD_SIGNAL_AT", "2:1")]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(143), "{err}");
    assert!(
        err.contains("stopped by SIGTERM after step 1 of epoch 2"),
        "{err}"
    );
    assert!(!err.contains("internal error"), "{err}");
    let progress = read(&out.join("grain/progress.json"));
    assert!(progress.contains("\"checkpoint_epoch\": 2"), "{progress}");
    assert!(progress.contains("\"steps\": 1"), "{progress}");
    assert!(progress.contains("model-2.bpk"), "{progress}");
    assert!(out.join("grain/checkpoint/model-2.bpk").is_file());
    assert!(!out.join(".mtad.lock").exists(), "the lock is released");
}

#[test]
fn sigterm_mid_epoch_checkpoints_that_step_and_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let (data, cache) = (data.to_str().unwrap(), tmp.path().join("cache"));
    let cache = cache.to_str().unwrap();
    let straight = tmp.path().join("straight");
    let output = mtad(&args(data, cache, straight.to_str().unwrap()), None);
    assert!(output.status.success(), "{}", stderr(&output));

    let stopped = tmp.path().join("stopped");
    stopped_run(data, cache, &stopped);
    let resume = ["train", "--resume", "--out", stopped.to_str().unwrap()];
    let output = mtad(&resume, None);
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(
        err.contains("resuming from the checkpoint of epoch 2, after its step 1"),
        "{err}"
    );
    let results = [
        "Eval_resnet.csv",
        "finTS_resnet.csv",
        "grain/scores_test.csv",
        "grain/scores_train.csv",
    ];
    assert_same_files(&straight, &stopped, &results);

    // --checkpoint-every: a checkpoint after every step here (its minutes are up at once), so
    // that a kill (an abort right after step 1 of epoch 2) loses nothing; the resumed run gives
    // the same bytes again.
    let periodic = tmp.path().join("periodic");
    let mut a = args(data, cache, periodic.to_str().unwrap());
    a.extend(["--checkpoint-every", "0.000001"]);
    let output = mtad(&a, Some("2:1"));
    assert!(!output.status.success(), "the abort hook did not fire");
    let progress = read(&periodic.join("grain/progress.json"));
    assert!(
        progress.contains("\"checkpoint_epoch\": 2") && progress.contains("\"steps\": 1"),
        "{progress}"
    );
    let output = mtad(
        &["train", "--resume", "--out", periodic.to_str().unwrap()],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_same_files(&straight, &periodic, &results);

    // Data that changed since the run started is refused (one training image replaced).
    let damaged = tmp.path().join("damaged");
    stopped_run(data, cache, &damaged);
    let image = Path::new(data).join("grain/train/good/000.png");
    let original = std::fs::read(&image).unwrap();
    std::fs::copy(Path::new(data).join("grain/train/good/001.png"), &image).unwrap();
    let output = mtad(
        &["train", "--resume", "--out", damaged.to_str().unwrap()],
        None,
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("the data changed since the run"), "{err}");
    std::fs::write(&image, original).unwrap();

    // A damaged checkpoint is refused with its file named, not loaded.
    let model = damaged.join("grain/checkpoint/model-2.bpk");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let output = mtad(
        &["train", "--resume", "--out", damaged.to_str().unwrap()],
        None,
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model-2.bpk") && err.contains("the checkpoint is damaged"),
        "{err}"
    );
    assert!(!err.contains("internal error"), "{err}");
}

#[test]
fn a_run_folder_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(tmp.path());
    let out = tmp.path().join("busy");
    std::fs::create_dir_all(&out).unwrap();
    // This test process holds the folder, as a running training would.
    let owner = format!(
        "{{\"host\":\"{}\",\"pid\":{},\"since\":0,\"command\":\"train\"}}",
        multi_teacher_ad::output::lock::host_name(),
        std::process::id()
    );
    std::fs::write(out.join(".mtad.lock"), &owner).unwrap();
    let cache = tmp.path().join("cache");
    let mut a = args(
        data.to_str().unwrap(),
        cache.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    a.push("--cover");
    let output = mtad(&a, None);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is in use by `mtad train`")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert_eq!(
        read(&out.join(".mtad.lock")),
        owner,
        "the owner's lock is kept"
    );
    assert!(!out.join("config.json").exists(), "nothing written");
}
