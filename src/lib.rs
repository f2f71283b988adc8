//! Multi-Teacher Knowledge Distillation based Anomaly Detection, on Burn.
//!
//! See `README.md` for the tool and `docs/METHOD.md` of the project for the exact method.

pub mod config;
pub mod data;
pub mod decoder;
pub mod device;
pub mod error;
pub mod inference;
pub mod output;
pub mod progress;
pub mod scoring;
pub mod students;
pub mod sweep;
pub mod teachers;
pub mod training;
pub mod weighting;

pub use error::{Error, Result};
