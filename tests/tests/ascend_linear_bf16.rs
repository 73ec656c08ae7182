//! The projections at a rounding point (`Backend::linear_act`) in `--precision bf16` on
//! Ascend (the emulator, Atlas A2 profile): one BF16 aclnnMatmul on the weight as stored, where
//! the composition widens the weight to an F32 copy per call (issue 13: weights "never
//! widened to f32 on the device"). `aclnnMatmul.md` (hicann/ops-nn, `matmul/mat_mul_v3/docs/`)
//! documents BFLOAT16 self/mat2/out on Atlas A2/A3 and the 950, f32 accumulation in the cube.
//!
//! The emulator's launch counters are process-global, so every test here holds `COUNTING`.

use std::sync::{Mutex, MutexGuard};

use dsv4_backend_ascend::{emulator_launches, AscendBackend, FusedPolicy};
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::{Backend, Precision};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};

static COUNTING: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    COUNTING.lock().unwrap_or_else(|p| p.into_inner())
}

fn backend(policy: FusedPolicy) -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open_with(0, policy).unwrap_or_else(|e| panic!("{e}"))
}

/// Deterministic values in (-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Round to nearest BF16, ties to even (finite values).
fn bf16(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    Bf16,
    /// FP4 e2m1 with an E8M0 scale per 32: INT8 + BF16 group scales on the device.
    Fp4,
    /// F32 values BF16 does not hold.
    F32,
}

fn weight(form: Form, rows: usize, cols: usize) -> StoredWeight {
    let v = values(11, rows * cols);
    match form {
        Form::Bf16 => {
            let bytes = v.iter().flat_map(|x| ((bf16(*x).to_bits() >> 16) as u16).to_le_bytes()).collect();
            StoredWeight::float(HostTensor::from_bytes("w", DType::BF16, vec![rows, cols], bytes).unwrap()).unwrap()
        }
        Form::Fp4 => {
            let (packed, scales) = dsv4_core::quant::quantize_fp4_group(&v, rows, cols);
            let data = HostTensor::from_bytes("w", DType::I8, vec![rows, cols / 2], packed).unwrap();
            let scale = HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![rows, cols / 32], scales).unwrap();
            StoredWeight::detect(&data, Some(&scale), &[rows, cols]).unwrap()
        }
        Form::F32 => StoredWeight::float(HostTensor::from_f32("w", vec![rows, cols], &v).unwrap()).unwrap(),
    }
}

/// Launches of one kind during a call.
#[derive(Debug, PartialEq)]
struct Launches {
    matmul: u64,
    cast: u64,
    mul: u64,
}

fn counts() -> [u64; 4] {
    ["aclnnMatmul", "aclnnCast", "aclnnMul", "aclnnBatchMatMul"]
        .map(|op| emulator_launches(op).expect("on the emulator"))
}

/// `linear_act` of x `[t, k]` (rounded to BF16 on the device first when `x_bf16`, as the graph's
/// rounding points leave it) through `w`, downloaded, with the launches of the call itself.
fn run(
    be: &AscendBackend,
    x: &[f32],
    t: usize,
    w: &StoredWeight,
    act: Precision,
    x_bf16: bool,
) -> (Vec<f32>, Launches) {
    let k = x.len() / t;
    let mut xt = be.upload(x, &[t, k]).unwrap();
    if x_bf16 {
        xt = be.round_to_bf16(&xt).unwrap();
    }
    let w = be.upload_weight(w).unwrap();
    let before = counts();
    let y = be.linear_act(&xt, &w, act).unwrap();
    let after = counts();
    let l = Launches { matmul: after[0] - before[0], cast: after[1] - before[1], mul: after[2] - before[2] };
    (be.download(&y).unwrap(), l)
}

/// The definition on the CPU backend: `linear` in f32, then rounded to BF16.
fn on_cpu(x: &[f32], t: usize, w: &StoredWeight, act: Precision) -> Vec<f32> {
    let cpu = CpuBackend::new();
    let xt = cpu.round_to_bf16(&cpu.upload(x, &[t, x.len() / t]).unwrap()).unwrap();
    cpu.download(&cpu.linear_act(&xt, &cpu.upload_weight(w).unwrap(), act).unwrap()).unwrap()
}

