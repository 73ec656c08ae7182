//! One input row against FP8 rows with power-of-two block scales (DeepSeek V4's E8M0 scales),
//! the scale folded into the input: the decode GEMV of every FP8 matrix.
//!
//! Decoding a code to f32 costs more than the multiply-add it feeds ([`super::weights`]'s
//! half trick takes a shuffle, a conversion and a multiply per 16 values). Here a code `b`
//! becomes an f32 by integer operations alone: its sign goes to bit 31 and its exponent and
//! mantissa (`b & 0x7F`) to bits 26..20, i.e. to the bottom of the f32 exponent field and
//! the top of its mantissa. That f32 is `E4M3(b) · 2⁻¹²⁰` exactly, subnormal codes included
//! (they land on f32 subnormals: exact as long as MXCSR's denormals-are-zero flag is off,
//! Rust's default, and taken by the multiply-add at full speed on the Zen 4 we measured; an
//! Intel core may be slower on them, never wrong). The input is multiplied once by `scale · 2¹²⁰` of each block. The product the
//! multiply-add rounds, `(E4M3(b) · 2⁻¹²⁰) · (x · scale · 2¹²⁰)`, is then the same real
//! number as the canonical `(E4M3(b) · scale) · x`, so the bits are those of the canonical
//! order whenever both factors were exact:
//!
//! * `E4M3(b) · scale` is exact when `scale = 2^e` with `-126 ≤ e` (a normal power of two:
//!   the smallest code, `2⁻⁹`, times it is still a multiple of `2⁻¹⁴⁹`);
//! * `x · scale · 2¹²⁰` is exact when `scale · 2¹²⁰` is finite (`e ≤ 7`) and no input value
//!   overflows or loses bits; that is checked value by value (`(x · f) / f == x`).
//!
//! Rows that fail either test, and chunks with NaN codes (`0x7F`, `0xFF`, which the integer
//! decode would turn into 480), go to the general kernels. The NaN test is left out for row
//! blocks found free of NaN codes ([`super::weights::NanFreeBlocks`]).
//!
//! A 32-bit lane holds four codes, value `4p + q` in byte `q` of lane `p`; each byte is
//! moved into place with shifts (16-bit shifts take two bytes a time: five shifts and four
//! masks a chunk, where one 32-bit shift pair per byte took seven; the shifts are what limits
//! the kernel on the Zen 4 we measured, two of its four vector pipes), so a chunk of 32 values
//! decodes into four 8-lane registers `q = 0..3` holding values `q, 4 + q, …, 28 + q` (the
//! *4-way layout*). The input is permuted into the same layout once (per input and thread,
//! [`FoldedPair::take`]), and each fold multiplies the permuted input. The canonical reduction
//! pairs lanes 16, 8 and 4 apart first, which keeps `j mod 4`, so it is the 8-lane tree of each
//! register and then `(r₀ + r₂) + (r₁ + r₃)`.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::weights::{Fp8Blocks, Row, Rows, LANES};

/// The input folded with one row block's scales, in the 4-way layout.
#[derive(Debug, Default)]
struct Folded {
    /// The scales it was folded with (one per block of the row).
    scales: Vec<f32>,
    /// The block size it was folded with.
    block: usize,
    /// `x[j] · scales[j / block] · 2¹²⁰`, permuted chunk by chunk; empty if not exact.
    x: Vec<f32>,
}

/// `2¹²⁰`, the factor between an integer-decoded code and its value.
const TWO_120: f32 = f32::from_bits((127 + 120) << 23);

/// Folds kept per thread: a weight's rows come in blocks of 128 sharing scales, and the
/// two rows of a pair are in at most two blocks.
const KEPT: usize = 4;

/// The value at position `p` of a chunk in the 4-way layout: register `p / 8`, lane `p % 8`.
#[inline(always)]
fn from_four_way(p: usize) -> usize {
    4 * (p % (LANES / 4)) + p / (LANES / 4)
}

