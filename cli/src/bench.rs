//! `dsv4 bench`: prefill and decode speed at several context lengths, read against the machine's
//! limits measured in the same run ([`dsv4_backend_cpu::machine`]): decode against the read bandwidth (it
//! is memory-bound: every active weight and the decoding state are read per token), prefill
//! against the f32 FMA peak (it is compute-bound), or with `--precision bf16` against the BF16
//! dot-product peak where the CPU has one (BF16 GEMMs multiply in BF16).
//!
//! What one decode token reads ([`active_weights`]), in the checkpoint's stored form (FP8 1
//! byte per value + block scales, FP4 half a byte + scales, BF16 2 bytes, F32 4 bytes), `mtp.*`
//! excluded:
//! * one row of the embedding table (not the table), one row of `tid2eid` per hash layer;
//! * of the routed experts `num_experts_per_tok / n_routed_experts` of their bytes per layer
//!   (hash layers also run k experts);
//! * the shared expert, every other matrix and parameter (attention, compressors, indexer,
//!   mHC, router, norms), and the whole LM head;
//! * plus the bytes the sequence's decoding state holds (`kv held`).
//!
//! What prefill computes ([`prefill_flops`]): 2 FLOP per multiply-add of every active matrix per
//! token (the above without embedding and `tid2eid`: lookups), the head once per chunk (prefill
//! computes logits for the last token of each step only, see `Session::feed`), and attention:
//! 4·heads·head_dim per key a query sees (QKᵀ and PV; window keys plus the compressed entries:
//! every one on HCA layers, the indexer's top-k on CSA layers) plus the indexer's scoring
//! (2·index_heads·index_head_dim per compressed entry) on CSA layers. Norms, RoPE, softmax,
//! routing and the compressors' pooling are not counted.
//!
//! With `--speculative-tokens k` each context also measures speculative decoding (the
//! checkpoint's MTP block drafting k tokens per main-model step) after its plain decode steps,
//! in the same run: the median time of a (k+1)-token verify step against a 1-token step at that
//! context (the verify-cost ratio: what decides the speed-up at a given acceptance), then
//! `--decode-steps` tokens decoded speculatively. The MTP block is fed the main model's residual
//! streams as the sequence grows, outside the timed phases. Acceptance on the bench's
//! pseudo-random prompt says nothing about real text.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dsv4_core::config::AttentionKind;
use dsv4_core::kv::layout::sequence_footprint;
use dsv4_core::kv::{human_bytes, KvCache, KvConfig, KvDtype, Sequence};
use dsv4_core::model::loader::{expected_tensors, stored_weight, TensorRole};
use dsv4_core::model::Logits;
use dsv4_core::parallel::plan::rank_decode_traffic;
use dsv4_core::parallel::{CollectiveKind, ParallelLayout, RankContext, RankLayout, Traffic};
use dsv4_core::profile::Profile;
use dsv4_core::sampling::{argmax, Sampler, SamplingParams};
use dsv4_core::speculative::{SpecStats, Speculator};
use dsv4_core::Precision;
use dsv4_core::{Backend, Batch, Checkpoint, Model, ModelConfig, WeightMemory};
use serde_json::{json, Value};

use crate::kv_args::{self, KvArgs};
use dsv4_backend_cpu::machine::{self, Machine};

/// Weight bytes one decode token reads, by part, and the matrix sizes prefill multiplies by.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveWeights {
    /// One row of `embed.weight` (0 when the head is tied to it: the head reads the table).
    pub embedding_row: f64,
    /// One row of `tid2eid` per hash-routed layer.
    pub tid2eid_rows: f64,
    /// `k / E` of the routed experts' bytes, every layer.
    pub routed_experts: f64,
    pub shared_experts: f64,
    /// Every other tensor the graph reads: attention, compressors, indexer, mHC, router, norms.
    pub dense: f64,
    /// The whole LM head (`head.weight`, or the embedding table when tied).
    pub head: f64,
    /// Multiply-adds per token of the active matrices, head excluded: dense matrices, the shared
    /// expert and k routed experts (`k / E` of the routed matrices' values).
    pub matrix_params: f64,
    /// Multiply-adds of the head per logits row (vocab x hidden).
    pub head_params: f64,
}

impl ActiveWeights {
    /// All the weight bytes one decode token reads.
    pub fn bytes(&self) -> f64 {
        self.embedding_row + self.tid2eid_rows + self.routed_experts + self.shared_experts + self.dense + self.head
    }
}

/// What one decode token reads of the weights of `cfg` in `ckpt` (see the module doc): every
/// tensor that loading reads (`model::loader::expected_tensors`, so no `mtp.*`), at its stored
/// size (data plus `.scale`).
pub fn active_weights(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<ActiveWeights> {
    let mut w = ActiveWeights {
        embedding_row: 0.0,
        tid2eid_rows: 0.0,
        routed_experts: 0.0,
        shared_experts: 0.0,
        dense: 0.0,
        head: 0.0,
        matrix_params: 0.0,
        head_params: (cfg.vocab_size * cfg.hidden_size) as f64,
    };
    let routed_share = cfg.num_experts_per_tok as f64 / cfg.n_routed_experts as f64;
    let vocab = cfg.vocab_size as f64;
    for e in expected_tensors(cfg, ckpt) {
        let bytes = match e.role {
            TensorRole::Weight => stored_weight(ckpt, &e.name, &e.shape)?.size_bytes(),
            TensorRole::Param | TensorRole::Ints | TensorRole::FusedExperts => {
                ckpt.require(&e.name, &e.shape)?.size_bytes()
            }
        } as f64;
        let values = e.shape.iter().product::<usize>() as f64;
        let is_matrix = matches!(e.role, TensorRole::Weight | TensorRole::FusedExperts);
        if e.name == "embed.weight" {
            if cfg.tie_word_embeddings {
                w.head += bytes;
            } else {
                w.embedding_row += bytes / vocab;
            }
        } else if e.name == "head.weight" {
            w.head += bytes;
        } else if e.role == TensorRole::Ints {
            // tid2eid `[vocab, k]`: the token's row.
            w.tid2eid_rows += bytes / vocab;
        } else if e.name.contains(".ffn.experts.") {
            w.routed_experts += bytes * routed_share;
            w.matrix_params += values * routed_share;
        } else if e.name.contains(".ffn.shared_experts.") {
            w.shared_experts += bytes;
            w.matrix_params += values;
        } else {
            w.dense += bytes;
            if is_matrix {
                w.matrix_params += values;
            }
        }
    }
    Ok(w)
}

/// Attention FLOP of one query at position `pos` (0-based) over all layers: 4·heads·head_dim
/// per key it sees (QKᵀ and PV; the window's keys, itself included, plus the compressed entries
/// complete by then: all on HCA layers, at most `index_topk` on CSA layers) and, on CSA layers,
/// the indexer's 2·index_heads·index_head_dim per compressed entry.
pub fn attention_flops(cfg: &ModelConfig, pos: usize) -> f64 {
    let per_key = 4.0 * (cfg.num_heads * cfg.head_dim) as f64;
    let window = cfg.sliding_window.min(pos + 1);
    cfg.attention
        .iter()
        .map(|kind| match *kind {
            AttentionKind::Sliding => per_key * window as f64,
            AttentionKind::Hca { ratio } => per_key * (window + (pos + 1) / ratio) as f64,
            AttentionKind::Csa { ratio } => {
                let entries = (pos + 1) / ratio;
                let index = 2.0 * (cfg.index_n_heads * cfg.index_head_dim * entries) as f64;
                per_key * (window + entries.min(cfg.index_topk)) as f64 + index
            }
        })
        .sum()
}

/// FLOP of prefilling `n` tokens from position `start` in steps of `chunk`: every active
/// matrix per token, the head once per step (only the step's last token gets logits) and the
/// attention of every query.
pub fn prefill_flops(cfg: &ModelConfig, w: &ActiveWeights, start: usize, n: usize, chunk: usize) -> f64 {
    let steps = n.div_ceil(chunk.max(1));
    let attention: f64 = (start..start + n).map(|p| attention_flops(cfg, p)).sum();
    2.0 * w.matrix_params * n as f64 + 2.0 * w.head_params * steps as f64 + attention
}

/// Positions the run feeds: each context is prefilled from where the last one's decode
/// stopped (at least one token), then `decode_steps` tokens are decoded. With `speculative`
/// = k > 0, also a verify step of k + 1 tokens (rolled back) and `decode_steps` more tokens
/// decoded speculatively after the next one. `usize::MAX` when that does not fit in a `usize`
/// (more than any model's context anyway).
fn tokens_needed(contexts: &[usize], decode_steps: usize, speculative: usize) -> usize {
    let extra = if speculative == 0 { 0 } else { decode_steps.max(speculative) + 1 };
    contexts
        .iter()
        .try_fold((1usize, 0usize), |(next, need), &ctx| {
            // `next`: the least position the context's prefill reaches.
            let target = ctx.max(next);
            let decoded = target.checked_add(decode_steps)?;
            let next = match speculative {
                0 => decoded.checked_add(1)?,
                _ => decoded.checked_add(decode_steps)?.checked_add(1)?,
            };
            Some((next, need.max(decoded.checked_add(extra)?)))
        })
        .map_or(usize::MAX, |(_, need)| need)
}

/// Where the weights ended up, read after loading: the `--weight-memory` outcome and how much
/// of the process's anonymous memory the kernel put on transparent huge pages (the resident
/// weights, if THP gave them huge pages; 0 says it did not, e.g. THP set to `never`).
struct WeightMemoryReport {
    /// None for a built-in model (generated in memory).
    held: Option<WeightMemory>,
    /// `AnonHugePages` of the process (None off Linux).
    huge_page_bytes: Option<usize>,
}

impl WeightMemoryReport {
    fn describe(&self) -> String {
        let huge = match self.huge_page_bytes {
            Some(b) => format!(", {} of the process's memory on transparent huge pages", human_bytes(b)),
            None => String::new(),
        };
        match self.held {
            None => format!("generated in memory (built-in model){huge}"),
            Some(WeightMemory::Resident) => format!("resident (read into memory){huge}"),
            Some(WeightMemory::Mapped) => {
                format!("memory-mapped from the files (4 KiB pages: slower decode than --weight-memory resident){huge}")
            }
        }
    }
}

/// The bench's settings besides the model, backend and decoding-state flags.
pub struct Options<'a> {
    pub contexts: &'a [usize],
    pub decode_steps: usize,
    pub chunk: usize,
    /// Threads for the machine measurements (None: the CPU backend's thread count).
    pub threads: Option<usize>,
    pub json: bool,
    /// Drafts per step of the speculative decoding measured at each context (0: none).
    pub speculative_tokens: usize,
    /// Run [`warm_up`] before the timed runs (`--no-warmup` turns it off).
    pub warmup: bool,
}

/// What was measured at one context.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Tokens in the sequence when decode starts.
    pub context: usize,
    /// Tokens prefilled to get there (from where the previous context's decode stopped).
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    pub prefill_flops: f64,
    /// Seconds per decoded token (None with `--decode-steps 0`).
    pub decode_secs_per_token: Option<f64>,
    /// The format's bytes per token of context (compressed rows written, no block rounding).
    pub kv_bytes_per_context_token: f64,
    /// Bytes the sequence's decoding state holds when decode starts.
    pub kv_held: usize,
    /// Per-op profiles of the two phases (with `--profile`).
    pub profile: Option<PhaseProfiles>,
    /// Speculative decoding at the context (with `--speculative-tokens`).
    pub speculation: Option<SpecRow>,
    /// What this rank put into its communicators over the decode steps (a split run).
    pub decode_traffic: Option<Traffic>,
}