/// max |a − b| / max |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    a.iter().zip(b).map(|(p, q)| (p - q).abs() as f64).fold(0.0, f64::max) / scale
}

/// One BF16 ulp of the largest output: a sum the two compute a few f32 ulps apart (another
/// summation order) may round to the other BF16 neighbour.
const BF16_ULP: f64 = 1.0 / 256.0;

fn x_values(t: usize, k: usize) -> Vec<f32> {
    values(5, t * k).iter().map(|v| 2.0 * v).collect()
}

/// A BF16 weight: one Matmul on the weight as stored, two Casts (x to BF16, the output back to
/// f32), nothing widened; BF16 values out, within a BF16 ulp of the CPU's definition.
#[test]
fn bf16_weights_run_as_one_bf16_matmul_on_the_weight_as_stored() {
    let _one = serial();
    let be = backend(FusedPolicy::Auto);
    let (t, k, n) = (7, 96, 40);
    let (x, w) = (x_values(t, k), weight(Form::Bf16, n, k));
    let (got, l) = run(&be, &x, t, &w, Precision::Bf16, true);
    assert_eq!(l, Launches { matmul: 1, cast: 2, mul: 0 });
    assert!(got.iter().all(|v| *v == bf16(*v)), "the output holds BF16 values");
    let want = on_cpu(&x, t, &w, Precision::Bf16);
    let e = max_rel(&got, &want);
    println!("BF16 weight: vs the CPU's linear then rounding {e:.3e} (of max |y|)");
    assert!(e <= BF16_ULP, "{e:.3e}");
    // The result is marked as BF16 values: a following projection takes the BF16 path too.
    let w2 = be.upload_weight(&weight(Form::Bf16, 24, n)).unwrap();
    let y = be.upload(&got, &[t, n]).unwrap();
    let y = be.round_to_bf16(&y).unwrap();
    let before = counts();
    be.linear_act(
        &be.linear_act(&y, &w2, Precision::Bf16).unwrap(),
        &be.upload_weight(&weight(Form::Bf16, 8, 24)).unwrap(),
        Precision::Bf16,
    )
    .unwrap();
    assert_eq!(counts()[0] - before[0], 2, "both projections as BF16 matmuls");
}

/// x as a view with an element offset (rows 2.. of a rounded tensor, as a prefill chunk's
/// narrow gives): the BF16 path reads the right rows.
#[test]
fn a_narrowed_input_is_read_from_its_offset() {
    let _one = serial();
    let be = backend(FusedPolicy::Auto);
    let (t, k, n) = (6, 64, 24);
    let (x, w) = (x_values(t, k), weight(Form::Bf16, n, k));
    let full = be.round_to_bf16(&be.upload(&x, &[t, k]).unwrap()).unwrap();
    let part = be.narrow(&full, 0, 2, t - 2).unwrap();
    let wt = be.upload_weight(&w).unwrap();
    let before = counts();
    let got = be.download(&be.linear_act(&part, &wt, Precision::Bf16).unwrap()).unwrap();
    assert_eq!(counts()[0] - before[0], 1, "the BF16 path");
    let e = max_rel(&got, &on_cpu(&x[2 * k..], t - 2, &w, Precision::Bf16));
    assert!(e <= BF16_ULP, "{e:.3e}");
}

/// Values uploaded from the host that are all BF16 values (what `official`'s host quantisation
/// steps upload) take the BF16 path too.
#[test]
fn uploaded_bf16_values_take_the_bf16_path() {
    let _one = serial();
    let be = backend(FusedPolicy::Auto);
    let (t, k, n) = (3, 64, 16);
    let x: Vec<f32> = x_values(t, k).iter().map(|v| bf16(*v)).collect();
    let (got, l) = run(&be, &x, t, &weight(Form::Bf16, n, k), Precision::Bf16, false);
    assert_eq!(l, Launches { matmul: 1, cast: 2, mul: 0 });
    assert!(got.iter().all(|v| *v == bf16(*v)));
}

