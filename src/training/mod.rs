//! Training: the teacher-embedding cache (more to come: the Learner step and strategy).

pub mod cache;
