//! `mtad`: parses the command line, picks a device, runs the command and prints its results.

use std::process::ExitCode;

use anyhow::{Context, Result};
use std::io::IsTerminal;
use std::time::Instant;

use clap::Parser;
use multi_teacher_ad::{
    cli::{
        Cli, Command, DatasetKind, DemoArgs, DemoDataArgs, DetectArgs, DeviceArgs, EnsembleArgs,
        InferArgs, InspectArgs, ReportArgs, TeacherArgs, TeachersArgs, TrainArgs,
    },
    data::{
        demo::{DEMO_CATEGORIES, DemoSpec, write_demo_dataset},
        inspect::{inspect_cifar, inspect_folder},
    },
    detect::{Detector, Heatmaps, ScoreColumn},
    device::{DeviceChoice, select_device},
    students::StudentKind,
    teachers::{
        GET_REAL_TEACHERS, TeacherSize, WeightsLocation,
        check::{check_teachers, compiled_teachers},
    },
    training::ensemble,
    training::run::{Prepared, RunSummary, TrainRequest, prepare},
};

/// Large blocks kept for reuse across training steps (`mtad_alloc`).
#[global_allocator]
static ALLOCATOR: mtad_alloc::BlockCache = mtad_alloc::BlockCache::new();

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        None => {
            println!(
                "mtad: no command given, so here is the CPU demo (`mtad --help` lists the \
                 commands)\n"
            );
            demo(&DemoArgs {
                data: "data/demo".into(),
                out: "models/demo".into(),
                epochs: 3,
                device: DeviceArgs {
                    device: DeviceChoice::Auto,
                },
            })
        }
        Some(Command::Train(args)) => train(&args),
        Some(Command::Demo(args)) => demo(&args),
        Some(Command::Infer(args)) => infer(&args),
        Some(Command::Ensemble(args)) => ensemble(&args),
        Some(Command::Detect(args)) => detect(&args),
        Some(Command::Report(args)) => report(&args),
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Teachers(args)) => teachers(&args),
        Some(Command::DemoData(args)) => demo_data(&args),
    }
}

fn teacher_source(args: &TeacherArgs) -> (TeacherSize, WeightsLocation) {
    let size = if args.tiny_teachers {
        TeacherSize::Tiny
    } else {
        TeacherSize::Full
    };
    let weights = weights_location(&args.teacher_weights);
    (size, weights)
}

/// `--teacher-weights DIR`, or the build's weights.
fn weights_location(dir: &Option<std::path::PathBuf>) -> WeightsLocation {
    match dir {
        Some(dir) => WeightsLocation::Dir(dir.clone()),
        None => WeightsLocation::Build,
    }
}

