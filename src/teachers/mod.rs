//! The frozen ImageNet teachers of the method: torchvision resnet152, vgg19 and densenet201,
//! exported to ONNX by `onnx/refresh_teachers.py` and imported into Burn by `build.rs`.
//! Each teacher maps `[N, 3, H, W]` to its 1000 ImageNet logits `[N, 1000]` (METHOD.md).
//!
//! The tiny teachers (`onnx/tiny/`) are small random networks of the same three families that
//! go through exactly the same import path; tests and the CPU demo use them.

pub mod check;
pub mod generated;
pub mod statistics;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use burn::prelude::*;
use burn::tensor::Bytes;
use burn_store::{BurnpackStore, ModuleSnapshot};
use sha2::{Digest, Sha256};

use crate::{Error, Result};
use generated::{BUILT_TEACHERS, BuiltTeacher};
pub use statistics::{StatisticsAccumulator, TeacherStatistics};

/// Width of every teacher's output: the 1000 ImageNet classes.
pub const EMBEDDING_DIM: usize = 1000;

/// The three teacher architectures, in the reference's order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TeacherFamily {
    /// torchvision resnet152 (tiny: residual bottleneck blocks).
    Resnet,
    /// torchvision vgg19 (tiny: a plain conv stack with max-pool and dropout).
    Vgg,
    /// torchvision densenet201 (tiny: dense blocks with concatenation).
    Densenet,
}

impl TeacherFamily {
    /// All three, in the reference's order.
    pub const ALL: [TeacherFamily; 3] = [Self::Resnet, Self::Vgg, Self::Densenet];
}

/// Full-size ImageNet teachers or the tiny fixture teachers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherSize {
    Full,
    Tiny,
}

/// One teacher: a family at a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TeacherId {
    pub family: TeacherFamily,
    pub size: TeacherSize,
}

impl TeacherId {
    pub fn new(family: TeacherFamily, size: TeacherSize) -> Self {
        Self { family, size }
    }

    /// The export's file stem: `resnet152`, `vgg19`, `densenet201`, `tiny_resnet`, ...
    pub fn name(&self) -> &'static str {
        match (self.size, self.family) {
            (TeacherSize::Full, TeacherFamily::Resnet) => "resnet152",
            (TeacherSize::Full, TeacherFamily::Vgg) => "vgg19",
            (TeacherSize::Full, TeacherFamily::Densenet) => "densenet201",
            (TeacherSize::Tiny, TeacherFamily::Resnet) => "tiny_resnet",
            (TeacherSize::Tiny, TeacherFamily::Vgg) => "tiny_vgg",
            (TeacherSize::Tiny, TeacherFamily::Densenet) => "tiny_densenet",
        }
    }

    /// What the build recorded about this teacher, if it was compiled in.
    pub fn built(&self) -> Option<&'static BuiltTeacher> {
        BUILT_TEACHERS.iter().find(|b| b.name == self.name())
    }
}

impl fmt::Display for TeacherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The commands that bring the real teachers, for every message that needs them.
pub const GET_REAL_TEACHERS: &str = "\
Export the real teachers to ONNX, then rebuild so that build.rs imports them:
    pip install -r onnx/requirements.txt
    python onnx/refresh_teachers.py          # torchvision's ImageNet weights (downloads them)
    cargo build --release                    # with --features cuda or --features wgpu if you use them
Offline, with torchvision's .pth files already on disk:
    python onnx/refresh_teachers.py --weights-dir DIR
For a quick trial without them, use the tiny teachers (--tiny-teachers).";

/// A generated network of any of the six teachers.
enum TeacherNet {
    TinyResnet(generated::tiny_resnet::Model),
    TinyVgg(generated::tiny_vgg::Model),
    TinyDensenet(generated::tiny_densenet::Model),
    #[cfg(mtad_teacher_resnet152)]
    Resnet152(generated::resnet152::Model),
    #[cfg(mtad_teacher_vgg19)]
    Vgg19(generated::vgg19::Model),
    #[cfg(mtad_teacher_densenet201)]
    Densenet201(generated::densenet201::Model),
}

/// Runs `$body` with `$net` bound to the generated model, whichever it is.
macro_rules! with_net {
    ($self:expr, $net:ident => $body:expr) => {
        match $self {
            TeacherNet::TinyResnet($net) => $body,
            TeacherNet::TinyVgg($net) => $body,
            TeacherNet::TinyDensenet($net) => $body,
            #[cfg(mtad_teacher_resnet152)]
            TeacherNet::Resnet152($net) => $body,
            #[cfg(mtad_teacher_vgg19)]
            TeacherNet::Vgg19($net) => $body,
            #[cfg(mtad_teacher_densenet201)]
            TeacherNet::Densenet201($net) => $body,
        }
    };
}

