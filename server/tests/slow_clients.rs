//! Clients that stop sending: a half-sent header closes the connection, a half-sent body gets
//! a 408 in its API's shape, and a reply that takes longer than either deadline is not cut.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{sse, start, Options};
use dsv4_server::connection::ReadTimeouts;
use serde_json::json;

fn server() -> &'static common::Server {
    static S: std::sync::OnceLock<common::Server> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let mut opts = Options::default();
        opts.config.read_timeouts = ReadTimeouts { header: Duration::from_secs(1), body: Duration::from_secs(1) };
        // Room for a reply that certainly outlasts the deadlines (one sequence at a time).
        opts.engine.max_model_len = 24576;
        opts.seqs = 2;
        start(opts)
    })
}

/// Sends `bytes` and reads until the server closes the connection; returns what it sent
/// back and how long that took. Fails if the connection is still open after 10 s.
fn send_and_read_to_close(bytes: &[u8]) -> (String, Duration) {
    let addr = server().base.trim_start_matches("http://").to_string();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    conn.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection is still open after {:?}: {e}", t.elapsed()),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t.elapsed())
}

#[test]
fn a_half_sent_header_is_dropped_after_the_header_deadline() {
    let (_, took) = send_and_read_to_close(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
}

#[test]
fn a_half_sent_body_gets_a_408_in_its_apis_shape() {
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{")
    };
    let (openai, took) = send_and_read_to_close(head("/v1/chat/completions").as_bytes());
    assert!(openai.starts_with("HTTP/1.1 408"), "{openai}");
    assert!(openai.contains(r#""error":{"message":"the request body did not arrive within 1 s""#), "{openai}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    let (anthropic, _) = send_and_read_to_close(head("/v1/messages").as_bytes());
    assert!(anthropic.starts_with("HTTP/1.1 408"), "{anthropic}");
    assert!(anthropic.contains(r#""type":"error""#), "{anthropic}");
}

#[test]
fn a_reply_longer_than_the_deadlines_is_not_cut() {
    // 8,000 tokens of the tiny model take about 3 s in a release build (2,500 took 0.86 s, too close to
    // the 1 s deadlines on a fast machine).
    let t = Instant::now();
    let events = sse(
        server(),
        "/v1/chat/completions",
        &json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true,
                "max_tokens": 8000, "ignore_eos": true, "temperature": 0}),
    );
    let finish = events.iter().rev().find_map(|e| e["choices"][0]["finish_reason"].as_str().map(str::to_string));
    assert_eq!(finish.as_deref(), Some("length"));
    assert!(
        t.elapsed() > Duration::from_secs(1),
        "the reply took {:?}: it does not outlast the deadlines",
        t.elapsed()
    );
}

#[test]
fn a_body_is_not_read_before_the_key_is_checked() {
    // With a key required, a request without one is refused at once, not after the body
    // deadline (its body is never read).
    let mut opts = Options::default();
    opts.config.api_key = Some("k".into());
    opts.config.read_timeouts = ReadTimeouts { header: Duration::from_secs(5), body: Duration::from_secs(5) };
    let s = start(opts);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"));
    assert!(t.elapsed() < Duration::from_secs(3), "answered after {:?}", t.elapsed());
}
