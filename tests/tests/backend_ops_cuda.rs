//! The op-level backend suite (`dsv4_tests::backend_suite`) on the CUDA backend, twice:
//!
//! * `emulated`: on dsv4's CUDA emulator (`tests/cuda-emu`), which compiles the backend's CUDA C
//!   kernel sources as C++ for the host and runs every thread block with one cooperative fiber
//!   per thread. Always runs: this is how CI checks the kernels' numbers without a GPU.
//! * `emulated_reverse_order`: the same with each block's threads started last-first (see there);
//! * `gpu`: on a real GPU through cudarc, when `DSV4_CUDA_DEVICE` names one (`ci/gpu-check.sh`
//!   sets it); otherwise each test prints why it did not run.

mod emulated {
    dsv4_tests::backend_suite!(dsv4_backend_cuda::CudaBackend::new(dsv4_cuda_emu::EmulatedDevice::new()));
}

/// The same suite with every block's threads started last-first: the emulator interleaves
/// threads only at barriers, so a kernel that reads another thread's write without a barrier
/// between them (a race on a GPU) passes in at most one of the two orders.
mod emulated_reverse_order {
    dsv4_tests::backend_suite!(dsv4_backend_cuda::CudaBackend::new(
        dsv4_cuda_emu::EmulatedDevice::reverse_thread_order()
    ));
}

mod gpu {
    dsv4_tests::backend_suite!(match dsv4_tests::cuda_gpu() {
        Some(be) => be,
        None => return,
    });
}
