//! The Anthropic Messages API over HTTP: the tests' in-process server (`common`: 127.0.0.1:0,
//! `builtin:tiny` on the CPU backend, random weights, the byte-fallback tokenizer).
//! What the model says is noise; what is checked is the protocol: shapes, event order, that a
//! stream folds into the same message as the non-streaming answer, that the request reaches
//! the encoder as it should (token counts against `/tokenize` for the same conversation in
//! OpenAI form), and the errors.

use dsv4_server::signature;
use serde_json::{json, Value};

mod common;
use common::{metric, open_stream, post_raw, shared, start, wait_until_idle, Options, MODEL};

/// POSTs `body` to the shared server, as Anthropic's SDKs do (with `anthropic-version`);
/// returns the status and the JSON answer.
fn post(path: &str, body: &Value) -> (u16, Value) {
    let r = post_raw(shared(), path, &body.to_string(), &[("anthropic-version", "2023-06-01")]);
    (r.status, r.json())
}

/// Whether `sig` is the shared server's signature of `text`.
fn signed(text: &str, sig: &str) -> bool {
    signature::verify(&shared().state.signing_key, text, sig)
}

/// Checks `v` is an Anthropic error of `kind`; returns its message.
fn anthropic_error(v: &Value, kind: &str) -> String {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["type", "error"], "{v}");
    v["error"]["message"].as_str().expect("a message").to_string()
}

fn request(messages: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": messages})
}

fn with(mut v: Value, key: &str, x: Value) -> Value {
    v[key] = x;
    v
}

/// Parses an SSE body into (event, data) pairs, checking the framing.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    assert!(text.ends_with("\n\n"), "the stream ends with a blank line: {text:?}");
    text.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|chunk| {
            let mut lines = chunk.lines();
            let event = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .unwrap_or_else(|| panic!("no event line: {chunk:?}"));
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("no data line: {chunk:?}"));
            assert!(lines.next().is_none(), "one event, one data line: {chunk:?}");
            let data: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(data["type"], event, "the data's type is the event name");
            (event.to_string(), data)
        })
        .collect()
}

