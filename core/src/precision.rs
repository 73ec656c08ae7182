//! Activation precision: which tensors of the V4 graph are rounded to BF16 between ops.
//!
//! Weights are never affected (they are used in their stored form, spec §D.4). What changes is
//! the dtype of the activations that cross op boundaries:
//!
//! * [`Precision::F32`]: every activation stays f32. The reference the fixtures check (they
//!   were produced by transformers in float64, spec §B.9), and the CPU default.
//! * [`Precision::Bf16`]: what a production deployment computes (spec §B.7): the residual
//!   streams, the embedding, every sub-layer's input and output and every GEMM's input and
//!   output are BF16, with f32 accumulation inside each op; norms, the mHC mixing and Sinkhorn,
//!   the router, the compressor's projections and pooling, attention's softmax and the logits
//!   stay f32. On the CPU the tensors are still stored as f32 holding BF16 values (rounded to
//!   nearest even by [`crate::Backend::round_to_bf16`]), which is numerically the same as
//!   BF16 storage; a backend may store them narrower.
//!
//! The rounding points, in graph order (each is one `round_to_bf16` call in `crate::model`, or
//! its owned form `round_to_bf16_owned` on a fresh result, the same values):
//!
//! | where | tensor rounded |
//! |---|---|
//! | embedding | the looked-up rows (exact for a BF16 table) |
//! | mHC pre (§B.2 step 5) | the collapsed sub-layer input |
//! | attn_norm, ffn_norm, q_norm, kv_norm, the per-head q norm, the final norm | the norm's output |
//! | attention (§B.4) | outputs of wq_a, wq_b, wkv, RoPE on q and kv, the attention output, inverse RoPE, wo_a, wo_b |
//! | compressor (§B.4.3) | the pooled entry (before its norm: "official casts to BF16 before the norm"), the norm's output, RoPE |
//! | indexer (§B.4.4) | outputs of wq_b, RoPE, weights_proj and its scaling |
//! | experts (§B.5) | outputs of w1, w3, the SwiGLU (w2's input), w2; the MoE's output |
//! | mHC post (§B.3) | the new residual streams |
//! | mHC head (§B.6) | the collapsed stream before the final norm (official `hc_head` returns it cast) |
//!
//! Not rounded in `bf16` (f32 as in §B.7): the compressor's `wkv`/`wgate` projections (the
//! official code computes them in fp32 from an fp32 copy of x), the router logits and weights,
//! the mHC `post`/`comb` mixes, index scores (BF16 in the official code, spec §B.8, and in
//! `official`), attention probabilities (the official kernel casts them to BF16
//! before P·V; dsv4's CPU and composed attention keep them f32, Ascend's fused
//! `aclnnSparseFlashMla` rounds them), and the logits.
//!
//! # The official quantisation simulation
//!
//! [`Precision::Official`] (`bf16` plus it) and [`Precision::OfficialF32`] (on f32 activations)
//! add what DeepSeek's own inference computes on top of its BF16 activations (spec §B.8,
//! [`crate::act_quant`]):
//!
//! | where | what |
//! |---|---|
//! | input of every linear whose checkpoint weight is FP8 or FP4 (`wq_a`, `wq_b`, `wkv`, `wo_b`, the indexer's `wq_b`, every expert's `w1`/`w3`/`w2`), not `wo_a` (the official conversion stores it BF16) | e4m3 per 128 values with a power-of-two scale |
//! | routed experts | the routing weight multiplies the SwiGLU output before `w2` (official `Expert.forward`), so `w2`'s input is `q(round(h·g))` |
//! | window KV rows and attention-compressor entries, before they are stored | e4m3 per 64 non-rope channels, rope channels BF16: the `fp8` row format's round trip (so any state format holds them exactly; `fp8` is the default) |
//! | the indexer's queries (after RoPE) and keys (compressor entries after norm and RoPE) | normalised Hadamard transform per head, then e2m1 per 32 values with a power-of-two scale |
//! | index scores (`official` only: they are BF16 because the activations are) | the official BF16 einsum, [`crate::backend::IndexScores::Bf16`] |
//! | the per-head query norm (`official` only, likewise) | BF16 arithmetic: squares, mean, `+ eps`, rsqrt and product each cast ([`crate::model::official::head_norm_bf16`]) |
//!
//! Which linears quantise their input is decided by the checkpoint's stored dtype, as in the
//! official `linear()`: a BF16 checkpoint gets the KV and indexer steps only.

