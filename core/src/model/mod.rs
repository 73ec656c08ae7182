//! The DeepSeek-V4 graph, one module per block as the paper names them:
//! [`mhc`] (hyper-connections), [`attention`] with its [`compressor`] and [`indexer`],
//! [`moe`], and the model root here (embedding, layer stack, head).

pub mod attention;
pub mod batch;
pub mod compressor;
pub mod indexer;
pub mod loader;
pub mod mhc;
pub mod moe;
pub mod mtp;
pub mod official;
pub mod rope;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvConfig, KvDtype, LayerPools, Sequence, StepPlan};
use crate::parallel::RankContext;
use crate::precision::Precision;
use attention::{Attention, StepAngles};
use batch::Batch;
use loader::{Loader, Progress};
use mhc::{HyperConnection, HyperHead};
use moe::Moe;
use rope::RopeTable;

/// One decoder block: attention and MoE, each wrapped in its own hyper-connection.
pub struct Block<B: Backend> {
    attn_hc: HyperConnection<B>,
    attn_norm: B::Tensor,
    pub attn: Attention<B>,
    ffn_hc: HyperConnection<B>,
    ffn_norm: B::Tensor,
    moe: Moe<B>,
    eps: f32,
}

impl<B: Backend> Block<B> {
    fn load(ld: &mut Loader<B>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        Self::load_at(ld, cfg, &format!("layers.{layer}"), cfg.attention[layer], cfg.routing[layer])
    }

    /// The block whose tensors live under `p` (`layers.3`, `mtp.0`), with `kind` attention and
    /// `routing` MoE.
    fn load_at(
        ld: &mut Loader<B>,
        cfg: &ModelConfig,
        p: &str,
        kind: crate::config::AttentionKind,
        routing: crate::config::RoutingKind,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Block {
            attn_hc: HyperConnection::load(ld, cfg, &format!("{p}.hc_attn"))?,
            attn_norm: ld.tensor(&format!("{p}.attn_norm.weight"), &[d])?,
            attn: Attention::load_at(ld, cfg, &format!("{p}.attn"), kind)?,
            ffn_hc: HyperConnection::load(ld, cfg, &format!("{p}.hc_ffn"))?,
            ffn_norm: ld.tensor(&format!("{p}.ffn_norm.weight"), &[d])?,
            moe: Moe::load_at(ld, cfg, &format!("{p}.ffn"), routing)?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Streams `[T, n, D]` → streams `[T, n, D]`. `most_tokens`: see [`Moe::forward`].
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        batch: &Batch,
        angles: &StepAngles<B>,
        plan: &StepPlan<B>,
        pools: &mut LayerPools<B>,
        most_tokens: usize,
        prec: Precision,
    ) -> Result<(B::Tensor, Option<B::Index>)> {
        let (h, mix) = self.attn_hc.pre(be, x, prec)?;
        let h = prec.act_of(be, be.rms_norm(&h, Some(&self.attn_norm), self.eps))?;
        let (y, picks) = self.attn.forward(be, &h, angles, plan, pools, prec)?;
        let x = self.attn_hc.post(be, x, &y, &mix, prec)?;
        let (h, mix) = self.ffn_hc.pre(be, &x, prec)?;
        let h = prec.act_of(be, be.rms_norm(&h, Some(&self.ffn_norm), self.eps))?;
        let y = self.moe.forward(be, &h, &batch.tokens, most_tokens, prec)?;
        Ok((self.ffn_hc.post(be, &x, &y, &mix, prec)?, picks))
    }
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    /// The embedding table (this rank's block of vocabulary rows when the vocabulary is split).
    embed: B::Weight,
    /// None when the head is tied to the embedding.
    head: Option<B::Weight>,
    /// This rank's place in a multi-device run ([`crate::parallel`]); single on one device.
    pub rank: RankContext<B>,
    norm: B::Tensor,
    hc_head: HyperHead<B>,
    pub blocks: Vec<Block<B>>,
    /// The multi-token-prediction block, when the checkpoint ships one: the draft model of
    /// speculative decoding ([`crate::speculative`]); prefill and decode do not read it.
    pub mtp: Option<mtp::Mtp<B>>,
    rope_main: RopeTable,
    rope_compress: RopeTable,
    /// The activation precision every forward pass runs in ([`crate::precision`]); f32 unless
    /// set after loading.
    pub precision: Precision,
    /// (linears whose input the official quantisation may quantise, how many of them the
    /// checkpoint stores FP8/FP4): only the latter get e4m3 inputs under `official`.
    pub low_bit_linears: (usize, usize),
}

/// Optional per-layer outputs of a forward pass, for conformance checks.
pub struct Trace<B: Backend> {
    pub embed: Option<B::Tensor>,
    /// The residual streams `[T, n, D]` after each block.
    pub layers: Vec<B::Tensor>,
    /// Per block, the lightning indexer's picks `[T, k]` (key-pool rows, `-1` = none) on CSA
    /// layers once a compression window is complete; None elsewhere.
    pub indexer_picks: Vec<Option<B::Index>>,
}

impl<B: Backend> Default for Trace<B> {
    fn default() -> Self {
        Trace { embed: None, layers: vec![], indexer_picks: vec![] }
    }
}

impl<B: Backend> Model<B> {
    /// Uploads every tensor the config calls for; `progress` sees each tensor as it lands. A
    /// shape or missing-tensor error says which shape fields the config only assumed
    /// ([`ModelConfig::assumed_defaults_note`]).
    pub fn load(be: &B, cfg: ModelConfig, ckpt: &Checkpoint, progress: Progress) -> Result<Self> {
        Self::load_rank(be, cfg, ckpt, progress, RankContext::single())
    }

