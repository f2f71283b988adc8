//! Training and evaluation (METHOD.md): the trainable model and its Learner steps, the inputs
//! and the teacher-embedding cache, the MVTec crop batches (`crop_batcher`), the custom learning strategy, and whole runs: `prepare`
//! checks and opens everything, `class_data` builds a class's inputs and caches, `run` trains
//! each class, `session` evaluates it.

pub mod cache;
pub mod class_data;
pub mod crop_batcher;
pub mod inputs;
pub mod interrupt;
pub mod model;
pub mod prepare;
pub mod renderer;
pub mod run;
pub mod session;
pub mod strategy;
pub mod teacher_runner;
