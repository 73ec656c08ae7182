//! KV compressor (spec §B.4.3): every `ratio` consecutive tokens are pooled into one entry by
//! a per-channel softmax over learned scores.
//!
//! * HCA (no overlap): entry w pools the `ratio` tokens of window w.
//! * CSA (overlap): each token projects to two halves; entry w pools the first halves of
//!   window w−1 and the second halves of window w (2·ratio candidates, stride `ratio`).
//!
//! Entries are RMS-normed and roped (compress table) at the position of their window's first
//! token. Tokens of an incomplete window wait in the carry (`crate::kv`) until it completes.

use crate::backend::{Backend, DeviceTensor};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv::layout::CompressorShape;
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
        let shape = CompressorShape { ratio: self.ratio, overlap: self.overlap, dim: self.dim };
        let step = sp.compressor_step(&shape, x, &self.wkv, &self.wgate, &self.ape);
        let Some(pooled) = be.compressor_step(&step, carry, prec)? else {
            return Ok(None);
        };
        let m = self.ratio;
        let (w0, w1) = (sp.start / m, (sp.start + x.shape()[0]) / m);
        let windows = w1 - w0;
        if pooled.shape() != [windows, self.dim] {
            return Err(Error::backend(
                be.name(),
                format!("compressor_step returned {:?} for {windows} windows of {}", pooled.shape(), self.dim),
            ));
        }
        // The projections and the pooling stay f32; the entry is cast before its norm (§B.4.3).
        let pooled = prec.act_of(be, Ok(pooled))?; // [W, dim]
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
}
