//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, in
//! the shapes of OpenAI's API reference (platform.openai.com/docs/api-reference) with DeepSeek's
//! and vLLM's additions: `reasoning_content` (and its alias `reasoning`) in messages and stream
//! deltas, `thinking: {"type": "enabled" | "disabled"}`, `chat_template_kwargs`, `top_k`, and
//! DeepSeek's `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` in the usage, and vLLM's
//! `ignore_eos`.
//!
//! Request bodies are read field by field so that a wrong type is a 400 naming the field
//! (`param`). Fields this server does not use (`user`, `metadata`, `parallel_tool_calls`,
//! `presence_penalty`, `frequency_penalty`, `logit_bias`, ...) are accepted and ignored, as
//! DeepSeek's API ignores the penalties in thinking mode.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsv4_core::chat::{Message, Role};
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::conversation::{
    Conversation, Delta, Effort, Finish, FinishReason, GenerationParams, Reply, ReplyEvent, TokenLogprob, ToolChoice,
    UsageCounts,
};
use crate::error::{parse_json_body, ApiError};

/// Most alternatives per token (`top_logprobs`, completions' `logprobs`), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub use dsv4_core::chat::json_type;

/// A request body's fields, read with type checks that name the field.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// The body must be a JSON object.
    pub fn of(v: &'a Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(obj) => Ok(Fields { obj, prefix: "" }),
            other => {
                Err(ApiError::invalid(format!("the request body must be a JSON object, not {}", json_type(other))))
            }
        }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::invalid_param(
            self.name(key),
            format!("`{}` must be {expected}, not {}", self.name(key), json_type(got)),
        )
    }

    /// The value of `key`; `null` counts as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    pub fn f32(&self, key: &str) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
            Some(v) => Err(self.wrong(key, "a number", v)),
        }
    }

    /// An integer (a float with no fractional part is accepted, as JSON writers produce them).
    /// An integer out of range (past 2^63, or a float past 2^53) is a 400 that says so, not
    /// that it is no integer.
    pub fn i64(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) =
                    n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
                {
                    return Ok(Some(i));
                }
                let name = self.name(key);
                let whole = n.is_u64() || n.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0);
                Err(ApiError::invalid_param(
                    &name,
                    if whole {
                        format!("`{name}` is out of range: {n}")
                    } else {
                        format!("`{name}` must be an integer, not {n}")
                    },
                ))
            }
            Some(v) => Err(self.wrong(key, "an integer", v)),
        }
    }

    /// A non-negative integer.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, ApiError> {
        match self.i64(key)? {
            None => Ok(None),
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            Some(n) => {
                Err(ApiError::invalid_param(self.name(key), format!("`{}` must be ≥ 0, not {n}", self.name(key))))
            }
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "a list", v)),
        }
    }

    /// A nested object, read with the same checks (`param` names become `key.field`).
    pub fn object(&self, key: &str, prefix: &'a mut String) -> Result<Option<Fields<'a>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(obj)) => {
                *prefix = format!("{}.", self.name(key));
                Ok(Some(Fields { obj, prefix: prefix.as_str() }))
            }
            Some(v) => Err(self.wrong(key, "an object", v)),
        }
    }
}

/// The `model` field, checked against the served names (404 for another model).
fn check_model(state: &AppState, f: &Fields) -> Result<(), ApiError> {
    state.check_model(f.str("model")?)
}

/// One OpenAI message as core's [`Message`]: `reasoning` is accepted as an alias of
/// `reasoning_content` (vLLM's spelling); a missing one is fine.
fn message_from_json(i: usize, v: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(obj) = v else {
        return Err(ApiError::invalid_param(&param, format!("{param} must be an object, not {}", json_type(v))));
    };
    let mut m = Message::from_json(v).map_err(|e| ApiError::invalid_param(&param, format!("{param}: {e}")))?;
    // OpenAI requires `content` on every message but an assistant's (which may carry tool calls
    // instead); vLLM takes a missing one as empty. A missing or null text is more likely a
    // client's bug than an empty turn, so it is refused as OpenAI refuses it. An assistant
    // message without content is accepted even without tool calls (a prefix to continue).
    if m.content.is_none() && m.role != Role::Assistant {
        let what = match obj.get("content") {
            None => "is required".to_string(),
            Some(other) => format!("must be a string or an array of content parts, not {}", json_type(other)),
        };
        return Err(ApiError::invalid_param(
            format!("{param}.content"),
            format!("{param}.content {what} (a {} message needs its text)", obj["role"].as_str().unwrap_or("")),
        ));
    }
    if m.reasoning_content.is_none() {
        match obj.get("reasoning") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => m.reasoning_content = Some(s.clone()),
            Some(other) => {
                return Err(ApiError::invalid_param(
                    format!("{param}.reasoning"),
                    format!("{param}.reasoning must be a string, not {}", json_type(other)),
                ))
            }
        }
    }
    Ok(m)
}

