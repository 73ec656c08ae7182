//! The hardware-abstraction trait.
//!
//! The V4 graph in [`crate::model`] is written once against [`Backend`]. A backend supplies
//! * memory: device tensors (f32 activations), device index tensors (i32, `-1` = "no entry"),
//!   and weights in whatever form it chooses to keep them (the stored BF16/FP8/FP4 form, or a
//!   converted one);
//! * **primitives** (required methods): the small op set every accelerator library has
//!   (GEMM, elementwise, reductions, softmax, RMSNorm, RoPE, gather/scatter, top-k, layout);
//! * **fused V4 ops** (provided methods): mHC, compressor pooling, the lightning indexer,
//!   sparse attention with sinks, routing and the MoE. Their default bodies are compositions
//!   of primitives and are the executable definition of the op; a backend overrides the ones
//!   it has a fused kernel for (aclnn's sparse-attention / indexer / grouped-matmul kernels,
//!   CUDA kernels) and keeps the rest;
//! * **pools** (`alloc_pool`, `pool_write`, `pool_read`): fixed buffers of rows in a storage
//!   format (f32, bf16, the official fp8 KV layout) that hold the paged decoding state
//!   ([`crate::kv`]); the fused attention and indexer read their keys straight from them.
//!
//! Calls may be asynchronous: a backend is free to enqueue work on a stream and return.
//! Only `download*` and `synchronize` have to wait. Tensors are immutable values (every op
//! returns a new tensor), which keeps stream ordering trivial to reason about; pools are the
//! one mutable thing, written only through `pool_write` with `&mut`, so Rust's borrow rules
//! order every write before the reads that follow it.
//!
//! Shapes: activations carry a leading token dimension `T` that may hold tokens of several
//! sequences at different positions; ops that need to know sequence boundaries (attention,
//! compressor, indexer) take explicit index/range arguments built by the graph.

use std::ops::Range;

pub use crate::act_quant::FakeQuant;
use crate::config::ScoringFunc;
use crate::error::{Error, Result};
pub use crate::kv::format::RowFormat;
pub use crate::precision::Precision;
use crate::tensor::StoredWeight;

/// numpy broadcasting of two shapes (the rule `Backend::binary` follows); None if they do not
/// broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// The dimensions of a [`Backend::rope`] call, `(T, heads, d, rd/2)`: x `[T, heads, d]`, cos and
/// sin `[T, rd/2]` with `rd <= d`; None if the shapes do not fit together.
pub fn rope_dims(x: &[usize], cos: &[usize], sin: &[usize]) -> Option<(usize, usize, usize, usize)> {
    let fits = x.len() == 3 && cos.len() == 2 && cos == sin && cos[0] == x[0] && 2 * cos[1] <= x[2];
    fits.then(|| (x[0], x[1], x[2], cos[1]))
}

/// A device tensor: owns (or shares) device memory and knows its shape.
pub trait DeviceTensor: Clone + Send + Sync {
    fn shape(&self) -> &[usize];

    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
}

/// A fixed-size buffer of rows in device memory, written in place: one pool of the paged
/// decoding state (`crate::kv`). Unlike tensors, pools are mutable; a backend must order a
/// [`Backend::pool_write`] before every later read of the same pool on its stream.
pub trait DevicePool: Send + Sync {
    /// Number of rows (slots).
    fn rows(&self) -> usize;
    /// Values per row.
    fn width(&self) -> usize;
    fn format(&self) -> RowFormat;

    /// Device bytes the rows take.
    fn bytes(&self) -> usize {
        self.rows() * self.format().row_bytes(self.width())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Sigmoid,
    Silu,
    /// `log(1 + e^x)`, with torch's threshold (x > 20 → x).
    Softplus,
    Sqrt,
    Rsqrt,
    Exp,
    Relu,
    Neg,
    Square,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Mean,
}

/// How the lightning indexer scores an entry ([`composed::indexer_select`]): with `q_h` a
/// query head, `k` the entry's key, `w_h` the head's weight and `d` the head width,
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexScores {
    /// `Σ_h relu(q_h·k) · d^(-1/2) · w_h` in f32 (transformers; [`Backend::indexer_select`]).
    F32,
    /// The official BF16 einsum (spec §B.8): `bf16(Σ_h bf16(relu(bf16(q_h·k)) · w_h))`, the
    /// products and the sum over heads accumulated in f32; `w_h` carries `d^(-1/2)` itself (the
    /// official `weights_proj(x) · softmax_scale · n_heads^(-1/2)`).
    Bf16,
}

/// One sequence's step through a KV compressor (spec §B.4.3), the arguments of
/// [`Backend::compressor_step`].
///
/// The step feeds the tokens `x` `[S, D]` at positions `start..start + S`. The carry pool
/// holds, per window block, the raw rows of the incomplete window (and, with `overlap`, of the
/// complete window before it) as projection rows then score rows (`crate::kv::layout`,
/// [`crate::kv::SeqCompressPlan`]).
///
/// Generic over a backend's tensor, index and weight types (not the backend), so that a wrapper
/// backend with the same types (`crate::profile::Profiled`) forwards it as it is.
pub struct CompressorStep<'a, T, I, W> {
    /// The step's tokens `[S, D]`.
    pub x: &'a T,
    /// Content and gate projections, `[c·dim, D]` (c = 2 with overlap, else 1).
    pub wkv: &'a W,
    pub wgate: &'a W,
    /// Position bias added to the scores, `[ratio, c·dim]`: row `p mod ratio` for position p.
    pub ape: &'a T,
    pub ratio: usize,
    /// CSA's overlapping windows (two halves per projection row).
    pub overlap: bool,
    /// Width of one entry (`dim`).
    pub dim: usize,
    /// Position of the step's first token.
    pub start: usize,
    /// Position of the first carried row (a multiple of `ratio`): the carry holds positions
    /// `carry_base..start`.
    pub carry_base: usize,
    /// Carry-pool rows of those positions `[2n]` (projections, then scores); None when n = 0.
    pub carry_read: Option<&'a I>,
    /// The rows to keep, as sources in the step's `[carried ++ new]` rows `[k]`, and the
    /// carry-pool rows they go to `[2k]` (projections, then scores).
    pub carry_write: Option<(&'a I, &'a I)>,
}

