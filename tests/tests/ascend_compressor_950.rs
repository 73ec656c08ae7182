//! `aclnnCompressor` on the emulator posing as an Ascend 950 (`Ascend950PR_9599`): a model with the
//! kernel's widths runs its three compressors (CSA attention, its indexer, HCA) on the kernel in
//! `bf16`, prefill and decode, against the same SoC with the kernel off and against the CPU
//! (`dsv4_tests::fused_compressor`). A separate test binary, because the SoC is fixed for the
//! process. Emulator-verified, not hardware-verified.

#[test]
fn compressors_run_on_aclnn_compressor_on_a_950() {
    let r = dsv4_tests::fused_compressor::run_on("Ascend950PR_9599");
    dsv4_tests::fused_compressor::judge(&r);
}
