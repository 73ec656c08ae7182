//! Special tokens and fixed prompt texts of the DeepSeek-V4 chat format, copied byte for byte
//! from the official `encoding/encoding_dsv4.py`.

/// Beginning of the conversation (token id 0). The encoder writes it as text.
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of an assistant turn (token id 1), and the end-of-generation token.
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Opens the reasoning block; the prompt ends with it in thinking mode.
pub const THINK_START: &str = "<think>";
/// Closes the reasoning block; the prompt ends with it in chat mode.
pub const THINK_END: &str = "</think>";
/// The DSML marker (one token) that prefixes every tool-call tag.
pub const DSML: &str = "｜DSML｜";
/// Starts a user (or developer) turn.
pub const USER: &str = "<｜User｜>";
/// Starts an assistant turn.
pub const ASSISTANT: &str = "<｜Assistant｜>";
/// Starts a `latest_reminder` message.
pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
/// What ends the text of an assistant reply and starts its tool-call block, as the official
/// parser recognises it (no closing `>`: the block parser checks the rest).
pub const TOOL_CALLS_START: &str = "\n\n<｜DSML｜tool_calls";

/// `<｜DSML｜invoke`
pub(crate) const INVOKE_OPEN: &str = "<｜DSML｜invoke";
/// `</｜DSML｜invoke`
pub(crate) const INVOKE_CLOSE: &str = "</｜DSML｜invoke";
/// `<｜DSML｜parameter`
pub(crate) const PARAM_OPEN: &str = "<｜DSML｜parameter";
/// `/｜DSML｜parameter` (the official parser reads a value up to this, without the `<`)
pub(crate) const PARAM_CLOSE: &str = "/｜DSML｜parameter";
/// `</｜DSML｜tool_calls>`
pub(crate) const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";

/// Reasoning-effort prefix of the April ("preview") encoder for `reasoning_effort="max"`; the
/// 0731 encoder uses the same text for `"high"`. Inserted right after BOS, thinking mode only.
pub const REASONING_EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, \
rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, \
and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// Reasoning-effort prefix of the 0731 encoder for `reasoning_effort="max"`.
pub const REASONING_EFFORT_BEYOND_MAX: &str = "Reasoning Effort: Beyond maximum — exhaustive, relentless, and \
uncompromising.\n\
You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the \
problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying cause \
rather than any surface symptom.\n\
Do not stop reasoning until you have independently verified the solution from multiple angles and are certain that \
no assumption remains unchecked and no error remains undiscovered.\n\n";

/// The `## Tools` block up to the tool schemas (the official `TOOLS_TEMPLATE` with its
/// `{dsml_token}`, `{thinking_start_token}` and `{thinking_end_token}` filled in).
pub(crate) const TOOLS_HEAD: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
\"<｜DSML｜tool_calls>\" block like the following:\n\n\
<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"$TOOL_NAME\">\n\
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n\
...\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"$TOOL_NAME2\">\n\
...\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\n\
String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";

/// The `## Tools` block after the tool schemas.
pub(crate) const TOOLS_TAIL: &str =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

/// The official `response_format_template` before the schema.
pub(crate) const RESPONSE_FORMAT_HEAD: &str =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";