impl Folded {
    /// The input folded with `scales` (one per `block` values); `x` empty if the fold is not
    /// exact. `xp` is the input already in the 4-way layout ([`four_way`]): the layout keeps each
    /// value inside its chunk, so inside its block, and the fold is one multiply per value, a
    /// loop the compiler vectorises. (Permuting here, per fold, cost as much as the GEMV's
    /// multiply-adds for a weight whose row blocks all have different scales.)
    fn new(xp: &[f32], scales: &[f32], block: usize) -> Folded {
        let mut folded = Folded { scales: scales.to_vec(), block, x: Vec::new() };
        let Some(factors) = scales.iter().map(|&s| factor(s)).collect::<Option<Vec<f32>>>() else {
            return folded;
        };
        // `xp.len()` is a multiple of 32 and every block a whole number of chunks.
        folded.x.resize(xp.len(), 0.0);
        let mut inexact = false;
        for (b, (xb, out)) in xp.chunks(block).zip(folded.x.chunks_mut(block)).enumerate() {
            let f = factors[b];
            // `1 / f` is a power of two in range, so `y · (1 / f)` is `y / f`.
            let inv = 1.0 / f;
            for (o, &v) in out.iter_mut().zip(xb) {
                let y = v * f;
                inexact |= y * inv != v;
                *o = y;
            }
        }
        if inexact {
            folded.x.clear();
        }
        folded
    }
}

/// `x` (a multiple of 32 values) with every chunk in the 4-way layout.
fn four_way(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    for chunk in x.chunks_exact(LANES) {
        out.extend((0..LANES).map(|p| chunk[from_four_way(p)]));
    }
}

/// Whether two inputs are bit for bit the same (`-0.0` is not `+0.0` here: the folds differ
/// in the sign of zero products). A loop without early exit, which the compiler vectorises.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    if a.len() <= 16 {
        // A row's scales (one per block): a short loop, which the chunked one costs more than.
        return a.len() == b.len() && a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
    }
    a.len() == b.len()
        && a.chunks(64)
            .zip(b.chunks(64))
            .all(|(p, q)| p.iter().zip(q).fold(true, |e, (u, v)| e & (u.to_bits() == v.to_bits())))
}

/// `scale · 2¹²⁰` when `scale` is a power of two `2^e` with `-126 ≤ e ≤ 7`.
fn factor(scale: f32) -> Option<f32> {
    let bits = scale.to_bits();
    let e = (bits >> 23) as i32 - 127;
    (bits & 0x807F_FFFF == 0 && (-126..=7).contains(&e)).then_some(scale * TWO_120)
}

/// The folds of one input, for the pairs of rows of a decode GEMV.
///
/// A `linear` splits a weight into tasks (a few per thread), each a [`super::dot_many`]
/// call, whose rows come from several 128-row blocks; folding the input afresh for each
/// block of each task would cost up to a tenth of the multiply-adds. So the
/// last folds are kept per thread, with the input they were made from, and a call whose
/// input has the same values (compared in full, so a stale fold is never used) starts with
/// them. [`FoldedPair::take`] borrows them from the thread, `Drop` gives them back.
#[derive(Debug, Default)]
pub(crate) struct FoldedPair(Folds);

/// What [`FoldedPair`] keeps (apart, because the thread's cell must hold a type without
/// `Drop`: replacing its value drops the old one).
#[derive(Debug, Default)]
struct Folds {
    /// The input the folds belong to.
    x: Vec<f32>,
    /// `x` in the 4-way layout ([`four_way`]; empty unless `x` is whole chunks).
    xp: Vec<f32>,
    /// Up to [`KEPT`] folds, the oldest replaced first.
    kept: Vec<Folded>,
    next: usize,
}

thread_local! {
    static KEPT_FOLDS: std::cell::Cell<Folds> = std::cell::Cell::new(Folds::default());
}

impl FoldedPair {
    /// This thread's folds, made ready for input `x` (cleared unless they belong to it).
    pub(crate) fn take(x: &[f32]) -> FoldedPair {
        let mut f = KEPT_FOLDS.try_with(|k| k.take()).unwrap_or_default();
        if !same_bits(&f.x, x) {
            f.x.clear();
            f.x.extend_from_slice(x);
            f.xp.clear();
            if x.len().is_multiple_of(LANES) {
                four_way(x, &mut f.xp);
            }
            f.kept.clear();
            f.next = 0;
        }
        FoldedPair(f)
    }

