//! The Nvidia CUDA backend: `dsv4_core::Backend` over a [`device::Device`], which is either a
//! GPU through `cudarc` (resolved at run time: the crate builds with no CUDA toolkit and runs
//! with no GPU until one is asked for) or dsv4's CUDA emulator in `tests/cuda-emu`.
//!
//! * Activations f32 and indices i32, contiguous row-major in device buffers (`tensor.rs`);
//!   `reshape` and axis-0 `narrow` share memory, every other op writes a new buffer.
//! * One kernel (CUDA C, `kernels/*.cu`, compiled with NVRTC at run time) per primitive;
//!   GEMMs through cuBLAS (`Device::gemm`), decode-sized products through a GEMV kernel.
//! * Fused kernels for mHC (pre, Sinkhorn, post, head), compressor pooling, the clamped SwiGLU,
//!   MoE routing, sparse attention over the paged pool and the lightning indexer (`fused.rs`,
//!   `attention.rs`); the routed experts keep the trait's composition.
//!
//! Verified on the emulator in CI (the op-level suite and the fixtures on `tests/cuda-emu`) and
//! on one H200 (`ci/gpu-check.sh`, 2026-12-04: the same suites, every fixture within 1.71e-6).

pub mod backend;
pub mod collective;
pub mod comm;
pub mod device;
pub mod driver;
pub mod kernels;
pub mod nccl;
pub mod tensor;

mod attention;
mod elementwise;
mod fused;
mod index;
mod layout;
mod memory;
mod pool;
mod reduce;
mod weights;

pub use backend::CudaBackend;
pub use comm::{node_unique_id, run_node_ranks, run_ranks, run_ranks_with, NcclCommunicator};
pub use device::{Device, Gemm, GemmType, KernelArg, LaunchConfig};
pub use driver::DriverDevice;
use dsv4_core::error::Result;
pub use nccl::NcclComm;

/// Opens GPUs `ordinals` (as the driver numbers them; rank r on `ordinals[r]`) and one NCCL
/// communicator over them (`ncclCommInitAll`), for [`run_ranks`]: the ranks of a multi-GPU run
/// in this process. Fails with an actionable message, never a panic, when a library (NCCL
/// included) is missing, a GPU does not exist or one is listed twice.
pub fn open_ranks(ordinals: &[usize]) -> Result<(Vec<std::sync::Arc<DriverDevice>>, Vec<NcclComm>)> {
    // NCCL first: a missing library is said before any GPU is opened.
    let devices = open_devices(ordinals)?;
    let refs: Vec<&DriverDevice> = devices.iter().map(|d| &**d).collect();
    let members = NcclComm::init_all(&refs)?;
    Ok((devices, members))
}

/// Opens GPUs `ordinals` (rank r on `ordinals[r]`) for [`run_node_ranks`], whose ranks join
/// their NCCL communicator from node 0's unique id; NCCL is checked for first.
pub fn open_devices(ordinals: &[usize]) -> Result<Vec<std::sync::Arc<DriverDevice>>> {
    driver::NCCL.require()?;
    nccl::direct_access_off();
    ordinals.iter().map(|&o| DriverDevice::open(o).map(std::sync::Arc::new)).collect()
}

/// What `dsv4 devices` prints for CUDA: which of the libraries the backend loads at run time
/// (the driver, NVRTC, cuBLAS; and NCCL, needed only for `--devices` > 1) were found, each under
/// the file name that loads. The first line gives each library's state, then one line per
/// missing library (NCCL's too) says what was tried and what to install: `Err` when a required
/// one is missing, `Ok` with NCCL's line when only NCCL is.
pub fn probe() -> std::result::Result<String, String> {
    let found: Vec<_> = driver::LIBRARIES.iter().map(|lib| (lib.name, lib.find())).collect();
    let nccl = driver::NCCL.find();
    let states: Vec<String> = found
        .iter()
        .map(|(name, r)| match r {
            Ok(file) => format!("{name} {file}"),
            Err(_) => format!("{name} missing"),
        })
        .chain([match &nccl {
            Ok(file) => format!("NCCL {file}"),
            Err(_) => "NCCL missing (needed for --devices > 1 only)".to_string(),
        }])
        .collect();
    let problems: Vec<&str> = found.iter().filter_map(|(_, r)| r.as_ref().err().map(String::as_str)).collect();
    match problems.is_empty() {
        true if nccl.is_ok() => Ok(states.join(", ")),
        // Runs on one GPU; what NCCL needs is said on its own line.
        true => Ok(format!("{}\n{}", states.join(", "), nccl.err().unwrap_or_default())),
        false => Err([states.join(", ")]
            .into_iter()
            .chain(problems.iter().map(|p| p.to_string()))
            .chain(nccl.err())
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

/// Opens the CUDA backend on GPU `device` (as the driver numbers them). Fails with an actionable
/// message, never a panic, when a library is missing or there is no such GPU.
pub fn open(device: usize) -> Result<CudaBackend<DriverDevice>> {
    Ok(CudaBackend::new(DriverDevice::open(device)?))
}

#[cfg(test)]
mod probe_tests {
    /// Whatever this machine has: one summary line naming every library, then one line per
    /// missing one (what was tried and what to install), never all on one line.
    #[test]
    fn probe_says_each_missing_library_on_its_own_line() {
        let text = match super::probe() {
            Ok(s) | Err(s) => s,
        };
        let mut lines = text.lines();
        let summary = lines.next().expect("a summary line");
        for name in ["driver", "NVRTC", "cuBLAS", "NCCL"] {
            assert!(summary.contains(name), "{summary}");
        }
        let details: Vec<&str> = lines.collect();
        assert_eq!(details.len(), summary.matches(" missing").count(), "{text}");
        assert!(details.iter().all(|l| l.contains("could not be loaded")), "{text}");
    }
}
