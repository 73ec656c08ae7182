//! `--devices` on the commands that run the model, as a user runs them on the CPU backend: the
//! split run gives the single-device answer, and layouts it cannot run are refused with a
//! message that says why.

use std::process::{Command, Output};

fn dsv4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv4")).args(args).output().unwrap()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

fn logits(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits").unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn split_logits_equal_one_device() {
    let dir = std::env::temp_dir().join(format!("dsv4-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ids = "5,17,42,7,9,3,1,4,1,5,9,2,6,5,3,5,8,9,7,9";
    let one = dir.join("one.safetensors");
    ok(dsv4(&["logits", "--ids", ids, "--out", one.to_str().unwrap()]));
    let want = logits(&one);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for split in [
        &["--devices", "2"][..],
        &["--devices", "0-3", "--tensor-parallel", "2"],
        &["--devices", "2,5", "--tensor-parallel", "2", "--expert-parallel", "1"],
    ] {
        let out = dir.join("split.safetensors");
        let o = ok(dsv4(&[&["logits", "--ids", ids, "--out", out.to_str().unwrap()][..], split].concat()));
        assert!(String::from_utf8_lossy(&o.stderr).contains("ranks: "), "{split:?}");
        let got = logits(&out);
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err <= 1e-5, "{split:?}: {err:e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn split_generation_prints_the_one_device_tokens_once() {
    let args =
        ["generate", "--ids", "1,2,3", "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "7", "--print-ids"];
    let one = ok(dsv4(&args));
    // Replicated attention, and data-parallel attention (the sequence on rank 0, the others
    // serving their experts; EP 4, and two EP groups of 2).
    for split in [
        &["--devices", "4", "--tensor-parallel", "2"][..],
        &["--devices", "4", "--data-parallel-attention"],
        &["--devices", "4", "--data-parallel-attention", "--expert-parallel", "2"],
    ] {
        let split_run = ok(dsv4(&[&args[..], split].concat()));
        assert_eq!(String::from_utf8_lossy(&split_run.stdout), String::from_utf8_lossy(&one.stdout), "{split:?}");
        let err = String::from_utf8_lossy(&split_run.stderr);
        assert_eq!(err.matches("prefill:").count(), 1, "{split:?}: one speed line, from rank 0: {err}");
    }
}

#[test]
fn layouts_that_cannot_run_are_refused_with_the_reason() {
    let cases: [(&[&str], &str); 10] = [
        // One device by id would be ignored (a one-device run opens device 0): refused.
        (&["--devices", "3-3"], "pick it with CUDA_VISIBLE_DEVICES=3"),
        // CUDA ranks need the driver and NCCL (CI has neither): the missing library is named,
        // over one process or several (before any node waits for the others).
        (&["--devices", "2", "--backend", "cuda"], "could not be loaded (tried lib"),
        (&["--devices", "2", "--backend", "cuda", "--nnodes", "2"], "could not be loaded (tried lib"),
        (&["--devices", "16"], "--expert-parallel defaults to the number of ranks (16)"),
        (&["--tensor-parallel", "2"], "give --devices N"),
        (
            &["--devices", "4", "--tensor-parallel", "3"],
            "error: --tensor-parallel 3: TP 3 does not divide the 4 devices",
        ),
        (&["--devices", "3", "--expert-parallel", "2"], "error: --expert-parallel 2: EP 2 does not divide"),
        (
            &["--devices", "2", "--tensor-parallel", "0"],
            "invalid value '0' for '--tensor-parallel <TP>': must be at least 1",
        ),
        (
            &["--devices", "2", "--expert-parallel", "0"],
            "invalid value '0' for '--expert-parallel <EP>': must be at least 1",
        ),
        (&["--devices", "0-1,1"], "an id appears twice"),
    ];
    for (extra, want) in cases {
        let o = dsv4(&[&["logits", "--ids", "1,2", "--out", "/dev/null"][..], extra].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{extra:?}: {err}");
    }
}

#[test]
fn check_compares_a_split_run_with_one_device() {
    let o = ok(dsv4(&["check", "--backends", "cpu,cpu", "--devices", "4", "--tensor-parallel", "2"]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("on 4 ranks (TP 2, EP 4)") && out.contains("ok: worst relative difference"), "{out}");
    let o = ok(dsv4(&["check", "--backends", "cpu,cpu", "--devices", "2", "--data-parallel-attention"]));
    let out = String::from_utf8_lossy(&o.stdout);
    let header = "on 2 ranks (TP 1, EP 2, data-parallel attention)";
    assert!(out.contains(header) && out.contains("ok: worst relative difference"), "{out}");
}

#[test]
fn split_chat_answers_every_turn_as_one_device() {
    use std::io::Write;
    let run = |extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
            .args([&["chat", "--max-new-tokens", "6", "--temperature", "0"][..], extra].concat())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"Hello\nAgain\n\n").unwrap();
        ok(child.wait_with_output().unwrap())
    };
    let one = run(&[]);
    assert!(!one.stdout.is_empty());
    // Replicated, and data-parallel attention (each turn rank 0's, the others serving their
    // experts until it ends).
    for split in [&["--devices", "2"][..], &["--devices", "2", "--data-parallel-attention"]] {
        assert_eq!(String::from_utf8_lossy(&run(split).stdout), String::from_utf8_lossy(&one.stdout), "{split:?}");
    }
}

#[test]
fn split_chat_ends_when_rank_0_fails() {
    // Rank 0 fails writing the answer (stdout closed, as under `| head -c 1`): the other ranks,
    // waiting for the next line (or, with data-parallel attention, serving their experts in
    // rank 0's steps), must end too, and the command exit with rank 0's error.
    for dp in [false, true] {
        split_chat_ends_when_rank_0_fails_with(dp);
    }
}

fn split_chat_ends_when_rank_0_fails_with(data_parallel: bool) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["chat", "--max-new-tokens", "6", "--devices", "2"])
        .args(data_parallel.then_some("--data-parallel-attention"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Hello\n").unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().ok();
            panic!("dsv4 chat --devices 2 (data-parallel: {data_parallel}) hangs after rank 0 failed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(stdin);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("Broken pipe"), "data-parallel: {data_parallel}: {status}: {err}");
}

fn emulator() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    dsv4_ascend_sys::emulator::build(std::path::Path::new(env!("CARGO")), &manifest).unwrap_or_else(|e| panic!("{e}"))
}

/// Ascend ranks (here 4 emulated devices over the emulator's HCCL) against the CPU on one
/// device, block by block; and what Ascend ranks do not run yet is refused with the reason.
#[test]
fn ascend_ranks_run_over_hccl() {
    let ascend = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dsv4"))
            .args(args)
            .env(dsv4_ascend_sys::EMULATOR_VAR, emulator())
            .env("DSV4_ASCEND_EMU_DEVICES", "4")
            .output()
            .unwrap()
    };
    let o = ok(ascend(&["check", "--backends", "cpu,ascend", "--devices", "0-3", "--tensor-parallel", "2"]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("on 4 ranks (TP 2, EP 4)") && out.contains("ok: worst relative difference"), "{out}");
    for (args, want) in [
        (&["serve", "--backend", "ascend", "--devices", "2"][..], "needs --kv-cache-memory as a size per device"),
        (&["chat", "--backend", "ascend", "--devices", "2"], "give --kv-cache-memory as a size per device"),
        (
            &["logits", "--backend", "ascend", "--devices", "0-7", "--ids", "1", "--out", "/dev/null"],
            "device 4 does not exist (nor do 5, 6, 7): the runtime reports 4 device(s)",
        ),
    ] {
        let o = ascend(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}