/// What `--speculative-tokens k` measured at one context, after the plain decode steps.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecRow {
    pub k: usize,
    /// Median seconds of a 1-token main-model step (plain decode's) at the context.
    pub step_secs: f64,
    /// Median seconds of a (k+1)-token verify step (every row's logits) at the same context.
    pub verify_step_secs: f64,
    /// Wall time of the speculative decode of `--decode-steps` tokens, drafting included.
    pub decode_secs: f64,
    /// Its counters.
    pub stats: SpecStats,
}

impl SpecRow {
    /// A verify step's cost in 1-token steps.
    pub fn verify_cost_ratio(&self) -> f64 {
        self.verify_step_secs / self.step_secs
    }

    /// Seconds the MTP block took per verify step (catching up and drafting).
    pub fn draft_secs_per_step(&self) -> f64 {
        self.stats.draft_secs / self.stats.verify_steps.max(1) as f64
    }

    /// The drafting per verify step in 1-token steps.
    pub fn draft_cost_ratio(&self) -> f64 {
        self.draft_secs_per_step() / self.step_secs
    }

    /// The speed-up over plain decoding these figures predict: tokens per step over what a step
    /// costs in 1-token steps.
    pub fn expected_speedup(&self) -> f64 {
        self.stats.tokens_per_step() / (self.verify_cost_ratio() + self.draft_cost_ratio())
    }

    /// Decode tokens per second with speculation.
    pub fn tokens_per_sec(&self) -> f64 {
        self.stats.emitted as f64 / self.decode_secs
    }
}

/// What a profiled run recorded at one context ([`dsv4_core::profile::Profiled`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseProfiles {
    /// The prefill to the context.
    pub prefill: Profile,
    /// All the decode steps at the context together (with `--decode-steps 0`, only the phase's
    /// closing `synchronize`).
    pub decode: Profile,
}

/// Entries of a phase's profile table (text report; `--json` has all).
const PROFILE_TOP: usize = 15;

/// What [`time_contexts`] reports as it goes.
pub enum Progress<'a> {
    /// A phase ended at a context (only when profiling): its profile and wall time.
    Phase(Phase<'a>),
    /// A context's row is complete (after its decode phase).
    Row(&'a Row),
}

/// One phase (prefill to a context, or its decode steps) of a profiled run.
pub struct Phase<'a> {
    /// `"prefill"` or `"decode"`.
    pub name: &'static str,
    pub context: usize,
    /// Tokens fed in the phase (decode: the decode steps).
    pub tokens: usize,
    /// Wall time of the whole phase, synchronisation included.
    pub wall: Duration,
    pub profile: &'a Profile,
}

/// [`Row`] read against the machine.
struct Derived {
    prefill_tok_s: f64,
    prefill_flop_s: f64,
    prefill_peak_fraction: Option<f64>,
    bytes_per_token: f64,
    achieved: Option<f64>,
    roofline: Option<f64>,
}

impl Row {
    /// `limits`: what the row is read against ([`limits`]); the fractions are `None` without.
    fn derive(&self, weights: &ActiveWeights, limits: Option<Limits>) -> Derived {
        let prefill_flop_s = self.prefill_flops / self.prefill_secs;
        let bytes_per_token = weights.bytes() + self.kv_held as f64;
        let achieved = self.decode_secs_per_token.map(|s| bytes_per_token / s);
        Derived {
            prefill_tok_s: self.prefill_tokens as f64 / self.prefill_secs,
            prefill_flop_s,
            prefill_peak_fraction: limits.map(|l| prefill_flop_s / l.peak_flops),
            bytes_per_token,
            achieved,
            roofline: achieved.zip(limits).map(|(a, l)| a / l.read_bytes_per_sec),
        }
    }
}

/// Prefills to each context in turn (continuing the same sequence) and times `decode_steps`
/// greedy decode steps there; `progress` sees each row as it is measured and, with
/// `take_profile` (a `Profiled` backend's `take`), each phase's profile as the phase ends.
/// With `speculative` = k > 0 each context then also measures speculative decoding
/// ([`measure_speculation`]); the MTP block is fed the main model's residual streams as the
/// sequence grows, outside the timed phases.
#[allow(clippy::too_many_arguments)]
fn time_contexts<B: Backend>(
    be: &B,
    model: &Model<B>,
    config: KvConfig,
    kv_dtype: KvDtype,
    weights: &ActiveWeights,
    contexts: &[usize],
    decode_steps: usize,
    chunk: usize,
    speculative: usize,
    warmup: Option<Warmup>,
    take_profile: Option<&dyn Fn() -> Profile>,
    count_traffic: Option<&dyn Fn() -> Traffic>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Row>> {
    let cfg = &model.cfg;
    let block_tokens = config.block_tokens;
    let needed = tokens_needed(contexts, decode_steps, speculative);
    // Deterministic pseudo-random prompt over the vocabulary; with data-parallel attention each
    // rank's own stretch of the sequence (the same tokens would route every rank to the same
    // experts).
    let vocab = cfg.vocab_size as u64;
    let offset = (model.rank.layout.dp_rank() * needed) as u64;
    let prompt: Vec<u32> =
        (offset..offset + needed as u64).map(|i| ((i.wrapping_mul(2654435761) >> 7) % vocab) as u32).collect();
    let mut cache = model.new_cache(be, config)?;
    let take = || take_profile.map(|take| take());
    if let Some(plan) = warmup {
        warm_up(be, model, &mut cache, plan)?;
    }
    let mut seq = cache.new_sequence();
    let mut spec = match speculative {
        0 => None,
        k => {
            let depth = dsv4_core::speculative::rollback_depth(k);
            let spec = Speculator::new(be, model, k, chunk + depth, kv_dtype)?;
            seq.set_rollback_depth(spec.main_rollback_depth());
            Some(spec)
        }
    };
    // The sequence's tokens: those fed, then (after speculative steps) those not fed yet.
    let mut tokens: Vec<u32> = vec![];
    let mut logits = vec![];
    let mut rows = vec![];
    for &ctx in contexts {
        // Prefill up to ctx (continuing from the previous context, decode tokens included).
        let pos = seq.pos();
        let target = ctx.max(pos + 1).max(tokens.len());
        let known = tokens.len();
        tokens.extend_from_slice(&prompt[known..target]);
        let todo = tokens[pos..target].to_vec();
        // Not the phase's: loading, the pool's allocation and the warm-up (first context),
        // nothing else.
        take();
        let t = Instant::now();
        let mut mtp = Duration::ZERO;
        for part in todo.chunks(chunk.max(1)) {
            let start = seq.pos();
            let batch = Batch::new(&[(part, start)])?;
            let (l, h) = model.step_with_residual(be, &batch, &mut cache, &mut [&mut seq], Logits::LastPerSequence)?;
            logits = be.download(&l)?;
            if let Some(spec) = spec.as_mut() {
                // The MTP block's catch-up is not prefill's.
                let t = Instant::now();
                spec.push(be, model, Some((&h, start)), &tokens)?;
                be.synchronize()?;
                mtp += t.elapsed();
            }
        }
        be.synchronize()?;
        let prefill_wall = t.elapsed().saturating_sub(mtp);
        let prefill_secs = prefill_wall.as_secs_f64();
        let prefill_profile = take();
        if let Some(profile) = &prefill_profile {
            let phase = Phase { name: "prefill", context: target, tokens: todo.len(), wall: prefill_wall, profile };
            progress(Progress::Phase(phase));
        }
        let fp = sequence_footprint(cfg, kv_dtype, block_tokens, target);
        let kv_held = cache.sequence_bytes(&seq);
        take();
        let traffic_before = count_traffic.map(|count| count());
        let mut residuals = vec![];
        let t = Instant::now();
        for _ in 0..decode_steps {
            let tok = argmax(&logits);
            tokens.push(tok);
            let start = seq.pos();
            let batch = Batch::new(&[(&[tok][..], start)])?;
            let (l, h) = model.step_with_residual(be, &batch, &mut cache, &mut [&mut seq], Logits::LastPerSequence)?;
            logits = be.download(&l)?;
            if spec.is_some() {
                residuals.push((h, start));
            }
        }
        be.synchronize()?;
        let decode_wall = t.elapsed();
        let decode_traffic = count_traffic.zip(traffic_before).map(|(count, before)| count().since(&before));
        let decode_profile = take();
        if let Some(profile) = decode_profile.as_ref().filter(|_| decode_steps > 0) {
            let phase = Phase { name: "decode", context: target, tokens: decode_steps, wall: decode_wall, profile };
            progress(Progress::Phase(phase));
        }
        let speculation = match spec.as_mut() {
            None => None,
            Some(spec) => {
                for (h, start) in &residuals {
                    spec.push(be, model, Some((h, *start)), &tokens)?;
                }
                drop(residuals);
                Some(measure_speculation(be, model, &mut cache, &mut seq, spec, &mut tokens, &logits, decode_steps)?)
            }
        };
        let row = Row {
            context: target,
            prefill_tokens: todo.len(),
            prefill_secs,
            prefill_flops: prefill_flops(cfg, weights, pos, todo.len(), chunk),
            decode_secs_per_token: (decode_steps > 0).then(|| decode_wall.as_secs_f64() / decode_steps as f64),
            kv_bytes_per_context_token: fp.compressed_row_bytes as f64 / target as f64,
            kv_held,
            profile: prefill_profile.zip(decode_profile).map(|(prefill, decode)| PhaseProfiles { prefill, decode }),
            speculation,
            decode_traffic,
        };
        progress(Progress::Row(&row));
        rows.push(row);
    }
    Ok(rows)
}

/// What [`warm_up`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmup {
    /// Tokens prefilled in one step: the first context's, at most one chunk.
    pub prefill_tokens: usize,
    /// Decode steps after it: one, or none when the run times no decode (the pool is sized
    /// for the timed tokens only, and a context of whole blocks leaves no room for another).
    pub decode_steps: usize,
}

impl Warmup {
    /// The warm-up of a run (None with `--no-warmup`); `contexts` in increasing order.
    pub fn plan(on: bool, contexts: &[usize], chunk: usize, decode_steps: usize) -> Option<Warmup> {
        let first = *contexts.first()?;
        on.then(|| Warmup { prefill_tokens: first.min(chunk.max(1)), decode_steps: decode_steps.min(1) })
    }
}

