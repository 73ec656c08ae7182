//! The aclnn operators: validation as documented (phase one) and the computation on the CPU
//! (run when the stream executes). Values are computed in f64 and rounded to the output
//! dtype once.

use std::ffi::c_void;
use std::sync::Arc;

use dsv4_ascend_sys::{
    aclDataType, aclIntArray, aclOpExecutor, aclScalar, aclTensor, aclTensorList, aclnnStatus, aclrtStream,
};

use crate::mem::{broadcast, contiguous_strides, dtype_name, expand, is_float, is_int, is_low_precision, Desc, Memory};
use crate::{get_workspace, launch, Emu, Plan};

pub(crate) type R<T> = Result<T, String>;

/// Workspace requested by the operators that have one (any non-zero size exercises the
/// caller's workspace handling).
pub(crate) fn ws_for(out: &Desc) -> u64 {
    4096 + (out.numel() as u64 * 4).div_ceil(32) * 32
}

pub(crate) fn plan(
    workspace: u64,
    reads: Vec<Desc>,
    writes: Vec<Desc>,
    extra: Vec<u64>,
    run: impl Fn(&mut Memory) -> R<()> + Send + Sync + 'static,
) -> Plan {
    let mut objects: Vec<u64> = reads.iter().chain(&writes).map(|d| d.handle).collect();
    objects.extend(extra);
    Plan { workspace, objects, reads, writes, run: Arc::new(run), extra: None }
}

pub(crate) fn need_float(d: &Desc, name: &str) -> R<()> {
    if !is_float(d.dtype) {
        return Err(format!("{name} has dtype {}; supported: FLOAT, FLOAT16, BFLOAT16", dtype_name(d.dtype)));
    }
    Ok(())
}

fn need_numeric(d: &Desc, name: &str) -> R<()> {
    if !is_float(d.dtype) && !is_int(d.dtype) {
        return Err(format!("{name} has unsupported dtype {}", dtype_name(d.dtype)));
    }
    Ok(())
}

pub(crate) fn need_index(d: &Desc, name: &str) -> R<()> {
    if d.dtype != aclDataType::ACL_INT32 && d.dtype != aclDataType::ACL_INT64 {
        return Err(format!("{name} has dtype {}; supported: INT32, INT64", dtype_name(d.dtype)));
    }
    Ok(())
}

pub(crate) fn same_dtype(a: &Desc, an: &str, b: &Desc, bn: &str) -> R<()> {
    if a.dtype != b.dtype {
        return Err(format!(
            "{an} ({}) and {bn} ({}) must have the same dtype",
            dtype_name(a.dtype),
            dtype_name(b.dtype)
        ));
    }
    Ok(())
}

/// Outputs of everything but aclnnInplaceCopy must be contiguous ("非连续Tensor ×" in the docs).
pub(crate) fn contiguous_out(d: &Desc, name: &str) -> R<()> {
    if !d.is_contiguous() {
        return Err(format!("{name} must be contiguous, got {}", d.describe()));
    }
    Ok(())
}

pub(crate) fn shape_is(d: &Desc, dims: &[usize], name: &str) -> R<()> {
    if d.dims != dims {
        return Err(format!("{name} has shape {:?}, expected {dims:?}", d.dims));
    }
    Ok(())
}

fn axis(dim: i64, rank: usize, name: &str) -> R<usize> {
    let r = rank.max(1) as i64;
    if dim < -r || dim >= r {
        return Err(format!("{name} {dim} is out of range for a {rank}-D tensor"));
    }
    Ok(dim.rem_euclid(r) as usize)
}

/// (outer, len, inner) around `axis`.
fn split(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    (dims[..axis].iter().product(), dims[axis], dims[axis + 1..].iter().product())
}

macro_rules! launcher {
    ($($name:ident),* $(,)?) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(workspace: *mut c_void, workspaceSize: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus {
            launch(stringify!($name), workspace, workspaceSize, executor, stream)
        }
        const _: dsv4_ascend_sys::pfn::$name = $name;
    )*};
}

launcher!(
    aclnnMatmul,
    aclnnBatchMatMul,
    aclnnRmsNorm,
    aclnnRotaryPositionEmbedding,
    aclnnSoftmax,
    aclnnTopk,
    aclnnIndexSelect,
    aclnnEmbedding,
    aclnnGather,
    aclnnIndexAdd,
    aclnnInplaceIndexCopy,
    aclnnInplaceMaskedFillScalar,
    aclnnLtScalar,
    aclnnEqScalar,
    aclnnAdd,
    aclnnAdds,
    aclnnSub,
    aclnnMul,
    aclnnMuls,
    aclnnDiv,
    aclnnMaximum,
    aclnnMinimum,
    aclnnSigmoid,
    aclnnSilu,
    aclnnExp,
    aclnnSqrt,
    aclnnRsqrt,
    aclnnRelu,
    aclnnNeg,
    aclnnSoftplus,
    aclnnClamp,
    aclnnCast,
    aclnnReduceSum,
    aclnnMean,
    aclnnAmax,
    aclnnCat,
    aclnnPermute,
    aclnnInplaceCopy,
    aclnnInplaceFillScalar,
);

