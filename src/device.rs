//! `--device auto|cpu|cuda[:N]|wgpu[:N]` -> a Burn [`Device`]; `mtad devices` lists them.
//!
//! The CPU backend (Burn's `flex`) is always compiled in; `cuda` and `wgpu` are cargo features.
//! `auto` takes the best backend compiled in that actually has a GPU, and never prefers a
//! CPU-emulated wgpu adapter (such as Mesa's lavapipe) over the native CPU backend.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burn::tensor::DeviceType;

use crate::{Error, Result};

/// The backend a user asks for: `auto`, `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best backend compiled in: CUDA, then a wgpu GPU adapter, then the CPU.
    #[default]
    Auto,
    /// Burn's native CPU backend (flex), always available.
    Cpu,
    /// An NVIDIA GPU through CUDA (cargo feature `cuda`): `cuda` is `cuda:0`.
    Cuda(Option<usize>),
    /// A GPU through wgpu: Vulkan, Metal, DirectX (cargo feature `wgpu`). Without an index, the
    /// first discrete, then integrated GPU, else the default adapter; `wgpu:N` is the Nth
    /// adapter `mtad devices` lists.
    Wgpu(Option<usize>),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let (name, index) = match lower.split_once(':') {
            Some((name, index)) => {
                let index = index.parse::<usize>().map_err(|_| {
                    format!("`{text}`: the part after `:` must be a device number, as in cuda:1")
                })?;
                (name, Some(index))
            }
            None => (lower.as_str(), None),
        };
        match (name, index) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", index) => Ok(Self::Cuda(index)),
            ("wgpu", index) => Ok(Self::Wgpu(index)),
            ("auto" | "cpu", Some(_)) => Err(format!("`{text}`: {name} takes no device number")),
            _ => Err(format!(
                "`{text}` is not a device: use auto, cpu, cuda, cuda:N, wgpu or wgpu:N \
                 (`mtad devices` lists what this binary can use)"
            )),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Wgpu(None) => f.write_str("wgpu"),
            Self::Cuda(Some(i)) => write!(f, "cuda:{i}"),
            Self::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

/// A device together with a human-readable description of what was chosen.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
}

impl fmt::Display for SelectedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// The backends this binary was compiled with, for messages and `--help`.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut names = vec!["cpu"];
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    names
}

/// Maps the user's choice to a device, or says why it cannot be had.
pub fn select_device(choice: DeviceChoice) -> Result<SelectedDevice> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Cuda(index) => cuda(index.unwrap_or(0)),
        DeviceChoice::Wgpu(None) => wgpu(),
        DeviceChoice::Wgpu(Some(index)) => wgpu_index(index),
        DeviceChoice::Auto => Ok(auto()),
    }
}

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        description: format!(
            "cpu (Burn flex backend, {} threads; {})",
            rayon_threads(),
            mtad_kernels::isa::describe()
        ),
    }
}

fn rayon_threads() -> usize {
    rayon::current_num_threads()
}

