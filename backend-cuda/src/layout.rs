//! Layout: `reshape` and contiguous `narrow`s share the buffer (a byte offset); `transpose`,
//! other `narrow`s and `concat` go through one strided copy of 4-byte values,
//! `dsv4_copy_strided_u32` (kernels/layout.cu), which [`CudaBackend::copy_strided`] plans:
//! the index space is coalesced ([`coalesce`]) to as few dimensions as the operands' strides
//! allow, a plain device copy when that leaves one contiguous run, otherwise one launch over the
//! inner [`KERNEL_DIMS`] dimensions per index of any that remain ([`for_each_launch`]).
//!
//! The planning helpers are shared with `binary` (elementwise.rs), whose kernel indexes its
//! broadcast operands the same way.

use std::sync::Arc;

use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg};
use crate::memory::elementwise_launch;
use crate::tensor::CudaTensor;

/// Dimensions one launch of a strided kernel indexes (`DSV4_COPY_DIMS` in layout.cu,
/// `DSV4_BINARY_DIMS` in elementwise.cu).
pub(crate) const KERNEL_DIMS: usize = 6;

/// Row-major element strides of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

/// Element strides of a contiguous tensor of `shape` read through the (numpy) broadcast to
/// `out`, one per dimension of `out`: 0 along the dimensions `shape` lacks or has as 1.
/// `shape` must broadcast to `out` (`dsv4_core::backend_checks::binary`).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len()).map(|k| if k < lead || shape[k - lead] == 1 { 0 } else { own[k - lead] }).collect()
}

/// One dimension of a strided index space: its size and the element stride of each of `K`
/// operands along it.
pub(crate) type Dim<const K: usize> = (usize, [usize; K]);

/// The index space `dims` (row-major, with per-dimension operand `strides`) with dimensions of
/// size 1 dropped and neighbours merged wherever every operand steps through them as through one
/// dimension (outer stride = inner stride · inner size), outermost first. Walking the result in
/// row-major order visits the same operand offsets in the same order. Empty for a single
/// element. No dimension may be 0 (callers return early on empty tensors).
pub(crate) fn coalesce<const K: usize>(dims: &[usize], strides: &[[usize; K]]) -> Vec<Dim<K>> {
    let mut out: Vec<Dim<K>> = Vec::with_capacity(dims.len());
    for (&d, s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match out.last_mut() {
            Some((pd, ps)) if (0..K).all(|k| ps[k] == s[k] * d) => {
                *pd *= d;
                *ps = *s;
            }
            _ => out.push((d, *s)),
        }
    }
    out
}

/// Calls `f(offsets, inner)` once per launch of a strided kernel over `plan`: `inner` the last
/// (at most [`KERNEL_DIMS`]) dimensions, and `offsets` the element offsets of each operand at
/// one multi-index of the dimensions before them (row-major order; one call with zero offsets
/// when there are none).
pub(crate) fn for_each_launch<const K: usize>(
    plan: &[Dim<K>],
    mut f: impl FnMut([usize; K], &[Dim<K>]) -> Result<()>,
) -> Result<()> {
    let (outer, inner) = plan.split_at(plan.len().saturating_sub(KERNEL_DIMS));
    let count: usize = outer.iter().map(|d| d.0).product();
    for index in 0..count {
        let mut rest = index;
        let mut offsets = [0usize; K];
        for (d, s) in outer.iter().rev() {
            let c = rest % d;
            rest /= d;
            for k in 0..K {
                offsets[k] += c * s[k];
            }
        }
        f(offsets, inner)?;
    }
    Ok(())
}

/// The scalar arguments of a strided kernel for `inner` (at most [`KERNEL_DIMS`] dimensions):
/// element count, rank, then the sizes and each operand's strides in `operands` order, each
/// padded to [`KERNEL_DIMS`] (size 1, stride 0).
pub(crate) fn strided_args<'a, B, const K: usize>(inner: &[Dim<K>], operands: usize) -> Vec<KernelArg<'a, B>> {
    debug_assert!(inner.len() <= KERNEL_DIMS && operands <= K);
    let n: usize = inner.iter().map(|d| d.0).product();
    let mut args = vec![KernelArg::count(n), KernelArg::I32(inner.len() as i32)];
    args.extend((0..KERNEL_DIMS).map(|k| KernelArg::I64(inner.get(k).map_or(1, |d| d.0) as i64)));
    for op in 0..operands {
        args.extend((0..KERNEL_DIMS).map(|k| KernelArg::I64(inner.get(k).map_or(0, |d| d.1[op]) as i64)));
    }
    args
}