/// Checks the event order of a whole stream and folds it into the message it describes, the
/// way Anthropic's SDKs do.
fn fold_stream(events: &[(String, Value)]) -> Value {
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).filter(|e| *e != "ping").collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"], "{names:?}");
    let mut msg = Value::Null;
    // The open block's index and type, and the type of its last delta.
    let mut open: Option<(usize, String, Option<String>)> = None;
    let mut partial_json = String::new();
    for (event, d) in events {
        match event.as_str() {
            "ping" => {}
            "message_start" => {
                msg = d["message"].clone();
                assert_eq!(msg["content"], json!([]));
                assert_eq!(msg["stop_reason"], Value::Null);
            }
            "content_block_start" => {
                assert!(open.is_none(), "a block starts while another is open");
                let i = d["index"].as_u64().unwrap() as usize;
                assert_eq!(i, msg["content"].as_array().unwrap().len(), "blocks are numbered in order");
                let kind = d["content_block"]["type"].as_str().unwrap().to_string();
                assert!(["thinking", "text", "tool_use"].contains(&kind.as_str()), "{kind}");
                msg["content"].as_array_mut().unwrap().push(d["content_block"].clone());
                open = Some((i, kind, None));
                partial_json.clear();
            }
            "content_block_delta" => {
                let (i, kind, last) = open.as_mut().expect("a delta outside a block");
                assert_eq!(d["index"], *i);
                let delta = &d["delta"];
                let dt = delta["type"].as_str().unwrap();
                let b = &mut msg["content"][*i];
                match (kind.as_str(), dt) {
                    ("thinking", "thinking_delta") => {
                        assert_ne!(last.as_deref(), Some("signature_delta"), "thinking after the signature");
                        b["thinking"] =
                            format!("{}{}", b["thinking"].as_str().unwrap(), delta["thinking"].as_str().unwrap())
                                .into();
                    }
                    ("thinking", "signature_delta") => b["signature"] = delta["signature"].clone(),
                    ("text", "text_delta") => {
                        b["text"] = format!("{}{}", b["text"].as_str().unwrap(), delta["text"].as_str().unwrap()).into()
                    }
                    ("tool_use", "input_json_delta") => partial_json.push_str(delta["partial_json"].as_str().unwrap()),
                    other => panic!("delta {other:?} in the wrong block"),
                }
                *last = Some(dt.to_string());
            }
            "content_block_stop" => {
                let (i, kind, last) = open.take().expect("a stop outside a block");
                assert_eq!(d["index"], i);
                if kind == "thinking" {
                    assert_eq!(last.as_deref(), Some("signature_delta"), "a thinking block closes after its signature");
                }
                if kind == "tool_use" {
                    msg["content"][i]["input"] = serde_json::from_str(&partial_json).expect("the input is JSON");
                }
            }
            "message_delta" => {
                assert!(open.is_none(), "message_delta with a block open");
                msg["stop_reason"] = d["delta"]["stop_reason"].clone();
                msg["stop_sequence"] = d["delta"]["stop_sequence"].clone();
                for (k, v) in d["usage"].as_object().unwrap() {
                    msg["usage"][k] = v.clone();
                }
            }
            "message_stop" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    msg
}

/// Checks the shape of a non-streaming message.
fn check_message(m: &Value) {
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], MODEL);
    assert!(
        ["end_turn", "max_tokens", "stop_sequence", "tool_use"].contains(&m["stop_reason"].as_str().unwrap()),
        "{m}"
    );
    let u = &m["usage"];
    for k in ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"] {
        assert!(u[k].is_u64(), "usage.{k}: {m}");
    }
    for b in m["content"].as_array().unwrap() {
        match b["type"].as_str().unwrap() {
            "thinking" => {
                // Signed with the server's key.
                assert!(signed(b["thinking"].as_str().unwrap(), b["signature"].as_str().unwrap()), "{b}");
            }
            "text" => assert!(b["text"].is_string()),
            "tool_use" => {
                assert!(b["id"].as_str().unwrap().starts_with("toolu_"));
                assert!(b["input"].is_object());
            }
            other => panic!("block type {other}"),
        }
    }
}

