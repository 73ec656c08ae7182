//! Signatures of Anthropic thinking blocks (placeholder until its module lands).
