//! Timing of the context-dependent part of a decode step on the CPU backend: the lightning
//! indexer and sparse attention of one decode query at V4-mini shapes (16 indexer heads × 128,
//! top-512; 8 attention heads × 512, window 128), at the shapes of a 1K and a 32K context.
//! Ignored by default; run it in a release build:
//!
//! `cargo test --release -p dsv4-backend-cpu --test attn_bench -- --ignored --nocapture`
//!
//! `DSV4_THREADS` sets the number of threads, `ATTN_BENCH_REPS` the timings per figure (their median is shown),
//! `ATTN_BENCH_COLD=1` (any value but `0`) evicts the caches before each timing.

use std::time::Instant;

use dsv4_backend_cpu::{CpuBackend, CpuIndex, CpuPool, CpuTensor};
use dsv4_core::backend::{Backend, Precision, RowFormat};
use dsv4_core::test_data::Rng;

fn pool(be: &CpuBackend, rows: usize, width: usize, format: RowFormat, rng: &mut Rng) -> CpuPool {
    let mut p = be.alloc_pool(rows, width, format).unwrap();
    let values: Vec<f32> = (0..rows * width).map(|_| rng.f32()).collect();
    let slots: Vec<i32> = (0..rows as i32).collect();
    be.pool_write(&mut p, &be.upload_index(&slots, &[rows]).unwrap(), &be.upload(&values, &[rows, width]).unwrap())
        .unwrap();
    p
}

