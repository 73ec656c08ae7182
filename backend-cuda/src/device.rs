//! What the CUDA backend needs from a device, as a trait, so that the whole backend (host
//! logic and kernel sources) runs against two implementations:
//!
//! * [`crate::driver::DriverDevice`]: a real GPU through `cudarc` (driver API, NVRTC, cuBLAS),
//!   all resolved at run time;
//! * `dsv4-cuda-emu` (`tests/cuda-emu`): the same kernel sources compiled as C++ for the host and
//!   run by a cooperative thread-block emulator, with GEMMs on the host. It is how CI checks the
//!   kernels' numbers without a GPU.
//!
//! Memory is untyped bytes ([`Device::Buffer`]); kernels receive raw device addresses plus
//! scalars, in the order of the kernel's parameters ([`KernelArg`]). Work is ordered on one
//! stream: `launch`, `gemm` and `upload` may return before the work is done; `download` and
//! `synchronize` wait.

use dsv4_core::error::Result;

/// Grid and block dimensions of one kernel launch (CUDA's `dim3`s) and its dynamic shared
/// memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// One-dimensional grid of `blocks` blocks of `threads` threads, no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_bytes: 0 }
    }

    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }
}

/// One kernel argument. Buffers are passed as device addresses (`base + byte offset`), which is
/// what a `T*` parameter of a kernel receives; scalars by value.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg<'a, B> {
    /// A buffer the kernel reads (`const T*`), at a byte offset.
    In(&'a B, usize),
    /// A buffer the kernel writes (`T*`), at a byte offset. Device memory is written through a
    /// shared reference, as in CUDA: the backend only passes buffers it just allocated or owns
    /// mutably (pools).
    Out(&'a B, usize),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

impl<B> KernelArg<'_, B> {
    /// A count or extent (`long long` parameter). Host sizes come from allocations, so they
    /// fit in `i64`.
    pub fn count(v: usize) -> Self {
        KernelArg::I64(v as i64)
    }
}

/// Dynamic shared memory a launch may ask for without the per-kernel opt-in: CUDA allows
/// 48 KiB per block for static and dynamic shared memory together, and the kernels' own static
/// `__shared__` arrays take at most 1 KiB of it (the largest is a `float[32]` scratch).
pub const DYNAMIC_SHARED_BUDGET: usize = 47 * 1024;

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    F32,
    /// BF16 storage, widened to f32 for the products (cuBLAS `CUDA_R_16BF` with
    /// `CUBLAS_COMPUTE_32F`).
    Bf16,
}

impl GemmType {
    pub fn bytes(self) -> usize {
        match self {
            GemmType::F32 => 4,
            GemmType::Bf16 => 2,
        }
    }
}

/// A batched, strided, row-major GEMM with f32 accumulation and an f32 result:
/// for every batch `i < batch`, `C_i[m, n] = Σ_k A_i[m, k] · B_i[k, n]` where
/// `A_i` is `[m, k]` at element `a_offset + i·stride_a` of `a`, `B_i` is `[k, n]`
/// (or `[n, k]` read transposed when `transpose_b`) at `b_offset + i·stride_b` of `b`, and
/// `C_i` `[m, n]` at `c_offset + i·stride_c` of `c`. Strides and offsets are in elements of the
/// operand's type; a stride of 0 shares one matrix across the batch. Leading dimensions are the
/// dense ones (`k` for A, `n` or `k` for B, `n` for C). C is overwritten (beta = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub transpose_b: bool,
    pub a_type: GemmType,
    pub b_type: GemmType,
    pub a_offset: usize,
    pub b_offset: usize,
    pub c_offset: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

/// A device: memory, one stream of kernel launches and GEMMs.
///
/// Errors are [`dsv4_core::Error::Backend`] with the backend name `cuda` and the driver's or
/// the emulator's message.
pub trait Device: Send + Sync + 'static {
    /// A device allocation of bytes, freed on drop.
    type Buffer: Send + Sync;

    /// Device name and memory, for `dsv4 devices` and `Backend::describe`.
    fn describe(&self) -> String;

    /// Bytes of device memory free now, when the device can tell.
    fn free_memory(&self) -> Option<usize>;

    /// A buffer of `bytes` bytes, every byte zero. `bytes` may be 0.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer>;

    /// A buffer of `bytes` bytes whose contents are unspecified: the caller writes every byte
    /// before any is read (an op's output that its kernel writes whole). Saves the zeroing
    /// pass. The emulator fills it with NaN bytes so that a read before the write shows.
    fn alloc_uninit(&self, bytes: usize) -> Result<Self::Buffer>;

    /// Size of a buffer in bytes.
    fn len(&self, buffer: &Self::Buffer) -> usize;

    /// A new buffer holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buffer>;

    /// Copies `out.len()` bytes from `buffer` at byte `offset` into `out`, after all queued work.
    fn download(&self, buffer: &Self::Buffer, offset: usize, out: &mut [u8]) -> Result<()>;

    /// Copies `bytes` bytes from `src` at `src_offset` to `dst` at `dst_offset`, in stream order.
    fn copy(
        &self,
        src: &Self::Buffer,
        src_offset: usize,
        dst: &Self::Buffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()>;

    /// Launches kernel `kernel` (an `extern "C" __global__` function of
    /// [`crate::kernels::SOURCES`]) with `args` in the order of its parameters.
    fn launch(&self, kernel: &'static str, config: LaunchConfig, args: &[KernelArg<'_, Self::Buffer>]) -> Result<()>;

    /// Runs `g` on `a`, `b` (read) and `c` (written); see [`Gemm`].
    fn gemm(&self, g: &Gemm, a: &Self::Buffer, b: &Self::Buffer, c: &Self::Buffer) -> Result<()>;

    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
}

/// A shared device is the device: the ranks of a multi-device run share theirs between the
/// rank's backend and its communicator (`crate::comm`), which enqueue on the same stream.
impl<D: Device> Device for std::sync::Arc<D> {
    type Buffer = D::Buffer;

    fn describe(&self) -> String {
        (**self).describe()
    }
    fn free_memory(&self) -> Option<usize> {
        (**self).free_memory()
    }
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer> {
        (**self).alloc_zeroed(bytes)
    }
    fn alloc_uninit(&self, bytes: usize) -> Result<Self::Buffer> {
        (**self).alloc_uninit(bytes)
    }
    fn len(&self, buffer: &Self::Buffer) -> usize {
        (**self).len(buffer)
    }
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buffer> {
        (**self).upload(bytes)
    }
    fn download(&self, buffer: &Self::Buffer, offset: usize, out: &mut [u8]) -> Result<()> {
        (**self).download(buffer, offset, out)
    }
    fn copy(
        &self,
        src: &Self::Buffer,
        src_offset: usize,
        dst: &Self::Buffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        (**self).copy(src, src_offset, dst, dst_offset, bytes)
    }
    fn launch(&self, kernel: &'static str, config: LaunchConfig, args: &[KernelArg<'_, Self::Buffer>]) -> Result<()> {
        (**self).launch(kernel, config, args)
    }
    fn gemm(&self, g: &Gemm, a: &Self::Buffer, b: &Self::Buffer, c: &Self::Buffer) -> Result<()> {
        (**self).gemm(g, a, b, c)
    }
    fn synchronize(&self) -> Result<()> {
        (**self).synchronize()
    }
}
