//! The conformance suite on the Ascend backend, running on dsv4's CPU emulator of AscendCL /
//! aclnn (`tests/ascend-emu`, loaded through `DSV4_ASCEND_EMULATOR` like a CANN install):
//! every fixture's prefill logits, and decode / chunked prefill against the full forward,
//! with the CPU backend's tolerances. Emulator-verified, not hardware-verified.

use dsv4_backend_ascend::AscendBackend;
use dsv4_core::Backend;

const TOLERANCE: f64 = 1e-4;

/// The Ascend backend on the emulator.
fn backend() -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_fixture_matches_the_reference_on_the_emulator() {
    let be = backend();
    assert!(be.describe().contains("emulator"), "{}", be.describe());
    // An A2 device runs V4 (a 310P says it cannot: `ascend_emulator_310p.rs`).
    assert_eq!(be.unable_to_run_v4(), None);
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
}

/// The fixture at `aclnnCompressor`'s widths (`tests/fixtures/wide/compressor_dims`), composed
/// in f32 on the A2 (the kernel runs in bf16 on A3 / 950 only: `ascend_compressor_*.rs`).
#[test]
fn the_wide_fixture_matches_the_reference_on_the_emulator() {
    let err = dsv4_tests::prefill_error(&backend(), &dsv4_tests::wide_case("compressor_dims"));
    println!("compressor_dims prefill on the emulator: max rel err {err:.2e}");
    assert!(err <= TOLERANCE, "{err:.3e}");
}

#[test]
fn decode_and_chunked_prefill_match_the_full_forward_on_the_emulator() {
    dsv4_tests::check_decode_schedules(&backend(), TOLERANCE);
}

/// The default SoC (Ascend910B3, Atlas A2) takes the grouped-matmul MoE, but not the fused
/// routing: V4's sqrt-softplus gating kernel is 950-only, so routing is composed here.
#[test]
fn atlas_a2_uses_grouped_matmul_for_the_experts() {
    let be = backend();
    let used: Vec<&str> = be.fused_kernels().iter().filter(|c| c.used).map(|c| c.name).collect();
    assert!(used.iter().any(|n| n.contains("aclnnGroupedMatmulV4")), "{used:?}");
    assert!(!used.iter().any(|n| n.contains("sqrt-softplus")), "{used:?}");
    let case = dsv4_tests::fixtures_dir().join("mixed_f32");
    let before = dsv4_backend_ascend::emulator_launches("aclnnGroupedMatmulV4").unwrap();
    let model = dsv4_tests::load_model(&be, &case);
    let r = dsv4_tests::read_reference(&case);
    let logits =
        be.download(&model.forward(&be, &dsv4_core::Batch::prefill(&[&r.input_ids]).unwrap()).unwrap()).unwrap();
    assert!(dsv4_tests::max_rel_err(&logits, &r.logits) <= TOLERANCE);
    let after = dsv4_backend_ascend::emulator_launches("aclnnGroupedMatmulV4").unwrap();
    // Three projections per MoE layer (more when chunked).
    assert!(after >= before + 3 * model.blocks.len() as u64, "{before} -> {after}");
}

/// One expert per grouped matmul (the chunking large experts take) gives the same logits.
#[test]
fn grouped_matmul_in_one_expert_chunks_matches_the_reference() {
    let mut be = backend();
    be.set_grouped_matmul_budget(1);
    for name in ["mixed_f32", "bf16", "fused_dims"] {
        let case = dsv4_tests::fixtures_dir().join(name);
        let model = dsv4_tests::load_model(&be, &case);
        let r = dsv4_tests::read_reference(&case);
        let batch = dsv4_core::Batch::prefill(&[&r.input_ids]).unwrap();
        let logits = be.download(&model.forward(&be, &batch).unwrap()).unwrap();
        let err = dsv4_tests::max_rel_err(&logits, &r.logits);
        assert!(err <= TOLERANCE, "{name}: {err:.3e}");
    }
}

/// With DSV4_ASCEND_FUSED=off every fused op is the trait's composition, which must pass the
/// same suite (the fallback for SoCs and CANN releases without the kernels).
#[test]
fn every_fixture_matches_with_fused_kernels_off() {
    let _ = backend();
    let be = dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::Off).unwrap();
    assert!(be.fused_kernels().iter().all(|c| !c.used && c.why.contains("off")));
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
}

