//! The op-level backend suite on the Ascend backend, running on dsv4's CPU emulator of
//! AscendCL / aclnn (`tests/ascend-emu`, loaded through `DSV4_ASCEND_EMULATOR` like a CANN
//! install), with the fused kernels the emulated SoC has. Emulator-verified, not
//! hardware-verified.

/// The Ascend backend on the emulator.
fn ascend() -> dsv4_backend_ascend::AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"))
}

dsv4_tests::backend_suite!(ascend());
