//! The prompt encoder: a message list in, the prompt text the model was trained on out.
//!
//! The steps are those of the official `encode_messages`:
//! 1. `tool` messages become `<tool_result>` blocks of a user message, and consecutive user
//!    messages are merged into one (blocks joined by a blank line);
//! 2. the tool results of a user message are put in the order of the preceding assistant's
//!    tool calls (matched by id);
//! 3. in thinking mode with `drop_thinking` (disabled as soon as any message carries tools),
//!    assistant reasoning before the last user message is removed and earlier `developer`
//!    messages are dropped;
//! 4. each message is rendered, and a user/developer message that the assistant answers next
//!    gets `<｜Assistant｜>` plus `<think>` or `</think>`.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::pyjson::to_python_json;
use super::tokens::*;
use super::ChatError;

/// The role of a message. `tool` messages carry tool results; `developer` is rendered like a
/// user message; `latest_reminder` is DeepSeek's out-of-band context line (date, locale, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Developer,
    Assistant,
    Tool,
    LatestReminder,
}

/// Quick-instruction task of a message: the encoder appends the task's special token instead of
/// (or, for `action`, after) the assistant prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Action,
    Query,
    Authority,
    Domain,
    Title,
    ReadUrl,
}

impl Task {
    /// The task's special token, e.g. `<｜action｜>`.
    pub fn token(self) -> &'static str {
        match self {
            Task::Action => "<｜action｜>",
            Task::Query => "<｜query｜>",
            Task::Authority => "<｜authority｜>",
            Task::Domain => "<｜domain｜>",
            Task::Title => "<｜title｜>",
            Task::ReadUrl => "<｜read_url｜>",
        }
    }
}

/// One part of a list-valued `content` (OpenAI style). Only `text` parts can be rendered, except
/// inside tool results where the official encoder writes `[Unsupported <type>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    /// The part type, e.g. `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// Message content: a string, or a list of content parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Content::Text(s)),
            v @ Value::Array(_) => {
                serde_json::from_value(v).map(Content::Parts).map_err(|e| serde::de::Error::custom(e.to_string()))
            }
            other => Err(serde::de::Error::custom(format!(
                "content must be a string, a list of content parts or null, not {}",
                json_type(&other)
            ))),
        }
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_string())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

/// The function of a tool call, OpenAI style.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FunctionCall {
    /// The tool name.
    pub name: String,
    /// Normally a JSON string holding an object. The official encoder falls back to one
    /// parameter called `arguments` when the string is not JSON, or when it is not a string at
    /// all (then written as JSON with `string="false"`); this implementation does the same.
    pub arguments: Value,
    /// Some clients put the call id here instead of next to `function`.
    #[serde(default)]
    pub id: Option<String>,
}

/// A tool call of an assistant message, OpenAI style:
/// `{"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolCall {
    /// Used to put tool results in call order.
    #[serde(default)]
    pub id: Option<String>,
    /// `"function"` (not checked, as in the official encoder).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

impl ToolCall {
    /// `tc.get("id") or tc["function"].get("id", "")`: the id the results are matched with.
    fn order_id(&self) -> Option<&str> {
        self.id.as_deref().filter(|s| !s.is_empty()).or(self.function.id.as_deref().filter(|s| !s.is_empty()))
    }
}

/// One chat message, deserialisable from an OpenAI-style message object. Unknown fields are
/// ignored. `null` content is treated like absent content (an empty string).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: Option<Content>,
    /// Assistant reasoning (the text between `<think>` and `</think>`).
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Assistant tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Tool definitions, OpenAI style (`[{"type": "function", "function": {...}}]`), on a system
    /// or developer message.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// A JSON schema the reply must follow (system or developer message).
    #[serde(default)]
    pub response_format: Option<Value>,
    /// For `tool` messages: the id of the call this is the result of.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Accepted for OpenAI compatibility; the format does not render it.
    #[serde(default)]
    pub name: Option<String>,
    /// Quick-instruction task.
    #[serde(default)]
    pub task: Option<Task>,
    /// Render an assistant message without its closing EOS (a prefix to continue).
    #[serde(default)]
    pub wo_eos: bool,
}

