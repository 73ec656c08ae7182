//! On an Ascend 950 (the emulator posing as one, `DSV4_ASCEND_EMU_SOC`), FP8 e4m3 weights with
//! E8M0 block scales and MXFP4 weights stay on the device as stored (issue 13 point 3: "950:
//! FP8 and MXFP4 ... natively"), taking the bytes `dsv4 inspect --soc 950` and `dsv4 plan`
//! count (`dsv4_core::weight_forms::checkpoint_form`), and compute exactly what the
//! dequantised weight computes. Weights the 950 forms cannot hold (scale bytes out of range,
//! partial column blocks, FP4 groups other than 32) keep the Atlas A2/A3 forms.
//!
//! One test: the SoC is fixed for the process, and the launch counters are process-global.
//! Emulator-verified, not hardware-verified.

use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_backend_ascend::{emulator_launches, AscendBackend, FusedPolicy};
use dsv4_core::backend::{Backend, Precision};
use dsv4_core::model::loader::{expected_mtp_tensors, expected_tensors, mtp_layers_present, stored_weight, TensorRole};
use dsv4_core::parallel::plan::{checkpoint_tensors, part_bytes, WeightTarget};
use dsv4_core::quant::{dequantize, quantize_fp4_group, quantize_fp8_block};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight, WeightFormat};
use dsv4_core::weight_forms::{checkpoint_form, DeviceForm, SocFamily};
use dsv4_core::{Checkpoint, ModelConfig};

/// Deterministic values in (-1, 1), scaled per row so that blocks get different scales.
fn values(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut s = seed;
    (0..rows * cols)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            v * (1.0 + (i / cols % 7) as f32)
        })
        .collect()
}

fn fp8(rows: usize, cols: usize, scale_override: Option<u8>) -> StoredWeight {
    let (codes, mut scales) = quantize_fp8_block(&values(3, rows, cols), rows, cols);
    if let Some(b) = scale_override {
        scales[0] = b;
    }
    let data = HostTensor::from_bytes("w", DType::F8E4M3, vec![rows, cols], codes).unwrap();
    let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
    let scale = HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![sr, sc], scales).unwrap();
    StoredWeight::detect(&data, Some(&scale), &[rows, cols]).unwrap()
}

/// FP8 with every scale byte `scale` and codes whose values times `2^(scale−127)` are all BF16
/// values (magnitudes from 2⁻³ up: no e4m3 subnormals or small exponents).
fn fp8_without_small_codes(rows: usize, cols: usize, scale: u8) -> StoredWeight {
    let codes: Vec<u8> =
        (0..rows * cols).map(|i| (0x30 + (i * 7 % 0x40) as u8) | if i % 3 == 0 { 0x80 } else { 0 }).collect();
    let scales = vec![scale; rows.div_ceil(128) * cols.div_ceil(128)];
    let data = HostTensor::from_bytes("w", DType::F8E4M3, vec![rows, cols], codes).unwrap();
    let scale =
        HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![rows.div_ceil(128), cols.div_ceil(128)], scales).unwrap();
    let w = StoredWeight::detect(&data, Some(&scale), &[rows, cols]).unwrap();
    let v = dequantize(&w).unwrap();
    assert!(v.iter().all(|x| x.is_finite() && x.to_bits() & 0xffff == 0), "every value is a BF16 value");
    w
}

/// FP4 with one E8M0 scale per 16 values (not an MX layout).
fn fp4_groups_of_16(rows: usize, cols: usize) -> StoredWeight {
    let (packed, scales32) = quantize_fp4_group(&values(9, rows, cols), rows, cols);
    let scales: Vec<u8> = scales32.iter().flat_map(|&b| [b, b]).collect();
    let data = HostTensor::from_bytes("w", DType::I8, vec![rows, cols / 2], packed).unwrap();
    let scale = HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![rows, cols / 16], scales).unwrap();
    // Checkpoint detection only knows groups of 32; other FP4 layouts reach backends as this.
    let format = WeightFormat::Fp4Group { group: 16 };
    StoredWeight { name: "w".into(), shape: vec![rows, cols], format, data, scale: Some(scale) }
}

fn fp4(rows: usize, cols: usize, scale_override: Option<u8>) -> StoredWeight {
    let (packed, mut scales) = quantize_fp4_group(&values(7, rows, cols), rows, cols);
    if let Some(b) = scale_override {
        scales[1] = b;
    }
    let data = HostTensor::from_bytes("w", DType::I8, vec![rows, cols / 2], packed).unwrap();
    let scale = HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![rows, cols.div_ceil(32)], scales).unwrap();
    StoredWeight::detect(&data, Some(&scale), &[rows, cols]).unwrap()
}

