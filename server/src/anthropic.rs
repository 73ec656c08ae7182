//! The Anthropic Messages API: `POST /v1/messages` (streaming and not) and
//! `POST /v1/messages/count_tokens`, as documented at docs.claude.com/en/api/messages,
//! docs.claude.com/en/api/messages-count-tokens and docs.claude.com/en/api/errors.
//!
//! * [`request`] reads a request body into the protocol-neutral [`Conversation`](crate::Conversation) and
//!   [`GenerationParams`](crate::GenerationParams) (every field and block type is listed on
//!   [`request::parse`]);
//! * [`response`] turns the reply's deltas into the `message` object and the server-sent event
//!   stream (the event order is described there);
//! * this module holds the handlers and Anthropic's error shape.
//!
//! Headers: the API key is checked by the router for every route (`x-api-key: KEY` or
//! `Authorization: Bearer KEY`; a 401 here is in Anthropic's shape). `anthropic-version` and
//! `anthropic-beta` are accepted and ignored, as on DeepSeek's own Anthropic endpoint: this
//! server has one behaviour.
//!
//! Errors are `{"type": "error", "error": {"type", "message"}}` with Anthropic's statuses: 400
//! `invalid_request_error` (also for a body that is not JSON: the routes read their bodies
//! themselves, so axum's plain-text rejections never answer here), 401 `authentication_error`,
//! 404 `not_found_error` (an unknown `model`), 405 `invalid_request_error` (another method),
//! 413 `request_too_large`, 500 `api_error`, and 529 `overloaded_error` when the engine's queue
//! is full — Anthropic's status for it, which its SDKs map to their `OverloadedError` and retry
//! (the OpenAI side says 503 for the same condition).

pub mod request;
pub mod response;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::conversation::{Reply, ReplyEvent};
use crate::error::{parse_json_body, ApiError, ErrorKind};
use request::{Endpoint, MessagesRequest};
use response::{MessageAssembler, SseEvent};

/// How long a stream may stay silent (a long prompt being computed) before a `ping` event is
/// sent, so that proxies and clients with idle timeouts keep the connection.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Anthropic's status `529`, "overloaded_error".
pub fn overloaded_status() -> StatusCode {
    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// Anthropic's `error.type` for an error kind.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::PayloadTooLarge => "request_too_large",
        ErrorKind::Overloaded => "overloaded_error",
        ErrorKind::Internal => "api_error",
    }
}

/// The error body: `{"type": "error", "error": {"type", "message"}}`. Anthropic's shape has no
/// `param`, so a field's name leads the message (`max_tokens: Field required`), as in
/// Anthropic's own messages.
pub fn error_json(e: &ApiError) -> Value {
    let message = match &e.param {
        Some(p) if !e.message.starts_with(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": error_type(e.kind), "message": message}})
}

/// The HTTP status of `e` in this API: 529 for overloaded, else the error's own.
pub fn error_status(e: &ApiError) -> StatusCode {
    if e.kind == ErrorKind::Overloaded {
        overloaded_status()
    } else {
        e.status
    }
}

/// `e` as an Anthropic-style HTTP answer.
pub fn error_response(e: &ApiError) -> Response {
    (error_status(e), Json(error_json(e))).into_response()
}

async fn method_not_allowed() -> Response {
    let e = ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid("this endpoint only accepts POST requests with a JSON body")
    };
    error_response(&e)
}

/// `POST /v1/messages` and `POST /v1/messages/count_tokens`; other methods are a 405 in
/// Anthropic's shape.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/messages", post(messages).fallback(method_not_allowed))
        .route("/v1/messages/count_tokens", post(count_tokens).fallback(method_not_allowed))
}

