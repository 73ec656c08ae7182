//! BF16 × BF16 → f32 matrix products for prefill, with AVX-512 BF16 `vdpbf16ps`.
//!
//! [`matmul_nt_bf16`] computes `c = a · bᵀ` when every value of `a` and `b` is a BF16 value held
//! in f32 (its low 16 bits are zero): activations the model rounds to BF16, and weight rows widened
//! from BF16. It reads each f32 as the BF16 of its high 16 bits and multiplies them with
//! `vdpbf16ps`, two products per f32 lane, twice the rate of f32 FMAs. `b` is checked while it is
//! packed; a value of `b` that is not a BF16 value makes it return `false` (the caller then runs
//! its f32 GEMM). `a` is trusted (a `debug_assert`).
//!
//! # Arithmetic
//!
//! Intel SDM vol. 2, VDPBF16PS ("Dot Product of BF16 Pairs Accumulated into Packed Single
//! Precision"): for each f32 lane `i`,
//!
//! ```text
//! srcdest.fp32[i] += make_fp32(src1.bf16[2i+1]) * make_fp32(t.bf16[1])
//! srcdest.fp32[i] += make_fp32(src1.bf16[2i+0]) * make_fp32(t.bf16[0])
//! ```
//!
//! each line an FP32 FMA rounding to nearest even, with "input denormals treated as zero and
//! output denormals flushed to zero"; MXCSR is neither consulted nor updated, no exception is
//! raised. The product of two BF16 values is exact (8-bit significands), so each step rounds
//! `sum + a·b` once, like an f32 FMA. Every output `c[i, j]` is one chain of `k` FMAs over
//! `p = 1, 0, 3, 2, 5, 4, …` (odd index of each pair first; for odd `k` the last pair's odd term
//! is a zero); the k blocking below carries the sum in the output tile back into the accumulator,
//! so the chain is the same whatever the blocking, tile position, `m`, `n` or thread. The test
//! `instruction_semantics_match_the_sdm` checks the order, the flushes and the NaN quieting on
//! this CPU.
//!
//! Compared with an f32 GEMM of the same values the result differs
//!
//! * by the summation order only, while no value or partial sum is below 2⁻¹²⁶ in magnitude:
//!   both are within `k · 2⁻²⁴ · Σₚ |a_p · b_p|` of the exact sum (first order);
//! * where denormals appear: a BF16 denormal in `a` or `b` (nonzero, below 2⁻¹²⁶ in magnitude)
//!   counts as zero, and a running sum that rounds to a denormal becomes zero (the f32 GEMM keeps
//!   gradual underflow). Model activations and weights are many orders of magnitude above that.
//!
//! Infinities and NaNs propagate as in f32 (`inf · 0` is NaN); a NaN's payload may differ and a
//! signalling NaN comes out quiet. The sign of a zero result may differ too.
//!
//! # Layout and blocking
//!
//! A 32-bit lane holds a BF16 pair `(x[2p], x[2p+1])`: the high halves of two consecutive f32
//! values of a row, picked with one `vpermt2w` per 32 values. The whole `b` is packed per call
//! into panels of `NR` = 32 output columns, `[k/2][32]` pairs each (zero-padded for odd `k` and
//! for a partial last panel), transposed in registers 16×16 at a time; that is where its values
//! are checked. It lives in a thread-local buffer (`n · k · 2` bytes, reused between calls: 512 KiB
//! for n = 64, k = 4096, read again for every strip of `a` from L2, or L3 when it does not fit);
//! nothing is allocated per tile.
//!
//! The rows of `a` go `MR` = 8 at a time (a strip; rows past `m` are zero). For each strip, `k`
//! is cut into blocks of `KCP` = 256 pairs (512 values): the strip's block is packed
//! (`[8][256]` pairs, 8 KiB, in L1), reading each row of `a` front to back, while the next
//! strip's rows are prefetched into L2 (`prefetcht1`; it kept m = 2048, k = 7168 at ~155
//! GFLOP/s instead of ~125 when `a` does not fit in L3), and multiplied by every panel. The
//! micro-kernel keeps an 8 × 32 f32 tile in 16 zmm accumulators and, per pair index, loads 2 zmm
//! of `b` and broadcasts 8 pairs of `a` (`vdpbf16ps zmm, zmm, m32bcst`): 16 `vdpbf16ps` per 10
//! loads. From the second block on, the tile starts from the sums in `c`. Edge tiles (partial
//! `m` or `n`) run through an 8 × 32 buffer on the stack.

