//! dsv4's CUDA emulator: a [`dsv4_backend_cuda::Device`] that runs the CUDA backend's real
//! kernel sources on the host CPU, so that the backend (host logic and kernels) is tested
//! without a GPU.
//!
//! * Kernels: build.rs compiles every source of `dsv4_backend_cuda::kernels::SOURCES` — the
//!   exact program text NVRTC gets — as C++17 against `cpp/cuda_shim.h`, which provides exactly
//!   what `backend-cuda/kernels/common.cuh` lets a kernel use. A launch runs its blocks one
//!   after another on the calling thread, the threads of a block as cooperatively scheduled
//!   fibers (`cpp/runtime.cpp`): `__syncthreads` and `__shfl_xor_sync` are real barriers, and
//!   their misuse (a divergent barrier, a shuffle with lanes gone, a deadlock) is an error, not
//!   a hang.
//! * Launches are checked as strictly as a launch on a GPU would need to be right
//!   (`launch.rs`): kernel name, argument count and kinds against the kernel's C++ parameter
//!   types (`In` only to `const T*`, `Out` only to `T*`, ...), buffer offsets, launch limits,
//!   and writes outside the buffers passed.
//! * Memory (`buffer.rs`): host allocations aligned to 256 bytes between guard zones. GEMMs run
//!   on the host (`gemm.rs`), range-checked.
//! * A buffer belongs to the device that allocated it; using it on another is an error.
//! * The device is one stream: every operation runs to completion on the calling thread while
//!   holding the device's stream lock, so work from several threads on one device is
//!   serialised as on a CUDA stream, and different devices run in parallel.
//!
//! [`EmulatedDevice::launch_count`] tells tests which kernels ran.
//!
//! What it does not catch: data races between threads of a block (fibers interleave only at
//! barriers, so a missing `__syncthreads` between a write and another thread's read may still
//! give the right numbers here), reads outside a buffer (they see the guards' NaNs, or crash
//! further away), and differences of the GPU's `expf`/`logf`/`log1pf` from the host's in the
//! last ulp. Kernels are compiled with `-ffp-contract=off`, matching NVRTC's `--fmad=false`.
//! Each CUDA thread has a 64 KiB stack; a kernel needing more crashes on the guard page.

mod buffer;
pub mod collective;
mod ffi;
mod gemm;
mod launch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use dsv4_backend_cuda::{Device, Gemm, KernelArg, LaunchConfig};
use dsv4_core::error::{Error, Result};

pub use buffer::{EmuBuffer, ALIGN};
pub use collective::EmuComm;
pub use ffi::{kernel, kernels, KernelInfo, ParamInfo, ParamKind};

/// The emulated CUDA device. Cheap to create; every instance is independent, and a buffer of one
/// cannot be used on another (as with two CUDA devices without peer access).
#[derive(Debug)]
pub struct EmulatedDevice {
    /// Unique in the process; buffers carry it.
    id: u64,
    /// Held for the duration of every operation: the device's one stream.
    stream: Mutex<()>,
    /// Successful launches per kernel name.
    launches: Mutex<HashMap<&'static str, u64>>,
    /// Threads of each block start last-first ([`EmulatedDevice::reverse_thread_order`]).
    reverse: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves nothing half-done here (buffers are raw memory).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn range_err(what: &str, offset: usize, bytes: usize, len: usize) -> Error {
    Error::backend(
        "cuda",
        format!("emulated {what}: {bytes} byte(s) at offset {offset} run past the end of a buffer of {len} bytes"),
    )
}

fn in_range(offset: usize, bytes: usize, len: usize) -> bool {
    offset.checked_add(bytes).is_some_and(|end| end <= len)
}

impl Default for EmulatedDevice {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        EmulatedDevice {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream: Mutex::default(),
            launches: Mutex::default(),
            reverse: false,
        }
    }
}

impl EmulatedDevice {
    pub fn new() -> EmulatedDevice {
        EmulatedDevice::default()
    }

    /// A device whose launches start each block's threads in reverse order (the last thread
    /// first). The emulator switches threads only at barriers, so a kernel that reads what
    /// another thread of its block writes without a `__syncthreads` between them (a race on a
    /// GPU) sees the write in one order and not in the other: running a suite both ways exposes
    /// it.
    pub fn reverse_thread_order() -> EmulatedDevice {
        EmulatedDevice { reverse: true, ..EmulatedDevice::default() }
    }

