//! Tests of `weights.rs` on every instruction set this CPU supports: bit equality with an
//! independent scalar reference, closeness to an f64 sum, every FP8 and FP4 code, partial
//! blocks, odd lengths, any number of input rows, signed zeros; and an `#[ignore]`d
//! throughput benchmark (`bench_dot_rows`).

use super::*;
use dsv4_core::quant::{E2M1_TO_F32, E4M3_TO_F32};

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// A finite e4m3fn code (not 0x7F / 0xFF).
    fn e4m3(&mut self) -> u8 {
        loop {
            let b = self.byte();
            if b & 0x7F != 0x7F {
                return b;
            }
        }
    }
    /// Inputs with some negative and positive zeros mixed in.
    fn xs(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| match self.next() % 16 {
                0 => -0.0,
                1 => 0.0,
                _ => self.f32() * 4.0,
            })
            .collect()
    }
}

/// A row and the buffers it borrows.
struct Owned {
    f32s: Vec<f32>,
    bytes: Vec<u8>,
    scales: Vec<f32>,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    F32,
    Bf16,
    F16,
    Fp8(usize),
    Fp4(usize),
}

impl Owned {
    fn row(&self) -> Row<'_> {
        match self.kind {
            Kind::F32 => Row::F32(&self.f32s),
            Kind::Bf16 => Row::Bf16(&self.bytes),
            Kind::F16 => Row::F16(&self.bytes),
            Kind::Fp8(block) => Row::Fp8 { codes: &self.bytes, scales: &self.scales, block },
            Kind::Fp4(group) => Row::Fp4 { codes: &self.bytes, scales: &self.scales, group },
        }
    }

    /// A random row of `k` values (`k` even for FP4) with the given per-block scales.
    fn random(kind: Kind, k: usize, rng: &mut Rng, scale: &mut dyn FnMut(&mut Rng) -> f32) -> Owned {
        let mut o = Owned { f32s: vec![], bytes: vec![], scales: vec![], kind };
        match kind {
            Kind::F32 => o.f32s = (0..k).map(|_| rng.f32()).collect(),
            Kind::Bf16 => o.bytes = (0..k).flat_map(|_| ((rng.f32().to_bits() >> 16) as u16).to_le_bytes()).collect(),
            Kind::F16 => o.bytes = (0..k).flat_map(|_| half::f16::from_f32(rng.f32() * 8.0).to_le_bytes()).collect(),
            Kind::Fp8(block) => {
                o.bytes = (0..k).map(|_| rng.e4m3()).collect();
                o.scales = (0..k.div_ceil(block)).map(|_| scale(rng)).collect();
            }
            Kind::Fp4(group) => {
                o.bytes = (0..k / 2).map(|_| rng.byte()).collect();
                o.scales = (0..k.div_ceil(group)).map(|_| scale(rng)).collect();
            }
        }
        o
    }
}

/// Value `j` of the row, straight from the format definitions (independent of `Row::value`).
fn ref_value(w: &Row, j: usize) -> f32 {
    match *w {
        Row::F32(v) => v[j],
        Row::Bf16(b) => f32::from_bits(((b[2 * j + 1] as u32) << 24) | ((b[2 * j] as u32) << 16)),
        Row::F16(b) => half::f16::from_bits(b[2 * j] as u16 | ((b[2 * j + 1] as u16) << 8)).to_f32(),
        Row::Fp8 { codes, scales, block } => E4M3_TO_F32[codes[j] as usize] * scales[j / block],
        Row::Fp4 { codes, scales, group } => {
            let code = if j.is_multiple_of(2) { codes[j / 2] & 0xF } else { codes[j / 2] >> 4 };
            E2M1_TO_F32[code as usize] * scales[j / group]
        }
    }
}

/// The canonical order, literally: zero-padded to a multiple of 32, lane `j % 32`, `mul_add`,
/// then the pairwise reduction.
fn reference(w: &Row, x: &[f32]) -> f32 {
    let k = w.len();
    let mut acc = [0f32; 32];
    for j in 0..k.div_ceil(32) * 32 {
        let (wj, xj) = if j < k { (ref_value(w, j), x[j]) } else { (0.0, 0.0) };
        acc[j % 32] = wj.mul_add(xj, acc[j % 32]);
    }
    let mut n = 32;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] += acc[i + n];
        }
    }
    acc[0]
}

