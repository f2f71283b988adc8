//! Progress of long work (teacher-embedding caches, evaluations, `infer`, `detect`), reported to
//! whoever listens: the binary draws progress bars on a terminal; the library never prints.

use std::sync::OnceLock;

/// Receives the progress of the library's long tasks.
pub trait ProgressSink: Send + Sync {
    /// A task of `total` units (inputs, images) named `label` starts.
    fn start(&self, label: &str, total: u64) -> Box<dyn ProgressTask>;
}

/// One running task: told how far it got; dropped when it ends.
pub trait ProgressTask: Send + Sync {
    fn advance(&self, units: u64);
}

static SINK: OnceLock<Box<dyn ProgressSink>> = OnceLock::new();

/// Sends every later task's progress to `sink` (once per process; later calls are ignored and
/// return false).
pub fn set_sink(sink: Box<dyn ProgressSink>) -> bool {
    SINK.set(sink).is_ok()
}

/// A task's progress, sent to the sink if one is set (otherwise nothing is reported).
pub struct Progress(Option<Box<dyn ProgressTask>>);

impl Progress {
    pub fn start(label: &str, total: u64) -> Self {
        Self(SINK.get().map(|sink| sink.start(label, total)))
    }

    pub fn advance(&self, units: u64) {
        if let Some(task) = &self.0 {
            task.advance(units);
        }
    }
}