/// OpenAI tool definitions, normalised to `{"type": "function", "function": {...}}` (a bare
/// function object is accepted too).
fn tools_from_json(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let param = format!("tools[{i}]");
            let function = match t {
                Value::Object(o) if o.contains_key("function") => &o["function"],
                Value::Object(o) if o.contains_key("name") => t,
                _ => {
                    return Err(ApiError::invalid_param(
                        &param,
                        format!("{param} must be {{\"type\": \"function\", \"function\": {{\"name\": ..}}}}"),
                    ))
                }
            };
            match function.get("name") {
                Some(Value::String(n)) if !n.is_empty() => {}
                _ => {
                    return Err(ApiError::invalid_param(&param, format!("{param}: the function needs a `name` string")))
                }
            }
            // A JSON Schema object, as OpenAI requires (absent or null: no parameters).
            match function.get("parameters") {
                None | Some(Value::Null) | Some(Value::Object(_)) => {}
                Some(v) => {
                    let param = format!("{param}.function.parameters");
                    let msg = format!("{param} must be a JSON Schema object, not {}", dsv4_core::chat::json_type(v));
                    return Err(ApiError::invalid_param(&param, msg));
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

fn tool_choice_from_json(v: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "tool_choice",
            "tool_choice must be `auto`, `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": ..}}",
        )
    };
    Ok(match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(Value::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => ToolChoice::Named(name.to_string()),
            None => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    })
}

/// The conversation of a chat request (also `/tokenize` with `messages`): messages, tools,
/// tool choice, thinking switch and effort from `thinking`, `reasoning_effort` and
/// `chat_template_kwargs` (`thinking`, `enable_thinking`, `reasoning_effort`), and a
/// `response_format` schema attached to the first system message.
pub fn conversation_from_json(f: &Fields) -> Result<Conversation, ApiError> {
    let list = f.array("messages")?.ok_or_else(|| ApiError::invalid_param("messages", "`messages` is required"))?;
    let mut messages = list.iter().enumerate().map(|(i, v)| message_from_json(i, v)).collect::<Result<Vec<_>, _>>()?;
    let tools = tools_from_json(f.array("tools")?.map_or(&[][..], |t| t.as_slice()))?;
    let tool_choice = tool_choice_from_json(f.get("tool_choice"))?;

    let mut thinking = match f.get("thinking") {
        None => None,
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("enabled") => Some(true),
            Some("disabled") => Some(false),
            _ => {
                return Err(ApiError::invalid_param(
                    "thinking.type",
                    "thinking must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}",
                ))
            }
        },
        Some(v) => return Err(f.wrong("thinking", "an object", v)),
    };
    let mut effort = f.str("reasoning_effort")?.map(|s| Effort::parse_param(s, "reasoning_effort")).transpose()?;
    let mut prefix = String::new();
    if let Some(kw) = f.object("chat_template_kwargs", &mut prefix)? {
        if thinking.is_none() {
            thinking = match kw.bool("thinking")? {
                Some(t) => Some(t),
                None => kw.bool("enable_thinking")?,
            };
        }
        if effort.is_none() {
            effort = kw
                .str("reasoning_effort")?
                .map(|s| Effort::parse_param(s, "chat_template_kwargs.reasoning_effort"))
                .transpose()?;
        }
    }

    if let Some(rf) = f.get("response_format") {
        let schema = match rf.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(json!({"type": "object"})),
            Some("json_schema") => match rf.get("json_schema").and_then(|j| j.get("schema")) {
                Some(s) => Some(s.clone()),
                None => {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.schema",
                        "a json_schema response format needs `json_schema.schema`",
                    ))
                }
            },
            _ => {
                return Err(ApiError::invalid_param(
                    "response_format.type",
                    "response_format.type must be `text`, `json_object` or `json_schema`",
                ))
            }
        };
        if let Some(schema) = schema {
            let pos = match messages.iter().position(|m| m.role == Role::System) {
                Some(p) => p,
                None => {
                    messages.insert(0, Message::new(Role::System, ""));
                    0
                }
            };
            messages[pos].response_format = Some(schema);
        }
    }
    Ok(Conversation { messages, tools, tool_choice, thinking, effort })
}

