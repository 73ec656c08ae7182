//! The DSML tool-call block grammar, as the official `parse_tool_calls` reads it.
//!
//! The block follows `\n\n<｜DSML｜tool_calls` and is read by "read until the next stop string"
//! steps, each checking what lies before the stop:
//!
//! ```text
//! >\n                                       (A) then <｜DSML｜invoke, or </｜DSML｜tool_calls> = end
//! \s*name="NAME">\n                         (B) then <｜DSML｜parameter or </｜DSML｜invoke
//!  name="KEY" string="true|false">VALUE<    (C) then /｜DSML｜parameter
//! >\n                                       (D) then <｜DSML｜parameter (another C) or </｜DSML｜invoke (A)
//! ```
//!
//! B and C are the reference's regular expressions `^\s*name="(.*?)">\n$` and
//! `^ name="(.*?)" string="(true|false)">(.*?)<$` (DOTALL), including Python's `$`, which also
//! matches before one final newline. A repeated parameter name is an error.
//!
//! One function serves two callers. [`Mode::Strict`] is the reference exactly, including what
//! it does at the end of the text (it accepts some truncated blocks). [`Mode::Stream`] is for
//! text that may still grow: a step whose stop string has not arrived yet answers
//! [`BlockParse::Incomplete`] unless what is there already rules every continuation out, so a
//! block is only ever declared malformed when no continuation could make it valid.

use super::parser::ParsedToolCall;
use super::pyjson::write_str;
use super::tokens::{INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN, TOOL_CALLS_END};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The reference `parse_tool_calls` on a complete text.
    Strict,
    /// Text that may grow; `string="false"` values that are not JSON become JSON strings.
    Stream,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BlockParse {
    /// A complete block: its calls, and the byte offset just past it (past
    /// `</｜DSML｜tool_calls>`, or the end of the text when [`Mode::Strict`] ran out of text).
    Done { calls: Vec<ParsedToolCall>, end: usize },
    /// [`Mode::Stream`] only: valid so far, more text needed.
    Incomplete,
    /// Invalid, whatever follows.
    Malformed(String),
}

enum Read<'t> {
    Found { before: &'t str, stop: &'static str, next: usize },
    NotFound { rest: &'t str },
}

