//! The generation loop: prefill a prompt (in chunks), then decode token by token with a
//! sampler until EOS, a caller-side stop (stop strings) or the token budget.
//!
//! A [`Session`] keeps one sequence's decoding state between calls: when the next prompt
//! extends everything already fed (a chat turn appended to the history), only the new tokens
//! are prefilled; otherwise the state is rebuilt from scratch. Either way the result is what a
//! fresh forward over the whole prompt would give.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::cache::SeqState;
use crate::model::{Logits, Model};
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (it is included in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Longest prefill step; long prompts are fed in chunks of this many tokens.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
            prefill_chunk: 512,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    Caller,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Prompt tokens actually prefilled (fewer than the prompt when a prefix was reused).
    pub prefilled: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
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
    state: SeqState<B>,
    /// Every token fed into `state`, in order.
    fed: Vec<u32>,
}

impl<'m, B: Backend> Session<'m, B> {
    pub fn new(model: &'m Model<B>) -> Self {
        Session { model, state: model.new_state(), fed: vec![] }
    }

    pub fn state(&self) -> &SeqState<B> {
        &self.state
    }

    /// Feeds tokens (in chunks) and returns the logits row of the last one.
    pub fn feed(&mut self, be: &B, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Input("nothing to feed: the prompt is empty".into()));
        }
        let mut last = vec![];
        for part in tokens.chunks(chunk.max(1)) {
            let batch = Batch::new(&[(part, self.state.pos)])?;
            let logits = self.model.step(be, &batch, &mut [&mut self.state], Logits::LastPerSequence)?;
            self.fed.extend_from_slice(part);
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
        let ctx = self.model.cfg.max_position_embeddings;
        if prompt.len() >= ctx {
            return Err(Error::Input(format!(
                "the prompt has {} tokens but the model's context is {ctx} (room must be left to generate)",
                prompt.len()
            )));
        }
        let mut sampler = Sampler::new(opts.sampling)?;
        // Reuse the state if the prompt extends what it has seen.
        let reuse = prompt.len() > self.fed.len() && prompt.starts_with(&self.fed);
        if !reuse {
            self.state = self.model.new_state();
            self.fed.clear();
        }
        let todo = prompt[self.fed.len()..].to_vec();
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
            if opts.stop_token_ids.contains(&tok) {
                stop = StopReason::Eos;
                break;
            }
            if control == Control::Stop {
                stop = StopReason::Caller;
                break;
            }
            if out.len() == opts.max_new_tokens || self.state.pos + 1 >= ctx {
                break;
            }
            logits = self.feed(be, &[tok], 1)?;
        }
        Ok(Generation {
            tokens: out,
            stop,
            prefilled: todo.len(),
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