/// Declares `<op>GetWorkspaceSize` with the given parameters, checked against ascend-sys.
macro_rules! phase_one {
    ($ws:ident = $op:literal, $e:ident, ($($p:ident : $t:ty),*) $body:block) => {
        #[no_mangle]
        pub unsafe extern "C" fn $ws($($p: $t,)* workspaceSize: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus {
            get_workspace($op, workspaceSize, executor, |$e: &Emu| -> R<Plan> { let _ = &$e; $body })
        }
        const _: dsv4_ascend_sys::pfn::$ws = $ws;
    };
}

// ------------------------------------------------------------------------------ matmul

fn matmul_plan(
    e: &Emu,
    a: *const aclTensor,
    b: *const aclTensor,
    out: *const aclTensor,
    cube: i8,
    batch3: bool,
) -> R<Plan> {
    let (a, b, o) = (e.tensor(a, "self")?, e.tensor(b, "mat2")?, e.tensor(out, "out")?);
    need_float(&a, "self")?;
    same_dtype(&a, "self", &b, "mat2")?;
    same_dtype(&a, "self", &o, "out")?;
    if !(0..=4).contains(&cube) {
        return Err(format!("cubeMathType {cube} is not one of 0..=4"));
    }
    if batch3 && (a.dims.len() != 3 || b.dims.len() != 3 || a.dims[0] != b.dims[0]) {
        return Err(format!(
            "aclnnBatchMatMul takes 3-D tensors with equal batch: self {:?}, mat2 {:?}",
            a.dims, b.dims
        ));
    }
    if a.dims.len() < 2 || b.dims.len() < 2 || a.dims.len() > 6 || b.dims.len() > 6 {
        return Err(format!("self {:?} and mat2 {:?} must be 2-D to 6-D", a.dims, b.dims));
    }
    let (ar, br) = (a.dims.len(), b.dims.len());
    let (m, k, k2, n) = (a.dims[ar - 2], a.dims[ar - 1], b.dims[br - 2], b.dims[br - 1]);
    if k != k2 {
        return Err(format!("inner dimensions differ: self {:?}, mat2 {:?}", a.dims, b.dims));
    }
    let batch = broadcast(&a.dims[..ar - 2], &b.dims[..br - 2])
        .ok_or_else(|| format!("batch dimensions of self {:?} and mat2 {:?} do not broadcast", a.dims, b.dims))?;
    let mut want = batch.clone();
    want.extend([m, n]);
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    // A release whose BF16 matmul accumulates in BF16 (each partial sum rounded), which dsv4's
    // self-test of its BF16 linear must catch (`DSV4_ASCEND_EMU_QUIRKS`).
    let bf16_sums = o.dtype == aclDataType::ACL_BF16 && crate::fused::quirk("matmul-bf16-accumulates-in-bf16");
    let (ra, rb, wo) = (a.clone(), b.clone(), o.clone());
    Ok(plan(ws, vec![a, b], vec![o], vec![], move |mem| {
        let mut ad = batch.clone();
        ad.extend([m, k]);
        let mut bd = batch.clone();
        bd.extend([k, n]);
        let av = expand(&ra.read(mem, "self")?, &pad(&ra.dims, ad.len()), &ad);
        let bv = expand(&rb.read(mem, "mat2")?, &pad(&rb.dims, bd.len()), &bd);
        let nb: usize = batch.iter().product();
        let mut out = Vec::with_capacity(nb * m * n);
        for bi in 0..nb {
            let (ao, bo) = (bi * m * k, bi * k * n);
            out.extend(matmul_values(&av[ao..ao + m * k], &bv[bo..bo + k * n], m, k, n, bf16_sums));
        }
        wo.write(mem, &out, "out")
    }))
}

/// One `[m, k] @ [k, n]` product of row-major values, as the emulator's matmul kernels compute
/// it: an f64 sum over k in order with no intermediate rounding (the caller rounds once when
/// writing), or, with `bf16_sums` (the `matmul-bf16-accumulates-in-bf16` quirk), every partial
/// sum rounded to BF16. Shared by aclnnMatmul / aclnnBatchMatMul and
/// aclnnWeightQuantBatchMatmulV2, whose results must agree bit for bit.
pub(crate) fn matmul_values(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, bf16_sums: bool) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for kk in 0..k {
                acc += a[i * k + kk] * b[kk * n + j];
                if bf16_sums {
                    acc = half::bf16::from_f64(acc).to_f64();
                }
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// `dims` left-padded with 1s to `rank`.
fn pad(dims: &[usize], rank: usize) -> Vec<usize> {
    let mut v = vec![1; rank.saturating_sub(dims.len())];
    v.extend_from_slice(dims);
    v
}

phase_one!(aclnnMatmulGetWorkspaceSize = "aclnnMatmul", e, (s: *const aclTensor, mat2: *const aclTensor, out: *mut aclTensor, cubeMathType: i8) {
    matmul_plan(e, s, mat2, out, cubeMathType, false)
});
phase_one!(aclnnBatchMatMulGetWorkspaceSize = "aclnnBatchMatMul", e, (s: *const aclTensor, mat2: *const aclTensor, out: *mut aclTensor, cubeMathType: i8) {
    matmul_plan(e, s, mat2, out, cubeMathType, true)
});

// ------------------------------------------------------------------ norm, rope, softmax

phase_one!(aclnnRmsNormGetWorkspaceSize = "aclnnRmsNorm", e, (x: *const aclTensor, gamma: *const aclTensor, epsilon: f64, yOut: *const aclTensor, rstdOut: *const aclTensor) {
    let (x, g, y, r) = (e.tensor(x, "x")?, e.tensor(gamma, "gamma")?, e.tensor(yOut, "yOut")?, e.tensor(rstdOut, "rstdOut")?);
    need_float(&x, "x")?;
    same_dtype(&x, "x", &g, "gamma")?;
    same_dtype(&x, "x", &y, "yOut")?;
    if r.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("rstdOut must be FLOAT, got {}", dtype_name(r.dtype)));
    }
    let gr = g.dims.len();
    if gr == 0 || gr > x.dims.len() || x.dims[x.dims.len() - gr..] != g.dims[..] {
        return Err(format!("gamma {:?} must equal the trailing dimensions of x {:?}", g.dims, x.dims));
    }
    shape_is(&y, &x.dims, "yOut")?;
    let mut rd = x.dims.clone();
    let rl = rd.len();
    rd[rl - gr..].fill(1);
    shape_is(&r, &rd, "rstdOut (x's shape with the normalised dimensions set to 1)")?;
    contiguous_out(&y, "yOut")?;
    contiguous_out(&r, "rstdOut")?;
    let ws = ws_for(&y);
    let (rx, rg, wy, wr) = (x.clone(), g.clone(), y.clone(), r.clone());
    Ok(plan(ws, vec![x, g], vec![y, r], vec![], move |mem| {
        let xv = rx.read(mem, "x")?;
        let gv = rg.read(mem, "gamma")?;
        let d = gv.len().max(1);
        let mut yv = vec![0f64; xv.len()];
        let mut rv = vec![0f64; xv.len() / d];
        for (row, (xs, ys)) in xv.chunks(d).zip(yv.chunks_mut(d)).enumerate() {
            let ms = xs.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let rstd = (1.0 / (ms + epsilon).sqrt()) as f32 as f64;
            rv[row] = rstd;
            for ((y, x), g) in ys.iter_mut().zip(xs).zip(&gv) {
                *y = ((x * rstd) as f32 as f64) * g;
            }
        }
        wy.write(mem, &yv, "yOut")?;
        wr.write(mem, &rv, "rstdOut")
    }))
});

phase_one!(aclnnRotaryPositionEmbeddingGetWorkspaceSize = "aclnnRotaryPositionEmbedding", e, (x: *const aclTensor, cos: *const aclTensor, sin: *const aclTensor, mode: i64, out: *mut aclTensor) {
    let (x, c, s, o) = (e.tensor(x, "x")?, e.tensor(cos, "cos")?, e.tensor(sin, "sin")?, e.tensor(out, "out")?);
    need_float(&x, "x")?;
    for (t, n) in [(&c, "cos"), (&s, "sin"), (&o, "out")] {
        same_dtype(&x, "x", t, n)?;
    }
    if !(x.dims.len() == 3 || x.dims.len() == 4) {
        return Err(format!("x must be 3-D (TND) or 4-D (BNSD/BSND/SBND), got {:?}", x.dims));
    }
    if mode != 0 && mode != 1 {
        return Err(format!("mode {mode}: Atlas A2/A3 support 0 (half) and 1 (interleave)"));
    }
    let d = *x.dims.last().expect("3-D or 4-D");
    if d % 2 != 0 || d >= 896 {
        return Err(format!("the last dimension D = {d} must be even and below 896"));
    }
    if c.dims != s.dims {
        return Err(format!("cos {:?} and sin {:?} must have the same shape", c.dims, s.dims));
    }
    if c.dims.len() != x.dims.len() || broadcast(&c.dims, &x.dims).as_deref() != Some(&x.dims[..]) {
        return Err(format!("cos/sin {:?} do not broadcast to x {:?}", c.dims, x.dims));
    }
    if mode == 1 {
        // Interleave: cos/sin must be T1D, 11SD, 1S1D or S11D (one non-1 dimension besides D).
        let non1 = c.dims[..c.dims.len() - 1].iter().filter(|&&v| v != 1).count();
        let ok = if x.dims.len() == 3 { c.dims[1] == 1 } else { non1 <= 1 };
        if !ok || x.dims[..x.dims.len() - 1].iter().product::<usize>() / c.dims[..c.dims.len() - 1].iter().product::<usize>().max(1) >= 1000 * 1000 {
            return Err(format!("interleave mode supports cos/sin laid out as T1D, 11SD, 1S1D or S11D; got {:?} for x {:?}", c.dims, x.dims));
        }
    }
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let (rx, rc, rs, wo) = (x.clone(), c.clone(), s.clone(), o.clone());
    Ok(plan(0, vec![x, c, s], vec![o], vec![], move |mem| {
        let xv = rx.read(mem, "x")?;
        let cv = expand(&rc.read(mem, "cos")?, &rc.dims, &rx.dims);
        let sv = expand(&rs.read(mem, "sin")?, &rs.dims, &rx.dims);
        let mut out = vec![0f64; xv.len()];
        for (row, o) in out.chunks_mut(d).enumerate() {
            let base = row * d;
            let xr = &xv[base..base + d];
            for i in 0..d {
                let rot = if mode == 1 {
                    if i % 2 == 0 { -xr[i + 1] } else { xr[i - 1] }
                } else if i < d / 2 {
                    -xr[i + d / 2]
                } else {
                    xr[i - d / 2]
                };
                o[i] = (xr[i] * cv[base + i]) as f32 as f64 + (rot * sv[base + i]) as f32 as f64;
            }
        }
        wo.write(mem, &out, "out")
    }))
});

