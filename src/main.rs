//! `mtad`: parses the command line, picks a device, runs the command and prints its results.
//! Results go to standard output (text or `--format json`); logs and progress to standard error.

mod cli;
mod detect_command;
mod logging;
mod sweep_command;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use std::io::IsTerminal;

use cli::{
    Cli, Command, DemoArgs, DemoDataArgs, DeviceArgs, EnsembleArgs, Format, FormatArgs, InferArgs,
    InspectArgs, ReportArgs, TeacherArgs, TeachersArgs, TrainArgs, exit,
};
use multi_teacher_ad::{
    config::TrainSettings,
    data::{
        DatasetKind,
        demo::{DEMO_CATEGORIES, DemoSpec, write_demo_dataset},
        inspect::{inspect_cifar, inspect_folder},
    },
    device::{DeviceChoice, compiled_backends, list_devices, select_device},
    inference::ensemble,
    output::run_folder::CONFIG_FILE,
    output::tables::{EvalRow, eval_table_path},
    students::StudentKind,
    teachers::{
        GET_REAL_TEACHERS, TeacherSize, WeightsLocation,
        check::{check_teachers, compiled_teachers},
    },
    training::interrupt,
    training::prepare::{Prepared, TrainRequest, prepare},
    training::run::RunSummary,
};

/// Large blocks kept for reuse across training steps (`mtad_alloc`).
#[global_allocator]
static ALLOCATOR: mtad_alloc::BlockCache = mtad_alloc::BlockCache::new();

fn main() -> ExitCode {
    // The last resort: a panic is a bug of mtad's; say so, where, and what to send.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        eprintln!(
            "mtad {}: internal error{location}: {message}\nThis is a bug in mtad, not in your \
             data or options. Please report it with the command you ran and this message \
             (RUST_BACKTRACE=1 adds where it happened).",
            env!("CARGO_PKG_VERSION")
        );
    }));
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(cli.verbose as i8 - cli.quiet as i8);
    match run(cli, &matches) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            // A run stopped by a signal exits with 128 + its number (130 Ctrl-C, 143 SIGTERM).
            let signal = e.chain().find_map(|cause| match cause.downcast_ref() {
                Some(multi_teacher_ad::Error::Interrupted { signal, .. }) => Some(*signal),
                _ => None,
            });
            ExitCode::from(signal.map_or(exit::ERROR, interrupt::exit_code))
        }
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<ExitCode> {
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
        Some(Command::Train(args)) => train(&args, matches.subcommand_matches("train")),
        Some(Command::Demo(args)) => demo(&args),
        Some(Command::Infer(args)) => infer(&args),
        Some(Command::Ensemble(args)) => ensemble(&args),
        Some(Command::Detect(args)) => detect_command::detect(&args),
        Some(Command::Report(args)) => report(&args),
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Teachers(args)) => teachers(&args),
        Some(Command::DemoData(args)) => demo_data(&args),
        Some(Command::Devices(args)) => devices(&args),
        Some(Command::Sweep(args)) => sweep_command::sweep(args, matches),
        Some(Command::Cache(args)) => sweep_command::cache(args, matches),
    }
}

/// Prints `value` as one JSON document on standard output.
fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
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
    tracing::info!("device: {device}");
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
        ExitCode::from(exit::SUCCESS)
    } else {
        ExitCode::FAILURE
    })
}

fn devices(args: &FormatArgs) -> Result<ExitCode> {
    let listed = list_devices();
    if args.format == Format::Json {
        print_json(&serde_json::json!({
            "compiled_in": compiled_backends(),
            "devices": listed,
        }))?;
        return Ok(ExitCode::from(exit::SUCCESS));
    }
    println!("backends compiled in: {}", compiled_backends().join(", "));
    for d in &listed {
        println!(
            "{:<8}  {:<5}  {}  [{}]",
            d.choice, d.backend, d.name, d.kind
        );
    }
    Ok(ExitCode::from(exit::SUCCESS))
}