impl Message {
    /// A message with only a role and text content.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(content.into())),
            reasoning_content: None,
            tool_calls: None,
            tools: None,
            response_format: None,
            tool_call_id: None,
            name: None,
            task: None,
            wo_eos: false,
        }
    }

    /// Parses one OpenAI-style message object.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        Message::deserialize(value).map_err(|e| e.to_string())
    }
}

/// Thinking mode (`"thinking"`: the reply starts inside `<think>`) or chat mode (`"chat"`: the
/// prompt closes the think block with `</think>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThinkingMode {
    #[default]
    Chat,
    Thinking,
}

/// Reasoning effort, a text prefix inserted after BOS in thinking mode only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningEffort {
    /// 0731 encoder only (its default, no prefix).
    Low,
    /// Preview encoder: no prefix. 0731 encoder: [`REASONING_EFFORT_MAX`].
    High,
    /// Preview encoder: [`REASONING_EFFORT_MAX`]. 0731 encoder: [`REASONING_EFFORT_BEYOND_MAX`].
    Max,
}

impl ReasoningEffort {
    /// The spelling [`str::parse`] takes back.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::High => "high",
            ReasoningEffort::Max => "max",
        }
    }
}

impl std::str::FromStr for ReasoningEffort {
    type Err = ChatError;
    fn from_str(s: &str) -> Result<Self, ChatError> {
        match s {
            "low" => Ok(ReasoningEffort::Low),
            "high" => Ok(ReasoningEffort::High),
            "max" => Ok(ReasoningEffort::Max),
            _ => Err(ChatError::ReasoningEffort { given: s.to_string(), expected: "high, max (or low, 0731)".into() }),
        }
    }
}

/// Which official encoder to reproduce. They differ only in the reasoning-effort texts and in
/// whether a user message keeps its `tools` field through the tool-message merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderRevision {
    /// The encoder shipped with DeepSeek-V4-Flash / -Pro (April 2026, "preview"): efforts
    /// `high` (no text) and `max`.
    #[default]
    Preview,
    /// The encoder shipped with DeepSeek-V4-Flash-0731: efforts `low` (default, no text),
    /// `high` and `max` ("Beyond maximum").
    Rev0731,
}

/// The options of the official `encode_messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// `thinking_mode`.
    pub thinking_mode: ThinkingMode,
    /// `drop_thinking` (default true): drop reasoning and developer messages before the last
    /// user message. Ignored when any message carries tools, as in the official encoder.
    pub drop_thinking: bool,
    /// `add_default_bos_token` (default true); BOS is never written when a context is given.
    pub add_bos: bool,
    /// `reasoning_effort` (default none).
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Which official encoder to reproduce (default [`EncoderRevision::Preview`]).
    pub revision: EncoderRevision,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            thinking_mode: ThinkingMode::Chat,
            drop_thinking: true,
            add_bos: true,
            reasoning_effort: None,
            revision: EncoderRevision::Preview,
        }
    }
}

impl EncodeOptions {
    /// Default options with the given mode.
    pub fn new(thinking_mode: ThinkingMode) -> Self {
        EncodeOptions { thinking_mode, ..Default::default() }
    }

    /// The text inserted after BOS for these options (empty in chat mode), or an error for an
    /// effort the revision does not accept.
    fn effort_prefix(&self) -> Result<&'static str, ChatError> {
        let text = match (self.revision, self.reasoning_effort) {
            (EncoderRevision::Preview, None | Some(ReasoningEffort::High)) => "",
            (EncoderRevision::Preview, Some(ReasoningEffort::Max)) => REASONING_EFFORT_MAX,
            (EncoderRevision::Preview, Some(ReasoningEffort::Low)) => {
                return Err(ChatError::ReasoningEffort {
                    given: "low".into(),
                    expected: "high, max (the preview encoder has no `low`)".into(),
                })
            }
            (EncoderRevision::Rev0731, None | Some(ReasoningEffort::Low)) => "",
            (EncoderRevision::Rev0731, Some(ReasoningEffort::High)) => REASONING_EFFORT_MAX,
            (EncoderRevision::Rev0731, Some(ReasoningEffort::Max)) => REASONING_EFFORT_BEYOND_MAX,
        };
        Ok(if self.thinking_mode == ThinkingMode::Thinking { text } else { "" })
    }
}

