//! Shape and index checks of the [`Backend`](crate::backend::Backend) operations, written once
//! here so that every backend rejects the same inputs with the same message (the CPU and Ascend
//! backends used to carry their own copies, which drifted).
//!
//! Each function takes the backend's name (for [`Error::backend`]) and the shapes of the
//! operands, and returns the shape of the result (or the dimensions the backend needs), so a
//! backend calls it first and dispatches on what it returns:
//!
//! ```ignore
//! let out_shape = backend_checks::linear(self.name(), &x.shape, &w.shape)?;
//! ```
//!
//! Index tensors are checked against their operand when the backend knows their values on the
//! host: it passes the [`IndexBounds`] of the values (their minimum and maximum, which decide
//! every range question), or `None` when it does not know them (the shape checks still run).
//! `-1` marks "no entry" where the operation allows it (`index_select`, `pool_read`,
//! `sparse_attention`); any other negative value is an error everywhere.
//!
//! Messages name the operation and the shapes: `index_select: index 7 is outside the 4 rows
//! of x [4, 2, 3]`.

use std::ops::Range;

use crate::backend::{broadcast_shape, RowFormat};
use crate::error::{Error, Result};

fn fail<T>(backend: &str, msg: String) -> Result<T> {
    Err(Error::backend(backend, msg))
}

/// Number of elements of `shape`, or an error when the product overflows `usize`.
pub fn numel(backend: &str, op: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::backend(backend, format!("{op}: shape {shape:?} has more elements than fit in memory")))
}

/// A weight viewed as the matrix `[rows, cols]` backends keep it as (outer dimension by
/// everything else; a 0-d weight is `[1, 1]`).
pub fn weight_matrix(w: &[usize]) -> (usize, usize) {
    (*w.first().unwrap_or(&1), w.iter().skip(1).product())
}

// -------------------------------------------------------------------------------- indices

/// The smallest and largest value of an index tensor, which is all a range check needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexBounds {
    pub min: i32,
    pub max: i32,
}

impl IndexBounds {
    /// The bounds of `values`; None when there are none.
    pub fn of(values: &[i32]) -> Option<IndexBounds> {
        let (&first, rest) = values.split_first()?;
        Some(
            rest.iter().fold(IndexBounds { min: first, max: first }, |b, &v| IndexBounds {
                min: b.min.min(v),
                max: b.max.max(v),
            }),
        )
    }

    /// Bounds covering both.
    pub fn union(self, other: IndexBounds) -> IndexBounds {
        IndexBounds { min: self.min.min(other.min), max: self.max.max(other.max) }
    }
}

/// Every index is a row in `0..rows` of `what`, or `-1` where `none_ok`.
pub fn index_values(
    backend: &str,
    op: &str,
    bounds: Option<IndexBounds>,
    rows: usize,
    what: &str,
    none_ok: bool,
) -> Result<()> {
    let Some(b) = bounds else { return Ok(()) };
    if b.min < -1 {
        let also = if none_ok { " (-1 is the only negative value, meaning no entry)" } else { "" };
        return fail(backend, format!("{op}: index {} is negative{also}", b.min));
    }
    if b.min == -1 && !none_ok {
        return fail(backend, format!("{op}: index -1 (no entry) is not allowed here; every index must name a row"));
    }
    if b.max >= 0 && b.max as usize >= rows {
        return fail(backend, format!("{op}: index {} is outside the {rows} rows of {what}", b.max));
    }
    Ok(())
}

fn non_scalar(backend: &str, op: &str, name: &str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() {
        return fail(backend, format!("{op}: {name} must have at least one dimension, got a 0-d tensor"));
    }
    Ok(())
}

fn axis_in(backend: &str, op: &str, shape: &[usize], axis: usize) -> Result<()> {
    if axis >= shape.len() {
        return fail(backend, format!("{op}: axis {axis} is out of range for shape {shape:?}"));
    }
    Ok(())
}

// --------------------------------------------------------------------------------- memory

/// `upload`: `values` numbers for `shape`.
pub fn upload(backend: &str, values: usize, shape: &[usize]) -> Result<Vec<usize>> {
    sized(backend, "upload", values, shape)
}

/// `upload_index`: `values` numbers for `shape`.
pub fn upload_index(backend: &str, values: usize, shape: &[usize]) -> Result<Vec<usize>> {
    sized(backend, "upload_index", values, shape)
}

fn sized(backend: &str, op: &str, values: usize, shape: &[usize]) -> Result<Vec<usize>> {
    if numel(backend, op, shape)? != values {
        return fail(backend, format!("{op}: {values} values for shape {shape:?}"));
    }
    Ok(shape.to_vec())
}

/// `full`: any shape whose size fits.
pub fn full(backend: &str, shape: &[usize]) -> Result<Vec<usize>> {
    numel(backend, "full", shape)?;
    Ok(shape.to_vec())
}

