//! Using a trained run: rescoring it (`infer`), the multi-student ensemble (`ensemble`), and
//! scoring new images with decisions, heatmaps and masks (`detect`, its pictures in `pictures`).

pub mod detect;
pub mod ensemble;
pub mod infer;
mod pictures;
