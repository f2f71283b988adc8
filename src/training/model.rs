//! What training changes: the student, the decoder and the teacher weighting, as one Burn module
//! with the Learner's [`TrainStep`] (both losses in one backward pass) and [`InferenceStep`]
//! (the three anomaly scores of every input).
//!
//! The frozen teachers are not part of this module: their z-scores arrive with each batch (from
//! the embedding cache or computed by the batcher), so a checkpoint of this module never holds
//! teacher weights.

use std::sync::Arc;

use burn::prelude::*;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, LossInput, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric,
    NumericAttributes, NumericEntry, SerializedEntry,
};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};

use crate::decoder::{Decoder, DecoderConfig};
use crate::students::{
    Student, StudentConfig, StudentKind, cosine_score, distillation_loss, embedding_score,
    reconstruction_loss, reconstruction_score,
};
use crate::weighting::{TeacherWeighting, TeacherWeightingConfig};

/// One batch of inputs as the networks see them.
#[derive(Debug, Clone)]
pub struct InputBatch {
    /// `[N, 3, S, S]`, values in `[-1, 1]`.
    pub images: Tensor<4>,
    /// The teachers' z-scores, `[N, k, 1000]` (teacher `i` at `[:, i, :]`); `None` in the
    /// no-teacher ablation.
    pub teachers: Option<Tensor<3>>,
}

/// The trainable part of the method.
#[derive(Module, Debug)]
pub struct MtadModel {
    pub student: Student,
    pub decoder: Decoder,
    /// The softmax weighting of the teachers; `None` with one teacher or none.
    pub weighting: Option<TeacherWeighting>,
}

/// Shape of an [`MtadModel`].
#[derive(Config, Debug)]
pub struct MtadModelConfig {
    pub student: StudentKind,
    /// Side of the square inputs (224 in the method), a multiple of 32.
    pub image_size: usize,
    /// How many teachers feed the weighting: 3 (the method), 1 (single-teacher ablation, no
    /// weighting) or 0 (no-teacher ablation: student + decoder form an autoencoder).
    pub num_teachers: usize,
}

impl MtadModelConfig {
    pub fn init(&self, device: &Device) -> crate::Result<MtadModel> {
        let decoder = DecoderConfig::for_image_size(self.image_size)?.init(device);
        let weighting = (self.num_teachers > 1).then(|| {
            TeacherWeightingConfig::new()
                .with_num_teachers(self.num_teachers)
                .init(device)
        });
        Ok(MtadModel {
            student: StudentConfig::new(self.student).init(device),
            decoder,
            weighting,
        })
    }
}

/// The two training losses of one batch.
pub struct Losses {
    /// `MSE(x, Decoder(z_T))`; in the no-teacher ablation `MSE(x, Decoder(Student(x)))`.
    pub reconstruction: Tensor<1>,
    /// `MSE(z_S, z_T) + mean(1 - cos(z_S, z_T))` with `z_T` detached; `None` without teachers.
    pub distillation: Option<Tensor<1>>,
}

impl Losses {
    /// What one backward pass minimises: the sum of both.
    pub fn total(&self) -> Tensor<1> {
        match &self.distillation {
            Some(kd) => self.reconstruction.clone() + kd.clone(),
            None => self.reconstruction.clone(),
        }
    }
}

impl MtadModel {
    /// `z_T`: the weighted sum of the teachers' z-scores (or the single teacher's).
    pub fn teacher_embedding(&self, teachers: Tensor<3>) -> Tensor<2> {
        match &self.weighting {
            Some(weighting) => weighting.forward(teachers),
            None => {
                let [n, _, d] = teachers.dims();
                teachers.narrow(1, 0, 1).reshape([n, d])
            }
        }
    }

    /// Both losses of a batch (METHOD.md, "One training step"). The distillation loss sees
    /// `z_T` detached, so it gives no gradient to the weighting or the decoder; the
    /// reconstruction loss does not involve the student.
    pub fn losses(&self, batch: InputBatch) -> Losses {
        match batch.teachers {
            Some(teachers) => {
                let z_t = self.teacher_embedding(teachers);
                let x_t = self.decoder.forward(z_t.clone());
                let reconstruction = reconstruction_loss(batch.images.clone(), x_t);
                let z_s = self.student.forward(batch.images);
                Losses {
                    reconstruction,
                    distillation: Some(distillation_loss(z_s, z_t.detach())),
                }
            }
            None => {
                let z_s = self.student.forward(batch.images.clone());
                let x_s = self.decoder.forward(z_s);
                Losses {
                    reconstruction: reconstruction_loss(batch.images, x_s),
                    distillation: None,
                }
            }
        }
    }

