//! The Anthropic Messages API (placeholder until its module lands).

use std::sync::Arc;

use axum::Router;

use crate::app::AppState;

/// The Anthropic routes (none yet).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