// ---------------------------------------------------------------------------------- pools

/// `alloc_pool`: returns the pool's bytes. An FP8 row's rotary part must fit in the row.
pub fn alloc_pool(backend: &str, rows: usize, width: usize, format: RowFormat) -> Result<usize> {
    if let RowFormat::Fp8 { rope } = format {
        if rope > width {
            return fail(backend, format!("alloc_pool: {format:?} has more rotary channels than the row's {width}"));
        }
    }
    // row_bytes is at most 4·width + 8: check that before computing it.
    width
        .checked_mul(4)
        .and_then(|b| b.checked_add(8))
        .and_then(|_| rows.checked_mul(format.row_bytes(width)))
        .ok_or_else(|| {
            Error::backend(backend, format!("alloc_pool: {rows} rows of {width} values do not fit in memory"))
        })
}

/// `pool_write`: slots `[n]` (each a row of the pool, no `-1`), values `[n, width]`.
pub fn pool_write(
    backend: &str,
    rows: usize,
    width: usize,
    slots: &[usize],
    values: &[usize],
    slot_bounds: Option<IndexBounds>,
) -> Result<()> {
    if slots.len() != 1 || values.len() != 2 || values[0] != slots[0] || values[1] != width {
        return fail(
            backend,
            format!("pool_write: slots {slots:?} and values {values:?} into a pool of width {width} (want [n] and [n, {width}])"),
        );
    }
    index_values(backend, "pool_write", slot_bounds, rows, "the pool", false)
}

/// `pool_read`: slots of any shape (`-1` reads zeros) → `slots ++ [width]`.
pub fn pool_read(
    backend: &str,
    rows: usize,
    width: usize,
    slots: &[usize],
    slot_bounds: Option<IndexBounds>,
) -> Result<Vec<usize>> {
    index_values(backend, "pool_read", slot_bounds, rows, "the pool", true)?;
    let mut shape = slots.to_vec();
    shape.push(width);
    numel(backend, "pool_read", &shape)?;
    Ok(shape)
}

// ----------------------------------------------------------------------------- primitives

/// `linear`: x `[.., K]`, W `[N, K]` → `[.., N]`.
pub fn linear(backend: &str, x: &[usize], w: &[usize]) -> Result<Vec<usize>> {
    let (n, k) = weight_matrix(w);
    if x.last() != Some(&k) {
        return fail(backend, format!("linear: input {x:?} against weight {w:?} (want [.., {k}] and [N, K])"));
    }
    let mut out = x.to_vec();
    *out.last_mut().expect("non-scalar") = n;
    Ok(out)
}

/// `grouped_linear`: x `[M, G, K]`, W `[G·R, K]`, `groups` = G ≥ 1 → `[M, G, R]`.
pub fn grouped_linear(backend: &str, x: &[usize], w: &[usize], groups: usize) -> Result<Vec<usize>> {
    let (rows, k) = weight_matrix(w);
    let why = if groups == 0 {
        Some("groups must be at least 1".to_string())
    } else if x.len() != 3 || x[1] != groups || x[2] != k {
        Some(format!("want x [M, {groups}, K] and weight [{groups}·R, K]"))
    } else if !rows.is_multiple_of(groups) {
        Some(format!("{rows} weight rows do not split into {groups} groups"))
    } else {
        None
    };
    match why {
        Some(why) => fail(backend, format!("grouped_linear: input {x:?}, weight {w:?}, {groups} groups: {why}")),
        None => Ok(vec![x[0], groups, rows / groups]),
    }
}

/// `embedding`: table `[V, D]`, ids of any shape, each in `0..V` → `ids ++ [D]`.
pub fn embedding(backend: &str, table: &[usize], ids: &[usize], id_bounds: Option<IndexBounds>) -> Result<Vec<usize>> {
    let (v, d) = weight_matrix(table);
    index_values(backend, "embedding", id_bounds, v, &format!("the table {table:?}"), false)?;
    let mut out = ids.to_vec();
    out.push(d);
    numel(backend, "embedding", &out)?;
    Ok(out)
}

/// The dimensions of a [`matmul`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatmulDims {
    /// Batch elements (product of the leading dimensions of a).
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// b is 2-D and shared by every batch element.
    pub shared_b: bool,
    /// `[B.., M, N]`.
    pub out: Vec<usize>,
}