/// `grouped_linear_act` (attention's `wo_a`): one BF16 BatchMatMul over the groups, on the
/// weight as stored; within a BF16 ulp of the CPU's definition.
#[test]
fn the_grouped_projection_runs_as_one_bf16_batch_matmul() {
    let _one = serial();
    let be = backend(FusedPolicy::Auto);
    let (m, g, k, r) = (5, 4, 32, 24);
    let x = x_values(m * g, k);
    for form in [Form::Bf16, Form::Fp4] {
        let w = weight(form, g * r, k);
        let xt = be.round_to_bf16(&be.upload(&x, &[m, g, k]).unwrap()).unwrap();
        let wt = be.upload_weight(&w).unwrap();
        let before = counts();
        let got = be.download(&be.grouped_linear_act(&xt, &wt, g, Precision::Bf16).unwrap()).unwrap();
        let after = counts();
        assert_eq!(after[3] - before[3], 1, "{form:?}: one BatchMatMul");
        // x to BF16 (and the INT8 codes to BF16); the output goes back through aclnnInplaceCopy.
        let casts = 1 + u64::from(form == Form::Fp4);
        assert_eq!((after[1] - before[1], after[2] - before[2]), (casts, u64::from(form == Form::Fp4)), "{form:?}");
        let cpu = CpuBackend::new();
        let cx = cpu.round_to_bf16(&cpu.upload(&x, &[m, g, k]).unwrap()).unwrap();
        let want = cpu.grouped_linear_act(&cx, &cpu.upload_weight(&w).unwrap(), g, Precision::Bf16).unwrap();
        let e = max_rel(&got, &cpu.download(&want).unwrap());
        println!("{form:?} grouped weight: vs the CPU's grouped_linear then rounding {e:.3e} (of max |y|)");
        assert!(e <= BF16_ULP, "{form:?}: {e:.3e}");
    }
}

/// An FP4 weight (INT8 + BF16 group scales on this A2): multiplied as kept by
/// aclnnWeightQuantBatchMatmulV2 in its per-group form (two Casts: x in, y out; nothing
/// dequantised). With that kernel switched off, dequantised exactly into a BF16 temporary (one
/// more Cast, one Mul), then the BF16 Matmul. Both within a BF16 ulp of the CPU's definition,
/// and, on the emulator, equal to each other bit for bit.
#[test]
fn fp4_weights_run_as_kept_or_dequantised_to_bf16_never_widened() {
    let _one = serial();
    let (t, k, n) = (5, 64, 24);
    let (x, w) = (x_values(t, k), weight(Form::Fp4, n, k));
    let want = on_cpu(&x, t, &w, Precision::Bf16);
    let wq = || emulator_launches("aclnnWeightQuantBatchMatmulV2").expect("on the emulator");
    let be = backend(FusedPolicy::Auto);
    let before = wq();
    let (as_kept, l) = run(&be, &x, t, &w, Precision::Bf16, true);
    assert_eq!((wq() - before, l), (1, Launches { matmul: 0, cast: 2, mul: 0 }));
    let e = max_rel(&as_kept, &want);
    println!("FP4 weight as kept: vs the CPU's linear then rounding {e:.3e} (of max |y|)");
    assert!(e <= BF16_ULP, "{e:.3e}");

    assert_eq!(be.switch_off_fused("aclnnWeightQuantBatchMatmulV2"), 1);
    let before = wq();
    let (dequantised, l) = run(&be, &x, t, &w, Precision::Bf16, true);
    assert_eq!((wq() - before, l), (0, Launches { matmul: 1, cast: 3, mul: 1 }));
    assert_eq!(as_kept, dequantised);
}

