//! The server's shared state, its routes and the listener loop.
//!
//! Every route except `/health` and `/metrics` requires the API key when one is configured
//! (`--api-key`): `Authorization: Bearer KEY` or `x-api-key: KEY`, either on any route. A
//! missing or wrong key is a 401 in the error shape of the API the path belongs to (Anthropic's
//! for `/v1/messages…`, OpenAI's elsewhere). Bodies over the configured limit are 413.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dsv4_core::chat::EncoderRevision;
use dsv4_core::tokenizer::Tokenizer;
use dsv4_engine::EngineHandle;

use crate::connection::{self, ReadTimeouts};
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::{anthropic, openai, tokenize};

/// Default body limit: 32 MiB (a long conversation with tool results fits; a runaway upload does
/// not).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;

/// What `dsv4 serve` passes to the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The model name clients send and `/v1/models` lists (`--served-model-name`).
    pub served_model_name: String,
    /// Other names accepted in requests (the `--model` argument as given, and its last path
    /// component).
    pub model_aliases: Vec<String>,
    /// `--api-key`: required on every route but `/health` and `/metrics` when set.
    pub api_key: Option<String>,
    /// Thinking mode when a request does not say (`--default-thinking`; on, as in DeepSeek's API).
    pub default_thinking: bool,
    /// Which official encoder the checkpoint ships (decides the reasoning-effort levels).
    pub encoder_revision: EncoderRevision,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's header (then the connection is closed)
    /// and its body (then 408).
    pub read_timeouts: ReadTimeouts,
    /// Key for the Anthropic API's thinking-block signatures; `None`: random per start.
    pub signing_key: Option<Vec<u8>>,
    /// Ids that end a generation besides the tokenizer's EOS (the model config's
    /// `eos_token_id`).
    pub stop_token_ids: Vec<u32>,
}

impl ServerConfig {
    /// Defaults: 127.0.0.1:8000, thinking on, the preview encoder, 32 MiB bodies, no key.
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: served_model_name.into(),
            model_aliases: vec![],
            api_key: None,
            default_thinking: true,
            encoder_revision: EncoderRevision::Preview,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            read_timeouts: ReadTimeouts::default(),
            signing_key: None,
            stop_token_ids: vec![],
        }
    }
}

/// Everything a handler needs, shared by all requests.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    /// The name `/v1/models` lists and replies carry.
    pub served_model_name: String,
    /// Other accepted model names.
    pub model_aliases: Vec<String>,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub default_thinking: bool,
    pub encoder_revision: EncoderRevision,
    /// Key bytes for the Anthropic API's thinking-block signatures.
    pub signing_key: Vec<u8>,
    /// Ids that end a generation (the tokenizer's EOS).
    pub stop_token_ids: Vec<u32>,
    /// Unix time the server started (OpenAI `created` of the model).
    pub created: u64,
    pub max_body_bytes: usize,
    pub read_timeouts: ReadTimeouts,
    counter: AtomicU64,
    /// Distinguishes ids and seeds of different server runs.
    nonce: u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 32 bytes from the OS (`/dev/urandom`), or, where that cannot be read, from the standard
/// library's randomly keyed hasher.
fn random_bytes() -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 32];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).is_ok() {
        return buf;
    }
    use std::hash::{BuildHasher, Hasher};
    buf.chunks_mut(8).enumerate().for_each(|(i, c)| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        c.copy_from_slice(&h.finish().to_le_bytes());
    });
    buf
}

impl AppState {
    pub fn new(config: &ServerConfig, engine: EngineHandle, tokenizer: Tokenizer) -> AppState {
        let signing_key = config.signing_key.clone().unwrap_or_else(random_bytes);
        let nonce = u64::from_le_bytes(random_bytes()[..8].try_into().expect("8 bytes"));
        let mut stop_token_ids = tokenizer.eos_token_ids();
        stop_token_ids.extend(&config.stop_token_ids);
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        AppState {
            stop_token_ids,
            engine,
            tokenizer,
            served_model_name: config.served_model_name.clone(),
            model_aliases: config.model_aliases.clone(),
            api_key: config.api_key.clone().filter(|k| !k.is_empty()),
            metrics: Arc::new(Metrics::new()),
            default_thinking: config.default_thinking,
            encoder_revision: config.encoder_revision,
            signing_key,
            created: unix_now(),
            max_body_bytes: config.max_body_bytes,
            read_timeouts: config.read_timeouts,
            counter: AtomicU64::new(0),
            nonce,
        }
    }

    /// Longest sequence (prompt + reply) the engine accepts.
    pub fn max_model_len(&self) -> usize {
        self.engine.info().max_model_len
    }