/// Bit equality, any NaN equal to any NaN.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Runs `dot_rows` on every supported set and checks each output against the reference
/// (bits) and against an f64 sum (closeness, when finite).
fn check_dot(w: &Row, m: usize, rng: &mut Rng, what: &str) {
    let k = w.len();
    let xs = rng.xs(m * k);
    let want: Vec<f32> = xs.chunks(k.max(1)).take(m).map(|x| reference(w, x)).collect();
    let want = if k == 0 { vec![0.0; m] } else { want };
    for (i, x) in xs.chunks(k.max(1)).take(m).enumerate().filter(|_| k > 0) {
        let (mut exact, mut mag) = (0f64, 0f64);
        for (j, &xj) in x.iter().enumerate() {
            let p = ref_value(w, j) as f64 * xj as f64;
            exact += p;
            mag += p.abs();
        }
        // Only where no partial sum can overflow f32 (a sum of magnitudes past f32::MAX may
        // overflow to ±inf in f32 and give NaN, which is the reference's answer too).
        if mag < f32::MAX as f64 {
            let err = (want[i] as f64 - exact).abs();
            assert!(err <= 1e-5 * mag + k as f64 * 1.5e-45, "{what} row {i}: {} vs f64 {exact} (Σ|wx| {mag})", want[i]);
        }
    }
    for isa in Isa::supported() {
        let mut out = vec![f32::NAN; m];
        dot_rows(isa, w, &xs, &mut out);
        for i in 0..m {
            assert!(
                same(out[i], want[i]),
                "{what} {isa:?} m={m} row {i}: {:e} ({:#x}) vs reference {:e} ({:#x})",
                out[i],
                out[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
        // The dequantise-at-load path: the decoded row as F32 gives the same bits.
        let mut dec = vec![0f32; k];
        decode_row(isa, w, &mut dec);
        let mut again = vec![f32::NAN; m];
        dot_rows(isa, &Row::F32(&dec), &xs, &mut again);
        for i in 0..m {
            assert!(same(again[i], want[i]), "{what} {isa:?} m={m} row {i}: decoded F32 row differs");
        }
    }
}

/// Checks `decode_row` on every supported set against `ref_value`, bit for bit.
fn check_decode(w: &Row, what: &str) {
    let want: Vec<f32> = (0..w.len()).map(|j| ref_value(w, j)).collect();
    for isa in Isa::supported() {
        let mut out = vec![0f32; w.len()];
        decode_row(isa, w, &mut out);
        for (j, (o, e)) in out.iter().zip(&want).enumerate() {
            assert!(same(*o, *e), "{what} {isa:?} value {j}: {o:e} ({:#x}) vs {e:e} ({:#x})", o.to_bits(), e.to_bits());
        }
    }
}

/// Scales to try: 1, non-powers of two, E8M0-like powers of two from 2⁻¹²⁷ (subnormal) to
/// 2¹²⁷ (where `scale · 256` overflows, the FP8 fold is not exact and the table path is used),
/// the largest f32 and negative ones.
fn scale_set() -> Vec<f32> {
    let mut s = vec![1.0, 0.37, 3.0, -0.7, 1.0e-3, 123.456, f32::MAX, f32::MIN_POSITIVE];
    for e in [-127, -126, -120, -100, -9, 0, 7, 100, 119, 120, 121, 127] {
        s.push(2f32.powi(e));
    }
    s.push(f32::from_bits(1 << 22)); // 2^-127, the E8M0 byte 0
    s.push(1.5 * 2f32.powi(119)); // s·256 is finite, E·s may overflow
    s
}

#[test]
fn every_fp8_code_decodes_like_the_table() {
    // Codes at every lane position (rotations), one scale per block of 128 and other blocks.
    for s in scale_set() {
        for rot in [0usize, 1, 17, 31] {
            let codes: Vec<u8> = (0..256 + rot).map(|i| ((i + 256 - rot) % 256) as u8).collect();
            for block in [128, 32, 64, 7, 1, 1000] {
                let scales = vec![s; codes.len().div_ceil(block)];
                check_decode(
                    &Row::Fp8 { codes: &codes, scales: &scales, block },
                    &format!("fp8 s={s:e} rot={rot} b={block}"),
                );
            }
        }
    }
    // NaN codes really are NaN on every path.
    let codes = [0x7Fu8, 0xFF].repeat(32);
    for isa in Isa::supported() {
        let mut out = vec![0f32; 64];
        decode_row(isa, &Row::Fp8 { codes: &codes, scales: &[1.0], block: 128 }, &mut out);
        assert!(out.iter().all(|v| v.is_nan()), "{isa:?}");
    }
}

#[test]
fn every_fp4_code_decodes_like_the_table() {
    for s in scale_set() {
        for rot in [0usize, 1, 9, 15] {
            // Every byte, hence every code in both nibbles, at shifted positions.
            let bytes: Vec<u8> = (0..256 + rot).map(|i| ((i + 256 - rot) % 256) as u8).collect();
            for group in [32, 64, 16, 6, 1, 4096] {
                let scales = vec![s; (2 * bytes.len()).div_ceil(group)];
                check_decode(
                    &Row::Fp4 { codes: &bytes, scales: &scales, group },
                    &format!("fp4 s={s:e} rot={rot} g={group}"),
                );
            }
        }
    }
}

#[test]
fn every_16_bit_pattern_decodes_exactly() {
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    check_decode(&Row::Bf16(&bytes), "bf16");
    check_decode(&Row::F16(&bytes), "f16");
    // And odd lengths (tails).
    check_decode(&Row::F16(&bytes[..2 * 33]), "f16 k=33");
    check_decode(&Row::Bf16(&bytes[2 * 1000..2 * 1257]), "bf16 k=257");
}

#[test]
fn fp8_blocks_with_differing_scales_decode_per_block() {
    let mut rng = Rng(7);
    for (k, block) in [(257, 128), (1000, 128), (300, 96), (129, 48), (100, 3), (64, 32)] {
        let o = Owned::random(Kind::Fp8(block), k, &mut rng, &mut |r| r.f32() * 3.0);
        check_decode(&o.row(), &format!("fp8 k={k} block={block}"));
    }
}

const KS: [usize; 13] = [0, 1, 2, 7, 31, 32, 33, 40, 127, 129, 257, 1000, 1024];
const MS: [usize; 8] = [1, 2, 3, 4, 5, 8, 9, 17];

#[test]
fn dot_rows_is_the_reference_for_float_rows() {
    let mut rng = Rng(1);
    for kind in [Kind::F32, Kind::Bf16, Kind::F16] {
        for k in KS {
            for m in MS {
                let o = Owned::random(kind, k, &mut rng, &mut |_| 1.0);
                check_dot(&o.row(), m, &mut rng, &format!("{kind:?} k={k}"));
            }
        }
    }
}

#[test]
fn dot_rows_is_the_reference_for_fp8_rows() {
    let mut rng = Rng(2);
    let e8m0 = |r: &mut Rng| 2f32.powi((r.next() % 40) as i32 - 30);
    for block in [128, 32, 64, 48, 7, 1] {
        for k in KS {
            for m in MS {
                // Non-power-of-two F32 scales, then E8M0-like powers of two.
                let o = Owned::random(Kind::Fp8(block), k, &mut rng, &mut |r| r.f32() * 2.0);
                check_dot(&o.row(), m, &mut rng, &format!("fp8 f32-scales k={k} block={block}"));
                let o = Owned::random(Kind::Fp8(block), k, &mut rng, &mut { e8m0 });
                check_dot(&o.row(), m, &mut rng, &format!("fp8 e8m0 k={k} block={block}"));
            }
        }
    }
}

#[test]
fn dot_rows_is_the_reference_for_fp4_rows() {
    let mut rng = Rng(3);
    let e8m0 = |r: &mut Rng| 2f32.powi((r.next() % 40) as i32 - 20);
    for group in [32, 64, 16, 10, 1] {
        for k in KS.iter().map(|k| k + k % 2) {
            for m in MS {
                let o = Owned::random(Kind::Fp4(group), k, &mut rng, &mut { e8m0 });
                check_dot(&o.row(), m, &mut rng, &format!("fp4 k={k} group={group}"));
                let o = Owned::random(Kind::Fp4(group), k, &mut rng, &mut |r| r.f32());
                check_dot(&o.row(), m, &mut rng, &format!("fp4 f32-scales k={k} group={group}"));
            }
        }
    }
}

#[test]
fn extreme_scales_keep_the_reference_bits() {
    // Huge and tiny E8M0 scales: overflow to ±inf, subnormal products, the FP8 fold fallback.
    let mut rng = Rng(4);
    for s in scale_set() {
        for k in [33, 128, 257] {
            let o = Owned::random(Kind::Fp8(128), k, &mut rng, &mut |_| s);
            check_dot(&o.row(), 3, &mut rng, &format!("fp8 s={s:e} k={k}"));
            let o = Owned::random(Kind::Fp4(32), k + 1, &mut rng, &mut |_| s);
            check_dot(&o.row(), 3, &mut rng, &format!("fp4 s={s:e} k={k}"));
        }
    }
}

#[test]
fn padding_is_a_real_fma_so_signed_zeros_match() {
    // w·x underflows to -0.0 in every lane it touches. With k = 64 every lane ends at -0.0 and
    // so does the sum; with k = 63 lane 31's padded step fma(0, 0, -0.0) gives +0.0, and the
    // sum is +0.0. A path that skipped the padding would give -0.0 for k = 63.
    let tiny = 1.0e-30f32;
    for (k, want) in [(64usize, -0.0f32), (63, 0.0), (32, -0.0), (31, 0.0), (1, 0.0)] {
        let w = vec![-tiny; k];
        for m in [1, 3, 9] {
            let xs = vec![tiny; m * k];
            for isa in Isa::supported() {
                let mut out = vec![f32::NAN; m];
                dot_rows(isa, &Row::F32(&w), &xs, &mut out);
                for o in &out {
                    assert_eq!(o.to_bits(), want.to_bits(), "{isa:?} k={k} m={m}: {o:e}");
                }
            }
        }
    }
    // The same through FP8 codes: 0x80 is -0.0, and -0.0 · x = -0.0 for positive x.
    let codes = vec![0x80u8; 63];
    let xs = vec![1.0f32; 63];
    for isa in Isa::supported() {
        let mut out = [f32::NAN];
        dot_rows(isa, &Row::Fp8 { codes: &codes, scales: &[1.0], block: 128 }, &xs, &mut out);
        assert_eq!(out[0].to_bits(), 0.0f32.to_bits(), "{isa:?}");
    }
}

#[test]
fn dot_is_dot_rows_with_one_row() {
    let mut rng = Rng(5);
    for k in KS {
        let a: Vec<f32> = rng.xs(k);
        let b: Vec<f32> = rng.xs(k);
        let want = reference(&Row::F32(&a), &b);
        for isa in Isa::supported() {
            assert!(same(dot(isa, &a, &b), want), "{isa:?} k={k}");
        }
    }
}

#[test]
fn nan_codes_poison_the_sum() {
    let mut codes = vec![0x38u8; 100]; // 1.0
    codes[77] = 0xFF;
    let xs = vec![1.0f32; 2 * 100];
    for isa in Isa::supported() {
        let mut out = [0f32; 2];
        dot_rows(isa, &Row::Fp8 { codes: &codes, scales: &[1.0], block: 128 }, &xs, &mut out);
        assert!(out.iter().all(|v| v.is_nan()), "{isa:?}: {out:?}");
    }
}

#[test]
#[should_panic(expected = "input rows")]
fn mismatched_inputs_are_refused() {
    dot_rows(Isa::Scalar, &Row::F32(&[1.0, 2.0]), &[1.0, 2.0, 3.0], &mut [0.0]);
}

#[test]
#[should_panic(expected = "scales")]
fn missing_scales_are_refused() {
    dot_rows(Isa::best(), &Row::Fp8 { codes: &[0x38; 129], scales: &[1.0], block: 128 }, &[1.0; 129], &mut [0.0]);
}

// ---------------------------------------------------------------------------------------------
// Benchmark: `cargo test --release -p dsv4-backend-cpu --lib -- --ignored --nocapture bench_dot_rows`

/// The decode path before these kernels (storage.rs `row_f32` + ops.rs `dot`): a table decode
/// of the row into a scratch buffer, then an 8-lane dot per input row.
fn old_path(w: &Row, xs: &[f32], out: &mut [f32], scratch: &mut [f32]) {
    for (j, s) in scratch.iter_mut().enumerate() {
        *s = w.value(j);
    }
    let k = scratch.len();
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(k)) {
        let mut acc = [0f32; 8];
        let (ac, bc) = (x.chunks_exact(8), scratch.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let tail: f32 = ar.iter().zip(br).map(|(a, b)| a * b).sum();
        *o = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
    }
}

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn bench_dot_rows() {
    use std::time::Instant;
    let (n, k) = (4096usize, 1024usize);
    let mut rng = Rng(9);
    let fp8: Vec<u8> = (0..n * k).map(|_| rng.e4m3()).collect();
    let fp8_scales: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128)).map(|i| 2f32.powi(i as i32 % 7 - 3)).collect();
    let fp4: Vec<u8> = (0..n * k / 2).map(|_| rng.byte()).collect();
    let fp4_scales: Vec<f32> = (0..n * k / 32).map(|i| 2f32.powi(i as i32 % 5 - 2)).collect();
    let bf16: Vec<u8> = (0..n * k).flat_map(|_| ((rng.f32().to_bits() >> 16) as u16).to_le_bytes()).collect();
    let sk8 = k / 128;
    let row = |fmt: &str, r: usize| -> Row<'_> {
        match fmt {
            "fp8" => Row::Fp8 {
                codes: &fp8[r * k..(r + 1) * k],
                scales: &fp8_scales[(r / 128) * sk8..(r / 128 + 1) * sk8],
                block: 128,
            },
            "fp4" => Row::Fp4 {
                codes: &fp4[r * k / 2..(r + 1) * k / 2],
                scales: &fp4_scales[r * k / 32..(r + 1) * k / 32],
                group: 32,
            },
            _ => Row::Bf16(&bf16[r * 2 * k..(r + 1) * 2 * k]),
        }
    };
    let bytes = |fmt: &str| match fmt {
        "fp8" => fp8.len() + fp8_scales.len() * 4,
        "fp4" => fp4.len() + fp4_scales.len() * 4,
        _ => bf16.len(),
    };
    let mut paths: Vec<Option<Isa>> = Isa::supported().into_iter().map(Some).collect();
    paths.insert(0, None);
    for fmt in ["fp8", "fp4", "bf16"] {
        for m in [1usize, 4] {
            let xs = rng.xs(m * k);
            let mut out = vec![0f32; n * m];
            let mut scratch = vec![0f32; k];
            for path in &paths {
                let run = |out: &mut [f32], scratch: &mut [f32]| {
                    for r in 0..n {
                        let o = &mut out[r * m..(r + 1) * m];
                        match path {
                            Some(isa) => dot_rows(*isa, &row(fmt, r), &xs, o),
                            None => old_path(&row(fmt, r), &xs, o, scratch),
                        }
                    }
                };
                run(&mut out, &mut scratch); // warm up
                let (t0, mut reps) = (Instant::now(), 0);
                while reps < 3 || t0.elapsed().as_secs_f64() < 0.5 {
                    run(&mut out, &mut scratch);
                    reps += 1;
                }
                let secs = t0.elapsed().as_secs_f64() / reps as f64;
                let name = path.map_or("old (table+dot)", |i| i.name());
                println!(
                    "{fmt:5} m={m} {name:16} {:8.2} GB/s  {:7.1} µs per {n}x{k}",
                    bytes(fmt) as f64 / secs / 1e9,
                    secs * 1e6
                );
            }
        }
    }
}

