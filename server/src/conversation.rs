//! The protocol-neutral middle of the server: a chat request as both APIs express it
//! ([`Conversation`] + [`GenerationParams`]), and a reply as both APIs stream it ([`Delta`]s,
//! then one [`Finish`]).
//!
//! `openai.rs` and `anthropic.rs` only translate their wire formats into these types and back;
//! rendering the prompt (the official V4 encoder in `dsv4_core::chat`), tokenising, running the
//! request on the engine, detokenising, parsing reasoning / content / DSML tool calls with the
//! streaming parser and applying stop strings all happen here, once.

use dsv4_core::chat::Message;
use serde_json::Value;

/// How the model may use the tools it is given (OpenAI `tool_choice`, Anthropic `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (OpenAI `auto`, Anthropic `auto`; the default).
    #[default]
    Auto,
    /// The model must call some tool (OpenAI `required`, Anthropic `any`).
    Required,
    /// No tool may be called (OpenAI `none`, Anthropic `none`).
    None,
    /// This tool must be called (OpenAI `{"type":"function","function":{"name":..}}`,
    /// Anthropic `{"type":"tool","name":..}`).
    Named(String),
}

/// Reasoning effort as clients spell it, normalised (see `thinking.rs` for the table that maps
/// it onto what the checkpoint's encoder supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    None,
    Minimal,
    Low,
    Medium,
    High,
    XHigh,
    Max,
}

/// A chat request, whichever API it came in.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// The messages in `dsv4_core::chat`'s types (OpenAI-style roles; Anthropic's `system`
    /// becomes a leading system message, `tool_result` blocks become `tool` messages, `thinking`
    /// blocks become `reasoning_content`).
    pub messages: Vec<Message>,
    /// Tool definitions, OpenAI style: `{"type": "function", "function": {"name",
    /// "description", "parameters"}}` (Anthropic's `{"name", "description", "input_schema"}`
    /// converted).
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    /// Thinking mode on (`None`: the server's default).
    pub thinking: Option<bool>,
    pub effort: Option<Effort>,
}

/// Sampling and limits of one request.
#[derive(Debug, Clone, Default)]
pub struct GenerationParams {
    /// `None`: DeepSeek's recommended 1.0.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    /// `None`: until EOS or the context ends.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends when the reply text contains one (not included).
    pub stop: Vec<String>,
    /// `Some(n)`: log-probabilities of each token and its `n` best alternatives.
    pub logprobs: Option<usize>,
}

/// One piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Reasoning text (OpenAI `reasoning_content`, Anthropic `thinking_delta`).
    Reasoning(String),
    /// Reply text (never any DSML markup).
    Content(String),
    /// A complete tool call; `index` counts the reply's calls from 0, `id` is generated
    /// (`call_…` / `toolu_…` style is up to the protocol module).
    ToolCall { index: usize, name: String, arguments: String },
    /// Log-probabilities of the tokens decoded since the previous `Logprobs`, in order.
    Logprobs(Vec<TokenLogprob>),
}

/// One token's log-probability, for OpenAI `logprobs.content`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Why a reply ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS (OpenAI `stop`, Anthropic `end_turn`).
    EndOfTurn,
    /// A stop string matched (OpenAI `stop`, Anthropic `stop_sequence` with the string).
    StopString(String),
    /// `max_tokens` or the context ended the reply (OpenAI `length`, Anthropic `max_tokens`).
    Length,
    /// The reply ended with tool calls (OpenAI `tool_calls`, Anthropic `tool_use`).
    ToolCalls,
}

/// Token counts of a reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Completion tokens spent inside the think block.
    pub reasoning_tokens: usize,
}

/// The end of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: UsageCounts,
}
