//! SIMD kernels of the attention ops: the lightning indexer's scores, sparse attention over
//! gathered key rows, and the decoding of `bf16` / `fp8` pool rows.
//!
//! Every kernel is written once, generically over [`V16`] (sixteen `f32` lanes and the few
//! operations the kernels need), and compiled three times: [`Isa::Scalar`] (an array, `fma` as
//! `f32::mul_add`), [`Isa::Avx2`] (two 256-bit registers) and [`Isa::Avx512`] (one 512-bit
//! register). The same operations run in the same order on the same lanes whatever the
//! instruction set, and every multiply-add is fused, so **every instruction set gives the same
//! bits**; a kernel's result does not depend on how its inputs were tiled or shared among
//! threads either. The canonical orders:
//!
//! * **indexer score** of a key `k` for a query `q` `[nh, dh]` with head weights `w` and scale
//!   `s`: the heads are padded to a multiple of 16 (zero queries, weight `-0.0`) and laid out
//!   along the lanes, 16 heads per group. Per group, `acc = fma(q[·][d], k[d], acc)` for
//!   `d = 0, 1, …, dh−1` from `+0.0` (one sequential chain per head); `t = relu(acc) · (w·s)`
//!   (`relu` = `max(x, 0)`, `+0.0` for NaN, as `maxps`); the groups' `t` are added in order and
//!   the sixteen lanes summed by [`V16::hsum`]'s tree.
//! * **attention logit** of head `q_h` and key `k` (`d` values): lane `i` accumulates
//!   `fma(q[c + i], k[c + i], ·)` for `c = 0, 16, 32, …` from `+0.0` (the last chunk padded
//!   with zeros), the lanes are summed by [`V16::hsum`], the sum is multiplied by the scale.
//! * **softmax** per head, in `f32`: `m = max(sink, logits…)` (left to right), `e_j = exp(l_j − m)`,
//!   `denom = exp(sink − m) + e_0 + e_1 + …` (left to right), `p_j = e_j / denom`.
//! * **attention output** `o[c] = fma(p_j, v_j[c], ·)` for `j = 0, 1, …` from `+0.0`.
//!
//! Rows are `f32` slices; [`decode_row`] decodes a `bf16` / `fp8` pool row with SIMD, bit for
//! bit as `RowFormat::decode`.

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

use dsv4_core::backend::RowFormat;
use dsv4_core::kv::format::{fp8_block_scale, Fp8Row, FP8_KV_BLOCK};

use super::Isa;

/// Lanes of the canonical vector.
pub const LANES: usize = 16;

/// Sixteen `f32` lanes on one instruction set. A value of a type implementing it is the proof
/// that the CPU runs that instruction set: the x86 ones are only made by [`Isa`] checks.
trait V16: Copy {
    type V: Copy;
    /// Keys the indexer kernel scores at a time (1, 2, 4 or 8).
    const INDEX_KEYS: usize;
    /// Keys × heads the logit kernel computes at a time ((1|2|4) × (1|2|4)).
    const LOGIT_TILE: (usize, usize);
    /// Heads × 16-value chunks the output kernel accumulates at a time ((1|2|4) × (1|2|4)).
    const OUT_TILE: (usize, usize);
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// `s[..16]` (panics if shorter).
    fn load(self, s: &[f32]) -> Self::V;
    /// `out[..16] = v` (panics if shorter).
    fn store(self, v: Self::V, out: &mut [f32]);
    /// `a · b + c`, rounded once.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `max(a, 0)`: `a` where `a > 0`, else `+0.0` (NaN included).
    fn relu(self, a: Self::V) -> Self::V;
    /// `((a_i + a_{i+8})_{i<8} → (· + ·_{+4})_{i<4} → (· + ·_{+2})_{i<2} → ·_0 + ·_1)`.
    fn hsum(self, a: Self::V) -> f32;
    /// Sixteen little-endian bf16 values `b[..32]` as f32, as [`bf16_value`].
    fn bf16(self, b: &[u8]) -> Self::V;
    /// Sixteen e4m3fn codes `b[..16]` times `scale`, as `E4M3_TO_F32[c] * scale`.
    fn e4m3(self, b: &[u8], scale: f32) -> Self::V;

