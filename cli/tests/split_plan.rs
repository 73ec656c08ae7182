//! `dsv4 serve --devices N` starts from the memory plan of `dsv4 plan` (a summary per rank on
//! stderr; a layout that does not fit refused before the ranks load, naming the shortfall and
//! what to change), and `dsv4 bench --devices N` times a split run and counts its communication
//! against the plan's figure.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};

/// Kills the server when the test ends, whether it passes or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dsv4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv4")).args(args).output().unwrap()
}

const SERVE: [&str; 6] = ["serve", "--backend", "cpu", "--port", "0", "--devices"];

#[test]
fn serve_prints_the_plan_of_its_ranks_at_start_up() {
    let child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(SERVE)
        .args(["2", "--max-model-len", "256", "--max-num-seqs", "4", "--kv-cache-memory", "4MiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("dsv4 serving"), "{line}");
    let _ = server.0.kill();
    let _ = server.0.wait();
    let mut err = String::new();
    server.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let at = |needle: &str| err.find(needle).unwrap_or_else(|| panic!("no `{needle}` in\n{err}"));
    let order = [
        at("memory plan (as `dsv4 plan`): 2 ranks, TP 1, EP 2; per rank "),
        at(" available to this process / 2 ranks)"),
        at("\n  ranks 0-1: weights "),
        at("KV pool 4"),
        at("holds 4 sequences (--max-num-seqs) × "),
        at("longest sequence served: 256 (--max-model-len)"),
        at("kv cache: f32, "),
    ];
    assert!(order.is_sorted(), "{order:?} in\n{err}");
}

#[test]
fn serve_refuses_a_layout_that_does_not_fit_with_what_to_change() {
    for (extra, want) in [
        (
            &["--max-model-len", "65536", "--max-num-seqs", "4", "--kv-cache-memory", "4MiB"][..],
            &[
                "does not fit: with 4 running sequences",
                "--max-model-len asks 65536",
                "; short by ",
                "a smaller --max-model-len (at most ",
                "a larger --kv-cache-memory (up to ",
            ][..],
        ),
        (
            &["--max-model-len", "256", "--max-num-seqs", "1000", "--kv-cache-memory", "1MiB"],
            &[
                "cannot hold the sliding windows of 1000 running sequences plus one compressed block (",
                "fewer --max-num-seqs (at most 2 fit at --max-model-len 256)",
            ],
        ),
        (
            &["--max-model-len", "256", "--kv-cache-memory", "1000TiB"],
            &["--kv-cache-memory asks 1000.00 TiB per rank", "a smaller --kv-cache-memory (at most "],
        ),
    ] {
        let o = dsv4(&[&SERVE[..], &["2"], extra].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{extra:?}: no `{w}` in {err}");
        }
        // One figure for the sequences that fit, not also the error's count of their windows.
        assert!(err.matches("at most ").count() <= 2 && !err.contains("only "), "{err}");
        // Refused from the plan: no pool was made, no rank loaded.
        assert!(err.contains("memory plan of 2 ranks (TP 1, EP 2)") && !err.contains("kv cache:"), "{err}");
    }
    // fp8 rows hold four times the tokens of f32: suggested when they fit.
    let o = dsv4(
        &[
            &SERVE[..],
            &[
                "2",
                "--max-model-len",
                "2000",
                "--max-num-seqs",
                "1",
                "--kv-cache-memory",
                "200KiB",
                "--prefill-chunk",
                "16",
            ],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--kv-dtype fp8 (it fits with fp8 rows)"), "{err}");
}

/// On one device the plan is the same computation: its summary before the weights load, its
/// refusal before anything is loaded.
#[test]
fn serve_on_one_device_starts_from_the_plan_too() {
    let o = dsv4(&["serve", "--backend", "cpu", "--port", "0", "--max-num-seqs", "2", "--kv-cache-memory", "1000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: the memory plan of one device does not fit: a KV pool of 1000 B"), "{err}");
    assert!(err.contains("not even one sequence's") && err.contains("a larger --kv-cache-memory (up to "), "{err}");
    assert!(!err.contains("backend:") && !err.contains("kv cache:"), "nothing loaded: {err}");
}

/// `bench --devices 2`: rank 0's rows like the one-device bench, then every rank's payload per
/// decoded token as the in-process communicator counted it, equal to the plan's.
#[test]
fn bench_on_two_ranks_counts_what_the_plan_computes() {
    let args = ["bench", "--backend", "cpu", "--contexts", "16,40", "--decode-steps", "2", "--threads", "1"];
    let o = dsv4(&[&args[..], &["--devices", "2"]].concat());
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("ranks: 2 (TP 1, EP 2)"), "{out}");
    let rows: Vec<&str> =
        out.lines().filter(|l| l.split_whitespace().next().is_some_and(|w| w.parse::<usize>().is_ok())).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].split_whitespace().next() == Some("16"), "{out}");
    let comm: Vec<&str> = out.lines().filter(|l| l.starts_with("comm | context ")).collect();
    // builtin:tiny, EP 2: one all-reduce of 64 f32 (256 B) per layer, 4 layers: 1024 B a token.
    assert_eq!(comm.len(), 2, "{out}");
    for line in comm {
        assert!(line.contains("ranks 0-1: counted 1024 B per token (4 all-reduces of 256 B each)"), "{line}");
        assert!(line.ends_with("| planned 1024 B per token (4 all-reduces of 256 B each): equal"), "{line}");
    }

    let o = dsv4(&[&args[..], &["--devices", "4", "--tensor-parallel", "2", "--json"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let devices = serde_json::json!({"world": 4, "tensor_parallel": 2, "expert_parallel": 4, "moe_exchange": "all-reduce", "data_parallel_attention": false});
    assert_eq!(j["devices"], devices);
    for row in j["rows"].as_array().unwrap() {
        assert!(row["decode_ms_per_token"].as_f64().unwrap() > 0.0, "{row}");
        let ranks = row["comm"].as_array().unwrap();
        assert_eq!(ranks.len(), 4, "{row}");
        for r in ranks {
            assert_eq!(r["matches_plan"], true, "{r}");
            assert_eq!(r["counted_bytes_per_token"].as_f64().unwrap(), r["plan_bytes_per_token"].as_f64().unwrap());
        }
    }
}

#[test]
fn bench_refuses_what_a_split_run_does_not_do() {
    for (extra, want) in [
        (&["--speculative-tokens", "2"][..], "--speculative-tokens runs on one device for now"),
        (&["--profile"], "profile without --devices"),
        (&["--backend", "cuda"], "could not be loaded (tried lib"),
    ] {
        let o = dsv4(&[&["bench", "--contexts", "8", "--decode-steps", "1", "--devices", "2"][..], extra].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{extra:?}: {err}");
    }
}
