//! Replays a corpus written by `chat_vectors/reference_driver.py`, which runs DeepSeek's official
//! `encoding_dsv4.py` on seeded random conversations and completions, and checks that:
//! * the encoder produces the same prompt where the reference does, and an error where it raises;
//! * the strict parser returns the same message where the reference does, and an error where it
//!   raises;
//! * the lenient parser agrees with the reference wherever the reference accepts a completion
//!   whose tool-call block (if any) is closed and which has no EOS before its end.
//!
//! Needs the official module, so it is ignored by default:
//! `python3 core/tests/chat_vectors/reference_driver.py ENCODING_DIR /tmp/corpus.json` then
//! `DSV4_CHAT_REFERENCE_CORPUS=/tmp/corpus.json cargo test -p dsv4-core --test chat_differential -- --ignored`.

use dsv4_core::chat::{
    encode_messages_with_context, parse_completion, parse_completion_strict, EncodeOptions, Message, ParsedToolCall,
    ThinkingMode, EOS, TOOL_CALLS_START,
};
use serde_json::Value;

const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";

fn messages(v: &Value) -> Result<Vec<Message>, String> {
    v.as_array().unwrap().iter().map(Message::from_json).collect()
}

fn calls_of(v: &Value) -> Vec<ParsedToolCall> {
    v["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ParsedToolCall {
            name: c["function"]["name"].as_str().unwrap().to_string(),
            arguments: c["function"]["arguments"].as_str().unwrap().to_string(),
        })
        .collect()
}

#[test]
#[ignore = "needs DSV4_CHAT_REFERENCE_CORPUS, written by chat_vectors/reference_driver.py"]
fn against_the_official_reference() {
    let path = std::env::var("DSV4_CHAT_REFERENCE_CORPUS").expect("set DSV4_CHAT_REFERENCE_CORPUS");
    let corpus: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

    let (mut encoded, mut refused) = (0, 0);
    for case in corpus["cases"].as_array().unwrap() {
        let opts = EncodeOptions {
            thinking_mode: if case["thinking"] == "thinking" { ThinkingMode::Thinking } else { ThinkingMode::Chat },
            drop_thinking: case["drop_thinking"].as_bool().unwrap(),
            add_bos: case["bos"].as_bool().unwrap(),
            reasoning_effort: case["effort"].as_str().map(|e| e.parse().unwrap()),
            ..Default::default()
        };
        let got = messages(&case["context"])
            .and_then(|ctx| messages(&case["messages"]).map(|m| (ctx, m)))
            .map_err(|e| e.to_string())
            .and_then(|(ctx, m)| encode_messages_with_context(&ctx, &m, &opts).map_err(|e| e.to_string()));
        match (case.get("ok").and_then(Value::as_str), got) {
            (Some(want), Ok(got)) => {
                assert_eq!(got, want, "{case}");
                encoded += 1;
            }
            (None, Err(_)) => refused += 1,
            (want, got) => panic!("reference {want:?} / {:?}, ours {got:?}, on {case}", case.get("err")),
        }
    }

    let (mut parsed, mut rejected, mut lenient_checked) = (0, 0, 0);
    for c in corpus["completions"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let thinking = c["thinking"] == "thinking";
        let strict = parse_completion_strict(text, thinking);
        let Some(want) = c.get("ok") else {
            assert!(strict.is_err(), "the reference refused {text:?} ({}), we parsed {strict:?}", c["err"]);
            rejected += 1;
            continue;
        };
        let strict = strict.unwrap_or_else(|e| panic!("{e} on {text:?}, the reference parsed {want}"));
        assert_eq!(strict.content, want["content"].as_str().unwrap(), "{text:?}");
        assert_eq!(strict.reasoning_content, want["reasoning_content"].as_str().unwrap(), "{text:?}");
        assert_eq!(strict.tool_calls, calls_of(want), "{text:?}");
        parsed += 1;

        let body = text.strip_suffix(EOS).unwrap_or(text);
        if body.contains(EOS) || (body.contains(TOOL_CALLS_START) && !body.ends_with(TOOL_CALLS_END)) {
            continue;
        }
        let lenient = parse_completion(text, thinking);
        assert_eq!(lenient.content, strict.content, "{text:?}");
        assert_eq!(lenient.reasoning_content, strict.reasoning_content, "{text:?}");
        assert_eq!(lenient.tool_calls.len(), strict.tool_calls.len(), "{text:?}");
        for (l, s) in lenient.tool_calls.iter().zip(&strict.tool_calls) {
            assert_eq!(l.name, s.name);
            // The reference copies a `string="false"` value that is not JSON verbatim.
            if s.arguments_json().is_ok() {
                assert_eq!(l.arguments, s.arguments, "{text:?}");
            }
        }
        lenient_checked += 1;
    }
    eprintln!(
        "encoder: {encoded} prompts equal, {refused} refused by both; strict parser: {parsed} equal, {rejected} \
         refused by both; lenient parser: {lenient_checked} equal"
    );
    assert!(encoded > 0 && parsed > 0 && lenient_checked > 0);
}
