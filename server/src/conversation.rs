//! The protocol-neutral middle of the server: a chat request as both APIs express it
//! ([`Conversation`] + [`GenerationParams`]), and a reply as both APIs stream it ([`Delta`]s,
//! then one [`Finish`]).
//!
//! `openai.rs` and `anthropic.rs` only translate their wire formats into these types and back;
//! rendering the prompt (the official V4 encoder in `dsv4_core::chat`), tokenising, running the
//! request on the engine, detokenising, parsing reasoning / content / DSML tool calls with the
//! streaming parser and applying stop strings all happen here, once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use dsv4_core::chat::{
    encode_messages, Content, ContentPart, EncodeOptions, Event, Message, ParserOptions, ReasoningEffort, Role,
    StreamParser, ThinkingMode, UnclosedThink, ASSISTANT, THINK_END, THINK_START, TOOL_CALLS_START,
};
use dsv4_core::sampling::SamplingParams;
use dsv4_core::tokenizer::{StreamDecoder, Tokenizer};
use dsv4_engine::{EngineEvent, GenerationRequest, RequestStream, SubmitError, TokenLogprobs};
use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::thinking;

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
    /// The request field `max_tokens` came from, for errors (`None`: `max_tokens`; OpenAI chat
    /// also takes `max_completion_tokens`).
    pub max_tokens_field: Option<&'static str>,
    /// Stop strings: generation ends when the reply text contains one (not included).
    pub stop: Vec<String>,
    /// `Some(n)`: log-probabilities of each token and its `n` best alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating past EOS until `max_tokens` or the context ends (vLLM's `ignore_eos`; for
    /// benchmarks and tests). A chat reply's text still ends at EOS.
    pub ignore_eos: bool,
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

// ------------------------------------------------------------------------------------------
// Prompts
// ------------------------------------------------------------------------------------------

/// What rendering a [`Conversation`] decided, besides the prompt's ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptInfo {
    /// The prompt text the official V4 encoder produced.
    pub text: String,
    /// The reply starts inside the think block (the prompt ends with `<think>`): its first
    /// tokens are reasoning.
    pub thinking: bool,
    /// The encoder's reasoning effort (thinking mode only; see `thinking.rs`).
    pub effort: Option<ReasoningEffort>,
}

/// The instruction added to the system message when a tool call is required (`tool_choice`
/// `required` / Anthropic `any`). The V4 encoder has no notion of tool choice, and dsv4 has no
/// constrained decoding, so the requirement is stated in the prompt, in the words peer servers
/// use when they emulate it.
pub const REQUIRED_TOOL_INSTRUCTION: &str = "You must call at least one tool before answering.";

/// The instruction added to the system message for a named tool choice.
pub fn named_tool_instruction(name: &str) -> String {
    format!("You must call the tool named \"{name}\".")
}

/// The name of an OpenAI-style tool definition (`{"type": "function", "function": {"name"}}`).
fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function").and_then(|f| f.get("name")).and_then(Value::as_str)
}

/// Appends `text` as a paragraph of a system message's content.
fn append_paragraph(m: &mut Message, text: &str) {
    match &mut m.content {
        None => m.content = Some(Content::Text(text.to_string())),
        Some(Content::Text(s)) if s.is_empty() => s.push_str(text),
        Some(Content::Text(s)) => {
            s.push_str("\n\n");
            s.push_str(text);
        }
        Some(Content::Parts(parts)) => parts.push(ContentPart { kind: "text".into(), text: Some(text.to_string()) }),
    }
}