/// Median of `ATTN_BENCH_REPS` (default 101) timings of `f`, in microseconds. With
/// `ATTN_BENCH_COLD=1`, 256 MiB (more than most servers' last-level cache) are read before each
/// timing, so that the keys come from memory as in a real decode step (eight layers' states
/// exceed the last-level cache), not from cache.
fn time(mut f: impl FnMut()) -> f64 {
    let reps = std::env::var("ATTN_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(101).max(1);
    let flush: Vec<u8> = if std::env::var_os("ATTN_BENCH_COLD").is_some_and(|v| !v.is_empty() && v != "0") {
        (0..256usize << 20).map(|i| i as u8).collect()
    } else {
        Vec::new()
    };
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            // Read, not written: dirty lines would be written back during the timing.
            std::hint::black_box(flush.iter().step_by(64).fold(0u8, |a, &b| a ^ b));
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn tensor(be: &CpuBackend, rng: &mut Rng, shape: &[usize]) -> CpuTensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    be.upload(&v, shape).unwrap()
}

fn index(be: &CpuBackend, v: &[i32], shape: &[usize]) -> CpuIndex {
    be.upload_index(v, shape).unwrap()
}

/// Microseconds of one decode query's `indexer_select` over `n` keys.
fn indexer(be: &CpuBackend, format: RowFormat, n: usize, rng: &mut Rng) -> f64 {
    let (nh, dh, k) = (16, 128, 512);
    let keys = pool(be, n + 64, dh, format, rng);
    // Key rows as the paged state hands them out: blocks of 32 rows, not in order.
    let rows: Vec<i32> = (0..n).map(|i| (((i / 32) * 7 % n.div_ceil(32)) * 32 + i % 32) as i32).collect();
    let rows = index(be, &rows, &[n]);
    let q = tensor(be, rng, &[1, nh, dh]);
    let w = tensor(be, rng, &[1, nh]);
    time(|| {
        be.indexer_select(&q, &keys, &rows, &w, std::slice::from_ref(&(0..n)), k.min(n), 0, Precision::F32).unwrap();
    })
}

/// Microseconds of one decode query's `sparse_attention` over `n` keys.
fn attention(be: &CpuBackend, format: RowFormat, n: usize, rng: &mut Rng) -> f64 {
    let (h, d, rows) = (8, 512, 40000);
    let kv = pool(be, rows, d, format, rng);
    let picks: Vec<i32> = (0..n).map(|i| ((i * 7919 + 13) % rows) as i32).collect();
    let idx = index(be, &picks, &[1, n]);
    let q = tensor(be, rng, &[1, h, d]);
    let sinks = tensor(be, rng, &[h]);
    time(|| {
        be.sparse_attention(&q, &kv, &idx, &sinks, (d as f32).powf(-0.5), Precision::F32).unwrap();
    })
}

#[test]
#[ignore = "a timing run: use a release build"]
fn decode_attention_cost_at_1k_and_32k() {
    let be = CpuBackend::new();
    let mut rng = Rng(7);
    println!("threads: {} (DSV4_THREADS sets it)", be.threads());
    for (name, idx_format, kv_format) in [
        ("f32", RowFormat::F32, RowFormat::F32),
        ("bf16", RowFormat::Bf16, RowFormat::Bf16),
        ("fp8", RowFormat::Bf16, RowFormat::Fp8 { rope: 64 }),
    ] {
        // V4-mini: 3 CSA layers (indexer over ctx/4 entries, attention over top-512 + window),
        // 3 HCA layers (attention over ctx/128 entries + window), 2 sliding layers (window).
        let i1 = indexer(&be, idx_format, 256, &mut rng);
        let i32k = indexer(&be, idx_format, 8192, &mut rng);
        let csa1 = attention(&be, kv_format, 256 + 128, &mut rng);
        let csa32 = attention(&be, kv_format, 512 + 128, &mut rng);
        let hca1 = attention(&be, kv_format, 8 + 128, &mut rng);
        let hca32 = attention(&be, kv_format, 256 + 128, &mut rng);
        let win = attention(&be, kv_format, 128, &mut rng);
        let at1 = 3.0 * (i1 + csa1 + hca1) + 2.0 * win;
        let at32 = 3.0 * (i32k + csa32 + hca32) + 2.0 * win;
        println!(
            "{name:>5}: indexer {i1:8.1} / {i32k:8.1} us, CSA attention {csa1:7.1} / {csa32:7.1} us, \
             HCA attention {hca1:7.1} / {hca32:7.1} us, window {win:6.1} us; \
             per token at 1K {:.3} ms, at 32K {:.3} ms, extra {:.3} ms",
            at1 / 1e3,
            at32 / 1e3,
            (at32 - at1) / 1e3
        );
    }
}

/// Milliseconds of a prefill chunk's `sparse_attention` at V4-mini shapes (8 heads of 512):
/// `t` queries, each over the 128-row window ending at it and the same `compressed` entries
/// (a CSA layer whose top-512 takes every compressed entry), as a 512-token chunk at context
/// `ctx` reads them.
fn prefill_attention(be: &CpuBackend, t: usize, ctx: usize, rng: &mut Rng) -> f64 {
    let (h, d, window) = (8, 512, 128);
    let compressed = (ctx / 4).min(512);
    let kv = pool(be, ctx + compressed, d, RowFormat::F32, rng);
    let picks: Vec<i32> = (0..t)
        .flat_map(|i| {
            let p = ctx - t + i;
            let win = (p + 1).saturating_sub(window)..p + 1;
            (ctx..ctx + compressed).chain(win).map(|r| r as i32).chain(std::iter::repeat(-1)).take(compressed + window)
        })
        .collect();
    let idx = index(be, &picks, &[t, compressed + window]);
    let q = tensor(be, rng, &[t, h, d]);
    let sinks = tensor(be, rng, &[h]);
    time(|| {
        be.sparse_attention(&q, &kv, &idx, &sinks, (d as f32).powf(-0.5), Precision::F32).unwrap();
    }) / 1e3
}

#[test]
#[ignore = "a timing run: use a release build"]
fn prefill_attention_cost() {
    let be = CpuBackend::new();
    let mut rng = Rng(11);
    for ctx in [512, 2048, 4096] {
        let t = 512;
        let ms = prefill_attention(&be, t, ctx, &mut rng);
        let keys = ((ctx / 4).min(512) + 128) as f64;
        let gflop = 2.0 * 2.0 * (t * 8 * 512) as f64 * keys / 1e9;
        println!("prefill attention, 512 queries at context {ctx}: {ms:.2} ms, {:.1} GFLOP/s", gflop / ms * 1e3);
    }
}