fn teachers(args: &TeachersArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    println!("device: {device}");
    println!("compiled in: {}", compiled_teachers().join(", "));
    let (size, weights) = teacher_source(&args.teachers);
    if size == TeacherSize::Tiny {
        println!("using the TINY random fixture teachers, not the real ImageNet ones");
    }
    let checks = check_teachers(
        size,
        &weights,
        &device.device,
        args.batch_size as usize,
        args.image_size as usize,
    )
    .context("checking the teachers")?;
    for check in &checks {
        println!("{check}");
    }
    if size == TeacherSize::Tiny {
        println!("\n{GET_REAL_TEACHERS}");
    }
    Ok(if checks.iter().all(|c| c.all_finite) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inspect(args: &InspectArgs) -> Result<ExitCode> {
    let report = match args.dataset {
        DatasetKind::Mvtec => inspect_folder(&args.data_root, true),
        DatasetKind::Folder => inspect_folder(&args.data_root, false),
        DatasetKind::Cifar10 => inspect_cifar(&args.data_root),
    };
    println!("{report}");
    Ok(if report.is_usable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn demo_data(args: &DemoDataArgs) -> Result<ExitCode> {
    let spec = DemoSpec {
        seed: args.seed,
        image_size: args.image_size as usize,
        ..DemoSpec::default()
    };
    let written = write_demo_dataset(&args.out, &spec)
        .with_context(|| format!("writing the demo dataset to {}", args.out.display()))?;
    println!(
        "wrote {written} images of {} procedural categories to {} (seed {})",
        DEMO_CATEGORIES.len(),
        args.out.display(),
        args.seed
    );
    Ok(ExitCode::SUCCESS)
}

fn train(args: &TrainArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    println!("device: {device}");
    let (size, weights) = teacher_source(&args.teacher_source);
    let request = TrainRequest {
        dataset: args.dataset,
        data_root: args.data_root.clone(),
        student: args.student,
        classes: args.classes.clone(),
        epochs: args.epochs as usize,
        eval_every: args.eval_every as usize,
        batch_size: args.batch_size as usize,
        lr: args.lr,
        seed: args.seed,
        image_size: args.image_size as usize,
        crop_pool: args.crop_pool.map(|n| n as usize),
        crops_per_batch: args.crops_per_batch as usize,
        teachers: args.teachers,
        tiny_teachers: size == TeacherSize::Tiny,
        teacher_weights: weights,
        save_model: args.save_model,
        out: args.out.clone(),
        cover: args.cover,
        resume: args.resume,
        cache_dir: args.cache_dir.clone(),
        device: device.device.clone(),
        device_name: device.to_string(),
        plain: !std::io::stdout().is_terminal(),
    };
    let prepared = prepare(request).context("before training")?;
    println!("writing to {}", prepared.out.display());
    if let Some(note) = prepared.config.reduced() {
        println!("NOTE: {note}");
    }
    let summary = prepared.run()?;
    print_summary(&summary);
    if summary.config.tiny_teachers {
        println!("\n{GET_REAL_TEACHERS}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(summary: &RunSummary) {
    println!(
        "\n{} student, {} classes, {:.0} s: image ROC AUC of each class's best evaluation",
        summary.config.student,
        summary.classes.len(),
        summary.seconds
    );
    println!(
        "{:<14} {:>6} {:>10} {:>10}",
        "class", "epoch", "oracle", "nor"
    );
    for c in &summary.classes {
        println!(
            "{:<14} {:>6} {:>10.4} {:>10.4}",
            c.name,
            c.best_epoch,
            c.evaluation.oracle().0,
            c.evaluation.nor
        );
    }
    let n = summary.classes.len().max(1) as f64;
    let mean_oracle: f64 = summary
        .classes
        .iter()
        .map(|c| c.evaluation.oracle().0)
        .sum::<f64>()
        / n;
    let mean_nor: f64 = summary
        .classes
        .iter()
        .map(|c| c.evaluation.nor)
        .sum::<f64>()
        / n;
    println!(
        "{:<14} {:>6} {:>10.4} {:>10.4}",
        "mean", "", mean_oracle, mean_nor
    );
    println!(
        "oracle = max over the 69 score columns (the reference protocol, picks the column with \
         the test labels); nor = leakage-free (normalised on normal training data only)"
    );
    print_teacher_counts(std::slice::from_ref(summary));
    println!("results: {}", summary.out.display());
}

fn print_teacher_counts(summaries: &[RunSummary]) {
    let done: u64 = summaries.iter().map(|s| s.teacher_inputs).sum();
    let reference: u64 = summaries.iter().map(|s| s.reference_teacher_inputs).sum();
    if reference > 0 {
        let teachers = summaries[0].config.teacher_names.len();
        println!(
            "teacher forwards: {done} inputs (x {teachers} teachers); the reference's way \
             (teachers at every epoch and evaluation, for every student) needs {reference}: \
             {:.1}x as many",
            reference as f64 / done.max(1) as f64
        );
    }
}

fn report(args: &ReportArgs) -> Result<ExitCode> {
    let out = args.out.clone().unwrap_or_else(|| args.run.join("report"));
    let (path, classes) = multi_teacher_ad::report::write_report(&args.run, &out)
        .with_context(|| format!("reporting on {}", args.run.display()))?;
    let missing: Vec<&str> = classes
        .iter()
        .filter(|c| c.header.is_none())
        .map(|c| c.name.as_str())
        .collect();
    if !missing.is_empty() {
        println!(
            "note: no evaluation yet for {} (left out of the means)",
            missing.join(", ")
        );
    }
    println!(
        "wrote {} and {} ROC curve(s) in {}",
        path.display(),
        classes.iter().filter(|c| c.roc.is_some()).count(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn demo(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let device = select_device(args.device.device)?;
    println!("device: {device}");
    println!(
        "This demo uses the TINY RANDOM teachers (small untrained networks shipped for tests), \
         not the ImageNet teachers of the method, 32x32 inputs, 4 crops per batch and a few \
         epochs: its AUCs show that the \
         pipeline runs end to end, not what the method reaches."
    );
    // Small enough for the whole demo to take a few minutes on two CPU cores.
    let spec = DemoSpec {
        train: 4,
        test_good: 2,
        test_defect: 1,
        ..DemoSpec::default()
    };
    let written = write_demo_dataset(&args.data, &spec)
        .with_context(|| format!("writing the demo dataset to {}", args.data.display()))?;
    println!(
        "demo dataset: {written} images of {} procedural categories in {}",
        DEMO_CATEGORIES.len(),
        args.data.display()
    );
    let epochs = args.epochs as usize;
    let mut summaries = Vec::new();
    for student in StudentKind::ALL {
        let request = TrainRequest {
            student,
            epochs,
            eval_every: epochs,
            cover: true,
            device_name: device.to_string(),
            ..TrainRequest::tiny_folder(
                &args.data,
                &args.out.join(student.name()),
                &args.out.join("cache"),
                device.device.clone(),
            )
        };
        let summary = prepare(request)
            .context("preparing the demo")?
            .run()
            .with_context(|| format!("training the {student} student"))?;
        summaries.push(summary);
    }
    println!(
        "\nDemo results: image ROC AUC per category, oracle (reference protocol) / nor \
         (leakage-free), best of {epochs} epochs"
    );
    print!("{:<10}", "category");
    for s in &summaries {
        print!(" {:>19}", format!("{} ", s.config.student));
    }
    println!();
    let rows = summaries[0].classes.len();
    for i in 0..=rows {
        let label = if i < rows {
            summaries[0].classes[i].name.as_str()
        } else {
            "mean"
        };
        print!("{label:<10}");
        for s in &summaries {
            let (oracle, nor) = if i < rows {
                let e = &s.classes[i].evaluation;
                (e.oracle().0, e.nor)
            } else {
                let n = s.classes.len() as f64;
                (
                    s.classes
                        .iter()
                        .map(|c| c.evaluation.oracle().0)
                        .sum::<f64>()
                        / n,
                    s.classes.iter().map(|c| c.evaluation.nor).sum::<f64>() / n,
                )
            };
            print!(" {:>19}", format!("{oracle:.3} / {nor:.3}"));
        }
        println!();
    }
    for s in &summaries {
        let (report, _) = multi_teacher_ad::report::write_report(&s.out, &s.out.join("report"))
            .with_context(|| format!("reporting on {}", s.out.display()))?;
        println!(
            "{} run: {} (report: {})",
            s.config.student,
            s.out.display(),
            report.display()
        );
    }
    print_teacher_counts(&summaries);
    println!(
        "demo finished in {:.0} s (tiny random teachers, 32x32 inputs)",
        started.elapsed().as_secs_f64()
    );
    println!("\nFor real results, bring the ImageNet teachers:\n{GET_REAL_TEACHERS}");
    println!(
        "then train, e.g.: mtad train --dataset mvtec --data-root DIR --student resnet \
         --classes bottle --out models/bottle"
    );
    Ok(ExitCode::SUCCESS)
}

fn infer(args: &InferArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    println!("device: {device}");
    let weights = weights_location(&args.teacher_weights);
    let prepared = Prepared::for_run(&args.run, args.data_root.clone(), &weights, device.device)
        .with_context(|| format!("opening the run {}", args.run.display()))?;
    if let Some(note) = prepared.config.reduced() {
        println!("NOTE: {note}");
    }
    let rows = prepared.infer()?;
    let n = rows.len().max(1) as f64;
    println!(
        "mean of {} classes: oracle {:.4}, nor {:.4}",
        rows.len(),
        rows.iter().map(|r| r.evaluation.oracle().0).sum::<f64>() / n,
        rows.iter().map(|r| r.evaluation.nor).sum::<f64>() / n
    );
    println!(
        "wrote {}",
        args.run
            .join("infer")
            .join(format!("Eval_{}.csv", prepared.config.student))
            .display()
    );
    Ok(ExitCode::SUCCESS)
}

fn ensemble(args: &EnsembleArgs) -> Result<ExitCode> {
    let (rows, path) = ensemble::ensemble(&args.runs, &args.out)?;
    println!("{:<14} {:>10} {:>10}", "class", "oracle", "nor");
    for r in &rows {
        println!(
            "{:<14} {:>10.4} {:>10.4}",
            r.name,
            r.evaluation.oracle().0,
            r.evaluation.nor
        );
    }
    let n = rows.len().max(1) as f64;
    println!(
        "{:<14} {:>10.4} {:>10.4}",
        "mean",
        rows.iter().map(|r| r.evaluation.oracle().0).sum::<f64>() / n,
        rows.iter().map(|r| r.evaluation.nor).sum::<f64>() / n
    );
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn detect(args: &DetectArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    println!("device: {device}");
    let weights = weights_location(&args.teacher_weights);
    let column = ScoreColumn::parse(&args.column)?;
    let (detector, default_out) = match (&args.model, &args.run, &args.class) {
        (Some(model), _, _) => (
            Detector::from_artifact(model, column, args.threshold, &weights, device.device)
                .with_context(|| format!("loading {}", model.display()))?,
            model
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("detect"),
        ),
        (None, Some(run), Some(class)) => (
            Detector::load(run, class, column, args.threshold, &weights, device.device)
                .with_context(|| format!("loading class {class} of {}", run.display()))?,
            run.join("detect").join(class),
        ),
        _ => anyhow::bail!("give --model FILE, or --run DIR and --class NAME"),
    };
    println!(
        "threshold {:.6} ({})",
        detector.threshold,
        if args.threshold.is_some() {
            "given"
        } else {
            "flags about 1% of the normal training images"
        }
    );
    let out = args.out.clone().unwrap_or(default_out);
    let heatmaps = match (args.no_heatmaps, args.residuals) {
        (true, _) => Heatmaps::None,
        (false, false) => Heatmaps::Scores,
        (false, true) => Heatmaps::ScoresAndResiduals,
    };
    let detections = detector.run(&args.paths, &out, heatmaps)?;
    let mut failed = 0;
    for d in &detections {
        match &d.outcome {
            Ok(s) => println!(
                "{:<10} {:>12.6}  {}",
                if s.anomalous { "ANOMALOUS" } else { "normal" },
                s.score,
                d.path.display()
            ),
            Err(e) => {
                failed += 1;
                println!("{:<10} {:>12}  {e}", "ERROR", "");
            }
        }
    }
    let anomalous = detections
        .iter()
        .filter(|d| matches!(&d.outcome, Ok(s) if s.anomalous))
        .count();
    println!(
        "{} images: {anomalous} anomalous, {} normal, {failed} unreadable; wrote {}",
        detections.len(),
        detections.len() - anomalous - failed,
        out.join("detections.csv").display()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