/// `matmul`: a `[B.., M, K]`, b `[B.., K, N]` (`[B.., N, K]` with `transpose_b`) or 2-D.
pub fn matmul(backend: &str, a: &[usize], b: &[usize], transpose_b: bool) -> Result<MatmulDims> {
    let (ar, br) = (a.len(), b.len());
    let bad = || fail(backend, format!("matmul: shapes {a:?} x {b:?} (transpose_b {transpose_b}) do not fit together"));
    if ar < 2 || br < 2 {
        return bad();
    }
    let (m, k) = (a[ar - 2], a[ar - 1]);
    let (bk, n) = if transpose_b { (b[br - 1], b[br - 2]) } else { (b[br - 2], b[br - 1]) };
    let shared_b = br == 2;
    if bk != k || (!shared_b && b[..br - 2] != a[..ar - 2]) {
        return bad();
    }
    let mut out = a[..ar - 2].to_vec();
    out.extend([m, n]);
    let batch = numel(backend, "matmul", &a[..ar - 2])?;
    numel(backend, "matmul", &out)?;
    Ok(MatmulDims { batch, m, k, n, shared_b, out })
}

/// `unary`: any shape.
/// `compressor_pool`: kv and score both `[W, L, c]`; the output shape `[W, c]`.
pub fn compressor_pool(backend: &str, kv: &[usize], score: &[usize]) -> Result<Vec<usize>> {
    if kv.len() != 3 || kv != score {
        return Err(Error::backend(
            backend,
            format!("compressor_pool: kv {kv:?} and score {score:?} are not both [W, L, c] of one shape"),
        ));
    }
    Ok(vec![kv[0], kv[2]])
}

pub fn unary(_backend: &str, x: &[usize]) -> Result<Vec<usize>> {
    Ok(x.to_vec())
}

/// `binary`: numpy broadcasting.
pub fn binary(backend: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    broadcast_shape(a, b)
        .ok_or_else(|| Error::backend(backend, format!("binary: shapes {a:?} and {b:?} do not broadcast")))
}

/// `affine`: any shape.
pub fn affine(_backend: &str, x: &[usize]) -> Result<Vec<usize>> {
    Ok(x.to_vec())
}

/// `clamp`: any shape.
pub fn clamp(_backend: &str, x: &[usize]) -> Result<Vec<usize>> {
    Ok(x.to_vec())
}

/// `reduce`: `axis` kept with size 1.
pub fn reduce(backend: &str, x: &[usize], axis: usize) -> Result<Vec<usize>> {
    axis_in(backend, "reduce", x, axis)?;
    let mut out = x.to_vec();
    out[axis] = 1;
    Ok(out)
}

/// `softmax`: over an existing axis.
pub fn softmax(backend: &str, x: &[usize], axis: usize) -> Result<Vec<usize>> {
    axis_in(backend, "softmax", x, axis)?;
    Ok(x.to_vec())
}

/// `rms_norm`: over the last axis of x; the weight has one value per channel.
pub fn rms_norm(backend: &str, x: &[usize], weight: Option<&[usize]>) -> Result<Vec<usize>> {
    non_scalar(backend, "rms_norm", "the input", x)?;
    let d = x[x.len() - 1];
    if let Some(w) = weight {
        if w.iter().product::<usize>() != d {
            return fail(backend, format!("rms_norm: weight {w:?} for input {x:?} (want [{d}])"));
        }
    }
    Ok(x.to_vec())
}

/// `rope`: x `[T, heads, d]`, cos and sin `[T, rd/2]` with `rd <= d`. Returns
/// `(T, heads, d, rd/2)` (the result has x's shape).
pub fn rope(backend: &str, x: &[usize], cos: &[usize], sin: &[usize]) -> Result<(usize, usize, usize, usize)> {
    crate::backend::rope_dims(x, cos, sin).ok_or_else(|| {
        Error::backend(
            backend,
            format!("rope: x {x:?}, cos {cos:?}, sin {sin:?} (want [T, heads, d], [T, r] twice, 2r <= d)"),
        )
    })
}

/// `reshape`: the same number of elements.
pub fn reshape(backend: &str, x: &[usize], shape: &[usize]) -> Result<Vec<usize>> {
    if numel(backend, "reshape", shape)? != numel(backend, "reshape", x)? {
        return fail(backend, format!("reshape: {x:?} to {shape:?} changes the number of elements"));
    }
    Ok(shape.to_vec())
}

/// `transpose`: two existing axes swapped.
pub fn transpose(backend: &str, x: &[usize], a: usize, b: usize) -> Result<Vec<usize>> {
    axis_in(backend, "transpose", x, a.max(b))?;
    let mut out = x.to_vec();
    out.swap(a, b);
    Ok(out)
}

/// `narrow`: `start..start + len` of an existing axis.
pub fn narrow(backend: &str, x: &[usize], axis: usize, start: usize, len: usize) -> Result<Vec<usize>> {
    axis_in(backend, "narrow", x, axis)?;
    if start.checked_add(len).is_none_or(|end| end > x[axis]) {
        return fail(backend, format!("narrow: {start}+{len} of axis {axis} in {x:?}"));
    }
    let mut out = x.to_vec();
    out[axis] = len;
    Ok(out)
}