    /// `buffers` were all allocated by this device.
    fn owns<'b>(&self, what: impl FnOnce() -> String, buffers: impl IntoIterator<Item = &'b EmuBuffer>) -> Result<()> {
        match buffers.into_iter().find(|b| b.device() != self.id) {
            None => Ok(()),
            Some(b) => Err(Error::backend(
                "cuda",
                format!(
                    "emulated {}: a buffer of {} bytes of another device (emulated device {}, this is {})",
                    what(),
                    b.len(),
                    b.device(),
                    self.id
                ),
            )),
        }
    }

    /// Reads the byte ranges `(offset, bytes)` of `buffer` as one operation in stream order
    /// (like [`Device::download`], with its checks: the buffer is this device's, every range is
    /// inside it); nothing is read unless every range is valid.
    pub(crate) fn read_ranges(
        &self,
        what: &str,
        buffer: &EmuBuffer,
        ranges: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        self.owns(|| what.into(), [buffer])?;
        let _stream = lock(&self.stream);
        if let Some(&(offset, bytes)) = ranges.iter().find(|&&(o, n)| !in_range(o, n, buffer.len())) {
            return Err(range_err(what, offset, bytes, buffer.len()));
        }
        Ok(ranges
            .iter()
            .map(|&(offset, bytes)| {
                let mut out = vec![0u8; bytes];
                buffer.read_into(offset, &mut out);
                out
            })
            .collect())
    }

    /// Writes each `(offset, bytes)` of `ranges` into `buffer` as one operation in stream order
    /// (with [`Device::copy`]'s checks: the buffer is this device's, every range is inside it);
    /// nothing is written unless every range is valid.
    pub(crate) fn write_ranges(&self, what: &str, buffer: &EmuBuffer, ranges: &[(usize, &[u8])]) -> Result<()> {
        self.owns(|| what.into(), [buffer])?;
        let _stream = lock(&self.stream);
        if let Some(&(offset, bytes)) = ranges.iter().find(|&&(o, b)| !in_range(o, b.len(), buffer.len())) {
            return Err(range_err(what, offset, bytes.len(), buffer.len()));
        }
        for &(offset, bytes) in ranges {
            buffer.write_from(offset, bytes);
        }
        Ok(())
    }

    /// How many launches of `kernel` this device ran successfully.
    pub fn launch_count(&self, kernel: &str) -> u64 {
        lock(&self.launches).get(kernel).copied().unwrap_or(0)
    }

    /// Every kernel this device launched successfully, with its count, sorted by name.
    pub fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = lock(&self.launches).iter().map(|(k, n)| (*k, *n)).collect();
        v.sort();
        v
    }
}

impl Device for EmulatedDevice {
    type Buffer = EmuBuffer;

    fn describe(&self) -> String {
        "dsv4 CUDA emulator on the host CPU (the backend's CUDA C kernels compiled as C++, each block's threads \
         run as fibers; GEMMs on the host)"
            .to_string()
    }

    fn free_memory(&self) -> Option<usize> {
        None
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuffer> {
        EmuBuffer::zeroed(self.id, bytes)
    }

    fn alloc_uninit(&self, bytes: usize) -> Result<EmuBuffer> {
        EmuBuffer::poisoned(self.id, bytes)
    }

    fn len(&self, buffer: &EmuBuffer) -> usize {
        buffer.len()
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuffer> {
        let buf = EmuBuffer::for_overwrite(self.id, bytes.len())?;
        buf.write_from(0, bytes);
        Ok(buf)
    }

    fn download(&self, buffer: &EmuBuffer, offset: usize, out: &mut [u8]) -> Result<()> {
        self.owns(|| "download".into(), [buffer])?;
        let _stream = lock(&self.stream);
        if !in_range(offset, out.len(), buffer.len()) {
            return Err(range_err("download", offset, out.len(), buffer.len()));
        }
        buffer.read_into(offset, out);
        Ok(())
    }

    fn copy(&self, src: &EmuBuffer, src_offset: usize, dst: &EmuBuffer, dst_offset: usize, bytes: usize) -> Result<()> {
        self.owns(|| "copy".into(), [src, dst])?;
        let _stream = lock(&self.stream);
        if !in_range(src_offset, bytes, src.len()) {
            return Err(range_err("copy (source)", src_offset, bytes, src.len()));
        }
        if !in_range(dst_offset, bytes, dst.len()) {
            return Err(range_err("copy (destination)", dst_offset, bytes, dst.len()));
        }
        if bytes == 0 {
            return Ok(());
        }
        if src.same(dst) && src_offset < dst_offset + bytes && dst_offset < src_offset + bytes {
            return Err(Error::backend(
                "cuda",
                format!(
                    "emulated copy: source [{src_offset}, {}) and destination [{dst_offset}, {}) overlap in one \
                     buffer (cuMemcpy's result is undefined then)",
                    src_offset + bytes,
                    dst_offset + bytes
                ),
            ));
        }
        // SAFETY: both ranges are inside their buffers (checked above) and do not overlap (a
        // different allocation, or disjoint ranges of the same one); raw pointers only, as
        // device memory is never borrowed.
        unsafe { std::ptr::copy_nonoverlapping(src.addr(src_offset), dst.addr(dst_offset), bytes) };
        Ok(())
    }

    fn launch(&self, kernel: &'static str, config: LaunchConfig, args: &[KernelArg<'_, EmuBuffer>]) -> Result<()> {
        let buffers = args.iter().filter_map(|a| match a {
            KernelArg::In(b, _) | KernelArg::Out(b, _) => Some(*b),
            _ => None,
        });
        self.owns(|| format!("launch of `{kernel}`"), buffers)?;
        let _stream = lock(&self.stream);
        ffi::set_reverse_order(self.reverse);
        launch::launch(kernel, &config, args)?;
        *lock(&self.launches).entry(kernel).or_insert(0) += 1;
        Ok(())
    }

    fn gemm(&self, g: &Gemm, a: &EmuBuffer, b: &EmuBuffer, c: &EmuBuffer) -> Result<()> {
        self.owns(|| "gemm".into(), [a, b, c])?;
        let _stream = lock(&self.stream);
        gemm::gemm(g, a, b, c)
    }

    fn synchronize(&self) -> Result<()> {
        // Every operation completed before it returned; taking the stream waits for one that
        // another thread is running.
        drop(lock(&self.stream));
        Ok(())
    }
}
