//! The routed experts in `--precision bf16` on Ascend (the emulator, Atlas A2 profile): the
//! grouped matmuls run in BF16 on the weights as stored, with nothing widened to F32.
//!
//! What `aclnnGroupedMatmulV4.md` (hicann/ops-transformer, `gmm/grouped_matmul/docs/`) allows:
//! the non-quantised BF16 form (x, weight, out BFLOAT16) on A2/A3/950; the A16W8 antiquant form
//! (x BFLOAT16/FLOAT16, weight INT8, `antiquantScaleOptional`) per-channel only (scale `[E, N]`),
//! per-group scales for INT4 weights only. dsv4's FP4 experts are INT8 with a BF16 scale per 32
//! values of K, so they are dequantised (exactly) into BF16 temporaries and run in the BF16
//! form; BF16 experts run as stored.
//!
//! The emulator's launch counters are process-global, so every test here holds `COUNTING`.

use std::ptr::{null, null_mut};
use std::sync::{Mutex, MutexGuard};

use dsv4_ascend_sys::*;
use dsv4_backend_ascend::{emulator_launches, AscendBackend};
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::{composed, Backend, ExpertWeights, Precision};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_tests::raw_acl;

static COUNTING: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    COUNTING.lock().unwrap_or_else(|p| p.into_inner())
}

fn backend() -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"))
}

/// How the experts' weights are stored in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    /// FP4 e2m1 with an E8M0 scale per 32: INT8 + BF16 group scales on the device.
    Fp4,
    Bf16,
    /// F32 values that BF16 does not hold: the f32 form even in bf16.
    F32,
}

/// Deterministic values in (-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn bf16(v: f32) -> f32 {
    // Round to nearest, ties to even (finite values).
    let b = v.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

fn stored(form: Form, name: &str, rows: usize, cols: usize, v: &[f32]) -> StoredWeight {
    match form {
        Form::Fp4 => {
            let (packed, scales) = dsv4_core::quant::quantize_fp4_group(v, rows, cols);
            let data = HostTensor::from_bytes(name, DType::I8, vec![rows, cols / 2], packed).unwrap();
            let scale = HostTensor::from_bytes(format!("{name}.scale"), DType::F8E8M0, vec![rows, cols / 32], scales);
            StoredWeight::detect(&data, Some(&scale.unwrap()), &[rows, cols]).unwrap()
        }
        Form::Bf16 => {
            let bytes = v.iter().flat_map(|x| ((bf16(*x).to_bits() >> 16) as u16).to_le_bytes()).collect();
            StoredWeight::float(HostTensor::from_bytes(name, DType::BF16, vec![rows, cols], bytes).unwrap()).unwrap()
        }
        Form::F32 => StoredWeight::float(HostTensor::from_f32(name, vec![rows, cols], v).unwrap()).unwrap(),
    }
}

/// One MoE call: x `[T, D]` (BF16 values, as the graph's ffn_norm output in bf16), top-k ids in
/// non-ascending order with expert 5 unused, routing weights, and the experts' stored weights.
struct Case {
    t: usize,
    d: usize,
    k: usize,
    x: Vec<f32>,
    ids: Vec<i32>,
    w: Vec<f32>,
    experts: Vec<ExpertWeights<StoredWeight>>,
    /// Experts some token uses.
    active: u64,
}

fn case(form: Form) -> Case {
    let (t, d, i, e, k) = (9, 64, 32, 6, 2);
    let mut rng = Rng(7);
    let x: Vec<f32> = rng.vec(t * d).iter().map(|v| bf16(2.0 * v)).collect();
    // Two distinct experts of 0..5 per token, not always ascending.
    let ids: Vec<i32> = (0..t)
        .flat_map(|ti| {
            let a = (ti * 3 + 1) % 5;
            [a as i32, ((a + 1 + ti % 4) % 5) as i32]
        })
        .collect();
    let w: Vec<f32> = rng.vec(t * k).iter().map(|v| 0.3 + v.abs()).collect();
    let experts = (0..e)
        .map(|n| ExpertWeights {
            w1: stored(form, &format!("e{n}.w1"), i, d, &rng.vec(i * d)),
            w2: stored(form, &format!("e{n}.w2"), d, i, &rng.vec(d * i)),
            w3: stored(form, &format!("e{n}.w3"), i, d, &rng.vec(i * d)),
            low_bit: form == Form::Fp4,
        })
        .collect();
    let mut used: Vec<i32> = ids.clone();
    used.sort();
    used.dedup();
    assert!(!used.contains(&5));
    Case { t, d, k, x, ids, w, experts, active: used.len() as u64 }
}

