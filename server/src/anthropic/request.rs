//! An Anthropic Messages request (`POST /v1/messages`, `POST /v1/messages/count_tokens`) read
//! from its JSON body and translated into the protocol-neutral [`Conversation`] and
//! [`GenerationParams`].
//!
//! The request is read by hand from a [`serde_json::Value`] rather than derived, so that every
//! error names the field at fault the way Anthropic's API does (`messages.1.content.0.type:
//! ...`, `max_tokens: Field required`) and says what was expected. What each field becomes is
//! documented on [`parse`]; the reference is Anthropic's "Messages" API reference
//! (docs.claude.com/en/api/messages) and the guides "Tool use", "Extended thinking" and
//! "Effort", with DeepSeek's own Anthropic endpoint (api-docs.deepseek.com, "Anthropic API") as
//! the precedent for what a V4 server ignores.

use dsv4_core::chat::json_type;
use dsv4_core::chat::{Content, ContentPart, FunctionCall, Message, Role, ToolCall};
use serde_json::{json, Map, Value};

use crate::conversation::{Conversation, Effort, GenerationParams, ToolChoice};
use crate::error::ApiError;
use crate::signature;

/// Which endpoint the body was sent to: `count_tokens` takes the same conversation fields but
/// no `max_tokens`, sampling or `stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Messages,
    CountTokens,
}

/// A request, translated.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    /// `model` as the client spelled it (replies echo it).
    pub model: String,
    pub conversation: Conversation,
    /// Sampling and limits (all `None`/empty for `count_tokens`).
    pub params: GenerationParams,
    /// `stream: true`.
    pub stream: bool,
    /// `thinking` blocks in the history whose `signature` is not this server's signature of
    /// their text (missing, from another server or run, or edited). They are used all the same;
    /// see [`parse`].
    pub unverified_thinking: usize,
}

/// 400 about `param` (a dotted path, as Anthropic's API names fields: `messages.0.content`).
fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

/// A field of `obj`; `null` counts as absent (Anthropic's SDKs send `null` for unset fields).
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn as_object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| bad(param, format!("Input should be an object, not {}", json_type(v))))
}

fn as_str<'a>(v: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| bad(param, format!("Input should be a string, not {}", json_type(v))))
}

fn as_bool(v: &Value, param: &str) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| bad(param, format!("Input should be a boolean, not {}", json_type(v))))
}

fn as_array<'a>(v: &'a Value, param: &str) -> Result<&'a Vec<Value>, ApiError> {
    v.as_array().ok_or_else(|| bad(param, format!("Input should be a list, not {}", json_type(v))))
}

/// A non-negative integer (`2.0` is accepted as 2, as JSON does not distinguish them).
fn as_count(v: &Value, param: &str) -> Result<usize, ApiError> {
    let n = match v {
        Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        }
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(param, format!("Input should be a non-negative integer, not {v}")))
}

fn as_f32(v: &Value, param: &str) -> Result<f32, ApiError> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .map(|f| f as f32)
        .ok_or_else(|| bad(param, format!("Input should be a number, not {}", json_type(v))))
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, param: &str) -> Result<&'a Value, ApiError> {
    get(obj, key).ok_or_else(|| bad(param, "Field required"))
}

