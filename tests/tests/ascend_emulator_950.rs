//! The conformance suite on the emulator posing as an Ascend 950 (`DSV4_ASCEND_EMU_SOC`), where
//! V4's routing runs on `aclnnMoeGatingTopKV2` (sqrt-softplus scores, top-k with the correction
//! bias, and hash routing) as well as the experts on `aclnnGroupedMatmulV4`. A separate test
//! binary, because the SoC is fixed for the process. Emulator-verified, not hardware-verified.

const TOLERANCE: f64 = 1e-4;

#[test]
fn every_fixture_matches_on_a_950_with_fused_routing() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.soc(), "Ascend950PR_9599");
    let used: Vec<&str> = be.fused_kernels().iter().filter(|c| c.used).map(|c| c.name).collect();
    assert_eq!(used.len(), 3, "{used:?}");
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
    let gating = dsv4_backend_ascend::emulator_launches("aclnnMoeGatingTopKV2").unwrap();
    let gmm = dsv4_backend_ascend::emulator_launches("aclnnGroupedMatmulV4").unwrap();
    let composed_topk = dsv4_backend_ascend::emulator_launches("aclnnTopk").unwrap();
    println!("launches: aclnnMoeGatingTopKV2 {gating}, aclnnGroupedMatmulV4 {gmm}, aclnnTopk {composed_topk}");
    assert!(gating > 0 && gmm > 0);
}
