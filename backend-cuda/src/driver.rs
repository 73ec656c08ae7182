//! The real GPU: [`DriverDevice`] implements [`Device`] over `cudarc` (CUDA driver API, NVRTC,
//! cuBLAS), every library opened at run time.
//!
//! * **Libraries.** `libcuda` (the driver), `libnvrtc` (kernels are compiled at run time) and
//!   `libcublas` (GEMMs) are `dlopen`ed by cudarc on first use, and cudarc panics when one is
//!   missing. So before cudarc touches a library, [`CudaLibrary::find`] loads it under the same
//!   names cudarc tries (`cudarc::get_lib_name_candidates`), and a missing one is an
//!   [`Error::Backend`] that says what to install; every call into cudarc is also behind
//!   `catch_unwind` (a library without a function cudarc's bindings expect panics too).
//! * **Memory.** A buffer is a `CudaSlice<u8>` allocated on the device's one stream. cudarc
//!   allocates with `cuMemAllocAsync` when the device supports memory pools (every GPU dsv4
//!   targets), i.e. from the driver's stream-ordered caching pool: a buffer dropped while the
//!   stream still uses it is freed in stream order (`cuMemFreeAsync`) and its memory is reused by
//!   the next allocation without a trip to the OS (the pool's release threshold is raised from
//!   its default 0, which would return freed memory at every synchronisation:
//!   `keep_freed_memory`). cudarc's per-buffer event tracking is turned
//!   off: everything runs on one stream, so stream order is the only ordering needed.
//! * **Kernels.** A kernel's source file ([`crate::kernels::SOURCES`], with the prelude) is
//!   compiled by NVRTC to PTX for the device's compute capability (the highest virtual
//!   architecture NVRTC supports that is not newer than the device) the first time one of its
//!   kernels is launched, and the loaded module is kept per file. The PTX is also kept on disk
//!   ([`ptx_cache_dir`]) under a key of the program text, the architecture, the compiler options
//!   and the NVRTC version, so a second process skips the compiler. Compile errors come back
//!   with NVRTC's log.
//! * **GEMMs.** cuBLAS strided-batched GEMMs, row-major through the usual swap
//!   ([`cublas_params`]): `sgemm` for f32, `GemmEx` with BF16 inputs, f32 output and f32
//!   compute for BF16.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString, OsString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, sys as cu, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, PushKernelArg,
};
use cudarc::nvrtc::{self, Ptx};
use dsv4_core::error::{Error, Result};
use sha2::{Digest, Sha256};

use crate::device::{Device, Gemm, GemmType, KernelArg, LaunchConfig};
use crate::kernels::{self, KernelSource};

const BACKEND: &str = "cuda";

fn err(msg: impl Into<String>) -> Error {
    Error::backend(BACKEND, msg)
}

/// A driver error as `CUDA_ERROR_NAME (description)`, after `what` was being done.
fn driver_err(what: &str, e: driver::DriverError) -> Error {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let hint = match e.0 {
        cu::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            "; the NVRTC library is newer than the driver: update the NVIDIA driver, or use an NVRTC of the \
             driver's CUDA version"
        }
        cu::CUresult::CUDA_ERROR_NO_DEVICE => "; check nvidia-smi and CUDA_VISIBLE_DEVICES",
        cu::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => {
            "; libcuda and the loaded kernel driver are of different versions: reinstall the driver or reboot"
        }
        _ => "",
    };
    err(format!("{what}: {name} ({text}){hint}"))
}

/// Runs `f`, turning a panic inside cudarc (a library or a function it binds that is missing)
/// into an error.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(err(format!(
            "{what}: the CUDA bindings failed ({msg}); a CUDA library is missing or lacks a function dsv4 uses: \
             update the NVIDIA driver and the CUDA libraries (`dsv4 devices` lists what was found)"
        )))
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ------------------------------------------------------------------------------- libraries

/// A CUDA library dsv4 opens at run time, and what to do when it is missing.
#[derive(Debug, Clone, Copy)]
pub struct CudaLibrary {
    /// The names cudarc asks for; each becomes its candidate file names.
    stems: &'static [&'static str],
    /// Its short name: `driver`, `NVRTC`, `cuBLAS`.
    pub name: &'static str,
    /// What it is, for messages.
    pub what: &'static str,
    /// What to do when it is missing.
    fix: &'static str,
    /// Functions dsv4 calls through cudarc, checked when the library is found: cudarc panics
    /// (with a backtrace on stderr, even where [`guard`] turns the panic into an error) when it
    /// calls one a library lacks, so a library without them counts as not there.
    symbols: &'static [&'static str],
    /// File names the library is commonly installed under that cudarc does not try (none of
    /// [`CudaLibrary::candidates`]): when one of them loads, the message says to link it under
    /// the first candidate's name.
    unlooked: &'static [&'static str],
}

/// The CUDA driver (`libcuda.so.1`).
pub const DRIVER: CudaLibrary = CudaLibrary {
    stems: &["cuda", "nvcuda"],
    name: "driver",
    what: "the CUDA driver library (libcuda)",
    fix: "install the NVIDIA driver (it provides libcuda.so.1), or add the folder holding libcuda.so.1 to \
          LD_LIBRARY_PATH",
    symbols: &[
        "cuInit",
        "cuDeviceGetCount",
        "cuDeviceGet",
        "cuDevicePrimaryCtxRetain",
        "cuCtxSetCurrent",
        "cuStreamCreate",
        "cuMemAllocAsync",
        "cuMemFreeAsync",
        "cuMemcpyHtoDAsync_v2",
        "cuMemcpyDtoHAsync_v2",
        "cuMemcpyDtoDAsync_v2",
        "cuModuleLoadData",
        "cuModuleGetFunction",
        "cuLaunchKernel",
        "cuStreamSynchronize",
        "cuMemGetInfo_v2",
        "cuDeviceGetDefaultMemPool",
        "cuMemPoolSetAttribute",
    ],
    unlooked: &[],
};

/// NVRTC, the run-time CUDA C++ compiler the kernels are built with.
pub const NVRTC: CudaLibrary = CudaLibrary {
    stems: &["nvrtc"],
    name: "NVRTC",
    what: "NVRTC, the CUDA run-time compiler (libnvrtc)",
    fix: "install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` and add the wheel's \
          site-packages/nvidia/cuda_nvrtc/lib folder to LD_LIBRARY_PATH",
    symbols: &["nvrtcCreateProgram", "nvrtcCompileProgram", "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcGetProgramLog"],
    unlooked: &[],
};