/// A matrix of owned rows, for `dot_many`.
struct Matrix(Vec<Owned>);

impl Rows for Matrix {
    fn row<'a>(&'a self, r: usize, _scratch: &'a mut RowScratch) -> Row<'a> {
        self.0[r].row()
    }
}

/// `dot_many` of rows `start..start + n` of `w` on every supported set against `dot_rows` on
/// the scalar lanes row by row (the reference bits), output by output; `what` names the case.
fn check_dot_many(w: &Matrix, start: usize, n: usize, xs: &[f32], what: &str) {
    let m = xs.len() / w.0[start].row().len().max(1);
    let mut want = vec![0f32; n * m];
    for (j, o) in want.chunks_exact_mut(m).enumerate() {
        dot_rows(Isa::Scalar, &w.0[start + j].row(), xs, o);
    }
    for isa in Isa::supported() {
        let mut got = vec![f32::NAN; n * m];
        dot_many(isa, w, start, n, xs, &mut got);
        for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(same(*g, *e), "{what} m={m} {isa:?} output {idx}: {g:e} vs {e:e}");
        }
    }
}

#[test]
fn dot_many_is_dot_rows_row_by_row() {
    let mut rng = Rng(9);
    let scale =
        |r: &mut Rng| 2f32.powi((r.next() % 20) as i32 - 10) * if r.next().is_multiple_of(2) { 1.0 } else { 1.5 };
    let kinds = [Kind::F32, Kind::Bf16, Kind::F16, Kind::Fp8(128), Kind::Fp8(48), Kind::Fp4(32), Kind::Fp4(7)];
    for kind in kinds {
        for k in [2, 30, 32, 64, 130, 256, 258] {
            let n = 5;
            let w = Matrix((0..n).map(|_| Owned::random(kind, k, &mut rng, &mut { scale })).collect());
            for m in 1..=9 {
                let xs = rng.xs(m * k);
                // Row by row with dot_rows on the scalar lanes: the reference bits.
                let mut want = vec![0f32; n * m];
                for (j, o) in want.chunks_exact_mut(m).enumerate() {
                    dot_rows(Isa::Scalar, &w.0[j].row(), &xs, o);
                }
                for isa in Isa::supported() {
                    // Rows 1..n: a start offset too.
                    let mut got = vec![f32::NAN; (n - 1) * m];
                    dot_many(isa, &w, 1, n - 1, &xs, &mut got);
                    for (idx, (g, e)) in got.iter().zip(&want[m..]).enumerate() {
                        assert!(same(*g, *e), "{kind:?} k={k} m={m} {isa:?} output {idx}: {g:e} vs {e:e}");
                    }
                    // All five rows: an odd count (one input row pairs rows, one is left).
                    let mut got = vec![f32::NAN; n * m];
                    dot_many(isa, &w, 0, n, &xs, &mut got);
                    for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(same(*g, *e), "{kind:?} k={k} m={m} {isa:?} all rows, output {idx}: {g:e} vs {e:e}");
                    }
                }
            }
        }
    }
}

