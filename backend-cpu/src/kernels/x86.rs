//! The x86-64 lanes and decoders of `weights.rs`: AVX2 (+FMA, F16C) keeps a 32-value chunk in
//! four `__m256`, AVX-512 (F/BW/DQ/VL) in two `__m512`. The entry points are
//! `#[target_feature]` functions; everything below them is `#[inline(always)]` and so compiled
//! with their features. Decoding happens in registers:
//!
//! * BF16: zero-extend to 32 bits and shift left by 16.
//! * F16: `vcvtph2ps`.
//! * FP8 e4m3fn: the byte `b` becomes the half `((b & 0x80) << 8) | ((b & 0x7F) << 7)` (sign,
//!   then exponent and mantissa moved into the half's fields: the half's value is
//!   `E4M3(b) · 2⁻⁸` exactly, subnormals included), computed as `(sign-extend(b) << 7) & 0xBF80`;
//!   codes `0x7F`/`0xFF` (NaN) are replaced by the half `0x7E00`, which widens to the table's
//!   NaN `0x7FC00000`; `vcvtph2ps`; then one multiply by `scale · 256`. That multiply rounds
//!   `(E4M3(b) · 2⁻⁸) · (scale · 2⁸)`, the same real number as `E4M3(b) · scale`, so it gives the
//!   table's bits whenever `scale · 256` is exact, i.e. finite; a block whose `scale · 256`
//!   overflows goes through the scalar tables instead (`Decode::scale` returns `None`).
//! * FP4 e2m1: the 16 codes of a byte pair are spread to one code per byte (`unpack` of the
//!   bytes and the bytes shifted right by 4), widened to 32 bits, and looked up in a register
//!   table already multiplied by the group's scale (`E2M1_TO_F32[c] * scale`, the same multiply
//!   as the scalar path): AVX-512 `vpermps` on the 16 entries; AVX2 `vpermps` on the 8 positive
//!   entries, then the code's sign bit XORed into the f32 sign (the negative entries are the
//!   positive ones negated, exactly; `-0.0` stays). `vpermps` reads only the low 4 (3) bits of
//!   an index, so the other bits may hold garbage.

use std::arch::x86_64::*;

use dsv4_core::quant::E2M1_TO_F32;

use super::weights::{
    decode_with, dot_many_with, dot_rows_with, row_parts, to_split, Bf16Dec, Decode, F16Dec, F32Dec, Fp4Dec, Fp8Dec,
    Lanes, Row, Rows, LANES,
};
use super::Isa;

/// [`super::weights::dot_many`] with AVX2.
///
/// # Safety
///
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_many_avx2<W: Rows>(w: &W, start: usize, n: usize, xs: &[f32], out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx2`; `dot_many_with` checks each row.
    unsafe { dot_many_with::<Avx2, W, 4>(w, start, n, xs, out) }
}

/// [`super::weights::dot_many`] with AVX-512.
///
/// # Safety
///
/// The CPU supports AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_many_avx512<W: Rows>(w: &W, start: usize, n: usize, xs: &[f32], out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx512`; `dot_many_with` checks each row.
    unsafe { dot_many_with::<Avx512, W, 8>(w, start, n, xs, out) }
}

/// [`super::weights::dot_rows`] with AVX2: input rows four at a time.
///
/// # Safety
///
/// The CPU supports AVX2, FMA and F16C; the row is consistent and `xs.len() == out.len() · k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_rows_avx2(w: &Row, xs: &[f32], out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx2`; the caller checked the lengths.
    unsafe { dot_rows_with::<Avx2, 4>(w, xs, out) }
}

/// [`super::weights::dot_rows`] with AVX-512: input rows eight at a time.
///
/// # Safety
///
/// The CPU supports AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C; the row is consistent and
/// `xs.len() == out.len() · k`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_rows_avx512(w: &Row, xs: &[f32], out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx512`; the caller checked the lengths.
    unsafe { dot_rows_with::<Avx512, 8>(w, xs, out) }
}