/// Token-by-token decoding repeats the same operand layouts every step, so most aclnn calls
/// relaunch a cached repeatable executor with new addresses instead of planning again, and the
/// logits still match (the emulator computes a relaunch on the addresses it was given).
#[test]
fn decode_reuses_executors_and_still_matches() {
    let be = backend();
    let case = dsv4_tests::fixtures_dir().join("odd_hc2");
    let model = dsv4_tests::load_model(&be, &case);
    let r = dsv4_tests::read_reference(&case);
    let (hits0, misses0) = be.executor_cache_stats().expect("the emulator has the executor API");
    let got = dsv4_tests::run_in_steps(&be, &model, &r.input_ids, &vec![1; r.input_ids.len()]);
    let err = dsv4_tests::max_rel_err(&got, &r.logits);
    assert!(err <= TOLERANCE, "{err:.3e}");
    let (hits, misses) = be.executor_cache_stats().unwrap();
    let (hits, misses) = (hits - hits0, misses - misses0);
    println!("executor cache over {} decode steps: {hits} hits, {misses} misses", r.input_ids.len());
    assert!(hits > 10 * misses, "{hits} hits, {misses} misses");
    let plans = dsv4_backend_ascend::emulator_plans("aclnnMatmul").unwrap();
    let launches = dsv4_backend_ascend::emulator_launches("aclnnMatmul").unwrap();
    assert!(plans < launches, "aclnnMatmul planned {plans} times for {launches} launches");
}

/// FP4 experts are kept in their exact INT8 form (codes doubled, one BF16 scale per 32:
/// `dsv4_core::weight_forms`), 1.0625 bytes per value instead of BF16's 2, and multiply exactly
/// as their dequantised values do on the CPU; a row length that is not a whole number of groups
/// keeps the dequantised form.
#[test]
fn fp4_weights_are_kept_as_int8_with_group_scales() {
    use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
    let be = backend();
    let cpu = dsv4_backend_cpu::CpuBackend::new();
    for (n, k) in [(48, 96), (5, 64), (3, 40)] {
        let v: Vec<f32> = (0..n * k).map(|i| (((i * 37) % 101) as f32 - 50.0) * 0.013).collect();
        let (packed, scales) = dsv4_core::quant::quantize_fp4_group(&v, n, k);
        let data = HostTensor::from_bytes("w.weight", DType::I8, vec![n, k / 2], packed).unwrap();
        let scale = HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![n, k.div_ceil(32)], scales).unwrap();
        let sw = StoredWeight::detect(&data, Some(&scale), &[n, k]).unwrap();
        let w = be.upload_weight(&sw).unwrap();
        if k % 32 == 0 {
            assert_eq!(w.dtype(), dsv4_ascend_sys::aclDataType::ACL_INT8);
            assert_eq!(w.device_bytes(), n * k + 2 * n * k / 32, "{n}x{k}");
        } else {
            assert_eq!(w.dtype(), dsv4_ascend_sys::aclDataType::ACL_BF16, "{n}x{k}: partial group");
        }
        let x: Vec<f32> = (0..7 * k).map(|i| ((i * 13) % 17) as f32 * 0.25 - 2.0).collect();
        let got = be.download(&be.linear(&be.upload(&x, &[7, k]).unwrap(), &w).unwrap()).unwrap();
        let cw = cpu.upload_weight(&sw).unwrap();
        let want = cpu.download(&cpu.linear(&cpu.upload(&x, &[7, k]).unwrap(), &cw).unwrap()).unwrap();
        // Same exact weight values; only the summation order of the two GEMMs differs.
        let err = dsv4_tests::max_rel_err(&got, &want);
        assert!(err <= 1e-6, "{n}x{k}: {err:.2e}");
        // The same weight with F32 scales (a Base checkpoint's form) is not put in the INT8 form,
        // and still loads and multiplies the same.
        let f32_scales: Vec<u8> =
            scale.bytes().iter().flat_map(|&b| dsv4_core::quant::e8m0_to_f32(b).unwrap().to_le_bytes()).collect();
        let scale32 = HostTensor::from_bytes("w.scale", DType::F32, vec![n, k.div_ceil(32)], f32_scales).unwrap();
        let sw32 = StoredWeight::detect(&data, Some(&scale32), &[n, k]).unwrap();
        let w32 = be.upload_weight(&sw32).unwrap();
        assert_ne!(w32.dtype(), dsv4_ascend_sys::aclDataType::ACL_INT8, "{n}x{k}: F32 scales");
        let got32 = be.download(&be.linear(&be.upload(&x, &[7, k]).unwrap(), &w32).unwrap()).unwrap();
        assert!(dsv4_tests::max_rel_err(&got32, &want) <= 1e-6, "{n}x{k}: F32 scales");
    }
}
