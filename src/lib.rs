//! Multi-Teacher Knowledge Distillation based Anomaly Detection, on Burn.
//!
//! See `README.md` for the tool and `shared/METHOD.md` of the project for the exact method.

pub mod cli;
pub mod data;
pub mod decoder;
pub mod detect;
pub mod device;
pub mod error;
pub mod output;
pub mod report;
pub mod scoring;
pub mod students;
pub mod teachers;
pub mod training;
pub mod weighting;

pub use error::{Error, Result};
