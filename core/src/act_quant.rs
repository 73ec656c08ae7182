//! The official inference's activation quantisation simulation (spec §B.8), on host rows.
//!
//! DeepSeek's own inference code quantises activations the way the model was trained
//! (quantisation-aware): transformers does none of this. The `official` precisions
//! ([`crate::precision`]) run these steps at the places the official code does:
//!
//! * [`FakeQuant::E4m3`] with blocks of [`ACT_BLOCK`] = 128: the input of every linear whose
//!   checkpoint weight is FP8 or FP4 (official `act_quant` before `fp8_gemm` / `fp4_gemm`);
//! * [`FakeQuant::E2m1`] with blocks of [`FP4_ACT_BLOCK`] = 32, after [`hadamard_row`]: the
//!   lightning indexer's queries and keys (official `rotate_activation` + `fp4_act_quant`);
//! * [`FakeQuant::KvRow`]: the window KV rows and the attention compressor's entries (official
//!   `act_quant(kv[..., :-rd], 64, ..., inplace)`, rope channels left BF16), which is exactly a
//!   round trip through the paged state's `fp8` row format ([`crate::kv::RowFormat::Fp8`]), so
//!   a state stored as fp8, bf16 or f32 then holds the same values.
//!
//! # Arithmetic
//!
//! Each row (last axis) is cut into blocks of `block` consecutive values from index 0; the last
//! block is shorter when the row is not a multiple of `block` (the official kernels require
//! multiples; V4's widths are). Per block, with `amax` the largest magnitude:
//!
//! * e4m3: `e` = the smallest integer with `max(amax, 1e-4) ≤ 448 · 2^e`
//!   ([`crate::kv::format::fp8_scale_exponent`]); each value becomes `e4m3(clamp(v / 2^e, ±448)) · 2^e`,
//!   e4m3fn rounded to nearest, ties to even.
//! * e2m1: `e` = the smallest integer with `max(amax, 6 · 2⁻¹²⁶) ≤ 6 · 2^e`; each value becomes
//!   `e2m1(clamp(v / 2^e, ±6)) · 2^e` on the grid 0, ½, 1, 1½, 2, 3, 4, 6, nearest, ties to the
//!   even mantissa (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4).
//!
//! The official kernels derive `e` from the bits of `amax · f32(1/448)` (`fast_round_scale`);
//! that differs from the exact rule above only when `amax / 448` is within one f32 rounding of a
//! power of two. Division by `2^e` and the product with it are exact, so every result is the
//! exact quantised value; NaN stays NaN.

use crate::kv::format::{e4m3_encode, fp8_scale_exponent, RowFormat};
use crate::quant::e4m3_to_f32;

/// Values per e4m3 activation block (official `block_size`).
pub const ACT_BLOCK: usize = 128;
/// Values per e2m1 activation block (official `fp4_block_size`).
pub const FP4_ACT_BLOCK: usize = 32;

const E4M3_MAX: f32 = 448.0;
const E2M1_MAX: f32 = 6.0;
/// The non-negative e2m1 values in code order (codes 0..8; an even code has mantissa 0).
const E2M1_GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// One quantise-dequantise step of the simulation (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeQuant {
    /// e4m3fn with one power-of-two scale per `block` values of a row.
    E4m3 { block: usize },
    /// e2m1 (FP4) with one power-of-two scale per `block` values of a row.
    E2m1 { block: usize },
    /// The official KV row: the first `width − rope` channels e4m3 with one power-of-two scale
    /// per 64, the last `rope` channels rounded to BF16 (the `fp8` row format's round trip).
    KvRow { rope: usize },
}

impl FakeQuant {
    /// The input quantisation of an FP8/FP4 linear.
    pub const LINEAR_INPUT: FakeQuant = FakeQuant::E4m3 { block: ACT_BLOCK };
    /// The indexer's query and key quantisation (after [`hadamard_row`]).
    pub const INDEXER: FakeQuant = FakeQuant::E2m1 { block: FP4_ACT_BLOCK };
}

/// Quantises and dequantises `row` in place (module docs). A zero block size is treated as one
/// block per row.
pub fn fake_quant_row(row: &mut [f32], q: FakeQuant) {
    let (block, e2m1) = match q {
        FakeQuant::E4m3 { block } => (block, false),
        FakeQuant::E2m1 { block } => (block, true),
        FakeQuant::KvRow { rope } => {
            let stored = RowFormat::Fp8 { rope }.round_trip(row);
            row.copy_from_slice(&stored);
            return;
        }
    };
    let block = if block == 0 { row.len().max(1) } else { block };
    for b in row.chunks_mut(block) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        if e2m1 {
            let s = pow2(fp4_scale_exponent(amax));
            for v in b.iter_mut() {
                *v = e2m1_round((*v / s).clamp(-E2M1_MAX, E2M1_MAX)) * s;
            }
        } else {
            let s = pow2(fp8_scale_exponent(amax));
            for v in b.iter_mut() {
                *v = e4m3_to_f32(e4m3_encode((*v / s).clamp(-E4M3_MAX, E4M3_MAX))) * s;
            }
        }
    }
}

