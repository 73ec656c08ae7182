//! `dsv4_core::Backend` for CUDA over any [`Device`]: shape checks from
//! `dsv4_core::backend_checks`, then one kernel launch (or GEMM) per primitive. The operations
//! themselves live in one module per family (`memory`, `elementwise`, `reduce`, `layout`,
//! `index`, `pool`, `weights`); this file only routes the trait's methods to them.

use dsv4_core::backend::{Backend, BinaryOp, ReduceOp, RowFormat, UnaryOp};
use dsv4_core::error::Result;
use dsv4_core::tensor::StoredWeight;

use crate::device::Device;
use crate::tensor::{CudaIndex, CudaPool, CudaTensor, CudaWeight};

/// The CUDA backend on one device.
pub struct CudaBackend<D: Device> {
    pub(crate) dev: D,
}

impl<D: Device> CudaBackend<D> {
    pub fn new(dev: D) -> Self {
        CudaBackend { dev }
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &D {
        &self.dev
    }

    pub(crate) const NAME: &'static str = "cuda";
}

impl<D: Device> Backend for CudaBackend<D> {
    type Tensor = CudaTensor<D>;
    type Index = CudaIndex<D>;
    type Weight = CudaWeight<D>;
    type Pool = CudaPool<D>;

    fn name(&self) -> &str {
        Self::NAME
    }

    fn describe(&self) -> String {
        self.dev.describe()
    }

    fn supports_row_format(&self, format: RowFormat) -> bool {
        self.pool_supports(format)
    }

    fn free_memory(&self) -> Option<usize> {
        self.dev.free_memory()
    }

    // ---------------------------------------------------------------- memory (memory.rs)

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor<D>> {
        self.upload_f32(data, shape)
    }
    fn download(&self, t: &CudaTensor<D>) -> Result<Vec<f32>> {
        self.download_f32(t)
    }
    fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<CudaIndex<D>> {
        self.upload_i32(data, shape)
    }
    fn download_index(&self, t: &CudaIndex<D>) -> Result<Vec<i32>> {
        self.download_i32(t)
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }
    fn full(&self, shape: &[usize], value: f32) -> Result<CudaTensor<D>> {
        self.fill(shape, value)
    }

    // ---------------------------------------------------------------- weights (weights.rs)