/// `_read_until_stop`: the text up to the earliest stop (the first listed on a tie).
fn read_until<'t>(text: &'t str, index: usize, stops: &[&'static str]) -> Read<'t> {
    let rest = &text[index..];
    let mut best: Option<(usize, &'static str)> = None;
    for &s in stops {
        if let Some(p) = rest.find(s) {
            if best.is_none_or(|(bp, _)| p < bp) {
                best = Some((p, s));
            }
        }
    }
    match best {
        Some((p, stop)) => Read::Found { before: &rest[..p], stop, next: index + p + stop.len() },
        None => Read::NotFound { rest },
    }
}

/// Whether `rest` (no stop found in it) can still become `>\n` followed by one of `stops`.
fn separator_may_continue(rest: &str, stops: &[&str]) -> bool {
    if ">\n".starts_with(rest) {
        return true;
    }
    match rest.strip_prefix(">\n") {
        Some(tail) => stops.iter().any(|s| s.starts_with(tail)),
        None => false,
    }
}

/// Python's `\s` (str patterns): Unicode whitespace plus the separators \x1c-\x1f.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `^\s*name="(.*?)">\n$` (DOTALL, Python `$`): the tool name.
fn match_name(content: &str) -> Option<&str> {
    let body = content.trim_start_matches(is_py_space).strip_prefix("name=\"")?;
    // The lazy group takes the shortest name: a match ending before a final extra newline wins.
    body.strip_suffix("\">\n\n").or_else(|| body.strip_suffix("\">\n"))
}

/// Whether a name step without its stop yet can still match.
fn name_may_continue(rest: &str) -> bool {
    let body = rest.trim_start_matches(is_py_space);
    body.starts_with("name=\"") || "name=\"".starts_with(body)
}

/// `^ name="(.*?)" string="(true|false)">(.*?)<$` (DOTALL, Python `$`): key, is-string, value.
fn match_param(content: &str) -> Option<(&str, bool, &str)> {
    let body = content.strip_prefix(" name=\"")?;
    // The value ends with `<`, or `<\n` (Python's `$` before a final newline; shortest value).
    let value_end = if body.ends_with("<\n") {
        body.len() - 2
    } else if body.ends_with('<') {
        body.len() - 1
    } else {
        return None;
    };
    // The lazy key group: the first `" string="true">` / `" string="false">` that leaves room
    // for the value.
    let mut from = 0;
    while let Some(p) = body[from..].find("\" string=\"") {
        let at = from + p;
        let after = &body[at + "\" string=\"".len()..];
        for (flag, is_str) in [("true\">", true), ("false\">", false)] {
            if after.starts_with(flag) {
                let value_start = at + "\" string=\"".len() + flag.len();
                if value_start <= value_end {
                    return Some((&body[..at], is_str, &body[value_start..value_end]));
                }
            }
        }
        from = at + 1;
    }
    None
}

/// Whether a parameter step without its stop yet can still match.
fn param_may_continue(rest: &str) -> bool {
    rest.starts_with(" name=\"") || " name=\"".starts_with(rest)
}

/// `decode_dsml_to_arguments`: `{"key": value, ...}` with Python's JSON spacing; string values
/// are JSON-quoted, others written as they are (in [`Mode::Stream`], quoted too when they are
/// not valid JSON, so that the arguments always parse).
fn decode_arguments(args: &[(&str, bool, &str)], mode: Mode) -> String {
    let mut out = String::from("{");
    for (i, (k, is_str, v)) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_str(&mut out, k);
        out.push_str(": ");
        let quote = *is_str || (mode == Mode::Stream && serde_json::from_str::<serde_json::Value>(v).is_err());
        if quote {
            write_str(&mut out, v);
        } else {
            out.push_str(v);
        }
    }
    out.push('}');
    out
}

/// Parses the tool-call block that starts at `text[index..]` (just after
/// `\n\n<｜DSML｜tool_calls`).
pub(crate) fn parse_tool_calls(text: &str, mut index: usize, mode: Mode) -> BlockParse {
    let malformed = |m: String| BlockParse::Malformed(m);
    let mut calls = Vec::new();
    while index < text.len() {
        // (A) `>\n` up to the next invoke or the end of the block.
        match read_until(text, index, &[INVOKE_OPEN, TOOL_CALLS_END]) {
            Read::Found { before, stop, next } => {
                if before != ">\n" {
                    return malformed(format!("expected `>\\n` before `{stop}`, found {before:?}"));
                }
                index = next;
                if stop == TOOL_CALLS_END {
                    return BlockParse::Done { calls, end: index };
                }
            }
            Read::NotFound { rest } => {
                return match mode {
                    Mode::Stream if separator_may_continue(rest, &[INVOKE_OPEN, TOOL_CALLS_END]) => {
                        BlockParse::Incomplete
                    }
                    Mode::Stream => malformed(format!("expected `>\\n<｜DSML｜invoke`, found {rest:?}")),
                    Mode::Strict if rest != ">\n" => malformed(format!("expected `>\\n`, found {rest:?}")),
                    Mode::Strict => malformed("the tool-call block is not closed".into()),
                };
            }
        }

        // (B) The invoke's name, up to its first parameter or its end.
        let (name, mut stop) = match read_until(text, index, &[PARAM_OPEN, INVOKE_CLOSE]) {
            Read::Found { before, stop, next } => {
                let Some(name) = match_name(before) else {
                    return malformed(format!("bad invoke header {before:?}"));
                };
                index = next;
                (name, Some(stop))
            }
            Read::NotFound { rest } => match mode {
                Mode::Stream if name_may_continue(rest) => return BlockParse::Incomplete,
                Mode::Stream => return malformed(format!("bad invoke header {rest:?}")),
                Mode::Strict => {
                    let Some(name) = match_name(rest) else {
                        return malformed(format!("bad invoke header {rest:?}"));
                    };
                    index = text.len();
                    (name, None)
                }
            },
        };

        let mut args: Vec<(&str, bool, &str)> = Vec::new();
        while stop == Some(PARAM_OPEN) {
            // (C) One parameter, up to `/｜DSML｜parameter`.
            let (key, is_str, value) = match read_until(text, index, &[PARAM_CLOSE]) {
                Read::Found { before, next, .. } => {
                    let Some(kv) = match_param(before) else {
                        return malformed(format!("bad parameter {before:?}"));
                    };
                    index = next;
                    kv
                }
                Read::NotFound { rest } => match mode {
                    Mode::Stream if param_may_continue(rest) => return BlockParse::Incomplete,
                    Mode::Stream => return malformed(format!("bad parameter {rest:?}")),
                    Mode::Strict => {
                        let Some(kv) = match_param(rest) else {
                            return malformed(format!("bad parameter {rest:?}"));
                        };
                        index = text.len();
                        kv
                    }
                },
            };
            if args.iter().any(|(k, _, _)| *k == key) {
                return malformed(format!("duplicate parameter {key:?}"));
            }
            args.push((key, is_str, value));

            // (D) `>\n` up to the next parameter or the end of the invoke.
            match read_until(text, index, &[PARAM_OPEN, INVOKE_CLOSE]) {
                Read::Found { before, stop: s, next } => {
                    if before != ">\n" {
                        return malformed(format!("expected `>\\n` before `{s}`, found {before:?}"));
                    }
                    index = next;
                    stop = Some(s);
                }
                Read::NotFound { rest } => match mode {
                    Mode::Stream if separator_may_continue(rest, &[PARAM_OPEN, INVOKE_CLOSE]) => {
                        return BlockParse::Incomplete
                    }
                    Mode::Stream => return malformed(format!("expected `>\\n` after a parameter, found {rest:?}")),
                    Mode::Strict if rest != ">\n" => {
                        return malformed(format!("expected `>\\n` after a parameter, found {rest:?}"))
                    }
                    Mode::Strict => {
                        index = text.len();
                        stop = None;
                    }
                },
            }
        }
        calls.push(ParsedToolCall { name: name.to_string(), arguments: decode_arguments(&args, mode) });
    }
    match mode {
        Mode::Strict => BlockParse::Done { calls, end: index },
        Mode::Stream => BlockParse::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_ports() {
        assert_eq!(match_name("name=\"f\">\n"), Some("f"));
        assert_eq!(match_name(" \n\tname=\"f\">\n\n"), Some("f"));
        assert_eq!(match_name("name=\"a\">\nb\">\n"), Some("a\">\nb"));
        assert_eq!(match_name("name=\"f\">"), None);
        assert_eq!(match_name("nam=\"f\">\n"), None);
        assert_eq!(match_param(" name=\"k\" string=\"true\">v<"), Some(("k", true, "v")));
        assert_eq!(match_param(" name=\"k\" string=\"false\">1<\n"), Some(("k", false, "1")));
        assert_eq!(match_param(" name=\"k\" string=\"true\"><"), Some(("k", true, "")));
        assert_eq!(match_param(" name=\"a\" string=\"x\" string=\"true\">v<"), Some(("a\" string=\"x", true, "v")));
        assert_eq!(
            match_param(" name=\"a\" string=\"true\">b\" string=\"false\">c<"),
            Some(("a", true, "b\" string=\"false\">c"))
        );
        assert_eq!(match_param(" name=\"k\" string=\"yes\">v<"), None);
        assert_eq!(match_param(" name=\"k\" string=\"true\">v"), None);
        assert_eq!(match_param("name=\"k\" string=\"true\">v<"), None);
    }

    #[test]
    fn stream_mode_never_rejects_a_prefix_of_a_valid_block() {
        let block =
            ">\n<｜DSML｜invoke name=\"get\">\n<｜DSML｜parameter name=\"a\" string=\"true\">x y</｜DSML｜parameter>\n\
                     <｜DSML｜parameter name=\"b\" string=\"false\">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
                     <｜DSML｜invoke name=\"h\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        for (i, _) in block.char_indices() {
            assert_eq!(parse_tool_calls(&block[..i], 0, Mode::Stream), BlockParse::Incomplete, "prefix {i}");
        }
        let want = vec![
            ParsedToolCall { name: "get".into(), arguments: r#"{"a": "x y", "b": [1, 2]}"#.into() },
            ParsedToolCall { name: "h".into(), arguments: "{}".into() },
        ];
        for mode in [Mode::Stream, Mode::Strict] {
            assert_eq!(parse_tool_calls(block, 0, mode), BlockParse::Done { calls: want.clone(), end: block.len() });
        }
    }
}
