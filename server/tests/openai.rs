//! The OpenAI API, `/tokenize`, `/detokenize`, `/health` and `/metrics` over HTTP, against an
//! in-process server on 127.0.0.1:0 running `builtin:tiny` (random weights, byte-fallback
//! vocabulary) on the CPU backend.

mod common;

use common::*;
use dsv4_core::chat::render_openai;
use dsv4_core::tokenizer::Tokenizer;
use dsv4_server::conversation::{named_tool_instruction, REQUIRED_TOOL_INSTRUCTION};
use serde_json::{json, Value};

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// What `dsv4 render --ids` gives: the core encoder, then the tokenizer.
fn core_ids(messages: &Value, tools: Option<&Value>, thinking: bool, effort: Option<&str>) -> Vec<u32> {
    let text = render_openai(messages, tools, thinking, effort).unwrap();
    Tokenizer::byte_fallback().encode(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn vector(n: usize) -> Value {
    let path = format!("{}/../core/tests/chat_vectors/test_input_{n}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn error_of(r: &Resp) {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not OpenAI's error shape: {}", r.body);
    assert!(e.get("param").is_some() && e.get("code").is_some(), "not OpenAI's error shape: {}", r.body);
}

// ------------------------------------------------------------------------------------------
// Basics
// ------------------------------------------------------------------------------------------

#[test]
fn health_models_and_unknown_routes() {
    let s = shared();
    let h = get(s, "/health");
    assert_eq!(h.status, 200);
    let m = get(s, "/v1/models");
    assert_eq!(m.status, 200);
    let mut v = m.json();
    assert!(v["data"][0]["created"].as_u64().unwrap() > 1_700_000_000);
    v["data"][0]["created"] = json!(0);
    insta::assert_snapshot!(serde_json::to_string_pretty(&v).unwrap());
    // One model by any of its names (the SDKs' `models.retrieve`); another name is a 404.
    for name in [MODEL, "builtin:tiny"] {
        let one = get(s, &format!("/v1/models/{name}"));
        assert_eq!(one.status, 200, "{name}: {}", one.body);
        assert_eq!(one.json()["id"], MODEL);
        assert_eq!(one.json()["max_model_len"], MAX_MODEL_LEN);
    }
    let r = get(s, "/v1/models/gpt-4");
    assert_eq!(r.status, 404);
    error_of(&r);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = get(s, "/v2/nothing");
    assert_eq!(r.status, 404);
    error_of(&r);
    let r = get(s, "/v1/chat/completions");
    assert_eq!(r.status, 405);
    error_of(&r);
    assert_eq!(post(s, "/v1/models", &json!({})).status, 405);
    // /health and /metrics too: a 405 in OpenAI's shape, not an empty body.
    for path in ["/health", "/metrics"] {
        let r = post(s, path, &json!({}));
        assert_eq!(r.status, 405, "{path}");
        error_of(&r);
    }
}

#[test]
fn chat_completion_thinking_on_by_default_and_off_on_request() {
    let s = shared();
    let v = post_ok(s, "/v1/chat/completions", &json!({"model": MODEL, "messages": user("hi"), "max_tokens": 6}));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], MODEL);
    let choice = &v["choices"][0];
    let msg = &choice["message"];
    assert_eq!(msg["role"], "assistant");
    assert!(msg["reasoning_content"].is_string(), "{v}");
    assert_eq!(msg["reasoning"], msg["reasoning_content"]);
    assert!(["stop", "length", "tool_calls"].contains(&choice["finish_reason"].as_str().unwrap()));
    let u = &v["usage"];
    let prompt = core_ids(&user("hi"), None, true, None).len() as u64;
    assert_eq!(u["prompt_tokens"], prompt);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&completion));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap() <= completion);
    let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(u["prompt_cache_hit_tokens"].as_u64().unwrap(), cached);
    assert_eq!(u["prompt_cache_miss_tokens"].as_u64().unwrap(), prompt - cached);

    for off in [
        json!({"thinking": {"type": "disabled"}}),
        json!({"chat_template_kwargs": {"thinking": false}}),
        json!({"chat_template_kwargs": {"enable_thinking": false}}),
        json!({"reasoning_effort": "none"}),
    ] {
        let mut body = json!({"messages": user("hi"), "max_tokens": 4});
        body.as_object_mut().unwrap().extend(off.as_object().unwrap().clone());
        let v = post_ok(s, "/v1/chat/completions", &body);
        assert!(v["choices"][0]["message"]["reasoning_content"].is_null(), "{off}: {v}");
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 0, "{off}");
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            core_ids(&user("hi"), None, false, None).len()
        );
    }
}

