//! What a caller asks of the engine and what it hears back.

use dsv4_core::sampling::SamplingParams;

use crate::logprobs::TokenLogprobs;

/// One generation: a prompt of token ids and how to continue it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (already chat-encoded and tokenised). Must be non-empty, every id
    /// below the model's vocabulary, and shorter than the engine's `max_model_len`.
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate. Generation also ends when the context (`max_model_len`) is full.
    pub max_tokens: usize,
    /// Tokens that end generation (EOS and the like); the stop token is reported, then
    /// `Finished { reason: Stop }`.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely
    /// alternatives (OpenAI `logprobs` / `top_logprobs`); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (OpenAI `stop`, Anthropic `end_turn`).
    Stop,
    /// `max_tokens` were generated (OpenAI `length`, Anthropic `max_tokens`).
    Length,
    /// The context (`max_model_len`) is full (OpenAI `length`, Anthropic `max_tokens`; the
    /// CLI says `context length`).
    ContextLength,
}

/// Token counts of a finished (or failed) request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from the prefix cache (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What a [`crate::RequestStream`] yields, in this order: `Admitted` once, `Token` zero or
/// more times, then exactly one of `Finished` or `Error`; then the stream ends.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// The prompt was admitted to the batch; `cached_tokens` of it were reused from the
    /// prefix cache.
    Admitted {
        cached_tokens: usize,
    },
    /// One sampled token.
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    /// The request failed inside the engine (a step error); other requests are unaffected.
    Error {
        message: String,
        usage: Usage,
    },
    /// The engine will not finish the request, through no fault of it: the server is shutting
    /// down, or a rank of a multi-device run stopped ([`crate::EngineHandle::fail_requests`]).
    /// A client may retry it elsewhere (HTTP 503).
    Unavailable {
        message: String,
    },
}
