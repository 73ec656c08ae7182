//! Shutting down (Ctrl-C in `dsv4 serve`): the listener stops accepting, every open request
//! gets an error in its API's shape (a stream its error event, then the end), idle keep-alive
//! connections close, and the server ends within its grace period.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{metric, open_stream, post, start_until, wait_until, Options};

#[test]
fn shutdown_ends_open_streams_with_an_error_and_stops_the_server() {
    let mut opts = Options::default();
    opts.engine.max_model_len = 24576;
    opts.seqs = 2;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (server, thread) = start_until(opts, async {
        let _ = stopped.await;
    });
    let addr = server.base.trim_start_matches("http://").to_string();
    // An idle keep-alive connection, and two streams well under way (far from their ends).
    let idle = TcpStream::connect(&addr).unwrap();
    let body = |api: &str| match api {
        "openai" => serde_json::json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "max_tokens": 20000, "ignore_eos": true})
        .to_string(),
        // Anthropic's API has no ignore_eos: greedy decoding of this prompt on the tiny model
        // does not end before 20,000 tokens, so the stream is open when the server stops.
        _ => serde_json::json!({"model": common::MODEL, "max_tokens": 20000, "stream": true, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]})
        .to_string(),
    };
    let mut openai = open_stream(&server, "/v1/chat/completions", &body("openai"), b"data: ", 3);
    let mut anthropic = open_stream(&server, "/v1/messages", &body("anthropic"), b"event: content_block_delta", 2);
    // A request in flight that is not streamed, and one whose body is still on its way when
    // the server stops (its header read, so the connection is not idle).
    let server = std::sync::Arc::new(server);
    let unary = {
        let server = server.clone();
        std::thread::spawn(move || {
            let body = serde_json::json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 20000, "ignore_eos": true});
            post(&server, "/v1/chat/completions", &body)
        })
    };
    wait_until("three requests run", 20, || metric(&server, "dsv4:num_requests_running") >= 3.0);
    let late_body = body("openai");
    let mut late = TcpStream::connect(&addr).unwrap();
    write!(
        late,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: \
         {}\r\n\r\n{}",
        late_body.len(),
        &late_body[..10]
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    stop.send(()).unwrap();
    let rest = |conn: &mut TcpStream| {
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    };
    let openai_rest = rest(&mut openai);
    assert!(openai_rest.contains(r#""message":"the server is shutting down""#), "{openai_rest}");
    let after = openai_rest.split("the server is shutting down").nth(1).unwrap();
    assert!(after.contains("data: [DONE]") && !after.contains("chat.completion.chunk"), "{openai_rest}");
    let anthropic_rest = rest(&mut anthropic);
    assert!(
        anthropic_rest.contains("event: error") && anthropic_rest.contains("the server is shutting down"),
        "{anthropic_rest}"
    );
    // In flight, not streamed: a 503 (the server is unavailable; retry elsewhere).
    let r = unary.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("the server is shutting down"), "{}", r.body);
    // Submitted after the stop: refused the same way, not run and cut off.
    std::thread::sleep(Duration::from_millis(200));
    late.write_all(&late_body.as_bytes()[10..]).unwrap();
    let late_reply = rest(&mut late);
    assert!(late_reply.starts_with("HTTP/1.1 503"), "{late_reply}");
    assert!(late_reply.contains("the server is shutting down") && !late_reply.contains("data: "), "{late_reply}");
    // The idle connection is closed, not left open.
    let mut idle = idle;
    assert_eq!(rest(&mut idle), "");
    thread.join().unwrap();
    assert!(t.elapsed() < dsv4_server::SHUTDOWN_GRACE + Duration::from_secs(2), "took {:?}", t.elapsed());
    // Nothing listens any more.
    assert!(TcpStream::connect(&addr).is_err());
}
