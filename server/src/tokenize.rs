//! vLLM's `POST /tokenize` and `POST /detokenize`, in vLLM's request and response shapes.
//!
//! * `/tokenize` takes either `{"prompt": "text"}` (the text as it is, no chat format) or
//!   `{"messages": [...], "tools": [...], "add_generation_prompt": true,
//!   "continue_final_message": false, "chat_template_kwargs": {...}}` (rendered exactly as a
//!   chat completion would be, thinking and effort included), plus `"return_token_strs"`; it
//!   answers `{"count", "max_model_len", "tokens", "token_strs"}`. `add_special_tokens` is
//!   accepted and has no effect: the V4 encoder writes BOS itself and the tokenizer adds none.
//! * `/detokenize` takes `{"tokens": [ids]}` and answers `{"prompt": "text"}`; an id outside the
//!   vocabulary is a 400.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsv4_core::chat::Role;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::conversation::generation_prompt_suffix;
use crate::error::{parse_json_body, ApiError};
use crate::openai::{conversation_from_json, json_type, Fields};

/// `POST /tokenize`.
pub async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match tokenize_inner(&state, body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.openai_response(),
    }
}

fn tokenize_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let v: Value = parse_json_body(body)?;
    let f = Fields::of(&v)?;
    state.check_model(f.str("model")?)?;
    f.bool("add_special_tokens")?;
    let tok = &state.tokenizer;
    let encode = |s: &str| tok.encode(s).map_err(|e| ApiError::internal(format!("tokenizer: {e}")));
    let tokens = match (f.get("prompt"), f.get("messages")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("give either `prompt` or `messages`, not both"));
        }
        (Some(Value::String(s)), None) => encode(s)?,
        (Some(other), None) => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!("`prompt` must be a string, not {}", json_type(other)),
            ));
        }
        (None, Some(_)) => {
            let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
            let continue_final = f.bool("continue_final_message")?.unwrap_or(false);
            if add_generation_prompt && continue_final {
                return Err(ApiError::invalid(
                    "`continue_final_message` needs `add_generation_prompt: false` (the reply continues the last \
                     assistant message)",
                ));
            }
            let mut conv = conversation_from_json(&f)?;
            if continue_final {
                match conv.messages.last_mut() {
                    Some(m) if m.role == Role::Assistant => m.wo_eos = true,
                    _ => {
                        return Err(ApiError::invalid_param(
                            "continue_final_message",
                            "`continue_final_message` needs the last message to be the assistant's",
                        ))
                    }
                }
            }
            let info = state.render_prompt(&conv)?;
            let mut text = info.text;
            if !add_generation_prompt {
                if let Some(n) = generation_prompt_suffix(&text) {
                    text.truncate(text.len() - n);
                }
            }
            encode(&text)?
        }
        (None, None) => return Err(ApiError::invalid("`prompt` or `messages` is required")),
    };
    let token_strs = if f.bool("return_token_strs")?.unwrap_or(false) {
        json!(tokens.iter().map(|&t| tok.decode(&[t]).unwrap_or_default()).collect::<Vec<_>>())
    } else {
        Value::Null
    };
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": state.max_model_len(),
        "tokens": tokens,
        "token_strs": token_strs,
    }))
}

/// `POST /detokenize`.
pub async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match detokenize_inner(&state, body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.openai_response(),
    }
}

fn detokenize_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let v: Value = parse_json_body(body)?;
    let f = Fields::of(&v)?;
    state.check_model(f.str("model")?)?;
    let list = f.array("tokens")?.ok_or_else(|| ApiError::invalid_param("tokens", "`tokens` is required"))?;
    let ids = list
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::invalid_param("tokens", "`tokens` must be a list of non-negative integer ids"))?;
    let prompt = state.tokenizer.decode(&ids).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
    Ok(json!({ "prompt": prompt }))
}
