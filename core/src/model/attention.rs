//! V4 attention (spec §B.4): low-rank queries, one shared K=V head, partial interleaved RoPE,
//! a sliding window of raw keys plus (on CSA/HCA layers) compressed entries, per-head sinks,
//! inverse RoPE on the output and the grouped output projection.

use crate::backend::Backend;
use crate::backend::DeviceTensor;
use crate::config::{AttentionKind, ModelConfig};
use crate::error::{Error, Result};
use crate::kv::{KindPlan, LayerPools, StepPlan};
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::loader::Loader;
use crate::model::official::{head_norm_bf16, kv_row_quant, Proj};
use crate::model::rope::RopeTable;
use crate::parallel::Communicator;
use crate::precision::Precision;
use std::sync::Arc;

/// cos/sin of one rope table at the batch's token positions.
pub struct StepAngles<B: Backend> {
    pub table: RopeTable,
    pub cos: B::Tensor,
    pub sin: B::Tensor,
}

impl<B: Backend> StepAngles<B> {
    pub fn new(be: &B, table: RopeTable, positions: &[usize]) -> Result<Self> {
        let (c, s) = table.cos_sin(positions);
        let half = table.inv_freq.len();
        Ok(StepAngles {
            cos: be.upload(&c, &[positions.len(), half])?,
            sin: be.upload(&s, &[positions.len(), half])?,
            table,
        })
    }

    /// The angles of rows `rows` of the batch.
    pub fn rows(&self, be: &B, rows: std::ops::Range<usize>) -> Result<(B::Tensor, B::Tensor)> {
        Ok((be.narrow(&self.cos, 0, rows.start, rows.len())?, be.narrow(&self.sin, 0, rows.start, rows.len())?))
    }
}

pub struct Attention<B: Backend> {
    pub kind: AttentionKind,
    wq_a: Proj<B>,
    q_norm: B::Tensor,
    wq_b: Proj<B>,
    wkv: Proj<B>,
    kv_norm: B::Tensor,
    wo_a: B::Weight,
    wo_b: Proj<B>,
    sinks: B::Tensor,
    compressor: Option<Compressor<B>>,
    indexer: Option<Indexer<B>>,
    /// The heads and output groups this rank computes (all of them on one device).
    n_heads: usize,
    head_dim: usize,
    groups: usize,
    eps: f32,
    /// The TP group that sums the partial `wo_b` outputs, when heads are split.
    tp: Option<Arc<dyn Communicator<B>>>,
}

