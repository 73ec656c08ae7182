//! `--speculative-tokens` of `dsv4 generate`, `chat` and `bench`: the checkpoint's MTP block
//! drafts, the main model verifies, and greedy output stays the plain greedy output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn dsv4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases").join(name)
}

fn run_ok(args: &[&str]) -> (String, String) {
    let o = dsv4().args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(o.status.success(), "{args:?} failed:\n{stdout}{stderr}");
    (stdout, stderr)
}

/// Runs a command that must fail without panicking; returns (stdout, stderr).
fn failing(args: &[&str]) -> (String, String) {
    let o = dsv4().args(args).stdin(Stdio::null()).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(!o.status.success(), "{args:?} should fail:\n{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    (stdout, stderr)
}

fn read_i64(path: &Path, name: &str) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string()).collect()
}

/// `N of M drafts accepted` from the summary line of a speculative generate.
fn accepted(stderr: &str) -> (usize, usize) {
    let line = stderr.lines().find(|l| l.starts_with("speculative: ")).unwrap_or_else(|| panic!("{stderr}"));
    let counts = line.split("; ").nth(1).unwrap_or_else(|| panic!("{line}"));
    let words: Vec<&str> = counts.split_whitespace().collect();
    assert_eq!(words[1..4], ["of", words[2], "drafts"], "{line}");
    (words[0].parse().unwrap(), words[2].parse().unwrap())
}

/// On `official_fp8` (FP8/FP4 weights with an MTP block, no tokenizer), `generate --ids
/// --print-ids --temperature 0 --speculative-tokens K` prints exactly the ids plain greedy
/// decoding prints, for K = 1, 2, 3, on a prompt that crosses compression windows and a page
/// (the fixture's 236-token continuation prompt, 64 tokens more) and on a short one; the
/// summary adds the speculation figures.
#[test]
fn speculative_generate_prints_the_plain_greedy_ids() {
    let case = fixture("official_fp8");
    let model = case.to_str().unwrap();
    let long = read_i64(&case.join("continuation.safetensors"), "prompt_ids").join(",");
    let mut total_accepted = 0;
    for prompt in [long.as_str(), "34,16,65,30,126,115,120,97,53,24,124,7"] {
        let base = [
            "generate",
            "--model",
            model,
            "--backend",
            "cpu",
            "--ids",
            prompt,
            "--print-ids",
            "--temperature",
            "0",
            "--max-new-tokens",
            "64",
        ];
        let (plain, stderr) = run_ok(&base);
        assert!(!stderr.contains("speculative"), "{stderr}");
        assert_eq!(plain.trim().split(',').count(), 64, "{plain}");
        for k in ["1", "2", "3"] {
            let (ids, stderr) = run_ok(&[&base[..], &["--speculative-tokens", k]].concat());
            assert_eq!(ids, plain, "--speculative-tokens {k}\n{stderr}");
            assert!(stderr.contains(&format!("speculative: {k} drafts per step (MTP block); ")), "{stderr}");
            assert!(stderr.contains(" tokens per main-model step (") && stderr.contains("drafting"), "{stderr}");
            let (acc, drafted) = accepted(&stderr);
            assert!(acc <= drafted && drafted > 0, "{stderr}");
            total_accepted += acc;
        }
    }
    // Random weights accept little, but some: the accept and rollback paths ran.
    assert!(total_accepted > 0);
}

/// Without an MTP block to draft with, `--speculative-tokens` is refused before any work (no
/// kv cache line, nothing generated), naming the flag; so is a split model, which does not load
/// the MTP block.
#[test]
fn speculative_tokens_need_an_mtp_block() {
    let official = fixture("official");
    let official = official.to_str().unwrap();
    for (args, why) in [
        (
            &["generate", "--model", "builtin:tiny", "--ids", "1,2"][..],
            "of the built-in models only builtin:tiny-mtp has one",
        ),
        (&["chat", "--model", "builtin:tiny"], "of the built-in models only builtin:tiny-mtp has one"),
        (&["serve", "--model", "builtin:tiny", "--port", "0"], "of the built-in models only builtin:tiny-mtp has one"),
        (&["generate", "--model", official, "--ids", "1,2"], "it holds no mtp.0.* tensors"),
        (
            &["bench", "--model", "builtin:tiny", "--contexts", "8", "--decode-steps", "1"],
            "of the built-in models only builtin:tiny-mtp has one",
        ),
    ] {
        let (stdout, stderr) = failing(&[args, &["--backend", "cpu", "--speculative-tokens", "2"]].concat());
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(!stderr.contains("kv cache:"), "{args:?}: {stderr}");
        assert!(stderr.contains("error: --speculative-tokens 2: ") && stderr.contains("has no MTP block"), "{stderr}");
        assert!(stderr.contains(why) && stderr.contains("drop --speculative-tokens"), "{args:?}: {stderr}");
    }
    let model = fixture("official_fp8");
    let (_, stderr) = failing(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--ids",
        "1,2",
        "--devices",
        "2",
        "--speculative-tokens",
        "2",
    ]);
    assert!(stderr.contains("--speculative-tokens runs on one device"), "{stderr}");
    // 0 is off, and the default.
    run_ok(&["generate", "--backend", "cpu", "--ids", "1,2", "--max-new-tokens", "2", "--speculative-tokens", "0"]);
    let (help, _) = run_ok(&["generate", "--help"]);
    assert!(help.contains("--speculative-tokens <K>") && help.contains("MTP block"), "{help}");
    let (help, _) = run_ok(&["chat", "--help"]);
    assert!(help.contains("--speculative-tokens <K>"), "{help}");
}