    /// The index of the fold for `scales` (one per `block` values), made if not kept; a
    /// new fold never replaces the one at `keep` (the pair's other row, still to be used).
    fn fold(&mut self, scales: &[f32], block: usize, keep: Option<usize>) -> usize {
        let f = &mut self.0;
        let scales = &scales[..f.x.len().div_ceil(block)];
        if let Some(i) = f.kept.iter().position(|k| k.block == block && same_bits(&k.scales, scales)) {
            return i;
        }
        let new = Folded::new(&f.xp, scales, block);
        if f.kept.len() < KEPT {
            f.kept.push(new);
            return f.kept.len() - 1;
        }
        if Some(f.next) == keep {
            f.next = (f.next + 1) % KEPT;
        }
        let i = f.next;
        f.kept[i] = new;
        f.next = (i + 1) % KEPT;
        i
    }

    /// `(r0 · x, r1 · x)` by the folded kernel, or `None` when it does not apply (rows not
    /// FP8, `k` or the block not whole chunks, a scale or an input the fold is not exact for,
    /// a NaN code; always off x86-64): the caller then uses the general kernels. `x` is the
    /// input of [`FoldedPair::take`].
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA; both rows are checked and their length is that of the
    /// input of [`FoldedPair::take`].
    pub(crate) unsafe fn pair(&mut self, r0: &Row, r1: &Row) -> Option<(f32, f32)> {
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (r0, r1);
            None
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (Row::Fp8 { codes: c0, scales: s0, block: b0 }, Row::Fp8 { codes: c1, scales: s1, block: b1 }) =
                (*r0, *r1)
            else {
                return None;
            };
            let k = self.0.x.len();
            if !k.is_multiple_of(LANES)
                || !b0.is_multiple_of(LANES)
                || !b1.is_multiple_of(LANES)
                || c0.len() != k
                || c1.len() != k
            {
                return None;
            }
            let i0 = self.fold(s0, b0, None);
            if self.0.kept[i0].x.is_empty() {
                return None;
            }
            let i1 = self.fold(s1, b1, Some(i0));
            let (x0, x1) = (&self.0.kept[i0].x, &self.0.kept[i1].x);
            if x1.is_empty() {
                return None;
            }
            // SAFETY: the caller guarantees AVX2 and FMA; codes and folded inputs hold `k`
            // values, a multiple of 32.
            unsafe { x86::pair::<true>(c0.as_ptr(), c1.as_ptr(), x0.as_ptr(), x1.as_ptr(), k) }
        }
    }
}