impl<B: Backend> Attention<B> {
    /// Decoder layer `layer`'s attention (`layers.{layer}.attn.*`), of the kind the config gives.
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        Self::load_at(ld, cfg, &format!("layers.{layer}.attn"), cfg.attention[layer])
    }

    /// The attention whose tensors live under `p` (`layers.3.attn`, `mtp.0.attn`), of `kind`.
    pub fn load_at(ld: &mut Loader<B>, cfg: &ModelConfig, p: &str, kind: AttentionKind) -> Result<Self> {
        let (d, h, hd, ql) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let (compressor, indexer) = match kind {
            AttentionKind::Sliding => (None, None),
            AttentionKind::Hca { ratio } => {
                (Some(Compressor::load(ld, cfg, &format!("{p}.compressor"), ratio, false, hd)?), None)
            }
            AttentionKind::Csa { ratio } => (
                Some(Compressor::load(ld, cfg, &format!("{p}.compressor"), ratio, true, hd)?),
                Some(Indexer::load(ld, cfg, &format!("{p}.indexer"), ratio)?),
            ),
        };
        // Tensor parallelism (crate::parallel): this rank's heads are whole output groups;
        // wq_b and wo_a are cut by rows, wo_b by columns, the rest is replicated.
        let (heads, groups) = (ld.rank.layout.heads(cfg), ld.rank.layout.groups(cfg));
        let group_rows = groups.start * r..groups.end * r;
        Ok(Attention {
            kind,
            wq_a: ld.proj(&format!("{p}.wq_a.weight"), &[ql, d])?,
            q_norm: ld.tensor(&format!("{p}.q_norm.weight"), &[ql])?,
            wq_b: ld.proj_rows(&format!("{p}.wq_b.weight"), &[h * hd, ql], heads.start * hd..heads.end * hd)?,
            wkv: ld.proj(&format!("{p}.wkv.weight"), &[hd, d])?,
            kv_norm: ld.tensor(&format!("{p}.kv_norm.weight"), &[hd])?,
            wo_a: ld.weight_rows(&format!("{p}.wo_a.weight"), &[g * r, h * hd / g], group_rows.clone())?,
            wo_b: ld.proj_cols(&format!("{p}.wo_b.weight"), &[d, g * r], group_rows)?,
            sinks: ld.tensor_part(&format!("{p}.attn_sink"), &[h], heads.clone())?,
            compressor,
            indexer,
            n_heads: heads.len(),
            head_dim: hd,
            groups: groups.len(),
            eps: cfg.rms_norm_eps as f32,
            tp: ld.rank.tp.clone(),
        })
    }

    /// x `[T, D]` (the attn_norm'ed sub-layer input) → `[T, D]`. The step's K=V rows, the
    /// entries its tokens complete and the compressors' carry are written in place into this
    /// layer's pools (`pools`) at the rows `plan` gives; attention then reads every key from the
    /// pool, so no step copies a sequence's past.
    ///
    /// Also returns, on CSA layers, the lightning indexer's picks as kv-pool rows `[T, k]`
    /// (`-1` = none), for diagnostics such as `dsv4 check`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        angles: &StepAngles<B>,
        plan: &StepPlan<B>,
        pools: &mut LayerPools<B>,
        prec: Precision,
    ) -> Result<(B::Tensor, Option<B::Index>)> {
        let t = x.shape()[0];
        let (h, hd) = (self.n_heads, self.head_dim);
        // In bf16, every projection's, norm's and rotation's output is cast (crate::precision).
        let act = |r: Result<B::Tensor>| prec.act_of(be, r);

        // Queries: low-rank path, per-head unweighted RMSNorm, RoPE on the trailing channels.
        // Under the official quantisation, FP8/FP4 projections see e4m3 inputs (`Proj::linear_act`).
        let q_res = act(be.rms_norm(&self.wq_a.linear_act(be, x, prec)?, Some(&self.q_norm), self.eps))?;
        let q = be.reshape(&self.wq_b.linear_act(be, &q_res, prec)?, &[t, h, hd])?;
        let q = if prec.bf16_head_norm() {
            head_norm_bf16(be, &q, self.eps)?
        } else {
            act(be.rms_norm(&q, None, self.eps))?
        };
        let q = act(be.rope_owned(q, &angles.cos, &angles.sin, false))?;

        // The single shared key/value head, appended to the window rows in place.
        let kv = act(be.rms_norm(&self.wkv.linear_act(be, x, prec)?, Some(&self.kv_norm), self.eps))?;
        let kv = act(be.rope(&be.reshape(&kv, &[t, 1, hd])?, &angles.cos, &angles.sin, false))?;
        let kv = be.reshape(&kv, &[t, hd])?;
        let kv = kv_row_quant(be, &kv, angles.table.inv_freq.len() * 2, prec)?;
        be.pool_write(&mut pools.kv, &plan.window_write, &kv)?;

        // Key set per query: the sliding window, then either every causal HCA entry or the
        // indexer's picks (spec §B.4.5).
        let mut picks = None;
        let idx = match (&self.compressor, &self.indexer) {
            (None, _) => plan.window_keys.clone(),
            (Some(comp), indexer) => {
                let kp = plan.kind(self.kind)?;
                let carry = pools.carry.as_mut().ok_or_else(|| missing(be, "compressor carry"))?;
                for sp in &kp.seqs {
                    let x_s = be.narrow(x, 0, sp.rows.start, sp.rows.len())?;
                    if let Some(entries) = comp.step(be, carry, sp, &x_s, &angles.table, prec)? {
                        let (rows, _) = sp.new_entries.as_ref().ok_or_else(|| missing(be, "entry rows"))?;
                        be.pool_write(&mut pools.kv, rows, &entries)?;
                    }
                }
                match indexer {
                    None => kp.attn_keys.clone().ok_or_else(|| missing(be, "HCA key rows"))?,
                    Some(ix) => {
                        let all = self.select(be, ix, x, &q_res, angles, kp, pools, prec)?;
                        let idx = match &all {
                            Some(p) => be.concat_index(&[&plan.window_keys, p], 1)?,
                            None => plan.window_keys.clone(),
                        };
                        picks = all;
                        idx
                    }
                }
            }
        };
        let out = act(be.sparse_attention(&q, &pools.kv, &idx, &self.sinks, (hd as f32).powf(-0.5), prec))?;

        // Undo the value rotation at the query position, then the grouped output projection.
        let out = act(be.rope_owned(out, &angles.cos, &angles.sin, true))?;
        let grouped = be.reshape(&out, &[t, self.groups, h * hd / self.groups])?;
        let grouped = be.grouped_linear_act(&grouped, &self.wo_a, self.groups, prec)?;
        let r = grouped.shape()[2];
        // wo_a takes no quantised input: the official conversion stores it BF16 (spec §B.8).
        let grouped = be.reshape(&grouped, &[t, self.groups * r])?;
        // Split heads: wo_b is row-parallel, the TP group sums its partial outputs before the
        // rounding point (the official `RowParallelLinear`).
        let y = match &self.tp {
            Some(tp) => act(tp.all_reduce_sum(be, &self.wo_b.linear(be, &grouped, prec)?))?,
            None => self.wo_b.linear_act(be, &grouped, prec)?,
        };
        Ok((y, picks))
    }

    /// CSA: runs the indexer's compressor for every sequence (new keys go into the key pool)
    /// and selects each query's entries; returns the picks of the whole batch as kv-pool rows
    /// `[T, k]` padded with `-1`, or None while no sequence has a complete window.
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        be: &B,
        ix: &Indexer<B>,
        x: &B::Tensor,
        q_res: &B::Tensor,
        angles: &StepAngles<B>,
        kp: &KindPlan<B>,
        pools: &mut LayerPools<B>,
        prec: Precision,
    ) -> Result<Option<B::Index>> {
        let keys = pools.index_keys.as_mut().ok_or_else(|| missing(be, "indexer key pool"))?;
        let carry = pools.index_carry.as_mut().ok_or_else(|| missing(be, "indexer carry"))?;
        let mut selected: Vec<Option<B::Index>> = vec![];
        for sp in &kp.seqs {
            let x_s = be.narrow(x, 0, sp.rows.start, sp.rows.len())?;
            if let Some(new_keys) = ix.compressor.step(be, carry, sp, &x_s, &angles.table, prec)? {
                let (_, rows) = sp.new_entries.as_ref().ok_or_else(|| missing(be, "indexer key rows"))?;
                be.pool_write(keys, rows, &new_keys)?;
            }
            selected.push(match &sp.key_rows {
                None => None,
                Some(key_rows) => {
                    let q_res_s = be.narrow(q_res, 0, sp.rows.start, sp.rows.len())?;
                    let (cos, sin) = angles.rows(be, sp.rows.clone())?;
                    let offset = pools.window_rows;
                    Some(ix.select(be, &x_s, &q_res_s, &cos, &sin, keys, key_rows, &sp.visible, offset, prec)?)
                }
            });
        }
        let width = selected.iter().flatten().map(|s| s.shape()[1]).max().unwrap_or(0);
        if width == 0 {
            return Ok(None);
        }
        // Pad every sequence's picks to a common width with -1 ("no entry").
        let mut parts: Vec<B::Index> = vec![];
        for (sp, sel) in kp.seqs.iter().zip(&selected) {
            let n = sp.rows.len();
            let w = sel.as_ref().map_or(0, |s| s.shape()[1]);
            let pad = (w < width).then(|| be.upload_index(&vec![-1; n * (width - w)], &[n, width - w])).transpose()?;
            parts.push(match (sel, pad) {
                (Some(s), Some(p)) => be.concat_index(&[s, &p], 1)?,
                (Some(s), None) => s.clone(),
                (None, Some(p)) => p,
                (None, None) => unreachable!("width 0 < the common width is always padded"),
            });
        }
        let refs: Vec<&B::Index> = parts.iter().collect();
        Ok(Some(be.concat_index(&refs, 0)?))
    }
}

fn missing<B: Backend>(be: &B, what: &str) -> Error {
    Error::backend(be.name(), format!("attention: the step plan or the layer's pools lack the {what}"))
}