/// cuBLAS, for the GEMMs.
pub const CUBLAS: CudaLibrary = CudaLibrary {
    stems: &["cublas"],
    name: "cuBLAS",
    what: "cuBLAS (libcublas)",
    fix: "install the CUDA toolkit, or `pip install nvidia-cublas-cu12` and add the wheel's \
          site-packages/nvidia/cublas/lib folder to LD_LIBRARY_PATH",
    symbols: &["cublasCreate_v2", "cublasSetStream_v2", "cublasSgemmStridedBatched", "cublasGemmStridedBatchedEx"],
    unlooked: &[],
};

/// NCCL, for the collectives of a multi-GPU run ([`crate::nccl::NcclComm`]). Not one of
/// [`LIBRARIES`]: a single-GPU run does not need it. cudarc looks for `libnccl.so` (and
/// CUDA-versioned names), not NCCL's soname `libnccl.so.2`, which is the only name the `libnccl2`
/// package and the `nvidia-nccl-cu12` wheel install.
pub const NCCL: CudaLibrary = CudaLibrary {
    stems: &["nccl"],
    name: "NCCL",
    what: "NCCL, the NVIDIA collective communications library (libnccl)",
    fix: "install NCCL 2.18 or newer: the libnccl-dev package (it provides libnccl.so; libnccl2 alone has only \
          libnccl.so.2), or `pip install nvidia-nccl-cu12` and link the wheel's \
          site-packages/nvidia/nccl/lib/libnccl.so.2 as libnccl.so in a folder on LD_LIBRARY_PATH",
    symbols: &[
        "ncclCommInitAll",
        "ncclGetUniqueId",
        "ncclCommInitRank",
        "ncclCommInitRankConfig",
        "ncclGetVersion",
        "ncclCommSplit",
        "ncclCommDestroy",
        "ncclCommAbort",
        "ncclCommCount",
        "ncclCommUserRank",
        "ncclCommGetAsyncError",
        "ncclGetErrorString",
        "ncclGetLastError",
        "ncclAllReduce",
        "ncclAllGather",
        "ncclReduceScatter",
        "ncclBroadcast",
        "ncclSend",
        "ncclRecv",
        "ncclGroupStart",
        "ncclGroupEnd",
    ],
    unlooked: &["libnccl.so.2"],
};

/// Every library [`DriverDevice`] needs.
pub const LIBRARIES: [CudaLibrary; 3] = [DRIVER, NVRTC, CUBLAS];

/// Loads `name`, checks that it has `symbols`, and unloads it again; the loader's message when
/// it cannot load, or the first missing function.
fn try_load(name: &str, symbols: &[&str]) -> std::result::Result<(), String> {
    // SAFETY: loading a CUDA library runs its initialisers only (they set up the library's own
    // state); no function of it is called, and it is unloaded when the handle drops.
    let lib = match unsafe { libloading::Library::new(name) } {
        Ok(lib) => lib,
        Err(e) => {
            return Err(match std::error::Error::source(&e) {
                Some(detail) => detail.to_string(),
                None => e.to_string(),
            })
        }
    };
    for sym in symbols {
        // SAFETY: only the symbol's address is looked up; nothing is called through it.
        if unsafe { lib.get::<*const ()>(sym.as_bytes()) }.is_err() {
            return Err(format!("{name} lacks the function {sym} (an older or a different library)"));
        }
    }
    Ok(())
}

impl CudaLibrary {
    /// The file names cudarc tries, in its order, each once.
    pub fn candidates(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for name in self.stems.iter().flat_map(|s| cudarc::get_lib_name_candidates(s)) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The first candidate that loads (the file cudarc will use), or an actionable message.
    pub fn find(&self) -> std::result::Result<String, String> {
        let candidates = self.candidates();
        let mut broken = None;
        for name in &candidates {
            match try_load(name, self.symbols) {
                Ok(()) => return Ok(name.clone()),
                // A file that exists but does not load (a missing dependency, a wrong
                // architecture) says more than the names that are not there.
                Err(e) if broken.is_none() && !e.contains("No such file") => broken = Some(e),
                Err(_) => {}
            }
        }
        // The Linux names (cudarc also tries Windows-style ones such as libcuda64_12.so, and
        // libnvcuda*).
        let main = format!("lib{}.", self.stems[0]);
        let linux: Vec<&str> =
            candidates.iter().map(String::as_str).filter(|c| c.starts_with(&main) && !c.contains("64")).collect();
        let mut msg = format!("{} could not be loaded (tried {}", self.what, linux.join(", "));
        if candidates.len() > linux.len() {
            msg.push_str(&format!(" and {} other names", candidates.len() - linux.len()));
        }
        msg.push(')');
        if let Some(e) = broken {
            msg.push_str(&format!("; one is there but does not load: {e}"));
        }
        // A library of a newer CUDA major version is not among cudarc's names.
        for stem in self.stems {
            for major in 13..=14 {
                let other = format!("lib{stem}.so.{major}");
                if try_load(&other, &[]).is_ok() {
                    msg.push_str(&format!(
                        "; {other} is installed, but this build does not look for that name: link it as lib{stem}.so \
                         in a folder on LD_LIBRARY_PATH (ci/nvrtc.sh does this)"
                    ));
                }
            }
        }
        // An installed name cudarc does not look for.
        for other in self.unlooked {
            match try_load(other, self.symbols) {
                Ok(()) => msg.push_str(&format!(
                    "; {other} is installed, but cudarc does not look for that name: link it as {} in a folder on \
                     LD_LIBRARY_PATH",
                    candidates.first().map(String::as_str).unwrap_or("the name above")
                )),
                Err(e) if e.contains("lacks the function") => msg.push_str(&format!("; {e}")),
                Err(_) => {}
            }
        }
        msg.push_str(&format!(". To fix: {}.", self.fix));
        Err(msg)
    }

    /// [`CudaLibrary::find`] as an [`Error::Backend`].
    pub(crate) fn require(&self) -> Result<String> {
        self.find().map_err(err)
    }
}

// ------------------------------------------------------------------------------- NVRTC

/// The NVRTC options every kernel file is compiled with, for virtual architecture `arch`
/// (`80` = `compute_80`). `--fmad=false`: no contraction of `a * b + c` into fused multiply-adds,
/// so a kernel rounds as its source reads, as in the CUDA emulator's host build.
pub fn nvrtc_options(arch: u32) -> Vec<String> {
    vec![format!("--gpu-architecture=compute_{arch}"), "--std=c++17".to_string(), "--fmad=false".to_string()]
}

/// The version of the NVRTC library that loads, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    NVRTC.require()?;
    guard("asking NVRTC its version", || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: two valid out-pointers; the library is loaded (checked above).
        unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| err(format!("nvrtcVersion: {e:?}")))?;
        Ok((major, minor))
    })
}