/// The same weight as plain values: F32, or BF16 when `bf16` (None when not every value is a
/// BF16 value).
fn dequantised(w: &StoredWeight, bf16: bool) -> Option<StoredWeight> {
    let v = dequantize(w).unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let t = if bf16 {
        if v.iter().any(|x| x.to_bits() & 0xffff != 0) {
            return None;
        }
        let bytes = v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
        HostTensor::from_bytes("w (dequantised)", DType::BF16, w.shape.clone(), bytes).unwrap()
    } else {
        HostTensor::from_f32("w (dequantised)", w.shape.clone(), &v).unwrap()
    };
    Some(StoredWeight::float(t).unwrap())
}

fn launches(op: &str) -> u64 {
    emulator_launches(op).expect("on the emulator")
}

/// `linear` (f32) and `linear_act` in bf16 through the kept weight equal, bit for bit, the same
/// calls through the dequantised weight: the emulator sums in the same order, so any
/// difference is a wrong value in the kept form or in its widening.
fn same_as_dequantised(be: &AscendBackend, w: &StoredWeight, what: &str) {
    let (n, k) = (w.shape[0], w.shape[1]);
    let t = 5;
    let x: Vec<f32> = values(11, t, k).iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
    let xt = be.round_to_bf16(&be.upload(&x, &[t, k]).unwrap()).unwrap();
    let kept = be.upload_weight(w).unwrap();
    let weight_quant = launches("aclnnWeightQuantBatchMatmulV2");
    let plain32 = be.upload_weight(&dequantised(w, false).unwrap()).unwrap();
    let y = |wt| be.download(&be.linear(&xt, wt).unwrap()).unwrap();
    assert_eq!(y(&kept), y(&plain32), "{what}: f32 linear");
    if let Some(plain16) = dequantised(w, true) {
        let plain16 = be.upload_weight(&plain16).unwrap();
        let yb = |wt| be.download(&be.linear_act(&xt, wt, Precision::Bf16).unwrap()).unwrap();
        assert_eq!(yb(&kept), yb(&plain16), "{what}: bf16 linear_act");
    }
    // MXFP4, and the INT8 form with groups the per-group mode takes (multiples of 32 below K),
    // are multiplied as kept in bf16, not dequantised.
    let per_group = matches!(w.format, WeightFormat::Fp4Group { group } if group % 32 == 0 && group < k);
    // (The MX mode wants an even N.)
    let as_kept = (kept.dtype() == Dt::ACL_FLOAT4_E2M1 && n % 2 == 0) || (kept.dtype() == Dt::ACL_INT8 && per_group);
    assert_eq!(launches("aclnnWeightQuantBatchMatmulV2") > weight_quant, as_kept, "{what}");
    let g = 1 + usize::from(n % 2 == 0);
    let xg = be.round_to_bf16(&be.upload(&x.repeat(g), &[t, g, k]).unwrap()).unwrap();
    let yg = |wt| be.download(&be.grouped_linear(&xg, wt, g).unwrap()).unwrap();
    assert_eq!(yg(&kept), yg(&plain32), "{what}: f32 grouped_linear");
}