/// The untimed warm-up before the timed runs, as llama-bench's (`--no-warmup` skips it): a
/// prefill of the first context (at most one chunk) and a decode step, on a sequence of their
/// own with another prompt than the timed one, released after. Without it the first context's
/// prefill and decode also pay for the process's first touch of the activation buffers of one
/// chunk and of the decoding state's first pages (page faults, and the kernel zeroing every
/// new page), which a server pays once, at its first request: on the 0.75 B benchmark model on
/// 2 CPU threads, a cold 512-token prefill ran at 60-69% of the f32 FMA peak where the next
/// 512 tokens of the same run, warm, ran at 68-72%, and the first decode steps took up to
/// twice as long as the rest. (Later contexts' pages, and the MTP block of a speculative run,
/// are still first touched in the timed runs.)
fn warm_up<B: Backend>(be: &B, model: &Model<B>, cache: &mut KvCache<B>, plan: Warmup) -> Result<()> {
    let vocab = model.cfg.vocab_size as u64;
    let tokens = plan.prefill_tokens;
    let prompt: Vec<u32> = (0..tokens as u64).map(|i| ((i.wrapping_mul(40503) + 1) % vocab) as u32).collect();
    let mut seq = cache.new_sequence();
    let mut run = || -> Result<()> {
        let batch = Batch::new(&[(&prompt[..], 0)])?;
        let (l, _) = model.step_with_residual(be, &batch, cache, &mut [&mut seq], Logits::LastPerSequence)?;
        let mut next = argmax(&be.download(&l)?);
        for step in 0..plan.decode_steps {
            let batch = Batch::new(&[(&[next][..], tokens + step)])?;
            let (l, _) = model.step_with_residual(be, &batch, cache, &mut [&mut seq], Logits::LastPerSequence)?;
            next = argmax(&be.download(&l)?);
        }
        be.synchronize()?;
        Ok(())
    };
    let result = run();
    cache.release(&mut seq);
    result
}

/// The report's line on [`warm_up`].
fn warmup_note(plan: Option<Warmup>) -> String {
    match plan {
        Some(Warmup { prefill_tokens, decode_steps: 0 }) => {
            format!("warm-up: a prefill of {prefill_tokens} tokens, untimed, before the timed runs")
        }
        Some(Warmup { prefill_tokens, .. }) => {
            format!("warm-up: a prefill of {prefill_tokens} tokens and a decode step, untimed, before the timed runs")
        }
        None => "warm-up: none (--no-warmup): the first row also times the first touch of the run's memory".into(),
    }
}

/// Timed main-model steps per kind in [`measure_speculation`] (after one untimed pair); the
/// medians are reported.
const VERIFY_REPS: usize = 5;

/// Speculative decoding at the sequence's current context (everything in `tokens` fed, the
/// next token's `logits` at hand, the MTP block caught up): the median time of a 1-token
/// decode step and of a (k+1)-token verify step there (each rolled back, alternating, after a
/// warm-up pair), then `decode_steps` tokens decoded greedily with k drafts per step.
#[allow(clippy::too_many_arguments)]
fn measure_speculation<B: Backend>(
    be: &B,
    model: &Model<B>,
    cache: &mut KvCache<B>,
    seq: &mut Sequence,
    spec: &mut Speculator<B>,
    tokens: &mut Vec<u32>,
    logits: &[f32],
    decode_steps: usize,
) -> Result<SpecRow> {
    let k = spec.k();
    let next = argmax(logits);
    // A verify step feeds the newest token and k drafts; which tokens hardly changes its cost.
    let verify_feed: Vec<u32> = std::iter::once(next).chain(tokens.iter().rev().take(k).copied()).collect();
    let verify_feed = if verify_feed.len() == k + 1 { verify_feed } else { vec![next; k + 1] };
    let (mut one, mut many) = (vec![], vec![]);
    for rep in 0..=VERIFY_REPS {
        // Plain decode's step (the last row's logits) and the verify step's (every row's).
        let a = timed_step(be, model, cache, seq, &[next], Logits::LastPerSequence)?;
        let b = timed_step(be, model, cache, seq, &verify_feed, Logits::All)?;
        if rep > 0 {
            one.push(a);
            many.push(b);
        }
    }

    tokens.push(next);
    let stats0 = spec.stats;
    let mut sampler = Sampler::new(SamplingParams::greedy())?;
    let mut emitted = 0;
    let t = Instant::now();
    while emitted < decode_steps {
        // As `Session::generate` does: no drafts past the tokens wanted.
        let k_now = spec.drafts_for(seq, tokens.len(), decode_steps - emitted - 1);
        let first = spec
            .push(be, model, None, tokens)?
            .ok_or_else(|| anyhow::anyhow!("internal: the MTP block has no row to draft from"))?;
        let drafts = spec.draft(be, model, first, k_now)?;
        let verdict = spec.verify(be, model, cache, seq, tokens, &drafts, &mut sampler)?;
        emitted += verdict.tokens.len();
        tokens.extend_from_slice(&verdict.tokens);
    }
    be.synchronize()?;
    let decode_secs = t.elapsed().as_secs_f64();
    let stats = spec.stats.since(&stats0);
    Ok(SpecRow { k, step_secs: median(&mut one), verify_step_secs: median(&mut many), decode_secs, stats })
}