    /// The student's reconstruction `x_S = Decoder(Student(x))` of every input.
    pub fn reconstruct(&self, images: Tensor<4>) -> Tensor<4> {
        self.decoder.forward(self.student.forward(images))
    }

    /// `AS_z`, `AS_cossim` and `AS_rec` of every input (zeros for the first two without
    /// teachers). Call it on a [`valid`](burn::module::AutodiffModule::valid) module.
    pub fn scores(&self, batch: InputBatch) -> Scores {
        let z_s = self.student.forward(batch.images.clone());
        let x_s = self.decoder.forward(z_s.clone());
        let as_rec = reconstruction_score(x_s, batch.images);
        let (as_z, as_cossim) = match batch.teachers {
            Some(teachers) => {
                let z_t = self.teacher_embedding(teachers);
                (
                    embedding_score(z_s.clone(), z_t.clone()),
                    cosine_score(z_s, z_t),
                )
            }
            None => (as_rec.zeros_like(), as_rec.zeros_like()),
        };
        Scores {
            as_z,
            as_cossim,
            as_rec,
            auc: None,
        }
    }
}

/// What a training step reports.
pub struct StepOutput {
    /// The summed loss, `[1]`.
    pub loss: Tensor<1>,
    pub reconstruction: Tensor<1>,
    pub distillation: Option<Tensor<1>>,
}

impl ItemLazy for StepOutput {
    fn sync(self) -> std::result::Result<Self, burn::tensor::ExecutionError> {
        Ok(Self {
            loss: self.loss.without_autodiff(),
            reconstruction: self.reconstruction.without_autodiff(),
            distillation: self.distillation.map(|t| t.without_autodiff()),
        })
    }
}

impl Adaptor<LossInput> for StepOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl TrainStep for MtadModel {
    type Input = InputBatch;
    type Output = StepOutput;

    fn step(&self, batch: InputBatch) -> TrainOutput<StepOutput> {
        let losses = self.losses(batch);
        let loss = losses.total();
        let grads = loss.backward();
        TrainOutput::new(
            self,
            grads,
            StepOutput {
                loss,
                reconstruction: losses.reconstruction.detach(),
                distillation: losses.distillation.map(|t| t.detach()),
            },
        )
    }
}

/// The anomaly scores of a batch, `[N]` each; the evaluation's summary item carries the AUC.
pub struct Scores {
    pub as_z: Tensor<1>,
    pub as_cossim: Tensor<1>,
    pub as_rec: Tensor<1>,
    /// Set on the one item per evaluation that reports the evaluation's AUC to the renderer.
    pub auc: Option<f64>,
}

impl Scores {
    /// The three scores on the host.
    pub fn to_host(self) -> crate::Result<crate::scoring::evaluation::RawScores> {
        let host = |t: Tensor<1>| {
            t.into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .map_err(|e| crate::Error::Training(format!("scores: {e:?}")))
        };
        Ok(crate::scoring::evaluation::RawScores {
            as_z: host(self.as_z)?,
            as_cossim: host(self.as_cossim)?,
            as_rec: host(self.as_rec)?,
        })
    }
}

impl ItemLazy for Scores {
    fn sync(self) -> std::result::Result<Self, burn::tensor::ExecutionError> {
        Ok(self)
    }
}

impl InferenceStep for MtadModel {
    type Input = InputBatch;
    type Output = Scores;

    fn step(&self, batch: InputBatch) -> Scores {
        self.scores(batch)
    }
}

/// The latest evaluation's ROC AUC, shown by Burn's renderer next to the loss.
#[derive(Clone)]
pub struct AucMetric {
    name: Arc<String>,
    state: NumericMetricState,
}

/// Input of [`AucMetric`].
pub struct AucInput(pub Option<f64>);

impl Adaptor<AucInput> for Scores {
    fn adapt(&self) -> AucInput {
        AucInput(self.auc)
    }
}

impl AucMetric {
    pub fn new(label: &str) -> Self {
        Self {
            name: Arc::new(format!("AUC ({label})")),
            state: NumericMetricState::default(),
        }
    }
}

impl Metric for AucMetric {
    type Input = AucInput;

    fn update(
        &mut self,
        input: &AucInput,
        _metadata: &MetricMetadata,
    ) -> std::result::Result<SerializedEntry, burn::tensor::TensorReadError> {
        if let Some(auc) = input.0 {
            self.state.update(auc, 1);
        }
        Ok(self
            .state
            .compute_update(FormatOptions::new(self.name()).precision(4)))
    }

    fn compute(&mut self) -> std::result::Result<SerializedEntry, burn::tensor::TensorReadError> {
        Ok(self
            .state
            .compute_final(FormatOptions::new(self.name()).precision(4)))
    }

    fn clear(&mut self) {
        self.state.reset()
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: true,
        }
        .into()
    }
}

impl Numeric for AucMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}