/// `stop`: a string or a list of strings.
fn stop_from_json(f: &Fields) -> Result<Vec<String>, ApiError> {
    match f.get("stop") {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid_param("stop", "`stop` must be a string or a list of strings")),
        Some(v) => Err(f.wrong("stop", "a string or a list of strings", v)),
    }
}

/// Sampling fields shared by both endpoints (`max_tokens` and log-probabilities differ).
fn sampling_from_json(f: &Fields) -> Result<GenerationParams, ApiError> {
    // The messages quote the JSON number (1e308 is not "inf", its value as f32).
    let sent = |key: &str| f.get(key).map_or_else(String::new, Value::to_string);
    let temperature = f.f32("temperature")?;
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            let msg = format!("temperature must be in [0, 2], not {}", sent("temperature"));
            return Err(ApiError::invalid_param("temperature", msg));
        }
    }
    let top_p = f.f32("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", format!("top_p must be in (0, 1], not {}", sent("top_p"))));
        }
    }
    // vLLM spells "no top-k" as -1 (and 0).
    let top_k = match f.i64("top_k")? {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => return Err(ApiError::invalid_param("top_k", format!("top_k must be -1, 0 or positive, not {k}"))),
    };
    let seed = f.i64("seed")?.map(|s| s as u64);
    if let Some(n) = f.i64("n")? {
        if n != 1 {
            return Err(ApiError::invalid_param("n", format!("n must be 1 (this server returns one choice), not {n}")));
        }
    }
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    Ok(GenerationParams { temperature, top_p, top_k, seed, stop: stop_from_json(f)?, ignore_eos, ..Default::default() })
}

/// `stream` and `stream_options.include_usage`.
fn stream_options(f: &Fields) -> Result<(bool, bool), ApiError> {
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut prefix = String::new();
    let include_usage = match f.object("stream_options", &mut prefix)? {
        Some(o) => o.bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    Ok((stream, include_usage))
}

/// The first of `keys` present, at least 1 (one message for 0 and for negative numbers).
fn max_tokens(f: &Fields, keys: &[&str]) -> Result<Option<usize>, ApiError> {
    for k in keys {
        match f.i64(k)? {
            Some(n) if n >= 1 => return Ok(Some(n as usize)),
            Some(n) => return Err(ApiError::invalid_param(*k, format!("`{k}` must be at least 1, not {n}"))),
            None => {}
        }
    }
    Ok(None)
}

// ------------------------------------------------------------------------------------------
// Responses
// ------------------------------------------------------------------------------------------

/// OpenAI's usage object with DeepSeek's cache fields.
pub fn usage_json(u: &UsageCounts) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "prompt_cache_hit_tokens": u.cached_tokens,
        "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens),
    })
}

/// `finish_reason` and vLLM's `stop_reason` (the matched stop string).
fn finish_fields(r: &FinishReason) -> (&'static str, Value) {
    match r {
        FinishReason::EndOfTurn => ("stop", Value::Null),
        FinishReason::StopString(s) => ("stop", json!(s)),
        FinishReason::Length => ("length", Value::Null),
        FinishReason::ToolCalls => ("tool_calls", Value::Null),
    }
}

fn chat_logprob_json(l: &TokenLogprob) -> Value {
    json!({
        "token": l.token,
        "logprob": l.logprob,
        "bytes": l.bytes,
        "top_logprobs": l.top.iter().map(|(t, b, lp)| json!({"token": t, "logprob": lp, "bytes": b})).collect::<Vec<_>>(),
    })
}

/// A call id: `call_` and 24 hex digits unique per reply.
fn call_id(reply_id: &str, index: usize) -> String {
    let tail: String = reply_id.chars().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
    format!("call_{tail}{index:04x}")
}

/// What a chat reply's stream needs to know about its request.
struct ChatHead {
    id: String,
    created: u64,
    model: String,
    thinking: bool,
    logprobs: bool,
}

