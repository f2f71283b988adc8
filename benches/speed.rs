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

#[path = "speed/cases.rs"]
mod cases;
#[path = "speed/end_to_end.rs"]
mod end_to_end;
#[path = "speed/torch.rs"]
mod torch;

use cases::{case_names, demo_cases, student_cases, teacher_cases};
use clap::Parser;
use end_to_end::{end_to_end, peak_rss_mib};
use multi_teacher_ad::device::{DeviceChoice, select_device};
use multi_teacher_ad::students::StudentKind;
use torch::{Reference, has_torch, python};

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
    #[arg(long, default_value_t = DeviceChoice::Cpu)]
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
    // Where it ran: the CPU and the instruction sets (PyTorch's line follows from its side).
    println!("cpu: {}", mtad_kernels::isa::describe());
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
