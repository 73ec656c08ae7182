//! The fused-kernel self-tests at device open, against the emulator posing as CANN releases
//! whose kernels differ (`DSV4_ASCEND_EMU_QUIRKS`): MoE gating weights that include the
//! correction bias (an older documented revision), a grouped matmul that rejects FLOAT32, an
//! attention kernel that leaves the sinks out, and a BF16 matmul (and weight-quant matmul) that
//! accumulates in BF16. Each kernel must be switched off with the
//! reason, and the model must still match the
//! reference through the compositions. A separate test binary: the quirks are process-wide.

#[test]
fn kernels_that_disagree_or_fail_are_switched_off_at_open() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var(
        "DSV4_ASCEND_EMU_QUIRKS",
        "gating-bias-in-weights,gmm-no-fp32,sfmla-ignores-sinks,matmul-bf16-accumulates-in-bf16",
    );
    let be = dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::All).unwrap_or_else(|e| panic!("{e}"));
    let choices = be.fused_kernels();
    let gmm = choices.iter().find(|c| c.name.starts_with("moe_experts: aclnnGroupedMatmulV4")).unwrap();
    assert!(!gmm.used && gmm.why.contains("gmm-no-fp32"), "{gmm:?}");
    let gating = choices.iter().find(|c| c.name.contains("sigmoid/softmax")).unwrap();
    assert!(!gating.used && gating.why.contains("self-test disagreed"), "{gating:?}");
    let attention = choices.iter().find(|c| c.name.contains("aclnnSparseFlashMla")).unwrap();
    assert!(!attention.used && attention.why.contains("self-test disagreed"), "{attention:?}");
    // A BF16 matmul that rounds its running sum: the accumulation probe (1 + 255 · 2⁻⁹) tells.
    let linear = choices.iter().find(|c| c.name.starts_with("linear_act")).unwrap();
    assert!(!linear.used && linear.why.contains("self-test disagreed"), "{linear:?}");
    // The weight-quant matmul, summing the same way, is caught by its own probe.
    let weight_quant = choices.iter().find(|c| c.name.contains("aclnnWeightQuantBatchMatmulV2")).unwrap();
    assert!(!weight_quant.used && weight_quant.why.contains("self-test disagreed"), "{weight_quant:?}");

    let case = dsv4_tests::fixtures_dir().join("mixed_f32");
    let err = dsv4_tests::prefill_error(&be, &case);
    assert!(err <= 1e-4, "{err:.3e}");
}