phase_one!(aclnnSoftmaxGetWorkspaceSize = "aclnnSoftmax", e, (s: *const aclTensor, dim: i64, out: *mut aclTensor) {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    need_float(&x, "self")?;
    same_dtype(&x, "self", &o, "out")?;
    let ax = axis(dim, x.dims.len(), "dim")?;
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    let (rx, wo) = (x.clone(), o.clone());
    Ok(plan(ws, vec![x], vec![o], vec![], move |mem| {
        let v = rx.read(mem, "self")?;
        let (outer, len, inner) = split(&rx.dims, ax);
        let mut out = v.clone();
        for a in 0..outer {
            for c in 0..inner {
                let at = |i: usize| a * len * inner + i * inner + c;
                // torch semantics: a lane of -inf gives NaN (exp(-inf - -inf)).
                let max = (0..len).map(|i| v[at(i)]).fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = (0..len).map(|i| (v[at(i)] - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (i, x) in exps.iter().enumerate() {
                    out[at(i)] = x / sum;
                }
            }
        }
        wo.write(mem, &out, "out")
    }))
});

// -------------------------------------------------------------------- selection, indexing

phase_one!(aclnnTopkGetWorkspaceSize = "aclnnTopk", e, (s: *const aclTensor, k: i64, dim: i64, largest: bool, sorted: bool, valuesOut: *mut aclTensor, indicesOut: *mut aclTensor) {
    let (x, v, i) = (e.tensor(s, "self")?, e.tensor(valuesOut, "valuesOut")?, e.tensor(indicesOut, "indicesOut")?);
    need_numeric(&x, "self")?;
    same_dtype(&x, "self", &v, "valuesOut")?;
    if i.dtype != aclDataType::ACL_INT64 {
        return Err(format!("indicesOut must be INT64, got {}", dtype_name(i.dtype)));
    }
    if !sorted {
        return Err("sorted must be true".into());
    }
    let ax = axis(dim, x.dims.len(), "dim")?;
    if k < 0 || k as usize > x.dims[ax] {
        return Err(format!("k = {k} is outside 0..={} (the size of dim {dim})", x.dims[ax]));
    }
    let mut want = x.dims.clone();
    want[ax] = k as usize;
    shape_is(&v, &want, "valuesOut")?;
    shape_is(&i, &want, "indicesOut")?;
    contiguous_out(&v, "valuesOut")?;
    contiguous_out(&i, "indicesOut")?;
    let ws = ws_for(&v);
    let (rx, wv, wi, k) = (x.clone(), v.clone(), i.clone(), k as usize);
    Ok(plan(ws, vec![x], vec![v, i], vec![], move |mem| {
        let xv = rx.read(mem, "self")?;
        let (outer, len, inner) = split(&rx.dims, ax);
        let (mut vals, mut ids) = (vec![0f64; outer * k * inner], vec![0f64; outer * k * inner]);
        for a in 0..outer {
            for c in 0..inner {
                let at = |i: usize| a * len * inner + i * inner + c;
                let mut order: Vec<usize> = (0..len).collect();
                // Ties go to the lower index (documented emulator choice).
                order.sort_by(|&p, &q| {
                    let (x, y) = (xv[at(p)], xv[at(q)]);
                    let c = if largest { y.total_cmp(&x) } else { x.total_cmp(&y) };
                    c.then(p.cmp(&q))
                });
                for (j, &p) in order.iter().take(k).enumerate() {
                    let o = a * k * inner + j * inner + c;
                    vals[o] = xv[at(p)];
                    ids[o] = p as f64;
                }
            }
        }
        wv.write(mem, &vals, "valuesOut")?;
        wi.write(mem, &ids, "indicesOut")
    }))
});

/// Rows of `x` (viewed `[rows, row]`) at `ids`, failing on an out-of-range index.
fn gather_rows(xv: &[f64], rows: usize, row: usize, ids: &[f64], what: &str) -> R<Vec<f64>> {
    let mut out = Vec::with_capacity(ids.len() * row);
    for &id in ids {
        if id < 0.0 || id as usize >= rows {
            return Err(format!("{what} {id} is outside 0..{rows} (an out-of-range index faults the AI Core)"));
        }
        let id = id as usize;
        out.extend_from_slice(&xv[id * row..(id + 1) * row]);
    }
    Ok(out)
}

phase_one!(aclnnIndexSelectGetWorkspaceSize = "aclnnIndexSelect", e, (s: *const aclTensor, dim: i64, index: *const aclTensor, out: *mut aclTensor) {
    let (x, i, o) = (e.tensor(s, "self")?, e.tensor(index, "index")?, e.tensor(out, "out")?);
    need_numeric(&x, "self")?;
    need_index(&i, "index")?;
    same_dtype(&x, "self", &o, "out")?;
    if i.dims.len() > 1 {
        return Err(format!("index must be 0-D or 1-D, got {:?}", i.dims));
    }
    let ax = axis(dim, x.dims.len(), "dim")?;
    let mut want = x.dims.clone();
    want[ax] = i.numel();
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    let (rx, ri, wo) = (x.clone(), i.clone(), o.clone());
    Ok(plan(0, vec![x, i], vec![o], vec![], move |mem| {
        let xv = rx.read(mem, "self")?;
        let iv = ri.read(mem, "index")?;
        let (outer, len, inner) = split(&rx.dims, ax);
        let mut out = Vec::with_capacity(outer * iv.len() * inner);
        for a in 0..outer {
            out.extend(gather_rows(&xv[a * len * inner..(a + 1) * len * inner], len, inner, &iv, "index")?);
        }
        wo.write(mem, &out, "out")
    }))
});

phase_one!(aclnnEmbeddingGetWorkspaceSize = "aclnnEmbedding", e, (weight: *const aclTensor, indices: *const aclTensor, out: *const aclTensor) {
    let (w, i, o) = (e.tensor(weight, "weight")?, e.tensor(indices, "indices")?, e.tensor(out, "out")?);
    need_numeric(&w, "weight")?;
    need_index(&i, "indices")?;
    same_dtype(&w, "weight", &o, "out")?;
    if w.dims.len() != 2 {
        return Err(format!("weight must be 2-D, got {:?}", w.dims));
    }
    let mut want = i.dims.clone();
    want.push(w.dims[1]);
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    let (rw, ri, wo) = (w.clone(), i.clone(), o.clone());
    Ok(plan(0, vec![w, i], vec![o], vec![], move |mem| {
        let out = gather_rows(&rw.read(mem, "weight")?, rw.dims[0], rw.dims[1], &ri.read(mem, "indices")?, "indices")?;
        wo.write(mem, &out, "out")
    }))
});

phase_one!(aclnnGatherGetWorkspaceSize = "aclnnGather", e, (s: *const aclTensor, dim: i64, index: *const aclTensor, out: *mut aclTensor) {
    let (x, i, o) = (e.tensor(s, "self")?, e.tensor(index, "index")?, e.tensor(out, "out")?);
    need_numeric(&x, "self")?;
    need_index(&i, "index")?;
    same_dtype(&x, "self", &o, "out")?;
    let ax = axis(dim, x.dims.len(), "dim")?;
    if i.dims.len() != x.dims.len() || i.dims.iter().zip(&x.dims).enumerate().any(|(a, (p, q))| a != ax && p > q) {
        return Err(format!("index {:?} must have self's rank and no larger size off dim, self {:?}", i.dims, x.dims));
    }
    shape_is(&o, &i.dims, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    let (rx, ri, wo) = (x.clone(), i.clone(), o.clone());
    Ok(plan(ws, vec![x, i], vec![o], vec![], move |mem| {
        let xv = rx.read(mem, "self")?;
        let iv = ri.read(mem, "index")?;
        let xs = contiguous_strides(&rx.dims);
        let rank = ri.dims.len();
        let mut idx = vec![0usize; rank];
        let mut out = Vec::with_capacity(iv.len());
        for &id in &iv {
            if id < 0.0 || id as usize >= rx.dims[ax] {
                return Err(format!("index {id} is outside 0..{} along dim {ax}", rx.dims[ax]));
            }
            let off: usize = (0..rank).map(|a| if a == ax { id as usize } else { idx[a] } * xs[a]).sum();
            out.push(xv[off]);
            for a in (0..rank).rev() {
                idx[a] += 1;
                if idx[a] < ri.dims[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        wo.write(mem, &out, "out")
    }))
});

phase_one!(aclnnIndexAddGetWorkspaceSize = "aclnnIndexAdd", e, (s: *const aclTensor, dim: i64, index: *const aclTensor, source: *const aclTensor, alpha: *const aclScalar, out: *mut aclTensor) {
    let (x, i, src, o) = (e.tensor(s, "self")?, e.tensor(index, "index")?, e.tensor(source, "source")?, e.tensor(out, "out")?);
    let alpha = e.scalar(alpha, "alpha")?;
    need_numeric(&x, "self")?;
    need_index(&i, "index")?;
    same_dtype(&x, "self", &src, "source")?;
    same_dtype(&x, "self", &o, "out")?;
    if i.dims.len() > 1 {
        return Err(format!("index must be 0-D or 1-D, got {:?}", i.dims));
    }
    let ax = axis(dim, x.dims.len(), "dim")?;
    let mut want = x.dims.clone();
    want[ax] = i.numel();
    shape_is(&src, &want, "source")?;
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    let (rx, ri, rs, wo) = (x.clone(), i.clone(), src.clone(), o.clone());
    Ok(plan(ws, vec![x, i, src], vec![o], vec![], move |mem| {
        let mut out = rx.read(mem, "self")?;
        let iv = ri.read(mem, "index")?;
        let sv = rs.read(mem, "source")?;
        let (outer, len, inner) = split(&rx.dims, ax);
        let n = iv.len();
        for (j, &id) in iv.iter().enumerate() {
            if id < 0.0 || id as usize >= len {
                return Err(format!("index {id} is outside 0..{len}"));
            }
            for a in 0..outer {
                for c in 0..inner {
                    let o = a * len * inner + id as usize * inner + c;
                    // Accumulate in the output precision, in index order.
                    out[o] = (out[o] + alpha * sv[a * n * inner + j * inner + c]) as f32 as f64;
                }
            }
        }
        wo.write(mem, &out, "out")
    }))
});

/// aclnnInplaceIndexCopy (ops-nn `index/scatter_update/docs/aclnnIndexCopy&aclnnInplaceIndexCopy.md`):
/// Atlas A2 / A3 and Ascend 950 only; selfRef FLOAT, BFLOAT16, FLOAT16, INT8/16/32/64, UINT8,
/// DOUBLE or BOOL (UINT32/UINT64 on the 950 only), non-contiguous allowed; index INT32/INT64 of
/// at most one dimension with one entry per slice of source along dim; source of selfRef's
/// dtype and rank, equal to it off dim. The docs do not support out-of-range indices (an error
/// when the kernel runs) and leave the order of repeated ones unspecified: the emulator refuses
/// repeats too (deliberate: a result that depends on an unspecified order is a bug). selfRef is
/// written in place; the source and the index must not share bytes with it.
fn index_copy_plan(e: &Emu, s: *mut aclTensor, dim: i64, index: *const aclTensor, source: *const aclTensor) -> R<Plan> {
    let soc = crate::soc_name();
    let family_ok = soc.starts_with("Ascend910B") || soc.starts_with("Ascend910_93") || soc.starts_with("Ascend950");
    if !family_ok {
        return Err(format!(
            "aclnnInplaceIndexCopy is not supported on {soc} (the docs list Atlas A2, Atlas A3 and Ascend 950)"
        ));
    }
    let (x, i, src) = (e.tensor(s, "selfRef")?, e.tensor(index, "index")?, e.tensor(source, "source")?);
    let uint_wide = matches!(x.dtype, aclDataType::ACL_UINT32 | aclDataType::ACL_UINT64);
    if !(is_float(x.dtype)
        || (is_int(x.dtype) && x.dtype != aclDataType::ACL_UINT16)
        || x.dtype == aclDataType::ACL_BOOL
        || x.dtype == aclDataType::ACL_DOUBLE)
        || (uint_wide && !soc.starts_with("Ascend950"))
    {
        return Err(format!(
            "selfRef has dtype {}, which aclnnInplaceIndexCopy does not support on {soc}",
            dtype_name(x.dtype)
        ));
    }
    need_index(&i, "index")?;
    same_dtype(&x, "selfRef", &src, "source")?;
    if i.dims.len() > 1 {
        return Err(format!("index must be 0-D or 1-D, got {:?}", i.dims));
    }
    if x.dims.is_empty() || src.dims.is_empty() {
        return Err(format!("0-D selfRef or source ({:?}, {:?}) is not emulated", x.dims, src.dims));
    }
    if src.dims.len() != x.dims.len() {
        return Err(format!("source {:?} and selfRef {:?} must have the same number of dimensions", src.dims, x.dims));
    }
    let ax = axis(dim, x.dims.len(), "dim")?;
    if src.dims[ax] != i.numel() {
        return Err(format!(
            "source {:?} has {} entries along dim {dim} but index has {}",
            src.dims,
            src.dims[ax],
            i.numel()
        ));
    }
    if src.dims.iter().zip(&x.dims).enumerate().any(|(a, (p, q))| a != ax && p != q) {
        return Err(format!("source {:?} and selfRef {:?} differ off dim {dim}", src.dims, x.dims));
    }
    for (d, name) in [(&src, "source"), (&i, "index")] {
        if d.overlaps(&x) {
            return Err(format!(
                "{name} {} shares device memory with selfRef {}: only selfRef is written in place, its inputs \
                 must not alias it",
                d.describe(),
                x.describe()
            ));
        }
    }
    let ws = ws_for(&src);
    let (ri, rs, wx) = (i.clone(), src.clone(), x.clone());
    Ok(plan(ws, vec![x.clone(), i, src], vec![x], vec![], move |mem| {
        let iv = ri.read(mem, "index")?;
        let len = wx.dims[ax];
        if let Some((j, id)) = iv.iter().enumerate().find(|(_, &id)| id < 0.0 || id as usize >= len) {
            return Err(format!(
                "index {id} (entry {j}) is outside 0..{len} along dim {ax} (out-of-range indices are not supported: \
                 the AI Core faults)"
            ));
        }
        let mut order: Vec<(usize, usize)> = iv.iter().map(|&id| id as usize).zip(0..).collect();
        order.sort_unstable();
        if let Some(w) = order.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!(
                "index {} appears twice (entries {} and {}): the docs leave the order of repeated writes \
                 unspecified, so the emulator refuses them",
                w[0].0,
                w[0].1.min(w[1].1),
                w[0].1.max(w[1].1)
            ));
        }
        // Row-major source values as [outer, n, inner]; slice j is `inner` values per outer.
        let sv = rs.read(mem, "source")?;
        let (outer, n, inner) = split(&rs.dims, ax);
        for (j, &id) in iv.iter().enumerate() {
            let vals: Vec<f64> =
                (0..outer).flat_map(|a| sv[(a * n + j) * inner..(a * n + j + 1) * inner].iter().copied()).collect();
            wx.slice(ax, id as usize).write(mem, &vals, "selfRef")?;
        }
        Ok(())
    }))
}

phase_one!(aclnnInplaceIndexCopyGetWorkspaceSize = "aclnnInplaceIndexCopy", e, (selfRef: *mut aclTensor, dim: i64, index: *const aclTensor, source: *const aclTensor) {
    index_copy_plan(e, selfRef, dim, index, source)
});

phase_one!(aclnnInplaceMaskedFillScalarGetWorkspaceSize = "aclnnInplaceMaskedFillScalar", e, (selfRef: *mut aclTensor, mask: *const aclTensor, value: *const aclScalar) {
    let (x, m) = (e.tensor(selfRef, "selfRef")?, e.tensor(mask, "mask")?);
    let value = e.scalar(value, "value")?;
    need_numeric(&x, "selfRef")?;
    if m.dtype != aclDataType::ACL_BOOL {
        return Err(format!("mask must be BOOL, got {}", dtype_name(m.dtype)));
    }
    if broadcast(&x.dims, &m.dims).as_deref() != Some(&x.dims[..]) {
        return Err(format!("mask {:?} does not broadcast to selfRef {:?}", m.dims, x.dims));
    }
    let (rx, rm) = (x.clone(), m.clone());
    Ok(plan(0, vec![m, x.clone()], vec![x], vec![], move |mem| {
        let mut v = rx.read(mem, "selfRef")?;
        let mv = expand(&rm.read(mem, "mask")?, &rm.dims, &rx.dims);
        for (x, m) in v.iter_mut().zip(mv) {
            if m != 0.0 {
                *x = value;
            }
        }
        rx.write(mem, &v, "selfRef")
    }))
});

fn compare_plan(
    e: &Emu,
    s: *const aclTensor,
    other: *const aclScalar,
    out: *const aclTensor,
    f: fn(f64, f64) -> bool,
) -> R<Plan> {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    let other = e.scalar(other, "other")?;
    need_numeric(&x, "self")?;
    if o.dtype != aclDataType::ACL_BOOL {
        return Err(format!("out must be BOOL, got {}", dtype_name(o.dtype)));
    }
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let (rx, wo) = (x.clone(), o.clone());
    Ok(plan(0, vec![x], vec![o], vec![], move |mem| {
        let v: Vec<f64> = rx.read(mem, "self")?.into_iter().map(|x| f(x, other) as u8 as f64).collect();
        wo.write(mem, &v, "out")
    }))
}

phase_one!(aclnnLtScalarGetWorkspaceSize = "aclnnLtScalar", e, (s: *const aclTensor, other: *const aclScalar, out: *mut aclTensor) {
    compare_plan(e, s, other, out, |x, y| x < y)
});
phase_one!(aclnnEqScalarGetWorkspaceSize = "aclnnEqScalar", e, (s: *const aclTensor, other: *const aclScalar, out: *mut aclTensor) {
    compare_plan(e, s, other, out, |x, y| x == y)
});

// ------------------------------------------------------------------------- elementwise

/// The second operand of a binary op.
enum Other {
    Tensor(*const aclTensor),
    Scalar(*const aclScalar),
}

fn binary_plan(
    e: &Emu,
    s: *const aclTensor,
    other: Other,
    alpha: Option<*const aclScalar>,
    out: *const aclTensor,
    f: fn(f64, f64) -> f64,
) -> R<Plan> {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    need_numeric(&x, "self")?;
    same_dtype(&x, "self", &o, "out")?;
    let alpha = match alpha {
        Some(a) => e.scalar(a, "alpha")?,
        None => 1.0,
    };
    let (y, scalar) = match other {
        Other::Tensor(t) => {
            let y = e.tensor(t, "other")?;
            same_dtype(&x, "self", &y, "other")?;
            (Some(y), 0.0)
        }
        Other::Scalar(sc) => (None, e.scalar(sc, "other")?),
    };
    let want = match &y {
        Some(y) => broadcast(&x.dims, &y.dims)
            .ok_or_else(|| format!("self {:?} and other {:?} do not broadcast", x.dims, y.dims))?,
        None => x.dims.clone(),
    };
    shape_is(&o, &want, "out (the broadcast shape)")?;
    contiguous_out(&o, "out")?;
    let int = is_int(o.dtype);
    let (rx, ry, wo) = (x.clone(), y.clone(), o.clone());
    let mut reads = vec![x];
    reads.extend(y);
    Ok(plan(0, reads, vec![o], vec![], move |mem| {
        let a = expand(&rx.read(mem, "self")?, &rx.dims, &want);
        let b = match &ry {
            Some(y) => expand(&y.read(mem, "other")?, &y.dims, &want),
            None => vec![scalar; a.len()],
        };
        let v: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&p, &q)| {
                let q = if alpha == 1.0 { q } else { alpha * q };
                let r = f(p, q);
                if int {
                    r.trunc()
                } else {
                    r
                }
            })
            .collect();
        wo.write(mem, &v, "out")
    }))
}

fn maximum(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn minimum(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

phase_one!(aclnnAddGetWorkspaceSize = "aclnnAdd", e, (s: *const aclTensor, other: *const aclTensor, alpha: *const aclScalar, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), Some(alpha), out, |a, b| a + b)
});
phase_one!(aclnnAddsGetWorkspaceSize = "aclnnAdds", e, (s: *const aclTensor, other: *const aclScalar, alpha: *const aclScalar, out: *mut aclTensor) {
    binary_plan(e, s, Other::Scalar(other), Some(alpha), out, |a, b| a + b)
});
phase_one!(aclnnSubGetWorkspaceSize = "aclnnSub", e, (s: *const aclTensor, other: *const aclTensor, alpha: *const aclScalar, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), Some(alpha), out, |a, b| a - b)
});
phase_one!(aclnnMulGetWorkspaceSize = "aclnnMul", e, (s: *const aclTensor, other: *const aclTensor, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), None, out, |a, b| a * b)
});
phase_one!(aclnnMulsGetWorkspaceSize = "aclnnMuls", e, (s: *const aclTensor, other: *const aclScalar, out: *mut aclTensor) {
    binary_plan(e, s, Other::Scalar(other), None, out, |a, b| a * b)
});
phase_one!(aclnnDivGetWorkspaceSize = "aclnnDiv", e, (s: *const aclTensor, other: *const aclTensor, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), None, out, |a, b| a / b)
});
phase_one!(aclnnMaximumGetWorkspaceSize = "aclnnMaximum", e, (s: *const aclTensor, other: *const aclTensor, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), None, out, maximum)
});
phase_one!(aclnnMinimumGetWorkspaceSize = "aclnnMinimum", e, (s: *const aclTensor, other: *const aclTensor, out: *mut aclTensor) {
    binary_plan(e, s, Other::Tensor(other), None, out, minimum)
});