/// Encodes a conversation into the prompt text, like the official
/// `encode_messages(messages, thinking_mode, drop_thinking=..., add_default_bos_token=...,
/// reasoning_effort=...)` with no context.
///
/// Differences from the Python reference, all on inputs it does not handle on purpose:
/// * `null` content is treated as an empty string (Python writes `None` for a `null` tool result
///   or latest-reminder and raises for a `null` user message);
/// * list-valued content is rendered as its text parts joined by a blank line, like the 0731
///   encoder (the preview encoder raises or prints the Python list); a non-text part is an
///   error, except in tool results, which get `[Unsupported <type>]` as in the reference;
/// * the reasoning effort is validated even when there is no message to render.
pub fn encode_messages(messages: &[Message], opts: &EncodeOptions) -> Result<String, ChatError> {
    encode_messages_with_context(&[], messages, opts)
}

/// [`encode_messages`] with the official `context` argument: `context` is a conversation prefix
/// that was already encoded (its text is not produced again, and BOS is not written), which
/// only influences how `messages` are rendered. Reproduces the reference's bookkeeping exactly,
/// including its quirks (after dropping, the number of messages rendered is
/// `len(drop(context + messages)) - len(drop(context))`).
pub fn encode_messages_with_context(
    context: &[Message],
    messages: &[Message],
    opts: &EncodeOptions,
) -> Result<String, ChatError> {
    let effort_prefix = opts.effort_prefix()?;
    let thinking = opts.thinking_mode == ThinkingMode::Thinking;

    let ctx = merge_tool_messages(context, 0, opts.revision)?;
    let msgs = merge_tool_messages(messages, context.len(), opts.revision)?;
    let mut full: Vec<Turn> = ctx.iter().cloned().chain(msgs.iter().cloned()).collect();
    sort_tool_results_by_call_order(&mut full);

    let mut prompt = String::new();
    if opts.add_bos && context.is_empty() {
        prompt.push_str(BOS);
    }

    let drop_thinking = opts.drop_thinking && !full.iter().any(|t| t.has_tools);
    let (full, context_len, num_to_render) = if thinking && drop_thinking {
        let dropped = drop_thinking_messages(full);
        // The reference computes the boundary from the context dropped on its own.
        let ctx_dropped = drop_thinking_messages(ctx).len();
        let num = dropped.len() as isize - ctx_dropped as isize;
        let num = num.max(0) as usize;
        let context_len = dropped.len() - num;
        (dropped, context_len, num)
    } else {
        (full, ctx.len(), msgs.len())
    };

    let r = Renderer { turns: &full, thinking, drop_thinking, last_user: last_user_index(&full) };
    for idx in context_len..context_len + num_to_render {
        if idx == 0 {
            prompt.push_str(effort_prefix);
        }
        r.render(idx, &mut prompt)?;
    }
    Ok(prompt)
}

