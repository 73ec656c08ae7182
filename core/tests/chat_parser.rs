//! The streaming completion parser: chunking invariance, losslessness, agreement with the strict
//! port of the official parser, and a bounded randomized (property) test.
//!
//! Invariants checked on every input, in both start modes and both [`UnclosedThink`] policies:
//! 1. **No panic**, whatever the text and however it is cut into chunks.
//! 2. **Lossless**: the text of all `Reasoning`, `Content` and `Markup` events, concatenated in
//!    order, equals the input up to and including its first EOS (the whole input if it has none).
//!    In other words, the emitted reasoning and content are the input minus the recognised markup,
//!    which is exactly: the `</think>` closing the think block, each complete well-formed tool-call
//!    block (`\n\n<｜DSML｜tool_calls` … `</｜DSML｜tool_calls>`), and the first EOS with everything
//!    after it.
//! 3. **Markup is only that**: every `Markup` event is `</think>` (at most once, only when the
//!    reply starts in reasoning), the final EOS, or a tool-call block whose `ToolCall` events,
//!    which follow it directly, are what the strict parser reads from it.
//! 4. **Chunking invariance**: any split of the input into chunks gives the same events as feeding
//!    it at once, once adjacent text events of the same kind are merged. Hence no chunking ever
//!    shows, as content, a piece of text that the whole input shows as markup (the hold-back).
//! 5. **Held reasoning**: with [`UnclosedThink::Content`], reasoning is only emitted right before
//!    the `</think>` that closes it.
//! 6. **Agreement with the reference**: where the strict parser accepts a completion whose
//!    tool-call block, if any, is closed and which has no EOS before its end, the lenient parser
//!    returns the same message (arguments compared where the strict ones are valid JSON).

use dsv4_core::chat::{
    parse_completion, parse_completion_strict, ChatError, Event, ParsedMessage, ParsedToolCall, ParserOptions,
    StreamParser, UnclosedThink, EOS, THINK_END, TOOL_CALLS_START,
};

const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";

fn opts(thinking: bool, unclosed_think: UnclosedThink) -> ParserOptions {
    ParserOptions { thinking, unclosed_think }
}

fn all_opts() -> [ParserOptions; 4] {
    [
        opts(true, UnclosedThink::Content),
        opts(true, UnclosedThink::Reasoning),
        opts(false, UnclosedThink::Content),
        opts(false, UnclosedThink::Reasoning),
    ]
}

fn run(chunks: &[&str], o: ParserOptions) -> Vec<Event> {
    let mut p = StreamParser::new(o);
    let mut events = vec![];
    for c in chunks {
        events.extend(p.push(c));
    }
    events.extend(p.finish());
    assert!(p.finish().is_empty() && p.push("more").is_empty(), "finish is final");
    events
}

