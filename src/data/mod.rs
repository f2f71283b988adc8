//! Datasets and the exact preprocessing of the reference method (see `docs/METHOD.md`):
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

/// The kinds of dataset the tool reads.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// MVTec AD: `<category>/train/good`, `<category>/test/<good|defect>`,
    /// `<category>/ground_truth/<defect>/*_mask.png`, the 15 categories.
    Mvtec,
    /// One-class CIFAR-10: `cifar-10-batches-py` (or `cifar-10-batches-bin`) or its parent.
    Cifar10,
    /// Your own data in the MVTec layout, any category and defect names, masks optional.
    Folder,
}

impl DatasetKind {
    /// The name the reference's tables use (`eval_mvtec.csv`, `eval_cifar10.csv`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mvtec => "mvtec",
            Self::Cifar10 => "cifar10",
            Self::Folder => "folder",
        }
    }
}
