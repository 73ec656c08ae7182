//! Chat prompt encoding in the official DeepSeek-V4 format and parsing of completions
//! (reasoning, content, DSML tool calls).
//!
//! DeepSeek-V4 ships no Jinja chat template. Its normative prompt format is the Python module
//! `encoding/encoding_dsv4.py` that comes with the checkpoint, together with four golden test
//! vectors (`encoding/tests/test_{input,output}_{1..4}`). This module is an independent Rust
//! implementation of that format:
//!
//! * [`encode_messages`] reproduces `encode_messages(messages, thinking_mode, context=None,
//!   drop_thinking=True, add_default_bos_token=True, reasoning_effort=None)` byte for byte
//!   (checked against the four official vectors in `core/tests/chat_vectors/`);
//!   [`render_openai`] is the entry point for an OpenAI-style JSON message list.
//! * [`StreamParser`] turns completion text, fed chunk by chunk as it is decoded, into
//!   [`Event`]s (reasoning, content, tool calls); [`parse_completion`] is the one-shot form and
//!   [`parse_completion_strict`] is a faithful port of the official
//!   `parse_message_from_completion_text`, which rejects anything malformed.
//!
//! Deliberate differences from the Python reference are listed on the function that has them;
//! they only concern inputs the reference renders by accident (for example `None` printed as
//! text) or rejects with an exception.

mod dsml;
mod encoding;
mod parser;
mod pyjson;
mod tokens;

pub use encoding::{
    encode_messages, encode_messages_with_context, json_type, render_openai, Content, ContentPart, EncodeOptions,
    EncoderRevision, FunctionCall, Message, ReasoningEffort, Role, Task, ThinkingMode, ToolCall,
};
pub use parser::{
    parse_completion, parse_completion_strict, Event, ParsedMessage, ParsedToolCall, ParserOptions, StreamParser,
    UnclosedThink,
};
pub use pyjson::to_python_json;
pub use tokens::{
    ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, REASONING_EFFORT_BEYOND_MAX, REASONING_EFFORT_MAX, THINK_END,
    THINK_START, TOOL_CALLS_START, USER,
};

/// Everything that can go wrong while encoding a conversation or strictly parsing a completion.
///
/// Every variant says which message (0-based index in the list given) or which part of the
/// input is at fault. The streaming parser never fails: malformed output is reported as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The message list as a whole is unusable (not a JSON array, ...).
    #[error("messages: {0}")]
    Messages(String),
    /// One message is malformed (unknown role, wrong field type, empty developer message, ...).
    #[error("message {index}: {reason}")]
    Message { index: usize, reason: String },
    /// One tool call of an assistant message is malformed.
    #[error("message {index}, tool call {call}: {reason}")]
    ToolCall { index: usize, call: usize, reason: String },
    /// The tool definitions are malformed.
    #[error("tools: {0}")]
    Tools(String),
    /// The reasoning effort is not one the selected encoder revision knows.
    #[error("invalid reasoning effort `{given}`: expected one of {expected}")]
    ReasoningEffort { given: String, expected: String },
    /// [`parse_completion_strict`] found text that does not follow the official output format.
    #[error("completion is not in the DeepSeek-V4 output format: {0}")]
    Format(String),
}
