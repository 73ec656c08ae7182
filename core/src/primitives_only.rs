//! `PrimitivesOnly<B>`: a backend that forwards every primitive to `B` but none of the fused
//! ops, so the trait's default compositions run. Running the fixtures through it checks those
//! defaults (which a new backend inherits) and, against `B` itself, B's fused overrides.

use crate::backend::{Backend, BinaryOp, ReduceOp, RowFormat, UnaryOp};
use crate::error::Result;
use crate::tensor::StoredWeight;

pub struct PrimitivesOnly<B: Backend>(pub B);

impl<B: Backend> Backend for PrimitivesOnly<B> {
    type Tensor = B::Tensor;
    type Index = B::Index;
    type Weight = B::Weight;
    type Pool = B::Pool;

    fn name(&self) -> &str {
        self.0.name()
    }
    fn free_memory(&self) -> Option<usize> {
        self.0.free_memory()
    }
    fn describe(&self) -> String {
        format!("{} (fused ops from the trait's default compositions)", self.0.describe())
    }
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.0.upload(data, shape)
    }
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.0.download(t)
    }
    fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<Self::Index> {
        self.0.upload_index(data, shape)
    }
    fn download_index(&self, t: &Self::Index) -> Result<Vec<i32>> {
        self.0.download_index(t)
    }
    fn upload_weight(&self, w: &StoredWeight) -> Result<Self::Weight> {
        self.0.upload_weight(w)
    }
    fn weight_shape<'w>(&self, w: &'w Self::Weight) -> &'w [usize] {
        self.0.weight_shape(w)
    }
    fn synchronize(&self) -> Result<()> {
        self.0.synchronize()
    }
    fn full(&self, shape: &[usize], value: f32) -> Result<Self::Tensor> {
        self.0.full(shape, value)
    }
    fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<Self::Pool> {
        self.0.alloc_pool(rows, width, format)
    }
    fn pool_write(&self, pool: &mut Self::Pool, slots: &Self::Index, values: &Self::Tensor) -> Result<()> {
        self.0.pool_write(pool, slots, values)
    }
    fn pool_read(&self, pool: &Self::Pool, slots: &Self::Index) -> Result<Self::Tensor> {
        self.0.pool_read(pool, slots)
    }
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor> {
        self.0.linear(x, w)
    }
    fn grouped_linear(&self, x: &Self::Tensor, w: &Self::Weight, groups: usize) -> Result<Self::Tensor> {
        self.0.grouped_linear(x, w, groups)
    }
    fn embedding(&self, table: &Self::Weight, ids: &Self::Index) -> Result<Self::Tensor> {
        self.0.embedding(table, ids)
    }
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, transpose_b: bool) -> Result<Self::Tensor> {
        self.0.matmul(a, b, transpose_b)
    }
    fn unary(&self, x: &Self::Tensor, op: UnaryOp) -> Result<Self::Tensor> {
        self.0.unary(x, op)
    }
    fn binary(&self, a: &Self::Tensor, b: &Self::Tensor, op: BinaryOp) -> Result<Self::Tensor> {
        self.0.binary(a, b, op)
    }
    fn affine(&self, x: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor> {
        self.0.affine(x, mul, add)
    }
    fn clamp(&self, x: &Self::Tensor, min: f32, max: f32) -> Result<Self::Tensor> {
        self.0.clamp(x, min, max)
    }
    fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.0.round_to_bf16(x)
    }
    fn reduce(&self, x: &Self::Tensor, axis: usize, op: ReduceOp) -> Result<Self::Tensor> {
        self.0.reduce(x, axis, op)
    }
    fn softmax(&self, x: &Self::Tensor, axis: usize) -> Result<Self::Tensor> {
        self.0.softmax(x, axis)
    }
    fn rms_norm(&self, x: &Self::Tensor, weight: Option<&Self::Tensor>, eps: f32) -> Result<Self::Tensor> {
        self.0.rms_norm(x, weight, eps)
    }
    fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, inverse: bool) -> Result<Self::Tensor> {
        self.0.rope(x, cos, sin, inverse)
    }
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.0.reshape(x, shape)
    }
    fn transpose(&self, x: &Self::Tensor, a: usize, b: usize) -> Result<Self::Tensor> {
        self.0.transpose(x, a, b)
    }
    fn narrow(&self, x: &Self::Tensor, axis: usize, start: usize, len: usize) -> Result<Self::Tensor> {
        self.0.narrow(x, axis, start, len)
    }
    fn concat(&self, xs: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor> {
        self.0.concat(xs, axis)
    }
    fn index_select(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor> {
        self.0.index_select(x, idx)
    }
    fn gather_last(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor> {
        self.0.gather_last(x, idx)
    }
    fn index_add(&self, dst: &Self::Tensor, idx: &Self::Index, src: &Self::Tensor) -> Result<Self::Tensor> {
        self.0.index_add(dst, idx, src)
    }
    fn topk(&self, x: &Self::Tensor, k: usize) -> Result<(Self::Tensor, Self::Index)> {
        self.0.topk(x, k)
    }
    fn index_mask(&self, idx: &Self::Index) -> Result<Self::Tensor> {
        self.0.index_mask(idx)
    }
    fn concat_index(&self, xs: &[&Self::Index], axis: usize) -> Result<Self::Index> {
        self.0.concat_index(xs, axis)
    }
    fn offset_index(&self, idx: &Self::Index, offset: i32) -> Result<Self::Index> {
        self.0.offset_index(idx, offset)
    }
}