#[cfg(target_arch = "x86_64")]
use super::Isa;

/// The environment variable that says whether the model's GEMMs on BF16 inputs multiply in
/// BF16 on a CPU that can: `on`, `off`, or `auto` (the default: [`chosen`]).
pub const BF16_PRODUCTS_ENV: &str = "DSV4_CPU_BF16_PRODUCTS";

/// Whether the model's GEMMs on BF16 inputs (prefill, and the FP4 experts' decode GEMVs,
/// [`super::fp4_bf16`]) multiply in BF16 here: the CPU can ([`available`]) and
/// [`BF16_PRODUCTS_ENV`] says `on`, or `auto` (or nothing) on a CPU that is not an Intel one.
/// Otherwise they run the f32 kernels on the same (BF16) values: f32 products, another
/// summation order, the same accuracy budget (`docs/precision.md`). Decided once a process.
///
/// Why not on Intel by default: `vdpbf16ps` is worth it where it runs at twice the FLOP rate of
/// f32 FMAs, as on the AMD Zen 4 it was written on (`bf16` prefill 589 against `f32`'s 475
/// tok/s). On the 2-vCPU Intel Xeon measured on 2026-12-05 it ran at half of it (`dsv4 bench`:
/// 192-201 against 405-413 GFLOP/s) and a `bf16` prefill of 512 tokens took 408 tok/s against
/// `f32`'s 686.
pub(crate) fn chosen() -> bool {
    static CHOSEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if !available() {
            return false;
        }
        match std::env::var(BF16_PRODUCTS_ENV).as_deref() {
            Ok("on") => true,
            Ok("off") => false,
            Ok("auto") | Err(_) => !intel_cpu(),
            Ok(other) => {
                eprintln!("warning: {BF16_PRODUCTS_ENV}={other:?} is not one of on, off, auto; using auto");
                !intel_cpu()
            }
        }
    })
}

