//! Throughput of the routed experts of one decode token (`moe_experts`, an `#[ignore]`d
//! benchmark, not a check):
//!
//! ```sh
//! cargo test --release -p dsv4-backend-cpu --test moe_bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! (`--test-threads=1`: the two benchmarks would otherwise share the cores.)
//!
//! The shapes are the 0.75 B benchmark model's (`gen_synthetic.py mini`: d = 1024, 32 FP4
//! experts of 512 hidden values, 6 per token, 8 layers). Each call takes a different layer's
//! experts, so that, as in a real decode step, the weights come from memory rather than cache
//! (8 × 32 experts are 200 MB). It prints the best time per call over 7 trials and the expert
//! bytes read per second. `MOE_BENCH_PRECISION=f32` (or `bf16`) runs the prefill benchmark in
//! that precision only and `MOE_BENCH_TRIALS=N` times N calls instead of 5 (to profile one path).

use std::time::Instant;

/// The `dsv4` binary's allocator (and its `keep_freed_pages`, set in each benchmark): with
/// glibc's, large outputs come as fresh zeroed pages on every call, which the binary never sees.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use dsv4_backend_cpu::{CpuBackend, CpuWeight};
use dsv4_core::backend::ExpertWeights;
use dsv4_core::precision::Precision;
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::Backend;

fn fp4(seed: &mut u64, n: usize, k: usize) -> CpuWeight {
    let mut byte = || {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 56) as u8
    };
    let q: Vec<u8> = (0..n * k / 2).map(|_| byte()).collect();
    let t = |name: &str, dt, shape: Vec<usize>, b: Vec<u8>| HostTensor::from_bytes(name, dt, shape, b).unwrap();
    let scale = t("w.scale", DType::F8E8M0, vec![n, k / 32], vec![120u8; n * k / 32]);
    let w = StoredWeight::detect(&t("w.weight", DType::I8, vec![n, k / 2], q), Some(&scale), &[n, k]).unwrap();
    CpuWeight::from_stored(&w).unwrap()
}

