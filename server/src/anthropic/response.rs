//! A reply in Anthropic's shapes: the `message` object of a non-streaming answer and the
//! server-sent events of a streaming one, both built by one [`MessageAssembler`] from the
//! protocol-neutral [`Delta`]s and [`Finish`], so the two always carry the same content.
//!
//! The stream follows Anthropic's "Streaming Messages" guide (docs.claude.com/en/docs/
//! build-with-claude/streaming): `message_start` (the message with empty `content` and the
//! prompt's `usage`), then for each content block `content_block_start`, its
//! `content_block_delta`s and `content_block_stop`, then `message_delta` (`stop_reason`,
//! `stop_sequence`, cumulative `usage`) and `message_stop`; `ping` may come anywhere, and an
//! error after the stream has begun is an `error` event, after which the stream ends. The
//! deltas are `thinking_delta` then one `signature_delta` just before a thinking block closes
//! ("Extended thinking", "Streaming thinking"), `text_delta`, and `input_json_delta` with
//! `partial_json` for `tool_use` blocks ("Tool use", "Fine-grained tool streaming": clients
//! concatenate the pieces and parse the result when the block stops). dsv4's parser yields a
//! tool call only once it is complete, so its input comes as one `input_json_delta`.

use serde_json::{json, Value};

use crate::conversation::{Delta, Finish, FinishReason, UsageCounts};
use crate::error::ApiError;
use crate::signature;

/// One server-sent event: its `event:` name and `data:` JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: &'static str,
    pub data: Value,
}

impl SseEvent {
    fn new(event: &'static str, data: Value) -> Self {
        SseEvent { event, data }
    }

    /// `event: <name>\ndata: <json>\n\n`. The JSON is written on one line (serde_json escapes
    /// newlines inside strings), so it is one `data:` field.
    pub fn to_sse(&self) -> String {
        format!("event: {}\ndata: {}\n\n", self.event, self.data)
    }

    /// A `ping` event (keeps idle connections open while the prompt is computed).
    pub fn ping() -> Self {
        SseEvent::new("ping", json!({"type": "ping"}))
    }

    /// An `error` event: `{"type": "error", "error": {"type", "message"}}`.
    pub fn error(e: &ApiError) -> Self {
        SseEvent::new("error", super::error_json(e))
    }
}

/// `stop_reason` and `stop_sequence` of a finish.
pub fn stop_reason(reason: &FinishReason) -> (&'static str, Value) {
    match reason {
        FinishReason::EndOfTurn => ("end_turn", Value::Null),
        FinishReason::StopString(s) => ("stop_sequence", Value::String(s.clone())),
        FinishReason::Length => ("max_tokens", Value::Null),
        FinishReason::ToolCalls => ("tool_use", Value::Null),
    }
}

/// Anthropic's `usage`: `input_tokens` counts the prompt tokens that were computed, and
/// `cache_read_input_tokens` those served from the prefix cache (their sum is the prompt;
/// Anthropic's "Prompt caching" guide); dsv4 caches without being asked, so
/// `cache_creation_input_tokens` is 0.
pub fn usage(u: &UsageCounts) -> Value {
    let cached = u.cached_tokens.min(u.prompt_tokens);
    json!({
        "input_tokens": u.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.completion_tokens,
    })
}

/// The input of a tool call: the arguments' JSON object, or, when the model wrote arguments
/// that are not one, `{"arguments": <text>}` (the fallback the official encoder applies the
/// other way round, so the call renders back the same).
pub fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"arguments": arguments}),
    }
}

/// The content block being streamed.
#[derive(Debug)]
enum Open {
    Thinking { text: String },
    Text { text: String },
}

/// Builds an Anthropic message from a reply, as SSE events and as the final `message` object.
pub struct MessageAssembler {
    id: String,
    model: String,
    signing_key: Vec<u8>,
    new_tool_id: Box<dyn FnMut() -> String + Send>,
    /// Closed blocks, as they appear in the message's `content`.
    blocks: Vec<Value>,
    open: Option<Open>,
}

impl MessageAssembler {
    /// `id` (`msg_…`) and `model` are echoed in the message; thinking blocks are signed with
    /// `signing_key`; `new_tool_id` makes the `toolu_…` id of each tool call.
    pub fn new(
        id: String,
        model: String,
        signing_key: Vec<u8>,
        new_tool_id: Box<dyn FnMut() -> String + Send>,
    ) -> Self {
        MessageAssembler { id, model, signing_key, new_tool_id, blocks: vec![], open: None }
    }