impl ChatHead {
    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&FinishReason>) -> Value {
        let (reason, stop_reason) = match finish {
            Some(f) => {
                let (r, s) = finish_fields(f);
                (json!(r), s)
            }
            None => (Value::Null, Value::Null),
        };
        let mut choice = json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason});
        if finish.is_some() {
            choice["stop_reason"] = stop_reason;
        }
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [choice],
        })
    }
}

fn sse_json(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// A streamed reply as SSE: it owns the [`Reply`], so axum dropping the body (the client went
/// away) drops the engine stream and cancels the request.
struct SseState {
    reply: Reply,
    queue: VecDeque<Event>,
    done: bool,
    kind: StreamKind,
    include_usage: bool,
}

enum StreamKind {
    Chat(ChatHead),
    Completion(CompletionHead),
}

impl SseState {
    fn delta(&mut self, d: Delta) {
        match &mut self.kind {
            StreamKind::Chat(head) => {
                let (delta, logprobs) = match d {
                    Delta::Reasoning(t) => (json!({"reasoning_content": t, "reasoning": t}), Value::Null),
                    Delta::Content(t) => (json!({"content": t}), Value::Null),
                    Delta::ToolCall { index, name, arguments } => {
                        let id = call_id(&head.id, index);
                        let first = json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                                            "function": {"name": name, "arguments": ""}}]});
                        let chunk = head.chunk(first, Value::Null, None);
                        self.queue.push_back(sse_json(&chunk));
                        (json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}), Value::Null)
                    }
                    Delta::Logprobs(l) => {
                        if !head.logprobs {
                            return;
                        }
                        (json!({}), json!({"content": l.iter().map(chat_logprob_json).collect::<Vec<_>>()}))
                    }
                };
                let mut chunk = head.chunk(delta, logprobs, None);
                if self.include_usage {
                    chunk["usage"] = Value::Null;
                }
                self.queue.push_back(sse_json(&chunk));
            }
            StreamKind::Completion(head) => {
                let (text, logprobs) = match d {
                    Delta::Content(t) => (t, Value::Null),
                    Delta::Logprobs(l) if head.logprobs => (String::new(), head.logprobs_json(&l)),
                    _ => return,
                };
                let mut chunk = head.chunk(&text, logprobs, None);
                if self.include_usage {
                    chunk["usage"] = Value::Null;
                }
                self.queue.push_back(sse_json(&chunk));
            }
        }
    }

    fn finish(&mut self, f: Finish) {
        let mut chunk = match &self.kind {
            StreamKind::Chat(head) => head.chunk(json!({}), Value::Null, Some(&f.reason)),
            StreamKind::Completion(head) => head.chunk("", Value::Null, Some(&f.reason)),
        };
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        self.queue.push_back(sse_json(&chunk));
        if self.include_usage {
            let (id, object, created, model) = match &self.kind {
                StreamKind::Chat(h) => (&h.id, "chat.completion.chunk", h.created, &h.model),
                StreamKind::Completion(h) => (&h.id, "text_completion", h.created, &h.model),
            };
            let usage = json!({"id": id, "object": object, "created": created, "model": model, "choices": [],
                               "usage": usage_json(&f.usage)});
            self.queue.push_back(sse_json(&usage));
        }
        self.end();
    }

    fn end(&mut self) {
        self.queue.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }

    async fn next_event(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            match self.reply.next().await {
                Some(Ok(ReplyEvent::Delta(d))) => self.delta(d),
                Some(Ok(ReplyEvent::Finish(f))) => self.finish(f),
                Some(Err(e)) => {
                    self.queue.push_back(sse_json(&e.openai_json()));
                    self.end();
                }
                None => self.end(),
            }
        }
    }
}

fn sse_response(state: SseState, first: Option<Event>) -> Response {
    let mut state = state;
    if let Some(e) = first {
        state.queue.push_back(e);
    }
    let stream = futures_util::stream::unfold(state, SseState::next_event);
    Sse::new(stream).into_response()
}

// ------------------------------------------------------------------------------------------
// Chat completions
// ------------------------------------------------------------------------------------------

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => e.openai_response(),
    }
}