/// One input row pairs rows; a block whose fast decode is not exact (`scale · 256`
/// overflows) in either row of a pair sends both down the row-by-row path, same bits.
#[test]
fn dot_many_pairs_fall_back_on_extreme_scales() {
    let mut rng = Rng(10);
    for huge_row in 0..4 {
        let rows: Vec<Owned> = (0..4)
            .map(|r| {
                let mut b = 0;
                Owned::random(Kind::Fp8(128), 256, &mut rng, &mut |_| {
                    b += 1;
                    if r == huge_row && b == 2 {
                        2f32.powi(127)
                    } else {
                        2f32.powi(-3)
                    }
                })
            })
            .collect();
        let w = Matrix(rows);
        // One input row (pairs of rows) and several (tiles, in slices of the columns: the
        // huge block is the second of the row, so the first slices went the fast way).
        for m in [1, 3, 6] {
            let xs: Vec<f32> = rng.xs(256 * m).iter().map(|v| v * 1e-30).collect();
            check_dot_many(&w, 0, 4, &xs, &format!("huge scale in row {huge_row}"));
        }
    }
}

/// Several input rows on rows long enough that the tiles take the columns in several slices
/// (16 KiB of inputs each: 455 values for 9 input rows, rounded down to whole blocks), with a
/// shorter last slice, an odd row count, more rows than one group of rows (22 pairs of 1440
/// values) and every format: the same bits as row by row.
#[test]
fn dot_many_in_column_slices_is_dot_rows_row_by_row() {
    let mut rng = Rng(12);
    let scale = |r: &mut Rng| 2f32.powi((r.next() % 12) as i32 - 6);
    for kind in [Kind::F32, Kind::Bf16, Kind::F16, Kind::Fp8(128), Kind::Fp4(32)] {
        let (n, k) = (47, 1440);
        let w = Matrix((0..n).map(|_| Owned::random(kind, k, &mut rng, &mut { scale })).collect());
        for m in [2, 5, 8, 9] {
            check_dot_many(&w, 0, n, &rng.xs(m * k), &format!("{kind:?}"));
        }
    }
}

