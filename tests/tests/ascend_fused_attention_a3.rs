//! The fixture suite in `bf16` on the emulator posing as an Atlas A3 (`Ascend910_9391`): the
//! fixture with V4's head sizes (`fused_dims`: D = 512, indexer D = 128) runs its attention on
//! `aclnnSparseFlashMla` and its CSA indexer on `aclnnLightningIndexerV2`, the others compose.
//! Each kernel is judged against the same SoC with only that kernel switched off. A separate
//! test binary, because the SoC is fixed for the process. Emulator-verified, not
//! hardware-verified.

#[test]
fn bf16_fixtures_on_an_a3_with_the_fused_attention() {
    let runs = dsv4_tests::fused_attention::bf16_fixtures_on("Ascend910_9391", "aclnnSparseFlashMla", &[]);
    // Every layer's BF16 pool is padded to a block multiple, so each runs the kernel.
    dsv4_tests::fused_attention::judge(&runs, &["fused_dims"], 1, false);
    // ... and its CSA layer's indexer on aclnnLightningIndexerV2 (the attention composed in
    // both runs, so the picks must be the same sets).
    let runs = dsv4_tests::fused_attention::bf16_fixtures_on(
        "Ascend910_9391",
        "aclnnLightningIndexerV2",
        &["aclnnSparseFlashMla"],
    );
    dsv4_tests::fused_attention::judge(&runs, &["fused_dims"], 1, true);
}