/// Where the BF16 matmul would change the result, or is not allowed, the composition runs,
/// and gives exactly `round_to_bf16(linear(x, w))` (or `linear` in f32): an x not known to hold
/// BF16 values, an F32 weight, the f32 precision, `DSV4_ASCEND_FUSED=off`.
#[test]
fn the_composition_runs_where_the_bf16_matmul_does_not_apply() {
    let _one = serial();
    let (t, k, n) = (4, 64, 16);
    let x = x_values(t, k);
    let exact = |be: &AscendBackend, w: &StoredWeight, act: Precision, x_bf16: bool| {
        let mut xt = be.upload(&x, &[t, k]).unwrap();
        if x_bf16 {
            xt = be.round_to_bf16(&xt).unwrap();
        }
        let y = be.linear(&xt, &be.upload_weight(w).unwrap()).unwrap();
        be.download(&act.act_of(be, Ok(y)).unwrap()).unwrap()
    };
    let auto = backend(FusedPolicy::Auto);
    let off = backend(FusedPolicy::Off);
    for (be, form, act, x_bf16, why) in [
        (&auto, Form::Bf16, Precision::Bf16, false, "x not known to hold BF16 values"),
        (&auto, Form::F32, Precision::Bf16, true, "an F32 weight"),
        (&auto, Form::Bf16, Precision::F32, true, "the f32 precision"),
        (&off, Form::Bf16, Precision::Bf16, true, "DSV4_ASCEND_FUSED=off"),
    ] {
        let w = weight(form, n, k);
        let (got, l) = run(be, &x, t, &w, act, x_bf16);
        assert_eq!(got, exact(be, &w, act, x_bf16), "{why}");
        assert_eq!(l.matmul, 1, "{why}");
        // The composition widens a non-F32 weight: a Cast besides the rounding's two.
        let casts = u64::from(form != Form::F32) + if act == Precision::Bf16 { 2 } else { 0 };
        assert_eq!(l.cast, casts, "{why}");
    }
}

/// `dsv4 devices` lists the BF16 linear with its decision, and `=off` switches it off.
#[test]
fn the_bf16_linear_is_a_listed_switchable_kernel() {
    let _one = serial();
    let on = backend(FusedPolicy::Auto);
    let off = backend(FusedPolicy::Off);
    let find =
        |be: &AscendBackend| be.fused_kernels().into_iter().find(|c| c.name.starts_with("linear_act")).expect("listed");
    let (a, b) = (find(&on), find(&off));
    assert!(a.used, "{a:?}");
    assert!(!b.used && b.why.contains("off"), "{b:?}");
}

/// `linear` (f32) on a narrow weight larger than the widening budget runs a block of weight rows
/// at a time, each block's F32 copy within the budget, and gives the bits of the one-copy run:
/// the head of a real model would otherwise take an F32 copy of gigabytes per call.
#[test]
fn a_large_narrow_weight_is_widened_a_block_of_rows_at_a_time() {
    let _one = serial();
    let whole = backend(FusedPolicy::Auto);
    let (t, k, n) = (6, 64, 40);
    let x = x_values(t, k);
    for form in [Form::Bf16, Form::Fp4] {
        let w = weight(form, n, k);
        let once = {
            let y = whole.linear(&whole.upload(&x, &[t, k]).unwrap(), &whole.upload_weight(&w).unwrap()).unwrap();
            whole.download(&y).unwrap()
        };
        // 12 rows a block: 12 + 12 + 12 + 4 (an INT8 weight counts 8 bytes a value).
        let mut blocked = backend(FusedPolicy::Auto);
        let per_value = if form == Form::Fp4 { 8 } else { 4 };
        blocked.set_linear_widen_budget(12 * k * per_value);
        let xt = blocked.upload(&x, &[t, k]).unwrap();
        let wt = blocked.upload_weight(&w).unwrap();
        let before = counts();
        let y = blocked.linear(&xt, &wt).unwrap();
        let matmuls = counts()[0] - before[0];
        assert_eq!(blocked.download(&y).unwrap(), once, "{form:?}");
        assert_eq!(matmuls, 4, "{form:?}: one Matmul per block");
        // One input row (decode), read from an offset: the blocks write the output in place.
        let row = blocked.narrow(&xt, 0, 3, 1).unwrap();
        let y = blocked.download(&blocked.linear(&row, &wt).unwrap()).unwrap();
        assert_eq!(y, once[3 * n..4 * n], "{form:?}: one row");
    }
}