/// Seconds of one main-model step feeding `feed` at the sequence's position, synchronised,
/// its logits downloaded; the sequence is rolled back to where it was.
fn timed_step<B: Backend>(
    be: &B,
    model: &Model<B>,
    cache: &mut KvCache<B>,
    seq: &mut Sequence,
    feed: &[u32],
    logits: Logits,
) -> Result<f64> {
    let p = seq.pos();
    let snap = cache.snapshot_carry(be, seq)?;
    let batch = Batch::new(&[(feed, p)])?;
    be.synchronize()?;
    let t = Instant::now();
    let (l, _) = model.step_with_residual(be, &batch, cache, &mut [&mut *seq], logits)?;
    be.download(&l)?;
    be.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    cache.rollback(be, seq, snap, p)?;
    Ok(secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The contexts in increasing order, once each, and the threads to measure the machine with;
/// refuses settings that measure nothing.
fn checked_options(opts: &Options) -> Result<(Vec<usize>, usize)> {
    let mut contexts = opts.contexts.to_vec();
    contexts.sort_unstable();
    contexts.dedup();
    if contexts.is_empty() || contexts[0] == 0 {
        bail!("give context lengths of at least 1 token, e.g. --contexts 1024,8192");
    }
    if opts.chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    let threads = opts.threads.unwrap_or_else(|| dsv4_backend_cpu::CpuBackend::new().threads());
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    Ok((contexts, threads))
}

/// The lines under the machine report of either bench: where the weights are, the precision
/// and which peak the prefill column reads against, the weights read per token.
/// `peak`: what the prefill peak column is read against (`None`: left empty, [`limits`]).
fn run_report(
    weight_memory: &WeightMemoryReport,
    precision: Precision,
    peak: Option<PrefillPeak>,
    weights: &ActiveWeights,
) -> String {
    let column = peak.map_or(String::new(), |p| format!(" (prefill peak column: against the {})", p.describe()));
    format!("weights: {}\nprecision: {precision}{column}\n{}", weight_memory.describe(), weights_report(weights))
}

/// [`tokens_needed`] for the contexts (increasing), refused when the model has fewer positions.
fn positions_needed(cfg: &dsv4_core::ModelConfig, contexts: &[usize], decode_steps: usize, k: usize) -> Result<usize> {
    let needed = tokens_needed(contexts, decode_steps, k);
    if needed >= cfg.max_position_embeddings {
        bail!(
            "contexts up to {} + {decode_steps} decode steps need {needed} positions; the model has {}",
            contexts[contexts.len() - 1],
            cfg.max_position_embeddings
        );
    }
    Ok(needed)
}

/// `take_profile`: with `--profile`, `be` is a `Profiled` backend and this is its `take`.
pub fn run<B: Backend>(
    be: &B,
    spec: &str,
    kv: &KvArgs,
    opts: &Options,
    take_profile: Option<&dyn Fn() -> Profile>,
) -> Result<()> {
    let (contexts, threads) = checked_options(opts)?;
    let warmup = Warmup::plan(opts.warmup, &contexts, opts.chunk, opts.decode_steps);
    let k = opts.speculative_tokens;
    if k > 0 && opts.decode_steps == 0 {
        bail!("--speculative-tokens compares speculative with plain decoding: give --decode-steps of at least 1");
    }
    if k > 0 && take_profile.is_some() {
        bail!("--profile and --speculative-tokens time different things: run them separately");
    }
    let (cfg, ckpt) = crate::load::open(spec)?;
    let weights = active_weights(&cfg, &ckpt)?;
    crate::generate::require_mtp(spec, k, &cfg, &ckpt)?;
    drop(ckpt);
    let needed = positions_needed(&cfg, &contexts, opts.decode_steps, k)?;
    // Before the model is loaded: the buffer is large, and nothing else should run meanwhile.
    let machine = machine::measure(&machine::Settings::for_bench(threads));
    let isa = (be.name() == "cpu").then(|| dsv4_backend_cpu::kernels::Isa::active().name());
    if !opts.json {
        print!("{}", machine_report(&machine, isa, dsv4_backend_cpu::kernels::bf16_gemm_available()));
    }
    let (model, held) = crate::load::load_model_with_memory(be, spec, kv.precision, kv.weight_memory)?;
    let weight_memory = WeightMemoryReport { held, huge_page_bytes: crate::load::anon_huge_page_bytes() };
    let prefill_peak = PrefillPeak::of(kv.precision.rounds_to_bf16() && be.name() == "cpu");
    let limits = limits(&machine, prefill_peak, be.name() == "cpu");
    // Speculative decoding keeps the window pages a rollback needs on top of the longest step.
    let max_step = crate::generate::pool_max_step(opts.chunk, k);
    let config = kv.config_for_run(be, &cfg, needed, max_step)?;
    let kv_description = kv_args::describe(&cfg, &config);
    let progress: &mut dyn FnMut(Progress) = if opts.json {
        &mut |_| {}
    } else {
        println!("backend: {}", be.describe());
        println!("model: {spec}");
        print!("{}", run_report(&weight_memory, kv.precision, limits.map(|_| prefill_peak), &weights));
        if limits.is_none() {
            println!("{}", no_limits_note(be.name()));
        }
        println!("{kv_description}");
        println!("{}", warmup_note(warmup));
        if k > 0 {
            println!("{}", speculation_note(k));
        }
        if take_profile.is_some() {
            println!(
                "profile: wall time of every backend op, synchronising after each (asynchronous backends run slower \
                 profiled); the {PROFILE_TOP} longest per phase after each prefill and decode"
            );
        }
        // Profiled, the header comes above each row instead (the tables come between).
        if take_profile.is_none() {
            println!("{}", table_header());
        }
        &mut |p| match p {
            Progress::Phase(phase) => print!("{}", phase_report(&phase)),
            Progress::Row(row) => {
                if take_profile.is_some() {
                    println!("{}", table_header());
                }
                println!("{}", table_row(row, &weights, limits));
                if let Some(s) = &row.speculation {
                    print!("{}", speculation_report(row, s));
                }
            }
        }
    };
    let rows = time_contexts(
        be,
        &model,
        config,
        kv.kv_dtype(be),
        &weights,
        &contexts,
        opts.decode_steps,
        opts.chunk,
        k,
        warmup,
        take_profile,
        None,
        progress,
    )?;
    if opts.json {
        let report = Report {
            machine: &machine,
            isa,
            backend: be.describe(),
            model: spec,
            kv: kv_description,
            precision: kv.precision,
            prefill_peak,
            limits,
            weights: &weights,
            weight_memory: &weight_memory,
            decode_steps: opts.decode_steps,
            chunk: opts.chunk,
            speculative_tokens: k,
            warmup,
            rows: &rows,
            ranks: None,
        };
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    }
    Ok(())
}

/// What one rank of a split run (`--devices`) measured: its rows, and the plan's payload per
/// decoded token for it ([`rank_decode_traffic`] of one token).
pub struct RankRun {
    pub rank: RankLayout,
    pub plan: Traffic,
    pub rows: Vec<Row>,
}

/// What a rank has put into its TP and EP communicators so far.
fn rank_traffic<B: Backend>(ctx: &RankContext<B>) -> Traffic {
    let mut t = Traffic::default();
    for c in [&ctx.tp, &ctx.ep].into_iter().flatten() {
        t.add(&c.traffic());
    }
    t
}

/// The communication section of a split run's text report: per context, the payload per
/// decoded token each rank put into its communicators (as the in-process communicator counted
/// it over the decode steps) beside the plan's figure, ranks with the same figures folded. Every
/// line starts with `comm |` (not a number: scripts take rows by their first column).
fn comm_report(runs: &[RankRun], decode_steps: usize) -> String {
    let mut out = String::new();
    if decode_steps == 0 || runs.is_empty() {
        return out;
    }
    out += "comm | payload per decoded token and rank (f32 activations; an all-reduce counts its buffer, an \
            all-gather the rank's part, an all-to-all-v the rows sent to other ranks (Ascend's MC2 kernels: two calls \
            of BF16 rows a layer)), counted by the communicator over the decode steps | as `dsv4 plan` computes it\n";
    for (i, row) in runs[0].rows.iter().enumerate() {
        let mut classes: Vec<(Vec<usize>, &Traffic, &Traffic)> = vec![];
        for run in runs {
            let Some(counted) = run.rows.get(i).and_then(|r| r.decode_traffic.as_ref()) else { continue };
            match classes.iter_mut().find(|(_, c, p)| *c == counted && *p == &run.plan) {
                Some((ranks, _, _)) => ranks.push(run.rank.rank),
                None => classes.push((vec![run.rank.rank], counted, &run.plan)),
            }
        }
        for (ranks, counted, plan) in classes {
            let verdict = traffic_verdict(counted, &plan.times(decode_steps as u64));
            out += &format!(
                "comm | context {}, rank{} {}: counted {} B per token ({}) | planned {} B per token ({}): {verdict}\n",
                row.context,
                if ranks.len() == 1 { "" } else { "s" },
                crate::plan::rank_list(&ranks),
                counted.bytes() as f64 / decode_steps as f64,
                crate::plan::kinds(counted, decode_steps),
                plan.bytes(),
                crate::plan::kinds(plan, 1),
            );
        }
    }
    out
}

/// Counted against planned traffic: `equal`; or, where only the all-to-all-v figures differ
/// (`--moe-exchange all-to-all`: where the rows go depends on the routing, which the plan takes
/// as uniform, and Ascend's MC2 kernels move them in two calls of BF16 rows where the plan's
/// composition makes three of f32), that said; else `DIFFERENT`.
fn traffic_verdict(counted: &Traffic, planned: &Traffic) -> &'static str {
    if counted == planned {
        return "equal";
    }
    let others = |t: &Traffic| -> Vec<(CollectiveKind, (u64, u64))> {
        t.by_kind.iter().filter(|(&k, _)| k != CollectiveKind::AllToAllV).map(|(&k, &v)| (k, v)).collect()
    };
    if others(counted) == others(planned) {
        "equal all-gathers and all-reduces; all-to-all-v not compared (they follow the routing, which the plan takes \
         as uniform)"
    } else {
        "DIFFERENT"
    }
}

/// A row's `comm` array in `--json`: every rank's payload per decoded token, counted and planned.
fn comm_json(runs: &[RankRun], i: usize, decode_steps: usize) -> Value {
    let steps = decode_steps.max(1) as f64;
    runs.iter()
        .filter_map(|run| {
            let counted = run.rows.get(i)?.decode_traffic.as_ref()?;
            let by_kind: serde_json::Map<String, Value> = counted
                .by_kind
                .iter()
                .map(|(k, &(c, b))| {
                    (k.name().to_string(), json!({"calls": c as f64 / steps, "bytes": b as f64 / steps}))
                })
                .collect();
            Some(json!({
                "rank": run.rank.rank,
                "counted_bytes_per_token": counted.bytes() as f64 / steps,
                "counted_calls_per_token": counted.calls() as f64 / steps,
                "counted_by_kind": by_kind,
                "plan_bytes_per_token": run.plan.bytes(),
                "plan_calls_per_token": run.plan.calls(),
                "matches_plan": decode_steps > 0 && traffic_verdict(counted, &run.plan.times(decode_steps as u64)) != "DIFFERENT",
                // The all-to-all-v follow the routing (the plan takes it as uniform): not compared.
                "plan_leaves_out": ["all_to_all_v"],
            }))
        })
        .collect()
}

/// `dsv4 bench --devices N`: the model split over the ranks of `parallel` (CPU: threads over the
/// in-process communicator; Ascend: one device each, over HCCL), every rank timing the same
/// contexts in step, rank 0's rows printed as it goes; then each rank's communication per decoded
/// token beside the plan's. With data-parallel attention every rank's sequence is its own (a
/// prompt of its own), so the run decodes one token per rank a step.
pub fn run_ranks(
    backend: crate::BackendChoice,
    spec: &str,
    kv: &KvArgs,
    opts: &Options,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<()> {
    let (contexts, threads) = checked_options(opts)?;
    let warmup = Warmup::plan(opts.warmup, &contexts, opts.chunk, opts.decode_steps);
    if opts.speculative_tokens > 0 {
        bail!(
            "--speculative-tokens runs on one device for now (a model split over --devices does not load the MTP \
             block): bench speculative decoding without --devices, or drop --speculative-tokens"
        );
    }
    let (cfg, ckpt, held, name, description) = with_backend!(backend, |probe| {
        let (cfg, ckpt, held) = crate::load::open_with_memory(probe, spec, kv.weight_memory)?;
        anyhow::Ok((cfg, ckpt, held, probe.name().to_string(), probe.describe()))
    })?;
    let layout = parallel.layout(&cfg)?;
    eprintln!("{}", parallel.describe_run(&layout, &cfg));
    let weights = active_weights(&cfg, &ckpt)?;
    let needed = positions_needed(&cfg, &contexts, opts.decode_steps, 0)?;
    let kv = &crate::parallel_args::fixed_kv_budget(kv, layout.world, backend, None)?;
    let machine = machine::measure(&machine::Settings::for_bench(threads));
    let isa = (name == "cpu").then(|| dsv4_backend_cpu::kernels::Isa::active().name());
    let prefill_peak = PrefillPeak::of(kv.precision.rounds_to_bf16() && name == "cpu");
    let limits = limits(&machine, prefill_peak, name == "cpu");
    let weight_memory = WeightMemoryReport { held, huge_page_bytes: None };
    // Over several processes node 0 reports the table; every node reports its own ranks'
    // communication (each process counts only its ranks').
    let nodes = parallel.nodes();
    let follower = nodes.as_ref().is_some_and(|n| n.node_rank != 0);
    if !opts.json && !follower {
        print!("{}", machine_report(&machine, isa, dsv4_backend_cpu::kernels::bf16_gemm_available()));
        println!("backend: {description}");
        println!("model: {spec}");
        match &nodes {
            None => println!(
                "ranks: {} (TP {}, EP {}), threads of this process sharing its cores and memory: the speeds are the \
                 split run's; bytes read/tok and the roofline are one device's figures",
                layout.world, layout.tp, layout.ep
            ),
            Some(n) => println!(
                "ranks: {} (TP {}, EP {}) over {} processes, {} here: the speeds are the split run's; bytes read/tok \
                 and the roofline are one device's figures",
                layout.world,
                layout.tp,
                layout.ep,
                n.nnodes,
                layout.world / n.nnodes
            ),
        }
        if layout.data_parallel_attention {
            println!(
                "data-parallel attention: every rank prefills and decodes a sequence of its own (a prompt of its \
                 own), in step with the others; the table is rank 0's, and the run processes {} times its tokens",
                layout.world
            );
        }
        print!("{}", run_report(&weight_memory, kv.precision, limits.map(|_| prefill_peak), &weights));
        if limits.is_none() {
            println!("{}", no_limits_note(&name));
        }
    }
    let kv_description = std::sync::Mutex::new(String::new());
    let runs = on_ranks!(backend, parallel, layout, |be, ctx| {
        let (rank, counter) = (ctx.layout, ctx.clone());
        let first = rank.rank == 0;
        let model = crate::load::load_opened(be, cfg.clone(), &ckpt, spec, kv.precision, ctx)?;
        let config = kv.config_for_run(be, &cfg, needed, opts.chunk)?;
        let count = move || rank_traffic(&counter);
        let mut quiet = |_: Progress| {};
        let mut show = |p: Progress| {
            if let Progress::Row(row) = p {
                println!("{}", table_row(row, &weights, limits));
            }
        };
        let progress: &mut dyn FnMut(Progress) = if first && !opts.json {
            println!("{} (on each of the {} ranks)", kv_args::describe(&cfg, &config), layout.world);
            println!("{}", warmup_note(warmup));
            println!("{}", table_header());
            &mut show
        } else {
            &mut quiet
        };
        if first {
            *kv_description.lock().unwrap_or_else(|e| e.into_inner()) = kv_args::describe(&cfg, &config);
        }
        let rows = time_contexts(
            be,
            &model,
            config,
            kv.kv_dtype(be),
            &weights,
            &contexts,
            opts.decode_steps,
            opts.chunk,
            0,
            warmup,
            None,
            Some(&count),
            progress,
        )?;
        Ok(RankRun { rank, plan: rank_decode_traffic(&cfg, &rank, 1), rows })
    })?;
    if !opts.json {
        print!("{}", comm_report(&runs, opts.decode_steps));
        return Ok(());
    }
    // The JSON report is node 0's alone.
    if follower {
        return Ok(());
    }
    let report = Report {
        machine: &machine,
        isa,
        backend: description,
        model: spec,
        kv: kv_description.into_inner().unwrap_or_else(|e| e.into_inner()),
        precision: kv.precision,
        prefill_peak,
        limits,
        weights: &weights,
        weight_memory: &weight_memory,
        decode_steps: opts.decode_steps,
        chunk: opts.chunk,
        speculative_tokens: 0,
        warmup,
        rows: &runs[0].rows,
        ranks: Some((layout, &runs)),
    };
    println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    Ok(())
}

/// A phase's profile as text: a title line, then the [`PROFILE_TOP`] longest entries (decode: per
/// token) with the share of the phase's wall time they cover. Every line starts with the phase's
/// name, so that none can be taken for a row of the bench's table (rows start with a number).
fn phase_report(p: &Phase) -> String {
    let per_token = p.name == "decode";
    let mut s = format!("{} profile at context {}: {} tokens, wall ", p.name, p.context, p.tokens);
    if per_token {
        s += &format!("{:.3} ms/token\n", p.wall.as_secs_f64() * 1e3 / p.tokens.max(1) as f64);
    } else {
        s += &format!("{:.3} ms\n", p.wall.as_secs_f64() * 1e3);
    }
    let table = p.profile.table(p.wall).top(PROFILE_TOP);
    let table = if per_token { table.per(p.tokens, "token").to_string() } else { table.to_string() };
    for line in table.lines() {
        s += &format!("{:<7} | {line}\n", p.name);
    }
    s
}

/// A profile as JSON: `[{op, total_ms, calls}]`, longest first.
fn profile_json(p: &Profile) -> Value {
    p.entries.iter().map(|e| json!({"op": e.key, "total_ms": e.total.as_secs_f64() * 1e3, "calls": e.calls})).collect()
}

fn gb(bytes_per_sec: f64) -> f64 {
    bytes_per_sec / 1e9
}

/// The machine section printed above the table. No line starts with a number, so that scripts
/// can pick the table rows by their first column. `bf16_products`: whether GEMMs on BF16 inputs
/// multiply with `vdpbf16ps` in this process (`kernels::bf16_gemm_available`); when they do not,
/// a measured BF16 peak is marked as not used.
fn machine_report(m: &Machine, isa: Option<&str>, bf16_products: bool) -> String {
    let have: Vec<&str> = m.features.iter().filter(|f| f.1).map(|f| f.0).collect();
    let lack: Vec<&str> = m.features.iter().filter(|f| !f.1).map(|f| f.0).collect();
    let mut s = format!("cpu: {}; {} threads measured\n", m.cpu, m.threads);
    s += &format!("features: {}", if have.is_empty() { "none".into() } else { have.join(" ") });
    if !lack.is_empty() {
        s += &format!(" (no {})", lack.join(", no "));
    }
    if let Some(isa) = isa {
        s += &format!("; cpu kernels use {isa}");
    }
    s += "\n";
    s += &format!("read bandwidth: {:.2} GB/s with {} threads", gb(m.read_bytes_per_sec), m.threads);
    if let Some(one) = m.read_bytes_per_sec_one_thread {
        s += &format!(", {:.2} GB/s one thread", gb(one));
    }
    s += &format!(" ({} sum over {}, best pass)\n", m.read_kernel, human_bytes(m.read_buffer_bytes));
    s += &format!(
        "f32 FMA peak: {:.1} GFLOP/s ({}, 2 FLOP per multiply-add)\n",
        m.fma_flops_per_sec / 1e9,
        m.fma_kernel
    );
    match m.bf16_flops_per_sec {
        Some(f) => {
            s += &format!("bf16 dot peak: {:.1} GFLOP/s (avx512_bf16 vdpbf16ps, 2 FLOP per product", f / 1e9);
            if !bf16_products && m.amx_flops_per_sec.is_some() {
                s += &format!(
                    "; not used here: prefill GEMMs on BF16 inputs multiply on AMX tiles, decode GEMVs in f32, {}=on \
                     for vdpbf16ps there",
                    dsv4_backend_cpu::kernels::BF16_PRODUCTS_ENV
                );
            } else if !bf16_products {
                // Measured, not used: `bf16_gemm::chosen` (an Intel CPU, or the variable off).
                s += &format!(
                    "; not used here: GEMMs on BF16 inputs multiply in f32, {}=on to change that",
                    dsv4_backend_cpu::kernels::BF16_PRODUCTS_ENV
                );
            }
            s += ")\n";
        }
        None if m.features.iter().any(|&(f, has)| f == "avx512_bf16" && has) => {
            s += "bf16 dot peak: not measured (the cpu kernels do not use avx512_bf16 here)\n"
        }
        None => s += "bf16 dot peak: not measured (no avx512_bf16)\n",
    }
    let has_amx = m.features.iter().any(|&(f, has)| f == "amx_bf16" && has);
    match m.amx_flops_per_sec {
        Some(f) => {
            s += &format!(
                "amx bf16 peak: {:.1} GFLOP/s (amx_bf16 tdpbf16ps tiles, 2 FLOP per product; used by the prefill \
                 GEMMs on BF16 inputs: --precision bf16 or official)\n",
                f / 1e9
            )
        }
        None if has_amx => {
            s += &format!(
                "amx bf16 peak: not measured (the cpu kernels do not use amx here: {}=off, {}=off, cpu kernels below \
                 avx512, or the system refused the tile data)\n",
                dsv4_backend_cpu::kernels::AMX_ENV,
                dsv4_backend_cpu::kernels::BF16_PRODUCTS_ENV
            )
        }
        None => {}
    }
    s
}

fn weights_report(w: &ActiveWeights) -> String {
    format!(
        "weights read per decode token: {:.2} MB (embedding row {:.0} B, tid2eid rows {:.0} B, routed experts {:.2} MB, \
         shared experts {:.2} MB, dense {:.2} MB, head {:.2} MB)\n\
         prefill FLOP per token: 2 x {:.1} M active matrix values + attention; head 2 x {:.1} M once per chunk\n",
        w.bytes() / 1e6,
        w.embedding_row,
        w.tid2eid_rows,
        w.routed_experts / 1e6,
        w.shared_experts / 1e6,
        w.dense / 1e6,
        w.head / 1e6,
        w.matrix_params / 1e6,
        w.head_params / 1e6,
    )
}

/// The table's header. The first three columns (context, prefill tok/s, decode ms/tok) are
/// what `shared/bench/llamacpp-peer.sh` reads: keep them.
fn table_header() -> String {
    format!(
        "{:>9} {:>14} {:>14} {:>16} {:>13} {:>12} {:>12} {:>16} {:>14} {:>9}",
        "context",
        "prefill tok/s",
        "decode ms/tok",
        "prefill GFLOP/s",
        "prefill peak",
        "kv bytes/tok",
        "kv held",
        "bytes read/tok",
        "achieved GB/s",
        "roofline"
    )
}

/// The compute peak the prefill column is read against: that of the instructions the prefill
/// GEMMs multiply with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrefillPeak {
    /// f32 FMAs: `f32` precision, or BF16 values multiplied in f32.
    F32Fma,
    /// `vdpbf16ps` (`kernels::bf16_gemm_available`).
    Bf16Dot,
    /// `tdpbf16ps` on AMX tiles (`kernels::amx_available`).
    AmxBf16,
}

impl PrefillPeak {
    /// The peak for a run whose prefill GEMMs take BF16 inputs on the CPU backend
    /// (`bf16_on_cpu`), in this process: [`PrefillPeak::choose`] with the kernels it uses.
    fn of(bf16_on_cpu: bool) -> PrefillPeak {
        use dsv4_backend_cpu::kernels::{amx_available, bf16_gemm_available};
        PrefillPeak::choose(bf16_on_cpu, amx_available(), bf16_gemm_available())
    }

    /// AMX's peak where the BF16 GEMMs run on AMX tiles (`amx`), else `vdpbf16ps`'s where they
    /// use it (`vdp`), else the f32 FMA peak (`f32` activations, or BF16 values multiplied by
    /// the f32 kernels). A peak that was not measured reads as the f32 one ([`Self::flops`]).
    fn choose(bf16_on_cpu: bool, amx: bool, vdp: bool) -> PrefillPeak {
        match (bf16_on_cpu, amx, vdp) {
            (true, true, _) => PrefillPeak::AmxBf16,
            (true, false, true) => PrefillPeak::Bf16Dot,
            _ => PrefillPeak::F32Fma,
        }
    }

    /// FLOP/s of this peak on `m` (the f32 FMA peak where this one was not measured).
    fn flops(self, m: &Machine) -> f64 {
        match self {
            PrefillPeak::AmxBf16 => m.amx_flops_per_sec,
            PrefillPeak::Bf16Dot => m.bf16_flops_per_sec,
            PrefillPeak::F32Fma => None,
        }
        .unwrap_or(m.fma_flops_per_sec)
    }

    /// `prefill_peak` in `--json`.
    fn json_name(self) -> &'static str {
        match self {
            PrefillPeak::F32Fma => "f32_fma",
            PrefillPeak::Bf16Dot => "bf16_dot",
            PrefillPeak::AmxBf16 => "amx_bf16",
        }
    }

    /// Its name in the report's text.
    fn describe(self) -> &'static str {
        match self {
            PrefillPeak::F32Fma => "f32 FMA peak",
            PrefillPeak::Bf16Dot => "BF16 dot peak",
            PrefillPeak::AmxBf16 => "AMX BF16 tile peak",
        }
    }
}