use std::fmt;
use std::str::FromStr;

/// The activation precision of a run (`--precision`). See the module docs for the rounding
/// points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Every activation f32 (the conformance reference).
    #[default]
    F32,
    /// BF16 activations between ops, f32 accumulation, f32 norms/router/mHC (spec §B.7).
    Bf16,
    /// `Bf16` plus the official inference's quantisation simulation (spec §B.8,
    /// [`crate::act_quant`]): what DeepSeek's own code computes.
    Official,
    /// The quantisation simulation of `Official` on f32 activations: no BF16 rounding, so an
    /// f32 engine and a float64 reference agree to ~1e-6 and the simulation itself can be
    /// checked against fixtures; also tells the quantisation's effect apart from BF16's.
    OfficialF32,
}

impl Precision {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [Precision; 4] = [Precision::F32, Precision::Bf16, Precision::Official, Precision::OfficialF32];

    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Official => "official",
            Precision::OfficialF32 => "official-f32",
        }
    }

    /// Whether activations are rounded to BF16 at the rounding points.
    pub fn rounds_to_bf16(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::Official)
    }

    /// Whether the official quantisation simulation runs (spec §B.8): e4m3 inputs of FP8/FP4
    /// linears, the routing weight applied before an expert's w2, the indexer's Hadamard +
    /// e2m1 queries and keys, and fp8-quantised KV rows.
    pub fn simulates_quant(self) -> bool {
        matches!(self, Precision::Official | Precision::OfficialF32)
    }

    /// Whether the lightning indexer's scores are the official BF16 einsum
    /// ([`crate::backend::IndexScores::Bf16`]): `official` only (BF16 activations and the
    /// official numerics); every other mode scores in f32.
    pub fn bf16_index_scores(self) -> bool {
        self == Precision::Official
    }

    /// Whether the per-head query norm runs in BF16 arithmetic, as the official code computes
    /// it on its BF16 query ([`crate::model::official::head_norm_bf16`]): `official` only.
    pub fn bf16_head_norm(self) -> bool {
        self == Precision::Official
    }

    /// The decoding state's row format this mode uses on `be` when none is chosen, always one
    /// that holds the values the mode stores exactly: `f32` for f32 activations; `bf16` for
    /// `bf16` (every row the format applies to, attention rows and indexer keys, is a sub-layer
    /// output already rounded to BF16, and the compressors' carry stays f32 in every format:
    /// measured bit-identical CPU logits with f32 and bf16 states on the fixtures, at half the
    /// memory; it is also what Ascend's BF16 attention kernels read, so there the format also
    /// decides whether they run); under the official quantisation `fp8` (its rows are fp8-quantised before
    /// they are stored) where `be` has fp8 rows, else `bf16` (which holds the same values).
    pub fn default_kv_dtype<B: crate::Backend + ?Sized>(self, be: &B) -> crate::kv::KvDtype {
        use crate::kv::{KvDtype, RowFormat};
        if !self.simulates_quant() {
            if self.rounds_to_bf16() {
                KvDtype::Bf16
            } else {
                KvDtype::F32
            }
        } else if be.supports_row_format(RowFormat::Fp8 { rope: 0 }) {
            KvDtype::Fp8
        } else {
            KvDtype::Bf16
        }
    }

    /// `x` rounded to BF16 when this mode rounds activations, else `x` unchanged (a clone of
    /// the handle, no copy).
    pub fn act<B: crate::Backend + ?Sized>(self, be: &B, x: &B::Tensor) -> crate::Result<B::Tensor> {
        if self.rounds_to_bf16() {
            be.round_to_bf16(x)
        } else {
            Ok(x.clone())
        }
    }

    /// [`Self::act`] of a result, for chaining: `prec.act_of(be, be.linear(x, w))`.
    pub fn act_of<B: crate::Backend + ?Sized>(self, be: &B, x: crate::Result<B::Tensor>) -> crate::Result<B::Tensor> {
        let x = x?;
        if self.rounds_to_bf16() {
            be.round_to_bf16_owned(x)
        } else {
            Ok(x)
        }
    }

    /// The input of a linear as this mode feeds it: e4m3-quantised in blocks of 128
    /// ([`crate::act_quant::FakeQuant::LINEAR_INPUT`]) when the quantisation is simulated and
    /// the weight is stored FP8/FP4 in the checkpoint (`low_bit`), else `x` itself.
    pub fn linear_input<B: crate::Backend + ?Sized>(
        self,
        be: &B,
        x: &B::Tensor,
        low_bit: bool,
    ) -> crate::Result<B::Tensor> {
        if self.simulates_quant() && low_bit {
            be.fake_quant(x, crate::act_quant::FakeQuant::LINEAR_INPUT)
        } else {
            Ok(x.clone())
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Precision::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = Precision::ALL.iter().map(|p| p.name()).collect();
            format!("unknown precision {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// `v` rounded to the nearest BF16 value (ties to even), returned as f32: what every backend's
/// [`crate::Backend::round_to_bf16`] computes per value. NaN stays NaN (quiet), ±inf and ±0
/// stay themselves, values beyond the largest BF16 round to ±inf as the cast does.
#[inline]
pub fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    if v.is_nan() {
        return f32::from_bits((b | 0x0040_0000) & 0xffff_0000);
    }
    let lsb = (b >> 16) & 1;
    f32::from_bits(b.wrapping_add(0x7fff + lsb) & 0xffff_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert_eq!(" BF16 ".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("Official".parse::<Precision>(), Ok(Precision::Official));
        assert!("fp16".parse::<Precision>().unwrap_err().contains("f32, bf16, official, official-f32"));
        assert!(Precision::Official.rounds_to_bf16() && Precision::Official.simulates_quant());
        assert!(!Precision::OfficialF32.rounds_to_bf16() && Precision::OfficialF32.simulates_quant());
        assert_eq!(Precision::default(), Precision::F32);
    }

    #[test]
    fn rounding_is_to_nearest_even_with_the_edges_of_a_cast() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to even.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        // Just above halfway rounds up.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        for v in [0.0f32, -0.0, 1.0, -3.5, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE] {
            assert_eq!(round_bf16(v).to_bits(), v.to_bits(), "{v} is a BF16 value");
        }
        // The largest f32 is past the largest BF16 (0x7f7f·2^16) plus half an ulp: inf.
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-f32::MAX), f32::NEG_INFINITY);
        let nan = round_bf16(f32::from_bits(0x7f80_0001));
        assert!(nan.is_nan() && nan.to_bits() & 0xffff == 0);
        // Against an independent definition: the nearer of the two neighbours, even on a tie.
        let mut s = 0x1234_5678u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = f32::from_bits(s);
            if !v.is_finite() {
                continue;
            }
            let lo = f32::from_bits(s & 0xffff_0000);
            let hi = f32::from_bits((s & 0xffff_0000).wrapping_add(0x1_0000));
            if !hi.is_finite() {
                continue; // the overflow edge is checked above
            }
            let (dl, dh) = ((v as f64 - lo as f64).abs(), (hi as f64 - v as f64).abs());
            let want = if dl < dh || (dl == dh && (s >> 16) & 1 == 0) { lo } else { hi };
            assert_eq!(round_bf16(v).to_bits(), want.to_bits(), "{v:e}");
        }
    }
}
