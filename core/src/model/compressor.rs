//! KV compressor (spec §B.4.3): every `ratio` consecutive tokens are pooled into one entry by
//! a per-channel softmax over learned scores.
//!
//! * HCA (no overlap): entry w pools the `ratio` tokens of window w.
//! * CSA (overlap): each token projects to two halves; entry w pools the first halves of
//!   window w−1 and the second halves of window w (2·ratio candidates, stride `ratio`).
//!
//! Entries are RMS-normed and roped (compress table) at the position of their window's first
//! token. Tokens of an incomplete window wait in the state until the window completes.

use crate::backend::DeviceTensor;
use crate::backend::{Backend, BinaryOp};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::cache::CompressorState;
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

/// Concatenates an optional prefix with `t` along axis 0.
fn prepend<B: Backend>(be: &B, prefix: &Option<B::Tensor>, t: &B::Tensor) -> Result<B::Tensor> {
    match prefix {
        Some(p) => be.concat(&[p, t], 0),
        None => Ok(t.clone()),
    }
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

    fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// Feeds the step's tokens of one sequence, x `[S, D]` at positions `start..start+S`, and
    /// appends every window they complete to `state.entries`.
    pub fn step(
        &self,
        be: &B,
        state: &mut CompressorState<B>,
        x: &B::Tensor,
        start: usize,
        rope: &RopeTable,
    ) -> Result<()> {
        let (m, width) = (self.ratio, self.width());
        let s = x.shape()[0];
        let kv = be.linear(x, &self.wkv)?;
        let ape_rows: Vec<i32> = (start..start + s).map(|p| (p % m) as i32).collect();
        let ape = be.index_select(&self.ape, &be.upload_index(&ape_rows, &[s])?)?;
        let score = be.binary(&be.linear(x, &self.wgate)?, &ape, BinaryOp::Add)?;
        let kv = prepend(be, &state.pending_kv.take(), &kv)?;
        let score = prepend(be, &state.pending_score.take(), &score)?;

        let rows = kv.shape()[0];
        let windows = rows / m;
        let used = windows * m;
        if used < rows {
            state.pending_kv = Some(be.narrow(&kv, 0, used, rows - used)?);
            state.pending_score = Some(be.narrow(&score, 0, used, rows - used)?);
        }
        if windows == 0 {
            return Ok(());
        }
        let kv = be.reshape(&be.narrow(&kv, 0, 0, used)?, &[windows, m, width])?;
        let score = be.reshape(&be.narrow(&score, 0, 0, used)?, &[windows, m, width])?;
        let (kv, score) = if self.overlap { self.overlap_candidates(be, state, &kv, &score)? } else { (kv, score) };
        let pooled = be.compressor_pool(&kv, &score)?; // [W, dim]
        let normed = be.rms_norm(&pooled, Some(&self.norm), self.eps)?;
        let positions: Vec<usize> = (state.windows..state.windows + windows).map(|w| w * m).collect();
        let (cos, sin) = rope.cos_sin(&positions);
        let half = rope.inv_freq.len();
        let cos = be.upload(&cos, &[windows, half])?;
        let sin = be.upload(&sin, &[windows, half])?;
        let roped = be.rope(&be.reshape(&normed, &[windows, 1, self.dim])?, &cos, &sin, false)?;
        let new_entries = be.reshape(&roped, &[windows, self.dim])?;
        state.entries = Some(prepend(be, &state.entries.take(), &new_entries)?);
        state.windows += windows;
        Ok(())
    }

    /// CSA candidate layout `[W, 2m, dim]`: rows 0..m are the first halves of the previous
    /// window (from the state for the step's first window; zero content and −inf score before
    /// the first window of the sequence), rows m..2m the second halves of this one. Leaves the
    /// last window's first halves in the state for the next step.
    fn overlap_candidates(
        &self,
        be: &B,
        state: &mut CompressorState<B>,
        kv: &B::Tensor,
        score: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let (m, dc, windows) = (self.ratio, self.dim, kv.shape()[0]);
        let (prev_kv, prev_score) = match state.overlap.take() {
            Some((k, s)) => (be.reshape(&k, &[1, m, dc])?, be.reshape(&s, &[1, m, dc])?),
            None => (be.full(&[1, m, dc], 0.0)?, be.full(&[1, m, dc], f32::NEG_INFINITY)?),
        };
        let first_kv = be.narrow(kv, 2, 0, dc)?;
        let first_score = be.narrow(score, 2, 0, dc)?;
        let shift = |first: &B::Tensor, prev: &B::Tensor| -> Result<B::Tensor> {
            if windows == 1 {
                Ok(prev.clone())
            } else {
                be.concat(&[prev, &be.narrow(first, 0, 0, windows - 1)?], 0)
            }
        };
        let kv2 = be.concat(&[&shift(&first_kv, &prev_kv)?, &be.narrow(kv, 2, dc, dc)?], 1)?;
        let score2 = be.concat(&[&shift(&first_score, &prev_score)?, &be.narrow(score, 2, dc, dc)?], 1)?;
        state.overlap = Some((
            be.reshape(&be.narrow(&first_kv, 0, windows - 1, 1)?, &[m, dc])?,
            be.reshape(&be.narrow(&first_score, 0, windows - 1, 1)?, &[m, dc])?,
        ));
        Ok((kv2, score2))
    }
}