async fn chat_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let v: Value = parse_json_body(body)?;
    let f = Fields::of(&v)?;
    check_model(state, &f)?;
    let conv = conversation_from_json(&f)?;
    let mut params = sampling_from_json(&f)?;
    params.max_tokens = max_tokens(&f, &["max_completion_tokens", "max_tokens"])?;
    if f.get("max_completion_tokens").is_some_and(|v| !v.is_null()) {
        params.max_tokens_field = Some("max_completion_tokens");
    }
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.usize("top_logprobs")?;
    if let Some(n) = top {
        if n > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        if !logprobs && n > 0 {
            return Err(ApiError::invalid_param("top_logprobs", "top_logprobs needs `logprobs: true`"));
        }
    }
    params.logprobs = logprobs.then(|| top.unwrap_or(0));
    let (stream, include_usage) = stream_options(&f)?;

    let reply = state.start_reply(&conv, &params)?;
    let thinking = reply.thinking();
    let head = ChatHead {
        id: state.next_id("chatcmpl-"),
        created: unix_now(),
        model: state.served_model_name.clone(),
        thinking,
        logprobs,
    };
    if stream {
        let mut role = json!({"role": "assistant", "content": ""});
        if head.thinking {
            role["reasoning_content"] = json!("");
            role["reasoning"] = json!("");
        }
        let mut first = head.chunk(role, Value::Null, None);
        if include_usage {
            first["usage"] = Value::Null;
        }
        let st = SseState { reply, queue: VecDeque::new(), done: false, kind: StreamKind::Chat(head), include_usage };
        return Ok(sse_response(st, Some(sse_json(&first))));
    }
    let (deltas, finish) = reply.collect().await?;
    Ok(Json(chat_response(&head, &deltas, &finish)).into_response())
}

/// The non-streamed `chat.completion` object of a finished reply.
fn chat_response(head: &ChatHead, deltas: &[Delta], finish: &Finish) -> Value {
    let (mut reasoning, mut content, mut calls, mut lps) = (String::new(), String::new(), vec![], vec![]);
    for d in deltas {
        match d {
            Delta::Reasoning(t) => reasoning.push_str(t),
            Delta::Content(t) => content.push_str(t),
            Delta::ToolCall { index, name, arguments } => calls.push(json!({
                "id": call_id(&head.id, *index), "type": "function",
                "function": {"name": name, "arguments": arguments},
            })),
            Delta::Logprobs(l) => lps.extend(l.iter().map(chat_logprob_json)),
        }
    }
    let content = if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) };
    let reasoning = if head.thinking || !reasoning.is_empty() { json!(reasoning) } else { Value::Null };
    let mut message = json!({"role": "assistant", "content": content, "reasoning_content": reasoning,
                             "reasoning": reasoning});
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    let (reason, stop_reason) = finish_fields(&finish.reason);
    let logprobs = if head.logprobs { json!({"content": lps}) } else { Value::Null };
    json!({
        "id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason,
                     "stop_reason": stop_reason}],
        "usage": usage_json(&finish.usage),
    })
}

// ------------------------------------------------------------------------------------------
// Completions
// ------------------------------------------------------------------------------------------

/// What a completion reply's stream needs to know about its request.
struct CompletionHead {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    /// Characters of the token strings whose log-probabilities were sent so far: the next
    /// `text_offset`. Counted from the tokens, not from the text sent, so that a streamed
    /// reply's offsets are the whole reply's (text held back, e.g. the bytes of a character
    /// split over tokens, would otherwise shift them).
    offset: usize,
}

impl CompletionHead {
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&FinishReason>) -> Value {
        let (reason, stop_reason) = match finish {
            Some(f) => {
                let (r, s) = finish_fields(f);
                (json!(r), s)
            }
            None => (Value::Null, Value::Null),
        };
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason,
                         "stop_reason": stop_reason}],
        })
    }

    /// The legacy completions `logprobs` object for `l`, its offsets continuing from the tokens
    /// before (`offset`, which it advances). `text_offset` counts characters (Unicode scalar
    /// values), as OpenAI's and vLLM's do (Python string lengths), not UTF-8 bytes.
    fn logprobs_json(&mut self, l: &[TokenLogprob]) -> Value {
        let mut offsets = vec![];
        for t in l {
            offsets.push(self.offset);
            self.offset += t.token.chars().count();
        }
        json!({
            "tokens": l.iter().map(|t| &t.token).collect::<Vec<_>>(),
            "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            "top_logprobs": l.iter().map(|t| {
                t.top.iter().map(|(s, _, lp)| (s.clone(), json!(lp))).collect::<Map<String, Value>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }
}

/// `prompt`: a string, a list of token ids, or a one-element list of either (one prompt per
/// request). Token ids outside the model's vocabulary are a 400 naming `prompt`.
fn prompt_ids(state: &AppState, f: &Fields) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid_param("prompt", "`prompt` must be a string or a list of token ids (one prompt per request)")
    };
    let vocab_size = state.engine.info().vocab_size;
    let ids_of = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        let ids = a
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::invalid_param("prompt", "token ids must be integers in 0..2^32"))?;
        match ids.iter().find(|&&t| t as usize >= vocab_size) {
            Some(bad) => Err(ApiError::invalid_param(
                "prompt",
                format!("token id {bad} is outside the vocabulary (ids 0 to {})", vocab_size.saturating_sub(1)),
            )),
            None => Ok(ids),
        }
    };
    let encode = |s: &str| state.tokenizer.encode(s).map_err(|e| ApiError::internal(format!("tokenizer: {e}")));
    match f.get("prompt") {
        None => Err(ApiError::invalid_param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => encode(s),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid_param("prompt", "the prompt is empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => ids_of(a),
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => encode(s),
            Value::Array(ids) => ids_of(ids),
            _ => Err(bad()),
        },
        Some(Value::Array(a)) if a.iter().all(|v| v.is_string() || v.is_array()) => {
            Err(ApiError::invalid_param("prompt", format!("this server takes one prompt per request, not {}", a.len())))
        }
        Some(_) => Err(bad()),
    }
}

