//! Every op of `dsv4_core::Backend` on the CPU backend, each against a plain-loop reference
//! written here (f64 where rounding matters), and the fused V4 ops against direct
//! implementations of spec §B. The fused ops run twice: on `CpuBackend` itself (its fused
//! overrides) and on `PrimitivesOnly`, which forwards only the primitives so that the trait's default
//! compositions (the executable definition every other backend inherits) run.
//!
//! Tolerances. `u = 2^-24` is the f32 unit roundoff and `EPS = 2u` (`f32::EPSILON`). A sum of
//! K products computed in f32 in any order (with or without FMA) is within `K·u·Σ|terms|` of
//! the exact value, so `K·EPS·Σ|terms|` (a factor 2 of margin) bounds every dot product here.
//! Elementwise functions of libm quality are within a few ulp, hence `4·EPS` relative.

use std::ops::Range;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::{Backend, BinaryOp, DeviceTensor, ExpertWeights, ReduceOp, UnaryOp};
use dsv4_core::config::RopeParams;
use dsv4_core::model::cache::CompressorState;
use dsv4_core::model::compressor::Compressor;
use dsv4_core::model::loader::Loader;
use dsv4_core::model::rope::RopeTable;
use dsv4_core::primitives_only::PrimitivesOnly;
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::{Checkpoint, ModelConfig};

const EPS: f64 = f32::EPSILON as f64;

// ------------------------------------------------------------------------------- helpers

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in [-1, 1] on a grid of 1/1000.
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Small integers in -r..=r (exact in f32, so sums and products of them are exact too).
    fn ints(&mut self, n: usize, r: u64) -> Vec<f32> {
        (0..n).map(|_| (self.next() % (2 * r + 1)) as f32 - r as f32).collect()
    }
}

fn up<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> B::Tensor {
    be.upload(data, shape).unwrap()
}

fn down<B: Backend>(be: &B, t: &B::Tensor) -> Vec<f32> {
    be.download(t).unwrap()
}

fn upi<B: Backend>(be: &B, data: &[i32], shape: &[usize]) -> B::Index {
    be.upload_index(data, shape).unwrap()
}

fn downi<B: Backend>(be: &B, t: &B::Index) -> Vec<i32> {
    be.download_index(t).unwrap()
}

fn f32_weight(name: &str, shape: &[usize], data: &[f32]) -> StoredWeight {
    StoredWeight::float(HostTensor::from_f32(name, shape.to_vec(), data).unwrap()).unwrap()
}

fn weight<B: Backend>(be: &B, shape: &[usize], data: &[f32]) -> B::Weight {
    be.upload_weight(&f32_weight("w.weight", shape, data)).unwrap()
}

/// A float weight stored as `dtype`, and the exact values it holds (BF16/F16 round `data`).
fn stored_as(dtype: DType, shape: &[usize], data: &[f32]) -> (StoredWeight, Vec<f64>) {
    let (bytes, exact): (Vec<u8>, Vec<f64>) = match dtype {
        DType::F32 => (data.iter().flat_map(|v| v.to_le_bytes()).collect(), data.iter().map(|&v| v as f64).collect()),
        DType::BF16 => {
            let h: Vec<half::bf16> = data.iter().map(|&v| half::bf16::from_f32(v)).collect();
            (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f64()).collect())
        }
        DType::F16 => {
            let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
            (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f64()).collect())
        }
        other => panic!("not a float dtype: {other}"),
    };
    let t = HostTensor::from_bytes("w.weight", dtype, shape.to_vec(), bytes).unwrap();
    (StoredWeight::float(t).unwrap(), exact)
}

/// Asserts `|got[i] - want[i]| <= bound(i)` for every i (equal infinities pass, NaN never does).
#[track_caller]
fn assert_within(what: &str, got: &[f32], want: &[f64], bound: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g as f64 == w {
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(err <= bound(i), "{what}[{i}]: got {g}, want {w} (error {err:e} > bound {:e})", bound(i));
    }
}

