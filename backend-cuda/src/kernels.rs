//! The CUDA C sources of the backend's kernels (`backend-cuda/kernels/`), and how they are
//! assembled for a compiler: [`PRELUDE`] (`common.cuh`, the rules every kernel follows) followed
//! by one source file. NVRTC compiles them for the GPU (`driver.rs`, cached per device) and for
//! the compile-only CI test; the CUDA emulator (`tests/cuda-emu`) compiles the same text as C++.

/// `kernels/common.cuh`: types, BF16 conversions, warp and block reductions.
pub const PRELUDE: &str = include_str!("../kernels/common.cuh");

/// One kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `backend-cuda/kernels/`.
    pub file: &'static str,
    /// Its text (without the prelude).
    pub text: &'static str,
}

macro_rules! sources {
    ($($file:literal),* $(,)?) => {
        &[$(KernelSource { file: $file, text: include_str!(concat!("../kernels/", $file)) }),*]
    };
}

/// Every kernel source, one file per op family.
pub const SOURCES: &[KernelSource] = sources![
    "elementwise.cu",
    "layout.cu",
    "reduce.cu",
    "index.cu",
    "pool.cu",
    "weights.cu",
    "attention.cu",
    "fused.cu"
];

impl KernelSource {
    /// The prelude and this file, as one compilation unit.
    pub fn program(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.file, self.text)
    }

    /// Names of the `extern "C" __global__` functions the file defines, in order.
    pub fn kernels(&self) -> Vec<&'static str> {
        kernel_names(self.text)
    }
}

/// Names of the `extern "C" __global__ void NAME(` definitions in `text`.
pub fn kernel_names(text: &str) -> Vec<&str> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        names.push(&after[..end]);
        rest = &after[end..];
    }
    names
}

/// The source file that defines `kernel`, if any.
pub fn source_of(kernel: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.kernels().contains(&kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_one_home_and_the_dsv4_prefix() {
        let mut seen = std::collections::HashSet::new();
        for s in SOURCES {
            for k in s.kernels() {
                assert!(k.starts_with("dsv4_"), "{}: kernel {k} lacks the dsv4_ prefix", s.file);
                assert!(seen.insert(k), "kernel {k} is defined twice");
            }
        }
        assert_eq!(source_of("dsv4_fill_f32").map(|s| s.file), Some("elementwise.cu"));
    }

    #[test]
    fn kernel_names_reads_definitions_only() {
        let text = "extern \"C\" __global__ void dsv4_a(float* x) {}\n// dsv4_b\nextern \"C\" __global__ void dsv4_c_2(int n) {}";
        assert_eq!(kernel_names(text), vec!["dsv4_a", "dsv4_c_2"]);
    }
}
