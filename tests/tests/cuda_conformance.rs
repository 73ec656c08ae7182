//! The conformance suite on the CUDA backend: every fixture's prefill logits, and decode /
//! chunked prefill against the full forward, with the CPU backend's tolerance (1e-4: the CUDA
//! backend keeps activations in f32 and accumulates GEMMs in f32, like the CPU reference).
//!
//! On dsv4's CUDA emulator (`tests/cuda-emu`: the kernel sources run on the host) always, so the
//! kernels' numbers are checked in CI; on a real GPU only when `DSV4_CUDA_DEVICE` is set
//! (`ci/gpu-check.sh`; it passed on an H200 on 2026-12-04).

use dsv4_backend_cuda::CudaBackend;
use dsv4_core::Backend;

const TOLERANCE: f64 = 1e-4;

fn emulated() -> CudaBackend<dsv4_cuda_emu::EmulatedDevice> {
    CudaBackend::new(dsv4_cuda_emu::EmulatedDevice::new())
}

#[test]
fn every_fixture_matches_the_reference_on_the_emulator() {
    let be = emulated();
    assert!(be.describe().contains("emulator"), "{}", be.describe());
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
}

#[test]
fn decode_and_chunked_prefill_match_the_full_forward_on_the_emulator() {
    dsv4_tests::check_decode_schedules(&emulated(), TOLERANCE);
}

#[test]
fn every_fixture_matches_the_reference_on_a_gpu() {
    let Some(be) = dsv4_tests::cuda_gpu() else { return };
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
    dsv4_tests::check_decode_schedules(&be, TOLERANCE);
}