#[test]
fn every_effort_spelling_renders_the_mapped_prompt() {
    let s = shared();
    let msgs = user("Prove it.");
    for (effort, want) in [
        ("none", core_ids(&msgs, None, false, None)),
        ("minimal", core_ids(&msgs, None, true, Some("high"))),
        ("low", core_ids(&msgs, None, true, Some("high"))),
        ("medium", core_ids(&msgs, None, true, Some("high"))),
        ("high", core_ids(&msgs, None, true, Some("high"))),
        ("xhigh", core_ids(&msgs, None, true, Some("max"))),
        ("max", core_ids(&msgs, None, true, Some("max"))),
    ] {
        let top = post_ok(s, "/tokenize", &json!({"messages": msgs, "reasoning_effort": effort}));
        assert_eq!(ids(&top), want, "reasoning_effort {effort}");
        let kw =
            post_ok(s, "/tokenize", &json!({"messages": msgs, "chat_template_kwargs": {"reasoning_effort": effort}}));
        assert_eq!(ids(&kw), want, "chat_template_kwargs.reasoning_effort {effort}");
        // And a completion runs with it.
        let v =
            post_ok(s, "/v1/chat/completions", &json!({"messages": msgs, "reasoning_effort": effort, "max_tokens": 2}));
        assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, want.len(), "{effort}");
        assert_eq!(v["choices"][0]["message"]["reasoning_content"].is_null(), effort == "none", "{effort}");
    }
    // Thinking switched on explicitly wins over `none`; switched off, the effort is ignored.
    let v = post_ok(
        s,
        "/tokenize",
        &json!({"messages": msgs, "thinking": {"type": "enabled"}, "reasoning_effort": "none"}),
    );
    assert_eq!(ids(&v), core_ids(&msgs, None, true, None));
    let v = post_ok(
        s,
        "/tokenize",
        &json!({"messages": msgs, "thinking": {"type": "disabled"}, "reasoning_effort": "max"}),
    );
    assert_eq!(ids(&v), core_ids(&msgs, None, false, None));
    let r = post(s, "/v1/chat/completions", &json!({"messages": msgs, "reasoning_effort": "extreme"}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "reasoning_effort");
}

// ------------------------------------------------------------------------------------------
// Tokenize
// ------------------------------------------------------------------------------------------

