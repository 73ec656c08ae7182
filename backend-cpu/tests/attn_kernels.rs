//! The attention kernels (`kernels::attn`) on every instruction set this CPU supports, each
//! forced explicitly, against plain scalar references written here from the kernels' documented
//! order of operations: bit for bit (so every instruction set gives the same bits), and within a
//! rounding bound of the exact (f64) value. Odd head widths, head counts and key counts exercise
//! every tile and tail; negative zeros, ReLU zeros, NaN/inf and exact ties exercise the edges.

use dsv4_backend_cpu::kernels::attn::{self, IndexQuery};
use dsv4_backend_cpu::kernels::Isa;
use dsv4_core::backend::RowFormat;
use dsv4_core::test_data::Rng;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// The lanes' tree: `(a_i + a_{i+8}) → (· + ·_{+4}) → (· + ·_{+2}) → ·_0 + ·_1`.
fn tree(a: [f32; 16]) -> f32 {
    let s8: Vec<f32> = (0..8).map(|i| a[i] + a[i + 8]).collect();
    let s4: Vec<f32> = (0..4).map(|i| s8[i] + s8[i + 4]).collect();
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// The indexer score as documented: heads padded to 16 (zero queries, weight -0.0), one fused
/// chain over d per head from +0.0, relu times `w·scale`, groups added in order from -0.0, the
/// lanes summed by `tree`.
fn score_ref(q: &[f32], w: &[f32], dh: usize, scale: f32, key: &[f32]) -> f32 {
    let nh = w.len();
    let mut sum = [-0.0f32; 16];
    for g in 0..nh.div_ceil(16) {
        for (lane, s) in sum.iter_mut().enumerate() {
            let h = g * 16 + lane;
            let (mut acc, ws) = (0f32, if h < nh { w[h] * scale } else { -0.0 });
            for (d, &k) in key[..dh].iter().enumerate() {
                let qv = if h < nh { q[h * dh + d] } else { 0.0 };
                acc = qv.mul_add(k, acc);
            }
            let relu = if acc > 0.0 { acc } else { 0.0 };
            *s += relu * ws;
        }
    }
    tree(sum)
}

/// `Σ_h w_h · relu(q_h·k) · scale` in f64.
fn score_exact(q: &[f32], w: &[f32], dh: usize, scale: f32, key: &[f32]) -> (f64, f64) {
    let (mut sum, mut magnitude) = (0f64, 0f64);
    for (h, &wh) in w.iter().enumerate() {
        let dot: f64 = (0..dh).map(|d| q[h * dh + d] as f64 * key[d] as f64).sum();
        let abs: f64 = (0..dh).map(|d| (q[h * dh + d] as f64 * key[d] as f64).abs()).sum();
        sum += wh as f64 * dot.max(0.0) * scale as f64;
        magnitude += (wh as f64 * scale as f64).abs() * abs;
    }
    (sum, magnitude)
}

/// Key rows for the indexer tests: random, plus the edge cases.
fn index_keys(rng: &mut Rng, n: usize, dh: usize, q: &[f32], nh: usize) -> Vec<Vec<f32>> {
    let mut keys: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(dh)).collect();
    fn set(keys: &mut [Vec<f32>], j: usize, row: Vec<f32>) {
        if j < keys.len() {
            keys[j] = row;
        }
    }
    set(&mut keys, 1, vec![0.0; dh]);
    set(&mut keys, 2, vec![-0.0; dh]);
    // Minus the first head's query: that head's dot product is negative (a ReLU zero).
    set(&mut keys, 3, q[..dh.min(q.len())].iter().map(|v| -v).chain(std::iter::repeat(0.0)).take(dh).collect());
    if n > 5 {
        let row = keys[4].clone();
        set(&mut keys, 5, row); // an exact tie with key 4
    }
    let mut odd = vec![1.0; dh];
    if dh > 0 {
        odd[0] = f32::INFINITY;
    }
    set(&mut keys, 6, odd);
    let mut nan = vec![0.5; dh];
    if dh > 1 {
        nan[dh / 2] = f32::NAN;
    }
    set(&mut keys, 7, nan);
    let _ = nh;
    keys
}