fn upload<B: Backend>(be: &B, c: &Case) -> Vec<ExpertWeights<B::Weight>> {
    c.experts
        .iter()
        .map(|e| ExpertWeights {
            w1: be.upload_weight(&e.w1).unwrap(),
            w2: be.upload_weight(&e.w2).unwrap(),
            w3: be.upload_weight(&e.w3).unwrap(),
            low_bit: e.low_bit,
        })
        .collect()
}

/// Launches of one kind during a call.
#[derive(Debug, PartialEq)]
struct Launches {
    gmm: u64,
    cast: u64,
    mul: u64,
}

fn counts() -> [u64; 3] {
    ["aclnnGroupedMatmulV4", "aclnnCast", "aclnnMul"].map(|op| emulator_launches(op).expect("on the emulator"))
}

/// `moe_experts` on the backend (downloaded) and the launches it made.
fn run<B: Backend>(be: &B, c: &Case, experts: &[ExpertWeights<B::Weight>], act: Precision) -> (Vec<f32>, Launches) {
    let (x, w) = (be.upload(&c.x, &[c.t, c.d]).unwrap(), be.upload(&c.w, &[c.t, c.k]).unwrap());
    let before = counts();
    let y = be.moe_experts(&x, &c.ids, &w, experts, 10.0, act).unwrap();
    let after = counts();
    let l = Launches { gmm: after[0] - before[0], cast: after[1] - before[1], mul: after[2] - before[2] };
    (be.download(&y).unwrap(), l)
}

/// The composition (`composed::moe_experts`: per expert Matmul in f32, then rounded to BF16).
fn composition(
    be: &AscendBackend,
    c: &Case,
    experts: &[ExpertWeights<<AscendBackend as Backend>::Weight>],
) -> Vec<f32> {
    let (x, w) = (be.upload(&c.x, &[c.t, c.d]).unwrap(), be.upload(&c.w, &[c.t, c.k]).unwrap());
    be.download(&composed::moe_experts(be, &x, &c.ids, &w, experts, 10.0, Precision::Bf16).unwrap()).unwrap()
}

/// max |a − b| / max |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    a.iter().zip(b).map(|(p, q)| (p - q).abs() as f64).fold(0.0, f64::max) / scale
}

/// Within BF16 output rounding: a value the two compute a few f32 ulps apart may round to the
/// other BF16 neighbour, 2^-8 of the largest output at most here.
const BF16_ULP: f64 = 1.0 / 256.0;

/// FP4 experts (INT8 + a BF16 scale per 32) in bf16: the grouped matmuls run in BF16, each
/// expert dequantised by one INT8→BF16 Cast and one Mul per projection; no F32 widening (which
/// takes two Casts per expert and projection); the result is the composition's and the CPU
/// backend's within BF16 rounding.
#[test]
fn fp4_experts_in_bf16_run_the_bf16_grouped_matmul_without_widening() {
    let _one = serial();
    let be = backend();
    let c = case(Form::Fp4);
    let experts = upload(&be, &c);
    assert!(experts.iter().all(|e| e.w1.dtype() == aclDataType::ACL_INT8 && e.w2.dtype() == aclDataType::ACL_INT8));
    let (got, l) = run(&be, &c, &experts, Precision::Bf16);
    // One chunk: x to BF16 once; per chunk the outputs of w1, w3, w2 back to f32 and the SwiGLU
    // output to BF16; per active expert and projection one INT8 → BF16 Cast and one Mul; per
    // chunk two Muls (the SwiGLU's product and the routing weights).
    let a = c.active;
    assert_eq!(l, Launches { gmm: 3, cast: 1 + 4 + 3 * a, mul: 3 * a + 2 }, "{a} active experts");
    assert!(got.iter().all(|v| v.is_finite()));
    let want = composition(&be, &c, &experts);
    let cpu = CpuBackend::new();
    let (on_cpu, _) = run(&cpu, &c, &upload(&cpu, &c), Precision::Bf16);
    let (e_comp, e_cpu) = (max_rel(&got, &want), max_rel(&got, &on_cpu));
    println!("FP4 experts, bf16: vs composition {e_comp:.3e}, vs CPU {e_cpu:.3e} (of max |y|)");
    assert!(e_comp <= BF16_ULP && e_cpu <= BF16_ULP, "{e_comp:.3e} {e_cpu:.3e}");
}