/// Reads an Anthropic Messages request body.
///
/// * `model` (required) is returned as given; the caller checks it names the served model.
/// * `system`: a string or a list of `text` blocks, becomes the leading system message (blocks
///   as content parts, which the encoder joins with a blank line, as it does for OpenAI
///   content parts).
/// * `messages` (required): `user` and `assistant` turns, each a string or a list of blocks:
///   - `text` → text (several in one turn become content parts; `cache_control` and
///     `citations` are ignored);
///   - `image`, `document` and other media → 400: the model reads text only;
///   - `tool_use` (assistant) → an OpenAI-style tool call (`id`, `name`, `input` as the JSON
///     `arguments`), rendered by the encoder as DSML;
///   - `tool_result` (user) → a `tool` message with `tool_call_id` = `tool_use_id`; its
///     `content` is a string or a list of blocks (text parts; any other block is passed on as a
///     part of its type, which the official encoder renders as `[Unsupported <type>]`). When
///     `is_error` is true, the text is prefixed with `Error: ` so the model can tell a failed
///     call (the V4 format has no error flag of its own);
///   - `thinking` (assistant) → the message's `reasoning_content` (several are joined with a
///     blank line); whether the encoder keeps or drops it is its own rule (dropped before the
///     last user turn unless tools are in play). Its `signature` is checked with
///     [`signature::verify`] under `signing_key`; **a block that does not verify is used all
///     the same** — never a 400 — because the history is the client's own input, which could
///     just as well say anything in a `text` block; the count is reported in
///     [`MessagesRequest::unverified_thinking`];
///   - `redacted_thinking` (assistant) → dropped: dsv4 never produces one, and its `data` is
///     opaque (Claude Code sends them back when a conversation moves between providers);
///   - a final `assistant` turn is a prefill: it is rendered without its end-of-sentence token
///     and the reply continues it (as Anthropic's API does), starting with content.
/// * `tools`: client tools `{name, description, input_schema}` (`type` absent or `custom`)
///   become OpenAI-style function tools; Anthropic's server and versioned tools
///   (`web_search_20250305`, `bash_20250124`, ...) are a 400, since nothing here runs them.
///   Names must be unique.
/// * `tool_choice`: `auto`, `any` (→ required), `none`, `{"type": "tool", "name"}`;
///   `disable_parallel_tool_use` is accepted and ignored (V4 decides how many calls to make).
/// * `thinking`: `enabled` and `adaptive` switch thinking on, `disabled` off; absent, the
///   server default decides. `budget_tokens` is accepted (a non-negative integer) and not
///   enforced: the V4 format has no thinking budget (as on DeepSeek's own endpoint).
/// * `output_config.effort`: any spelling `thinking.rs` knows (`low`, `medium`, `high`, `max`,
///   and the OpenAI side's `none`, `minimal`, `xhigh`); `output_config.format` is a 400.
/// * `max_tokens` (required for `/v1/messages`, at least 1), `stop_sequences`, `temperature`
///   (0 to 2, DeepSeek's range; Anthropic's is 0 to 1), `top_p` (above 0, at most 1), `top_k`,
///   `stream`. `metadata`, `service_tier`, `container`, `mcp_servers` and other fields are
///   ignored.
pub fn parse(body: &Value, endpoint: Endpoint, signing_key: &[u8]) -> Result<MessagesRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid(format!("the request body must be a JSON object, not {}", json_type(body))))?;

    let model = as_str(required(obj, "model", "model")?, "model")?.to_string();
    let mut conv = Conversation::default();
    let mut unverified_thinking = 0;

    if let Some(system) = get(obj, "system") {
        conv.messages.push(system_message(system)?);
    }
    let messages = as_array(required(obj, "messages", "messages")?, "messages")?;
    if messages.is_empty() {
        return Err(bad("messages", "List should have at least 1 item"));
    }
    for (i, m) in messages.iter().enumerate() {
        let last = i + 1 == messages.len();
        translate_message(m, i, last, signing_key, &mut conv.messages, &mut unverified_thinking)?;
    }

    if let Some(tools) = get(obj, "tools") {
        let tools = as_array(tools, "tools")?;
        for (i, t) in tools.iter().enumerate() {
            conv.tools.push(tool(t, i, &conv.tools)?);
        }
    }
    if let Some(tc) = get(obj, "tool_choice") {
        conv.tool_choice = tool_choice(tc, &conv.tools)?;
    }
    if let Some(t) = get(obj, "thinking") {
        conv.thinking = thinking(t)?;
    }
    if let Some(oc) = get(obj, "output_config") {
        let oc = as_object(oc, "output_config")?;
        if let Some(e) = get(oc, "effort") {
            conv.effort = Some(Effort::parse_param(as_str(e, "output_config.effort")?, "output_config.effort")?);
        }
        if get(oc, "format").is_some() {
            return Err(bad(
                "output_config.format",
                "structured outputs are not supported by this server; describe the format in the prompt",
            ));
        }
    }

    let mut params = GenerationParams::default();
    let mut stream = false;
    if endpoint == Endpoint::Messages {
        // A negative count gets the message 0 gets: both are below the least allowed.
        let max_tokens = required(obj, "max_tokens", "max_tokens")?;
        if max_tokens.as_f64().is_some_and(|f| f < 1.0) {
            return Err(bad("max_tokens", "Input should be greater than or equal to 1"));
        }
        let max_tokens = as_count(max_tokens, "max_tokens")?;
        params.max_tokens = Some(max_tokens);
        if let Some(s) = get(obj, "stop_sequences") {
            for (i, s) in as_array(s, "stop_sequences")?.iter().enumerate() {
                params.stop.push(as_str(s, &format!("stop_sequences.{i}"))?.to_string());
            }
        }
        if let Some(t) = get(obj, "temperature") {
            let t = as_f32(t, "temperature")?;
            if !(0.0..=2.0).contains(&t) {
                return Err(bad("temperature", format!("temperature must be between 0 and 2, not {t}")));
            }
            params.temperature = Some(t);
        }
        if let Some(p) = get(obj, "top_p") {
            let p = as_f32(p, "top_p")?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad("top_p", format!("top_p must be above 0 and at most 1, not {p}")));
            }
            params.top_p = Some(p);
        }
        if let Some(k) = get(obj, "top_k") {
            params.top_k = Some(as_count(k, "top_k")?);
        }
        if let Some(s) = get(obj, "stream") {
            stream = as_bool(s, "stream")?;
        }
        if let Some(m) = get(obj, "metadata") {
            as_object(m, "metadata")?;
        }
    }
    Ok(MessagesRequest { model, conversation: conv, params, stream, unverified_thinking })
}

