//! Parsing completion text: reasoning, content and DSML tool calls.
//!
//! # The format
//! In thinking mode the prompt ends with `<think>`, so the reply starts with reasoning, closed by
//! `</think>`. The content follows, up to EOS or to `\n\n<｜DSML｜tool_calls`, which opens a block
//! of tool calls:
//!
//! ```text
//! reasoning…</think>content…
//!
//! <｜DSML｜tool_calls>
//! <｜DSML｜invoke name="get_weather">
//! <｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>
//! <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
//! </｜DSML｜invoke>
//! </｜DSML｜tool_calls><｜end▁of▁sentence｜>
//! ```
//!
//! # Strict and lenient parsing
//! [`parse_completion_strict`] ports the official `parse_message_from_completion_text`: it
//! rejects anything off-format (no `</think>` in thinking mode, missing EOS, text after the tool
//! calls, special tokens in the text, a malformed block).
//!
//! [`StreamParser`] (and [`parse_completion`], which feeds it everything at once) never fails.
//! On every completion the strict parser accepts, both give the same message, provided its
//! tool-call block (if any) is closed by `</｜DSML｜tool_calls>` and no EOS occurs before its end
//! (the reference tolerates an EOS inside a parameter value). Otherwise:
//! * the first EOS ends the completion, and whatever follows it is ignored;
//! * a missing EOS is fine, and text after a tool-call block is more content (a second block is
//!   parsed too);
//! * a tool-call block that is malformed, or not closed when the completion ends, is not a block:
//!   its opening `\n\n<｜DSML｜tool_calls` is ordinary text of the section it appeared in and
//!   parsing goes on right after it;
//! * a `string="false"` value that is not valid JSON becomes a JSON string, so that
//!   [`ParsedToolCall::arguments`] always parses (the reference copies it verbatim);
//! * a think block that is never closed by `</think>` — the completion ends, or a valid
//!   tool-call block starts, first — follows [`UnclosedThink`].
//!
//! # Unclosed think blocks
//! The reference raises on a thinking-mode reply without `</think>`. Routing such a reply to
//! reasoning would hide a complete answer that merely lacks the marker, and routing it to content
//! needs the reasoning held back until `</think>` shows up. [`UnclosedThink::Content`], the
//! default, does that: reasoning is emitted in one piece when `</think>` arrives, and an unclosed
//! block is reported as content. [`UnclosedThink::Reasoning`] streams reasoning as it comes, and an
//! unclosed block stays reasoning (what a truncated generation usually is).
//!
//! Whether the reply starts inside a think block is the prompt's business, not the parser's: the
//! prompt ends with `<think>` exactly when it does ([`StreamParser::for_prompt`]). This matters
//! for a quick-instruction task in thinking mode, whose prompt ends `<think><｜action｜>` and whose
//! reply is plain content.

use serde_json::{json, Value};

use super::dsml::{parse_tool_calls, BlockParse, Mode};
use super::tokens::{BOS, DSML, EOS, THINK_END, THINK_START, TOOL_CALLS_START};
use super::ChatError;

/// A tool call parsed from a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// The tool name.
    pub name: String,
    /// The arguments as a JSON object text, spaced like Python's `json.dumps`
    /// (`{"location": "Beijing", "days": 3}`): the official `decode_dsml_to_arguments`.
    pub arguments: String,
}

impl ParsedToolCall {
    /// The arguments as a JSON value.
    pub fn arguments_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.arguments)
    }
}

/// A parsed assistant reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMessage {
    /// The reasoning (empty in chat mode).
    pub reasoning_content: String,
    /// The reply text.
    pub content: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ParsedToolCall>,
}