#[test]
fn tokenize_messages_equals_the_core_encoder_and_tokenizer() {
    let s = shared();
    let tok = Tokenizer::byte_fallback();
    // Official vector 1: tools, a tool call and its result in the history, thinking.
    let v1 = vector(1);
    let gold = include_str!("../../core/tests/chat_vectors/test_output_1.txt");
    let r = post_ok(s, "/tokenize", &json!({"messages": v1["messages"], "tools": v1["tools"]}));
    assert_eq!(ids(&r), tok.encode(gold).unwrap());
    assert_eq!(r["count"].as_u64().unwrap() as usize, ids(&r).len());
    assert_eq!(r["max_model_len"], MAX_MODEL_LEN);
    assert!(r["token_strs"].is_null());
    // `reasoning` is accepted for `reasoning_content`; a missing one is no error.
    let mut aliased = v1["messages"].clone();
    for m in aliased.as_array_mut().unwrap() {
        if let Some(r) = m.as_object_mut().unwrap().remove("reasoning_content") {
            m["reasoning"] = r;
        }
    }
    let r = post_ok(s, "/tokenize", &json!({"messages": aliased, "tools": v1["tools"]}));
    assert_eq!(ids(&r), tok.encode(gold).unwrap());
    let mut missing = v1["messages"].clone();
    for m in missing.as_array_mut().unwrap() {
        m.as_object_mut().unwrap().remove("reasoning_content");
    }
    post_ok(s, "/tokenize", &json!({"messages": missing, "tools": v1["tools"]}));
    // Vectors 3 (developer message with tools, latest_reminder) and 4 (chat mode, task).
    let v3 = vector(3);
    let r = post_ok(s, "/tokenize", &json!({"messages": v3}));
    assert_eq!(ids(&r), core_ids(&v3, None, true, None));
    let v4 = vector(4);
    let r = post_ok(s, "/tokenize", &json!({"messages": v4, "thinking": {"type": "disabled"}}));
    assert_eq!(ids(&r), core_ids(&v4, None, false, None));

    // add_generation_prompt: false leaves out `<｜Assistant｜><think>`.
    let with = ids(&post_ok(s, "/tokenize", &json!({"messages": user("hi")})));
    let without = ids(&post_ok(s, "/tokenize", &json!({"messages": user("hi"), "add_generation_prompt": false})));
    assert_eq!(with.len(), without.len() + 2);
    assert_eq!(with[..without.len()], without[..]);
    // continue_final_message: the last assistant message without its EOS.
    let cont = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]);
    let r = post_ok(
        s,
        "/tokenize",
        &json!({"messages": cont, "add_generation_prompt": false, "continue_final_message": true,
                "thinking": {"type": "disabled"}}),
    );
    assert!(tok.decode(&ids(&r)).unwrap().ends_with("</think>Hel"));
    let r = post(s, "/tokenize", &json!({"messages": cont, "continue_final_message": true}));
    assert_eq!(r.status, 400);
}

#[test]
fn tokenize_prompts_and_detokenize() {
    let s = shared();
    let r = post_ok(s, "/tokenize", &json!({"prompt": "héllo <think>", "return_token_strs": true}));
    let t = ids(&r);
    assert_eq!(t, Tokenizer::byte_fallback().encode("héllo <think>").unwrap());
    assert_eq!(r["token_strs"].as_array().unwrap().len(), t.len());
    assert_eq!(r["token_strs"].as_array().unwrap().last().unwrap(), "<think>");
    let d = post_ok(s, "/detokenize", &json!({"tokens": t}));
    assert_eq!(d["prompt"], "héllo <think>");
    let bad = post(s, "/detokenize", &json!({"tokens": [5, 100000]}));
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].as_str().unwrap().contains("100000"), "{}", bad.body);
    assert_eq!(post(s, "/detokenize", &json!({"tokens": ["a"]})).status, 400);
    assert_eq!(post(s, "/tokenize", &json!({})).status, 400);
    assert_eq!(post(s, "/tokenize", &json!({"prompt": "x", "model": "other"})).status, 404);
    // A prompt of the wrong type is named by its type, not echoed back whole.
    let bad = post(s, "/tokenize", &json!({"prompt": vec![7; 10_000]}));
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["message"], "`prompt` must be a string, not a list");
}

// ------------------------------------------------------------------------------------------
// Tools
// ------------------------------------------------------------------------------------------