/// Text parts as message content: one part is plain text, several stay parts.
fn text_content(mut parts: Vec<ContentPart>) -> Content {
    if parts.len() == 1 {
        Content::Text(parts.pop().and_then(|p| p.text).unwrap_or_default())
    } else {
        Content::Parts(parts)
    }
}

fn text_part(text: &str) -> ContentPart {
    ContentPart { kind: "text".into(), text: Some(text.to_string()) }
}

fn system_message(system: &Value) -> Result<Message, ApiError> {
    match system {
        Value::String(s) => Ok(Message::new(Role::System, s.as_str())),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                let param = format!("system.{j}");
                let b = as_object(b, &param)?;
                let kind = as_str(required(b, "type", &format!("{param}.type"))?, &format!("{param}.type"))?;
                if kind != "text" {
                    return Err(bad(
                        format!("{param}.type"),
                        format!("system blocks must be of type `text`, not `{kind}`"),
                    ));
                }
                let text = as_str(required(b, "text", &format!("{param}.text"))?, &format!("{param}.text"))?;
                parts.push(text_part(text));
            }
            let mut m = Message::new(Role::System, "");
            m.content = Some(text_content(parts));
            Ok(m)
        }
        other => {
            Err(bad("system", format!("Input should be a string or a list of text blocks, not {}", json_type(other))))
        }
    }
}

/// What media blocks get: the model reads text only.
fn unsupported_media(param: &str, kind: &str) -> ApiError {
    let what = match kind {
        "image" => "images are".to_string(),
        "document" => "documents are".to_string(),
        other => format!("`{other}` blocks are"),
    };
    bad(param, format!("{what} not supported: this server serves a text-only model"))
}

fn translate_message(
    m: &Value,
    i: usize,
    last: bool,
    key: &[u8],
    out: &mut Vec<Message>,
    unverified: &mut usize,
) -> Result<(), ApiError> {
    let param = format!("messages.{i}");
    let obj = as_object(m, &param)?;
    let role = as_str(required(obj, "role", &format!("{param}.role"))?, &format!("{param}.role"))?;
    let role = match role {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(bad(
                format!("{param}.role"),
                format!("Input should be 'user' or 'assistant', not '{other}' (the system prompt goes in `system`)"),
            ))
        }
    };
    let content = required(obj, "content", &format!("{param}.content"))?;
    let blocks = match content {
        Value::String(s) => {
            let mut msg = Message::new(role, s.as_str());
            msg.wo_eos = role == Role::Assistant && last;
            out.push(msg);
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        other => {
            return Err(bad(
                format!("{param}.content"),
                format!("Input should be a string or a list of content blocks, not {}", json_type(other)),
            ))
        }
    };
    match role {
        Role::User => user_blocks(blocks, &param, out),
        _ => assistant_blocks(blocks, &param, last, key, out, unverified),
    }
}

fn block_type<'a>(b: &'a Value, param: &str) -> Result<(&'a Map<String, Value>, &'a str), ApiError> {
    let obj = as_object(b, param)?;
    let kind = as_str(required(obj, "type", &format!("{param}.type"))?, &format!("{param}.type"))?;
    Ok((obj, kind))
}

fn user_blocks(blocks: &[Value], param: &str, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let mut texts: Vec<ContentPart> = vec![];
    let flush = |texts: &mut Vec<ContentPart>, out: &mut Vec<Message>| {
        if !texts.is_empty() {
            let mut m = Message::new(Role::User, "");
            m.content = Some(text_content(std::mem::take(texts)));
            out.push(m);
        }
    };
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{param}.content.{j}");
        let (obj, kind) = block_type(b, &bp)?;
        match kind {
            "text" => {
                texts.push(text_part(as_str(required(obj, "text", &format!("{bp}.text"))?, &format!("{bp}.text"))?))
            }
            "tool_result" => {
                flush(&mut texts, out);
                out.push(tool_result(obj, &bp)?);
            }
            "image" | "document" | "search_result" | "container_upload" => return Err(unsupported_media(&bp, kind)),
            "tool_use" | "thinking" | "redacted_thinking" | "server_tool_use" => {
                return Err(bad(format!("{bp}.type"), format!("`{kind}` blocks can only appear in assistant messages")))
            }
            other => return Err(bad(format!("{bp}.type"), format!("unsupported content block type `{other}`"))),
        }
    }
    flush(&mut texts, out);
    if blocks.is_empty() {
        out.push(Message::new(Role::User, ""));
    }
    Ok(())
}