    /// The `message_start` event: the message with no content yet, `usage.input_tokens` the
    /// prompt's length (the prefix-cache split is only known at the end: `message_delta`
    /// carries the final `usage`).
    pub fn start(&self, prompt_tokens: usize) -> SseEvent {
        let u = UsageCounts { prompt_tokens, ..Default::default() };
        SseEvent::new(
            "message_start",
            json!({"type": "message_start", "message": self.message_json(vec![], Value::Null, Value::Null, &u)}),
        )
    }

    /// The events one delta completes (none for empty text and for log-probabilities, which
    /// Anthropic's API does not have).
    pub fn push(&mut self, delta: Delta) -> Vec<SseEvent> {
        let mut out = vec![];
        match delta {
            Delta::Reasoning(t) if !t.is_empty() => {
                if !matches!(self.open, Some(Open::Thinking { .. })) {
                    self.close(&mut out);
                    out.push(self.block_start(json!({"type": "thinking", "thinking": "", "signature": ""})));
                    self.open = Some(Open::Thinking { text: String::new() });
                }
                out.push(self.block_delta(json!({"type": "thinking_delta", "thinking": t})));
                if let Some(Open::Thinking { text }) = &mut self.open {
                    text.push_str(&t);
                }
            }
            Delta::Content(t) if !t.is_empty() => {
                if !matches!(self.open, Some(Open::Text { .. })) {
                    self.close(&mut out);
                    out.push(self.block_start(json!({"type": "text", "text": ""})));
                    self.open = Some(Open::Text { text: String::new() });
                }
                out.push(self.block_delta(json!({"type": "text_delta", "text": t})));
                if let Some(Open::Text { text }) = &mut self.open {
                    text.push_str(&t);
                }
            }
            Delta::ToolCall { name, arguments, .. } => {
                self.close(&mut out);
                let id = (self.new_tool_id)();
                let input = tool_input(&arguments);
                out.push(self.block_start(json!({"type": "tool_use", "id": id, "name": name, "input": {}})));
                out.push(self.block_delta(json!({"type": "input_json_delta", "partial_json": input.to_string()})));
                out.push(self.block_stop());
                self.blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
            }
            Delta::Reasoning(_) | Delta::Content(_) | Delta::Logprobs(_) => {}
        }
        out
    }