    /// [`Model::load`] of one rank's part of the model for a multi-device run: the rank's
    /// vocabulary rows, heads and experts ([`crate::parallel`]). With several ranks the MTP
    /// block is not loaded (speculative decoding runs on one device).
    pub fn load_rank(
        be: &B,
        cfg: ModelConfig,
        ckpt: &Checkpoint,
        progress: Progress,
        rank: RankContext<B>,
    ) -> Result<Self> {
        let note = cfg.assumed_defaults_note();
        Self::load_on(Loader::for_rank(be, ckpt, progress, rank), cfg).map_err(|e| match &note {
            Some(note) => e.with_config_note(note),
            None => e,
        })
    }

    fn load_on(mut ld: Loader<B>, cfg: ModelConfig) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let vocab = ld.rank.layout.vocab(&cfg);
        let embed = ld.weight_rows("embed.weight", &[v, d], vocab.clone())?;
        // Tied embeddings: transformers uses the embedding as the head (and does not save it).
        let head = if cfg.tie_word_embeddings { None } else { Some(ld.weight_rows("head.weight", &[v, d], vocab)?) };
        let blocks = (0..cfg.num_layers).map(|i| Block::load(&mut ld, &cfg, i)).collect::<Result<Vec<_>>>()?;
        let (norm, hc_head) = (ld.tensor("norm.weight", &[d])?, HyperHead::load(&mut ld, &cfg, "")?);
        let mtp = if ld.rank.layout.is_single() {
            mtp::load_mtp(&mut ld, &cfg)?
        } else {
            // Counted as loaded, so a rank's progress still ends at 100%.
            let mtp_tensors = ld.ckpt.tensors().filter(|t| t.name.starts_with("mtp.")).count();
            ld.skip(mtp_tensors);
            None
        };
        Ok(Model {
            embed,
            head,
            rank: ld.rank.clone(),
            norm,
            hc_head,
            mtp,
            blocks,
            rope_main: RopeTable::new(&cfg.rope_main, cfg.rope_dim),
            rope_compress: RopeTable::new(&cfg.rope_compress, cfg.rope_dim),
            precision: Precision::F32,
            low_bit_linears: ld.projs,
            cfg,
        })
    }

    /// A decoding-state pool on `be` (see [`KvConfig`] for sizing it).
    pub fn new_cache(&self, be: &B, config: KvConfig) -> Result<KvCache<B>> {
        KvCache::new(be, &self.cfg, config)
    }

