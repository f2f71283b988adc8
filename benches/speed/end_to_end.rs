//! `--end-to-end`: one CIFAR-sized class trained by the `mtad` binary against the reference's
//! way in PyTorch, each a child process whose wall time and peak resident memory are measured.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::torch::{python, reference_dir};
use crate::{Args, torch_name};

/// VmHWM (peak resident set) of a process, in MiB.
pub(crate) fn peak_rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs `cmd` to the end; returns its wall time, its peak RSS (polled), its stdout.
fn run_measured(mut cmd: Command) -> std::io::Result<(f64, Option<f64>, String, bool)> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id().to_string();
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let mut peak: Option<f64> = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(p) = peak_rss_mib(&pid) {
            peak = Some(peak.map_or(p, |q: f64| q.max(p)));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        seconds,
        peak,
        reader.join().unwrap_or_default(),
        status.success(),
    ))
}

/// Writes a CIFAR-10-shaped dataset (binary layout): `train` images per class in the five
/// training batches, `test` images of all classes in the test batch. Each class has its own
/// tint over seeded noise, so that a class is distinguishable.
fn write_cifar(dir: &Path, train_per_class: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 0x1234_5678_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut record = |label: u8, out: &mut Vec<u8>| {
        out.push(label);
        for c in 0..3 {
            let tint = (label as u32 * 25 + c as u32 * 60) % 200;
            for _ in 0..1024 {
                out.push((tint + next() % 56) as u8);
            }
        }
    };
    let total = train_per_class * 10;
    let per_batch = total.div_ceil(5);
    let mut written = 0;
    for b in 1..=5 {
        let mut bytes = Vec::new();
        while written < total && written < b * per_batch {
            record((written % 10) as u8, &mut bytes);
            written += 1;
        }
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let mut bytes = Vec::new();
    for i in 0..test {
        record((i % 10) as u8, &mut bytes);
    }
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
}

pub(crate) fn end_to_end(args: &Args, reference: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar-10-batches-bin");
    write_cifar(&data, args.e2e_train, args.e2e_test);
    let (epochs, s) = (args.e2e_epochs.to_string(), args.e2e_image_size.to_string());
    // Our runs take the ImageNet teachers at 224 only (their exports are traced there): at a
    // reduced size both sides use the tiny teachers.
    let tiny = args.e2e_image_size != 224;
    println!(
        "\nEnd to end: one CIFAR-sized class (normal class 0: {} training images, {} test \
         images), student {}, {} epoch(s), evaluation after the last, batch 32, {s}x{s} inputs, \
         {} teachers",
        args.e2e_train,
        args.e2e_test,
        args.e2e_student,
        args.e2e_epochs,
        if tiny { "the tiny" } else { "the full-size" }
    );
    // `$MTAD_BIN`: the mtad binary carried beside this bench to another machine (benches/gpu.sh).
    let bin = std::env::var_os("MTAD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mtad").into());
    let device = args.device.to_string();
    let mut ours = Command::new(bin);
    ours.args(["train", "--dataset", "cifar10", "--classes", "0"])
        .arg("--data-root")
        .arg(&data)
        .args(["--student", args.e2e_student.name()])
        .args(["--epochs", &epochs, "--eval-every", &epochs])
        .args([
            "--image-size",
            &s,
            "--batch-size",
            "32",
            "--device",
            &device,
        ])
        .arg("--out")
        .arg(dir.path().join("run"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"));
    if tiny {
        ours.arg("--tiny-teachers");
    }
    let ours = match run_measured(ours) {
        Ok((seconds, peak, stdout, true)) => {
            let inputs = stdout
                .lines()
                .find(|l| l.starts_with("teacher forwards"))
                .unwrap_or("")
                .trim()
                .to_string();
            println!(
                "ours:      {seconds:>8.1} s wall, peak RSS {}; {inputs}",
                peak.map_or("?".into(), |p| format!("{p:.0} MiB"))
            );
            Some(seconds)
        }
        Ok((_, _, stdout, false)) => {
            println!(
                "ours: failed:\n{}",
                stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
            None
        }
        Err(e) => {
            println!("ours: did not start: {e}");
            None
        }
    };
    if !reference {
        return;
    }
    let mut theirs = Command::new(python(args));
    theirs
        .arg(reference_dir().join("end_to_end.py"))
        .arg("--cifar")
        .arg(&data)
        .args(["--student", torch_name(args.e2e_student)])
        .args(["--epochs", &epochs, "--eval-every", &epochs])
        .args(["--image-size", &s, "--batch-size", "32", "--json"])
        .args(["--train", &args.e2e_train.to_string()])
        .args(["--test", &args.e2e_test.to_string()])
        .args(["--device", &args.torch_device]);
    if tiny {
        theirs.arg("--tiny-teachers");
    }
    match run_measured(theirs) {
        Ok((seconds, peak, stdout, true)) => {
            let inputs = stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|v| v["teacher_inputs"].as_u64())
                .map_or(String::new(), |n| format!("{n} teacher inputs"));
            println!(
                "reference: {seconds:>8.1} s wall, peak RSS {}; {inputs}",
                peak.map_or("?".into(), |p| format!("{p:.0} MiB"))
            );
            if let Some(ours) = ours {
                println!(
                    "ours / reference wall time: {:.2} (speed-up {:.2}x)",
                    ours / seconds,
                    seconds / ours
                );
            }
        }
        Ok((_, _, _, false)) => println!("reference: failed"),
        Err(e) => println!("reference: did not start: {e}"),
    }
}
