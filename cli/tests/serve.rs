//! `dsv4 serve` as a user runs it: it prints its URL, answers over HTTP, and needs its key.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the server when the test ends, whether it passes or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request; returns the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The first line a started server prints (its URL) and the port in it.
fn url_line(server: &mut Server) -> (String, u16) {
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.split("http://127.0.0.1:").nth(1).unwrap().split('/').next().unwrap().parse().unwrap();
    (line, port)
}

#[test]
fn serve_prints_its_url_and_answers() {
    let child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "cpu", "--port", "0", "--max-model-len", "512", "--max-num-seqs", "2"])
        .args(["--served-model-name", "tiny", "--api-key", "k3y"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let (line, port) = url_line(&mut server);
    assert!(line.contains("dsv4 serving `tiny` at http://127.0.0.1:"), "{line}");
    assert!(line.contains("max model len 512") && line.contains("API key required"), "{line}");

    assert_eq!(http(port, "GET", "/health", &[], "").0, 200);
    let chat = r#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#;
    let (status, body) = http(port, "POST", "/v1/chat/completions", &[], chat);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(port, "POST", "/v1/chat/completions", &["authorization: Bearer k3y"], chat);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"object\":\"chat.completion\""), "{body}");
    let (status, body) = http(port, "GET", "/v1/models", &["x-api-key: k3y"], "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"max_model_len\":512"), "{body}");
}

#[test]
fn serve_refuses_a_kv_cache_too_small() {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "cpu", "--port", "0", "--kv-cache-memory", "1000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-cache-memory"), "{err}");
}

/// `dsv4 serve --backend cpu --port 0 ARGS`, expected to exit: its status and stderr. A server
/// that starts anyway fails the test after 60 s and is killed (`Server`'s drop), not waited for.
fn serve_refusal(args: &[&str]) -> (std::process::ExitStatus, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "cpu", "--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    exit_of(
        &mut Server(child),
        std::time::Instant::now() + Duration::from_secs(60),
        &format!("{args:?}: the server started"),
    )
}

/// Waits for `server` (started with its stderr piped) to exit by `deadline`, failing the test
/// with `what` past it; its status and stderr.
fn exit_of(server: &mut Server, deadline: std::time::Instant, what: &str) -> (std::process::ExitStatus, String) {
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    server.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status, err)
}

#[test]
fn serve_refuses_flags_that_would_refuse_every_request_or_drop_the_key() {
    for (flags, want) in [(&["--max-waiting", "0"], "--max-waiting"), (&["--api-key", ""], "--api-key")] {
        let mut args = vec!["--max-model-len", "512", "--max-num-seqs", "2"];
        args.extend(flags);
        let (status, err) = serve_refusal(&args);
        assert!(!status.success(), "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

/// Counts of 0 are refused as clap refuses any bad flag value (exit status 2), before anything
/// else is printed: no memory plan, no backend.
#[test]
fn serve_refuses_zero_counts_before_anything_else() {
    for flag in ["--max-num-seqs", "--max-model-len", "--max-num-batched-tokens", "--prefill-chunk", "--max-waiting"] {
        let (status, err) = serve_refusal(&[flag, "0"]);
        assert_eq!(status.code(), Some(2), "{flag}: {err}");
        assert!(err.starts_with(&format!("error: invalid value '0' for '{flag} <")), "{flag}: {err}");
        assert!(err.contains(": must be at least 1"), "{flag}: {err}");
        assert!(!err.contains("memory plan") && !err.contains("backend:"), "{flag}: {err}");
    }
}

#[test]
fn serve_refuses_a_max_model_len_past_the_context_before_sizing_the_pool() {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "cpu", "--port", "0", "--max-model-len", "999999999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-model-len 999999999 is longer than the model's context"), "{err}");
    // No pool was sized for it.
    assert!(!err.contains("kv cache:"), "{err}");
}

#[test]
fn serve_reports_a_taken_port_before_loading_the_model() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "cpu", "--port", &port, "--max-model-len", "512", "--max-num-seqs", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
    // Nothing was loaded first.
    assert!(!err.contains("backend:") && !err.contains("kv cache:"), "{err}");
}

/// The AscendCL emulator's library, built if needed.
fn emulator() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    dsv4_ascend_sys::emulator::build(std::path::Path::new(env!("CARGO")), &manifest).unwrap()
}

