//! On the emulator posing as an Atlas A2 (`Ascend910B3`), which `aclnnCompressor.md` lists as
//! unsupported, the same model composes its compressors: the kernel is not chosen, never
//! launches, and the logits are the kernel-off run's (`dsv4_tests::fused_compressor`).

#[test]
fn compressors_compose_on_an_a2() {
    let r = dsv4_tests::fused_compressor::run_on("Ascend910B3");
    assert!(!r.used, "the kernel was chosen on an A2");
    assert!(r.why.contains("not supported on Ascend910B3"), "{}", r.why);
    assert_eq!(r.launches, 0);
    assert!(r.ops.iter().all(|op| op.launches == 0), "{:?}", r.ops);
    assert_eq!(r.vs_off, 0.0);
    assert!(r.vs_cpu <= dsv4_tests::fused_compressor::VS_CPU, "vs the CPU {:.2e}", r.vs_cpu);
    assert_eq!(r.fixture_launches, 0);
    assert_eq!((r.official_launches, r.official_vs_off), (0, 0.0));
    assert_eq!(r.fixture_vs_reference, r.fixture_off_vs_reference);
    dsv4_tests::fused_compressor::judge_fixture(&r);
}