#[test]
fn fp8_and_mxfp4_weights_stay_as_stored_on_a_950() {
    dsv4_tests::use_ascend_emulator();
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    let mut be = dsv4_backend_ascend::open_with(0, FusedPolicy::Auto).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.soc(), "Ascend950PR_9599");
    let used: Vec<&str> = be.fused_kernels().iter().filter(|c| c.used).map(|c| c.name).collect();
    assert!(used.iter().any(|u| u.contains("aclnnWeightQuantBatchMatmulV2")), "{used:?}");
    assert!(used.iter().any(|u| u.contains("FP8 blocks and MXFP4 kept as stored")), "{used:?}");

    // The kept dtype and the device bytes are what `checkpoint_form` says for the 950, for
    // weights it keeps natively and for those it does not.
    let cases = [
        // FP8, whole column blocks; 200 rows: a partial last row block.
        ("fp8 200x256", fp8(200, 256, None), Dt::ACL_FLOAT8_E4M3FN),
        // A scale byte outside 3..=246: not every value is a BF16 value, so F32 (as on A2/A3).
        ("fp8 scale byte 2", fp8(128, 128, Some(2)), Dt::ACL_FLOAT),
        // ... even where this weight's values all are (no codes small enough to leave BF16):
        // the form follows the scale bytes, as `dsv4 plan` counts it, not the data.
        ("fp8 scale byte 2, no small codes", fp8_without_small_codes(128, 128, 2), Dt::ACL_FLOAT),
        // Columns that are no whole number of blocks: BF16, as on A2/A3.
        ("fp8 128x200", fp8(128, 200, None), Dt::ACL_BF16),
        ("mxfp4 48x96", fp4(48, 96, None), Dt::ACL_FLOAT4_E2M1),
        // An odd number of rows: kept as MXFP4, but the MX matmul wants an even N.
        ("mxfp4 7x64", fp4(7, 64, None), Dt::ACL_FLOAT4_E2M1),
        // Scale byte 0 (2⁻¹²⁷, an F32 subnormal): the INT8 form (`MXFP4_NATIVE_SCALES`).
        ("mxfp4 scale byte 0", fp4(8, 64, Some(0)), Dt::ACL_INT8),
        // FP4 with 16-value groups: MX takes 32 only, so the INT8 form.
        ("fp4 groups of 16", fp4_groups_of_16(8, 64), Dt::ACL_INT8),
    ];
    for (what, w, dtype) in &cases {
        let form = checkpoint_form(w, SocFamily::A5);
        let kept = be.upload_weight(w).unwrap();
        assert_eq!(kept.dtype(), *dtype, "{what}: kept as {form:?}");
        // What `dsv4 plan` counts for the whole matrix.
        let want = part_bytes(form, &(0..w.shape[0]), &(0..w.shape[1]));
        assert_eq!(kept.device_bytes(), want, "{what}: device bytes of {form:?}");
        let native = matches!(form, DeviceForm::Fp8Blocks { .. } | DeviceForm::Mxfp4 { .. });
        assert_eq!(native, matches!(*dtype, Dt::ACL_FLOAT8_E4M3FN | Dt::ACL_FLOAT4_E2M1), "{what}: {form:?}");
    }
    assert_eq!(fp4(48, 96, None).shape, [48, 96]);
    let mx = be.upload_weight(&fp4(48, 96, None)).unwrap();
    assert_eq!(mx.device_bytes(), 48 * 96 / 2 + 48 * 3, "0.5 + 1/32 bytes per value");

    // The values: every case, f32 and bf16, against the dequantised weight.
    let casts = launches("aclnnCast");
    for (what, w, _) in &cases {
        same_as_dequantised(&be, w, what);
    }
    assert!(launches("aclnnCast") > casts);

    // Every weight of every fixture checkpoint: what the backend keeps takes the bytes `dsv4
    // plan` / `dsv4 inspect --soc 950` count for it (`checkpoint_tensors`).
    let (mut native, mut total) = (0, 0);
    for case in dsv4_tests::fixtures_dir().read_dir().unwrap().map(|e| e.unwrap().path()) {
        let Ok(ckpt) = Checkpoint::open(&case) else { continue };
        let cfg = ModelConfig::from_dir(&case).unwrap();
        let planned = checkpoint_tensors(&cfg, &ckpt, WeightTarget::Soc(SocFamily::A5)).unwrap();
        let mut expected = expected_tensors(&cfg, &ckpt);
        for i in mtp_layers_present(&cfg, &ckpt) {
            expected.extend(expected_mtp_tensors(&cfg, &ckpt, i));
        }
        for e in expected.iter().filter(|e| e.role == TensorRole::Weight) {
            let plan = planned.iter().find(|p| p.name == e.name).expect("planned");
            let kept = be.upload_weight(&stored_weight(&ckpt, &e.name, &e.shape).unwrap()).unwrap();
            let rows = e.shape[0];
            let cols = e.shape[1..].iter().product::<usize>();
            let what = format!("{}: {}", case.display(), e.name);
            assert_eq!(kept.device_bytes(), part_bytes(plan.form, &(0..rows), &(0..cols)), "{what}: {:?}", plan.form);
            native += usize::from(matches!(plan.form, DeviceForm::Fp8Blocks { .. } | DeviceForm::Mxfp4 { .. }));
            total += 1;
        }
    }
    println!("fixture weights: {total}, {native} of them kept as FP8 / MXFP4");
    assert!(native > 50 && total > native, "{native} native of {total}");

    // Widening in row blocks (the head's path): blocks of 48 rows cut FP8 row blocks of 128 in
    // the middle, so each block's scales start inside a scale row.
    be.set_linear_widen_budget(48 * 256 * 8);
    same_as_dequantised(&be, &fp8(300, 256, None), "fp8 300x256 widened in blocks of 48 rows");
    be.set_linear_widen_budget(48 * 64 * 8);
    same_as_dequantised(&be, &fp4(100, 64, None), "mxfp4 100x64 widened in blocks of 48 rows");
}
