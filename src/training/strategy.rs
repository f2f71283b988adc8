//! The Learner's loop for this method: a custom burn-train [`SupervisedLearningStrategy`] that
//! trains every epoch, evaluates every `--eval-every` epochs and at the last one (Burn's default
//! strategy validates every epoch), checkpoints only at evaluations, stops on a loss that is not
//! finite, and makes each epoch's data order a function of the seed and the epoch so that a
//! resumed run repeats an uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use burn::data::dataloader::Progress;
use burn::prelude::*;
use burn::tensor::Bytes;
use burn::train::checkpoint::{
    Checkpoint, Checkpointer, CheckpointerError, CheckpointingAction, CheckpointingStrategy,
};
use burn::train::metric::store::EventStoreClient;
use burn::train::{
    EventProcessorTraining, Learner, LearnerEvent, SupervisedLearningStrategy,
    SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents, TrainingItem, ValidLoader,
};

use super::inputs::ErrorSlot;
use super::model::{MtadModel, Scores};
use crate::output::write_atomic;
use crate::{Error, Result};

/// When to evaluate: every `every` epochs and at the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalSchedule {
    pub epochs: usize,
    pub every: usize,
}

impl EvalSchedule {
    pub fn is_eval(&self, epoch: usize) -> bool {
        epoch == self.epochs || (self.every > 0 && epoch % self.every == 0)
    }

    /// The evaluation epochs, in order.
    pub fn eval_epochs(&self) -> Vec<usize> {
        (1..=self.epochs).filter(|&e| self.is_eval(e)).collect()
    }
}

/// What the loop reports to, and what evaluates, for one class.
pub trait ClassSession: Send {
    /// Evaluates the model (in inference mode) after `epoch`; returns the AUC to display.
    fn evaluate(&mut self, model: &MtadModel, epoch: usize) -> Result<f64>;
    /// The checkpoint of `epoch` is complete on disk.
    fn checkpointed(&mut self, epoch: usize) -> Result<()>;
    /// Training ended without error: mark the class complete; returns its progress.
    fn finish(&mut self) -> Result<crate::output::run_folder::ClassProgress>;
    /// An epoch finished training, with its mean losses.
    fn epoch_trained(&mut self, epoch: usize, losses: &EpochLosses);
}

/// Mean losses of an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochLosses {
    pub total: f64,
    pub reconstruction: f64,
    pub distillation: Option<f64>,
    pub steps: usize,
    pub seconds: f64,
}

/// Counts finished checkpoint writes so the loop can wait for Burn's asynchronous
/// checkpointers before it declares a checkpoint complete.
#[derive(Clone, Default)]
pub struct SaveCounter(Arc<(Mutex<(usize, usize)>, Condvar)>);

impl SaveCounter {
    fn finished(&self, ok: bool) {
        let (lock, cvar) = &*self.0;
        let mut state = lock.lock().expect("save counter");
        state.0 += 1;
        if !ok {
            state.1 += 1;
        }
        cvar.notify_all();
    }

    fn count(&self) -> (usize, usize) {
        *self.0.0.lock().expect("save counter")
    }

    /// Waits until `target` saves finished; an error if one failed or it takes too long.
    fn wait_for(&self, target: usize, failed_before: usize) -> Result<()> {
        let (lock, cvar) = &*self.0;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut state = lock.lock().expect("save counter");
        while state.0 < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Training(
                    "writing the checkpoint took more than 10 minutes".into(),
                ));
            }
            state = cvar.wait_timeout(state, left).expect("save counter").0;
        }
        if state.1 > failed_before {
            return Err(Error::Training(
                "a checkpoint could not be written (see the log above)".into(),
            ));
        }
        Ok(())
    }
}

/// A checkpointer that writes `<dir>/<name>-<epoch>.bpk` atomically and counts its writes.
pub struct AtomicCheckpointer {
    dir: PathBuf,
    name: &'static str,
    saves: SaveCounter,
}

impl AtomicCheckpointer {
    pub fn new(dir: &Path, name: &'static str, saves: SaveCounter) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name,
            saves,
        }
    }

    /// The file of `epoch`'s checkpoint of `name`.
    pub fn path(dir: &Path, name: &str, epoch: usize) -> PathBuf {
        dir.join(format!("{name}-{epoch}.bpk"))
    }
}

/// The three parts of a Learner checkpoint.
pub const CHECKPOINT_PARTS: [&str; 3] = ["model", "optim", "scheduler"];

