//! Training and evaluation (METHOD.md): the trainable model and its Learner steps, the inputs
//! and the teacher-embedding cache, the custom learning strategy, and whole runs.

pub mod artifact;
pub mod cache;
pub mod ensemble;
pub mod inputs;
pub mod model;
pub mod renderer;
pub mod run;
pub mod strategy;