impl TeacherNet {
    /// The untrained network, or `None` when this teacher was not compiled in.
    fn new(id: TeacherId, device: &Device) -> Option<Self> {
        Some(match (id.size, id.family) {
            (TeacherSize::Tiny, TeacherFamily::Resnet) => {
                Self::TinyResnet(generated::tiny_resnet::Model::new(device))
            }
            (TeacherSize::Tiny, TeacherFamily::Vgg) => {
                Self::TinyVgg(generated::tiny_vgg::Model::new(device))
            }
            (TeacherSize::Tiny, TeacherFamily::Densenet) => {
                Self::TinyDensenet(generated::tiny_densenet::Model::new(device))
            }
            #[cfg(mtad_teacher_resnet152)]
            (TeacherSize::Full, TeacherFamily::Resnet) => {
                Self::Resnet152(generated::resnet152::Model::new(device))
            }
            #[cfg(mtad_teacher_vgg19)]
            (TeacherSize::Full, TeacherFamily::Vgg) => {
                Self::Vgg19(generated::vgg19::Model::new(device))
            }
            #[cfg(mtad_teacher_densenet201)]
            (TeacherSize::Full, TeacherFamily::Densenet) => {
                Self::Densenet201(generated::densenet201::Model::new(device))
            }
            #[allow(unreachable_patterns)] // reachable unless all three real teachers are built
            _ => return None,
        })
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        with_net!(self, net => net.forward(input))
    }

    fn load(&mut self, store: &mut BurnpackStore) -> std::result::Result<(), String> {
        let applied = with_net!(self, net => net.load_from(store)).map_err(|e| e.to_string())?;
        if !applied.errors.is_empty() || !applied.missing.is_empty() {
            return Err(format!(
                "the weights do not fit the network: {} errors, {} tensors missing (first: {:?})",
                applied.errors.len(),
                applied.missing.len(),
                applied.missing.first().map(|m| &m.0)
            ));
        }
        Ok(())
    }
}

/// Where teacher weights come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WeightsLocation {
    /// The weights this binary's build wrote (full-size) or embedded (tiny).
    #[default]
    Build,
    /// `<DIR>/<name>.bpk` for each teacher, e.g. a copy of the build's files on another machine.
    Dir(PathBuf),
}

/// One frozen teacher with its verified weights.
pub struct Teacher {
    id: TeacherId,
    net: TeacherNet,
    built: &'static BuiltTeacher,
}

impl Teacher {
    /// Builds the network and loads its weights, checking them against the build's sha256.
    pub fn load(id: TeacherId, weights: &WeightsLocation, device: &Device) -> Result<Self> {
        let teacher_error = |message: String| Error::Teacher {
            name: id.name().to_string(),
            message,
        };
        let (Some(built), Some(mut net)) = (id.built(), TeacherNet::new(id, device)) else {
            return Err(teacher_error(format!(
                "the real teacher is not compiled into this binary: onnx/{}.onnx did not exist \
                 when it was built.\n{GET_REAL_TEACHERS}",
                id.name()
            )));
        };
        if let Some(listed) = built.listed_sha256
            && listed != built.onnx_sha256
        {
            return Err(teacher_error(format!(
                "the ONNX export compiled in (sha256 {}) is not the one teachers.json lists \
                 (sha256 {listed}): re-run onnx/refresh_teachers.py and rebuild",
                built.onnx_sha256
            )));
        }
        let (bytes, origin) = match (weights, id.size) {
            (WeightsLocation::Build, TeacherSize::Tiny) => {
                (tiny_weights(id.family).to_vec(), "embedded".to_string())
            }
            (WeightsLocation::Build, TeacherSize::Full) => {
                let path = PathBuf::from(built.bpk_file);
                (read_weights(&path)?, path.display().to_string())
            }
            (WeightsLocation::Dir(dir), _) => {
                let path = dir.join(format!("{}.bpk", id.name()));
                (read_weights(&path)?, path.display().to_string())
            }
        };
        verify_weights(&bytes, built).map_err(|m| teacher_error(format!("{origin}: {m}")))?;
        let mut store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(bytes)));
        net.load(&mut store)
            .map_err(|m| teacher_error(format!("{origin}: {m}")))?;
        Ok(Self { id, net, built })
    }

    pub fn id(&self) -> TeacherId {
        self.id
    }

    /// sha256 of the ONNX export this teacher was imported from: its identity in caches and
    /// artifacts.
    pub fn sha256(&self) -> &'static str {
        self.built.onnx_sha256
    }

    /// `[N, 3, H, W]` -> logits `[N, 1000]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        self.net.forward(input)
    }
}

fn tiny_weights(family: TeacherFamily) -> &'static [u8] {
    match family {
        TeacherFamily::Resnet => generated::TINY_RESNET_BPK,
        TeacherFamily::Vgg => generated::TINY_VGG_BPK,
        TeacherFamily::Densenet => generated::TINY_DENSENET_BPK,
    }
}

fn read_weights(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::invalid_file(
                path,
                format!(
                    "teacher weights not found. They are written by `cargo build` next to the \
                     generated code; point --teacher-weights to a folder holding <name>.bpk \
                     files, or rebuild.\n{GET_REAL_TEACHERS}"
                ),
            )
        } else {
            Error::io(path, e)
        }
    })
}