/// [`super::weights::decode_row`] with AVX2.
///
/// # Safety
///
/// As [`dot_rows_avx2`], with `out.len() == k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_row_avx2(w: &Row, out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx2`; the caller checked the lengths.
    unsafe { decode_with::<Avx2>(w, out) }
}

/// [`super::weights::decode_row`] with AVX-512.
///
/// # Safety
///
/// As [`dot_rows_avx512`], with `out.len() == k`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn decode_row_avx512(w: &Row, out: &mut [f32]) {
    // SAFETY: this function's features are those of `Avx512`; the caller checked the lengths.
    unsafe { decode_with::<Avx512>(w, out) }
}

/// Reduces 8 lanes `s8` the canonical way: `s4[i] = s8[i] + s8[i+4]`, `s2[i] = s4[i] + s4[i+2]`,
/// then `s2[0] + s2[1]`.
///
/// # Safety
///
/// The CPU supports AVX.
#[inline(always)]
pub(super) unsafe fn reduce8(s8: __m256) -> f32 {
    // SAFETY: register-only AVX/SSE operations; the caller guarantees AVX.
    unsafe {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2

/// AVX2 lanes: `[lanes 0-7, 8-15, 16-23, 24-31]`.
pub(crate) struct Avx2;

impl Lanes for Avx2 {
    const FOLDS_FP8: Option<Isa> = Some(Isa::Avx2);
    const FP4_TABLES: Option<Isa> = Some(Isa::Avx2);
    // 16 registers: two accumulators of four, one decoded chunk of four, the decoder's. One
    // row a tile (no input reuse across rows), so past 3 input rows the tiles decode each row
    // too often: on a Zen 4 with DSV4_CPU_ISA=avx2 tiles took 0.5-0.6× the time of the
    // decode-then-multiply path at 2 input rows, about the same at 4 and up to 1.5× at 8
    // (FP4; `tests/gemv_bench.rs`, 4096 × 2048).
    const TILE_ROWS: usize = 1;
    const TILE_INPUTS: usize = 2;
    const TILE_MOST_INPUTS: usize = 3;
    type W = [__m256; 4];

    #[inline(always)]
    unsafe fn zero() -> Self::W {
        // SAFETY: the CPU has AVX (trait contract).
        unsafe { [_mm256_setzero_ps(); 4] }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::W {
        // SAFETY: the CPU has AVX and `p` is valid for 32 values (trait contract).
        unsafe {
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
        }
    }

    #[inline(always)]
    unsafe fn store(w: Self::W, p: *mut f32) {
        // SAFETY: the CPU has AVX and `p` is valid for 32 values (trait contract).
        unsafe {
            _mm256_storeu_ps(p, w[0]);
            _mm256_storeu_ps(p.add(8), w[1]);
            _mm256_storeu_ps(p.add(16), w[2]);
            _mm256_storeu_ps(p.add(24), w[3]);
        }
    }

    #[inline(always)]
    unsafe fn fma(w: Self::W, x: *const f32, acc: Self::W) -> Self::W {
        // SAFETY: the CPU has AVX and FMA and `x` is valid for 32 values (trait contract).
        unsafe {
            [
                _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[0]),
                _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[1]),
                _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[2]),
                _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc[3]),
            ]
        }
    }

    #[inline(always)]
    unsafe fn fma_reg(w: Self::W, x: Self::W, acc: Self::W) -> Self::W {
        // SAFETY: register-only FMA operations (trait contract).
        unsafe {
            [
                _mm256_fmadd_ps(w[0], x[0], acc[0]),
                _mm256_fmadd_ps(w[1], x[1], acc[1]),
                _mm256_fmadd_ps(w[2], x[2], acc[2]),
                _mm256_fmadd_ps(w[3], x[3], acc[3]),
            ]
        }
    }

    #[inline(always)]
    unsafe fn reduce(a: Self::W) -> f32 {
        // SAFETY: register-only AVX operations (trait contract).
        unsafe {
            // s16 is (a[0] + a[2], a[1] + a[3]); s8 the sum of its two halves.
            reduce8(_mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3])))
        }
    }

    #[inline(always)]
    unsafe fn reduce_split(a: Self::W) -> f32 {
        // SAFETY: register-only AVX operations (trait contract).
        unsafe { reduce_split8(a) }
    }
}

