//! The chat encoder against DeepSeek's four official test vectors (byte for byte), plus
//! snapshot cases for the paths those vectors miss, and the parser on every assistant turn of
//! the rendered prompts.

use std::path::PathBuf;

use dsv4_core::chat::{
    encode_messages, encode_messages_with_context, parse_completion, parse_completion_strict, render_openai, ChatError,
    EncodeOptions, EncoderRevision, Message, ParsedMessage, ReasoningEffort, Role, StreamParser, ThinkingMode,
    UnclosedThink, ASSISTANT, EOS, REASONING_EFFORT_BEYOND_MAX, REASONING_EFFORT_MAX, THINK_END, THINK_START,
};
use serde_json::{json, Value};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/chat_vectors")
}

fn read(name: &str) -> String {
    let p = vectors().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json_file(name: &str) -> Value {
    serde_json::from_str(&read(name)).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array().unwrap().iter().map(|m| Message::from_json(m).unwrap()).collect()
}

fn thinking() -> EncodeOptions {
    EncodeOptions::new(ThinkingMode::Thinking)
}

fn chat() -> EncodeOptions {
    EncodeOptions::new(ThinkingMode::Chat)
}

/// Every assistant reply in `prompt`: (whether it starts inside `<think>`, its text through EOS).
/// A reply starts after `<｜Assistant｜>`, the think token and a task token if there is one.
fn assistant_turns(prompt: &str) -> Vec<(bool, &str)> {
    let mut out = vec![];
    let mut from = 0;
    while let Some(p) = prompt[from..].find(ASSISTANT) {
        let mut start = from + p + ASSISTANT.len();
        let thinking = prompt[start..].starts_with(THINK_START);
        start += if thinking { THINK_START.len() } else { THINK_END.len() };
        for task in ["<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>"]
        {
            if prompt[start..].starts_with(task) {
                start += task.len();
            }
        }
        let Some(e) = prompt[start..].find(EOS) else { break };
        let end = start + e + EOS.len();
        out.push((thinking, &prompt[start..end]));
        from = end;
    }
    out
}

/// The assistant messages of `msgs` must parse back from the rendered prompt: reasoning (where
/// the prompt kept it), content and tool calls, with the strict and the streaming parser alike.
fn assert_turns_parse_back(prompt: &str, msgs: &[Message]) {
    let assistants: Vec<&Message> = msgs.iter().filter(|m| m.role == Role::Assistant && !m.wo_eos).collect();
    let turns = assistant_turns(prompt);
    assert_eq!(turns.len(), assistants.len(), "{prompt}");
    for ((thinking, turn), m) in turns.into_iter().zip(assistants) {
        let strict = parse_completion_strict(turn, thinking).unwrap_or_else(|e| panic!("{e}: {turn:?}"));
        assert_eq!(parse_completion(turn, thinking), strict, "{turn:?}");
        let mut sp = StreamParser::for_prompt(&prompt[..prompt.find(turn).unwrap()], UnclosedThink::Reasoning);
        for c in turn.chars() {
            sp.push(&c.to_string());
        }
        sp.finish();
        assert_eq!(sp.message(), &strict, "{turn:?}");

        let content = match &m.content {
            Some(dsv4_core::chat::Content::Text(t)) => t.clone(),
            _ => String::new(),
        };
        assert_eq!(strict.content, content);
        if thinking {
            assert_eq!(strict.reasoning_content, m.reasoning_content.clone().unwrap_or_default());
        }
        let want: Vec<(String, Value)> = m
            .tool_calls
            .iter()
            .flatten()
            .map(|tc| {
                // The encoder's fallback for arguments that are not JSON: one `arguments` parameter.
                let raw = tc.function.arguments.as_str().unwrap();
                let args = serde_json::from_str(raw).unwrap_or_else(|_| json!({ "arguments": raw }));
                (tc.function.name.clone(), args)
            })
            .collect();
        let got: Vec<(String, Value)> =
            strict.tool_calls.iter().map(|c| (c.name.clone(), c.arguments_json().unwrap())).collect();
        assert_eq!(got, want);
    }
}

// ------------------------------------------------------------------------------------------
// The official vectors
// ------------------------------------------------------------------------------------------

#[test]
fn official_vector_1_thinking_with_tools() {
    let td = json_file("test_input_1.json");
    let gold = read("test_output_1.txt");
    // The official test attaches the tools to messages[0].
    let mut msgs = messages(&td["messages"]);
    msgs[0].tools = Some(td["tools"].as_array().unwrap().clone());
    let prompt = encode_messages(&msgs, &thinking()).unwrap();
    assert_eq!(prompt, gold);
    // `render_openai` does the same from the file as it is, or with the tools passed apart.
    assert_eq!(render_openai(&td, None, true, None).unwrap(), gold);
    assert_eq!(render_openai(&td["messages"], Some(&td["tools"]), true, None).unwrap(), gold);

    // The official test's own round trip.
    let marker = format!("{ASSISTANT}{THINK_START}");
    let first_start = prompt.find(&marker).unwrap() + marker.len();
    let first_end = first_start + prompt[first_start..].find("<｜User｜>").unwrap();
    let tc = parse_completion_strict(&prompt[first_start..first_end], true).unwrap();
    assert_eq!(
        tc.reasoning_content,
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
    );
    assert_eq!(tc.content, "");
    assert_eq!(tc.tool_calls.len(), 1);
    assert_eq!(tc.tool_calls[0].name, "get_weather");
    assert_eq!(tc.tool_calls[0].arguments_json().unwrap(), json!({"location": "Beijing", "unit": "celsius"}));
    let last_start = prompt.rfind(&marker).unwrap() + marker.len();
    let fin = parse_completion_strict(&prompt[last_start..], true).unwrap();
    assert_eq!(fin.reasoning_content, "Got the weather data. Let me format a nice response.");
    assert!(fin.content.contains("22°C"));
    assert!(fin.tool_calls.is_empty());

    assert_turns_parse_back(&prompt, &msgs);
}

#[test]
fn official_vector_2_drop_thinking() {
    let msgs = messages(&json_file("test_input_2.json"));
    let prompt = encode_messages(&msgs, &thinking()).unwrap();
    assert_eq!(prompt, read("test_output_2.txt"));
    assert!(!prompt.contains("The user said hello"));
    let marker = format!("{ASSISTANT}{THINK_START}");
    let parsed = parse_completion_strict(&prompt[prompt.rfind(&marker).unwrap() + marker.len()..], true).unwrap();
    assert_eq!(
        parsed,
        ParsedMessage {
            reasoning_content: "The user asks about the capital of France. It is Paris.".into(),
            content: "The capital of France is Paris.".into(),
            tool_calls: vec![],
        }
    );
    assert_turns_parse_back(&prompt, &msgs);
}

#[test]
fn official_vector_3_developer_tools_and_latest_reminder() {
    let v = json_file("test_input_3.json");
    let prompt = encode_messages(&messages(&v), &thinking()).unwrap();
    assert_eq!(prompt, read("test_output_3.txt"));
    assert_eq!(render_openai(&v, None, true, None).unwrap(), prompt);
    assert_turns_parse_back(&prompt, &messages(&v));
}

#[test]
fn official_vector_4_chat_mode_action_task() {
    let v = json_file("test_input_4.json");
    let prompt = encode_messages(&messages(&v), &chat()).unwrap();
    assert_eq!(prompt, read("test_output_4.txt"));
    assert_eq!(render_openai(&v, None, false, None).unwrap(), prompt);
    assert_turns_parse_back(&prompt, &messages(&v));
}

// ------------------------------------------------------------------------------------------
// Further cases, pinned as snapshots
// ------------------------------------------------------------------------------------------

fn render(v: Value, opts: &EncodeOptions) -> String {
    encode_messages(&messages(&v), opts).unwrap()
}

#[test]
fn multi_turn_drop_thinking() {
    let v = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Trivial.", "content": "4"},
        {"role": "developer", "content": "Answer in French from now on."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning_content": "Six, in French.", "content": "six"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "user", "content": "Show your work."}
    ]);
    let prompt = render(v.clone(), &thinking());
    // Earlier reasoning and the earlier developer message are gone; the two last user messages
    // are merged into one.
    assert!(!prompt.contains("Trivial.") && !prompt.contains("Six, in French.") && !prompt.contains("French from"));
    insta::assert_snapshot!("multi_turn_drop_thinking", prompt);

    let mut keep = thinking();
    keep.drop_thinking = false;
    let prompt = render(v, &keep);
    assert!(prompt.contains("Trivial.</think>4") && prompt.contains("Answer in French"));
    insta::assert_snapshot!("multi_turn_keep_thinking", prompt);
}