fn count_tokens(body: &Value) -> u64 {
    let (status, v) = post("/v1/messages/count_tokens", body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    v["input_tokens"].as_u64().expect("input_tokens")
}

fn tokenize_count(body: &Value) -> u64 {
    let (status, v) = post("/tokenize", body);
    assert_eq!(status, 200, "{v}");
    v["count"].as_u64().expect("count")
}

#[test]
fn a_message_streamed_and_not_is_the_same_message() {
    for thinking in [json!({"type": "enabled", "budget_tokens": 1024}), json!({"type": "disabled"})] {
        let body = with(request(json!([{"role": "user", "content": "Say hi."}])), "thinking", thinking.clone());
        let (status, whole) = post("/v1/messages", &body);
        assert_eq!(status, 200, "{whole}");
        check_message(&whole);
        let u = &whole["usage"];
        assert_eq!(
            u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap(),
            count_tokens(&body),
            "the prompt is what count_tokens counts"
        );
        let out = u["output_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&out), "{whole}");
        if whole["stop_reason"] == "max_tokens" {
            assert_eq!(out, 12);
        }
        let blocks = whole["content"].as_array().unwrap();
        if thinking["type"] == "enabled" {
            // The prompt ends inside the think block: the reply starts with reasoning.
            assert_eq!(blocks[0]["type"], "thinking", "{whole}");
        } else {
            assert!(blocks.iter().all(|b| b["type"] != "thinking"), "{whole}");
        }

        let r = post_raw(shared(), "/v1/messages", &with(body.clone(), "stream", json!(true)).to_string(), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.content_type.starts_with("text/event-stream"), "{}", r.content_type);
        let text = r.body;
        let streamed = fold_stream(&sse_events(&text));
        check_message(&streamed);
        // Greedy decoding: the same reply, block for block (signatures included).
        for k in ["content", "stop_reason", "stop_sequence", "model"] {
            assert_eq!(streamed[k], whole[k], "{k}\nstreamed: {streamed}\nwhole: {whole}");
        }
        assert_eq!(streamed["usage"]["output_tokens"], whole["usage"]["output_tokens"]);
        let total = |m: &Value| {
            m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["cache_read_input_tokens"].as_u64().unwrap()
        };
        assert_eq!(total(&streamed), total(&whole));
    }
}

#[test]
fn stop_sequences_and_prefill() {
    // A prefill: the reply continues the final assistant turn, as content.
    let body = request(json!([
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "1, 2,"},
    ]));
    let body = with(body, "thinking", json!({"type": "enabled"}));
    let (status, v) = post("/v1/messages", &body);
    assert_eq!(status, 200, "{v}");
    check_message(&v);
    assert!(v["content"].as_array().unwrap().iter().all(|b| b["type"] != "thinking"), "{v}");
    // Whatever text the model writes, a stop sequence made of one of its printable ASCII
    // characters ends it there.
    let text = v["content"].as_array().unwrap().iter().find(|b| b["type"] == "text").and_then(|b| b["text"].as_str());
    let stop = text.and_then(|t| t.chars().find(char::is_ascii_graphic));
    assert!(stop.is_some(), "the tiny model's reply to this prompt has one: {v}");
    if let Some(c) = stop {
        let body = with(body, "stop_sequences", json!([c.to_string()]));
        let (status, v) = post("/v1/messages", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
        assert_eq!(v["stop_sequence"], c.to_string());
        let cut =
            v["content"].as_array().unwrap().iter().find(|b| b["type"] == "text").and_then(|b| b["text"].as_str());
        let before = &text.unwrap()[..text.unwrap().find(c).unwrap()];
        assert_eq!(cut.unwrap_or(""), before, "{v}");
    }
}

#[test]
fn count_tokens_equals_tokenize_for_the_same_conversation() {
    let anthropic = json!({
        "model": MODEL,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
    });
    let openai = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        ],
    });
    let n = count_tokens(&anthropic);
    assert_eq!(n, tokenize_count(&openai));
    // Byte-level tokens: BOS, the system text, the user marker, two parts joined by a blank
    // line, the assistant marker and <think> (thinking is on by default).
    assert_eq!(n as usize, 1 + "Be brief.".len() + 1 + "Hello\n\nthere".len() + 2);

    // Thinking off, an effort, and both together reach the encoder the same way from both APIs.
    for (thinking, effort, reasoning_effort, chat_thinking) in [
        (json!({"type": "disabled"}), Value::Null, Value::Null, json!({"type": "disabled"})),
        (Value::Null, json!("max"), json!("max"), Value::Null),
        (json!({"type": "adaptive"}), json!("low"), json!("low"), json!({"type": "enabled"})),
    ] {
        let mut a = anthropic.clone();
        if !thinking.is_null() {
            a["thinking"] = thinking;
        }
        if !effort.is_null() {
            a["output_config"] = json!({"effort": effort});
        }
        let mut o = openai.clone();
        if !reasoning_effort.is_null() {
            o["reasoning_effort"] = reasoning_effort;
        }
        if !chat_thinking.is_null() {
            o["thinking"] = chat_thinking;
        }
        assert_eq!(count_tokens(&a), tokenize_count(&o), "{a}");
    }
    // `max` adds the encoder's effort text to the prompt.
    let max = with(anthropic.clone(), "output_config", json!({"effort": "max"}));
    assert!(count_tokens(&max) > n + 100);
}

