//! Reductions, softmax and RMSNorm (kernels/reduce.cu). The tensor is viewed as
//! `[outer, n, inner]` around the axis ([`axis_view`]); when `inner` is 1 the rows are
//! contiguous and one block reduces each row ([`row_launch`]), otherwise one thread walks each
//! `(outer, inner)` lane. Sums accumulate in f32 in an order fixed by the shape, so results are
//! deterministic.

use dsv4_core::backend::ReduceOp;
use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::memory::elementwise_launch;
use crate::tensor::CudaTensor;

/// Most threads per block of the row kernels.
const ROW_THREADS: usize = 256;

/// Most blocks of a row-kernel launch (the kernels loop over further rows).
const ROW_BLOCKS: usize = 65_535;

/// `shape` around `axis` as `[outer, n, inner]`: the products of the dimensions before it, the
/// axis itself and the dimensions after it. `axis` must be a dimension of `shape`.
pub(crate) fn axis_view(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Threads per block for rows of `n` values: enough warps to give every thread a value, at
/// least one warp and at most [`ROW_THREADS`] (a multiple of 32, as `dsv4_block_sum` needs).
pub(crate) fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, ROW_THREADS) as u32
}

/// One block per row of `n` values (at most [`ROW_BLOCKS`] blocks, at least one).
pub(crate) fn row_launch(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.clamp(1, ROW_BLOCKS) as u32, row_threads(n))
}

/// `DSV4_REDUCE_*` of reduce.cu.
fn reduce_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 1,
        ReduceOp::Mean => 2,
    }
}

impl<D: Device> CudaBackend<D> {
    pub(crate) fn reduce_op(&self, x: &CudaTensor<D>, axis: usize, op: ReduceOp) -> Result<CudaTensor<D>> {
        let shape = checks::reduce(Self::NAME, &x.shape, axis)?;
        let out = self.new_tensor(&shape)?;
        let (outer, n, inner) = axis_view(&x.shape, axis);
        if outer * inner == 0 {
            return Ok(out);
        }
        let (xa, oa, code) = (KernelArg::In(&*x.buf, x.offset), KernelArg::Out(&*out.buf, 0), reduce_code(op));
        if inner == 1 {
            let args = [xa, oa, KernelArg::count(outer), KernelArg::count(n), KernelArg::I32(code)];
            self.dev.launch("dsv4_reduce_rows_f32", row_launch(outer, n), &args)?;
        } else {
            let (o, l, i) = (KernelArg::count(outer), KernelArg::count(n), KernelArg::count(inner));
            let args = [xa, oa, o, l, i, KernelArg::I32(code)];
            self.dev.launch("dsv4_reduce_cols_f32", elementwise_launch(outer * inner), &args)?;
        }
        Ok(out)
    }

    pub(crate) fn softmax_op(&self, x: &CudaTensor<D>, axis: usize) -> Result<CudaTensor<D>> {
        let shape = checks::softmax(Self::NAME, &x.shape, axis)?;
        let out = self.new_tensor(&shape)?;
        let (outer, n, inner) = axis_view(&x.shape, axis);
        if outer * n * inner == 0 {
            return Ok(out);
        }
        let (xa, oa) = (KernelArg::In(&*x.buf, x.offset), KernelArg::Out(&*out.buf, 0));
        if inner == 1 {
            let args = [xa, oa, KernelArg::count(outer), KernelArg::count(n)];
            self.dev.launch("dsv4_softmax_rows_f32", row_launch(outer, n), &args)?;
        } else {
            let args = [xa, oa, KernelArg::count(outer), KernelArg::count(n), KernelArg::count(inner)];
            self.dev.launch("dsv4_softmax_cols_f32", elementwise_launch(outer * inner), &args)?;
        }
        Ok(out)
    }

    pub(crate) fn rms_norm_op(
        &self,
        x: &CudaTensor<D>,
        weight: Option<&CudaTensor<D>>,
        eps: f32,
    ) -> Result<CudaTensor<D>> {
        let shape = checks::rms_norm(Self::NAME, &x.shape, weight.map(|w| &w.shape[..]))?;
        let out = self.new_tensor(&shape)?;
        let d = shape[shape.len() - 1];
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Ok(out);
        }
        let rows = numel / d;
        // Without a weight the kernel is told so and never reads its `w` (x stands in for it).
        let w = weight.unwrap_or(x);
        let args = [
            KernelArg::In(&*x.buf, x.offset),
            KernelArg::In(&*w.buf, w.offset),
            KernelArg::Out(&*out.buf, 0),
            KernelArg::count(rows),
            KernelArg::count(d),
            KernelArg::F32(eps),
            KernelArg::I32(weight.is_some() as i32),
        ];
        self.dev.launch("dsv4_rms_norm_f32", row_launch(rows, d), &args)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::kernel_define;

    const SOURCE: &str = include_str!("../kernels/reduce.cu");

    #[test]
    fn views_around_an_axis() {
        assert_eq!(axis_view(&[2, 3, 4], 0), (1, 2, 12));
        assert_eq!(axis_view(&[2, 3, 4], 1), (2, 3, 4));
        assert_eq!(axis_view(&[2, 3, 4], 2), (6, 4, 1));
        assert_eq!(axis_view(&[5], 0), (1, 5, 1));
        assert_eq!(axis_view(&[2, 0, 3], 2), (0, 3, 1));
        assert_eq!(axis_view(&[2, 0, 3], 1), (2, 0, 3));
    }

    #[test]
    fn row_launches_use_whole_warps_and_bounded_grids() {
        assert_eq!(row_threads(0), 32);
        assert_eq!(row_threads(7), 32);
        assert_eq!(row_threads(33), 64);
        assert_eq!(row_threads(96), 96);
        assert_eq!(row_threads(7168), 256);
        for n in 0..600 {
            let t = row_threads(n);
            assert!(t.is_multiple_of(32) && (32..=256).contains(&t), "{n}: {t}");
        }
        assert_eq!(row_launch(6, 4), LaunchConfig::linear(6, 32));
        assert_eq!(row_launch(0, 4).grid, (1, 1, 1));
        assert_eq!(row_launch(1 << 40, 4096), LaunchConfig::linear(ROW_BLOCKS as u32, 256));
    }

    #[test]
    fn operation_codes_match_the_kernels() {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
            let name = format!("DSV4_REDUCE_{}", format!("{op:?}").to_uppercase());
            assert_eq!(kernel_define(SOURCE, &name), Some(reduce_code(op) as i64), "{name}");
        }
        let names = crate::kernels::kernel_names(SOURCE);
        for k in [
            "dsv4_reduce_rows_f32",
            "dsv4_reduce_cols_f32",
            "dsv4_softmax_rows_f32",
            "dsv4_softmax_cols_f32",
            "dsv4_rms_norm_f32",
        ] {
            assert!(names.contains(&k), "{k} missing from reduce.cu");
        }
    }
}
