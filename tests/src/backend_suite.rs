//! One op-level test suite for every backend, in the manner of candle's `test_device!` and
//! llama.cpp's `test-backend-ops`: each test body here is generic over [`Backend`] and checks
//! one operation against a plain host reference written below (f64 where rounding matters);
//! [`backend_suite!`](crate::backend_suite) instantiates every body as a `#[test]` for one
//! backend (`tests/tests/backend_ops_*.rs`).
//!
//! Covered: memory, the pools (`alloc_pool` / `pool_write` / `pool_read` in every row format:
//! exact against the host codec `RowFormat::round_trip`, or, for a format the backend does not
//! support, a clear error and never a wrong result), every primitive, the fused V4 ops (against
//! direct implementations of spec §B, and against the trait's default compositions through
//! [`PrimitivesOnly`] on the same device), and bad inputs: mismatched shapes and out-of-range
//! indices must give `Err`, never a panic and never a result.
//!
//! Tolerances. `u = 2^-24` is the f32 unit roundoff and `EPS = 2u` (`f32::EPSILON`). A sum of
//! K products computed in f32 in any order (with or without FMA) is within `K·u·Σ|terms|` of
//! the exact value, so `K·EPS·Σ|terms|` (a factor 2 of margin) bounds every dot product here.
//! Elementwise functions of libm quality are within a few ulp, hence `4·EPS` relative.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dsv4_core::backend::{
    composed, Backend, BinaryOp, DevicePool, DeviceTensor, ExpertWeights, Precision, ReduceOp, RowFormat, UnaryOp,
};
use dsv4_core::config::ScoringFunc;
pub use dsv4_core::primitives_only::PrimitivesOnly;
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::Result;

/// Instantiates the suite: one `#[test]` per body of [`crate::backend_suite`], each on a fresh
/// backend made by the expression (evaluated once per test), plus
/// `fused_ops_match_default_compositions` on `PrimitivesOnly(expression)`.
///
/// ```ignore
/// dsv4_tests::backend_suite!(dsv4_backend_cpu::CpuBackend::new());
/// ```
#[macro_export]
macro_rules! backend_suite {
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let be = $make;
                $crate::backend_suite::$name(&be);
            }
        )*
    };
    ($make:expr) => {
        $crate::backend_suite!(@each $make;
            upload_download_full_and_shape_checks,
            pool_f32_rows_round_trip_exactly,
            pool_bf16_rows_round_trip_exactly,
            pool_fp8_rows_round_trip_exactly_or_are_refused,
            linear_f32_bf16_f16_weights,
            grouped_linear_is_block_diagonal,
            embedding_rows_are_exact,
            matmul_batched_transposed_and_shared,
            unary_ops_against_f64,
            binary_ops_broadcast_like_numpy,
            affine_and_clamp,
            round_to_bf16_is_a_cast_to_nearest_even,
            reduce_over_each_axis,
            softmax_over_any_axis_with_masked_entries,
            rms_norm_with_and_without_weight,
            rope_rotates_interleaved_trailing_pairs_and_inverse_undoes_it,
            rope_owned_is_rope_and_leaves_a_shared_input_alone,
            reshape_transpose_narrow_concat,
            index_select_rows_and_minus_one_gives_zeros,
            gather_last_picks_along_the_last_axis,
            index_add_accumulates_repeated_indices_in_order,
            topk_descending_ties_to_the_lower_index,
            topk_equals_the_full_sort_prefix_under_ties,
            index_mask_concat_index_offset_index,
            hc_pre_matches_spec_b2,
            hc_post_mixes_source_rows_into_destination_columns,
            hc_head_matches_spec_b6,
            compressor_pool_softmax_per_channel_over_candidates,
            sparse_attention_reads_pools_in_every_format,
            indexer_select_reads_key_rows_of_a_pool,
            indexer_causality_at_window_boundaries,
            swiglu_clamps_gate_above_and_up_both_sides,
            moe_route_scores_selects_and_normalises,
            moe_experts_accumulate_in_ascending_expert_order,
            mismatched_shapes_are_errors,
            bad_indices_are_errors,
            grouped_linear_with_bad_groups_is_an_error,
        );
        #[test]
        fn fused_ops_match_default_compositions() {
            let composed = $crate::backend_suite::PrimitivesOnly($make);
            $crate::backend_suite::fused_ops_match_default_compositions(&composed);
        }
    };
}

const EPS: f64 = f32::EPSILON as f64;

// ------------------------------------------------------------------------------- helpers

use dsv4_core::test_data::{assert_within, Rng};

fn up<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> B::Tensor {
    be.upload(data, shape).unwrap_or_else(|e| panic!("upload {shape:?}: {e}"))
}

fn down<B: Backend>(be: &B, t: &B::Tensor) -> Vec<f32> {
    be.download(t).unwrap_or_else(|e| panic!("download: {e}"))
}

fn upi<B: Backend>(be: &B, data: &[i32], shape: &[usize]) -> B::Index {
    be.upload_index(data, shape).unwrap_or_else(|e| panic!("upload_index {shape:?}: {e}"))
}

fn downi<B: Backend>(be: &B, t: &B::Index) -> Vec<i32> {
    be.download_index(t).unwrap_or_else(|e| panic!("download_index: {e}"))
}

fn f32_weight(name: &str, shape: &[usize], data: &[f32]) -> StoredWeight {
    StoredWeight::float(HostTensor::from_f32(name, shape.to_vec(), data).unwrap()).unwrap()
}

fn weight<B: Backend>(be: &B, shape: &[usize], data: &[f32]) -> B::Weight {
    be.upload_weight(&f32_weight("w.weight", shape, data)).unwrap_or_else(|e| panic!("upload_weight {shape:?}: {e}"))
}

/// The F16 bits of `v`, which must be a normal F16 value or zero (true of [`Rng::grid`]).
fn f16_bits_exact(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if v == 0.0 {
        return sign;
    }
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp) && b & 0x1fff == 0, "{v} is not exact in F16");
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// A float weight stored as `dtype`, and the exact values it holds (BF16 rounds `data` to
/// nearest even; `data` must be exact in F16 for F16).
fn stored_as(dtype: DType, shape: &[usize], data: &[f32]) -> (StoredWeight, Vec<f64>) {
    let (bytes, exact): (Vec<u8>, Vec<f64>) = match dtype {
        DType::F32 => (data.iter().flat_map(|v| v.to_le_bytes()).collect(), data.iter().map(|&v| v as f64).collect()),
        DType::BF16 => {
            let mut bytes = vec![0u8; RowFormat::Bf16.row_bytes(data.len())];
            RowFormat::Bf16.encode(data, &mut bytes);
            (bytes, RowFormat::Bf16.round_trip(data).iter().map(|&v| v as f64).collect())
        }
        DType::F16 => (
            data.iter().flat_map(|&v| f16_bits_exact(v).to_le_bytes()).collect(),
            data.iter().map(|&v| v as f64).collect(),
        ),
        other => panic!("not a float dtype: {other}"),
    };
    let t = HostTensor::from_bytes("w.weight", dtype, shape.to_vec(), bytes).unwrap();
    (StoredWeight::float(t).unwrap(), exact)
}

/// `|got - want| <= abs + rel·|want|`.
#[track_caller]
fn assert_rel(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_within(what, got, want, |i| abs + rel * want[i].abs());
}

/// Two results of the same computation in different orders: within `rel` of the larger
/// magnitude of `want`.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f64) {
    let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_within(what, got, &want, |_| rel * scale);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `(Σ a·b, Σ|a·b|)` in f64.
fn dot64(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> (f64, f64) {
    a.into_iter().zip(b).fold((0.0, 0.0), |(s, m), (x, y)| (s + x * y, m + (x * y).abs()))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a non-string panic".into())
}

/// Bad-input cases: each must return `Err` (a panic or an `Ok` is recorded as a failure), and
/// the message must contain `needle` when given. All failures are reported together.
struct Expect {
    backend: String,
    failures: Vec<String>,
    checked: usize,
}

impl Expect {
    fn new<B: Backend>(be: &B) -> Expect {
        Expect { backend: be.describe(), failures: vec![], checked: 0 }
    }

    fn err<T>(&mut self, what: &str, needles: &[&str], f: impl FnOnce() -> Result<T>) {
        self.checked += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(p) => self.failures.push(format!("{what}: panicked ({}) instead of returning Err", panic_message(&*p))),
            Ok(Ok(_)) => self.failures.push(format!("{what}: returned Ok instead of Err")),
            Ok(Err(e)) => {
                let msg = e.to_string();
                println!("{what}: {msg}");
                if let Some(n) = needles.iter().find(|n| !msg.contains(**n)) {
                    self.failures.push(format!("{what}: the error does not mention `{n}`: {msg}"));
                }
            }
        }
    }

    #[track_caller]
    fn finish(self) {
        println!("{} bad inputs checked on {}", self.checked, self.backend);
        assert!(
            self.failures.is_empty(),
            "{} of {} bad inputs were not rejected cleanly on {}:\n  {}",
            self.failures.len(),
            self.checked,
            self.backend,
            self.failures.join("\n  ")
        );
    }
}

/// Whether `e` is a clear refusal of `format` (the only acceptable answer for a format a
/// backend does not support).
fn refuses_format(e: &dsv4_core::Error, format: RowFormat) -> bool {
    let msg = e.to_string().to_lowercase();
    let name = match format {
        RowFormat::F32 => "f32",
        RowFormat::Bf16 => "bf16",
        RowFormat::Fp8 { .. } => "fp8",
    };
    matches!(e, dsv4_core::Error::Backend { .. }) && (msg.contains(name) || msg.contains("format"))
}

/// A pool filled with `values` (`[n, width]`) at `slots`; None (after printing why) when the
/// backend clearly refuses an FP8 pool. F32 and BF16 must work.
fn filled_pool<B: Backend>(
    be: &B,
    rows: usize,
    width: usize,
    format: RowFormat,
    slots: &[i32],
    values: &[f32],
) -> Option<B::Pool> {
    let optional = matches!(format, RowFormat::Fp8 { .. });
    let refused = |e: dsv4_core::Error, what: &str| {
        assert!(optional, "{what} {format:?}: {e}");
        assert!(refuses_format(&e, format), "{what} {format:?} failed without naming the format: {e}");
        println!("{} refuses {format:?} pools: {e}", be.name());
    };
    let mut pool = match be.alloc_pool(rows, width, format) {
        Ok(p) => p,
        Err(e) => {
            refused(e, "alloc_pool");
            return None;
        }
    };
    if let Err(e) = be.pool_write(&mut pool, &upi(be, slots, &[slots.len()]), &up(be, values, &[slots.len(), width])) {
        refused(e, "pool_write");
        return None;
    }
    Some(pool)
}

/// `values` `[n, width]` after a round trip through `format`, row by row.
fn round_trip_rows(format: RowFormat, values: &[f32], width: usize) -> Vec<f32> {
    values.chunks(width.max(1)).flat_map(|r| format.round_trip(r)).collect()
}

// ------------------------------------------------------------------------------ memory

pub fn upload_download_full_and_shape_checks<B: Backend>(be: &B) {
    let t = up(be, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(t.shape(), &[2, 3]);
    assert_eq!(down(be, &t), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let s = up(be, &[7.5], &[]);
    assert_eq!((s.shape().len(), down(be, &s)), (0, vec![7.5]));
    let e = up(be, &[], &[0, 3]);
    assert_eq!((e.shape().to_vec(), down(be, &e)), (vec![0, 3], vec![]));
    assert_eq!(downi(be, &upi(be, &[-1, 0, 7], &[3])), vec![-1, 0, 7]);
    let f = be.full(&[2, 2], -2.5).unwrap();
    assert_eq!((f.shape().to_vec(), down(be, &f)), (vec![2, 2], vec![-2.5; 4]));
    let w = weight(be, &[3, 4], &[0.0; 12]);
    assert_eq!(be.weight_shape(&w), &[3, 4]);
    be.synchronize().unwrap();
}

// ------------------------------------------------------------------------------- pools

/// Fresh rows read as zeros; written rows read back exactly as the host codec decodes them,
/// through slots of any shape (`-1` reads zeros); a second write replaces rows in place and
/// leaves the others; empty writes and reads work. None when an FP8 pool is refused.
fn check_pool<B: Backend>(be: &B, format: RowFormat, width: usize) -> Option<()> {
    let mut rng = Rng(40);
    let rows = 6;
    let label = format!("{} {format:?} width {width}", be.name());
    // Rows of very different magnitudes (FP8 scales per block), one all-zero row.
    let mut values = rng.vec(3 * width);
    for (i, v) in values.iter_mut().enumerate() {
        *v *= [300.0, 1e-3, 0.0][i / width];
    }
    let mut pool = filled_pool(be, rows, width, format, &[4, 1, 2], &values)?;
    assert_eq!((pool.rows(), pool.width(), pool.format()), (rows, width, format), "{label}");
    assert_eq!(pool.bytes(), rows * format.row_bytes(width), "{label}");
    let want_rows = round_trip_rows(format, &values, width);
    let row = |r: usize| -> Vec<f32> {
        match r {
            4 => want_rows[..width].to_vec(),
            1 => want_rows[width..2 * width].to_vec(),
            2 => want_rows[2 * width..].to_vec(),
            _ => vec![0.0; width],
        }
    };
    let slots = [1, -1, 4, 4, 0, 5, 2, 1];
    let got = be.pool_read(&pool, &upi(be, &slots, &[2, 4])).unwrap();
    assert_eq!(got.shape(), &[2, 4, width], "{label}");
    let want: Vec<f32> = slots.iter().flat_map(|&s| if s < 0 { vec![0.0; width] } else { row(s as usize) }).collect();
    assert_eq!(bits(&down(be, &got)), bits(&want), "{label}: rows read back");

    // Overwrite row 1 in place; 4 and 2 stay.
    let newer: Vec<f32> = rng.vec(width).iter().map(|v| v * 7.0).collect();
    be.pool_write(&mut pool, &upi(be, &[1], &[1]), &up(be, &newer, &[1, width])).unwrap();
    let got = be.pool_read(&pool, &upi(be, &[1, 4, 2, 3], &[4])).unwrap();
    let want = [format.round_trip(&newer), row(4), row(2), vec![0.0; width]].concat();
    assert_eq!(bits(&down(be, &got)), bits(&want), "{label}: after overwriting row 1");

    // Nothing to write, nothing to read.
    be.pool_write(&mut pool, &upi(be, &[], &[0]), &up(be, &[], &[0, width])).unwrap();
    let got = be.pool_read(&pool, &upi(be, &[], &[0])).unwrap();
    assert_eq!(got.shape(), &[0, width], "{label}");
    Some(())
}

pub fn pool_f32_rows_round_trip_exactly<B: Backend>(be: &B) {
    for width in [1, 5, 64] {
        check_pool(be, RowFormat::F32, width).unwrap();
    }
}

pub fn pool_bf16_rows_round_trip_exactly<B: Backend>(be: &B) {
    for width in [1, 5, 64] {
        check_pool(be, RowFormat::Bf16, width).unwrap();
    }
}

/// One full and one partial scale block plus rope; an odd number of codes (the rope's BF16
/// bytes at an odd offset); rope only; no rope; V4's attention row.
const FP8_POOL_WIDTHS: [(usize, usize); 6] = [(76, 6), (43, 6), (4, 4), (64, 0), (130, 0), (512, 64)];

pub fn pool_fp8_rows_round_trip_exactly_or_are_refused<B: Backend>(be: &B) {
    for (width, rope) in FP8_POOL_WIDTHS {
        if check_pool(be, RowFormat::Fp8 { rope }, width).is_none() {
            return;
        }
    }
}

/// [`pool_fp8_rows_round_trip_exactly_or_are_refused`] for a backend that must hold fp8 rows.
pub fn pool_fp8_rows_round_trip_exactly<B: Backend>(be: &B) {
    for (width, rope) in FP8_POOL_WIDTHS {
        check_pool(be, RowFormat::Fp8 { rope }, width).unwrap_or_else(|| panic!("{} refused fp8 rows", be.name()));
    }
}

// ---------------------------------------------------------------------------- linear & co

/// `y[m, n] = Σ_k x[m, k]·w[n, k]` in f64, and the bound `K·EPS·Σ|x·w|` per element.
fn linear_ref(x: &[f32], w: &[f64], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; m * n];
    let mut bound = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (s, a) = dot64(x[i * k..(i + 1) * k].iter().map(|&v| v as f64), w[j * k..(j + 1) * k].iter().copied());
            y[i * n + j] = s;
            bound[i * n + j] = k as f64 * EPS * a + 1e-30;
        }
    }
    (y, bound)
}

