//! vLLM's `/tokenize` and `/detokenize`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use crate::app::AppState;
use crate::error::ApiError;

pub async fn tokenize(State(_state): State<Arc<AppState>>) -> Response {
    ApiError::internal("not yet").openai_response()
}

pub async fn detokenize(State(_state): State<Arc<AppState>>) -> Response {
    ApiError::internal("not yet").openai_response()
}