fn auto() -> SelectedDevice {
    if let Ok(device) = cuda(0) {
        return device;
    }
    #[cfg(feature = "wgpu")]
    for kind in [DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0)] {
        if let Ok(device) = wgpu_kind(kind.clone()) {
            return device;
        }
    }
    cpu()
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<SelectedDevice> {
    let count = Device::enumerate(DeviceType::Cuda).len();
    if index >= count {
        return Err(Error::Device(format!(
            "cuda:{index}: this machine has {count} CUDA device(s) (numbered from 0); \
             `mtad devices` lists them"
        )));
    }
    let device = Device::cuda(index);
    probe(&device)
        .map_err(|e| Error::Device(format!("cuda:{index}: no usable CUDA device: {e}")))?;
    let name = identity_name(&device);
    Ok(SelectedDevice {
        device,
        description: format!("cuda:{index} ({name})"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<SelectedDevice> {
    Err(not_compiled("cuda"))
}

/// What a GPU calls itself, or `unnamed`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn identity_name(device: &Device) -> String {
    device
        .identity()
        .map(|identity| identity.name)
        .unwrap_or_else(|| "unnamed".to_string())
}

/// `wgpu:N`: the Nth wgpu adapter, in the order `mtad devices` lists them.
#[cfg(feature = "wgpu")]
fn wgpu_index(index: usize) -> Result<SelectedDevice> {
    let adapters = Device::enumerate(DeviceType::Wgpu).into_vec();
    let Some(device) = adapters.get(index).cloned() else {
        return Err(Error::Device(format!(
            "wgpu:{index}: this machine has {} wgpu adapter(s) (numbered from 0); \
             `mtad devices` lists them",
            adapters.len()
        )));
    };
    probe(&device).map_err(|e| Error::Device(format!("wgpu:{index}: {e}")))?;
    let description = format!(
        "wgpu:{index} ({}, {})",
        identity_name(&device),
        wgpu_kind_name(&device)
    );
    Ok(SelectedDevice {
        device,
        description,
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_index(_index: usize) -> Result<SelectedDevice> {
    Err(not_compiled("wgpu"))
}

/// The adapter kind of a wgpu device, in words (`discrete GPU`, `CPU-emulated`, ...).
#[cfg(feature = "wgpu")]
fn wgpu_kind_name(device: &Device) -> &'static str {
    // Burn's device handle names its adapter kind only in its Debug form.
    let debug = format!("{device:?}");
    if debug.contains("DiscreteGpu") {
        "discrete GPU"
    } else if debug.contains("IntegratedGpu") {
        "integrated GPU"
    } else if debug.contains("VirtualGpu") {
        "virtual GPU"
    } else if debug.contains("Cpu") {
        "CPU-emulated (software), slower than --device cpu"
    } else {
        "other adapter"
    }
}

/// One device this binary can use, for `mtad devices`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListedDevice {
    /// What `--device` takes to choose it.
    pub choice: String,
    pub backend: &'static str,
    /// The adapter's or the CPU's name.
    pub name: String,
    /// `cpu`, `discrete GPU`, `integrated GPU`, `CPU-emulated ...`.
    pub kind: String,
}

/// Every device this binary can use, each opened once to read its name: the CPU first, then
/// the CUDA devices and the wgpu adapters compiled in. Backends that fail to start are skipped.
pub fn list_devices() -> Vec<ListedDevice> {
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_mut))]
    let mut out = vec![ListedDevice {
        choice: "cpu".into(),
        backend: "flex",
        name: mtad_kernels::isa::cpu_model(),
        kind: format!(
            "cpu ({} threads; {})",
            rayon_threads(),
            mtad_kernels::isa::describe()
        ),
    }];
    #[cfg(feature = "cuda")]
    out.extend(listed(DeviceType::Cuda, "cuda", |_| "GPU"));
    #[cfg(feature = "wgpu")]
    out.extend(listed(DeviceType::Wgpu, "wgpu", wgpu_kind_name));
    out
}

/// The devices of one GPU backend, numbered as `--device <backend>:N` takes them.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn listed(
    device_type: DeviceType,
    backend: &'static str,
    kind: fn(&Device) -> &'static str,
) -> Vec<ListedDevice> {
    let devices = quietly(|| Device::enumerate(device_type).into_vec()).unwrap_or_default();
    devices
        .into_iter()
        .enumerate()
        .map(|(index, device)| ListedDevice {
            choice: format!("{backend}:{index}"),
            backend,
            name: quietly(|| identity_name(&device)).unwrap_or_else(|| "unusable".into()),
            kind: kind(&device).into(),
        })
        .collect()
}

/// Runs `f`, turning a backend panic into `None` without printing it.
#[allow(dead_code)] // unused without a GPU backend
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    outcome.ok()
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<SelectedDevice> {
    // A GPU adapter first; the default adapter (possibly a CPU-emulated one) only if the user
    // asked for wgpu explicitly and there is no GPU.
    for kind in [DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0)] {
        if let Ok(device) = wgpu_kind(kind) {
            return Ok(device);
        }
    }
    wgpu_kind(DeviceKind::DefaultDevice)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<SelectedDevice> {
    Err(not_compiled("wgpu"))
}