/// `out[j] = row(start + j) · x` for the `n = out.len()` rows of an FP8 matrix, a block of rows
/// (sharing their scales) at a time: one fold per block, then the folded kernel on the rows'
/// codes in pairs (row `i` with row `i + h` of the block's `2h` rows, two sequential streams),
/// with no per-row set-up (per-row `Row`s, checks and fold look-ups cost about 50 ns a pair,
/// as much as the multiply-adds of two 512-value rows). The same bits as [`FoldedPair::pair`]
/// row by row. Returns `false` (the caller then runs the general path, which gives the same
/// bits; `out` may be partly written) when the fold does not apply: `k` or `block_cols` not
/// whole chunks, a scale or an input value the fold is not exact for, or a NaN code. An odd
/// number of rows in a block ends with its last row alone.
///
/// With `isa` AVX-512 the pairs run through [`x86::pair_avx512`] (the same bits).
///
/// # Safety
///
/// The CPU supports AVX2 and FMA, and `isa` (AVX2 or AVX-512). (Lengths are checked here.)
pub(crate) unsafe fn rows<W: Rows>(
    isa: super::Isa,
    w: &W,
    m: Fp8Blocks,
    start: usize,
    n: usize,
    x: &[f32],
    out: &mut [f32],
) -> bool {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, w, m, start, n, x, out);
        false
    }
    #[cfg(target_arch = "x86_64")]
    {
        let k = m.k;
        assert_eq!(out.len(), n, "fp8_fold::rows: {n} rows into {} outputs", out.len());
        assert!(m.codes.len() >= (start + n) * k, "fp8_fold::rows: codes too short for rows ..{}", start + n);
        if x.len() != k
            || !k.is_multiple_of(LANES)
            || m.block_cols == 0
            || !m.block_cols.is_multiple_of(LANES)
            || m.block_rows == 0
        {
            return false;
        }
        let mut folds = FoldedPair::take(x);
        let mut scales = Vec::new();
        let mut j = 0;
        while j < n {
            let b = (start + j) / m.block_rows;
            let seg = ((b + 1) * m.block_rows - (start + j)).min(n - j);
            scales.clear();
            w.fp8_block_scales(b, &mut scales);
            if scales.len() < k.div_ceil(m.block_cols) {
                return false;
            }
            let i = folds.fold(&scales, m.block_cols, None);
            let xf = &folds.0.kept[i].x;
            if xf.is_empty() {
                return false;
            }
            // Only once the fold applies: a block the fold declines is never scanned.
            let nan_free = m.block_nan_free(b);
            // Row p with row p + h; in an odd segment row h - 1 has no partner and runs as both
            // rows of a pair (the two sums are independent).
            let h = seg.div_ceil(2);
            for p in 0..h {
                let alone = p + h == seg;
                let (r0, r1) = (start + j + p, start + j + if alone { p } else { p + h });
                let (c0, c1) = (m.codes[r0 * k..].as_ptr(), m.codes[r1 * k..].as_ptr());
                // SAFETY: the caller guarantees AVX2, FMA and `isa`; rows r0, r1 < start + n hold `k`
                // codes each (checked above) and the folded input `k` values. (The NaN test is
                // left out only for a block without NaN codes: a matter of the values, not of
                // memory safety.)
                let got = unsafe {
                    match (isa == super::Isa::Avx512, nan_free) {
                        (true, true) => x86::pair_avx512::<false>(c0, c1, xf.as_ptr(), k),
                        (true, false) => x86::pair_avx512::<true>(c0, c1, xf.as_ptr(), k),
                        (false, true) => x86::pair::<false>(c0, c1, xf.as_ptr(), xf.as_ptr(), k),
                        (false, false) => x86::pair::<true>(c0, c1, xf.as_ptr(), xf.as_ptr(), k),
                    }
                };
                match got {
                    Some((a, c)) => {
                        out[j + p] = a;
                        if !alone {
                            out[j + p + h] = c;
                        }
                    }
                    None => return false,
                }
            }
            j += seg;
        }
        true
    }
}

impl Drop for FoldedPair {
    /// Gives the folds back to the thread for its next call.
    fn drop(&mut self) {
        let _ = KEPT_FOLDS.try_with(|k| k.set(std::mem::take(&mut self.0)));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::prefetch;
    use super::super::x86::{e4m3_nan_bytes, reduce8};

    /// The four 8-lane registers of one chunk of 32 codes (module docs). A 16-bit arithmetic
    /// shift right by 4 of a lane's two halves puts byte 3 (of the high half) and byte 1 (of
    /// the low half) each with its sign in the half's bits 15..11 and its exponent and mantissa
    /// in 10..4; the same after a 16-bit shift left by 8 for bytes 2 and 0. The high half is
    /// then in place (bit 31, bits 26..20), the low half is moved there by a 32-bit shift left
    /// by 16, and the mask keeps bit 31 and bits 26..20 (dropping the sign's copies and the
    /// neighbouring byte's bits). The same bits as one 32-bit shift pair per byte
    /// (`decode_is_the_per_byte_shifts` checks every code in every byte).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2.
    #[inline(always)]
    pub(super) unsafe fn decode(w: __m256i) -> [__m256; 4] {
        // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
        unsafe {
            let odd = _mm256_srai_epi16(w, 4);
            let even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 4);
            [masked(_mm256_slli_epi32(even, 16)), masked(_mm256_slli_epi32(odd, 16)), masked(even), masked(odd)]
        }
    }