/// [`fake_quant_row`] on every row of `data` (rows of `width` values).
pub fn fake_quant_rows(data: &mut [f32], width: usize, q: FakeQuant) {
    if width == 0 {
        return;
    }
    data.chunks_mut(width).for_each(|r| fake_quant_row(r, q));
}

/// The exponent `e` of the e2m1 scale: the smallest integer with `max(amax, 6·2⁻¹²⁶) ≤ 6·2^e`
/// (a non-finite `amax` gives 0).
pub fn fp4_scale_exponent(amax: f32) -> i32 {
    let amax = if amax.is_finite() { amax.max(E2M1_MAX * f32::MIN_POSITIVE) } else { E2M1_MAX };
    ((amax as f64) / E2M1_MAX as f64).log2().ceil() as i32
}

/// `y` (|y| ≤ 6 or NaN) rounded to the nearest e2m1 value, ties to the even mantissa, sign kept.
pub fn e2m1_round(y: f32) -> f32 {
    if y.is_nan() {
        return y;
    }
    let a = y.abs();
    let hi = E2M1_GRID.partition_point(|&g| g <= a); // first grid value above a
    let m = if hi == 0 {
        0.0
    } else if hi == E2M1_GRID.len() {
        E2M1_GRID[hi - 1]
    } else {
        let lo = hi - 1;
        let (dl, dh) = (a - E2M1_GRID[lo], E2M1_GRID[hi] - a);
        E2M1_GRID[if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi }]
    };
    if y.is_sign_negative() {
        -m
    } else {
        m
    }
}