/// BF16 experts (from FP8) in bf16: the stored weights are the grouped matmul's weight list,
/// with no copy at all: the only Casts are x's and the activations'.
#[test]
fn bf16_experts_in_bf16_run_on_the_stored_weights() {
    let _one = serial();
    let be = backend();
    let c = case(Form::Bf16);
    let experts = upload(&be, &c);
    assert!(experts.iter().all(|e| e.w1.dtype() == aclDataType::ACL_BF16));
    let (got, l) = run(&be, &c, &experts, Precision::Bf16);
    assert_eq!(l, Launches { gmm: 3, cast: 1 + 4, mul: 2 });
    let want = composition(&be, &c, &experts);
    let cpu = CpuBackend::new();
    let (on_cpu, _) = run(&cpu, &c, &upload(&cpu, &c), Precision::Bf16);
    let (e_comp, e_cpu) = (max_rel(&got, &want), max_rel(&got, &on_cpu));
    println!("BF16 experts, bf16: vs composition {e_comp:.3e}, vs CPU {e_cpu:.3e} (of max |y|)");
    assert!(e_comp <= BF16_ULP && e_cpu <= BF16_ULP, "{e_comp:.3e} {e_cpu:.3e}");
    // Every expert output is a BF16 value times a routing weight, summed: the per-expert FFN
    // (the same kernel on one expert's rows) gives BF16 values.
    let x = be.upload(&c.x, &[c.t, c.d]).unwrap();
    let y = be.download(&be.expert_ffn(&x, &experts[0], 10.0, Precision::Bf16).unwrap()).unwrap();
    assert!(y.iter().all(|v| v.to_bits() & 0xffff == 0));
}