/// The limits a row is read against: prefill against a compute peak, decode against the read
/// bandwidth.
#[derive(Clone, Copy, Debug)]
struct Limits {
    peak_flops: f64,
    read_bytes_per_sec: f64,
}

/// The host CPU's limits, measured in the same run: the compute peak of `peak`
/// ([`PrefillPeak::of`]) and the all-threads read bandwidth. `None` unless the
/// run computes on the CPU (`on_cpu`): another backend computes on its device, whose bandwidth
/// and peak the bench does not measure, and dividing by the host's would mean nothing (an H200
/// "ran at 180% of the peak").
fn limits(m: &Machine, peak: PrefillPeak, on_cpu: bool) -> Option<Limits> {
    on_cpu.then_some(Limits { peak_flops: peak.flops(m), read_bytes_per_sec: m.read_bytes_per_sec })
}

/// The line printed above the table when the rows are not read against the machine's limits.
fn no_limits_note(backend: &str) -> String {
    format!(
        "limits: the figures above are the host CPU's, and backend `{backend}` computes on its device, whose read \
         bandwidth and compute peak dsv4 bench does not measure yet: the prefill peak and roofline columns are left \
         empty (bytes read/tok counts the weights in their stored forms)"
    )
}

fn table_row(r: &Row, w: &ActiveWeights, limits: Option<Limits>) -> String {
    let d = r.derive(w, limits);
    let opt = |v: Option<f64>, scale: f64, prec: usize| v.map_or("-".to_string(), |v| format!("{:.prec$}", v * scale));
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    format!(
        "{:>9} {:>14.1} {:>14} {:>16.2} {:>13} {:>12.1} {:>12} {:>16.0} {:>14} {:>9}",
        r.context,
        d.prefill_tok_s,
        opt(r.decode_secs_per_token, 1e3, 3),
        d.prefill_flop_s / 1e9,
        pct(d.prefill_peak_fraction),
        r.kv_bytes_per_context_token,
        human_bytes(r.kv_held).replace(' ', ""),
        d.bytes_per_token,
        opt(d.achieved, 1e-9, 3),
        pct(d.roofline),
    )
}

/// The line above the table with `--speculative-tokens`: what the acceptance measured here is
/// worth, and which figure decides the speed-up.
fn speculation_note(k: usize) -> String {
    format!(
        "speculative decoding (--speculative-tokens {k}): acceptance here is greedy decoding of a pseudo-random \
         prompt, meaningless on random weights and unrepresentative on real ones (measure it on real text with \
         `dsv4 generate --speculative-tokens`); what decides the speed-up at a given acceptance is the verify-cost \
         ratio: speed-up = tokens per main-model step / (verify cost + draft cost, in 1-token steps)"
    )
}

/// The speculative decoding measured at a context, under its table row. Every line starts with
/// `speculative |` (not a number: scripts take rows by their first column).
fn speculation_report(r: &Row, s: &SpecRow) -> String {
    let st = &s.stats;
    let plain = r.decode_secs_per_token.map_or(f64::NAN, |t| 1.0 / t);
    let mut out = format!(
        "speculative | context {}, {} drafts per step: {} of {} drafts accepted ({:.1}%), {:.2} tokens per main-model \
         step ({} tokens in {} steps, {:.2} rows fed per step)\n",
        r.context,
        s.k,
        st.accepted,
        st.drafted,
        100.0 * st.acceptance_rate(),
        st.tokens_per_step(),
        st.emitted,
        st.verify_steps,
        st.verify_rows as f64 / st.verify_steps.max(1) as f64,
    );
    out += &format!(
        "speculative | verify step of {} tokens: {:.3} ms = {:.2}x a 1-token step ({:.3} ms; medians of {VERIFY_REPS}); \
         drafting {:.3} ms per step = {:.2}x\n",
        s.k + 1,
        s.verify_step_secs * 1e3,
        s.verify_cost_ratio(),
        s.step_secs * 1e3,
        s.draft_secs_per_step() * 1e3,
        s.draft_cost_ratio(),
    );
    out += &format!(
        "speculative | decode {:.2} tok/s vs {:.2} plain: {:.2}x (expected {:.2} / ({:.2} + {:.2}) = {:.2}x)\n",
        s.tokens_per_sec(),
        plain,
        s.tokens_per_sec() / plain,
        st.tokens_per_step(),
        s.verify_cost_ratio(),
        s.draft_cost_ratio(),
        s.expected_speedup(),
    );
    out
}