impl Decode<Avx2> for F32Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m256; 4] {
        // SAFETY: values j..j+32 lie inside the row (trait contract).
        unsafe { Avx2::load(row_parts!(self.0, F32).as_ptr().add(j)) }
    }
}

impl Decode<Avx2> for Bf16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m256; 4] {
        let p = row_parts!(self.0, Half).as_ptr().wrapping_add(2 * j).cast::<__m128i>();
        // SAFETY: the 64 bytes of values j..j+32 lie inside the row; AVX2 (trait contract).
        unsafe { [bf16x8(p), bf16x8(p.add(1)), bf16x8(p.add(2)), bf16x8(p.add(3))] }
    }
}

impl Decode<Avx2> for F16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m256; 4] {
        let p = row_parts!(self.0, Half).as_ptr().wrapping_add(2 * j).cast::<__m128i>();
        // SAFETY: the 64 bytes of values j..j+32 lie inside the row; F16C (trait contract).
        unsafe {
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(2))),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(3))),
            ]
        }
    }
}

/// `scale · 256` (the FP8 half trick's 2⁸ folded into the scale) when that is exact.
#[inline(always)]
fn fp8_scale(s: f32) -> Option<f32> {
    let s256 = s * 256.0;
    // Finite s·256 is exact (a power-of-two multiply that neither overflows nor loses bits:
    // subnormal s only gains exponent). A non-finite s gives the scalar result anyway.
    (s256.is_finite() || !s.is_finite()).then_some(s256)
}

/// 16 e4m3fn codes (sign-extended to 16 bits) → their halves, NaN codes → `0x7E00`.
///
/// # Safety
///
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn e4m3_halves_avx2(x: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
    unsafe {
        let h = _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(0xBF80u16 as i16));
        let em = _mm256_set1_epi16(0x3F80);
        let nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, em), em);
        _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7E00), nan)
    }
}

// The helpers below are named `#[inline(always)]` functions, not closures: a closure is
// compiled with the target features of the function it is written in (these kernels have
// none of their own; they are inlined into `#[target_feature]` entry points), so whether its
// intrinsics become instructions is left to the inliner's cost model. A generic closure
// in the decode GEMV once made the AVX2 path 15 times slower.

/// Transposes a 16 × 16 matrix of 32-bit lanes: `t[p]` lane `i` is `r[i]` lane `p`.
///
/// # Safety
///
/// The CPU supports AVX-512 F.
#[inline(always)]
pub(super) unsafe fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
    // SAFETY: register-only AVX-512 F operations; the caller guarantees AVX-512 F.
    unsafe {
        // Within each 128-bit lane L: a[2i] = (r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]), ...
        let mut a = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // b[4i+e], 128-bit lane L: rows 4i..4i+4 of element 4L+e.
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        // t[4L+e] = lane L of b[e], b[4+e], b[8+e], b[12+e].
        let mut t = [_mm512_setzero_si512(); 16];
        for e in 0..4 {
            let c0 = _mm512_shuffle_i32x4::<0x88>(b[e], b[4 + e]);
            let c1 = _mm512_shuffle_i32x4::<0xDD>(b[e], b[4 + e]);
            let d0 = _mm512_shuffle_i32x4::<0x88>(b[8 + e], b[12 + e]);
            let d1 = _mm512_shuffle_i32x4::<0xDD>(b[8 + e], b[12 + e]);
            t[e] = _mm512_shuffle_i32x4::<0x88>(c0, d0);
            t[4 + e] = _mm512_shuffle_i32x4::<0x88>(c1, d1);
            t[8 + e] = _mm512_shuffle_i32x4::<0xDD>(c0, d0);
            t[12 + e] = _mm512_shuffle_i32x4::<0xDD>(c1, d1);
        }
        t
    }
}

/// 16 32-bit values (f32, or a BF16 pair), aligned to a cache line: the unit of the packed
/// operands of the GEMMs (`f32_gemm`, `bf16_gemm`), loaded and stored with aligned moves.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u32; 16]);