impl ParsedMessage {
    /// The message in the shape the official parser returns, which is also an OpenAI-style
    /// assistant message that [`super::render_openai`] accepts back:
    /// `{"role": "assistant", "content", "reasoning_content", "tool_calls": [{"type":
    /// "function", "function": {"name", "arguments"}}]}`.
    pub fn to_openai_message(&self) -> Value {
        let calls: Vec<Value> = self
            .tool_calls
            .iter()
            .map(|c| json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        json!({
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": calls,
        })
    }

    fn apply(&mut self, e: &Event) {
        match e {
            Event::Reasoning(t) => self.reasoning_content.push_str(t),
            Event::Content(t) => self.content.push_str(t),
            Event::ToolCall(c) => self.tool_calls.push(c.clone()),
            Event::Markup(_) => {}
        }
    }
}

/// What the streaming parser reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Reasoning text.
    Reasoning(String),
    /// Reply text.
    Content(String),
    /// A complete, well-formed tool call (emitted when its block closes).
    ToolCall(ParsedToolCall),
    /// Format text the parser consumed: the `</think>` that closes the reasoning, a whole
    /// tool-call block (from `\n\n<｜DSML｜tool_calls` to `</｜DSML｜tool_calls>`, just before its
    /// [`Event::ToolCall`]s) or the final EOS. A display can ignore it; concatenating the text of
    /// all `Reasoning`, `Content` and `Markup` events gives back the input up to and including the
    /// first EOS.
    Markup(String),
}

impl Event {
    /// The text of a text-bearing event.
    pub fn text(&self) -> Option<&str> {
        match self {
            Event::Reasoning(t) | Event::Content(t) | Event::Markup(t) => Some(t),
            Event::ToolCall(_) => None,
        }
    }
}

/// What to do with a think block that the reply never closes with `</think>` (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnclosedThink {
    /// Hold reasoning back until `</think>`; an unclosed block is content. The default.
    #[default]
    Content,
    /// Stream reasoning as it arrives; an unclosed block stays reasoning.
    Reasoning,
}

/// How a [`StreamParser`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParserOptions {
    /// The reply starts inside a think block (the prompt ended with `<think>`).
    pub thinking: bool,
    /// See [`UnclosedThink`].
    pub unclosed_think: UnclosedThink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Reasoning,
    Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the think block.
    Reasoning,
    /// Reply text.
    Content,
    /// Inside a tool-call block opened in the given section.
    Block(Section),
    /// EOS seen or `finish` called.
    Done,
}

/// Incremental completion parser: feed it the text as it is decoded, get [`Event`]s back.
///
/// Text that might be the beginning of `</think>`, `\n\n<｜DSML｜tool_calls` or EOS is held back
/// until the next chunk decides, so `Content` never carries a piece of a tool-call block that
/// is later recognised, and any way of cutting the input into chunks gives the same events up to
/// how consecutive text events of one kind are split.
#[derive(Debug, Clone)]
pub struct StreamParser {
    opts: ParserOptions,
    state: State,
    /// Raw text that may be the start of EOS.
    eos_hold: String,
    /// Reasoning/content text that may be the start of a marker.
    hold: String,
    /// [`UnclosedThink::Content`]: reasoning waiting for `</think>`.
    think_buf: String,
    /// The tool-call block after its opener.
    block: String,
    events: Vec<Event>,
    message: ParsedMessage,
}

impl StreamParser {
    /// A parser for a reply that starts in reasoning (`opts.thinking`) or in content.
    pub fn new(opts: ParserOptions) -> Self {
        StreamParser {
            opts,
            state: if opts.thinking { State::Reasoning } else { State::Content },
            eos_hold: String::new(),
            hold: String::new(),
            think_buf: String::new(),
            block: String::new(),
            events: Vec::new(),
            message: ParsedMessage::default(),
        }
    }

    /// A parser for the reply to `prompt`: it starts in reasoning exactly when the prompt ends with
    /// `<think>` (thinking mode, but not after a quick-instruction task token).
    pub fn for_prompt(prompt: &str, unclosed_think: UnclosedThink) -> Self {
        StreamParser::new(ParserOptions { thinking: prompt.ends_with(THINK_START), unclosed_think })
    }

    /// Feeds the next piece of decoded text; returns the events it completes.
    pub fn push(&mut self, chunk: &str) -> Vec<Event> {
        if self.state != State::Done {
            let mut work = std::mem::take(&mut self.eos_hold);
            work.push_str(chunk);
            if let Some(p) = work.find(EOS) {
                self.feed(&work[..p]);
                self.end(true);
            } else {
                let keep = held_suffix(&work, &[EOS]);
                self.eos_hold = work.split_off(work.len() - keep);
                self.feed(&work);
            }
        }
        self.take_events()
    }

