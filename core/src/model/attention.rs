//! V4 attention (spec §B.4): low-rank queries, one shared K=V head, partial interleaved RoPE,
//! a sliding window of raw keys plus (on CSA/HCA layers) compressed entries, per-head sinks,
//! inverse RoPE on the output and the grouped output projection.

use crate::backend::Backend;
use crate::backend::DeviceTensor;
use crate::config::{AttentionKind, ModelConfig};
use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::cache::LayerState;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::loader::Loader;
use crate::model::rope::RopeTable;

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
    wq_a: B::Weight,
    q_norm: B::Tensor,
    wq_b: B::Weight,
    wkv: B::Weight,
    kv_norm: B::Tensor,
    wo_a: B::Weight,
    wo_b: B::Weight,
    sinks: B::Tensor,
    compressor: Option<Compressor<B>>,
    indexer: Option<Indexer<B>>,
    n_heads: usize,
    head_dim: usize,
    groups: usize,
    window: usize,
    eps: f32,
}

impl<B: Backend> Attention<B> {
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let p = format!("layers.{layer}.attn");
        let (d, h, hd, ql) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let kind = cfg.attention[layer];
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
        Ok(Attention {
            kind,
            wq_a: ld.weight(&format!("{p}.wq_a.weight"), &[ql, d])?,
            q_norm: ld.tensor(&format!("{p}.q_norm.weight"), &[ql])?,
            wq_b: ld.weight(&format!("{p}.wq_b.weight"), &[h * hd, ql])?,
            wkv: ld.weight(&format!("{p}.wkv.weight"), &[hd, d])?,
            kv_norm: ld.tensor(&format!("{p}.kv_norm.weight"), &[hd])?,
            wo_a: ld.weight(&format!("{p}.wo_a.weight"), &[g * r, h * hd / g])?,
            wo_b: ld.weight(&format!("{p}.wo_b.weight"), &[d, g * r])?,
            sinks: ld.tensor(&format!("{p}.attn_sink"), &[h])?,
            compressor,
            indexer,
            n_heads: h,
            head_dim: hd,
            groups: g,
            window: cfg.sliding_window,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// x `[T, D]` (the attn_norm'ed sub-layer input) → `[T, D]`. Sequence k of the batch
    /// continues from `states[k]` (its earlier tokens) and leaves its new state there.
    ///
    /// Also returns, on CSA layers, the lightning indexer's picks as key-pool rows `[T, k]`
    /// (`-1` = none), for diagnostics such as `dsv4 check`.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        batch: &Batch,
        angles: &StepAngles<B>,
        states: &mut [&mut LayerState<B>],
    ) -> Result<(B::Tensor, Option<B::Index>)> {
        let t = batch.len();
        let (h, hd) = (self.n_heads, self.head_dim);

        // Queries: low-rank path, per-head unweighted RMSNorm, RoPE on the trailing channels.
        let q_res = be.rms_norm(&be.linear(x, &self.wq_a)?, Some(&self.q_norm), self.eps)?;
        let q = be.reshape(&be.linear(&q_res, &self.wq_b)?, &[t, h, hd])?;
        let q = be.rope(&be.rms_norm(&q, None, self.eps)?, &angles.cos, &angles.sin, false)?;

        // The single shared key/value head.
        let kv = be.rms_norm(&be.linear(x, &self.wkv)?, Some(&self.kv_norm), self.eps)?;
        let kv = be.reshape(&be.rope(&be.reshape(&kv, &[t, 1, hd])?, &angles.cos, &angles.sin, false)?, &[t, hd])?;

        // Key pool: per sequence, its cached window rows, the step's rows, then all its
        // compressed entries. Key indices are built per query: the sliding window, then
        // either every causal HCA entry or the indexer's picks.
        let mut pool_parts: Vec<B::Tensor> = vec![];
        let mut pool_len = 0usize;
        let mut host_idx: Vec<Vec<i32>> = vec![vec![]; t];
        // Indexer picks per sequence (CSA layers; None where no window is complete yet).
        let mut selected: Vec<Option<B::Index>> = vec![];
        for (rows, st) in batch.seqs.iter().zip(states.iter_mut()) {
            let s = rows.len();
            let start = batch.positions[rows.start];
            let step_kv = be.narrow(&kv, 0, rows.start, s)?;
            let cached = st.window.take();
            let cached_rows = cached.as_ref().map_or(0, |c| c.shape()[0]);
            let all_kv = match &cached {
                Some(c) => be.concat(&[c, &step_kv], 0)?,
                None => step_kv,
            };
            // Row r of all_kv holds position start - cached_rows + r.
            let kv_base = pool_len;
            let first_pos = start - cached_rows;
            for (i, row) in rows.clone().enumerate() {
                let p = start + i;
                let lo = (p + 1).saturating_sub(self.window);
                host_idx[row].extend((lo..=p).map(|q| (kv_base + q - first_pos) as i32));
            }
            let keep = (self.window - 1).min(cached_rows + s);
            st.window = (keep > 0).then(|| be.narrow(&all_kv, 0, cached_rows + s - keep, keep)).transpose()?;
            pool_parts.push(all_kv);
            pool_len += cached_rows + s;

            let Some(comp) = &self.compressor else { continue };
            let x_s = be.narrow(x, 0, rows.start, s)?;
            comp.step(be, &mut st.compressor, &x_s, start, &angles.table)?;
            let Some(entries) = st.compressor.entries.clone() else {
                selected.push(None);
                if let Some(ix) = &self.indexer {
                    ix.compressor.step(be, &mut st.indexer, &x_s, start, &angles.table)?;
                }
                continue;
            };
            let n_entries = entries.shape()[0];
            let comp_base = pool_len;
            pool_parts.push(entries);
            pool_len += n_entries;
            // Entry w is visible to the query at position p iff w < (p + 1) / ratio.
            let visible: Vec<usize> = (start..start + s).map(|p| ((p + 1) / comp.ratio).min(n_entries)).collect();
            match &self.indexer {
                None => {
                    for (i, row) in rows.clone().enumerate() {
                        host_idx[row].extend((0..visible[i]).map(|w| (comp_base + w) as i32));
                    }
                }
                Some(ix) => {
                    ix.compressor.step(be, &mut st.indexer, &x_s, start, &angles.table)?;
                    let keys = st.indexer.entries.clone().ok_or_else(|| {
                        Error::backend(be.name(), "indexer compressor produced no keys for complete windows")
                    })?;
                    let q_res_s = be.narrow(&q_res, 0, rows.start, s)?;
                    let (cos, sin) = angles.rows(be, rows.clone())?;
                    selected.push(Some(ix.select(be, &x_s, &q_res_s, &cos, &sin, &keys, &visible, comp_base)?));
                }
            }
        }

        let width = host_idx.iter().map(|v| v.len()).max().unwrap_or(0);
        let flat: Vec<i32> =
            host_idx.iter().flat_map(|v| v.iter().copied().chain(std::iter::repeat_n(-1, width - v.len()))).collect();
        let mut idx = be.upload_index(&flat, &[t, width])?;
        let selected_width = selected.iter().flatten().map(|s| s.shape()[1]).max().unwrap_or(0);
        let mut picks = None;
        if selected_width > 0 {
            // Pad every sequence's picks to a common width with -1 ("no entry").
            let mut parts: Vec<B::Index> = vec![];
            for (rows, sel) in batch.seqs.iter().zip(&selected) {
                let w = sel.as_ref().map_or(0, |s| s.shape()[1]);
                let pad = (w < selected_width)
                    .then(|| {
                        be.upload_index(&vec![-1; rows.len() * (selected_width - w)], &[rows.len(), selected_width - w])
                    })
                    .transpose()?;
                parts.push(match (sel, pad) {
                    (Some(s), Some(p)) => be.concat_index(&[s, &p], 1)?,
                    (Some(s), None) => s.clone(),
                    (None, Some(p)) => p,
                    (None, None) => unreachable!("width 0 < selected_width is always padded"),
                });
            }
            let refs: Vec<&B::Index> = parts.iter().collect();
            let all = be.concat_index(&refs, 0)?;
            idx = be.concat_index(&[&idx, &all], 1)?;
            picks = Some(all);
        }

        let refs: Vec<&B::Tensor> = pool_parts.iter().collect();
        let pool = be.concat(&refs, 0)?;
        let out = be.sparse_attention(&q, &pool, &idx, &self.sinks, (hd as f32).powf(-0.5))?;

        // Undo the value rotation at the query position, then the grouped output projection.
        let out = be.rope(&out, &angles.cos, &angles.sin, true)?;
        let grouped = be.reshape(&out, &[t, self.groups, h * hd / self.groups])?;
        let grouped = be.grouped_linear(&grouped, &self.wo_a, self.groups)?;
        let r = grouped.shape()[2];
        Ok((be.linear(&be.reshape(&grouped, &[t, self.groups * r])?, &self.wo_b)?, picks))
    }
}