#[test]
fn index_scores_match_the_reference_on_every_isa() {
    let mut rng = Rng(11);
    for (nh, dh) in [(0, 8), (1, 1), (3, 7), (5, 13), (16, 16), (16, 128), (17, 33), (33, 20), (40, 5), (64, 24)] {
        let mut q = rng.vec(nh * dh);
        if nh * dh > 2 {
            q[1] = -0.0;
            q[2] = 0.0;
        }
        let mut w = rng.vec(nh);
        if nh > 2 {
            w[1] = 0.0;
            w[2] = -0.0;
        }
        let scale = (dh as f32).powf(-0.5);
        let iq = IndexQuery::new(&q, &w, dh, scale);
        assert_eq!(iq.head_dim(), dh);
        for n in [0, 1, 2, 5, 8, 9, 17, 37, 64] {
            let keys = index_keys(&mut rng, n, dh, &q, nh);
            let rows: Vec<&[f32]> = keys.iter().map(|k| &k[..]).collect();
            let want: Vec<f32> = rows.iter().map(|k| score_ref(&q, &w, dh, scale, k)).collect();
            for (j, k) in rows.iter().enumerate() {
                if k.iter().all(|v| v.is_finite()) {
                    let (exact, magnitude) = score_exact(&q, &w, dh, scale, k);
                    let bound = (dh + 8) as f64 * f32::EPSILON as f64 * magnitude.max(f32::MIN_POSITIVE as f64);
                    assert!(
                        (want[j] as f64 - exact).abs() <= bound,
                        "nh {nh}, dh {dh}, key {j}: {} vs {exact}",
                        want[j]
                    );
                }
            }
            if n > 5 && nh > 0 {
                assert_eq!(want[4].to_bits(), want[5].to_bits());
            }
            for isa in Isa::supported() {
                let mut got = vec![f32::NAN; n];
                attn::index_scores(isa, &iq, &rows, &mut got);
                assert_eq!(bits(&got), bits(&want), "{isa:?}, nh {nh}, dh {dh}, {n} keys");
            }
        }
    }
}

/// Attention as documented: 16-lane fused dot products (zero padded) summed by `tree`, times
/// the scale; softmax with the sink in f32 (left to right); outputs as one fused chain over the
/// keys from +0.0.
fn attend_ref(q: &[f32], keys: &[&[f32]], sinks: &[f32], scale: f32) -> Vec<f32> {
    let hh = sinks.len();
    let d = q.len() / hh.max(1);
    let mut out = vec![0f32; hh * d];
    for h in 0..hh {
        let qh = &q[h * d..(h + 1) * d];
        let mut p: Vec<f32> = keys
            .iter()
            .map(|k| {
                let mut lanes = [0f32; 16];
                for i in 0..d.div_ceil(16) * 16 {
                    let (a, b) = if i < d { (qh[i], k[i]) } else { (0.0, 0.0) };
                    lanes[i % 16] = a.mul_add(b, lanes[i % 16]);
                }
                tree(lanes) * scale
            })
            .collect();
        let max = p.iter().fold(sinks[h], |m, &x| m.max(x));
        let mut denom = (sinks[h] - max).exp();
        for x in p.iter_mut() {
            *x = (*x - max).exp();
            denom += *x;
        }
        for x in p.iter_mut() {
            *x /= denom;
        }
        for (c, o) in out[h * d..(h + 1) * d].iter_mut().enumerate() {
            *o = keys.iter().zip(&p).fold(0f32, |acc, (k, &w)| w.mul_add(k[c], acc));
        }
    }
    out
}

/// The same in f64.
fn attend_exact(q: &[f32], keys: &[&[f32]], sinks: &[f32], scale: f32) -> Vec<f64> {
    let hh = sinks.len();
    let d = q.len() / hh.max(1);
    let mut out = vec![0f64; hh * d];
    for h in 0..hh {
        let l: Vec<f64> = keys
            .iter()
            .map(|k| (0..d).map(|i| q[h * d + i] as f64 * k[i] as f64).sum::<f64>() * scale as f64)
            .collect();
        let max = l.iter().fold(sinks[h] as f64, |m, &x| m.max(x));
        let e: Vec<f64> = l.iter().map(|x| (x - max).exp()).collect();
        let denom = (sinks[h] as f64 - max).exp() + e.iter().sum::<f64>();
        for c in 0..d {
            out[h * d + c] = keys.iter().zip(&e).map(|(k, e)| e / denom * k[c] as f64).sum();
        }
    }
    out
}