pub fn linear_f32_bf16_f16_weights<B: Backend>(be: &B) {
    let mut rng = Rng(1);
    // Leading dims of x are kept; M = 1 and 5 are GEMV-sized, 9 and 70 GEMM-sized (the CPU
    // backend switches at 8 rows); N = 130 and 65 are not multiples of 64, N = 3 is tiny.
    let cases: &[(&[usize], usize, usize)] =
        &[(&[1], 37, 130), (&[5], 37, 130), (&[9], 200, 3), (&[70], 64, 65), (&[2, 35], 37, 130), (&[2, 1, 3], 16, 1)];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(lead, k, n) in cases {
            let m: usize = lead.iter().product();
            let xs = rng.vec(m * k);
            let (sw, exact) = stored_as(dtype, &[n, k], &rng.grid(n * k));
            let w = be.upload_weight(&sw).unwrap();
            let mut shape = lead.to_vec();
            shape.push(k);
            let y = be.linear(&up(be, &xs, &shape), &w).unwrap();
            let mut want_shape = lead.to_vec();
            want_shape.push(n);
            assert_eq!(y.shape(), &want_shape[..], "{dtype} {lead:?} x [{n}, {k}]");
            let (want, bound) = linear_ref(&xs, &exact, m, n, k);
            assert_within(&format!("linear {dtype} {lead:?}x[{n},{k}]"), &down(be, &y), &want, |i| bound[i]);
        }
    }
    // No rows.
    let w = weight(be, &[4, 3], &[0.5; 12]);
    let y = be.linear(&up(be, &[], &[0, 3]), &w).unwrap();
    assert_eq!(y.shape(), &[0, 4]);
}

pub fn grouped_linear_is_block_diagonal<B: Backend>(be: &B) {
    let mut rng = Rng(2);
    // One input row (decode: a backend may split the rows into tasks, some spanning two
    // groups) and several; groups of a few rows and of several hundred.
    for (g, k, r) in [(3, 20, 5), (2, 64, 320), (2, 16, 200)] {
        for dtype in [DType::F32, DType::BF16] {
            for m in [1, 3, 70] {
                let xs = rng.vec(m * g * k);
                let (sw, exact) = stored_as(dtype, &[g * r, k], &rng.grid(g * r * k));
                let w = be.upload_weight(&sw).unwrap();
                let y = be.grouped_linear(&up(be, &xs, &[m, g, k]), &w, g).unwrap();
                assert_eq!(y.shape(), &[m, g, r]);
                let (mut want, mut bound) = (vec![], vec![]);
                for i in 0..m {
                    for gi in 0..g {
                        for ri in 0..r {
                            let row = gi * r + ri;
                            let (s, a) = dot64(
                                xs[(i * g + gi) * k..(i * g + gi + 1) * k].iter().map(|&v| v as f64),
                                exact[row * k..(row + 1) * k].iter().copied(),
                            );
                            want.push(s);
                            bound.push(k as f64 * EPS * a + 1e-30);
                        }
                    }
                }
                assert_within(&format!("grouped_linear {dtype} m={m} [{g}x{r}, {k}]"), &down(be, &y), &want, |i| {
                    bound[i]
                });
            }
        }
    }
}

pub fn embedding_rows_are_exact<B: Backend>(be: &B) {
    let mut rng = Rng(3);
    let (v, d) = (10, 6);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (sw, exact) = stored_as(dtype, &[v, d], &rng.grid(v * d));
        let table = be.upload_weight(&sw).unwrap();
        let ids = [9, 0, 3, 3, 9, 1];
        let e = be.embedding(&table, &upi(be, &ids, &[2, 3])).unwrap();
        assert_eq!(e.shape(), &[2, 3, d]);
        let want: Vec<f64> = ids.iter().flat_map(|&i| exact[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
        assert_within(&format!("embedding {dtype}"), &down(be, &e), &want, |_| 0.0);
    }
}

/// a `[batch, m, k]` times b (`[batch or shared, k, n]`, or `[.., n, k]` transposed).
#[allow(clippy::too_many_arguments)]
fn matmul_ref(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, tb: bool, shared: bool) -> Vec<f64> {
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let bb = if shared { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                out[(bi * m + i) * n + j] = (0..k)
                    .map(|c| {
                        let bv = if tb { b[bb + j * k + c] } else { b[bb + c * n + j] };
                        a[(bi * m + i) * k + c] as f64 * bv as f64
                    })
                    .sum();
            }
        }
    }
    out
}

pub fn matmul_batched_transposed_and_shared<B: Backend>(be: &B) {
    let mut rng = Rng(4);
    let (m, k, n) = (3, 5, 6);
    // |a|, |b| <= 1: each output is a sum of K products of magnitude <= 1.
    let bound = |_| k as f64 * EPS;
    for (bshape, tb, shared) in [
        (vec![2, 3, k, n], false, false),
        (vec![2, 3, n, k], true, false),
        (vec![k, n], false, true),
        (vec![n, k], true, true),
    ] {
        let a = rng.vec(6 * m * k);
        let b = rng.vec(bshape.iter().product());
        let y = be.matmul(&up(be, &a, &[2, 3, m, k]), &up(be, &b, &bshape), tb).unwrap();
        assert_eq!(y.shape(), &[2, 3, m, n], "b {bshape:?}");
        let want = matmul_ref(&a, &b, 6, m, k, n, tb, shared);
        assert_within(&format!("matmul b {bshape:?} tb {tb}"), &down(be, &y), &want, bound);
    }
    // Plain 2-D.
    let (a, b) = (rng.vec(m * k), rng.vec(k * n));
    let y = be.matmul(&up(be, &a, &[m, k]), &up(be, &b, &[k, n]), false).unwrap();
    assert_within("matmul 2-D", &down(be, &y), &matmul_ref(&a, &b, 1, m, k, n, false, true), bound);
    // K = 0: zeros.
    let y = be.matmul(&up(be, &[], &[2, 0]), &up(be, &[], &[0, 3]), false).unwrap();
    assert_eq!((y.shape().to_vec(), down(be, &y)), (vec![2, 3], vec![0.0; 6]));
}

// ---------------------------------------------------------------------------- elementwise

/// `round_to_bf16` equals `precision::round_bf16` (nearest, ties to even) value for value:
/// halfway cases both ways, values already BF16, ±0, ±inf, the overflow to inf, subnormals,
/// NaN staying NaN, and random values in every binade.
pub fn round_to_bf16_is_a_cast_to_nearest_even<B: Backend>(be: &B) {
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        -(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x0000_8000),
        f32::from_bits(0x0001_8000),
        448.0,
        -3.0e-5,
    ];
    let mut rng = Rng(99);
    xs.extend((0..4000).map(|i| rng.f32() * 2f32.powi((i % 80) - 40)));
    let got = down(be, &be.round_to_bf16(&up(be, &xs, &[xs.len() / 4, 4])).unwrap());
    for (&x, &g) in xs.iter().zip(&got) {
        let want = dsv4_core::precision::round_bf16(x);
        assert_eq!(g.to_bits(), want.to_bits(), "{}: round_to_bf16({x:e}) = {g:e}, want {want:e}", be.name());
    }
    let nan = down(be, &be.round_to_bf16(&up(be, &[f32::NAN], &[1])).unwrap())[0];
    assert!(nan.is_nan(), "{}: NaN stays NaN", be.name());
    let empty = be.round_to_bf16(&up(be, &[], &[0, 3])).unwrap();
    assert_eq!(empty.shape(), &[0, 3]);
    // The owned form: the same bits from a tensor it holds alone (a backend may round that in
    // place) and from one it shares (a reshape of a tensor kept here, which must come out of
    // the call unchanged), and twice over (rounding a rounded tensor changes nothing).
    let want: Vec<u32> = xs.iter().map(|&x| dsv4_core::precision::round_bf16(x).to_bits()).collect();
    let fresh = be.round_to_bf16_owned(up(be, &xs, &[xs.len() / 4, 4])).unwrap();
    assert_eq!(fresh.shape(), &[xs.len() / 4, 4]);
    assert_eq!(bits(&down(be, &fresh)), want, "{}: round_to_bf16_owned of a fresh tensor", be.name());
    let again = be.round_to_bf16_owned(fresh).unwrap();
    assert_eq!(bits(&down(be, &again)), want, "{}: round_to_bf16_owned of a rounded tensor", be.name());
    let kept = up(be, &xs, &[xs.len()]);
    let shared = be.round_to_bf16_owned(be.reshape(&kept, &[xs.len() / 4, 4]).unwrap()).unwrap();
    assert_eq!(bits(&down(be, &shared)), want, "{}: round_to_bf16_owned of a shared tensor", be.name());
    assert_eq!(bits(&down(be, &kept)), bits(&xs), "{}: round_to_bf16_owned changed a tensor it shared", be.name());
}

pub fn unary_ops_against_f64<B: Backend>(be: &B) {
    let xs: Vec<f32> =
        vec![-30.0, -20.5, -5.0, -1.0, -0.25, 0.0, 0.25, 1.0, 5.0, 19.5, 20.0, 20.000002, 20.5, 25.0, 80.0];
    let pos: Vec<f32> = vec![1e-6, 0.25, 1.0, 2.0, 3.0, 1e4];
    type Ref = fn(f64) -> f64;
    let cases: [(UnaryOp, &[f32], Ref); 9] = [
        (UnaryOp::Sigmoid, &xs, sigmoid),
        (UnaryOp::Silu, &xs, silu),
        // torch's threshold: x > 20 gives x itself (no exp, so no overflow at 80).
        (UnaryOp::Softplus, &xs, |x| if x > 20.0 { x } else { x.exp().ln_1p() }),
        (UnaryOp::Sqrt, &pos, f64::sqrt),
        (UnaryOp::Rsqrt, &pos, |x| 1.0 / x.sqrt()),
        (UnaryOp::Exp, &xs, f64::exp),
        (UnaryOp::Relu, &xs, |x| x.max(0.0)),
        (UnaryOp::Neg, &xs, |x| -x),
        (UnaryOp::Square, &xs, |x| x * x),
    ];
    for (op, input, f) in cases {
        let y = be.unary(&up(be, input, &[input.len()]), op).unwrap();
        let want: Vec<f64> = input.iter().map(|&v| f(v as f64)).collect();
        // libm-quality f32 functions are within a few ulp; composite ones (sigmoid, silu,
        // softplus, rsqrt) round 2-3 times.
        assert_rel(&format!("{op:?}"), &down(be, &y), &want, 4.0 * EPS, 1e-37);
    }
    // Above the threshold softplus is exactly the identity (bit for bit).
    let y = down(be, &be.unary(&up(be, &[20.5, 25.0, 80.0, 1e30], &[4]), UnaryOp::Softplus).unwrap());
    assert_eq!(bits(&y), bits(&[20.5, 25.0, 80.0, 1e30]));
    let y = down(be, &be.unary(&up(be, &[0.0], &[1]), UnaryOp::Softplus).unwrap());
    assert!((y[0] as f64 - 2f64.ln()).abs() < 4.0 * EPS);
}