/// The normalised Walsh–Hadamard transform of `row` in place: `row · H_d · d^(-1/2)`, with
/// `H_d` Sylvester's matrix in natural order (`H_1 = [1]`, `H_2n = [[H, H], [H, −H]]`) and the
/// scale `d^(-1/2)` rounded to f32 (official `rotate_activation`: `hadamard_transform(x,
/// scale=d ** -0.5)`). A width `d` that is not a power of two is zero-padded to the next one and
/// the first `d` outputs kept, as `fast_hadamard_transform` does (V4's indexer heads are 128
/// wide; only toy configs need it). Butterflies in f32, then the scale.
pub fn hadamard_row(row: &mut [f32]) {
    let d = row.len();
    if d == 0 {
        return;
    }
    let p = d.next_power_of_two();
    let mut padded;
    let x: &mut [f32] = if p == d {
        row
    } else {
        padded = vec![0f32; p];
        padded[..d].copy_from_slice(row);
        &mut padded
    };
    let mut h = 1;
    while h < p {
        for i in (0..p).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    if p == d {
        x.iter_mut().for_each(|v| *v *= scale);
    } else {
        let out: Vec<f32> = x[..d].iter().map(|v| v * scale).collect();
        row.copy_from_slice(&out);
    }
}

fn pow2(e: i32) -> f32 {
    (e as f64).exp2() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e2m1_value_and_tie() {
        for (i, &g) in E2M1_GRID.iter().enumerate() {
            assert_eq!(e2m1_round(g), g);
            assert_eq!(e2m1_round(-g).to_bits(), (-g).to_bits());
            if i + 1 < E2M1_GRID.len() {
                let mid = (g + E2M1_GRID[i + 1]) / 2.0;
                let even = if i % 2 == 0 { g } else { E2M1_GRID[i + 1] };
                assert_eq!(e2m1_round(mid), even, "tie at {mid}");
                assert_eq!(e2m1_round(-mid), -even);
                assert_eq!(e2m1_round(mid.next_down()), g, "below {mid}");
                assert_eq!(e2m1_round(mid.next_up()), E2M1_GRID[i + 1], "above {mid}");
            }
        }
        // The ties the module docs list, by value.
        for (y, want) in [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)] {
            assert_eq!(e2m1_round(y), want, "{y}");
        }
        assert!(e2m1_round(f32::NAN).is_nan());
    }

    #[test]
    fn scale_exponents_are_the_smallest_that_fit() {
        assert_eq!(fp4_scale_exponent(6.0), 0);
        assert_eq!(fp4_scale_exponent(6.0f32.next_up()), 1);
        assert_eq!(fp4_scale_exponent(3.0), -1);
        assert_eq!(fp4_scale_exponent(0.0), -126);
        assert_eq!(fp4_scale_exponent(f32::NAN), 0);
        assert_eq!(fp8_scale_exponent(448.0), 0);
        assert_eq!(fp8_scale_exponent(448.0f32.next_up()), 1);
        assert_eq!(fp8_scale_exponent(0.0), -22); // the 1e-4 floor: 1e-4 / 448 ≈ 2^-22.09
    }

    #[test]
    fn e4m3_blocks_scale_each_block_by_its_own_amax() {
        // Block 0's amax 448·2^-3 → e = -3: values are e4m3 codes times 1/8. Block 1 is partial.
        let mut row: Vec<f32> =
            (0..130).map(|i| if i < 128 { (i as f32 - 64.0) * 0.875 } else { 1.0 + i as f32 }).collect();
        let orig = row.clone();
        fake_quant_row(&mut row, FakeQuant::LINEAR_INPUT);
        let s0 = 2f32.powi(fp8_scale_exponent(56.0));
        assert_eq!(s0, 0.125);
        for i in 0..128 {
            let want = e4m3_to_f32(e4m3_encode(orig[i] / s0)) * s0;
            assert_eq!(row[i], want, "value {i}");
        }
        // Block 1 = [129, 130], partial: e = -1 (130 ≤ 224).
        let s1 = 2f32.powi(fp8_scale_exponent(130.0));
        assert_eq!(s1, 0.5);
        assert_eq!(row[128], e4m3_to_f32(e4m3_encode(129.0 / s1)) * s1);
        assert_eq!(row[129], e4m3_to_f32(e4m3_encode(130.0 / s1)) * s1);
        // Idempotent: quantised values quantise to themselves.
        let again = {
            let mut r = row.clone();
            fake_quant_row(&mut r, FakeQuant::LINEAR_INPUT);
            r
        };
        assert_eq!(again, row);
    }

    #[test]
    fn e2m1_blocks_use_their_amax_and_keep_signs() {
        let mut row = vec![6.0f32, -3.0, 0.7, 0.2, -0.0, 1.3];
        fake_quant_row(&mut row, FakeQuant::E2m1 { block: 3 });
        // Block [6, -3, 0.7]: e = 0 → 6, -3, 0.5 (0.7 nearer 0.5). Block [0.2, -0, 1.3]: amax 1.3
        // → e = -2 (1.3 ≤ 1.5): 0.2·4 = 0.8 → 1 → 0.25; 1.3·4 = 5.2 → 6 → 1.5.
        assert_eq!(row[..3], [6.0, -3.0, 0.5]);
        assert_eq!(row[3], 0.25);
        assert_eq!(row[4].to_bits(), (-0.0f32).to_bits());
        assert_eq!(row[5], 1.5);
    }

    #[test]
    fn hadamard_matches_its_definition() {
        for d in [1usize, 2, 4, 64] {
            // H[i][j] = (-1)^popcount(i & j) in Sylvester's natural order.
            let x: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let mut got = x.clone();
            hadamard_row(&mut got);
            for (j, &g) in got.iter().enumerate() {
                let want: f64 = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if (i & j).count_ones() % 2 == 0 { v as f64 } else { -(v as f64) })
                    .sum::<f64>()
                    * (1.0 / (d as f64).sqrt()) as f32 as f64;
                assert!((g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "d {d}, column {j}");
            }
        }
        // A width that is not a power of two: zero-padded to the next, the first d kept, scaled
        // by d^(-1/2) (fast_hadamard_transform's rule).
        let x = [1.0f32, 2.0, 3.0];
        let mut got = x;
        hadamard_row(&mut got);
        let s = (1.0 / 3f64.sqrt()) as f32;
        // Padded to [1, 2, 3, 0]: columns 0..3 of H_4 give 1+2+3, 1−2+3, 1+2−3.
        assert_eq!(got, [6.0 * s, 2.0 * s, 0.0]);
        // Orthonormal: applying it twice gives the input back (up to rounding of 1/sqrt(2)).
        let mut x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        hadamard_row(&mut x);
        hadamard_row(&mut x);
        x.iter().enumerate().for_each(|(i, &v)| assert!((v - i as f32).abs() < 1e-5, "{i}: {v}"));
    }

    #[test]
    fn kv_rows_are_the_fp8_format_round_trip_and_idempotent() {
        let row: Vec<f32> = (0..200).map(|i| ((i * 7919 % 401) as f32 - 200.0) * 0.013).collect();
        let mut q = row.clone();
        fake_quant_row(&mut q, FakeQuant::KvRow { rope: 8 });
        assert_eq!(q, RowFormat::Fp8 { rope: 8 }.round_trip(&row));
        assert_ne!(q, row);
        // Stored again as fp8 (or as bf16, or f32) the quantised row keeps its values.
        assert_eq!(RowFormat::Fp8 { rope: 8 }.round_trip(&q), q);
        assert_eq!(RowFormat::Bf16.round_trip(&q), q);
    }

    #[test]
    fn nan_stays_nan() {
        for q in [FakeQuant::LINEAR_INPUT, FakeQuant::INDEXER] {
            let mut row = vec![1.0, f32::NAN, 2.0];
            fake_quant_row(&mut row, q);
            assert!(row[1].is_nan());
        }
    }
}
