//! Speed of this implementation against a PyTorch reference of the same computations
//! (`benches/reference/`), timed the same way on the same machine in the same run.
//!
//! ```text
//! cargo bench --bench speed                                   # every case at 224, with PyTorch
//! cargo bench --bench speed -- --image-size 64 --only train/  # a subset, reduced size
//! cargo bench --bench speed -- --end-to-end                   # also a whole CIFAR-sized class
//! cargo bench --bench speed -- --help
//! ```
//!
//! Every case runs `--warmup` untimed iterations, then `--iters` timed ones, and reports
//! images/s = batch x iters / seconds. The PyTorch reference of a case runs right after ours
//! (one `bench.py` process per case), so that both sides of a ratio meet the machine in the
//! same state: on the shared 2-core development machine, speed drifted by 20-40% within minutes.
//! With `--rounds R`, every case is timed R times in turn, and the table gives the median of
//! each side and of the per-round ratios. Cases: each teacher's forward pass (batch 8), each
//! student's full training step (forward, both losses, backward, Adam, the loss read back;
//! batch 8 and 32, from cached teacher z-scores as our runs train), evaluation scoring (batch 32),
//! one epoch of the CPU demo per student (ours only), and with `--end-to-end` one CIFAR-sized
//! class trained our way against the reference's way (teachers at every epoch) in PyTorch.
//! Peak resident memory is printed for this process and for each end-to-end run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::Distribution;
use burn::train::TrainStep;
use clap::Parser;
use mtad_kernels::adam::Adam;
use multi_teacher_ad::data::demo::{DemoSpec, write_demo_dataset};
use multi_teacher_ad::device::{DeviceChoice, select_device};
use multi_teacher_ad::students::StudentKind;
use multi_teacher_ad::teachers::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation};
use multi_teacher_ad::training::model::{InputBatch, MtadModel, MtadModelConfig};
use multi_teacher_ad::training::run::{TrainRequest, prepare};

#[derive(Parser, Debug)]
#[command(about = "Images per second of mtad and of a PyTorch reference, side by side")]
struct Args {
    /// Side of the students' inputs (224 in the method; a multiple of 32). The teachers always
    /// run at 224.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Timed iterations per case.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed iterations before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Times every case this many times, ours then PyTorch's each time, and reports medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Only the cases whose names start with one of these prefixes (comma-separated), e.g.
    /// `teacher/,train/resnet18` (cases: teacher/<net>/b8, train/<student>/b8|b32,
    /// score/<student>/b32, demo-epoch/<student>).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Backend for our side.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Python interpreter with torch and torchvision (default: $MTAD_PYTHON, else python3).
    /// Without torch the reference columns are left empty.
    #[arg(long)]
    python: Option<String>,
    /// Torch device for the reference (cpu, cuda).
    #[arg(long, default_value = "cpu")]
    torch_device: String,
    /// Do not run the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
    /// Also time one CIFAR-sized class end to end, ours against the reference's way.
    #[arg(long)]
    end_to_end: bool,
    /// End to end: training images of the normal class (CIFAR-10: 5000).
    #[arg(long, default_value_t = 5000)]
    e2e_train: usize,
    /// End to end: test images, all classes (CIFAR-10: 10000).
    #[arg(long, default_value_t = 10000)]
    e2e_test: usize,
    /// End to end: epochs (one evaluation, after the last).
    #[arg(long, default_value_t = 1)]
    e2e_epochs: usize,
    /// End to end: side of the network inputs.
    #[arg(long, default_value_t = 32)]
    e2e_image_size: usize,
    /// End to end: the student.
    #[arg(long, value_enum, default_value_t = StudentKind::Resnet)]
    e2e_student: StudentKind,
    /// For each training case, also print where a step spends its time: the student's and the
    /// decoder's forward and backward, the optimizer step.
    #[arg(long)]
    phases: bool,
    /// (Passed by `cargo bench`; ignored.)
    #[arg(long, hide = true)]
    bench: bool,
}

/// torchvision's name of a student, as the reference script names its cases.
fn torch_name(kind: StudentKind) -> &'static str {
    match kind {
        StudentKind::Resnet => "resnet18",
        StudentKind::Vgg => "vgg11",
        StudentKind::Densenet => "densenet121",
    }
}

struct Timing {
    case: String,
    images_per_s: f64,
}

