//! Using a trained run: rescoring it (`infer`), the multi-student ensemble (`ensemble`), and
//! scoring new images with decisions and heatmaps (`detect`).

pub mod detect;
pub mod ensemble;
pub mod infer;
