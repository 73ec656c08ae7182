//! The generation loop: prefill a prompt (in chunks), then decode token by token with a
//! sampler until EOS, a caller-side stop (stop strings) or the token budget.
//!
//! A [`Session`] keeps one sequence's decoding state, in its own paged pool, between calls:
//! when the next prompt extends everything already fed (a chat turn appended to the history),
//! only the new tokens are prefilled; otherwise the sequence is released and the longest
//! prefix of the prompt still cached in the pool (whole blocks, with the sliding window and the
//! compressors' carry at that point) is reused. Either way the result is what a fresh forward
//! over the whole prompt would give.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvConfig, Sequence};
use crate::model::batch::Batch;
use crate::model::{Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::speculative::{SpecStats, Speculator};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (it is included in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Longest prefill step; long prompts are fed in chunks of this many tokens.
    pub prefill_chunk: usize,
    /// Tokens the checkpoint's MTP block drafts per step for speculative decoding
    /// ([`crate::speculative`]); 0 decodes one token per step.
    pub speculative_tokens: usize,
}

impl GenerateOptions {
    /// Why generation ends after emitting `tok` (the caller said `control`), with `generated`
    /// tokens emitted and `total` in the sequence (prompt included), under a context of `ctx`
    /// positions; None to go on. One rule for plain and speculative decoding.
    fn stop_after(&self, tok: u32, control: Control, generated: usize, total: usize, ctx: usize) -> Option<StopReason> {
        if self.stop_token_ids.contains(&tok) {
            Some(StopReason::Eos)
        } else if control == Control::Stop {
            Some(StopReason::Caller)
        } else if generated == self.max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if total >= ctx {
            Some(StopReason::ContextLength)
        } else {
            None
        }
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
            prefill_chunk: 512,
            speculative_tokens: 0,
        }
    }
}

/// What the per-token callback tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now (e.g. a stop string was completed); the token is kept.
    Stop,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It emitted one of [`GenerateOptions::stop_token_ids`].
    Eos,
    /// It generated [`GenerateOptions::max_new_tokens`].
    MaxTokens,
    /// The sequence reached the model's context (`max_position_embeddings`) first.
    ContextLength,
    /// The per-token callback returned [`Control::Stop`] (e.g. a stop string).
    Caller,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Prompt tokens actually prefilled (fewer than the prompt when a prefix was reused).
    pub prefilled: usize,
    /// Prompt tokens whose state came from the pool's prefix cache (not from the session's
    /// own continuation).
    pub prefix_cached: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Acceptance and step counts of a speculative generation (None without speculation).
    pub speculation: Option<SpecStats>,
}

impl Generation {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prefilled as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode rate over the tokens that needed a forward step (the first comes from prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

pub struct Session<'m, B: Backend> {
    model: &'m Model<B>,
    cache: KvCache<B>,
    seq: Sequence,
    /// The MTP drafting state, once a generation asked for speculative decoding.
    spec: Option<Speculator<B>>,
}

impl<'m, B: Backend> Session<'m, B> {
    /// A session whose pool is sized by `config` (e.g. [`KvConfig::for_sequences`] with one
    /// sequence of the longest context it will see).
    pub fn new(be: &B, model: &'m Model<B>, config: KvConfig) -> Result<Self> {
        let cache = model.new_cache(be, config)?;
        let seq = cache.new_sequence();
        Ok(Session { model, cache, seq, spec: None })
    }

    /// The session's sequence (its position and block tables).
    pub fn sequence(&self) -> &Sequence {
        &self.seq
    }

    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Device bytes the session's sequence holds in the pool.
    pub fn state_bytes(&self) -> usize {
        self.cache.sequence_bytes(&self.seq)
    }

    /// Forgets the sequence (its full pages stay in the pool's prefix cache).
    pub fn reset(&mut self) {
        self.cache.release(&mut self.seq);
        if let Some(spec) = &mut self.spec {
            spec.reset();
        }
    }