/// Renders an OpenAI-style conversation, as `dsv4 render` does.
///
/// * `messages_json`: a JSON array of messages, or an object `{"messages": [...], "tools":
///   [...]}` (the shape of the official test input 1).
/// * `tools`: an OpenAI-style tool list (`[{"type": "function", "function": {...}}]`; a bare
///   function object `{"name": ..., "parameters": ...}` is accepted too), or an object with a
///   `tools` list. Tools from both places are attached to the **first system message** — that is
///   where the official encoder expects them — and an empty system message is inserted at the
///   front when there is none. An empty list attaches nothing.
/// * `thinking`: thinking mode (`true`) or chat mode.
/// * `reasoning_effort`: `"high"` or `"max"` (preview encoder), only effective in thinking mode.
pub fn render_openai(
    messages_json: &Value,
    tools: Option<&Value>,
    thinking: bool,
    reasoning_effort: Option<&str>,
) -> Result<String, ChatError> {
    let (list, mut tool_defs) = match messages_json {
        Value::Array(list) => (list, vec![]),
        Value::Object(obj) => {
            let list = obj.get("messages").and_then(Value::as_array).ok_or_else(|| {
                ChatError::Messages("expected a list of messages or an object with `messages`".into())
            })?;
            let tools = match obj.get("tools") {
                None | Some(Value::Null) => vec![],
                Some(t) => openai_tool_list(t)?,
            };
            (list, tools)
        }
        other => {
            return Err(ChatError::Messages(format!("expected a list of messages, not {}", json_type(other))));
        }
    };
    if let Some(t) = tools {
        tool_defs.extend(openai_tool_list(t)?);
    }
    let mut messages = list
        .iter()
        .enumerate()
        .map(|(index, v)| Message::from_json(v).map_err(|reason| ChatError::Message { index, reason }))
        .collect::<Result<Vec<_>, _>>()?;
    if !tool_defs.is_empty() {
        let pos = match messages.iter().position(|m| m.role == Role::System) {
            Some(p) => p,
            None => {
                messages.insert(0, Message::new(Role::System, ""));
                0
            }
        };
        messages[pos].tools.get_or_insert_with(Vec::new).extend(tool_defs);
    }
    let opts = EncodeOptions {
        thinking_mode: if thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat },
        reasoning_effort: reasoning_effort.map(str::parse).transpose()?,
        ..Default::default()
    };
    encode_messages(&messages, &opts)
}

/// The tool list of a `--tools` value, each tool normalised to the OpenAI form.
fn openai_tool_list(v: &Value) -> Result<Vec<Value>, ChatError> {
    let list = match v {
        Value::Array(list) => list,
        Value::Object(obj) if obj.get("tools").is_some_and(Value::is_array) => {
            obj["tools"].as_array().expect("checked to be an array")
        }
        other => {
            return Err(ChatError::Tools(format!(
                "expected a list of tools or an object with a `tools` list, not {}",
                json_type(other)
            )))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| match t {
            Value::Object(o) if o.contains_key("function") => Ok(t.clone()),
            Value::Object(o) if o.contains_key("name") => {
                Ok(serde_json::json!({"type": "function", "function": t.clone()}))
            }
            _ => Err(ChatError::Tools(format!(
                "tool {i}: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., ...}}}}"
            ))),
        })
        .collect()
}

/// How a JSON value's type is named in error messages ("a string", "a list", ...).
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Python truthiness of a JSON value (`if response_format:`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

// ------------------------------------------------------------------------------------------
// Preprocessing
// ------------------------------------------------------------------------------------------

/// A piece of a merged user message.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: Option<String>, text: String },
}

/// A message after the tool-message merge (no `tool` role any more).
#[derive(Debug, Clone)]
struct Turn<'a> {
    role: Role,
    /// The source message (the first one for a merged user message; `None` for a user message
    /// made of tool results only).
    msg: Option<&'a Message>,
    /// Index of `msg` in the caller's list, for error messages.
    index: usize,
    /// User messages: the text and tool-result blocks.
    blocks: Vec<Block>,
    task: Option<Task>,
    /// Whether this message counts as "carrying tools" (disables `drop_thinking`).
    has_tools: bool,
    /// False once `drop_thinking` removed this assistant message's reasoning.
    keep_reasoning: bool,
}

fn has_tools(m: &Message) -> bool {
    m.tools.as_ref().is_some_and(|t| !t.is_empty())
}