fn tool_result(obj: &Map<String, Value>, bp: &str) -> Result<Message, ApiError> {
    let id = as_str(required(obj, "tool_use_id", &format!("{bp}.tool_use_id"))?, &format!("{bp}.tool_use_id"))?;
    let is_error = match get(obj, "is_error") {
        Some(v) => as_bool(v, &format!("{bp}.is_error"))?,
        None => false,
    };
    let mut parts: Vec<ContentPart> = match get(obj, "content") {
        None => vec![],
        Some(Value::String(s)) => vec![text_part(s)],
        Some(Value::Array(items)) => {
            let mut parts = Vec::with_capacity(items.len());
            for (k, item) in items.iter().enumerate() {
                let ip = format!("{bp}.content.{k}");
                let (io, kind) = block_type(item, &ip)?;
                parts.push(match kind {
                    "text" => text_part(as_str(required(io, "text", &format!("{ip}.text"))?, &format!("{ip}.text"))?),
                    // The official encoder writes `[Unsupported <type>]` for these.
                    other => ContentPart { kind: other.to_string(), text: None },
                });
            }
            parts
        }
        Some(other) => {
            return Err(bad(
                format!("{bp}.content"),
                format!("Input should be a string or a list of content blocks, not {}", json_type(other)),
            ))
        }
    };
    if is_error {
        match parts.first_mut() {
            Some(ContentPart { text: Some(t), .. }) => t.insert_str(0, "Error: "),
            _ => parts.insert(0, text_part("Error:")),
        }
    }
    let mut m = Message::new(Role::Tool, "");
    m.content = Some(match parts.len() {
        0 => Content::Text(String::new()),
        _ if parts.iter().all(|p| p.kind == "text") => text_content(parts),
        _ => Content::Parts(parts),
    });
    m.tool_call_id = Some(id.to_string());
    Ok(m)
}

fn assistant_blocks(
    blocks: &[Value],
    param: &str,
    last: bool,
    key: &[u8],
    out: &mut Vec<Message>,
    unverified: &mut usize,
) -> Result<(), ApiError> {
    let mut texts: Vec<ContentPart> = vec![];
    let mut reasoning: Option<String> = None;
    let mut calls: Vec<ToolCall> = vec![];
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{param}.content.{j}");
        let (obj, kind) = block_type(b, &bp)?;
        match kind {
            "text" => {
                texts.push(text_part(as_str(required(obj, "text", &format!("{bp}.text"))?, &format!("{bp}.text"))?))
            }
            "thinking" => {
                let text = as_str(required(obj, "thinking", &format!("{bp}.thinking"))?, &format!("{bp}.thinking"))?;
                let sig = match get(obj, "signature") {
                    Some(s) => as_str(s, &format!("{bp}.signature"))?,
                    None => "",
                };
                if !signature::verify(key, text, sig) {
                    *unverified += 1;
                }
                match &mut reasoning {
                    None => reasoning = Some(text.to_string()),
                    Some(r) => {
                        r.push_str("\n\n");
                        r.push_str(text);
                    }
                }
            }
            "redacted_thinking" => {}
            "tool_use" => {
                let id = as_str(required(obj, "id", &format!("{bp}.id"))?, &format!("{bp}.id"))?;
                let name = as_str(required(obj, "name", &format!("{bp}.name"))?, &format!("{bp}.name"))?;
                let input = required(obj, "input", &format!("{bp}.input"))?;
                as_object(input, &format!("{bp}.input"))?;
                calls.push(ToolCall {
                    id: Some(id.to_string()),
                    kind: Some("function".into()),
                    function: FunctionCall {
                        name: name.to_string(),
                        arguments: Value::String(input.to_string()),
                        id: None,
                    },
                });
            }
            "image" | "document" | "search_result" | "container_upload" => return Err(unsupported_media(&bp, kind)),
            "tool_result" => {
                return Err(bad(format!("{bp}.type"), "`tool_result` blocks can only appear in user messages"))
            }
            other => {
                return Err(bad(
                    format!("{bp}.type"),
                    format!("unsupported content block type `{other}` (this server runs no server tools)"),
                ))
            }
        }
    }
    let mut m = Message::new(Role::Assistant, "");
    m.content = match texts.len() {
        0 => None,
        _ => Some(text_content(texts)),
    };
    m.reasoning_content = reasoning;
    m.tool_calls = (!calls.is_empty()).then_some(calls);
    m.wo_eos = last;
    out.push(m);
    Ok(())
}