pub fn binary_ops_broadcast_like_numpy<B: Backend>(be: &B) {
    let mut rng = Rng(5);
    type Op = (BinaryOp, fn(f32, f32) -> f32);
    let ops: [Op; 6] = [
        (BinaryOp::Add, |x, y| x + y),
        (BinaryOp::Sub, |x, y| x - y),
        (BinaryOp::Mul, |x, y| x * y),
        (BinaryOp::Div, |x, y| x / y),
        (BinaryOp::Max, f32::max),
        (BinaryOp::Min, f32::min),
    ];
    // (a shape, b shape, result shape)
    let shapes: [(&[usize], &[usize], &[usize]); 5] = [
        (&[2, 3, 4], &[2, 3, 4], &[2, 3, 4]),
        (&[2, 1, 4], &[3, 1], &[2, 3, 4]),
        (&[4], &[2, 3, 4], &[2, 3, 4]),
        (&[2, 3, 1], &[1], &[2, 3, 1]),
        (&[1, 3, 1], &[2, 1, 5], &[2, 3, 5]),
    ];
    for (ash, bsh, osh) in shapes {
        let an: usize = ash.iter().product();
        let bn: usize = bsh.iter().product();
        let a = rng.vec(an);
        // Nonzero divisors.
        let b: Vec<f32> = rng.vec(bn).iter().map(|v| if *v >= 0.0 { v + 0.5 } else { v - 0.5 }).collect();
        // Element at a multi-index of the output, read through a broadcast shape.
        let at = |data: &[f32], sh: &[usize], idx: &[usize]| -> f32 {
            let off = osh.len() - sh.len();
            let mut flat = 0;
            for (d, &s) in sh.iter().enumerate() {
                flat = flat * s + if s == 1 { 0 } else { idx[off + d] };
            }
            data[flat]
        };
        for (op, f) in ops {
            let y = be.binary(&up(be, &a, ash), &up(be, &b, bsh), op).unwrap();
            assert_eq!(y.shape(), osh, "{op:?} {ash:?} {bsh:?}");
            let got = down(be, &y);
            let n: usize = osh.iter().product();
            assert_eq!(got.len(), n);
            for (flat, &g) in got.iter().enumerate() {
                let mut idx = vec![0; osh.len()];
                let mut r = flat;
                for d in (0..osh.len()).rev() {
                    idx[d] = r % osh[d];
                    r /= osh[d];
                }
                // One f32 operation, the same one: bit-identical.
                let want = f(at(&a, ash, &idx), at(&b, bsh, &idx));
                assert_eq!(g.to_bits(), want.to_bits(), "{op:?} {ash:?} {bsh:?} at {idx:?}");
            }
        }
    }
}

pub fn affine_and_clamp<B: Backend>(be: &B) {
    let xs = [-3.0f32, -0.5, 0.0, 0.75, 2.0, 100.0];
    let y = down(be, &be.affine(&up(be, &xs, &[2, 3]), 1.5, -0.25).unwrap());
    let want: Vec<f64> = xs.iter().map(|&x| x as f64 * 1.5 - 0.25).collect();
    // Two roundings (product, sum): within 2u of |x·mul| + |add|.
    assert_within("affine", &y, &want, |i| EPS * ((xs[i] as f64 * 1.5).abs() + 0.25));
    let y = down(be, &be.clamp(&up(be, &xs, &[6]), -1.0, 1.0).unwrap());
    assert_eq!(y, vec![-1.0, -0.5, 0.0, 0.75, 1.0, 1.0]);
    // Upper-only clamp (as the SwiGLU gate uses it).
    let y = down(be, &be.clamp(&up(be, &xs, &[6]), f32::NEG_INFINITY, 0.5).unwrap());
    assert_eq!(y, vec![-3.0, -0.5, 0.0, 0.5, 0.5, 0.5]);
}

// ----------------------------------------------------------------------- reductions & norms

pub fn reduce_over_each_axis<B: Backend>(be: &B) {
    let mut rng = Rng(6);
    let sh = [2usize, 3, 4];
    let xs = rng.vec(24);
    let x = up(be, &xs, &sh);
    let at = |i: usize, j: usize, k: usize| xs[(i * 3 + j) * 4 + k] as f64;
    for axis in 0..3 {
        let mut osh = sh;
        osh[axis] = 1;
        let len = sh[axis];
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
            let y = be.reduce(&x, axis, op).unwrap();
            assert_eq!(y.shape(), &osh[..], "{op:?} axis {axis}");
            let mut want = vec![];
            let mut bound = vec![];
            for i in 0..osh[0] {
                for j in 0..osh[1] {
                    for k in 0..osh[2] {
                        let vals: Vec<f64> = (0..len)
                            .map(|l| match axis {
                                0 => at(l, j, k),
                                1 => at(i, l, k),
                                _ => at(i, j, l),
                            })
                            .collect();
                        let sum: f64 = vals.iter().sum();
                        let abs: f64 = vals.iter().map(|v| v.abs()).sum();
                        want.push(match op {
                            ReduceOp::Sum => sum,
                            ReduceOp::Mean => sum / len as f64,
                            ReduceOp::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                        });
                        // len-term f32 sum (+ one division for the mean); max is exact.
                        bound.push(match op {
                            ReduceOp::Max => 0.0,
                            _ => (len + 1) as f64 * EPS * abs,
                        });
                    }
                }
            }
            assert_within(&format!("reduce {op:?} axis {axis}"), &down(be, &y), &want, |i| bound[i]);
        }
    }
}

fn softmax_ref(xs: &[f32], sh: &[usize], axis: usize) -> Vec<f64> {
    let inner: usize = sh[axis + 1..].iter().product();
    let outer: usize = sh[..axis].iter().product();
    let len = sh[axis];
    let mut out = vec![0.0; xs.len()];
    for o in 0..outer {
        for i in 0..inner {
            let ix = |l: usize| (o * len + l) * inner + i;
            let max = (0..len).map(|l| xs[ix(l)] as f64).fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue; // all masked: no mass anywhere
            }
            let sum: f64 = (0..len).map(|l| (xs[ix(l)] as f64 - max).exp()).sum();
            for l in 0..len {
                out[ix(l)] = (xs[ix(l)] as f64 - max).exp() / sum;
            }
        }
    }
    out
}

pub fn softmax_over_any_axis_with_masked_entries<B: Backend>(be: &B) {
    let mut rng = Rng(7);
    let sh = [2usize, 3, 4];
    let mut xs: Vec<f32> = rng.vec(24).iter().map(|v| 3.0 * v).collect();
    // Some -inf entries, and one lane along axis 1 (i = 1, k = 2) that is entirely -inf.
    for &f in &[0usize, 5, 17] {
        xs[f] = f32::NEG_INFINITY;
    }
    for j in 0..3 {
        xs[(12 + j * 4) + 2] = f32::NEG_INFINITY;
    }
    for axis in 0..3 {
        let y = down(be, &be.softmax(&up(be, &xs, &sh), axis).unwrap());
        let want = softmax_ref(&xs, &sh, axis);
        // exp of (x - max) with |x - max| <= 6, a sum of <= 4 terms and a division:
        // about (6 + 4 + 3)·u relative.
        assert_rel(&format!("softmax axis {axis}"), &y, &want, 16.0 * EPS, 1e-37);
        for (i, v) in y.iter().enumerate() {
            assert!(v.is_finite(), "softmax axis {axis}: element {i} is {v}");
            if xs[i] == f32::NEG_INFINITY {
                assert_eq!(*v, 0.0, "softmax axis {axis}: -inf entry {i} must get weight 0");
            }
        }
    }
    // The all -inf lane along axis 1 gets no mass (zeros, not NaN).
    let y = down(be, &be.softmax(&up(be, &xs, &sh), 1).unwrap());
    for j in 0..3 {
        assert_eq!(y[12 + j * 4 + 2], 0.0);
    }
}

pub fn rms_norm_with_and_without_weight<B: Backend>(be: &B) {
    let mut rng = Rng(8);
    let d = 7;
    let xs: Vec<f32> = rng.vec(2 * 3 * d).iter().map(|v| 4.0 * v).collect();
    let g = rng.vec(d);
    let eps = 1e-3f32;
    for weight in [None, Some(&g)] {
        let wt = weight.map(|g| up(be, g, &[d]));
        let y = be.rms_norm(&up(be, &xs, &[2, 3, d]), wt.as_ref(), eps).unwrap();
        assert_eq!(y.shape(), &[2, 3, d]);
        let mut want = vec![];
        for row in xs.chunks(d) {
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            for (c, &v) in row.iter().enumerate() {
                want.push(v as f64 * r * weight.map_or(1.0, |g| g[c] as f64));
            }
        }
        // r rounded once to f32 (after a d-term mean), then one or two products.
        assert_rel(&format!("rms_norm weight {}", weight.is_some()), &down(be, &y), &want, (d + 4) as f64 * EPS, 1e-37);
    }
}

// --------------------------------------------------------------------------------- rope

pub fn rope_rotates_interleaved_trailing_pairs_and_inverse_undoes_it<B: Backend>(be: &B) {
    let mut rng = Rng(9);
    let (t, heads, d, half) = (3, 2, 10, 3); // channels 4..10 rotate, 0..4 pass through
    let xs = rng.vec(t * heads * d);
    let angles: Vec<f64> = (0..t * half).map(|i| 0.7 * i as f64 - 1.3).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    let (ct, st) = (up(be, &cos, &[t, half]), up(be, &sin, &[t, half]));
    let x = up(be, &xs, &[t, heads, d]);
    for inverse in [false, true] {
        let y = down(be, &be.rope(&x, &ct, &st, inverse).unwrap());
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut want = vec![0.0; xs.len()];
        let mut bound = vec![0.0; xs.len()];
        for ti in 0..t {
            for h in 0..heads {
                let base = (ti * heads + h) * d;
                for c in 0..d - 2 * half {
                    want[base + c] = xs[base + c] as f64; // untouched, bit for bit
                }
                for i in 0..half {
                    let (e, o) = (xs[base + d - 2 * half + 2 * i] as f64, xs[base + d - 2 * half + 2 * i + 1] as f64);
                    let (c, s) = (cos[ti * half + i] as f64, sign * sin[ti * half + i] as f64);
                    want[base + d - 2 * half + 2 * i] = e * c - o * s;
                    want[base + d - 2 * half + 2 * i + 1] = o * c + e * s;
                    // Two products and a sum: 3 roundings of terms <= |e| + |o|.
                    bound[base + d - 2 * half + 2 * i] = 2.0 * EPS * (e.abs() + o.abs());
                    bound[base + d - 2 * half + 2 * i + 1] = 2.0 * EPS * (e.abs() + o.abs());
                }
            }
        }
        assert_within(&format!("rope inverse={inverse}"), &y, &want, |i| bound[i]);
    }
    // Inverse after forward is the identity up to cos² + sin² = 1 ± a few u.
    let back = be.rope(&be.rope(&x, &ct, &st, false).unwrap(), &ct, &st, true).unwrap();
    assert_rel(
        "rope inverse(forward)",
        &down(be, &back),
        &xs.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        0.0,
        8.0 * EPS,
    );
}

/// `rope_owned` gives `rope`'s bits, whether the tensor it takes holds its memory alone (a
/// backend may rotate it in place) or shares it (a reshape of a tensor the caller keeps, which
/// must come out of the call unchanged).
pub fn rope_owned_is_rope_and_leaves_a_shared_input_alone<B: Backend>(be: &B) {
    let mut rng = Rng(10);
    let (t, heads, d, half) = (5, 3, 12, 4);
    let xs = rng.vec(t * heads * d);
    let angles: Vec<f32> = (0..t * half).map(|i| 0.37 * i as f32 - 2.1).collect();
    let ct = up(be, &angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), &[t, half]);
    let st = up(be, &angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), &[t, half]);
    for inverse in [false, true] {
        let x = up(be, &xs, &[t, heads, d]);
        let want = bits(&down(be, &be.rope(&x, &ct, &st, inverse).unwrap()));
        let fresh = be.rope_owned(up(be, &xs, &[t, heads, d]), &ct, &st, inverse).unwrap();
        assert_eq!(fresh.shape(), &[t, heads, d]);
        assert_eq!(bits(&down(be, &fresh)), want, "{}: rope_owned of a fresh tensor, inverse={inverse}", be.name());
        let shared = be.reshape(&x, &[t, heads, d]).unwrap();
        let y = be.rope_owned(shared, &ct, &st, inverse).unwrap();
        assert_eq!(bits(&down(be, &y)), want, "{}: rope_owned of a shared tensor, inverse={inverse}", be.name());
        assert_eq!(bits(&down(be, &x)), bits(&xs), "{}: rope_owned changed a tensor it shared", be.name());
    }
    let err = be.rope_owned(up(be, &xs, &[t, heads * d]), &ct, &st, false).err().expect("a 2-D x must be refused");
    assert!(err.to_string().contains("rope"), "{}: {err}", be.name());
}

// ------------------------------------------------------------------------------- layout