fn inspect(args: &InspectArgs) -> Result<ExitCode> {
    let report = match args.dataset {
        DatasetKind::Mvtec => inspect_folder(&args.data_root, true),
        DatasetKind::Folder => inspect_folder(&args.data_root, false),
        DatasetKind::Cifar10 => inspect_cifar(&args.data_root),
    };
    match args.format.format {
        Format::Text => println!("{report}"),
        Format::Json => print_json(&serde_json::json!({
            "usable": report.is_usable(),
            "report": report,
        }))?,
    }
    Ok(if report.is_usable() {
        ExitCode::from(exit::SUCCESS)
    } else {
        ExitCode::from(exit::ERROR)
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
    Ok(ExitCode::from(exit::SUCCESS))
}

/// The settings of `mtad train`: its options, over those of `--config FILE`, over (with
/// `--resume`) those the run was started with.
fn train_settings(args: &TrainArgs, matches: Option<&ArgMatches>) -> Result<TrainSettings> {
    let explicit = |key: &str| {
        matches.is_some_and(|m| {
            matches!(
                m.value_source(key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
    };
    let mut settings = args.settings.clone();
    if let Some(file) = &args.config {
        settings = settings
            .merged_with_file(file, &explicit, false)
            .with_context(|| format!("reading the settings in {}", file.display()))?;
    }
    let run_config = args.out.join(CONFIG_FILE);
    if args.resume && run_config.is_file() {
        settings = settings
            .merged_with_file(&run_config, &explicit, true)
            .with_context(|| format!("reading the run's settings in {}", run_config.display()))?;
    }
    Ok(settings)
}

fn train(args: &TrainArgs, matches: Option<&ArgMatches>) -> Result<ExitCode> {
    // Ctrl-C and SIGTERM during training: a checkpoint at the end of the current step, then
    // exit 130/143 (before and between the training loops they end the process at once).
    interrupt::enable();
    let device = select_device(args.device.device)?;
    tracing::info!("device: {device}");
    let request = TrainRequest {
        settings: train_settings(args, matches)?,
        teacher_weights: weights_location(&args.teacher_weights),
        out: args.out.clone(),
        cover: args.cover,
        resume: args.resume,
        device: device.device.clone(),
        device_name: device.to_string(),
        plain: !std::io::stdout().is_terminal(),
    };
    let prepared = prepare(request).context("before training")?;
    log_to(&prepared.out);
    tracing::info!("writing to {}", prepared.out.display());
    if let Some(note) = prepared.config.reduced() {
        tracing::warn!("NOTE: {note}");
    }
    let summary = prepared.run()?;
    print_summary(&summary);
    if summary.config.settings.tiny_teachers {
        println!("\n{GET_REAL_TEACHERS}");
    }
    Ok(ExitCode::from(exit::SUCCESS))
}

/// Copies the log into `<dir>/run.log` from now on (a warning if that cannot be done).
fn log_to(dir: &Path) {
    if let Err(e) = logging::log_to_run_folder(dir) {
        tracing::warn!("cannot write {}: {e}", dir.join("run.log").display());
    }
}

/// A number to 4 places, or `-` where it does not exist.
fn shown(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// The mean of the values that exist.
fn mean_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn print_summary(summary: &RunSummary) {
    let protocol = summary.config.protocol();
    println!(
        "\n{} student, {} classes, {:.0} s, {} protocol (deployed: {}): image ROC AUC",
        summary.config.settings.student,
        summary.classes.len(),
        summary.seconds,
        protocol.name(),
        protocol.selection()
    );
    println!(
        "{:<14} {:>9} {:>22} {:>22}",
        "class", "deployed", "oracle (reference)", "nor (label-free)"
    );
    let at = |v: Option<(usize, f64)>| v.map_or("-".into(), |(e, a)| format!("{a:.4} @ {e}"));
    for c in &summary.classes {
        println!(
            "{:<14} {:>9} {:>22} {:>22}",
            c.name,
            c.deployed_epoch,
            at(c.side_by_side.reference),
            at(c.side_by_side.label_free)
        );
    }
    println!(
        "{:<14} {:>9} {:>22} {:>22}",
        "mean",
        "",
        shown(mean_of(
            summary
                .classes
                .iter()
                .map(|c| Some(c.side_by_side.reference?.1))
        )),
        shown(mean_of(
            summary
                .classes
                .iter()
                .map(|c| Some(c.side_by_side.label_free?.1))
        ))
    );
    println!(
        "oracle = max over the 69 score columns at the evaluation with the best one (the \
         reference protocol: test labels choose both); nor = leakage-free score at the last \
         evaluation (no test label chooses anything); '-': the test set lacks good or defect \
         images"
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
    let (path, classes) = multi_teacher_ad::output::report::write_report(&args.run, &out)
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
    Ok(ExitCode::from(exit::SUCCESS))
}

fn demo(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let device = select_device(args.device.device)?;
    tracing::info!("device: {device}");
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
        let mut request = TrainRequest::tiny_folder(
            &args.data,
            &args.out.join(student.name()),
            &args.out.join("cache"),
            device.device.clone(),
        );
        request.settings.student = student;
        request.settings.epochs = epochs;
        request.settings.eval_every = epochs;
        request.cover = true;
        request.device_name = device.to_string();
        let summary = prepare(request)
            .context("preparing the demo")?
            .run()
            .with_context(|| format!("training the {student} student"))?;
        summaries.push(summary);
    }
    println!(
        "\nDemo results: image ROC AUC per category, oracle (reference protocol: best of the \
         evaluations) / nor (label-free: the last evaluation), {epochs} epochs"
    );
    print!("{:<10}", "category");
    for s in &summaries {
        print!(" {:>19}", format!("{} ", s.config.settings.student));
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
            let side = |c: &multi_teacher_ad::training::run::ClassResult| c.side_by_side;
            let (oracle, nor) = if i < rows {
                let c = side(&s.classes[i]);
                (c.reference.map(|r| r.1), c.label_free.map(|r| r.1))
            } else {
                (
                    mean_of(s.classes.iter().map(|c| Some(side(c).reference?.1))),
                    mean_of(s.classes.iter().map(|c| Some(side(c).label_free?.1))),
                )
            };
            let (oracle, nor) = (shown(oracle), shown(nor));
            print!(" {:>19}", format!("{oracle} / {nor}"));
        }
        println!();
    }
    for s in &summaries {
        let (report, _) =
            multi_teacher_ad::output::report::write_report(&s.out, &s.out.join("report"))
                .with_context(|| format!("reporting on {}", s.out.display()))?;
        println!(
            "{} run: {} (report: {})",
            s.config.settings.student,
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
    Ok(ExitCode::from(exit::SUCCESS))
}

fn infer(args: &InferArgs) -> Result<ExitCode> {
    let device = select_device(args.device.device)?;
    tracing::info!("device: {device}");
    log_to(&args.run);
    let weights = weights_location(&args.teacher_weights);
    let prepared = Prepared::for_run(&args.run, args.data_root.clone(), &weights, device.device)
        .with_context(|| format!("opening the run {}", args.run.display()))?;
    if let Some(note) = prepared.config.reduced() {
        tracing::warn!("NOTE: {note}");
    }
    let rows = prepared.infer()?;
    let oracle = |r: &EvalRow| r.evaluation.as_ref().map(|e| e.oracle().0);
    let nor = |r: &EvalRow| r.evaluation.as_ref().map(|e| e.nor);
    let mean_oracle = mean_of(rows.iter().map(oracle));
    let mean_nor = mean_of(rows.iter().map(nor));
    let path = eval_table_path(&args.run.join("infer"), prepared.config.settings.student);
    match args.format.format {
        Format::Text => {
            for r in &rows {
                println!(
                    "{:<14} oracle {}, nor {}{}",
                    r.name,
                    shown(oracle(r)),
                    shown(nor(r)),
                    r.evaluation
                        .as_ref()
                        .and_then(|e| e.pixel_nor)
                        .map_or(String::new(), |p| format!(", pixel AUROC (nor) {p:.4}"))
                );
            }
            println!(
                "mean of {} classes: oracle {}, nor {}",
                rows.len(),
                shown(mean_oracle),
                shown(mean_nor)
            );
            println!("wrote {}", path.display());
        }
        Format::Json => print_json(&serde_json::json!({
            "classes": rows.iter().map(|r| serde_json::json!({
                "index": r.index,
                "name": r.name,
                "epoch": r.epoch,
                "oracle": oracle(r),
                "nor": nor(r),
                "pixel_nor": r.evaluation.as_ref().and_then(|e| e.pixel_nor),
            })).collect::<Vec<_>>(),
            "mean": {"oracle": mean_oracle, "nor": mean_nor},
            "table": path,
        }))?,
    }
    Ok(ExitCode::from(exit::SUCCESS))
}

fn ensemble(args: &EnsembleArgs) -> Result<ExitCode> {
    let (rows, path) = ensemble::ensemble(&args.runs, &args.out)?;
    let oracle = |r: &EvalRow| r.evaluation.as_ref().map(|e| e.oracle().0);
    let nor = |r: &EvalRow| r.evaluation.as_ref().map(|e| e.nor);
    println!("{:<14} {:>10} {:>10}", "class", "oracle", "nor");
    for r in &rows {
        println!(
            "{:<14} {:>10} {:>10}",
            r.name,
            shown(oracle(r)),
            shown(nor(r))
        );
    }
    println!(
        "{:<14} {:>10} {:>10}",
        "mean",
        shown(mean_of(rows.iter().map(oracle))),
        shown(mean_of(rows.iter().map(nor)))
    );
    println!("wrote {}", path.display());
    Ok(ExitCode::from(exit::SUCCESS))
}