impl AppState {
    /// The message list the encoder sees for `conv`: the request's tools attached to the first
    /// system message (one is inserted at the front when there is none; that is where the
    /// official encoder expects them), unless `tool_choice` is `none`, which renders no tools;
    /// `required` and a named choice add an instruction to that system message.
    pub fn encoder_messages(&self, conv: &Conversation) -> Result<Vec<Message>, ApiError> {
        let mut messages = conv.messages.clone();
        match &conv.tool_choice {
            ToolChoice::Required if conv.tools.is_empty() => {
                return Err(ApiError::invalid_param("tool_choice", "tool_choice `required` needs at least one tool"));
            }
            ToolChoice::Named(name) if !conv.tools.iter().any(|t| tool_name(t) == Some(name)) => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("tool_choice names the tool `{name}`, which is not among the request's tools"),
                ));
            }
            _ => {}
        }
        if conv.tools.is_empty() || conv.tool_choice == ToolChoice::None {
            return Ok(messages);
        }
        let pos = match messages.iter().position(|m| m.role == Role::System) {
            Some(p) => p,
            None => {
                messages.insert(0, Message::new(Role::System, ""));
                0
            }
        };
        let system = &mut messages[pos];
        match &conv.tool_choice {
            ToolChoice::Required => append_paragraph(system, REQUIRED_TOOL_INSTRUCTION),
            ToolChoice::Named(name) => append_paragraph(system, &named_tool_instruction(name)),
            ToolChoice::Auto | ToolChoice::None => {}
        }
        system.tools.get_or_insert_with(Vec::new).extend(conv.tools.iter().cloned());
        Ok(messages)
    }

    /// Renders `conv` with the official V4 encoder (thinking mode and effort resolved by
    /// `thinking.rs`). Errors are 400s naming the message at fault.
    pub fn render_prompt(&self, conv: &Conversation) -> Result<PromptInfo, ApiError> {
        let messages = self.encoder_messages(conv)?;
        if messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "`messages` must hold at least one message"));
        }
        let (thinking_mode, effort) =
            thinking::resolve(conv.thinking, conv.effort, self.default_thinking, self.encoder_revision);
        let opts = EncodeOptions {
            thinking_mode,
            reasoning_effort: effort,
            revision: self.encoder_revision,
            ..Default::default()
        };
        let text = encode_messages(&messages, &opts).map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        let thinking = thinking_mode == ThinkingMode::Thinking && text.ends_with(THINK_START);
        Ok(PromptInfo { text, thinking, effort })
    }

    /// The prompt's token ids, without the length check (`/tokenize`, token counting).
    pub fn render_ids(&self, conv: &Conversation) -> Result<(Vec<u32>, PromptInfo), ApiError> {
        let info = self.render_prompt(conv)?;
        let ids = self.tokenizer.encode(&info.text).map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?;
        Ok((ids, info))
    }

    /// Renders, tokenises and checks the length of `conv`'s prompt: a prompt that leaves no room
    /// for a reply within `--max-model-len` is a 400 naming both lengths.
    pub fn prompt_ids(&self, conv: &Conversation) -> Result<(Vec<u32>, PromptInfo), ApiError> {
        let (ids, info) = self.render_ids(conv)?;
        self.check_prompt_len(ids.len())?;
        Ok((ids, info))
    }

    /// 400 when a prompt of `n` tokens leaves no room for a reply.
    pub fn check_prompt_len(&self, n: usize) -> Result<(), ApiError> {
        let max_model_len = self.max_model_len();
        if n >= max_model_len {
            return Err(SubmitError::PromptTooLong { prompt_tokens: n, max_model_len }.into());
        }
        Ok(())
    }

    /// Renders `conv`, submits it to the engine and returns the reply to read.
    pub fn start_reply(&self, conv: &Conversation, params: &GenerationParams) -> Result<Reply, ApiError> {
        let started = Instant::now();
        let (ids, info) = self.prompt_ids(conv)?;
        let asm = ReplyAssembler::chat(&self.tokenizer, info.thinking, &params.stop);
        self.submit(ids, params, asm, started)
    }

    /// Submits raw prompt ids (no chat format: `/v1/completions`); the reply is plain text.
    pub fn start_raw_reply(&self, prompt: Vec<u32>, params: &GenerationParams) -> Result<Reply, ApiError> {
        let started = Instant::now();
        if prompt.is_empty() {
            return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
        }
        self.check_prompt_len(prompt.len())?;
        let asm = ReplyAssembler::raw(&self.tokenizer, &params.stop, &self.stop_token_ids);
        self.submit(prompt, params, asm, started)
    }

    fn submit(
        &self,
        prompt: Vec<u32>,
        params: &GenerationParams,
        asm: ReplyAssembler,
        started: Instant,
    ) -> Result<Reply, ApiError> {
        let max_model_len = self.max_model_len();
        let room = max_model_len.saturating_sub(prompt.len());
        let max_tokens = match params.max_tokens {
            Some(0) => return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1")),
            // vLLM's rule (and OpenAI's): a completion that could not fit is refused up front,
            // rather than cut short after it has held a slot for as long as it runs.
            Some(n) if n > room => {
                let field = params.max_tokens_field.unwrap_or("max_tokens");
                return Err(ApiError::invalid_param(
                    field,
                    format!(
                        "this server's maximum context length is {max_model_len} tokens, but {} were asked for \
                         ({} in the prompt, {n} in the completion); lower {field} to at most {room}",
                        prompt.len() + n,
                        prompt.len()
                    ),
                ));
            }
            Some(n) => n,
            None => room.max(1),
        };
        let sampling = SamplingParams {
            temperature: params.temperature.unwrap_or(1.0),
            top_p: params.top_p.unwrap_or(1.0),
            top_k: params.top_k.unwrap_or(0),
            seed: params.seed.unwrap_or_else(|| self.fresh_seed()),
        };
        let prompt_tokens = prompt.len();
        let thinking = asm.in_think;
        let stream = self.engine.submit(GenerationRequest {
            prompt,
            sampling,
            max_tokens,
            stop_token_ids: if params.ignore_eos { vec![] } else { self.stop_token_ids.clone() },
            logprobs: params.logprobs,
        })?;
        Ok(Reply {
            stream: Some(stream),
            asm,
            prompt_tokens,
            cached_tokens: 0,
            pending: VecDeque::new(),
            finish: None,
            done: false,
            metrics: self.metrics.clone(),
            started,
            last_token: None,
            ended: false,
            thinking,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Replies
// ------------------------------------------------------------------------------------------

/// What a [`Reply`] yields: deltas, then one finish.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyEvent {
    Delta(Delta),
    Finish(Finish),
}

/// A running reply. Owns the engine's [`RequestStream`]: dropping the reply (a client that went
/// away drops the response body that holds it) cancels the request within one engine step.
pub struct Reply {
    stream: Option<RequestStream>,
    asm: ReplyAssembler,
    prompt_tokens: usize,
    cached_tokens: usize,
    pending: VecDeque<Delta>,
    finish: Option<Finish>,
    done: bool,
    metrics: Arc<Metrics>,
    started: Instant,
    last_token: Option<Instant>,
    /// The end was recorded in the metrics.
    ended: bool,
    /// The reply starts inside the think block.
    thinking: bool,
}

impl Reply {
    /// Prompt tokens (known before anything is generated).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Whether the reply starts inside the think block ([`PromptInfo::thinking`]).
    pub fn thinking(&self) -> bool {
        self.thinking
    }

    /// The next piece of the reply: `Some(Ok(ReplyEvent::Delta(_)))` any number of times, then
    /// `Some(Ok(ReplyEvent::Finish(_)))`, then `None`. An engine failure is one `Some(Err(_))`,
    /// then `None`.
    pub async fn next(&mut self) -> Option<Result<ReplyEvent, ApiError>> {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Some(Ok(ReplyEvent::Delta(d)));
            }
            if self.done {
                return None;
            }
            if let Some(f) = self.finish.take() {
                self.done = true;
                self.record_end(finish_label(&f.reason));
                return Some(Ok(ReplyEvent::Finish(f)));
            }
            let Some(stream) = self.stream.as_mut() else {
                self.done = true;
                return None;
            };
            match stream.recv().await {
                Some(EngineEvent::Admitted { cached_tokens }) => self.cached_tokens = cached_tokens,
                Some(EngineEvent::Token { id, logprobs }) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => self.metrics.observe_ttft(now - self.started),
                        Some(t) => self.metrics.observe_itl(now - t),
                    }
                    self.last_token = Some(now);
                    let deltas = self.asm.push(id, logprobs.as_ref());
                    self.pending.extend(deltas);
                    if self.asm.stopped().is_some() {
                        // A stop string matched: cancel the rest.
                        self.stream = None;
                        self.end(None);
                    }
                }
                Some(EngineEvent::Finished { reason, usage }) => {
                    self.cached_tokens = usage.cached_tokens;
                    self.stream = None;
                    self.end(Some(reason));
                }
                Some(EngineEvent::Error { message, .. }) => {
                    return Some(Err(self.fail(ApiError::internal(message))));
                }
                // Shutting down (or a stopped rank): not the request's fault, retry elsewhere.
                Some(EngineEvent::Unavailable { message }) => {
                    return Some(Err(self.fail(ApiError::overloaded(message))));
                }
                None => {
                    return Some(Err(
                        self.fail(ApiError::internal("the engine ended the request without finishing it"))
                    ));
                }
            }
        }
    }

    /// Reads the whole reply: every delta, then the finish.
    pub async fn collect(mut self) -> Result<(Vec<Delta>, Finish), ApiError> {
        let mut deltas = vec![];
        while let Some(ev) = self.next().await {
            match ev? {
                ReplyEvent::Delta(d) => deltas.push(d),
                ReplyEvent::Finish(f) => return Ok((deltas, f)),
            }
        }
        Err(ApiError::internal("the reply ended without finishing"))
    }

    fn end(&mut self, engine: Option<dsv4_engine::FinishReason>) {
        self.pending.extend(self.asm.finish());
        let reason = self.asm.finish_reason(engine);
        self.finish = Some(Finish {
            reason,
            usage: UsageCounts {
                prompt_tokens: self.prompt_tokens,
                cached_tokens: self.cached_tokens,
                completion_tokens: self.asm.completion_tokens(),
                reasoning_tokens: self.asm.reasoning_tokens(),
            },
        });
    }

    fn fail(&mut self, e: ApiError) -> ApiError {
        self.stream = None;
        self.pending.clear();
        self.done = true;
        self.record_end("error");
        e
    }

    fn record_end(&mut self, label: &str) {
        if !self.ended {
            self.ended = true;
            self.metrics.observe_end(self.started.elapsed(), label);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // Dropped before its finish was read: the client went away.
        self.record_end("abort");
    }
}