/// Runs `step` warmup + iters times and returns images/s over the timed iterations.
fn time(batch: usize, warmup: usize, iters: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        step();
    }
    let started = Instant::now();
    for _ in 0..iters {
        step();
    }
    (batch * iters) as f64 / started.elapsed().as_secs_f64()
}

fn selected(args: &Args, case: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|p| case.starts_with(p.as_str()))
}

/// The names of the cases `--only` selects, in the order they run.
fn case_names(args: &Args) -> Vec<String> {
    let mut names: Vec<String> = TeacherFamily::ALL
        .into_iter()
        .map(|f| format!("teacher/{}/b8", TeacherId::new(f, TeacherSize::Full).name()))
        .collect();
    for kind in StudentKind::ALL {
        let name = torch_name(kind);
        names.extend([8, 32].map(|b| format!("train/{name}/b{b}")));
        names.push(format!("score/{name}/b32"));
    }
    names.extend(StudentKind::ALL.map(|k| format!("demo-epoch/{}", torch_name(k))));
    names.retain(|c| selected(args, c));
    names
}

/// The teachers at 224x224 whatever `--image-size` says: their ONNX exports are traced at that
/// size (vgg19's pooling before its classifier is fixed there), and runs use them only there.
fn teacher_cases(args: &Args, device: &Device, want: &str, out: &mut Vec<Timing>) {
    let s = 224;
    for family in TeacherFamily::ALL {
        let id = TeacherId::new(family, TeacherSize::Full);
        let case = format!("teacher/{}/b8", id.name());
        if case != want {
            continue;
        }
        let teacher = match Teacher::load(id, &WeightsLocation::Build, device) {
            Ok(t) => t,
            Err(e) => {
                println!("{case:<26} skipped: {e}");
                continue;
            }
        };
        device.seed(1);
        let x: Tensor<4> = Tensor::random([8, 3, s, s], Distribution::Uniform(-1.0, 1.0), device);
        let ips = time(8, args.warmup, args.iters, || {
            let _ = teacher.forward(x.clone()).into_data();
        });
        report(&case, ips);
        out.push(Timing {
            case,
            images_per_s: ips,
        });
    }
}

fn student_cases(args: &Args, device: &Device, want: &str, out: &mut Vec<Timing>) {
    let s = args.image_size;
    for kind in StudentKind::ALL {
        for batch in [8, 32] {
            let case = format!("train/{}/b{batch}", torch_name(kind));
            if case != want {
                continue;
            }
            let ad = device.clone().autodiff();
            ad.seed(1);
            let mut model = Some(MtadModelConfig::new(kind, s, 3).init(&ad).unwrap());
            let mut optim = Adam::module_optimizer();
            let images = Tensor::random([batch, 3, s, s], Distribution::Uniform(-1.0, 1.0), &ad);
            let teachers = Tensor::random([batch, 3, 1000], Distribution::Default, &ad);
            let ips = time(batch, args.warmup, args.iters, || {
                let m = model.take().unwrap();
                let output = TrainStep::step(
                    &m,
                    InputBatch {
                        images: images.clone(),
                        teachers: Some(teachers.clone()),
                    },
                );
                // As the training loop: the loss and its two parts read back, once, every step.
                let mut parts = vec![output.item.loss, output.item.reconstruction];
                parts.extend(output.item.distillation);
                let _ = Tensor::cat(parts, 0).into_data();
                model = Some(optim.step(1e-3, m, output.grads));
            });
            report(&case, ips);
            out.push(Timing {
                case,
                images_per_s: ips,
            });
            if args.phases {
                phases(
                    &ad,
                    model.take().unwrap(),
                    &mut optim,
                    images,
                    teachers,
                    args.iters,
                );
            }
        }
        let case = format!("score/{}/b32", torch_name(kind));
        if case != want {
            continue;
        }
        device.seed(1);
        let model = MtadModelConfig::new(kind, s, 3).init(device).unwrap();
        let images = Tensor::random([32, 3, s, s], Distribution::Uniform(-1.0, 1.0), device);
        let teachers = Tensor::random([32, 3, 1000], Distribution::Default, device);
        let ips = time(32, args.warmup, args.iters, || {
            let _ = model
                .scores(InputBatch {
                    images: images.clone(),
                    teachers: Some(teachers.clone()),
                })
                .to_host()
                .unwrap();
        });
        report(&case, ips);
        out.push(Timing {
            case,
            images_per_s: ips,
        });
    }
}