    /// `s` (shorter than 16) padded with zeros.
    #[inline(always)]
    fn load_part(self, s: &[f32]) -> Self::V {
        let mut buf = [0f32; LANES];
        buf[..s.len()].copy_from_slice(s);
        self.load(&buf)
    }

    /// The first `out.len()` (at most 16) lanes of `v` into `out`.
    #[inline(always)]
    fn store_part(self, v: Self::V, out: &mut [f32]) {
        let mut buf = [0f32; LANES];
        self.store(v, &mut buf);
        let n = out.len();
        out.copy_from_slice(&buf[..n]);
    }
}

/// [`Isa::is_supported`], looked up once per process (the kernels check it on every call).
#[cfg(target_arch = "x86_64")]
fn supported(isa: Isa) -> bool {
    static SUPPORTED: OnceLock<[bool; 3]> = OnceLock::new();
    SUPPORTED.get_or_init(|| Isa::ALL.map(Isa::is_supported))[isa as usize]
}

/// `2^120`: an e4m3 code's bits moved into an f32 (sign to bit 31, the other seven bits to
/// bits 20..27) are its value times `2^-120` (subnormal codes included), exactly.
const E4M3_REBIAS: f32 = f32::from_bits((127 + 120) << 23);
/// The e4m3 magnitude bits that mean NaN.
const E4M3_NAN: u32 = 0x7f;

/// One e4m3 code as f32 bits divided by `2^120`. Both NaN codes give `f32::NAN` (positive),
/// as `E4M3_TO_F32` does.
#[inline(always)]
fn e4m3_bits(c: u32) -> u32 {
    let sign = (c & 0x80) << 24;
    if c & 0x7f == E4M3_NAN {
        f32::NAN.to_bits()
    } else {
        sign | (c & 0x7f) << 20
    }
}

/// The bf16 value of two little-endian bytes as f32, as `half::bf16::to_f32`: exact, with the
/// quiet bit set on a signalling NaN.
#[inline(always)]
fn bf16_value(b: [u8; 2]) -> f32 {
    let bits = u32::from(u16::from_le_bytes(b)) << 16;
    f32::from_bits(if bits & 0x7fff_ffff > BF16_INF { bits | BF16_QUIET } else { bits })
}

/// `+inf` as f32 bits: a bf16 value above it (without the sign) is a NaN.
const BF16_INF: u32 = 0x7f80_0000;
/// The quiet bit of a NaN widened from bf16.
const BF16_QUIET: u32 = 0x0040_0000;

/// The portable lanes: an array, `fma` as `f32::mul_add`.
#[derive(Clone, Copy)]
struct Scalar;

impl V16 for Scalar {
    type V = [f32; LANES];
    const INDEX_KEYS: usize = 2;
    const LOGIT_TILE: (usize, usize) = (2, 2);
    const OUT_TILE: (usize, usize) = (2, 2);