/// A line of zeros.
pub(super) const ZERO_LINE: Line = Line([0; 16]);

/// The mask of the first `min(n, 16)` lanes.
#[inline(always)]
pub(super) fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Where a GEMM micro-kernel whose tile is `MR × NR` (`(tile_mr, tile_nr)`) writes the output
/// block of `c` (row-major, row stride `n`) at row `i0`, column `j0`, of which `mr ≤ MR` rows and
/// `nr ≤ NR` columns lie inside `c`: `c` itself (row stride `n`) for a whole block, else `edge`
/// (`MR · NR` values, row stride `NR`), filled with the block first when `load`; [`tile_out`]
/// copies a partial block back after the micro-kernel ran (which computes at least the first
/// `nr` columns and at most `NR`: `f32_gemm`'s tiles compute `nr` rounded up to 8, `NR / 2` or
/// `NR`).
///
/// Two calls around the micro-kernel rather than one taking it as a closure: a closure does
/// not inherit `#[target_feature]`s unless the function that writes it has them, and
/// `f32_gemm`'s generic blocking has none (its intrinsics would become calls).
#[inline(always)]
pub(super) fn tile_in(
    c: &mut [f32],
    n: usize,
    (i0, j0): (usize, usize),
    (mr, nr): (usize, usize),
    (tile_mr, tile_nr): (usize, usize),
    load: bool,
    edge: &mut [f32],
) -> (*mut f32, usize) {
    debug_assert!(
        mr <= tile_mr && nr <= tile_nr && edge.len() >= tile_mr * tile_nr && (i0 + mr - 1) * n + j0 + nr <= c.len()
    );
    if mr == tile_mr && nr == tile_nr {
        return (c[i0 * n + j0..].as_mut_ptr(), n);
    }
    if load {
        for r in 0..mr {
            edge[r * tile_nr..r * tile_nr + nr].copy_from_slice(&c[(i0 + r) * n + j0..][..nr]);
        }
    }
    (edge.as_mut_ptr(), tile_nr)
}

/// Copies a partial block's tile from `edge` back into `c` ([`tile_in`]); nothing for a whole
/// one.
#[inline(always)]
pub(super) fn tile_out(
    c: &mut [f32],
    n: usize,
    (i0, j0): (usize, usize),
    (mr, nr): (usize, usize),
    (tile_mr, tile_nr): (usize, usize),
    edge: &[f32],
) {
    if mr == tile_mr && nr == tile_nr {
        return;
    }
    for r in 0..mr {
        c[(i0 + r) * n + j0..][..nr].copy_from_slice(&edge[r * tile_nr..r * tile_nr + nr]);
    }
}

/// 8 bf16 values → f32 (zero-extend, shift left by 16).
///
/// # Safety
///
/// The CPU supports AVX2; `p` is valid for 16 bytes.
#[inline(always)]
unsafe fn bf16x8(p: *const __m128i) -> __m256 {
    // SAFETY: as above.
    unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16)) }
}

/// 16 bf16 values → f32.
///
/// # Safety
///
/// The CPU supports AVX-512F; `p` is valid for 32 bytes.
#[inline(always)]
unsafe fn bf16x16(p: *const __m256i) -> __m512 {
    // SAFETY: as above.
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16)) }
}

/// 8 halves widened, times `s`.
///
/// # Safety
///
/// The CPU supports AVX and F16C.
#[inline(always)]
unsafe fn halves_times(h: __m128i, s: __m256) -> __m256 {
    // SAFETY: register-only operations (as above).
    unsafe { _mm256_mul_ps(_mm256_cvtph_ps(h), s) }
}