/// A row's `speculative` object in `--json`.
fn speculation_json(r: &Row, s: &SpecRow) -> Value {
    let st = &s.stats;
    let plain = r.decode_secs_per_token.map(|t| 1.0 / t);
    json!({
        "draft_tokens": s.k,
        "acceptance_rate": st.acceptance_rate(),
        "tokens_per_step": st.tokens_per_step(),
        "drafted": st.drafted,
        "accepted": st.accepted,
        "verify_steps": st.verify_steps,
        "rows_per_verify_step": st.verify_rows as f64 / st.verify_steps.max(1) as f64,
        "step_ms": s.step_secs * 1e3,
        "verify_step_ms": s.verify_step_secs * 1e3,
        "verify_cost_ratio": s.verify_cost_ratio(),
        "draft_ms_per_step": s.draft_secs_per_step() * 1e3,
        "draft_cost_ratio": s.draft_cost_ratio(),
        "expected_speedup": s.expected_speedup(),
        "decode_tokens": st.emitted,
        "decode_tok_s": s.tokens_per_sec(),
        "plain_decode_tok_s": plain,
        "speedup": plain.map(|p| s.tokens_per_sec() / p),
    })
}

/// Everything `--json` prints.
struct Report<'a> {
    machine: &'a Machine,
    isa: Option<&'a str>,
    backend: String,
    model: &'a str,
    kv: String,
    precision: Precision,
    /// The compute peak the prefill column is read against.
    prefill_peak: PrefillPeak,
    /// What the rows are read against ([`limits`]).
    limits: Option<Limits>,
    weights: &'a ActiveWeights,
    weight_memory: &'a WeightMemoryReport,
    decode_steps: usize,
    chunk: usize,
    speculative_tokens: usize,
    warmup: Option<Warmup>,
    rows: &'a [Row],
    /// A split run's layout and every rank's runs (`rows` are rank 0's).
    ranks: Option<(ParallelLayout, &'a [RankRun])>,
}