    #[inline(always)]
    fn zero(self) -> Self::V {
        [0.0; LANES]
    }

    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        [x; LANES]
    }

    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        let mut v = [0f32; LANES];
        v.copy_from_slice(&s[..LANES]);
        v
    }

    #[inline(always)]
    fn store(self, v: Self::V, out: &mut [f32]) {
        out[..LANES].copy_from_slice(&v);
    }

    #[inline(always)]
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }

    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }

    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }

    #[inline(always)]
    fn relu(self, a: Self::V) -> Self::V {
        a.map(|x| if x > 0.0 { x } else { 0.0 })
    }

    #[inline(always)]
    fn hsum(self, a: Self::V) -> f32 {
        let s8: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
        let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
        let s2: [f32; 2] = std::array::from_fn(|i| s4[i] + s4[i + 2]);
        s2[0] + s2[1]
    }

    #[inline(always)]
    fn bf16(self, b: &[u8]) -> Self::V {
        std::array::from_fn(|i| bf16_value([b[2 * i], b[2 * i + 1]]))
    }

    #[inline(always)]
    fn e4m3(self, b: &[u8], scale: f32) -> Self::V {
        let b = &b[..LANES];
        std::array::from_fn(|i| f32::from_bits(e4m3_bits(u32::from(b[i]))) * E4M3_REBIAS * scale)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BF16_INF, BF16_QUIET, E4M3_NAN, E4M3_REBIAS, LANES, V16};

    /// AVX2 + FMA + F16C lanes: two 256-bit registers (lanes 0..8, 8..16). Only made by
    /// `Avx2::new`, which checks the CPU.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(());

    impl Avx2 {
        pub(super) fn new() -> Option<Self> {
            super::supported(super::Isa::Avx2).then_some(Avx2(()))
        }
    }

    /// AVX-512 (F, BW, DQ, VL) lanes: one 512-bit register. Only made by `Avx512::new`, which
    /// checks the CPU.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(());

    impl Avx512 {
        pub(super) fn new() -> Option<Self> {
            super::supported(super::Isa::Avx512).then_some(Avx512(()))
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Pair(__m256, __m256);

    impl V16 for Avx2 {
        type V = Pair;
        // Sixteen 256-bit registers: at most 8 of them (4 `Pair`s) as accumulators.
        const INDEX_KEYS: usize = 4;
        const LOGIT_TILE: (usize, usize) = (2, 2);
        const OUT_TILE: (usize, usize) = (2, 2);

        #[inline(always)]
        fn zero(self) -> Pair {
            // SAFETY: an `Avx2` exists only on a CPU with AVX2, FMA and F16C (`Avx2::new`).
            unsafe { Pair(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }

        #[inline(always)]
        fn splat(self, x: f32) -> Pair {
            // SAFETY: as in `zero`.
            unsafe { Pair(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }

        #[inline(always)]
        fn load(self, s: &[f32]) -> Pair {
            let s = &s[..LANES];
            // SAFETY: as in `zero`; `s` is 16 readable values, unaligned loads.
            unsafe { Pair(_mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(s.as_ptr().add(8))) }
        }

        #[inline(always)]
        fn store(self, v: Pair, out: &mut [f32]) {
            let out = &mut out[..LANES];
            // SAFETY: as in `zero`; `out` is 16 writable values, unaligned stores.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), v.0);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), v.1);
            }
        }

        #[inline(always)]
        fn fma(self, a: Pair, b: Pair, c: Pair) -> Pair {
            // SAFETY: as in `zero`.
            unsafe { Pair(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1)) }
        }

        #[inline(always)]
        fn add(self, a: Pair, b: Pair) -> Pair {
            // SAFETY: as in `zero`.
            unsafe { Pair(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1)) }
        }

        #[inline(always)]
        fn mul(self, a: Pair, b: Pair) -> Pair {
            // SAFETY: as in `zero`.
            unsafe { Pair(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1)) }
        }

        #[inline(always)]
        fn relu(self, a: Pair) -> Pair {
            // SAFETY: as in `zero`. `maxps(a, 0)` returns the second operand unless a > 0.
            unsafe {
                let z = _mm256_setzero_ps();
                Pair(_mm256_max_ps(a.0, z), _mm256_max_ps(a.1, z))
            }
        }

        #[inline(always)]
        fn hsum(self, a: Pair) -> f32 {
            // SAFETY: as in `zero`.
            unsafe {
                let s8 = _mm256_add_ps(a.0, a.1);
                let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
            }
        }

        #[inline(always)]
        fn bf16(self, b: &[u8]) -> Pair {
            let b = &b[..2 * LANES];
            // SAFETY: as in `zero`; `b` is 32 readable bytes, unaligned loads.
            unsafe {
                let half = |w: __m256i| {
                    let bits = _mm256_slli_epi32::<16>(w);
                    let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
                    let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(BF16_INF as i32));
                    let quiet = _mm256_and_si256(nan, _mm256_set1_epi32(BF16_QUIET as i32));
                    _mm256_castsi256_ps(_mm256_or_si256(bits, quiet))
                };
                let lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(b.as_ptr().cast()));
                let hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(b.as_ptr().add(16).cast()));
                Pair(half(lo), half(hi))
            }
        }

        #[inline(always)]
        fn e4m3(self, b: &[u8], scale: f32) -> Pair {
            let b = &b[..LANES];
            // SAFETY: as in `zero`; `b` is 16 readable bytes, loaded 8 at a time (unaligned).
            unsafe {
                let half = |c: __m256i| {
                    let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(c, _mm256_set1_epi32(0x80)));
                    let mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
                    let nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(E4M3_NAN as i32));
                    let bits = _mm256_blendv_epi8(
                        _mm256_or_si256(sign, _mm256_slli_epi32::<20>(mag)),
                        _mm256_set1_epi32(f32::NAN.to_bits() as i32),
                        nan,
                    );
                    let v = _mm256_castsi256_ps(bits);
                    _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(E4M3_REBIAS)), _mm256_set1_ps(scale))
                };
                let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.as_ptr().cast()));
                let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.as_ptr().add(8).cast()));
                Pair(half(lo), half(hi))
            }
        }
    }

    impl V16 for Avx512 {
        type V = __m512;
        // Thirty-two 512-bit registers: up to 16 of them as accumulators.
        const INDEX_KEYS: usize = 8;
        const LOGIT_TILE: (usize, usize) = (4, 4);
        const OUT_TILE: (usize, usize) = (4, 4);

        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY: an `Avx512` exists only on a CPU with AVX-512 F/BW/DQ/VL and everything
            // `Avx2` needs (`Avx512::new`).
            unsafe { _mm512_setzero_ps() }
        }

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: as in `zero`.
            unsafe { _mm512_set1_ps(x) }
        }

        #[inline(always)]
        fn load(self, s: &[f32]) -> __m512 {
            let s = &s[..LANES];
            // SAFETY: as in `zero`; `s` is 16 readable values, an unaligned load.
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        }

        #[inline(always)]
        fn store(self, v: __m512, out: &mut [f32]) {
            let out = &mut out[..LANES];
            // SAFETY: as in `zero`; `out` is 16 writable values, an unaligned store.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
        }

        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: as in `zero`.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }

        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: as in `zero`.
            unsafe { _mm512_add_ps(a, b) }
        }

        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: as in `zero`.
            unsafe { _mm512_mul_ps(a, b) }
        }

        #[inline(always)]
        fn relu(self, a: __m512) -> __m512 {
            // SAFETY: as in `zero`. `maxps(a, 0)` returns the second operand unless a > 0.
            unsafe { _mm512_max_ps(a, _mm512_setzero_ps()) }
        }

        #[inline(always)]
        fn hsum(self, a: __m512) -> f32 {
            // SAFETY: as in `zero`.
            unsafe {
                let s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a));
                let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
            }
        }

        #[inline(always)]
        fn bf16(self, b: &[u8]) -> __m512 {
            let b = &b[..2 * LANES];
            // SAFETY: as in `zero`; `b` is 32 readable bytes, an unaligned load.
            unsafe {
                let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(b.as_ptr().cast()));
                let bits = _mm512_slli_epi32::<16>(w);
                let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
                let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(BF16_INF as i32));
                let quiet = _mm512_mask_or_epi32(bits, nan, bits, _mm512_set1_epi32(BF16_QUIET as i32));
                _mm512_castsi512_ps(quiet)
            }
        }

        #[inline(always)]
        fn e4m3(self, b: &[u8], scale: f32) -> __m512 {
            let b = &b[..LANES];
            // SAFETY: as in `zero`; `b` is 16 readable bytes, an unaligned load.
            unsafe {
                let c = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().cast()));
                let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(c, _mm512_set1_epi32(0x80)));
                let mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
                let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(E4M3_NAN as i32));
                let bits = _mm512_mask_mov_epi32(
                    _mm512_or_si512(sign, _mm512_slli_epi32::<20>(mag)),
                    nan,
                    _mm512_set1_epi32(f32::NAN.to_bits() as i32),
                );
                let v = _mm512_castsi512_ps(bits);
                _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(E4M3_REBIAS)), _mm512_set1_ps(scale))
            }
        }
    }
}

