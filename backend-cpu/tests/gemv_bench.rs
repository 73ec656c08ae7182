//! Throughput of `linear` per weight format (an `#[ignore]`d benchmark, not a check):
//!
//! ```sh
//! cargo test --release -p dsv4-backend-cpu --test gemv_bench -- --ignored --nocapture
//! ```
//!
//! `GEMV_BENCH_SHAPES`, `GEMV_BENCH_FORMATS` and `GEMV_BENCH_ROWS` (comma-separated) pick other cases.
//! `GEMV_BENCH_COPIES=N` times calls over N copies of the weight in turn, so that a matrix smaller
//! than the last-level cache is read from memory on every call, as in a model's decode step
//! (about 400 MB of weights a token in the 0.75 B benchmark model); the default, 1, times a
//! cached matrix when it fits.
//!
//! For each shape and input row count it prints the best time per call over 7 trials and the weight bytes read
//! per second for the packed form (FP8, FP4, BF16 as stored) and for the same weight
//! dequantised to f32 at load.

use std::time::Instant;

use dsv4_backend_cpu::{CpuBackend, CpuWeight};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::Backend;

fn weight(format: &str, n: usize, k: usize) -> StoredWeight {
    let mut s = 0x1234_5678u64;
    let mut byte = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 56) as u8
    };
    let t = |name: &str, dt, shape: Vec<usize>, b: Vec<u8>| HostTensor::from_bytes(name, dt, shape, b).unwrap();
    match format {
        "fp8" => {
            // Codes without NaNs and without subnormals (exponent field 0): a checkpoint has
            // about one subnormal code in 7000 (the 0.75 B benchmark model: 1.4e-4), while 7 in
            // 64 here made the folded kernel's f32 subnormals take a microcode assist on an
            // Intel core in nearly every multiply-add (50 times slower; the Zen 4 takes them at
            // full speed, and the model's decode on the Intel core did not change when they
            // were removed).
            let q: Vec<u8> =
                (0..n * k).map(|_| byte() & 0x77).map(|c| if c & 0x78 == 0 { c | 0x08 } else { c }).collect();
            // Scales that differ from block to block, as a checkpoint's do (the decode kernel
            // folds the input once per distinct row of block scales).
            let sc: Vec<u8> = (0..n.div_ceil(128) * k.div_ceil(128)).map(|i| 116 + (i % 7) as u8).collect();
            let scale = t("w.scale", DType::F8E8M0, vec![n.div_ceil(128), k.div_ceil(128)], sc);
            StoredWeight::detect(&t("w.weight", DType::F8E4M3, vec![n, k], q), Some(&scale), &[n, k]).unwrap()
        }
        "fp4" => {
            let q: Vec<u8> = (0..n * k / 2).map(|_| byte()).collect();
            let scale = t("w.scale", DType::F8E8M0, vec![n, k / 32], vec![120u8; n * k / 32]);
            StoredWeight::detect(&t("w.weight", DType::I8, vec![n, k / 2], q), Some(&scale), &[n, k]).unwrap()
        }
        _ => {
            // Values in [-1, 1] (no subnormals, which would time the FPU's slow path).
            let b: Vec<u8> = (0..n * k)
                .flat_map(|_| (((byte() as f32 / 127.5 - 1.0).to_bits() >> 16) as u16).to_le_bytes())
                .collect();
            StoredWeight::float(t("w.weight", DType::BF16, vec![n, k], b)).unwrap()
        }
    }
}

/// A copy of `w` with buffers of its own (a deep copy of the codes and the scales).
fn own_bytes(w: &StoredWeight) -> StoredWeight {
    let copy = |t: &HostTensor| HostTensor::from_bytes(&t.name, t.dtype, t.shape.clone(), t.bytes().to_vec()).unwrap();
    StoredWeight { data: copy(&w.data), scale: w.scale.as_ref().map(copy), ..w.clone() }
}

#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn linear_throughput() {
    let be = CpuBackend::new();
    println!(
        "{:<6} {:>11} {:>5} {:>9} {:>11} {:>9} {:>11}",
        "format", "shape", "rows", "packed", "GB/s", "f32", "GB/s"
    );
    // GEMV_BENCH_SHAPES="129280x1024,4096x2048" picks other shapes (e.g. a model's head).
    let shapes: Vec<(usize, usize)> = match std::env::var("GEMV_BENCH_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|nk| {
                let (n, k) = nk.split_once('x').expect("shape NxK");
                (n.parse().expect("rows"), k.parse().expect("cols"))
            })
            .collect(),
        Err(_) => vec![(4096, 2048), (1024, 2048)],
    };
    let formats = std::env::var("GEMV_BENCH_FORMATS").unwrap_or_else(|_| "bf16,fp8,fp4".into());
    let ms: Vec<usize> = std::env::var("GEMV_BENCH_ROWS")
        .map(|s| s.split(',').map(|m| m.parse().expect("rows")).collect())
        .unwrap_or_else(|_| vec![1, 4, 64]);
    for (n, k) in shapes {
        for format in formats.split(',') {
            let w = weight(format, n, k);
            let copies: usize = std::env::var("GEMV_BENCH_COPIES").map_or(1, |c| c.parse().expect("copies"));
            // Each copy owns its bytes: `CpuWeight::from_stored` shares the stored tensor's
            // buffer, so copies of one `StoredWeight` would all read the same (cached) memory.
            let packed: Vec<CpuWeight> = (0..copies).map(|_| CpuWeight::from_stored(&own_bytes(&w)).unwrap()).collect();
            let deq: Vec<CpuWeight> = (0..copies).map(|_| CpuWeight::dequantized(&w).unwrap()).collect();
            for &m in &ms {
                let x = be.upload(&vec![0.5f32; m * k], &[m, k]).unwrap();
                let time = |cw: &[CpuWeight]| {
                    let _ = be.linear(&x, &cw[0]).unwrap();
                    // The best of 7 trials: robust to other processes on a shared machine.
                    let iters = (100 / m).max(3).max(cw.len());
                    (0..7)
                        .map(|_| {
                            let t = Instant::now();
                            for i in 0..iters {
                                std::hint::black_box(be.linear(&x, &cw[i % cw.len()]).unwrap());
                            }
                            t.elapsed().as_secs_f64() / iters as f64
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let (tp, tf) = (time(&packed), time(&deq));
                println!(
                    "{format:<6} {:>11} {m:>5} {:>7.3}ms {:>11.2} {:>7.3}ms {:>11.2}",
                    format!("{n}x{k}"),
                    tp * 1e3,
                    packed[0].size_bytes() as f64 / tp / 1e9,
                    tf * 1e3,
                    deq[0].size_bytes() as f64 / tf / 1e9
                );
            }
        }
    }
}