/// [`CompressorStep`] over backend `B`'s types.
pub type CompressorStepOf<'a, B> =
    CompressorStep<'a, <B as Backend>::Tensor, <B as Backend>::Index, <B as Backend>::Weight>;

/// One routed or shared expert: gate (`w1`), up (`w3`) and down (`w2`) projections.
pub struct ExpertWeights<W> {
    pub w1: W,
    pub w2: W,
    pub w3: W,
    /// The checkpoint stores the three FP8 or FP4: under the official quantisation
    /// ([`Precision::simulates_quant`]) their inputs are e4m3-quantised (spec §B.8).
    pub low_bit: bool,
}

pub trait Backend: Send + Sync {
    /// f32 activation tensor in device memory.
    type Tensor: DeviceTensor;
    /// i32 index tensor in device memory; `-1` marks "no entry".
    type Index: DeviceTensor;
    /// A weight matrix or table in the form the backend keeps it.
    type Weight: Send + Sync;
    /// A pool of the paged decoding state (rows in a [`RowFormat`], written in place).
    type Pool: DevicePool;

    /// Short name: `cpu`, `ascend`, `cuda`.
    fn name(&self) -> &str;

    /// Human-readable description of the device (name, memory).
    fn describe(&self) -> String;

    /// Whether [`Self::alloc_pool`] takes rows in `format` (a capability, not a memory check).
    /// Every backend takes `f32` and `bf16` rows.
    fn supports_row_format(&self, format: RowFormat) -> bool {
        let _ = format;
        true
    }

    /// Bytes of device memory free now (what a fraction given to `--kv-cache-memory` is taken
    /// of, and on the CPU backend what `--weight-memory auto` checks the checkpoint against),
    /// or None when the backend cannot tell.
    fn free_memory(&self) -> Option<usize> {
        None
    }

