//! A 1M-token sequence on `builtin:flash-shape` (V4-Flash's window, compression ratios and
//! top-512 indexer at tiny widths): prefill in chunks, then decode, with the decoding state in
//! the official fp8 format. Checks that the state the pool holds equals the format's layout
//! byte for byte and reports the process's peak RSS. Ignored by default (about a quarter of an
//! hour on 2 cores in a release build):
//!
//! `cargo test --release -p dsv4-tests --test long_context -- --ignored --nocapture`
//!
//! `DSV4_LONG_CONTEXT_TOKENS` overrides the length (default 1,048,000: the model's 1,048,576
//! positions less room to decode).

use std::time::Instant;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::generate::Session;
use dsv4_core::kv::layout::sequence_footprint;
use dsv4_core::kv::{human_bytes, KvConfig, KvDtype};
use dsv4_core::sampling::argmax;
use dsv4_core::Model;

/// `VmHWM` (peak resident set) of this process, in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
#[ignore = "a 1M-token run: minutes in a release build"]
fn million_token_context() {
    let tokens: usize =
        std::env::var("DSV4_LONG_CONTEXT_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_048_000);
    let (decode, chunk, dtype) = (16, 2048, KvDtype::Fp8);
    let be = CpuBackend::new();
    let (cfg, ckpt) = dsv4_core::builtin::flash_shape().unwrap();
    let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {}).unwrap();
    let config = KvConfig::for_sequences(&model.cfg, dtype, 1, tokens + decode, chunk);
    let mut session = Session::new(&be, &model, config).unwrap();
    println!(
        "pool: {} ({} compressed blocks, {} window blocks of {} tokens)",
        human_bytes(session.cache().device_bytes()),
        config.compressed_blocks,
        config.window_blocks,
        config.block_tokens
    );
    let prompt: Vec<u32> = (0..tokens as u64).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 271) as u32).collect();
    let t = Instant::now();
    let mut logits = vec![];
    for (i, part) in prompt.chunks(chunk).enumerate() {
        logits = session.feed(&be, part, chunk).unwrap();
        if i % 64 == 63 {
            println!("  {} tokens, {:.0} s", session.sequence().pos(), t.elapsed().as_secs_f64());
        }
    }
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let tok = argmax(&logits);
        logits = session.feed(&be, &[tok], 1).unwrap();
    }
    let per_token = t.elapsed().as_secs_f64() / decode as f64;
    let n = session.sequence().pos();
    let want = sequence_footprint(&model.cfg, dtype, config.block_tokens, n);
    println!(
        "{n} tokens: prefill {prefill:.0} s ({:.0} tok/s), decode {:.2} ms/token; state held {} ({} bytes), \
         {:.1} bytes/token of compressed rows; peak RSS {}",
        tokens as f64 / prefill,
        per_token * 1e3,
        human_bytes(session.state_bytes()),
        session.state_bytes(),
        want.compressed_row_bytes as f64 / n as f64,
        human_bytes(peak_rss())
    );
    assert_eq!(session.state_bytes(), want.held_bytes);
    assert!(logits.iter().all(|v| v.is_finite()));
}