/// Reads and translates a body, and checks its model.
fn read_request(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<MessagesRequest, ApiError> {
    let value: Value = parse_json_body(body)?;
    let req = request::parse(&value, endpoint, &state.signing_key)?;
    state.check_model(Some(&req.model))?;
    Ok(req)
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, the length of the prompt the same
/// request to `/v1/messages` would run — the ids `/tokenize` counts for the same conversation.
/// A prompt longer than the server's context is still counted.
pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = read_request(&state, body, Endpoint::CountTokens)
        .and_then(|req| state.render_ids(&req.conversation))
        .map(|(ids, _)| json!({"input_tokens": ids.len()}));
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `POST /v1/messages`.
pub async fn messages(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req = match read_request(&state, body, Endpoint::Messages) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let reply = match state.start_reply(&req.conversation, &req.params) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let assembler = new_assembler(&state, req.model);
    if req.stream {
        stream_response(reply, assembler)
    } else {
        match whole_message(reply, assembler).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => error_response(&e),
        }
    }
}

fn new_assembler(state: &Arc<AppState>, model: String) -> MessageAssembler {
    let ids = state.clone();
    MessageAssembler::new(
        state.next_id("msg_"),
        model,
        state.signing_key.clone(),
        Box::new(move || ids.next_id("toolu_")),
    )
}

async fn whole_message(mut reply: Reply, mut asm: MessageAssembler) -> Result<Value, ApiError> {
    while let Some(ev) = reply.next().await {
        match ev? {
            ReplyEvent::Delta(d) => {
                asm.push(d);
            }
            ReplyEvent::Finish(f) => {
                asm.finish(&f);
                return Ok(asm.message(&f));
            }
        }
    }
    Err(ApiError::internal("the reply ended without finishing"))
}

/// Where a stream is.
enum Phase {
    Start,
    Running,
    Done,
}

struct StreamState {
    reply: Reply,
    asm: MessageAssembler,
    phase: Phase,
}

impl StreamState {
    /// The next chunk of the body: one or more events, or `None` at the end.
    ///
    /// Waiting for the reply is cut every [`PING_INTERVAL`] to send a `ping`; that drops a
    /// pending [`Reply::next`] future, which is fine because its only await is the engine
    /// channel's `recv`, which loses nothing when cancelled.
    async fn next_chunk(&mut self) -> Option<String> {
        match self.phase {
            Phase::Done => None,
            Phase::Start => {
                self.phase = Phase::Running;
                let start = self.asm.start(self.reply.prompt_tokens());
                Some(start.to_sse() + &SseEvent::ping().to_sse())
            }
            Phase::Running => {
                let events = match tokio::time::timeout(PING_INTERVAL, self.reply.next()).await {
                    Err(_elapsed) => vec![SseEvent::ping()],
                    Ok(Some(Ok(ReplyEvent::Delta(d)))) => self.asm.push(d),
                    Ok(Some(Ok(ReplyEvent::Finish(f)))) => {
                        self.phase = Phase::Done;
                        self.asm.finish(&f)
                    }
                    Ok(Some(Err(e))) => {
                        self.phase = Phase::Done;
                        vec![SseEvent::error(&e)]
                    }
                    Ok(None) => {
                        self.phase = Phase::Done;
                        vec![SseEvent::error(&ApiError::internal("the reply ended without finishing"))]
                    }
                };
                Some(events.iter().map(SseEvent::to_sse).collect())
            }
        }
    }
}

/// The reply as `text/event-stream`. Dropping the body (the client went away) drops the
/// [`Reply`], which cancels the request in the engine.
fn stream_response(reply: Reply, asm: MessageAssembler) -> Response {
    let state = StreamState { reply, asm, phase: Phase::Start };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            match s.next_chunk().await {
                None => return None,
                // A delta that completes no event (log-probabilities, empty text): read on.
                Some(chunk) if chunk.is_empty() => continue,
                Some(chunk) => return Some((Ok::<_, Infallible>(Bytes::from(chunk)), s)),
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes_and_statuses() {
        let cases = [
            (
                ApiError::invalid_param("max_tokens", "Field required"),
                400,
                "invalid_request_error",
                "max_tokens: Field required",
            ),
            (ApiError::authentication("invalid API key"), 401, "authentication_error", "invalid API key"),
            (ApiError::not_found("no such model"), 404, "not_found_error", "no such model"),
            (ApiError::new(ErrorKind::PayloadTooLarge, "too big"), 413, "request_too_large", "too big"),
            (ApiError::overloaded("queue full"), 529, "overloaded_error", "queue full"),
            (ApiError::internal("boom"), 500, "api_error", "boom"),
            // A message that already names its field is not prefixed twice.
            (
                ApiError::invalid_param("tool_choice", "tool_choice `any` needs a tool"),
                400,
                "invalid_request_error",
                "tool_choice `any` needs a tool",
            ),
        ];
        for (e, status, kind, message) in cases {
            assert_eq!(error_status(&e).as_u16(), status, "{e}");
            assert_eq!(error_json(&e), json!({"type": "error", "error": {"type": kind, "message": message}}));
        }
    }
}