#[test]
fn tool_choice_none_required_and_named() {
    let s = shared();
    let v1 = vector(1);
    let (msgs, tools) = (&v1["messages"], &v1["tools"]);
    let tokenize =
        |choice: Value| post(s, "/tokenize", &json!({"messages": msgs, "tools": tools, "tool_choice": choice}));
    assert_eq!(ids(&tokenize(json!("auto")).json()), core_ids(msgs, Some(tools), true, None));
    // none: the tools are not rendered.
    assert_eq!(ids(&tokenize(json!("none")).json()), core_ids(msgs, None, true, None));
    // required / named: rendered, with the instruction in the system message.
    let with_instruction = |text: &str| {
        let mut m = msgs.clone();
        assert_eq!(m[0]["role"], "system");
        m[0]["content"] = json!(format!("{}\n\n{text}", m[0]["content"].as_str().unwrap()));
        core_ids(&m, Some(tools), true, None)
    };
    assert_eq!(ids(&tokenize(json!("required")).json()), with_instruction(REQUIRED_TOOL_INSTRUCTION));
    let named = json!({"type": "function", "function": {"name": "search"}});
    assert_eq!(ids(&tokenize(named).json()), with_instruction(&named_tool_instruction("search")));
    // A named tool that is not there, `required` without tools, and nonsense are 400s.
    let r = tokenize(json!({"type": "function", "function": {"name": "nope"}}));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("tool_choice")));
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "tool_choice": "required"}));
    assert_eq!(r.status, 400);
    assert_eq!(tokenize(json!("sometimes")).status, 400);
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "tools": [{"type": "function"}]}));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("tools[0]")));
    // Parameters are a JSON Schema object (or absent).
    let bad = json!([{"type": "function", "function": {"name": "f", "parameters": "xyz"}}]);
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "tools": bad}));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("tools[0].function.parameters")));
    let none = json!([{"type": "function", "function": {"name": "f", "parameters": null}}]);
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "tools": none, "max_tokens": 1}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn chat_with_tools_and_tool_results_in_the_history() {
    let s = shared();
    let v1 = vector(1);
    // Up to the tool result: the model answers after it.
    let history: Vec<Value> = v1["messages"].as_array().unwrap()[..4].to_vec();
    assert_eq!(history[3]["role"], "tool");
    for stream in [false, true] {
        let body = json!({"messages": history, "tools": v1["tools"], "tool_choice": "auto", "max_tokens": 6,
                          "stream": stream});
        if stream {
            let events = sse(s, "/v1/chat/completions", &body);
            assert_eq!(events.last().unwrap(), "[DONE]");
        } else {
            let v = post_ok(s, "/v1/chat/completions", &body);
            let prompt = core_ids(&json!(history), Some(&v1["tools"]), true, None).len();
            assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, prompt);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Streaming
// ------------------------------------------------------------------------------------------

/// Reasoning, content, finish reason and usage of a streamed chat reply.
fn gather_chat_stream(events: &[Value]) -> (String, String, String, Value) {
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first = &events[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    let (mut reasoning, mut content, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), Value::Null);
    for e in &events[..events.len() - 1] {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], events[0]["id"]);
        if e["choices"].as_array().unwrap().is_empty() {
            usage = e["usage"].clone();
            continue;
        }
        let c = &e["choices"][0];
        let d = &c["delta"];
        assert_eq!(d["reasoning"], d["reasoning_content"]);
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, finish, usage)
}

#[test]
fn streamed_chat_equals_the_whole_reply() {
    let s = shared();
    for thinking in ["enabled", "disabled"] {
        let body = json!({"messages": user("Count to three."), "temperature": 0, "max_tokens": 24,
                          "thinking": {"type": thinking}});
        let whole = post_ok(s, "/v1/chat/completions", &body);
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        stream_body["stream_options"] = json!({"include_usage": true});
        let events = sse(s, "/v1/chat/completions", &stream_body);
        let (reasoning, content, finish, usage) = gather_chat_stream(&events);
        let msg = &whole["choices"][0]["message"];
        assert_eq!(reasoning, msg["reasoning_content"].as_str().unwrap_or(""), "{thinking}");
        assert_eq!(content, msg["content"].as_str().unwrap_or(""), "{thinking}");
        assert_eq!(finish, whole["choices"][0]["finish_reason"].as_str().unwrap(), "{thinking}");
        assert_eq!(usage["completion_tokens"], whole["usage"]["completion_tokens"], "{thinking}");
        assert_eq!(usage["prompt_tokens"], whole["usage"]["prompt_tokens"], "{thinking}");
        assert_eq!(
            usage["completion_tokens_details"]["reasoning_tokens"],
            whole["usage"]["completion_tokens_details"]["reasoning_tokens"]
        );
        // The usage chunk comes last, right before [DONE].
        assert!(events[events.len() - 2]["choices"].as_array().unwrap().is_empty());
    }
    // Without include_usage there is no usage chunk.
    let events = sse(s, "/v1/chat/completions", &json!({"messages": user("x"), "max_tokens": 3, "stream": true}));
    assert!(events[..events.len() - 1].iter().all(|e| !e["choices"].as_array().unwrap().is_empty()));
}

