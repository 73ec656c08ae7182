//! RMSNorm of one row (spec §B's preamble: `x · 1/sqrt(mean(x²) + eps)`, times the gain when
//! given), with the arithmetic the CPU backend has always used: the squares summed in f64 into
//! 8 partial sums (`s[j mod 8]`, each `+= v·v` in f64, multiply then add), combined as
//! `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`; the reciprocal root in f64, rounded to
//! f32; then `v · r` (and `g · (v · r)`) in f32. (Eight sums, not one: one f64 chain of
//! dependent additions took 4 cycles a value.)
//!
//! The portable source is compiled inside `#[target_feature]` copies for AVX-512 and AVX2, where
//! the 8 f64 sums are one or two vector registers and the products 16 or 8 lanes wide; the
//! baseline build (SSE2) ran them two f64 a time (0.9 ms for the `[512, 4096]` norm of mHC's
//! `hc_pre` in a 512-token prefill, 9 GB/s). Rust never contracts `a·b + c` into an FMA, so
//! every copy gives the portable bits.

use super::Isa;

/// `out = rms_norm(row)`, times `gain` elementwise when given.
///
/// Panics if the lengths differ, or if the CPU does not support `isa`.
pub(crate) fn rms_norm_row(isa: Isa, row: &[f32], gain: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert!(
        row.len() == out.len() && gain.is_none_or(|g| g.len() == row.len()),
        "rms_norm: a row of {} values, {} outputs, a gain of {:?}",
        row.len(),
        out.len(),
        gain.map(<[f32]>::len)
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "rms_norm: this CPU does not support avx512");
            // SAFETY: AVX-512 F (and the AVX2 set under it) checked just above.
            unsafe { x86::rms_norm_avx512(row, gain, eps, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "rms_norm: this CPU does not support avx2");
            // SAFETY: AVX2 and FMA checked just above.
            unsafe { x86::rms_norm_avx2(row, gain, eps, out) }
        }
        _ => rms_norm_any(row, gain, eps, out),
    }
}

/// `mean(row²)` in f64, as [`rms_norm_row`] computes it on `isa` (for the tests: the f32
/// output alone would hide a change of the f64 summation order).
#[cfg(test)]
fn mean_square(isa: Isa, row: &[f32]) -> f64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tests call it only for sets the CPU supports.
        Isa::Avx512 => unsafe { x86::mean_square_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::mean_square_avx2(row) },
        _ => mean_square_any(row),
    }
}

#[inline(always)]
fn mean_square_any(row: &[f32]) -> f64 {
    sum_of_squares_f64(row) / row.len() as f64
}

#[inline(always)]
fn sum_of_squares_f64(row: &[f32]) -> f64 {
    let mut s = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in s.iter_mut().zip(c) {
            *s += (v as f64) * (v as f64);
        }
    }
    for (s, &v) in s.iter_mut().zip(chunks.remainder()) {
        *s += (v as f64) * (v as f64);
    }
    ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]))
}

#[inline(always)]
fn rms_norm_any(row: &[f32], gain: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let ms = mean_square_any(row);
    let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
    match gain {
        Some(g) => out.iter_mut().zip(row).zip(g).for_each(|((o, &v), &g)| *o = g * (v * r)),
        None => out.iter_mut().zip(row).for_each(|(o, &v)| *o = v * r),
    }
}

/// The portable row compiled with AVX-512 and with AVX2 (see the module docs).
#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    ///
    /// The CPU supports AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rms_norm_avx512(row: &[f32], gain: Option<&[f32]>, eps: f32, out: &mut [f32]) {
        super::rms_norm_any(row, gain, eps, out)
    }

    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rms_norm_avx2(row: &[f32], gain: Option<&[f32]>, eps: f32, out: &mut [f32]) {
        super::rms_norm_any(row, gain, eps, out)
    }

    /// # Safety
    ///
    /// The CPU supports AVX-512 F, AVX2 and FMA.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn mean_square_avx512(row: &[f32]) -> f64 {
        super::mean_square_any(row)
    }

    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn mean_square_avx2(row: &[f32]) -> f64 {
        super::mean_square_any(row)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{bits, spread};
    use super::*;

    /// Every instruction set this CPU supports gives the portable bits, of the f64 mean square
    /// (where a change of the summation order shows; the f32 outputs mostly hide it) and of the
    /// outputs (lengths 1 to 40, so every tail of 8 and 16, and two long rows; values far apart
    /// in magnitude; with and without a gain); and the portable row is the definition, summed
    /// as the module docs say.
    #[test]
    fn every_isa_gives_the_portable_bits() {
        let mut val = spread(0x2545_f491, 15);
        for len in (1..=40).chain([1000, 4096]) {
            let row: Vec<f32> = (0..len).map(|_| val()).collect();
            let gain: Vec<f32> = (0..len).map(|_| val()).collect();
            for g in [None, Some(&gain[..])] {
                let mut want = vec![0f32; len];
                rms_norm_row(Isa::Scalar, &row, g, 1e-6, &mut want);
                let mut parts = [0f64; 8];
                row.iter().enumerate().for_each(|(j, &v)| parts[j % 8] += (v as f64) * (v as f64));
                let p = &parts;
                let ms = (((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))) / len as f64;
                let r = (1.0 / (ms + 1e-6f32 as f64).sqrt()) as f32;
                for (j, &w) in want.iter().enumerate() {
                    let d = row[j] * r;
                    assert_eq!(w.to_bits(), g.map_or(d, |g| g[j] * d).to_bits(), "len {len}, value {j}");
                }
                for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                    assert_eq!(mean_square(isa, &row).to_bits(), ms.to_bits(), "{} len {len}", isa.name());
                    let mut got = vec![f32::NAN; len];
                    rms_norm_row(isa, &row, g, 1e-6, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{} len {len}", isa.name());
                }
            }
        }
    }
}
