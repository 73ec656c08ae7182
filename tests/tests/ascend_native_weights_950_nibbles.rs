//! The self-test of the 950's native weight forms at device open, against the emulator posing
//! as a 950 whose FLOAT4_E2M1 reads take the other nibble first (`DSV4_ASCEND_EMU_QUIRKS`
//! `fp4-high-nibble-first`: no doc states the nibble order). The native forms must be switched
//! off with the reason, the weights then take the Atlas A2/A3 forms, and a checkpoint with FP4
//! experts still matches its reference. A separate test binary: the SoC and the quirk are
//! process-wide. Emulator-verified, not hardware-verified.

use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::Backend;

#[test]
fn another_fp4_nibble_order_switches_the_native_forms_off() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    std::env::set_var("DSV4_ASCEND_EMU_QUIRKS", "fp4-high-nibble-first");
    let be =
        dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::Auto).unwrap_or_else(|e| panic!("{e}"));
    let choices = be.fused_kernels();
    let native = choices.iter().find(|c| c.name.contains("kept as stored")).unwrap();
    assert!(!native.used && native.why.contains("self-test FP4 weight"), "{native:?}");

    let case = dsv4_tests::fixtures_dir().join("official_fp8");
    let ckpt = dsv4_core::Checkpoint::open(&case).unwrap();
    let name = "layers.0.ffn.experts.0.w1.weight";
    let shape = ckpt.get(name).map(|t| vec![t.shape[0], t.shape[1] * 2]).unwrap();
    let w = dsv4_core::model::loader::stored_weight(&ckpt, name, &shape).unwrap();
    assert_eq!(be.upload_weight(&w).unwrap().dtype(), Dt::ACL_INT8, "the A2/A3 form of an FP4 expert");

    let err = dsv4_tests::prefill_error(&be, &case);
    assert!(err <= 1e-4, "{err:.3e}");
}
