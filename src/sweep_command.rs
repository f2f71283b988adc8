//! `mtad sweep plan|run|status|gather` and `mtad cache build`. Part of the binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::ArgMatches;
use clap::ValueEnum;
use clap::parser::ValueSource;

use super::cli::{
    Backend, CacheArgs, CacheBuildArgs, CacheCommand, Format, SweepArgs, SweepCommand,
    SweepPlanArgs, exit,
};
use super::{log_to, print_json, print_summary, weights_location};
use multi_teacher_ad::config::TrainSettings;
use multi_teacher_ad::device::select_device;
use multi_teacher_ad::sweep::gather::{gather, states};
use multi_teacher_ad::sweep::plan::{PlanRequest, plan};
use multi_teacher_ad::sweep::task::{self, TaskRequest, TaskRun, run_dir};
use multi_teacher_ad::sweep::{Cluster, Plan, cache_fill, resolve_index};
use multi_teacher_ad::training::interrupt;
use multi_teacher_ad::training::prepare::TrainRequest;

pub fn sweep(args: SweepArgs, matches: &ArgMatches) -> Result<ExitCode> {
    let matches = matches.subcommand_matches("sweep");
    match args.command {
        SweepCommand::Plan(a) => sweep_plan(&a, matches.and_then(|m| m.subcommand_matches("plan"))),
        SweepCommand::Run(a) => {
            interrupt::enable();
            let (index, from) = resolve_index(a.index, |k| std::env::var(k).ok())?;
            let plan = Plan::read(&a.sweep.sweep)?;
            let t = plan.task(index)?;
            tracing::info!(
                "task {index} (from {from}): {} student, class {}",
                t.student,
                t.class
            );
            let device = select_device(a.device.device)?;
            tracing::info!("device: {device}");
            let dir = run_dir(&a.sweep.sweep, t);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            log_to(&dir);
            let outcome = task::run(TaskRequest {
                sweep: a.sweep.sweep.clone(),
                index,
                device: device.device.clone(),
                device_name: device.to_string(),
                teacher_weights: a.teacher_weights.clone(),
                plain: !std::io::stdout().is_terminal(),
            })
            .with_context(|| format!("sweep task {index} ({}, {})", t.student, t.class))?;
            match outcome {
                TaskRun::AlreadyFinished => {
                    println!("task {index}: already finished, nothing to do")
                }
                TaskRun::RunningElsewhere { host, pid } => {
                    println!("task {index}: running elsewhere (pid {pid} on {host}), nothing to do")
                }
                TaskRun::Trained(summary) => print_summary(&summary),
            }
            Ok(ExitCode::from(exit::SUCCESS))
        }
        SweepCommand::Status(a) => {
            let plan = Plan::read(&a.sweep.sweep)?;
            let lines = states(&a.sweep.sweep, &plan)?;
            match a.format.format {
                Format::Json => print_json(&serde_json::to_value(&lines)?)?,
                Format::Text => {
                    println!(
                        "{:>5}  {:<9} {:<16} {:<9} detail",
                        "task", "student", "class", "state"
                    );
                    for l in &lines {
                        println!(
                            "{:>5}  {:<9} {:<16} {:<9} {}",
                            l.index,
                            l.student.name(),
                            l.class,
                            l.state.name(),
                            l.state.detail()
                        );
                    }
                    let count = |s: &str| lines.iter().filter(|l| l.state.name() == s).count();
                    println!(
                        "{} tasks: {} finished, {} running, {} pending, {} failed",
                        lines.len(),
                        count("finished"),
                        count("running"),
                        count("pending"),
                        count("failed")
                    );
                }
            }
            Ok(ExitCode::from(exit::SUCCESS))
        }
        SweepCommand::Gather(a) => {
            let g = gather(&a.sweep.sweep, a.out.as_deref())
                .with_context(|| format!("gathering {}", a.sweep.sweep.display()))?;
            match a.format.format {
                Format::Json => print_json(&serde_json::to_value(&g)?)?,
                Format::Text => {
                    print!(
                        "{}",
                        std::fs::read_to_string(&g.summary).unwrap_or_default()
                    );
                    println!("wrote {}", g.out.display());
                }
            }
            let missing = g.missing().count();
            if missing > 0 {
                tracing::warn!("{missing} task(s) not finished: listed, left out of every mean");
            }
            Ok(ExitCode::from(exit::SUCCESS))
        }
    }
}

