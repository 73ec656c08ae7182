//! Decode GEMV (one input row) on FP4 e2m1 weights with E8M0 scales per 32 values (the routed
//! experts of DeepSeek V4), for an f32 input, in the canonical summation order of
//! [`super::weights`]: the same bits as every other path, on every CPU.
//!
//! The general one-row path (`weights::pair`) builds each row's [`super::Row`] (its scales
//! widened to f32), and per 32-value group calls `Decode::scale`, which multiplies the 16-entry
//! E2M1 table by the group's scale; on Zen 4 that bookkeeping cost as much as the decode and
//! the multiply-adds (a 512-row expert matrix ran at about 11 G values/s a thread, 14 cycles
//! per two rows' groups where the vector work takes about 8). Here the rows are walked directly
//! on the stored codes and E8M0 bytes, two at a time (row `i` with row `i + n/2`: two sequential
//! streams), and a group's table is one of 256 made once ([`tables`]): for scale byte `b`,
//! `E2M1(c) · 2^(b−127)` for the 16 codes `c`, each the f32 product the canonical decode
//! computes (`E2M1_TO_F32[c] · scale`, one rounding), so the values, the `fma`s per lane and
//! their order are those of [`super::weights`]'s definition.
//!
//! Per group and row, the decode of the general path's split layout (the functions of
//! `Decode::chunk_split` in `x86.rs`, `fp4_split_avx2` / `fp4_split_avx512`), with the group's
//! table loaded instead of computed: the 16 code bytes widened to 32-bit lanes, the low nibbles
//! (the even values) and the high ones (the odd values, after a shift) looked up with `vpermps`
//! (AVX-512: one 16-entry look-up; AVX2: the 8 positive entries, and the sign bit XORed into
//! the result). The input is permuted into the split layout (`weights::split_input`) once per
//! call; the multiply-adds and the reduction of that layout are the lanes' own
//! (`weights::Lanes::fma` and `reduce_split`).

use dsv4_core::quant::{e8m0_to_f32_unchecked, E2M1_TO_F32};

use super::weights::{Fp4Groups, LANES};

/// Values per scale.
const GROUP: usize = 32;

/// For every E8M0 scale byte `b`, the 16 E2M1 values times `2^(b−127)` (`b` = 0: 2⁻¹²⁷; 255:
/// NaN, as [`e8m0_to_f32_unchecked`] decodes it for the general path), each one f32 multiply as
/// the canonical decode does it (16 KB).
fn tables() -> &'static [[f32; 16]; 256] {
    static TABLES: std::sync::OnceLock<Box<[[f32; 16]; 256]>> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new([[0f32; 16]; 256]);
        for (b, row) in t.iter_mut().enumerate() {
            let scale = e8m0_to_f32_unchecked(b as u8);
            for (v, &e) in row.iter_mut().zip(&E2M1_TO_F32) {
                *v = e * scale;
            }
        }
        t
    })
}