#[test]
fn logprobs_of_chat_and_completions() {
    let s = shared();
    let v = post_ok(
        s,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "temperature": 0, "max_tokens": 5, "logprobs": true, "top_logprobs": 3}),
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["logprob"], top[0]["logprob"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(t["bytes"].is_array());
    }
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "top_logprobs": 3}));
    assert_eq!(r.status, 400);
    let v = post_ok(s, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 4, "logprobs": 2}));
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), n);
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|t| t.as_object().unwrap().len() <= 2));
    // `text_offset` counts characters, as OpenAI's (Python string lengths) do: each token
    // starts where the characters of the ones before it end. (The random model's text is
    // mostly CJK and other multi-byte characters, where bytes and characters differ.)
    let v = post_ok(s, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 24, "logprobs": 1, "seed": 3}));
    let lp = &v["choices"][0]["logprobs"];
    let (tokens, offsets) = (lp["tokens"].as_array().unwrap(), lp["text_offset"].as_array().unwrap());
    let mut at = 0;
    for (t, o) in tokens.iter().zip(offsets) {
        assert_eq!(o.as_u64().unwrap() as usize, at, "{lp}");
        at += t.as_str().unwrap().chars().count();
    }
    assert!(
        tokens.iter().any(|t| t.as_str().unwrap().len() > t.as_str().unwrap().chars().count()),
        "no token with a multi-byte character to tell bytes from characters: {tokens:?}"
    );
    // Streamed, the same request gives the same tokens and offsets, chunk after chunk.
    let body = json!({"prompt": "abc", "max_tokens": 24, "logprobs": 1, "seed": 3, "stream": true});
    let (mut streamed_tokens, mut streamed_offsets) = (vec![], vec![]);
    for e in sse(s, "/v1/completions", &body).iter().filter(|e| e["choices"][0]["logprobs"].is_object()) {
        let lp = &e["choices"][0]["logprobs"];
        streamed_tokens.extend(lp["tokens"].as_array().unwrap().iter().cloned());
        streamed_offsets.extend(lp["text_offset"].as_array().unwrap().iter().cloned());
    }
    assert_eq!((&streamed_tokens, &streamed_offsets), (tokens, offsets));
}

// ------------------------------------------------------------------------------------------
// Completions
// ------------------------------------------------------------------------------------------

#[test]
fn completions_from_text_and_ids_streamed_or_not() {
    let s = shared();
    let body = json!({"model": "builtin:tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
    let v = post_ok(s, "/v1/completions", &body);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["prompt_tokens"], 16);
    // The same prompt as ids gives the same greedy text.
    let ids = Tokenizer::byte_fallback().encode("Once upon a time").unwrap();
    let by_ids = post_ok(s, "/v1/completions", &json!({"prompt": ids, "max_tokens": 12, "temperature": 0}));
    assert_eq!(by_ids["choices"][0]["text"], text.as_str());
    let nested = post_ok(s, "/v1/completions", &json!({"prompt": [ids], "max_tokens": 12, "temperature": 0}));
    assert_eq!(nested["choices"][0]["text"], text.as_str());
    // Streamed.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let events = sse(s, "/v1/completions", &sb);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| e["choices"].get(0).map(|c| c["text"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(streamed, text);
    let usage = &events[events.len() - 2]["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let s = shared();
    let body = json!({"prompt": "The list: ", "max_tokens": 40, "temperature": 0});
    let full = post_ok(s, "/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "{full:?}");
    let stop: String = chars[8..11].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop, "a stop that never comes"]);
        if stream {
            b["stream"] = json!(true);
            let events = sse(s, "/v1/completions", &b);
            let text: String = events[..events.len() - 1]
                .iter()
                .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(text, want);
            let last = &events[events.len() - 2]["choices"][0];
            assert_eq!(
                (last["finish_reason"].as_str(), last["stop_reason"].as_str()),
                (Some("stop"), Some(stop.as_str()))
            );
        } else {
            let v = post_ok(s, "/v1/completions", &b);
            assert_eq!(v["choices"][0]["text"], want);
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
        }
    }
    // A single string works too, and max_tokens ends with `length`.
    let v = post_ok(
        s,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 3, "stop": "never here", "ignore_eos": true}),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

