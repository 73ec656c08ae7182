//! Moves checkpoint tensors onto a backend, checking every shape against the config.
//!
//! Weights are handed over in their stored form ([`StoredWeight`]): the loader works out from
//! each tensor's own dtype and the presence of a `.scale` sibling whether it is a float, FP8
//! block-scaled or packed FP4 matrix (spec §D.4), validates the scale, and leaves the choice
//! of representation to the backend.
//!
//! [`expected_tensors`] lists what loading reads for a config, so that `dsv4 inspect` can say
//! what a checkpoint lacks or has in excess without loading anything; a test checks that the
//! list matches what [`crate::Model::load`] actually fetches.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::{AttentionKind, ModelConfig, RoutingKind};
use crate::error::{Error, Result};
use crate::model::official::Proj;
use crate::parallel::{shard, RankContext};
use crate::quant::scale_name;
use crate::tensor::{StoredWeight, WeightFormat};

/// Called after each tensor is uploaded: (tensors done, tensors total, bytes done).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, u64);

pub struct Loader<'a, B: Backend> {
    pub be: &'a B,
    pub ckpt: &'a Checkpoint,
    done: usize,
    total: usize,
    bytes: u64,
    progress: Progress<'a>,
    /// Linears loaded through [`Loader::proj`], and how many of them are FP8/FP4.
    pub projs: (usize, usize),
    /// The rank this load is for: which parts of split layers to read ([`crate::parallel`]).
    pub rank: RankContext<B>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(be: &'a B, ckpt: &'a Checkpoint, progress: Progress<'a>) -> Self {
        let total = ckpt.len();
        Loader { be, ckpt, done: 0, total, bytes: 0, progress, projs: (0, 0), rank: RankContext::single() }
    }

    /// A loader for one rank of a multi-device run.
    pub fn for_rank(be: &'a B, ckpt: &'a Checkpoint, progress: Progress<'a>, rank: RankContext<B>) -> Self {
        Loader { rank, ..Self::new(be, ckpt, progress) }
    }

    /// Counts tensors this rank does not hold as done, so progress still ends at 100%.
    pub fn skip(&mut self, tensors: usize) {
        self.tick(tensors, 0);
    }

    fn tick(&mut self, tensors: usize, bytes: usize) {
        self.done += tensors;
        self.bytes += bytes as u64;
        (self.progress)(self.done.min(self.total), self.total, self.bytes);
    }

    /// A matrix or table, kept by the backend in its preferred form.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        let stored = stored_weight(self.ckpt, name, shape)?;
        self.upload(&stored)
    }

    /// A linear layer's weight together with its stored form ([`Proj`]).
    pub fn proj(&mut self, name: &str, shape: &[usize]) -> Result<Proj<B>> {
        let stored = stored_weight(self.ckpt, name, shape)?;
        self.proj_of(&stored, stored.clone())
    }

    /// Rows `rows` of the weight `name` (logical shape `shape`), for a layer split by output
    /// rows (column-parallel: `wq_b`, `wo_a`, vocabulary-parallel tables).
    pub fn weight_rows(&mut self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<B::Weight> {
        let whole = stored_weight(self.ckpt, name, shape)?;
        self.upload_part(&whole, &shard::rows(&whole, rows)?)
    }

    /// Uploads a part of `whole`; a part dequantised to F32 at a block boundary still counts
    /// its whole's scale tensor as loaded.
    fn upload_part(&mut self, whole: &StoredWeight, part: &StoredWeight) -> Result<B::Weight> {
        let out = self.upload(part)?;
        if whole.scale.is_some() && part.scale.is_none() {
            self.skip(1);
        }
        Ok(out)
    }

    /// [`Loader::proj`] of rows `rows` (column-parallel linears).
    pub fn proj_rows(&mut self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Proj<B>> {
        let stored = stored_weight(self.ckpt, name, shape)?;
        self.proj_of(&stored, shard::rows(&stored, rows)?)
    }

    /// [`Loader::proj`] of columns `cols` (row-parallel linears: `wo_b`).
    pub fn proj_cols(&mut self, name: &str, shape: &[usize], cols: Range<usize>) -> Result<Proj<B>> {
        let stored = stored_weight(self.ckpt, name, shape)?;
        self.proj_of(&stored, shard::cols(&stored, cols)?)
    }

    /// A part of a stored weight as a [`Proj`] whose low-bit flag is the whole weight's (a part
    /// dequantised at a block boundary still takes the official quantised inputs).
    fn proj_of(&mut self, whole: &StoredWeight, part: StoredWeight) -> Result<Proj<B>> {
        let low_bit = whole.format != WeightFormat::Float;
        self.projs = (self.projs.0 + 1, self.projs.1 + usize::from(low_bit));
        Ok(Proj { w: self.upload_part(whole, &part)?, low_bit })
    }

    /// Uploads an already-described weight (e.g. a slice of a fused expert tensor).
    pub fn upload(&mut self, w: &StoredWeight) -> Result<B::Weight> {
        let out = self.be.upload_weight(w)?;
        self.tick(1 + usize::from(w.scale.is_some()), w.size_bytes());
        Ok(out)
    }

    /// A small parameter used as an f32 activation-side tensor (norm weights, biases, sinks).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        self.tensor_part(name, shape, 0..shape.first().copied().unwrap_or(1))
    }

    /// Elements `part` of the 1-D parameter `name` (a rank's attention sinks), or the whole
    /// tensor when `part` covers it.
    pub fn tensor_part(&mut self, name: &str, shape: &[usize], part: Range<usize>) -> Result<B::Tensor> {
        let t = self.ckpt.require(name, shape)?;
        let mut data = t.to_f32_vec()?;
        let mut shape = shape.to_vec();
        if shape.len() == 1 && part != (0..shape[0]) {
            data = data[part.clone()].to_vec();
            shape[0] = part.len();
        }
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                name: name.into(),
                file: t.source.clone(),
                msg: format!("element {bad} is not finite ({})", data[bad]),
            });
        }
        let out = self.be.upload(&data, &shape)?;
        self.tick(1, t.size_bytes());
        Ok(out)
    }

    /// An integer table kept on the host (e.g. `tid2eid`), range-checked.
    pub fn host_ints(&mut self, name: &str, shape: &[usize], upper: i64) -> Result<Vec<i32>> {
        let t = self.ckpt.require(name, shape)?;
        let v = t.to_i64_vec()?;
        if let Some(bad) = v.iter().position(|&x| x < 0 || x >= upper) {
            return Err(Error::Tensor {
                name: name.into(),
                file: t.source.clone(),
                msg: format!("entry {bad} is {}, outside 0..{upper}", v[bad]),
            });
        }
        self.tick(1, t.size_bytes());
        Ok(v.into_iter().map(|x| x as i32).collect())
    }
}