fn tool(t: &Value, i: usize, earlier: &[Value]) -> Result<Value, ApiError> {
    let param = format!("tools.{i}");
    let obj = as_object(t, &param)?;
    if let Some(kind) = get(obj, "type") {
        let kind = as_str(kind, &format!("{param}.type"))?;
        if kind != "custom" {
            return Err(bad(
                format!("{param}.type"),
                format!(
                    "the tool type `{kind}` is not supported: this server runs no server tools and knows no \
                     versioned tool schemas; define client tools with `name`, `description` and `input_schema`"
                ),
            ));
        }
    }
    let name = as_str(required(obj, "name", &format!("{param}.name"))?, &format!("{param}.name"))?;
    if name.is_empty() {
        return Err(bad(format!("{param}.name"), "tool names must not be empty"));
    }
    if earlier.iter().any(|e| e["function"]["name"] == name) {
        return Err(bad(format!("{param}.name"), format!("tool names must be unique; `{name}` is defined twice")));
    }
    let schema = required(obj, "input_schema", &format!("{param}.input_schema"))?;
    as_object(schema, &format!("{param}.input_schema"))?;
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.to_string()));
    if let Some(d) = get(obj, "description") {
        function.insert("description".into(), Value::String(as_str(d, &format!("{param}.description"))?.to_string()));
    }
    function.insert("parameters".into(), schema.clone());
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(tc: &Value, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let obj = as_object(tc, "tool_choice")?;
    let kind = as_str(required(obj, "type", "tool_choice.type")?, "tool_choice.type")?;
    if let Some(d) = get(obj, "disable_parallel_tool_use") {
        as_bool(d, "tool_choice.disable_parallel_tool_use")?;
    }
    let choice = match kind {
        "auto" => ToolChoice::Auto,
        "any" => ToolChoice::Required,
        "none" => ToolChoice::None,
        "tool" => {
            let name = as_str(required(obj, "name", "tool_choice.name")?, "tool_choice.name")?;
            if !tools.iter().any(|t| t["function"]["name"] == name) {
                return Err(bad("tool_choice.name", format!("no tool named `{name}` is among the request's `tools`")));
            }
            ToolChoice::Named(name.to_string())
        }
        other => {
            return Err(bad(
                "tool_choice.type",
                format!("Input should be 'auto', 'any', 'tool' or 'none', not '{other}'"),
            ))
        }
    };
    if matches!(choice, ToolChoice::Required) && tools.is_empty() {
        return Err(bad("tool_choice", "tool_choice `any` needs at least one tool in `tools`"));
    }
    Ok(choice)
}

