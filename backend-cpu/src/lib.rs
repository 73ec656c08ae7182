//! The reference CPU backend. Activations are contiguous row-major f32 buffers shared through
//! `Arc` (reshape is free, every op returns a new tensor). Weights stay in their stored form
//! (BF16/F16/F32, FP8 blocks, FP4 groups), as views of the checkpoint's bytes (memory-mapped or
//! resident: `WeightMemory`), and are decoded in registers inside the matrix-vector kernels
//! (`kernels::weights`, SIMD picked at run time: `kernels::Isa`), so a weight is never held twice
//! (`DSV4_CPU_DEQUANTIZE=1` dequantises at load instead, as a reference). Prefill GEMMs decode
//! row blocks and multiply them with an AVX-512 or AVX2 kernel (`kernels::f32_gemm`) or the `gemm` crate
//! (`gemm.rs`), or, on BF16 values with AVX512-BF16 (not by default on Intel CPUs:
//! `DSV4_CPU_BF16_PRODUCTS`), `kernels::bf16_gemm`. Large matrix,
//! elementwise and row-wise work is spread over one process-wide spinning thread team (`threads`,
//! `par`) and stays on the calling thread when it is too small to pay for the hand-off. Sparse
//! attention and indexer selection have fused kernels (`fused.rs`, SIMD in `kernels::attn`) that
//! read the paged decoding state's pools (`pool.rs`) in place. `machine` measures the machine's
//! limits for `dsv4 bench`.
//!
//! This backend is what the others are judged against: it favours plain, checkable code.

mod fused;
mod gemm;
pub mod heap;
mod host_memory;
pub mod kernels;
pub mod machine;
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
