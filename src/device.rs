//! `--device auto|cpu|cuda|wgpu` -> a Burn [`Device`].
//!
//! The CPU backend (Burn's `flex`) is always compiled in; `cuda` and `wgpu` are cargo features.
//! `auto` takes the best backend compiled in that actually has a GPU, and never prefers a
//! CPU-emulated wgpu adapter (such as Mesa's lavapipe) over the native CPU backend.

use std::fmt;

use burn::prelude::*;

use crate::{Error, Result};

/// The backend a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The best backend compiled in: CUDA, then a wgpu GPU adapter, then the CPU.
    #[default]
    Auto,
    /// Burn's native CPU backend (flex), always available.
    Cpu,
    /// An NVIDIA GPU through CUDA (cargo feature `cuda`).
    Cuda,
    /// Any GPU through wgpu: Vulkan, Metal, DirectX (cargo feature `wgpu`).
    Wgpu,
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
        DeviceChoice::Cuda => cuda(),
        DeviceChoice::Wgpu => wgpu(),
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
    if let Ok(device) = cuda() {
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
fn cuda() -> Result<SelectedDevice> {
    let device = Device::cuda(0);
    probe(&device).map_err(|e| Error::Device(format!("cuda: no usable CUDA device: {e}")))?;
    Ok(SelectedDevice {
        device,
        description: "cuda:0".to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<SelectedDevice> {
    Err(not_compiled("cuda"))
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
        let err = select_device(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_names_the_feature() {
        let err = select_device(DeviceChoice::Wgpu).unwrap_err().to_string();
        assert!(err.contains("--features wgpu"), "{err}");
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