/// Whether the CPU's vendor string (CPUID leaf 0) is `GenuineIntel`.
fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID exists on every x86-64 CPU. (`__cpuid` is a safe function in newer
        // Rust, hence the allowance.)
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat() == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU (and `DSV4_CPU_ISA`, via `Isa::active() == Isa::Avx512`) can run the BF16
/// GEMM: x86-64 with AVX-512 F/BW/DQ/VL and AVX512_BF16, and `DSV4_CPU_ISA` not lowered below
/// `avx512`. Always `false` on other architectures. (Whether the model uses it: [`chosen`].)
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::active() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m, n] = a[m, k] · bᵀ`, b `[n, k]`, all row-major f32 slices, overwriting c, computed as
/// BF16 × BF16 products with f32 accumulation. The caller guarantees every value of `a` is a
/// BF16 value held in f32 (low 16 bits zero; debug_assert it). Returns false, leaving `c`
/// unspecified, when some value of `b` is not exactly a BF16 value or `available()` is false; the
/// caller then runs its f32 GEMM. Single-threaded (the caller parallelises over blocks of b's rows,
/// typically n = 64..256 rows per call (`ops::prefill_rows_per_task`), m = 64..2048, k = 256..8192).
///
/// A value is a BF16 value iff its low 16 bits are zero (infinities are; a NaN is iff its
/// payload fits in BF16). Each output is one f32 FMA chain over `k` in the order the module
/// documentation gives, with BF16 denormal inputs read as zero and denormal partial sums flushed
/// to zero (Intel SDM vol. 2, VDPBF16PS). With `m == 0` or `n == 0` there is nothing to compute
/// and it returns `true` (when available) without reading `b`; with `k == 0`, `c` is zeroed.
///
/// Panics if a slice is shorter than its shape. Uses a thread-local buffer of `n · k · 2` bytes
/// (rounded up to whole panels), kept between calls.
pub(crate) fn matmul_nt_bf16(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
    use super::holds;
    assert!(
        holds(a.len(), m, k) && holds(b.len(), n, k) && holds(c.len(), m, n),
        "matmul_nt_bf16: slices shorter than their shapes (or a size overflows)"
    );
    if !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `available()` holds, so the CPU supports AVX-512 F/BW and AVX512_BF16.
        unsafe { x86::matmul_nt(&a[..m * k], &b[..n * k], &mut c[..m * n], m, k, n) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::super::x86::{first_lanes, tile_in, tile_out, transpose16, Line, ZERO_LINE};

    /// Rows of `a` per micro-tile.
    const MR: usize = 8;
    /// zmm accumulators per row of a micro-tile.
    pub(in crate::kernels) const NV: usize = 2;
    /// Columns per micro-tile and per packed panel of `b`.
    const NR: usize = 16 * NV;
    /// BF16 pairs of `k` per cache block (a multiple of 16).
    pub(in crate::kernels) const KCP: usize = 256;
    /// 16-pair lines per packed row of an `a` strip.
    pub(in crate::kernels) const STRIP_LINES: usize = KCP / 16;

    /// `vpermt2w` indices picking the high halves of 32 f32 lanes (word 2i+1 of the pair of
    /// vectors): 16 BF16 pairs, low half the even element.
    pub(in crate::kernels) static ODD_WORDS: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            idx[i] = 2 * i as u16 + 1;
            i += 1;
        }
        idx
    };

    thread_local! {
        /// The packed `b` of the last call on this thread: `[n/NR panels][k/2][NV lines]`.
        static PACKED_B: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// [`super::matmul_nt_bf16`] for `m, n, k > 0` and exact slice lengths.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F, BW and AVX512_BF16.
    pub(super) unsafe fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
        let lines = n.div_ceil(NR) * k.div_ceil(2) * NV;
        PACKED_B.with_borrow_mut(|packed| {
            if packed.len() < lines {
                packed.resize(lines, ZERO_LINE);
            }
            // SAFETY: the caller guarantees the CPU features `run` is compiled with.
            unsafe { run(a, b, c, m, k, n, &mut packed[..lines]) }
        })
    }

    /// Packs `b`, then multiplies block by block (see the module documentation).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F, BW and AVX512_BF16; `a.len() == m·k`, `b.len() == n·k`,
    /// `c.len() == m·n`, `packed.len() == ⌈n/NR⌉·⌈k/2⌉·NV`, and `m, n, k > 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, packed: &mut [Line]) -> bool {
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        for (j, panel) in packed.chunks_exact_mut(kp * NV).enumerate() {
            // SAFETY: this function's features; the panel has `kp·NV` lines.
            if !unsafe { pack_b_panel(b, k, n, j, panel) } {
                return false;
            }
        }
        let mut strip = [ZERO_LINE; MR * STRIP_LINES];
        let mut edge = [0f32; MR * NR];
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            for pk0 in (0..kp).step_by(KCP) {
                let kcp = KCP.min(kp - pk0);
                let load = pk0 > 0;
                // SAFETY: this function's features; rows i0.. of `a`, mr of them in this strip,
                // `pk0 + kcp <= ⌈k/2⌉`.
                unsafe { pack_a_strip::<MR>(&a[i0 * k..], k, mr, pk0, kcp, &mut strip) };
                for j in 0..panels {
                    let (j0, nr) = (j * NR, NR.min(n - j * NR));
                    let panel = &packed[(j * kp + pk0) * NV..(j * kp + pk0 + kcp) * NV];
                    let (at, size, shape) = ((i0, j0), (mr, nr), (MR, NR));
                    let (p, ld) = tile_in(c, n, at, size, shape, load, &mut edge);
                    // SAFETY: this function's features; `tile_in` gives MR rows of NR writable
                    // values at stride `ld` (inside `c` for a whole tile, else the edge buffer).
                    unsafe { tile(&strip, panel, kcp, p, ld, load) };
                    tile_out(c, n, at, size, shape, &edge);
                }
            }
        }
        true
    }

    /// Load masks for the `rem` (≥ 1) values of a row left from a 32-value chunk on.
    #[inline(always)]
    fn chunk_masks(rem: usize) -> (__mmask16, __mmask16) {
        (first_lanes(rem), first_lanes(rem.saturating_sub(16)))
    }

    /// Loads the up to 32 values of a row at `p` (`rem` of them valid, zero past them) and
    /// returns them as 16 BF16 pairs, with the lanes whose low 16 bits are not zero.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F and BW; `min(rem, 32)` f32 values are readable at `p`.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn load_pairs(p: *const f32, rem: usize, odd_words: __m512i) -> (__m512i, __mmask16) {
        let (mlo, mhi) = chunk_masks(rem);
        // SAFETY: masked loads read only the lanes the masks enable, all inside the row
        // (`wrapping_add` since the second half may start past it, then with an empty mask).
        unsafe {
            let lo = _mm512_maskz_loadu_epi32(mlo, p.cast());
            let hi = _mm512_maskz_loadu_epi32(mhi, p.wrapping_add(16).cast());
            let low_bits = _mm512_set1_epi32(0xFFFF);
            let inexact = _mm512_test_epi32_mask(lo, low_bits) | _mm512_test_epi32_mask(hi, low_bits);
            (_mm512_permutex2var_epi16(lo, odd_words, hi), inexact)
        }
    }

    /// Packs rows `j·NR .. j·NR + NR` of `b` (zero past `n`) as `[⌈k/2⌉][NR]` BF16 pairs; `false`
    /// at the first value that is not a BF16 value.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F and BW; `b.len() == n·k`, `j·NR < n`, `out.len() == ⌈k/2⌉·NV`.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn pack_b_panel(b: &[f32], k: usize, n: usize, j: usize, out: &mut [Line]) -> bool {
        let kp = k.div_ceil(2);
        debug_assert!(b.len() == n * k && j * NR < n && out.len() == kp * NV);
        // SAFETY: AVX-512 F/BW as the caller guarantees; every load reads inside `b` (row < n,
        // `rem` values from column k0 < k), every store writes a line of `out` (pair < kp).
        unsafe {
            let odd_words = _mm512_loadu_si512(ODD_WORDS.as_ptr().cast());
            let mut rows = [_mm512_setzero_si512(); 16];
            for q in 0..kp.div_ceil(16) {
                let k0 = 32 * q;
                let pairs = 16.min(kp - 16 * q);
                for g in 0..NV {
                    let mut inexact: __mmask16 = 0;
                    for (r, row) in rows.iter_mut().enumerate() {
                        let jr = j * NR + g * 16 + r;
                        *row = if jr < n {
                            let (v, bad) = load_pairs(b.as_ptr().add(jr * k + k0), k - k0, odd_words);
                            inexact |= bad;
                            v
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    if inexact != 0 {
                        return false;
                    }
                    let t = transpose16(&rows);
                    for (pp, v) in t.iter().take(pairs).enumerate() {
                        let line: *mut Line = &mut out[(16 * q + pp) * NV + g];
                        _mm512_store_si512(line.cast(), *v);
                    }
                }
            }
        }
        true
    }

    /// Packs pairs `pk0 .. pk0 + kcp` of the first `mr` rows of `rows` (the rows of `a` from the
    /// strip's first on) into `strip`, row `r` at lines `r·STRIP_LINES ..`; rows `mr .. R`
    /// become zero. Prefetches the same columns of the next strip's rows. `R` is the strip's
    /// rows: [`MR`] here, 32 for the AMX kernel (`super::super::amx`).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F and BW; `rows.len()` is a multiple of `k` and at least `mr·k`,
    /// `1 <= mr <= R`, `kcp <= KCP`, `pk0 + kcp <= ⌈k/2⌉` (`pk0` a multiple of 16), and
    /// `strip.len() == R·STRIP_LINES`.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn pack_a_strip<const R: usize>(
        rows: &[f32],
        k: usize,
        mr: usize,
        pk0: usize,
        kcp: usize,
        strip: &mut [Line],
    ) {
        debug_assert!(rows.len() >= mr * k && kcp <= KCP && pk0 + kcp <= k.div_ceil(2));
        debug_assert!(strip.len() == R * STRIP_LINES);
        // SAFETY: AVX-512 F/BW as the caller guarantees; the loads read inside row r < mr of
        // `rows` (`rem` values from column k0 < k), the stores write lines of `strip`.
        unsafe {
            let odd_words = _mm512_loadu_si512(ODD_WORDS.as_ptr().cast());
            for r in 0..R {
                for q in 0..kcp.div_ceil(16) {
                    let v = if r < mr {
                        let k0 = 2 * pk0 + 32 * q;
                        if (R + r) * k < rows.len() {
                            // The next strip's row, same columns, into L2 (a hint: the second
                            // line may lie past the end of `a`; a prefetch never faults).
                            let next = rows.as_ptr().wrapping_add((R + r) * k + k0);
                            _mm_prefetch::<_MM_HINT_T1>(next.cast());
                            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(16).cast());
                        }
                        let (v, inexact) = load_pairs(rows.as_ptr().add(r * k + k0), k - k0, odd_words);
                        debug_assert!(inexact == 0, "a value of `a` is not a BF16 value");
                        v
                    } else {
                        _mm512_setzero_si512()
                    };
                    let line: *mut Line = &mut strip[r * STRIP_LINES + q];
                    _mm512_store_si512(line.cast(), v);
                }
            }
        }
    }

    /// Reinterprets 16 BF16 pairs.
    ///
    /// # Safety
    ///
    /// None beyond the CPU supporting AVX-512 F (both types are 64-byte vectors).
    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        // SAFETY: `__m512i` and `__m512bh` are both 512-bit vectors; every bit pattern is valid.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The micro-kernel: the MR × NR tile at `c` (row stride `ldc`) becomes (`load`: the tile
    /// plus) the products of the strip's `kcp` pairs with the panel's.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F and AVX512_BF16; `panel.len() >= kcp·NV`, `kcp <= KCP`, and
    /// `c` points at MR rows of NR writable f32 with row stride `ldc`.
    #[inline(always)]
    unsafe fn tile(strip: &[Line; MR * STRIP_LINES], panel: &[Line], kcp: usize, c: *mut f32, ldc: usize, load: bool) {
        debug_assert!(panel.len() >= kcp * NV && kcp <= KCP);
        // SAFETY: AVX-512 F/BF16 as the caller guarantees; the strip reads stay in row r's
        // KCP pairs (p < kcp <= KCP), the panel reads in its kcp·NV lines, and the tile's loads
        // and stores in the MR × NR block the caller vouches for.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            if load {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                    }
                }
            }
            let ap = strip.as_ptr().cast::<u32>();
            let bp = panel.as_ptr();
            for p in 0..kcp {
                let mut bv = [bh(_mm512_setzero_si512()); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = bh(_mm512_load_si512(bp.add(p * NV + v).cast()));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = bh(_mm512_set1_epi32(*ap.add(r * KCP + p) as i32));
                    for (x, &bw) in row.iter_mut().zip(&bv) {
                        *x = _mm512_dpbf16_ps(*x, bw, av);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * ldc + 16 * v), *x);
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) mod testing {
        use super::*;

        /// [`transpose16`] on plain arrays.
        ///
        /// # Safety
        ///
        /// The CPU supports AVX-512 F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn transpose(m: &[[u32; 16]; 16]) -> [[u32; 16]; 16] {
            let mut r = [_mm512_setzero_si512(); 16];
            let mut out = [[0u32; 16]; 16];
            // SAFETY: AVX-512 F as the caller guarantees; loads and stores of 16 u32 arrays.
            unsafe {
                for (x, row) in r.iter_mut().zip(m) {
                    *x = _mm512_loadu_si512(row.as_ptr().cast());
                }
                for (row, t) in out.iter_mut().zip(transpose16(&r)) {
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), t);
                }
            }
            out
        }

        /// One `vdpbf16ps` on plain arrays: `s + a·b` pair-wise.
        ///
        /// # Safety
        ///
        /// The CPU supports AVX-512 F and AVX512_BF16.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub(in super::super) unsafe fn dpbf16(s: &[f32; 16], a: &[u32; 16], b: &[u32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 F/BF16 as the caller guarantees; loads and stores of 16-lane arrays.
            unsafe {
                let (va, vb) = (bh(_mm512_loadu_si512(a.as_ptr().cast())), bh(_mm512_loadu_si512(b.as_ptr().cast())));
                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_dpbf16_ps(_mm512_loadu_ps(s.as_ptr()), va, vb));
            }
            out
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use dsv4_core::test_data::Rng;

    /// A random BF16 value held in f32: uniform-ish in (-4, 4), exponents spread, some zeros.
    /// (Also the AMX kernel's test values, `super::super::amx`.)
    pub(in crate::kernels) fn bf16(rng: &mut Rng) -> f32 {
        let x = rng.next_u64();
        if x.is_multiple_of(32) {
            return if x & 64 == 0 { 0.0 } else { -0.0 };
        }
        let v = ((x >> 7) as f32 / (1u64 << 23) as f32 - 1.0) * 4.0;
        f32::from_bits(v.to_bits() & 0xFFFF_0000)
    }

    /// A small integer in -8..=8.
    pub(in crate::kernels) fn int(rng: &mut Rng) -> f32 {
        rng.ints(1, 8)[0]
    }

    /// Returns whether the BF16 path runs here; if not, says that only `false` was checked.
    fn runs(test: &str) -> bool {
        if available() {
            return true;
        }
        eprintln!(
            "{test}: the BF16 GEMM is not available here (no AVX512_BF16, or {} below avx512): only \
             checked that matmul_nt_bf16 returns false",
            super::super::ISA_ENV
        );
        false
    }

    /// Whether this CPU runs AVX-512 F/BW and AVX512_BF16 (whatever `DSV4_CPU_ISA` says); if not,
    /// says that the test checked nothing.
    #[cfg(target_arch = "x86_64")]
    fn cpu_has_bf16(test: &str) -> bool {
        let has = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16");
        if !has {
            eprintln!("{test}: SKIPPED, this CPU has no AVX-512 BF16: nothing checked");
        }
        has
    }

    /// The f64 sum and the sum of magnitudes of row `i` of `a` times row `j` of `b`.
    pub(in crate::kernels) fn reference(a: &[f32], b: &[f32], k: usize, i: usize, j: usize) -> (f64, f64) {
        let (ar, br) = (&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
        ar.iter().zip(br).fold((0.0, 0.0), |(s, sa), (&x, &y)| {
            let p = x as f64 * y as f64;
            (s + p, sa + p.abs())
        })
    }

    const MS: [usize; 5] = [1, 7, 13, 64, 100];
    const NS: [usize; 6] = [1, 31, 32, 33, 64, 65];
    const KS: [usize; 9] = [0, 1, 2, 3, 127, 128, 129, 1000, 1025];

    #[test]
    fn random_bf16_products_are_within_the_summation_bound() {
        let mut rng = Rng(1);
        let run = runs("random_bf16_products_are_within_the_summation_bound");
        for m in MS {
            for n in NS {
                for k in KS {
                    let a: Vec<f32> = (0..m * k).map(|_| bf16(&mut rng)).collect();
                    let b: Vec<f32> = (0..n * k).map(|_| bf16(&mut rng)).collect();
                    let mut c = vec![f32::NAN; m * n];
                    let ok = matmul_nt_bf16(&a, &b, &mut c, m, k, n);
                    assert_eq!(ok, run, "({m},{k},{n})");
                    if !run {
                        continue;
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (want, mag) = reference(&a, &b, k, i, j);
                            // Each of the k FMAs rounds once (relative error ≤ 2⁻²⁴, the
                            // products being exact and the |partial sums| ≤ Σ|a_p b_p|), so
                            // |err| ≤ γ_k Σ|a_p b_p| with γ_k = k·u/(1 − k·u) ≤ 1.001·k·2⁻²⁴
                            // for k ≤ 1025; the f64 reference adds k·2⁻⁵³ relative, and no
                            // value here (|x| ≥ 2⁻²³ or 0, products ≥ 2⁻⁴⁶) is near denormal.
                            let bound = 1.001 * k as f64 * 2f64.powi(-24) * mag + mag * 1e-12;
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= bound,
                                "({m},{k},{n}) at ({i},{j}): got {got}, want {want}, bound {bound}"
                            );
                            if k == 0 {
                                assert_eq!(c[i * n + j].to_bits(), 0, "k = 0 gives +0");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_integer_products_are_exact() {
        let mut rng = Rng(2);
        let run = runs("small_integer_products_are_exact");
        for m in MS {
            for n in NS {
                for k in [1, 2, 3, 31, 129, 512, 513, 1000, 2049] {
                    // |a|, |b| ≤ 8 and k ≤ 2049: every partial sum is an integer below 2¹⁸,
                    // exact in f32, so any summation order gives the f64 sum bit for bit.
                    let a: Vec<f32> = (0..m * k).map(|_| int(&mut rng)).collect();
                    let b: Vec<f32> = (0..n * k).map(|_| int(&mut rng) * 0.25).collect();
                    let mut c = vec![f32::NAN; m * n];
                    assert_eq!(matmul_nt_bf16(&a, &b, &mut c, m, k, n), run, "({m},{k},{n})");
                    if !run {
                        continue;
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want = reference(&a, &b, k, i, j).0;
                            assert_eq!(c[i * n + j] as f64, want, "({m},{k},{n}) at ({i},{j})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_value_of_b_that_is_not_bf16_is_refused() {
        let mut rng = Rng(3);
        let run = runs("a_value_of_b_that_is_not_bf16_is_refused");
        for (m, k, n) in [(5, 37, 33), (8, 1000, 64), (3, 1, 1), (9, 64, 70)] {
            let a: Vec<f32> = (0..m * k).map(|_| int(&mut rng)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| int(&mut rng)).collect();
            for at in [0, (n * k) / 2, n * k - 1] {
                for low in [1u32, 0x8000, 0xFFFF] {
                    let mut bad = b.clone();
                    bad[at] = f32::from_bits(bad[at].to_bits() | low);
                    let mut c = vec![0f32; m * n];
                    assert!(!matmul_nt_bf16(&a, &bad, &mut c, m, k, n), "({m},{k},{n}) bad at {at}");
                }
            }
            // A NaN whose payload does not fit in BF16 is refused too.
            let mut bad = b.clone();
            bad[n * k / 3] = f32::from_bits(0x7FC0_0001);
            let mut c = vec![0f32; m * n];
            assert!(!matmul_nt_bf16(&a, &bad, &mut c, m, k, n));
            // And the untouched b goes through, correctly.
            let mut c = vec![f32::NAN; m * n];
            assert_eq!(matmul_nt_bf16(&a, &b, &mut c, m, k, n), run);
            if run {
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(c[i * n + j] as f64, reference(&a, &b, k, i, j).0, "({m},{k},{n}) at ({i},{j})");
                    }
                }
            }
        }
    }

    #[test]
    fn infinities_nans_and_denormals() {
        let run = runs("infinities_nans_and_denormals");
        let (m, k, n) = (3, 5, 4);
        let a = vec![1.0f32; m * k];
        let mut b = vec![0.5f32; n * k];
        b[k + 2] = f32::INFINITY; // column 1: +inf
        b[2 * k] = f32::from_bits(0x7FC1_0000); // column 2: a BF16 NaN
        b[3 * k + 4] = f32::from_bits(0x0001_0000); // column 3: a BF16 denormal, 2⁻¹³³
        let mut c = vec![0f32; m * n];
        assert_eq!(matmul_nt_bf16(&a, &b, &mut c, m, k, n), run);
        if !run {
            return;
        }
        for i in 0..m {
            assert_eq!(c[i * n], 2.5);
            assert_eq!(c[i * n + 1], f32::INFINITY);
            assert!(c[i * n + 2].is_nan());
            // The denormal counts as zero: 4 · 0.5 exactly (an f32 GEMM would round
            // 2 + 2⁻¹³³ to 2 as well; the zero shows below, alone).
            assert_eq!(c[i * n + 3], 2.0);
        }
        // A lone denormal product: vdpbf16ps gives +0 where f32 gives 2⁻¹³³.
        let (a1, b1) = ([1.0f32], [f32::from_bits(0x0001_0000)]);
        let mut c1 = [f32::NAN];
        assert!(matmul_nt_bf16(&a1, &b1, &mut c1, 1, 1, 1));
        assert_eq!(c1[0].to_bits(), 0);
        // Normal inputs whose product (2⁻¹⁴⁰) is denormal: flushed to zero.
        let (a2, b2) = ([2f32.powi(-70)], [2f32.powi(-70)]);
        assert!(matmul_nt_bf16(&a2, &b2, &mut c1, 1, 1, 1));
        assert_eq!(c1[0].to_bits(), 0);
    }

    #[test]
    fn empty_shapes() {
        let run = runs("empty_shapes");
        let mut c = [f32::NAN; 6];
        assert_eq!(matmul_nt_bf16(&[], &[], &mut c, 2, 0, 3), run);
        if run {
            assert!(c.iter().all(|x| x.to_bits() == 0));
        }
        assert_eq!(matmul_nt_bf16(&[], &[1.0; 4], &mut [], 0, 4, 1), run);
        assert_eq!(matmul_nt_bf16(&[1.0; 4], &[], &mut [], 1, 4, 0), run);
    }

    /// The order of the two products and the flushes, as the module documentation states them
    /// (Intel SDM, VDPBF16PS), on this CPU.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn instruction_semantics_match_the_sdm() {
        if !cpu_has_bf16("instruction_semantics_match_the_sdm") {
            return;
        }
        let (one, two24) = (0x3F80u32, 0x4B80u32); // BF16 1 and 2²⁴
        let (mut s, mut a, mut b) = ([0f32; 16], [0u32; 16], [0u32; 16]);
        // Lane 0: 1 + 2²⁴·1 (odd pair element first) rounds to 2²⁴, then + 1·1 rounds to 2²⁴
        // again; the even element first, or one rounding of the whole, would give 2²⁴ + 2.
        s[0] = 1.0;
        (a[0], b[0]) = ((two24 << 16) | one, (one << 16) | one);
        // Lane 1: a denormal accumulator is read as zero.
        s[1] = f32::from_bits(1);
        // Lane 2: a denormal BF16 input (2⁻¹³³) is read as zero.
        (s[2], a[2], b[2]) = (0.0, 0x0001, one);
        // Lane 3: a product of normal BF16s that is denormal (2⁻¹⁴⁰) is flushed.
        (a[3], b[3]) = (0x1C80, 0x1C80);
        // Lane 4: an unrounded product: 2⁻¹²⁶ + 2⁻¹⁴⁰ is normal and exact.
        (s[4], a[4], b[4]) = (f32::MIN_POSITIVE, 0x1C80, 0x1C80);
        // Lane 5: a signalling NaN comes out quiet.
        (s[5], a[5], b[5]) = (1.0, 0x7F81, one);
        // SAFETY: `cpu_has_bf16` checked AVX-512 F and AVX512_BF16.
        let out = unsafe { x86::testing::dpbf16(&s, &a, &b) };
        assert_eq!(out[0], 16777216.0);
        assert_eq!(out[1].to_bits(), 0);
        assert_eq!(out[2].to_bits(), 0);
        assert_eq!(out[3].to_bits(), 0);
        assert_eq!(out[4], f32::MIN_POSITIVE + 2f32.powi(-140));
        assert_eq!(out[5].to_bits(), 0x7FC1_0000);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_transposes() {
        if !cpu_has_bf16("transpose16_transposes") {
            return;
        }
        let mut m = [[0u32; 16]; 16];
        for (i, row) in m.iter_mut().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = (i * 16 + j) as u32;
            }
        }
        // SAFETY: `cpu_has_bf16` checked AVX-512 F.
        let t = unsafe { x86::testing::transpose(&m) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[i][j], m[j][i], "({i},{j})");
            }
        }
    }

    /// GFLOP/s of `matmul_nt_bf16` (packing included) against the f32 path (`gemm::matmul_nt`), one
    /// thread. `cargo test -p dsv4-backend-cpu --release bf16_gemm -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_bf16_gemm() {
        let run = runs("bench_bf16_gemm");
        let mut rng = Rng(4);
        for (m, k, n) in [(512, 4096, 64), (512, 1024, 64), (2048, 7168, 64), (64, 4096, 64)] {
            let a: Vec<f32> = (0..m * k).map(|_| bf16(&mut rng)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| bf16(&mut rng)).collect();
            let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            let flop = 2.0 * (m * k * n) as f64;
            let reps = (4e9 / flop).ceil() as usize;
            let best = |f: &mut dyn FnMut()| {
                f();
                (0..reps)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let t32 = best(&mut || crate::gemm::matmul_nt(&a, &b, &mut c2, m, k, n));
            let line = format!("m={m} k={k} n={n}: f32 (gemm::matmul_nt) {:.1} GFLOP/s", flop / t32 * 1e-9);
            if run {
                let t16 = best(&mut || assert!(matmul_nt_bf16(&a, &b, &mut c1, m, k, n)));
                println!("{line}, bf16 {:.1} GFLOP/s ({:.2}x)", flop / t16 * 1e-9, t32 / t16);
                let worst = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                println!("  max |bf16 - f32 gemm| = {worst:e}");
            } else {
                println!("{line}, bf16 not available");
            }
        }
    }
}