/// `|got - want| <= abs + rel·|want|`.
#[track_caller]
fn assert_rel(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_within(what, got, want, |i| abs + rel * want[i].abs());
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

/// Forwards every primitive to the CPU backend and none of the fused ops, so the trait's
/// default compositions run.

// ------------------------------------------------------------------------------ memory

#[test]
fn upload_download_full_and_shape_checks() {
    let be = CpuBackend::new();
    let t = up(&be, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(t.shape(), &[2, 3]);
    assert_eq!(down(&be, &t), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert!(be.upload(&[1.0; 5], &[2, 3]).is_err(), "5 values for 6 slots");
    assert!(be.upload_index(&[1; 5], &[2, 3]).is_err());
    assert_eq!(downi(&be, &upi(&be, &[-1, 0, 7], &[3])), vec![-1, 0, 7]);
    let f = be.full(&[2, 2], -2.5).unwrap();
    assert_eq!((f.shape().to_vec(), down(&be, &f)), (vec![2, 2], vec![-2.5; 4]));
    let w = weight(&be, &[3, 4], &[0.0; 12]);
    assert_eq!(be.weight_shape(&w), &[3, 4]);
    be.synchronize().unwrap();
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

#[test]
fn linear_f32_bf16_f16_weights() {
    let be = CpuBackend::new();
    let mut rng = Rng(1);
    // Leading dims of x are kept; M = 1 and 5 take the GEMV path (<= 8 rows), 9 and 70 the GEMM
    // path; N = 130 and 65 are not multiples of the 64-row block, N = 3 is less than one block.
    let cases: &[(&[usize], usize, usize)] =
        &[(&[1], 37, 130), (&[5], 37, 130), (&[9], 200, 3), (&[70], 64, 65), (&[2, 35], 37, 130), (&[2, 1, 3], 16, 1)];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(lead, k, n) in cases {
            let m: usize = lead.iter().product();
            let xs = rng.vec(m * k);
            let (sw, exact) = stored_as(dtype, &[n, k], &rng.vec(n * k));
            let w = be.upload_weight(&sw).unwrap();
            let mut shape = lead.to_vec();
            shape.push(k);
            let y = be.linear(&up(&be, &xs, &shape), &w).unwrap();
            let mut want_shape = lead.to_vec();
            want_shape.push(n);
            assert_eq!(y.shape(), &want_shape[..], "{dtype} {lead:?} x [{n}, {k}]");
            let (want, bound) = linear_ref(&xs, &exact, m, n, k);
            assert_within(&format!("linear {dtype} {lead:?}x[{n},{k}]"), &down(&be, &y), &want, |i| bound[i]);
        }
    }
    let w = weight(&be, &[4, 3], &[0.0; 12]);
    let e = be.linear(&up(&be, &[0.0; 8], &[2, 4]), &w).unwrap_err().to_string();
    assert!(e.contains("linear"), "K mismatch: {e}");
}

#[test]
fn grouped_linear_is_block_diagonal() {
    let be = CpuBackend::new();
    let mut rng = Rng(2);
    let (g, k, r) = (3, 20, 5);
    for dtype in [DType::F32, DType::BF16] {
        for m in [3, 70] {
            let xs = rng.vec(m * g * k);
            let (sw, exact) = stored_as(dtype, &[g * r, k], &rng.vec(g * r * k));
            let w = be.upload_weight(&sw).unwrap();
            let y = be.grouped_linear(&up(&be, &xs, &[m, g, k]), &w, g).unwrap();
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
            assert_within(&format!("grouped_linear {dtype} m={m}"), &down(&be, &y), &want, |i| bound[i]);
        }
    }
    let w = weight(&be, &[6, 4], &[0.0; 24]);
    assert!(be.grouped_linear(&up(&be, &[0.0; 8], &[1, 2, 4]), &w, 4).is_err(), "groups != x.shape[1]");
    assert!(be.grouped_linear(&up(&be, &[0.0; 16], &[1, 4, 4]), &w, 4).is_err(), "6 rows into 4 groups");
}

#[test]
fn embedding_rows_are_exact() {
    let be = CpuBackend::new();
    let mut rng = Rng(3);
    let (v, d) = (10, 6);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (sw, exact) = stored_as(dtype, &[v, d], &rng.vec(v * d));
        let table = be.upload_weight(&sw).unwrap();
        let ids = [9, 0, 3, 3, 9, 1];
        let e = be.embedding(&table, &upi(&be, &ids, &[2, 3])).unwrap();
        assert_eq!(e.shape(), &[2, 3, d]);
        let want: Vec<f64> = ids.iter().flat_map(|&i| exact[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
        assert_within(&format!("embedding {dtype}"), &down(&be, &e), &want, |_| 0.0);
        for bad in [10, -1] {
            let err = be.embedding(&table, &upi(&be, &[bad], &[1])).unwrap_err().to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
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

#[test]
fn matmul_batched_transposed_and_shared() {
    let be = CpuBackend::new();
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
        let y = be.matmul(&up(&be, &a, &[2, 3, m, k]), &up(&be, &b, &bshape), tb).unwrap();
        assert_eq!(y.shape(), &[2, 3, m, n], "b {bshape:?}");
        let want = matmul_ref(&a, &b, 6, m, k, n, tb, shared);
        assert_within(&format!("matmul b {bshape:?} tb {tb}"), &down(&be, &y), &want, bound);
    }
    // Plain 2-D.
    let (a, b) = (rng.vec(m * k), rng.vec(k * n));
    let y = be.matmul(&up(&be, &a, &[m, k]), &up(&be, &b, &[k, n]), false).unwrap();
    assert_within("matmul 2-D", &down(&be, &y), &matmul_ref(&a, &b, 1, m, k, n, false, true), bound);
    // Inner dimensions that do not agree, and batch dims that do not agree.
    assert!(be.matmul(&up(&be, &a, &[m, k]), &up(&be, &b, &[k, n]), true).is_err());
    assert!(be.matmul(&up(&be, &[0.0; 30], &[2, m, k]), &up(&be, &[0.0; 90], &[3, k, n]), false).is_err());
}

// ---------------------------------------------------------------------------- elementwise

#[test]
fn unary_ops_against_f64() {
    let be = CpuBackend::new();
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
        let y = be.unary(&up(&be, input, &[input.len()]), op).unwrap();
        let want: Vec<f64> = input.iter().map(|&v| f(v as f64)).collect();
        // libm-quality f32 functions are within a few ulp; composite ones (sigmoid, silu,
        // softplus, rsqrt) round 2-3 times.
        assert_rel(&format!("{op:?}"), &down(&be, &y), &want, 4.0 * EPS, 1e-37);
    }
    // Above the threshold softplus is exactly the identity (bit for bit), below it is not.
    let y = down(&be, &be.unary(&up(&be, &[20.5, 25.0, 80.0, 1e30], &[4]), UnaryOp::Softplus).unwrap());
    assert_eq!(bits(&y), bits(&[20.5, 25.0, 80.0, 1e30]));
    let y = down(&be, &be.unary(&up(&be, &[0.0], &[1]), UnaryOp::Softplus).unwrap());
    assert!((y[0] as f64 - 2f64.ln()).abs() < 4.0 * EPS);
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let be = CpuBackend::new();
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
            let y = be.binary(&up(&be, &a, ash), &up(&be, &b, bsh), op).unwrap();
            assert_eq!(y.shape(), osh, "{op:?} {ash:?} {bsh:?}");
            let got = down(&be, &y);
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
    assert!(be.binary(&up(&be, &[0.0; 6], &[2, 3]), &up(&be, &[0.0; 12], &[4, 3]), BinaryOp::Add).is_err());
}

#[test]
fn affine_and_clamp() {
    let be = CpuBackend::new();
    let xs = [-3.0f32, -0.5, 0.0, 0.75, 2.0, 100.0];
    let y = down(&be, &be.affine(&up(&be, &xs, &[2, 3]), 1.5, -0.25).unwrap());
    let want: Vec<f64> = xs.iter().map(|&x| x as f64 * 1.5 - 0.25).collect();
    // Two roundings (product, sum): within 2u of |x·mul| + |add|.
    assert_within("affine", &y, &want, |i| EPS * ((xs[i] as f64 * 1.5).abs() + 0.25));
    let y = down(&be, &be.clamp(&up(&be, &xs, &[6]), -1.0, 1.0).unwrap());
    assert_eq!(y, vec![-1.0, -0.5, 0.0, 0.75, 1.0, 1.0]);
    // Upper-only clamp (as the SwiGLU gate uses it).
    let y = down(&be, &be.clamp(&up(&be, &xs, &[6]), f32::NEG_INFINITY, 0.5).unwrap());
    assert_eq!(y, vec![-3.0, -0.5, 0.0, 0.5, 0.5, 0.5]);
}

// ----------------------------------------------------------------------- reductions & norms

#[test]
fn reduce_over_each_axis() {
    let be = CpuBackend::new();
    let mut rng = Rng(6);
    let sh = [2usize, 3, 4];
    let xs = rng.vec(24);
    let x = up(&be, &xs, &sh);
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
            assert_within(&format!("reduce {op:?} axis {axis}"), &down(&be, &y), &want, |i| bound[i]);
        }
    }
    assert!(be.reduce(&x, 3, ReduceOp::Sum).is_err());
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

#[test]
fn softmax_over_any_axis_with_masked_entries() {
    let be = CpuBackend::new();
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
        let y = down(&be, &be.softmax(&up(&be, &xs, &sh), axis).unwrap());
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
    let y = down(&be, &be.softmax(&up(&be, &xs, &sh), 1).unwrap());
    for j in 0..3 {
        assert_eq!(y[12 + j * 4 + 2], 0.0);
    }
    assert!(be.softmax(&up(&be, &xs, &sh), 3).is_err());
}

#[test]
fn rms_norm_with_and_without_weight() {
    let be = CpuBackend::new();
    let mut rng = Rng(8);
    let d = 7;
    let xs: Vec<f32> = rng.vec(2 * 3 * d).iter().map(|v| 4.0 * v).collect();
    let g = rng.vec(d);
    let eps = 1e-3f32;
    for weight in [None, Some(&g)] {
        let wt = weight.map(|g| up(&be, g, &[d]));
        let y = be.rms_norm(&up(&be, &xs, &[2, 3, d]), wt.as_ref(), eps).unwrap();
        assert_eq!(y.shape(), &[2, 3, d]);
        let mut want = vec![];
        for row in xs.chunks(d) {
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            for (c, &v) in row.iter().enumerate() {
                want.push(v as f64 * r * weight.map_or(1.0, |g| g[c] as f64));
            }
        }
        // r rounded once to f32, then one or two products: 3 roundings.
        assert_rel(&format!("rms_norm weight {}", weight.is_some()), &down(&be, &y), &want, 4.0 * EPS, 1e-37);
    }
    assert!(be.rms_norm(&up(&be, &xs, &[6, d]), Some(&up(&be, &[1.0; 3], &[3])), eps).is_err());
}

// --------------------------------------------------------------------------------- rope

#[test]
fn rope_rotates_interleaved_trailing_pairs_and_inverse_undoes_it() {
    let be = CpuBackend::new();
    let mut rng = Rng(9);
    let (t, heads, d, half) = (3, 2, 10, 3); // channels 4..10 rotate, 0..4 pass through
    let xs = rng.vec(t * heads * d);
    let angles: Vec<f64> = (0..t * half).map(|i| 0.7 * i as f64 - 1.3).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    let (ct, st) = (up(&be, &cos, &[t, half]), up(&be, &sin, &[t, half]));
    let x = up(&be, &xs, &[t, heads, d]);
    for inverse in [false, true] {
        let y = down(&be, &be.rope(&x, &ct, &st, inverse).unwrap());
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
        &down(&be, &back),
        &xs.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        0.0,
        8.0 * EPS,
    );
    // Rotary part wider than the head.
    let wide = up(&be, &vec![0.0; t * 6], &[t, 6]);
    assert!(be.rope(&x, &wide, &wide, false).is_err());
}

// ------------------------------------------------------------------------------- layout

#[test]
fn reshape_transpose_narrow_concat() {
    let be = CpuBackend::new();
    let xs: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let x = up(&be, &xs, &[2, 3, 4]);
    let r = be.reshape(&x, &[4, 6]).unwrap();
    assert_eq!((r.shape().to_vec(), down(&be, &r)), (vec![4, 6], xs.clone()));
    assert!(be.reshape(&x, &[5, 5]).is_err());

    let at = |i: usize, j: usize, k: usize| xs[(i * 3 + j) * 4 + k];
    let t = be.transpose(&x, 0, 2).unwrap();
    assert_eq!(t.shape(), &[4, 3, 2]);
    let want: Vec<f32> = (0..4)
        .flat_map(|k| (0..3).flat_map(move |j| (0..2).map(move |i| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    assert_eq!(down(&be, &t), want);
    let t = be.transpose(&x, 2, 1).unwrap();
    assert_eq!(t.shape(), &[2, 4, 3]);
    let want: Vec<f32> = (0..2)
        .flat_map(|i| (0..4).flat_map(move |k| (0..3).map(move |j| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    assert_eq!(down(&be, &t), want);
    assert!(be.transpose(&x, 0, 3).is_err());

    for (axis, start, len) in [(0, 1, 1), (1, 1, 2), (2, 3, 1), (2, 0, 4)] {
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
        assert_eq!(down(&be, &n), want, "narrow axis {axis} {start}+{len}");
    }
    assert!(be.narrow(&x, 1, 2, 2).is_err());
    assert!(be.narrow(&x, 3, 0, 1).is_err());

    let a = be.narrow(&x, 1, 0, 1).unwrap();
    let b = be.narrow(&x, 1, 1, 2).unwrap();
    let c = be.concat(&[&a, &b], 1).unwrap();
    assert_eq!((c.shape().to_vec(), down(&be, &c)), (vec![2, 3, 4], xs.clone()));
    let c = be.concat(&[&x, &x], 0).unwrap();
    assert_eq!(c.shape(), &[4, 3, 4]);
    assert_eq!(down(&be, &c), [xs.clone(), xs.clone()].concat());
    assert!(be.concat(&[&a, &b], 0).is_err(), "axis 1 sizes differ");
    assert!(be.concat(&[], 0).is_err());
}

// ------------------------------------------------------------------------ gather/scatter

#[test]
fn index_select_rows_and_minus_one_gives_zeros() {
    let be = CpuBackend::new();
    let xs: Vec<f32> = (0..24).map(|v| v as f32 + 1.0).collect();
    let x = up(&be, &xs, &[4, 2, 3]);
    let y = be.index_select(&x, &upi(&be, &[3, -1, 0, 3], &[2, 2])).unwrap();
    assert_eq!(y.shape(), &[2, 2, 2, 3]);
    let row = |r: usize| xs[r * 6..(r + 1) * 6].to_vec();
    assert_eq!(down(&be, &y), [row(3), vec![0.0; 6], row(0), row(3)].concat());
    for bad in [4, -2] {
        let e = be.index_select(&x, &upi(&be, &[bad], &[1])).unwrap_err().to_string();
        assert!(e.contains(&bad.to_string()), "{e}");
    }
}

#[test]
fn gather_last_picks_along_the_last_axis() {
    let be = CpuBackend::new();
    let xs: Vec<f32> = (0..10).map(|v| v as f32 * 1.5).collect();
    let x = up(&be, &xs, &[2, 5]);
    let y = be.gather_last(&x, &upi(&be, &[4, 0, 4, 1, 1, 2], &[2, 3])).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(down(&be, &y), vec![xs[4], xs[0], xs[4], xs[6], xs[6], xs[7]]);
    assert!(be.gather_last(&x, &upi(&be, &[5, 0], &[2, 1])).is_err());
    assert!(be.gather_last(&x, &upi(&be, &[-1, 0], &[2, 1])).is_err());
    assert!(be.gather_last(&x, &upi(&be, &[0, 0, 0], &[3, 1])).is_err(), "leading dims differ");
}

#[test]
fn index_add_accumulates_repeated_indices_in_order() {
    let be = CpuBackend::new();
    let dst = up(&be, &[1.0, 2.0, 1.0, 0.0, 5.0, 6.0], &[3, 2]);
    // Row 1 receives 1e8, -1e8, 1 in that order: ((1 + 1e8) - 1e8) + 1 = 1 in f32 (1 + 1e8
    // rounds to 1e8), while another order, e.g. ((1 + 1) + 1e8) - 1e8, would give 0.
    let idx = upi(&be, &[1, 0, 1, 1], &[4]);
    let src = up(&be, &[1e8, 0.5, 10.0, 20.0, -1e8, 0.25, 1.0, 0.0], &[4, 2]);
    let y = down(&be, &be.index_add(&dst, &idx, &src).unwrap());
    let mut want = vec![1.0f32, 2.0, 1.0, 0.0, 5.0, 6.0];
    let (s, ids) = ([1e8f32, 0.5, 10.0, 20.0, -1e8, 0.25, 1.0, 0.0], [1usize, 0, 1, 1]);
    for (i, &r) in ids.iter().enumerate() {
        for c in 0..2 {
            want[r * 2 + c] += s[i * 2 + c];
        }
    }
    assert_eq!(bits(&y), bits(&want));
    assert_eq!(y[2], 1.0);
    assert!(be.index_add(&dst, &upi(&be, &[3], &[1]), &up(&be, &[0.0; 2], &[1, 2])).is_err());
    assert!(be.index_add(&dst, &upi(&be, &[0, 1], &[2]), &up(&be, &[0.0; 2], &[1, 2])).is_err());
}

#[test]
fn topk_descending_ties_to_the_lower_index() {
    let be = CpuBackend::new();
    let ninf = f32::NEG_INFINITY;
    let xs = [
        1.0, 3.0, 3.0, 2.0, 3.0, ninf, 5.0, /**/ 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, /**/ ninf, ninf, -7.0,
        ninf, -8.0, ninf, ninf,
    ];
    let (v, i) = be.topk(&up(&be, &xs, &[3, 7]), 4).unwrap();
    assert_eq!(v.shape(), &[3, 4]);
    assert_eq!(i.shape(), &[3, 4]);
    assert_eq!(downi(&be, &i), vec![6, 1, 2, 4, /**/ 0, 1, 2, 3, /**/ 2, 4, 0, 1]);
    assert_eq!(down(&be, &v), vec![5.0, 3.0, 3.0, 3.0, /**/ 0.0, 0.0, 0.0, 0.0, /**/ -7.0, -8.0, ninf, ninf]);
    assert!(be.topk(&up(&be, &xs, &[3, 7]), 8).is_err());
}

#[test]
fn index_mask_concat_index_offset_index() {
    let be = CpuBackend::new();
    let idx = upi(&be, &[0, -1, 5, -1, 2, 0], &[2, 3]);
    let m = be.index_mask(&idx).unwrap();
    assert_eq!(m.shape(), &[2, 3]);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(down(&be, &m), vec![0.0, ninf, 0.0, ninf, 0.0, 0.0]);

    let other = upi(&be, &[7, 8], &[2, 1]);
    let c = be.concat_index(&[&idx, &other], 1).unwrap();
    assert_eq!(c.shape(), &[2, 4]);
    assert_eq!(downi(&be, &c), vec![0, -1, 5, 7, -1, 2, 0, 8]);
    let c = be.concat_index(&[&idx, &idx], 0).unwrap();
    assert_eq!((c.shape().to_vec(), downi(&be, &c)), (vec![4, 3], vec![0, -1, 5, -1, 2, 0, 0, -1, 5, -1, 2, 0]));
    assert!(be.concat_index(&[&idx, &other], 0).is_err());

    assert_eq!(downi(&be, &be.offset_index(&idx, 10).unwrap()), vec![10, -1, 15, -1, 12, 10]);
    assert_eq!(downi(&be, &be.offset_index(&idx, 0).unwrap()), vec![0, -1, 5, -1, 2, 0]);
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

fn check_hc_pre<B: Backend>(be: &B, label: &str) {
    let mut rng = Rng(10);
    // (T, n, D, sinkhorn iters, hc_eps, norm_eps, scale): V4's n = 4 and 20 iterations; a single
    // iteration (softmax + one column normalisation only); large epsilons, so that where each
    // epsilon enters is visible in the result.
    type Case = (usize, usize, usize, usize, f32, f32, [f32; 3]);
    let cases: [Case; 4] = [
        (3, 4, 8, 20, 1e-6, 1e-6, [0.7, 1.3, 2.1]),
        (2, 2, 5, 1, 1e-6, 1e-6, [1.0, 0.5, 3.0]),
        (2, 3, 4, 3, 0.05, 0.5, [1.1, 0.9, 1.7]),
        (1, 4, 16, 20, 0.01, 1e-6, [0.3, 2.0, 4.0]),
    ];
    for (t, n, d, iters, hc_eps, norm_eps, scale) in cases {
        let hc = Hc::new(&mut rng, t, n, d, (2 + n) * n, &scale);
        let what = format!("{label} hc_pre T={t} n={n} D={d} iters={iters} hc_eps={hc_eps}");
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

#[test]
fn hc_pre_matches_spec_b2() {
    check_hc_pre(&CpuBackend::new(), "cpu");
    check_hc_pre(&PrimitivesOnly(CpuBackend::new()), "default");
}

fn check_hc_post<B: Backend>(be: &B, label: &str) {
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
    assert_within(&format!("{label} hc_post"), &got, &want, |i| bound[i]);
    // The test discriminates: the transposed reading of comb is far off.
    let (wrong, _) = reference(true);
    let worst = got.iter().zip(&wrong).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(worst > 1e-2, "comb is too symmetric for this test to catch a transposition ({worst})");
}

#[test]
fn hc_post_mixes_source_rows_into_destination_columns() {
    check_hc_post(&CpuBackend::new(), "cpu");
    check_hc_post(&PrimitivesOnly(CpuBackend::new()), "default");
}

fn check_hc_head<B: Backend>(be: &B, label: &str) {
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
        assert_within(&format!("{label} hc_head n={n}"), &down(be, &got), &want, |_| {
            n as f64 * 2.0 * (pre_bound + 2.0 * EPS)
        });
    }
}

#[test]
fn hc_head_matches_spec_b6() {
    check_hc_head(&CpuBackend::new(), "cpu");
    check_hc_head(&PrimitivesOnly(CpuBackend::new()), "default");
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

fn check_compressor_pool<B: Backend>(be: &B, label: &str) {
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
    let got = down(be, &be.compressor_pool(&up(be, &kv, &[w, l, c]), &up(be, &score, &[w, l, c])).unwrap());
    let want = pool_ref(&kv, &score, w, l, c);
    // A convex combination of |kv| <= 1 values with weights accurate to ~(|Δscore| + L + 3)·u.
    assert_within(&format!("{label} compressor_pool"), &got, &want, |_| (6 + l + 4) as f64 * EPS);
    // Entry 0 equals pooling over the second half alone.
    let second_kv: Vec<f32> = (0..m).flat_map(|li| kv[(m + li) * c..(m + li + 1) * c].to_vec()).collect();
    let second_score: Vec<f32> = (0..m).flat_map(|li| score[(m + li) * c..(m + li + 1) * c].to_vec()).collect();
    assert_within(
        &format!("{label} compressor_pool entry 0"),
        &got[..c],
        &pool_ref(&second_kv, &second_score, 1, m, c),
        |_| (6 + m + 4) as f64 * EPS,
    );
}

#[test]
fn compressor_pool_softmax_per_channel_over_candidates() {
    check_compressor_pool(&CpuBackend::new(), "cpu");
    check_compressor_pool(&PrimitivesOnly(CpuBackend::new()), "default");
}

// ------------------------------------------------------------------ fused: sparse attention

fn check_sparse_attention<B: Backend>(be: &B, label: &str) {
    let mut rng = Rng(14);
    let (t, h, d, n, k) = (5, 3, 6, 7, 5);
    let mut q = rng.vec(t * h * d);
    // Query 4 has logits up to ~100: needs the max subtraction (exp(100) overflows f32).
    for v in &mut q[4 * h * d..] {
        *v *= 250.0;
    }
    let kv = rng.vec(n * d);
    #[rustfmt::skip]
    let idx: Vec<i32> = vec![
        0, 3, -1, 6, 2,
        -1, -1, -1, -1, -1, // no key at all: only the sink, output 0
        1, 2, 4, 5, 0,
        -1, 2, -1, 0, -1,
        6, 5, 4, 3, 2,
    ];
    let sinks = [0.5f32, -1.0, 3.0];
    let scale = (d as f32).powf(-0.5);
    let got = be
        .sparse_attention(
            &up(be, &q, &[t, h, d]),
            &up(be, &kv, &[n, d]),
            &upi(be, &idx, &[t, k]),
            &up(be, &sinks, &[h]),
            scale,
        )
        .unwrap();
    assert_eq!(got.shape(), &[t, h, d]);
    // Naive: per query and head, softmax over the listed keys plus the sink logit (whose value
    // is zero), skipping -1.
    let mut want = vec![0.0; t * h * d];
    for ti in 0..t {
        for hi in 0..h {
            let qh = &q[(ti * h + hi) * d..(ti * h + hi + 1) * d];
            let keys: Vec<usize> = idx[ti * k..(ti + 1) * k].iter().filter(|&&i| i >= 0).map(|&i| i as usize).collect();
            let logits: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    dot64(qh.iter().map(|&v| v as f64), kv[j * d..(j + 1) * d].iter().map(|&v| v as f64)).0
                        * scale as f64
                })
                .collect();
            let max = logits.iter().cloned().fold(sinks[hi] as f64, f64::max);
            let den = (sinks[hi] as f64 - max).exp() + logits.iter().map(|l| (l - max).exp()).sum::<f64>();
            for (l, &j) in logits.iter().zip(&keys) {
                for c in 0..d {
                    want[(ti * h + hi) * d + c] += (l - max).exp() / den * kv[j * d + c] as f64;
                }
            }
        }
    }
    // Logits carry d·u relative error of |q|·|k| (up to ~100·d·u ≈ 4e-5 absolute for query 4),
    // the probabilities that plus (K + 3)·u; outputs are convex-ish sums of |v| <= 1.
    let bound = |i: usize| {
        let qmax = if i >= 4 * h * d { 250.0 } else { 1.0 };
        (k as f64) * ((d as f64) * qmax * (d as f64).sqrt() * EPS + (k + 4) as f64 * EPS)
    };
    assert_within(&format!("{label} sparse_attention"), &down(be, &got), &want, bound);
    assert!(
        down(be, &got)[h * d..2 * h * d].iter().all(|&v| v == 0.0),
        "{label}: a query with no keys attends to the sink only"
    );
    // Key indices outside the pool are an error, not an out-of-bounds read.
    let bad = upi(be, &[7, 0, 0, 0, 0].repeat(t), &[t, k]);
    assert!(be
        .sparse_attention(&up(be, &q, &[t, h, d]), &up(be, &kv, &[n, d]), &bad, &up(be, &sinks, &[h]), scale)
        .is_err());
}

#[test]
fn sparse_attention_with_sinks_matches_naive_softmax() {
    check_sparse_attention(&CpuBackend::new(), "cpu");
    check_sparse_attention(&PrimitivesOnly(CpuBackend::new()), "default");
}

// ------------------------------------------------------------------- fused: indexer select

/// Expected `indexer_select`: score `Σ_h w_h·relu(q_h·k)·dI^-1/2` over each query's valid
/// range, descending with ties to the lower index, `-1` where fewer than k are valid.
#[allow(clippy::too_many_arguments)]
fn indexer_ref(
    q: &[f32],
    keys: &[f32],
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
            out.push(scored.get(slot).map_or(-1, |&(_, s)| s as i32 + offset));
        }
    }
    out
}

fn check_indexer_select<B: Backend>(be: &B, label: &str) {
    let mut rng = Rng(15);
    // Small integers and power-of-two weights with dI = 4 (scale 1/2): every score is exact in
    // f32 whatever the summation order, so ties are real ties and the order is fully determined.
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
        0.0, 0.0,   // all scores 0: ties everywhere, lowest indices win
    ];
    let valid = vec![0..0, 0..2, 0..6, 2..5, 0..6, 1..6];
    let got = be
        .indexer_select(&up(be, &q, &[t, nh, dh]), &up(be, &keys, &[n, dh]), &up(be, &w, &[t, nh]), &valid, k, offset)
        .unwrap();
    assert_eq!(got.shape(), &[t, k]);
    let got = downi(be, &got);
    let want = indexer_ref(&q, &keys, &w, &valid, nh, dh, k, offset);
    assert_eq!(got, want, "{label} indexer_select");
    for (ti, r) in valid.iter().enumerate() {
        let picks = &got[ti * k..(ti + 1) * k];
        // Causality: every pick is a valid row (+ offset) or -1; invalid rows are never picked.
        for &p in picks {
            assert!(p == -1 || r.contains(&((p - offset) as usize)), "{label}: query {ti} picked {p} outside {r:?}");
        }
        assert_eq!(picks.iter().filter(|&&p| p != -1).count(), r.len().min(k), "{label}: query {ti}");
    }
    assert_eq!(&got[5 * k..6 * k], &[101, 102, 103, 104], "{label}: all-zero scores tie to the lowest indices");
    let e = be.indexer_select(
        &up(be, &q, &[t, nh, dh]),
        &up(be, &keys, &[n, dh]),
        &up(be, &w, &[t, nh]),
        &valid[..2],
        k,
        offset,
    );
    assert!(e.is_err(), "{label}: one validity range per query is required");
}

#[test]
fn indexer_select_is_causal_and_offset() {
    check_indexer_select(&CpuBackend::new(), "cpu");
    check_indexer_select(&PrimitivesOnly(CpuBackend::new()), "default");
}

// ------------------------------------------------------------------------ fused: MoE

fn check_swiglu<B: Backend>(be: &B, label: &str) {
    let gate = [-40.0f32, -15.0, -12.0, -3.0, 0.0, 5.0, 9.5, 10.0, 12.0, 40.0];
    let upv = [-40.0f32, 15.0, -10.0, -3.0, 2.0, 3.0, 10.5, 15.0, -15.0, 40.0];
    let limit = 10.0;
    let got = down(be, &be.swiglu(&up(be, &gate, &[2, 5]), &up(be, &upv, &[2, 5]), limit).unwrap());
    // Spec §B.5 step 4: gate clamped from above only, up clamped on both sides.
    let want: Vec<f64> =
        gate.iter().zip(&upv).map(|(&g, &u)| silu((g as f64).min(10.0)) * (u as f64).clamp(-10.0, 10.0)).collect();
    assert_rel(&format!("{label} swiglu"), &got, &want, 6.0 * EPS, 1e-37);
    // silu(-15)·10 ≈ -4.6e-5, not silu(-10)·10 ≈ -4.5e-3: the gate has no lower clamp.
    assert!((got[1] as f64 - silu(-15.0) * 10.0).abs() < 1e-9, "{label}: gate clamped from below: {}", got[1]);
}

#[test]
fn swiglu_clamps_gate_above_and_up_both_sides() {
    check_swiglu(&CpuBackend::new(), "cpu");
    check_swiglu(&PrimitivesOnly(CpuBackend::new()), "default");
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

fn check_moe_experts<B: Backend>(be: &B, label: &str) {
    let mut rng = Rng(16);
    let (t, d, i, e, k) = (5, 6, 4, 5, 3);
    let limit = 1.0f32; // small, so that both clamps are active for some rows
    let x = rng.vec(t * d);
    let ex = Experts::new(&mut rng, e, d, i);
    let experts = ex.upload(be);
    // Top-k order is not ascending; expert 4 is never used.
    #[rustfmt::skip]
    let ids: Vec<i32> = vec![
        2, 0, 3,
        3, 1, 0,
        1, 2, 3,
        0, 3, 2,
        3, 2, 1,
    ];
    let w: Vec<f32> = rng.vec(t * k).iter().map(|v| 0.3 + v.abs()).collect();
    let got = down(be, &be.moe_experts(&up(be, &x, &[t, d]), &ids, &up(be, &w, &[t, k]), &experts, limit).unwrap());

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
    assert_within(&format!("{label} moe_experts"), &got, &want, |_| 4.0 * (d + i + 8) as f64 * EPS * 10.0);

    // Bit for bit against f32 in transformers' eager order: each expert on its rows
    // (expert_ffn; <= 8 rows take the row-independent GEMV path), the weight applied after w2,
    // accumulated into zeros in ascending expert id.
    let xt = up(be, &x, &[t, d]);
    let per_expert: Vec<Vec<f32>> =
        experts.iter().map(|ew| down(be, &be.expert_ffn(&xt, ew, limit).unwrap())).collect();
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
    assert_eq!(bits(&got), bits(&eager), "{label}: moe_experts is not the ascending-expert sum of weight·w2(h)");
    // The data tell the orders apart: slot order (top-k order) rounds differently somewhere.
    let slot_order: Vec<(usize, usize)> = (0..t).flat_map(|ti| (0..k).map(move |j| (ti, j))).collect();
    assert_ne!(bits(&accumulate(&slot_order)), bits(&eager), "test data cannot tell accumulation orders apart");
    // ... and so do the two places the weight can go: w2·(weight·h) (official) rounds
    // differently from weight·(w2·h) (transformers) somewhere.
    let mut official = vec![0f32; t * d];
    for &(ti, j) in &ascending {
        let ew = &experts[ids[ti * k + j] as usize];
        let xr = up(be, &x[ti * d..(ti + 1) * d], &[1, d]);
        let h = be.swiglu(&be.linear(&xr, &ew.w1).unwrap(), &be.linear(&xr, &ew.w3).unwrap(), limit).unwrap();
        let hw = be.affine(&h, w[ti * k + j], 0.0).unwrap();
        let y = down(be, &be.linear(&hw, &ew.w2).unwrap());
        for c in 0..d {
            official[ti * d + c] += y[c];
        }
    }
    assert_ne!(bits(&official), bits(&eager), "test data cannot tell where the weight is applied");
}

#[test]
fn moe_experts_accumulate_in_ascending_expert_order() {
    check_moe_experts(&CpuBackend::new(), "cpu");
    check_moe_experts(&PrimitivesOnly(CpuBackend::new()), "default");
}

// ----------------------------------------------- compressor windows and indexer causality

/// A compressor of hidden size 8 built through the public loader, with its parameters.
struct CompressorCase {
    m: usize,
    overlap: bool,
    dim: usize,
    d: usize,
    wkv: Vec<f32>,
    wgate: Vec<f32>,
    ape: Vec<f32>,
    norm: Vec<f32>,
    rope: RopeTable,
    eps: f32,
}

impl CompressorCase {
    fn new(rng: &mut Rng, m: usize, overlap: bool, dim: usize) -> Self {
        let d = 8;
        let width = if overlap { 2 * dim } else { dim };
        CompressorCase {
            m,
            overlap,
            dim,
            d,
            wkv: rng.vec(width * d),
            wgate: rng.vec(width * d).iter().map(|v| 2.0 * v).collect(),
            ape: rng.vec(m * width),
            norm: rng.vec(dim).iter().map(|v| 1.0 + 0.5 * v).collect(),
            rope: RopeTable::new(&RopeParams { theta: 10000.0, yarn: None, attention_factor: 1.0 }, 4),
            eps: 1e-6,
        }
    }

    fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    fn load(&self, be: &CpuBackend) -> Compressor<CpuBackend> {
        let (w, d) = (self.width(), self.d);
        let ckpt = Checkpoint::from_tensors(vec![
            HostTensor::from_f32("c.wkv.weight", vec![w, d], &self.wkv).unwrap(),
            HostTensor::from_f32("c.wgate.weight", vec![w, d], &self.wgate).unwrap(),
            HostTensor::from_f32("c.ape", vec![self.m, w], &self.ape).unwrap(),
            HostTensor::from_f32("c.norm.weight", vec![self.dim], &self.norm).unwrap(),
        ])
        .unwrap();
        let cfg = ModelConfig::from_json_str(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "layer_types": ["sliding_attention"], "rms_norm_eps": 1e-6}"#,
        )
        .unwrap();
        let mut progress = |_: usize, _: usize, _: u64| {};
        let mut ld = Loader::new(be, &ckpt, &mut progress);
        Compressor::load(&mut ld, &cfg, "c", self.m, self.overlap, self.dim).unwrap()
    }

    /// Feeds `x` (`[S, 8]`, positions 0..S) in chunks; checks the entry count after every
    /// chunk (entry w appears exactly when token w·m + m − 1 has been fed); returns the entries.
    fn run(&self, be: &CpuBackend, comp: &Compressor<CpuBackend>, x: &[f32], chunks: &[usize]) -> Vec<f32> {
        let mut state = CompressorState::<CpuBackend>::default();
        let mut start = 0;
        for &c in chunks {
            let xt = up(be, &x[start * self.d..(start + c) * self.d], &[c, self.d]);
            comp.step(be, &mut state, &xt, start, &self.rope).unwrap();
            start += c;
            let windows = start / self.m;
            assert_eq!(state.windows, windows, "after {start} tokens (chunks {chunks:?})");
            let rows = state.entries.as_ref().map_or(0, |e| e.shape()[0]);
            assert_eq!(rows, windows, "entries after {start} tokens (chunks {chunks:?})");
        }
        state.entries.as_ref().map_or(vec![], |e| down(be, e))
    }

    /// Spec §B.4.3 in f64: window w pools tokens w·m..w·m+m−1 (HCA), or the first halves of
    /// window w−1 and the second halves of window w (CSA; nothing before window 0), then
    /// RMSNorm with `norm` and RoPE of the trailing channels at position w·m.
    fn reference(&self, x: &[f32], tokens: usize) -> Vec<f64> {
        let (m, d, dim, width) = (self.m, self.d, self.dim, self.width());
        let proj = |w: &[f32], t: usize, c: usize| {
            dot64(w[c * d..(c + 1) * d].iter().map(|&v| v as f64), x[t * d..(t + 1) * d].iter().map(|&v| v as f64)).0
        };
        let a = |t: usize, c: usize| proj(&self.wkv, t, c);
        let z = |t: usize, c: usize| proj(&self.wgate, t, c) + self.ape[(t % m) * width + c] as f64;
        let mut out = vec![];
        for w in 0..tokens / m {
            let mut e = vec![0.0; dim];
            for (c, ec) in e.iter_mut().enumerate() {
                let mut cand: Vec<(f64, f64)> = vec![];
                if self.overlap {
                    if w > 0 {
                        cand.extend(((w - 1) * m..w * m).map(|t| (z(t, c), a(t, c))));
                    }
                    cand.extend((w * m..(w + 1) * m).map(|t| (z(t, dim + c), a(t, dim + c))));
                } else {
                    cand.extend((w * m..(w + 1) * m).map(|t| (z(t, c), a(t, c))));
                }
                let max = cand.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = cand.iter().map(|p| (p.0 - max).exp()).sum();
                *ec = cand.iter().map(|p| (p.0 - max).exp() * p.1).sum::<f64>() / den;
            }
            let r = 1.0 / (e.iter().map(|v| v * v).sum::<f64>() / dim as f64 + self.eps as f64).sqrt();
            let mut e: Vec<f64> = e.iter().zip(&self.norm).map(|(v, &g)| v * r * g as f64).collect();
            let (cos, sin) = self.rope.cos_sin(&[w * m]);
            let half = cos.len();
            for i in 0..half {
                let (p0, p1) = (dim - 2 * half + 2 * i, dim - 2 * half + 2 * i + 1);
                let (ev, od) = (e[p0], e[p1]);
                e[p0] = ev * cos[i] as f64 - od * sin[i] as f64;
                e[p1] = od * cos[i] as f64 + ev * sin[i] as f64;
            }
            out.extend(e);
        }
        out
    }
}

#[test]
fn compressor_windows_pool_exactly_their_tokens() {
    let be = CpuBackend::new();
    let mut rng = Rng(17);
    for (m, overlap, dim) in [(4, true, 6), (3, false, 6), (4, false, 5)] {
        let case = CompressorCase::new(&mut rng, m, overlap, dim);
        let comp = case.load(&be);
        let tokens = 14;
        let x = rng.vec(tokens * case.d);
        let want = case.reference(&x, tokens);
        assert_eq!(want.len(), tokens / m * dim);
        // Whole prompt, token by token, and chunks that start and end inside windows.
        for chunks in
            [vec![14], vec![1; 14], vec![3, 3, 3, 5], vec![m, m, tokens - 2 * m], vec![5, 9], vec![m - 1, 1, 10]]
        {
            let got = case.run(&be, &comp, &x, &chunks);
            // Projections are 8-term dot products, the pool a softmax over <= 2m candidates,
            // then an RMSNorm and a rotation: a few tens of roundings relative to the entry's
            // scale (RMSNorm makes every entry O(|norm|) <= 1.5).
            assert_within(&format!("m={m} overlap={overlap} chunks {chunks:?}"), &got, &want, |i| {
                (case.d + 2 * m + 16) as f64 * 4.0 * EPS * (1.0 + want[i].abs())
            });
        }
        // Which entries a token reaches: perturb one token at a time and see which entries change.
        let base = case.run(&be, &comp, &x, &[tokens]);
        for p in 0..tokens {
            let mut x2 = x.clone();
            for v in &mut x2[p * case.d..(p + 1) * case.d] {
                *v += 0.5;
            }
            let got = case.run(&be, &comp, &x2, &[tokens]);
            let w = p / m;
            for e in 0..tokens / m {
                // HCA: only window w. CSA: entry w (second halves) and entry w + 1 (first halves
                // as the previous window).
                let reaches = e == w || (overlap && e == w + 1);
                let changed = bits(&got[e * dim..(e + 1) * dim]) != bits(&base[e * dim..(e + 1) * dim]);
                assert_eq!(changed, reaches, "m={m} overlap={overlap}: token {p} and entry {e}");
            }
        }
    }
}

#[test]
fn csa_entry_zero_ignores_its_missing_previous_window() {
    // The first halves of window 0 belong to entry 1 only. Entry 0's "previous window" slots have
    // score −inf, so its pool is the softmax over window 0's second halves alone: making the
    // first-half projections (wkv and wgate rows 0..dim) anything at all leaves entry 0 unchanged
    // bit for bit, and changes entry 1.
    let be = CpuBackend::new();
    let mut rng = Rng(18);
    let (m, dim) = (4, 6);
    let case = CompressorCase::new(&mut rng, m, true, dim);
    let x = rng.vec(8 * case.d);
    let base = case.run(&be, &case.load(&be), &x, &[8]);
    let mut other = CompressorCase {
        wkv: case.wkv.clone(),
        wgate: case.wgate.clone(),
        ..CompressorCase::new(&mut rng, m, true, dim)
    };
    other.ape = case.ape.clone();
    other.norm = case.norm.clone();
    for v in other.wkv[..dim * case.d].iter_mut().chain(other.wgate[..dim * case.d].iter_mut()) {
        *v = 40.0 * *v + 3.0;
    }
    let got = case.run(&be, &other.load(&be), &x, &[8]);
    assert_eq!(bits(&got[..dim]), bits(&base[..dim]), "entry 0 depends on first halves");
    assert_ne!(bits(&got[dim..]), bits(&base[dim..]), "entry 1 ignores window 0's first halves");
    // And entry 0 is the f64 pool of the second halves only.
    let want = case.reference(&x, 8);
    assert_within("entry 0", &base[..dim], &want[..dim], |i| 64.0 * EPS * (1.0 + want[i].abs()));
}

fn check_indexer_causality<B: Backend>(be: &B, label: &str) {
    // Queries at positions 0..14 of one sequence with ratio 4 over the 3 complete windows'
    // keys. Entry w is valid for position p iff w < ⌊(p + 1)/4⌋ (its window ends at or before
    // p): position 3 is the first to see entry 0, position 6 does not see entry 1 yet, 7 does.
    let mut rng = Rng(19);
    let (ratio, nh, dh, n, offset) = (4, 2, 4, 3, 7);
    let positions: Vec<usize> = (0..14).collect();
    let t = positions.len();
    let q = rng.ints(t * nh * dh, 2);
    let keys = rng.ints(n * dh, 2);
    let w: Vec<f32> = (0..t * nh).map(|i| [1.0, 0.5, -0.25, 2.0][i % 4]).collect();
    let visible: Vec<usize> = positions.iter().map(|p| ((p + 1) / ratio).min(n)).collect();
    let valid: Vec<Range<usize>> = visible.iter().map(|&v| 0..v).collect();
    for k in [n, 2] {
        let got = be
            .indexer_select(
                &up(be, &q, &[t, nh, dh]),
                &up(be, &keys, &[n, dh]),
                &up(be, &w, &[t, nh]),
                &valid,
                k,
                offset,
            )
            .unwrap();
        let got = downi(be, &got);
        assert_eq!(got, indexer_ref(&q, &keys, &w, &valid, nh, dh, k, offset), "{label} k={k}");
        for (ti, &p) in positions.iter().enumerate() {
            let picks: Vec<i32> = got[ti * k..(ti + 1) * k].iter().copied().filter(|&v| v != -1).collect();
            assert_eq!(picks.len(), visible[ti].min(k), "{label} k={k}: position {p} picks {picks:?}");
            for &s in &picks {
                let entry = (s - offset) as usize;
                let window_end = entry * ratio + ratio - 1;
                assert!(
                    window_end <= p,
                    "{label} k={k}: position {p} sees entry {entry}, whose window ends at {window_end}"
                );
            }
            if k == n {
                let mut sorted = picks.clone();
                sorted.sort();
                assert_eq!(
                    sorted,
                    (0..visible[ti] as i32).map(|e| e + offset).collect::<Vec<_>>(),
                    "{label}: position {p}"
                );
            }
        }
    }
}

#[test]
fn indexer_causality_at_window_boundaries() {
    check_indexer_causality(&CpuBackend::new(), "cpu");
    check_indexer_causality(&PrimitivesOnly(CpuBackend::new()), "default");
}

#[test]
fn gather_last_of_a_0d_tensor_is_an_error() {
    let be = CpuBackend::new();
    let scalar = up(&be, &[1.0], &[]);
    assert!(be.gather_last(&scalar, &upi(&be, &[0], &[1])).is_err());
}

#[test]
fn index_add_of_a_0d_tensor_is_an_error() {
    let be = CpuBackend::new();
    let (scalar, row) = (up(&be, &[1.0], &[]), up(&be, &[1.0], &[1]));
    let idx = upi(&be, &[0], &[1]);
    assert!(be.index_add(&row, &idx, &scalar).is_err(), "0-d src");
    assert!(be.index_add(&scalar, &idx, &row).is_err(), "0-d dst");
}

/// Top-k selects k then sorts them; with many ties and every k it must equal the full sort's
/// first k (descending, ties to the lower index).
#[test]
fn topk_equals_the_full_sort_prefix_under_ties() {
    let be = CpuBackend::new();
    let (rows, n) = (64usize, 37usize);
    let xs: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
    for k in [1, 2, 5, 17, 36, 37] {
        let (v, i) = be.topk(&up(&be, &xs, &[rows, n]), k).unwrap();
        let (v, i) = (down(&be, &v), downi(&be, &i));
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
