//! The OpenAI API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use crate::app::AppState;
use crate::error::ApiError;

pub async fn chat_completions(State(_state): State<Arc<AppState>>) -> Response {
    ApiError::internal("not yet").openai_response()
}

pub async fn completions(State(_state): State<Arc<AppState>>) -> Response {
    ApiError::internal("not yet").openai_response()
}

pub async fn models(State(_state): State<Arc<AppState>>) -> Response {
    ApiError::internal("not yet").openai_response()
}