/// `POST /v1/completions`: raw text or token ids in, text out; no chat format.
pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match completions_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => e.openai_response(),
    }
}

async fn completions_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let v: Value = parse_json_body(body)?;
    let f = Fields::of(&v)?;
    check_model(state, &f)?;
    let prompt = prompt_ids(state, &f)?;
    let mut params = sampling_from_json(&f)?;
    // The legacy API's default is 16 tokens (OpenAI and vLLM), here at most what the context
    // leaves: a limit the client did not send is not its error.
    let room = state.max_model_len().saturating_sub(prompt.len()).max(1);
    params.max_tokens = Some(max_tokens(&f, &["max_tokens"])?.unwrap_or(16.min(room)));
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported by this server"));
    }
    if f.str("suffix")?.is_some() {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported by this server"));
    }
    if let Some(b) = f.i64("best_of")? {
        if b != 1 {
            return Err(ApiError::invalid_param("best_of", "best_of must be 1"));
        }
    }
    let top = f.usize("logprobs")?;
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid_param("logprobs", format!("logprobs must be at most {MAX_TOP_LOGPROBS}")));
    }
    params.logprobs = top;
    let (stream, include_usage) = stream_options(&f)?;
    let reply = state.start_raw_reply(prompt, &params)?;
    let mut head = CompletionHead {
        id: state.next_id("cmpl-"),
        created: unix_now(),
        model: state.served_model_name.clone(),
        logprobs: top.is_some(),
        offset: 0,
    };
    if stream {
        let st =
            SseState { reply, queue: VecDeque::new(), done: false, kind: StreamKind::Completion(head), include_usage };
        return Ok(sse_response(st, None));
    }
    let (deltas, finish) = reply.collect().await?;
    let mut text = String::new();
    let mut lps = vec![];
    for d in deltas {
        match d {
            Delta::Content(t) => text.push_str(&t),
            Delta::Logprobs(l) => lps.extend(l),
            _ => {}
        }
    }
    let logprobs = if head.logprobs { head.logprobs_json(&lps) } else { Value::Null };
    let mut body = head.chunk(&text, logprobs, Some(&finish.reason));
    body["usage"] = usage_json(&finish.usage);
    Ok(Json(body).into_response())
}

// ------------------------------------------------------------------------------------------
// Models
// ------------------------------------------------------------------------------------------

/// The served model's object, with vLLM's `max_model_len` and `root`.
fn model_json(state: &AppState) -> Value {
    let root = state.model_aliases.first().cloned().unwrap_or_else(|| state.served_model_name.clone());
    json!({
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "dsv4",
        "root": root,
        "parent": null,
        "max_model_len": state.max_model_len(),
    })
}

/// `GET /v1/models`: the served model.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_json(&state)]})).into_response()
}

/// `GET /v1/models/{model}` (the SDKs' `models.retrieve`): the served model under any of its
/// names (a name with slashes, such as a checkpoint path, too); another name is a 404.
pub async fn model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.check_model(Some(&name)) {
        Ok(()) => Json(model_json(&state)).into_response(),
        Err(e) => e.openai_response(),
    }
}