    /// Feeds tokens (in chunks) and returns the logits row of the last one. A failed step
    /// resets the session.
    pub fn feed(&mut self, be: &B, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Input("nothing to feed: the prompt is empty".into()));
        }
        let mut last = vec![];
        for part in tokens.chunks(chunk.max(1)) {
            let batch = Batch::new(&[(part, self.seq.pos())])?;
            let logits = self.model.step(be, &batch, &mut self.cache, &mut [&mut self.seq], Logits::LastPerSequence);
            let logits = match logits {
                Ok(l) => l,
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            };
            last = be.download(&logits)?;
        }
        Ok(last)
    }

    /// Generates a continuation of `prompt`. `on_token` sees each new token as it is chosen.
    pub fn generate(
        &mut self,
        be: &B,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<Control>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::Input("nothing to feed: the prompt is empty".into()));
        }
        let ctx = self.model.cfg.max_position_embeddings;
        if prompt.len() >= ctx {
            return Err(Error::Input(format!(
                "the prompt has {} tokens but the model's context is {ctx} (room must be left to generate)",
                prompt.len()
            )));
        }
        if opts.speculative_tokens > 0 {
            return self.generate_speculative(be, prompt, opts, on_token);
        }
        let mut sampler = Sampler::new(opts.sampling)?;
        // Continue if the prompt extends what the sequence has seen, else start over from the
        // longest cached prefix.
        let fed = self.seq.tokens();
        let mut prefix_cached = 0;
        if !(prompt.len() > fed.len() && prompt.starts_with(fed)) {
            self.reset();
            prefix_cached = self.cache.reuse_prefix(&mut self.seq, prompt)?;
        }
        let todo = prompt[self.seq.pos()..].to_vec();
        let t0 = Instant::now();
        let mut logits = self.feed(be, &todo, opts.prefill_chunk)?;
        let prefill_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut out = vec![];
        let mut stop = StopReason::MaxTokens;
        while out.len() < opts.max_new_tokens {
            let tok = sampler.sample(&logits);
            out.push(tok);
            let control = on_token(tok)?;
            if let Some(why) = opts.stop_after(tok, control, out.len(), prompt.len() + out.len(), ctx) {
                stop = why;
                break;
            }
            logits = self.feed(be, &[tok], 1)?;
        }
        Ok(Generation {
            tokens: out,
            stop,
            prefilled: todo.len(),
            prefix_cached,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            speculation: None,
        })
    }

    /// [`generate`](Self::generate) with the MTP block drafting
    /// [`GenerateOptions::speculative_tokens`] tokens per main-model step
    /// ([`crate::speculative`]). Output as without speculation (greedy: the same tokens; a
    /// seeded sampler: the same distribution, not the same tokens, since acceptance draws from
    /// the generator too).
    fn generate_speculative(
        &mut self,
        be: &B,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<Control>,
    ) -> Result<Generation> {
        let (model, k) = (self.model, opts.speculative_tokens);
        let mut sampler = Sampler::new(opts.sampling)?;
        let chunk = opts.prefill_chunk.max(1);
        if self.spec.as_ref().map(|s| (s.k(), s.max_step())) != Some((k, chunk)) {
            let spec = Speculator::new(be, model, k, chunk, self.cache.config.dtype)?;
            self.reset();
            self.spec = Some(spec);
        }
        // Continue if the prompt extends what both the sequence and the MTP block have seen
        // (a plain generation in between moves only the former), else start over from the
        // longest cached prefix, the MTP block's rows from there (its window is then shorter
        // for its first rows, which costs acceptance, never exactness).
        let fed = self.seq.tokens();
        let continues = prompt.len() > fed.len()
            && prompt.starts_with(fed)
            && self.spec.as_ref().is_some_and(|s| s.continues(prompt, self.seq.pos()));
        let mut prefix_cached = 0;
        if !continues {
            self.reset();
            prefix_cached = self.cache.reuse_prefix(&mut self.seq, prompt)?;
            self.spec.as_mut().expect("created above").restart_at(self.seq.pos(), prompt);
        }
        let result = self.speculate(be, prompt, prefix_cached, opts, &mut sampler, on_token);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn speculate(
        &mut self,
        be: &B,
        prompt: &[u32],
        prefix_cached: usize,
        opts: &GenerateOptions,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> Result<Control>,
    ) -> Result<Generation> {
        let model = self.model;
        let ctx = model.cfg.max_position_embeddings;
        let spec = self.spec.as_mut().expect("created by generate_speculative");
        let stats0 = spec.stats;
        // Prefill, handing each chunk's residual streams to the MTP block.
        self.seq.set_rollback_depth(0);
        let todo = prompt[self.seq.pos()..].to_vec();
        let t0 = Instant::now();
        let mut logits = vec![];
        for part in todo.chunks(opts.prefill_chunk.max(1)) {
            let start = self.seq.pos();
            let batch = Batch::new(&[(part, start)])?;
            let (l, h) =
                model.step_with_residual(be, &batch, &mut self.cache, &mut [&mut self.seq], Logits::LastPerSequence)?;
            logits = be.download(&l)?;
            spec.push(be, model, Some((&h, start)), prompt)?;
        }
        let prefill_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut tokens = prompt.to_vec();
        let mut out = vec![];
        let mut emit = |tok: u32, tokens: &mut Vec<u32>, out: &mut Vec<u32>| -> Result<Option<StopReason>> {
            tokens.push(tok);
            out.push(tok);
            let control = on_token(tok)?;
            Ok(opts.stop_after(tok, control, out.len(), tokens.len(), ctx))
        };
        let mut stop = if opts.max_new_tokens == 0 {
            Some(StopReason::MaxTokens)
        } else {
            emit(sampler.sample(&logits), &mut tokens, &mut out)?
        };
        self.seq.set_rollback_depth(spec.main_rollback_depth());
        'decode: while stop.is_none() {
            // Drafts that fit the token budget and the context; 0 makes a plain step.
            let k =
                spec.drafts_for(&self.seq, tokens.len(), (opts.max_new_tokens - out.len() - 1).min(ctx - tokens.len()));
            let first = spec
                .push(be, model, None, &tokens)?
                .ok_or_else(|| Error::Input("internal: the MTP block has no row to draft from".into()))?;
            let drafts = spec.draft(be, model, first, k)?;
            let verdict = spec.verify(be, model, &mut self.cache, &mut self.seq, &tokens, &drafts, sampler)?;
            for tok in verdict.tokens {
                stop = emit(tok, &mut tokens, &mut out)?;
                if stop.is_some() {
                    break 'decode;
                }
            }
        }
        let stats = spec.stats.since(&stats0);
        Ok(Generation {
            tokens: out,
            stop: stop.unwrap_or(StopReason::MaxTokens),
            prefilled: todo.len(),
            prefix_cached,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            speculation: Some(stats),
        })
    }
}
