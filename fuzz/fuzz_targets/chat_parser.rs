//! The streaming chat-completion parser on arbitrary text, cut into arbitrary chunks. Findings:
//! a panic; lost or invented text (the text of the Reasoning, Content and Markup events must be
//! the input up to its first EOS); a chunking that changes the events; a disagreement with the
//! strict port of the official parser on a completion it accepts (see core/tests/chat_parser.rs).

#![no_main]

use dsv4_core::chat::{
    parse_completion_strict, Event, ParsedMessage, ParserOptions, StreamParser, UnclosedThink, EOS, TOOL_CALLS_START,
};
use libfuzzer_sys::fuzz_target;

fn run(chunks: &[&str], o: ParserOptions) -> Vec<Event> {
    let mut p = StreamParser::new(o);
    let mut events = vec![];
    for c in chunks {
        events.extend(p.push(c));
    }
    events.extend(p.finish());
    // Adjacent reasoning or content events merged.
    let mut out: Vec<Event> = vec![];
    for e in events {
        match (out.last_mut(), e) {
            (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
            (Some(Event::Content(a)), Event::Content(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Ok(input) = std::str::from_utf8(rest) else {
        return;
    };
    let o = ParserOptions {
        thinking: ctl & 1 != 0,
        unclosed_think: if ctl & 2 != 0 { UnclosedThink::Reasoning } else { UnclosedThink::Content },
    };
    let whole = run(&[input], o);

    let upto = input.find(EOS).map_or(input.len(), |p| p + EOS.len());
    let text: String = whole.iter().filter_map(Event::text).collect();
    assert_eq!(text, &input[..upto]);

    // Cut points from the control byte: every `step`-th char boundary, step in 1..=64.
    let step = usize::from(ctl >> 2) + 1;
    let bounds: Vec<usize> = input.char_indices().map(|(i, _)| i).skip(1).step_by(step).collect();
    let mut chunks = vec![];
    let mut from = 0;
    for b in bounds {
        chunks.push(&input[from..b]);
        from = b;
    }
    chunks.push(&input[from..]);
    assert_eq!(run(&chunks, o), whole);

    if let Ok(strict) = parse_completion_strict(input, o.thinking) {
        let body = input.strip_suffix(EOS).unwrap_or(input);
        if !body.contains(EOS) && (!body.contains(TOOL_CALLS_START) || body.ends_with("</｜DSML｜tool_calls>")) {
            let mut m = ParsedMessage::default();
            for e in &whole {
                match e {
                    Event::Reasoning(t) => m.reasoning_content.push_str(t),
                    Event::Content(t) => m.content.push_str(t),
                    Event::ToolCall(c) => m.tool_calls.push(c.clone()),
                    Event::Markup(_) => {}
                }
            }
            assert_eq!(m.content, strict.content);
            assert_eq!(m.reasoning_content, strict.reasoning_content);
            assert_eq!(m.tool_calls.len(), strict.tool_calls.len());
            for (l, s) in m.tool_calls.iter().zip(&strict.tool_calls) {
                assert_eq!(l.name, s.name);
                if s.arguments_json().is_ok() {
                    assert_eq!(l.arguments, s.arguments);
                }
            }
        }
    }
});