    /// Ends the completion (the generation stopped without EOS, or all text was pushed): flushes
    /// held-back text and settles an open think block or tool-call block. Idempotent.
    pub fn finish(&mut self) -> Vec<Event> {
        if self.state != State::Done {
            let rest = std::mem::take(&mut self.eos_hold);
            self.feed(&rest);
            self.end(false);
        }
        self.take_events()
    }

    /// Whether the completion ended (EOS seen, or [`StreamParser::finish`] called).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The message made of the events emitted so far.
    pub fn message(&self) -> &ParsedMessage {
        &self.message
    }

    /// The message made of all events emitted.
    pub fn into_message(self) -> ParsedMessage {
        self.message
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn emit(&mut self, e: Event) {
        if e.text() == Some("") {
            return;
        }
        self.message.apply(&e);
        self.events.push(e);
    }

    /// Reasoning text: emitted now, or kept until the think block's fate is known.
    fn reasoning_text(&mut self, t: &str) {
        match self.opts.unclosed_think {
            UnclosedThink::Reasoning => self.emit(Event::Reasoning(t.to_string())),
            UnclosedThink::Content => self.think_buf.push_str(t),
        }
    }

    fn section_text(&mut self, section: Section, t: &str) {
        match section {
            Section::Reasoning => self.reasoning_text(t),
            Section::Content => self.emit(Event::Content(t.to_string())),
        }
    }

    /// `</think>` arrived: held reasoning is reasoning.
    fn close_think(&mut self) {
        let t = std::mem::take(&mut self.think_buf);
        self.emit(Event::Reasoning(t));
    }

    /// The think block ended without `</think>`: held reasoning is content.
    fn close_unclosed_think(&mut self) {
        let t = std::mem::take(&mut self.think_buf);
        self.emit(Event::Content(t));
    }

    /// Processes EOS-free text.
    fn feed(&mut self, text: &str) {
        let mut input = text.to_string();
        loop {
            match self.state {
                State::Reasoning => {
                    let mut work = std::mem::take(&mut self.hold);
                    work.push_str(&input);
                    match earliest(&work, &[THINK_END, TOOL_CALLS_START]) {
                        Some((p, THINK_END)) => {
                            self.reasoning_text(&work[..p]);
                            self.close_think();
                            self.emit(Event::Markup(THINK_END.to_string()));
                            self.state = State::Content;
                            input = work[p + THINK_END.len()..].to_string();
                        }
                        Some((p, _)) => {
                            self.reasoning_text(&work[..p]);
                            self.state = State::Block(Section::Reasoning);
                            input = work[p + TOOL_CALLS_START.len()..].to_string();
                        }
                        None => {
                            let keep = held_suffix(&work, &[THINK_END, TOOL_CALLS_START]);
                            self.hold = work.split_off(work.len() - keep);
                            self.reasoning_text(&work);
                            return;
                        }
                    }
                }
                State::Content => {
                    let mut work = std::mem::take(&mut self.hold);
                    work.push_str(&input);
                    match work.find(TOOL_CALLS_START) {
                        Some(p) => {
                            self.emit(Event::Content(work[..p].to_string()));
                            self.state = State::Block(Section::Content);
                            input = work[p + TOOL_CALLS_START.len()..].to_string();
                        }
                        None => {
                            let keep = held_suffix(&work, &[TOOL_CALLS_START]);
                            self.hold = work.split_off(work.len() - keep);
                            self.emit(Event::Content(work));
                            return;
                        }
                    }
                }
                State::Block(origin) => {
                    self.block.push_str(&input);
                    match parse_tool_calls(&self.block, 0, Mode::Stream) {
                        BlockParse::Done { calls, end } => {
                            if origin == Section::Reasoning {
                                self.close_unclosed_think();
                            }
                            let rest = self.block.split_off(end);
                            let block = std::mem::take(&mut self.block);
                            self.emit(Event::Markup(format!("{TOOL_CALLS_START}{block}")));
                            for c in calls {
                                self.emit(Event::ToolCall(c));
                            }
                            self.state = State::Content;
                            input = rest;
                        }
                        BlockParse::Incomplete => return,
                        BlockParse::Malformed(_) => input = self.demote_block(origin),
                    }
                }
                State::Done => return,
            }
        }
    }

    /// The open tool-call block is not one: its opener is text of the section it appeared in, and
    /// the text after the opener is to be parsed again from that section.
    fn demote_block(&mut self, origin: Section) -> String {
        self.section_text(origin, TOOL_CALLS_START);
        self.state = match origin {
            Section::Reasoning => State::Reasoning,
            Section::Content => State::Content,
        };
        std::mem::take(&mut self.block)
    }

    /// The completion ended (`eos`: with EOS).
    fn end(&mut self, eos: bool) {
        loop {
            match self.state {
                State::Block(origin) => {
                    let rest = self.demote_block(origin);
                    self.feed(&rest);
                }
                State::Reasoning => {
                    let t = std::mem::take(&mut self.hold);
                    self.reasoning_text(&t);
                    self.close_unclosed_think();
                    break;
                }
                State::Content => {
                    let t = std::mem::take(&mut self.hold);
                    self.emit(Event::Content(t));
                    break;
                }
                State::Done => break,
            }
        }
        if eos {
            self.emit(Event::Markup(EOS.to_string()));
        }
        self.state = State::Done;
    }
}

/// The earliest occurrence of any of `pats` (the first listed on a tie).
fn earliest(s: &str, pats: &[&'static str]) -> Option<(usize, &'static str)> {
    pats.iter().filter_map(|p| s.find(p).map(|i| (i, *p))).min_by_key(|(i, _)| *i)
}

/// The length of the longest suffix of `s` that is a proper prefix of one of `pats`.
fn held_suffix(s: &str, pats: &[&str]) -> usize {
    let mut best = 0;
    for p in pats {
        for (k, _) in p.char_indices().skip(1) {
            if k > best && s.ends_with(&p[..k]) {
                best = k;
            }
        }
    }
    best
}

/// Parses a whole completion with a [`StreamParser`] (default [`UnclosedThink::Content`]);
/// `thinking`: the reply starts inside the think block (the prompt ended with `<think>`). Never
/// fails; see the module documentation for how it treats off-format text.
pub fn parse_completion(text: &str, thinking: bool) -> ParsedMessage {
    let mut p = StreamParser::new(ParserOptions { thinking, unclosed_think: UnclosedThink::Content });
    p.push(text);
    p.finish();
    p.into_message()
}

/// The official `parse_message_from_completion_text(text, thinking_mode)`: `text` is one whole
/// assistant turn, normally ending with EOS. Returns [`ChatError::Format`] wherever the reference
/// raises; its leniencies are kept too (EOS may be missing after a tool-call block, and a block cut
/// short after a complete invoke header or parameter is accepted as it is).
pub fn parse_completion_strict(text: &str, thinking: bool) -> Result<ParsedMessage, ChatError> {
    let fail = |m: &str| Err(ChatError::Format(m.to_string()));
    let mut msg = ParsedMessage::default();
    let mut index = 0;
    if thinking {
        match earliest(text, &[THINK_END, TOOL_CALLS_START]) {
            Some((p, THINK_END)) => {
                msg.reasoning_content = text[..p].to_string();
                index = p + THINK_END.len();
            }
            _ => return fail("missing </think>"),
        }
    }
    let rest = &text[index..];
    match earliest(rest, &[EOS, TOOL_CALLS_START]) {
        Some((p, TOOL_CALLS_START)) => {
            msg.content = rest[..p].to_string();
            let start = index + p + TOOL_CALLS_START.len();
            let end = match parse_tool_calls(text, start, Mode::Strict) {
                BlockParse::Done { calls, end } => {
                    msg.tool_calls = calls;
                    end
                }
                BlockParse::Malformed(m) => return Err(ChatError::Format(format!("tool calls: {m}"))),
                BlockParse::Incomplete => unreachable!("strict mode always concludes"),
            };
            // Only EOS (or nothing) may follow the block.
            index = match text[end..].find(EOS) {
                Some(0) => end + EOS.len(),
                None if end == text.len() => end,
                _ => return fail("unexpected text after the tool calls"),
            };
        }
        Some((p, _)) => {
            msg.content = rest[..p].to_string();
            index += p + EOS.len();
        }
        None => return fail("missing EOS"),
    }
    if index != text.len() {
        return fail("unexpected text after EOS");
    }
    for sp in [BOS, EOS, THINK_START, THINK_END, DSML] {
        if msg.content.contains(sp) || msg.reasoning_content.contains(sp) {
            return Err(ChatError::Format(format!("special token `{sp}` in the text")));
        }
    }
    Ok(msg)
}