/// The decode GEMV of FP8 rows with power-of-two scales folds the scale into the input
/// (`fp8_fold.rs`); wherever that fold is not exact, or a code is a NaN, it must fall back.
/// Every case is checked against the scalar reference, bit for bit, on every instruction set.
#[test]
fn folded_fp8_pairs_keep_the_reference_bits() {
    let mut rng = Rng(11);
    // Scales: in the fold's range, at both its edges, just outside it (2^8: the fold's factor
    // overflows; 2^-127: subnormal), not a power of two, and a mix.
    let scale_sets: [&dyn Fn(&mut Rng) -> f32; 7] = [
        &|r| 2f32.powi((r.next() % 24) as i32 - 16),
        &|_| 2f32.powi(-126),
        &|_| 2f32.powi(7),
        &|_| 2f32.powi(8),
        &|_| 2f32.powi(-127),
        &|_| 0.75,
        &|r| if r.next().is_multiple_of(3) { 2f32.powi(9) } else { 2f32.powi(-9) },
    ];
    // Inputs: ordinary, huge (the folded input overflows), tiny (it loses bits), with zeros
    // of both signs, and an infinity.
    type Input = dyn Fn(&mut Rng, usize) -> Vec<f32>;
    let inputs: [&Input; 5] = [
        &|r, k| r.xs(k),
        &|r, k| r.xs(k).iter().map(|v| v * 1e30).collect(),
        &|r, k| r.xs(k).iter().map(|v| v * 1e-38).collect(),
        &|_, k| (0..k).map(|j| if j % 2 == 0 { -0.0 } else { 0.0 }).collect(),
        &|r, k| {
            let mut x = r.xs(k);
            x[k / 3] = f32::INFINITY;
            x
        },
    ];
    for k in [32, 96, 128, 256, 1024] {
        for (si, scale) in scale_sets.iter().enumerate() {
            let n = 6;
            let mut w = Matrix((0..n).map(|_| Owned::random(Kind::Fp8(128), k, &mut rng, &mut |r| scale(r))).collect());
            // Rows 2 and 3 share their scales with rows 0 and 1 (rows of one 128-row block).
            for r in 2..4 {
                w.0[r].scales = w.0[r - 2].scales.clone();
            }
            for (xi, input) in inputs.iter().enumerate() {
                let xs = input(&mut rng, k);
                for nan_row in [None, Some(1)] {
                    if let Some(r) = nan_row {
                        w.0[r].bytes[k - 1] = 0xFF;
                    }
                    let mut want = vec![0f32; n];
                    for (j, o) in want.chunks_exact_mut(1).enumerate() {
                        dot_rows(Isa::Scalar, &w.0[j].row(), &xs, o);
                    }
                    for isa in Isa::supported() {
                        let mut got = vec![f32::NAN; n];
                        dot_many(isa, &w, 0, n, &xs, &mut got);
                        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                same(*g, *e),
                                "k={k} scales {si} input {xi} nan {nan_row:?} {isa:?} row {j}: {g:e} vs {e:e}"
                            );
                        }
                    }
                    if let Some(r) = nan_row {
                        w.0[r].bytes[k - 1] = 0x38;
                    }
                }
            }
        }
    }
}