fn verify_weights(bytes: &[u8], built: &BuiltTeacher) -> std::result::Result<(), String> {
    if bytes.len() as u64 != built.bpk_len {
        return Err(format!(
            "the weights file has {} bytes but the teacher compiled in expects {}{}",
            bytes.len(),
            built.bpk_len,
            if (bytes.len() as u64) < built.bpk_len {
                " (truncated?)"
            } else {
                ""
            }
        ));
    }
    let sha = hex(&Sha256::digest(bytes));
    if sha != built.bpk_sha256 {
        return Err(format!(
            "the weights file's sha256 is {sha} but the teacher compiled in expects {}: these \
             weights belong to another export. Rebuild, or point --teacher-weights to the \
             matching files",
            built.bpk_sha256
        ));
    }
    Ok(())
}

/// Lower-case hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The teachers of one run: one, two or three families at one size.
pub struct TeacherEnsemble {
    teachers: Vec<Teacher>,
}

impl TeacherEnsemble {
    /// Loads the given families (in the reference's order) at `size`.
    pub fn load(
        size: TeacherSize,
        families: &[TeacherFamily],
        weights: &WeightsLocation,
        device: &Device,
    ) -> Result<Self> {
        if families.is_empty() {
            return Err(Error::InvalidArgument(
                "a teacher ensemble needs at least one teacher".to_string(),
            ));
        }
        let teachers = TeacherFamily::ALL
            .iter()
            .filter(|f| families.contains(f))
            .map(|&family| Teacher::load(TeacherId::new(family, size), weights, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { teachers })
    }

    pub fn teachers(&self) -> &[Teacher] {
        &self.teachers
    }

    pub fn len(&self) -> usize {
        self.teachers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teachers.is_empty()
    }

    /// The teachers' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.teachers.iter().map(|t| t.id.name()).collect()
    }

    /// The teachers' ONNX sha256s, in order.
    pub fn sha256s(&self) -> Vec<&'static str> {
        self.teachers.iter().map(Teacher::sha256).collect()
    }

    /// Every teacher's logits for one batch: `[N, 3, H, W]` -> one `[N, 1000]` per teacher.
    pub fn forward(&self, input: Tensor<4>) -> Vec<Tensor<2>> {
        self.teachers
            .iter()
            .map(|t| t.forward(input.clone()))
            .collect()
    }

    /// The per-dimension mean and unbiased std of every teacher's logits over `batches`, in one
    /// streaming pass (METHOD.md, teacher normalisation).
    pub fn statistics<I>(&self, batches: I) -> Result<TeacherStatistics>
    where
        I: IntoIterator<Item = Result<Tensor<4>>>,
    {
        let mut accumulator = StatisticsAccumulator::new(self.len(), EMBEDDING_DIM);
        for batch in batches {
            accumulator.update(&self.forward(batch?))?;
        }
        accumulator.finish(
            self.names().iter().map(|s| s.to_string()).collect(),
            self.sha256s().iter().map(|s| s.to_string()).collect(),
        )
    }
}

/// Which teachers a run distils from.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum TeacherChoice {
    /// resnet152, vgg19 and densenet201 with the learned softmax weighting (the method).
    #[default]
    All,
    /// resnet152 alone, no weighting (the reference's single-teacher ablation).
    Resnet152,
    /// No teacher: student and decoder form an autoencoder scored by AS_rec (ablation).
    None,
}

impl TeacherChoice {
    pub fn families(self) -> Vec<TeacherFamily> {
        match self {
            Self::All => TeacherFamily::ALL.to_vec(),
            Self::Resnet152 => vec![TeacherFamily::Resnet],
            Self::None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_exports() {
        assert_eq!(
            TeacherId::new(TeacherFamily::Densenet, TeacherSize::Full).name(),
            "densenet201"
        );
        assert_eq!(
            TeacherId::new(TeacherFamily::Vgg, TeacherSize::Tiny).name(),
            "tiny_vgg"
        );
    }

    #[test]
    fn tiny_teachers_are_always_built() {
        for family in TeacherFamily::ALL {
            let id = TeacherId::new(family, TeacherSize::Tiny);
            let built = id.built().expect("tiny teachers are always imported");
            assert_eq!(built.bpk_len as usize, tiny_weights(family).len());
        }
    }

    #[test]
    fn truncated_and_altered_weights_are_refused() {
        let id = TeacherId::new(TeacherFamily::Resnet, TeacherSize::Tiny);
        let built = id.built().unwrap();
        let good = tiny_weights(id.family);
        assert!(verify_weights(good, built).is_ok());
        let err = verify_weights(&good[..good.len() - 10], built).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let mut altered = good.to_vec();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        let err = verify_weights(&altered, built).unwrap_err();
        assert!(err.contains("sha256"), "{err}");
    }

    #[test]
    fn an_empty_ensemble_is_an_error() {
        let device = Device::flex();
        let err = TeacherEnsemble::load(TeacherSize::Tiny, &[], &WeightsLocation::Build, &device)
            .err()
            .unwrap();
        assert!(err.to_string().contains("at least one"));
    }
}