#[test]
fn malformed_bodies_and_wrong_types_are_400_in_openai_shape() {
    let s = shared();
    let r = post_raw(s, "/v1/chat/completions", "{not json", &[]);
    assert_eq!(r.status, 400);
    insta::assert_snapshot!("malformed_json", serde_json::to_string_pretty(&r.json()).unwrap());
    for (body, param) in [
        (json!({"messages": "hi"}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0]"),
        (json!({"messages": [7]}), "messages[0]"),
        (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": null}]}),
            "messages[1].content",
        ),
        (json!({"messages": [{"role": "tool", "tool_call_id": "c"}]}), "messages[0].content"),
        (json!({"messages": user("x"), "temperature": "hot"}), "temperature"),
        (json!({"messages": user("x"), "temperature": 3}), "temperature"),
        (json!({"messages": user("x"), "top_p": 0}), "top_p"),
        (json!({"messages": user("x"), "max_tokens": -1}), "max_tokens"),
        (json!({"messages": user("x"), "max_tokens": 1.5}), "max_tokens"),
        (json!({"messages": user("x"), "max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"messages": user("x"), "stop": 5}), "stop"),
        (json!({"messages": user("x"), "stream": "yes"}), "stream"),
        (json!({"messages": user("x"), "stream_options": {"include_usage": 1}}), "stream_options.include_usage"),
        (json!({"messages": user("x"), "thinking": {"type": "sometimes"}}), "thinking.type"),
        (json!({"messages": user("x"), "chat_template_kwargs": {"thinking": "yes"}}), "chat_template_kwargs.thinking"),
        (json!({"messages": user("x"), "model": 5}), "model"),
    ] {
        let r = post(s, "/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        error_of(&r);
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.body);
    }
    // An integer too large for the server is out of range, not "not an integer".
    for (body, param) in [
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000000000000000000000000}"#,
            "max_tokens",
        ),
        (r#"{"messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551621}"#, "seed"),
    ] {
        let r = post_raw(s, "/v1/chat/completions", body, &[]);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{body}");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("out of range") && !msg.contains("must be an integer"), "{body}: {msg}");
    }
    // An assistant message may leave content out (or null) when it carries tool calls; the
    // tool's result then needs its content.
    let turn = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]);
    let r = post(s, "/v1/chat/completions", &json!({"messages": turn, "max_tokens": 1}));
    assert_eq!(r.status, 200, "{}", r.body);
    // A number out of range is quoted as sent.
    let r = post_raw(
        s,
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 1e308}"#,
        &[],
    );
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("temperature must be in [0, 2], not 1e") && msg.ends_with("308") && !msg.contains("inf"),
        "{msg}"
    );
    // 0 and negative counts get the same message.
    for n in [0, -1] {
        let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "max_tokens": n}));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert_eq!(msg, format!("`max_tokens` must be at least 1, not {n}"));
    }
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "max_tokens": 2.5}));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("must be an integer, not 2.5"), "{}", r.body);
    let r = post_raw(s, "/v1/chat/completions", "[1, 2]", &[]);
    assert_eq!(r.status, 400);
    let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), "n": 2}));
    assert_eq!(r.status, 400);
    insta::assert_snapshot!("n_2", serde_json::to_string_pretty(&r.json()).unwrap());
}