impl Report<'_> {
    fn to_json(&self) -> Value {
        let m = self.machine;
        let w = self.weights;
        let features: serde_json::Map<String, Value> =
            m.features.iter().map(|&(name, on)| (name.to_string(), Value::Bool(on))).collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let d = r.derive(w, self.limits);
                let mut row = json!({
                    "context": r.context,
                    "prefill_tokens": r.prefill_tokens,
                    "prefill_tok_s": d.prefill_tok_s,
                    "prefill_gflop": r.prefill_flops / 1e9,
                    "prefill_gflop_s": d.prefill_flop_s / 1e9,
                    "prefill_peak_fraction": d.prefill_peak_fraction,
                    "decode_ms_per_token": r.decode_secs_per_token.map(|s| s * 1e3),
                    "active_bytes_per_token": w.bytes(),
                    "kv_bytes": r.kv_held,
                    "kv_bytes_per_context_token": r.kv_bytes_per_context_token,
                    "bytes_read_per_token": d.bytes_per_token,
                    "achieved_gb_s": d.achieved.map(gb),
                    "roofline_fraction": d.roofline,
                });
                if let Some(p) = &r.profile {
                    row["profile"] = json!({"prefill": profile_json(&p.prefill), "decode": profile_json(&p.decode)});
                }
                if let Some(s) = &r.speculation {
                    row["speculative"] = speculation_json(r, s);
                }
                if let Some((_, runs)) = self.ranks {
                    row["comm"] = comm_json(runs, i, self.decode_steps);
                }
                row
            })
            .collect();
        let mut report = json!({
            "machine": {
                "cpu": m.cpu,
                "features": features,
                "isa": self.isa,
                "threads": m.threads,
                "read_buffer_bytes": m.read_buffer_bytes,
                "read_kernel": m.read_kernel,
                "read_gb_s": gb(m.read_bytes_per_sec),
                "read_gb_s_one_thread": m.read_bytes_per_sec_one_thread.map(gb),
                "fma_kernel": m.fma_kernel,
                "fma_gflop_s": m.fma_flops_per_sec / 1e9,
                "bf16_gflop_s": m.bf16_flops_per_sec.map(|f| f / 1e9),
                "amx_bf16_gflop_s": m.amx_flops_per_sec.map(|f| f / 1e9),
            },
            "backend": self.backend,
            "model": self.model,
            "precision": self.precision.name(),
            "prefill_peak": self.prefill_peak.json_name(),
            "kv": self.kv,
            "weight_memory": {
                "mode": self.weight_memory.held.map(|m| m.name()),
                "anon_huge_page_bytes": self.weight_memory.huge_page_bytes,
            },
            "decode_steps": self.decode_steps,
            "prefill_chunk": self.chunk,
            "speculative_tokens": self.speculative_tokens,
            "warmup": self.warmup.map(|w| json!({"prefill_tokens": w.prefill_tokens, "decode_steps": w.decode_steps})),
            "weights_per_token": {
                "embedding_row": w.embedding_row,
                "tid2eid_rows": w.tid2eid_rows,
                "routed_experts": w.routed_experts,
                "shared_experts": w.shared_experts,
                "dense": w.dense,
                "head": w.head,
                "total": w.bytes(),
                "matrix_params": w.matrix_params,
                "head_params": w.head_params,
            },
            "rows": rows,
        });
        if let Some((l, _)) = self.ranks {
            report["devices"] = json!({
                "world": l.world,
                "tensor_parallel": l.tp,
                "expert_parallel": l.ep,
                "moe_exchange": l.moe.name(),
                "data_parallel_attention": l.data_parallel_attention,
            });
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use dsv4_backend_cpu::CpuBackend;
    use dsv4_core::builtin;
    use dsv4_core::kv::KvConfig;
    use dsv4_core::profile::Profiled;

    use super::*;

    #[test]
    fn the_pool_covers_every_context_and_its_decode_steps() {
        assert_eq!(super::tokens_needed(&[usize::MAX], 1, 0), usize::MAX, "overflow saturates");
        assert_eq!(super::tokens_needed(&[1, usize::MAX - 1], 1, 0), usize::MAX, "overflow saturates");
        assert_eq!(super::tokens_needed(&[usize::MAX - 3], 1, 2), usize::MAX, "overflow saturates");
        assert_eq!(super::tokens_needed(&[1024, 8192], 32, 0), 8192 + 32);
        // Decode tokens of one context run past the next: it starts one token later.
        assert_eq!(super::tokens_needed(&[100, 110], 32, 0), 100 + 32 + 1 + 32);
        assert_eq!(super::tokens_needed(&[0], 4, 0), 5);
        // Speculation: the next token and 32 more decoded speculatively after the plain steps.
        assert_eq!(super::tokens_needed(&[1024, 8192], 32, 3), 8192 + 32 + 1 + 32);
        assert_eq!(super::tokens_needed(&[100, 110], 32, 3), 100 + 2 * (32 + 32 + 1));
        // ... or the verify step timed there, when k is larger than that.
        assert_eq!(super::tokens_needed(&[100], 2, 5), 100 + 2 + 5 + 1);
    }

    /// builtin:tiny by hand: vocab 271, hidden 64, 4 layers (sliding, CSA 4, HCA 16, CSA 4;
    /// layer 0 hash-routed), 4 heads of 32, q rank 32, 2 output groups of rank 16, 8 experts of
    /// width 32 with k = 2, indexer 4 heads of 16, mHC 4 streams (mix 24). Matrices BF16, the
    /// embedding, norms and mHC F32, tid2eid I64.
    #[test]
    fn tiny_active_bytes_by_hand() {
        let (cfg, ckpt) = builtin::tiny().unwrap();
        let w = active_weights(&cfg, &ckpt).unwrap();
        // One embedding row (64 f32), not the 271-row table.
        assert_eq!(w.embedding_row, 64.0 * 4.0);
        // The whole head: 271 x 64 BF16.
        assert_eq!(w.head, 271.0 * 64.0 * 2.0);
        // One tid2eid row (k = 2 i64) on the one hash layer.
        assert_eq!(w.tid2eid_rows, 2.0 * 8.0);
        // An expert is w1, w3 [32, 64] and w2 [64, 32] in BF16: 12288 bytes.
        let expert = 3.0 * 32.0 * 64.0 * 2.0;
        assert_eq!(w.routed_experts, 4.0 * 2.0 * expert, "k = 2 of the 8 experts, 4 layers");
        assert_eq!(w.shared_experts, 4.0 * expert);
        // Dense: everything the checkpoint holds but the embedding, head, tid2eid and experts.
        let all: usize = ckpt.tensors().map(|t| t.size_bytes()).sum();
        let dense = all as f64 - 271.0 * 64.0 * 4.0 - 271.0 * 64.0 * 2.0 - 271.0 * 2.0 * 8.0 - 4.0 * 9.0 * expert;
        assert_eq!(w.dense, dense);
        // ... which by hand is, per layer: mHC 2 x ([24, 256] + [24] + [3]) f32, two norms of 64
        // f32, attention wq_a [32,64] wq_b [128,32] wkv [32,64] wo_a [32,64] wo_b [64,32] BF16,
        // q_norm 32 and kv_norm 32 f32, sinks 4 f32, router [8, 64] BF16; bias [8] f32 on the
        // three top-k layers; CSA: compressor wkv/wgate [64, 64] BF16, ape [4, 64] and norm 32
        // f32, indexer wq_b [64, 32] and weights_proj [4, 64] BF16, its compressor wkv/wgate
        // [32, 64] BF16, ape [4, 32] and norm 16 f32; HCA: wkv/wgate [32, 64] BF16, ape [16, 32]
        // and norm 32 f32. Globals: norm 64, hc_head_fn [4, 256], base 4, scale 1, all f32.
        let mhc = 2.0 * (24.0 * 256.0 + 24.0 + 3.0) * 4.0;
        let attn = (2048.0 + 4096.0 + 2048.0 + 2048.0 + 2048.0) * 2.0 + (32.0 + 32.0 + 4.0) * 4.0;
        let common = mhc + 2.0 * 64.0 * 4.0 + attn + 8.0 * 64.0 * 2.0;
        let csa = (2.0 * 4096.0 + 2048.0 + 256.0 + 2.0 * 2048.0) * 2.0 + (256.0 + 32.0 + 128.0 + 16.0) * 4.0;
        let hca = 2.0 * 2048.0 * 2.0 + (512.0 + 32.0) * 4.0;
        let by_hand = 4.0 * common + 3.0 * 8.0 * 4.0 + 2.0 * csa + hca + (64.0 + 1024.0 + 4.0 + 1.0) * 4.0;
        assert_eq!(w.dense, by_hand);
        assert_eq!(w.bytes(), w.embedding_row + w.tid2eid_rows + w.routed_experts + w.shared_experts + dense + w.head);
    }

    #[test]
    fn tiny_flops_by_hand() {
        let (cfg, ckpt) = builtin::tiny().unwrap();
        let w = active_weights(&cfg, &ckpt).unwrap();
        // Matrix values per layer: mHC 2 x 24 x 256, attention 2048 + 4096 + 2048 + 2048 + 2048,
        // router 8 x 64, shared expert 3 x 2048, routed 2 of 8 experts of 3 x 2048; CSA adds
        // 2 x 4096 + 2048 + 256 + 2 x 2048, HCA 2 x 2048. Plus hc_head_fn 4 x 256.
        let common = 12288.0 + 12288.0 + 512.0 + 6144.0 + 2.0 * 6144.0;
        let by_hand = 4.0 * common + 2.0 * 14592.0 + 4096.0 + 1024.0;
        assert_eq!(w.matrix_params, by_hand);
        assert_eq!(w.head_params, 271.0 * 64.0);
        // Position 0: one key (itself) on every layer, 4 x 4 x 32 FLOP per key.
        assert_eq!(attention_flops(&cfg, 0), 4.0 * 512.0);
        // Position 63: window 16 keys; CSA 16 entries, top 8 + indexer 2 x 4 x 16 x 16; HCA 4.
        assert_eq!(attention_flops(&cfg, 63), 16.0 * 512.0 + 2.0 * (24.0 * 512.0 + 2048.0) + 20.0 * 512.0);
        // Two tokens in one step: the head once; position 0 sees one key per layer, position 1
        // two.
        let two = prefill_flops(&cfg, &w, 0, 2, 512);
        assert_eq!(two, 2.0 * 2.0 * by_hand + 2.0 * 271.0 * 64.0 + (1.0 + 2.0) * 4.0 * 512.0);
        // The same two tokens one per step: the head twice.
        assert_eq!(prefill_flops(&cfg, &w, 0, 2, 1), two + 2.0 * 271.0 * 64.0);
    }

    #[test]
    fn a_tied_head_reads_the_embedding_table() {
        let mut c = builtin::tiny_config_json();
        c["tie_word_embeddings"] = serde_json::json!(true);
        let cfg = ModelConfig::from_json(c.as_object().unwrap()).unwrap();
        let (_, ckpt) = builtin::tiny().unwrap();
        let w = active_weights(&cfg, &ckpt).unwrap();
        assert_eq!((w.embedding_row, w.head), (0.0, 271.0 * 64.0 * 4.0));
    }

    /// The layout of `--json`: every key and the type of every value (the numbers vary).
    fn skeleton(v: &Value) -> Value {
        match v {
            Value::Null => "null".into(),
            Value::Bool(_) => "bool".into(),
            Value::Number(_) => "number".into(),
            Value::String(_) => "string".into(),
            Value::Array(a) => Value::Array(a.iter().map(skeleton).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), skeleton(v))).collect()),
        }
    }

    /// The communication lines: per token, how many collectives of each kind and the payload
    /// of one (the kind's bytes are its calls' together), counted and planned.
    #[test]
    fn only_all_to_all_v_may_differ_from_the_plan() {
        use dsv4_core::parallel::CollectiveKind::{AllGather, AllReduce, AllToAllV};
        let traffic = |kinds: &[(CollectiveKind, u64, u64)]| {
            let mut t = Traffic::default();
            for &(k, calls, bytes) in kinds {
                for _ in 0..calls {
                    t.record(k, bytes / calls);
                }
            }
            t
        };
        let planned = traffic(&[(AllGather, 4, 1024), (AllToAllV, 12, 3000)]);
        assert_eq!(traffic_verdict(&planned.clone(), &planned), "equal");
        // MC2: two calls a layer of other sizes; the all-gathers equal.
        let mc2 = traffic(&[(AllGather, 4, 1024), (AllToAllV, 8, 1200)]);
        assert!(traffic_verdict(&mc2, &planned).starts_with("equal all-gathers and all-reduces; all-to-all-v not"));
        for off in [traffic(&[(AllGather, 4, 1028), (AllToAllV, 12, 3000)]), traffic(&[(AllReduce, 1, 4)])] {
            assert_eq!(traffic_verdict(&off, &planned), "DIFFERENT");
        }
    }

    #[test]
    fn comm_lines_say_the_calls_and_the_size_of_each() {
        let cfg = builtin::tiny().unwrap().0;
        let layout = ParallelLayout::new(4, 2, 2, &cfg).unwrap();
        // Rank 0 of TP 2 × EP 2 on tiny (4 layers, hidden 64): per token the embedding's and
        // two per layer all-reduces of 64 f32, and the head's gather of its 136 vocabulary rows.
        let plan = rank_decode_traffic(&cfg, &layout.rank(0), 1);
        assert_eq!(crate::plan::kinds(&plan, 1), "9 all-reduces of 256 B each, 1 all-gather of 544 B");
        assert_eq!(crate::plan::kinds(&plan.times(3), 3), "9 all-reduces of 256 B each, 1 all-gather of 544 B");
        let row = |traffic| Row {
            context: 16,
            prefill_tokens: 16,
            prefill_secs: 1.0,
            prefill_flops: 1.0,
            decode_secs_per_token: Some(1.0),
            kv_bytes_per_context_token: 1.0,
            kv_held: 0,
            profile: None,
            speculation: None,
            decode_traffic: Some(traffic),
        };
        let runs = [RankRun { rank: layout.rank(0), plan: plan.clone(), rows: vec![row(plan.times(2))] }];
        let report = comm_report(&runs, 2);
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].contains("an all-reduce counts its buffer, an all-gather the rank's part"), "{report}");
        assert_eq!(
            lines[1],
            "comm | context 16, rank 0: counted 2848 B per token (9 all-reduces of 256 B each, 1 all-gather of 544 B) \
             | planned 2848 B per token (9 all-reduces of 256 B each, 1 all-gather of 544 B): equal"
        );
    }

    /// Machine figures for the report tests (not measured: the numbers do not matter).
    fn test_machine() -> Machine {
        Machine {
            cpu: "test".into(),
            features: machine::FEATURE_NAMES.iter().map(|&f| (f, true)).collect(),
            threads: 2,
            read_buffer_bytes: 1 << 30,
            read_kernel: "avx512",
            read_bytes_per_sec: 50e9,
            read_bytes_per_sec_one_thread: Some(20e9),
            fma_kernel: "avx512f",
            fma_flops_per_sec: 200e9,
            bf16_flops_per_sec: Some(400e9),
            amx_flops_per_sec: Some(1600e9),
        }
    }

    /// Why the BF16 peak is missing or unused: the CPU lacks the instructions, or it has them and
    /// the kernels were lowered (`DSV4_CPU_ISA=avx2`) and do not use them; or it was measured and
    /// the GEMMs multiply in f32 (`bf16_products` false).
    #[test]
    fn machine_report_says_why_the_bf16_peak_is_missing() {
        let mut m = test_machine();
        let used = machine_report(&m, Some("avx512"), true);
        assert!(used.contains("bf16 dot peak: 400.0 GFLOP/s (avx512_bf16 vdpbf16ps, 2 FLOP per product)\n"), "{used}");
        // Measured but not used (an Intel CPU, or DSV4_CPU_BF16_PRODUCTS=off).
        m.amx_flops_per_sec = None;
        let unused_no_amx = machine_report(&m, Some("avx512"), false);
        m.amx_flops_per_sec = Some(1600e9);
        let unused = machine_report(&m, Some("avx512"), false);
        assert!(
            unused_no_amx.contains(
                "bf16 dot peak: 400.0 GFLOP/s (avx512_bf16 vdpbf16ps, 2 FLOP per product; not used here: GEMMs on \
                 BF16 inputs multiply in f32, DSV4_CPU_BF16_PRODUCTS=on to change that)\n"
            ),
            "{unused_no_amx}"
        );
        // AMX in use: the GEMMs multiply on tiles, not in f32.
        assert!(used.contains("amx bf16 peak: 1600.0 GFLOP/s (amx_bf16 tdpbf16ps tiles"), "{used}");
        assert!(
            unused.contains(
                "; not used here: prefill GEMMs on BF16 inputs multiply on AMX tiles, decode GEMVs in f32, \
                 DSV4_CPU_BF16_PRODUCTS=on for vdpbf16ps there)\n"
            ),
            "{unused}"
        );
        m.amx_flops_per_sec = None;
        let amx_off = machine_report(&m, Some("avx512"), false);
        assert!(amx_off.contains("amx bf16 peak: not measured (the cpu kernels do not use amx here"), "{amx_off}");
        assert!(amx_off.contains("GEMMs on BF16 inputs multiply in f32"), "{amx_off}");
        m.features.iter_mut().filter(|f| f.0 == "amx_bf16").for_each(|f| f.1 = false);
        assert!(!machine_report(&m, Some("avx512"), false).contains("amx bf16 peak"), "no AMX: no line");
        m.bf16_flops_per_sec = None;
        (m.fma_kernel, m.read_kernel) = ("avx2+fma", "avx2");
        let lowered = machine_report(&m, Some("avx2"), false);
        assert!(
            lowered.contains("bf16 dot peak: not measured (the cpu kernels do not use avx512_bf16 here)"),
            "{lowered}"
        );
        assert!(lowered.contains("(avx2+fma, 2 FLOP per multiply-add)"), "{lowered}");
        m.features.iter_mut().filter(|f| f.0 == "avx512_bf16").for_each(|f| f.1 = false);
        let lacking = machine_report(&m, Some("avx2"), false);
        assert!(lacking.contains("bf16 dot peak: not measured (no avx512_bf16)"), "{lacking}");
    }

    /// Each peak reads its own measurement, the f32 FMA peak where that one is missing.
    #[test]
    fn prefill_peaks_read_their_measurements() {
        let mut m = test_machine();
        let flops = |m: &Machine| [PrefillPeak::F32Fma, PrefillPeak::Bf16Dot, PrefillPeak::AmxBf16].map(|p| p.flops(m));
        assert_eq!(flops(&m), [200e9, 400e9, 1600e9]);
        (m.bf16_flops_per_sec, m.amx_flops_per_sec) = (None, None);
        assert_eq!(flops(&m), [200e9; 3]);
        assert_eq!(limits(&test_machine(), PrefillPeak::AmxBf16, true).unwrap().peak_flops, 1600e9);
        let choose = |amx, vdp| PrefillPeak::choose(true, amx, vdp);
        assert_eq!(
            [choose(true, true), choose(true, false), choose(false, true), choose(false, false)],
            [PrefillPeak::AmxBf16, PrefillPeak::AmxBf16, PrefillPeak::Bf16Dot, PrefillPeak::F32Fma]
        );
        assert_eq!(PrefillPeak::choose(false, true, true), PrefillPeak::F32Fma, "f32 activations");
    }

    /// The warm-up hands every block it took back to the pool: a pool sized for one sequence
    /// holds a whole one after it (while its sequence held blocks, it could not).
    #[test]
    fn warm_up_gives_its_blocks_back() {
        let be = CpuBackend::new();
        let model =
            crate::load::load_model(&be, builtin::TINY_NAME, Precision::F32, crate::load::WeightMemoryArg::Auto)
                .unwrap();
        let tokens = 40;
        let config = KvConfig::for_sequences(&model.cfg, KvDtype::F32, 1, tokens, 16);
        let mut cache = model.new_cache(&be, config).unwrap();
        let fresh = cache.new_sequence();
        assert!(cache.can_append(&fresh, tokens));
        let mut held = cache.new_sequence();
        let batch = Batch::new(&[(&[1u32; 16][..], 0)]).unwrap();
        model.step_with_residual(&be, &batch, &mut cache, &mut [&mut held], Logits::LastPerSequence).unwrap();
        assert!(!cache.can_append(&fresh, tokens), "the pool has room for more than one sequence");
        cache.release(&mut held);
        warm_up(&be, &model, &mut cache, Warmup { prefill_tokens: 16, decode_steps: 1 }).unwrap();
        assert!(cache.can_append(&fresh, tokens));
    }

    #[test]
    fn json_report_on_tiny() {
        let be = CpuBackend::new();
        let (cfg, ckpt) = builtin::tiny().unwrap();
        let weights = active_weights(&cfg, &ckpt).unwrap();
        let model =
            crate::load::load_model(&be, builtin::TINY_NAME, Precision::F32, crate::load::WeightMemoryArg::Auto)
                .unwrap();
        let contexts = [8, 20];
        let config = KvConfig::for_sequences(&cfg, KvDtype::F32, 1, tokens_needed(&contexts, 2, 0), 4);
        let mut seen = 0;
        let mut count = |p: Progress| seen += matches!(p, Progress::Row(_)) as usize;
        let rows = time_contexts(
            &be,
            &model,
            config,
            KvDtype::F32,
            &weights,
            &contexts,
            2,
            4,
            0,
            None,
            None,
            None,
            &mut count,
        )
        .unwrap();
        assert_eq!(seen, 2);
        assert_eq!(rows.iter().map(|r| (r.context, r.prefill_tokens)).collect::<Vec<_>>(), [(8, 8), (20, 10)]);
        // The second prefill continues at position 10 (8 prompt + 2 decoded) in 3 steps.
        assert_eq!(rows[1].prefill_flops, prefill_flops(&cfg, &weights, 10, 10, 4));
        let machine = test_machine();
        let report = Report {
            machine: &machine,
            isa: Some("avx512"),
            backend: be.describe(),
            model: builtin::TINY_NAME,
            kv: "kv".into(),
            precision: Precision::F32,
            prefill_peak: PrefillPeak::F32Fma,
            limits: limits(&machine, PrefillPeak::F32Fma, true),
            weights: &weights,
            weight_memory: &WeightMemoryReport { held: Some(WeightMemory::Resident), huge_page_bytes: Some(2 << 20) },
            decode_steps: 2,
            chunk: 4,
            speculative_tokens: 0,
            warmup: Warmup::plan(true, &contexts, 4, 2),
            rows: &rows,
            ranks: None,
        };
        let j = report.to_json();
        insta::assert_snapshot!(serde_json::to_string_pretty(&skeleton(&j)).unwrap());
        let row = &j["rows"][0];
        let achieved = row["achieved_gb_s"].as_f64().unwrap();
        assert!((row["roofline_fraction"].as_f64().unwrap() - achieved / 50.0).abs() < 1e-12);
        assert_eq!(row["active_bytes_per_token"].as_f64().unwrap(), weights.bytes());
        assert_eq!(j["machine"]["bf16_gflop_s"].as_f64(), Some(400.0));
        // The human table keeps context, prefill tok/s and decode ms/tok as its first columns.
        let header = table_header();
        assert_eq!(
            header.split_whitespace().take(5).collect::<Vec<_>>(),
            ["context", "prefill", "tok/s", "decode", "ms/tok"]
        );
        let line = table_row(&rows[0], &weights, limits(&machine, PrefillPeak::F32Fma, true));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[0], "8");
        assert!(cols[1].parse::<f64>().unwrap() > 0.0 && cols[2].parse::<f64>().unwrap() > 0.0);
        assert!(cols[4].ends_with('%') && cols[9].ends_with('%'), "{line}");
        // On a device backend the host's limits are not divided into: those columns stay empty,
        // in the table and in the JSON, and the rest are the same.
        let on_device = table_row(&rows[0], &weights, limits(&machine, PrefillPeak::F32Fma, false));
        let dev_cols: Vec<&str> = on_device.split_whitespace().collect();
        assert_eq!((dev_cols[4], dev_cols[9]), ("-", "-"), "{on_device}");
        assert_eq!(on_device.len(), line.len(), "columns stay aligned: {line}\n{on_device}");
        assert_eq!(dev_cols[..4], cols[..4]);
        let j = Report { limits: None, ..report }.to_json();
        assert!(j["rows"][0]["roofline_fraction"].is_null() && j["rows"][0]["prefill_peak_fraction"].is_null());
        assert!(j["rows"][0]["achieved_gb_s"].as_f64().unwrap() > 0.0);
        // The machine section has no line a script could take for a table row.
        let section = machine_report(&machine, Some("avx512"), false);
        assert!(section.lines().all(|l| !l.starts_with(|c: char| c.is_ascii_digit() || c == ' ')), "{section}");
    }

    /// `--speculative-tokens 2` on official_fp8 (it has an MTP block) in a pool sized exactly by
    /// `tokens_needed`: every context gets its speculation figures, the verify steps timed there
    /// are rolled back (the next context starts where the speculative decode stopped).
    #[test]
    fn speculation_on_official_fp8() {
        let be = CpuBackend::new();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/cases/official_fp8");
        let (cfg, ckpt) = crate::load::open(dir).unwrap();
        let weights = active_weights(&cfg, &ckpt).unwrap();
        let model = crate::load::load_model(&be, dir, Precision::F32, crate::load::WeightMemoryArg::Auto).unwrap();
        // Contexts across the 128-token page, chunks of 16 with a rollback depth of 10 on top.
        let (contexts, k) = ([100, 140], 2);
        let depth = dsv4_core::speculative::rollback_depth(k);
        let config = KvConfig::for_sequences(&cfg, KvDtype::F32, 1, tokens_needed(&contexts, 4, k), 16 + depth);
        let rows = time_contexts(
            &be,
            &model,
            config,
            KvDtype::F32,
            &weights,
            &contexts,
            4,
            16,
            k,
            Warmup::plan(true, &contexts, 16, 4),
            None,
            None,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(rows.iter().map(|r| r.context).collect::<Vec<_>>(), [100, 140]);
        for r in &rows {
            let s = r.speculation.as_ref().unwrap();
            assert_eq!((s.k, s.stats.emitted), (2, 4));
            assert!(s.stats.verify_steps >= 2 && s.stats.drafted >= 1 && s.stats.drafted <= 2 * s.stats.verify_steps);
            assert!(s.step_secs > 0.0 && s.verify_step_secs > 0.0 && s.decode_secs > 0.0);
            assert!(s.expected_speedup() > 0.0 && s.tokens_per_sec() > 0.0);
        }
        // 100 + 4 plain + 1 + 4 speculative tokens, the newest (at least) not fed yet.
        assert!((140 - 108..=140 - 104).contains(&rows[1].prefill_tokens), "{}", rows[1].prefill_tokens);
        let j = speculation_json(&rows[0], rows[0].speculation.as_ref().unwrap());
        let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        for key in ["acceptance_rate", "tokens_per_step", "verify_cost_ratio", "decode_tok_s", "plain_decode_tok_s"] {
            assert!(keys.contains(&key), "{j}");
        }
        let text = speculation_report(&rows[0], rows[0].speculation.as_ref().unwrap());
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.lines().all(|l| l.starts_with("speculative | ")), "{text}");
    }

    /// `--profile` on builtin:tiny: a prefill and a decode table per context, as each phase
    /// ends and before the context's row, and each row's profiles in the JSON.
    #[test]
    fn profile_on_tiny() {
        let prof = Profiled::new(CpuBackend::new(), true);
        let (cfg, ckpt) = builtin::tiny().unwrap();
        let weights = active_weights(&cfg, &ckpt).unwrap();
        let model =
            crate::load::load_model(&prof, builtin::TINY_NAME, Precision::F32, crate::load::WeightMemoryArg::Auto)
                .unwrap();
        let contexts = [8, 20];
        let config = KvConfig::for_sequences(&cfg, KvDtype::F32, 1, tokens_needed(&contexts, 2, 0), 4);
        let machine = test_machine();
        let mut text = String::new();
        let take = || prof.take();
        let mut progress = |p: Progress| match p {
            Progress::Phase(phase) => text += &phase_report(&phase),
            Progress::Row(row) => {
                text += &format!("{}\n", table_row(row, &weights, limits(&machine, PrefillPeak::F32Fma, true)))
            }
        };
        let rows = time_contexts(
            &prof,
            &model,
            config,
            KvDtype::F32,
            &weights,
            &contexts,
            2,
            4,
            0,
            Warmup::plan(true, &contexts, 4, 2),
            Some(&take),
            None,
            &mut progress,
        )
        .unwrap();
        // In order: prefill table, decode table, row; for each context.
        let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("no `{needle}` in\n{text}"));
        let order = [
            at("prefill profile at context 8: 8 tokens, wall "),
            at("decode profile at context 8: 2 tokens, wall "),
            at("\n        8 "),
            at("prefill profile at context 20: 10 tokens, wall "),
            at("decode profile at context 20: 2 tokens, wall "),
            at("\n       20 "),
        ];
        assert!(order.is_sorted(), "{order:?} in\n{text}");
        let lines = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).collect::<Vec<_>>();
        let (prefill, decode) = (lines("prefill |"), lines("decode  |"));
        // Per context: header, at most 15 ops, the coverage line.
        assert!(prefill.len() <= 2 * 17 && prefill.len() > 2 * 3, "{text}");
        for header in [prefill[0], decode[0]] {
            assert!(["ms", "calls", "µs/call", "% wall", "op"].iter().all(|c| header.contains(c)), "{header}");
        }
        assert!(decode[0].contains("ms/token") && decode[0].contains("calls/token"), "{}", decode[0]);
        assert!(prefill.iter().any(|l| l.ends_with(" hc_pre")), "{text}");
        assert!(prefill.iter().any(|l| l.contains("linear [") && l.ends_with("m>1")), "{text}");
        assert!(decode.iter().any(|l| l.contains("linear [") && l.ends_with("m=1")), "{text}");
        assert!(prefill.iter().any(|l| l.contains(" listed ops: ") && l.contains(" ms wall (")), "{text}");
        assert!(decode.iter().any(|l| l.contains(" listed ops: ") && l.contains(" ms/token wall (")), "{text}");
        // Only the two rows start with a blank or a digit (what scripts take for table rows).
        let numeric = text.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit() || c == ' ')).count();
        assert_eq!(numeric, 2, "{text}");

        let report = Report {
            machine: &machine,
            isa: None,
            backend: prof.describe(),
            model: builtin::TINY_NAME,
            kv: "kv".into(),
            precision: Precision::F32,
            prefill_peak: PrefillPeak::F32Fma,
            limits: limits(&machine, PrefillPeak::F32Fma, true),
            weights: &weights,
            weight_memory: &WeightMemoryReport { held: Some(WeightMemory::Resident), huge_page_bytes: Some(2 << 20) },
            decode_steps: 2,
            chunk: 4,
            speculative_tokens: 0,
            warmup: None,
            rows: &rows,
            ranks: None,
        };
        let j = report.to_json();
        let profile = &j["rows"][0]["profile"];
        for phase in ["prefill", "decode"] {
            let entries = profile[phase].as_array().unwrap_or_else(|| panic!("{phase}: {profile}"));
            assert!(entries.len() > PROFILE_TOP, "every op, not the top {PROFILE_TOP}: {profile}");
            assert!(entries
                .iter()
                .all(|e| skeleton(e) == json!({"op": "string", "total_ms": "number", "calls": "number"})));
            // The head runs once per step: two prefill chunks of 4, two decode steps.
            let head = entries.iter().find(|e| e["op"] == "hc_head").unwrap();
            assert_eq!(head["calls"], 2, "{phase}");
        }
    }
}