/// 8 e2m1 codes (in the low 4 bits of each lane; the bits above are ignored) looked up in the
/// 8 positive scaled table entries `pos` (`vpermps` reads the low 3 bits), the code's sign bit
/// then moved into the f32 sign: `-(v·s)` is the negative entry `(-v)·s` bit for bit (negation
/// is exact), except that a NaN scale's NaN may change sign, which no NaN comparison sees. One
/// `vpermps` and two bit operations where a lookup in both halves and a `blendv` took two
/// `vpermps`: AVX2 decode of FP4 experts is shuffle-bound.
///
/// # Safety
///
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn e2m1_look(idx: __m256i, pos: __m256) -> __m256 {
    // SAFETY: register-only AVX2 operations (as above).
    unsafe {
        let sign = _mm256_and_si256(_mm256_slli_epi32(idx, 28), _mm256_set1_epi32(i32::MIN));
        _mm256_xor_ps(_mm256_permutevar8x32_ps(pos, idx), _mm256_castsi256_ps(sign))
    }
}

/// The 32 FP4 values of one chunk in the split layout (the even values in the first two
/// registers, the odd ones in the last two), looked up in the group's table `pos` (the 8
/// positive E2M1 values times the group's scale, [`e2m1_look`]): the decode of
/// `Decode::<Avx2>::chunk_split` for FP4 and of `fp4_f32`'s kernel.
///
/// # Safety
///
/// The CPU supports AVX2; 16 bytes are readable at `p` (byte `i` holds value `2i` in its low
/// nibble and `2i + 1` in its high one).
#[inline(always)]
pub(super) unsafe fn fp4_split_avx2(p: *const u8, pos: __m256) -> [__m256; 4] {
    // SAFETY: a 16-byte load the caller vouches for, then register-only AVX2 operations.
    unsafe {
        let b = _mm_loadu_si128(p.cast());
        // The low nibbles are the even values, the high ones the odd values, already in the
        // split layout.
        let (lo, hi) = (_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
        [
            e2m1_look(lo, pos),
            e2m1_look(hi, pos),
            e2m1_look(_mm256_srli_epi32(lo, 4), pos),
            e2m1_look(_mm256_srli_epi32(hi, 4), pos),
        ]
    }
}

/// [`fp4_split_avx2`] with AVX-512: one `vpermps` per 16 values on the 16-entry table `t`.
///
/// # Safety
///
/// The CPU supports AVX-512 F; 16 bytes are readable at `p` (as for [`fp4_split_avx2`]).
#[inline(always)]
pub(super) unsafe fn fp4_split_avx512(p: *const u8, t: __m512) -> [__m512; 2] {
    // SAFETY: a 16-byte load the caller vouches for, then register-only AVX-512 F operations.
    unsafe {
        // Low nibbles: the even values; high nibbles: the odd ones. `vpermps` reads only the
        // low 4 bits of each index.
        let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
        [_mm512_permutexvar_ps(idx, t), _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t)]
    }
}

/// The canonical tree over 16 lanes (8 apart, then [`reduce8`]).
///
/// # Safety
///
/// The CPU supports AVX-512F and DQ.
#[inline(always)]
unsafe fn reduce16(v: __m512) -> f32 {
    // SAFETY: register-only operations (as above).
    unsafe { reduce8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))) }
}

/// The canonical reduction of an AVX2 accumulator in the split layout (`[even 0-7, even 8-15,
/// odd 0-7, odd 8-15]`): as [`reduce_split16`].
///
/// # Safety
///
/// The CPU supports AVX.
#[inline(always)]
unsafe fn reduce_split8(a: [__m256; 4]) -> f32 {
    // SAFETY: register-only operations (as above).
    unsafe { reduce8(_mm256_add_ps(a[0], a[1])) + reduce8(_mm256_add_ps(a[2], a[3])) }
}

/// The canonical reduction of an accumulator in the split layout (`[even 0-15, odd 0-15]`):
/// the canonical tree pairs lanes 16, 8, 4 and 2 apart, which keeps their parity, so it is the
/// tree over the even lanes, the same over the odd ones, and their sum last.
///
/// # Safety
///
/// The CPU supports AVX-512F and DQ.
#[inline(always)]
unsafe fn reduce_split16(a: [__m512; 2]) -> f32 {
    // SAFETY: register-only operations (as above).
    unsafe { reduce16(a[0]) + reduce16(a[1]) }
}