/// One expert per grouped matmul (the budget's smallest chunk) gives the same bits: each row's
/// result does not depend on the chunk it runs in.
#[test]
fn one_expert_chunks_give_the_same_bits_in_bf16() {
    let _one = serial();
    for form in [Form::Fp4, Form::Bf16] {
        let mut be = backend();
        let c = case(form);
        let experts = upload(&be, &c);
        let (whole, _) = run(&be, &c, &experts, Precision::Bf16);
        be.set_grouped_matmul_budget(1);
        let (chunked, l) = run(&be, &c, &experts, Precision::Bf16);
        let a = c.active;
        let dequant = if form == Form::Fp4 { 3 * a } else { 0 };
        assert_eq!(l, Launches { gmm: 3 * a, cast: 1 + 4 * a + dequant, mul: dequant + 2 * a }, "{form:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&whole), bits(&chunked), "{form:?}");
    }
}

/// `--precision f32` keeps the FLOAT32 form: the weights widened into one F32 stack per
/// projection (one Cast per BF16 expert, two Casts and a Mul per INT8 one), f32 results.
#[test]
fn f32_keeps_the_widened_float32_form() {
    let _one = serial();
    let be = backend();
    for form in [Form::Fp4, Form::Bf16] {
        let c = case(form);
        let experts = upload(&be, &c);
        let (got, l) = run(&be, &c, &experts, Precision::F32);
        let a = c.active;
        let want = match form {
            Form::Fp4 => Launches { gmm: 3, cast: 6 * a, mul: 3 * a + 2 },
            _ => Launches { gmm: 3, cast: 3 * a, mul: 2 },
        };
        assert_eq!(l, want, "{form:?}");
        let (x, w) = (be.upload(&c.x, &[c.t, c.d]).unwrap(), be.upload(&c.w, &[c.t, c.k]).unwrap());
        let comp = composed::moe_experts(&be, &x, &c.ids, &w, &experts, 10.0, Precision::F32).unwrap();
        let err = max_rel(&got, &be.download(&comp).unwrap());
        assert!(err <= 1e-5, "{form:?}: {err:.3e}");
        // Not rounded to BF16 anywhere.
        assert!(got.iter().any(|v| v.to_bits() & 0xffff != 0), "{form:?}");
    }
}

/// F32-stored experts hold values BF16 does not: in bf16 they keep the FLOAT32 form (widened,
/// outputs rounded by round_to_bf16), and still match the composition.
#[test]
fn f32_weights_keep_the_float32_form_in_bf16() {
    let _one = serial();
    let be = backend();
    let c = case(Form::F32);
    let experts = upload(&be, &c);
    let (got, l) = run(&be, &c, &experts, Precision::Bf16);
    // Widening (one Cast per expert and projection) and four roundings of two Casts each.
    assert_eq!(l, Launches { gmm: 3, cast: 3 * c.active + 8, mul: 2 });
    let err = max_rel(&got, &composition(&be, &c, &experts));
    assert!(err <= BF16_ULP, "{err:.3e}");
}

// ----------------------------------------------------------------- the operator itself

fn esize(dtype: aclDataType) -> usize {
    match dtype {
        aclDataType::ACL_FLOAT | aclDataType::ACL_INT32 => 4,
        aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16 => 2,
        aclDataType::ACL_INT8 => 1,
        aclDataType::ACL_INT64 => 8,
        other => panic!("{other:?}"),
    }
}

/// A zeroed contiguous tensor.
fn zeros(api: &Api, dims: &[i64], dtype: aclDataType) -> *mut aclTensor {
    raw_acl::zero_tensor(api, dims, dtype, esize(dtype))
}

fn list(api: &Api, members: &[*mut aclTensor]) -> *mut aclTensorList {
    let m: Vec<*const aclTensor> = members.iter().map(|&t| t as *const aclTensor).collect();
    // SAFETY: live tensors; the list takes them over.
    let l = unsafe { api.aclCreateTensorList().unwrap()(m.as_ptr(), m.len() as u64) };
    assert!(!l.is_null(), "{}", raw_acl::recent_error(api));
    l
}

fn group_list(api: &Api, counts: &[i64]) -> *mut aclTensor {
    let bytes: Vec<u8> = counts.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_acl::tensor_of(api, &[counts.len() as i64], aclDataType::ACL_INT64, &bytes)
}

/// GetWorkspaceSize with groups along M (groupType 0), one output (splitItem 3), counts
/// (groupListType 1), no activation; the antiquant scale and offset as given.
fn plan(
    api: &Api,
    x: *mut aclTensorList,
    w: *mut aclTensorList,
    scale: *mut aclTensorList,
    offset: *mut aclTensorList,
    gl: *mut aclTensor,
    out: *mut aclTensorList,
) -> Result<(u64, *mut aclOpExecutor), String> {
    let (mut ws, mut ex) = (0u64, null_mut());
    let n: *const aclTensorList = null();
    let f = api.aclnnGroupedMatmulV4GetWorkspaceSize().unwrap();
    // SAFETY: live objects or NULL for the optional lists; out-pointers to locals.
    let st = unsafe {
        f(x, w, n, n, n, scale, offset, n, gl, n, n, n, 3, 0, 1, 0, out, null_mut(), null_mut(), &mut ws, &mut ex)
    };
    if st == ACLNN_SUCCESS {
        Ok((ws, ex))
    } else {
        assert_eq!(st, ACLNN_ERR_PARAM_INVALID, "{}", raw_acl::recent_error(api));
        Err(raw_acl::recent_error(api))
    }
}

/// The A16W8 antiquant form with x `[4, 64]` of `x_dtype`, one INT8 weight `[2, 64, 3]` and the
/// given scale (None: no antiquantScaleOptional): the planning's result.
fn plan_a16w8(api: &Api, x_dtype: aclDataType, scale: Option<(&[i64], aclDataType)>) -> Result<(), String> {
    let x = list(api, &[zeros(api, &[4, 64], x_dtype)]);
    let w = list(api, &[zeros(api, &[2, 64, 3], aclDataType::ACL_INT8)]);
    let s = scale.map_or(null_mut(), |(dims, dt)| list(api, &[zeros(api, dims, dt)]));
    let out = list(api, &[zeros(api, &[4, 3], x_dtype)]);
    plan(api, x, w, s, null_mut(), group_list(api, &[1, 3]), out).map(|_| ())
}

/// The antiquant form is refused as the docs say: INT8 weights take per-channel scales only
/// (`[E, N]`; a scale per 32 values of K, dsv4's FP4 form, is the documented misuse), the
/// scale has x's dtype and shape `[E, N]`, x is BFLOAT16/FLOAT16; a call that passes every
/// documented check is still refused, as not emulated (dsv4 does not use it).
#[test]
fn the_emulator_refuses_antiquant_misuse_with_the_documented_reason() {
    let _one = serial();
    let api = raw_acl::api();
    let (bf, f) = (aclDataType::ACL_BF16, aclDataType::ACL_FLOAT);
    let refused = |x_dtype, scale| plan_a16w8(api, x_dtype, scale).expect_err("refused");

    // Per-group scales of 32 (dsv4's FP4 experts as INT8): per-channel only for INT8.
    let m = refused(bf, Some((&[2, 2, 3][..], bf)));
    assert!(m.contains("groups of 32 values") && m.contains("per-channel quantisation only"), "{m}");
    assert!(m.contains("INT4 weights only"), "{m}");
    // A group count that does not divide K.
    let m = refused(bf, Some((&[2, 3, 3][..], bf)));
    assert!(m.contains("do not divide K = 64") && m.contains("per-channel"), "{m}");
    // Wrong per-channel shape, and a scale of another dtype than x.
    let m = refused(bf, Some((&[2, 4][..], bf)));
    assert!(m.contains("takes [E, N] = [2, 3]"), "{m}");
    let m = refused(bf, Some((&[2, 3][..], f)));
    assert!(m.contains("must be BFLOAT16 (x's dtype)"), "{m}");
    // FLOAT32 x with an INT8 weight, with or without a scale.
    for scale in [Some((&[2, 3][..], f)), None] {
        let m = refused(f, scale);
        assert!(m.contains("A16W8 (antiquant) takes x BFLOAT16 or FLOAT16"), "{m}");
    }
    // BF16 x and an INT8 weight but no scale.
    let m = refused(bf, None);
    assert!(m.contains("needs antiquantScaleOptional"), "{m}");
    // A weight list: the antiquant forms take single tensors.
    let x = list(api, &[zeros(api, &[4, 64], bf)]);
    let w = list(api, &[zeros(api, &[64, 3], aclDataType::ACL_INT8), zeros(api, &[64, 3], aclDataType::ACL_INT8)]);
    let s = list(api, &[zeros(api, &[3], bf), zeros(api, &[3], bf)]);
    let out = list(api, &[zeros(api, &[4, 3], bf)]);
    let m = plan(api, x, w, s, null_mut(), group_list(api, &[1, 3]), out).expect_err("refused");
    assert!(m.contains("single x, weight and out"), "{m}");
    // The documented per-channel form: not emulated.
    let m = refused(bf, Some((&[2, 3][..], bf)));
    assert!(m.contains("not emulated"), "{m}");
}

/// The BF16 form with a weight list (dsv4's narrow form): the result is the exact product
/// rounded to BF16 once. Row 0 sums 1 + 2^-8 + 2^-8 = 1 + 2^-7, a BF16 value that rounding
/// after each addition would lose (1 + 2^-8 is a tie, which goes to the even 1).
#[test]
fn the_bf16_form_rounds_its_output_once() {
    let _one = serial();
    let api = raw_acl::api();
    let bf = aclDataType::ACL_BF16;
    let b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect() };
    let e = 2f32.powi(-8);
    // x [3, 3]: row 0 to expert 0, rows 1..3 to expert 1.
    let xv = [1.0, e, e, 0.5, 0.25, 2.0, -1.0, 3.0, 0.125];
    // Expert weights [N = 2, K = 3] each, read as [K, N] through strides (transposed).
    let (w0, w1) = ([1.0, 1.0, 1.0, 2.0, 0.0, -1.0], [1.0, -2.0, 0.5, 0.0, 1.0, 4.0]);
    let x = list(api, &[raw_acl::tensor_of(api, &[3, 3], bf, &b(&xv))]);
    let tw = |v: &[f32]| raw_acl::strided_tensor(api, raw_acl::device_bytes(api, &b(v)), &[3, 2], &[1, 3], 6, bf);
    let w = list(api, &[tw(&w0), tw(&w1)]);
    let od = raw_acl::device_bytes(api, &[0u8; 12]);
    let out = list(api, &[raw_acl::tensor(api, od, &[3, 2], bf)]);
    let (ws, ex) = plan(api, x, w, null_mut(), null_mut(), group_list(api, &[1, 2]), out).unwrap();
    let mut s = null_mut();
    // SAFETY: out-pointer to a local; the executor just planned, a workspace of its size.
    unsafe {
        assert_eq!(api.aclrtCreateStream().unwrap()(&mut s), ACL_SUCCESS);
        let wsp = raw_acl::malloc(api, ws as usize);
        assert_eq!(
            api.aclnnGroupedMatmulV4().unwrap()(wsp, ws, ex, s),
            ACLNN_SUCCESS,
            "{}",
            raw_acl::recent_error(api)
        );
        assert_eq!(api.aclrtSynchronizeStream().unwrap()(s), ACL_SUCCESS, "{}", raw_acl::recent_error(api));
    }
    let raw = raw_acl::download_bytes(api, od, 12);
    let got: Vec<f32> =
        raw.chunks(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect();
    let dot =
        |r: usize, w: &[f32; 6], n: usize| (0..3).map(|j| xv[r * 3 + j] as f64 * w[n * 3 + j] as f64).sum::<f64>();
    let want: Vec<f32> = (0..3)
        .flat_map(|r| {
            let w = if r == 0 { &w0 } else { &w1 };
            [bf16(dot(r, w, 0) as f32), bf16(dot(r, w, 1) as f32)]
        })
        .collect();
    assert_eq!(got[0], 1.0 + 2f32.powi(-7));
    assert_eq!(got, want);
}
