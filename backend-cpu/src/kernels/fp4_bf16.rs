//! Decode GEMV (one input row) on FP4 e2m1 weights with E8M0 scales per 32 values (the routed
//! experts of DeepSeek V4), for an input of BF16 values (the `bf16` precision), with AVX-512
//! BF16 `vdpbf16ps`.
//!
//! The f32 kernels of [`super::weights`] turn each code into an f32 with a cross-lane table
//! look-up (`vpermps`, 16 values at a time) and multiply-add it: on Zen 4 that runs at about
//! 20 G values/s per core, half the rate at which memory delivers FP4 codes, so the experts of a
//! decode token took twice their share of memory time. Here 32 codes at a time become BF16
//! values with one `vpermw` (a 32-entry table of words), and `vdpbf16ps` multiplies two pairs
//! per f32 lane: per 128 values, three shifts, four `vpermw`, four `vdpbf16ps` and one f32
//! multiply-add by the scales (one thread on Zen 4: 44 G values/s from L2, 30-33 from memory).
//!
//! # Layout
//!
//! A 64-byte load holds 128 values as 32 words; word `w` holds the codes of values `4w .. 4w+3`,
//! one per nibble. Shifted right by `4q`, its low 4 bits are the code of value `4w + q`; `vpermw`
//! reads the low 5 bits of each word, and the table holds the 16 BF16 values twice, so bit 4
//! (the next code's) does not matter. So word vector `q` holds values `4w + q`, and 128-bit lane
//! `L` (words `8L .. 8L+7`) holds values of group `L` only. The input is permuted into the same
//! layout (and narrowed to its BF16 bits) once per call, so each `vdpbf16ps` pairs every weight
//! with its input. The four `vdpbf16ps` of a block sum into a fresh register, whose lane `L`
//! then holds group `L`'s unscaled partial sums; one `vfmadd` by the groups' scales
//! (`2^(e−127)`, built from the four E8M0 bytes with a `vpshufb` and a shift) adds them to the
//! row's accumulator.
//!
//! # Arithmetic
//!
//! Products of an E2M1 value and a BF16 value are exact in f32, and so is the multiplication of a
//! partial sum by a power-of-two scale unless it underflows; `vdpbf16ps` rounds each step like an
//! f32 FMA (see [`super::bf16_gemm`]'s module documentation: odd index of a pair first, BF16
//! denormal inputs and denormal sums flushed to zero). So the result is an f32 dot product of the
//! exact weights and inputs in another summation order than the canonical one of
//! [`super::weights`]: within `k · 2⁻²⁴ · Σ |w · x|` of the exact sum, like it, but not the same
//! bits (apart from denormals: an unscaled partial sum below 2⁻¹²⁶ is flushed to zero before its
//! scale is applied, and a BF16 denormal input counts as zero). This path runs only for BF16 inputs on CPUs with AVX512_BF16, so the `bf16` precision's
//! decode differs in its last bits between such CPUs and the others (the `f32` precision, the
//! reference, is the same on every CPU).

#[cfg(target_arch = "x86_64")]
use super::bf16_gemm;

/// Values per block: one 64-byte load of codes.
const BLOCK: usize = 128;

/// Values per scale (DeepSeek V4's FP4 group).
pub(crate) const GROUP: usize = 32;