    fn upload_weight(&self, w: &StoredWeight) -> Result<CudaWeight<D>> {
        self.upload_stored(w)
    }
    fn weight_shape<'w>(&self, w: &'w CudaWeight<D>) -> &'w [usize] {
        &w.shape
    }
    fn linear(&self, x: &CudaTensor<D>, w: &CudaWeight<D>) -> Result<CudaTensor<D>> {
        self.linear_op(x, w)
    }
    fn grouped_linear(&self, x: &CudaTensor<D>, w: &CudaWeight<D>, groups: usize) -> Result<CudaTensor<D>> {
        self.grouped_linear_op(x, w, groups)
    }
    fn embedding(&self, table: &CudaWeight<D>, ids: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        self.embedding_op(table, ids)
    }
    fn matmul(&self, a: &CudaTensor<D>, b: &CudaTensor<D>, transpose_b: bool) -> Result<CudaTensor<D>> {
        self.matmul_op(a, b, transpose_b)
    }

    // ---------------------------------------------------------------- pools (pool.rs)

    fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<CudaPool<D>> {
        self.alloc_pool_op(rows, width, format)
    }
    fn pool_write(&self, pool: &mut CudaPool<D>, slots: &CudaIndex<D>, values: &CudaTensor<D>) -> Result<()> {
        self.pool_write_op(pool, slots, values)
    }
    fn pool_read(&self, pool: &CudaPool<D>, slots: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        self.pool_read_op(pool, slots)
    }

    // ---------------------------------------------------------------- elementwise (elementwise.rs)

    fn unary(&self, x: &CudaTensor<D>, op: UnaryOp) -> Result<CudaTensor<D>> {
        self.unary_op(x, op)
    }
    fn binary(&self, a: &CudaTensor<D>, b: &CudaTensor<D>, op: BinaryOp) -> Result<CudaTensor<D>> {
        self.binary_op(a, b, op)
    }
    fn affine(&self, x: &CudaTensor<D>, mul: f32, add: f32) -> Result<CudaTensor<D>> {
        self.affine_op(x, mul, add)
    }
    fn clamp(&self, x: &CudaTensor<D>, min: f32, max: f32) -> Result<CudaTensor<D>> {
        self.clamp_op(x, min, max)
    }
    fn round_to_bf16(&self, x: &CudaTensor<D>) -> Result<CudaTensor<D>> {
        self.round_to_bf16_op(x)
    }
    fn rope(
        &self,
        x: &CudaTensor<D>,
        cos: &CudaTensor<D>,
        sin: &CudaTensor<D>,
        inverse: bool,
    ) -> Result<CudaTensor<D>> {
        self.rope_op(x, cos, sin, inverse)
    }

    // ---------------------------------------------------------------- reductions (reduce.rs)

    fn reduce(&self, x: &CudaTensor<D>, axis: usize, op: ReduceOp) -> Result<CudaTensor<D>> {
        self.reduce_op(x, axis, op)
    }
    fn softmax(&self, x: &CudaTensor<D>, axis: usize) -> Result<CudaTensor<D>> {
        self.softmax_op(x, axis)
    }
    fn rms_norm(&self, x: &CudaTensor<D>, weight: Option<&CudaTensor<D>>, eps: f32) -> Result<CudaTensor<D>> {
        self.rms_norm_op(x, weight, eps)
    }

    // ---------------------------------------------------------------- layout (layout.rs)

    fn reshape(&self, x: &CudaTensor<D>, shape: &[usize]) -> Result<CudaTensor<D>> {
        self.reshape_op(x, shape)
    }
    fn transpose(&self, x: &CudaTensor<D>, a: usize, b: usize) -> Result<CudaTensor<D>> {
        self.transpose_op(x, a, b)
    }
    fn narrow(&self, x: &CudaTensor<D>, axis: usize, start: usize, len: usize) -> Result<CudaTensor<D>> {
        self.narrow_op(x, axis, start, len)
    }
    fn concat(&self, xs: &[&CudaTensor<D>], axis: usize) -> Result<CudaTensor<D>> {
        self.concat_op(xs, axis)
    }

    // ---------------------------------------------------------------- indices (index.rs)

    fn index_select(&self, x: &CudaTensor<D>, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        self.index_select_op(x, idx)
    }
    fn gather_last(&self, x: &CudaTensor<D>, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        self.gather_last_op(x, idx)
    }
    fn index_add(&self, dst: &CudaTensor<D>, idx: &CudaIndex<D>, src: &CudaTensor<D>) -> Result<CudaTensor<D>> {
        self.index_add_op(dst, idx, src)
    }
    fn topk(&self, x: &CudaTensor<D>, k: usize) -> Result<(CudaTensor<D>, CudaIndex<D>)> {
        self.topk_op(x, k)
    }
    fn index_mask(&self, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        self.index_mask_op(idx)
    }
    fn concat_index(&self, xs: &[&CudaIndex<D>], axis: usize) -> Result<CudaIndex<D>> {
        self.concat_index_op(xs, axis)
    }
    fn offset_index(&self, idx: &CudaIndex<D>, offset: i32) -> Result<CudaIndex<D>> {
        self.offset_index_op(idx, offset)
    }

    // The fused V4 ops: the ones with a kernel here override the trait's default compositions
    // (which stay their definition and the op-level suite's reference); the rest keep them.

    // ---------------------------------------------------------------- attention (attention.rs)
    fn sparse_attention(
        &self,
        q: &CudaTensor<D>,
        kv: &CudaPool<D>,
        idx: &CudaIndex<D>,
        sinks: &CudaTensor<D>,
        scale: f32,
        _act: dsv4_core::backend::Precision,
    ) -> Result<CudaTensor<D>> {
        self.sparse_attention_op(q, kv, idx, sinks, scale)
    }
    #[allow(clippy::too_many_arguments)]
    fn indexer_select(
        &self,
        q: &CudaTensor<D>,
        keys: &CudaPool<D>,
        key_rows: &CudaIndex<D>,
        weights: &CudaTensor<D>,
        valid: &[std::ops::Range<usize>],
        k: usize,
        offset: i32,
        _act: dsv4_core::backend::Precision,
    ) -> Result<CudaIndex<D>> {
        self.indexer_select_op(q, keys, key_rows, weights, valid, k, offset)
    }

    // ---------------------------------------------------------------- mHC, compressor, MoE (fused.rs)
    #[allow(clippy::too_many_arguments)]
    fn hc_pre(
        &self,
        x: &CudaTensor<D>,
        fn_w: &CudaWeight<D>,
        base: &CudaTensor<D>,
        scale: &CudaTensor<D>,
        sinkhorn_iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(CudaTensor<D>, CudaTensor<D>, CudaTensor<D>)> {
        self.hc_pre_op(x, fn_w, base, scale, sinkhorn_iters, hc_eps, norm_eps)
    }
    fn sinkhorn(&self, comb: &CudaTensor<D>, iters: usize, eps: f32) -> Result<CudaTensor<D>> {
        self.sinkhorn_op(comb, iters, eps)
    }
    fn hc_post(
        &self,
        x: &CudaTensor<D>,
        y: &CudaTensor<D>,
        post: &CudaTensor<D>,
        comb: &CudaTensor<D>,
    ) -> Result<CudaTensor<D>> {
        self.hc_post_op(x, y, post, comb)
    }
    fn hc_head(
        &self,
        x: &CudaTensor<D>,
        fn_w: &CudaWeight<D>,
        base: &CudaTensor<D>,
        scale: &CudaTensor<D>,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<CudaTensor<D>> {
        self.hc_head_op(x, fn_w, base, scale, hc_eps, norm_eps)
    }
    fn compressor_pool(&self, kv: &CudaTensor<D>, score: &CudaTensor<D>) -> Result<CudaTensor<D>> {
        self.compressor_pool_op(kv, score)
    }
    fn swiglu(&self, gate: &CudaTensor<D>, up: &CudaTensor<D>, limit: f32) -> Result<CudaTensor<D>> {
        self.swiglu_op(gate, up, limit)
    }
    fn moe_route(
        &self,
        logits: &CudaTensor<D>,
        scoring: dsv4_core::config::ScoringFunc,
        bias: Option<&CudaTensor<D>>,
        hash_ids: Option<&CudaIndex<D>>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(CudaIndex<D>, CudaTensor<D>)> {
        self.moe_route_op(logits, scoring, bias, hash_ids, k, routed_scale)
    }
}