/// The text of list-valued content: text parts joined by a blank line.
fn parts_text(parts: &[ContentPart], index: usize) -> Result<String, ChatError> {
    let mut texts = Vec::with_capacity(parts.len());
    for p in parts {
        if p.kind != "text" {
            return Err(ChatError::Message {
                index,
                reason: format!("content part of type `{}` is not supported (text only)", p.kind),
            });
        }
        texts.push(p.text.clone().unwrap_or_default());
    }
    Ok(texts.join("\n\n"))
}

fn content_text(m: &Message, index: usize) -> Result<String, ChatError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s.clone()),
        Some(Content::Parts(p)) => parts_text(p, index),
    }
}

/// `merge_tool_messages`: `tool` messages become tool-result blocks of a user message, merged
/// into the previous user message when there is one; consecutive user messages are merged
/// unless the earlier one has a task.
fn merge_tool_messages(messages: &[Message], base: usize, rev: EncoderRevision) -> Result<Vec<Turn<'_>>, ChatError> {
    let mut merged: Vec<Turn> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let index = base + i;
        match m.role {
            Role::Tool => {
                let text = match &m.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|p| {
                            if p.kind == "text" {
                                p.text.clone().unwrap_or_default()
                            } else {
                                format!("[Unsupported {}]", p.kind)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\n\n"),
                };
                let block = Block::ToolResult { id: m.tool_call_id.clone(), text };
                match merged.last_mut() {
                    Some(prev) if prev.role == Role::User => prev.blocks.push(block),
                    _ => merged.push(Turn {
                        role: Role::User,
                        msg: None,
                        index,
                        blocks: vec![block],
                        task: None,
                        has_tools: false,
                        keep_reasoning: true,
                    }),
                }
            }
            Role::User => {
                let text_blocks: Vec<Block> = match &m.content {
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|p| parts_text(std::slice::from_ref(p), index).map(Block::Text))
                        .collect::<Result<_, _>>()?,
                    _ => vec![Block::Text(content_text(m, index)?)],
                };
                match merged.last_mut() {
                    Some(prev) if prev.role == Role::User && prev.task.is_none() => prev.blocks.extend(text_blocks),
                    _ => merged.push(Turn {
                        role: Role::User,
                        msg: Some(m),
                        index,
                        blocks: text_blocks,
                        task: m.task,
                        // The preview encoder rebuilds user messages from a few fields only, so
                        // their `tools` are lost; the 0731 encoder keeps every field.
                        has_tools: rev == EncoderRevision::Rev0731 && has_tools(m),
                        keep_reasoning: true,
                    }),
                }
            }
            role => merged.push(Turn {
                role,
                msg: Some(m),
                index,
                blocks: vec![],
                task: m.task,
                has_tools: has_tools(m),
                keep_reasoning: true,
            }),
        }
    }
    Ok(merged)
}

/// `sort_tool_results_by_call_order`: the tool results of a user message follow the order of
/// the calls of the last assistant message that had tool calls. A result whose id is unknown
/// sorts like the first call (the reference's `.get(id, 0)`); the sort is stable.
fn sort_tool_results_by_call_order(turns: &mut [Turn]) {
    let mut order: Vec<(&str, usize)> = vec![];
    for t in turns.iter_mut() {
        match t.role {
            Role::Assistant => {
                let Some(calls) = t.msg.and_then(|m| m.tool_calls.as_ref()).filter(|c| !c.is_empty()) else {
                    continue;
                };
                order.clear();
                for (i, tc) in calls.iter().enumerate() {
                    if let Some(id) = tc.order_id() {
                        // A repeated id maps to its last call, as with a Python dict.
                        match order.iter_mut().find(|(k, _)| *k == id) {
                            Some(e) => e.1 = i,
                            None => order.push((id, i)),
                        }
                    }
                }
            }
            Role::User => {
                let n_results = t.blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).count();
                if n_results < 2 || order.is_empty() {
                    continue;
                }
                let rank = |b: &Block| match b {
                    Block::ToolResult { id: Some(id), .. } => {
                        order.iter().find(|(k, _)| *k == id.as_str()).map_or(0, |e| e.1)
                    }
                    _ => 0,
                };
                let mut results: Vec<Block> =
                    t.blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).cloned().collect();
                results.sort_by_key(rank);
                let mut sorted = results.into_iter();
                for b in t.blocks.iter_mut() {
                    if matches!(b, Block::ToolResult { .. }) {
                        *b = sorted.next().expect("same number of tool results");
                    }
                }
            }
            _ => {}
        }
    }
}

