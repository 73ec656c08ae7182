//! `dsv4 plan` as a user runs it: a layout that fits prints the plan and exits 0, one that
//! does not prints the weights per rank and exits 1 with the shortfall on stderr.

use std::path::PathBuf;
use std::process::Command;

fn plan(args: &[&str]) -> std::process::Output {
    plan_with(args, &[])
}

/// `dsv4 plan --model configs/ARGS[0] ARGS[1..]` with `env` added to the environment.
fn plan_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .arg("plan")
        .arg("--model")
        .arg(configs.join(args[0]))
        .args(&args[1..])
        // The plan follows HCCL_BUFFSIZE: only what a test sets counts.
        .env_remove("HCCL_BUFFSIZE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn plan_that_fits_exits_zero() {
    let o = plan(&["deepseek-v4-flash", "--devices", "8", "--device-memory", "64GiB", "--soc", "910b"]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("layout: 8 ranks, TP 1, EP 8 (all ranks)"), "{out}");
    assert!(
        out.contains("batch  1: 43 all-reduces of 16384 B each = 704512 (688.00 KiB); 704512 (688.00 KiB) per token"),
        "{out}"
    );
}

/// `--soc cuda`: the CUDA backend's forms, fp8 state under the official precision; one GPU does
/// not hold V4-Flash in BF16, and the refusal's advice names no Ascend SoC.
#[test]
fn plan_on_cuda() {
    let flags = ["--device-memory", "141GB", "--soc", "cuda", "--precision", "official"];
    let o = plan(&[&["deepseek-v4-flash", "--devices", "8"][..], &flags].concat());
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("weights in the forms of CUDA (FP8/FP4 dequantised to BF16)\n"), "{out}");
    assert!(out.contains("decoding state, --kv-dtype fp8,"), "{out}");
    let o = plan(&[&["deepseek-v4-flash", "--devices", "1"][..], &flags].concat());
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("short by 423.81 GiB") && !err.contains("--soc 950"), "{err}");
}

#[test]
fn plan_that_does_not_fit_names_the_shortfall() {
    let o = plan(&["deepseek-v4-pro", "--devices", "16", "--device-memory", "64GiB", "--soc", "910c"]);
    assert_eq!(o.status.code(), Some(1));
    let (out, err) = (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap());
    assert!(out.contains("weights per rank") && !out.contains("decoding state"), "{out}");
    assert_eq!(
        err.trim_end(),
        "error: deepseek-v4-pro on 16 × 64.00 GiB: rank 0 needs 143.55 GiB of weights, 56.82 GiB is available \
         (64.00 GiB × 0.9 - 800.00 MiB of communicator buffers); short by 86.73 GiB. With TP 1, 192 devices of this \
         size fit (EP 192). Use more devices, a larger --tensor-parallel, or a smaller weight form (--soc 950 keeps \
         FP8/FP4)."
    );
}

/// HCCL's buffers follow HCCL_BUFFSIZE as HCCL reads it (2 × HCCL_BUFFSIZE MB a communicator),
/// and a value HCCL would not take is refused.
#[test]
fn hccl_buffers_follow_hccl_buffsize() {
    let args =
        ["deepseek-v4-flash", "--devices", "8", "--device-memory", "64GiB", "--soc", "910b", "--precision", "bf16"];
    let run = |v: &str| plan_with(&args, &[("HCCL_BUFFSIZE", v)]);
    let o = run("50");
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("communicator buffers: 200.00 MiB per rank, off the usable memory: 2 HCCL communicators (the world, EP) × 2 × HCCL_BUFFSIZE (50 MiB)"),
        "{out}"
    );
    let o = run("0");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("HCCL_BUFFSIZE=\"0\" is not a size in MB"), "{err}");
    let o = run("99999999999");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("buffers (2 communicators × ") && err.contains("Lower HCCL_BUFFSIZE"), "{err}");
    // One device has no communicator: HCCL_BUFFSIZE is not read.
    let one = ["deepseek-v4-flash", "--devices", "1", "--device-memory", "1TiB", "--soc", "910b"];
    let o = plan_with(&one, &[("HCCL_BUFFSIZE", "abc")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn plan_flags_are_checked() {
    for (args, want) in [
        (&["deepseek-v4-flash", "--devices", "8", "--device-memory", "0.5"][..], "not a device memory size"),
        (&["deepseek-v4-flash", "--devices", "8", "--device-memory", "64GiB", "--soc", "h100"], "unknown target"),
        (&["deepseek-v4-flash", "--devices", "6", "--device-memory", "64GiB", "--expert-parallel", "4"], "EP 4"),
        (&["deepseek-v4-flash", "--devices", "8", "--device-memory", "64GiB", "--memory-utilization", "0"], "(0, 1]"),
    ] {
        let o = plan(args);
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}