#[test]
fn tool_results_follow_call_order() {
    let v = json!([
        {"role": "system", "content": "", "tools": [
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        ]},
        {"role": "user", "content": "Look up a, b and c."},
        {"role": "assistant", "reasoning_content": "Three lookups.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"key\": \"a\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{\"key\": \"b\"}"}},
            {"type": "function", "function": {"id": "c3", "name": "lookup", "arguments": "{\"key\": \"c\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "c3", "content": "C"},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "zz", "content": "unknown id"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "B1"}, {"type": "image_url"}]},
        {"role": "user", "content": "Summarise."}
    ]);
    let prompt = render(v.clone(), &thinking());
    // Unknown ids rank like the first call; the sort is stable.
    let a = prompt.find("<tool_result>A<").unwrap();
    let z = prompt.find("<tool_result>unknown id<").unwrap();
    let b = prompt.find("<tool_result>B1\n\n[Unsupported image_url]<").unwrap();
    let c = prompt.find("<tool_result>C<").unwrap();
    assert!(a < z && z < b && b < c, "{prompt}");
    assert!(prompt.ends_with("</tool_result>\n\nSummarise.<｜Assistant｜><think>"));
    insta::assert_snapshot!("tool_results_follow_call_order", prompt);
}

#[test]
fn chat_mode_with_typed_arguments() {
    let v = json!([
        {"role": "user", "content": "Book it."},
        {"role": "assistant", "content": "Booking.", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "book", "arguments":
                "{\"city\": \"Zürich\", \"nights\": 2, \"price\": 1e-5, \"big\": 1e16, \"ok\": true, \"tags\": [\"a\", null], \"who\": {\"n\": \"Bob \\\"B\\\"\\n\"}, \"ratio\": 0.5}"}},
            {"id": "y", "type": "function", "function": {"name": "noop", "arguments": "{}"}},
            {"id": "z", "type": "function", "function": {"name": "raw", "arguments": "not json"}}
        ]},
        {"role": "tool", "tool_call_id": "x", "content": "booked"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks"}
    ]);
    let prompt = render(v.clone(), &chat());
    assert!(prompt.contains(r#"<｜DSML｜parameter name="price" string="false">1e-05</｜DSML｜parameter>"#));
    assert!(prompt.contains(r#"<｜DSML｜parameter name="big" string="false">1e+16</｜DSML｜parameter>"#));
    assert!(prompt.contains(r#"<｜DSML｜parameter name="who" string="false">{"n": "Bob \"B\"\n"}</｜DSML｜parameter>"#));
    assert!(prompt.contains(r#"<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>"#));
    assert!(prompt.ends_with("<｜User｜>Thanks<｜Assistant｜></think>"));
    insta::assert_snapshot!("chat_mode_with_typed_arguments", prompt);
    assert_turns_parse_back(&prompt, &messages(&v));
}

#[test]
fn reasoning_effort() {
    let v = json!([{"role": "system", "content": "S"}, {"role": "user", "content": "Prove it."}]);
    let mut max = thinking();
    max.reasoning_effort = Some(ReasoningEffort::Max);
    let prompt = render(v.clone(), &max);
    assert!(prompt.starts_with(&format!("<｜begin▁of▁sentence｜>{REASONING_EFFORT_MAX}S<｜User｜>")));
    insta::assert_snapshot!("reasoning_effort_max", prompt);
    assert_eq!(render_openai(&v, None, true, Some("max")).unwrap(), prompt);

    // Each level's spelling parses back to it.
    for e in [ReasoningEffort::Low, ReasoningEffort::High, ReasoningEffort::Max] {
        assert_eq!(e.as_str().parse::<ReasoningEffort>().unwrap(), e);
    }

    // High adds nothing; chat mode ignores the effort.
    assert_eq!(render_openai(&v, None, true, Some("high")).unwrap(), render(v.clone(), &thinking()));
    assert_eq!(render_openai(&v, None, false, Some("max")).unwrap(), render(v.clone(), &chat()));

    // The 0731 encoder's ladder.
    let mut r = thinking();
    r.revision = EncoderRevision::Rev0731;
    assert_eq!(render(v.clone(), &r), render(v.clone(), &thinking()));
    r.reasoning_effort = Some(ReasoningEffort::High);
    assert_eq!(render(v.clone(), &r), prompt);
    r.reasoning_effort = Some(ReasoningEffort::Max);
    assert!(render(v.clone(), &r).starts_with(&format!("<｜begin▁of▁sentence｜>{REASONING_EFFORT_BEYOND_MAX}S")));
    let mut low = thinking();
    low.reasoning_effort = Some(ReasoningEffort::Low);
    assert!(matches!(encode_messages(&messages(&v), &low), Err(ChatError::ReasoningEffort { .. })));
}

#[test]
fn developer_latest_reminder_and_response_format() {
    let v = json!([
        {"role": "system", "content": "You are DeepSeek."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "Greeting.", "content": "Hello!"},
        {"role": "latest_reminder", "content": "2026-05-01,Paris,App,English"},
        {"role": "developer", "content": "Reply as JSON.", "response_format":
            {"type": "object", "properties": {"answer": {"type": "string"}}}},
        {"role": "latest_reminder", "content": "late reminder"}
    ]);
    let prompt = render(v.clone(), &thinking());
    assert!(prompt.contains(
        "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{\"type\": \"object\""
    ));
    // The developer message is answered after the reminder that follows it.
    assert!(prompt.ends_with("<｜Assistant｜><think><｜latest_reminder｜>late reminder"));
    insta::assert_snapshot!("developer_latest_reminder_and_response_format", prompt);
}

#[test]
fn tasks_and_prefix_continuation() {
    let v = json!([
        {"role": "user", "content": "A page title please", "task": "title"},
        {"role": "assistant", "content": "Title"},
        {"role": "user", "content": "Search the web?", "task": "action"},
        {"role": "assistant", "content": "Sea", "wo_eos": true}
    ]);
    let prompt = render(v, &thinking());
    assert_eq!(
        prompt,
        "<｜begin▁of▁sentence｜><｜User｜>A page title please<｜title｜>Title<｜end▁of▁sentence｜>\
         <｜User｜>Search the web?<｜Assistant｜><think><｜action｜>Sea"
    );
    // The reply to a task prompt is content even in thinking mode.
    let mut p = StreamParser::for_prompt(&prompt, UnclosedThink::Content);
    p.push("rch");
    p.push(EOS);
    assert_eq!(p.message().content, "rch");
}

#[test]
fn render_openai_attaches_tools_to_the_first_system_message() {
    let tools = json!([{"type": "function", "function": {"name": "f", "description": "d"}}, {"name": "g"}]);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let prompt = render_openai(&msgs, Some(&tools), false, None).unwrap();
    assert!(prompt.starts_with("<｜begin▁of▁sentence｜>\n\n## Tools\n\n"), "{prompt}");
    assert!(prompt.contains("\n{\"name\": \"f\", \"description\": \"d\"}\n{\"name\": \"g\"}\n\nYou MUST"));
    insta::assert_snapshot!("render_openai_tools_without_system", prompt);

    let msgs = json!([
        {"role": "user", "content": "first"},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": "hi"}
    ]);
    let prompt = render_openai(&msgs, Some(&json!({"tools": tools})), true, None).unwrap();
    assert!(prompt.contains("late system\n\n## Tools"));
    // Tools disable drop_thinking, so the user is answered with <think> throughout.
    assert!(prompt.starts_with("<｜begin▁of▁sentence｜><｜User｜>first<｜User｜>") || prompt.contains("first"));
    // An empty list attaches nothing.
    assert_eq!(
        render_openai(&json!([{"role": "user", "content": "x"}]), Some(&json!([])), false, None).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜></think>"
    );
}

#[test]
fn context_is_not_rendered_again() {
    let ctx = messages(&json!([
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "reasoning_content": "r1", "content": "1"}
    ]));
    let msgs = messages(&json!([{"role": "user", "content": "two"}]));
    let all: Vec<Message> = ctx.iter().chain(&msgs).cloned().collect();
    let full = encode_messages(&all, &thinking()).unwrap();
    let tail = encode_messages_with_context(&ctx, &msgs, &thinking()).unwrap();
    assert_eq!(tail, "<｜User｜>two<｜Assistant｜><think>");
    assert!(full.ends_with(&tail));
}

#[test]
fn errors_are_values() {
    let one = |m: Value| render_openai(&json!([m]), None, true, None).unwrap_err();
    let e = one(json!({"role": "robot", "content": "x"}));
    assert!(
        matches!(e, ChatError::Message { index: 0, .. }) && e.to_string().contains("unknown variant `robot`"),
        "{e}"
    );
    let e = one(json!({"role": "developer", "content": ""}));
    assert!(e.to_string().contains("developer message needs non-empty content"), "{e}");
    let e = one(json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}));
    assert!(e.to_string().contains("`image_url` is not supported"), "{e}");
    let e = one(json!({"role": "user", "content": 5}));
    assert!(e.to_string().contains("content must be a string"), "{e}");
    let e = one(json!({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}));
    assert!(e.to_string().contains("missing field `name`"), "{e}");
    let e = one(json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}));
    assert_eq!(
        e,
        ChatError::ToolCall {
            index: 0,
            call: 0,
            reason: "`arguments` must be a JSON object, but the string holds a list".into()
        }
    );
    let e = one(json!({"role": "system", "content": "x", "tools": [{"type": "function"}]}));
    assert!(e.to_string().contains("tool 0 has no `function`"), "{e}");
    let e = render_openai(&json!([]), None, true, Some("extreme")).unwrap_err();
    assert_eq!(e.to_string(), "invalid reasoning effort `extreme`: expected one of high, max (or low, 0731)");
    assert!(matches!(render_openai(&json!("hi"), None, true, None), Err(ChatError::Messages(_))));
    assert!(matches!(render_openai(&json!([]), Some(&json!([1])), true, None), Err(ChatError::Tools(_))));
}
