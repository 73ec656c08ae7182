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
    assert!(failing(&["logits", "--backend", "cuda", "--ids", "1", "--out", out]).contains("cuda"));
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