/// Whether the kernel can run: x86-64 with AVX-512 F/BW and AVX512_BF16, and `DSV4_CPU_ISA` not
/// lowered below `avx512` (as [`bf16_gemm::available`]).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16_gemm::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[j] = Σ_v W[start + j, v] · x[v]` for `j` in `0..out.len()`, where `W` is `[rows, k]`
/// FP4: `codes` its packed codes (`k / 2` bytes a row, low nibble first), `scales` its E8M0 bytes
/// (`k / 32` a row), and `x` holds `k` BF16 values as f32 (low 16 bits zero: a `debug_assert`).
///
/// Returns `false`, leaving `out` untouched, when the kernel does not apply: not [`available`],
/// or `k` not a multiple of 128. Whether it applies depends on the weight's shape only, never on
/// its values or on which rows are asked for, so a row gets the same bits however a caller splits
/// the rows into calls. Panics if the slices are too short for rows `start..start + out.len()` or
/// `x.len() != k`.
pub(crate) fn gemv(codes: &[u8], scales: &[u8], k: usize, start: usize, x: &[f32], out: &mut [f32]) -> bool {
    let n = out.len();
    assert_eq!(x.len(), k, "fp4_bf16::gemv: an input of {} values for rows of {k}", x.len());
    assert!(codes.len() >= (start + n) * k / 2, "fp4_bf16::gemv: codes too short for rows ..{}", start + n);
    assert!(scales.len() >= (start + n) * k / GROUP, "fp4_bf16::gemv: scales too short for rows ..{}", start + n);
    if !available() || !k.is_multiple_of(BLOCK) {
        return false;
    }
    let row_scales = &scales[start * k / GROUP..(start + n) * k / GROUP];
    // Scale bytes the shift does not build (0 is 2⁻¹²⁷, a subnormal; 255 is NaN) take a fix-up
    // per block; it changes only their lanes, so both variants give the same bits.
    // (`fold`, not `any`: no early exit, so the compiler vectorises the scan.)
    let special = row_scales.iter().fold(false, |sp, &b| sp | (b == 0) | (b == 255));
    debug_assert!(x.iter().all(|v| v.to_bits() & 0xFFFF == 0), "fp4_bf16::gemv: the input is not BF16");
    let xp = permute_input(x);
    #[cfg(target_arch = "x86_64")]
    {
        let codes = &codes[start * k / 2..(start + n) * k / 2];
        // SAFETY: `available` checked AVX-512 F/BW and AVX512_BF16; the slices hold `n` rows of
        // `k / 2` codes and `k / 32` scales, `xp` holds `k` values, `k` is a multiple of 128.
        unsafe {
            if special {
                x86::rows::<true>(codes, row_scales, k, &xp, out)
            } else {
                x86::rows::<false>(codes, row_scales, k, &xp, out)
            }
        };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (xp, special);
        false
    }
}

/// The position in a block of the value that word `w` of lane `lane` in word vector `i` holds
/// (module documentation): word `8 · lane + w` of the load, nibble `i`.
const fn value_at(i: usize, lane: usize, w: usize) -> usize {
    4 * (8 * lane + w) + i
}

/// For each position `32 i + 8 L + w` of a block in the kernel's layout, the value it holds.
const LAYOUT: [u8; BLOCK] = {
    let mut t = [0u8; BLOCK];
    let mut p = 0;
    while p < BLOCK {
        t[p] = value_at(p / 32, p % 32 / 8, p % 8) as u8;
        p += 1;
    }
    t
};

