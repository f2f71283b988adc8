//! The timed cases: each teacher's forward pass, each student's training step (and, with
//! `--phases`, where it spends its time), evaluation scoring, and one epoch of the CPU demo.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use burn::train::TrainStep;
use mtad_kernels::adam::Adam;
use multi_teacher_ad::data::demo::{DemoSpec, write_demo_dataset};
use multi_teacher_ad::students::StudentKind;
use multi_teacher_ad::teachers::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation};
use multi_teacher_ad::training::model::{InputBatch, MtadModel, MtadModelConfig};
use multi_teacher_ad::training::prepare::{TrainRequest, prepare};

use crate::{Args, Timing, torch_name};

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
pub(crate) fn case_names(args: &Args) -> Vec<String> {
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
pub(crate) fn teacher_cases(args: &Args, device: &Device, want: &str, out: &mut Vec<Timing>) {
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

pub(crate) fn student_cases(args: &Args, device: &Device, want: &str, out: &mut Vec<Timing>) {
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
pub(crate) fn demo_cases(device: &Device, want: &str, out: &mut Vec<Timing>) {
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
        let request = |out: &str| {
            let mut r =
                TrainRequest::tiny_folder(&data, &dir.path().join(out), &cache, device.clone());
            r.settings.student = kind;
            r.settings.epochs = 1;
            r.settings.eval_every = 1;
            r.cover = true;
            r
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
