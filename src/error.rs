//! The library's error type. Every error names the file or the option it is about and what was
//! wrong with it; the binary adds context with `anyhow` and prints it.

use std::path::PathBuf;

/// Errors of the multi-teacher-ad library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file or folder failed. (The system's reason is part of the
    /// message and not a separate `source`, so that a chain printed by `anyhow` does not say
    /// it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file exists but its content is not what it must be (truncated, wrong format or shape).
    #[error("{}: {message}", path.display())]
    InvalidFile { path: PathBuf, message: String },
    /// An image that cannot be decoded.
    #[error("{}: cannot decode image: {message}", path.display())]
    Image { path: PathBuf, message: String },
    /// A dataset that cannot be used as it is (missing folder, empty split, unknown category).
    #[error("dataset {}: {message}", root.display())]
    Dataset { root: PathBuf, message: String },
    /// A bad option or argument given by the user.
    #[error("{0}")]
    InvalidArgument(String),
    /// A teacher network is unavailable, or its weights do not match what was built.
    #[error("teacher {name}: {message}")]
    Teacher { name: String, message: String },
    /// Training or evaluation cannot go on (a loss that is not finite, a failed checkpoint).
    #[error("{0}")]
    Training(String),
    /// A backend was asked for that this binary was not compiled with, or it cannot start.
    #[error("{0}")]
    Device(String),
    /// A signal (Ctrl-C, SIGTERM) stopped the command; the message says what was saved.
    #[error("{message}")]
    Interrupted { signal: i32, message: String },
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for an [`Error::Io`] about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Shorthand for an [`Error::InvalidFile`] about `path`.
    pub fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