fn thinking(t: &Value) -> Result<Option<bool>, ApiError> {
    let obj = as_object(t, "thinking")?;
    let kind = as_str(required(obj, "type", "thinking.type")?, "thinking.type")?;
    match kind {
        "enabled" => {
            if let Some(b) = get(obj, "budget_tokens") {
                as_count(b, "thinking.budget_tokens")?;
            }
            Ok(Some(true))
        }
        "adaptive" => Ok(Some(true)),
        "disabled" => Ok(Some(false)),
        other => {
            Err(bad("thinking.type", format!("Input should be 'enabled', 'adaptive' or 'disabled', not '{other}'")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_core::chat::Role;

    const KEY: &[u8] = b"test key";

    fn req(body: Value) -> MessagesRequest {
        parse(&body, Endpoint::Messages, KEY).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(body: Value) -> ApiError {
        match parse(&body, Endpoint::Messages, KEY) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    fn base(messages: Value) -> Value {
        json!({"model": "m", "max_tokens": 16, "messages": messages})
    }

    fn with(mut body: Value, key: &str, v: Value) -> Value {
        body[key] = v;
        body
    }

    fn text(m: &Message) -> String {
        match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(p)) => p
                .iter()
                .map(|p| p.text.clone().unwrap_or_else(|| format!("[{}]", p.kind)))
                .collect::<Vec<_>>()
                .join("|"),
        }
    }

    #[test]
    fn strings_and_text_blocks() {
        let r = req(base(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                                         {"type": "text", "text": "b"}]},
        ])));
        let m = &r.conversation.messages;
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].role, text(&m[0])), (Role::User, "hi".into()));
        assert_eq!((m[1].role, text(&m[1])), (Role::Assistant, "hello".into()));
        assert!(!m[1].wo_eos);
        assert_eq!((m[2].role, text(&m[2])), (Role::User, "a|b".into()));
        assert_eq!(r.model, "m");
        assert_eq!(r.params.max_tokens, Some(16));
        assert!(!r.stream);
    }

    #[test]
    fn system_forms() {
        let r = req(with(base(json!([{"role": "user", "content": "x"}])), "system", json!("be brief")));
        assert_eq!(
            (r.conversation.messages[0].role, text(&r.conversation.messages[0])),
            (Role::System, "be brief".into())
        );
        let r = req(with(
            base(json!([{"role": "user", "content": "x"}])),
            "system",
            json!([{"type": "text", "text": "one"}, {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}}]),
        ));
        assert_eq!(text(&r.conversation.messages[0]), "one|two");
        let r = req(with(
            base(json!([{"role": "user", "content": "x"}])),
            "system",
            json!([{"type": "text", "text": "solo"}]),
        ));
        assert_eq!(r.conversation.messages[0].content, Some(Content::Text("solo".into())));
        let e = err(with(base(json!([{"role": "user", "content": "x"}])), "system", json!([{"type": "image"}])));
        assert_eq!(e.param.as_deref(), Some("system.0.type"));
        let e = err(with(base(json!([{"role": "user", "content": "x"}])), "system", json!(3)));
        assert_eq!(e.param.as_deref(), Some("system"));
        // No system: none is made up.
        assert_eq!(req(base(json!([{"role": "user", "content": "x"}]))).conversation.messages.len(), 1);
    }

    #[test]
    fn tool_use_and_tool_results() {
        let r = req(base(json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                 "content": [{"type": "text", "text": "clock broken"}]},
                {"type": "text", "text": "thanks"},
            ]},
        ])));
        let m = &r.conversation.messages;
        assert_eq!(m.len(), 5, "{m:?}");
        let calls = m[1].tool_calls.as_ref().unwrap();
        assert_eq!(text(&m[1]), "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].id.as_deref(), Some("toolu_1"));
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, Value::String(r#"{"city":"Paris","days":2}"#.into()));
        assert_eq!(calls[1].function.arguments, Value::String("{}".into()));
        assert_eq!(
            (m[2].role, m[2].tool_call_id.as_deref(), text(&m[2])),
            (Role::Tool, Some("toolu_1"), "sunny".into())
        );
        assert_eq!(
            (m[3].role, m[3].tool_call_id.as_deref(), text(&m[3])),
            (Role::Tool, Some("toolu_2"), "Error: clock broken".into())
        );
        assert_eq!((m[4].role, text(&m[4])), (Role::User, "thanks".into()));
    }

    #[test]
    fn tool_result_content_forms() {
        let one = |content: Value| {
            let r = req(base(json!([
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": content}]},
            ])));
            r.conversation.messages[1].clone()
        };
        assert_eq!(text(&one(Value::Null)), "");
        assert_eq!(text(&one(json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]))), "a|b");
        // Images in tool results are rendered as the official encoder does: `[Unsupported image]`.
        let m = one(json!([{"type": "text", "text": "a"}, {"type": "image", "source": {}}]));
        assert_eq!(text(&m), "a|[image]");
        let r = req(base(json!([
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": true}]},
        ])));
        assert_eq!(text(&r.conversation.messages[0]), "Error:");
        let e = err(base(json!([{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}])));
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.tool_use_id"));
        assert_eq!(e.message, "Field required");
    }

    #[test]
    fn thinking_blocks_verified_or_not_become_reasoning() {
        let good = signature::sign(KEY, "I think.");
        let r = req(base(json!([
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I think.", "signature": good},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "A."},
            ]},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Edited.", "signature": good},
                {"type": "thinking", "thinking": "More.", "signature": ""},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]},
        ])));
        let m = &r.conversation.messages;
        assert_eq!(m[1].reasoning_content.as_deref(), Some("I think."));
        assert_eq!(text(&m[1]), "A.");
        assert_eq!(m[3].reasoning_content.as_deref(), Some("Edited.\n\nMore."));
        assert_eq!(m[3].content, None);
        assert_eq!(r.unverified_thinking, 2);
        let e =
            err(base(json!([{"role": "user", "content": [{"type": "thinking", "thinking": "x", "signature": ""}]}])));
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.type"));
    }

    #[test]
    fn a_final_assistant_turn_is_a_prefill() {
        let r = req(base(json!([
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "The colour is"},
        ])));
        assert!(r.conversation.messages[1].wo_eos);
        let r = req(base(json!([
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "The"}]},
        ])));
        assert!(r.conversation.messages[1].wo_eos);
    }

    #[test]
    fn images_and_unknown_blocks_are_clear_400s() {
        let e = err(base(json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        ]}])));
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages.0.content.1"));
        assert!(e.message.contains("images are not supported"), "{}", e.message);
        let e = err(base(json!([{"role": "user", "content": [{"type": "document", "source": {}}]}])));
        assert!(e.message.contains("documents are not supported"), "{}", e.message);
        let e = err(base(json!([{"role": "user", "content": [{"type": "video"}]}])));
        assert!(e.message.contains("`video`"), "{}", e.message);
        let e = err(base(json!([{"role": "assistant", "content": [{"type": "server_tool_use", "id": "x"}]}])));
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.type"));
        let e = err(base(json!([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}])));
        assert!(e.message.contains("user messages"), "{}", e.message);
        let e = err(base(
            json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": "s"}]}]),
        ));
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.input"));
    }

    #[test]
    fn malformed_messages() {
        assert_eq!(err(base(json!([]))).param.as_deref(), Some("messages"));
        assert_eq!(err(base(json!("hi"))).param.as_deref(), Some("messages"));
        assert_eq!(err(base(json!([{"role": "system", "content": "x"}]))).param.as_deref(), Some("messages.0.role"));
        assert_eq!(err(base(json!([{"role": "user"}]))).param.as_deref(), Some("messages.0.content"));
        assert_eq!(err(base(json!([{"role": "user", "content": 5}]))).param.as_deref(), Some("messages.0.content"));
        assert_eq!(
            err(base(json!([{"role": "user", "content": [{"text": "x"}]}]))).param.as_deref(),
            Some("messages.0.content.0.type")
        );
        assert_eq!(
            err(base(json!([{"role": "user", "content": [{"type": "text"}]}]))).param.as_deref(),
            Some("messages.0.content.0.text")
        );
        assert_eq!(err(json!([1])).param, None);
    }

    #[test]
    fn tools_and_tool_choice() {
        let tools = json!([
            {"name": "get_weather", "description": "Weather of a city",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
             "cache_control": {"type": "ephemeral"}},
            {"type": "custom", "name": "noop", "input_schema": {"type": "object"}},
        ]);
        let body = with(base(json!([{"role": "user", "content": "x"}])), "tools", tools);
        let r = req(body.clone());
        assert_eq!(
            r.conversation.tools[0],
            json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
        );
        // Key order is what the encoder prints: name, description, parameters.
        let keys: Vec<_> = r.conversation.tools[0]["function"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["name", "description", "parameters"]);
        assert_eq!(
            r.conversation.tools[1],
            json!({"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}})
        );
        assert_eq!(r.conversation.tool_choice, ToolChoice::Auto);
        let choice = |tc: Value| {
            parse(&with(body.clone(), "tool_choice", tc), Endpoint::Messages, KEY).map(|r| r.conversation.tool_choice)
        };
        assert_eq!(choice(json!({"type": "auto"})).unwrap(), ToolChoice::Auto);
        assert_eq!(choice(json!({"type": "auto", "disable_parallel_tool_use": true})).unwrap(), ToolChoice::Auto);
        assert_eq!(choice(json!({"type": "any"})).unwrap(), ToolChoice::Required);
        assert_eq!(choice(json!({"type": "none"})).unwrap(), ToolChoice::None);
        assert_eq!(choice(json!({"type": "tool", "name": "noop"})).unwrap(), ToolChoice::Named("noop".into()));
        assert_eq!(
            choice(json!({"type": "tool", "name": "nope"})).unwrap_err().param.as_deref(),
            Some("tool_choice.name")
        );
        assert_eq!(choice(json!({"type": "tool"})).unwrap_err().param.as_deref(), Some("tool_choice.name"));
        assert_eq!(choice(json!({"type": "required"})).unwrap_err().param.as_deref(), Some("tool_choice.type"));
        assert_eq!(choice(json!("auto")).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(
            choice(json!({"type": "auto", "disable_parallel_tool_use": "yes"})).unwrap_err().param.as_deref(),
            Some("tool_choice.disable_parallel_tool_use")
        );
        // `any` without tools.
        let e = err(with(base(json!([{"role": "user", "content": "x"}])), "tool_choice", json!({"type": "any"})));
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn bad_tools() {
        let t = |tools: Value| err(with(base(json!([{"role": "user", "content": "x"}])), "tools", tools));
        let e = t(json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]));
        assert_eq!(e.param.as_deref(), Some("tools.0.type"));
        assert!(e.message.contains("web_search_20250305"), "{}", e.message);
        assert_eq!(t(json!([{"input_schema": {}}])).param.as_deref(), Some("tools.0.name"));
        assert_eq!(t(json!([{"name": "f"}])).param.as_deref(), Some("tools.0.input_schema"));
        assert_eq!(t(json!([{"name": "f", "input_schema": []}])).param.as_deref(), Some("tools.0.input_schema"));
        assert_eq!(
            t(json!([{"name": "f", "input_schema": {}}, {"name": "f", "input_schema": {}}])).param.as_deref(),
            Some("tools.1.name")
        );
        assert_eq!(t(json!({"name": "f"})).param.as_deref(), Some("tools"));
    }

    #[test]
    fn thinking_forms() {
        let body = base(json!([{"role": "user", "content": "x"}]));
        let th = |t: Value| {
            parse(&with(body.clone(), "thinking", t), Endpoint::Messages, KEY).map(|r| r.conversation.thinking)
        };
        assert_eq!(req(body.clone()).conversation.thinking, None);
        assert_eq!(th(json!({"type": "enabled", "budget_tokens": 2048})).unwrap(), Some(true));
        assert_eq!(th(json!({"type": "enabled"})).unwrap(), Some(true));
        assert_eq!(th(json!({"type": "adaptive"})).unwrap(), Some(true));
        assert_eq!(th(json!({"type": "disabled"})).unwrap(), Some(false));
        assert_eq!(
            th(json!({"type": "enabled", "budget_tokens": -1})).unwrap_err().param.as_deref(),
            Some("thinking.budget_tokens")
        );
        assert_eq!(th(json!({"type": "on"})).unwrap_err().param.as_deref(), Some("thinking.type"));
        assert_eq!(th(json!(true)).unwrap_err().param.as_deref(), Some("thinking"));
    }

    #[test]
    fn efforts() {
        let body = base(json!([{"role": "user", "content": "x"}]));
        let effort = |e: &str| {
            parse(&with(body.clone(), "output_config", json!({"effort": e})), Endpoint::Messages, KEY)
                .map(|r| r.conversation.effort)
        };
        for (s, e) in [
            ("low", Effort::Low),
            ("medium", Effort::Medium),
            ("high", Effort::High),
            ("max", Effort::Max),
            ("none", Effort::None),
            ("minimal", Effort::Minimal),
            ("xhigh", Effort::XHigh),
            ("HIGH", Effort::High),
        ] {
            assert_eq!(effort(s).unwrap(), Some(e), "{s}");
        }
        let e = effort("ultra").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("output_config.effort"));
        assert_eq!(req(with(body.clone(), "output_config", json!({}))).conversation.effort, None);
        let e = err(with(body.clone(), "output_config", json!({"format": {"type": "json_schema", "schema": {}}})));
        assert_eq!(e.param.as_deref(), Some("output_config.format"));
    }

    #[test]
    fn sampling_and_limits() {
        let body = base(json!([{"role": "user", "content": "x"}]));
        let r = req(json!({
            "model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "x"}],
            "stop_sequences": ["END", "\n\n"], "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stream": true,
            "metadata": {"user_id": "u"}, "service_tier": "auto", "anthropic_beta": ["x"], "container": null,
        }));
        assert_eq!(r.params.max_tokens, Some(7));
        assert_eq!(r.params.stop, ["END", "\n\n"]);
        assert_eq!((r.params.temperature, r.params.top_p, r.params.top_k), (Some(0.5), Some(0.9), Some(40)));
        assert!(r.stream);
        let param = |k: &str, v: Value| err(with(body.clone(), k, v)).param;
        assert_eq!(param("max_tokens", json!(0)).as_deref(), Some("max_tokens"));
        assert_eq!(param("max_tokens", json!(-3)).as_deref(), Some("max_tokens"));
        // 0 and negative counts get the same message.
        for n in [json!(0), json!(-3), json!(-0.5)] {
            assert_eq!(err(with(body.clone(), "max_tokens", n)).message, "Input should be greater than or equal to 1");
        }
        assert_eq!(param("max_tokens", json!(1.5)).as_deref(), Some("max_tokens"));
        assert_eq!(param("max_tokens", json!("8")).as_deref(), Some("max_tokens"));
        assert_eq!(param("temperature", json!(2.5)).as_deref(), Some("temperature"));
        assert_eq!(param("temperature", json!("hot")).as_deref(), Some("temperature"));
        assert_eq!(param("top_p", json!(0)).as_deref(), Some("top_p"));
        assert_eq!(param("top_k", json!(1.5)).as_deref(), Some("top_k"));
        assert_eq!(param("stream", json!("yes")).as_deref(), Some("stream"));
        assert_eq!(param("stop_sequences", json!([1])).as_deref(), Some("stop_sequences.0"));
        assert_eq!(param("metadata", json!(1)).as_deref(), Some("metadata"));
        let mut missing = body.clone();
        missing.as_object_mut().unwrap().remove("max_tokens");
        let e = err(missing);
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("max_tokens"), "Field required"));
        let mut missing = body.clone();
        missing.as_object_mut().unwrap().remove("model");
        assert_eq!(err(missing).param.as_deref(), Some("model"));
    }

    #[test]
    fn count_tokens_needs_no_max_tokens() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ignored",
                          "thinking": {"type": "disabled"}});
        let r = parse(&body, Endpoint::CountTokens, KEY).unwrap();
        assert_eq!(r.params.max_tokens, None);
        assert_eq!(r.conversation.thinking, Some(false));
    }
}