/// The `finished_reason` label of a finish in the metrics (OpenAI's spelling).
fn finish_label(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::EndOfTurn | FinishReason::StopString(_) => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// Turns generated token ids into [`Delta`]s: detokenises them as a stream, splits reasoning,
/// content and DSML tool calls with core's [`StreamParser`] (no DSML markup ever reaches
/// content, however the text is cut), applies stop strings to the content, and counts tokens.
/// [`Reply`] drives it with the engine's tokens; tests drive it directly.
pub struct ReplyAssembler {
    tok: Tokenizer,
    decoder: StreamDecoder,
    /// `None`: raw text (`/v1/completions`), everything is content.
    parser: Option<StreamParser>,
    stop: StopMatcher,
    /// Raw mode: ids whose text is not part of the reply (EOS).
    hidden_ids: Vec<u32>,
    in_think: bool,
    completion_tokens: usize,
    reasoning_tokens: usize,
    tool_calls: usize,
    stopped: Option<String>,
    finished: bool,
}

impl ReplyAssembler {
    /// A chat reply: `thinking` when it starts inside the think block ([`PromptInfo::thinking`]).
    /// Reasoning streams as it comes; a think block the reply never closes stays reasoning.
    pub fn chat(tok: &Tokenizer, thinking: bool, stop: &[String]) -> Self {
        let parser = StreamParser::new(ParserOptions { thinking, unclosed_think: UnclosedThink::Reasoning });
        Self::new(tok, Some(parser), stop, vec![], thinking)
    }

    /// A raw completion: all text is content; `hidden_ids` (EOS) add no text.
    pub fn raw(tok: &Tokenizer, stop: &[String], hidden_ids: &[u32]) -> Self {
        Self::new(tok, None, stop, hidden_ids.to_vec(), false)
    }

    fn new(
        tok: &Tokenizer,
        parser: Option<StreamParser>,
        stop: &[String],
        hidden_ids: Vec<u32>,
        thinking: bool,
    ) -> Self {
        ReplyAssembler {
            tok: tok.clone(),
            decoder: StreamDecoder::new(tok),
            parser,
            stop: StopMatcher::new(stop),
            hidden_ids,
            in_think: thinking,
            completion_tokens: 0,
            reasoning_tokens: 0,
            tool_calls: 0,
            stopped: None,
            finished: false,
        }
    }

    /// One generated token (and its log-probabilities when asked for): the deltas it completes.
    pub fn push(&mut self, id: u32, logprobs: Option<&TokenLogprobs>) -> Vec<Delta> {
        if self.stopped.is_some() || self.finished {
            return vec![];
        }
        self.completion_tokens += 1;
        if self.in_think {
            self.reasoning_tokens += 1;
        }
        let mut out = Deltas::default();
        if let Some(lp) = logprobs {
            out.push(Delta::Logprobs(vec![self.token_logprob(id, lp)]));
        }
        if self.parser.is_none() && self.hidden_ids.contains(&id) {
            return out.0;
        }
        // An id the tokenizer has no token for (a hole in its vocabulary, which a model can
        // still sample) adds no text.
        let text = self.decoder.push(id).unwrap_or_default();
        self.text(&text, &mut out);
        out.0
    }

    /// Text decoded by other means (tests, a caller with its own detokenizer): parsed and
    /// stop-checked like the text of pushed tokens, but counts no token.
    pub fn push_text(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Deltas::default();
        if !self.finished {
            self.text(text, &mut out);
        }
        out.0
    }

    /// The generation ended: flushes held-back text. Idempotent.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Deltas::default();
        if self.finished || self.stopped.is_some() {
            return out.0;
        }
        let rest = self.decoder.finish().unwrap_or_default();
        self.text(&rest, &mut out);
        if let Some(p) = self.parser.as_mut() {
            let events = p.finish();
            self.events(events, &mut out);
        }
        if self.stopped.is_none() {
            let held = self.stop.flush();
            out.push(Delta::Content(held));
        }
        self.finished = true;
        out.0
    }

    /// The stop string that ended the reply, if one did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// Tokens generated while the reply was inside the think block.
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Why the reply ended, given how the engine ended it (`None`: it did not, a stop string
    /// did): a stop string, else tool calls if any were made (as vLLM reports them), else the
    /// engine's reason.
    pub fn finish_reason(&self, engine: Option<dsv4_engine::FinishReason>) -> FinishReason {
        if let Some(s) = &self.stopped {
            return FinishReason::StopString(s.clone());
        }
        if self.tool_calls > 0 {
            return FinishReason::ToolCalls;
        }
        match engine {
            Some(dsv4_engine::FinishReason::Length | dsv4_engine::FinishReason::ContextLength) => FinishReason::Length,
            Some(dsv4_engine::FinishReason::Stop) | None => FinishReason::EndOfTurn,
        }
    }

    fn text(&mut self, text: &str, out: &mut Deltas) {
        if text.is_empty() || self.stopped.is_some() {
            return;
        }
        match self.parser.as_mut() {
            Some(p) => {
                let events = p.push(text);
                self.events(events, out);
            }
            None => self.content(text, out),
        }
    }

    fn events(&mut self, events: Vec<Event>, out: &mut Deltas) {
        for e in events {
            if self.stopped.is_some() {
                return;
            }
            match e {
                Event::Reasoning(t) => out.push(Delta::Reasoning(t)),
                Event::Content(t) => self.content(&t, out),
                Event::ToolCall(c) => {
                    // Content held back for a stop string cannot complete one across a call.
                    out.push(Delta::Content(self.stop.flush()));
                    out.push(Delta::ToolCall { index: self.tool_calls, name: c.name, arguments: c.arguments });
                    self.tool_calls += 1;
                }
                Event::Markup(m) => {
                    if m == THINK_END || m.starts_with(TOOL_CALLS_START) {
                        self.in_think = false;
                    }
                }
            }
        }
    }

    fn content(&mut self, text: &str, out: &mut Deltas) {
        let (emit, matched) = self.stop.push(text);
        out.push(Delta::Content(emit));
        if let Some(s) = matched {
            self.stopped = Some(s);
        }
    }

    fn token_logprob(&self, id: u32, lp: &TokenLogprobs) -> TokenLogprob {
        let text = |id: u32| self.tok.decode(&[id]).unwrap_or_default();
        let token = text(id);
        TokenLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(t, l)| {
                    let s = text(t);
                    (s.clone(), s.into_bytes(), l)
                })
                .collect(),
        }
    }
}