/// `concat`: at least one tensor, equal ranks, equal sizes except along `axis`.
pub fn concat(backend: &str, xs: &[&[usize]], axis: usize) -> Result<Vec<usize>> {
    concat_shapes(backend, "concat", xs, axis)
}

/// `concat_index`: as [`concat`].
pub fn concat_index(backend: &str, xs: &[&[usize]], axis: usize) -> Result<Vec<usize>> {
    concat_shapes(backend, "concat_index", xs, axis)
}

fn concat_shapes(backend: &str, op: &str, xs: &[&[usize]], axis: usize) -> Result<Vec<usize>> {
    let Some(first) = xs.first() else { return fail(backend, format!("{op}: nothing to concatenate")) };
    axis_in(backend, op, first, axis)?;
    let mut out = first.to_vec();
    out[axis] = 0;
    for x in xs {
        if x.len() != first.len() || x.iter().zip(first.iter()).enumerate().any(|(a, (p, q))| a != axis && p != q) {
            return fail(backend, format!("{op} along axis {axis}: shapes {xs:?} do not match"));
        }
        out[axis] = out[axis]
            .checked_add(x[axis])
            .ok_or_else(|| Error::backend(backend, format!("{op}: shapes {xs:?} are too large")))?;
    }
    numel(backend, op, &out)?;
    Ok(out)
}

/// `index_select`: rows of x along axis 0, idx of any shape (`-1` gives zeros) →
/// `idx ++ x[1..]`.
pub fn index_select(backend: &str, x: &[usize], idx: &[usize], bounds: Option<IndexBounds>) -> Result<Vec<usize>> {
    non_scalar(backend, "index_select", "x", x)?;
    index_values(backend, "index_select", bounds, x[0], &format!("x {x:?}"), true)?;
    let mut out = idx.to_vec();
    out.extend_from_slice(&x[1..]);
    numel(backend, "index_select", &out)?;
    Ok(out)
}

/// `gather_last`: x `[.., N]`, idx `[.., k]` (the same leading dimensions), each in `0..N` →
/// idx's shape.
pub fn gather_last(backend: &str, x: &[usize], idx: &[usize], bounds: Option<IndexBounds>) -> Result<Vec<usize>> {
    non_scalar(backend, "gather_last", "x", x)?;
    non_scalar(backend, "gather_last", "idx", idx)?;
    if x[..x.len() - 1] != idx[..idx.len() - 1] {
        return fail(backend, format!("gather_last: x {x:?} and idx {idx:?} differ in their leading dimensions"));
    }
    index_values(backend, "gather_last", bounds, x[x.len() - 1], &format!("the last axis of x {x:?}"), false)?;
    Ok(idx.to_vec())
}

/// `index_add`: dst `[R, ..]`, idx with `n` entries in `0..R`, src `[n, ..]` (dst's trailing
/// dimensions) → dst's shape.
pub fn index_add(
    backend: &str,
    dst: &[usize],
    idx: &[usize],
    src: &[usize],
    bounds: Option<IndexBounds>,
) -> Result<Vec<usize>> {
    non_scalar(backend, "index_add", "dst", dst)?;
    non_scalar(backend, "index_add", "src", src)?;
    let n = numel(backend, "index_add", idx)?;
    if src[0] != n || src[1..] != dst[1..] {
        return fail(backend, format!("index_add: dst {dst:?}, idx {idx:?}, src {src:?} (want src [{n}, ..dst[1..]])"));
    }
    index_values(backend, "index_add", bounds, dst[0], &format!("dst {dst:?}"), false)?;
    Ok(dst.to_vec())
}

/// `topk`: `k` of the last axis's `N` entries → x's shape with N replaced by k.
pub fn topk(backend: &str, x: &[usize], k: usize) -> Result<Vec<usize>> {
    non_scalar(backend, "topk", "x", x)?;
    let n = x[x.len() - 1];
    if k > n {
        return fail(backend, format!("topk: k = {k} but x {x:?} has only {n} entries per row"));
    }
    let mut out = x.to_vec();
    *out.last_mut().expect("non-scalar") = k;
    Ok(out)
}

/// `index_mask`: any shape.
pub fn index_mask(_backend: &str, idx: &[usize]) -> Result<Vec<usize>> {
    Ok(idx.to_vec())
}

/// `offset_index`: every entry other than `-1` stays a valid (non-negative, representable)
/// index after adding `offset`, as far as the bounds tell.
pub fn offset_index(backend: &str, idx: &[usize], offset: i32, bounds: Option<IndexBounds>) -> Result<Vec<usize>> {
    if let Some(b) = bounds {
        if b.min < -1 {
            return fail(backend, format!("offset_index: index {} is negative (only -1 means no entry)", b.min));
        }
        if b.max >= 0 && b.max.checked_add(offset).is_none() {
            return fail(backend, format!("offset_index: index {} + {offset} overflows", b.max));
        }
        if b.min >= 0 && b.min.checked_add(offset).is_none_or(|v| v < 0) {
            return fail(backend, format!("offset_index: index {} + {offset} is negative", b.min));
        }
    }
    Ok(idx.to_vec())
}

