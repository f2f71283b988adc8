//! The Learner's loop for this method: a custom burn-train [`SupervisedLearningStrategy`] that
//! trains every epoch, evaluates every `--eval-every` epochs and at the last one (Burn's default
//! strategy validates every epoch), checkpoints only at evaluations, stops on a loss that is not
//! finite, and makes each epoch's data order a function of the seed and the epoch so that a
//! resumed run repeats an uninterrupted one.

use std::collections::BTreeMap;
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
use super::interrupt;
use super::model::{MtadModel, Scores};
use crate::output::run_folder::PartialEpoch;
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
    /// Evaluates the model (in inference mode) after `epoch`; returns the AUC to display (none
    /// when the test set lacks good or defect images).
    fn evaluate(&mut self, model: &MtadModel, epoch: usize) -> Result<Option<f64>>;
    /// The checkpoint of `epoch` is complete on disk, with the sha256 of each file; `partial`
    /// when it was taken in the middle of the epoch.
    fn checkpointed(
        &mut self,
        epoch: usize,
        partial: Option<PartialEpoch>,
        sha256: BTreeMap<String, String>,
    ) -> Result<()>;
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

impl EpochLosses {
    /// The sums of an epoch stopped after `steps` steps, for its resumption.
    fn partial(&self, epoch: usize) -> PartialEpoch {
        PartialEpoch {
            epoch,
            steps: self.steps,
            loss_sum: self.total,
            reconstruction_sum: self.reconstruction,
            distillation_sum: self.distillation,
            seconds: self.seconds,
        }
    }

    fn resumed(partial: &PartialEpoch) -> Self {
        Self {
            total: partial.loss_sum,
            reconstruction: partial.reconstruction_sum,
            distillation: partial.distillation_sum,
            steps: partial.steps,
            seconds: partial.seconds,
        }
    }
}

/// Counts finished checkpoint writes so the loop can wait for Burn's asynchronous
/// checkpointers before it declares a checkpoint complete, and keeps the sha256 of each file
/// written.
#[derive(Clone, Default)]
pub struct SaveCounter(
    Arc<(Mutex<(usize, usize)>, Condvar)>,
    Arc<Mutex<BTreeMap<String, String>>>,
);

