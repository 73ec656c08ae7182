//! Errors of every endpoint, in one protocol-neutral shape ([`ApiError`]), rendered in each API's
//! own error format by the module that serves it: [`ApiError::openai_response`] here, the
//! Anthropic shape in `anthropic.rs`.
//!
//! The OpenAI shape is the one the OpenAI API documents and vLLM serves:
//! `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dsv4_engine::SubmitError;
use serde_json::{json, Value};

/// What kind of failure an [`ApiError`] is; decides its HTTP status and its `type` in each API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something this server cannot do (400).
    InvalidRequest,
    /// A missing or wrong API key (401).
    Authentication,
    /// An unknown model or route (404).
    NotFound,
    /// The body is larger than the server accepts (413).
    PayloadTooLarge,
    /// The server is at capacity; retry later (503).
    Overloaded,
    /// Something failed inside the server (500).
    Internal,
}

impl ErrorKind {
    /// The HTTP status of this kind.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type` for this kind.
    fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::PayloadTooLarge => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Internal => "server_error",
        }
    }

    /// OpenAI's `error.code` for this kind (`null` for a plain invalid request).
    fn openai_code(self) -> Option<&'static str> {
        match self {
            ErrorKind::InvalidRequest => None,
            ErrorKind::Authentication => Some("invalid_api_key"),
            ErrorKind::NotFound => Some("not_found"),
            ErrorKind::PayloadTooLarge => Some("request_too_large"),
            ErrorKind::Overloaded => Some("server_overloaded"),
            ErrorKind::Internal => Some("internal_error"),
        }
    }
}

/// An error answer: its status, kind, a message for people and, for a bad field, the field's
/// name (OpenAI `param`, e.g. `messages[2].content` or `temperature`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    /// An error of `kind` with its usual status.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { status: kind.status(), kind, message: message.into(), param: None }
    }

    /// 400: the request is malformed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// 400 about one field.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..Self::invalid(message) }
    }

    /// 401.
    pub fn authentication(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Authentication, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// 503.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Overloaded, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_json(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": self.param,
                "code": self.kind.openai_code(),
            }
        })
    }

    /// The error as an OpenAI-style HTTP answer.
    pub fn openai_response(&self) -> Response {
        (self.status, axum::Json(self.openai_json())).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.kind.openai_type(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(_) | SubmitError::PromptTooLong { .. } => ApiError::invalid(e.to_string()),
            SubmitError::QueueFull { .. } | SubmitError::Closed(_) => ApiError::overloaded(e.to_string()),
            SubmitError::Stopped(_) => ApiError::internal(e.to_string()),
        }
    }
}

/// The body of a request as JSON of type `T`: a body over the size limit is 413, one that is not
/// JSON or does not have `T`'s shape is 400 saying where. Both APIs read their bodies with it.
pub fn parse_json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(body_rejection)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_data() { "the request body does not have the expected shape" } else { "malformed JSON" };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// A body that could not be read: 413 when over the limit, else 400.
pub fn body_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorKind::PayloadTooLarge, "the request body is larger than this server accepts")
    } else {
        ApiError::invalid(format!("cannot read the request body: {}", r.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_and_statuses() {
        let e = ApiError::invalid_param("temperature", "temperature must be a number");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.openai_json(),
            json!({"error": {"message": "temperature must be a number", "type": "invalid_request_error",
                             "param": "temperature", "code": null}})
        );
        assert_eq!(ApiError::authentication("x").status, StatusCode::UNAUTHORIZED);
        assert_eq!(ApiError::not_found("x").status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::overloaded("x").status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn submit_errors_map_to_client_and_server_statuses() {
        let e: ApiError = SubmitError::PromptTooLong { prompt_tokens: 10, max_model_len: 8 }.into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("10") && e.message.contains('8'), "{}", e.message);
        let e: ApiError = SubmitError::QueueFull { waiting: 3 }.into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = SubmitError::Invalid("token id 999 is outside the vocabulary".into()).into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bodies_that_are_not_json_are_400() {
        let r: Result<Value, _> = parse_json_body(Ok(Bytes::from_static(b"{not json")));
        let e = r.unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
    }
}