/// Milliseconds per phase of a training step, averaged over `iters` steps.
fn phases(
    device: &Device,
    mut model: MtadModel,
    optim: &mut burn::optim::ModuleOptimizer,
    images: Tensor<4>,
    teachers: Tensor<3>,
    iters: usize,
) {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let sync = |t: Tensor<1>| {
        let _ = t.into_scalar::<f64>();
    };
    // The student alone and the decoder alone: forward (synced), then backward.
    let (mut student_fwd, mut student_bwd, mut decoder_fwd, mut decoder_bwd) = (0.0, 0.0, 0.0, 0.0);
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    let z_t = model.teacher_embedding(teachers.clone()).detach();
    for _ in 0..iters {
        let t = Instant::now();
        let z = model.student.forward(images.clone()).mean();
        sync(z.clone());
        student_fwd += ms(t);
        let t = Instant::now();
        let _ = z.backward();
        student_bwd += ms(t);
        let t = Instant::now();
        let x = model.decoder.forward(z_t.clone()).mean();
        sync(x.clone());
        decoder_fwd += ms(t);
        let t = Instant::now();
        let _ = x.backward();
        decoder_bwd += ms(t);

        let t = Instant::now();
        let losses = model.losses(InputBatch {
            images: images.clone(),
            teachers: Some(teachers.clone()),
        });
        let loss = losses.total();
        sync(loss.clone());
        fwd += ms(t);
        let t = Instant::now();
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
        bwd += ms(t);
        let t = Instant::now();
        model = optim.step(1e-3, model, grads);
        let _ = model
            .decoder
            .linear1
            .weight
            .val()
            .slice([0..1, 0..1])
            .into_data();
        opt += ms(t);
    }
    let _ = device;
    println!(
        "    per step: forward {fwd:.0} ms, backward {bwd:.0} ms, Adam {opt:.0} ms; alone: \
         student forward {student_fwd:.0} + backward {student_bwd:.0} ms, decoder forward \
         {decoder_fwd:.0} + backward {decoder_bwd:.0} ms"
    );
}

/// One epoch of the CPU demo (its data, tiny teachers, 32x32) per student, evaluation included.
fn demo_cases(device: &Device, want: &str, out: &mut Vec<Timing>) {
    if !want.starts_with("demo-epoch/") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spec = DemoSpec {
        train: 4,
        test_good: 2,
        test_defect: 1,
        ..DemoSpec::default()
    };
    write_demo_dataset(&data, &spec).unwrap();
    let cache = dir.path().join("cache");
    for kind in StudentKind::ALL {
        let case = format!("demo-epoch/{}", torch_name(kind));
        if case != want {
            continue;
        }
        let request = |out: &str| TrainRequest {
            student: kind,
            epochs: 1,
            eval_every: 1,
            cover: true,
            ..TrainRequest::tiny_folder(&data, &dir.path().join(out), &cache, device.clone())
        };
        // The first run fills the teacher cache; the second is a demo epoch as it is run again.
        let started = Instant::now();
        let summary = prepare(request("first")).unwrap().run().unwrap();
        let first = started.elapsed().as_secs_f64();
        let started = Instant::now();
        prepare(request("second")).unwrap().run().unwrap();
        let second = started.elapsed().as_secs_f64();
        // Images through the student per epoch: 4 categories x 4 training images x 4 crops.
        let images = summary.classes.len() * spec.train * 4;
        let ips = images as f64 / second;
        println!(
            "{case:<26} {ips:>10.2} img/s   one epoch + evaluation of 4 categories: {second:.1} s \
             ({first:.1} s with the teacher cache built)"
        );
        out.push(Timing {
            case,
            images_per_s: ips,
        });
    }
}

fn report(case: &str, ips: f64) {
    println!("{case:<26} {ips:>10.2} img/s");
}

fn python(args: &Args) -> String {
    args.python
        .clone()
        .or_else(|| std::env::var("MTAD_PYTHON").ok())
        .unwrap_or_else(|| "python3".into())
}

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference")
}

