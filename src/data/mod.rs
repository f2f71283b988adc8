//! Datasets and the exact preprocessing of the reference method (see `shared/METHOD.md`):
//! MVTec AD and any folder in its layout, one-class CIFAR-10, crops, and the procedural demo set.

pub mod cifar;
pub mod crops;
pub mod demo;
pub mod folder;
pub mod image;
pub mod inspect;
pub mod mvtec;
pub mod pickle;
pub mod transform;

pub use image::FloatImage;