    fn check_batch(&self, batch: &Batch, seqs: &[&mut Sequence]) -> Result<()> {
        if seqs.len() != batch.seqs.len() {
            return Err(Error::Input(format!("{} sequences but {} states", batch.seqs.len(), seqs.len())));
        }
        for (k, st) in seqs.iter().enumerate() {
            if batch.start(k) != st.pos() {
                return Err(Error::Input(format!(
                    "sequence {k} continues at position {} but its state has seen {} tokens",
                    batch.start(k),
                    st.pos()
                )));
            }
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (ids must be below {})",
                self.cfg.vocab_size
            )));
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p >= self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "the sequence reaches position {p}, past the model's context of {} tokens",
                    self.cfg.max_position_embeddings
                )));
            }
        }
        Ok(())
    }

    /// Whole-prompt forward of every sequence in `batch` (all starting at position 0):
    /// logits `[T, vocab]` for every token.
    pub fn forward(&self, be: &B, batch: &Batch) -> Result<B::Tensor> {
        self.forward_traced(be, batch, None)
    }

    /// [`forward`](Self::forward) on a temporary pool sized for the batch, in the precision's
    /// default row format ([`Precision::default_kv_dtype`]: f32, or fp8/bf16 under the official
    /// quantisation), recording per-layer outputs in `trace`.
    pub fn forward_traced(&self, be: &B, batch: &Batch, trace: Option<&mut Trace<B>>) -> Result<B::Tensor> {
        self.forward_with(be, batch, self.precision.default_kv_dtype(be), trace)
    }

    /// Whole-prompt forward with the decoding state in `dtype` (the pool's rounding applies to
    /// the keys attention reads, as in a served run).
    pub fn forward_with(
        &self,
        be: &B,
        batch: &Batch,
        dtype: KvDtype,
        trace: Option<&mut Trace<B>>,
    ) -> Result<B::Tensor> {
        let longest = batch.seqs.iter().map(|r| r.len()).max().unwrap_or(0);
        let config = KvConfig::for_sequences(&self.cfg, dtype, batch.seqs.len(), longest, longest);
        let mut cache = self.new_cache(be, config)?;
        let mut seqs: Vec<Sequence> = batch.seqs.iter().map(|_| cache.new_sequence()).collect();
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        Ok(self.step_inner(be, batch, &mut cache, &mut refs, Some(Logits::All), trace)?.0)
    }

    /// One step: sequence k of `batch` continues from `seqs[k]` in `cache`, and is advanced.
    /// If the step fails, the sequences of the batch are left unusable (release them); no other
    /// sequence of the cache is touched.
    pub fn step(
        &self,
        be: &B,
        batch: &Batch,
        cache: &mut KvCache<B>,
        seqs: &mut [&mut Sequence],
        logits: Logits,
    ) -> Result<B::Tensor> {
        Ok(self.step_inner(be, batch, cache, seqs, Some(logits), None)?.0)
    }

    /// [`step`](Self::step), also returning the residual streams after the last block, before
    /// `hc_head` `[T, n, D]`: the input of the MTP block (spec §D.5) for speculative decoding.
    pub fn step_with_residual(
        &self,
        be: &B,
        batch: &Batch,
        cache: &mut KvCache<B>,
        seqs: &mut [&mut Sequence],
        logits: Logits,
    ) -> Result<(B::Tensor, B::Tensor)> {
        self.step_inner(be, batch, cache, seqs, Some(logits), None)
    }

    /// [`step_with_residual`](Self::step_with_residual) with logits for the batch rows `rows`
    /// only (`[rows.len(), vocab]`): a batch of speculative verify steps and prefill chunks
    /// needs every verified row of the former and the last row of the latter.
    pub fn step_rows(
        &self,
        be: &B,
        batch: &Batch,
        cache: &mut KvCache<B>,
        seqs: &mut [&mut Sequence],
        rows: &[usize],
    ) -> Result<(B::Tensor, B::Tensor)> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch.len()) {
            return Err(Error::Input(format!("logits row {bad} of a {}-token step", batch.len())));
        }
        let (_, residual) = self.step_inner(be, batch, cache, seqs, None, None)?;
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let x = be.index_select(&residual, &be.upload_index(&idx, &[idx.len()])?)?;
        Ok((self.logits(be, &self.hc_head, &self.norm, &x)?, residual))
    }

    fn step_inner(
        &self,
        be: &B,
        batch: &Batch,
        cache: &mut KvCache<B>,
        seqs: &mut [&mut Sequence],
        logits: Option<Logits>,
        mut trace: Option<&mut Trace<B>>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        self.check_batch(batch, seqs)?;
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Input(format!(
                "the KV cache has {} layers but the model {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let plan = cache.plan_step(be, batch, seqs)?;
        let (t, n, d) = (batch.len(), self.cfg.hc_mult, self.cfg.hidden_size);
        let most_tokens = self.most_tokens_of_group(be, t)?;
        let ids: Vec<i32> = batch.tokens.iter().map(|&x| x as i32).collect();
        let prec = self.precision;
        let e = prec.act_of(be, self.embed(be, &ids))?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.embed = Some(e.clone());
        }
        // The residual starts as n identical copies of the embedding.
        let copies: Vec<&B::Tensor> = std::iter::repeat_n(&e, n).collect();
        let mut x = be.reshape(&be.concat(&copies, 1)?, &[t, n, d])?;
        let main = StepAngles::new(be, self.rope_main.clone(), &batch.positions)?;
        let compress = StepAngles::new(be, self.rope_compress.clone(), &batch.positions)?;
        for (block, pools) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let angles = match block.attn.kind {
                crate::config::AttentionKind::Sliding => &main,
                _ => &compress,
            };
            let picks;
            (x, picks) = block.forward(be, &x, batch, angles, &plan, pools, most_tokens, prec)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.layers.push(x.clone());
                tr.indexer_picks.push(picks);
            }
        }
        cache.finish_step(batch, seqs);
        let residual = x.clone();
        match logits {
            Some(Logits::All) => {}
            Some(Logits::LastPerSequence) => {
                let last: Vec<i32> = batch.seqs.iter().map(|r| (r.end - 1) as i32).collect();
                x = be.index_select(&x, &be.upload_index(&last, &[last.len()])?)?;
            }
            // The caller picks the rows that get logits.
            None => return Ok((residual.clone(), residual)),
        }
        Ok((self.logits(be, &self.hc_head, &self.norm, &x)?, residual))
    }

    /// Data-parallel attention ([`crate::parallel::ParallelLayout::data_parallel_attention`]):
    /// this rank has no sequence to step while other ranks of its EP group step theirs. Its
    /// experts still serve their tokens, so it joins every layer's MoE exchange with no tokens
    /// of its own (attention, the head and the decoding state are not touched). Every rank of
    /// the EP group calls [`step`](Self::step) (or a sibling) or this, once per step.
    ///
    /// Returns whether some rank of the group had tokens in this step; `false` when the whole
    /// group was idle (nothing was exchanged), which every rank of the group sees alike: a rank
    /// that serves only its experts can step until then, and a rank whose sequences are done
    /// ends such a loop with one idle step.
    ///
    /// # Errors
    /// Not under data-parallel attention, or a failed exchange (on every rank of the group).
    pub fn idle_step(&self, be: &B) -> Result<bool> {
        if !self.rank.layout.layout.data_parallel_attention {
            return Err(Error::Input(
                "idle_step: only ranks of a data-parallel attention layout step without tokens".into(),
            ));
        }
        let most_tokens = self.most_tokens_of_group(be, 0)?;
        if most_tokens == 0 {
            // The whole EP group is idle (every rank saw the same 0): nothing to exchange.
            return Ok(false);
        }
        for block in &self.blocks {
            block.moe.idle(be, most_tokens, self.precision)?;
        }
        Ok(true)
    }

    /// The most tokens any rank of this rank's EP group has in this step: `t` itself unless
    /// attention is data-parallel, where each rank has its own batch and the group agrees on it
    /// with one small all-gather (the fused dispatch kernels size their buffers by it).
    fn most_tokens_of_group(&self, be: &B, t: usize) -> Result<usize> {
        let ep = match &self.rank.ep {
            Some(ep) if self.rank.layout.layout.data_parallel_attention => ep,
            _ => return Ok(t),
        };
        // Token counts are far below 2^24, exact in f32.
        let all = be.download(&ep.all_gather(be, &be.upload(&[t as f32], &[1])?, 0)?)?;
        Ok(all.into_iter().fold(0.0f32, f32::max) as usize)
    }

    /// Logits `[T, vocab]` of residual streams `[T, n, D]`: `hc_head`, the final norm, the head
    /// (the main model's, or the MTP block's own `hc_head` and `norm` before the shared head).
    fn logits(&self, be: &B, hc_head: &HyperHead<B>, norm: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let prec = self.precision;
        // The collapsed stream is cast before the final norm, as the official `hc_head` returns it.
        let collapsed = prec.act_of(be, hc_head.forward(be, x))?;
        let h = be.rms_norm(&collapsed, Some(norm), self.cfg.rms_norm_eps as f32);
        let h = prec.act_of(be, h)?;
        let logits = be.linear(&h, self.head.as_ref().unwrap_or(&self.embed))?;
        // A split vocabulary: each rank has its block of logit columns (`ParallelHead`).
        match &self.rank.tp {
            Some(tp) => tp.all_gather(be, &logits, 1),
            None => Ok(logits),
        }
    }

    /// Embedding rows `[T, D]` of the token ids. With the vocabulary split over the TP group
    /// (`ParallelEmbedding`), each rank looks up the ids in its block, zeroes the other rows,
    /// and the group sums: one rank contributes each row, so the sum is exact.
    fn embed(&self, be: &B, ids: &[i32]) -> Result<B::Tensor> {
        let t = ids.len();
        let Some(tp) = &self.rank.tp else {
            return be.embedding(&self.embed, &be.upload_index(ids, &[t])?);
        };
        let vocab = self.rank.layout.vocab(&self.cfg);
        let held = |id: i32| vocab.contains(&(id as usize));
        let local: Vec<i32> = ids.iter().map(|&id| if held(id) { id - vocab.start as i32 } else { 0 }).collect();
        let mask: Vec<f32> = ids.iter().map(|&id| if held(id) { 1.0 } else { 0.0 }).collect();
        let rows = be.embedding(&self.embed, &be.upload_index(&local, &[t])?)?;
        let rows = be.binary(&rows, &be.upload(&mask, &[t, 1])?, crate::backend::BinaryOp::Mul)?;
        tp.all_reduce_sum(be, &rows)
    }
}

/// Which rows of the step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every token (`[T, vocab]`).
    All,
    /// The last token of each sequence (`[sequences, vocab]`), what decoding needs.
    LastPerSequence,
}