/// The virtual architectures the loaded NVRTC compiles for (`75`, `80`, `90`, ...), ascending.
pub fn nvrtc_archs() -> Result<Vec<u32>> {
    NVRTC.require()?;
    guard("asking NVRTC its architectures", || {
        let mut n: c_int = 0;
        // SAFETY: a valid out-pointer; the library is loaded (checked above).
        unsafe { nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) }
            .result()
            .map_err(|e| err(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
        let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
        if !archs.is_empty() {
            // SAFETY: `archs` has room for the `n` values NVRTC writes.
            unsafe { nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
                .result()
                .map_err(|e| err(format!("nvrtcGetSupportedArchs: {e:?}")))?;
        }
        let mut archs: Vec<u32> = archs.into_iter().filter_map(|a| u32::try_from(a).ok()).collect();
        archs.sort_unstable();
        Ok(archs)
    })
}

/// The architecture to compile for on a device of compute capability `(major, minor)`: the
/// highest one NVRTC supports that is not newer than the device (PTX runs on newer GPUs, not
/// older ones). `None` when the device is older than all of them.
pub fn pick_arch(capability: (i32, i32), supported: &[u32]) -> Option<u32> {
    let device = u32::try_from(capability.0 * 10 + capability.1).ok()?;
    supported.iter().copied().filter(|&a| a <= device).max()
}

/// Text of a NUL-terminated buffer NVRTC filled.
fn c_text(buf: &[c_char]) -> String {
    // `c_char` is `i8` or `u8` by platform; either way one byte.
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one program (e.g. [`KernelSource::program`]) to PTX for virtual architecture `arch`
/// with [`nvrtc_options`]; `name` is the file name compiler messages cite. A compile error
/// carries NVRTC's log.
pub fn compile_ptx(program: &str, name: &str, arch: u32) -> Result<String> {
    NVRTC.require()?;
    let src = CString::new(program).map_err(|_| err(format!("{name}: the kernel source holds a NUL byte")))?;
    // The prelude comes first and the file after a `#line 1 "file"`: naming the program after
    // the prelude makes the compiler cite prelude lines as common.cuh(N), the file's as file(N).
    let cited = if program.starts_with(kernels::PRELUDE) { "common.cuh" } else { name };
    let cname = CString::new(cited).map_err(|_| err(format!("{name}: the file name holds a NUL byte")))?;
    let options = nvrtc_options(arch);
    guard("compiling kernels with NVRTC", || {
        let prog = nvrtc::result::create_program(&src, Some(&cname))
            .map_err(|e| err(format!("NVRTC could not create a program for {name}: {e:?}")))?;
        // SAFETY: `prog` was just created and is destroyed once, below; `options` are valid
        // NUL-free strings.
        let compiled = unsafe { nvrtc::result::compile_program(prog, &options) };
        // SAFETY: as above; the log exists after a compile, failed or not.
        let log = unsafe { nvrtc::result::get_program_log(prog) }.map(|l| c_text(&l)).unwrap_or_default();
        let ptx = match compiled {
            // SAFETY: as above; the program compiled, so it has PTX.
            Ok(()) => unsafe { nvrtc::result::get_ptx(prog) }
                .map(|p| c_text(&p))
                .map_err(|e| err(format!("NVRTC compiled {name} but gave no PTX: {e:?}"))),
            Err(e) => Err(err(format!(
                "NVRTC could not compile {name} for compute_{arch} ({:?}, options {}):\n{}",
                e.0,
                options.join(" "),
                log.trim_end()
            ))),
        };
        // SAFETY: `prog` is valid and not used after this.
        let _ = unsafe { nvrtc::result::destroy_program(prog) };
        ptx
    })
}

// ------------------------------------------------------------------------------- PTX disk cache

/// Makes the device's default memory pool (where `cuMemAllocAsync` takes buffers) keep freed
/// memory for reuse: its release threshold defaults to 0, which hands freed memory back to the
/// OS at every synchronisation, and the backend frees and allocates each op's output while every
/// decode step synchronises (to read the logits).
fn keep_freed_memory(ordinal: usize) -> Result<()> {
    let mut dev: cu::CUdevice = 0;
    // SAFETY: a valid out-pointer; the driver is initialised (the caller holds a context).
    unsafe { cu::cuDeviceGet(&mut dev, ordinal as c_int) }
        .result()
        .map_err(|e| driver_err("finding the device for its memory pool", e))?;
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid out-pointer and a device handle from cuDeviceGet.
    unsafe { cu::cuDeviceGetDefaultMemPool(&mut pool, dev) }
        .result()
        .map_err(|e| driver_err("finding the device's memory pool", e))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a cuuint64_t, read during the
    // call only; the pool is the device's default one.
    unsafe {
        cu::cuMemPoolSetAttribute(
            pool,
            cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| driver_err("setting the memory pool's release threshold", e))
}

/// Where compiled PTX is kept between runs: `$DSV4_CUDA_CACHE_DIR` (`off` or empty: nowhere),
/// else `$XDG_CACHE_HOME/dsv4/cuda`, else `~/.cache/dsv4/cuda`.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    cache_dir_from(
        std::env::var_os("DSV4_CUDA_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn cache_dir_from(dsv4: Option<OsString>, xdg: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty());
    if let Some(dir) = dsv4 {
        return if dir.is_empty() || dir == "off" { None } else { Some(PathBuf::from(dir)) };
    }
    if let Some(xdg) = set(xdg) {
        return Some(Path::new(&xdg).join("dsv4").join("cuda"));
    }
    set(home).map(|h| Path::new(&h).join(".cache").join("dsv4").join("cuda"))
}

/// The cache key of a program's PTX: a hash of the program text, the architecture, the compiler
/// options and the NVRTC version (hex, 32 digits).
pub fn ptx_cache_key(program: &str, arch: u32, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(format!("dsv4 ptx v1\0compute_{arch}\0nvrtc {}.{}\0", nvrtc.0, nvrtc.1).as_bytes());
    for o in nvrtc_options(arch) {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    h.update(program.as_bytes());
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The cache file of `file`'s PTX under `dir`.
fn ptx_cache_path(dir: &Path, file: &str, arch: u32, key: &str) -> PathBuf {
    let stem = file.strip_suffix(".cu").unwrap_or(file);
    dir.join(format!("{stem}-compute_{arch}-{key}.ptx"))
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader never sees half a
/// file. Failures only cost the next process a compile, so they are ignored.
fn write_atomically(path: &Path, text: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("ptx.tmp{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

// ------------------------------------------------------------------------------- kernel arguments

/// One kernel argument as the kernel receives it: a device address (`T*`) or a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PackedArg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

impl PackedArg {
    /// The bytes of the parameter as the kernel reads them (native byte order).
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            PackedArg::Ptr(p) => p.to_ne_bytes().to_vec(),
            PackedArg::I32(v) => v.to_ne_bytes().to_vec(),
            PackedArg::U32(v) => v.to_ne_bytes().to_vec(),
            PackedArg::I64(v) => v.to_ne_bytes().to_vec(),
            PackedArg::F32(v) => v.to_ne_bytes().to_vec(),
        }
    }
}

/// `args` in order, buffers as `base address + byte offset`; `buffer` gives a buffer's base
/// address and length in bytes. An offset past the end of its buffer is an error.
pub fn pack_args<B>(
    kernel: &str,
    args: &[KernelArg<'_, B>],
    mut buffer: impl FnMut(&B) -> Result<(u64, usize)>,
) -> Result<Vec<PackedArg>> {
    let mut packed = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        packed.push(match *a {
            KernelArg::In(b, offset) | KernelArg::Out(b, offset) => {
                let (base, len) = buffer(b)?;
                if offset > len {
                    return Err(err(format!(
                        "{kernel}: argument {i} starts at byte {offset} of a buffer of {len} bytes"
                    )));
                }
                PackedArg::Ptr(base + offset as u64)
            }
            KernelArg::I32(v) => PackedArg::I32(v),
            KernelArg::U32(v) => PackedArg::U32(v),
            KernelArg::I64(v) => PackedArg::I64(v),
            KernelArg::F32(v) => PackedArg::F32(v),
        });
    }
    Ok(packed)
}

// ------------------------------------------------------------------------------- GEMM mapping

/// A row-major [`Gemm`] as cuBLAS's column-major strided-batched call. A row-major `[r, c]`
/// matrix is the column-major `[c, r]` one, so `C = A · op(B)` is computed as
/// `Cᵀ = op(B)ᵀ · Aᵀ`: cuBLAS's first operand is B, its second A, and its `m`, `n` are the
/// row-major `n`, `m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CublasGemm {
    /// `transa` (of B): set when B is stored `[n, k]` (`transpose_b`).
    pub transa: bool,
    /// `transb` (of A): never; A is stored `[m, k]`, which is already `Aᵀ` column-major.
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    /// Element strides between batches of cuBLAS's A (our B), B (our A) and C.
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub batch: i32,
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("GEMM {what} = {v} is larger than cuBLAS takes (2^31 - 1)")))
}

fn to_i64(what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| err(format!("GEMM {what} = {v} is too large")))
}

/// The cuBLAS parameters of `g` (see [`CublasGemm`]).
pub fn cublas_params(g: &Gemm) -> Result<CublasGemm> {
    Ok(CublasGemm {
        transa: g.transpose_b,
        transb: false,
        m: to_i32("n", g.n)?,
        n: to_i32("m", g.m)?,
        k: to_i32("k", g.k)?,
        lda: to_i32("ldb", if g.transpose_b { g.k } else { g.n }.max(1))?,
        ldb: to_i32("lda", g.k.max(1))?,
        ldc: to_i32("ldc", g.n.max(1))?,
        stride_a: to_i64("stride_b", g.stride_b)?,
        stride_b: to_i64("stride_a", g.stride_a)?,
        stride_c: to_i64("stride_c", g.stride_c)?,
        batch: to_i32("batch", g.batch)?,
    })
}

/// Elements of A, B and C that `g` touches, from the start of each buffer (offsets included).
pub fn gemm_extents(g: &Gemm) -> Option<(usize, usize, usize)> {
    let extent = |offset: usize, stride: usize, rows: usize, cols: usize| -> Option<usize> {
        if g.batch == 0 || rows == 0 || cols == 0 {
            return Some(0);
        }
        offset.checked_add(stride.checked_mul(g.batch - 1)?)?.checked_add(rows.checked_mul(cols)?)
    };
    Some((
        extent(g.a_offset, g.stride_a, g.m, g.k)?,
        extent(g.b_offset, g.stride_b, g.k, g.n)?,
        extent(g.c_offset, g.stride_c, g.m, g.n)?,
    ))
}

// ------------------------------------------------------------------------------- the device

/// A GPU through the CUDA driver: one context (the device's primary one), one stream, NVRTC
/// kernels and cuBLAS. See the module documentation.
pub struct DriverDevice {
    // Dropped in this order: functions and modules before the context they live in.
    functions: Mutex<HashMap<&'static str, Arc<CudaFunction>>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: Mutex<CudaBlas>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    capability: (i32, i32),
    total_memory: usize,
    driver_version: i32,
    nvrtc_version: (i32, i32),
    /// The virtual architecture kernels are compiled for.
    arch: u32,
    cache_dir: Option<PathBuf>,
}

impl DriverDevice {
    /// Opens GPU `ordinal` (as the driver numbers them, after `CUDA_VISIBLE_DEVICES`). Fails
    /// with an actionable message when a library is missing or the GPU does not exist.
    pub fn open(ordinal: usize) -> Result<DriverDevice> {
        for lib in LIBRARIES {
            lib.require()?;
        }
        guard("opening the GPU", || Self::open_checked(ordinal))
    }

    fn open_checked(ordinal: usize) -> Result<DriverDevice> {
        let count = CudaContext::device_count().map_err(|e| driver_err("the CUDA driver found no usable GPU", e))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(err(format!(
                "there is no CUDA device {ordinal}: the driver sees {count} (numbered from 0; CUDA_VISIBLE_DEVICES \
                 selects which)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&format!("opening CUDA device {ordinal}"), e))?;
        // SAFETY: no buffer exists yet, and every buffer of this device is used on its one stream
        // only, in stream order, so cudarc's cross-stream events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("creating a stream", e))?;
        keep_freed_memory(ordinal)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err(format!("creating a cuBLAS handle: {e:?}")))?;
        let name = ctx.name().map_err(|e| driver_err("reading the device name", e))?;
        let capability = ctx.compute_capability().map_err(|e| driver_err("reading the compute capability", e))?;
        let total_memory = ctx.total_mem().map_err(|e| driver_err("reading the device memory", e))?;
        let mut driver_version: c_int = 0;
        // SAFETY: a valid out-pointer; the driver is loaded (the context exists).
        unsafe { cu::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| driver_err("reading the driver version", e))?;
        let nvrtc_version = nvrtc_version()?;
        let archs = nvrtc_archs()?;
        let arch = pick_arch(capability, &archs).ok_or_else(|| {
            err(format!(
                "{name} (compute capability {}.{}) is older than every architecture NVRTC {}.{} compiles for \
                 ({archs:?}); use an older CUDA toolkit's NVRTC",
                capability.0, capability.1, nvrtc_version.0, nvrtc_version.1
            ))
        })?;
        Ok(DriverDevice {
            functions: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            stream,
            ctx,
            ordinal,
            name,
            capability,
            total_memory,
            driver_version,
            nvrtc_version,
            arch,
            cache_dir: ptx_cache_dir(),
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Keeps compiled PTX in `dir` instead of [`ptx_cache_dir`] (`None`: no disk cache). Applies
    /// to the kernel files not loaded yet.
    pub fn set_ptx_cache_dir(&mut self, dir: Option<PathBuf>) {
        self.cache_dir = dir;
    }

    /// The virtual architecture kernels are compiled for (`90` = `compute_90`).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Base address and length of a buffer of this device.
    fn address(&self, buffer: &CudaSlice<u8>) -> Result<(u64, usize)> {
        // Stream, not context: two handles on one GPU share its primary context but each has
        // its own stream, and with event tracking off nothing would order their work.
        if !Arc::ptr_eq(buffer.stream(), &self.stream) {
            return Err(err(format!(
                "a buffer of another CUDA device (or another handle on device {}) was passed to it",
                self.ordinal
            )));
        }
        // Event tracking is off, so the returned guard records nothing.
        let (ptr, _no_events) = buffer.device_ptr(&self.stream);
        Ok((ptr, buffer.len()))
    }

    /// The address of byte `offset` of `buffer`, with `bytes` bytes from there inside it.
    pub(crate) fn range(&self, buffer: &CudaSlice<u8>, offset: usize, bytes: usize, what: &str) -> Result<u64> {
        let (base, len) = self.address(buffer)?;
        match offset.checked_add(bytes) {
            Some(end) if end <= len => Ok(base + offset as u64),
            _ => Err(err(format!("{what}: bytes {offset}..{offset}+{bytes} are outside a buffer of {len} bytes"))),
        }
    }

    /// Makes the device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("binding the CUDA context to this thread", e))
    }

    /// The device's one stream, as the driver API's handle.
    pub(crate) fn cu_stream(&self) -> cu::CUstream {
        self.stream.cu_stream()
    }

    /// A new buffer of `bytes` bytes, contents undefined. A zero-byte buffer still owns a
    /// one-byte allocation, so that its address is a valid one.
    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.bind()?;
        let size = bytes.max(1);
        // SAFETY: the context is current; the allocation is handed to a `CudaSlice` of this
        // stream below, which frees it the way it was allocated (async when the pool is used).
        let ptr = unsafe {
            if self.ctx.has_async_alloc() {
                driver::result::malloc_async(self.stream.cu_stream(), size)
            } else {
                driver::result::malloc_sync(size)
            }
        }
        .map_err(|e| {
            let free = self.ctx.mem_get_info().map(|(f, _)| format!(" ({} MiB free)", f >> 20)).unwrap_or_default();
            driver_err(&format!("allocating {bytes} bytes on {}{free}", self.name), e)
        })?;
        // SAFETY: `ptr` is a fresh allocation of at least `bytes` bytes on this stream's context.
        Ok(unsafe { self.stream.upgrade_device_ptr::<u8>(ptr, bytes) })
    }

    /// The loaded function `kernel`, compiling and loading its file on first use.
    fn function(&self, kernel: &'static str) -> Result<Arc<CudaFunction>> {
        if let Some(f) = lock(&self.functions).get(kernel) {
            return Ok(f.clone());
        }
        let source = kernels::source_of(kernel)
            .ok_or_else(|| err(format!("no kernel source defines {kernel} (backend-cuda/kernels/*.cu)")))?;
        let module = self.module(source)?;
        let f = Arc::new(
            module
                .load_function(kernel)
                .map_err(|e| driver_err(&format!("finding kernel {kernel} in {}", source.file), e))?,
        );
        lock(&self.functions).insert(kernel, f.clone());
        Ok(f)
    }

    /// The loaded module of `source`: from memory, else the disk cache's PTX, else NVRTC's.
    fn module(&self, source: &'static KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(source.file) {
            return Ok(m.clone());
        }
        let program = source.program();
        let cached = self.cache_dir.as_ref().map(|dir| {
            ptx_cache_path(dir, source.file, self.arch, &ptx_cache_key(&program, self.arch, self.nvrtc_version))
        });
        let from_disk = cached
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .filter(|ptx| ptx.contains(".entry") || source.kernels().is_empty());
        let module = match from_disk.map(|ptx| self.ctx.load_module(Ptx::from_src(ptx))) {
            Some(Ok(m)) => m,
            // Not cached, or the cached PTX does not load: compile it (again).
            _ => {
                let ptx = compile_ptx(&program, source.file, self.arch)?;
                let m = self.ctx.load_module(Ptx::from_src(ptx.clone())).map_err(|e| {
                    driver_err(&format!("loading the PTX of {} (compute_{})", source.file, self.arch), e)
                })?;
                if let Some(path) = &cached {
                    write_atomically(path, &ptx);
                }
                m
            }
        };
        modules.insert(source.file, module.clone());
        Ok(module)
    }

    fn launch_checked(
        &self,
        kernel: &'static str,
        config: LaunchConfig,
        args: &[KernelArg<'_, CudaSlice<u8>>],
    ) -> Result<()> {
        let func = self.function(kernel)?;
        let packed = pack_args(kernel, args, |b| self.address(b))?;
        self.bind()?;
        if config.shared_bytes > 48 * 1024 {
            // Above 48 KiB of dynamic shared memory a kernel must opt in.
            func.set_attribute(
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(config.shared_bytes).unwrap_or(i32::MAX),
            )
            .map_err(|e| {
                driver_err(&format!("{kernel}: asking for {} bytes of shared memory", config.shared_bytes), e)
            })?;
        }
        let mut builder = self.stream.launch_builder(&func);
        for a in &packed {
            match a {
                PackedArg::Ptr(v) => builder.arg(v),
                PackedArg::I32(v) => builder.arg(v),
                PackedArg::U32(v) => builder.arg(v),
                PackedArg::I64(v) => builder.arg(v),
                PackedArg::F32(v) => builder.arg(v),
            };
        }
        let cfg = driver::LaunchConfig {
            grid_dim: config.grid,
            block_dim: config.block,
            shared_mem_bytes: config.shared_bytes,
        };
        // SAFETY: the arguments are the kernel's parameters in order, each of its type: the
        // backend's op modules pass them as the kernel source declares them (the CUDA emulator
        // runs the same calls against the same sources); every address is inside a live
        // buffer of this device (checked by `pack_args`), and the buffers outlive the launch in
        // stream order (a dropped buffer is freed on this stream, after the kernel).
        unsafe { builder.launch(cfg) }.map_err(|e| {
            driver_err(
                &format!(
                    "launching {kernel} (grid {:?}, block {:?}, {} bytes of shared memory)",
                    config.grid, config.block, config.shared_bytes
                ),
                e,
            )
        })?;
        Ok(())
    }

    fn gemm_checked(&self, g: &Gemm, a: &CudaSlice<u8>, b: &CudaSlice<u8>, c: &CudaSlice<u8>) -> Result<()> {
        if g.a_type != g.b_type {
            return Err(err(format!(
                "GEMM of {:?} by {:?}: cuBLAS is driven with both operands of one type (F32 or BF16); convert one",
                g.a_type, g.b_type
            )));
        }
        let p = cublas_params(g)?;
        let (a_elems, b_elems, c_elems) =
            gemm_extents(g).ok_or_else(|| err(format!("GEMM {g:?}: its extent overflows")))?;
        let t = g.a_type.bytes();
        // Saturating: an extent too large for memory fails the range check below.
        let a_ptr = self.range(a, 0, a_elems.saturating_mul(t), "GEMM operand A")? + (g.a_offset * t) as u64;
        let b_ptr = self.range(b, 0, b_elems.saturating_mul(t), "GEMM operand B")? + (g.b_offset * t) as u64;
        let c_ptr = self.range(c, 0, c_elems.saturating_mul(4), "GEMM result C")? + (g.c_offset * 4) as u64;
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.bind()?;
        if g.k == 0 {
            // An empty sum: C = 0 (cuBLAS would only scale C by beta).
            for i in 0..g.batch {
                let at = c_ptr + (i * g.stride_c * 4) as u64;
                // SAFETY: `at .. at + m·n·4` lies inside `c` (checked by `range` above).
                unsafe { driver::result::memset_d8_async(at, 0, g.m * g.n * 4, self.stream.cu_stream()) }
                    .map_err(|e| driver_err("zeroing an empty GEMM's result", e))?;
            }
            return Ok(());
        }
        use cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let blas = lock(&self.blas);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // cuBLAS's first operand is our B, its second our A (see `CublasGemm`).
        let result = match g.a_type {
            // SAFETY: the handle works on this device's stream; the pointers are device
            // addresses of live buffers whose extents were checked above for these sizes,
            // strides and leading dimensions; alpha and beta are host scalars (the handle's
            // default pointer mode).
            GemmType::F32 => unsafe {
                cublas::result::sgemm_strided_batched(
                    *blas.handle(),
                    op(p.transa),
                    op(p.transb),
                    p.m,
                    p.n,
                    p.k,
                    &alpha,
                    b_ptr as *const f32,
                    p.lda,
                    p.stride_a,
                    a_ptr as *const f32,
                    p.ldb,
                    p.stride_b,
                    &beta,
                    c_ptr as *mut f32,
                    p.ldc,
                    p.stride_c,
                    p.batch,
                )
            },
            // SAFETY: as above, with BF16 operands, an f32 result and f32 compute.
            GemmType::Bf16 => unsafe {
                cublas::result::gemm_strided_batched_ex(
                    *blas.handle(),
                    op(p.transa),
                    op(p.transb),
                    p.m,
                    p.n,
                    p.k,
                    (&alpha as *const f32).cast(),
                    b_ptr as *const std::ffi::c_void,
                    cublas::sys::cudaDataType::CUDA_R_16BF,
                    p.lda,
                    p.stride_a,
                    a_ptr as *const std::ffi::c_void,
                    cublas::sys::cudaDataType::CUDA_R_16BF,
                    p.ldb,
                    p.stride_b,
                    (&beta as *const f32).cast(),
                    c_ptr as *mut std::ffi::c_void,
                    cublas::sys::cudaDataType::CUDA_R_32F,
                    p.ldc,
                    p.stride_c,
                    p.batch,
                    cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            },
        };
        result.map_err(|e| err(format!("cuBLAS GEMM {g:?}: {:?}", e.0)))
    }
}

impl Drop for DriverDevice {
    fn drop(&mut self) {
        // Modules are unloaded below: let the kernels that use them finish first.
        let _ = catch_unwind(AssertUnwindSafe(|| self.stream.synchronize()));
    }
}

impl Device for DriverDevice {
    type Buffer = CudaSlice<u8>;

    fn describe(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let free = self.free_memory().map(|f| format!(", {:.1} GiB free", gib(f))).unwrap_or_default();
        format!(
            "CUDA device {}: {} (compute capability {}.{}, {:.1} GiB{free}); driver CUDA {}.{}, NVRTC {}.{} \
             (kernels for compute_{})",
            self.ordinal,
            self.name,
            self.capability.0,
            self.capability.1,
            gib(self.total_memory),
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            self.arch
        )
    }

    fn free_memory(&self) -> Option<usize> {
        guard("reading free memory", || {
            self.ctx.mem_get_info().map(|(free, _)| free).map_err(|e| driver_err("cuMemGetInfo", e))
        })
        .ok()
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        guard("allocating device memory", || {
            let buf = self.alloc(bytes)?;
            if bytes > 0 {
                let (ptr, _) = self.address(&buf)?;
                // SAFETY: `ptr .. ptr + bytes` is the allocation just made.
                unsafe { driver::result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
                    .map_err(|e| driver_err("zeroing a new buffer", e))?;
            }
            Ok(buf)
        })
    }

    fn alloc_uninit(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        guard("allocating device memory", || self.alloc(bytes))
    }

    fn len(&self, buffer: &CudaSlice<u8>) -> usize {
        buffer.len()
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        guard("copying to the GPU", || {
            let buf = self.alloc(bytes.len())?;
            if !bytes.is_empty() {
                let (ptr, _) = self.address(&buf)?;
                // SAFETY: the destination is the allocation just made, `bytes.len()` long. The
                // source is pageable host memory, which the driver stages before this returns,
                // so `bytes` may be freed as soon as it does.
                unsafe { driver::result::memcpy_htod_async(ptr, bytes, self.stream.cu_stream()) }
                    .map_err(|e| driver_err(&format!("copying {} bytes to the GPU", bytes.len()), e))?;
            }
            Ok(buf)
        })
    }

    fn download(&self, buffer: &CudaSlice<u8>, offset: usize, out: &mut [u8]) -> Result<()> {
        guard("copying from the GPU", || {
            let src = self.range(buffer, offset, out.len(), "download")?;
            self.bind()?;
            if !out.is_empty() {
                // SAFETY: `src .. src + out.len()` lies inside `buffer` (checked above); `out`
                // stays borrowed until the stream is synchronised below.
                unsafe { driver::result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
                    .map_err(|e| driver_err(&format!("copying {} bytes from the GPU", out.len()), e))?;
            }
            self.stream.synchronize().map_err(|e| driver_err("waiting for the GPU", e))
        })
    }

    fn copy(
        &self,
        src: &CudaSlice<u8>,
        src_offset: usize,
        dst: &CudaSlice<u8>,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        guard("copying on the GPU", || {
            let from = self.range(src, src_offset, bytes, "copy source")?;
            let to = self.range(dst, dst_offset, bytes, "copy destination")?;
            if bytes == 0 {
                return Ok(());
            }
            self.bind()?;
            // SAFETY: both ranges lie inside live buffers of this device (checked above).
            unsafe { driver::result::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_err(&format!("copying {bytes} bytes on the GPU"), e))
        })
    }

    fn launch(&self, kernel: &'static str, config: LaunchConfig, args: &[KernelArg<'_, CudaSlice<u8>>]) -> Result<()> {
        guard(&format!("launching {kernel}"), || self.launch_checked(kernel, config, args))
    }

    fn gemm(&self, g: &Gemm, a: &CudaSlice<u8>, b: &CudaSlice<u8>, c: &CudaSlice<u8>) -> Result<()> {
        guard("running a cuBLAS GEMM", || self.gemm_checked(g, a, b, c))
    }

    fn synchronize(&self) -> Result<()> {
        guard("waiting for the GPU", || self.stream.synchronize().map_err(|e| driver_err("waiting for the GPU", e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_addresses_plus_byte_offsets_and_scalars_keep_their_bits() {
        // Stand-in buffers: (base address, length).
        let (a, b) = ((0x7000_0000_0000u64, 64usize), (0x7000_1000_0000u64, 16usize));
        let args = [
            KernelArg::In(&a, 0),
            KernelArg::Out(&b, 12),
            KernelArg::In(&a, 64),
            KernelArg::I32(-3),
            KernelArg::U32(0xdead_beef),
            KernelArg::I64(-(1i64 << 40)),
            KernelArg::F32(-0.5),
        ];
        let packed = pack_args("k", &args, |&(base, len)| Ok((base, len))).unwrap();
        assert_eq!(
            packed,
            vec![
                PackedArg::Ptr(0x7000_0000_0000),
                PackedArg::Ptr(0x7000_1000_000c),
                PackedArg::Ptr(0x7000_0000_0040),
                PackedArg::I32(-3),
                PackedArg::U32(0xdead_beef),
                PackedArg::I64(-(1i64 << 40)),
                PackedArg::F32(-0.5),
            ]
        );
        // What the kernel's parameter buffer holds: pointers and i64 as 8 bytes, the rest as 4.
        let bytes: Vec<Vec<u8>> = packed.iter().map(PackedArg::bytes).collect();
        assert_eq!(bytes[1], 0x7000_1000_000cu64.to_ne_bytes());
        assert_eq!(bytes[3], (-3i32).to_ne_bytes());
        assert_eq!(bytes[4], 0xdead_beefu32.to_ne_bytes());
        assert_eq!(bytes[5], (-(1i64 << 40)).to_ne_bytes());
        assert_eq!(bytes[6], 0xbf00_0000u32.to_ne_bytes());
        assert_eq!(bytes.iter().map(Vec::len).collect::<Vec<_>>(), [8, 8, 8, 4, 4, 8, 4]);
    }

    #[test]
    fn an_offset_past_its_buffer_is_refused() {
        let a = (0x1000u64, 8usize);
        let e = pack_args("dsv4_k", &[KernelArg::I32(1), KernelArg::In(&a, 9)], |&(b, l)| Ok((b, l)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dsv4_k") && e.contains("argument 1") && e.contains("byte 9"), "{e}");
    }

    /// cuBLAS's column-major strided-batched GEMM, on the host: `C = op(A) · op(B)` with
    /// `op(X)[r, c] = X[r + c·ld]`, or `X[c + r·ld]` when transposed.
    fn cublas_on_host(p: &CublasGemm, a: &[f32], a0: usize, b: &[f32], b0: usize, c: &mut [f32], c0: usize) {
        let at = |x: &[f32], base: usize, t: bool, ld: i32, r: usize, col: usize| {
            let ld = ld as usize;
            x[base + if t { col + r * ld } else { r + col * ld }]
        };
        for i in 0..p.batch as usize {
            let (ab, bb, cb) =
                (a0 + i * p.stride_a as usize, b0 + i * p.stride_b as usize, c0 + i * p.stride_c as usize);
            for col in 0..p.n as usize {
                for r in 0..p.m as usize {
                    let mut s = 0f32;
                    for l in 0..p.k as usize {
                        s += at(a, ab, p.transa, p.lda, r, l) * at(b, bb, p.transb, p.ldb, l, col);
                    }
                    c[cb + r + col * p.ldc as usize] = s;
                }
            }
        }
    }

    /// The row-major definition of [`Gemm`], naively.
    fn row_major_reference(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for i in 0..g.batch {
            for r in 0..g.m {
                for col in 0..g.n {
                    let mut s = 0f32;
                    for l in 0..g.k {
                        let av = a[g.a_offset + i * g.stride_a + r * g.k + l];
                        let bv = if g.transpose_b {
                            b[g.b_offset + i * g.stride_b + col * g.k + l]
                        } else {
                            b[g.b_offset + i * g.stride_b + l * g.n + col]
                        };
                        s += av * bv;
                    }
                    c[g.c_offset + i * g.stride_c + r * g.n + col] = s;
                }
            }
        }
    }

    #[test]
    fn the_column_major_cublas_call_computes_the_row_major_gemm() {
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 17) as f32 - 8.0).collect()
        };
        for transpose_b in [false, true] {
            for (batch, m, n, k, shared_b) in
                [(1, 3, 5, 4, false), (3, 2, 7, 5, false), (2, 4, 3, 6, true), (1, 1, 1, 1, false)]
            {
                let g = Gemm {
                    batch,
                    m,
                    n,
                    k,
                    transpose_b,
                    a_type: GemmType::F32,
                    b_type: GemmType::F32,
                    a_offset: 3,
                    b_offset: 5,
                    c_offset: 2,
                    stride_a: m * k + 1,
                    stride_b: if shared_b { 0 } else { k * n + 2 },
                    stride_c: m * n + 3,
                };
                let (ae, be, ce) = gemm_extents(&g).unwrap();
                let (a, b) = (values(ae, 1), values(be, 2));
                let (mut want, mut got) = (vec![f32::NAN; ce], vec![f32::NAN; ce]);
                row_major_reference(&g, &a, &b, &mut want);
                let p = cublas_params(&g).unwrap();
                assert_eq!((p.m, p.n, p.k, p.transa, p.transb), (n as i32, m as i32, k as i32, transpose_b, false));
                // cuBLAS's A is our B and its B our A.
                cublas_on_host(&p, &b, g.b_offset, &a, g.a_offset, &mut got, g.c_offset);
                let same = want.iter().zip(&got).all(|(w, g)| w == g || (w.is_nan() && g.is_nan()));
                assert!(same, "{g:?}\nwant {want:?}\ngot  {got:?}");
            }
        }
    }

    #[test]
    fn gemm_sizes_beyond_cublas_ints_are_refused() {
        let g = Gemm {
            batch: 1,
            m: 1 << 31,
            n: 1,
            k: 1,
            transpose_b: false,
            a_type: GemmType::Bf16,
            b_type: GemmType::Bf16,
            a_offset: 0,
            b_offset: 0,
            c_offset: 0,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        assert!(cublas_params(&g).unwrap_err().to_string().contains("2^31"));
    }

    #[test]
    fn gemm_extents_cover_the_last_batch() {
        let g = Gemm {
            batch: 3,
            m: 2,
            n: 4,
            k: 5,
            transpose_b: true,
            a_type: GemmType::F32,
            b_type: GemmType::F32,
            a_offset: 1,
            b_offset: 0,
            c_offset: 7,
            stride_a: 10,
            stride_b: 0,
            stride_c: 8,
        };
        assert_eq!(gemm_extents(&g), Some((1 + 2 * 10 + 10, 20, 7 + 2 * 8 + 8)));
        assert_eq!(gemm_extents(&Gemm { batch: 0, ..g }), Some((0, 0, 0)));
    }

    #[test]
    fn the_cache_key_changes_with_program_arch_and_compiler() {
        let k = ptx_cache_key("extern \"C\" __global__ void dsv4_a() {}", 90, (12, 8));
        assert_eq!(k.len(), 32);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(k, ptx_cache_key("extern \"C\" __global__ void dsv4_a() {}", 90, (12, 8)), "stable");
        assert_ne!(k, ptx_cache_key("extern \"C\" __global__ void dsv4_b() {}", 90, (12, 8)));
        assert_ne!(k, ptx_cache_key("extern \"C\" __global__ void dsv4_a() {}", 80, (12, 8)));
        assert_ne!(k, ptx_cache_key("extern \"C\" __global__ void dsv4_a() {}", 90, (12, 9)));
        assert_ne!(k, ptx_cache_key("extern \"C\" __global__ void dsv4_a() {}", 90, (13, 8)));
        let path = ptx_cache_path(Path::new("/c"), "elementwise.cu", 90, &k);
        assert_eq!(path, PathBuf::from(format!("/c/elementwise-compute_90-{k}.ptx")));
    }

    #[test]
    fn the_cache_lives_under_xdg_or_home_unless_turned_off() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(cache_dir_from(None, os("/x"), os("/h")), Some(PathBuf::from("/x/dsv4/cuda")));
        assert_eq!(cache_dir_from(None, None, os("/h")), Some(PathBuf::from("/h/.cache/dsv4/cuda")));
        assert_eq!(cache_dir_from(None, os(""), os("/h")), Some(PathBuf::from("/h/.cache/dsv4/cuda")));
        assert_eq!(cache_dir_from(os("/mine"), os("/x"), os("/h")), Some(PathBuf::from("/mine")));
        assert_eq!(cache_dir_from(os("off"), os("/x"), os("/h")), None);
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    #[test]
    fn the_arch_is_the_newest_nvrtc_has_that_the_gpu_runs() {
        let nvrtc = [75, 80, 86, 87, 89, 90, 100, 120];
        assert_eq!(pick_arch((9, 0), &nvrtc), Some(90));
        assert_eq!(pick_arch((8, 9), &nvrtc), Some(89));
        assert_eq!(pick_arch((12, 1), &nvrtc), Some(120));
        assert_eq!(pick_arch((10, 3), &nvrtc), Some(100));
        assert_eq!(pick_arch((7, 0), &nvrtc), None);
    }

    #[test]
    fn a_missing_library_is_an_error_that_says_what_to_install() {
        let missing = CudaLibrary {
            stems: &["dsv4-no-such-library"],
            name: "test",
            what: "a test library",
            fix: "install it",
            symbols: &[],
            unlooked: &[],
        };
        let e = missing.find().unwrap_err();
        assert!(e.contains("a test library could not be loaded") && e.contains("install it"), "{e}");
        assert!(e.contains("libdsv4-no-such-library.so"), "{e}");
        // cudarc tries the versioned names a pip wheel installs.
        assert!(NVRTC.candidates().contains(&"libnvrtc.so.12".to_string()));
        assert!(DRIVER.candidates().contains(&"libcuda.so.1".to_string()));
        assert!(CUBLAS.candidates().contains(&"libcublas.so.12".to_string()));
    }

    #[test]
    fn an_installed_name_cudarc_does_not_try_is_named_with_how_to_link_it() {
        let elsewhere = CudaLibrary {
            stems: &["dsv4-no-such-library"],
            name: "test",
            what: "a test library",
            fix: "install it",
            symbols: &["malloc"],
            unlooked: &["libc.so.6", "libdsv4-no-such-library.so.2"],
        };
        let e = elsewhere.find().unwrap_err();
        assert!(
            e.contains(
                "libc.so.6 is installed, but cudarc does not look for that name: link it as \
                        libdsv4-no-such-library.so in a folder on LD_LIBRARY_PATH"
            ),
            "{e}"
        );
        assert!(!e.contains("libdsv4-no-such-library.so.2"), "{e}");
        // The names NCCL's packages install are not among those cudarc tries (else the hint
        // would be wrong).
        for lib in [DRIVER, NVRTC, CUBLAS, NCCL] {
            let tried = lib.candidates();
            assert!(lib.unlooked.iter().all(|n| !tried.iter().any(|t| t == n)), "{}: {tried:?}", lib.name);
        }
    }

    /// A library that loads but lacks a function cudarc would call counts as broken: cudarc
    /// would panic (and print a backtrace) on the call.
    #[test]
    fn a_library_without_the_functions_dsv4_calls_is_refused() {
        assert_eq!(try_load("libc.so.6", &["malloc", "free"]), Ok(()));
        let e = try_load("libc.so.6", &["malloc", "cuInit"]).unwrap_err();
        assert!(e.contains("lacks the function cuInit"), "{e}");
    }

    #[test]
    fn opening_without_a_gpu_is_an_error_not_a_panic() {
        // On a machine with the libraries and a GPU this opens it; either way nothing panics.
        match DriverDevice::open(usize::MAX >> 1) {
            Ok(_) => panic!("no machine has that many GPUs"),
            Err(e) => assert!(e.to_string().starts_with("backend `cuda`"), "{e}"),
        }
    }
}