/// Adjacent reasoning or content events merged (markup events are whole units already).
fn normalize(events: Vec<Event>) -> Vec<Event> {
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

fn fold(events: &[Event]) -> ParsedMessage {
    let mut m = ParsedMessage::default();
    for e in events {
        match e {
            Event::Reasoning(t) => m.reasoning_content.push_str(t),
            Event::Content(t) => m.content.push_str(t),
            Event::ToolCall(c) => m.tool_calls.push(c.clone()),
            Event::Markup(_) => {}
        }
    }
    m
}

fn same_calls(lenient: &[ParsedToolCall], strict: &[ParsedToolCall]) -> bool {
    lenient.len() == strict.len()
        && lenient
            .iter()
            .zip(strict)
            .all(|(l, s)| l.name == s.name && (s.arguments_json().is_err() || l.arguments == s.arguments))
}

/// Invariants 2, 3, 5 and 6 on the events of one input; returns the normalised events.
fn check_invariants(input: &str, o: ParserOptions, events: Vec<Event>) -> Vec<Event> {
    // 2. Lossless.
    let upto = input.find(EOS).map_or(input.len(), |p| p + EOS.len());
    let text: String = events.iter().filter_map(Event::text).collect();
    assert_eq!(text, &input[..upto], "lossless, {o:?}");

    // 3. Markup.
    let mut think_ends = 0;
    for (i, e) in events.iter().enumerate() {
        let Event::Markup(m) = e else {
            continue;
        };
        if m == THINK_END {
            think_ends += 1;
            assert!(o.thinking, "</think> markup in a reply that starts in content: {input:?}");
            // 5. Held reasoning comes right before its `</think>`.
            if o.unclosed_think == UnclosedThink::Content {
                let before: Vec<&Event> = events[..i].iter().collect();
                assert!(
                    before.iter().all(|e| !matches!(e, Event::Content(_) | Event::ToolCall(_) | Event::Markup(_))),
                    "{input:?}"
                );
            }
        } else if m == EOS {
            assert_eq!(i, events.len() - 1, "EOS is last: {input:?}");
        } else {
            assert!(m.starts_with(TOOL_CALLS_START) && m.ends_with(TOOL_CALLS_END), "odd markup {m:?} in {input:?}");
            let calls: Vec<ParsedToolCall> = events[i + 1..]
                .iter()
                .map_while(|e| match e {
                    Event::ToolCall(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            let strict = parse_completion_strict(&format!("{m}{EOS}"), false)
                .unwrap_or_else(|e| panic!("a recognised block the strict parser rejects ({e}): {m:?}"));
            assert!(same_calls(&calls, &strict.tool_calls), "{m:?}: {calls:?} vs {:?}", strict.tool_calls);
        }
    }
    assert!(think_ends <= 1);
    if o.unclosed_think == UnclosedThink::Content && think_ends == 0 {
        assert!(!events.iter().any(|e| matches!(e, Event::Reasoning(_))), "{input:?}");
    }

    // 6. Agreement with the strict port.
    if let Ok(strict) = parse_completion_strict(input, o.thinking) {
        let body = input.strip_suffix(EOS).unwrap_or(input);
        if !body.contains(EOS) && (!body.contains(TOOL_CALLS_START) || body.ends_with(TOOL_CALLS_END)) {
            let lenient = fold(&events);
            assert_eq!(lenient.content, strict.content, "{input:?}");
            assert_eq!(lenient.reasoning_content, strict.reasoning_content, "{input:?}");
            assert!(same_calls(&lenient.tool_calls, &strict.tool_calls), "{input:?}");
        }
    }
    normalize(events)
}

fn char_bounds(s: &str) -> Vec<usize> {
    s.char_indices().map(|(i, _)| i).skip(1).collect()
}

// ------------------------------------------------------------------------------------------
// Every split of a set of inputs
// ------------------------------------------------------------------------------------------

fn corpus() -> Vec<String> {
    let block = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
                 <｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n\
                 <｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
                 </｜DSML｜tool_calls>";
    vec![
        format!("I should look it up.</think>{block}{EOS}"),
        format!("Thinking.</think>The answer is 4.{EOS}"),
        format!("Short</think>Text\n\n<｜DSML｜tool_callz> not a block\n\n{EOS}trailing ignored"),
        "never closes the think block".to_string(),
        format!("planning{block}{EOS}"),
        format!("a</think>b\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\nX</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"),
        format!("r</think>c{block}after{block}"),
        "<｜end▁of▁sent not EOS</thin></think>\n\n<｜DSML｜tool_calls".to_string(),
        format!("x</think>\n\n\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>{EOS}"),
        format!("思考</think>{block}"),
    ]
}

#[test]
fn every_split_gives_the_same_events() {
    let mut runs = 0usize;
    for input in corpus() {
        for o in all_opts() {
            let whole = check_invariants(&input, o, run(&[&input], o));
            let bounds = char_bounds(&input);
            let mut check = |chunks: &[&str]| {
                let got = check_invariants(&input, o, run(chunks, o));
                assert_eq!(got, whole, "{chunks:?} {o:?}");
                runs += 1;
            };
            // Every split into two chunks, every split into three for the shorter inputs, and
            // one character at a time.
            for &i in &bounds {
                check(&[&input[..i], &input[i..]]);
            }
            if input.chars().count() <= 120 {
                for (a, &i) in bounds.iter().enumerate() {
                    for &j in &bounds[a + 1..] {
                        check(&[&input[..i], &input[i..j], &input[j..]]);
                    }
                }
            }
            let chars: Vec<String> = input.chars().map(String::from).collect();
            check(&chars.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    assert!(runs > 50_000, "{runs}");
}

// ------------------------------------------------------------------------------------------
// Behaviour
// ------------------------------------------------------------------------------------------

#[test]
fn hold_back_never_shows_a_block_prefix_as_content() {
    let mut p = StreamParser::new(opts(false, UnclosedThink::Content));
    assert_eq!(p.push("Let me check.\n"), vec![Event::Content("Let me check.".into())]);
    assert_eq!(p.push("\n<｜DSML｜tool"), vec![]);
    assert_eq!(p.push("_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n"), vec![]);
    let ev = p.push("</｜DSML｜tool_calls><｜end▁of");
    assert!(
        matches!(&ev[..], [Event::Markup(_), Event::ToolCall(c)] if c.name == "f" && c.arguments == "{}"),
        "{ev:?}"
    );
    assert_eq!(p.push("▁sentence｜>"), vec![Event::Markup(EOS.into())]);
    assert!(p.is_done());

    // A partial marker that turns out not to be one is released as soon as that is clear.
    let mut p = StreamParser::new(opts(false, UnclosedThink::Content));
    assert_eq!(p.push("a\n\n<｜DS"), vec![Event::Content("a".into())]);
    assert_eq!(p.push("x"), vec![Event::Content("\n\n<｜DSx".into())]);
}

#[test]
fn unclosed_think_blocks() {
    // Default: held back, then content.
    let mut p = StreamParser::new(opts(true, UnclosedThink::Content));
    assert_eq!(p.push("The answer is 42."), vec![]);
    assert_eq!(p.push(EOS), vec![Event::Content("The answer is 42.".into()), Event::Markup(EOS.into())]);
    assert_eq!(parse_completion("no marker at all", true).content, "no marker at all");
    // Closed: reasoning, in one piece.
    let mut p = StreamParser::new(opts(true, UnclosedThink::Content));
    assert_eq!(p.push("hmm"), vec![]);
    assert_eq!(
        p.push(" ok</think>Yes"),
        vec![Event::Reasoning("hmm ok".into()), Event::Markup(THINK_END.into()), Event::Content("Yes".into())]
    );
    // Live: streamed, and an unclosed block stays reasoning.
    let mut p = StreamParser::new(opts(true, UnclosedThink::Reasoning));
    assert_eq!(p.push("step 1</th"), vec![Event::Reasoning("step 1".into())]);
    assert_eq!(p.push("ought"), vec![Event::Reasoning("</thought".into())]);
    assert_eq!(p.finish(), vec![]);
    assert_eq!(p.message().reasoning_content, "step 1</thought");
    // A tool-call block ends an unclosed think block too.
    let m = parse_completion(
        "I'll call it.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        true,
    );
    assert_eq!((m.reasoning_content.as_str(), m.content.as_str(), m.tool_calls.len()), ("", "I'll call it.", 1));
    // The prompt decides where the reply starts.
    let p = StreamParser::for_prompt("<｜User｜>hi<｜Assistant｜><think>", UnclosedThink::Content);
    assert_eq!(p.clone().finish(), vec![]);
    let mut p = StreamParser::for_prompt("<｜User｜>hi<｜Assistant｜></think>", UnclosedThink::Content);
    assert_eq!(p.push("x</think>y"), vec![Event::Content("x</think>y".into())]);
}

#[test]
fn malformed_and_lenient_tool_calls() {
    // Malformed: text of the section it is in.
    let bad = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let m = parse_completion(&format!("ok{bad}{EOS}"), false);
    assert_eq!(m.content, format!("ok{bad}"));
    assert!(m.tool_calls.is_empty());
    let m = parse_completion(&format!("think{bad}</think>done"), true);
    assert_eq!((m.reasoning_content, m.content), (format!("think{bad}"), "done".to_string()));
    assert!(matches!(parse_completion_strict(&format!("ok{bad}{EOS}"), false), Err(ChatError::Format(_))));

    // Unclosed at the end: text.
    let cut = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n";
    assert_eq!(parse_completion(cut, false).content, cut);
    // ... which the reference accepts as a call without arguments.
    let strict = parse_completion_strict(cut, false).unwrap();
    assert_eq!(strict.tool_calls, vec![ParsedToolCall { name: "f".into(), arguments: "{}".into() }]);

    // `string="false"` that is not JSON: quoted by the lenient parser, verbatim in the reference.
    let t = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
             <｜DSML｜parameter name=\"n\" string=\"false\">seven</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"s\" string=\"true\">a \"q\"\n</｜DSML｜parameter>\n\
             </｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    assert_eq!(parse_completion(t, false).tool_calls[0].arguments, r#"{"n": "seven", "s": "a \"q\"\n"}"#);
    assert_eq!(parse_completion_strict(t, false).unwrap().tool_calls[0].arguments, r#"{"n": seven, "s": "a \"q\"\n"}"#);

    // Duplicate parameters make the block malformed.
    let dup = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
               <｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n\
               <｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n\
               </｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    assert!(parse_completion(dup, false).tool_calls.is_empty());
    assert!(parse_completion_strict(dup, false).unwrap_err().to_string().contains("duplicate parameter"));

    // The strict parser's other refusals.
    for (text, thinking, why) in [
        ("no think end<｜end▁of▁sentence｜>", true, "missing </think>"),
        ("no eos", false, "missing EOS"),
        ("x<｜end▁of▁sentence｜>y", false, "after EOS"),
        ("a<think>b<｜end▁of▁sentence｜>", false, "special token `<think>`"),
    ] {
        let e = parse_completion_strict(text, thinking).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn openai_message_shape() {
    let m = parse_completion(
        "r</think>c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
         <｜DSML｜parameter name=\"x\" string=\"false\">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
         </｜DSML｜tool_calls><｜end▁of▁sentence｜>",
        true,
    );
    assert_eq!(
        serde_json::to_string(&m.to_openai_message()).unwrap(),
        r#"{"role":"assistant","content":"c","reasoning_content":"r","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{\"x\": [1, 2]}"}}]}"#
    );
}

// ------------------------------------------------------------------------------------------
// Bounded randomized test
// ------------------------------------------------------------------------------------------

/// SplitMix64: a small deterministic generator, so that a failing case can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const ALPHABET: &[&str] = &[
    "<",
    "｜",
    "DSML",
    "｜DSML｜",
    "</think>",
    "</th",
    "<think>",
    "\n",
    "\n\n",
    "\"",
    " ",
    ">",
    "/",
    ">\n",
    "a",
    "é",
    "{",
    "}",
    "1",
    "true",
    EOS,
    "<｜end▁of",
    TOOL_CALLS_START,
    "<｜DSML｜tool_calls>",
    "<｜DSML｜invoke",
    "</｜DSML｜invoke>",
    "<｜DSML｜parameter",
    "</｜DSML｜parameter>",
    "/｜DSML｜parameter",
    TOOL_CALLS_END,
    " name=\"",
    "name=\"f\">\n",
    "\" string=\"true\">",
    "\" string=\"false\">",
];

/// A well-formed reply (reasoning, content, 0-2 tool calls, EOS or not), to be mutated.
fn well_formed(rng: &mut Rng, thinking: bool) -> String {
    let mut s = String::new();
    if thinking {
        s.push_str(["plan", "", "多步\n推理"][rng.below(3)]);
        s.push_str(THINK_END);
    }
    s.push_str(["", "Answer.", "a\n\nb"][rng.below(3)]);
    let calls = rng.below(3);
    if calls > 0 {
        s.push_str(TOOL_CALLS_START);
        s.push_str(">\n");
        for _ in 0..calls {
            s.push_str("<｜DSML｜invoke name=\"f\">\n");
            for (k, v) in [("a", "\" string=\"true\">x y"), ("b", "\" string=\"false\">[1, {\"c\": null}]")]
                .iter()
                .take(rng.below(3))
            {
                s.push_str(&format!("<｜DSML｜parameter name=\"{k}{v}</｜DSML｜parameter>\n"));
            }
            s.push_str("</｜DSML｜invoke>\n");
        }
        s.push_str(TOOL_CALLS_END);
    }
    if rng.below(4) > 0 {
        s.push_str(EOS);
    }
    s
}

fn random_input(rng: &mut Rng, thinking: bool) -> String {
    if rng.below(2) == 0 {
        // Pure alphabet soup.
        (0..rng.below(40)).map(|_| ALPHABET[rng.below(ALPHABET.len())]).collect()
    } else {
        // A well-formed reply with a few random edits (on char boundaries).
        let mut s = well_formed(rng, thinking);
        for _ in 0..rng.below(4) {
            let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
            let i = bounds[rng.below(bounds.len())];
            match rng.below(3) {
                0 => s.insert_str(i, ALPHABET[rng.below(ALPHABET.len())]),
                1 => {
                    let j =
                        bounds[(bounds.iter().position(|&b| b == i).unwrap() + 1 + rng.below(8)).min(bounds.len() - 1)];
                    s.replace_range(i..j, "");
                }
                _ => s.truncate(i),
            }
        }
        s
    }
}

#[test]
fn randomized_inputs_and_chunkings() {
    let cases: u64 = std::env::var("DSV4_CHAT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let mut chunked_runs = 0u64;
    let mut strict_accepted = 0u64;
    for seed in 0..cases {
        let mut rng = Rng(seed);
        let o = all_opts()[rng.below(4)];
        let input = random_input(&mut rng, o.thinking);
        if parse_completion_strict(&input, o.thinking).is_ok() {
            strict_accepted += 1;
        }
        let whole = check_invariants(&input, o, run(&[&input], o));
        assert_eq!(fold(&whole), parse_completion_with(&input, o), "seed {seed}");
        for _ in 0..3 {
            let bounds: Vec<usize> = (0..=input.len()).filter(|&i| input.is_char_boundary(i)).collect();
            let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| bounds[rng.below(bounds.len())]).collect();
            cuts.extend([0, input.len()]);
            cuts.sort_unstable();
            let chunks: Vec<&str> = cuts.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            let got = check_invariants(&input, o, run(&chunks, o));
            assert_eq!(got, whole, "seed {seed}, chunks {chunks:?}");
            chunked_runs += 1;
        }
    }
    eprintln!("{cases} random inputs ({strict_accepted} accepted by the strict parser), {chunked_runs} chunked runs");
    assert!(strict_accepted > cases / 20, "the generator should produce valid replies too: {strict_accepted}");
}

fn parse_completion_with(input: &str, o: ParserOptions) -> ParsedMessage {
    if o.unclosed_think == UnclosedThink::Content {
        return parse_completion(input, o.thinking);
    }
    let mut p = StreamParser::new(o);
    p.push(input);
    p.finish();
    p.into_message()
}