/// 32 e4m3fn codes as 16-bit words `b[2i] | b[2i+1] << 8` → the halves of the even codes and
/// of the odd codes (the split layout), 16 each: `(word << 8) >>ₐ 1` and `word >>ₐ 1` put
/// a code's sign in bits 15 and 14 and its exponent and mantissa in bits 13..7; masking with
/// `0xBF80` leaves the half of module docs. NaN codes are not handled (the callers check).
///
/// # Safety
///
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn e4m3_split_halves(w: __m256i) -> (__m256i, __m256i) {
    // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
    unsafe {
        let m = _mm256_set1_epi16(0xBF80u16 as i16);
        let even = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(w, 8), 1), m);
        let odd = _mm256_and_si256(_mm256_srai_epi16(w, 1), m);
        (even, odd)
    }
}

/// The NaN codes (`0x7F`, `0xFF`: `b | 0x80 == 0xFF`) among 32 e4m3fn codes, as a byte mask.
///
/// # Safety
///
/// The CPU supports AVX2.
#[inline(always)]
pub(super) unsafe fn e4m3_nan_bytes(w: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
    unsafe { _mm256_cmpeq_epi8(_mm256_or_si256(w, _mm256_set1_epi8(0x80u8 as i8)), _mm256_set1_epi8(-1)) }
}

/// Whether any of 32 e4m3fn codes is a NaN.
///
/// # Safety
///
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn e4m3_any_nan(w: __m256i) -> bool {
    // SAFETY: register-only AVX2 operations (the caller guarantees AVX2).
    unsafe { _mm256_movemask_epi8(e4m3_nan_bytes(w)) != 0 }
}

impl Decode<Avx2> for Fp8Dec<'_> {
    type Scale = __m256;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<__m256> {
        let s = fp8_scale(row_parts!(self.0, Scaled).1[b])?;
        // SAFETY: AVX (trait contract).
        Some(unsafe { _mm256_set1_ps(s) })
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, s: __m256) -> [__m256; 4] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j).cast::<__m128i>();
        // SAFETY: the 32 codes j..j+32 lie inside the row; AVX2, F16C (trait contract).
        unsafe {
            let h0 = e4m3_halves_avx2(_mm256_cvtepi8_epi16(_mm_loadu_si128(p)));
            let h1 = e4m3_halves_avx2(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(1))));
            [
                halves_times(_mm256_castsi256_si128(h0), s),
                halves_times(_mm256_extracti128_si256(h0, 1), s),
                halves_times(_mm256_castsi256_si128(h1), s),
                halves_times(_mm256_extracti128_si256(h1, 1), s),
            ]
        }
    }
    const SPLIT: bool = true;
    #[inline(always)]
    unsafe fn chunk_split(&self, j: usize, s: __m256) -> [__m256; 4] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j).cast::<__m256i>();
        // SAFETY: the 32 codes j..j+32 lie inside the row; AVX2, F16C (trait contract).
        unsafe {
            let w = _mm256_loadu_si256(p);
            if e4m3_any_nan(w) {
                return to_split::<Avx2>(Decode::<Avx2>::chunk(self, j, s));
            }
            let (even, odd) = e4m3_split_halves(w);
            [
                halves_times(_mm256_castsi256_si128(even), s),
                halves_times(_mm256_extracti128_si256(even, 1), s),
                halves_times(_mm256_castsi256_si128(odd), s),
                halves_times(_mm256_extracti128_si256(odd, 1), s),
            ]
        }
    }
}

