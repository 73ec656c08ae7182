//! A 950 whose CANN release has no FP8 / FP4 paths in aclnnCast (the emulator's
//! `cast-without-low-precision` quirk): the self-test of the native weight forms fails at
//! device open, which must switch them off with the operator's error instead of failing the
//! open; FP8 and FP4 weights then take the Atlas A2/A3 forms, and fp8 KV rows are refused
//! with that reason. A separate test binary: the SoC
//! and the quirk are process-wide. Emulator-verified, not hardware-verified.

use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::Backend;

#[test]
fn a_cast_without_fp8_and_fp4_keeps_the_a2_a3_forms() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    std::env::set_var("DSV4_ASCEND_EMU_QUIRKS", "cast-without-low-precision");
    let be =
        dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::Auto).unwrap_or_else(|e| panic!("{e}"));
    let native = be.fused_kernels().into_iter().find(|c| c.name.contains("kept as stored")).unwrap();
    assert!(!native.used && native.why.contains("no 8- or 4-bit float types"), "{native:?}");

    let case = dsv4_tests::fixtures_dir().join("official_fp8");
    let ckpt = dsv4_core::Checkpoint::open(&case).unwrap();
    for (name, dtype) in
        [("layers.0.ffn.experts.0.w1.weight", Dt::ACL_INT8), ("layers.0.attn.wq_a.weight", Dt::ACL_BF16)]
    {
        let t = ckpt.get(name).unwrap();
        let shape = if dtype == Dt::ACL_INT8 { vec![t.shape[0], t.shape[1] * 2] } else { t.shape.clone() };
        let w = dsv4_core::model::loader::stored_weight(&ckpt, name, &shape).unwrap();
        assert_eq!(be.upload_weight(&w).unwrap().dtype(), dtype, "{name}");
    }

    // fp8 KV rows are decoded through the same cast: refused, with the self-test's reason.
    let fp8 = dsv4_core::backend::RowFormat::Fp8 { rope: 64 };
    assert!(!be.supports_row_format(fp8));
    let e = be.alloc_pool(4, 512, fp8).err().expect("refused").to_string();
    assert!(
        e.contains("fp8 KV rows") && e.contains("no 8- or 4-bit float types") && e.contains("--kv-dtype bf16"),
        "{e}"
    );
}