/// The weight `name` of logical shape `shape` as stored: its data tensor, the stored form
/// detected from its dtype, and its `.scale` sibling when it has one (validated).
pub fn stored_weight(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<StoredWeight> {
    let data = ckpt.get(name).ok_or_else(|| ckpt.missing(name, shape))?;
    let scale = scale_name(name).and_then(|s| ckpt.get(&s));
    StoredWeight::detect(data, scale, shape)
}

/// How loading reads a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A matrix handed to the backend in its stored form (float, FP8 + scale, FP4 + scale).
    Weight,
    /// A small float parameter uploaded as f32 (norms, biases, sinks, mHC base/scale).
    Param,
    /// An integer table kept on the host (`tid2eid`).
    Ints,
    /// transformers' fused expert tensor (`gate_up_proj` / `down_proj`), float only.
    FusedExperts,
}

/// One tensor that loading a config reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Official name.
    pub name: String,
    /// Logical shape (for packed FP4 the stored inner dimension is half of this).
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

struct List<'c> {
    out: Vec<ExpectedTensor>,
    cfg: &'c ModelConfig,
    ckpt: &'c Checkpoint,
}

impl List<'_> {
    fn push(&mut self, name: String, shape: &[usize], role: TensorRole) {
        self.out.push(ExpectedTensor { name, shape: shape.to_vec(), role });
    }

    fn w(&mut self, name: String, shape: &[usize]) {
        self.push(name, shape, TensorRole::Weight)
    }

    fn p(&mut self, name: String, shape: &[usize]) {
        self.push(name, shape, TensorRole::Param)
    }

    fn hc(&mut self, prefix: &str) {
        let (n, d, m) = (self.cfg.hc_mult, self.cfg.hidden_size, self.cfg.hc_mix_dim());
        self.w(format!("{prefix}_fn"), &[m, n * d]);
        self.p(format!("{prefix}_base"), &[m]);
        self.p(format!("{prefix}_scale"), &[3]);
    }

    fn hc_head(&mut self, prefix: &str) {
        let (n, d) = (self.cfg.hc_mult, self.cfg.hidden_size);
        self.w(format!("{prefix}hc_head_fn"), &[n, n * d]);
        self.p(format!("{prefix}hc_head_base"), &[n]);
        self.p(format!("{prefix}hc_head_scale"), &[1]);
    }

    fn compressor(&mut self, prefix: &str, ratio: usize, overlap: bool, dim: usize) {
        let width = if overlap { 2 * dim } else { dim };
        let d = self.cfg.hidden_size;
        self.w(format!("{prefix}.wkv.weight"), &[width, d]);
        self.w(format!("{prefix}.wgate.weight"), &[width, d]);
        self.p(format!("{prefix}.ape"), &[ratio, width]);
        self.p(format!("{prefix}.norm.weight"), &[dim]);
    }

    fn attention(&mut self, p: &str, kind: AttentionKind) {
        let c = self.cfg;
        let (d, h, hd, ql) = (c.hidden_size, c.num_heads, c.head_dim, c.q_lora_rank);
        let (g, r) = (c.o_groups, c.o_lora_rank);
        match kind {
            AttentionKind::Sliding => {}
            AttentionKind::Hca { ratio } => self.compressor(&format!("{p}.compressor"), ratio, false, hd),
            AttentionKind::Csa { ratio } => {
                self.compressor(&format!("{p}.compressor"), ratio, true, hd);
                let (nh, dh) = (c.index_n_heads, c.index_head_dim);
                self.w(format!("{p}.indexer.wq_b.weight"), &[nh * dh, ql]);
                self.w(format!("{p}.indexer.weights_proj.weight"), &[nh, d]);
                self.compressor(&format!("{p}.indexer.compressor"), ratio, true, dh);
            }
        }
        self.w(format!("{p}.wq_a.weight"), &[ql, d]);
        self.p(format!("{p}.q_norm.weight"), &[ql]);
        self.w(format!("{p}.wq_b.weight"), &[h * hd, ql]);
        self.w(format!("{p}.wkv.weight"), &[hd, d]);
        self.p(format!("{p}.kv_norm.weight"), &[hd]);
        self.w(format!("{p}.wo_a.weight"), &[g * r, h * hd / g]);
        self.w(format!("{p}.wo_b.weight"), &[d, g * r]);
        self.p(format!("{p}.attn_sink"), &[h]);
    }

    fn expert(&mut self, p: &str) {
        let (d, i) = (self.cfg.hidden_size, self.cfg.moe_intermediate_size);
        self.w(format!("{p}.w1.weight"), &[i, d]);
        self.w(format!("{p}.w2.weight"), &[d, i]);
        self.w(format!("{p}.w3.weight"), &[i, d]);
    }

    fn moe(&mut self, p: &str, routing: RoutingKind) {
        let c = self.cfg;
        let (d, e, i, k) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok);
        match routing {
            RoutingKind::Hash => self.push(format!("{p}.gate.tid2eid"), &[c.vocab_size, k], TensorRole::Ints),
            RoutingKind::TopK => self.p(format!("{p}.gate.bias"), &[e]),
        }
        if fused_experts(self.ckpt, p) {
            self.push(format!("{p}.experts.gate_up_proj"), &[e, 2 * i, d], TensorRole::FusedExperts);
            self.push(format!("{p}.experts.down_proj"), &[e, d, i], TensorRole::FusedExperts);
        } else {
            for x in 0..e {
                self.expert(&format!("{p}.experts.{x}"));
            }
        }
        self.w(format!("{p}.gate.weight"), &[e, d]);
        self.expert(&format!("{p}.shared_experts"));
    }

    fn block(&mut self, p: &str, attn: AttentionKind, routing: RoutingKind) {
        let d = self.cfg.hidden_size;
        self.hc(&format!("{p}.hc_attn"));
        self.p(format!("{p}.attn_norm.weight"), &[d]);
        self.attention(&format!("{p}.attn"), attn);
        self.hc(&format!("{p}.hc_ffn"));
        self.p(format!("{p}.ffn_norm.weight"), &[d]);
        self.moe(&format!("{p}.ffn"), routing);
    }
}