/// Deltas of one step, consecutive text of one kind merged and empty text dropped.
#[derive(Default)]
struct Deltas(Vec<Delta>);

impl Deltas {
    fn push(&mut self, d: Delta) {
        match (self.0.last_mut(), d) {
            (_, Delta::Content(t) | Delta::Reasoning(t)) if t.is_empty() => {}
            (Some(Delta::Content(a)), Delta::Content(b)) => a.push_str(&b),
            (Some(Delta::Reasoning(a)), Delta::Reasoning(b)) => a.push_str(&b),
            (Some(Delta::Logprobs(a)), Delta::Logprobs(b)) => a.extend(b),
            (_, d) => self.0.push(d),
        }
    }
}

/// Stop strings over streamed text: text that may be the start of a stop string is held back
/// until the next piece decides; a matched stop string and everything after it are dropped.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// The next piece of text: what can be emitted now, and the stop string if one matched
    /// (the emitted text is then everything before it).
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        if self.stops.is_empty() {
            return (text.to_string(), None);
        }
        let mut work = std::mem::take(&mut self.held);
        work.push_str(text);
        // The stop string that completes first (ties: the one that starts first), which does not
        // depend on how the text was cut: a stop string completed in an earlier piece already
        // ended the reply.
        let found = self
            .stops
            .iter()
            .filter_map(|s| work.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, s)| (p + s.len(), *p));
        if let Some((p, s)) = found {
            work.truncate(p);
            return (work, Some(s.clone()));
        }
        let keep = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(|(k, _)| &s[..k]))
            .filter(|prefix| work.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        self.held = work.split_off(work.len() - keep);
        (work, None)
    }

    /// Everything held back (the text ended without completing a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The assistant prefix the encoder appends after a user turn (`<｜Assistant｜>` plus `<think>`