fn last_user_index(turns: &[Turn]) -> Option<usize> {
    turns.iter().rposition(|t| matches!(t.role, Role::User | Role::Developer))
}

/// `_drop_thinking_messages`: before the last user/developer message, assistant messages lose
/// their reasoning and developer messages are dropped.
fn drop_thinking_messages(turns: Vec<Turn>) -> Vec<Turn> {
    let last_user = last_user_index(&turns);
    turns
        .into_iter()
        .enumerate()
        .filter_map(|(i, mut t)| {
            let before_last_user = last_user.is_some_and(|l| i < l);
            match t.role {
                _ if !before_last_user => Some(t),
                Role::User | Role::System | Role::Tool | Role::LatestReminder => Some(t),
                Role::Assistant => {
                    t.keep_reasoning = false;
                    Some(t)
                }
                Role::Developer => None,
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Rendering
// ------------------------------------------------------------------------------------------

struct Renderer<'t, 'a> {
    turns: &'t [Turn<'a>],
    thinking: bool,
    drop_thinking: bool,
    last_user: Option<usize>,
}

impl Renderer<'_, '_> {
    /// `render_message(index, ...)`, appended to `out`.
    fn render(&self, index: usize, out: &mut String) -> Result<(), ChatError> {
        let t = &self.turns[index];
        let msg_err = |reason: String| ChatError::Message { index: t.index, reason };
        match t.role {
            Role::System => {
                let m = t.msg.expect("system turns come from a message");
                out.push_str(&content_text(m, t.index)?);
                append_tools_and_format(m, t.index, out)?;
            }
            Role::Developer => {
                let m = t.msg.expect("developer turns come from a message");
                let content = content_text(m, t.index)?;
                if content.is_empty() {
                    return Err(msg_err("a developer message needs non-empty content".into()));
                }
                out.push_str(USER);
                out.push_str(&content);
                append_tools_and_format(m, t.index, out)?;
            }
            Role::User => {
                out.push_str(USER);
                for (i, b) in t.blocks.iter().enumerate() {
                    if i > 0 {
                        out.push_str("\n\n");
                    }
                    match b {
                        Block::Text(s) => out.push_str(s),
                        Block::ToolResult { text, .. } => {
                            out.push_str("<tool_result>");
                            out.push_str(text);
                            out.push_str("</tool_result>");
                        }
                    }
                }
            }
            Role::LatestReminder => {
                let m = t.msg.expect("latest_reminder turns come from a message");
                out.push_str(LATEST_REMINDER);
                out.push_str(&content_text(m, t.index)?);
            }
            Role::Tool => unreachable!("tool messages are merged into user messages"),
            Role::Assistant => self.render_assistant(index, out)?,
        }

        // What follows the message: nothing when the next one is not the assistant's (or a
        // latest_reminder), else the task token or the assistant prefix.
        if let Some(next) = self.turns.get(index + 1) {
            if !matches!(next.role, Role::Assistant | Role::LatestReminder) {
                return Ok(());
            }
        }
        if let Some(task) = t.task {
            if task == Task::Action {
                out.push_str(ASSISTANT);
                out.push_str(if self.thinking { THINK_START } else { THINK_END });
            }
            out.push_str(task.token());
        } else if matches!(t.role, Role::User | Role::Developer) {
            out.push_str(ASSISTANT);
            let open_think = self.thinking && (!self.drop_thinking || self.last_user.is_some_and(|l| index >= l));
            out.push_str(if open_think { THINK_START } else { THINK_END });
        }
        Ok(())
    }

    fn render_assistant(&self, index: usize, out: &mut String) -> Result<(), ChatError> {
        let t = &self.turns[index];
        let m = t.msg.expect("assistant turns come from a message");
        let prev_has_task = index > 0 && self.turns[index - 1].task.is_some();
        if self.thinking && !prev_has_task {
            let after_last_user = self.last_user.is_none_or(|l| index > l);
            if !self.drop_thinking || after_last_user {
                if t.keep_reasoning {
                    out.push_str(m.reasoning_content.as_deref().unwrap_or(""));
                }
                out.push_str(THINK_END);
            }
        }
        out.push_str(&content_text(m, t.index)?);
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
            out.push_str("\n\n<");
            out.push_str(DSML);
            out.push_str("tool_calls>\n");
            for (call, tc) in calls.iter().enumerate() {
                if call > 0 {
                    out.push('\n');
                }
                let args = encode_arguments_to_dsml(&tc.function.arguments).map_err(|reason| ChatError::ToolCall {
                    index: t.index,
                    call,
                    reason,
                })?;
                out.push_str(INVOKE_OPEN);
                out.push_str(" name=\"");
                out.push_str(&tc.function.name);
                out.push_str("\">\n");
                out.push_str(&args);
                out.push('\n');
                out.push_str(INVOKE_CLOSE);
                out.push('>');
            }
            out.push('\n');
            out.push_str(TOOL_CALLS_END);
        }
        if !m.wo_eos {
            out.push_str(EOS);
        }
        Ok(())
    }
}

/// The `## Tools` and `## Response Format` sections of a system or developer message.
fn append_tools_and_format(m: &Message, index: usize, out: &mut String) -> Result<(), ChatError> {
    if let Some(tools) = m.tools.as_ref().filter(|t| !t.is_empty()) {
        out.push_str("\n\n");
        out.push_str(TOOLS_HEAD);
        for (i, tool) in tools.iter().enumerate() {
            let function = tool.get("function").ok_or_else(|| ChatError::Message {
                index,
                reason: format!(
                    "tool {i} has no `function` (expected {{\"type\": \"function\", \"function\": {{...}}}})"
                ),
            })?;
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&to_python_json(function));
        }
        out.push_str(TOOLS_TAIL);
    }
    if let Some(format) = m.response_format.as_ref().filter(|f| truthy(f)) {
        out.push_str("\n\n");
        out.push_str(RESPONSE_FORMAT_HEAD);
        out.push_str(&to_python_json(format));
    }
    Ok(())
}

/// `encode_arguments_to_dsml`: one `<｜DSML｜parameter>` line per argument; strings are written
/// as is with `string="true"`, anything else as JSON with `string="false"`.
fn encode_arguments_to_dsml(arguments: &Value) -> Result<String, String> {
    let fallback;
    let parsed;
    let args = match arguments {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(map)) => {
                parsed = map;
                &parsed
            }
            Ok(other) => {
                return Err(format!("`arguments` must be a JSON object, but the string holds {}", json_type(&other)))
            }
            Err(_) => {
                fallback = serde_json::Map::from_iter([("arguments".to_string(), arguments.clone())]);
                &fallback
            }
        },
        other => {
            fallback = serde_json::Map::from_iter([("arguments".to_string(), other.clone())]);
            &fallback
        }
    };
    let mut out = String::new();
    for (i, (k, v)) in args.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(PARAM_OPEN);
        out.push_str(" name=\"");
        out.push_str(k);
        match v {
            Value::String(s) => {
                out.push_str("\" string=\"true\">");
                out.push_str(s);
            }
            other => {
                out.push_str("\" string=\"false\">");
                out.push_str(&to_python_json(other));
            }
        }
        out.push('<');
        out.push_str(PARAM_CLOSE);
        out.push('>');
    }
    Ok(out)
}