    // ---------------------------------------------------------------- memory

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<Self::Index>;
    fn download_index(&self, t: &Self::Index) -> Result<Vec<i32>>;
    /// Takes a weight in its stored form (float, FP8 blocks or FP4 groups, spec §D.4); the
    /// backend chooses what to keep.
    fn upload_weight(&self, w: &StoredWeight) -> Result<Self::Weight>;
    fn weight_shape<'w>(&self, w: &'w Self::Weight) -> &'w [usize];
    /// Blocks until all queued work is done.
    fn synchronize(&self) -> Result<()>;
    fn full(&self, shape: &[usize], value: f32) -> Result<Self::Tensor>;

    // ------------------------------------------------------------ pools

    /// A pool of `rows` rows of `width` values stored as `format`, every row zero.
    /// Errors when the device cannot hold it or does not support the format.
    fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<Self::Pool>;
    /// Writes row i of `values` `[n, width]` at row `slots[i]` of `pool`, encoded in the pool's
    /// format (`RowFormat::encode`), in place. `slots` `[n]` must be distinct rows of the pool
    /// (no `-1`); the caller ([`crate::kv`]) guarantees it, backends check the range.
    fn pool_write(&self, pool: &mut Self::Pool, slots: &Self::Index, values: &Self::Tensor) -> Result<()>;
    /// Decoded rows of `pool` at `slots` (any shape) → `slots.shape ++ [width]`; `-1` gives zeros.
    fn pool_read(&self, pool: &Self::Pool, slots: &Self::Index) -> Result<Self::Tensor>;

    // ------------------------------------------------------------ primitives

    /// `x · Wᵀ`: x `[.., K]`, W `[N, K]` → `[.., N]`, f32 accumulation.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    /// Block-diagonal linear: x `[M, G, K]`, W `[G·R, K]` (group g = rows g·R..(g+1)·R) → `[M, G, R]`.
    fn grouped_linear(&self, x: &Self::Tensor, w: &Self::Weight, groups: usize) -> Result<Self::Tensor>;
    /// Rows of a weight table: ids `[T]` → `[T, D]`.
    fn embedding(&self, table: &Self::Weight, ids: &Self::Index) -> Result<Self::Tensor>;
    /// Batched matmul of activations: a `[B.., M, K]`, b `[B.., K, N]` (or `[B.., N, K]` with
    /// `transpose_b`) → `[B.., M, N]`. b may also be 2-D and is then shared by every batch.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, transpose_b: bool) -> Result<Self::Tensor>;
    fn unary(&self, x: &Self::Tensor, op: UnaryOp) -> Result<Self::Tensor>;
    /// Elementwise with numpy broadcasting.
    fn binary(&self, a: &Self::Tensor, b: &Self::Tensor, op: BinaryOp) -> Result<Self::Tensor>;
    /// `x · mul + add`.
    fn affine(&self, x: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor>;
    fn clamp(&self, x: &Self::Tensor, min: f32, max: f32) -> Result<Self::Tensor>;
    /// Every value rounded to the nearest BF16 value (ties to even) and held as f32 again: a
    /// cast to BF16 and back, per value exactly [`crate::precision::round_bf16`]. The rounding
    /// points of the `bf16` precision ([`crate::precision`]) call it.
    fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// [`Backend::round_to_bf16`] of a tensor the caller gives up: the same values, but a
    /// backend may round `x`'s own memory in place where nothing else shares it, instead of
    /// writing a new tensor ([`Precision::act_of`] passes the rounding points' fresh results).
    /// Errors as `round_to_bf16`'s; the default calls it.
    fn round_to_bf16_owned(&self, x: Self::Tensor) -> Result<Self::Tensor> {
        self.round_to_bf16(&x)
    }
    /// The official inference's quantise-dequantise step (spec §B.8, [`crate::act_quant`]) on
    /// every row of x `[.., K]`: blocks of `q.block()` values, one power-of-two scale each,
    /// values rounded to e4m3 or e2m1 and scaled back. Same shape. The default runs
    /// [`crate::act_quant::fake_quant_rows`] on the host (its definition).
    fn fake_quant(&self, x: &Self::Tensor, q: FakeQuant) -> Result<Self::Tensor> {
        composed::fake_quant(self, x, q)
    }
    /// The normalised Walsh–Hadamard transform of every row of x `[.., d]`
    /// ([`crate::act_quant::hadamard_row`]: the official `rotate_activation`; a `d` that is not
    /// a power of two is zero-padded to the next and cut back). Same shape. The default runs on
    /// the host (its definition).
    fn hadamard(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        composed::hadamard(self, x)
    }
    /// Reduction over `axis`, which is kept with size 1.
    fn reduce(&self, x: &Self::Tensor, axis: usize, op: ReduceOp) -> Result<Self::Tensor>;
    /// Numerically stable softmax over `axis` (`-inf` entries get weight 0).
    fn softmax(&self, x: &Self::Tensor, axis: usize) -> Result<Self::Tensor>;
    /// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) · weight`.
    fn rms_norm(&self, x: &Self::Tensor, weight: Option<&Self::Tensor>, eps: f32) -> Result<Self::Tensor>;
    /// Interleaved-pair RoPE on the trailing `2·cos.shape[1]` channels of x `[T, heads, d]`;
    /// cos/sin `[T, rd/2]` hold one angle per pair. `inverse` rotates by the negative angle.
    fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, inverse: bool) -> Result<Self::Tensor>;
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Swaps two axes (materialised).
    fn transpose(&self, x: &Self::Tensor, a: usize, b: usize) -> Result<Self::Tensor>;
    fn narrow(&self, x: &Self::Tensor, axis: usize, start: usize, len: usize) -> Result<Self::Tensor>;
    fn concat(&self, xs: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor>;
    /// Rows of x along axis 0: idx of any shape → `idx.shape ++ x.shape[1..]`; `-1` gives zeros.
    fn index_select(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor>;
    /// Along the last axis: x `[.., N]`, idx `[.., k]` → `[.., k]`.
    fn gather_last(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor>;
    /// `dst[idx[i]] += src[i]` along axis 0, in order of i.
    fn index_add(&self, dst: &Self::Tensor, idx: &Self::Index, src: &Self::Tensor) -> Result<Self::Tensor>;
    /// Top-k along the last axis, descending; ties go to the lower index (deterministic).
    fn topk(&self, x: &Self::Tensor, k: usize) -> Result<(Self::Tensor, Self::Index)>;
    /// 0.0 where `idx >= 0`, `-inf` where `idx == -1`.
    fn index_mask(&self, idx: &Self::Index) -> Result<Self::Tensor>;
    fn concat_index(&self, xs: &[&Self::Index], axis: usize) -> Result<Self::Index>;
    /// Adds `offset` to every entry that is not `-1`.
    fn offset_index(&self, idx: &Self::Index, offset: i32) -> Result<Self::Index>;

    // ------------------------------------------------------------- fused ops
    // Default bodies: compositions of the primitives above. They define the semantics.

    /// [`Backend::rope`] of a tensor the caller gives up: the same values, but a backend may
    /// rotate `x`'s own memory in place where nothing else shares it, instead of copying every
    /// channel to change the trailing `2·cos.shape[1]` (the CPU backend does: a query's 64
    /// rotary channels of 512 a head). Shapes and errors as `rope`'s; the default calls it.
    fn rope_owned(
        &self,
        x: Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        inverse: bool,
    ) -> Result<Self::Tensor> {
        self.rope(&x, cos, sin, inverse)
    }

    /// `x · Wᵀ` at a rounding point of `act` ([`crate::precision`]): [`Backend::linear`] then
    /// [`Precision::act`], which is this default and the definition. Shapes as `linear`'s.
    ///
    /// Where `act` rounds to BF16, x holds BF16 values and W's values are BF16 (BF16 storage,
    /// or an exact narrow form), a backend may compute it as one BF16 matmul instead: exact
    /// products, f32 accumulation and one rounding of each sum to BF16, i.e. the same result
    /// up to the summation order, without widening W. That is how a BF16 deployment runs its
    /// projections (spec §B.7); the Ascend backend does so ([`crate::precision`] lists the
    /// rounding points).
    fn linear_act(&self, x: &Self::Tensor, w: &Self::Weight, act: Precision) -> Result<Self::Tensor> {
        act.act_of(self, self.linear(x, w))
    }

    /// [`Backend::grouped_linear`] at a rounding point of `act`: its output rounded as `act`
    /// rounds (this default, the definition). Shapes as `grouped_linear`'s. A backend may run it
    /// as BF16 products under the same conditions as [`Backend::linear_act`].
    fn grouped_linear_act(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        groups: usize,
        act: Precision,
    ) -> Result<Self::Tensor> {
        act.act_of(self, self.grouped_linear(x, w, groups))
    }

    /// mHC pre-mapping (spec §B.2). x `[T, n, D]`, `fn_w` `[(2+n)n, nD]`, base `[(2+n)n]`,
    /// scale `[3]`. Returns (collapsed `[T, D]`, post `[T, n]`, comb `[T, n, n]`), with comb
    /// Sinkhorn-projected (row j = source stream, column k = destination).
    #[allow(clippy::too_many_arguments)]
    fn hc_pre(
        &self,
        x: &Self::Tensor,
        fn_w: &Self::Weight,
        base: &Self::Tensor,
        scale: &Self::Tensor,
        sinkhorn_iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        composed::hc_pre(self, x, fn_w, base, scale, sinkhorn_iters, hc_eps, norm_eps)
    }

    /// mHC Sinkhorn normalisation of `comb` `[T, n, n]` (spec §B.2, `hc_pre`'s last step):
    /// columns normalised, then `iters − 1` rounds of rows then columns, each line divided by
    /// its sum plus `eps` (sums in index order). Returns the same shape.
    fn sinkhorn(&self, comb: &Self::Tensor, iters: usize, eps: f32) -> Result<Self::Tensor> {
        composed::sinkhorn(self, comb, iters, eps)
    }

    /// mHC post-mapping (spec §B.3): `X'_k = post_k · y + Σ_j comb[j, k] · X_j`.
    fn hc_post(
        &self,
        x: &Self::Tensor,
        y: &Self::Tensor,
        post: &Self::Tensor,
        comb: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        composed::hc_post(self, x, y, post, comb)
    }

    /// Final stream collapse (spec §B.6 steps 1-3): x `[T, n, D]` → `[T, D]`.
    fn hc_head(
        &self,
        x: &Self::Tensor,
        fn_w: &Self::Weight,
        base: &Self::Tensor,
        scale: &Self::Tensor,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<Self::Tensor> {
        let s = x.shape().to_vec();
        let (t, n, d) = (s[0], s[1], s[2]);
        let flat = self.rms_norm(&self.reshape(x, &[t, n * d])?, None, norm_eps)?;
        let mixes = self.linear(&flat, fn_w)?; // [T, n]
        let pre = self.binary(&self.binary(&mixes, scale, BinaryOp::Mul)?, base, BinaryOp::Add)?;
        let pre = self.affine(&self.unary(&pre, UnaryOp::Sigmoid)?, 1.0, hc_eps)?;
        let out = self.reduce(&self.binary(&self.reshape(&pre, &[t, n, 1])?, x, BinaryOp::Mul)?, 1, ReduceOp::Sum)?;
        self.reshape(&out, &[t, d])
    }

    /// One sequence's step through a KV compressor (spec §B.4.3), up to the pooled entries:
    /// the projections `a = wkv·x`, the scores `z = wgate·x + ape[p mod ratio]`, the carry read
    /// and written back, and [`Backend::compressor_pool`] over every window the step completes.
    /// Returns those windows' entries `[W, dim]` (before their norm and RoPE), or None when the
    /// step completes no window.
    ///
    /// `act` is the caller's activation precision: where it rounds to BF16 (`bf16`, `official`),
    /// the entries are rounded to BF16 next, so a backend may use a kernel that takes BF16
    /// tokens (when `x` holds BF16 values) and returns BF16 entries (Ascend's
    /// `aclnnCompressor`); otherwise (`f32`, `official-f32`) the entries must keep f32 accuracy.
    ///
    /// Profiles ([`crate::profile`]) time the whole step as one op, whether fused or composed.
    fn compressor_step(
        &self,
        step: &CompressorStep<'_, Self::Tensor, Self::Index, Self::Weight>,
        carry: &mut Self::Pool,
        act: Precision,
    ) -> Result<Option<Self::Tensor>> {
        let _ = act;
        composed::compressor_step(self, step, carry)
    }

    /// Compressor pooling (spec §B.4.3): kv, score `[W, L, c]` → `Σ_l softmax_l(score)·kv`,
    /// `[W, c]`, the softmax taken per channel over the L candidate rows.
    fn compressor_pool(&self, kv: &Self::Tensor, score: &Self::Tensor) -> Result<Self::Tensor> {
        composed::compressor_pool(self, kv, score)
    }

    /// Lightning-indexer selection (spec §B.4.4). q `[T, nI, dI]` (roped); the sequence's keys
    /// are rows `key_rows` `[N]` of the pool `keys` (width dI), key n at row `key_rows[n]`;
    /// head weights `[T, nI]` (already scaled by `nI^-1/2`); `valid[t]` = the keys (0..N) query t
    /// may see. Score `Σ_h w_h · relu(q_h·k)·dI^-1/2`; returns the top-`k` keys per query as
    /// `[T, k]` pool rows `key_rows[n] + offset`, and `-1` for picks outside `valid[t]`.
    ///
    /// `act` is the caller's activation precision: a backend may use a kernel that takes BF16
    /// queries and keys when it is not `F32` (Ascend's `aclnnLightningIndexerV2`); under `F32`
    /// the scores must keep f32 inputs.
    #[allow(clippy::too_many_arguments)]
    fn indexer_select(
        &self,
        q: &Self::Tensor,
        keys: &Self::Pool,
        key_rows: &Self::Index,
        weights: &Self::Tensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
        act: Precision,
    ) -> Result<Self::Index> {
        let _ = act;
        composed::indexer_select(self, q, keys, key_rows, weights, valid, k, offset, IndexScores::F32)
    }

    /// Attention of each query over an explicit key set, with a per-head sink (spec §B.4.6).
    /// q `[T, H, d]`, kv a pool of width d (K = V), idx `[T, K]` rows of kv (`-1` = none),
    /// sinks `[H]`. Returns `[T, H, d]`.
    ///
    /// `act` is the caller's activation precision: a backend may use a kernel that takes BF16
    /// queries and keys when it is not `F32` (Ascend's `aclnnSparseFlashMla`); under `F32` the
    /// result must keep f32 accuracy.
    fn sparse_attention(
        &self,
        q: &Self::Tensor,
        kv: &Self::Pool,
        idx: &Self::Index,
        sinks: &Self::Tensor,
        scale: f32,
        act: Precision,
    ) -> Result<Self::Tensor> {
        let _ = act;
        composed::sparse_attention(self, q, kv, idx, sinks, scale)
    }

    /// Clamped SwiGLU (spec §B.5 step 4): `silu(min(g, L)) · clamp(u, -L, L)`. The clamp is
    /// unconditional, as in transformers (the official code skips it when L ≤ 0; V4 configs
    /// always set L = 10).
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor, limit: f32) -> Result<Self::Tensor> {
        let g = self.clamp(gate, f32::NEG_INFINITY, limit)?;
        let u = self.clamp(up, -limit, limit)?;
        self.binary(&self.unary(&g, UnaryOp::Silu)?, &u, BinaryOp::Mul)
    }

    /// One expert on a batch of rows: `w2 · swiglu(w1·x, w3·x)`. Where `act` rounds to BF16,
    /// the outputs of w1, w3, the SwiGLU and w2 are rounded ([`crate::precision`]); where it
    /// simulates the official quantisation, the inputs of w1/w3 and of w2 are e4m3-quantised
    /// when the expert is low-bit ([`composed::expert_ffn_weighted`]).
    fn expert_ffn(
        &self,
        x: &Self::Tensor,
        e: &ExpertWeights<Self::Weight>,
        limit: f32,
        act: Precision,
    ) -> Result<Self::Tensor> {
        composed::expert_ffn_weighted(self, x, e, limit, act, None)
    }

    /// MoE routing (spec §B.5 steps 1-3): router logits `[T, E]` → (expert ids `[T, k]`,
    /// weights `[T, k]`). Scores are `scoring(logits)`; the ids are `hash_ids` when given (hash
    /// layers: `tid2eid[token]`), else the top-k of scores + `bias` (the bias steers selection
    /// only; ties go to the lower expert); the weights are the chosen scores divided by
    /// (their sum + 1e-20), times `routed_scale`.
    #[allow(clippy::too_many_arguments)]
    fn moe_route(
        &self,
        logits: &Self::Tensor,
        scoring: ScoringFunc,
        bias: Option<&Self::Tensor>,
        hash_ids: Option<&Self::Index>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(Self::Index, Self::Tensor)> {
        composed::moe_route(self, logits, scoring, bias, hash_ids, k, routed_scale)
    }

    /// Routed experts: x `[T, D]`, `expert_ids` `[T, k]` (host), weights `[T, k]`.
    /// Returns `Σ_j weights[t, j] · expert_{ids[t, j]}(x_t)`, summed in ascending expert id
    /// in f32; each expert as [`Self::expert_ffn`] with `act`. The weight is applied after w2
    /// (transformers' eager order), except where `act` simulates the official quantisation:
    /// there, as in the official `Expert.forward`, it multiplies the SwiGLU output before w2
    /// (and before w2's input quantisation), [`composed::expert_ffn_weighted`].
    fn moe_experts(
        &self,
        x: &Self::Tensor,
        expert_ids: &[i32],
        weights: &Self::Tensor,
        experts: &[ExpertWeights<Self::Weight>],
        limit: f32,
        act: Precision,
    ) -> Result<Self::Tensor> {
        composed::moe_experts(self, x, expert_ids, weights, experts, limit, act)
    }
}

/// Default bodies of fused ops that a backend may want to fall back to from its own override
/// (a Rust override cannot call the trait's default body).
pub mod composed {
    use super::*;

    /// Every id of a `moe_experts` call names one of the `experts`: an error naming the first
    /// that does not (shared by the composition and backend overrides).
    pub fn check_expert_ids(backend: &str, ids: &[i32], experts: usize) -> Result<()> {
        match ids.iter().find(|&&e| e < 0 || e as usize >= experts) {
            Some(bad) => Err(Error::backend(backend, format!("moe_experts: expert id {bad} is outside 0..{experts}"))),
            None => Ok(()),
        }
    }

    /// The definition of [`Backend::compressor_step`]: the two projections and the position
    /// bias in f32, the carried rows put in front, the rows to keep written back to the carry,
    /// then every complete window laid out as candidates (with overlap: the first halves of the
    /// window before, then the second halves of this one) and pooled by
    /// [`Backend::compressor_pool`].
    pub fn compressor_step<B: Backend + ?Sized>(
        be: &B,
        step: &CompressorStepOf<'_, B>,
        carry: &mut B::Pool,
    ) -> Result<Option<B::Tensor>> {
        let (m, start) = (step.ratio, step.start);
        let width = if step.overlap { 2 * step.dim } else { step.dim };
        let s = step.x.shape()[0];
        let kv = be.linear(step.x, step.wkv)?;
        let ape_rows: Vec<i32> = (start..start + s).map(|p| (p % m) as i32).collect();
        let ape = be.index_select(step.ape, &be.upload_index(&ape_rows, &[s])?)?;
        let score = be.binary(&be.linear(step.x, step.wgate)?, &ape, BinaryOp::Add)?;
        // Rows of positions carry_base..start+S.
        let (kv, score) = match step.carry_read {
            Some(idx) => {
                let c = idx.numel() / 2;
                let carried = be.pool_read(carry, idx)?; // [2c, width]
                (
                    be.concat(&[&be.narrow(&carried, 0, 0, c)?, &kv], 0)?,
                    be.concat(&[&be.narrow(&carried, 0, c, c)?, &score], 0)?,
                )
            }
            None => (kv, score),
        };
        if let Some((src, dst)) = step.carry_write {
            let rows = be.concat(&[&be.index_select(&kv, src)?, &be.index_select(&score, src)?], 0)?;
            be.pool_write(carry, dst, &rows)?;
        }
        let (w0, w1) = (start / m, (start + s) / m);
        if w1 == w0 {
            return Ok(None);
        }
        // Every complete window in the rows, as [windows, m, width].
        let base_window = step.carry_base / m;
        let (total, used) = (w1 - base_window, (w1 - base_window) * m);
        let kv = be.reshape(&be.narrow(&kv, 0, 0, used)?, &[total, m, width])?;
        let score = be.reshape(&be.narrow(&score, 0, 0, used)?, &[total, m, width])?;
        let (kv, score) = if step.overlap {
            let has_prev = base_window < w0;
            (
                overlap_candidates(be, &kv, m, step.dim, has_prev, 0.0)?,
                overlap_candidates(be, &score, m, step.dim, has_prev, f32::NEG_INFINITY)?,
            )
        } else {
            (kv, score)
        };
        be.compressor_pool(&kv, &score).map(Some)
    }

    /// CSA candidate layout `[W, 2m, dim]` from complete windows `[n, m, 2·dim]`: rows 0..m are
    /// the first halves of the previous window, rows m..2m the second halves of this one. With
    /// `has_prev` the first of the n windows only supplies first halves (it completed in an
    /// earlier step, W = n − 1); without, the sequence starts here and the window before the
    /// first has `fill` everywhere (zero content, −inf score; W = n).
    fn overlap_candidates<B: Backend + ?Sized>(
        be: &B,
        x: &B::Tensor,
        m: usize,
        dim: usize,
        has_prev: bool,
        fill: f32,
    ) -> Result<B::Tensor> {
        let n = x.shape()[0];
        let first = be.narrow(x, 2, 0, dim)?;
        let second = be.narrow(x, 2, dim, dim)?;
        let (prev, cur) = if has_prev {
            (be.narrow(&first, 0, 0, n - 1)?, be.narrow(&second, 0, 1, n - 1)?)
        } else {
            let pad = be.full(&[1, m, dim], fill)?;
            let prev = if n == 1 { pad } else { be.concat(&[&pad, &be.narrow(&first, 0, 0, n - 1)?], 0)? };
            (prev, second)
        };
        be.concat(&[&prev, &cur], 1)
    }

    /// The definition of [`Backend::compressor_pool`]: a softmax over the L candidate rows
    /// (axis 1), the product with kv, and its sum over axis 1, reshaped to `[W, c]`.
    pub fn compressor_pool<B: Backend + ?Sized>(be: &B, kv: &B::Tensor, score: &B::Tensor) -> Result<B::Tensor> {
        let shape = crate::backend_checks::compressor_pool(be.name(), kv.shape(), score.shape())?;
        let w = be.softmax(score, 1)?;
        let pooled = be.reduce(&be.binary(&w, kv, BinaryOp::Mul)?, 1, ReduceOp::Sum)?;
        be.reshape(&pooled, &shape)
    }

    /// The definition of [`Backend::sparse_attention`]: gather the key rows, scaled scores,
    /// `-inf` for `-1` slots, a softmax that includes the sink logit, then `P·V` (V = K).
    pub fn sparse_attention<B: Backend + ?Sized>(
        be: &B,
        q: &B::Tensor,
        kv: &B::Pool,
        idx: &B::Index,
        sinks: &B::Tensor,
        scale: f32,
    ) -> Result<B::Tensor> {
        crate::backend_checks::sparse_attention(
            be.name(),
            q.shape(),
            kv.rows(),
            kv.width(),
            idx.shape(),
            sinks.shape(),
            None,
        )?;
        let (t, h, _d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let kk = idx.shape()[1];
        let keys = be.pool_read(kv, idx)?; // [T, K, d]
        let logits = be.affine(&be.matmul(q, &keys, true)?, scale, 0.0)?; // [T, H, K]
        let mask = be.reshape(&be.index_mask(idx)?, &[t, 1, kk])?;
        let logits = be.binary(&logits, &mask, BinaryOp::Add)?;
        let sink = be.binary(&be.full(&[t, h, 1], 0.0)?, &be.reshape(sinks, &[1, h, 1])?, BinaryOp::Add)?;
        let probs = be.softmax(&be.concat(&[&logits, &sink], 2)?, 2)?;
        let probs = be.narrow(&probs, 2, 0, kk)?;
        be.matmul(&probs, &keys, false)
    }

    /// The definition of [`Backend::indexer_select`] (`form` = [`IndexScores::F32`]), and of the
    /// official inference's BF16 index scores ([`IndexScores::Bf16`], which the `official`
    /// precision calls directly).
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_select<B: Backend + ?Sized>(
        be: &B,
        q: &B::Tensor,
        keys: &B::Pool,
        key_rows: &B::Index,
        weights: &B::Tensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
        form: IndexScores,
    ) -> Result<B::Index> {
        let rows = be.download_index(key_rows)?;
        let bounds = crate::backend_checks::IndexBounds::of(&rows);
        crate::backend_checks::indexer_select(
            be.name(),
            q.shape(),
            keys.rows(),
            keys.width(),
            key_rows.shape(),
            bounds,
            weights.shape(),
            valid,
            k,
        )?;
        let (t, nh, dh) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let n = key_rows.numel();
        let keys = be.pool_read(keys, key_rows)?; // [N, dI]
                                                  // Query rows in blocks, so that the `[rows, nI, N]` scores stay within ~64 MiB of f32
                                                  // however long the prompt: each row's picks depend on that row alone.
        let block = ((16usize << 20) / (nh * n).max(1)).clamp(1, t.max(1));
        let mut picks = Vec::with_capacity(t * k);
        for r0 in (0..t).step_by(block) {
            let rows_here = block.min(t - r0);
            let qb = be.narrow(q, 0, r0, rows_here)?;
            let wb = be.narrow(weights, 0, r0, rows_here)?;
            picks.extend(select_block(be, &qb, &keys, &rows, &wb, &valid[r0..r0 + rows_here], k, offset, form, dh)?);
        }
        be.upload_index(&picks, &[t, k])
    }

    /// [`indexer_select`] of one block of query rows (`q` `[t, nI, dI]`), keys already read
    /// (`[N, dI]`, pool rows `rows`): the `[t, k]` picks as host pool rows.
    #[allow(clippy::too_many_arguments)]
    fn select_block<B: Backend + ?Sized>(
        be: &B,
        q: &B::Tensor,
        keys: &B::Tensor,
        rows: &[i32],
        weights: &B::Tensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
        form: IndexScores,
        dh: usize,
    ) -> Result<Vec<i32>> {
        let (t, nh, n) = (q.shape()[0], q.shape()[1], rows.len());
        let weights = be.reshape(weights, &[t, nh, 1])?;
        let scores = match form {
            IndexScores::F32 => {
                let scores = be.matmul(q, keys, true)?; // [T, nI, N]
                let scores = be.affine(&be.unary(&scores, UnaryOp::Relu)?, (dh as f32).powf(-0.5), 0.0)?;
                be.reduce(&be.binary(&scores, &weights, BinaryOp::Mul)?, 1, ReduceOp::Sum)?
                // [T, 1, N]
            }
            IndexScores::Bf16 => {
                let scores = be.unary(&be.round_to_bf16(&be.matmul(q, keys, true)?)?, UnaryOp::Relu)?;
                let scores = be.round_to_bf16(&be.binary(&scores, &weights, BinaryOp::Mul)?)?;
                be.round_to_bf16(&be.reduce(&scores, 1, ReduceOp::Sum)?)?
            }
        };
        let scores = be.reshape(&scores, &[t, n])?;
        let mut mask = vec![f32::NEG_INFINITY; t * n];
        for (i, r) in valid.iter().enumerate() {
            mask[i * n + r.start..i * n + r.end].fill(0.0);
        }
        let scores = be.binary(&scores, &be.upload(&mask, &[t, n])?, BinaryOp::Add)?;
        let (vals, idx) = be.topk(&scores, k)?;
        // Picks with -inf score were invalid: turn them into -1, then offset the rest.
        let host_vals = be.download(&vals)?;
        let mut host_idx = be.download_index(&idx)?;
        for (i, v) in host_vals.iter().enumerate() {
            if *v == f32::NEG_INFINITY {
                host_idx[i] = -1;
            } else {
                host_idx[i] = rows[host_idx[i] as usize] + offset;
            }
        }
        Ok(host_idx)
    }

    /// The definition of [`Backend::expert_ffn`], and of a routed expert under the official
    /// quantisation (`row_weights` `[n, 1]`: each row's routing weight, applied before w2):
    /// `g = w1·q(x)`, `u = w3·q(x)`, `h = swiglu(g, u)` (times the row weight), `w2·q(h)`, with
    /// `q` = [`Precision::linear_input`] (identity unless `act` simulates the quantisation and the
    /// expert is low-bit) and `act`'s BF16 rounding of g, u, h and the output.
    pub fn expert_ffn_weighted<B: Backend + ?Sized>(
        be: &B,
        x: &B::Tensor,
        e: &ExpertWeights<B::Weight>,
        limit: f32,
        act: Precision,
        row_weights: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let x = act.linear_input(be, x, e.low_bit)?;
        let g = be.linear_act(&x, &e.w1, act)?;
        let u = be.linear_act(&x, &e.w3, act)?;
        let h = be.swiglu(&g, &u, limit)?;
        let h = match row_weights {
            Some(w) => be.binary(&h, w, BinaryOp::Mul)?,
            None => h,
        };
        let h = act.linear_input(be, &act.act(be, &h)?, e.low_bit)?;
        be.linear_act(&h, &e.w2, act)
    }

    /// The definition of [`Backend::fake_quant`]: the rows on the host.
    pub fn fake_quant<B: Backend + ?Sized>(be: &B, x: &B::Tensor, q: FakeQuant) -> Result<B::Tensor> {
        let width = x.shape().last().copied().unwrap_or(1);
        let mut data = be.download(x)?;
        crate::act_quant::fake_quant_rows(&mut data, width, q);
        be.upload(&data, x.shape())
    }

    /// The definition of [`Backend::hadamard`]: the rows on the host.
    pub fn hadamard<B: Backend + ?Sized>(be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let width = x.shape().last().copied().unwrap_or(1).max(1);
        let mut data = be.download(x)?;
        data.chunks_mut(width).for_each(crate::act_quant::hadamard_row);
        be.upload(&data, x.shape())
    }

    /// The definition of [`Backend::hc_pre`].
    #[allow(clippy::too_many_arguments)]
    pub fn hc_pre<B: Backend + ?Sized>(
        be: &B,
        x: &B::Tensor,
        fn_w: &B::Weight,
        base: &B::Tensor,
        scale: &B::Tensor,
        sinkhorn_iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let &[t, n, d] = x.shape() else {
            return Err(Error::backend(be.name(), format!("hc_pre: x {:?} is not [T, n, D]", x.shape())));
        };
        let flat = be.reshape(x, &[t, n * d])?;
        let flat = be.rms_norm(&flat, None, norm_eps)?;
        let mixes = be.linear(&flat, fn_w)?; // [T, (2+n)n]
        let part = |start: usize, len: usize, si: usize| -> Result<B::Tensor> {
            let m = be.narrow(&mixes, 1, start, len)?;
            let sc = be.narrow(scale, 0, si, 1)?;
            let b = be.narrow(base, 0, start, len)?;
            be.binary(&be.binary(&m, &sc, BinaryOp::Mul)?, &b, BinaryOp::Add)
        };
        let pre = be.affine(&be.unary(&part(0, n, 0)?, UnaryOp::Sigmoid)?, 1.0, hc_eps)?;
        let post = be.affine(&be.unary(&part(n, n, 1)?, UnaryOp::Sigmoid)?, 2.0, 0.0)?;
        let comb = be.reshape(&part(2 * n, n * n, 2)?, &[t, n, n])?;
        let comb = be.affine(&be.softmax(&comb, 2)?, 1.0, hc_eps)?;
        let comb = be.sinkhorn(&comb, sinkhorn_iters, hc_eps)?;
        let pre = be.reshape(&pre, &[t, n, 1])?;
        let collapsed = be.reduce(&be.binary(&pre, x, BinaryOp::Mul)?, 1, ReduceOp::Sum)?;
        let collapsed = be.reshape(&collapsed, &[t, d])?;
        Ok((collapsed, post, comb))
    }

    /// The definition of [`Backend::hc_post`]: a broadcast `binary` product `post_k · y`, a
    /// batched `matmul` of `combᵀ` `[T, k, j]` with `x` `[T, j, D]`, and their `binary` sum.
    pub fn hc_post<B: Backend + ?Sized>(
        be: &B,
        x: &B::Tensor,
        y: &B::Tensor,
        post: &B::Tensor,
        comb: &B::Tensor,
    ) -> Result<B::Tensor> {
        let &[t, n, d] = x.shape() else {
            return Err(Error::backend(be.name(), format!("hc_post: x {:?} is not [T, n, D]", x.shape())));
        };
        let expanded = be.binary(&be.reshape(post, &[t, n, 1])?, &be.reshape(y, &[t, 1, d])?, BinaryOp::Mul)?;
        let comb_t = be.transpose(comb, 1, 2)?; // [T, k, j]
        let mixed = be.matmul(&comb_t, x, false)?; // [T, k, D]
        be.binary(&expanded, &mixed, BinaryOp::Add)
    }

    /// The definition of [`Backend::sinkhorn`]: `reduce`, `affine` and a broadcast `binary`
    /// division per normalisation.
    pub fn sinkhorn<B: Backend + ?Sized>(be: &B, comb: &B::Tensor, iters: usize, eps: f32) -> Result<B::Tensor> {
        let col_norm = |c: &B::Tensor| -> Result<B::Tensor> {
            let s = be.affine(&be.reduce(c, 1, ReduceOp::Sum)?, 1.0, eps)?;
            be.binary(c, &s, BinaryOp::Div)
        };
        let row_norm = |c: &B::Tensor| -> Result<B::Tensor> {
            let s = be.affine(&be.reduce(c, 2, ReduceOp::Sum)?, 1.0, eps)?;
            be.binary(c, &s, BinaryOp::Div)
        };
        let mut comb = col_norm(comb)?;
        for _ in 1..iters {
            comb = row_norm(&comb)?;
            comb = col_norm(&comb)?;
        }
        Ok(comb)
    }

    /// The definition of [`Backend::moe_route`].
    #[allow(clippy::too_many_arguments)]
    pub fn moe_route<B: Backend + ?Sized>(
        be: &B,
        logits: &B::Tensor,
        scoring: ScoringFunc,
        bias: Option<&B::Tensor>,
        hash_ids: Option<&B::Index>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(B::Index, B::Tensor)> {
        let scores = match scoring {
            ScoringFunc::SqrtSoftplus => be.unary(&be.unary(logits, UnaryOp::Softplus)?, UnaryOp::Sqrt)?,
            ScoringFunc::Sigmoid => be.unary(logits, UnaryOp::Sigmoid)?,
            ScoringFunc::Softmax => be.softmax(logits, 1)?,
        };
        let ids = match (hash_ids, bias) {
            (Some(ids), _) => ids.clone(),
            (None, Some(bias)) => be.topk(&be.binary(&scores, bias, BinaryOp::Add)?, k)?.1,
            (None, None) => be.topk(&scores, k)?.1,
        };
        let w = be.gather_last(&scores, &ids)?;
        let denom = be.affine(&be.reduce(&w, 1, ReduceOp::Sum)?, 1.0, 1e-20)?;
        let w = be.affine(&be.binary(&w, &denom, BinaryOp::Div)?, routed_scale, 0.0)?;
        Ok((ids, w))
    }

    /// The definition of [`Backend::moe_experts`]: one gather, expert FFN and scatter-add per
    /// expert that has rows.
    pub fn moe_experts<B: Backend + ?Sized>(
        be: &B,
        x: &B::Tensor,
        expert_ids: &[i32],
        weights: &B::Tensor,
        experts: &[ExpertWeights<B::Weight>],
        limit: f32,
        act: Precision,
    ) -> Result<B::Tensor> {
        let t = x.shape()[0];
        let k = expert_ids.len() / t.max(1);
        check_expert_ids(be.name(), expert_ids, experts.len())?;
        let flat_w = be.reshape(weights, &[t * k, 1])?;
        let mut out = be.full(x.shape(), 0.0)?;
        for (e, ew) in experts.iter().enumerate() {
            let (mut rows, mut slots) = (vec![], vec![]);
            for (i, &id) in expert_ids.iter().enumerate() {
                if id as usize == e {
                    rows.push((i / k) as i32);
                    slots.push(i as i32);
                }
            }
            if rows.is_empty() {
                continue;
            }
            let rows = be.upload_index(&rows, &[slots.len()])?;
            let slots = be.upload_index(&slots, &[slots.len()])?;
            let xe = be.index_select(x, &rows)?;
            let we = be.index_select(&flat_w, &slots)?; // [n_e, 1]
            let ye = if act.simulates_quant() {
                expert_ffn_weighted(be, &xe, ew, limit, act, Some(&we))?
            } else {
                be.binary(&be.expert_ffn(&xe, ew, limit, act)?, &we, BinaryOp::Mul)?
            };
            out = be.index_add(&out, &rows, &ye)?;
        }
        Ok(out)
    }
}
