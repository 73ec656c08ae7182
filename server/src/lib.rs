//! dsv4's HTTP server: the OpenAI and Anthropic APIs, vLLM's `/tokenize` and `/detokenize`,
//! `/health` and Prometheus `/metrics`, over the [`dsv4_engine`] serving engine.
//!
//! * [`app`]: the shared [`AppState`], the [`router`] and the listener ([`serve`]);
//! * [`conversation`]: the protocol-neutral middle both APIs use — a request as a
//!   [`Conversation`] plus [`GenerationParams`], rendered with the official V4 encoder, and a
//!   [`Reply`] read as [`Delta`]s then a [`Finish`];
//! * [`openai`], [`anthropic`], [`tokenize`]: the wire formats;
//! * [`thinking`]: the one table from client reasoning efforts to the encoder's levels;
//! * [`metrics`], [`error`].

pub mod anthropic;
pub mod app;
pub mod connection;
pub mod conversation;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod signature;
pub mod thinking;
pub mod tokenize;

pub use app::{
    bind, router, serve, serve_bound, serve_listener, serve_listener_until, stop_signal, AppState, ServerConfig,
    SHUTDOWN_GRACE,
};
pub use conversation::{
    Conversation, Delta, Effort, Finish, FinishReason, GenerationParams, PromptInfo, Reply, ReplyAssembler, ReplyEvent,
    ToolChoice, UsageCounts,
};
pub use error::{ApiError, ErrorKind};