#[test]
fn attention_matches_the_reference_on_every_isa() {
    let mut rng = Rng(12);
    for (hh, d) in [(1, 1), (1, 16), (3, 5), (5, 24), (4, 37), (8, 64), (9, 33), (8, 512), (2, 0)] {
        let mut q = rng.vec(hh * d);
        if hh * d > 3 {
            q[0] = -0.0;
            q[3] = 0.0;
        }
        let mut sinks = rng.vec(hh);
        sinks[0] = f32::NEG_INFINITY;
        for n in [0, 1, 3, 4, 7, 17, 130] {
            let mut rows: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(d)).collect();
            if n > 3 {
                rows[1] = vec![-0.0; d];
                rows[3] = rows[2].clone(); // equal logits
            }
            let keys: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
            let scale = (d.max(1) as f32).powf(-0.5);
            let want = attend_ref(&q, &keys, &sinks, scale);
            let exact = attend_exact(&q, &keys, &sinks, scale);
            for (i, (&w, &e)) in want.iter().zip(&exact).enumerate() {
                let bound = 1e-5 * (1.0 + (d + n) as f64 / 64.0);
                assert!((w as f64 - e).abs() <= bound, "H {hh}, d {d}, {n} keys, output {i}: {w} vs {e}");
            }
            for isa in Isa::supported() {
                let (mut got, mut probs) = (vec![f32::NAN; hh * d], Vec::new());
                attn::attend(isa, &q, &keys, &sinks, scale, &mut probs, &mut got);
                assert_eq!(bits(&got), bits(&want), "{isa:?}, H {hh}, d {d}, {n} keys");
                // A range of heads gives the same bits as the same heads of the whole.
                if hh > 2 {
                    let mut part = vec![0f32; 2 * d];
                    attn::attend(isa, &q[d..3 * d], &keys, &sinks[1..3], scale, &mut probs, &mut part);
                    assert_eq!(bits(&part), bits(&want[d..3 * d]), "{isa:?}, H {hh}, d {d}, {n} keys, heads 1..3");
                }
            }
        }
    }
}

#[test]
fn decoded_rows_are_the_formats_decode_bit_for_bit_on_every_isa() {
    let mut rng = Rng(13);
    let formats = [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 0 }, RowFormat::Fp8 { rope: 16 }];
    for format in formats {
        for width in [1, 7, 16, 33, 64, 80, 96, 200, 512] {
            let rows = 9;
            let bytes = format.row_bytes(width);
            let mut data = vec![0u8; rows * bytes];
            for (r, row) in data.chunks_exact_mut(bytes).enumerate() {
                let mut values: Vec<f32> = rng.vec(width).iter().map(|v| v * (r as f32 * 3.0).exp2()).collect();
                values[0] = -0.0;
                if width > 2 {
                    values[1] = f32::NAN;
                    values[2] = 1e-30;
                }
                format.encode(&values, row);
            }
            // Every byte value somewhere: every e4m3 code (NaN included) and scale exponent.
            if format != RowFormat::F32 {
                for (i, b) in data[bytes * (rows - 1)..].iter_mut().enumerate() {
                    *b = (i * 37 + 11) as u8;
                }
            }
            let mut want = vec![0f32; rows * width];
            for (row, o) in data.chunks_exact(bytes).zip(want.chunks_exact_mut(width)) {
                format.decode(row, o);
            }
            let order: Vec<usize> = (0..rows).rev().collect();
            let want_rev: Vec<f32> = order.iter().flat_map(|&r| want[r * width..(r + 1) * width].to_vec()).collect();
            for isa in Isa::supported() {
                let mut got = vec![0f32; rows * width];
                for (row, o) in data.chunks_exact(bytes).zip(got.chunks_exact_mut(width)) {
                    attn::decode_row(isa, format, row, o);
                }
                assert_eq!(bits(&got), bits(&want), "{isa:?}, {format:?}, width {width}");
                attn::decode_rows(isa, format, &data, bytes, &order, &mut got);
                assert_eq!(bits(&got), bits(&want_rev), "{isa:?}, {format:?}, width {width}, rows");
            }
        }
    }
}

#[test]
fn every_bf16_and_e4m3_code_decodes_as_the_format_does() {
    // Every bf16 pattern (signalling NaNs included) in one row.
    let data: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
    let mut want = vec![0f32; 1 << 16];
    RowFormat::Bf16.decode(&data, &mut want);
    // Every e4m3 code under every scale byte: rows of 64 codes and one scale.
    let fp8 = RowFormat::Fp8 { rope: 0 };
    let bytes = fp8.row_bytes(64);
    let mut rows = Vec::new();
    for scale in 0..=255u8 {
        for part in 0..4u8 {
            let mut row = vec![0u8; bytes];
            for (i, c) in row[..64].iter_mut().enumerate() {
                *c = part * 64 + i as u8;
            }
            row[64] = scale;
            rows.push(row);
        }
    }
    for isa in Isa::supported() {
        let mut got = vec![0f32; 1 << 16];
        attn::decode_row(isa, RowFormat::Bf16, &data, &mut got);
        assert_eq!(bits(&got), bits(&want), "{isa:?}, bf16");
        for row in &rows {
            let (mut want, mut got) = (vec![0f32; 64], vec![0f32; 64]);
            fp8.decode(row, &mut want);
            attn::decode_row(isa, fp8, row, &mut got);
            assert_eq!(bits(&got), bits(&want), "{isa:?}, e4m3 codes from {}, scale byte {}", row[0], row[64]);
        }
    }
}