/// Whether the MoE at `ffn_prefix` (e.g. `layers.3.ffn`) stores its experts fused, as
/// transformers does (`experts.gate_up_proj` `[E, 2I, D]`, `experts.down_proj` `[E, D, I]`).
pub fn fused_experts(ckpt: &Checkpoint, ffn_prefix: &str) -> bool {
    ckpt.contains(&format!("{ffn_prefix}.experts.gate_up_proj"))
}

/// Every tensor [`crate::Model::load`] reads for `cfg` (MTP excluded), in load order. The
/// checkpoint is consulted only for the expert layout (per expert or fused).
pub fn expected_tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Vec<ExpectedTensor> {
    let mut l = List { out: vec![], cfg, ckpt };
    let (v, d) = (cfg.vocab_size, cfg.hidden_size);
    l.w("embed.weight".into(), &[v, d]);
    if !cfg.tie_word_embeddings {
        l.w("head.weight".into(), &[v, d]);
    }
    for layer in 0..cfg.num_layers {
        l.block(&format!("layers.{layer}"), cfg.attention[layer], cfg.routing[layer]);
    }
    l.p("norm.weight".into(), &[d]);
    l.hc_head("");
    l.out
}

/// The MTP layers (`mtp.{i}.*`, `i < num_nextn_predict_layers`) the checkpoint holds any
/// tensor of. MTP weights are optional: transformers drops them when it saves a model.
pub fn mtp_layers_present(cfg: &ModelConfig, ckpt: &Checkpoint) -> Vec<usize> {
    let present: BTreeSet<usize> =
        ckpt.tensors().filter_map(|t| t.name.strip_prefix("mtp.")?.split('.').next()?.parse::<usize>().ok()).collect();
    (0..cfg.num_mtp_layers).filter(|i| present.contains(i)).collect()
}

