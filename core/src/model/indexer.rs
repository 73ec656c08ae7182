//! Lightning indexer (spec §B.4.4): on CSA layers, scores every compressed entry for every
//! query with a cheap multi-head ReLU dot product and keeps the top `index_topk`.

use std::ops::Range;

use crate::backend::DeviceTensor;
use crate::backend::{composed, Backend, IndexScores};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::compressor::Compressor;
use crate::model::loader::Loader;
use crate::model::official::{rotate_and_quantise, Proj};
use crate::precision::Precision;

pub struct Indexer<B: Backend> {
    wq_b: Proj<B>,
    weights_proj: B::Weight,
    pub compressor: Compressor<B>,
    n_heads: usize,
    head_dim: usize,
    pub topk: usize,
}

impl<B: Backend> Indexer<B> {
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, prefix: &str, ratio: usize) -> Result<Self> {
        let (nh, dh) = (cfg.index_n_heads, cfg.index_head_dim);
        Ok(Indexer {
            wq_b: ld.proj(&format!("{prefix}.wq_b.weight"), &[nh * dh, cfg.q_lora_rank])?,
            weights_proj: ld.weight(&format!("{prefix}.weights_proj.weight"), &[nh, cfg.hidden_size])?,
            compressor: Compressor::load(ld, cfg, &format!("{prefix}.compressor"), ratio, true, dh)?.rotated(),
            n_heads: nh,
            head_dim: dh,
            topk: cfg.index_topk,
        })
    }

    /// Selects compressed entries for the queries of one sequence.
    ///
    /// * `x` `[S, D]` attention input, `q_res` `[S, q_lora]` normalised query latent,
    /// * `cos`/`sin` compress-table angles at the query positions,
    /// * the sequence's indexer keys are rows `key_rows` `[N]` of the pool `keys`; `visible[i]`
    ///   = how many of them query i may see (causality); `offset` = where the attention entries
    ///   start in the kv pool (an entry's kv-pool row is its key row + offset).
    ///
    /// Returns `[S, min(topk, N)]` kv-pool rows, `-1` for picks that are not visible.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &self,
        be: &B,
        x: &B::Tensor,
        q_res: &B::Tensor,
        cos: &B::Tensor,
        sin: &B::Tensor,
        keys: &B::Pool,
        key_rows: &B::Index,
        visible: &[usize],
        offset: usize,
        prec: Precision,
    ) -> Result<B::Index> {
        let s = x.shape()[0];
        // The reshaped query holds its buffer alone (the projection's tensor is a temporary),
        // so `rope_owned` can rotate it in place.
        let q = be.reshape(&self.wq_b.linear_act(be, q_res, prec)?, &[s, self.n_heads, self.head_dim])?;
        let q = prec.act_of(be, be.rope_owned(q, cos, sin, false))?;
        // The official query: rotated, then e2m1 fake-quantised per 32 channels (spec §B.8).
        let q = if prec.simulates_quant() { rotate_and_quantise(be, &q, prec)? } else { q };
        let w = be.linear_act(x, &self.weights_proj, prec)?;
        let valid: Vec<Range<usize>> = visible.iter().map(|&v| 0..v).collect();
        let k = self.topk.min(key_rows.numel());
        if prec.bf16_index_scores() {
            // The official BF16 einsum: the weights carry the softmax scale too
            // (`weights_proj(x) · softmax_scale · n_heads^-1/2`), spec §B.8.
            let scale = ((self.head_dim as f64).powf(-0.5) * (self.n_heads as f64).powf(-0.5)) as f32;
            let w = prec.act_of(be, be.affine(&w, scale, 0.0))?;
            return composed::indexer_select(be, &q, keys, key_rows, &w, &valid, k, offset as i32, IndexScores::Bf16);
        }
        let w = prec.act_of(be, be.affine(&w, (self.n_heads as f32).powf(-0.5), 0.0))?;
        be.indexer_select(&q, keys, key_rows, &w, &valid, k, offset as i32, prec)
    }
}