/// The folds are kept per thread for the next call with the same input: a call with another
/// input of the same length, or rows with other scales, must not reuse them.
#[test]
fn kept_folds_are_not_reused_for_another_input_or_other_scales() {
    let mut rng = Rng(12);
    let k = 256;
    let mut w = Matrix((0..4).map(|_| Owned::random(Kind::Fp8(128), k, &mut rng, &mut |_| 2f32.powi(-4))).collect());
    let (a, mut b) = (rng.xs(k), rng.xs(k));
    b[..k / 2].copy_from_slice(&a[..k / 2]);
    for isa in Isa::supported() {
        for (xs, scale) in [(&a, -4), (&b, -4), (&b, -5), (&a, -5), (&a, -4)] {
            for row in &mut w.0 {
                row.scales.iter_mut().for_each(|s| *s = 2f32.powi(scale));
            }
            let mut want = vec![0f32; 4];
            for (j, o) in want.chunks_exact_mut(1).enumerate() {
                dot_rows(Isa::Scalar, &w.0[j].row(), xs, o);
            }
            let mut got = vec![f32::NAN; 4];
            dot_many(isa, &w, 0, 4, xs, &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!(same(*g, *e), "{isa:?} scale 2^{scale}: {g:e} vs {e:e}");
            }
        }
    }
}