pub fn reshape_transpose_narrow_concat<B: Backend>(be: &B) {
    let xs: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let x = up(be, &xs, &[2, 3, 4]);
    let r = be.reshape(&x, &[4, 6]).unwrap();
    assert_eq!((r.shape().to_vec(), down(be, &r)), (vec![4, 6], xs.clone()));

    let at = |i: usize, j: usize, k: usize| xs[(i * 3 + j) * 4 + k];
    let t = be.transpose(&x, 0, 2).unwrap();
    assert_eq!(t.shape(), &[4, 3, 2]);
    let want: Vec<f32> = (0..4)
        .flat_map(|k| (0..3).flat_map(move |j| (0..2).map(move |i| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    assert_eq!(down(be, &t), want);
    let t = be.transpose(&x, 2, 1).unwrap();
    assert_eq!(t.shape(), &[2, 4, 3]);
    let want: Vec<f32> = (0..2)
        .flat_map(|i| (0..4).flat_map(move |k| (0..3).map(move |j| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    assert_eq!(down(be, &t), want);

    for (axis, start, len) in [(0, 1, 1), (1, 1, 2), (2, 3, 1), (2, 0, 4), (1, 3, 0)] {
        let n = be.narrow(&x, axis, start, len).unwrap();
        let mut sh = [2, 3, 4];
        sh[axis] = len;
        assert_eq!(n.shape(), &sh);
        let mut want = vec![];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    let c = [i, j, k][axis];
                    if c >= start && c < start + len {
                        want.push(at(i, j, k));
                    }
                }
            }
        }
        assert_eq!(down(be, &n), want, "narrow axis {axis} {start}+{len}");
    }
    // A narrowed (possibly shared) tensor used as an operand reads only its part.
    let mid = be.narrow(&x, 0, 1, 1).unwrap();
    assert_eq!(down(be, &be.affine(&mid, 1.0, 1.0).unwrap()), xs[12..].iter().map(|v| v + 1.0).collect::<Vec<_>>());

    let a = be.narrow(&x, 1, 0, 1).unwrap();
    let b = be.narrow(&x, 1, 1, 2).unwrap();
    let c = be.concat(&[&a, &b], 1).unwrap();
    assert_eq!((c.shape().to_vec(), down(be, &c)), (vec![2, 3, 4], xs.clone()));
    let c = be.concat(&[&x, &x], 0).unwrap();
    assert_eq!(c.shape(), &[4, 3, 4]);
    assert_eq!(down(be, &c), [xs.clone(), xs.clone()].concat());
    let empty = be.narrow(&x, 1, 0, 0).unwrap();
    let c = be.concat(&[&empty, &x], 1).unwrap();
    assert_eq!((c.shape().to_vec(), down(be, &c)), (vec![2, 3, 4], xs.clone()));
}

// ------------------------------------------------------------------------ gather/scatter

pub fn index_select_rows_and_minus_one_gives_zeros<B: Backend>(be: &B) {
    let xs: Vec<f32> = (0..24).map(|v| v as f32 + 1.0).collect();
    let x = up(be, &xs, &[4, 2, 3]);
    let y = be.index_select(&x, &upi(be, &[3, -1, 0, 3], &[2, 2])).unwrap();
    assert_eq!(y.shape(), &[2, 2, 2, 3]);
    let row = |r: usize| xs[r * 6..(r + 1) * 6].to_vec();
    assert_eq!(down(be, &y), [row(3), vec![0.0; 6], row(0), row(3)].concat());
    let y = be.index_select(&x, &upi(be, &[-1, -1], &[2])).unwrap();
    assert_eq!(down(be, &y), vec![0.0; 12]);
}

pub fn gather_last_picks_along_the_last_axis<B: Backend>(be: &B) {
    let xs: Vec<f32> = (0..10).map(|v| v as f32 * 1.5).collect();
    let x = up(be, &xs, &[2, 5]);
    let y = be.gather_last(&x, &upi(be, &[4, 0, 4, 1, 1, 2], &[2, 3])).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(down(be, &y), vec![xs[4], xs[0], xs[4], xs[6], xs[6], xs[7]]);
}

pub fn index_add_accumulates_repeated_indices_in_order<B: Backend>(be: &B) {
    let dst = up(be, &[1.0, 2.0, 1.0, 0.0, 5.0, 6.0], &[3, 2]);
    // Row 1 receives 1e8, -1e8, 1 in that order: ((1 + 1e8) - 1e8) + 1 = 1 in f32 (1 + 1e8
    // rounds to 1e8), while another order, e.g. ((1 + 1) + 1e8) - 1e8, would give 0.
    let idx = upi(be, &[1, 0, 1, 1], &[4]);
    let src = up(be, &[1e8, 0.5, 10.0, 20.0, -1e8, 0.25, 1.0, 0.0], &[4, 2]);
    let y = down(be, &be.index_add(&dst, &idx, &src).unwrap());
    let mut want = vec![1.0f32, 2.0, 1.0, 0.0, 5.0, 6.0];
    let (s, ids) = ([1e8f32, 0.5, 10.0, 20.0, -1e8, 0.25, 1.0, 0.0], [1usize, 0, 1, 1]);
    for (i, &r) in ids.iter().enumerate() {
        for c in 0..2 {
            want[r * 2 + c] += s[i * 2 + c];
        }
    }
    assert_eq!(bits(&y), bits(&want));
    assert_eq!(y[2], 1.0);
}

pub fn topk_descending_ties_to_the_lower_index<B: Backend>(be: &B) {
    let ninf = f32::NEG_INFINITY;
    let xs = [
        1.0, 3.0, 3.0, 2.0, 3.0, ninf, 5.0, /**/ 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, /**/ ninf, ninf, -7.0,
        ninf, -8.0, ninf, ninf,
    ];
    let (v, i) = be.topk(&up(be, &xs, &[3, 7]), 4).unwrap();
    assert_eq!(v.shape(), &[3, 4]);
    assert_eq!(i.shape(), &[3, 4]);
    assert_eq!(downi(be, &i), vec![6, 1, 2, 4, /**/ 0, 1, 2, 3, /**/ 2, 4, 0, 1]);
    assert_eq!(down(be, &v), vec![5.0, 3.0, 3.0, 3.0, /**/ 0.0, 0.0, 0.0, 0.0, /**/ -7.0, -8.0, ninf, ninf]);
}

/// Top-k with many ties and every k equals the full sort's first k (descending, ties to the
/// lower index).
pub fn topk_equals_the_full_sort_prefix_under_ties<B: Backend>(be: &B) {
    let (rows, n) = (64usize, 37usize);
    let xs: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
    for k in [1, 2, 5, 17, 36, 37] {
        let (v, i) = be.topk(&up(be, &xs, &[rows, n]), k).unwrap();
        let (v, i) = (down(be, &v), downi(be, &i));
        for r in 0..rows {
            let row = &xs[r * n..(r + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let want: Vec<i32> = order[..k].iter().map(|&j| j as i32).collect();
            assert_eq!(&i[r * k..(r + 1) * k], &want[..], "row {r}, k {k}");
            assert!(want.iter().zip(&v[r * k..(r + 1) * k]).all(|(&j, &x)| row[j as usize] == x));
        }
    }
}

pub fn index_mask_concat_index_offset_index<B: Backend>(be: &B) {
    let idx = upi(be, &[0, -1, 5, -1, 2, 0], &[2, 3]);
    let m = be.index_mask(&idx).unwrap();
    assert_eq!(m.shape(), &[2, 3]);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(down(be, &m), vec![0.0, ninf, 0.0, ninf, 0.0, 0.0]);

    let other = upi(be, &[7, 8], &[2, 1]);
    let c = be.concat_index(&[&idx, &other], 1).unwrap();
    assert_eq!(c.shape(), &[2, 4]);
    assert_eq!(downi(be, &c), vec![0, -1, 5, 7, -1, 2, 0, 8]);
    let c = be.concat_index(&[&idx, &idx], 0).unwrap();
    assert_eq!((c.shape().to_vec(), downi(be, &c)), (vec![4, 3], vec![0, -1, 5, -1, 2, 0, 0, -1, 5, -1, 2, 0]));

    assert_eq!(downi(be, &be.offset_index(&idx, 10).unwrap()), vec![10, -1, 15, -1, 12, 10]);
    assert_eq!(downi(be, &be.offset_index(&idx, 0).unwrap()), vec![0, -1, 5, -1, 2, 0]);
    assert_eq!(be.offset_index(&idx, 3).unwrap().shape(), &[2, 3]);
}

// ----------------------------------------------------------------------------- fused: mHC

/// One mHC parameter set and input, for T tokens of n streams of width D.
struct Hc {
    t: usize,
    n: usize,
    d: usize,
    x: Vec<f32>,
    fn_w: Vec<f32>,
    base: Vec<f32>,
    scale: Vec<f32>,
}

impl Hc {
    fn new(rng: &mut Rng, t: usize, n: usize, d: usize, rows: usize, scale: &[f32]) -> Hc {
        // Weights of magnitude ~ 1/sqrt(nD), as trained projections have, so the mixes are O(1).
        let w = 1.5 / ((n * d) as f32).sqrt();
        Hc {
            t,
            n,
            d,
            x: rng.vec(t * n * d).iter().map(|v| 2.0 * v).collect(),
            fn_w: rng.vec(rows * n * d).iter().map(|v| v * w).collect(),
            base: rng.vec(rows),
            scale: scale.to_vec(),
        }
    }

    /// Per token: `m = (fn · x̄) · r` (spec §B.2 steps 1-2) and a bound on the f32 error of each
    /// mix: an nD-term dot product (nD·EPS·Σ|fn·x̄|) times r, plus the roundings of r and the norm.
    fn mixes(&self, norm_eps: f32) -> (Vec<Vec<f64>>, Vec<f64>) {
        let (n, d) = (self.n, self.d);
        let rows = self.fn_w.len() / (n * d);
        let mut out = vec![];
        let mut bound = vec![];
        for ti in 0..self.t {
            let xb = &self.x[ti * n * d..(ti + 1) * n * d];
            let ms = xb.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / (n * d) as f64;
            let r = 1.0 / (ms + norm_eps as f64).sqrt();
            let mut m = vec![];
            let mut b: f64 = 0.0;
            for i in 0..rows {
                let (s, a) = dot64(
                    self.fn_w[i * n * d..(i + 1) * n * d].iter().map(|&v| v as f64),
                    xb.iter().map(|&v| v as f64),
                );
                m.push(s * r);
                b = b.max(((n * d) as f64 + 4.0) * EPS * a * r);
            }
            out.push(m);
            bound.push(b);
        }
        (out, bound)
    }
}

/// Spec §B.2 in f64: (collapsed `[T, D]`, post `[T, n]`, comb `[T, n, n]`) and the mix bounds.
fn hc_pre_ref(hc: &Hc, iters: usize, hc_eps: f64, norm_eps: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, d) = (hc.n, hc.d);
    let (mixes, bounds) = hc.mixes(norm_eps);
    let (mut collapsed, mut post, mut comb) = (vec![], vec![], vec![]);
    let (s0, s1, s2) = (hc.scale[0] as f64, hc.scale[1] as f64, hc.scale[2] as f64);
    let base = |i: usize| hc.base[i] as f64;
    for (ti, m) in mixes.iter().enumerate() {
        let pre: Vec<f64> = (0..n).map(|j| sigmoid(s0 * m[j] + base(j)) + hc_eps).collect();
        post.extend((0..n).map(|j| 2.0 * sigmoid(s1 * m[n + j] + base(n + j))));
        let mut c: Vec<Vec<f64>> =
            (0..n).map(|j| (0..n).map(|k| s2 * m[2 * n + n * j + k] + base(2 * n + n * j + k)).collect()).collect();
        for row in c.iter_mut() {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            for v in row.iter_mut() {
                *v = (*v - max).exp() / sum + hc_eps;
            }
        }
        let col_norm = |c: &mut Vec<Vec<f64>>| {
            #[allow(clippy::needless_range_loop)] // column k of a row-major matrix
            for k in 0..n {
                let s: f64 = (0..n).map(|j| c[j][k]).sum::<f64>() + hc_eps;
                (0..n).for_each(|j| c[j][k] /= s);
            }
        };
        let row_norm = |c: &mut Vec<Vec<f64>>| {
            for row in c.iter_mut() {
                let s: f64 = row.iter().sum::<f64>() + hc_eps;
                row.iter_mut().for_each(|v| *v /= s);
            }
        };
        col_norm(&mut c);
        for _ in 1..iters {
            row_norm(&mut c);
            col_norm(&mut c);
        }
        comb.extend(c.iter().flatten());
        for ch in 0..d {
            collapsed.push((0..n).map(|j| pre[j] * hc.x[(ti * n + j) * d + ch] as f64).sum());
        }
    }
    (collapsed, post, comb, bounds)
}

/// (T, n, D, sinkhorn iters, hc_eps, norm_eps, scale): V4's n = 4 and 20 iterations; a single
/// iteration (softmax + one column normalisation only); large epsilons, so that where each
/// epsilon enters is visible in the result.
type HcCase = (usize, usize, usize, usize, f32, f32, [f32; 3]);
const HC_PRE_CASES: [HcCase; 4] = [
    (3, 4, 8, 20, 1e-6, 1e-6, [0.7, 1.3, 2.1]),
    (2, 2, 5, 1, 1e-6, 1e-6, [1.0, 0.5, 3.0]),
    (2, 3, 4, 3, 0.05, 0.5, [1.1, 0.9, 1.7]),
    (1, 4, 16, 20, 0.01, 1e-6, [0.3, 2.0, 4.0]),
];

pub fn hc_pre_matches_spec_b2<B: Backend>(be: &B) {
    let mut rng = Rng(10);
    for (t, n, d, iters, hc_eps, norm_eps, scale) in HC_PRE_CASES {
        let hc = Hc::new(&mut rng, t, n, d, (2 + n) * n, &scale);
        let what = format!("hc_pre T={t} n={n} D={d} iters={iters} hc_eps={hc_eps}");
        let fn_w = weight(be, &[(2 + n) * n, n * d], &hc.fn_w);
        let (collapsed, post, comb) = be
            .hc_pre(
                &up(be, &hc.x, &[t, n, d]),
                &fn_w,
                &up(be, &hc.base, &[(2 + n) * n]),
                &up(be, &hc.scale, &[3]),
                iters,
                hc_eps,
                norm_eps,
            )
            .unwrap();
        assert_eq!(
            (collapsed.shape(), post.shape(), comb.shape()),
            (&[t, d][..], &[t, n][..], &[t, n, n][..]),
            "{what}"
        );
        let (want_c, want_post, want_comb, mb) = hc_pre_ref(&hc, iters, hc_eps as f64, norm_eps);
        let mb = mb.iter().cloned().fold(0.0, f64::max);
        // σ' <= 1/4: pre/post inherit |scale|/4 (×2 for post) of the mix error, plus a few
        // roundings of their own.
        let post_bound = 0.5 * scale[1] as f64 * mb + 8.0 * EPS;
        assert_within(&format!("{what}: post"), &down(be, &post), &want_post, |_| post_bound);
        // Collapsed = Σ_j pre_j X_j: n terms with |X| <= 2 and pre's own error.
        let pre_bound = 0.25 * scale[0] as f64 * mb + 8.0 * EPS;
        assert_within(&format!("{what}: collapsed"), &down(be, &collapsed), &want_c, |_| {
            n as f64 * 2.0 * (pre_bound + 2.0 * EPS)
        });
        // Softmax of logits that carry |scale2|·mb error, then 2·iters−1 normalisations
        // (Sinkhorn contracts towards its fixed point, so each adds only its own few roundings).
        let comb_bound = 2.0 * scale[2] as f64 * mb + (2 * iters + 2) as f64 * 4.0 * EPS;
        let got_comb = down(be, &comb);
        assert_within(&format!("{what}: comb"), &got_comb, &want_comb, |_| comb_bound);
        // The last Sinkhorn step is a column normalisation: every column sums to S/(S + hc_eps).
        for ti in 0..t {
            for k in 0..n {
                let s: f64 = (0..n).map(|j| got_comb[(ti * n + j) * n + k] as f64).sum();
                assert!(
                    (s - 1.0).abs() <= 2.0 * hc_eps as f64 + 16.0 * EPS,
                    "{what}: column {k} of token {ti} sums to {s}"
                );
            }
        }
    }
}

pub fn hc_post_mixes_source_rows_into_destination_columns<B: Backend>(be: &B) {
    let mut rng = Rng(11);
    let (t, n, d) = (2, 3, 5);
    let x = rng.vec(t * n * d);
    let y = rng.vec(t * d);
    let post: Vec<f32> = rng.vec(t * n).iter().map(|v| v + 1.0).collect();
    // A comb far from symmetric, so that using comb[k, j] for comb[j, k] fails.
    let comb: Vec<f32> = (0..t * n * n).map(|i| ((i * 7) % 11) as f32 / 10.0 + rng.f32() * 0.05).collect();
    let got = down(
        be,
        &be.hc_post(&up(be, &x, &[t, n, d]), &up(be, &y, &[t, d]), &up(be, &post, &[t, n]), &up(be, &comb, &[t, n, n]))
            .unwrap(),
    );
    let reference = |transposed: bool| -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut bound) = (vec![], vec![]);
        for ti in 0..t {
            for k in 0..n {
                for c in 0..d {
                    let mut terms = vec![post[ti * n + k] as f64 * y[ti * d + c] as f64];
                    for j in 0..n {
                        let cjk = if transposed { comb[(ti * n + k) * n + j] } else { comb[(ti * n + j) * n + k] };
                        terms.push(cjk as f64 * x[(ti * n + j) * d + c] as f64);
                    }
                    out.push(terms.iter().sum());
                    // n + 1 products summed.
                    bound.push((n + 2) as f64 * EPS * terms.iter().map(|v| v.abs()).sum::<f64>());
                }
            }
        }
        (out, bound)
    };
    let (want, bound) = reference(false);
    assert_within("hc_post", &got, &want, |i| bound[i]);
    // The test discriminates: the transposed reading of comb is far off.
    let (wrong, _) = reference(true);
    let worst = got.iter().zip(&wrong).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(worst > 1e-2, "comb is too symmetric for this test to catch a transposition ({worst})");
}

pub fn hc_head_matches_spec_b6<B: Backend>(be: &B) {
    let mut rng = Rng(12);
    for (t, n, d, hc_eps, norm_eps) in [(3, 4, 8, 1e-6f32, 1e-6f32), (2, 2, 3, 0.05, 0.5)] {
        let hc = Hc::new(&mut rng, t, n, d, n, &[0.8]);
        let got = be
            .hc_head(
                &up(be, &hc.x, &[t, n, d]),
                &weight(be, &[n, n * d], &hc.fn_w),
                &up(be, &hc.base, &[n]),
                &up(be, &hc.scale, &[1]),
                hc_eps,
                norm_eps,
            )
            .unwrap();
        assert_eq!(got.shape(), &[t, d]);
        // Spec §B.6 steps 1-3.
        let (mixes, mb) = hc.mixes(norm_eps);
        let mut want = vec![];
        for (ti, m) in mixes.iter().enumerate() {
            let pre: Vec<f64> =
                (0..n).map(|j| sigmoid(m[j] * hc.scale[0] as f64 + hc.base[j] as f64) + hc_eps as f64).collect();
            for c in 0..d {
                want.push((0..n).map(|j| pre[j] * hc.x[(ti * n + j) * d + c] as f64).sum());
            }
        }
        let mb = mb.iter().cloned().fold(0.0, f64::max);
        let pre_bound = 0.25 * hc.scale[0] as f64 * mb + 8.0 * EPS;
        assert_within(&format!("hc_head n={n}"), &down(be, &got), &want, |_| n as f64 * 2.0 * (pre_bound + 2.0 * EPS));
    }
}

// ----------------------------------------------------------------------- fused: compressor

/// `Σ_l softmax_l(score[w, l, c]) · kv[w, l, c]` in f64 (-inf scores get weight 0).
fn pool_ref(kv: &[f32], score: &[f32], w: usize, l: usize, c: usize) -> Vec<f64> {
    let mut out = vec![];
    for wi in 0..w {
        for ci in 0..c {
            let at = |li: usize| (wi * l + li) * c + ci;
            let max = (0..l).map(|li| score[at(li)] as f64).fold(f64::NEG_INFINITY, f64::max);
            let num: f64 = (0..l).map(|li| (score[at(li)] as f64 - max).exp() * kv[at(li)] as f64).sum();
            let den: f64 = (0..l).map(|li| (score[at(li)] as f64 - max).exp()).sum();
            out.push(num / den);
        }
    }
    out
}

/// Compressor-pool inputs `(kv, score, w, l, c)`; entry 0 has no previous window.
fn compressor_inputs() -> (Vec<f32>, Vec<f32>, usize, usize, usize) {
    let mut rng = Rng(13);
    let (w, m, c) = (3, 4, 5);
    let l = 2 * m; // CSA layout: m previous-window first halves, then m second halves
    let mut kv = rng.vec(w * l * c);
    let mut score: Vec<f32> = rng.vec(w * l * c).iter().map(|v| 3.0 * v).collect();
    // Entry 0 has no previous window: score -inf (weight exactly 0). Its content there is made
    // huge, so that any weight above ~1e-12 would show.
    for li in 0..m {
        for ci in 0..c {
            score[li * c + ci] = f32::NEG_INFINITY;
            kv[li * c + ci] = 1e6;
        }
    }
    (kv, score, w, l, c)
}

pub fn compressor_pool_softmax_per_channel_over_candidates<B: Backend>(be: &B) {
    let (kv, score, w, l, c) = compressor_inputs();
    let m = l / 2;
    let got = down(be, &be.compressor_pool(&up(be, &kv, &[w, l, c]), &up(be, &score, &[w, l, c])).unwrap());
    let want = pool_ref(&kv, &score, w, l, c);
    // A convex combination of |kv| <= 1 values with weights accurate to ~(|Δscore| + L + 3)·u.
    assert_within("compressor_pool", &got, &want, |_| (6 + l + 4) as f64 * EPS);
    // Entry 0 equals pooling over the second half alone.
    let second_kv: Vec<f32> = (0..m).flat_map(|li| kv[(m + li) * c..(m + li + 1) * c].to_vec()).collect();
    let second_score: Vec<f32> = (0..m).flat_map(|li| score[(m + li) * c..(m + li + 1) * c].to_vec()).collect();
    assert_within("compressor_pool entry 0", &got[..c], &pool_ref(&second_kv, &second_score, 1, m, c), |_| {
        (6 + m + 4) as f64 * EPS
    });
}

// ------------------------------------------------------------------ fused: sparse attention

/// Sparse-attention inputs: q `[T, H, d]`, the keys `[N, d]`, the pool rows the keys are
/// written to, idx `[T, K]` as key numbers (`-1` = none), sinks `[H]`.
struct Attn {
    t: usize,
    h: usize,
    d: usize,
    k: usize,
    q: Vec<f32>,
    kv: Vec<f32>,
    /// Key j lives in pool row `slots[j]`; the pool has `rows` rows.
    slots: Vec<i32>,
    rows: usize,
    keys: Vec<i32>,
    sinks: Vec<f32>,
}

impl Attn {
    fn new() -> Attn {
        let mut rng = Rng(14);
        let (t, h, d, k) = (5, 3, 6, 5);
        let mut q = rng.vec(t * h * d);
        // Query 4 has logits up to ~100: needs the max subtraction (exp(100) overflows f32).
        for v in &mut q[4 * h * d..] {
            *v *= 250.0;
        }
        #[rustfmt::skip]
        let keys: Vec<i32> = vec![
            0, 3, -1, 6, 2,
            -1, -1, -1, -1, -1, // no key at all: only the sink, output 0
            1, 2, 4, 5, 0,
            -1, 2, -1, 0, -1,
            6, 5, 4, 3, 2,
        ];
        Attn {
            t,
            h,
            d,
            k,
            q,
            kv: rng.vec(7 * d),
            slots: vec![2, 5, 0, 8, 6, 1, 3],
            rows: 9,
            keys,
            sinks: vec![0.5, -1.0, 3.0],
        }
    }

    /// idx as pool rows.
    fn idx(&self) -> Vec<i32> {
        self.keys.iter().map(|&j| if j < 0 { -1 } else { self.slots[j as usize] }).collect()
    }

    fn scale(&self) -> f32 {
        (self.d as f32).powf(-0.5)
    }

    /// The keys in a pool of `format` (None: refused).
    fn pool<B: Backend>(&self, be: &B, format: RowFormat) -> Option<B::Pool> {
        filled_pool(be, self.rows, self.d, format, &self.slots, &self.kv)
    }

    fn run<B: Backend>(&self, be: &B, pool: &B::Pool) -> Result<B::Tensor> {
        let (t, h, d, k) = (self.t, self.h, self.d, self.k);
        be.sparse_attention(
            &up(be, &self.q, &[t, h, d]),
            pool,
            &upi(be, &self.idx(), &[t, k]),
            &up(be, &self.sinks, &[h]),
            self.scale(),
            Precision::F32,
        )
    }

    /// Naive: per query and head, softmax over the listed keys (as `format` stores them) plus
    /// the sink logit (whose value is zero), skipping -1.
    fn reference(&self, format: RowFormat) -> Vec<f64> {
        let (t, h, d, k) = (self.t, self.h, self.d, self.k);
        let kv = round_trip_rows(format, &self.kv, d);
        let q = &self.q;
        let mut want = vec![0.0; t * h * d];
        for ti in 0..t {
            for hi in 0..h {
                let qh = &q[(ti * h + hi) * d..(ti * h + hi + 1) * d];
                let keys: Vec<usize> =
                    self.keys[ti * k..(ti + 1) * k].iter().filter(|&&i| i >= 0).map(|&i| i as usize).collect();
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        dot64(qh.iter().map(|&v| v as f64), kv[j * d..(j + 1) * d].iter().map(|&v| v as f64)).0
                            * self.scale() as f64
                    })
                    .collect();
                let max = logits.iter().cloned().fold(self.sinks[hi] as f64, f64::max);
                let den = (self.sinks[hi] as f64 - max).exp() + logits.iter().map(|l| (l - max).exp()).sum::<f64>();
                for (l, &j) in logits.iter().zip(&keys) {
                    for c in 0..d {
                        want[(ti * h + hi) * d + c] += (l - max).exp() / den * kv[j * d + c] as f64;
                    }
                }
            }
        }
        want
    }
}

