//! `mtad teachers`: what is compiled in, and one forward pass of each teacher on a seeded batch.

use std::{fmt, time::Instant};

use burn::prelude::*;
use burn::tensor::Distribution;

use super::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation, generated};
use crate::Result;

/// The result of running one teacher once.
#[derive(Debug, Clone)]
pub struct TeacherCheck {
    pub name: &'static str,
    pub onnx_sha256: &'static str,
    pub listed_in_teachers_json: bool,
    pub output_shape: [usize; 2],
    pub mean: f32,
    pub std: f32,
    pub all_finite: bool,
    pub load_seconds: f64,
    pub forward_seconds: f64,
}

/// Loads each teacher of `size`, runs it on a seeded `[batch, 3, image_size, image_size]` input
/// and summarises its output.
pub fn check_teachers(
    size: TeacherSize,
    weights: &WeightsLocation,
    device: &Device,
    batch: usize,
    image_size: usize,
) -> Result<Vec<TeacherCheck>> {
    device.seed(0);
    let input = Tensor::<4>::random(
        [batch, 3, image_size, image_size],
        Distribution::Uniform(-1.0, 1.0),
        device,
    );
    TeacherFamily::ALL
        .iter()
        .map(|&family| {
            let started = Instant::now();
            let teacher = Teacher::load(TeacherId::new(family, size), weights, device)?;
            let load_seconds = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let output = teacher.forward(input.clone());
            let values = output
                .clone()
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| crate::Error::Device(format!("reading the output back: {e:?}")))?;
            let forward_seconds = started.elapsed().as_secs_f64();
            let n = values.len() as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = values
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            Ok(TeacherCheck {
                name: teacher.id().name(),
                onnx_sha256: teacher.sha256(),
                listed_in_teachers_json: teacher.built.listed_sha256.is_some(),
                output_shape: output.dims(),
                mean: mean as f32,
                std: var.sqrt() as f32,
                all_finite: values.iter().all(|v| v.is_finite()),
                load_seconds,
                forward_seconds,
            })
        })
        .collect()
}

/// The teachers compiled into this binary, by name.
pub fn compiled_teachers() -> Vec<&'static str> {
    generated::BUILT_TEACHERS.iter().map(|b| b.name).collect()
}

impl fmt::Display for TeacherCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<14} sha256 {}{}  output {:?}  mean {:+.4}  std {:.4}{}  load {:.2}s  forward {:.3}s",
            self.name,
            &self.onnx_sha256[..12],
            if self.listed_in_teachers_json {
                ""
            } else {
                " (not in teachers.json)"
            },
            self.output_shape,
            self.mean,
            self.std,
            if self.all_finite {
                ""
            } else {
                "  NON-FINITE VALUES"
            },
            self.load_seconds,
            self.forward_seconds
        )
    }
}
