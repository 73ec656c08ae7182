//! Thinking mode and reasoning effort: what a request asks for, mapped onto what the
//! checkpoint's encoder supports. This module holds the one table that does it.
//!
//! Clients spell effort many ways: OpenAI's `reasoning_effort` (`none`, `minimal`, `low`,
//! `medium`, `high`, `xhigh`), DeepSeek's (`high`, `max`), Anthropic's `output_config.effort`
//! (`low`, `medium`, `high`, `max`). The V4 encoders know fewer levels
//! ([`dsv4_core::chat::ReasoningEffort`]): the preview encoder shipped with V4-Flash / V4-Pro
//! has `high` (no prompt text) and `max`; the 0731 encoder has `low` (no text), `high` and
//! `max`. The table:
//!
//! | asked        | preview encoder      | 0731 encoder         |
//! |--------------|----------------------|----------------------|
//! | `none`       | thinking off         | thinking off         |
//! | `minimal`    | thinking, `high`     | thinking, `low`      |
//! | `low`        | thinking, `high`     | thinking, `low`      |
//! | `medium`     | thinking, `high`     | thinking, `high`     |
//! | `high`       | thinking, `high`     | thinking, `high`     |
//! | `xhigh`      | thinking, `max`      | thinking, `max`      |
//! | `max`        | thinking, `max`      | thinking, `max`      |
//!
//! Why: DeepSeek's own API for V4 (api-docs.deepseek.com, "Thinking mode") accepts `high` and
//! `max` and maps `low` / `medium` to `high` and `xhigh` to `max`; the preview column is exactly
//! that, with `minimal` joining the lower group. The 0731 encoder has a real `low` level (its
//! default), so `minimal` and `low` use it there, while `medium` rounds up to `high` (the level
//! DeepSeek's API gives `medium`). `none` is OpenAI's "no reasoning", which on V4 is chat mode.
//!
//! Thinking on or off: an explicit switch (`thinking: {"type": "enabled" | "disabled"}`,
//! `chat_template_kwargs.thinking` / `enable_thinking`) decides; without one, an effort decides
//! (`none` → off, any other → on); without either, the server's `--default-thinking` (on unless
//! told otherwise, as in DeepSeek's API). With thinking switched on explicitly, `none` maps to
//! the encoder's lowest level; with it switched off, the effort is ignored (efforts only change
//! the prompt in thinking mode).

use dsv4_core::chat::{EncoderRevision, ReasoningEffort, ThinkingMode};

use crate::conversation::Effort;
use crate::error::ApiError;

/// Every accepted spelling, for error messages.
pub const EFFORT_SPELLINGS: &str = "none, minimal, low, medium, high, xhigh, max";

impl Effort {
    /// Parses a client's effort (case-insensitive, surrounding spaces ignored).
    pub fn parse(s: &str) -> Option<Effort> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "none" => Effort::None,
            "minimal" => Effort::Minimal,
            "low" => Effort::Low,
            "medium" => Effort::Medium,
            "high" => Effort::High,
            "xhigh" => Effort::XHigh,
            "max" => Effort::Max,
            _ => return None,
        })
    }

    /// [`Effort::parse`] or a 400 naming `param` and the accepted spellings.
    pub fn parse_param(s: &str, param: &str) -> Result<Effort, ApiError> {
        Effort::parse(s).ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("unknown reasoning effort `{s}`: expected one of {EFFORT_SPELLINGS}"),
            )
        })
    }

    /// The spelling, lowercase.
    pub fn as_str(self) -> &'static str {
        match self {
            Effort::None => "none",
            Effort::Minimal => "minimal",
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
            Effort::XHigh => "xhigh",
            Effort::Max => "max",
        }
    }
}