pub fn sparse_attention_reads_pools_in_every_format<B: Backend>(be: &B) {
    let a = Attn::new();
    let (t, h, d, k) = (a.t, a.h, a.d, a.k);
    for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 2 }] {
        let Some(pool) = a.pool(be, format) else { continue };
        let got = a.run(be, &pool).unwrap_or_else(|e| panic!("sparse_attention {format:?}: {e}"));
        assert_eq!(got.shape(), &[t, h, d]);
        let got = down(be, &got);
        let want = a.reference(format);
        // Logits carry d·u relative error of |q|·|k| (up to ~100·d·u ≈ 4e-5 absolute for
        // query 4), the probabilities that plus (K + 3)·u; outputs are convex-ish sums of
        // |v| <= 1.
        let bound = |i: usize| {
            let qmax = if i >= 4 * h * d { 250.0 } else { 1.0 };
            (k as f64) * ((d as f64) * qmax * (d as f64).sqrt() * EPS + (k + 4) as f64 * EPS)
        };
        assert_within(&format!("sparse_attention {format:?}"), &got, &want, bound);
        assert!(
            got[h * d..2 * h * d].iter().all(|&v| v == 0.0),
            "{format:?}: a query with no keys attends to the sink only"
        );
    }
}

// ------------------------------------------------------------------- fused: indexer select

