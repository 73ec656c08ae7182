//! The `dsv4` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn dsv4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv4-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        }
        other => panic!("{name} is {other:?}"),
    };
    (t.shape().to_vec(), v)
}

/// The acceptance interface: `dsv4 logits --model DIR --ids ... --out FILE` on a fixture
/// checkpoint written by transformers, compared with the reference (same 1e-4 bound as the
/// conformance suite).
#[test]
fn logits_match_reference_through_the_cli() {
    let case = fixture("odd_hc2");
    let reference = case.join("reference.safetensors");
    let bytes = std::fs::read(&reference).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<String> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    let out = tmp("odd_hc2_logits.safetensors");
    let status = dsv4()
        .args(["logits", "--model", case.to_str().unwrap(), "--backend", "cpu", "--ids", &ids.join(","), "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let (shape, got) = read_f32(&out, "logits");
    let (want_shape, want) = read_f32(&reference, "logits");
    assert_eq!(shape, want_shape);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= 1e-4, "max rel err {err}");
}

#[test]
fn builtin_model_is_the_default() {
    let out = tmp("builtin.safetensors");
    let status = dsv4().args(["logits", "--ids", "0,5,17,42,200", "--out"]).arg(&out).status().unwrap();
    assert!(status.success());
    let (shape, v) = read_f32(&out, "logits");
    assert_eq!(shape, vec![5, 271]);
    assert!(v.iter().all(|x| x.is_finite()));
    // Deterministic weights: a second run gives identical bits.
    let out2 = tmp("builtin2.safetensors");
    assert!(dsv4().args(["logits", "--ids", "0,5,17,42,200", "--out"]).arg(&out2).status().unwrap().success());
    assert_eq!(read_f32(&out2, "logits").1, v);
}

fn failing(args: &[&str]) -> String {
    let o = dsv4().args(args).output().unwrap();
    assert!(!o.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

#[test]
fn bad_input_gives_an_actionable_error() {
    let out = tmp("never.safetensors");
    let out = out.to_str().unwrap();
    assert!(failing(&["logits", "--ids", "1,abc", "--out", out]).contains("`abc` is not a token id"));
    assert!(failing(&["logits", "--ids", "1,271", "--out", out]).contains("token id 271 is outside the vocabulary"));
    assert!(failing(&["logits", "--model", "/no/such/dir", "--ids", "1", "--out", out]).contains("does not exist"));
    assert!(failing(&["logits", "--model", "builtin:huge", "--ids", "1", "--out", out]).contains("unknown built-in"));
    let e = failing(&["logits", "--backend", "ascend", "--ids", "1", "--out", out]);
    assert!(e.contains("ASCEND_TOOLKIT_HOME") || e.contains("does not implement"), "{e}");
    // V4's vocabulary with no tokenizer: refused before loading, not at the first token past the
    // byte tokenizer's 271 ids; token ids in and out still work.
    for cmd in [
        &["chat", "--model", "builtin:tiny-v4vocab"][..],
        &["generate", "--model", "builtin:tiny-v4vocab", "--prompt", "hi"],
    ] {
        let e = failing(cmd);
        assert!(e.contains("129,280-id vocabulary") && e.contains("--tokenizer"), "{e}");
    }
    let (ids, _) = run_ok(&[
        "generate",
        "--model",
        "builtin:tiny-v4vocab",
        "--ids",
        "1,2",
        "--print-ids",
        "--max-new-tokens",
        "2",
    ]);
    assert!(!ids.trim().is_empty(), "{ids}");
    // No GPU here: the CUDA backend says which library is missing and what to install.
    let e = failing(&["logits", "--backend", "cuda", "--ids", "1", "--out", out]);
    assert!(e.contains("backend `cuda`") && e.contains("To fix:"), "{e}");
}

#[test]
fn inspect_reports_schedule_and_dtypes() {
    let o = dsv4().args(["inspect", "--model"]).arg(fixture("official")).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("CSA (compress 4, overlap, indexer)") && s.contains("HCA (compress 128)"), "{s}");
    assert!(s.contains("hash-routed MoE") && s.contains("I64"), "{s}");
}

/// Path of the AscendCL emulator library, built on first use.
fn emulator() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    dsv4_ascend_sys::emulator::build(Path::new(env!("CARGO")), &manifest).unwrap_or_else(|e| panic!("{e}"))
}

/// What a user runs on a new cluster: the built-in model through the CPU reference and the
/// Ascend backend (here on the emulator). Every block is listed, CSA layers with the share of
/// indexer picks the backends agree on, and the run passes the default tolerance.
#[test]
fn check_compares_cpu_and_ascend_block_by_block() {
    let out = dsv4()
        .args(["check", "--backends", "cpu,ascend"])
        .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("on dsv4's CPU emulator"), "{text}");
    let csa: Vec<&str> = text.lines().filter(|l| l.contains("(CSA/")).collect();
    assert!(!csa.is_empty(), "no CSA layer in\n{text}");
    for line in &csa {
        assert!(line.trim_end().ends_with("100.0%"), "indexer picks differ: {line}");
    }
    let rows = text.lines().filter(|l| l.trim_start().starts_with("layer ")).count();
    assert_eq!(rows, 4, "{text}");
    assert!(text.contains("ok: worst relative difference"), "{text}");
}

