//! `mtad`: parses the command line, picks a device, runs the command and prints its results.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use multi_teacher_ad::{
    cli::{Cli, Command, DatasetKind, DemoDataArgs, InspectArgs, TeacherArgs, TeachersArgs},
    data::{
        demo::{DEMO_CATEGORIES, DemoSpec, write_demo_dataset},
        inspect::{inspect_cifar, inspect_folder},
    },
    device::select_device,
    teachers::{
        GET_REAL_TEACHERS, TeacherSize, WeightsLocation,
        check::{check_teachers, compiled_teachers},
    },
};

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
            Cli::command().print_help()?;
            Ok(ExitCode::SUCCESS)
        }
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
    let weights = match &args.teacher_weights {
        Some(dir) => WeightsLocation::Dir(dir.clone()),
        None => WeightsLocation::Build,
    };
    (size, weights)
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