fn unary_plan(
    e: &Emu,
    s: *const aclTensor,
    out: *const aclTensor,
    floats_only: bool,
    f: impl Fn(f64) -> f64 + Send + Sync + 'static,
) -> R<Plan> {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    if floats_only {
        need_float(&x, "self")?
    } else {
        need_numeric(&x, "self")?
    }
    same_dtype(&x, "self", &o, "out")?;
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let (rx, wo) = (x.clone(), o.clone());
    Ok(plan(0, vec![x], vec![o], vec![], move |mem| {
        let v: Vec<f64> = rx.read(mem, "self")?.into_iter().map(&f).collect();
        wo.write(mem, &v, "out")
    }))
}

phase_one!(aclnnSigmoidGetWorkspaceSize = "aclnnSigmoid", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, true, |v| 1.0 / (1.0 + (-v).exp()))
});
phase_one!(aclnnSiluGetWorkspaceSize = "aclnnSilu", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, true, |v| v / (1.0 + (-v).exp()))
});
phase_one!(aclnnExpGetWorkspaceSize = "aclnnExp", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, true, f64::exp)
});
phase_one!(aclnnSqrtGetWorkspaceSize = "aclnnSqrt", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, true, f64::sqrt)
});
phase_one!(aclnnRsqrtGetWorkspaceSize = "aclnnRsqrt", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, true, |v| 1.0 / v.sqrt())
});
phase_one!(aclnnReluGetWorkspaceSize = "aclnnRelu", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, false, |v| if v.is_nan() { v } else { v.max(0.0) })
});
phase_one!(aclnnNegGetWorkspaceSize = "aclnnNeg", e, (s: *const aclTensor, out: *mut aclTensor) {
    unary_plan(e, s, out, false, |v| -v)
});
phase_one!(aclnnSoftplusGetWorkspaceSize = "aclnnSoftplus", e, (s: *const aclTensor, beta: *const aclScalar, threshold: *const aclScalar, out: *mut aclTensor) {
    // The operator docs list aclnnSoftplus as unsupported on the Ascend 950.
    if crate::soc_name().starts_with("Ascend950") {
        return Err(format!("aclnnSoftplus is not supported on {}", crate::soc_name()));
    }
    let (b, t) = (e.scalar(beta, "beta")?, e.scalar(threshold, "threshold")?);
    if b == 0.0 {
        return Err("beta must not be 0".into());
    }
    let mut p = unary_plan(e, s, out, true, move |v| if v * b > t { v } else { (v * b).exp().ln_1p() / b })?;
    p.objects.extend([beta as u64, threshold as u64]);
    Ok(p)
});
phase_one!(aclnnClampGetWorkspaceSize = "aclnnClamp", e, (s: *const aclTensor, clipValueMin: *const aclScalar, clipValueMax: *const aclScalar, out: *mut aclTensor) {
    if clipValueMin.is_null() && clipValueMax.is_null() {
        return Err("clipValueMin and clipValueMax are both NULL".into());
    }
    let lo = if clipValueMin.is_null() { f64::NEG_INFINITY } else { e.scalar(clipValueMin, "clipValueMin")? };
    let hi = if clipValueMax.is_null() { f64::INFINITY } else { e.scalar(clipValueMax, "clipValueMax")? };
    unary_plan(e, s, out, false, move |v| if v.is_nan() { v } else { v.max(lo).min(hi) })
});