#[test]
fn tools_and_a_tool_history() {
    let tools = json!([{
        "name": "get_weather",
        "description": "The weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]);
    let reasoning = "The user wants the weather.";
    let sig = signature::sign(&shared().state.signing_key, reasoning);
    let anthropic = json!({
        "model": MODEL,
        "max_tokens": 8,
        "temperature": 0,
        "tools": tools,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": reasoning, "signature": sig},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "sunny, 21 C"}]},
            ]},
        ],
    });
    let (status, v) = post("/v1/messages", &anthropic);
    assert_eq!(status, 200, "{v}");
    check_message(&v);
    let r = post_raw(shared(), "/v1/messages", &with(anthropic.clone(), "stream", json!(true)).to_string(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let text = r.body;
    check_message(&fold_stream(&sse_events(&text)));

    // The same conversation in OpenAI form renders to the same prompt length.
    let openai = json!({
        "model": MODEL,
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": reasoning, "tool_calls": [
                {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny, 21 C"},
        ],
    });
    let n = count_tokens(&anthropic);
    assert_eq!(n, tokenize_count(&openai));
    // The tools are in the prompt; with tool_choice none they are not.
    let none = with(anthropic.clone(), "tool_choice", json!({"type": "none"}));
    assert!(count_tokens(&none) + 100 < n);
    assert_eq!(
        count_tokens(&with(anthropic.clone(), "tool_choice", json!({"type": "any"}))),
        tokenize_count(&with(openai.clone(), "tool_choice", json!("required")))
    );
    assert_eq!(
        count_tokens(&with(anthropic.clone(), "tool_choice", json!({"type": "tool", "name": "get_weather"}))),
        tokenize_count(&with(
            openai.clone(),
            "tool_choice",
            json!({"type": "function", "function": {"name": "get_weather"}})
        ))
    );
    // A thinking block with a wrong signature is still accepted and rendered the same.
    let mut forged = anthropic.clone();
    forged["messages"][1]["content"][0]["signature"] = json!("not a signature");
    assert_eq!(count_tokens(&forged), n);
    let (status, v) = post("/v1/messages", &forged);
    assert_eq!(status, 200, "{v}");
}

#[test]
fn request_errors_are_in_anthropics_shape() {
    let r = post_raw(shared(), "/v1/messages", "{\"model\": ", &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(anthropic_error(&r.json(), "invalid_request_error").contains("JSON"), "{}", r.body);
    let r = post_raw(shared(), "/v1/messages/count_tokens", "[1, 2", &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    anthropic_error(&r.json(), "invalid_request_error");

    let mut no_max = request(json!([{"role": "user", "content": "hi"}]));
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let (status, v) = post("/v1/messages", &no_max);
    assert_eq!(status, 400);
    assert_eq!(anthropic_error(&v, "invalid_request_error"), "max_tokens: Field required");
    // A completion that could not fit in the context is refused before it runs.
    let past = with(request(json!([{"role": "user", "content": "hi"}])), "max_tokens", json!(1_000_000));
    let (status, v) = post("/v1/messages", &past);
    assert_eq!(status, 400, "{v}");
    let m = anthropic_error(&v, "invalid_request_error");
    assert!(m.starts_with("max_tokens: this server's maximum context length is"), "{m}");

    let (status, v) = post(
        "/v1/messages",
        &with(request(json!([{"role": "user", "content": "hi"}])), "model", json!("claude-opus-4")),
    );
    assert_eq!(status, 404);
    assert!(anthropic_error(&v, "not_found_error").contains("claude-opus-4"), "{v}");
    let (status, v) =
        post("/v1/messages/count_tokens", &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}));
    assert_eq!(status, 404);
    anthropic_error(&v, "not_found_error");
    // An alias is accepted.
    let (status, v) = post(
        "/v1/messages",
        &with(request(json!([{"role": "user", "content": "hi"}])), "model", json!("builtin:tiny")),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "builtin:tiny");

    let image = json!([{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "What is this?"},
    ]}]);
    let (status, v) = post("/v1/messages", &request(image));
    assert_eq!(status, 400);
    let m = anthropic_error(&v, "invalid_request_error");
    assert!(m.starts_with("messages.0.content.0: images are not supported"), "{m}");

    let (status, v) = post(
        "/v1/messages",
        &with(
            request(json!([{"role": "user", "content": "hi"}])),
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search"}]),
        ),
    );
    assert_eq!(status, 400);
    assert!(anthropic_error(&v, "invalid_request_error").contains("web_search_20250305"));

    let (status, v) =
        post("/v1/messages", &with(request(json!([{"role": "user", "content": "hi"}])), "max_tokens", json!(0)));
    assert_eq!(status, 400);
    assert!(anthropic_error(&v, "invalid_request_error").starts_with("max_tokens:"));

    // Another method on the route: 405, still Anthropic's shape.
    let r = common::get(shared(), "/v1/messages");
    assert_eq!(r.status, 405, "{}", r.body);
    anthropic_error(&r.json(), "invalid_request_error");
}