// -------------------------------------------------------------------------- fused ops

/// `sparse_attention`: q `[T, H, d]`, a kv pool of `rows` rows of width d, idx `[T, K]` rows
/// of the pool (`-1` = none), sinks `[H]` → `[T, H, d]`.
pub fn sparse_attention(
    backend: &str,
    q: &[usize],
    pool_rows: usize,
    pool_width: usize,
    idx: &[usize],
    sinks: &[usize],
    bounds: Option<IndexBounds>,
) -> Result<Vec<usize>> {
    if q.len() != 3 || q[2] != pool_width || idx.len() != 2 || idx[0] != q[0] || sinks != [q[1]] {
        return fail(
            backend,
            format!(
                "sparse_attention: q {q:?}, kv pool width {pool_width}, idx {idx:?}, sinks {sinks:?} \
                 (want [T, H, d], width d, [T, K], [H])"
            ),
        );
    }
    index_values(backend, "sparse_attention", bounds, pool_rows, "the kv pool", true)?;
    Ok(q.to_vec())
}

/// `indexer_select`: q `[T, nI, dI]`, keys a pool of width dI with `key_rows` `[N]` rows of it,
/// weights `[T, nI]`, one validity range within `0..N` per query, `k <= N` → `[T, k]`.
#[allow(clippy::too_many_arguments)]
pub fn indexer_select(
    backend: &str,
    q: &[usize],
    pool_rows: usize,
    pool_width: usize,
    key_rows: &[usize],
    key_bounds: Option<IndexBounds>,
    weights: &[usize],
    valid: &[Range<usize>],
    k: usize,
) -> Result<Vec<usize>> {
    if q.len() != 3 || q[2] != pool_width || key_rows.len() != 1 || weights != [q[0], q[1]] {
        return fail(
            backend,
            format!(
                "indexer_select: q {q:?}, key pool width {pool_width}, key_rows {key_rows:?}, weights {weights:?} \
                 (want [T, nI, dI], width dI, [N], [T, nI])"
            ),
        );
    }
    let (t, n) = (q[0], key_rows[0]);
    if valid.len() != t {
        return fail(backend, format!("indexer_select: {} validity ranges for {t} queries", valid.len()));
    }
    if let Some(r) = valid.iter().find(|r| r.start > r.end || r.end > n) {
        return fail(backend, format!("indexer_select: validity range {r:?} is not within the {n} keys"));
    }
    if k > n {
        return fail(backend, format!("indexer_select: k = {k} but only {n} keys"));
    }
    index_values(backend, "indexer_select", key_bounds, pool_rows, "the key pool", false)?;
    Ok(vec![t, k])
}

