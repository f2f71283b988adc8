//! Sweeps (`mtad sweep plan|run|status|gather`): a tiny sweep (tiny teachers, 2 classes x 2
//! students) run task by task through the binary, with the index from each scheduler's
//! variable, a finished task left alone, a failed task reported and missing tasks listed, not
//! averaged; then, where Slurm is installed (required with MTAD_REQUIRE_SLURM=1, as CI sets
//! after `.ci/slurm up`), the same sweep submitted as a Slurm array, whose gathered tables must
//! equal those of the tasks run one by one, byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{demo_data_with, read, rows};

fn mtad(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("AWS_BATCH_JOB_ARRAY_INDEX")
        .env("RAYON_NUM_THREADS", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let (success, stdout, stderr) = mtad(args, env);
    assert!(success, "{args:?}: {stdout}\n{stderr}");
    stdout
}

/// Plans the tiny sweep into `out`.
fn plan(data: &Path, out: &Path) -> String {
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    ok(
        &[
            "sweep",
            "plan",
            "--dataset",
            "folder",
            "--data-root",
            data,
            "--classes",
            "weave,disc",
            "--students",
            "resnet,vgg",
            "--tiny-teachers",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--eval-every",
            "1",
            "--crops-per-batch",
            "2",
            "--seed",
            "3",
            "--gpus",
            "0",
            "--concurrency",
            "2",
            "--retries",
            "1",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        &[],
    )
}

fn status(sweep: &Path) -> serde_json::Value {
    let text = ok(
        &[
            "sweep",
            "status",
            "--sweep",
            sweep.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[],
    );
    serde_json::from_str(&text).unwrap()
}

fn states(sweep: &Path) -> Vec<String> {
    let status = status(sweep);
    status
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap().to_string())
        .collect()
}

fn gather(sweep: &Path) -> PathBuf {
    ok(
        &["sweep", "gather", "--sweep", sweep.to_str().unwrap()],
        &[],
    );
    sweep.join("gathered")
}

const TABLES: [&str; 5] = [
    "resnet/Eval_resnet.csv",
    "resnet/finTS_resnet.csv",
    "vgg/Eval_vgg.csv",
    "vgg/finTS_vgg.csv",
    "eval_folder.csv",
];

#[test]
fn a_sweep_runs_task_by_task_and_as_a_slurm_array_with_the_same_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data_with(tmp.path(), 4);
    let one_by_one = tmp.path().join("one-by-one");
    let stdout = plan(&data, &one_by_one);
    assert!(stdout.contains("planned 4 tasks"), "{stdout}");
    for file in ["sweep.json", "slurm.sh", "job.yaml", "Containerfile"] {
        assert!(one_by_one.join(file).is_file(), "{file}");
    }
    let job = read(&one_by_one.join("job.yaml"));
    for needed in [
        "completionMode: Indexed",
        "completions: 4",
        "parallelism: 2",
    ] {
        assert!(job.contains(needed), "{needed}: {job}");
    }
    assert!(read(&one_by_one.join("slurm.sh")).contains("#SBATCH --array=0-3%2"));
    // Planning the same sweep again is fine; another one into the same folder is not.
    plan(&data, &one_by_one);
    let sweep = one_by_one.to_str().unwrap();
    let (success, _, err) = mtad(
        &[
            "sweep",
            "plan",
            "--dataset",
            "folder",
            "--data-root",
            data.to_str().unwrap(),
            "--classes",
            "grain",
            "--tiny-teachers",
            "--out",
            sweep,
        ],
        &[],
    );
    assert!(
        !success && err.contains("already holds another sweep"),
        "{err}"
    );
    let (success, _, err) = mtad(&["sweep", "run", "--sweep", sweep, "--index", "9"], &[]);
    assert!(!success && err.contains("0 to 3"), "{err}");
    let (success, _, err) = mtad(&["sweep", "run", "--sweep", sweep], &[]);
    assert!(!success && err.contains("SLURM_ARRAY_TASK_ID"), "{err}");
    assert_eq!(states(&one_by_one), ["pending"; 4]);

    // Each scheduler's variable picks the task.
    let run = |var: &str, index: &str| {
        ok(
            &["sweep", "run", "--sweep", sweep, "--device", "cpu"],
            &[(var, index)],
        )
    };
    run("SLURM_ARRAY_TASK_ID", "0");
    run("JOB_COMPLETION_INDEX", "1");
    run("AWS_BATCH_JOB_ARRAY_INDEX", "2");
    let progress = one_by_one.join("runs/resnet/weave/weave/progress.json");
    let before = read(&progress);
    let again = run("SLURM_ARRAY_TASK_ID", "0");
    assert!(again.contains("already finished"), "{again}");
    assert_eq!(read(&progress), before);
    assert_eq!(
        states(&one_by_one),
        ["finished", "finished", "finished", "pending"]
    );

    // A failing task: its error is recorded and shown.
    let broken = one_by_one.join("runs/vgg/disc");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{ not json").unwrap();
    let (success, _, _) = mtad(&["sweep", "run", "--sweep", sweep, "--index", "3"], &[]);
    assert!(!success);
    let status = status(&one_by_one);
    assert_eq!(status[3]["state"], "failed");
    assert!(
        status[3]["error"].as_str().unwrap().contains("config.json"),
        "{status}"
    );

    // Gathered now: the failed task is named, not averaged.
    let gathered = gather(&one_by_one);
    let vgg = read(&gathered.join("vgg/Eval_vgg.csv"));
    assert!(
        vgg.lines().next().unwrap().contains("disc (failed)"),
        "{vgg}"
    );
    let vgg_rows = rows(&vgg);
    assert_eq!(vgg_rows.len(), 2, "weave and the mean: {vgg}");
    for (weave, mean) in vgg_rows[0][2..].iter().zip(&vgg_rows[1][2..]) {
        assert!(
            mean.is_empty() || mean == weave,
            "the mean is weave's alone: {vgg}"
        );
    }
    let resnet = rows(&read(&gathered.join("resnet/Eval_resnet.csv")));
    assert_eq!(resnet.len(), 3, "weave, disc and the mean");
    let ensemble = read(&gathered.join("eval_folder.csv"));
    assert!(ensemble.contains("disc (vgg failed)"), "{ensemble}");
    assert_eq!(rows(&ensemble).len(), 2);
    let summary = read(&gathered.join("summary.md"));
    assert!(summary.contains("task 3 (vgg, disc): failed"), "{summary}");
    assert!(gathered.join("resnet/report/report.md").is_file());

    // Mended and rerun: every task finished, the error gone.
    std::fs::remove_dir_all(&broken).unwrap();
    ok(&["sweep", "run", "--sweep", sweep, "--index", "3"], &[]);
    assert!(!broken.join("error.json").exists());
    assert_eq!(states(&one_by_one), ["finished"; 4]);
    let gathered = gather(&one_by_one);
    assert_eq!(rows(&read(&gathered.join("eval_folder.csv"))).len(), 3);
    assert!(read(&gathered.join("summary.md")).contains("Every task finished"));

    // The same sweep as a Slurm array.
    let required = std::env::var("MTAD_REQUIRE_SLURM").is_ok_and(|v| v == "1");
    let slurm = Command::new("sbatch").arg("--version").output().is_ok();
    if !slurm {
        assert!(!required, "MTAD_REQUIRE_SLURM=1 but there is no sbatch");
        println!("skipped: the Slurm part (no sbatch here)");
        return;
    }
    let array = tmp.path().join("array");
    plan(&data, &array);
    let started = std::time::Instant::now();
    let submitted = Command::new("sbatch")
        .arg("--wait")
        .arg(array.join("slurm.sh"))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let logs: String = std::fs::read_dir(array.join("logs"))
        .map(|d| {
            d.map(|e| read(&e.unwrap().path()))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    assert!(
        submitted.status.success(),
        "sbatch --wait: {}\n{}\nlogs:\n{logs}",
        String::from_utf8_lossy(&submitted.stdout),
        String::from_utf8_lossy(&submitted.stderr)
    );
    println!(
        "Slurm array of 4 tasks: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(states(&array), ["finished"; 4], "logs:\n{logs}");
    let from_slurm = gather(&array);
    for table in TABLES {
        assert_eq!(
            read(&from_slurm.join(table)),
            read(&gathered.join(table)),
            "{table}: the Slurm array and the tasks run one by one differ"
        );
    }
}