    /// The last events: the open block's close, `message_delta` and `message_stop`.
    pub fn finish(&mut self, finish: &Finish) -> Vec<SseEvent> {
        let mut out = vec![];
        self.close(&mut out);
        let (reason, sequence) = stop_reason(&finish.reason);
        out.push(SseEvent::new(
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage(&finish.usage),
            }),
        ));
        out.push(SseEvent::new("message_stop", json!({"type": "message_stop"})));
        out
    }

    /// The whole message (non-streaming answer), after [`finish`](Self::finish).
    pub fn message(mut self, finish: &Finish) -> Value {
        let mut ignored = vec![];
        self.close(&mut ignored);
        let (reason, sequence) = stop_reason(&finish.reason);
        let blocks = std::mem::take(&mut self.blocks);
        self.message_json(blocks, Value::String(reason.into()), sequence, &finish.usage)
    }

    fn message_json(&self, content: Vec<Value>, stop_reason: Value, stop_sequence: Value, u: &UsageCounts) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage(u),
        })
    }

    /// Index of the next block to open, or of the open one.
    fn index(&self) -> usize {
        self.blocks.len()
    }

    fn block_start(&self, block: Value) -> SseEvent {
        SseEvent::new(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index(), "content_block": block}),
        )
    }

    fn block_delta(&self, delta: Value) -> SseEvent {
        SseEvent::new(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index(), "delta": delta}),
        )
    }

    fn block_stop(&self) -> SseEvent {
        SseEvent::new("content_block_stop", json!({"type": "content_block_stop", "index": self.index()}))
    }

    /// Closes the open block: a thinking block gets its `signature_delta` first.
    fn close(&mut self, out: &mut Vec<SseEvent>) {
        match self.open.take() {
            None => {}
            Some(Open::Thinking { text }) => {
                let sig = signature::sign(&self.signing_key, &text);
                out.push(self.block_delta(json!({"type": "signature_delta", "signature": sig})));
                out.push(self.block_stop());
                self.blocks.push(json!({"type": "thinking", "thinking": text, "signature": sig}));
            }
            Some(Open::Text { text }) => {
                out.push(self.block_stop());
                self.blocks.push(json!({"type": "text", "text": text}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const KEY: &[u8] = b"k";

    fn assembler() -> MessageAssembler {
        let mut n = 0;
        MessageAssembler::new(
            "msg_test".into(),
            "deepseek-v4".into(),
            KEY.to_vec(),
            Box::new(move || {
                n += 1;
                format!("toolu_{n}")
            }),
        )
    }

    fn finish(reason: FinishReason) -> Finish {
        Finish {
            reason,
            usage: UsageCounts { prompt_tokens: 20, cached_tokens: 8, completion_tokens: 9, reasoning_tokens: 3 },
        }
    }

    /// The events of a whole reply, one line each: the event name, then the block index and
    /// the block or delta type where there is one.
    fn outline(events: &[SseEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let d = &e.data;
                assert_eq!(d["type"], e.event, "the data's type is the event name");
                let mut line = e.event.to_string();
                if let Some(i) = d.get("index") {
                    line.push_str(&format!(" {i}"));
                }
                for k in ["content_block", "delta"] {
                    if let Some(t) = d.get(k).and_then(|b| b.get("type")).and_then(Value::as_str) {
                        line.push_str(&format!(" {t}"));
                    }
                }
                line
            })
            .collect()
    }

    fn run(deltas: Vec<Delta>, reason: FinishReason) -> (Vec<SseEvent>, Value) {
        let mut a = assembler();
        let mut events = vec![a.start(20)];
        for d in deltas {
            events.extend(a.push(d));
        }
        let f = finish(reason);
        events.extend(a.finish(&f));
        (events, a.message(&f))
    }

    /// Folds a stream the way Anthropic's SDKs do (`MessageStream`'s accumulator): the result
    /// must equal the non-streaming message.
    fn accumulate(events: &[SseEvent]) -> Value {
        let mut msg = Value::Null;
        for e in events {
            let d = &e.data;
            match e.event {
                "message_start" => msg = d["message"].clone(),
                "content_block_start" => {
                    let i = d["index"].as_u64().unwrap() as usize;
                    let content = msg["content"].as_array_mut().unwrap();
                    assert_eq!(content.len(), i, "blocks open in order");
                    content.push(d["content_block"].clone());
                }
                "content_block_delta" => {
                    let i = d["index"].as_u64().unwrap() as usize;
                    let b = &mut msg["content"][i];
                    let delta = &d["delta"];
                    match delta["type"].as_str().unwrap() {
                        "text_delta" => {
                            b["text"] =
                                format!("{}{}", b["text"].as_str().unwrap(), delta["text"].as_str().unwrap()).into()
                        }
                        "thinking_delta" => {
                            b["thinking"] =
                                format!("{}{}", b["thinking"].as_str().unwrap(), delta["thinking"].as_str().unwrap())
                                    .into()
                        }
                        "signature_delta" => b["signature"] = delta["signature"].clone(),
                        "input_json_delta" => {
                            let so_far = b.get("partial").and_then(Value::as_str).unwrap_or("").to_string();
                            b["partial"] = format!("{so_far}{}", delta["partial_json"].as_str().unwrap()).into();
                        }
                        other => panic!("unknown delta {other}"),
                    }
                }
                "content_block_stop" => {
                    let i = d["index"].as_u64().unwrap() as usize;
                    let b = msg["content"][i].as_object_mut().unwrap();
                    if let Some(p) = b.remove("partial") {
                        b.insert("input".into(), serde_json::from_str(p.as_str().unwrap()).unwrap());
                    }
                }
                "message_delta" => {
                    msg["stop_reason"] = d["delta"]["stop_reason"].clone();
                    msg["stop_sequence"] = d["delta"]["stop_sequence"].clone();
                    for (k, v) in d["usage"].as_object().unwrap() {
                        msg["usage"][k] = v.clone();
                    }
                }
                "message_stop" | "ping" => {}
                other => panic!("unexpected event {other}"),
            }
        }
        msg
    }

    #[test]
    fn thinking_text_and_tool_use_stream_in_order() {
        let (events, message) = run(
            vec![
                Delta::Reasoning("The user wants ".into()),
                Delta::Logprobs(vec![]),
                Delta::Reasoning("the weather.".into()),
                Delta::Content("Checking".into()),
                Delta::Content("".into()),
                Delta::Content(" now.".into()),
                Delta::ToolCall { index: 0, name: "get_weather".into(), arguments: r#"{"city": "Paris"}"#.into() },
                Delta::ToolCall { index: 1, name: "get_time".into(), arguments: "{}".into() },
            ],
            FinishReason::ToolCalls,
        );
        assert_eq!(
            outline(&events),
            [
                "message_start",
                "content_block_start 0 thinking",
                "content_block_delta 0 thinking_delta",
                "content_block_delta 0 thinking_delta",
                "content_block_delta 0 signature_delta",
                "content_block_stop 0",
                "content_block_start 1 text",
                "content_block_delta 1 text_delta",
                "content_block_delta 1 text_delta",
                "content_block_stop 1",
                "content_block_start 2 tool_use",
                "content_block_delta 2 input_json_delta",
                "content_block_stop 2",
                "content_block_start 3 tool_use",
                "content_block_delta 3 input_json_delta",
                "content_block_stop 3",
                "message_delta",
                "message_stop",
            ]
        );
        let sig = signature::sign(KEY, "The user wants the weather.");
        assert_eq!(
            message,
            json!({
                "id": "msg_test", "type": "message", "role": "assistant", "model": "deepseek-v4",
                "content": [
                    {"type": "thinking", "thinking": "The user wants the weather.", "signature": sig},
                    {"type": "text", "text": "Checking now."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8,
                          "output_tokens": 9},
            })
        );
        assert_eq!(accumulate(&events), message, "the stream folds into the non-streaming message");
        // The wire form of the whole stream.
        let wire: String = events.iter().map(SseEvent::to_sse).collect();
        insta::assert_snapshot!("thinking_text_tool_use_stream", wire);
    }

    #[test]
    fn message_start_has_empty_content_and_the_prompt_length() {
        let a = assembler();
        let e = a.start(42);
        assert_eq!(
            e.data,
            json!({"type": "message_start", "message": {
                "id": "msg_test", "type": "message", "role": "assistant", "model": "deepseek-v4", "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 42, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                          "output_tokens": 0}}})
        );
    }

    #[test]
    fn stop_reasons() {
        let (events, message) = run(vec![Delta::Content("Hi".into())], FinishReason::StopString("END".into()));
        assert_eq!(message["stop_reason"], "stop_sequence");
        assert_eq!(message["stop_sequence"], "END");
        let delta = &events.iter().find(|e| e.event == "message_delta").unwrap().data;
        assert_eq!(delta["delta"], json!({"stop_reason": "stop_sequence", "stop_sequence": "END"}));
        assert_eq!(run(vec![], FinishReason::Length).1["stop_reason"], "max_tokens");
        assert_eq!(run(vec![], FinishReason::EndOfTurn).1["stop_reason"], "end_turn");
    }

    #[test]
    fn an_empty_reply_has_no_blocks() {
        let (events, message) = run(vec![Delta::Content(String::new())], FinishReason::EndOfTurn);
        assert_eq!(outline(&events), ["message_start", "message_delta", "message_stop"]);
        assert_eq!(message["content"], json!([]));
    }

    #[test]
    fn thinking_only_and_text_after_a_tool_call() {
        let (events, message) = run(
            vec![
                Delta::Reasoning("hmm".into()),
                Delta::ToolCall { index: 0, name: "f".into(), arguments: "not json".into() },
                Delta::Content("after".into()),
            ],
            FinishReason::ToolCalls,
        );
        assert_eq!(
            outline(&events),
            [
                "message_start",
                "content_block_start 0 thinking",
                "content_block_delta 0 thinking_delta",
                "content_block_delta 0 signature_delta",
                "content_block_stop 0",
                "content_block_start 1 tool_use",
                "content_block_delta 1 input_json_delta",
                "content_block_stop 1",
                "content_block_start 2 text",
                "content_block_delta 2 text_delta",
                "content_block_stop 2",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(message["content"][1]["input"], json!({"arguments": "not json"}));
        assert_eq!(accumulate(&events), message);
    }

    #[test]
    fn signatures_verify_under_the_key() {
        let (_, message) = run(vec![Delta::Reasoning("a\nb \"c\"".into())], FinishReason::EndOfTurn);
        let block = &message["content"][0];
        assert!(signature::verify(KEY, block["thinking"].as_str().unwrap(), block["signature"].as_str().unwrap()));
    }

    #[test]
    fn sse_wire_format() {
        let e = SseEvent::new(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "a\nb"}}),
        );
        assert_eq!(
            e.to_sse(),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\\nb\"}}\n\n"
        );
        assert_eq!(SseEvent::ping().to_sse(), "event: ping\ndata: {\"type\":\"ping\"}\n\n");
        let err = SseEvent::error(&ApiError::new(ErrorKind::Overloaded, "busy"));
        assert_eq!(err.to_sse(), "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n");
    }
}