/// An FP4 matrix with E8M0 scale bytes that offers them to the one-input-row kernel of
/// `fp4_f32` ([`Rows::fp4_groups`]) as well as through [`Rows::row`] (scales widened to f32).
struct Fp4Bytes {
    codes: Vec<u8>,
    scales: Vec<u8>,
    widened: Vec<f32>,
    k: usize,
}

impl Fp4Bytes {
    fn new(codes: Vec<u8>, scales: Vec<u8>, k: usize) -> Fp4Bytes {
        let widened = scales.iter().map(|&b| dsv4_core::quant::e8m0_to_f32_unchecked(b)).collect();
        Fp4Bytes { codes, scales, widened, k }
    }
}

impl Rows for Fp4Bytes {
    fn row<'a>(&'a self, r: usize, _scratch: &'a mut RowScratch) -> Row<'a> {
        let (k, g) = (self.k, self.k.div_ceil(32));
        Row::Fp4 {
            codes: &self.codes[r * k / 2..(r + 1) * k / 2],
            scales: &self.widened[r * g..(r + 1) * g],
            group: 32,
        }
    }

    fn fp4_groups(&self) -> Option<Fp4Groups<'_>> {
        Some(Fp4Groups { codes: &self.codes, scales: &self.scales, k: self.k })
    }
}

/// The one-input-row FP4 kernel that reads codes and E8M0 bytes directly (`fp4_f32`, on the
/// AVX2 and AVX-512 lanes) gives the scalar reference's bits: every code, every scale byte (0,
/// the subnormal 2⁻¹²⁷, and 255, NaN, included), rows in pairs and an odd one out, a start
/// offset, inputs with signed zeros, infinities and values whose products are subnormal, rows
/// whose every product is -0 (the lanes start at +0), and widths that are not whole 32-value
/// groups (which it leaves to the general path). It checks that the kernel did run.
#[test]
fn fp4_rows_from_scale_bytes_keep_the_reference_bits() {
    let mut rng = Rng(13);
    type Input = dyn Fn(&mut Rng, usize) -> Vec<f32>;
    let inputs: [&Input; 5] = [
        &|r, k| r.xs(k),
        &|r, k| r.xs(k).iter().map(|v| v * 1e-38).collect(),
        &|r, k| {
            let mut x = r.xs(k);
            x[k / 3] = f32::INFINITY;
            x
        },
        &|_, k| (0..k).map(|j| if j % 3 == 0 { -0.0 } else { 0.0 }).collect(),
        &|_, k| vec![-0.0; k],
    ];
    // (k, n, the first scale byte or none): every byte, two neighbouring ones per matrix (a
    // row's groups must be of similar size, or the small ones' products would vanish in the
    // sum; from 252 up the one below, and codes of magnitude at most 1, so that the sums stay
    // finite), on a small matrix; ordinary bytes on every shape.
    let cases = (0..=255u8).map(|b| (64, 3, Some(b))).chain(
        [32usize, 64, 96, 256, 512, 1024, 48, 2].into_iter().flat_map(|k| [1, 2, 5, 8, 9].map(|n| (k, n, None))),
    );
    for (k, n, first_byte) in cases {
        let g = k.div_ceil(32);
        let high = first_byte.is_some_and(|b| b >= 252);
        // Every third small matrix has codes of one sign only, so that with the all -0 input
        // every product is -0 and the result shows that the lanes start at +0.
        let one_sign = first_byte.is_some_and(|b| b % 3 == 0);
        // Nibbles 0-2 and 8-10: magnitudes 0, 0.5 and 1.
        let small = |v: u8| (v % 3) | (v & 8);
        let codes: Vec<u8> = (0..n * k / 2)
            .map(|_| rng.next() as u8)
            .map(|c| if high { small(c & 0xF) | (small(c >> 4) << 4) } else { c })
            .map(|c| if one_sign { c & 0x77 } else { c })
            .collect();
        let scales: Vec<u8> = (0..n * g)
            .map(|i| {
                first_byte.map_or(115 + (rng.next() % 10) as u8, |b| {
                    if high {
                        b - (i % 2) as u8
                    } else {
                        b + (i % 2) as u8
                    }
                })
            })
            .collect();
        let w = Fp4Bytes::new(codes, scales, k);
        for (xi, input) in inputs.iter().enumerate() {
            let xs = input(&mut rng, k);
            let mut want = vec![0f32; n];
            for (j, o) in want.chunks_exact_mut(1).enumerate() {
                dot_rows(Isa::Scalar, &w.row(j, &mut RowScratch::default()), &xs, o);
            }
            for isa in Isa::supported() {
                if matches!(isa, Isa::Avx2 | Isa::Avx512) {
                    // The kernel itself, so that a dispatch that stopped reaching it fails here.
                    let mut got = vec![f32::NAN; n];
                    // SAFETY: `isa` is supported by this CPU (`Isa::supported`).
                    let ran = unsafe { super::super::fp4_f32::rows(isa, w.fp4_groups().unwrap(), 0, n, &xs, &mut got) };
                    assert_eq!(ran, k % 32 == 0, "k={k}: fp4_f32::rows ran {ran}");
                    if ran {
                        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                same(*g, *e),
                                "k={k} n={n} first byte {first_byte:?} input {xi} {isa:?} kernel row {j}"
                            );
                        }
                    }
                }
                for start in [0, 1.min(n - 1)] {
                    let mut got = vec![f32::NAN; n - start];
                    dot_many(isa, &w, start, n - start, &xs, &mut got);
                    for (j, (g, e)) in got.iter().zip(&want[start..]).enumerate() {
                        assert!(
                            same(*g, *e),
                            "k={k} n={n} first byte {first_byte:?} input {xi} {isa:?} row {}: {g:e} vs {e:e}",
                            start + j
                        );
                    }
                }
            }
        }
    }
}