#[test]
fn unknown_models_are_404_and_both_names_are_accepted() {
    let s = shared();
    let r = post(s, "/v1/chat/completions", &json!({"model": "gpt-4", "messages": user("x")}));
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(e["error"]["param"], "model");
    assert!(e["error"]["message"].as_str().unwrap().contains("gpt-4"));
    let r = post(s, "/v1/completions", &json!({"model": "gpt-4", "prompt": "x"}));
    assert_eq!(r.status, 404);
    for name in [MODEL, "builtin:tiny"] {
        post_ok(s, "/v1/chat/completions", &json!({"model": name, "messages": user("x"), "max_tokens": 1}));
    }
}

#[test]
fn prompts_past_max_model_len_are_400_naming_both_lengths() {
    let s = shared();
    let long = "y".repeat(MAX_MODEL_LEN + 100);
    let r = post(s, "/v1/chat/completions", &json!({"messages": user(&long)}));
    assert_eq!(r.status, 400);
    let n = core_ids(&user(&long), None, true, None).len();
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(&n.to_string()) && msg.contains(&MAX_MODEL_LEN.to_string()), "{msg}");
    let r = post(s, "/v1/completions", &json!({"prompt": long}));
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(&(MAX_MODEL_LEN + 100).to_string()) && msg.contains(&MAX_MODEL_LEN.to_string()), "{msg}");
}

/// A completion that could not fit in the context is refused before it runs (vLLM's rule),
/// naming `max_tokens`; one that just fits runs.
#[test]
fn max_tokens_past_the_context_is_400() {
    let s = shared();
    let prompt: Vec<u32> = (0..MAX_MODEL_LEN - 3).map(|i| 5 + (i % 50) as u32).collect();
    let r = post(s, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 4}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "max_tokens", "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("lower max_tokens to at most 3") && msg.contains(&MAX_MODEL_LEN.to_string()), "{msg}");
    let fits = post(s, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 3}));
    assert_eq!(fits.status, 200, "{}", fits.body);
    // Without max_tokens the legacy default of 16 shrinks to what the context leaves.
    let r = post_ok(s, "/v1/completions", &json!({"prompt": prompt, "ignore_eos": true}));
    assert_eq!(r["usage"]["completion_tokens"], 3, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    // The error names the field the client sent.
    for field in ["max_tokens", "max_completion_tokens"] {
        let r = post(s, "/v1/chat/completions", &json!({"messages": user("x"), field: MAX_MODEL_LEN}));
        assert_eq!(r.status, 400, "{}", r.body);
        error_of(&r);
        assert_eq!(r.json()["error"]["param"], field, "{}", r.body);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(&format!("lower {field} to at most")), "{msg}");
    }
}

