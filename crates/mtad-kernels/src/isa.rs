//! Which instruction sets the kernels use: detected at run time and capped by the environment
//! variable `MTAD_CPU_CAPABILITY` (`avx512`, `avx2` or `default` for the portable code), the
//! counterpart of PyTorch's `ATEN_CPU_CAPABILITY`, so that both sides of a comparison can be
//! held to the same instruction set on one machine. The matrix products (`gemm`) keep their own
//! run-time dispatch.

use std::sync::OnceLock;

/// An instruction-set level of the kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    /// Portable Rust (what an Arm machine runs).
    Default,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 (foundation).
    Avx512,
}

impl Capability {
    pub fn name(self) -> &'static str {
        match self {
            Capability::Default => "default",
            Capability::Avx2 => "avx2",
            Capability::Avx512 => "avx512",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "default" | "scalar" | "portable" => Some(Capability::Default),
            "avx2" => Some(Capability::Avx2),
            "avx512" | "avx512f" => Some(Capability::Avx512),
            _ => None,
        }
    }
}

/// What this CPU offers the kernels.
pub fn detected() -> Capability {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Capability::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Capability::Avx2;
        }
    }
    Capability::Default
}

/// What the kernels use: [`detected`], capped by `MTAD_CPU_CAPABILITY` (read once; a value
/// that is not a level is ignored).
pub fn capability() -> Capability {
    static CHOSEN: OnceLock<Capability> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let cap = std::env::var("MTAD_CPU_CAPABILITY")
            .ok()
            .and_then(|v| Capability::parse(&v));
        cap.map_or(detected(), |c| c.min(detected()))
    })
}

/// The CPU's model name (Linux's `/proc/cpuinfo`), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// One line for benchmark headers: the CPU and the kernels' instruction set.
pub fn describe() -> String {
    let (used, found) = (capability(), detected());
    format!(
        "{} ({}); mtad kernels: {}{}",
        cpu_model(),
        std::env::consts::ARCH,
        used.name(),
        if used == found {
            String::new()
        } else {
            format!(
                " (capped by MTAD_CPU_CAPABILITY; the CPU has {})",
                found.name()
            )
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Capability::parse("AVX2"), Some(Capability::Avx2));
        assert_eq!(Capability::parse("avx512"), Some(Capability::Avx512));
        assert_eq!(Capability::parse("default"), Some(Capability::Default));
        assert_eq!(Capability::parse("sse"), None);
        assert!(Capability::Default < Capability::Avx2 && Capability::Avx2 < Capability::Avx512);
        assert!(capability() <= detected());
        assert!(describe().contains(capability().name()));
    }
}