    /// Bit 31 and bits 26..20 of each lane, as f32 (`E4M3 · 2⁻¹²⁰` of the code placed there).
    /// A named function, not a closure (see `x86.rs`).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2.
    #[inline(always)]
    unsafe fn masked(v: __m256i) -> __m256 {
        // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
        unsafe { _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x87F0_0000u32 as i32))) }
    }

    /// The 8-lane tree of each register, then `(r0 + r2) + (r1 + r3)` (module docs).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX.
    #[inline(always)]
    unsafe fn reduce(a: [__m256; 4]) -> f32 {
        // SAFETY: register-only AVX/SSE operations (the caller guarantees AVX). Written out,
        // not through `array::map` (see `x86.rs` on closures in kernels).
        unsafe { (reduce8(a[0]) + reduce8(a[2])) + (reduce8(a[1]) + reduce8(a[3])) }
    }

    /// Codes `c0`, `c1` (`k` each) against the folded inputs `x0`, `x1`; with `NAN_TEST`,
    /// `None` if a code is a NaN. The two rows' chunks are interleaved, as in the general pair
    /// kernel. Without `NAN_TEST` the codes must hold no NaN for the sums to be right (the
    /// integer decode reads `0x7F` as 480).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA; every pointer is valid for `k` values, `k` a multiple
    /// of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pair<const NAN_TEST: bool>(
        c0: *const u8,
        c1: *const u8,
        x0: *const f32,
        x1: *const f32,
        k: usize,
    ) -> Option<(f32, f32)> {
        // SAFETY: every load reads inside the `k` values the caller guarantees.
        unsafe {
            let (mut a0, mut a1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            let mut bad = _mm256_setzero_si256();
            let mut j = 0;
            while j < k {
                // The codes are asked for ahead of the loads ([`super::super::prefetch`]).
                prefetch::each_line(c0, j);
                prefetch::each_line(c1, j);
                let (w0, w1) = (_mm256_loadu_si256(c0.add(j).cast()), _mm256_loadu_si256(c1.add(j).cast()));
                if NAN_TEST {
                    bad = _mm256_or_si256(bad, _mm256_or_si256(e4m3_nan_bytes(w0), e4m3_nan_bytes(w1)));
                }
                let (d0, d1) = (decode(w0), decode(w1));
                for q in 0..4 {
                    a0[q] = _mm256_fmadd_ps(d0[q], _mm256_loadu_ps(x0.add(j + 8 * q)), a0[q]);
                    a1[q] = _mm256_fmadd_ps(d1[q], _mm256_loadu_ps(x1.add(j + 8 * q)), a1[q]);
                }
                j += 32;
            }
            if _mm256_testz_si256(bad, bad) == 1 {
                Some((reduce(a0), reduce(a1)))
            } else {
                None
            }
        }
    }

    /// [`decode`] on 64 codes: the same shifts and masks, 512 bits wide (each 256-bit half
    /// gets exactly what [`decode`] gives for its 32 codes).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F and BW.
    #[inline(always)]
    unsafe fn decode_512(w: __m512i) -> [__m512; 4] {
        // SAFETY: register-only AVX-512 F/BW operations (the caller guarantees them).
        unsafe {
            let odd = _mm512_srai_epi16(w, 4);
            let even = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 4);
            [
                masked_512(_mm512_slli_epi32(even, 16)),
                masked_512(_mm512_slli_epi32(odd, 16)),
                masked_512(even),
                masked_512(odd),
            ]
        }
    }

    /// [`masked`], 512 bits wide. A named function, not a closure (see `x86.rs`).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F.
    #[inline(always)]
    unsafe fn masked_512(v: __m512i) -> __m512 {
        // SAFETY: register-only AVX-512 F operations (the caller guarantees them).
        unsafe { _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x87F0_0000u32 as i32))) }
    }

    /// [`pair`] for two rows against one folded input `x`, on AVX-512: row `c0`'s chunk in
    /// the low 256 bits of each register and row `c1`'s in the high ones, so that one 512-bit
    /// decode and one 512-bit multiply-add serve both rows, the input's 8 values broadcast to
    /// both halves by the load. Each half's lanes see exactly the multiply-adds of [`pair`],
    /// so the bits are the same. Why: the 256-bit kernel is limited by its shifts and
    /// multiply-adds, which an Intel core runs on two ports at 256 bits and on two (the
    /// shifts: one) at 512; on the 2-vCPU Xeon measured on 2026-12-05 a cached FP8 GEMV
    /// (1024 × 1024) ran at 20 GB/s, below the memory's 26.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F/BW/DQ/VL, AVX2 and FMA; every pointer is valid for `k`
    /// values, `k` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn pair_avx512<const NAN_TEST: bool>(
        c0: *const u8,
        c1: *const u8,
        x: *const f32,
        k: usize,
    ) -> Option<(f32, f32)> {
        // SAFETY: every load reads inside the `k` values the caller guarantees.
        unsafe {
            let mut a = [_mm512_setzero_ps(); 4];
            let mut bad: __mmask64 = 0;
            let mut j = 0;
            while j < k {
                prefetch::each_line(c0, j);
                prefetch::each_line(c1, j);
                let low = _mm512_castsi256_si512(_mm256_loadu_si256(c0.add(j).cast()));
                let w = _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(c1.add(j).cast()));
                if NAN_TEST {
                    // A NaN code is 0x7F or 0xFF: all ones once bit 7 is set.
                    let set = _mm512_or_si512(w, _mm512_set1_epi8(0x80u8 as i8));
                    bad |= _mm512_cmpeq_epi8_mask(set, _mm512_set1_epi8(-1));
                }
                let d = decode_512(w);
                for (q, a) in a.iter_mut().enumerate() {
                    let xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x.add(j + 8 * q)));
                    *a = _mm512_fmadd_ps(d[q], xv, *a);
                }
                j += 32;
            }
            if bad != 0 {
                return None;
            }
            // Written out, not through `array::map` (see `x86.rs` on closures in kernels).
            let low = [
                _mm512_castps512_ps256(a[0]),
                _mm512_castps512_ps256(a[1]),
                _mm512_castps512_ps256(a[2]),
                _mm512_castps512_ps256(a[3]),
            ];
            let high = [
                _mm512_extractf32x8_ps::<1>(a[0]),
                _mm512_extractf32x8_ps::<1>(a[1]),
                _mm512_extractf32x8_ps::<1>(a[2]),
                _mm512_extractf32x8_ps::<1>(a[3]),
            ];
            Some((reduce(low), reduce(high)))
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::Isa;

    fn avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// The scalar reference of one FP8 row: `fma(E4M3(b)·scale, x, acc)` into lane `j % 32`,
    /// then the canonical tree.
    fn reference(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        for (j, (&c, &v)) in codes.iter().zip(x).enumerate() {
            let w = dsv4_core::quant::E4M3_TO_F32[c as usize] * scales[j / block];
            acc[j % LANES] = w.mul_add(v, acc[j % LANES]);
        }
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                acc[i] += acc[i + n];
            }
        }
        acc[0]
    }

    /// An ordinary pair takes the fold (so the tests of `dot_many` do test it), and agrees
    /// with the reference; every code, subnormal ones included, is in the rows.
    #[test]
    fn an_ordinary_pair_is_folded_and_exact() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2+FMA, the fold's only path");
            return;
        }
        let k = 256;
        let codes: Vec<u8> = (0..k).map(|j| (j as u8).wrapping_mul(37) & 0xF7).collect();
        let codes1: Vec<u8> = codes.iter().rev().copied().collect();
        let x: Vec<f32> = (0..k).map(|j| ((j * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let (s0, s1) = ([2f32.powi(-9), 2f32.powi(3)], [2f32.powi(-20), 1.0]);
        let r0 = Row::Fp8 { codes: &codes, scales: &s0, block: 128 };
        let r1 = Row::Fp8 { codes: &codes1, scales: &s1, block: 128 };
        let mut f = FoldedPair::take(&x);
        // SAFETY: AVX2 and FMA checked above; both rows hold `k` codes and their scales.
        let got = unsafe { f.pair(&r0, &r1) }.expect("an ordinary pair is folded");
        assert_eq!(got.0.to_bits(), reference(&codes, &s0, 128, &x).to_bits());
        assert_eq!(got.1.to_bits(), reference(&codes1, &s1, 128, &x).to_bits());
    }

    /// With the kept folds full, a pair whose first row's fold is the oldest and whose
    /// second row's is new must not replace the first (it did: row 0 then got row 1's
    /// scales).
    #[test]
    fn a_new_fold_never_replaces_the_other_row_of_its_pair() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2+FMA, the fold's only path");
            return;
        }
        let k = 128;
        let codes: Vec<u8> = (0..k).map(|j| (j as u8).wrapping_mul(13) & 0x77).collect();
        let x: Vec<f32> = (0..k).map(|j| (j % 17) as f32 - 8.0).collect();
        let scale = |e: i32| [2f32.powi(e)];
        let mut f = FoldedPair::take(&x);
        for (e0, e1) in [(-1, -1), (-2, -2), (-3, -3), (-4, -4), (-1, -5)] {
            let (s0, s1) = (scale(e0), scale(e1));
            let r0 = Row::Fp8 { codes: &codes, scales: &s0, block: 128 };
            let r1 = Row::Fp8 { codes: &codes, scales: &s1, block: 128 };
            // SAFETY: AVX2 and FMA checked above; both rows hold `k` codes and one scale.
            let got = unsafe { f.pair(&r0, &r1) }.expect("folded");
            assert_eq!(got.0.to_bits(), reference(&codes, &s0, 128, &x).to_bits(), "scales 2^{e0}, 2^{e1}");
            assert_eq!(got.1.to_bits(), reference(&codes, &s1, 128, &x).to_bits(), "scales 2^{e0}, 2^{e1}");
        }
    }

    /// The 16-bit-shift decode gives each byte's `E4M3 · 2⁻¹²⁰` bits (sign to bit 31,
    /// exponent and mantissa to bits 26..20), as the 32-bit shift pair per byte did: every
    /// code in every byte position, next to neighbours with every top and bottom bit.
    #[test]
    fn decode_is_the_per_byte_shifts() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2+FMA, the fold's only path");
            return;
        }
        let per_byte = |lane: u32, q: u32| (((lane << (24 - 8 * q)) as i32 >> 4) as u32) & 0x87F0_0000;
        for code in 0..=255u8 {
            for (i, &other) in [0x00u8, 0xFF, 0x80, 0x7F, 0x0F, 0xF0, 0x01].iter().enumerate() {
                let mut bytes = [other; 32];
                // The code in byte q = (lane + i) % 4 of each lane, so every position is covered.
                for (j, b) in bytes.iter_mut().enumerate() {
                    if j % 4 == (j / 4 + i) % 4 {
                        *b = code;
                    }
                }
                // SAFETY: AVX2 checked above; `bytes` holds 32 bytes.
                let got: [[u32; 8]; 4] = unsafe {
                    let d = x86::decode(std::arch::x86_64::_mm256_loadu_si256(bytes.as_ptr().cast()));
                    std::mem::transmute(d)
                };
                for (q, reg) in got.iter().enumerate() {
                    for (p, &v) in reg.iter().enumerate() {
                        let lane = u32::from_le_bytes(bytes[4 * p..4 * p + 4].try_into().unwrap());
                        assert_eq!(v, per_byte(lane, q as u32), "code {code:#04x}, byte {q} of lane {lane:#010x}");
                    }
                }
            }
        }
    }

    /// An FP8 matrix with 128-row blocks, readable both ways (`row` and `fp8_blocks`).
    struct Blocked {
        codes: Vec<u8>,
        scales: Vec<f32>,
        k: usize,
        nan_free: crate::kernels::NanFreeBlocks,
    }

    impl Rows for Blocked {
        fn row<'a>(&'a self, r: usize, _: &'a mut crate::kernels::RowScratch) -> Row<'a> {
            let per = self.k.div_ceil(128);
            Row::Fp8 {
                codes: &self.codes[r * self.k..(r + 1) * self.k],
                scales: &self.scales[r / 128 * per..],
                block: 128,
            }
        }
        fn fp8_blocks(&self) -> Option<Fp8Blocks<'_>> {
            Some(Fp8Blocks {
                codes: &self.codes,
                k: self.k,
                block_rows: 128,
                block_cols: 128,
                nan_free: &self.nan_free,
            })
        }
        fn fp8_block_scales(&self, b: usize, out: &mut Vec<f32>) {
            let per = self.k.div_ceil(128);
            out.extend_from_slice(&self.scales[b * per..(b + 1) * per]);
        }
    }

    /// The block walk gives the reference bits for any first row and row count (blocks entered
    /// midway, odd segments), and declines (so the general path runs) for a block whose scale
    /// does not fold or a NaN code, wherever they are; with every instruction set the fold
    /// runs with that this CPU has (the AVX-512 kernel takes the pair's rows in the two halves
    /// of its registers: a NaN code is caught in either).
    #[test]
    fn the_block_walk_gives_the_reference_bits_or_declines() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2+FMA, the fold's only path");
            return;
        }
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa.is_supported() {
                block_walk(isa);
            } else {
                eprintln!("{} not checked: this CPU does not have it", isa.name());
            }
        }
    }

    /// Panics unless the CPU supports `isa` (and AVX2 and FMA): `rows` runs its kernels on it.
    fn block_walk(isa: Isa) {
        assert!(isa.is_supported() && avx2(), "block_walk: {} not supported here", isa.name());
        let (n, k) = (300usize, 256usize);
        let mut m = Blocked {
            codes: (0..n * k).map(|j| (j as u8).wrapping_mul(151).wrapping_add((j / 97) as u8) & 0xF7).collect(),
            scales: (0..n.div_ceil(128) * 2).map(|i| 2f32.powi(i as i32 % 5 - 3)).collect(),
            k,
            nan_free: crate::kernels::NanFreeBlocks::new(n.div_ceil(128)),
        };
        let x: Vec<f32> = (0..k).map(|j| ((j * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let per = k.div_ceil(128);
        let check = |m: &Blocked, start: usize, len: usize| {
            let mut out = vec![f32::NAN; len];
            // SAFETY: AVX2, FMA and `isa` checked above.
            let ok = unsafe { rows(isa, m, m.fp8_blocks().unwrap(), start, len, &x, &mut out) };
            if ok {
                for (j, &o) in out.iter().enumerate() {
                    let r = start + j;
                    let want = reference(&m.codes[r * k..(r + 1) * k], &m.scales[r / 128 * per..], 128, &x);
                    assert_eq!(o.to_bits(), want.to_bits(), "row {r} of {start}..{}", start + len);
                }
            }
            ok
        };
        for (start, len) in [(0, 300), (1, 127), (64, 128), (127, 3), (5, 1), (129, 171)] {
            assert!(check(&m, start, len), "rows {start}..{} decline", start + len);
        }
        // Without NaN codes every block was found clean: the kernel ran without its NaN test.
        assert_eq!((0..3).map(|b| m.nan_free.known(b)).collect::<Vec<_>>(), [Some(true); 3]);
        // Block 2 (rows 256..) with a scale the fold cannot take (2^8): declined when the call
        // reaches it, not otherwise.
        m.scales[2 * per] = 256.0;
        assert!(!check(&m, 200, 100));
        assert!(check(&m, 0, 256));
        // A NaN code in row 140 (new codes: the blocks are scanned afresh). A call over it
        // declines; one over other rows of its block runs, with the NaN test.
        m.scales[2 * per] = 1.0;
        m.codes[140 * k + 9] = 0x7F;
        m.nan_free = crate::kernels::NanFreeBlocks::new(3);
        assert!(!check(&m, 100, 60));
        assert_eq!(m.nan_free.known(1), Some(false));
        // Row 140 as the first row of its pair (128 + 12 with 144 + 12) above, the second
        // here (136 + 4 with 128 + 4).
        assert!(!check(&m, 120, 24));
        assert!(check(&m, 141, 100));
    }
}