/// Expected `indexer_select`: score `Σ_h w_h·relu(q_h·k)·dI^-1/2` over each query's valid
/// range of keys, descending with ties to the lower key number, `-1` where fewer than k are
/// valid; a pick n is reported as pool row `key_rows[n] + offset`.
#[allow(clippy::too_many_arguments)]
fn indexer_ref(
    q: &[f32],
    keys: &[f32],
    key_rows: &[i32],
    w: &[f32],
    valid: &[Range<usize>],
    nh: usize,
    dh: usize,
    k: usize,
    offset: i32,
) -> Vec<i32> {
    let mut out = vec![];
    for (ti, r) in valid.iter().enumerate() {
        let mut scored: Vec<(f64, usize)> = r
            .clone()
            .map(|s| {
                let score = (0..nh)
                    .map(|hi| {
                        let qh = q[(ti * nh + hi) * dh..(ti * nh + hi + 1) * dh].iter().map(|&v| v as f64);
                        let dotp = dot64(qh, keys[s * dh..(s + 1) * dh].iter().map(|&v| v as f64)).0;
                        w[ti * nh + hi] as f64 * dotp.max(0.0) / (dh as f64).sqrt()
                    })
                    .sum();
                (score, s)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for slot in 0..k {
            out.push(scored.get(slot).map_or(-1, |&(_, s)| key_rows[s] + offset));
        }
    }
    out
}

/// Indexer keys in a pool of `rows` rows at `key_rows` (F32 and BF16 must be supported).
fn key_pool<B: Backend>(be: &B, rows: usize, dh: usize, format: RowFormat, key_rows: &[i32], keys: &[f32]) -> B::Pool {
    filled_pool(be, rows, dh, format, key_rows, keys).expect("F32 and BF16 pools")
}

/// Indexer inputs: `(t, nh, dh, n, k, offset, q, keys, w, valid, key_rows, pool rows)`.
struct IndexerCase {
    t: usize,
    nh: usize,
    dh: usize,
    k: usize,
    offset: i32,
    q: Vec<f32>,
    keys: Vec<f32>,
    w: Vec<f32>,
    valid: Vec<Range<usize>>,
    key_rows: Vec<i32>,
    rows: usize,
}

impl IndexerCase {
    fn new() -> IndexerCase {
        let mut rng = Rng(15);
        // Small integers and power-of-two weights with dI = 4 (scale 1/2): every score is exact
        // in f32 (and the keys in BF16) whatever the summation order, so ties are real ties and
        // the order is fully determined.
        let (t, nh, dh, n, k, offset) = (6, 2, 4, 6, 4, 100);
        let q = rng.ints(t * nh * dh, 2);
        let mut keys = rng.ints(n * dh, 2);
        let row1 = keys[dh..2 * dh].to_vec();
        keys[4 * dh..5 * dh].copy_from_slice(&row1); // keys 1 and 4 tie for every query
        #[rustfmt::skip]
        let w: Vec<f32> = vec![
            1.0, 0.5,
            2.0, -0.25,
            -1.0, -0.5, // only negative scores: still picked before any invalid entry
            0.25, 1.0,
            1.0, 1.0,
            0.0, 0.0,   // all scores 0: ties everywhere, lowest key numbers win
        ];
        IndexerCase {
            t,
            nh,
            dh,
            k,
            offset,
            q,
            keys,
            w,
            valid: vec![0..0, 0..2, 0..6, 2..5, 0..6, 1..6],
            // Not monotonic, so that ties broken by pool row would differ from ties broken by
            // key number.
            key_rows: vec![7, 2, 5, 0, 8, 3],
            rows: 10,
        }
    }

    fn run<B: Backend>(&self, be: &B, pool: &B::Pool) -> Result<B::Index> {
        let (t, nh, dh) = (self.t, self.nh, self.dh);
        be.indexer_select(
            &up(be, &self.q, &[t, nh, dh]),
            pool,
            &upi(be, &self.key_rows, &[self.key_rows.len()]),
            &up(be, &self.w, &[t, nh]),
            &self.valid,
            self.k,
            self.offset,
            Precision::F32,
        )
    }
}

pub fn indexer_select_reads_key_rows_of_a_pool<B: Backend>(be: &B) {
    let c = IndexerCase::new();
    let (t, k, offset) = (c.t, c.k, c.offset);
    for format in [RowFormat::F32, RowFormat::Bf16] {
        let pool = key_pool(be, c.rows, c.dh, format, &c.key_rows, &c.keys);
        let got = c.run(be, &pool).unwrap_or_else(|e| panic!("indexer_select {format:?}: {e}"));
        assert_eq!(got.shape(), &[t, k]);
        let got = downi(be, &got);
        let want = indexer_ref(&c.q, &c.keys, &c.key_rows, &c.w, &c.valid, c.nh, c.dh, k, offset);
        assert_eq!(got, want, "indexer_select {format:?}");
        for (ti, r) in c.valid.iter().enumerate() {
            let picks = &got[ti * k..(ti + 1) * k];
            // Causality: every pick is a valid key's row (+ offset) or -1.
            for &p in picks {
                let ok = p == -1 || r.clone().any(|n| c.key_rows[n] + offset == p);
                assert!(ok, "{format:?}: query {ti} picked {p} outside keys {r:?}");
            }
            assert_eq!(picks.iter().filter(|&&p| p != -1).count(), r.len().min(k), "{format:?}: query {ti}");
        }
        let lowest: Vec<i32> = (1..5).map(|n| c.key_rows[n] + offset).collect();
        assert_eq!(&got[5 * k..6 * k], &lowest[..], "{format:?}: all-zero scores tie to the lowest key numbers");
    }
}

pub fn indexer_causality_at_window_boundaries<B: Backend>(be: &B) {
    // Queries at positions 0..14 of one sequence with ratio 4 over the 3 complete windows'
    // keys. Entry w is valid for position p iff w < ⌊(p + 1)/4⌋ (its window ends at or before
    // p): position 3 is the first to see entry 0, position 6 does not see entry 1 yet, 7 does.
    let mut rng = Rng(19);
    let (ratio, nh, dh, n, offset) = (4, 2, 4, 3, 7);
    let positions: Vec<usize> = (0..14).collect();
    let t = positions.len();
    let q = rng.ints(t * nh * dh, 2);
    let keys = rng.ints(n * dh, 2);
    let key_rows = [0, 1, 2];
    let w: Vec<f32> = (0..t * nh).map(|i| [1.0, 0.5, -0.25, 2.0][i % 4]).collect();
    let visible: Vec<usize> = positions.iter().map(|p| ((p + 1) / ratio).min(n)).collect();
    let valid: Vec<Range<usize>> = visible.iter().map(|&v| 0..v).collect();
    let pool = key_pool(be, n, dh, RowFormat::F32, &key_rows, &keys);
    for k in [n, 2] {
        let got = be
            .indexer_select(
                &up(be, &q, &[t, nh, dh]),
                &pool,
                &upi(be, &key_rows, &[n]),
                &up(be, &w, &[t, nh]),
                &valid,
                k,
                offset,
                Precision::F32,
            )
            .unwrap();
        let got = downi(be, &got);
        assert_eq!(got, indexer_ref(&q, &keys, &key_rows, &w, &valid, nh, dh, k, offset), "k={k}");
        for (ti, &p) in positions.iter().enumerate() {
            let picks: Vec<i32> = got[ti * k..(ti + 1) * k].iter().copied().filter(|&v| v != -1).collect();
            assert_eq!(picks.len(), visible[ti].min(k), "k={k}: position {p} picks {picks:?}");
            for &s in &picks {
                let entry = (s - offset) as usize;
                let window_end = entry * ratio + ratio - 1;
                assert!(window_end <= p, "k={k}: position {p} sees entry {entry}, whose window ends at {window_end}");
            }
        }
    }
}

// ------------------------------------------------------------------------ fused: MoE

pub fn swiglu_clamps_gate_above_and_up_both_sides<B: Backend>(be: &B) {
    let gate = [-40.0f32, -15.0, -12.0, -3.0, 0.0, 5.0, 9.5, 10.0, 12.0, 40.0];
    let upv = [-40.0f32, 15.0, -10.0, -3.0, 2.0, 3.0, 10.5, 15.0, -15.0, 40.0];
    let limit = 10.0;
    let got = down(be, &be.swiglu(&up(be, &gate, &[2, 5]), &up(be, &upv, &[2, 5]), limit).unwrap());
    // Spec §B.5 step 4: gate clamped from above only, up clamped on both sides.
    let want: Vec<f64> =
        gate.iter().zip(&upv).map(|(&g, &u)| silu((g as f64).min(10.0)) * (u as f64).clamp(-10.0, 10.0)).collect();
    assert_rel("swiglu", &got, &want, 6.0 * EPS, 1e-37);
    // silu(-15)·10 ≈ -4.6e-5, not silu(-10)·10 ≈ -4.5e-3: the gate has no lower clamp.
    assert!((got[1] as f64 - silu(-15.0) * 10.0).abs() < 1e-9, "gate clamped from below: {}", got[1]);
}

/// Router inputs: logits `[T, E]` with distinct values per row (gaps of 0.25) except one exact
/// duplicate per row (a real tie), and a bias on a coarse grid.
fn router_inputs(t: usize, e: usize) -> (Vec<f32>, Vec<f32>) {
    let mut logits: Vec<f32> = (0..t * e).map(|i| ((i % e * 5 + i / e * 3) % e) as f32 * 0.25 - 1.0).collect();
    for ti in 0..t {
        logits[ti * e + (ti + 5) % e] = logits[ti * e + (ti + 1) % e];
    }
    let bias: Vec<f32> = (0..e).map(|j| [0.0, 0.5, -0.5, 0.0][j % 4]).collect();
    (logits, bias)
}

/// Spec §B.5 steps 1-3 in f64: (ids, weights). Panics when the data have near ties (a gap
/// between consecutive candidates below 1e-4 that is not an exact tie), which f32 could
/// order either way.
#[allow(clippy::too_many_arguments)]
fn moe_route_ref(
    logits: &[f32],
    t: usize,
    e: usize,
    scoring: ScoringFunc,
    bias: Option<&[f32]>,
    hash: Option<&[i32]>,
    k: usize,
    routed_scale: f64,
) -> (Vec<i32>, Vec<f64>) {
    let (mut ids, mut weights) = (vec![], vec![]);
    for ti in 0..t {
        let row: Vec<f64> = logits[ti * e..(ti + 1) * e].iter().map(|&v| v as f64).collect();
        let scores: Vec<f64> = match scoring {
            ScoringFunc::SqrtSoftplus => {
                row.iter().map(|&x| (if x > 20.0 { x } else { x.exp().ln_1p() }).sqrt()).collect()
            }
            ScoringFunc::Sigmoid => row.iter().map(|&x| sigmoid(x)).collect(),
            ScoringFunc::Softmax => {
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
                row.iter().map(|x| (x - max).exp() / sum).collect()
            }
        };
        let picks: Vec<usize> = match hash {
            Some(h) => h[ti * k..(ti + 1) * k].iter().map(|&i| i as usize).collect(),
            None => {
                let key = |j: usize| scores[j] + bias.map_or(0.0, |b| b[j] as f64);
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
                for pair in order[..(k + 1).min(e)].windows(2) {
                    let gap = key(pair[0]) - key(pair[1]);
                    let exact_tie = row[pair[0]] == row[pair[1]] && bias.is_none_or(|b| b[pair[0]] == b[pair[1]]);
                    assert!(gap == 0.0 && exact_tie || gap > 1e-4, "router test data: near tie {pair:?} ({gap:e})");
                }
                order[..k].to_vec()
            }
        };
        let sum: f64 = picks.iter().map(|&j| scores[j]).sum();
        ids.extend(picks.iter().map(|&j| j as i32));
        weights.extend(picks.iter().map(|&j| scores[j] / (sum + 1e-20) * routed_scale));
    }
    (ids, weights)
}

pub fn moe_route_scores_selects_and_normalises<B: Backend>(be: &B) {
    let (t, e, k, routed_scale) = (5, 8, 3, 1.5f32);
    let (logits, bias) = router_inputs(t, e);
    let hash: Vec<i32> = (0..t * k).map(|i| ((i * 5 + 3) % e) as i32).collect();
    for scoring in [ScoringFunc::SqrtSoftplus, ScoringFunc::Sigmoid, ScoringFunc::Softmax] {
        for (with_bias, with_hash) in [(false, false), (true, false), (false, true)] {
            let what = format!("moe_route {scoring:?} bias {with_bias} hash {with_hash}");
            let bias_t = with_bias.then(|| up(be, &bias, &[e]));
            let hash_t = with_hash.then(|| upi(be, &hash, &[t, k]));
            let (ids, w) = be
                .moe_route(&up(be, &logits, &[t, e]), scoring, bias_t.as_ref(), hash_t.as_ref(), k, routed_scale)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!((ids.shape(), w.shape()), (&[t, k][..], &[t, k][..]), "{what}");
            let (want_ids, want_w) = moe_route_ref(
                &logits,
                t,
                e,
                scoring,
                with_bias.then_some(&bias[..]),
                with_hash.then_some(&hash[..]),
                k,
                routed_scale as f64,
            );
            assert_eq!(downi(be, &ids), want_ids, "{what}: ids");
            // Scores within a few ulp (softmax: ~E terms), then a k-term sum and a division.
            assert_rel(&format!("{what}: weights"), &down(be, &w), &want_w, (e + k + 8) as f64 * EPS, 1e-30);
        }
    }
}

struct Experts {
    d: usize,
    i: usize,
    w1: Vec<Vec<f32>>,
    w2: Vec<Vec<f32>>,
    w3: Vec<Vec<f32>>,
}

impl Experts {
    fn new(rng: &mut Rng, e: usize, d: usize, i: usize) -> Experts {
        let mut m = |r: usize, c: usize| -> Vec<Vec<f32>> {
            (0..e).map(|_| rng.vec(r * c).iter().map(|v| 1.5 * v).collect()).collect()
        };
        Experts { d, i, w1: m(i, d), w2: m(d, i), w3: m(i, d) }
    }

    fn upload<B: Backend>(&self, be: &B) -> Vec<ExpertWeights<B::Weight>> {
        (0..self.w1.len())
            .map(|e| ExpertWeights {
                w1: weight(be, &[self.i, self.d], &self.w1[e]),
                w2: weight(be, &[self.d, self.i], &self.w2[e]),
                w3: weight(be, &[self.i, self.d], &self.w3[e]),
                // As if stored FP8/FP4: the official precisions quantise the experts' inputs.
                low_bit: true,
            })
            .collect()
    }

    /// `w2 · (silu(min(w1·x, L)) ⊙ clamp(w3·x, -L, L))` in f64.
    fn apply(&self, e: usize, x: &[f32], limit: f64) -> Vec<f64> {
        let (d, i) = (self.d, self.i);
        let h: Vec<f64> = (0..i)
            .map(|r| {
                let g = dot64(self.w1[e][r * d..(r + 1) * d].iter().map(|&v| v as f64), x.iter().map(|&v| v as f64)).0;
                let u = dot64(self.w3[e][r * d..(r + 1) * d].iter().map(|&v| v as f64), x.iter().map(|&v| v as f64)).0;
                silu(g.min(limit)) * u.clamp(-limit, limit)
            })
            .collect();
        (0..d).map(|c| dot64(self.w2[e][c * i..(c + 1) * i].iter().map(|&v| v as f64), h.iter().copied()).0).collect()
    }
}

/// MoE inputs: `(t, d, i, e, k, limit, x, experts, ids, weights)`; the top-k order is not
/// ascending and expert 4 is never used.
#[allow(clippy::type_complexity)]
fn moe_inputs() -> (usize, usize, usize, usize, usize, f32, Vec<f32>, Experts, Vec<i32>, Vec<f32>) {
    let mut rng = Rng(16);
    let (t, d, i, e, k) = (5, 6, 4, 5, 3);
    let limit = 1.0f32; // small, so that both clamps are active for some rows
    let x = rng.vec(t * d);
    let ex = Experts::new(&mut rng, e, d, i);
    #[rustfmt::skip]
    let ids: Vec<i32> = vec![
        2, 0, 3,
        3, 1, 0,
        1, 2, 3,
        0, 3, 2,
        3, 2, 1,
    ];
    let w: Vec<f32> = rng.vec(t * k).iter().map(|v| 0.3 + v.abs()).collect();
    (t, d, i, e, k, limit, x, ex, ids, w)
}

pub fn moe_experts_accumulate_in_ascending_expert_order<B: Backend>(be: &B) {
    let (t, d, i, e, k, limit, x, ex, ids, w) = moe_inputs();
    let experts = ex.upload(be);
    let got = down(
        be,
        &be.moe_experts(&up(be, &x, &[t, d]), &ids, &up(be, &w, &[t, k]), &experts, limit, Precision::F32).unwrap(),
    );

    // Against f64: each expert output is a chain of D- and I-term dot products through a
    // 1.1-Lipschitz SwiGLU of clamped inputs; ≲ (D + I + 8)·u·|W|·|x| per expert, times Σ w ≤ 4.
    let mut want = vec![0.0; t * d];
    for ti in 0..t {
        for j in 0..k {
            let y = ex.apply(ids[ti * k + j] as usize, &x[ti * d..(ti + 1) * d], limit as f64);
            for c in 0..d {
                want[ti * d + c] += w[ti * k + j] as f64 * y[c];
            }
        }
    }
    assert_within("moe_experts", &got, &want, |_| 4.0 * (d + i + 8) as f64 * EPS * 10.0);

    // The definition (the trait's composition, `composed::moe_experts`, on this backend's
    // primitives) bit for bit against f32 in transformers' eager order: each expert on its
    // rows, the weight applied after w2, accumulated into zeros in ascending expert id. That
    // needs the expert FFN to give a row the same bits whichever rows it runs with; where it
    // does not (GEMM tiling), the order is not observable and only the f64 check applies. An
    // override (a grouped-matmul kernel) may round differently: it is held to the f64 bound
    // above and to the composition in `fused_ops_match_default_compositions`.
    let xt = up(be, &x, &[t, d]);
    let wt = up(be, &w, &[t, k]);
    let definition = down(be, &composed::moe_experts(be, &xt, &ids, &wt, &experts, limit, Precision::F32).unwrap());
    let per_expert: Vec<Vec<f32>> =
        experts.iter().map(|ew| down(be, &be.expert_ffn(&xt, ew, limit, Precision::F32).unwrap())).collect();
    let row_independent = (0..t).all(|ti| {
        let one = down(
            be,
            &be.expert_ffn(&up(be, &x[ti * d..(ti + 1) * d], &[1, d]), &experts[0], limit, Precision::F32).unwrap(),
        );
        bits(&one) == bits(&per_expert[0][ti * d..(ti + 1) * d])
    });
    if !row_independent {
        println!("{}: expert_ffn depends on the batch's rows; accumulation order not checked bit for bit", be.name());
        return;
    }
    let accumulate = |order: &[(usize, usize)]| -> Vec<f32> {
        let mut out = vec![0f32; t * d];
        for &(ti, j) in order {
            let ei = ids[ti * k + j] as usize;
            for c in 0..d {
                out[ti * d + c] += per_expert[ei][ti * d + c] * w[ti * k + j];
            }
        }
        out
    };
    let mut ascending = vec![];
    for ei in 0..e {
        for (s, &id) in ids.iter().enumerate() {
            if id as usize == ei {
                ascending.push((s / k, s % k));
            }
        }
    }
    let eager = accumulate(&ascending);
    assert_eq!(
        bits(&definition),
        bits(&eager),
        "composed::moe_experts is not the ascending-expert sum of weight·w2(h)"
    );
    if bits(&got) != bits(&eager) {
        println!("{}: the moe_experts override rounds differently from the composition", be.name());
    }
    // The data tell the orders apart: slot order (top-k order) rounds differently somewhere.
    let slot_order: Vec<(usize, usize)> = (0..t).flat_map(|ti| (0..k).map(move |j| (ti, j))).collect();
    assert_ne!(bits(&accumulate(&slot_order)), bits(&eager), "test data cannot tell accumulation orders apart");
}

// ----------------------------------------------------------- fused ops vs their compositions

/// Every fused op on the backend (`composed.0`, its overrides) against the trait's default
/// composition of its own primitives (`composed`), on the same inputs: discrete results
/// (indexer picks, routed ids) equal, values within a few ulp of the largest magnitude.
pub fn fused_ops_match_default_compositions<B: Backend>(composed: &PrimitivesOnly<B>) {
    let be = &composed.0;
    let rel = 64.0 * EPS;
    let mut rng = Rng(30);

    for (t, n, d, iters, hc_eps, norm_eps, scale) in HC_PRE_CASES {
        let hc = Hc::new(&mut rng, t, n, d, (2 + n) * n, &scale);
        let (x, fn_w) = (up(be, &hc.x, &[t, n, d]), weight(be, &[(2 + n) * n, n * d], &hc.fn_w));
        let (base, sc) = (up(be, &hc.base, &[(2 + n) * n]), up(be, &hc.scale, &[3]));
        let a = be.hc_pre(&x, &fn_w, &base, &sc, iters, hc_eps, norm_eps).unwrap();
        let b = composed.hc_pre(&x, &fn_w, &base, &sc, iters, hc_eps, norm_eps).unwrap();
        let what = format!("hc_pre n={n} iters={iters}");
        assert_close(&format!("{what}: collapsed"), &down(be, &a.0), &down(be, &b.0), rel);
        assert_close(&format!("{what}: post"), &down(be, &a.1), &down(be, &b.1), rel);
        assert_close(&format!("{what}: comb"), &down(be, &a.2), &down(be, &b.2), rel * iters as f64);

        let y = up(be, &rng.vec(t * d), &[t, d]);
        let a2 = be.hc_post(&x, &y, &a.1, &a.2).unwrap();
        let b2 = composed.hc_post(&x, &y, &a.1, &a.2).unwrap();
        assert_close(&format!("hc_post n={n}"), &down(be, &a2), &down(be, &b2), rel);

        let head = Hc::new(&mut rng, t, n, d, n, &[0.8]);
        let (hw, hb, hs) = (weight(be, &[n, n * d], &head.fn_w), up(be, &head.base, &[n]), up(be, &head.scale, &[1]));
        let a3 = be.hc_head(&x, &hw, &hb, &hs, hc_eps, norm_eps).unwrap();
        let b3 = composed.hc_head(&x, &hw, &hb, &hs, hc_eps, norm_eps).unwrap();
        assert_close(&format!("hc_head n={n}"), &down(be, &a3), &down(be, &b3), rel);
    }

    let (kv, score, w, l, c) = compressor_inputs();
    let (kvt, st) = (up(be, &kv, &[w, l, c]), up(be, &score, &[w, l, c]));
    let a = be.compressor_pool(&kvt, &st).unwrap();
    let b = composed.compressor_pool(&kvt, &st).unwrap();
    assert_close("compressor_pool", &down(be, &a), &down(be, &b), rel);

    let att = Attn::new();
    for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 2 }] {
        let Some(pool) = att.pool(be, format) else { continue };
        let a = down(be, &att.run(be, &pool).unwrap());
        let b = down(be, &att.run(composed, &pool).unwrap());
        // Query 4's logits reach ~100: relative to them, not to the outputs.
        assert_close(&format!("sparse_attention {format:?}"), &a, &b, rel * 100.0);
    }

    let ic = IndexerCase::new();
    for format in [RowFormat::F32, RowFormat::Bf16] {
        let pool = key_pool(be, ic.rows, ic.dh, format, &ic.key_rows, &ic.keys);
        let a = downi(be, &ic.run(be, &pool).unwrap());
        let b = downi(be, &ic.run(composed, &pool).unwrap());
        assert_eq!(a, b, "indexer_select {format:?}");
    }

    let gate: Vec<f32> = rng.vec(20).iter().map(|v| v * 15.0).collect();
    let upv: Vec<f32> = rng.vec(20).iter().map(|v| v * 15.0).collect();
    let (g, u) = (up(be, &gate, &[4, 5]), up(be, &upv, &[4, 5]));
    assert_close(
        "swiglu",
        &down(be, &be.swiglu(&g, &u, 10.0).unwrap()),
        &down(be, &composed.swiglu(&g, &u, 10.0).unwrap()),
        rel,
    );

    let (t, e, k) = (5, 8, 3);
    let (logits, bias) = router_inputs(t, e);
    let hash: Vec<i32> = (0..t * k).map(|i| ((i * 5 + 3) % e) as i32).collect();
    let (lt, bt, ht) = (up(be, &logits, &[t, e]), up(be, &bias, &[e]), upi(be, &hash, &[t, k]));
    for scoring in [ScoringFunc::SqrtSoftplus, ScoringFunc::Sigmoid, ScoringFunc::Softmax] {
        for (bias, hash) in [(None, None), (Some(&bt), None), (None, Some(&ht))] {
            let what = format!("moe_route {scoring:?} bias {} hash {}", bias.is_some(), hash.is_some());
            let (ai, aw) = be.moe_route(&lt, scoring, bias, hash, k, 2.5).unwrap();
            let (bi, bw) = composed.moe_route(&lt, scoring, bias, hash, k, 2.5).unwrap();
            assert_eq!(downi(be, &ai), downi(be, &bi), "{what}: ids");
            assert_close(&format!("{what}: weights"), &down(be, &aw), &down(be, &bw), rel);
        }
    }

    let (t, d, _, _, k, limit, x, ex, ids, w) = moe_inputs();
    let experts = ex.upload(be);
    let (xt, wt) = (up(be, &x, &[t, d]), up(be, &w, &[t, k]));
    for act in Precision::ALL {
        // In bf16 a value the two paths compute a few f32 ulps apart may round to the other
        // BF16 neighbour (2^-7 of it), which w2 carries into its output: 2^-5 covers two such
        // ulps relative to the largest output, far below what a missed rounding point or a
        // wrong expert gives.
        let (rel, xt) = match act {
            Precision::F32 | Precision::OfficialF32 => (rel, xt.clone()),
            Precision::Bf16 | Precision::Official => (2f64.powi(-5), be.round_to_bf16(&xt).unwrap()),
        };
        let a = be.moe_experts(&xt, &ids, &wt, &experts, limit, act).unwrap();
        let b = composed.moe_experts(&xt, &ids, &wt, &experts, limit, act).unwrap();
        assert_close(&format!("moe_experts {act}"), &down(be, &a), &down(be, &b), rel);
        let a = be.expert_ffn(&xt, &experts[1], limit, act).unwrap();
        let b = composed.expert_ffn(&xt, &experts[1], limit, act).unwrap();
        let a = down(be, &a);
        if act.rounds_to_bf16() {
            assert!(a.iter().all(|v| v.to_bits() & 0xffff == 0), "{}: bf16 expert_ffn gives BF16 values", be.name());
        }
        assert_close(&format!("expert_ffn {act}"), &a, &down(be, &b), rel);
    }
}

