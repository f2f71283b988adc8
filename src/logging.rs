//! The binary's logs and progress bars: `tracing` to standard error (its level from -v/-q or
//! RUST_LOG), a copy of every log line (Burn's included, through the `log` bridge) into the run
//! folder's `run.log` once a command knows its run folder, and `indicatif` bars for the
//! library's long tasks when standard error is a terminal.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use multi_teacher_ad::progress::{ProgressSink, ProgressTask, set_sink};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// The bars, shared with the standard-error writer so that log lines print above them.
static BARS: OnceLock<MultiProgress> = OnceLock::new();
/// The current run folder's `run.log`, once a command has one.
static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);

/// Sets up logging for a verbosity (`-v` count minus `-q` count) and, on a terminal, the bars.
pub fn init(verbosity: i8) {
    let ours = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let others = if verbosity >= 2 { "debug" } else { "warn" };
    let console_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{others},multi_teacher_ad={ours},mtad={ours}"))
    });
    let console = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .with_writer(Stderr)
        .with_filter(console_filter);
    let file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(RunLog)
        .with_filter(EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(console)
        .with(file)
        .try_init();

    if std::io::stderr().is_terminal() {
        let bars =
            BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        set_sink(Box::new(Bars(bars.clone())));
    }
}

/// Appends the log from now on to `<dir>/run.log` as well (the folder is created if needed).
pub fn log_to_run_folder(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("run.log"))?;
    *RUN_LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(())
}

/// Standard error, printed above the progress bars when they are shown.
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = StderrLine;
    fn make_writer(&'a self) -> Self::Writer {
        StderrLine(Vec::new())
    }
}

/// One log record, written to standard error when dropped (whole, above the bars).
struct StderrLine(Vec<u8>);

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for StderrLine {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().write_all(&self.0);
        };
        match BARS.get() {
            Some(bars) => bars.suspend(write),
            None => write(),
        }
    }
}

/// The run folder's `run.log`, or nowhere before a command has one.
struct RunLog;

impl<'a> MakeWriter<'a> for RunLog {
    type Writer = RunLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RunLogWriter
    }
}

struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(file) = RUN_LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // A log that cannot be written must not stop the work it describes.
            let _ = file.write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Progress bars for the library's tasks.
struct Bars(MultiProgress);

impl ProgressSink for Bars {
    fn start(&self, label: &str, total: u64) -> Box<dyn ProgressTask> {
        let bar = self.0.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, {eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Box::new(Bar(bar))
    }
}

struct Bar(ProgressBar);

impl ProgressTask for Bar {
    fn advance(&self, units: u64) {
        self.0.inc(units);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_log_gets_our_lines_and_those_of_the_log_crate() {
        init(0);
        let dir = tempfile::tempdir().unwrap();
        log_to_run_folder(dir.path()).unwrap();
        tracing::info!("from tracing");
        // Burn logs through the `log` crate.
        log::info!(target: "burn_train", "from log");
        tracing::debug!("below the run log's level");
        let text = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
        assert!(text.contains("from tracing"), "{text}");
        assert!(text.contains("from log"), "{text}");
        assert!(!text.contains("below the run log's level"), "{text}");
    }
}
