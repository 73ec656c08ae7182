//! The graph side of the official inference's quantisation simulation (spec §B.8; the
//! `official` precisions, [`crate::precision`]): which linears see e4m3 inputs ([`Proj`]), the
//! KV rows' fp8 quantisation before they are stored ([`kv_row_quant`]) and the indexer's
//! rotated, e2m1-quantised queries and keys ([`rotate_and_quantise`]). The numerics themselves
//! are [`crate::act_quant`]; each step is one `Backend::fake_quant` or `Backend::hadamard` call,
//! and does nothing unless the precision simulates the quantisation.

use crate::act_quant::FakeQuant;
use crate::backend::DeviceTensor;
use crate::backend::{Backend, BinaryOp, ReduceOp, UnaryOp};
use crate::error::Result;
use crate::precision::Precision;

/// A linear layer's weight and whether the checkpoint stores it FP8 or FP4: the official
/// inference quantises the input of exactly those linears (spec §B.8), which the `official`
/// precisions simulate ([`Precision::linear_input`]).
pub struct Proj<B: Backend> {
    pub w: B::Weight,
    /// Stored FP8 (e4m3 blocks) or FP4 (e2m1 groups) in the checkpoint.
    pub low_bit: bool,
}

impl<B: Backend> Proj<B> {
    /// `x · Wᵀ` (x `[.., K]`, W `[N, K]`), the input e4m3-quantised first when `prec` simulates
    /// the official quantisation and the weight is low-bit. The output is not rounded: callers
    /// apply `prec`'s BF16 rounding where the graph has a rounding point.
    pub fn linear(&self, be: &B, x: &B::Tensor, prec: Precision) -> Result<B::Tensor> {
        be.linear(&prec.linear_input(be, x, self.low_bit)?, &self.w)
    }

    /// [`Self::linear`] at a rounding point of `prec`: its output rounded as `prec` rounds
    /// activations ([`Backend::linear_act`], which may run it as a BF16 matmul).
    pub fn linear_act(&self, be: &B, x: &B::Tensor, prec: Precision) -> Result<B::Tensor> {
        be.linear_act(&prec.linear_input(be, x, self.low_bit)?, &self.w, prec)
    }
}

/// Under the official quantisation, KV rows (window rows and attention-compressor entries,
/// `[rows, width]`, the last `rope` channels rotary) as the official code keeps them: e4m3 per
/// 64 non-rope channels, rope channels BF16 (spec §B.8). The same values as a round trip
/// through the `fp8` row format, so the state then holds them exactly in any row format.
pub fn kv_row_quant<B: Backend>(be: &B, rows: &B::Tensor, rope: usize, prec: Precision) -> Result<B::Tensor> {
    if prec.simulates_quant() {
        be.fake_quant(rows, FakeQuant::KvRow { rope })
    } else {
        Ok(rows.clone())
    }
}

/// The official indexer's query and key treatment (spec §B.8; official `rotate_activation`
/// then `fp4_act_quant`): a normalised Hadamard transform over each head's channels (`x`'s last
/// axis), rounded to BF16 where `prec` rounds, then e2m1 fake-quantisation in blocks of 32.
pub fn rotate_and_quantise<B: Backend>(be: &B, x: &B::Tensor, prec: Precision) -> Result<B::Tensor> {
    let rotated = prec.act_of(be, be.hadamard(x))?;
    be.fake_quant(&rotated, FakeQuant::INDEXER)
}

/// The per-head query norm as the official code computes it on a BF16 query `q` `[T, H, d]`:
/// `q *= rsqrt(q.square().mean(-1) + eps)` in BF16 arithmetic, every step's result cast (the
/// squares, their mean, the sum with eps, the rsqrt, the product), each step computed in f32
/// as torch's BF16 ops do. Used by `official` ([`Precision::bf16_head_norm`]); the other modes
/// normalise in f32 (`rms_norm`) and cast once.
pub fn head_norm_bf16<B: Backend>(be: &B, q: &B::Tensor, eps: f32) -> Result<B::Tensor> {
    let axis = q.shape().len().saturating_sub(1);
    let squares = be.round_to_bf16(&be.unary(q, UnaryOp::Square)?)?;
    let mean = be.round_to_bf16(&be.reduce(&squares, axis, ReduceOp::Mean)?)?;
    let shifted = be.round_to_bf16(&be.affine(&mean, 1.0, eps)?)?;
    let scale = be.round_to_bf16(&be.unary(&shifted, UnaryOp::Rsqrt)?)?;
    be.round_to_bf16(&be.binary(q, &scale, BinaryOp::Mul)?)
}