impl Decode<Avx2> for Fp4Dec<'_> {
    /// The 8 positive table entries times the group's scale (the negative ones are their
    /// negations: [`e2m1_look`]).
    type Scale = __m256;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<__m256> {
        let s = row_parts!(self.0, Scaled).1[b];
        // SAFETY: the table has 16 entries; AVX (trait contract).
        unsafe { Some(_mm256_mul_ps(_mm256_loadu_ps(E2M1_TO_F32.as_ptr()), _mm256_set1_ps(s))) }
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, pos: __m256) -> [__m256; 4] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j / 2).cast::<__m128i>();
        // SAFETY: the 16 bytes of values j..j+32 lie inside the row (j is even); AVX2 (trait
        // contract).
        unsafe {
            let b = _mm_loadu_si128(p);
            let hi = _mm_srli_epi16(b, 4);
            // One code per byte, in value order (the high nibbles of the bytes are garbage).
            let c0 = _mm_unpacklo_epi8(b, hi);
            let c1 = _mm_unpackhi_epi8(b, hi);
            [
                e2m1_look(_mm256_cvtepu8_epi32(c0), pos),
                e2m1_look(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)), pos),
                e2m1_look(_mm256_cvtepu8_epi32(c1), pos),
                e2m1_look(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)), pos),
            ]
        }
    }
    const SPLIT: bool = true;
    #[inline(always)]
    unsafe fn chunk_split(&self, j: usize, pos: __m256) -> [__m256; 4] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j / 2).cast::<__m128i>();
        // SAFETY: the 16 bytes of values j..j+32 lie inside the row (j is even); AVX2 (trait
        // contract).
        unsafe { fp4_split_avx2(p.cast(), pos) }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512

/// AVX-512 lanes: `[lanes 0-15, 16-31]`.
pub(crate) struct Avx512;

impl Lanes for Avx512 {
    const FOLDS_FP8: Option<Isa> = Some(Isa::Avx512);
    const FP4_TABLES: Option<Isa> = Some(Isa::Avx512);
    // 32 registers: 2 rows × 4 inputs accumulators of two (16), the 4 inputs' chunks (8), two
    // decoded chunks (4), the decoders'. Against 2 or 3 inputs a tile, 4 was as fast or
    // faster for every format at 2-8 input rows (Zen 4, `tests/gemv_bench.rs`).
    const TILE_ROWS: usize = 2;
    const TILE_INPUTS: usize = 4;
    type W = [__m512; 2];

    #[inline(always)]
    unsafe fn zero() -> Self::W {
        // SAFETY: the CPU has AVX-512F (trait contract).
        unsafe { [_mm512_setzero_ps(); 2] }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::W {
        // SAFETY: the CPU has AVX-512F and `p` is valid for 32 values (trait contract).
        unsafe { [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))] }
    }

    #[inline(always)]
    unsafe fn store(w: Self::W, p: *mut f32) {
        // SAFETY: the CPU has AVX-512F and `p` is valid for 32 values (trait contract).
        unsafe {
            _mm512_storeu_ps(p, w[0]);
            _mm512_storeu_ps(p.add(16), w[1]);
        }
    }

    #[inline(always)]
    unsafe fn fma(w: Self::W, x: *const f32, acc: Self::W) -> Self::W {
        // SAFETY: the CPU has AVX-512F and `x` is valid for 32 values (trait contract).
        unsafe {
            [
                _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[0]),
                _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), acc[1]),
            ]
        }
    }

    #[inline(always)]
    unsafe fn fma_reg(w: Self::W, x: Self::W, acc: Self::W) -> Self::W {
        // SAFETY: register-only AVX-512F operations (trait contract).
        unsafe { [_mm512_fmadd_ps(w[0], x[0], acc[0]), _mm512_fmadd_ps(w[1], x[1], acc[1])] }
    }

    #[inline(always)]
    unsafe fn reduce(a: Self::W) -> f32 {
        // SAFETY: register-only AVX-512F/DQ operations (trait contract).
        unsafe {
            let s16 = _mm512_add_ps(a[0], a[1]);
            reduce8(_mm256_add_ps(_mm512_castps512_ps256(s16), _mm512_extractf32x8_ps(s16, 1)))
        }
    }

    #[inline(always)]
    unsafe fn reduce_split(a: Self::W) -> f32 {
        // SAFETY: register-only AVX-512F/DQ operations (trait contract).
        unsafe { reduce_split16(a) }
    }
}

impl Decode<Avx512> for F32Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m512; 2] {
        // SAFETY: values j..j+32 lie inside the row (trait contract).
        unsafe { Avx512::load(row_parts!(self.0, F32).as_ptr().add(j)) }
    }
}