impl<D: Device> CudaBackend<D> {
    /// Copies the 4-byte values of the index space `dims` from `src` (byte offset `src_offset`,
    /// element strides `src_strides`) to `dst` (`dst_offset`, `dst_strides`): a device copy when
    /// both sides are one contiguous run, else `dsv4_copy_strided_u32`. For f32 and i32 alike.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_strided(
        &self,
        src: &D::Buffer,
        src_offset: usize,
        src_strides: &[usize],
        dst: &D::Buffer,
        dst_offset: usize,
        dst_strides: &[usize],
        dims: &[usize],
    ) -> Result<()> {
        let n: usize = dims.iter().product();
        if n == 0 {
            return Ok(());
        }
        let per_dim: Vec<[usize; 2]> = src_strides.iter().zip(dst_strides).map(|(&s, &d)| [s, d]).collect();
        let plan = coalesce(dims, &per_dim);
        if plan.is_empty() || (plan.len() == 1 && plan[0].1 == [1, 1]) {
            return self.dev.copy(src, src_offset, dst, dst_offset, n * 4);
        }
        for_each_launch(&plan, |offsets, inner| {
            let mut args =
                vec![KernelArg::In(src, src_offset + 4 * offsets[0]), KernelArg::Out(dst, dst_offset + 4 * offsets[1])];
            args.extend(strided_args(inner, 2));
            let count: usize = inner.iter().map(|d| d.0).product();
            self.dev.launch("dsv4_copy_strided_u32", elementwise_launch(count), &args)
        })
    }

    pub(crate) fn reshape_op(&self, x: &CudaTensor<D>, shape: &[usize]) -> Result<CudaTensor<D>> {
        let shape = checks::reshape(Self::NAME, &x.shape, shape)?;
        Ok(CudaTensor { buf: Arc::clone(&x.buf), offset: x.offset, shape })
    }

    pub(crate) fn transpose_op(&self, x: &CudaTensor<D>, a: usize, b: usize) -> Result<CudaTensor<D>> {
        let shape = checks::transpose(Self::NAME, &x.shape, a, b)?;
        let out = self.new_tensor(&shape)?;
        let mut src_strides = contiguous_strides(&x.shape);
        src_strides.swap(a, b);
        self.copy_strided(&x.buf, x.offset, &src_strides, &out.buf, 0, &contiguous_strides(&shape), &shape)?;
        Ok(out)
    }

    /// Shares the buffer when the part is contiguous in x (axis 0, or every axis before `axis`
    /// of size 1); copies otherwise.
    pub(crate) fn narrow_op(&self, x: &CudaTensor<D>, axis: usize, start: usize, len: usize) -> Result<CudaTensor<D>> {
        let shape = checks::narrow(Self::NAME, &x.shape, axis, start, len)?;
        let strides = contiguous_strides(&x.shape);
        let src_offset = x.offset + 4 * start * strides[axis];
        if x.shape[..axis].iter().all(|&d| d == 1) {
            return Ok(CudaTensor { buf: Arc::clone(&x.buf), offset: src_offset, shape });
        }
        let out = self.new_tensor(&shape)?;
        self.copy_strided(&x.buf, src_offset, &strides, &out.buf, 0, &contiguous_strides(&shape), &shape)?;
        Ok(out)
    }

    pub(crate) fn concat_op(&self, xs: &[&CudaTensor<D>], axis: usize) -> Result<CudaTensor<D>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
        let shape = checks::concat(Self::NAME, &shapes, axis)?;
        let out = self.new_tensor(&shape)?;
        let out_strides = contiguous_strides(&shape);
        let mut at = 0;
        for x in xs {
            let dst_offset = 4 * at * out_strides[axis];
            self.copy_strided(
                &x.buf,
                x.offset,
                &contiguous_strides(&x.shape),
                &out.buf,
                dst_offset,
                &out_strides,
                &x.shape,
            )?;
            at += x.shape[axis];
        }
        Ok(out)
    }
}