/// `serve --devices 4 --tensor-parallel 2` answers exactly as one device, on the CPU backend and
/// on four emulated Ascend devices over the emulator's HCCL, joined through HCCL's root info or
/// a rank table (`--rank-table`: `HcclCommInitClusterInfo`); so does `serve --devices 2
/// --data-parallel-attention` on both, whose two requests one after the other run on rank 0,
/// then rank 1.
#[test]
fn serve_split_over_ranks_answers_as_one_device() {
    let emulator = emulator();
    let mut answers = vec![];
    let table = std::env::temp_dir().join(format!("dsv4-serve-rank-table-{}.json", std::process::id()));
    let devices: Vec<String> =
        (0..4).map(|d| format!(r#"{{"device_id": "{d}", "device_ip": "192.168.1.{d}", "rank_id": "{d}"}}"#)).collect();
    std::fs::write(
        &table,
        format!(
            r#"{{"status": "completed", "version": "1.0", "server_count": "1",
                "server_list": [{{"server_id": "serve-test", "device": [{}]}}]}}"#,
            devices.join(", ")
        ),
    )
    .unwrap();
    let split = ["--devices", "4", "--tensor-parallel", "2", "--kv-cache-memory", "64MiB"];
    let with_table = [&split[..], &["--rank-table", table.to_str().unwrap()]].concat();
    let dp = ["--devices", "2", "--data-parallel-attention", "--kv-cache-memory", "64MiB"];
    let runs = [
        ("cpu", &[][..]),
        ("cpu", &split[..]),
        ("ascend", &split[..]),
        ("ascend", &with_table[..]),
        ("cpu", &dp[..]),
        ("ascend", &dp[..]),
    ];
    for (backend, devices) in runs {
        let child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
            .args(["serve", "--backend", backend, "--port", "0", "--max-model-len", "256", "--max-num-seqs", "4"])
            .args(devices)
            .env(dsv4_ascend_sys::EMULATOR_VAR, &emulator)
            .env("DSV4_ASCEND_EMU_DEVICES", "4")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server(child);
        let (_, port) = url_line(&mut server);
        let mut texts = vec![];
        for _ in 0..2 {
            let body = r#"{"prompt": "Hello there", "max_tokens": 12, "temperature": 0}"#;
            let (status, body) = http(port, "POST", "/v1/completions", &[], body);
            assert_eq!(status, 200, "{backend} {devices:?}: {body}");
            texts.push(body.split("\"text\":").nth(1).unwrap().split(",\"logprobs\"").next().unwrap().to_string());
        }
        assert_eq!(texts[0], texts[1], "{backend} {devices:?}: the second request");
        answers.push(texts.swap_remove(0));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[0], answers[3], "through the rank table");
    assert_eq!(answers[0], answers[4], "data-parallel attention");
    assert_eq!(answers[0], answers[5], "data-parallel attention on Ascend");
    std::fs::remove_file(&table).ok();
}

/// `dsv4 serve --backend ascend --port 0 ARGS` on the emulator with `env`, expected to be
/// refused at once: its stderr.
fn ascend_serve_refusal(args: &[&str], env: (&str, &str)) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "ascend", "--port", "0"])
        .args(args)
        .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
        .env(env.0, env.1)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// fp8 rows on an Ascend A2 are refused with the backend's reason, as `generate` and `chat`
/// refuse them, before any weights load.
#[test]
fn serve_refuses_rows_the_backend_does_not_keep_in_its_words() {
    let err = ascend_serve_refusal(
        &["--kv-dtype", "fp8", "--kv-cache-memory", "64MiB"],
        ("DSV4_ASCEND_EMU_SOC", "Ascend910B3"),
    );
    let words = "--kv-dtype fp8: backend `ascend`: fp8 KV rows need aclnnCast's FLOAT8_E4M3FN paths, which only the \
                 Ascend 950 has (this device: Ascend910B3); use --kv-dtype bf16";
    assert!(err.contains(words), "{err}");
    assert!(!err.contains("memory plan") && !err.contains("kv cache:"), "{err}");
}

/// Data-parallel attention's requests stay in the process that took them: over several nodes
/// it is refused, before any node waits for the others.
#[test]
fn serve_refuses_data_parallel_attention_over_nodes() {
    let args = ["--devices", "2", "--data-parallel-attention", "--kv-cache-memory", "64MiB", "--nnodes", "2"];
    let nodes = ["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", "1"];
    let err = ascend_serve_refusal(&[&args[..], &nodes].concat(), ("DSV4_ASCEND_EMU_DEVICES", "4"));
    assert!(err.contains("--data-parallel-attention within one node for now") && err.contains("--nnodes 2"), "{err}");
}

/// A rank that fails mid-request while its peers wait for it in a collective that nothing wakes
/// (on hardware: HCCL until its execution timeout, NCCL for ever; here the emulator's injected
/// failure, with the communicators' timeout set past the test's) ends the server with the
/// rank's error, instead of a server that hangs.
#[test]
fn a_rank_that_fails_mid_request_ends_the_server_with_its_error() {
    let child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["serve", "--backend", "ascend", "--port", "0", "--max-model-len", "256", "--max-num-seqs", "4"])
        .args(["--devices", "2", "--kv-cache-memory", "64MiB"])
        .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
        .env("DSV4_ASCEND_EMU_DEVICES", "2")
        // Rank 1's 40th collective (loading the model takes fewer; 100 tokens take more).
        .env("DSV4_ASCEND_EMU_HCCL_FAIL", "1:40")
        // The communicators' hcclExecTimeOut (the emulator honours it as HCCL does).
        .env("DSV4_COMM_TIMEOUT_S", "600")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let (_, port) = url_line(&mut server);
    let start = std::time::Instant::now();
    // The request in flight gets the error (in the API's shape), then the process ends.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = r#"{"prompt": "Hello there", "max_tokens": 100, "temperature": 0}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let (status, err) =
        exit_of(&mut server, start + Duration::from_secs(120), "the server still runs after rank 1 failed");
    assert!(!status.success(), "{status}: {err}");
    assert!(err.contains("rank 1's engine stopped") && err.contains("injected by DSV4_ASCEND_EMU_HCCL_FAIL"), "{err}");
    assert!(err.contains("the server stops"), "{err}");
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(answer.contains("{\"error\":") && answer.contains("rank 1's engine stopped"), "{answer}");
}