/// `out[j] = W[start + j] · x` for `j` in `0..n` (`out.len() == n`), where `W` is the FP4
/// matrix `m`, in the canonical order (the bits of `weights::dot_rows` row by row), on the
/// lanes of `isa` (AVX2 or AVX-512).
///
/// Returns `false`, leaving `out` untouched, when the kernel does not apply: `k` not a multiple
/// of 32, or `isa` neither of those. Whether it applies depends on the matrix's shape only.
/// Panics if the slices are too short for rows `start..start + n` or `x.len() != k`.
///
/// # Safety
///
/// The CPU supports `isa`.
pub(crate) unsafe fn rows(isa: super::Isa, m: Fp4Groups, start: usize, n: usize, x: &[f32], out: &mut [f32]) -> bool {
    let k = m.k;
    if !k.is_multiple_of(LANES) {
        return false;
    }
    assert_eq!(out.len(), n, "fp4_f32::rows: {n} rows into {} outputs", out.len());
    assert_eq!(x.len(), k, "fp4_f32::rows: an input of {} values for rows of {k}", x.len());
    assert!(m.codes.len() >= (start + n) * k / 2, "fp4_f32::rows: codes too short for rows ..{}", start + n);
    assert!(m.scales.len() >= (start + n) * k / GROUP, "fp4_f32::rows: scales too short for rows ..{}", start + n);
    #[cfg(target_arch = "x86_64")]
    {
        use super::Isa;
        if !matches!(isa, Isa::Avx2 | Isa::Avx512) {
            return false;
        }
        let mut xp = Vec::with_capacity(k);
        super::weights::split_input(x, &mut xp);
        let codes = &m.codes[start * k / 2..(start + n) * k / 2];
        let scales = &m.scales[start * k / GROUP..(start + n) * k / GROUP];
        // SAFETY: the caller guarantees `isa`; the slices hold `n` rows of `k / 2` codes and
        // `k / 32` scale bytes, `xp` holds `k` values, and `k` is a multiple of 32.
        unsafe {
            if isa == Isa::Avx512 {
                x86::rows_avx512(codes, scales, k, &xp, tables(), out)
            } else {
                x86::rows_avx2(codes, scales, k, &xp, tables(), out)
            }
        };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, start, tables);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::prefetch;
    use super::super::weights::Lanes;
    use super::super::x86::{fp4_split_avx2, fp4_split_avx512, Avx2, Avx512};
    use super::GROUP;

    /// The group decode of one instruction set's lanes; the multiply-adds and the reduction are
    /// [`Lanes`]'.
    ///
    /// # Safety
    ///
    /// Every method may only run on a CPU with the instruction set of the implementing type.
    trait Fp4Lanes: Lanes {
        /// One group's 32 values in the split layout: codes at `c` (16 bytes), table at `t`
        /// (16 values).
        unsafe fn group(c: *const u8, t: *const f32) -> Self::W;
    }

    impl Fp4Lanes for Avx512 {
        #[inline(always)]
        unsafe fn group(c: *const u8, t: *const f32) -> Self::W {
            // SAFETY: AVX-512 F (trait contract); 16 code bytes at `c`, 16 values at `t`.
            unsafe { fp4_split_avx512(c, _mm512_loadu_ps(t)) }
        }
    }

    impl Fp4Lanes for Avx2 {
        #[inline(always)]
        unsafe fn group(c: *const u8, t: *const f32) -> Self::W {
            // SAFETY: AVX2 (trait contract); 16 code bytes at `c`, 16 values at `t` (the 8
            // positive entries first: the negative ones are their negations).
            unsafe { fp4_split_avx2(c, _mm256_loadu_ps(t)) }
        }
    }

    /// Every row of `codes` / `scales` (`out.len()` rows of `k` values) against `xp`, the input
    /// in the split layout, on lanes `L`; see [`super::rows`].
    ///
    /// # Safety
    ///
    /// The CPU supports `L`; `k` is a multiple of 32, `codes` holds `out.len() · k / 2` bytes,
    /// `scales` `out.len() · k / 32` bytes and `xp` `k` values.
    #[inline(always)]
    unsafe fn walk<L: Fp4Lanes>(
        codes: &[u8],
        scales: &[u8],
        k: usize,
        xp: &[f32],
        tables: &[[f32; 16]; 256],
        out: &mut [f32],
    ) {
        let groups = k / GROUP;
        let (c, s, x, t) = (codes.as_ptr(), scales.as_ptr(), xp.as_ptr(), tables.as_ptr().cast::<f32>());
        // SAFETY: the caller guarantees `L`; every pointer below stays inside its slice: group
        // `g < groups` of row `r < out.len()` has its codes at `r·k/2 + 16g`, its scale byte at
        // `r·groups + g`, its input at `32g`, and a scale byte indexes one of the 256 tables.
        unsafe {
            // (A macro, not a closure: a closure would not get the caller's target features, and
            // the intrinsics inside would become calls.)
            macro_rules! group {
                ($r:expr, $g:expr, $acc:expr) => {{
                    let (r, g) = ($r, $g);
                    let w = L::group(c.add(r * k / 2 + 16 * g), t.add(16 * *s.add(r * groups + g) as usize));
                    L::fma(w, x.add(GROUP * g), $acc)
                }};
            }
            // Row i with row i + n/2: two sequential streams (see `weights::dot_many_with`).
            let h = out.len() / 2;
            for i in 0..h {
                let (mut a0, mut a1) = (L::zero(), L::zero());
                for g in 0..groups {
                    // The codes of both rows, asked for ahead of the loads ([`super::super::prefetch`]).
                    prefetch::each_line(c.wrapping_add(i * k / 2), 16 * g);
                    prefetch::each_line(c.wrapping_add((i + h) * k / 2), 16 * g);
                    a0 = group!(i, g, a0);
                    a1 = group!(i + h, g, a1);
                }
                out[i] = L::reduce_split(a0);
                out[i + h] = L::reduce_split(a1);
            }
            if out.len() % 2 == 1 {
                let r = out.len() - 1;
                let mut a = L::zero();
                for g in 0..groups {
                    a = group!(r, g, a);
                }
                out[r] = L::reduce_split(a);
            }
        }
    }

    /// [`walk`] with AVX-512.
    ///
    /// # Safety
    ///
    /// As [`walk`], with AVX-512 F/BW/DQ/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn rows_avx512(
        codes: &[u8],
        scales: &[u8],
        k: usize,
        xp: &[f32],
        tables: &[[f32; 16]; 256],
        out: &mut [f32],
    ) {
        // SAFETY: this function's features are `Avx512`'s; the caller guarantees the rest.
        unsafe { walk::<Avx512>(codes, scales, k, xp, tables, out) }
    }

    /// [`walk`] with AVX2.
    ///
    /// # Safety
    ///
    /// As [`walk`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(
        codes: &[u8],
        scales: &[u8],
        k: usize,
        xp: &[f32],
        tables: &[[f32; 16]; 256],
        out: &mut [f32],
    ) {
        // SAFETY: this function's features are `Avx2`'s; the caller guarantees the rest.
        unsafe { walk::<Avx2>(codes, scales, k, xp, tables, out) }
    }
}