/// `moe_route`: logits `[T, E]`, bias `[E]`, hash ids `[T, k]` (each in `0..E`), `k <= E` →
/// `[T, k]` (ids and weights).
pub fn moe_route(
    backend: &str,
    logits: &[usize],
    bias: Option<&[usize]>,
    hash_ids: Option<(&[usize], Option<IndexBounds>)>,
    k: usize,
) -> Result<Vec<usize>> {
    if logits.len() != 2 {
        return fail(backend, format!("moe_route: logits {logits:?} (want [T, E])"));
    }
    let (t, e) = (logits[0], logits[1]);
    if k > e {
        return fail(backend, format!("moe_route: k = {k} but only {e} experts"));
    }
    if let Some(b) = bias {
        if b != [e] {
            return fail(backend, format!("moe_route: bias {b:?} for logits {logits:?} (want [{e}])"));
        }
    }
    if let Some((ids, bounds)) = hash_ids {
        if ids != [t, k] {
            return fail(backend, format!("moe_route: hash ids {ids:?} for logits {logits:?} and k = {k}"));
        }
        index_values(backend, "moe_route", bounds, e, "the experts", false)?;
    }
    Ok(vec![t, k])
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "test";

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    fn b(values: &[i32]) -> Option<IndexBounds> {
        IndexBounds::of(values)
    }

    #[test]
    fn bounds_of_values() {
        assert_eq!(b(&[3, -1, 7, 0]), Some(IndexBounds { min: -1, max: 7 }));
        assert_eq!(b(&[]), None);
        assert_eq!(b(&[5]).unwrap().union(b(&[-1, 2]).unwrap()), IndexBounds { min: -1, max: 5 });
    }

    #[test]
    fn index_values_rules() {
        assert!(index_values(B, "op", b(&[0, 3]), 4, "x", false).is_ok());
        assert!(index_values(B, "op", b(&[-1, 3]), 4, "x", true).is_ok());
        assert!(index_values(B, "op", None, 0, "x", false).is_ok(), "unknown values are not checked");
        let e = msg(index_values(B, "op", b(&[0, 4]), 4, "x [4, 2]", true));
        assert!(e.contains("op") && e.contains("index 4") && e.contains("4 rows of x [4, 2]") && e.contains(B), "{e}");
        let e = msg(index_values(B, "op", b(&[-2, 1]), 4, "x", true));
        assert!(e.contains("index -2"), "{e}");
        let e = msg(index_values(B, "op", b(&[-1, 1]), 4, "x", false));
        assert!(e.contains("-1"), "{e}");
        // No rows: only -1 is possible.
        assert!(index_values(B, "op", b(&[-1]), 0, "x", true).is_ok());
        assert!(index_values(B, "op", b(&[0]), 0, "x", true).is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(upload(B, 6, &[2, 3]).unwrap(), vec![2, 3]);
        assert!(msg(upload(B, 5, &[2, 3])).contains("upload: 5 values for shape [2, 3]"));
        assert!(msg(upload_index(B, 5, &[2, 3])).contains("upload_index"));
        assert_eq!(upload(B, 1, &[]).unwrap(), Vec::<usize>::new());
        assert!(
            msg(upload(B, 0, &[usize::MAX, 2, 0, 3])).contains("upload"),
            "0 elements is fine only without overflow"
        );
        assert!(full(B, &[usize::MAX, 3]).is_err());
        assert!(full(B, &[0, 3]).is_ok());
    }

    #[test]
    fn pools() {
        assert_eq!(alloc_pool(B, 10, 4, RowFormat::F32).unwrap(), 160);
        assert_eq!(alloc_pool(B, 2, 512, RowFormat::Fp8 { rope: 64 }).unwrap(), 2 * 584);
        assert!(msg(alloc_pool(B, 2, 4, RowFormat::Fp8 { rope: 6 })).contains("alloc_pool"));
        assert!(alloc_pool(B, usize::MAX, 4, RowFormat::Bf16).is_err());
        assert!(alloc_pool(B, 2, usize::MAX, RowFormat::F32).is_err());

        assert!(pool_write(B, 8, 4, &[2], &[2, 4], b(&[0, 7])).is_ok());
        assert!(pool_write(B, 8, 4, &[0], &[0, 4], None).is_ok());
        for (slots, values) in [(&[2][..], &[2, 5][..]), (&[2], &[3, 4]), (&[2, 1], &[2, 4]), (&[4], &[4])] {
            let e = msg(pool_write(B, 8, 4, slots, values, None));
            assert!(e.contains("pool_write") && e.contains(&format!("{values:?}")), "{e}");
        }
        assert!(msg(pool_write(B, 8, 4, &[1], &[1, 4], b(&[8]))).contains("index 8"));
        assert!(msg(pool_write(B, 8, 4, &[1], &[1, 4], b(&[-1]))).contains("-1"));
        assert!(msg(pool_write(B, 8, 4, &[1], &[1, 4], b(&[-3]))).contains("-3"));

        assert_eq!(pool_read(B, 8, 4, &[2, 3], b(&[-1, 7])).unwrap(), vec![2, 3, 4]);
        assert_eq!(pool_read(B, 0, 4, &[0], None).unwrap(), vec![0, 4]);
        assert!(msg(pool_read(B, 8, 4, &[1], b(&[8]))).contains("pool_read: index 8 is outside the 8 rows"));
        assert!(pool_read(B, 8, 4, &[1], b(&[-2])).is_err());
    }

    #[test]
    fn linear_and_grouped_linear() {
        assert_eq!(linear(B, &[2, 3, 5], &[7, 5]).unwrap(), vec![2, 3, 7]);
        assert!(msg(linear(B, &[2, 4], &[7, 5])).contains("linear: input [2, 4] against weight [7, 5]"));
        assert!(linear(B, &[], &[7, 5]).is_err());

        assert_eq!(grouped_linear(B, &[3, 2, 4], &[6, 4], 2).unwrap(), vec![3, 2, 3]);
        let e = msg(grouped_linear(B, &[3, 0, 4], &[0, 4], 0));
        assert!(e.contains("grouped_linear") && e.contains("at least 1"), "{e}");
        assert!(msg(grouped_linear(B, &[1, 4, 4], &[6, 4], 4)).contains("6 weight rows do not split into 4 groups"));
        assert!(grouped_linear(B, &[1, 2, 4], &[6, 4], 4).is_err(), "groups != x.shape[1]");
        assert!(grouped_linear(B, &[1, 2, 3], &[6, 4], 2).is_err(), "K differs");
        assert!(grouped_linear(B, &[2, 4], &[6, 4], 2).is_err(), "2-D x");
    }

    #[test]
    fn embedding_ids() {
        assert_eq!(embedding(B, &[10, 6], &[2, 3], b(&[0, 9])).unwrap(), vec![2, 3, 6]);
        assert!(msg(embedding(B, &[10, 6], &[1], b(&[10]))).contains("embedding: index 10"));
        assert!(embedding(B, &[10, 6], &[1], b(&[-1])).is_err());
    }

    #[test]
    fn matmul_shapes() {
        let d = matmul(B, &[2, 3, 4, 5], &[2, 3, 5, 6], false).unwrap();
        assert_eq!((d.batch, d.m, d.k, d.n, d.shared_b, d.out.clone()), (6, 4, 5, 6, false, vec![2, 3, 4, 6]));
        let d = matmul(B, &[2, 4, 5], &[6, 5], true).unwrap();
        assert_eq!((d.batch, d.n, d.shared_b, d.out), (2, 6, true, vec![2, 4, 6]));
        assert!(msg(matmul(B, &[4, 5], &[5, 6], true)).contains("matmul: shapes [4, 5] x [5, 6] (transpose_b true)"));
        assert!(matmul(B, &[2, 4, 5], &[3, 5, 6], false).is_err(), "batch dims differ");
        assert!(matmul(B, &[2, 4, 5], &[1, 2, 5, 6], false).is_err(), "batch ranks differ");
        assert!(matmul(B, &[5], &[5, 6], false).is_err());
    }

    #[test]
    fn elementwise_and_reductions() {
        assert_eq!(binary(B, &[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(msg(binary(B, &[2, 3], &[4, 3])).contains("binary: shapes [2, 3] and [4, 3] do not broadcast"));
        assert_eq!(unary(B, &[2]).unwrap(), vec![2]);
        assert_eq!(affine(B, &[]).unwrap(), Vec::<usize>::new());
        assert_eq!(clamp(B, &[0, 3]).unwrap(), vec![0, 3]);
        assert_eq!(reduce(B, &[2, 3, 4], 1).unwrap(), vec![2, 1, 4]);
        assert!(msg(reduce(B, &[2, 3, 4], 3)).contains("reduce: axis 3 is out of range for shape [2, 3, 4]"));
        assert!(softmax(B, &[2], 1).is_err());
        assert_eq!(softmax(B, &[2, 5], 1).unwrap(), vec![2, 5]);
        assert_eq!(rms_norm(B, &[2, 5], Some(&[5])).unwrap(), vec![2, 5]);
        assert!(msg(rms_norm(B, &[2, 5], Some(&[3]))).contains("rms_norm: weight [3] for input [2, 5]"));
        assert!(rms_norm(B, &[], None).is_err());
        assert_eq!(rope(B, &[3, 2, 10], &[3, 3], &[3, 3]).unwrap(), (3, 2, 10, 3));
        assert!(msg(rope(B, &[3, 2, 10], &[3, 6], &[3, 6])).contains("rope: x [3, 2, 10]"));
        assert!(rope(B, &[3, 2, 10], &[3, 3], &[2, 3]).is_err());
    }

    #[test]
    fn layout() {
        assert_eq!(reshape(B, &[2, 3, 4], &[4, 6]).unwrap(), vec![4, 6]);
        assert!(msg(reshape(B, &[2, 3, 4], &[5, 5])).contains("reshape: [2, 3, 4] to [5, 5]"));
        assert_eq!(transpose(B, &[2, 3, 4], 2, 0).unwrap(), vec![4, 3, 2]);
        assert!(transpose(B, &[2, 3, 4], 0, 3).is_err());
        assert_eq!(narrow(B, &[2, 3, 4], 1, 1, 2).unwrap(), vec![2, 2, 4]);
        assert!(narrow(B, &[2, 3, 4], 1, 2, 2).is_err());
        assert!(narrow(B, &[2, 3, 4], 1, usize::MAX, 2).is_err(), "start + len overflows");
        assert!(narrow(B, &[2, 3, 4], 3, 0, 1).is_err());
        assert_eq!(concat(B, &[&[2, 1, 4], &[2, 2, 4]], 1).unwrap(), vec![2, 3, 4]);
        assert!(msg(concat(B, &[&[2, 1, 4], &[2, 2, 4]], 0)).contains("concat along axis 0"));
        assert!(concat(B, &[&[2, 1], &[2, 1, 1]], 1).is_err(), "ranks differ");
        assert!(msg(concat(B, &[], 0)).contains("nothing to concatenate"));
        assert!(concat(B, &[&[2]], 1).is_err());
        assert!(msg(concat_index(B, &[&[2, 3], &[2, 1]], 0)).contains("concat_index"));
    }

    #[test]
    fn gathers_and_scatters() {
        assert_eq!(index_select(B, &[4, 2, 3], &[2, 2], b(&[3, -1, 0, 3])).unwrap(), vec![2, 2, 2, 3]);
        for bad in [4, -2] {
            let e = msg(index_select(B, &[4, 2, 3], &[1], b(&[bad])));
            assert!(e.contains("index_select") && e.contains(&bad.to_string()), "{e}");
        }
        assert!(index_select(B, &[], &[1], None).is_err());
        assert_eq!(index_select(B, &[0, 3], &[2], b(&[-1, -1])).unwrap(), vec![2, 3]);

        assert_eq!(gather_last(B, &[2, 5], &[2, 3], b(&[4, 0])).unwrap(), vec![2, 3]);
        assert!(gather_last(B, &[2, 5], &[2, 1], b(&[5])).is_err());
        assert!(gather_last(B, &[2, 5], &[2, 1], b(&[-1])).is_err());
        assert!(msg(gather_last(B, &[2, 5], &[3, 1], None)).contains("leading dimensions"));
        assert!(gather_last(B, &[], &[1], None).is_err());
        assert!(gather_last(B, &[2], &[], None).is_err());

        assert_eq!(index_add(B, &[3, 2], &[4], &[4, 2], b(&[1, 0, 2])).unwrap(), vec![3, 2]);
        assert!(msg(index_add(B, &[3, 2], &[1], &[1, 2], b(&[3]))).contains("index_add: index 3"));
        assert!(index_add(B, &[3, 2], &[1], &[1, 2], b(&[-1])).is_err());
        assert!(index_add(B, &[3, 2], &[2], &[1, 2], None).is_err(), "idx and src rows differ");
        assert!(index_add(B, &[3, 2], &[1], &[1, 3], None).is_err(), "row widths differ");
        assert!(index_add(B, &[], &[1], &[1], None).is_err());
        assert!(index_add(B, &[1], &[1], &[], None).is_err());

        assert_eq!(topk(B, &[3, 7], 4).unwrap(), vec![3, 4]);
        assert!(msg(topk(B, &[3, 7], 8)).contains("topk: k = 8"));
        assert!(topk(B, &[], 0).is_err());
        assert_eq!(index_mask(B, &[2, 3]).unwrap(), vec![2, 3]);

        assert_eq!(offset_index(B, &[3], 10, b(&[0, -1, 5])).unwrap(), vec![3]);
        assert!(offset_index(B, &[1], 1, b(&[i32::MAX])).is_err());
        assert!(offset_index(B, &[1], -3, b(&[2])).is_err());
        assert!(offset_index(B, &[1], 0, b(&[-4])).is_err());
        assert!(offset_index(B, &[1], -3, None).is_ok());
    }

    #[test]
    fn fused() {
        assert_eq!(sparse_attention(B, &[5, 3, 6], 7, 6, &[5, 4], &[3], b(&[-1, 6])).unwrap(), vec![5, 3, 6]);
        assert!(msg(sparse_attention(B, &[5, 3, 6], 7, 6, &[5, 4], &[3], b(&[7]))).contains("index 7"));
        assert!(sparse_attention(B, &[5, 3, 6], 7, 6, &[5, 4], &[3], b(&[-2])).is_err());
        assert!(sparse_attention(B, &[5, 3, 6], 7, 5, &[5, 4], &[3], None).is_err(), "width");
        assert!(sparse_attention(B, &[5, 3, 6], 7, 6, &[4, 4], &[3], None).is_err(), "T");
        assert!(sparse_attention(B, &[5, 3, 6], 7, 6, &[5, 4], &[2], None).is_err(), "sinks");

        let v = [0..0, 0..3];
        assert_eq!(indexer_select(B, &[2, 2, 4], 9, 4, &[3], b(&[8, 0]), &[2, 2], &v, 2).unwrap(), vec![2, 2]);
        assert!(indexer_select(B, &[2, 2, 4], 9, 4, &[3], b(&[9]), &[2, 2], &v, 2).is_err());
        assert!(indexer_select(B, &[2, 2, 4], 9, 4, &[3], None, &[2, 2], &v[..1], 2).is_err());
        assert!(indexer_select(B, &[2, 2, 4], 9, 4, &[3], None, &[2, 2], &[0..4, 0..1], 2).is_err());
        assert!(indexer_select(B, &[2, 2, 4], 9, 4, &[3], None, &[2, 2], &v, 4).is_err());
        assert!(indexer_select(B, &[2, 2, 4], 9, 5, &[3], None, &[2, 2], &v, 2).is_err());

        assert_eq!(moe_route(B, &[3, 8], Some(&[8]), None, 2).unwrap(), vec![3, 2]);
        assert!(moe_route(B, &[3, 8], None, Some((&[3, 2], b(&[8]))), 2).is_err());
        assert!(moe_route(B, &[3, 8], Some(&[7]), None, 2).is_err());
        assert!(moe_route(B, &[3, 8], None, None, 9).is_err());
    }
}