/// `--config FILE` under the options given on the command line (as `train`).
fn merged(
    settings: &TrainSettings,
    config: Option<&std::path::Path>,
    m: Option<&ArgMatches>,
) -> Result<TrainSettings> {
    let explicit = |key: &str| {
        m.is_some_and(|m| {
            matches!(
                m.value_source(key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
    };
    match config {
        Some(file) => settings
            .merged_with_file(file, &explicit, false)
            .with_context(|| format!("reading the settings in {}", file.display())),
        None => Ok(settings.clone()),
    }
}

fn sweep_plan(a: &SweepPlanArgs, m: Option<&ArgMatches>) -> Result<ExitCode> {
    let settings = merged(&a.settings, a.config.as_deref(), m)?;
    let given =
        |key: &str| m.is_some_and(|m| m.value_source(key) != Some(ValueSource::DefaultValue));
    // The cache folder defaults to the sweep's own unless given (flag or file).
    let default_cache = TrainSettings::tiny_folder(".".as_ref(), "models/cache".as_ref()).cache_dir;
    let cache_dir = (given("cache_dir") || settings.cache_dir != default_cache)
        .then(|| settings.cache_dir.clone());
    let students = match &a.students {
        Some(s) => s.clone(),
        None if given("student") => vec![settings.student],
        None => multi_teacher_ad::students::StudentKind::ALL.to_vec(),
    };
    let mtad = match &a.mtad {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this mtad binary (give --mtad)")?,
    };
    let name = |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| {
        v().map_or(String::new(), |p| p.get_name().to_string())
    };
    let device = a.device.device.to_string();
    let backend = name(&|| a.backend.to_possible_value());
    debug_assert!(matches!(
        a.backend,
        Backend::Cuda | Backend::Wgpu | Backend::Cpu
    ));
    let plan = plan(PlanRequest {
        settings,
        cache_dir,
        students,
        out: a.out.clone(),
        cluster: Cluster {
            concurrency: a.concurrency as usize,
            retries: a.retries as usize,
            gpus: a.gpus as usize,
            device,
            backend,
            mtad,
            image: a.image.clone(),
            volume_claim: a.volume_claim.clone(),
            mount: a.mount.clone(),
            teacher_weights: a.teacher_weights.clone(),
            slurm_options: a.slurm_option.clone(),
        },
    })
    .context("planning the sweep")?;
    let out = multi_teacher_ad::sweep::plan::absolute(&a.out)?;
    println!(
        "planned {} tasks ({} classes x {} students: {}) in {}",
        plan.tasks.len(),
        plan.classes.len(),
        plan.students.len(),
        plan.students
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        out.display()
    );
    println!(
        "shared teacher-embedding cache: {}",
        plan.settings.cache_dir.display()
    );
    println!("Slurm:       sbatch {}", out.join("slurm.sh").display());
    println!(
        "Kubernetes:  kubectl apply -f {}   (image: {}/Containerfile)",
        out.join("job.yaml").display(),
        out.display()
    );
    println!(
        "one task:    mtad sweep run --sweep {} --index N",
        out.display()
    );
    println!(
        "then:        mtad sweep status --sweep {0}; mtad sweep gather --sweep {0}",
        out.display()
    );
    Ok(ExitCode::from(exit::SUCCESS))
}

pub fn cache(args: CacheArgs, matches: &ArgMatches) -> Result<ExitCode> {
    let CacheCommand::Build(a) = args.command;
    let m = matches
        .subcommand_matches("cache")
        .and_then(|m| m.subcommand_matches("build"));
    cache_build(&a, m)
}

fn cache_build(a: &CacheBuildArgs, m: Option<&ArgMatches>) -> Result<ExitCode> {
    interrupt::enable();
    let mut settings = match &a.sweep {
        Some(sweep) => Plan::read(sweep)?.settings,
        None => merged(&a.settings, a.config.as_deref(), m)?,
    };
    let mut weights = a.teacher_weights.clone();
    if let Some(sweep) = &a.sweep {
        weights = weights.or(Plan::read(sweep)?.cluster.teacher_weights);
    }
    // The student does not change the teachers' outputs.
    settings.student = multi_teacher_ad::students::StudentKind::Resnet;
    let device = select_device(a.device.device)?;
    tracing::info!("device: {device}");
    let started = std::time::Instant::now();
    let filled = cache_fill::fill(TrainRequest {
        settings,
        teacher_weights: weights_location(&weights),
        out: Default::default(),
        cover: true,
        resume: false,
        device: device.device.clone(),
        device_name: device.to_string(),
        plain: true,
    })
    .context("filling the teacher-embedding cache")?;
    println!(
        "cache {}: {} class(es) ({}) ready; {} inputs through the teachers in {:.0} s{}",
        filled.cache_dir.display(),
        filled.classes.len(),
        filled.classes.join(", "),
        filled.teacher_inputs,
        started.elapsed().as_secs_f64(),
        if filled.teacher_inputs == 0 {
            " (all there already)"
        } else {
            ""
        }
    );
    Ok(ExitCode::from(exit::SUCCESS))
}
