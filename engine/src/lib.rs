//! The dsv4 serving engine: many generation requests over one model, batched continuously.
//!
//! The engine owns the backend, the model and the paged decoding state ([`dsv4_core::kv`]) on
//! one OS thread of its own, so nothing on the HTTP side ever waits for a model step and no
//! backend handle crosses threads. Callers talk to it through an [`EngineHandle`] (cheap to
//! clone, `Send + Sync`): [`EngineHandle::submit`] queues a [`GenerationRequest`] of token
//! ids and returns a [`RequestStream`] of [`EngineEvent`]s (tokens as they are sampled, then
//! one `Finished`). Dropping the stream cancels the request: its blocks return to the pool
//! within one step.
//!
//! Each step the [`scheduler`] mixes one decode token of every running sequence with prompt
//! chunks of waiting sequences up to the step's token budget (continuous batching, as vLLM's
//! and SGLang's schedulers do). A prompt is admitted only when the pool can hold it and its
//! answer; one that cannot fit yet waits in a bounded queue, and beyond that bound `submit`
//! answers [`SubmitError::QueueFull`]. A prompt starting with whole pages cached in the pool
//! reuses them ([`dsv4_core::kv::KvCache::reuse_prefix`]).
//!
//! A model split over several ranks runs one engine per rank ([`EngineHandle::spawn_ranks`]):
//! rank 0's serves the handle and the others replay its decisions (`replica`); over several
//! processes the decisions also travel between them encoded ([`EngineHandle::spawn_ranks_leading`],
//! [`EngineHandle::spawn_followers`]). With data-parallel attention each rank's engine runs
//! sequences of its own instead, rank 0's handing each request to the rank holding the fewest
//! ([`EngineHandle::spawn_data_parallel`], `data_parallel`).
//!
//! Text is not the engine's business: tokenising, detokenising, stop strings and the chat
//! format live in the server (`dsv4-server`), which sees token ids come back and drops the
//! stream when a stop string completes.

mod data_parallel;
mod engine;
mod logprobs;
mod replica;
mod request;
pub mod scheduler;
mod stats;

pub use engine::{
    BuildError, EngineConfig, EngineHandle, EngineInfo, RankBuild, RequestStream, SubmitError, TickSink, TickSource,
};
pub use logprobs::{token_logprobs, TokenLogprobs};
pub use request::{EngineEvent, FinishReason, GenerationRequest, Usage};
pub use stats::EngineStats;