impl SaveCounter {
    /// The sha256 of the files of `epoch`'s checkpoint, by file name.
    fn digests(&self, epoch: usize) -> BTreeMap<String, String> {
        let all = self.1.lock().expect("checkpoint digests");
        CHECKPOINT_PARTS
            .iter()
            .filter_map(|part| {
                let name = format!("{part}-{epoch}.bpk");
                all.get(&name).map(|d| (name, d.clone()))
            })
            .collect()
    }

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
        let path = Self::path(&self.dir, self.name, epoch);
        let result = record
            .checkpoint_into_bytes()
            .map_err(CheckpointerError::Record)
            .and_then(|bytes| {
                write_atomic(&path, &bytes)
                    .map_err(|e| CheckpointerError::Unknown(e.to_string()))?;
                let digest = crate::output::sha256_hex(&bytes);
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                (self.saves.1.lock().expect("checkpoint digests")).insert(name.into(), digest);
                Ok(())
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

/// `MTAD_SIGNAL_AT=<epoch>:<iteration>` sends this process SIGTERM right after that training
/// step, through the real handler: the tests use it to stop a run mid-epoch at a known place.
pub const SIGNAL_ENV: &str = "MTAD_SIGNAL_AT";

fn abort_point() -> Option<(usize, usize)> {
    env_point(ABORT_ENV)
}

fn signal_point() -> Option<(usize, usize)> {
    env_point(SIGNAL_ENV)
}

fn env_point(name: &str) -> Option<(usize, usize)> {
    let value = std::env::var(name).ok()?;
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
    /// The epoch a signal stopped, when resuming from its checkpoint: it is finished first.
    pub resume_partial: Option<PartialEpoch>,
    /// Read by the training dataset: how many of the epoch's items to leave out at its start
    /// (those of the steps made before the stop).
    pub skip: Arc<AtomicUsize>,
    /// Items per training step (the batch size).
    pub items_per_step: usize,
    /// `--checkpoint-every`: a checkpoint at the end of the step where this much training
    /// time has passed since the last one.
    pub checkpoint_every: Option<Duration>,
}

impl EvalEveryStrategy {
    fn fail(&self, interrupter: &burn::train::Interrupter, error: Error) {
        interrupter.stop(Some(&error.to_string()));
        self.failure.set(error);
    }
}

impl EvalEveryStrategy {
    /// Writes the checkpoint of `epoch` (after its last step so far when `partial`), waits for
    /// its files and records it in the class's progress.
    fn checkpoint_now(
        &self,
        learner: &Learner<MtadModel>,
        checkpointer: &mut Option<burn::train::LearningCheckpointer<MtadModel>>,
        store: &EventStoreClient,
        epoch: usize,
        partial: Option<PartialEpoch>,
    ) -> Result<()> {
        let Some(checkpointer) = checkpointer else {
            return Ok(());
        };
        if partial.is_some() {
            // Batch norm's running statistics (Burn's `RunningState`) keep the last step's
            // update pending until they are synced, and a record takes the synced value only:
            // `valid()` syncs them (an evaluation did so before the other checkpoints).
            drop(learner.model().valid());
        }
        let (done, failed) = self.saves.count();
        checkpointer.checkpoint(learner, epoch, store);
        self.saves.wait_for(done + CHECKPOINT_PARTS.len(), failed)?;
        let mut session = self.session.lock().expect("class session");
        session.checkpointed(epoch, partial, self.saves.digests(epoch))
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

        let signal_at = signal_point();
        // Signals checkpoint the current step from here to the end of the loop.
        interrupt::arm();
        struct Disarm;
        impl Drop for Disarm {
            fn drop(&mut self) {
                interrupt::disarm();
            }
        }
        let _disarm = Disarm;
        let mut last_checkpoint = Instant::now();
        // A checkpoint taken in the middle of epoch E is saved as E's; Burn then starts at E + 1,
        // and the loop goes back to finish E from the step after the stop.
        let mut partial = self
            .resume_partial
            .clone()
            .filter(|p| p.epoch + 1 == starting_epoch);
        let first_epoch = partial.as_ref().map_or(starting_epoch, |p| p.epoch);
        'epochs: for epoch in first_epoch..=self.schedule.epochs {
            self.epoch.store(epoch, Ordering::SeqCst);
            self.device
                .seed(super::inputs::mix(self.seed, epoch as u64, 0xD80F));
            let resumed = partial.take();
            let mut sums = resumed
                .as_ref()
                .map_or_else(EpochLosses::default, EpochLosses::resumed);
            let mut iteration = sums.steps;
            self.skip
                .store(iteration * self.items_per_step, Ordering::SeqCst);
            let started = Instant::now() - Duration::from_secs_f64(sums.seconds);
            interrupter.fail_on_error(processor.process_train(LearnerEvent::StartSplit {
                epoch_number: epoch,
                total_items,
            }));
            let mut iterator = train.iter();
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
                if self
                    .checkpoint_every
                    .is_some_and(|every| last_checkpoint.elapsed() >= every)
                {
                    sums.seconds = started.elapsed().as_secs_f64();
                    if let Err(e) = self.checkpoint_now(
                        &learner,
                        &mut checkpointer,
                        &components.event_store,
                        epoch,
                        Some(sums.partial(epoch)),
                    ) {
                        self.fail(&interrupter, e);
                        break 'epochs;
                    }
                    tracing::debug!("checkpoint after step {iteration} of epoch {epoch}");
                    last_checkpoint = Instant::now();
                }
                if abort_at == Some((epoch, iteration)) {
                    tracing::warn!("{ABORT_ENV}: aborting at epoch {epoch}, step {iteration}");
                    std::process::abort();
                }
                if signal_at == Some((epoch, iteration)) {
                    tracing::warn!(
                        "{SIGNAL_ENV}: sending SIGTERM at epoch {epoch}, step {iteration}"
                    );
                    interrupt::raise(interrupt::SIGTERM);
                }
                if let Some(signal) = interrupt::requested() {
                    sums.seconds = started.elapsed().as_secs_f64();
                    let error = match self.checkpoint_now(
                        &learner,
                        &mut checkpointer,
                        &components.event_store,
                        epoch,
                        Some(sums.partial(epoch)),
                    ) {
                        Ok(()) => Error::Interrupted {
                            signal,
                            message: format!(
                                "stopped by {} after step {iteration} of epoch {epoch}; the \
                                 checkpoint of that step is written: continue with `mtad train \
                                 --resume --out <this run's folder>`",
                                interrupt::signal_name(signal)
                            ),
                        },
                        Err(e) => e,
                    };
                    self.fail(&interrupter, error);
                    break 'epochs;
                }
                if interrupter.should_stop() {
                    break 'epochs;
                }
            }
            self.skip.store(0, Ordering::SeqCst);
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
                    auc,
                };
                interrupter.fail_on_error(processor.process_valid(LearnerEvent::ProcessedItem(
                    TrainingItem::new(summary, Progress::new(1, 1, None), Some(1), None),
                )));
                interrupter.fail_on_error(processor.process_valid(LearnerEvent::EndSplit(epoch)));
                drop(session);
                // The last epoch's checkpoint would be removed as soon as it is written (the
                // class is complete; model.mtad holds what it deploys): for vgg11 it is 1.5 GB
                // of writes. A stop before the class is marked complete resumes from the
                // previous checkpoint and reaches the same numbers.
                let last = epoch == self.schedule.epochs;
                if !last
                    && let Err(e) = self.checkpoint_now(
                        &learner,
                        &mut checkpointer,
                        &components.event_store,
                        epoch,
                        None,
                    )
                {
                    self.fail(&interrupter, e);
                    break 'epochs;
                }
                last_checkpoint = Instant::now();
            } else {
                drop(session);
            }
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