/// The input's BF16 bits in the kernel's layout ([`LAYOUT`], block by block).
fn permute_input(x: &[f32]) -> Vec<u16> {
    let mut xp = vec![0u16; x.len()];
    for (xb, pb) in x.chunks_exact(BLOCK).zip(xp.chunks_exact_mut(BLOCK)) {
        for (o, &v) in pb.iter_mut().zip(&LAYOUT) {
            *o = (xb[v as usize].to_bits() >> 16) as u16;
        }
    }
    xp
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use dsv4_core::quant::E2M1_TO_F32;

    use super::{BLOCK, GROUP};

    /// The same 512 bits as BF16 pairs.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F.
    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        // SAFETY: `__m512i` and `__m512bh` are both 512-bit vectors; every bit pattern is valid.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The constants of [`block`].
    #[derive(Clone, Copy)]
    struct Consts {
        table: __m512i,
        pick: __m512i,
    }

    /// One block of 128 values of a row: `acc + Σ_groups scale · Σ w · x` lane by lane.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F/BW and AVX512_BF16; `c` is valid for 64 bytes, `sc` for 4,
    /// `x` for 128 values.
    #[inline(always)]
    unsafe fn block<const FIX: bool>(c: *const u8, sc: *const u8, x: *const u16, k: Consts, acc: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe {
            let c = _mm512_loadu_si512(c.cast());
            // Word `w` holds the codes of values 4w .. 4w + 3, one per nibble; `vpermw` reads the
            // low 5 bits of each word, and the table repeats its 16 entries, so bit 4 (the next
            // nibble's) does not matter.
            let w0 = _mm512_permutexvar_epi16(c, k.table);
            let w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), k.table);
            let w2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 8), k.table);
            let w3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 12), k.table);
            let mut p = _mm512_dpbf16_ps(_mm512_setzero_ps(), bh(w0), bh(_mm512_loadu_si512(x.cast())));
            p = _mm512_dpbf16_ps(p, bh(w1), bh(_mm512_loadu_si512(x.add(32).cast())));
            p = _mm512_dpbf16_ps(p, bh(w2), bh(_mm512_loadu_si512(x.add(64).cast())));
            p = _mm512_dpbf16_ps(p, bh(w3), bh(_mm512_loadu_si512(x.add(96).cast())));
            let e = _mm512_shuffle_epi8(_mm512_set1_epi32(sc.cast::<i32>().read_unaligned()), k.pick);
            let mut s = _mm512_slli_epi32(e, 23);
            if FIX {
                // Byte 0: 2⁻¹²⁷ (bits 0x0040_0000); byte 255: NaN (0x7FC0_0000), as the tables.
                s = _mm512_mask_mov_epi32(
                    s,
                    _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                    _mm512_set1_epi32(0x0040_0000),
                );
                s = _mm512_mask_mov_epi32(
                    s,
                    _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)),
                    _mm512_set1_epi32(0x7FC0_0000),
                );
            }
            _mm512_fmadd_ps(p, _mm512_castsi512_ps(s), acc)
        }
    }

    /// Every row: `out[r] = Σ_v W[r, v] · x[v]` (`codes`, `scales` and `out` hold the same rows),
    /// two rows at a time (two independent chains, one read of the input for both).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F/BW and AVX512_BF16; `k` is a multiple of 128, `codes` holds
    /// `out.len() · k / 2` bytes, `scales` `out.len() · k / 32` bytes (with `FIX` if any is 0 or
    /// 255), and `xp` `k` values in the layout of `permute_input`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn rows<const FIX: bool>(codes: &[u8], scales: &[u8], k: usize, xp: &[u16], out: &mut [f32]) {
        // SAFETY: register and in-bounds memory operations with this function's features; every
        // pointer below stays inside its slice (block `t < k / 128` of row `r < out.len()`).
        unsafe {
            // In lane L, every 32-bit lane takes byte L of the broadcast scale dword, zero-extended
            // (a control byte with bit 7 set writes a zero).
            let pick: [u32; 16] = std::array::from_fn(|i| 0x8080_8000 | (i / 4) as u32);
            let consts = Consts {
                table: {
                    // Each e2m1 value's BF16 bits (the high half of its f32, exact), twice.
                    let t: [u16; 32] = std::array::from_fn(|i| (E2M1_TO_F32[i % 16].to_bits() >> 16) as u16);
                    _mm512_loadu_si512(t.as_ptr().cast())
                },
                pick: _mm512_loadu_si512(pick.as_ptr().cast()),
            };
            let blocks = k / BLOCK;
            let (c, s, x) = (codes.as_ptr(), scales.as_ptr(), xp.as_ptr());
            let (cr, sr) = (k / 2, k / GROUP);
            // Rows i and i + n/2 together: two distant rows are two sequential streams, which
            // the hardware prefetchers follow; two adjacent rows read in turn are one zig-zagging
            // stream that they do not (adjacent pairs ran at 21 G values/s from memory instead of
            // 27, one row at a time).
            let h = out.len() / 2;
            for i in 0..h {
                let (r0, r1) = (i, i + h);
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for t in 0..blocks {
                    let xt = x.add(BLOCK * t);
                    a0 = block::<FIX>(c.add(r0 * cr + 64 * t), s.add(r0 * sr + 4 * t), xt, consts, a0);
                    a1 = block::<FIX>(c.add(r1 * cr + 64 * t), s.add(r1 * sr + 4 * t), xt, consts, a1);
                }
                out[r0] = _mm512_reduce_add_ps(a0);
                out[r1] = _mm512_reduce_add_ps(a1);
            }
            if out.len() % 2 == 1 {
                let r = out.len() - 1;
                let mut a = _mm512_setzero_ps();
                for t in 0..blocks {
                    a = block::<FIX>(c.add(r * cr + 64 * t), s.add(r * sr + 4 * t), x.add(BLOCK * t), consts, a);
                }
                out[r] = _mm512_reduce_add_ps(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_core::quant::{e8m0_to_f32_unchecked, E2M1_TO_F32};
    use dsv4_core::test_data::Rng;

    /// Whether the kernel runs here; if not, says so (the other checks still run).
    fn runs(test: &str) -> bool {
        let a = available();
        if !a {
            eprintln!("{test}: no AVX512_BF16 here (or DSV4_CPU_ISA below avx512): only checked that gemv declines");
        }
        a
    }

    fn code(codes: &[u8], k: usize, r: usize, v: usize) -> usize {
        ((codes[r * k / 2 + v / 2] >> (4 * (v % 2))) & 0xF) as usize
    }

    /// The f64 sum and the sum of magnitudes of row `r` times `x`.
    fn reference(codes: &[u8], scales: &[u8], k: usize, r: usize, x: &[f32]) -> (f64, f64) {
        (0..k).fold((0.0, 0.0), |(s, a), v| {
            let w = E2M1_TO_F32[code(codes, k, r, v)] as f64
                * e8m0_to_f32_unchecked(scales[r * k / GROUP + v / GROUP]) as f64;
            let p = w * x[v] as f64;
            (s + p, a + p.abs())
        })
    }

    fn bf16(v: f32) -> f32 {
        dsv4_core::precision::round_bf16(v)
    }

    #[test]
    fn layout_is_a_permutation_of_each_block() {
        let mut seen = [false; BLOCK];
        for i in 0..4 {
            for lane in 0..4 {
                for w in 0..8 {
                    assert!(!std::mem::replace(&mut seen[value_at(i, lane, w)], true));
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// What the kernel reads, modelled in scalar code (so it runs on every CPU): word `8L + w`
    /// of a 64-byte block, shifted right by `4i`, has in its low 4 bits the code of the value
    /// `value_at(i, L, w)` that the input layout puts at word `w` of lane `L` in vector `i`.
    #[test]
    fn the_words_the_kernel_reads_hold_the_layouts_values() {
        let codes: Vec<u8> = (0..BLOCK / 2).map(|i| (i as u8).wrapping_mul(73).wrapping_add(5)).collect();
        for i in 0..4 {
            for lane in 0..4 {
                for w in 0..8 {
                    let word = u16::from_le_bytes([codes[2 * (8 * lane + w)], codes[2 * (8 * lane + w) + 1]]);
                    let v = value_at(i, lane, w);
                    assert_eq!(
                        ((word >> (4 * i)) & 0xF) as usize,
                        code(&codes, BLOCK, 0, v),
                        "vector {i} lane {lane} word {w}"
                    );
                    assert_eq!(LAYOUT[32 * i + 8 * lane + w] as usize, v);
                }
            }
        }
    }

    /// Integer inputs and scales near 1 keep every partial sum exact, so any pairing of a weight
    /// with the wrong input or scale shows as a different result.
    #[test]
    fn exact_sums_match_the_reference_exactly() {
        let run = runs("exact_sums_match_the_reference_exactly");
        let mut rng = Rng(7);
        for k in [128, 256, 1024] {
            let n = 5;
            let codes: Vec<u8> = (0..n * k / 2).map(|_| rng.next_u64() as u8).collect();
            let scales: Vec<u8> = (0..n * k / GROUP).map(|_| 124 + (rng.next_u64() % 7) as u8).collect();
            let x: Vec<f32> = (0..k).map(|_| (rng.next_u64() % 9) as f32 - 4.0).collect();
            let mut out = vec![f32::NAN; n];
            assert_eq!(gemv(&codes, &scales, k, 0, &x, &mut out), run);
            if !run {
                continue;
            }
            for (r, &o) in out.iter().enumerate() {
                assert_eq!(o as f64, reference(&codes, &scales, k, r, &x).0, "k {k} row {r}");
            }
        }
    }

    /// Random BF16 inputs and a wide range of scales: within the f32 dot-product bound.
    #[test]
    fn random_rows_are_within_the_dot_product_bound() {
        let run = runs("random_rows_are_within_the_dot_product_bound");
        let mut rng = Rng(11);
        let (n, k) = (9, 2048);
        let codes: Vec<u8> = (0..n * k / 2).map(|_| rng.next_u64() as u8).collect();
        // Scales 2⁻³⁷ to 2⁷³: far apart, far from overflow.
        let scales: Vec<u8> = (0..n * k / GROUP).map(|_| 90 + (rng.next_u64() % 111) as u8).collect();
        let x: Vec<f32> = rng.vec(k).into_iter().map(bf16).collect();
        let start = 3;
        let mut out = vec![f32::NAN; n - start];
        assert_eq!(gemv(&codes, &scales, k, start, &x, &mut out), run);
        if !run {
            return;
        }
        for (j, &o) in out.iter().enumerate() {
            let (exact, mag) = reference(&codes, &scales, k, start + j, &x);
            let bound = k as f64 * 2f64.powi(-24) * mag;
            assert!((o as f64 - exact).abs() <= bound, "row {}: {o} vs {exact} (bound {bound})", start + j);
        }
    }

    /// Scale bytes 0 (2⁻¹²⁷) and 255 (NaN) are decoded as the tables decode them, and a row's
    /// bits do not depend on the other rows of the call (with or without such bytes among them).
    #[test]
    fn special_scale_bytes_and_row_independence() {
        let run = runs("special_scale_bytes_and_row_independence");
        let (n, k) = (3, 256);
        let mut rng = Rng(5);
        let codes: Vec<u8> = (0..n * k / 2).map(|_| rng.next_u64() as u8).collect();
        let x: Vec<f32> = (0..k).map(|_| (rng.next_u64() % 9) as f32 - 4.0).collect();
        let mut scales = vec![127u8; n * k / GROUP];
        // Row 0 all 2⁻¹²⁷: its sum is 2⁻¹²⁷ times an exact sum, exact even where subnormal.
        scales[..k / GROUP].fill(0);
        scales[2 * k / GROUP + 1] = 255; // row 2, group 1: NaN
        let mut all = vec![0f32; n];
        assert_eq!(gemv(&codes, &scales, k, 0, &x, &mut all), run);
        if !run {
            return;
        }
        assert_eq!(all[0] as f64, reference(&codes, &scales, k, 0, &x).0);
        assert_ne!(all[0], 0.0);
        assert!(all[2].is_nan());
        // Row 1 alone (no special byte in the call) and with its neighbours: the same bits.
        let mut one = [0f32];
        assert!(gemv(&codes, &scales, k, 1, &x, &mut one));
        assert_eq!(one[0].to_bits(), all[1].to_bits());
        assert_eq!(all[1] as f64, reference(&codes, &scales, k, 1, &x).0);
    }

    #[test]
    fn declines_rows_that_are_not_whole_blocks() {
        let k = 96;
        assert!(!gemv(&[0u8; 48], &[127u8; 3], k, 0, &[1.0; 96], &mut [0.0]));
    }
}