phase_one!(aclnnCastGetWorkspaceSize = "aclnnCast", e, (s: *const aclTensor, dtype: aclDataType, out: *mut aclTensor) {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    if o.dtype != dtype {
        return Err(format!("out has dtype {} but dtype says {}", dtype_name(o.dtype), dtype_name(dtype)));
    }
    if is_low_precision(x.dtype) || is_low_precision(dtype) {
        low_precision_cast_check(&x, dtype)?;
    } else {
        need_numeric(&x, "self")?;
        if !is_float(dtype) && !is_int(dtype) && dtype != aclDataType::ACL_BOOL {
            return Err(format!("cannot cast to {}", dtype_name(dtype)));
        }
    }
    shape_is(&o, &x.dims, "out")?;
    contiguous_out(&o, "out")?;
    let (rx, wo) = (x.clone(), o.clone());
    Ok(plan(0, vec![x], vec![o], vec![], move |mem| {
        let v: Vec<f64> = rx.read(mem, "self")?.into_iter().map(|v| if is_int(dtype) { v.trunc() } else { v }).collect();
        wo.write(mem, &v, "out")
    }))
});

/// aclnnCast with FLOAT8_E4M3FN / FLOAT4_E2M1 / FLOAT8_E8M0 on either side
/// (ops-math `math/cast/docs/aclnnCast.md`): Atlas A2/A3 support none of the 8- and 4-bit
/// float types (nor does any other SoC the doc lists); the Ascend 950 only the conversion paths
/// of its table: FLOAT4_E2M1 / FLOAT8_E4M3FN ↔ FLOAT / FLOAT16 / BFLOAT16 and
/// FLOAT8_E4M3FN ↔ FLOAT4_E2M1, with a contiguous input when it is FLOAT4_E2M1. FLOAT8_E8M0
/// is in neither dtype list. Encodes round to nearest even and saturate (±448, ±6); NaN stays
/// NaN in FLOAT8_E4M3FN and has no FLOAT4_E2M1 encoding (refused when the kernel meets one).
fn low_precision_cast_check(x: &Desc, dtype: aclDataType) -> R<()> {
    const DOC: &str = "math/cast/docs/aclnnCast.md";
    let (from, to) = (dtype_name(x.dtype), dtype_name(dtype));
    if x.dtype == aclDataType::ACL_FLOAT8_E8M0 || dtype == aclDataType::ACL_FLOAT8_E8M0 {
        return Err(format!(
            "{from} -> {to}: FLOAT8_E8M0 is in neither the self nor the out dtype list of aclnnCast ({DOC})"
        ));
    }
    let soc = crate::soc_name();
    match crate::fused::family() {
        "950" if crate::fused::quirk("cast-without-low-precision") => {
            return Err(format!("{from} -> {to}: this CANN release's aclnnCast has no 8- or 4-bit float types"))
        }
        "950" => {}
        "A2" | "A3" => {
            return Err(format!(
                "{from} -> {to} is not supported on {soc}: {DOC} lists COMPLEX32, HIFLOAT8, FLOAT8_E5M2, \
                 FLOAT8_E4M3FN, FLOAT4_E2M1, FLOAT4_E1M2 and INT4 as unsupported on Atlas A2/A3"
            ))
        }
        _ => {
            return Err(format!(
                "{from} -> {to} is not supported on {soc}: {DOC} documents the 8- and 4-bit float types for the \
                 Ascend 950 only"
            ))
        }
    }
    let (fp8, fp4) = (aclDataType::ACL_FLOAT8_E4M3FN, aclDataType::ACL_FLOAT4_E2M1);
    let narrow = |d: aclDataType| d == fp8 || d == fp4;
    // FLOAT / FLOAT16 / BFLOAT16 to and from either, or one to the other.
    let ok = (narrow(x.dtype) && is_float(dtype))
        || (is_float(x.dtype) && narrow(dtype))
        || (narrow(x.dtype) && narrow(dtype) && x.dtype != dtype);
    if !ok {
        return Err(format!(
            "{from} -> {to} is not a conversion path the Ascend 950 supports ({DOC}: FLOAT4_E2M1 / FLOAT8_E4M3FN \
             to and from FLOAT32 / FLOAT16 / BFLOAT16, and between FLOAT8_E4M3FN and FLOAT4_E2M1)"
        ));
    }
    if x.dtype == fp4 && !x.is_contiguous() {
        return Err(format!(
            "self {} is not contiguous: a FLOAT4_E2M1 input must be contiguous ({DOC}: 不支持输入为非连续)",
            x.describe()
        ));
    }
    Ok(())
}