// ------------------------------------------------------------------------------ bad inputs

/// Every primitive (and the pool and fused ops) given shapes that do not fit together returns
/// an error; for primitives and pool operations, one that names the operation.
pub fn mismatched_shapes_are_errors<B: Backend>(be: &B) {
    let mut x = Expect::new(be);
    let t = |shape: &[usize]| up(be, &vec![0.5; shape.iter().product()], shape);
    let ti = |shape: &[usize]| upi(be, &vec![0; shape.iter().product()], shape);
    let (t23, t43, t234, scalar) = (t(&[2, 3]), t(&[4, 3]), t(&[2, 3, 4]), t(&[]));

    x.err("upload: 5 values for [2, 3]", &["upload"], || be.upload(&[1.0; 5], &[2, 3]));
    x.err("upload_index: 5 values for [2, 3]", &["upload_index"], || be.upload_index(&[1; 5], &[2, 3]));

    let w43 = weight(be, &[4, 3], &[0.0; 12]);
    x.err("linear: K 4 against [4, 3]", &["linear"], || be.linear(&t(&[2, 4]), &w43));
    x.err("linear: 0-d input", &["linear"], || be.linear(&scalar, &w43));
    let w64 = weight(be, &[6, 4], &[0.0; 24]);
    x.err("grouped_linear: groups != x.shape[1]", &["grouped_linear"], || be.grouped_linear(&t(&[1, 2, 4]), &w64, 4));
    x.err("grouped_linear: K differs", &["grouped_linear"], || be.grouped_linear(&t(&[1, 2, 3]), &w64, 2));
    x.err("grouped_linear: 2-D input", &["grouped_linear"], || be.grouped_linear(&t(&[2, 4]), &w64, 2));

    x.err("matmul: inner dims (transposed)", &["matmul"], || be.matmul(&t(&[3, 5]), &t(&[5, 6]), true));
    x.err("matmul: inner dims", &["matmul"], || be.matmul(&t(&[3, 5]), &t(&[6, 5]), false));
    x.err("matmul: batch dims", &["matmul"], || be.matmul(&t(&[2, 3, 5]), &t(&[3, 5, 6]), false));
    x.err("matmul: batch ranks", &["matmul"], || be.matmul(&t(&[2, 3, 5]), &t(&[1, 2, 5, 6]), false));
    x.err("matmul: 1-D a", &["matmul"], || be.matmul(&t(&[5]), &t(&[5, 6]), false));

    x.err("binary: [2, 3] and [4, 3]", &["binary"], || be.binary(&t23, &t43, BinaryOp::Add));
    x.err("reduce: axis 3 of 3-D", &["reduce"], || be.reduce(&t234, 3, ReduceOp::Sum));
    x.err("reduce: 0-d", &["reduce"], || be.reduce(&scalar, 0, ReduceOp::Max));
    x.err("softmax: axis 3 of 3-D", &["softmax"], || be.softmax(&t234, 3));
    x.err("rms_norm: weight [3] for [6, 7]", &["rms_norm"], || be.rms_norm(&t(&[6, 7]), Some(&t(&[3])), 1e-6));
    x.err("rms_norm: 0-d", &["rms_norm"], || be.rms_norm(&scalar, None, 1e-6));
    let x3 = t(&[3, 2, 10]);
    x.err("rope: rotary part wider than the head", &["rope"], || be.rope(&x3, &t(&[3, 6]), &t(&[3, 6]), false));
    x.err("rope: cos and sin differ", &["rope"], || be.rope(&x3, &t(&[3, 3]), &t(&[3, 2]), false));
    x.err("rope: T differs", &["rope"], || be.rope(&x3, &t(&[2, 3]), &t(&[2, 3]), false));
    x.err("rope: 2-D x", &["rope"], || be.rope(&t(&[3, 10]), &t(&[3, 3]), &t(&[3, 3]), false));

    x.err("reshape: 24 into 25", &["reshape"], || be.reshape(&t234, &[5, 5]));
    x.err("transpose: axis 3 of 3-D", &["transpose"], || be.transpose(&t234, 0, 3));
    x.err("narrow: 2+2 of 3", &["narrow"], || be.narrow(&t234, 1, 2, 2));
    x.err("narrow: axis 3 of 3-D", &["narrow"], || be.narrow(&t234, 3, 0, 1));
    x.err("narrow: start + len overflows", &["narrow"], || be.narrow(&t234, 1, usize::MAX, 2));
    x.err("concat: sizes differ off the axis", &["concat"], || be.concat(&[&t23, &t(&[2, 4])], 0));
    x.err("concat: ranks differ", &["concat"], || be.concat(&[&t23, &t234], 0));
    x.err("concat: nothing", &["concat"], || be.concat(&[], 0));
    x.err("concat: axis 2 of 2-D", &["concat"], || be.concat(&[&t23, &t23], 2));
    let (i23, i21) = (ti(&[2, 3]), ti(&[3, 1]));
    x.err("concat_index: sizes differ", &["concat_index"], || be.concat_index(&[&i23, &i21], 0));
    x.err("concat_index: nothing", &["concat_index"], || be.concat_index(&[], 0));
    x.err("concat_index: axis 2 of 2-D", &["concat_index"], || be.concat_index(&[&i23, &i23], 2));

    x.err("index_select: 0-d x", &["index_select"], || be.index_select(&scalar, &ti(&[1])));
    x.err("gather_last: leading dims differ", &["gather_last"], || be.gather_last(&t(&[2, 5]), &ti(&[3, 1])));
    x.err("gather_last: 0-d x", &["gather_last"], || be.gather_last(&scalar, &ti(&[1])));
    x.err("gather_last: 0-d idx", &["gather_last"], || be.gather_last(&t(&[5]), &ti(&[])));
    let dst = t(&[3, 2]);
    x.err("index_add: 2 indices, 1 src row", &["index_add"], || be.index_add(&dst, &ti(&[2]), &t(&[1, 2])));
    x.err("index_add: row widths differ", &["index_add"], || be.index_add(&dst, &ti(&[1]), &t(&[1, 3])));
    x.err("index_add: 0-d src", &["index_add"], || be.index_add(&t(&[1]), &ti(&[1]), &scalar));
    x.err("index_add: 0-d dst", &["index_add"], || be.index_add(&scalar, &ti(&[1]), &t(&[1])));
    x.err("topk: k 8 of 7", &["topk"], || be.topk(&t(&[3, 7]), 8));
    x.err("topk: 0-d", &["topk"], || be.topk(&scalar, 0));

    let mut pool = be.alloc_pool(4, 3, RowFormat::F32).unwrap();
    x.err("pool_write: values width 4 into width 3", &["pool_write"], || {
        be.pool_write(&mut pool, &ti(&[2]), &t(&[2, 4]))
    });
    x.err("pool_write: 2 slots, 3 value rows", &["pool_write"], || be.pool_write(&mut pool, &ti(&[2]), &t(&[3, 3])));
    x.err("pool_write: 1-D values", &["pool_write"], || be.pool_write(&mut pool, &ti(&[1]), &t(&[3])));

    // Fused ops: an error, from the op or from the primitive that cannot take the shapes.
    let (q, sinks, idx) = (t(&[5, 3, 3]), t(&[3]), ti(&[5, 2]));
    x.err("sparse_attention: q width 4, pool width 3", &[], || {
        be.sparse_attention(&t(&[5, 3, 4]), &pool, &idx, &sinks, 1.0, Precision::F32)
    });
    x.err("sparse_attention: idx for 4 queries, 5 queries", &[], || {
        be.sparse_attention(&q, &pool, &ti(&[4, 2]), &sinks, 1.0, Precision::F32)
    });
    x.err("sparse_attention: 2 sinks, 3 heads", &[], || {
        be.sparse_attention(&q, &pool, &idx, &t(&[2]), 1.0, Precision::F32)
    });
    x.err("sparse_attention: 2-D q", &[], || {
        be.sparse_attention(&t(&[5, 3]), &pool, &idx, &sinks, 1.0, Precision::F32)
    });
    x.err("sparse_attention: 1-D idx", &[], || be.sparse_attention(&q, &pool, &ti(&[5]), &sinks, 1.0, Precision::F32));
    let (iq, rows, iw) = (t(&[2, 2, 3]), ti(&[3]), t(&[2, 2]));
    x.err("indexer_select: 1 validity range, 2 queries", &[], || {
        be.indexer_select(&iq, &pool, &rows, &iw, &[0..1, 0..2][..1], 1, 0, Precision::F32)
    });
    x.err("indexer_select: weights [2, 3], 2 heads", &[], || {
        be.indexer_select(&iq, &pool, &rows, &t(&[2, 3]), &[0..1, 0..2], 1, 0, Precision::F32)
    });
    x.err("indexer_select: q width 4, pool width 3", &[], || {
        be.indexer_select(&t(&[2, 2, 4]), &pool, &rows, &iw, &[0..1, 0..2], 1, 0, Precision::F32)
    });
    x.err("indexer_select: 2-D q", &[], || {
        be.indexer_select(&t(&[2, 6]), &pool, &rows, &iw, &[0..1, 0..2], 1, 0, Precision::F32)
    });
    x.err("indexer_select: 2-D key_rows", &[], || {
        be.indexer_select(&iq, &pool, &ti(&[3, 1]), &iw, &[0..1, 0..2], 1, 0, Precision::F32)
    });
    x.err("indexer_select: k 4 of 3 keys", &[], || {
        be.indexer_select(&iq, &pool, &rows, &iw, &[0..3, 0..2], 4, 0, Precision::F32)
    });
    x.err("moe_route: k 9 of 8 experts", &[], || be.moe_route(&t(&[2, 8]), ScoringFunc::Sigmoid, None, None, 9, 1.0));
    x.err("moe_route: bias [7] for 8 experts", &[], || {
        be.moe_route(&t(&[2, 8]), ScoringFunc::Sigmoid, Some(&t(&[7])), None, 2, 1.0)
    });
    x.finish();
}