impl Decode<Avx512> for Bf16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m512; 2] {
        let p = row_parts!(self.0, Half).as_ptr().wrapping_add(2 * j).cast::<__m256i>();
        // SAFETY: the 64 bytes of values j..j+32 lie inside the row; AVX-512F (trait contract).
        unsafe { [bf16x16(p), bf16x16(p.add(1))] }
    }
}

impl Decode<Avx512> for F16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [__m512; 2] {
        let p = row_parts!(self.0, Half).as_ptr().wrapping_add(2 * j).cast::<__m256i>();
        // SAFETY: the 64 bytes of values j..j+32 lie inside the row; AVX-512F (trait contract).
        unsafe { [_mm512_cvtph_ps(_mm256_loadu_si256(p)), _mm512_cvtph_ps(_mm256_loadu_si256(p.add(1)))] }
    }
}

impl Decode<Avx512> for Fp8Dec<'_> {
    type Scale = __m512;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<__m512> {
        let s = fp8_scale(row_parts!(self.0, Scaled).1[b])?;
        // SAFETY: AVX-512F (trait contract).
        Some(unsafe { _mm512_set1_ps(s) })
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, s: __m512) -> [__m512; 2] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j).cast::<__m256i>();
        // SAFETY: the 32 codes j..j+32 lie inside the row; AVX-512F/BW (trait contract).
        unsafe {
            let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p));
            let h = _mm512_and_si512(_mm512_slli_epi16(x, 7), _mm512_set1_epi16(0xBF80u16 as i16));
            let em = _mm512_set1_epi16(0x3F80);
            let nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, em), em);
            let h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00));
            [
                _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), s),
                _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), s),
            ]
        }
    }
    const SPLIT: bool = true;
    #[inline(always)]
    unsafe fn chunk_split(&self, j: usize, s: __m512) -> [__m512; 2] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j).cast::<__m256i>();
        // SAFETY: the 32 codes j..j+32 lie inside the row; AVX-512F/BW/VL (trait contract).
        unsafe {
            let w = _mm256_loadu_si256(p);
            if e4m3_any_nan(w) {
                return to_split::<Avx512>(Decode::<Avx512>::chunk(self, j, s));
            }
            let (even, odd) = e4m3_split_halves(w);
            [_mm512_mul_ps(_mm512_cvtph_ps(even), s), _mm512_mul_ps(_mm512_cvtph_ps(odd), s)]
        }
    }
}

impl Decode<Avx512> for Fp4Dec<'_> {
    /// The 16 table entries times the group's scale.
    type Scale = __m512;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<__m512> {
        let s = row_parts!(self.0, Scaled).1[b];
        // SAFETY: the table has 16 entries; AVX-512F (trait contract).
        unsafe { Some(_mm512_mul_ps(_mm512_loadu_ps(E2M1_TO_F32.as_ptr()), _mm512_set1_ps(s))) }
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, t: __m512) -> [__m512; 2] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j / 2).cast::<__m128i>();
        // SAFETY: the 16 bytes of values j..j+32 lie inside the row (j is even); AVX-512F
        // (trait contract).
        unsafe {
            let b = _mm_loadu_si128(p);
            let hi = _mm_srli_epi16(b, 4);
            // One code per byte, in value order (the high nibbles of the bytes are garbage).
            let c0 = _mm_unpacklo_epi8(b, hi);
            let c1 = _mm_unpackhi_epi8(b, hi);
            [_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c0), t), _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c1), t)]
        }
    }
    const SPLIT: bool = true;
    #[inline(always)]
    unsafe fn chunk_split(&self, j: usize, t: __m512) -> [__m512; 2] {
        let p = row_parts!(self.0, Scaled).0.as_ptr().wrapping_add(j / 2).cast::<__m128i>();
        // SAFETY: the 16 bytes of values j..j+32 lie inside the row (j is even); AVX-512F
        // (trait contract).
        unsafe { fp4_split_avx512(p.cast(), t) }
    }
}

/// Values per chunk, restated for the asserts of this file.
const _: () = assert!(LANES == 32);