/// Whether `python` can import torch and torchvision.
fn has_torch(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import torch, torchvision"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The PyTorch reference as one warm process (`bench.py --serve`): each case is timed when
/// asked, right after ours.
struct Reference {
    child: std::process::Child,
    input: Option<std::process::ChildStdin>,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Reference {
    /// Starts `bench.py --serve` for `cases`, or says why it could not.
    fn start(args: &Args, cases: &[String]) -> Result<Self, String> {
        let mut child = Command::new(python(args))
            .arg(reference_dir().join("bench.py"))
            .args(["--serve", "--image-size", &args.image_size.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--device", &args.torch_device])
            .args(["--only", &cases.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("the PyTorch reference did not start: {e}"))?;
        let input = child.stdin.take();
        let output = std::io::BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            input,
            output,
        })
    }

    /// PyTorch's images/s for `case`, or why there is none.
    fn time(&mut self, case: &str) -> Result<f64, String> {
        use std::io::{BufRead, Write};
        let input = self.input.as_mut().expect("open until dropped");
        writeln!(input, "{case}")
            .and_then(|_| input.flush())
            .map_err(|e| format!("the PyTorch reference stopped: {e}"))?;
        let mut line = String::new();
        match self.output.read_line(&mut line) {
            Ok(0) | Err(_) => return Err("the PyTorch reference stopped".into()),
            Ok(_) => {}
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("the PyTorch reference answered {line:?}: {e}"))?;
        value["images_per_s"]
            .as_f64()
            .ok_or_else(|| format!("the PyTorch reference answered {}", line.trim()))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // Closing its stdin ends its loop.
        drop(self.input.take());
        let _ = self.child.wait();
    }
}

/// VmHWM (peak resident set) of a process, in MiB.
fn peak_rss_mib(pid: &str) -> Option<f64> {
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

fn end_to_end(args: &Args, reference: bool) {
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
    let mut ours = Command::new(env!("CARGO_BIN_EXE_mtad"));
    ours.args(["train", "--dataset", "cifar10", "--classes", "0"])
        .arg("--data-root")
        .arg(&data)
        .args(["--student", args.e2e_student.name()])
        .args(["--epochs", &epochs, "--eval-every", &epochs])
        .args(["--image-size", &s, "--batch-size", "32", "--device", "cpu"])
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

/// Large blocks kept for reuse across training steps (`mtad_alloc`).
#[global_allocator]
static ALLOCATOR: mtad_alloc::BlockCache = mtad_alloc::BlockCache::new();

fn main() {
    let args = Args::parse();
    let device = select_device(args.device).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    println!(
        "mtad speed: {} (rayon threads {}), inputs {s}x{s}, {} warm-up + {} timed iterations, \
         {} round(s)",
        device,
        rayon::current_num_threads(),
        args.warmup,
        args.iters,
        args.rounds,
        s = args.image_size
    );
    let py = python(&args);
    let reference = !args.no_reference && has_torch(&py);
    if !args.no_reference && !reference {
        println!("{py} cannot import torch and torchvision: no PyTorch reference (--python)");
    } else if reference {
        println!(
            "PyTorch reference: {py} benches/reference/bench.py, each case right after ours \
             (the line below it)"
        );
    }
    // Per case, ours then the reference's, once per round.
    let cases = case_names(&args);
    let comparable: Vec<String> = cases
        .iter()
        .filter(|c| !c.starts_with("demo-epoch"))
        .cloned()
        .collect();
    let mut torch_side = if reference && !comparable.is_empty() {
        Reference::start(&args, &comparable)
            .inspect_err(|e| println!("{e}"))
            .ok()
    } else {
        None
    };
    let mut ours: Vec<Timing> = Vec::new();
    let mut theirs: Vec<(String, f64)> = Vec::new();
    for _ in 0..args.rounds {
        for case in &cases {
            let timed = ours.len();
            teacher_cases(&args, &device.device, case, &mut ours);
            student_cases(&args, &device.device, case, &mut ours);
            demo_cases(&device.device, case, &mut ours);
            let Some(reference) = torch_side.as_mut() else {
                continue;
            };
            if !comparable.contains(case) || ours.len() == timed {
                continue;
            }
            match reference.time(case) {
                Ok(v) => {
                    println!("{:<26} {v:>10.2} img/s PyTorch", "");
                    theirs.push((case.clone(), v));
                }
                Err(e) => {
                    println!("{e}");
                    torch_side = None;
                }
            }
        }
    }
    println!(
        "peak RSS of this process so far: {:.0} MiB",
        peak_rss_mib("self").unwrap_or(f64::NAN)
    );
    let table = medians(&cases, &ours, &theirs);
    if !table.is_empty() {
        let per_round = if args.rounds > 1 {
            format!(", medians of {} rounds", args.rounds)
        } else {
            String::new()
        };
        println!(
            "\n{:<26} {:>12} {:>12} {:>14}{per_round}",
            "case", "ours img/s", "torch img/s", "ours/torch"
        );
        for m in &table {
            println!(
                "{:<26} {:>12.2} {:>12} {:>14}",
                m.case,
                m.ours,
                m.torch.map_or("-".into(), |v| format!("{v:.2}")),
                m.ratio.map_or("-".into(), |r| format!("{r:.2}x"))
            );
        }
        if table.iter().any(|m| m.torch.is_some()) {
            estimate_protocol(&table);
        }
    }
    if args.end_to_end {
        end_to_end(&args, reference);
    }
}

/// One case's medians over the rounds: ours, PyTorch's, and the ratio (median of the rounds'
/// ratios, each from ours and PyTorch's timing of the same round).
struct Medians {
    case: String,
    ours: f64,
    torch: Option<f64>,
    ratio: Option<f64>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Per case, in `cases`' order: the medians of `ours` and `theirs`, whose k-th timings of a case
/// come from the same round.
fn medians(cases: &[String], ours: &[Timing], theirs: &[(String, f64)]) -> Vec<Medians> {
    cases
        .iter()
        .filter_map(|case| {
            let mine: Vec<f64> = ours
                .iter()
                .filter(|t| t.case == *case)
                .map(|t| t.images_per_s)
                .collect();
            let torch: Vec<f64> = theirs
                .iter()
                .filter(|(c, _)| c == case)
                .map(|(_, v)| *v)
                .collect();
            // Paired by round only when every round has both (else no ratio).
            let ratios = if torch.len() == mine.len() {
                mine.iter().zip(&torch).map(|(a, b)| a / b).collect()
            } else {
                Vec::new()
            };
            Some(Medians {
                case: case.clone(),
                ours: median(mine)?,
                torch: median(torch),
                ratio: median(ratios),
            })
        })
        .collect()
}

/// The reference's protocol on one CIFAR-10 class (5,000 training and 10,000 test images, 500
/// epochs, an evaluation every 50) estimated from the per-image rates measured above: ours runs
/// the teachers once per image and scores the normal training images too at each evaluation (for
/// nor); the reference's way runs the teachers on every epoch's images and at every evaluation.
fn estimate_protocol(rates: &[Medians]) {
    let get = |list: &dyn Fn(&str) -> Option<f64>, case: &str| list(case);
    let find = |case: &str| rates.iter().find(|m| m.case == case);
    let mine = |case: &str| find(case).map(|m| m.ours);
    let torch = |case: &str| find(case).and_then(|m| m.torch);
    let ensemble = |rate: &dyn Fn(&str) -> Option<f64>| -> Option<f64> {
        let mut inverse = 0.0;
        for t in ["resnet152", "vgg19", "densenet201"] {
            inverse += 1.0 / rate(&format!("teacher/{t}/b8"))?;
        }
        Some(1.0 / inverse)
    };
    let (Some(t_ours), Some(t_ref)) = (ensemble(&mine), ensemble(&torch)) else {
        return;
    };
    let (train, test, epochs, evals) = (5000.0, 10000.0, 500.0, 10.0);
    for kind in StudentKind::ALL {
        let name = torch_name(kind);
        let rates = |r: &dyn Fn(&str) -> Option<f64>| {
            Some((
                get(r, &format!("train/{name}/b32"))?,
                get(r, &format!("score/{name}/b32"))?,
            ))
        };
        let (Some((train_ours, score_ours)), Some((train_ref, score_ref))) =
            (rates(&mine), rates(&torch))
        else {
            continue;
        };
        let ours = (train + test) / t_ours
            + epochs * train / train_ours
            + evals * (test + train) / score_ours;
        let reference = (train + epochs * train + evals * test) / t_ref
            + epochs * train / train_ref
            + evals * test / score_ref;
        println!(
            "estimate, one CIFAR-10 class, 500 epochs, {name}: ours {:.1} h, the reference's way \
             in PyTorch {:.1} h ({:.2}x)",
            ours / 3600.0,
            reference / 3600.0,
            reference / ours
        );
    }
}