impl<R: Checkpoint> Checkpointer<R> for AtomicCheckpointer {
    fn save(&self, epoch: usize, record: R) -> std::result::Result<(), CheckpointerError> {
        let result = record
            .checkpoint_into_bytes()
            .map_err(CheckpointerError::Record)
            .and_then(|bytes| {
                write_atomic(&Self::path(&self.dir, self.name, epoch), &bytes)
                    .map_err(|e| CheckpointerError::Unknown(e.to_string()))
            });
        if let Err(e) = &result {
            tracing::error!("checkpoint {} of epoch {epoch}: {e}", self.name);
        }
        self.saves.finished(result.is_ok());
        result
    }

    fn delete(&self, epoch: usize) -> std::result::Result<(), CheckpointerError> {
        match std::fs::remove_file(Self::path(&self.dir, self.name, epoch)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CheckpointerError::IOError(e))
            }
            _ => Ok(()),
        }
    }

    fn restore(&self, epoch: usize) -> std::result::Result<R, CheckpointerError> {
        let bytes = std::fs::read(Self::path(&self.dir, self.name, epoch))
            .map_err(CheckpointerError::IOError)?;
        R::checkpoint_from_bytes(Bytes::from_bytes_vec(bytes)).map_err(CheckpointerError::Record)
    }
}

/// Saves whenever asked: the loop asks only at evaluations, and the session deletes older
/// checkpoints once a newer one is complete.
pub struct SaveWhenAsked;

impl CheckpointingStrategy for SaveWhenAsked {
    fn checkpointing(
        &mut self,
        _epoch: usize,
        _collector: &EventStoreClient,
    ) -> Vec<CheckpointingAction> {
        vec![CheckpointingAction::Save]
    }
}

/// `MTAD_ABORT_AT=<epoch>:<iteration>` aborts the process (as a kill would) right after that
/// training step: the tests use it to interrupt a run mid-epoch at a known place.
pub const ABORT_ENV: &str = "MTAD_ABORT_AT";

fn abort_point() -> Option<(usize, usize)> {
    let value = std::env::var(ABORT_ENV).ok()?;
    let (e, i) = value.split_once(':')?;
    Some((e.parse().ok()?, i.parse().ok()?))
}

/// The custom learning strategy.
pub struct EvalEveryStrategy {
    pub device: Device,
    pub schedule: EvalSchedule,
    /// Read by the training dataset to order each epoch.
    pub epoch: Arc<AtomicUsize>,
    pub session: Arc<Mutex<Box<dyn ClassSession>>>,
    pub saves: SaveCounter,
    /// Errors of the batchers.
    pub batch_errors: ErrorSlot,
    /// Why the loop stopped early, for the caller.
    pub failure: ErrorSlot,
    /// Seeds the device's random stream at the start of each epoch (dropout), so that a resumed
    /// run draws what an uninterrupted one does.
    pub seed: u64,
}

impl EvalEveryStrategy {
    fn fail(&self, interrupter: &burn::train::Interrupter, error: Error) {
        interrupter.stop(Some(&error.to_string()));
        self.failure.set(error);
    }
}