    /// Accepts the served model name and its aliases; `None` (no `model` field) takes the
    /// served model; anything else is a 404.
    pub fn check_model(&self, name: Option<&str>) -> Result<(), ApiError> {
        match name {
            None => Ok(()),
            Some(n) if n == self.served_model_name || self.model_aliases.iter().any(|a| a == n) => Ok(()),
            Some(n) => Err(ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(format!(
                    "the model `{n}` does not exist; this server serves `{}`",
                    self.served_model_name
                ))
            }),
        }
    }

    /// Checks the API key in `Authorization: Bearer KEY` or `x-api-key: KEY`.
    pub fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
        let given = [bearer, x_api_key];
        if given.iter().flatten().any(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return Ok(());
        }
        let other_scheme = bearer.is_none() && headers.contains_key(header::AUTHORIZATION);
        Err(ApiError::authentication(if given.iter().any(Option::is_some) {
            "invalid API key"
        } else if other_scheme {
            "the Authorization header must be `Bearer KEY` (or send `x-api-key: KEY`)"
        } else {
            "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`"
        }))
    }

    /// A new unique id with `prefix` (`chatcmpl-`, `cmpl-`, `msg_`, ...).
    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{:012x}{n:08x}", self.nonce & 0xffff_ffff_ffff)
    }

    /// A sampling seed for a request that gives none: different for every request.
    pub fn fresh_seed(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.nonce ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The 401 for `path` in its API's error shape.
fn auth_error_response(path: &str, e: &ApiError) -> Response {
    if path.starts_with("/v1/messages") {
        let body =
            serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": e.message}});
        (e.status, axum::Json(body)).into_response()
    } else {
        e.openai_response()
    }
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match state.check_auth(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => auth_error_response(req.uri().path(), &e),
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.engine.stats());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Another method on a known route: 405 in OpenAI's shape.
async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(format!("{} does not accept {}", req.uri().path(), req.method()))
    }
    .openai_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path())).openai_response()
}

/// All routes: the OpenAI API, `/tokenize` and `/detokenize`, the Anthropic API
/// (`anthropic::routes`), `/health` and `/metrics`.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions).fallback(method_not_allowed))
        .route("/v1/completions", post(openai::completions).fallback(method_not_allowed))
        .route("/v1/models", get(openai::models).fallback(method_not_allowed))
        .route("/v1/models/{*model}", get(openai::model).fallback(method_not_allowed))
        .route("/tokenize", post(tokenize::tokenize).fallback(method_not_allowed))
        .route("/detokenize", post(tokenize::detokenize).fallback(method_not_allowed))
        .merge(anthropic::routes())
        .fallback(not_found)
        // The body is read after the key is checked (layers added later run first), so an
        // unauthenticated client cannot make the server buffer a body.
        .layer(middleware::from_fn_with_state(state.clone(), connection::body_deadline))
        .layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health).fallback(method_not_allowed))
        .route("/metrics", get(metrics_text).fallback(method_not_allowed))
        .merge(protected)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

/// Serves `state` on an already bound listener until it fails (tests bind port 0).
pub async fn serve_listener(listener: tokio::net::TcpListener, state: Arc<AppState>) -> anyhow::Result<()> {
    serve_listener_until(listener, state, std::future::pending()).await
}

/// How long a shutdown waits for the connections to write what they have (the requests in
/// flight get their error first, so this is seconds of writing, not of generating).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `state` on `listener` until `shutdown` completes; then stops accepting, gives every
/// request still open an error in its API's shape ("the server is shutting down": a stream
/// gets its error event and ends, as when the engine fails) and drains the connections for at
/// most [`SHUTDOWN_GRACE`]. Unlike a process that simply exits, no client is left with a
/// response cut off mid-way and no error.
pub async fn serve_listener_until(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let timeouts = state.read_timeouts;
    let engine = state.engine.clone();
    let stop = async move {
        shutdown.await;
        engine.fail_requests("the server is shutting down");
    };
    connection::serve_connections(listener, router(state), timeouts, stop, SHUTDOWN_GRACE).await;
    Ok(())
}

/// Binds `config.host:config.port`, prints the URL and serves until Ctrl-C.
pub async fn serve(config: ServerConfig, engine: EngineHandle, tokenizer: Tokenizer) -> anyhow::Result<()> {
    let listener = bind(&config)?;
    serve_bound(listener, config, engine, tokenizer).await
}

/// Binds `config.host:config.port` (a port already taken is an error naming it). `dsv4 serve`
/// binds before it loads the model, so that a taken port is reported at once, not after the
/// minutes a checkpoint takes to load.
pub fn bind(config: &ServerConfig) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Prints the URL and serves on a listener from [`bind`] until Ctrl-C.
pub async fn serve_bound(
    listener: std::net::TcpListener,
    config: ServerConfig,
    engine: EngineHandle,
    tokenizer: Tokenizer,
) -> anyhow::Result<()> {
    let state = Arc::new(AppState::new(&config, engine, tokenizer));
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr: SocketAddr = listener.local_addr()?;
    let host = if addr.is_ipv6() { format!("[{}]", addr.ip()) } else { addr.ip().to_string() };
    println!(
        "dsv4 serving `{}` at http://{host}:{}/v1 (OpenAI and Anthropic APIs; max model len {}){}",
        state.served_model_name,
        addr.port(),
        state.max_model_len(),
        if state.api_key.is_some() { "; API key required" } else { "" }
    );
    serve_listener_until(listener, state, async {
        let signal = stop_signal().await;
        eprintln!(
            "dsv4: {signal}: shutting down: open requests get an error, connections close within {} s (Ctrl-C again \
             to stop at once)",
            SHUTDOWN_GRACE.as_secs()
        );
        tokio::spawn(async {
            let signal = stop_signal().await;
            eprintln!("dsv4: stopped at once (a second {signal})");
            std::process::exit(130);
        });
    })
    .await
}

/// The next SIGINT (Ctrl-C) or SIGTERM (what `docker stop`, Kubernetes and systemd send), by
/// name: both drain the server, as uvicorn (vLLM's server) does.
pub async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl-C"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
