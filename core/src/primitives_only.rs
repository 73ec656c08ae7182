//! `PrimitivesOnly<B>`: a backend that forwards every primitive to `B` but none of the fused
//! ops, so the trait's default compositions run. Running the fixtures through it checks those
//! defaults (which a new backend inherits) and, against `B` itself, B's fused overrides.

use crate::backend::Backend;
use crate::error::Result;

pub struct PrimitivesOnly<B: Backend>(pub B);

/// The body of a `Backend` impl for a wrapper `W<$B>` that forwards to its field `$f`: the
/// associated types and every required method except `describe` and `round_to_bf16`, which the
/// wrapper writes itself; fused ops are not forwarded, so the trait's default compositions run.
/// Used by [`PrimitivesOnly`] and by the test crate's `Recording`.
#[macro_export]
macro_rules! forward_primitives {
    ($B:ident, $f:tt) => {
        type Tensor = $B::Tensor;
        type Index = $B::Index;
        type Weight = $B::Weight;
        type Pool = $B::Pool;

        fn name(&self) -> &str {
            self.$f.name()
        }
        fn free_memory(&self) -> Option<usize> {
            self.$f.free_memory()
        }
        fn supports_row_format(&self, format: $crate::backend::RowFormat) -> bool {
            self.$f.supports_row_format(format)
        }
        fn upload(&self, data: &[f32], shape: &[usize]) -> $crate::error::Result<Self::Tensor> {
            self.$f.upload(data, shape)
        }
        fn download(&self, t: &Self::Tensor) -> $crate::error::Result<Vec<f32>> {
            self.$f.download(t)
        }
        fn upload_index(&self, data: &[i32], shape: &[usize]) -> $crate::error::Result<Self::Index> {
            self.$f.upload_index(data, shape)
        }
        fn download_index(&self, t: &Self::Index) -> $crate::error::Result<Vec<i32>> {
            self.$f.download_index(t)
        }
        fn upload_weight(&self, w: &$crate::tensor::StoredWeight) -> $crate::error::Result<Self::Weight> {
            self.$f.upload_weight(w)
        }
        fn weight_shape<'w>(&self, w: &'w Self::Weight) -> &'w [usize] {
            self.$f.weight_shape(w)
        }
        fn synchronize(&self) -> $crate::error::Result<()> {
            self.$f.synchronize()
        }
        fn full(&self, shape: &[usize], value: f32) -> $crate::error::Result<Self::Tensor> {
            self.$f.full(shape, value)
        }
        fn alloc_pool(
            &self,
            rows: usize,
            width: usize,
            format: $crate::backend::RowFormat,
        ) -> $crate::error::Result<Self::Pool> {
            self.$f.alloc_pool(rows, width, format)
        }
        fn pool_write(
            &self,
            pool: &mut Self::Pool,
            slots: &Self::Index,
            values: &Self::Tensor,
        ) -> $crate::error::Result<()> {
            self.$f.pool_write(pool, slots, values)
        }
        fn pool_read(&self, pool: &Self::Pool, slots: &Self::Index) -> $crate::error::Result<Self::Tensor> {
            self.$f.pool_read(pool, slots)
        }
        fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> $crate::error::Result<Self::Tensor> {
            self.$f.linear(x, w)
        }
        fn grouped_linear(
            &self,
            x: &Self::Tensor,
            w: &Self::Weight,
            groups: usize,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.grouped_linear(x, w, groups)
        }
        fn embedding(&self, table: &Self::Weight, ids: &Self::Index) -> $crate::error::Result<Self::Tensor> {
            self.$f.embedding(table, ids)
        }
        fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, transpose_b: bool) -> $crate::error::Result<Self::Tensor> {
            self.$f.matmul(a, b, transpose_b)
        }
        fn unary(&self, x: &Self::Tensor, op: $crate::backend::UnaryOp) -> $crate::error::Result<Self::Tensor> {
            self.$f.unary(x, op)
        }
        fn binary(
            &self,
            a: &Self::Tensor,
            b: &Self::Tensor,
            op: $crate::backend::BinaryOp,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.binary(a, b, op)
        }
        fn affine(&self, x: &Self::Tensor, mul: f32, add: f32) -> $crate::error::Result<Self::Tensor> {
            self.$f.affine(x, mul, add)
        }
        fn clamp(&self, x: &Self::Tensor, min: f32, max: f32) -> $crate::error::Result<Self::Tensor> {
            self.$f.clamp(x, min, max)
        }
        fn reduce(
            &self,
            x: &Self::Tensor,
            axis: usize,
            op: $crate::backend::ReduceOp,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.reduce(x, axis, op)
        }
        fn softmax(&self, x: &Self::Tensor, axis: usize) -> $crate::error::Result<Self::Tensor> {
            self.$f.softmax(x, axis)
        }
        fn rms_norm(
            &self,
            x: &Self::Tensor,
            weight: Option<&Self::Tensor>,
            eps: f32,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.rms_norm(x, weight, eps)
        }
        fn rope(
            &self,
            x: &Self::Tensor,
            cos: &Self::Tensor,
            sin: &Self::Tensor,
            inverse: bool,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.rope(x, cos, sin, inverse)
        }
        fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> $crate::error::Result<Self::Tensor> {
            self.$f.reshape(x, shape)
        }
        fn transpose(&self, x: &Self::Tensor, a: usize, b: usize) -> $crate::error::Result<Self::Tensor> {
            self.$f.transpose(x, a, b)
        }
        fn narrow(
            &self,
            x: &Self::Tensor,
            axis: usize,
            start: usize,
            len: usize,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.narrow(x, axis, start, len)
        }
        fn concat(&self, xs: &[&Self::Tensor], axis: usize) -> $crate::error::Result<Self::Tensor> {
            self.$f.concat(xs, axis)
        }
        fn index_select(&self, x: &Self::Tensor, idx: &Self::Index) -> $crate::error::Result<Self::Tensor> {
            self.$f.index_select(x, idx)
        }
        fn gather_last(&self, x: &Self::Tensor, idx: &Self::Index) -> $crate::error::Result<Self::Tensor> {
            self.$f.gather_last(x, idx)
        }
        fn index_add(
            &self,
            dst: &Self::Tensor,
            idx: &Self::Index,
            src: &Self::Tensor,
        ) -> $crate::error::Result<Self::Tensor> {
            self.$f.index_add(dst, idx, src)
        }
        fn topk(&self, x: &Self::Tensor, k: usize) -> $crate::error::Result<(Self::Tensor, Self::Index)> {
            self.$f.topk(x, k)
        }
        fn index_mask(&self, idx: &Self::Index) -> $crate::error::Result<Self::Tensor> {
            self.$f.index_mask(idx)
        }
        fn concat_index(&self, xs: &[&Self::Index], axis: usize) -> $crate::error::Result<Self::Index> {
            self.$f.concat_index(xs, axis)
        }
        fn offset_index(&self, idx: &Self::Index, offset: i32) -> $crate::error::Result<Self::Index> {
            self.$f.offset_index(idx, offset)
        }
    };
}

impl<B: Backend> Backend for PrimitivesOnly<B> {
    crate::forward_primitives!(B, 0);

    fn describe(&self) -> String {
        format!("{} (fused ops from the trait's default compositions)", self.0.describe())
    }
    fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.0.round_to_bf16(x)
    }
}