/// `bench --speculative-tokens 2` on `official_fp8`: in the same run as the plain decode, each
/// row has the acceptance, tokens per main-model step, the verify step's cost in 1-token steps
/// and both decode rates (`--json`: the row's `speculative`); the text report says what the
/// acceptance is worth and prints three `speculative |` lines under each row.
#[test]
fn bench_measures_speculative_decoding() {
    let model = fixture("official_fp8");
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--contexts",
        "16,40",
        "--decode-steps",
        "6",
        "--prefill-chunk",
        "8",
        "--threads",
        "1",
        "--speculative-tokens",
        "2",
    ];
    let (stdout, _) = run_ok(&[&args[..], &["--json"]].concat());
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(j["speculative_tokens"], 2, "{stdout}");
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        let s = &row["speculative"];
        let f = |key: &str| s[key].as_f64().unwrap_or_else(|| panic!("no `{key}` in {s}"));
        assert_eq!(s["draft_tokens"], 2, "{s}");
        assert!((0.0..=1.0).contains(&f("acceptance_rate")), "{s}");
        assert!(f("tokens_per_step") >= 1.0 && f("tokens_per_step") <= 3.0, "{s}");
        assert!(f("verify_cost_ratio") > 0.0 && f("step_ms") > 0.0 && f("verify_step_ms") > 0.0, "{s}");
        assert!(f("draft_cost_ratio") > 0.0 && f("expected_speedup") > 0.0, "{s}");
        assert!(f("decode_tok_s") > 0.0 && f("plain_decode_tok_s") > 0.0 && f("speedup") > 0.0, "{s}");
        assert_eq!(s["decode_tokens"], 6, "{s}");
        assert!(f("accepted") <= f("drafted") && f("verify_steps") >= 2.0, "{s}");
        let tps = f("tokens_per_step");
        assert!((tps * f("verify_steps") - 6.0).abs() < 1e-9, "{s}");
    }
    // The second context continues after both decodes: 16 + 6 plain + 1 + 6 speculative tokens,
    // the last (and any a rollback left) not fed yet.
    assert_eq!(rows[1]["context"], 40);
    let prefilled = rows[1]["prefill_tokens"].as_u64().unwrap();
    assert!((40 - 28..=40 - 22).contains(&prefilled), "{stdout}");

    let (stdout, _) = run_ok(&args);
    assert!(stdout.contains("speculative decoding (--speculative-tokens 2): acceptance here"), "{stdout}");
    assert!(stdout.contains("verify-cost ratio"), "{stdout}");
    let spec: Vec<&str> = stdout.lines().filter(|l| l.starts_with("speculative | ")).collect();
    assert_eq!(spec.len(), 6, "{stdout}");
    assert!(
        spec[0].contains("context 16, 2 drafts per step") && spec[1].contains("verify step of 3 tokens"),
        "{stdout}"
    );
    assert!(spec[2].contains(" plain: ") && spec[2].contains("expected"), "{stdout}");
    // The table keeps its header and one row per context (rows start with a blank or a digit).
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit() || c == ' ')).collect();
    assert_eq!(table.len(), 3, "{stdout}");
    assert!(table[1].trim_start().starts_with("16 ") && table[2].trim_start().starts_with("40 "), "{stdout}");

    // Speculation needs plain decode steps to compare with, and is not profiled.
    let no_steps: Vec<&str> = args.iter().map(|&a| if a == "6" { "0" } else { a }).collect();
    let (_, stderr) = failing(&no_steps);
    assert!(stderr.contains("give --decode-steps of at least 1"), "{stderr}");
    let (_, stderr) = failing(&[&args[..], &["--profile"]].concat());
    assert!(stderr.contains("--profile"), "{stderr}");
}

/// A split model does not load its MTP block: `serve --devices 2 --speculative-tokens` is
/// refused for that, before anything loads, not blamed on a checkpoint that has the block.
#[test]
fn speculation_over_devices_is_refused_for_the_right_reason() {
    let args =
        ["serve", "--model", "builtin:tiny-mtp", "--backend", "cpu", "--devices", "2", "--speculative-tokens", "1"];
    let (_, err) = failing(&args);
    assert!(err.contains("--speculative-tokens runs on one device for now"), "{err}");
    assert!(!err.contains("does not have") && !err.contains("kv cache:"), "{err}");
}
