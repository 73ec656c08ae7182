//! KV compressor (spec §B.4.3): every `ratio` consecutive tokens are pooled into one entry by
//! a per-channel softmax over learned scores.
//!
//! * HCA (no overlap): entry w pools the `ratio` tokens of window w.
//! * CSA (overlap): each token projects to two halves; entry w pools the first halves of
//!   window w−1 and the second halves of window w (2·ratio candidates, stride `ratio`).
//!
//! Entries are RMS-normed and roped (compress table) at the position of their window's first
//! token. Tokens of an incomplete trailing window are not pooled.

use crate::backend::DeviceTensor;
use crate::backend::{Backend, BinaryOp};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::loader::Loader;
use crate::model::rope::RopeTable;

pub struct Compressor<B: Backend> {
    wkv: B::Weight,
    wgate: B::Weight,
    /// Position bias added to the scores, `[ratio, c·dim]` (`ape`).
    ape: B::Tensor,
    norm: B::Tensor,
    pub ratio: usize,
    pub overlap: bool,
    /// Width of one entry.
    pub dim: usize,
    eps: f32,
}

impl<B: Backend> Compressor<B> {
    pub fn load(
        ld: &mut Loader<B>,
        cfg: &ModelConfig,
        prefix: &str,
        ratio: usize,
        overlap: bool,
        dim: usize,
    ) -> Result<Self> {
        let width = if overlap { 2 * dim } else { dim };
        let d = cfg.hidden_size;
        Ok(Compressor {
            wkv: ld.weight(&format!("{prefix}.wkv.weight"), &[width, d])?,
            wgate: ld.weight(&format!("{prefix}.wgate.weight"), &[width, d])?,
            ape: ld.tensor(&format!("{prefix}.ape"), &[ratio, width])?,
            norm: ld.tensor(&format!("{prefix}.norm.weight"), &[dim])?,
            ratio,
            overlap,
            dim,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Entries of one sequence processed from position 0: x `[S, D]` → `[S / ratio, dim]`,
    /// or None when no window is complete.
    pub fn compress_prefix(&self, be: &B, x: &B::Tensor, rope: &RopeTable) -> Result<Option<B::Tensor>> {
        let (m, dc) = (self.ratio, self.dim);
        let windows = x.shape()[0] / m;
        if windows == 0 {
            return Ok(None);
        }
        let width = if self.overlap { 2 * dc } else { dc };
        let xs = be.narrow(x, 0, 0, windows * m)?;
        let kv = be.reshape(&be.linear(&xs, &self.wkv)?, &[windows, m, width])?;
        let score = be.reshape(&be.linear(&xs, &self.wgate)?, &[windows, m, width])?;
        let score = be.binary(&score, &be.reshape(&self.ape, &[1, m, width])?, BinaryOp::Add)?;
        let (kv, score) = if self.overlap { self.overlap_candidates(be, &kv, &score, windows)? } else { (kv, score) };
        let pooled = be.compressor_pool(&kv, &score)?; // [W, dc]
        let normed = be.rms_norm(&pooled, Some(&self.norm), self.eps)?;
        let positions: Vec<usize> = (0..windows).map(|w| w * m).collect();
        let (cos, sin) = rope.cos_sin(&positions);
        let half = rope.inv_freq.len();
        let cos = be.upload(&cos, &[windows, half])?;
        let sin = be.upload(&sin, &[windows, half])?;
        let roped = be.rope(&be.reshape(&normed, &[windows, 1, dc])?, &cos, &sin, false)?;
        Ok(Some(be.reshape(&roped, &[windows, dc])?))
    }

    /// CSA candidate layout `[W, 2m, dc]`: rows 0..m are the first halves of the previous
    /// window (zero content, −inf score for window 0), rows m..2m the second halves of this one.
    fn overlap_candidates(
        &self,
        be: &B,
        kv: &B::Tensor,
        score: &B::Tensor,
        windows: usize,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let (m, dc) = (self.ratio, self.dim);
        let shift = |t: &B::Tensor, fill: f32| -> Result<B::Tensor> {
            let first = be.narrow(t, 2, 0, dc)?;
            let pad = be.full(&[1, m, dc], fill)?;
            if windows == 1 {
                Ok(pad)
            } else {
                be.concat(&[&pad, &be.narrow(&first, 0, 0, windows - 1)?], 0)
            }
        };
        let kv2 = be.concat(&[&shift(kv, 0.0)?, &be.narrow(kv, 2, dc, dc)?], 1)?;
        let score2 = be.concat(&[&shift(score, f32::NEG_INFINITY)?, &be.narrow(score, 2, dc, dc)?], 1)?;
        Ok((kv2, score2))
    }
}
