//! The frozen teachers as a run uses them: batches of inputs in, raw outputs out (item-major,
//! `[item][teacher][1000]`), with a count of the inputs they ran on, and the z-scores of those
//! outputs with a class's statistics.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::prelude::*;

use super::inputs::{InputSet, images_tensor};
use crate::data::FloatImage;
use crate::progress::Progress;
use crate::students::EMBEDDING_DIM;
use crate::teachers::{TeacherEnsemble, TeacherStatistics};
use crate::{Error, Result};

/// The frozen teachers with a count of the inputs they ran on.
pub struct TeacherRunner {
    /// `None` once [`release`](Self::release)d.
    ensemble: std::sync::RwLock<Option<TeacherEnsemble>>,
    names: Vec<String>,
    sha256s: Vec<String>,
    pub device: Device,
    /// Network inputs passed through the teachers (each through every teacher).
    pub inputs_forwarded: AtomicU64,
}

impl TeacherRunner {
    pub fn new(ensemble: TeacherEnsemble, device: Device) -> Self {
        Self {
            names: ensemble.names().iter().map(|s| s.to_string()).collect(),
            sha256s: ensemble.sha256s().iter().map(|s| s.to_string()).collect(),
            ensemble: std::sync::RwLock::new(Some(ensemble)),
            device,
            inputs_forwarded: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The teachers' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The teachers' ONNX sha256s, in order.
    pub fn sha256s(&self) -> &[String] {
        &self.sha256s
    }

    /// Frees the teachers' weights (about 0.9 GB for the ImageNet ones) once every output a run
    /// needs is cached; [`raw`](Self::raw) is an error afterwards.
    pub fn release(&self) {
        if let Ok(mut ensemble) = self.ensemble.write() {
            *ensemble = None;
        }
    }

    /// Every teacher's raw output for `images`, item-major: `[item][teacher][1000]`.
    pub fn raw(&self, images: &[FloatImage]) -> Result<Vec<f32>> {
        let n = images.len();
        let k = self.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let guard = self
            .ensemble
            .read()
            .map_err(|_| Error::Training("the teachers' lock is poisoned".into()))?;
        let ensemble = guard.as_ref().ok_or_else(|| {
            Error::Training(
                "the teachers were released after the caches were built, but an output is \
                 missing from them (was a cache file deleted during the run?): run again"
                    .into(),
            )
        })?;
        let outputs = ensemble.forward(images_tensor(images, &self.device));
        self.inputs_forwarded.fetch_add(n as u64, Ordering::Relaxed);
        let per_teacher = outputs
            .into_iter()
            .map(|t| {
                t.into_data()
                    .try_into_vec::<f32>()
                    .map_err(|e| Error::Training(format!("teacher output: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(n * k * EMBEDDING_DIM);
        for i in 0..n {
            for values in &per_teacher {
                out.extend_from_slice(&values[i * EMBEDDING_DIM..(i + 1) * EMBEDDING_DIM]);
            }
        }
        Ok(out)
    }

    /// The teachers' z-scored outputs for a batch already on the device, `[n, teacher, 1000]`,
    /// computed there: nothing is read back to the host.
    pub fn z_on_device(&self, inputs: Tensor<4>, stats: &TeacherStatistics) -> Result<Tensor<3>> {
        let n = inputs.dims()[0];
        let guard = self
            .ensemble
            .read()
            .map_err(|_| Error::Training("the teachers' lock is poisoned".into()))?;
        let ensemble = guard
            .as_ref()
            .ok_or_else(|| Error::Training("the teachers were released".into()))?;
        let outputs = ensemble.forward(inputs);
        self.inputs_forwarded.fetch_add(n as u64, Ordering::Relaxed);
        let k = outputs.len();
        let raw = Tensor::stack::<3>(outputs, 1);
        let device = raw.device();
        let table = |rows: &[Vec<f32>]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            Tensor::<3>::from_data(TensorData::new(flat, [1, k, EMBEDDING_DIM]), &device)
        };
        Ok((raw - table(&stats.mean)) / table(&stats.std))
    }

    /// [`raw`](Self::raw) for a whole input set, in batches of `batch`, reporting progress.
    pub fn raw_set(&self, set: &InputSet, batch: usize, what: &str) -> Result<Vec<f32>> {
        let total = set.len();
        let mut out = Vec::with_capacity(total * self.len() * EMBEDDING_DIM);
        let started = std::time::Instant::now();
        let progress = Progress::start(&format!("teachers on {what}"), total as u64);
        let indices: Vec<usize> = (0..total).collect();
        for chunk in indices.chunks(batch.max(1)) {
            let images = set.load(chunk)?;
            out.extend(self.raw(&images)?);
            progress.advance(chunk.len() as u64);
        }
        tracing::debug!(
            "teachers on {what}: {total} inputs in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }
}

/// z-scores of item-major raw outputs (`[item][teacher][1000]`), the same layout.
pub fn z_scores_host(raw: &[f32], stats: &TeacherStatistics) -> Vec<f32> {
    let k = stats.mean.len();
    let mut out = Vec::with_capacity(raw.len());
    for (j, chunk) in raw.chunks_exact(EMBEDDING_DIM).enumerate() {
        let t = j % k;
        out.extend(
            chunk
                .iter()
                .zip(&stats.mean[t])
                .zip(&stats.std[t])
                .map(|((x, m), s)| (x - m) / s),
        );
    }
    out
}