/// Every tensor of MTP layer `i` (spec §D.5): a sliding-window block with a score-routed
/// MoE, the `e_proj`/`h_proj` input projections, their norms, and its own `hc_head`/`norm`.
/// It has no embedding or head of its own.
pub fn expected_mtp_tensors(cfg: &ModelConfig, ckpt: &Checkpoint, i: usize) -> Vec<ExpectedTensor> {
    let mut l = List { out: vec![], cfg, ckpt };
    let d = cfg.hidden_size;
    let p = format!("mtp.{i}");
    l.w(format!("{p}.e_proj.weight"), &[d, d]);
    l.w(format!("{p}.h_proj.weight"), &[d, d]);
    l.p(format!("{p}.enorm.weight"), &[d]);
    l.p(format!("{p}.hnorm.weight"), &[d]);
    l.block(&p, AttentionKind::Sliding, RoutingKind::TopK);
    l.p(format!("{p}.norm.weight"), &[d]);
    l.hc_head(&format!("{p}."));
    l.out
}

/// Checks one expected tensor the way loading would (presence, dtype, shape, scale), without
/// uploading it. Returns the names it covers (the tensor and its scale, if any).
pub fn check_expected(ckpt: &Checkpoint, e: &ExpectedTensor) -> Result<Vec<String>> {
    match e.role {
        TensorRole::Weight => {
            let w = stored_weight(ckpt, &e.name, &e.shape)?;
            let mut names = vec![e.name.clone()];
            names.extend(w.scale.map(|s| s.name));
            Ok(names)
        }
        TensorRole::Param | TensorRole::FusedExperts => {
            let t = ckpt.require(&e.name, &e.shape)?;
            if !t.dtype.is_float() {
                return Err(t.err(format!("expected a floating-point tensor, found {}", t.dtype)));
            }
            Ok(vec![e.name.clone()])
        }
        TensorRole::Ints => {
            let t = ckpt.require(&e.name, &e.shape)?;
            t.to_i64_vec().map(|_| vec![e.name.clone()])
        }
    }
}