/// or `</think>`), when `text` ends with one: `/tokenize` with `add_generation_prompt: false`
/// leaves it out.
pub fn generation_prompt_suffix(text: &str) -> Option<usize> {
    [THINK_START, THINK_END]
        .iter()
        .map(|t| format!("{ASSISTANT}{t}"))
        .find(|s| text.ends_with(s.as_str()))
        .map(|s| s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasoning, content and tool calls of `deltas`, checking that no content carries markup.
    fn gather(deltas: &[Delta]) -> (String, String, Vec<(usize, String, String)>) {
        let (mut r, mut c, mut calls) = (String::new(), String::new(), vec![]);
        for d in deltas {
            match d {
                Delta::Reasoning(t) => r.push_str(t),
                Delta::Content(t) => {
                    for marker in ["DSML", "<｜", "</think>", "<think>"] {
                        assert!(!t.contains(marker), "content delta {t:?} carries {marker}");
                    }
                    c.push_str(t)
                }
                Delta::ToolCall { index, name, arguments } => calls.push((*index, name.clone(), arguments.clone())),
                Delta::Logprobs(_) => {}
            }
        }
        (r, c, calls)
    }

    /// Feeds `text` cut at `cuts` and finishes.
    fn run(asm: &mut ReplyAssembler, text: &str, cuts: &[usize]) -> Vec<Delta> {
        let mut out = vec![];
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&text.len())) {
            out.extend(asm.push_text(&text[start..c]));
            start = c;
        }
        out.extend(asm.finish());
        out
    }

    /// The first assistant reply of the official test vector 1 (thinking, then a DSML call).
    fn vector_1_reply() -> String {
        let prompt = include_str!("../../core/tests/chat_vectors/test_output_1.txt");
        let start = prompt.find("<｜Assistant｜><think>").unwrap() + "<｜Assistant｜><think>".len();
        let end = start + prompt[start..].find(dsv4_core::chat::EOS).unwrap() + dsv4_core::chat::EOS.len();
        prompt[start..end].to_string()
    }

    fn char_cuts(text: &str) -> Vec<usize> {
        (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect()
    }

    #[test]
    fn dsml_tool_calls_never_reach_content_in_any_chunking() {
        let tok = Tokenizer::byte_fallback();
        let reply = vector_1_reply();
        let want_reasoning = "The user wants to know the weather in Beijing. I should use the get_weather tool.";
        let want_call = (0, "get_weather".to_string(), r#"{"location": "Beijing", "unit": "celsius"}"#.to_string());
        let cuts = char_cuts(&reply);
        let mut runs = 0;
        for (a, &i) in cuts.iter().enumerate() {
            for &j in cuts[a..].iter().step_by(3) {
                let mut asm = ReplyAssembler::chat(&tok, true, &[]);
                let deltas = run(&mut asm, &reply, &[i, j]);
                let (r, c, calls) = gather(&deltas);
                assert_eq!((r.as_str(), c.as_str()), (want_reasoning, ""), "cuts {i} {j}");
                assert_eq!(calls, std::slice::from_ref(&want_call), "cuts {i} {j}");
                assert_eq!(asm.finish_reason(Some(dsv4_engine::FinishReason::Stop)), FinishReason::ToolCalls);
                runs += 1;
            }
        }
        assert!(runs > 1000);
    }

    #[test]
    fn content_then_two_calls_without_thinking() {
        let tok = Tokenizer::byte_fallback();
        let reply = "Let me check both.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\">\n<｜DSML｜parameter name=\"x\" \
                     string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"b\">\n</｜DSML｜invoke>\n\
                     </｜DSML｜tool_calls><｜end▁of▁sentence｜>";
        for i in char_cuts(reply) {
            let mut asm = ReplyAssembler::chat(&tok, false, &[]);
            let (r, c, calls) = gather(&run(&mut asm, reply, &[i]));
            assert_eq!((r.as_str(), c.as_str()), ("", "Let me check both."), "cut {i}");
            assert_eq!(
                calls,
                [(0, "a".to_string(), r#"{"x": 1}"#.to_string()), (1, "b".to_string(), "{}".to_string())],
                "cut {i}"
            );
        }
    }

    #[test]
    fn token_by_token_counts_reasoning_tokens_and_hides_markup() {
        let tok = Tokenizer::byte_fallback();
        let reply = vector_1_reply();
        let ids = tok.encode(&reply).unwrap();
        let mut asm = ReplyAssembler::chat(&tok, true, &[]);
        let mut deltas = vec![];
        for &id in &ids {
            deltas.extend(asm.push(id, None));
        }
        deltas.extend(asm.finish());
        let (r, c, calls) = gather(&deltas);
        assert!(r.starts_with("The user wants") && c.is_empty() && calls.len() == 1);
        assert_eq!(asm.completion_tokens(), ids.len());
        // Every byte of the reasoning plus the `</think>` token.
        let think_end = reply.find("</think>").unwrap();
        assert_eq!(asm.reasoning_tokens(), tok.encode(&reply[..think_end]).unwrap().len() + 1);
    }

    #[test]
    fn stop_strings_cut_content_in_any_chunking_and_not_reasoning() {
        let tok = Tokenizer::byte_fallback();
        let text = "I think STOP here</think>Hello STOP world. STOP again";
        // The stop string that completes first wins, however the text is cut.
        for (stops, content, stop) in [
            (["STOP w", "ST", "never"], "Hello ", "ST"),
            (["lo STOP", "STOP world", "never"], "Hel", "lo STOP"),
            (["STOP world", "o STOP wo", "never"], "Hell", "o STOP wo"),
        ] {
            let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            for i in char_cuts(text) {
                let mut asm = ReplyAssembler::chat(&tok, true, &stops);
                let (r, c, _) = gather(&run(&mut asm, text, &[i]));
                assert_eq!(r, "I think STOP here", "cut {i}");
                assert_eq!(c, content, "cut {i}");
                assert_eq!(asm.stopped(), Some(stop), "cut {i}");
                assert_eq!(asm.finish_reason(None), FinishReason::StopString(stop.into()));
            }
        }
        // A held prefix that never completes is flushed at the end.
        let mut asm = ReplyAssembler::chat(&tok, false, &["STOPPED".to_string()]);
        let (_, c, _) = gather(&run(&mut asm, "ends with STOP", &[]));
        assert_eq!(c, "ends with STOP");
        assert_eq!(asm.finish_reason(Some(dsv4_engine::FinishReason::Length)), FinishReason::Length);
    }

    #[test]
    fn raw_replies_hide_eos_and_keep_markup() {
        let tok = Tokenizer::byte_fallback();
        let mut asm = ReplyAssembler::raw(&tok, &[], &tok.eos_token_ids());
        let mut ids = tok.encode("a</think>b").unwrap();
        ids.push(1);
        let mut text = String::new();
        for id in ids {
            for d in asm.push(id, None) {
                if let Delta::Content(t) = d {
                    text.push_str(&t);
                }
            }
        }
        assert_eq!(text, "a</think>b");
        // a, </think> (one token), b, EOS.
        assert_eq!(asm.completion_tokens(), 4);
        assert_eq!(asm.reasoning_tokens(), 0);
    }

    #[test]
    fn unknown_ids_add_no_text() {
        let tok = Tokenizer::byte_fallback();
        let mut asm = ReplyAssembler::chat(&tok, false, &[]);
        assert!(asm.push(100_000, None).is_empty());
        assert_eq!(asm.completion_tokens(), 1);
    }

    #[test]
    fn generation_prompt_suffixes() {
        assert_eq!(generation_prompt_suffix("x<｜Assistant｜><think>"), Some("<｜Assistant｜><think>".len()));
        assert_eq!(generation_prompt_suffix("x<｜Assistant｜></think>"), Some("<｜Assistant｜></think>".len()));
        assert_eq!(generation_prompt_suffix("x<｜User｜>hi"), None);
    }
}