#[test]
fn completions_refuse_bad_prompts() {
    let s = shared();
    let r = post(s, "/v1/completions", &json!({"prompt": [5, 1_000_000], "max_tokens": 2}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("1000000"), "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "prompt", "{}", r.body);
    for (body, param) in [
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": {"a": 1}}), "prompt"),
        (json!({}), "prompt"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "n": 3}), "n"),
        (json!({"prompt": "x", "logprobs": 50}), "logprobs"),
    ] {
        let r = post(s, "/v1/completions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
}

// ------------------------------------------------------------------------------------------
// Servers with other settings
// ------------------------------------------------------------------------------------------

#[test]
fn api_keys_guard_every_route_but_health_and_metrics() {
    let mut o = Options::default();
    o.config.api_key = Some("sekrit".into());
    let s = start(o);
    assert_eq!(get(&s, "/health").status, 200);
    assert_eq!(get(&s, "/metrics").status, 200);
    let r = get(&s, "/v1/models");
    assert_eq!(r.status, 401);
    error_of(&r);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(r.json()["error"]["message"].as_str().unwrap().starts_with("missing API key"));
    let r = get_with(&s, "/v1/models", &[("authorization", "Bearer wrong")]);
    assert_eq!((r.status, r.json()["error"]["message"].as_str()), (401, Some("invalid API key")));
    let r = get_with(&s, "/v1/models", &[("authorization", "Basic c2Vrcml0")]);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("must be `Bearer KEY`"), "{}", r.body);
    assert_eq!(get_with(&s, "/v1/models", &[("x-api-key", "sekrit-not")]).status, 401);
    assert_eq!(get_with(&s, "/v1/models", &[("authorization", "Bearer sekrit")]).status, 200);
    assert_eq!(get_with(&s, "/v1/models", &[("x-api-key", "sekrit")]).status, 200);
    let body = json!({"messages": user("x"), "max_tokens": 1}).to_string();
    assert_eq!(post_raw(&s, "/v1/chat/completions", &body, &[]).status, 401);
    assert_eq!(post_raw(&s, "/v1/chat/completions", &body, &[("x-api-key", "sekrit")]).status, 200);
    assert_eq!(post_raw(&s, "/tokenize", r#"{"prompt": "x"}"#, &[]).status, 401);
    // The Anthropic routes answer 401 in Anthropic's shape.
    let r = post_raw(&s, "/v1/messages", "{}", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
}

#[test]
fn bodies_over_the_limit_are_413() {
    let mut o = Options::default();
    o.config.max_body_bytes = 64 << 10;
    let s = start(o);
    let big = json!({"messages": user(&"z".repeat(100 << 10))}).to_string();
    let r = post_raw(&s, "/v1/chat/completions", &big, &[]);
    assert_eq!(r.status, 413, "{}", r.body);
    error_of(&r);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // Under the limit is fine.
    let small = json!({"messages": user("z"), "max_tokens": 1}).to_string();
    assert_eq!(post_raw(&s, "/v1/chat/completions", &small, &[]).status, 200);
}

#[test]
fn a_full_queue_is_503() {
    let mut o = Options::default();
    o.engine.max_waiting = 0;
    let s = start(o);
    let r = post(&s, "/v1/chat/completions", &json!({"messages": user("x")}));
    assert_eq!(r.status, 503);
    error_of(&r);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("retry later"), "{}", r.body);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_request() {
    let s = start(Options::default());
    // A raw completion that ignores EOS: the random model cannot end it early.
    let body =
        json!({"prompt": "Write a long story.", "max_tokens": 4000, "stream": true, "ignore_eos": true}).to_string();
    let conn = open_stream(&s, "/v1/completions", &body, b"data: ", 3);
    assert_eq!(metric(&s, "dsv4:num_requests_running"), 1.0);
    drop(conn);
    wait_until_idle(&s, "the request is cancelled and its blocks are free");
    assert_eq!(metric(&s, "dsv4:engine_requests_cancelled_total"), 1.0);
    assert!(metric(&s, "dsv4:generation_tokens_total") < 4000.0);
    assert_eq!(metric(&s, "dsv4:request_success_total{finished_reason=\"abort\"}"), 1.0);
}

#[test]
fn metrics_are_prometheus_text() {
    let s = start(Options::default());
    post_ok(&s, "/v1/chat/completions", &json!({"messages": user("x"), "max_tokens": 3, "ignore_eos": true}));
    let r = get(&s, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("text/plain"), "{}", r.content_type);
    for name in [
        "dsv4:num_requests_waiting",
        "dsv4:kv_cache_blocks_free{kind=\"compressed\"}",
        "dsv4:kv_cache_blocks_free{kind=\"window\"}",
        "dsv4:prefix_cache_queries_total",
        "dsv4:prefix_cache_hits_total",
    ] {
        metric(&s, name);
    }
    // BOS, User, x, Assistant, <think>.
    assert_eq!(metric(&s, "dsv4:prompt_tokens_total"), 5.0);
    assert!(metric(&s, "dsv4:generation_tokens_total") >= 1.0);
    assert_eq!(metric(&s, "dsv4:time_to_first_token_seconds_count"), 1.0);
    assert!(metric(&s, "dsv4:inter_token_latency_seconds_count") >= 1.0);
    assert_eq!(metric(&s, "dsv4:e2e_request_latency_seconds_count"), 1.0);
}