/// `grouped_linear` with no groups or groups that do not divide the weight's rows is an error
/// (it used to divide by zero on the CPU).
pub fn grouped_linear_with_bad_groups_is_an_error<B: Backend>(be: &B) {
    let mut x = Expect::new(be);
    let w64 = weight(be, &[6, 4], &[0.0; 24]);
    x.err("grouped_linear: 6 rows into 4 groups", &["grouped_linear"], || {
        be.grouped_linear(&up(be, &[0.0; 16], &[1, 4, 4]), &w64, 4)
    });
    x.err("grouped_linear: 0 groups, 6 rows", &["grouped_linear"], || {
        be.grouped_linear(&up(be, &[], &[1, 0, 4]), &w64, 0)
    });
    match be.upload_weight(&f32_weight("empty.weight", &[0, 4], &[])) {
        Ok(w04) => x.err("grouped_linear: 0 groups, 0 rows", &["grouped_linear"], || {
            be.grouped_linear(&up(be, &[], &[1, 0, 4]), &w04, 0)
        }),
        Err(e) => {
            println!("{}: an empty weight is refused at upload ({e}); 0 groups of 0 rows not reachable", be.name())
        }
    }
    x.finish();
}

/// Indices outside their operand (and negative ones other than the `-1` "no entry" where it
/// is allowed) are errors, not out-of-bounds reads or writes.
pub fn bad_indices_are_errors<B: Backend>(be: &B) {
    let mut x = Expect::new(be);
    let x4 = up(be, &(0..24).map(|v| v as f32).collect::<Vec<_>>(), &[4, 2, 3]);
    for bad in [4, -2, i32::MAX, i32::MIN] {
        let s = bad.to_string();
        x.err(&format!("index_select: index {bad} of 4 rows"), &["index_select", &s], || {
            be.index_select(&x4, &upi(be, &[0, bad], &[2]))
        });
    }
    let x25 = up(be, &[0.0; 10], &[2, 5]);
    for bad in [5, -1, -2] {
        let s = bad.to_string();
        x.err(&format!("gather_last: index {bad} of 5"), &["gather_last", &s], || {
            be.gather_last(&x25, &upi(be, &[0, bad], &[2, 1]))
        });
    }
    let dst = up(be, &[0.0; 6], &[3, 2]);
    for bad in [3, -1, -2] {
        let s = bad.to_string();
        x.err(&format!("index_add: index {bad} of 3 rows"), &["index_add", &s], || {
            be.index_add(&dst, &upi(be, &[0, bad], &[2]), &up(be, &[1.0; 4], &[2, 2]))
        });
    }
    let table = weight(be, &[10, 6], &[0.25; 60]);
    for bad in [10, -1, -2] {
        let s = bad.to_string();
        x.err(&format!("embedding: id {bad} of 10"), &["embedding", &s], || {
            be.embedding(&table, &upi(be, &[1, bad], &[2]))
        });
    }
    let mut pool = be.alloc_pool(4, 3, RowFormat::F32).unwrap();
    for bad in [4, -1, -2] {
        let s = bad.to_string();
        x.err(&format!("pool_write: slot {bad} of 4"), &["pool_write", &s], || {
            be.pool_write(&mut pool, &upi(be, &[0, bad], &[2]), &up(be, &[1.0; 6], &[2, 3]))
        });
    }
    for bad in [4, -2] {
        let s = bad.to_string();
        x.err(&format!("pool_read: slot {bad} of 4"), &["pool_read", &s], || {
            be.pool_read(&pool, &upi(be, &[0, bad], &[2]))
        });
    }
    let (q, sinks) = (up(be, &[0.1; 18], &[2, 3, 3]), up(be, &[0.0; 3], &[3]));
    for bad in [4, -2] {
        x.err(&format!("sparse_attention: index {bad} of a 4-row pool"), &[], || {
            be.sparse_attention(&q, &pool, &upi(be, &[0, 1, bad, -1], &[2, 2]), &sinks, 1.0, Precision::F32)
        });
    }
    let (iq, iw) = (up(be, &[0.1; 12], &[2, 2, 3]), up(be, &[1.0; 4], &[2, 2]));
    for bad in [4, -1] {
        x.err(&format!("indexer_select: key row {bad} of a 4-row pool"), &[], || {
            be.indexer_select(&iq, &pool, &upi(be, &[0, bad], &[2]), &iw, &[0..1, 0..2], 1, 0, Precision::F32)
        });
    }
    x.err("indexer_select: validity range 0..3 of 2 keys", &[], || {
        be.indexer_select(&iq, &pool, &upi(be, &[0, 1], &[2]), &iw, &[0..3, 0..2], 1, 0, Precision::F32)
    });
    let logits = up(be, &[0.0; 16], &[2, 8]);
    x.err("moe_route: hash id 8 of 8 experts", &[], || {
        be.moe_route(&logits, ScoringFunc::Sigmoid, None, Some(&upi(be, &[0, 8], &[2, 1])), 1, 1.0)
    });
    let (xm, wm) = (up(be, &[0.5; 6], &[2, 3]), up(be, &[1.0; 2], &[2, 1]));
    let experts = Experts::new(&mut Rng(50), 2, 3, 2).upload(be);
    for bad in [2, -1] {
        x.err(&format!("moe_experts: expert {bad} of 2"), &[], || {
            be.moe_experts(&xm, &[0, bad], &wm, &experts, 10.0, Precision::F32)
        });
    }
    x.finish();
}