#[test]
fn api_keys_and_version_headers() {
    let mut o = Options::default();
    o.config.api_key = Some("sekret".into());
    let s = start(o);
    let body = request(json!([{"role": "user", "content": "hi"}])).to_string();
    for headers in [vec![], vec![("x-api-key", "wrong")], vec![("authorization", "Bearer wrong")]] {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let r = post_raw(&s, path, &body, &headers);
            assert_eq!(r.status, 401, "{headers:?}: {}", r.body);
            anthropic_error(&r.json(), "authentication_error");
        }
    }
    let versions = [
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"),
    ];
    for key in [("x-api-key", "sekret"), ("authorization", "Bearer sekret")] {
        let r = post_raw(&s, "/v1/messages", &body, &[key, versions[0], versions[1]]);
        assert_eq!(r.status, 200, "{key:?}: {}", r.body);
        let r = post_raw(&s, "/v1/messages/count_tokens", &body, &[key]);
        assert_eq!(r.status, 200, "{key:?}: {}", r.body);
    }
}

#[test]
fn a_full_queue_is_529_and_a_large_body_413() {
    let mut o = Options::default();
    o.config.max_body_bytes = 4096;
    o.engine.max_waiting = 0;
    let s = start(o);
    let body = request(json!([{"role": "user", "content": "hi"}]));
    for stream in [false, true] {
        let r = post_raw(&s, "/v1/messages", &with(body.clone(), "stream", json!(stream)).to_string(), &[]);
        assert_eq!(r.status, 529, "{}", r.body);
        anthropic_error(&r.json(), "overloaded_error");
    }
    // count_tokens does not queue anything.
    let r = post_raw(&s, "/v1/messages/count_tokens", &body.to_string(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let big = request(json!([{"role": "user", "content": "x".repeat(8192)}])).to_string();
    let r = post_raw(&s, "/v1/messages", &big, &[]);
    assert_eq!(r.status, 413, "{}", r.body);
    anthropic_error(&r.json(), "request_too_large");
}

#[test]
fn a_client_that_disconnects_mid_stream_cancels_its_request() {
    let s = start(Options::default());
    // Greedy: the Messages API has no `ignore_eos`, and sampling from the random model ended
    // the reply with EOS before the third token about one run in a hundred.
    let body =
        json!({"model": MODEL, "max_tokens": 900, "stream": true, "temperature": 0, "thinking": {"type": "disabled"},
                      "messages": [{"role": "user", "content": "Write a long story."}]})
        .to_string();
    let conn = open_stream(&s, "/v1/messages", &body, b"text_delta", 3);
    assert_eq!(metric(&s, "dsv4:num_requests_running"), 1.0);
    drop(conn);
    wait_until_idle(&s, "the request is cancelled and its blocks are free");
    assert_eq!(metric(&s, "dsv4:engine_requests_cancelled_total"), 1.0);
    assert!(metric(&s, "dsv4:generation_tokens_total") < 900.0);
}
