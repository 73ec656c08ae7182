//! The reference CPU backend. Activations are contiguous row-major f32 buffers shared through
//! `Arc` (reshape is free, every op returns a new tensor). Weights stay in their stored form
//! (BF16/F16/F32, FP8 blocks, FP4 groups), as views of the memory-mapped checkpoint, and are
//! dequantised row by row inside the GEMV/GEMM, so a weight is never held twice
//! (`DSV4_CPU_DEQUANTIZE=1` dequantises at load instead, as a reference). GEMMs go through
//! `matrixmultiply` (via ndarray); elementwise and row-wise work is spread over cores with rayon
//! when it is large enough to pay for the hand-off (`par`), and stays on the calling thread otherwise.
//! Sparse attention and indexer selection have fused kernels (`fused.rs`) that read the paged
//! decoding state's pools (`pool.rs`) in place.
//!
//! This backend is what the others are judged against: it favours plain, checkable code.

mod fused;
mod gemm;
pub mod kernels;
mod moe;
mod ops;
mod par;
mod pool;
mod storage;
pub mod threads;

pub use pool::CpuPool;
pub use storage::{CpuIndex, CpuTensor, CpuWeight};

/// The CPU backend. Its parallel work runs on the process-wide thread team ([`threads`]).
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { threads: threads::size() }
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