/// A wgpu device of the given adapter kind, initialised now so that failure is an error here.
#[cfg(feature = "wgpu")]
pub fn wgpu_kind(kind: DeviceKind) -> Result<SelectedDevice> {
    let description = format!("wgpu ({kind:?})");
    let device = match Device::wgpu_options().device_kind(kind.clone()).init() {
        Ok(device) => device,
        // Registered earlier in this process: the lazy handle reaches that runtime.
        Err(burn::tensor::wgpu::WgpuInitError::Registration { .. }) => Device::wgpu(kind.clone()),
        Err(e) => return Err(Error::Device(format!("wgpu: no {kind:?} adapter: {e}"))),
    };
    probe(&device).map_err(|e| Error::Device(format!("{description}: {e}")))?;
    Ok(SelectedDevice {
        device,
        description,
    })
}

/// Runs one tiny operation, turning a backend panic (no driver, no adapter) into an error.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn probe(device: &Device) -> std::result::Result<(), String> {
    let device = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(move || {
        let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
        x.sum().into_scalar::<f32>()
    });
    std::panic::set_hook(hook);
    match outcome {
        Ok(sum) if sum == 6.0 => Ok(()),
        Ok(sum) => Err(format!("a test sum gave {sum} instead of 6")),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend failed to start".to_string())),
    }
}

#[allow(dead_code)] // unused when every backend feature is enabled
fn not_compiled(name: &str) -> Error {
    Error::Device(format!(
        "--device {name}: this binary was built without the `{name}` backend. Rebuild with \
         `cargo build --release --features {name}` (compiled in now: {}).",
        compiled_backends().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_computes() {
        let selected = select_device(DeviceChoice::Cpu).unwrap();
        let x = Tensor::<1>::from_floats([1.0, 2.0], &selected.device);
        assert_eq!(x.sum().into_scalar::<f32>(), 3.0);
        assert!(selected.description.starts_with("cpu"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        let err = select_device(DeviceChoice::Cuda(Some(1)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_names_the_feature() {
        let err = select_device(DeviceChoice::Wgpu(None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features wgpu"), "{err}");
    }

    #[test]
    fn device_choices_parse_with_and_without_a_number() {
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(None)),
            ("cuda:1", DeviceChoice::Cuda(Some(1))),
            ("wgpu", DeviceChoice::Wgpu(None)),
            ("wgpu:0", DeviceChoice::Wgpu(Some(0))),
        ] {
            let got: DeviceChoice = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<DeviceChoice>().unwrap(), want);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cpu:0", "wgpu:-1", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains(bad) && err.contains("device"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_device_list_starts_with_the_cpu() {
        let listed = list_devices();
        assert_eq!(listed[0].choice, "cpu");
        assert!(listed.iter().all(|d| !d.name.is_empty()));
    }

    #[test]
    fn a_device_number_past_the_last_is_an_error() {
        if cfg!(feature = "wgpu") {
            let err = select_device(DeviceChoice::Wgpu(Some(99)))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("wgpu:99") && err.contains("mtad devices"),
                "{err}"
            );
        }
    }

    #[test]
    fn auto_never_picks_a_cpu_emulated_wgpu_adapter() {
        // On a machine without a GPU (CI) auto must be the native CPU backend, even when the
        // wgpu feature is on and a software Vulkan driver is installed.
        if std::env::var_os("MTAD_EXPECT_NO_GPU").is_some() {
            let selected = select_device(DeviceChoice::Auto).unwrap();
            assert!(selected.description.starts_with("cpu"), "{selected}");
        } else {
            let selected = select_device(DeviceChoice::Auto).unwrap();
            assert!(!selected.description.contains("Cpu"), "{selected}");
        }
    }
}