/// A device that opens but cannot run V4 (the emulator posing as an Atlas 310P: no
/// `aclnnInplaceIndexCopy` for the KV pools): `dsv4 devices` shows it as unusable with the
/// reason, `--backend ascend` is refused with it before the model loads, and `--backend auto`
/// says it and runs on the CPU.
#[test]
fn a_device_that_cannot_run_v4_is_named_and_skipped() {
    let run = |args: &[&str]| {
        dsv4()
            .args(args)
            .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
            .env("DSV4_ASCEND_EMU_SOC", "Ascend310P3")
            .output()
            .unwrap()
    };
    let out = run(&["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("ascend")).unwrap_or_default();
    assert!(line.starts_with("ascend  unusable") && line.contains("aclnnInplaceIndexCopy"), "{text}");
    assert!(!text.contains("fused kernel"), "{text}");

    let out = run(&["logits", "--backend", "ascend", "--ids", "1,2", "--out", "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Ascend device 0 (Ascend310P3) cannot run V4: KV pools need aclnnInplaceIndexCopy"), "{err}");

    let dir = std::env::temp_dir().join(format!("dsv4-cannot-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("logits.safetensors");
    let out = run(&["logits", "--ids", "1,2", "--out", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("cannot run V4") && err.contains("running on the CPU backend"), "{err}");
    assert!(path.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// An emulated SoC name of no known family is refused when the runtime opens, naming the
/// variable, rather than on the first operator that depends on the family.
#[test]
fn an_unknown_emulated_soc_is_refused_at_open() {
    let out = dsv4()
        .args(["logits", "--backend", "ascend", "--ids", "1,2", "--out", "/dev/null"])
        .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
        .env("DSV4_ASCEND_EMU_SOC", "Ascend999")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("aclInit: DSV4_ASCEND_EMU_SOC=\"Ascend999\" is not a SoC the emulator knows"), "{err}");
}

/// A tolerance no two float pipelines meet makes `check` fail, naming the worst difference.
#[test]
fn check_fails_above_the_tolerance() {
    let out = dsv4()
        .args(["check", "--backends", "cpu,ascend", "--tolerance", "1e-12", "--ids", "1,2,3,4,5,6,7,8,9"])
        .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("<-- above tolerance"), "{stdout}");
    assert!(stderr.contains("backends disagree: worst relative difference"), "{stderr}");
}

fn run_ok(args: &[&str]) -> (String, String) {
    let o = dsv4().args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(o.status.success(), "{args:?} failed:\n{stdout}{stderr}");
    (stdout, stderr)
}

/// `inspect --context` prints what a live pool holds: the held bytes equal the layout's
/// `sequence_footprint` and what a session on the CPU backend holds after the same tokens.
#[test]
fn inspect_held_bytes_are_the_live_pools() {
    use dsv4_core::kv::layout::{default_block_tokens, sequence_footprint};
    use dsv4_core::kv::{KvConfig, KvDtype};

    let (stdout, _) = run_ok(&["inspect", "--model", "builtin:tiny", "--context", "200", "--kv-dtype", "fp8"]);
    let held: usize = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("held: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no held line in\n{stdout}"))
        .parse()
        .unwrap();
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    let want = sequence_footprint(&cfg, KvDtype::Fp8, default_block_tokens(&cfg), 200);
    assert_eq!(held, want.held_bytes, "{stdout}");
    assert!(stdout.contains(&format!("{} compressed blocks", want.compressed_blocks)), "{stdout}");
    assert!(stdout.contains("--kv-dtype fp8"), "{stdout}");

    let be = dsv4_backend_cpu::CpuBackend::new();
    let model = dsv4_core::Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
    let config = KvConfig::for_sequences(&cfg, KvDtype::Fp8, 1, 200, 64);
    let mut session = dsv4_core::generate::Session::new(&be, &model, config).unwrap();
    let ids: Vec<u32> = (0..200u32).map(|i| i * 7 % 271).collect();
    session.feed(&be, &ids, 64).unwrap();
    assert_eq!(session.state_bytes(), held);
}

/// `--kv-dtype` changes what `logits` computes (the keys attention reads are rounded), a
/// little; a `--kv-cache-memory` pool computes the same as the exactly sized one.
#[test]
fn kv_dtype_and_budget_reach_the_logits() {
    let ids = (0..150).map(|i| (i * 13 % 271).to_string()).collect::<Vec<_>>().join(",");
    let logits = |extra: &[&str], name: &str| {
        let out = tmp(name);
        let mut args = vec!["logits", "--backend", "cpu", "--ids", &ids, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        run_ok(&args);
        read_f32(&out, "logits").1
    };
    let f32_rows = logits(&[], "kv_f32.safetensors");
    let fp8_rows = logits(&["--kv-dtype", "fp8"], "kv_fp8.safetensors");
    let bf16_rows = logits(&["--kv-dtype", "bf16"], "kv_bf16.safetensors");
    let rel = |a: &[f32], b: &[f32]| {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    // Mean |Δ| relative to the mean |logit|: a random model's discrete choices (indexer top-k,
    // top-k routing) can flip on a rounded key, so the largest difference says little.
    let mean_rel = |a: &[f32], b: &[f32]| {
        let scale: f64 = a.iter().map(|v| v.abs() as f64).sum();
        a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / scale
    };
    assert!(fp8_rows.iter().chain(&bf16_rows).all(|v| v.is_finite()));
    let (e_fp8, e_bf16) = (mean_rel(&f32_rows, &fp8_rows), mean_rel(&f32_rows, &bf16_rows));
    assert!(e_fp8 > 0.0 && e_fp8 < 0.2, "fp8 vs f32: {e_fp8}");
    assert!(e_bf16 > 0.0 && e_bf16 < e_fp8, "bf16 vs f32: {e_bf16} (fp8 {e_fp8})");
    let budget = logits(&["--kv-cache-memory", "4MiB"], "kv_budget.safetensors");
    assert!(rel(&f32_rows, &budget) <= 1e-6, "{}", rel(&f32_rows, &budget));
}

#[test]
fn a_kv_budget_too_small_or_malformed_is_a_clear_error() {
    let out = tmp("never_kv.safetensors");
    let out = out.to_str().unwrap();
    let e = failing(&["logits", "--backend", "cpu", "--ids", "1,2,3", "--kv-cache-memory", "1KiB", "--out", out]);
    assert!(e.contains("cannot hold the sliding windows") && e.contains("raise --kv-cache-memory"), "{e}");
    let e = failing(&["generate", "--backend", "cpu", "--ids", "1,2,3", "--kv-cache-memory", "1000"]);
    assert!(e.contains("cannot hold the sliding windows"), "{e}");
    // Room for the windows of a 300-token step and one block of 64 tokens, not for 300 tokens:
    // refused before anything runs.
    let ids = (0..300).map(|i| (i % 271).to_string()).collect::<Vec<_>>().join(",");
    let e = failing(&["logits", "--backend", "cpu", "--ids", &ids, "--kv-cache-memory", "300KiB", "--out", out]);
    assert!(e.contains("holds 64 tokens but this run needs 300") && e.contains("raise --kv-cache-memory"), "{e}");
    let e = failing(&["check", "--backends", "cpu,cpu", "--ids", &ids, "--kv-cache-memory", "300KiB"]);
    assert!(e.contains("holds 64 tokens") && e.contains("raise --kv-cache-memory"), "{e}");
    let e = failing(&["logits", "--ids", "1", "--kv-cache-memory", "8 parsecs", "--out", out]);
    assert!(e.contains("not a memory size"), "{e}");
    let e = failing(&["logits", "--ids", "1", "--kv-dtype", "int4", "--out", out]);
    assert!(e.contains("f32, bf16 or fp8"), "{e}");
}

#[test]
fn generate_reports_its_kv_cache() {
    let (_, stderr) =
        run_ok(&["generate", "--backend", "cpu", "--ids", "1,2,3,4,5", "--max-new-tokens", "4", "--kv-dtype", "fp8"]);
    assert!(stderr.contains("kv cache: fp8, 1 block of 64 tokens + "), "{stderr}");
    assert!(stderr.contains("up to 64 tokens"), "{stderr}");
    let (_, stderr) = run_ok(&[
        "generate",
        "--backend",
        "cpu",
        "--ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
        "--kv-cache-memory",
        "0.001",
    ]);
    assert!(stderr.contains("kv cache: f32, "), "{stderr}");
}

#[test]
fn check_and_bench_take_the_kv_flags() {
    let (stdout, _) = run_ok(&["check", "--backends", "cpu,cpu", "--kv-dtype", "fp8", "--ids", "1,2,3,4,5,6,7,8,9"]);
    assert!(
        stdout.contains("decoding state: fp8 rows") && stdout.contains("ok: worst relative difference"),
        "{stdout}"
    );
    let (stdout, _) = run_ok(&[
        "bench",
        "--backend",
        "cpu",
        "--contexts",
        "40,100",
        "--decode-steps",
        "2",
        "--prefill-chunk",
        "32",
        "--kv-dtype",
        "bf16",
    ]);
    assert!(stdout.contains("kv cache: bf16, 2 blocks of 64 tokens"), "{stdout}");
    assert!(stdout.contains("kv bytes/tok") && stdout.contains("kv held"), "{stdout}");
    let rows: Vec<&str> =
        stdout.lines().filter(|l| l.trim_start().starts_with("40 ") || l.trim_start().starts_with("100 ")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
}

/// `bench --profile` prints a prefill and a decode table before the context's row; with
/// `--json` the row holds the profiles instead.
#[test]
fn bench_profile_prints_the_tables() {
    let args = ["bench", "--model", "builtin:tiny", "--backend", "cpu", "--contexts", "16", "--decode-steps", "2"];
    let (stdout, _) = run_ok(&[&args[..], &["--profile"]].concat());
    for needle in ["prefill profile at context 16: 16 tokens", "decode profile at context 16: 2 tokens", "ms/token"] {
        assert!(stdout.contains(needle), "no `{needle}` in\n{stdout}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("prefill |") && l.ends_with(" hc_pre")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("decode  |") && l.contains(" listed ops: ")), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("16 ")).collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    // The warm-up is said, and its ops are in neither table (the call counts below).
    assert!(stdout.contains("warm-up: a prefill of 16 tokens and a decode step, untimed"), "{stdout}");
    let (stdout, _) = run_ok(&[&args[..], &["--profile", "--json"]].concat());
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let decode = j["rows"][0]["profile"]["decode"].as_array().unwrap();
    assert!(decode.iter().any(|e| e["op"] == "hc_head" && e["calls"] == 2), "{stdout}");
    // One prefill step of 16 tokens: one hc_head call (the warm-up's two are not counted).
    let prefill = j["rows"][0]["profile"]["prefill"].as_array().unwrap();
    assert!(prefill.iter().any(|e| e["op"] == "hc_head" && e["calls"] == 1), "{stdout}");
    // Without --profile the rows have no profile.
    let (stdout, _) = run_ok(&[&args[..], &["--json"]].concat());
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(j["rows"][0].get("profile").is_none(), "{stdout}");
    assert_eq!(j["warmup"]["prefill_tokens"], 16, "{stdout}");
    let (stdout, _) = run_ok(&[&args[..], &["--no-warmup"]].concat());
    assert!(stdout.contains("warm-up: none (--no-warmup)"), "{stdout}");
}

/// Without decode steps the pool holds the timed tokens only, and a context of whole blocks
/// leaves no room for a warm-up decode step: the warm-up is then a prefill alone.
#[test]
fn bench_without_decode_steps_warms_up_with_a_prefill_alone() {
    for context in ["64", "128"] {
        let args =
            ["bench", "--model", "builtin:tiny", "--backend", "cpu", "--contexts", context, "--decode-steps", "0"];
        let (stdout, _) = run_ok(&args);
        assert!(stdout.contains(&format!("warm-up: a prefill of {context} tokens, untimed")), "{stdout}");
        let (stdout, _) = run_ok(&[&args[..], &["--json"]].concat());
        let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            j["warmup"],
            serde_json::json!({"prefill_tokens": context.parse::<u64>().unwrap(), "decode_steps": 0})
        );
    }
}

/// `--weight-memory resident` and `mapped` give the same logits bit for bit on a sharded
/// checkpoint, and `bench --json` says which one the run got.
#[test]
fn weight_memory_resident_and_mapped_agree() {
    let case = fixture("sharded");
    let model = case.to_str().unwrap();
    let logits = |memory: &str| {
        let out = tmp(&format!("weight_memory_{memory}.safetensors"));
        let out_arg = out.to_str().unwrap();
        run_ok(&[
            "logits",
            "--model",
            model,
            "--backend",
            "cpu",
            "--ids",
            "1,2,3,4,5",
            "--out",
            out_arg,
            "--weight-memory",
            memory,
        ]);
        std::fs::read(&out).unwrap()
    };
    let resident = logits("resident");
    assert!(resident == logits("mapped"), "resident and mapped logits differ");
    for memory in ["resident", "mapped"] {
        let args = ["bench", "--model", model, "--backend", "cpu", "--contexts", "8", "--decode-steps", "1", "--json"];
        let (stdout, _) = run_ok(&[&args[..], &["--weight-memory", memory]].concat());
        let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(j["weight_memory"]["mode"], memory, "{stdout}");
    }
}

fn read_i64(path: &Path, name: &str) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string()).collect()
}

/// A copy of the `official` fixture (config.json + model.safetensors, no tokenizer.json) with
/// its config.json edited by `edit`.
fn official_copy(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("official");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

/// Token ids in, token ids out needs no tokenizer: on a checkpoint without tokenizer.json,
/// `generate --ids` prints the generated ids (transformers' greedy continuation, with or
/// without `--print-ids`) and says once that text needs a tokenizer.json; text in or `--stop`
/// still needs one and says so.
#[test]
fn generate_ids_without_a_tokenizer() {
    let case = fixture("official");
    assert!(!case.join("tokenizer.json").exists());
    let continuation = case.join("continuation.safetensors");
    let prompt = read_i64(&continuation, "prompt_ids").join(",");
    let greedy = read_i64(&continuation, "greedy_ids").join(",");
    let model = case.to_str().unwrap();
    let base = ["generate", "--model", model, "--backend", "cpu", "--ids", &prompt, "--temperature", "0"];
    for extra in [&["--max-new-tokens", "32"][..], &["--max-new-tokens", "32", "--print-ids"]] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (stdout, stderr) = run_ok(&args);
        assert_eq!(stdout.trim(), greedy, "{extra:?}\n{stderr}");
        assert_eq!(stderr.matches("no tokenizer.json").count(), 1, "{stderr}");
        assert!(stderr.contains("text output needs"), "{stderr}");
        assert!(stderr.contains("stopped: max tokens"), "{stderr}");
    }
    let e = failing(&["generate", "--model", model, "--backend", "cpu", "--prompt", "Hello"]);
    assert!(e.contains("no tokenizer.json"), "{e}");
    let e = failing(&["generate", "--model", model, "--backend", "cpu", "--ids", "1,2", "--stop", "x"]);
    assert!(e.contains("--stop") && e.contains("tokenizer.json"), "{e}");
    // A directory that is not there is that, not a missing tokenizer.
    for args in [&["generate", "--ids", "1,2"][..], &["generate", "--prompt", "Hi"], &["serve", "--port", "0"]] {
        let e = failing(&[args, &["--backend", "cpu", "--model", "/no/such/dir"][..]].concat());
        assert!(e.contains("/no/such/dir does not exist") && !e.contains("tokenizer"), "{args:?}: {e}");
    }
}

/// A generation that runs into the model's context stops there and says so (not "max tokens").
#[test]
fn generate_says_when_the_context_ran_out() {
    let continuation = fixture("official").join("continuation.safetensors");
    let prompt = read_i64(&continuation, "prompt_ids");
    let greedy = read_i64(&continuation, "greedy_ids");
    let dir = official_copy("official_ctx250", |c| {
        c.insert("max_position_embeddings".into(), (prompt.len() + 10).into());
    });
    let (stdout, stderr) = run_ok(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--backend",
        "cpu",
        "--ids",
        &prompt.join(","),
        "--temperature",
        "0",
        "--max-new-tokens",
        "32",
    ]);
    // Prompt and generated tokens fill the 250 positions exactly.
    assert_eq!(stdout.trim(), greedy[..10].join(","), "{stderr}");
    assert!(stderr.contains("stopped: context length"), "{stderr}");
}

/// A config.json without `hidden_size` gets transformers' default; the warning and the shape
/// error that follows both say so instead of only blaming `embed.weight`.
#[test]
fn a_missing_shape_field_is_named_in_the_shape_error() {
    let dir = official_copy("official_no_hidden_size", |c| {
        c.remove("hidden_size");
    });
    let out = tmp("never_no_hidden_size.safetensors");
    let args = [
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--backend",
        "cpu",
        "--ids",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ];
    let e = failing(&args);
    let note = "config.json has no `hidden_size`; transformers' default 4096 was assumed";
    assert!(e.contains("warning: config.json has no `hidden_size`"), "{e}");
    let error = e.lines().filter(|l| !l.starts_with("warning:")).collect::<Vec<_>>().join("\n");
    assert!(error.contains("embed.weight") && error.contains("[128, 4096]") && error.contains(note), "{error}");
}