/// The encoder level `effort` maps to in thinking mode (the table above; `none` maps to the
/// lowest level, used when thinking was switched on explicitly).
pub fn encoder_effort(effort: Effort, revision: EncoderRevision) -> ReasoningEffort {
    match (revision, effort) {
        (_, Effort::XHigh | Effort::Max) => ReasoningEffort::Max,
        (EncoderRevision::Preview, _) => ReasoningEffort::High,
        (EncoderRevision::Rev0731, Effort::None | Effort::Minimal | Effort::Low) => ReasoningEffort::Low,
        (EncoderRevision::Rev0731, Effort::Medium | Effort::High) => ReasoningEffort::High,
    }
}

/// Thinking mode and encoder effort for a request: `thinking` is the explicit switch if any,
/// `effort` the asked effort if any, `default_thinking` the server's default.
pub fn resolve(
    thinking: Option<bool>,
    effort: Option<Effort>,
    default_thinking: bool,
    revision: EncoderRevision,
) -> (ThinkingMode, Option<ReasoningEffort>) {
    let on = match (thinking, effort) {
        (Some(t), _) => t,
        (None, Some(Effort::None)) => false,
        (None, Some(_)) => true,
        (None, None) => default_thinking,
    };
    if !on {
        return (ThinkingMode::Chat, None);
    }
    (ThinkingMode::Thinking, effort.map(|e| encoder_effort(e, revision)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Effort; 7] =
        [Effort::None, Effort::Minimal, Effort::Low, Effort::Medium, Effort::High, Effort::XHigh, Effort::Max];

    #[test]
    fn every_spelling_parses_and_round_trips() {
        for e in ALL {
            assert_eq!(Effort::parse(e.as_str()), Some(e));
            assert_eq!(Effort::parse(&format!(" {} ", e.as_str().to_uppercase())), Some(e));
        }
        assert_eq!(Effort::parse("extreme"), None);
        let err = Effort::parse_param("extreme", "reasoning_effort").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("reasoning_effort"));
        assert!(err.message.contains(EFFORT_SPELLINGS), "{}", err.message);
    }

    #[test]
    fn the_table() {
        use ReasoningEffort::*;
        let preview: Vec<_> = ALL.iter().map(|&e| encoder_effort(e, EncoderRevision::Preview)).collect();
        assert_eq!(preview, [High, High, High, High, High, Max, Max]);
        let rev0731: Vec<_> = ALL.iter().map(|&e| encoder_effort(e, EncoderRevision::Rev0731)).collect();
        assert_eq!(rev0731, [Low, Low, Low, High, High, Max, Max]);
    }

    #[test]
    fn every_mapped_effort_is_one_the_encoder_accepts() {
        use dsv4_core::chat::{encode_messages, EncodeOptions, Message, Role};
        let msgs = [Message::new(Role::User, "hi")];
        for revision in [EncoderRevision::Preview, EncoderRevision::Rev0731] {
            for e in ALL {
                let (thinking_mode, reasoning_effort) = resolve(Some(true), Some(e), true, revision);
                let opts = EncodeOptions { thinking_mode, reasoning_effort, revision, ..Default::default() };
                encode_messages(&msgs, &opts).unwrap_or_else(|err| panic!("{revision:?} {e:?}: {err}"));
            }
        }
    }

    #[test]
    fn switches_efforts_and_the_default() {
        let p = EncoderRevision::Preview;
        assert_eq!(resolve(None, None, true, p), (ThinkingMode::Thinking, None));
        assert_eq!(resolve(None, None, false, p), (ThinkingMode::Chat, None));
        assert_eq!(resolve(None, Some(Effort::None), true, p), (ThinkingMode::Chat, None));
        assert_eq!(resolve(None, Some(Effort::Low), false, p), (ThinkingMode::Thinking, Some(ReasoningEffort::High)));
        assert_eq!(resolve(Some(false), Some(Effort::Max), true, p), (ThinkingMode::Chat, None));
        assert_eq!(
            resolve(Some(true), Some(Effort::None), false, p),
            (ThinkingMode::Thinking, Some(ReasoningEffort::High))
        );
        assert_eq!(
            resolve(Some(true), Some(Effort::None), false, EncoderRevision::Rev0731),
            (ThinkingMode::Thinking, Some(ReasoningEffort::Low))
        );
    }
}