/// The value of `#define NAME value` in a kernel source, for the tests that keep the host's
/// constants and the kernels' in step.
#[cfg(test)]
pub(crate) fn kernel_define(text: &str, name: &str) -> Option<i64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("#define") && words.next() == Some(name)).then(|| words.next()?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_of_contiguous_and_broadcast_shapes() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
        assert_eq!(contiguous_strides(&[5]), vec![1]);
        assert_eq!(broadcast_strides(&[2, 3, 4], &[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), vec![0, 1, 0]);
        assert_eq!(broadcast_strides(&[4], &[2, 3, 4]), vec![0, 0, 1]);
        assert_eq!(broadcast_strides(&[1, 3, 1], &[2, 3, 5]), vec![0, 1, 0]);
        assert_eq!(broadcast_strides(&[2, 1, 5], &[2, 3, 5]), vec![5, 0, 1]);
        assert_eq!(broadcast_strides(&[], &[2, 3]), vec![0, 0]);
        assert_eq!(broadcast_strides(&[1], &[2, 3, 1]), vec![0, 0, 0]);
    }

    #[test]
    fn coalesce_merges_runs_and_drops_ones() {
        // Same shape, contiguous: one run.
        assert_eq!(coalesce(&[2, 3, 4], &[[12, 12], [4, 4], [1, 1]]), vec![(24, [1, 1])]);
        // A scalar broadcast against a contiguous operand: one run, stride 0.
        assert_eq!(coalesce(&[2, 3, 4], &[[12, 0], [4, 0], [1, 0]]), vec![(24, [1, 0])]);
        // [2, 1, 4] + [3, 1] → [2, 3, 4]: nothing merges.
        assert_eq!(coalesce(&[2, 3, 4], &[[4, 0], [0, 1], [1, 0]]), vec![(2, [4, 0]), (3, [0, 1]), (4, [1, 0])]);
        // [4] + [2, 3, 4]: the two outer dimensions merge for both.
        assert_eq!(coalesce(&[2, 3, 4], &[[0, 12], [0, 4], [1, 1]]), vec![(6, [0, 4]), (4, [1, 1])]);
        // Size-1 dimensions vanish, whatever their strides; a single element is no dimension.
        assert_eq!(coalesce(&[1, 5, 1], &[[9, 9], [1, 2], [7, 7]]), vec![(5, [1, 2])]);
        assert_eq!(coalesce::<2>(&[1, 1], &[[3, 3], [1, 1]]), vec![]);
        assert_eq!(coalesce::<2>(&[], &[]), vec![]);
        // A transpose of [2, 3, 4] (axes 0 and 2): src strides [1, 4, 12], dst [6, 2, 1].
        assert_eq!(coalesce(&[4, 3, 2], &[[1, 6], [4, 2], [12, 1]]), vec![(4, [1, 6]), (3, [4, 2]), (2, [12, 1])]);
        // A narrow of axis 1 of [2, 3, 4] to 2: rows of 8 at stride 12.
        assert_eq!(coalesce(&[2, 2, 4], &[[12, 8], [4, 4], [1, 1]]), vec![(2, [12, 8]), (8, [1, 1])]);
        // A concat part [2, 1, 4] into [2, 3, 4]: rows of 4 at stride 12.
        assert_eq!(coalesce(&[2, 1, 4], &[[4, 12], [4, 4], [1, 1]]), vec![(2, [4, 12]), (4, [1, 1])]);
    }

    #[test]
    fn launches_split_off_dimensions_beyond_the_kernels() {
        // Eight alternating dimensions: the outer two are walked on the host.
        let plan: Vec<Dim<2>> = (0..8).map(|k| (2, if k % 2 == 0 { [1 << k, 0] } else { [0, 1 << k] })).collect();
        let mut calls = vec![];
        for_each_launch(&plan, |offsets, inner| {
            assert_eq!(inner, &plan[2..]);
            calls.push(offsets);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, vec![[0, 0], [0, 2], [1, 0], [1, 2]]);
        // Small plans: one launch, no offsets.
        let mut n = 0;
        for_each_launch::<2>(&[(5, [1, 1])], |offsets, inner| {
            assert_eq!((offsets, inner.len()), ([0, 0], 1));
            n += 1;
            Ok(())
        })
        .unwrap();
        for_each_launch::<2>(&[], |_, inner| {
            assert!(inner.is_empty());
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn strided_args_are_padded_to_the_kernel_dimensions() {
        struct Buf;
        let args = strided_args::<Buf, 3>(&[(3, [4, 0, 9]), (4, [1, 1, 1])], 2);
        let scalars: Vec<i64> = args
            .iter()
            .map(|a| match a {
                KernelArg::I64(v) => *v,
                KernelArg::I32(v) => *v as i64,
                _ => panic!("a buffer among the scalars"),
            })
            .collect();
        assert_eq!(scalars, vec![12, 2, 3, 4, 1, 1, 1, 1, 4, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn kernel_dims_match_the_kernels() {
        let source = |file: &str| crate::kernels::SOURCES.iter().find(|s| s.file == file).unwrap().text;
        assert_eq!(kernel_define(source("layout.cu"), "DSV4_COPY_DIMS"), Some(KERNEL_DIMS as i64));
        assert_eq!(kernel_define(source("elementwise.cu"), "DSV4_BINARY_DIMS"), Some(KERNEL_DIMS as i64));
        assert_eq!(kernel_define("#define A 3\n#define AB 4", "AB"), Some(4));
        assert_eq!(kernel_define("// #define A 3", "A"), None);
    }
}
