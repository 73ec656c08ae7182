//! The conformance suite on the emulator posing as an Ascend 950 (`DSV4_ASCEND_EMU_SOC`), where
//! V4's routing runs on `aclnnMoeGatingTopKV2` (sqrt-softplus scores, top-k with the correction
//! bias, and hash routing) as well as the experts on `aclnnGroupedMatmulV4`; then the suite in
//! bf16, where the attention of the fixture with V4's head size runs on `aclnnSparseFlashMla`.
//! A separate test binary, because the SoC is fixed for the process. Emulator-verified, not
//! hardware-verified.

const TOLERANCE: f64 = 1e-4;

#[test]
fn every_fixture_matches_on_a_950_with_fused_kernels() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    let be = dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::All).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.soc(), "Ascend950PR_9599");
    let used: Vec<&str> = be.fused_kernels().iter().filter(|c| c.used).map(|c| c.name).collect();
    for kernel in ["aclnnGroupedMatmulV4", "(sqrt-softplus scores, V4): aclnnMoeGatingTopKV2", "aclnnSparseFlashMla"] {
        assert!(used.iter().any(|u| u.contains(kernel)), "{kernel} not in use: {used:?}");
    }
    let self_test = dsv4_backend_ascend::emulator_launches("aclnnSparseFlashMla").unwrap();
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
    let gating = dsv4_backend_ascend::emulator_launches("aclnnMoeGatingTopKV2").unwrap();
    let gmm = dsv4_backend_ascend::emulator_launches("aclnnGroupedMatmulV4").unwrap();
    let composed_topk = dsv4_backend_ascend::emulator_launches("aclnnTopk").unwrap();
    println!("launches: aclnnMoeGatingTopKV2 {gating}, aclnnGroupedMatmulV4 {gmm}, aclnnTopk {composed_topk}");
    assert!(gating > 0 && gmm > 0);
    // f32 activations never take the BF16 attention kernel.
    assert_eq!(dsv4_backend_ascend::emulator_launches("aclnnSparseFlashMla"), Some(self_test));

    // bf16: the fixture with V4's head size runs its attention on aclnnSparseFlashMla (every
    // layer: BF16 pools are padded to a multiple of 16 rows).
    let runs = dsv4_tests::fused_attention::bf16_fixtures_on("Ascend950PR_9599", "aclnnSparseFlashMla", &[]);
    dsv4_tests::fused_attention::judge(&runs, &["fused_dims"], 1, false);
    // ... and its CSA layer's indexer on aclnnLightningIndexerV2 (the attention composed in
    // both runs, so the picks must be the same sets).
    let runs = dsv4_tests::fused_attention::bf16_fixtures_on(
        "Ascend950PR_9599",
        "aclnnLightningIndexerV2",
        &["aclnnSparseFlashMla"],
    );
    dsv4_tests::fused_attention::judge(&runs, &["fused_dims"], 1, true);

    // With the fused kernels off, V4's routing cannot run on a 950 (no aclnnSoftplus there):
    // the error says so and names the switch, instead of the operator's bare error code.
    use dsv4_core::backend::{Backend, UnaryOp};
    let off = dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::Off).unwrap();
    let e = off.unary(&off.upload(&[1.0, -2.0], &[2]).unwrap(), UnaryOp::Softplus).err().expect("refused").to_string();
    assert!(e.contains("no aclnnSoftplus") && e.contains("DSV4_ASCEND_FUSED=off"), "{e}");
}
