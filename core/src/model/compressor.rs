//! KV compressor (spec §B.4.3): every `ratio` consecutive tokens are pooled into one entry by
//! a per-channel softmax over learned scores.
//!
//! * HCA (no overlap): entry w pools the `ratio` tokens of window w.
//! * CSA (overlap): each token projects to two halves; entry w pools the first halves of
//!   window w−1 and the second halves of window w (2·ratio candidates, stride `ratio`).
//!
//! Entries are RMS-normed and roped (compress table) at the position of their window's first
//! token. Tokens of an incomplete window wait in the carry (`crate::kv`) until it completes.

use crate::backend::{Backend, BinaryOp, DeviceTensor};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::SeqCompressPlan;
use crate::model::loader::Loader;
use crate::model::official::{kv_row_quant, rotate_and_quantise};
use crate::model::rope::RopeTable;
use crate::precision::Precision;

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
    /// The indexer's compressor: under the official quantisation its entries (the indexer keys)
    /// are Hadamard-rotated and e2m1-quantised (spec §B.8; official `Compressor(rotate=True)`).
    rotate: bool,
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
            rotate: false,
        })
    }

    /// This compressor as the lightning indexer's (its keys rotated and quantised under the
    /// official quantisation).
    pub fn rotated(self) -> Self {
        Compressor { rotate: true, ..self }
    }

    fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// Feeds the step's tokens of one sequence, x `[S, D]` at positions `sp.start..`: reads the
    /// carry (the raw rows of the incomplete window and, with overlap, of the window before it)
    /// from `carry`, writes the carry back at every page end the step crosses and at its end,
    /// and returns the entries of the windows the step completes, `[W, dim]` (normed and roped),
    /// or None if it completes none.
    pub fn step(
        &self,
        be: &B,
        carry: &mut B::Pool,
        sp: &SeqCompressPlan<B>,
        x: &B::Tensor,
        rope: &RopeTable,
        prec: Precision,
    ) -> Result<Option<B::Tensor>> {
        let (m, width, start) = (self.ratio, self.width(), sp.start);
        let s = x.shape()[0];
        let kv = be.linear(x, &self.wkv)?;
        let ape_rows: Vec<i32> = (start..start + s).map(|p| (p % m) as i32).collect();
        let ape = be.index_select(&self.ape, &be.upload_index(&ape_rows, &[s])?)?;
        let score = be.binary(&be.linear(x, &self.wgate)?, &ape, BinaryOp::Add)?;
        // Rows of positions carry_base..start+S.
        let (kv, score) = match &sp.carry_read {
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
        if let Some((src, dst)) = &sp.carry_write {
            let rows = be.concat(&[&be.index_select(&kv, src)?, &be.index_select(&score, src)?], 0)?;
            be.pool_write(carry, dst, &rows)?;
        }
        let (w0, w1) = (start / m, (start + s) / m);
        if w1 == w0 {
            return Ok(None);
        }
        // Every complete window in the rows, as [windows, m, width].
        let base_window = sp.carry_base / m;
        let (total, used) = (w1 - base_window, (w1 - base_window) * m);
        let kv = be.reshape(&be.narrow(&kv, 0, 0, used)?, &[total, m, width])?;
        let score = be.reshape(&be.narrow(&score, 0, 0, used)?, &[total, m, width])?;
        let (kv, score) =
            if self.overlap { self.overlap_candidates(be, &kv, &score, base_window < w0)? } else { (kv, score) };
        let windows = w1 - w0;
        // The projections and the pooling stay f32; the entry is cast before its norm (§B.4.3).
        let pooled = prec.act_of(be, be.compressor_pool(&kv, &score))?; // [W, dim]
        let normed = prec.act_of(be, be.rms_norm(&pooled, Some(&self.norm), self.eps))?;
        let positions: Vec<usize> = (w0..w1).map(|w| w * m).collect();
        let (cos, sin) = rope.cos_sin(&positions);
        let half = rope.inv_freq.len();
        let cos = be.upload(&cos, &[windows, half])?;
        let sin = be.upload(&sin, &[windows, half])?;
        let roped = prec.act_of(be, be.rope(&be.reshape(&normed, &[windows, 1, self.dim])?, &cos, &sin, false))?;
        let entries = be.reshape(&roped, &[windows, self.dim])?;
        if self.rotate && prec.simulates_quant() {
            return Ok(Some(rotate_and_quantise(be, &entries, prec)?));
        }
        Ok(Some(kv_row_quant(be, &entries, 2 * half, prec)?))
    }

    /// CSA candidate layout `[W, 2m, dim]` from complete windows `[n, m, 2·dim]`: rows 0..m are
    /// the first halves of the previous window, rows m..2m the second halves of this one. With
    /// `has_prev` the first of the n windows only supplies first halves (it completed in an
    /// earlier step, W = n − 1); without, the sequence starts here and the window before the
    /// first has zero content and −inf score (W = n).
    fn overlap_candidates(
        &self,
        be: &B,
        kv: &B::Tensor,
        score: &B::Tensor,
        has_prev: bool,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let (m, dc, n) = (self.ratio, self.dim, kv.shape()[0]);
        let candidates = |x: &B::Tensor, fill: f32| -> Result<B::Tensor> {
            let first = be.narrow(x, 2, 0, dc)?;
            let second = be.narrow(x, 2, dc, dc)?;
            let (prev, cur) = if has_prev {
                (be.narrow(&first, 0, 0, n - 1)?, be.narrow(&second, 0, 1, n - 1)?)
            } else {
                let pad = be.full(&[1, m, dc], fill)?;
                let prev = if n == 1 { pad } else { be.concat(&[&pad, &be.narrow(&first, 0, 0, n - 1)?], 0)? };
                (prev, second)
            };
            be.concat(&[&prev, &cur], 1)
        };
        Ok((candidates(kv, 0.0)?, candidates(score, f32::NEG_INFINITY)?))
    }
}