/// Prefill: 512 tokens, each to 6 of the 32 experts (about 96 tokens an expert), in f32;
/// GFLOP/s of the expert matrices' multiply-adds (2 FLOP each).
#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn routed_experts_prefill() {
    let (d, inter, n_experts, top_k, t) = (1024, 512, 32, 6, 512);
    dsv4_backend_cpu::heap::keep_freed_pages();
    let be = CpuBackend::new();
    let mut seed = 11u64;
    let experts: Vec<ExpertWeights<CpuWeight>> = (0..n_experts)
        .map(|_| ExpertWeights {
            w1: fp4(&mut seed, inter, d),
            w2: fp4(&mut seed, d, inter),
            w3: fp4(&mut seed, inter, d),
            low_bit: true,
        })
        .collect();
    let xs: Vec<f32> = (0..t * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let x = be.upload(&xs, &[t, d]).unwrap();
    // Six distinct pseudo-random experts per token, as a router gives them: 96 tokens an
    // expert on average, unevenly (a fixed rotation gave every expert exactly 96, three whole
    // 32-column tiles, which no real batch does). MOE_BENCH_SKEWED=1: expert e drawn with a
    // weight of 1.12^(13e mod 32), so that the experts take from about 10 to 280 tokens, as the
    // score-routed layers of the benchmark model's 512-token prefill route them (10 to 380; its
    // hash-routed layers spread them as the default does).
    let skewed = std::env::var_os("MOE_BENCH_SKEWED").is_some_and(|v| v != "0");
    let popularity: Vec<f64> = (0..n_experts).map(|e| 1.12f64.powi((e * 13 % n_experts) as i32)).collect();
    let total_popularity: f64 = popularity.iter().sum();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let ids: Vec<i32> = (0..t)
        .flat_map(|_| {
            let mut chosen = Vec::with_capacity(top_k);
            while chosen.len() < top_k {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let e = if skewed {
                    let mut u = (state >> 11) as f64 / (1u64 << 53) as f64 * total_popularity;
                    let mut e = 0;
                    while e + 1 < n_experts && u >= popularity[e] {
                        u -= popularity[e];
                        e += 1;
                    }
                    e as i32
                } else {
                    (state % n_experts as u64) as i32
                };
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            chosen
        })
        .collect();
    let w = be.upload(&vec![1.0 / top_k as f32; t * top_k], &[t, top_k]).unwrap();
    // MOE_BENCH_PRECISION=f32 or bf16: that precision only (to profile one path).
    let only = std::env::var("MOE_BENCH_PRECISION").ok();
    for act in [Precision::F32, Precision::Bf16] {
        if only.as_deref().is_some_and(|p| p != act.to_string()) {
            continue;
        }
        let x = act.act(&be, &x).unwrap();
        let run = || std::hint::black_box(be.moe_experts(&x, &ids, &w, &experts, 10.0, act).unwrap());
        run();
        let best = (0..std::env::var("MOE_BENCH_TRIALS").map_or(5, |s| s.parse().expect("trials")))
            .map(|_| {
                let s = Instant::now();
                run();
                s.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let flop = 2.0 * (t * top_k) as f64 * 3.0 * (d * inter) as f64;
        println!("prefill {act:<5} {:>8.2} ms/call {:>7.1} GFLOP/s", best * 1e3, flop / best / 1e9);
    }
}

#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn routed_experts_throughput() {
    let (d, inter, n_experts, top_k) = (1024, 512, 32, 6);
    // MOE_BENCH_LAYERS=1: the same six experts every call (from cache).
    let layers: usize = std::env::var("MOE_BENCH_LAYERS").map_or(8, |s| s.parse().expect("layers"));
    dsv4_backend_cpu::heap::keep_freed_pages();
    let be = CpuBackend::new();
    let mut seed = 7u64;
    let layers: Vec<Vec<ExpertWeights<CpuWeight>>> = (0..layers)
        .map(|_| {
            (0..n_experts)
                .map(|_| ExpertWeights {
                    w1: fp4(&mut seed, inter, d),
                    w2: fp4(&mut seed, d, inter),
                    w3: fp4(&mut seed, inter, d),
                    low_bit: true,
                })
                .collect()
        })
        .collect();
    let bytes: usize =
        layers[0][..top_k].iter().map(|e| e.w1.size_bytes() + e.w2.size_bytes() + e.w3.size_bytes()).sum();
    let xs: Vec<f32> = (0..d).map(|i| half::bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0).to_f32()).collect();
    let x = be.upload(&xs, &[1, d]).unwrap();
    let w = be.upload(&vec![1.0 / top_k as f32; top_k], &[1, top_k]).unwrap();
    for act in [Precision::Bf16, Precision::F32] {
        // As the graph feeds it: in bf16, a tensor marked as holding BF16 values.
        let x = act.act(&be, &x).unwrap();
        let mut call = 0usize;
        let mut run = || {
            let layer = &layers[call % layers.len()];
            let shift = if layers.len() == 1 { 0 } else { call * 5 };
            let ids: Vec<i32> = (0..top_k).map(|i| ((shift + i * 5) % n_experts) as i32).collect();
            call += 1;
            std::hint::black_box(be.moe_experts(&x, &ids, &w, layer, 10.0, act).unwrap());
        };
        run();
        let iters = 64;
        let best = (0..7)
            .map(|_| {
                let t = Instant::now();
                (0..iters).for_each(|_| run());
                t.elapsed().as_secs_f64() / iters as f64
            })
            .fold(f64::INFINITY, f64::min);
        println!(
            "{act:<5} {:>8.1} us/call {:>7.2} GB/s ({} experts, {:.2} MB)",
            best * 1e6,
            bytes as f64 / best / 1e9,
            top_k,
            bytes as f64 / 1e6
        );
    }
}