impl SupervisedLearningStrategy<MtadModel> for EvalEveryStrategy {
    fn fit(
        &self,
        components: TrainingComponents<MtadModel>,
        mut learner: Learner<MtadModel>,
        dataloader_train: TrainLoader<MtadModel>,
        _dataloader_valid: ValidLoader<MtadModel>,
        starting_epoch: usize,
    ) -> (MtadModel, SupervisedTrainingEventProcessor<MtadModel>) {
        let train = dataloader_train.to_device(&self.device);
        let total_items = train.num_items();
        learner.fork(&self.device);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let interrupter = components.interrupter.clone();
        let abort_at = abort_point();
        let inference_device = self.device.clone().inner();

        'epochs: for epoch in starting_epoch..=self.schedule.epochs {
            self.epoch.store(epoch, Ordering::SeqCst);
            self.device
                .seed(super::inputs::mix(self.seed, epoch as u64, 0xD80F));
            let started = Instant::now();
            interrupter.fail_on_error(processor.process_train(LearnerEvent::StartSplit {
                epoch_number: epoch,
                total_items,
            }));
            let mut iterator = train.iter();
            let mut iteration = 0;
            let mut sums = EpochLosses::default();
            while let Some(item) = iterator.next() {
                let item = match item {
                    Ok(item) => item,
                    Err(e) => {
                        self.fail(&interrupter, Error::Training(format!("data loader: {e}")));
                        break 'epochs;
                    }
                };
                iteration += 1;
                let progress = iterator.progress();
                let output = learner.train_step(item);
                if let Some(e) = self.batch_errors.take() {
                    self.fail(&interrupter, e);
                    break 'epochs;
                }
                // One read back per step: the loss and its parts together.
                let mut parts = vec![output.item.loss.clone(), output.item.reconstruction.clone()];
                parts.extend(output.item.distillation.clone());
                let values = match Tensor::cat(parts, 0)
                    .into_data()
                    .convert::<f64>()
                    .try_into_vec::<f64>()
                {
                    Ok(v) => v,
                    Err(e) => {
                        self.fail(&interrupter, Error::Training(format!("the loss: {e:?}")));
                        break 'epochs;
                    }
                };
                let loss = values[0];
                if !loss.is_finite() {
                    self.fail(
                        &interrupter,
                        Error::Training(format!(
                            "the loss became {loss} at epoch {epoch}, step {iteration}; training \
                             stopped before applying it. The last good checkpoint is kept: \
                             lower --lr and rerun with --resume, or start over"
                        )),
                    );
                    break 'epochs;
                }
                sums.total += loss;
                sums.reconstruction += values[1];
                if let Some(&kd) = values.get(2) {
                    *sums.distillation.get_or_insert(0.0) += kd;
                }
                sums.steps += 1;
                learner.lr_step();
                learner.optimizer_step(output.grads);
                interrupter.fail_on_error(processor.process_train(LearnerEvent::ProcessedItem(
                    TrainingItem::new(
                        output.item,
                        progress,
                        Some(iteration),
                        Some(learner.lr_current()),
                    ),
                )));
                if abort_at == Some((epoch, iteration)) {
                    tracing::warn!("{ABORT_ENV}: aborting at epoch {epoch}, step {iteration}");
                    std::process::abort();
                }
                if interrupter.should_stop() {
                    break 'epochs;
                }
            }
            interrupter.fail_on_error(processor.process_train(LearnerEvent::EndSplit(epoch)));
            if sums.steps > 0 {
                let n = sums.steps as f64;
                sums.total /= n;
                sums.reconstruction /= n;
                sums.distillation = sums.distillation.map(|d| d / n);
            }
            sums.seconds = started.elapsed().as_secs_f64();
            let mut session = self.session.lock().expect("class session");
            session.epoch_trained(epoch, &sums);

            if self.schedule.is_eval(epoch) {
                let model = learner.model().valid();
                let auc = match session.evaluate(&model, epoch) {
                    Ok(auc) => auc,
                    Err(e) => {
                        self.fail(&interrupter, e);
                        break 'epochs;
                    }
                };
                interrupter.fail_on_error(processor.process_valid(LearnerEvent::StartSplit {
                    epoch_number: epoch,
                    total_items: 1,
                }));
                let zero = Tensor::<1>::zeros([1], &inference_device);
                let summary = Scores {
                    as_z: zero.clone(),
                    as_cossim: zero.clone(),
                    as_rec: zero,
                    auc: Some(auc),
                };
                interrupter.fail_on_error(processor.process_valid(LearnerEvent::ProcessedItem(
                    TrainingItem::new(summary, Progress::new(1, 1, None), Some(1), None),
                )));
                interrupter.fail_on_error(processor.process_valid(LearnerEvent::EndSplit(epoch)));
                if let Some(checkpointer) = &mut checkpointer {
                    let (done, failed) = self.saves.count();
                    checkpointer.checkpoint(&learner, epoch, &components.event_store);
                    if let Err(e) = self
                        .saves
                        .wait_for(done + CHECKPOINT_PARTS.len(), failed)
                        .and_then(|_| session.checkpointed(epoch))
                    {
                        self.fail(&interrupter, e);
                        break 'epochs;
                    }
                }
            }
            drop(session);
            interrupter.fail_on_error(processor.process_train(LearnerEvent::EndEpoch(epoch)));
            if interrupter.should_stop() {
                break;
            }
        }
        (learner.model(), processor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_every_n_epochs_and_at_the_last() {
        let s = EvalSchedule {
            epochs: 7,
            every: 3,
        };
        assert_eq!(s.eval_epochs(), [3, 6, 7]);
        let s = EvalSchedule {
            epochs: 500,
            every: 50,
        };
        assert_eq!(s.eval_epochs().len(), 10);
        let s = EvalSchedule {
            epochs: 2,
            every: 5,
        };
        assert_eq!(s.eval_epochs(), [2]);
    }
}