/// `pub fn $name(isa: Isa, args…) -> R`: `$generic(lanes, args…)` with the lanes of `isa`, the
/// x86 ones inside a function compiled for their instruction set (so that the generic kernel,
/// `#[inline(always)]`, is compiled for it). Panics if the CPU does not support `isa`.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $generic:ident) => {
        $(#[$meta])*
        pub fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => {
                    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
                    fn imp(l: x86::Avx512, $($arg: $ty),*) $(-> $ret)? {
                        $generic(l, $($arg),*)
                    }
                    let l = x86::Avx512::new().expect("the CPU supports AVX-512");
                    // SAFETY: `Avx512::new` checked that the CPU has every feature `imp` uses.
                    unsafe { imp(l, $($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    fn imp(l: x86::Avx2, $($arg: $ty),*) $(-> $ret)? {
                        $generic(l, $($arg),*)
                    }
                    let l = x86::Avx2::new().expect("the CPU supports AVX2");
                    // SAFETY: `Avx2::new` checked that the CPU has every feature `imp` uses.
                    unsafe { imp(l, $($arg),*) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                Isa::Avx2 | Isa::Avx512 => panic!("{} kernels on a CPU that is not x86-64", isa.name()),
                Isa::Scalar => $generic(Scalar, $($arg),*),
            }
        }
    };
}

/// Picks the const parameter `$n` (1, 2, 4 or 8) from the value `$v`.
macro_rules! pick {
    ($v:expr, |$n:ident| $body:expr) => {
        match $v {
            8 => {
                const $n: usize = 8;
                $body
            }
            4 => {
                const $n: usize = 4;
                $body
            }
            2 => {
                const $n: usize = 2;
                $body
            }
            _ => {
                const $n: usize = 1;
                $body
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Row decoding.

dispatch! {
    /// Decodes one pool row of `out.len()` values from `bytes`, bit for bit as
    /// [`RowFormat::decode`].
    fn decode_row(format: RowFormat, bytes: &[u8], out: &mut [f32]) = decode_row_with
}

dispatch! {
    /// Decodes rows `rows` of `data` (rows of `row_bytes` bytes) into `out` (`rows.len()` rows of
    /// `out.len() / rows.len()` values), bit for bit as [`RowFormat::decode`].
    fn decode_rows(format: RowFormat, data: &[u8], row_bytes: usize, rows: &[usize], out: &mut [f32])
        = decode_rows_with
}

#[inline(always)]
fn decode_rows_with<L: V16>(l: L, format: RowFormat, data: &[u8], row_bytes: usize, rows: &[usize], out: &mut [f32]) {
    if rows.is_empty() {
        return;
    }
    let width = out.len() / rows.len();
    assert_eq!(out.len(), rows.len() * width, "decode_rows: {} values for {} rows", out.len(), rows.len());
    if width == 0 {
        return;
    }
    for (&r, o) in rows.iter().zip(out.chunks_exact_mut(width)) {
        decode_row_with(l, format, &data[r * row_bytes..(r + 1) * row_bytes], o);
    }
}

/// `out[i]` = the bf16 value `b[2i..2i + 2]`.
#[inline(always)]
fn bf16_values<L: V16>(l: L, b: &[u8], out: &mut [f32]) {
    let full = out.len() / LANES * LANES;
    let (head, tail) = out.split_at_mut(full);
    for (o, b) in head.chunks_exact_mut(LANES).zip(b.chunks_exact(2 * LANES)) {
        l.store(l.bf16(b), o);
    }
    for (o, b) in tail.iter_mut().zip(b[2 * full..].chunks_exact(2)) {
        *o = bf16_value([b[0], b[1]]);
    }
}

#[inline(always)]
fn decode_row_with<L: V16>(l: L, format: RowFormat, bytes: &[u8], out: &mut [f32]) {
    assert!(bytes.len() >= format.row_bytes(out.len()), "decode_row: {} bytes for {} values", bytes.len(), out.len());
    match format {
        RowFormat::F32 => {
            for (b, o) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        RowFormat::Bf16 => bf16_values(l, bytes, out),
        RowFormat::Fp8 { rope } => {
            let Fp8Row { nope, codes, rope: rope_in, scales } = Fp8Row::split(bytes, out.len(), rope);
            for ((code_block, o), &s) in
                codes.chunks(FP8_KV_BLOCK).zip(out[..nope].chunks_mut(FP8_KV_BLOCK)).zip(scales)
            {
                let scale = fp8_block_scale(s);
                let full = o.len() / LANES * LANES;
                let (head, tail) = o.split_at_mut(full);
                for (o, c) in head.chunks_exact_mut(LANES).zip(code_block.chunks_exact(LANES)) {
                    l.store(l.e4m3(c, scale), o);
                }
                for (o, &c) in tail.iter_mut().zip(&code_block[full..]) {
                    *o = dsv4_core::quant::E4M3_TO_F32[c as usize] * scale;
                }
            }
            bf16_values(l, rope_in, &mut out[nope..]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lightning indexer.

/// One query of the lightning indexer, laid out for [`index_scores`]: the heads along the
/// lanes, padded to a multiple of 16.
#[derive(Clone, Debug, Default)]
pub struct IndexQuery {
    dh: usize,
    /// Groups of 16 heads.
    groups: usize,
    /// `[dh][groups · 16]`: `qt[d][h] = q[h][d]`, zero for the padding heads.
    qt: Vec<f32>,
    /// `[groups · 16]`: `w[h] · scale`, `-0.0` for the padding heads.
    ws: Vec<f32>,
}

impl IndexQuery {
    /// The query `q` `[nh, dh]` (row-major) with head weights `w` `[nh]` and score scale `scale`.
    pub fn new(q: &[f32], w: &[f32], dh: usize, scale: f32) -> Self {
        let mut iq = IndexQuery::default();
        iq.set(q, w, dh, scale);
        iq
    }

    /// [`IndexQuery::new`] in place, reusing the buffers.
    pub fn set(&mut self, q: &[f32], w: &[f32], dh: usize, scale: f32) {
        let nh = w.len();
        assert_eq!(q.len(), nh * dh, "IndexQuery: q of {} values for {nh} heads of {dh}", q.len());
        let groups = nh.div_ceil(LANES);
        let width = groups * LANES;
        self.dh = dh;
        self.groups = groups;
        self.qt.clear();
        self.qt.resize(dh * width, 0.0);
        for (h, qh) in q.chunks_exact(dh.max(1)).enumerate().take(nh) {
            for (d, &v) in qh.iter().enumerate() {
                self.qt[d * width + h] = v;
            }
        }
        self.ws.clear();
        self.ws.extend(w.iter().map(|w| w * scale));
        self.ws.resize(width, -0.0);
    }

    /// The head width `dh`: the length of a key row.
    pub fn head_dim(&self) -> usize {
        self.dh
    }
}

dispatch! {
    /// `out[j]` = the indexer score of key row `keys[j]` (at least `dh` values each; see the
    /// module docs for the order of operations).
    fn index_scores(q: &IndexQuery, keys: &[&[f32]], out: &mut [f32]) = index_scores_with
}

#[inline(always)]
fn index_scores_with<L: V16>(l: L, q: &IndexQuery, keys: &[&[f32]], out: &mut [f32]) {
    assert_eq!(keys.len(), out.len(), "index_scores: {} keys, {} outputs", keys.len(), out.len());
    pick!(L::INDEX_KEYS, |NK| {
        let full = keys.len() / NK * NK;
        for (k, o) in keys[..full].chunks_exact(NK).zip(out[..full].chunks_exact_mut(NK)) {
            index_tile::<L, NK>(l, q, k, o);
        }
        for (k, o) in keys[full..].chunks_exact(1).zip(out[full..].chunks_exact_mut(1)) {
            index_tile::<L, 1>(l, q, k, o);
        }
    })
}

/// The scores of `NK` keys.
#[inline(always)]
fn index_tile<L: V16, const NK: usize>(l: L, q: &IndexQuery, keys: &[&[f32]], out: &mut [f32]) {
    let (dh, width) = (q.dh, q.groups * LANES);
    let k: [&[f32]; NK] = std::array::from_fn(|j| &keys[j][..dh]);
    let mut sum = [l.splat(-0.0); NK];
    for g in 0..q.groups {
        let mut acc = [l.zero(); NK];
        #[allow(clippy::needless_range_loop)] // d indexes q.qt and every key of the tile
        for d in 0..dh {
            let qv = l.load(&q.qt[d * width + g * LANES..]);
            for j in 0..NK {
                acc[j] = l.fma(qv, l.splat(k[j][d]), acc[j]);
            }
        }
        let ws = l.load(&q.ws[g * LANES..]);
        for j in 0..NK {
            sum[j] = l.add(sum[j], l.mul(l.relu(acc[j]), ws));
        }
    }
    for (o, s) in out.iter_mut().zip(sum) {
        *o = l.hsum(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

dispatch! {
    /// Attention of the heads `q` `[hh, d]` (`hh = sinks.len()`) over the key (= value) rows
    /// `keys` (at least `d` values each) with one sink logit per head, which takes part in the
    /// softmax only: `out[h] = Σ_j softmax_j([q_h·k_j·scale]_j ∪ {sink_h}) · k_j` (see the
    /// module docs for the order of operations). `probs` is scratch (`hh · keys.len()` values).
    fn attend(q: &[f32], keys: &[&[f32]], sinks: &[f32], scale: f32, probs: &mut Vec<f32>, out: &mut [f32])
        = attend_with
}

#[inline(always)]
fn attend_with<L: V16>(
    l: L,
    q: &[f32],
    keys: &[&[f32]],
    sinks: &[f32],
    scale: f32,
    probs: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hh, n) = (sinks.len(), keys.len());
    assert_eq!(q.len(), out.len(), "attend: q of {} values, out of {}", q.len(), out.len());
    if hh == 0 {
        return;
    }
    let d = q.len() / hh;
    assert_eq!(q.len(), hh * d, "attend: q of {} values for {hh} heads", q.len());
    probs.clear();
    probs.resize(hh * n, 0.0);
    // Logits.
    let (tk, th) = L::LOGIT_TILE;
    pick!(tk, |NK| pick!(th, |HC| {
        let (fk, fh) = (n / NK * NK, hh / HC * HC);
        for h0 in (0..fh).step_by(HC) {
            for j0 in (0..fk).step_by(NK) {
                logit_tile::<L, NK, HC>(l, q, d, h0, &keys[j0..], scale, &mut probs[j0..], n);
            }
            for j0 in fk..n {
                logit_tile::<L, 1, HC>(l, q, d, h0, &keys[j0..], scale, &mut probs[j0..], n);
            }
        }
        for h0 in fh..hh {
            for j0 in (0..fk).step_by(NK) {
                logit_tile::<L, NK, 1>(l, q, d, h0, &keys[j0..], scale, &mut probs[j0..], n);
            }
            for j0 in fk..n {
                logit_tile::<L, 1, 1>(l, q, d, h0, &keys[j0..], scale, &mut probs[j0..], n);
            }
        }
    }));
    // Softmax, in place.
    for (row, &sink) in probs.chunks_exact_mut(n.max(1)).zip(sinks) {
        let max = row.iter().fold(sink, |m, &x| m.max(x));
        let mut denom = (sink - max).exp();
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            denom += *x;
        }
        for x in row.iter_mut() {
            *x /= denom;
        }
    }
    // Outputs.
    let (th, tc) = L::OUT_TILE;
    let chunks = d / LANES;
    pick!(th, |HC| pick!(tc, |DC| {
        let (fh, fc) = (hh / HC * HC, chunks / DC * DC);
        for h0 in (0..fh).step_by(HC) {
            for c0 in (0..fc).step_by(DC) {
                out_tile::<L, HC, DC>(l, probs, n, h0, c0, keys, d, out);
            }
            for c0 in fc..chunks {
                out_tile::<L, HC, 1>(l, probs, n, h0, c0, keys, d, out);
            }
        }
        for h0 in fh..hh {
            for c0 in (0..fc).step_by(DC) {
                out_tile::<L, 1, DC>(l, probs, n, h0, c0, keys, d, out);
            }
            for c0 in fc..chunks {
                out_tile::<L, 1, 1>(l, probs, n, h0, c0, keys, d, out);
            }
        }
    }));
    if !d.is_multiple_of(LANES) {
        for h in 0..hh {
            out_tail(l, probs, n, h, keys, d, out);
        }
    }
}

/// Logits of keys `keys[..NK]` for heads `h0..h0 + HC` into `logits[h · n + j]` (`logits`
/// starting at the first key's column).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn logit_tile<L: V16, const NK: usize, const HC: usize>(
    l: L,
    q: &[f32],
    d: usize,
    h0: usize,
    keys: &[&[f32]],
    scale: f32,
    logits: &mut [f32],
    n: usize,
) {
    let qh: [&[f32]; HC] = std::array::from_fn(|h| &q[(h0 + h) * d..(h0 + h + 1) * d]);
    let k: [&[f32]; NK] = std::array::from_fn(|j| &keys[j][..d]);
    let mut acc = [[l.zero(); HC]; NK];
    let full = d / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        let kv: [L::V; NK] = std::array::from_fn(|j| l.load(&k[j][c..]));
        for h in 0..HC {
            let qv = l.load(&qh[h][c..]);
            for j in 0..NK {
                acc[j][h] = l.fma(qv, kv[j], acc[j][h]);
            }
        }
    }
    if full < d {
        let kv: [L::V; NK] = std::array::from_fn(|j| l.load_part(&k[j][full..]));
        for h in 0..HC {
            let qv = l.load_part(&qh[h][full..]);
            for j in 0..NK {
                acc[j][h] = l.fma(qv, kv[j], acc[j][h]);
            }
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        for (h, &a) in acc.iter().enumerate() {
            logits[(h0 + h) * n + j] = l.hsum(a) * scale;
        }
    }
}

/// Outputs of heads `h0..h0 + HC`, values `16·c0 .. 16·(c0 + DC)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn out_tile<L: V16, const HC: usize, const DC: usize>(
    l: L,
    probs: &[f32],
    n: usize,
    h0: usize,
    c0: usize,
    keys: &[&[f32]],
    d: usize,
    out: &mut [f32],
) {
    let (lo, hi) = (c0 * LANES, (c0 + DC) * LANES);
    let p: [&[f32]; HC] = std::array::from_fn(|h| &probs[(h0 + h) * n..(h0 + h + 1) * n]);
    let mut acc = [[l.zero(); DC]; HC];
    for (j, key) in keys.iter().enumerate() {
        let v = &key[lo..hi];
        let vv: [L::V; DC] = std::array::from_fn(|c| l.load(&v[c * LANES..]));
        for h in 0..HC {
            let w = l.splat(p[h][j]);
            for c in 0..DC {
                acc[h][c] = l.fma(w, vv[c], acc[h][c]);
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            let at = (h0 + h) * d + lo + c * LANES;
            l.store(a, &mut out[at..at + LANES]);
        }
    }
}

/// The outputs of head `h` past the last whole chunk of 16 values.
#[inline(always)]
fn out_tail<L: V16>(l: L, probs: &[f32], n: usize, h: usize, keys: &[&[f32]], d: usize, out: &mut [f32]) {
    let lo = d / LANES * LANES;
    let p = &probs[h * n..(h + 1) * n];
    let mut acc = l.zero();
    for (key, &w) in keys.iter().zip(p) {
        acc = l.fma(l.splat(w), l.load_part(&key[lo..d]), acc);
    }
    l.store_part(acc, &mut out[h * d + lo..(h + 1) * d]);
}