/// Rows but no input rows (`m = 0`, an empty batch): nothing to compute, on every set (the
/// tiles must not be asked for zero input rows).
#[test]
fn dot_many_with_no_input_rows_does_nothing() {
    let mut rng = Rng(13);
    let scale = |r: &mut Rng| 2f32.powi((r.next() % 12) as i32 - 6);
    for kind in [Kind::F32, Kind::Bf16, Kind::Fp8(128), Kind::Fp4(32)] {
        let w = Matrix((0..3).map(|_| Owned::random(kind, 64, &mut rng, &mut { scale })).collect());
        for isa in Isa::supported() {
            dot_many(isa, &w, 0, 3, &[], &mut []);
        }
    }
}

/// Several input rows on long FP8 rows (many column slices): a block without an exact fast
/// decode in a late slice of one row, after the earlier slices of its unit (and of the other
/// units of its group) went the fast way; in the first or the second row of a pair, or the
/// odd row. Every output keeps the reference bits.
#[test]
fn dot_many_tiles_fall_back_in_a_late_slice() {
    let mut rng = Rng(14);
    let (n, blocks) = (7, 20);
    let k = 128 * blocks;
    for huge_row in [0, 3, 4, 6] {
        let rows: Vec<Owned> = (0..n)
            .map(|r| {
                let mut b = 0;
                Owned::random(Kind::Fp8(128), k, &mut rng, &mut |_| {
                    b += 1;
                    if r == huge_row && b == blocks - 2 {
                        2f32.powi(127)
                    } else {
                        2f32.powi(-3)
                    }
                })
            })
            .collect();
        let w = Matrix(rows);
        for m in [2, 3, 4, 8] {
            let xs: Vec<f32> = rng.xs(k * m).iter().map(|v| v * 1e-30).collect();
            check_dot_many(&w, 0, n, &xs, &format!("huge row {huge_row}"));
        }
    }
}

/// Tiles on every shape around the edges: one and two rows, `k` of one chunk, a start offset,
/// 2-8 input rows, every format: the same bits as row by row.
#[test]
fn dot_many_tiles_on_small_shapes() {
    let mut rng = Rng(15);
    let scale = |r: &mut Rng| 2f32.powi((r.next() % 12) as i32 - 6);
    for kind in [Kind::F32, Kind::Bf16, Kind::F16, Kind::Fp8(32), Kind::Fp8(128), Kind::Fp4(32), Kind::Fp4(64)] {
        for k in [32, 96, 160] {
            let w = Matrix((0..4).map(|_| Owned::random(kind, k, &mut rng, &mut { scale })).collect());
            for n in 1..=3 {
                for m in 2..=8 {
                    check_dot_many(&w, 1, n, &rng.xs(m * k), &format!("{kind:?} k={k} n={n}"));
                }
            }
        }
    }
}

/// The NaN scan finds either NaN code anywhere (the last byte of a piece, of the slice) and
/// nothing else.
#[test]
fn the_nan_scan_finds_both_nan_codes_anywhere() {
    let clean: Vec<u8> = (0..10_000u32).map(|j| [0x7E, 0xFE, 0x80, 0x00, 0x77][j as usize % 5]).collect();
    assert!(fp8_codes_nan_free(&clean));
    assert!(fp8_codes_nan_free(&[]));
    for at in [0, 4095, 4096, 9_999] {
        for nan in [0x7F, 0xFF] {
            let mut c = clean.clone();
            c[at] = nan;
            assert!(!fp8_codes_nan_free(&c), "{nan:#04x} at {at}");
        }
    }
}
