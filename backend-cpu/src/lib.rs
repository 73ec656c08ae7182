//! The reference CPU backend. Activations are contiguous row-major f32 buffers shared through
//! `Arc` (reshape is free, every op returns a new tensor). Weights stay in their stored
//! element type (BF16/F16/F32) and are widened to f32 block by block inside the GEMM, so a
//! weight is never held twice. GEMMs go through `matrixmultiply` (via ndarray), elementwise
//! and row-wise work is spread over cores with rayon.
//!
//! This backend is what the others are judged against: it favours plain, checkable code.

mod fused;
mod ops;
mod storage;

pub use storage::{CpuIndex, CpuTensor, CpuWeight};

/// The CPU backend. `threads` is informational; rayon's global pool does the work.
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { threads: rayon::current_num_threads() }
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}