// --------------------------------------------------------------------------- reductions

#[derive(Clone, Copy)]
enum Red {
    Sum,
    Mean,
    Max,
}

fn reduce_plan(
    e: &Emu,
    s: *const aclTensor,
    dim: *const aclIntArray,
    keep: bool,
    dtype: Option<aclDataType>,
    out: *const aclTensor,
    red: Red,
) -> R<Plan> {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    let dims = e.int_array(dim, "dim")?;
    need_numeric(&x, "self")?;
    if let Some(dt) = dtype {
        if dt != o.dtype {
            return Err(format!("dtype {} differs from out's {}", dtype_name(dt), dtype_name(o.dtype)));
        }
    }
    same_dtype(&x, "self", &o, "out")?;
    let mut axes = vec![];
    for &d in &dims {
        let a = axis(d, x.dims.len(), "dim entry")?;
        if axes.contains(&a) {
            return Err(format!("dim {dims:?} repeats axis {a}"));
        }
        axes.push(a);
    }
    if dims.is_empty() {
        axes = (0..x.dims.len()).collect();
    }
    let want: Vec<usize> = if keep {
        x.dims.iter().enumerate().map(|(a, &d)| if axes.contains(&a) { 1 } else { d }).collect()
    } else {
        x.dims.iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, &d)| d).collect()
    };
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    let (rx, wo) = (x.clone(), o.clone());
    Ok(plan(ws, vec![x], vec![o], vec![dim as u64], move |mem| {
        let v = rx.read(mem, "self")?;
        let kept: Vec<usize> =
            rx.dims.iter().enumerate().map(|(a, &d)| if axes.contains(&a) { 1 } else { d }).collect();
        let ks = contiguous_strides(&kept);
        let n_out: usize = kept.iter().product();
        let count: usize = axes.iter().map(|&a| rx.dims[a]).product();
        let init = if matches!(red, Red::Max) { f64::NEG_INFINITY } else { 0.0 };
        let mut acc = vec![init; n_out];
        let rank = rx.dims.len();
        let mut idx = vec![0usize; rank];
        for &x in &v {
            let o: usize = (0..rank).map(|a| if axes.contains(&a) { 0 } else { idx[a] * ks[a] }).sum();
            acc[o] = match red {
                Red::Max => {
                    if x.is_nan() || acc[o].is_nan() {
                        f64::NAN
                    } else {
                        acc[o].max(x)
                    }
                }
                _ => acc[o] + x,
            };
            for a in (0..rank).rev() {
                idx[a] += 1;
                if idx[a] < rx.dims[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        if matches!(red, Red::Mean) {
            acc.iter_mut().for_each(|a| *a /= count.max(1) as f64);
        }
        wo.write(mem, &acc, "out")
    }))
}

phase_one!(aclnnReduceSumGetWorkspaceSize = "aclnnReduceSum", e, (s: *const aclTensor, dim: *const aclIntArray, keepDim: bool, dtype: aclDataType, out: *mut aclTensor) {
    reduce_plan(e, s, dim, keepDim, Some(dtype), out, Red::Sum)
});
phase_one!(aclnnMeanGetWorkspaceSize = "aclnnMean", e, (s: *const aclTensor, dim: *const aclIntArray, keepDim: bool, dtype: aclDataType, out: *mut aclTensor) {
    reduce_plan(e, s, dim, keepDim, Some(dtype), out, Red::Mean)
});
phase_one!(aclnnAmaxGetWorkspaceSize = "aclnnAmax", e, (s: *const aclTensor, dim: *const aclIntArray, keepDim: bool, out: *mut aclTensor) {
    reduce_plan(e, s, dim, keepDim, None, out, Red::Max)
});

// ------------------------------------------------------------------------------- layout

phase_one!(aclnnCatGetWorkspaceSize = "aclnnCat", e, (tensors: *const aclTensorList, dim: i64, out: *mut aclTensor) {
    let xs = e.tensor_list(tensors, "tensors")?;
    let o = e.tensor(out, "out")?;
    let first = xs.first().ok_or("the tensor list is empty")?;
    let ax = axis(dim, first.dims.len(), "dim")?;
    let mut want = first.dims.clone();
    want[ax] = 0;
    for (i, x) in xs.iter().enumerate() {
        need_numeric(x, "tensors")?;
        same_dtype(first, "tensors[0]", x, &format!("tensors[{i}]"))?;
        if x.dims.len() != first.dims.len() || x.dims.iter().zip(&first.dims).enumerate().any(|(a, (p, q))| a != ax && p != q) {
            return Err(format!("tensors[{i}] {:?} does not match tensors[0] {:?} off dim {ax}", x.dims, first.dims));
        }
        want[ax] += x.dims[ax];
    }
    same_dtype(first, "tensors[0]", &o, "out")?;
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    let ws = ws_for(&o);
    let (rs, wo) = (xs.clone(), o.clone());
    Ok(plan(ws, xs, vec![o], vec![tensors as u64], move |mem| {
        let (outer, _, inner) = split(&wo.dims, ax);
        let parts: Vec<Vec<f64>> = rs.iter().map(|x| x.read(mem, "tensors")).collect::<R<_>>()?;
        let mut out = Vec::with_capacity(wo.numel());
        for a in 0..outer {
            for (x, p) in rs.iter().zip(&parts) {
                let chunk = x.dims[ax] * inner;
                out.extend_from_slice(&p[a * chunk..(a + 1) * chunk]);
            }
        }
        wo.write(mem, &out, "out")
    }))
});

phase_one!(aclnnPermuteGetWorkspaceSize = "aclnnPermute", e, (s: *const aclTensor, dims: *const aclIntArray, out: *mut aclTensor) {
    let (x, o) = (e.tensor(s, "self")?, e.tensor(out, "out")?);
    let perm = e.int_array(dims, "dims")?;
    need_numeric(&x, "self")?;
    same_dtype(&x, "self", &o, "out")?;
    let rank = x.dims.len();
    let mut p: Vec<usize> = perm.iter().map(|&d| axis(d, rank, "dims entry")).collect::<R<_>>()?;
    let mut sorted = p.clone();
    sorted.sort();
    if sorted != (0..rank).collect::<Vec<_>>() {
        return Err(format!("dims {perm:?} is not a permutation of 0..{rank}"));
    }
    let want: Vec<usize> = p.iter().map(|&a| x.dims[a]).collect();
    shape_is(&o, &want, "out")?;
    contiguous_out(&o, "out")?;
    // Reading self through permuted strides gives the permuted values.
    let mut view = x.clone();
    view.dims = want;
    view.strides = p.iter().map(|&a| x.strides[a]).collect();
    p.clear();
    let wo = o.clone();
    Ok(plan(0, vec![x], vec![o], vec![dims as u64], move |mem| {
        let v = view.read(mem, "self")?;
        wo.write(mem, &v, "out")
    }))
});

phase_one!(aclnnInplaceCopyGetWorkspaceSize = "aclnnInplaceCopy", e, (selfRef: *mut aclTensor, src: *const aclTensor) {
    let (d, s) = (e.tensor(selfRef, "selfRef")?, e.tensor(src, "src")?);
    need_numeric(&d, "selfRef")?;
    need_numeric(&s, "src")?;
    if broadcast(&d.dims, &s.dims).as_deref() != Some(&d.dims[..]) {
        return Err(format!("src {:?} does not broadcast to selfRef {:?}", s.dims, d.dims));
    }
    let (rs, wd) = (s.clone(), d.clone());
    let int = is_int(d.dtype);
    Ok(plan(0, vec![s], vec![d], vec![], move |mem| {
        let v: Vec<f64> = expand(&rs.read(mem, "src")?, &rs.dims, &wd.dims).into_iter().map(|v| if int { v.trunc() } else { v }).collect();
        wd.write(mem, &v, "selfRef")
    }))
});

phase_one!(aclnnInplaceFillScalarGetWorkspaceSize = "aclnnInplaceFillScalar", e, (selfRef: *mut aclTensor, value: *const aclScalar) {
    let d = e.tensor(selfRef, "selfRef")?;
    let value = e.scalar(value, "value")?;
    need_numeric(&d, "selfRef")?;
    let wd = d.clone();
    Ok(plan(0, vec![], vec![d], vec![], move |mem| wd.write(mem, &vec![value; wd.numel()], "selfRef")))
});

#[cfg(test)]
mod low_precision_tests {
    use std::ffi::c_void;

    use dsv4_ascend_sys::{aclDataType, aclTensor};

    use super::{aclnnAdd, aclnnAddGetWorkspaceSize, aclnnCast, aclnnCastGetWorkspaceSize};
    use crate::mem::{decode_e2m1, decode_e4m3fn};
    use crate::test_support::{device, download, run, setup, tensor, view};

    const A2: &str = "Ascend910B3";
    const S950: &str = "Ascend950PR_9599";

    fn cast(x: *mut aclTensor, dt: aclDataType, y: *mut aclTensor) -> Result<(), String> {
        // SAFETY: tensors created by the test.
        run(|ws, ex| unsafe { aclnnCastGetWorkspaceSize(x, dt, y, ws, ex) }, aclnnCast)
    }

    fn out(n: usize, dt: aclDataType, bytes_each: usize) -> (*mut aclTensor, *mut c_void) {
        let p = device(&vec![0u8; n * bytes_each]);
        (tensor(&[n as i64], dt, p), p)
    }

    #[test]
    fn fp4_to_bf16_decodes_nibbles_on_the_950() {
        setup(S950);
        // 16 codes, 0..=15, packed low nibble first; a view of 13 elements from odd offset 1.
        let packed: Vec<u8> = (0..8u8).map(|i| (2 * i) | ((2 * i + 1) << 4)).collect();
        let p = device(&packed);
        let x = view(&[13], &[1], 1, aclDataType::ACL_FLOAT4_E2M1, &[16], p);
        let (y, yp) = out(13, aclDataType::ACL_BF16, 2);
        cast(x, aclDataType::ACL_BF16, y).unwrap();
        let got: Vec<f64> =
            download(yp, 26).chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()).collect();
        let want: Vec<f64> = (1..14u8).map(decode_e2m1).collect();
        assert_eq!(got, want);
        assert_eq!(got[..4], [0.5, 1.0, 1.5, 2.0]);
        // A non-contiguous FLOAT4_E2M1 input is refused.
        let strided = view(&[8], &[2], 0, aclDataType::ACL_FLOAT4_E2M1, &[16], p);
        let (y8, _) = out(8, aclDataType::ACL_BF16, 2);
        assert!(cast(strided, aclDataType::ACL_BF16, y8).unwrap_err().contains("must be contiguous"));
        // Refused on Atlas A2.
        setup(A2);
        let err = cast(x, aclDataType::ACL_BF16, y).unwrap_err();
        assert!(err.contains("Ascend910B3") && err.contains("aclnnCast.md"), "{err}");
    }

    #[test]
    fn fp8_to_f32_decodes_all_codes_on_the_950() {
        setup(S950);
        let codes: Vec<u8> = (0..=255u8).collect();
        let x = tensor(&[256], aclDataType::ACL_FLOAT8_E4M3FN, device(&codes));
        let (y, yp) = out(256, aclDataType::ACL_FLOAT, 4);
        cast(x, aclDataType::ACL_FLOAT, y).unwrap();
        let got: Vec<f32> =
            download(yp, 1024).chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        for (c, g) in codes.iter().zip(&got) {
            let want = decode_e4m3fn(*c) as f32;
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{c:#04x}: {g}");
        }
        assert_eq!((got[0x7E], got[0xFE]), (448.0, -448.0));
        setup(A2);
        let err = cast(x, aclDataType::ACL_FLOAT, y).unwrap_err();
        assert!(err.contains("not supported on Ascend910B3"), "{err}");
    }

    #[test]
    fn encodes_and_paths_on_the_950() {
        setup(S950);
        let vals: [f32; 6] = [1.0625, -500.0, 0.3, 5.0, -0.75, 1e-9];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let x = tensor(&[6], aclDataType::ACL_FLOAT, device(&bytes));
        let (y8, p8) = out(6, aclDataType::ACL_FLOAT8_E4M3FN, 1);
        cast(x, aclDataType::ACL_FLOAT8_E4M3FN, y8).unwrap();
        let f8 = download(p8, 6);
        assert_eq!(f8[..2], [0x38, 0xFE], "ties to even, saturation to -448");
        let (y4, p4) = out(6, aclDataType::ACL_FLOAT4_E2M1, 1);
        cast(x, aclDataType::ACL_FLOAT4_E2M1, y4).unwrap();
        // 1.0625 -> 1 (0x2), -500 -> -6 (0xF), 0.3 -> 0.5 (0x1), 5 -> 4 (0x6), -0.75 -> -1 (0xA), ~0 -> 0.
        assert_eq!(download(p4, 3), vec![0xF2, 0x61, 0x0A]);
        // FLOAT8_E4M3FN -> FLOAT4_E2M1 is a path; FLOAT8_E8M0 is in no list; FP8 -> INT8 is not a path.
        let (y4b, p4b) = out(6, aclDataType::ACL_FLOAT4_E2M1, 1);
        let x8 = tensor(&[6], aclDataType::ACL_FLOAT8_E4M3FN, p8);
        cast(x8, aclDataType::ACL_FLOAT4_E2M1, y4b).unwrap();
        assert_eq!(download(p4b, 3), vec![0xF2, 0x61, 0x0A]);
        let e8 = tensor(&[6], aclDataType::ACL_FLOAT8_E8M0, p8);
        let (yf, _) = out(6, aclDataType::ACL_FLOAT, 4);
        assert!(cast(e8, aclDataType::ACL_FLOAT, yf).unwrap_err().contains("FLOAT8_E8M0 is in neither"));
        let (yi, _) = out(6, aclDataType::ACL_INT8, 1);
        assert!(cast(x8, aclDataType::ACL_INT8, yi).unwrap_err().contains("not a conversion path"));
        // Other operators keep refusing the 8-bit types.
        let (ya, _) = out(6, aclDataType::ACL_FLOAT8_E4M3FN, 1);
        let one = 1.0f32;
        // SAFETY: a host f32.
        let alpha = unsafe { crate::aclCreateScalar(&one as *const f32 as *mut c_void, aclDataType::ACL_FLOAT) };
        // SAFETY: handles created here.
        let err = run(|ws, ex| unsafe { aclnnAddGetWorkspaceSize(x8, x8, alpha, ya, ws, ex) }, aclnnAdd).unwrap_err();
        assert!(err.contains("FLOAT8_E4M3FN"), "{err}");
        // And no scalar takes them.
        let b = 0x38u8;
        // SAFETY: a host byte.
        let s = unsafe { crate::aclCreateScalar(&b as *const u8 as *mut c_void, aclDataType::ACL_FLOAT8_E4M3FN) };
        assert!(s.is_null());
    }
}
