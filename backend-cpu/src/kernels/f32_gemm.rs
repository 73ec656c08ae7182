//! f32 matrix products for prefill with AVX-512 F: `c = a · bᵀ`, one FMA chain per output.
//!
//! The `gemm` crate (the general path, [`crate::gemm`]) runs its AVX2 micro-kernel on a stable
//! compiler (its AVX-512 one needs nightly). This kernel is [`super::bf16_gemm`]'s blocking with
//! f32 lanes: an 8 × 32 tile of outputs in 16 zmm accumulators, and per `k` index two zmm of `b`
//! and eight broadcasts of `a`, 16 FMAs per 10 loads. On one Zen 4 core (`bench_f32_gemm`, the
//! prefill shapes of the 0.75 B benchmark model: m ≈ 100 tokens per routed expert or 512, k =
//! 512 to 4096, n = 24 to 256 weight rows a task) it ran at 75-110 GFLOP/s, 1.0 to 1.6 times the
//! `gemm` crate in the same run, against a peak of about 118.
//!
//! # Arithmetic
//!
//! Every output is `c[i, j] = fma(a[i, k−1], b[j, k−1], … fma(a[i, 1], b[j, 1], fma(a[i, 0],
//! b[j, 0], +0)) …)`: one IEEE f32 FMA chain over `p = 0, 1, …, k − 1` from `+0`, whatever
//! the blocking (the k blocks carry the sum through the output tile), tile position, `m`, `n`
//! or thread. So the bits of a product do not depend on how a matrix is cut into tasks (the
//! `gemm` crate's do), and a scalar `f32::mul_add` loop gives them exactly (NaN payloads
//! aside): the tests compare bit for bit. Denormals are kept (MXCSR's defaults, Rust's).
//!
//! Compared with the exact sum, the error is within `k · 2⁻²⁴ · Σₚ |a_p · b_p|` (first order),
//! the bound of any sequential f32 sum.
//!
//! # Layout and blocking
//!
//! `b` is packed into panels of `NR` = 32 output columns, `[k][32]` f32 each (zero past `n`),
//! transposed in registers 16 × 16 at a time, 8 panels (256 columns) at a time into a
//! thread-local buffer (up to `256 · k · 4` bytes, kept between calls). For each such block, the
//! rows of `a` go `MR` = 8 at a time (a strip), read in place (eight sequential streams); for
//! each strip, `k` is cut into blocks of `KC` = 256, and the strip's block is multiplied by every
//! panel's block (32 KiB each, 256 KiB for the 8). A last strip of fewer than 8 rows is copied
//! into an `[8][256]` buffer, zero past `m`. Edge tiles (partial `m` or `n`) run through an
//! 8 × 32 buffer on the stack; a last panel of at most 16 columns runs a tile of one zmm per
//! row (half the work of a whole one).
//!
//! [`matmul_nt_widened_weights`] is the layout for a weight held packed (FP4, FP8) against
//! fewer input rows than weight rows: the inputs are the panels, the weight's rows the strips,
//! each strip widened into a small buffer as it comes and multiplied over the whole `k`, the
//! finished tiles stored transposed.

#[cfg(target_arch = "x86_64")]
use super::Isa;

/// The fewest rows of `a` the kernel takes (one tile's); fewer go to the `gemm` crate: the kernel
/// packs all of `b` for them, which on one row costs ten times the products (m = 1, k = 512,
/// n = 8192: 3.2 ms against 0.3).
pub(crate) const MIN_ROWS: usize = 8;

/// Whether this CPU (and `DSV4_CPU_ISA`, via `Isa::active() == Isa::Avx512`) runs the kernel:
/// x86-64 with AVX-512 F/BW/DQ/VL, `DSV4_CPU_ISA` not lowered below `avx512`. Always `false` on
/// other architectures.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::active() == Isa::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m, n] = a[m, k] · bᵀ`, b `[n, k]`, all row-major, overwriting c, each output one f32 FMA
/// chain over `k` (module documentation). Returns `false`, leaving `c` untouched, when
/// [`available`] is false or `0 < m < MIN_ROWS` (fewer rows of `a` than a tile: packing `b`
/// would cost more than the products); the caller then runs the `gemm` crate. Single-threaded
/// (the caller parallelises over blocks of b's rows). With `m == 0` or `n == 0` it returns
/// `true` without reading anything; with `k == 0`, `c` is zeroed.
///
/// Panics if a slice is shorter than its shape (or a shape's size overflows). Uses a
/// thread-local buffer of up to `min(n, 256) · k · 4` bytes, kept between calls.
pub(crate) fn matmul_nt_f32(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
    use super::holds;
    assert!(
        holds(a.len(), m, k) && holds(b.len(), n, k) && holds(c.len(), m, n),
        "matmul_nt_f32: slices shorter than their shapes (or a size overflows)"
    );
    if !available() || (m > 0 && m < MIN_ROWS) {
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
        // SAFETY: `available()` holds, so the CPU supports AVX-512 F; the slices are cut to
        // exactly `m·k`, `n·k` and `m·n` values (checked above), and `m, n, k > 0`.
        unsafe { x86::matmul_nt(&a[..m * k], &b[..n * k], &mut c[..m * n], m, k, n) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m, n] = a[m, k] · wᵀ` for a weight `w` `[n, k]` whose rows are widened on demand:
/// `widen(j, row)` writes row `j`'s `k` values (a weight held as FP4, FP8 or BF16), for every
/// row once. For fewer input rows than weight rows (a routed expert's tokens against a block of
/// its weight rows: about 96 against 256 in a 512-token chunk of the 0.75 B benchmark model).
/// Each output is the kernel's FMA chain over `k` (module documentation): the bits of
/// `matmul_nt_f32` on the widened matrix.
///
/// The kernel runs on swapped operands (it packs `a`, the smaller, as panels) with the weight
/// as its strips: each strip of 8 weight rows is widened into a small buffer as it comes and
/// multiplied by every panel over the whole `k` at once, and each finished tile is stored
/// transposed into `c`. Where the caller used to widen the whole block (1 MiB of f32 for 256
/// rows of 1024), run the kernel into a `[n, m]` buffer and transpose that, a routed-expert
/// prefill spent about 6% of its time in the transpose alone (`tests/moe_bench.rs`, `perf`).
///
/// `widen` must not call the f32 GEMM itself (it runs while this thread's packing buffer is
/// borrowed; a nested call would panic).
///
/// Returns `false`, calling nothing, when the kernel does not run here ([`available`]), when
/// `m < MIN_ROWS` or `m >= n` (not this shape), or when `a`'s panels (`⌈m/32⌉ · k · 128`
/// bytes) exceed 1 MiB (they would not stay in L2 while every strip passes over them): the
/// caller then widens the rows itself. Panics if `a` or `c` is shorter than its shape.
pub(crate) fn matmul_nt_widened_weights(
    a: &[f32],
    widen: &mut dyn FnMut(usize, &mut [f32]),
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) -> bool {
    use super::holds;
    assert!(
        holds(a.len(), m, k) && holds(c.len(), m, n),
        "matmul_nt_widened_weights: slices shorter than their shapes (or a size overflows)"
    );
    if !available() || m < MIN_ROWS || m >= n || k == 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if !x86::widened_panels_fit(m, k) {
            return false;
        }
        // SAFETY: the CPU supports AVX-512 F (`available`); the slices are cut to exactly
        // `m·k` and `m·n` values (checked above); `0 < MIN_ROWS <= m < n` and `k > 0`. Any
        // number of panels is fine: the packing buffer is sized to them.
        unsafe { x86::matmul_widened_rhs(&a[..m * k], widen, &mut c[..m * n], m, k, n) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = widen;
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::super::x86::{first_lanes, on_tile, transpose16, Line, ZERO_LINE};

    /// Rows of `a` per micro-tile.
    const MR: usize = 8;
    /// zmm accumulators per row of a micro-tile.
    const NV: usize = 2;
    /// Columns per micro-tile and per packed panel of `b`.
    const NR: usize = 16 * NV;
    /// Values of `k` per cache block (a multiple of 16).
    const KC: usize = 256;

    /// The `[MR][KC]` values of a partial strip of `a` (rows past `m` zero), aligned to a cache
    /// line.
    #[repr(C, align(64))]
    struct Strip([f32; MR * KC]);

    /// Panels of `b` packed and multiplied together (256 columns): a `k`-block of them (256 KiB)
    /// stays in L2 while every strip of `a` passes over it. (With all of a wide `b` at once,
    /// e.g. V4-Flash's 1024-row `wo_a` groups, the strips read it from L3 and the kernel ran at
    /// 1.3 to 1.6 times the `gemm` crate's time.)
    const BLOCK_PANELS: usize = 8;

    /// Packed panels larger than this put the k blocks outermost (see `run`).
    const K_OUTER_BYTES: usize = 1 << 20;

    thread_local! {
        /// The packed panels of `b` of the current block: `[BLOCK_PANELS][k][NV lines]`.
        static PACKED_B: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// [`super::matmul_nt_f32`] for `m, n, k > 0` and exact slice lengths.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F; `a.len() == m·k`, `b.len() == n·k`, `c.len() == m·n`, and
    /// `m, n, k > 0`.
    pub(super) unsafe fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
        let lines = n.div_ceil(NR).min(BLOCK_PANELS) * k * NV;
        // SAFETY: the caller guarantees the CPU features `run` is compiled with, the slice
        // lengths and `m, n, k > 0`; `packed` holds `lines` lines.
        with_packed(lines, |packed| unsafe { run(a, b, c, m, k, n, packed) })
    }

    /// `f` on this thread's first `lines` lines of [`PACKED_B`], grown to them if needed (and
    /// kept, as a GEMM library keeps its packing buffer). Panics if `f` re-enters.
    fn with_packed<R>(lines: usize, f: impl FnOnce(&mut [Line]) -> R) -> R {
        PACKED_B.with_borrow_mut(|packed| {
            if packed.len() < lines {
                packed.resize(lines, ZERO_LINE);
            }
            f(&mut packed[..lines])
        })
    }

    /// Whether `m` input rows' panels (`⌈m/NR⌉ · k · NR · 4` bytes) fit in [`K_OUTER_BYTES`]:
    /// [`matmul_widened_rhs`] passes every strip over all of them, so they must stay in L2.
    pub(super) fn widened_panels_fit(m: usize, k: usize) -> bool {
        m.div_ceil(NR) * k * NR * 4 <= K_OUTER_BYTES
    }

    /// Packs `b` a block of panels at a time, and multiplies each block by every strip of `a`
    /// (see the module documentation).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F; `a.len() == m·k`, `b.len() == n·k`, `c.len() == m·n`,
    /// `packed.len() == min(⌈n/NR⌉, BLOCK_PANELS)·k·NV`, and `m, n, k > 0`.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, packed: &mut [Line]) {
        let panels = n.div_ceil(NR);
        let mut strip = Strip([0.0; MR * KC]);
        let mut edge = [0f32; MR * NR];
        for jb in (0..panels).step_by(BLOCK_PANELS) {
            let block = jb..panels.min(jb + BLOCK_PANELS);
            for (j, panel) in block.clone().zip(packed.chunks_exact_mut(k * NV)) {
                // SAFETY: this function's features; the panel has `k·NV` lines, `j·NR < n`.
                unsafe { pack_b_panel(b, k, n, j, panel) };
            }
            // Strips of `a` outermost while the block's packed panels (`panels · k · 128`
            // bytes) fit in L2 alongside the rest: each strip then streams its rows in order.
            // Past that (k > 2048 for 8 panels on a 2 MiB L2), k blocks go outermost, so that one
            // k block of the panels (256 KiB) stays in L2 while every strip passes over it: on
            // one Intel core (2 MiB L2) m = 512, k = 4096, n = 1024 went from 1.17 to 1.5 times
            // the `gemm` crate, while narrow or short-k shapes lost 5-9% in that order. Each
            // output sums its k blocks in ascending order either way: the bits are the same.
            let strips = (0..m).step_by(MR);
            let k_blocks = (0..k).step_by(KC);
            let order: Vec<(usize, usize)> = if block.len() * k * NR * 4 > K_OUTER_BYTES {
                k_blocks.flat_map(|k0| strips.clone().map(move |i0| (i0, k0))).collect()
            } else {
                strips.flat_map(|i0| k_blocks.clone().map(move |k0| (i0, k0))).collect()
            };
            for (i0, k0) in order {
                let (mr, kc, load) = (MR.min(m - i0), KC.min(k - k0), k0 > 0);
                // A full strip is read in place (row stride k); a partial one is copied into
                // `strip` with zero rows after it.
                let (ap, lda) = if mr == MR {
                    (a[i0 * k + k0..].as_ptr(), k)
                } else {
                    pack_a_strip(&a[i0 * k..], k, mr, k0, kc, &mut strip);
                    (strip.0.as_ptr(), KC)
                };
                for j in block.clone() {
                    let (j0, nr) = (j * NR, NR.min(n - j * NR));
                    let p0 = (j - jb) * k + k0;
                    let panel = &packed[p0 * NV..(p0 + kc) * NV];
                    // SAFETY (of the `tile` call): this function's features; `ap` is rows
                    // i0..i0+MR <= m of `a` from column k0 (k0 + kc <= k, so row r's kc
                    // values lie inside `a[i0·k + k0..]`) or the strip buffer for a partial
                    // strip; `on_tile` hands it MR rows of NR writable values at stride `ld`
                    // (inside `c` for a whole tile, else its edge buffer). A last panel of at
                    // most 16 columns runs the one-line tile, which computes those 16 and leaves
                    // the edge buffer's other 16 columns, which `on_tile` does not copy back.
                    on_tile::<MR, NR>(c, n, (i0, j0), (mr, nr), load, &mut edge, |p, ld| unsafe {
                        if nr <= 16 {
                            tile::<1>(ap, lda, panel, kc, p, ld, load)
                        } else {
                            tile::<NV>(ap, lda, panel, kc, p, ld, load)
                        }
                    });
                }
            }
        }
    }

    /// [`super::matmul_nt_widened_weights`]: `c[m, n] = a · wᵀ`, with the kernel's operands
    /// swapped (`a` packed as panels, the weight's rows as strips, widened a strip at a time)
    /// and whole-`k` tiles stored transposed.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F; `a.len() == m·k`, `c.len() == m·n`, and `m, n, k > 0`.
    ///
    /// `widen` runs while this thread's packing buffer is borrowed: it must not call the f32
    /// GEMM itself (that would panic on the buffer's `RefCell`).
    pub(super) unsafe fn matmul_widened_rhs(
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        assert!(m > 0 && n > 0 && k > 0 && a.len() == m * k && c.len() == m * n);
        // SAFETY: the caller guarantees the CPU features and the lengths; `packed` holds
        // `⌈m/NR⌉ · k · NV` lines.
        with_packed(m.div_ceil(NR) * k * NV, |packed| unsafe { run_widened_rhs(a, widen, c, m, k, n, packed) })
    }

    /// The row stride of a widened strip, in values: `k` rounded up to a multiple of 16, plus
    /// 16, so that a power-of-two `k` does not put the strip's eight rows 4 KiB apart (in one
    /// L1 set).
    fn widened_stride(k: usize) -> usize {
        k.next_multiple_of(16) + 16
    }

    /// See [`matmul_widened_rhs`].
    ///
    /// # Safety
    ///
    /// As [`matmul_widened_rhs`]'s, and `packed.len() == ⌈m/NR⌉·k·NV`.
    #[target_feature(enable = "avx512f")]
    unsafe fn run_widened_rhs(
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
    ) {
        for (j, panel) in packed.chunks_exact_mut(k * NV).enumerate() {
            // SAFETY: this function's features; the panel has `k·NV` lines, `j·NR < m`.
            unsafe { pack_b_panel(a, k, m, j, panel) };
        }
        let ws = widened_stride(k);
        let mut wide = vec![0f32; MR * ws];
        let mut edge = [0f32; MR * NR];
        for i0 in (0..n).step_by(MR) {
            let nr_rows = MR.min(n - i0);
            for (r, row) in wide.chunks_exact_mut(ws).enumerate() {
                if r < nr_rows {
                    widen(i0 + r, &mut row[..k]);
                } else {
                    row[..k].fill(0.0);
                }
            }
            for (j, panel) in packed.chunks_exact(k * NV).enumerate() {
                let (j0, cols) = (j * NR, NR.min(m - j * NR));
                // SAFETY: this function's features; `wide` holds MR rows of `ws >= k` values,
                // the panel `k·NV` lines, and `edge` MR rows of NR values.
                unsafe {
                    if cols <= 16 {
                        tile::<1>(wide.as_ptr(), ws, panel, k, edge.as_mut_ptr(), NR, false)
                    } else {
                        tile::<NV>(wide.as_ptr(), ws, panel, k, edge.as_mut_ptr(), NR, false)
                    }
                }
                // Edge row r is weight row i0 + r against inputs j0.., i.e. column i0 + r of
                // c's rows j0..: each input row takes the strip's `nr_rows` values.
                for col in 0..cols {
                    let dst = &mut c[(j0 + col) * n + i0..][..nr_rows];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = edge[r * NR + col];
                    }
                }
            }
        }
    }

    /// Packs rows `j·NR .. j·NR + NR` of `b` (zero past `n`) as `[k][NR]` f32.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F; `b.len() == n·k`, `j·NR < n`, `out.len() == k·NV`.
    #[inline(always)]
    unsafe fn pack_b_panel(b: &[f32], k: usize, n: usize, j: usize, out: &mut [Line]) {
        debug_assert!(b.len() == n * k && j * NR < n && out.len() == k * NV);
        // SAFETY: AVX-512 F as the caller guarantees; every masked load reads inside `b` (row
        // < n, `min(k - k0, 16)` values from column k0 < k), every store writes a line of `out`
        // (index k0 + pp < k), 64-byte aligned as `Line` is `align(64)`.
        unsafe {
            let mut rows = [_mm512_setzero_si512(); 16];
            for k0 in (0..k).step_by(16) {
                let cols = 16.min(k - k0);
                for g in 0..NV {
                    for (r, row) in rows.iter_mut().enumerate() {
                        let jr = j * NR + g * 16 + r;
                        *row = if jr < n {
                            _mm512_maskz_loadu_epi32(first_lanes(cols), b.as_ptr().add(jr * k + k0).cast())
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    let t = transpose16(&rows);
                    for (pp, v) in t.iter().take(cols).enumerate() {
                        let line: *mut Line = &mut out[(k0 + pp) * NV + g];
                        _mm512_store_si512(line.cast(), *v);
                    }
                }
            }
        }
    }

    /// Copies values `k0 .. k0 + kc` of the first `mr` rows of `rows` (the rows of `a` from the
    /// strip's first on) into `strip`, row `r` at `r·KC ..`; rows `mr .. MR` become zero.
    fn pack_a_strip(rows: &[f32], k: usize, mr: usize, k0: usize, kc: usize, strip: &mut Strip) {
        debug_assert!(rows.len() >= mr * k && kc <= KC && k0 + kc <= k);
        for r in 0..MR {
            let dst = &mut strip.0[r * KC..r * KC + kc];
            if r < mr {
                dst.copy_from_slice(&rows[r * k + k0..r * k + k0 + kc]);
            } else {
                dst.fill(0.0);
            }
        }
    }

    /// The micro-kernel: the first `L·16` columns of the MR × NR tile at `c` (row stride `ldc`)
    /// become (`load`: those columns plus) the products of the strip's `kc` values (MR rows at
    /// `ap`, row stride `lda`) with the panel's first `L` lines, `k` ascending. `L` is NV (the
    /// whole tile) or 1 (a last panel of at most 16 columns: a routed expert's tokens on
    /// swapped operands, about 96 ± 10 in a 512-token chunk of the 0.75 B benchmark model, left
    /// half of such a tile idle).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F; `1 <= L <= NV`; `ap` points at MR rows of `kc` readable f32
    /// with row stride `lda`; `panel.len() >= kc·NV`, and `c` points at MR rows of `L·16`
    /// writable f32 with row stride `ldc`.
    #[inline(always)]
    unsafe fn tile<const L: usize>(
        ap: *const f32,
        lda: usize,
        panel: &[Line],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        debug_assert!(panel.len() >= kc * NV && (1..=NV).contains(&L));
        // SAFETY: AVX-512 F as the caller guarantees; the strip reads stay in row r's kc values
        // (p < kc), the aligned panel loads are whole `Line`s (`align(64)`) among its kc·NV
        // lines (v < L <= NV), and the tile's loads and stores in the MR × L·16 block the
        // caller vouches for.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); L]; MR];
            if load {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                    }
                }
            }
            let bp = panel.as_ptr();
            for p in 0..kc {
                let mut bv = [_mm512_setzero_ps(); L];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_load_ps(bp.add(p * NV + v).cast());
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r * lda + p));
                    for (x, &bw) in row.iter_mut().zip(&bv) {
                        *x = _mm512_fmadd_ps(av, bw, *x);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use dsv4_core::test_data::Rng;

    /// Returns whether the kernel runs here; if not, says that only `false` was checked.
    fn runs(test: &str) -> bool {
        if available() {
            return true;
        }
        eprintln!(
            "{test}: the AVX-512 f32 GEMM is not available here (no AVX-512, or {} below avx512): \
             only checked that matmul_nt_f32 returns false",
            super::super::ISA_ENV
        );
        false
    }

    /// The module's definition: one `mul_add` chain over `k` from `+0`.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).fold(0f32, |s, p| a[i * k + p].mul_add(b[j * k + p], s));
            }
        }
        c
    }

    /// Bit equality, any NaN equal to any NaN.
    fn same(x: f32, y: f32) -> bool {
        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
    }

    /// Values of every magnitude and both signs: uniform in (-4, 4) scaled by `2^e`, `e` in
    /// -4..=4 mostly and in -140..=20 for one value in seven (denormal products and partial
    /// sums included), and signed zeros (`Rng::next_u64` gives 31 random bits, so two draws).
    fn value(rng: &mut Rng) -> f32 {
        let x = (rng.next_u64() << 31) ^ rng.next_u64();
        if x.is_multiple_of(29) {
            return if x & 64 == 0 { 0.0 } else { -0.0 };
        }
        let v = ((x >> 8) as u32 as f32 / u32::MAX as f32 - 0.5) * 8.0;
        let e = if (x >> 40).is_multiple_of(7) { ((x >> 43) % 161) as i32 - 140 } else { ((x >> 43) % 9) as i32 - 4 };
        v * 2f32.powi(e)
    }

    #[test]
    fn the_values_cover_signs_and_magnitudes() {
        let mut rng = Rng(3);
        let v: Vec<f32> = (0..10_000).map(|_| value(&mut rng)).collect();
        let (pos, neg) = (v.iter().filter(|&&x| x > 0.0).count(), v.iter().filter(|&&x| x < 0.0).count());
        assert!(pos > 4000 && neg > 4000, "{pos} positive, {neg} negative");
        assert!(v.iter().any(|x| x.is_subnormal()) && v.iter().any(|x| x.abs() > 8.0));
    }

    const MS: [usize; 6] = [1, 7, 8, 9, 13, 100];
    const NS: [usize; 7] = [1, 15, 31, 32, 33, 64, 65];
    const KS: [usize; 10] = [0, 1, 2, 15, 16, 17, 255, 256, 257, 1025];

    /// `matmul_nt_widened_weights` gives the FMA chain too (its whole-`k` tiles, stored
    /// transposed), with every row widened once; it declines exactly the shapes it documents.
    /// Inputs of 8 to 256 rows (partial panels of 1, 15, 16, 17 and 31 columns), weights of
    /// more rows than inputs (partial strips), `k` across cache lines and past 1024 (where 256
    /// input rows no longer fit its 1 MiB of panels).
    #[test]
    fn widened_weights_are_the_fma_chain_bit_for_bit() {
        let mut rng = Rng(8);
        let run = runs("widened_weights_are_the_fma_chain_bit_for_bit");
        for (m, n) in [
            (8, 9),
            (8, 64),
            (15, 64),
            (16, 17),
            (17, 40),
            (31, 200),
            (33, 34),
            (96, 256),
            (256, 300),
            (257, 300),
            (300, 1024),
        ] {
            // More than 8 panels (m > 256: a `grouped_linear` group of many weight rows) only
            // where they fit in the 1 MiB (k <= 1024 at m = 257).
            for k in [1, 15, 17, 256, 512, 1025, 2048] {
                let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
                let mut c = vec![f32::NAN; m * n];
                let mut widened = vec![0usize; n];
                let mut widen = |j: usize, row: &mut [f32]| {
                    widened[j] += 1;
                    row.copy_from_slice(&w[j * k..(j + 1) * k]);
                };
                let takes = run && m.div_ceil(32) * k * 128 <= 1 << 20;
                assert_eq!(matmul_nt_widened_weights(&a, &mut widen, &mut c, m, k, n), takes, "({m},{k},{n})");
                if !takes {
                    assert!(widened.iter().all(|&t| t == 0), "({m},{k},{n}): widened rows it declined");
                    continue;
                }
                assert!(widened.iter().all(|&t| t == 1), "({m},{k},{n}): rows widened {widened:?} times");
                let want = reference(&a, &w, m, k, n);
                for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                    assert!(same(x, y), "({m},{k},{n}) at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                }
            }
        }
        // Not its shapes: as many input rows as weight rows or more, fewer than 8, no k.
        let mut never = |_: usize, _: &mut [f32]| panic!("widened a row of a declined shape");
        for (m, k, n) in [(8, 4, 8), (9, 4, 8), (7, 4, 64), (8, 0, 64)] {
            let mut c = vec![0f32; m * n];
            assert!(!matmul_nt_widened_weights(&vec![1.0; m * k], &mut never, &mut c, m, k, n), "({m},{k},{n})");
        }
    }

    #[test]
    fn products_are_the_fma_chain_bit_for_bit() {
        let mut rng = Rng(7);
        let run = runs("products_are_the_fma_chain_bit_for_bit");
        for m in MS {
            for n in NS {
                for k in KS {
                    let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
                    let b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
                    let mut c = vec![f32::NAN; m * n];
                    let takes = run && m >= MIN_ROWS;
                    assert_eq!(matmul_nt_f32(&a, &b, &mut c, m, k, n), takes, "({m},{k},{n})");
                    if !takes {
                        continue;
                    }
                    let want = reference(&a, &b, m, k, n);
                    for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                        assert!(same(x, y), "({m},{k},{n}) at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                    }
                }
            }
        }
    }

    /// A block of panels past `K_OUTER_BYTES` (8 panels · 1100 · 128 bytes) takes the k-blocks-
    /// outermost order, the last panel (alone in its block) the strips-outermost one: both give
    /// the chain's bits, partial strips, tiles and k blocks included.
    #[test]
    fn both_loop_orders_give_the_fma_chain() {
        let run = runs("both_loop_orders_give_the_fma_chain");
        let (m, k, n) = (17, 1100, 260);
        let mut rng = Rng(12);
        let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
        let mut c = vec![f32::NAN; m * n];
        assert_eq!(matmul_nt_f32(&a, &b, &mut c, m, k, n), run);
        if run {
            let want = reference(&a, &b, m, k, n);
            for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                assert!(same(x, y), "at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
            }
        }
    }

    #[test]
    fn infinities_nans_and_signed_zeros() {
        let run = runs("infinities_nans_and_signed_zeros");
        let (m, k, n) = (9, 40, 33);
        let mut rng = Rng(8);
        let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 0.0, f32::MAX, f32::MIN_POSITIVE / 4.0];
        let mut a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
        let mut b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
        for (i, s) in specials.iter().enumerate() {
            a[(i * 37) % (m * k)] = *s;
            b[(i * 53 + 11) % (n * k)] = *s;
        }
        // Row 0 of `a` and of `b` give -0 products only: the chain from +0 stays +0 (from -0 it
        // would be -0).
        a[..k].fill(-0.0);
        b[..k].fill(1.0);
        let mut c = vec![f32::NAN; m * n];
        assert_eq!(matmul_nt_f32(&a, &b, &mut c, m, k, n), run);
        if run {
            assert_eq!(c[0].to_bits(), 0, "{:e}", c[0]);
            let want = reference(&a, &b, m, k, n);
            for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                assert!(same(x, y), "at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
            }
            assert!(c.iter().any(|v| v.is_nan()) && c.iter().any(|v| v.is_infinite()));
        }
    }

    #[test]
    fn empty_shapes() {
        let run = runs("empty_shapes");
        let mut c = vec![1f32; 27];
        assert_eq!(matmul_nt_f32(&[], &[], &mut c, 9, 0, 3), run);
        if run {
            assert!(c.iter().all(|&v| v.to_bits() == 0));
        }
        // Fewer rows than a tile go to the `gemm` crate.
        assert!(!matmul_nt_f32(&[1.0; 4], &[1.0; 4], &mut [0.0], 1, 4, 1));
        assert_eq!(matmul_nt_f32(&[], &[1.0; 4], &mut [], 0, 4, 1), run);
        assert_eq!(matmul_nt_f32(&[1.0; 36], &[], &mut [], 9, 4, 0), run);
    }

    /// Sizes whose product overflows are refused, not wrapped into a length check that empty
    /// slices pass (which then read out of bounds).
    #[test]
    #[should_panic(expected = "slices shorter than their shapes")]
    fn overflowing_sizes_panic() {
        matmul_nt_f32(&[], &[], &mut [], 1 << 60, 1 << 20, 16);
    }

    /// `gemm::matmul_nt` reaches the kernel wherever it can run (same bits on inexact data, which
    /// the `gemm` crate's order would change), and it can run on every AVX-512 CPU unless
    /// `DSV4_CPU_ISA` lowers the set.
    #[test]
    fn matmul_nt_dispatches_to_the_kernel() {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os(super::super::ISA_ENV).is_none() {
            let avx512 = ["avx512f", "avx512bw", "avx512dq", "avx512vl"];
            let has = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            assert_eq!(available(), has, "CPU with {avx512:?}: {has}");
        }
        if !runs("matmul_nt_dispatches_to_the_kernel") {
            return;
        }
        let (m, k, n) = (37, 300, 45);
        let mut rng = Rng(9);
        let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        crate::gemm::matmul_nt(&a, &b, &mut c1, m, k, n);
        assert!(matmul_nt_f32(&a, &b, &mut c2, m, k, n));
        assert!(c1.iter().zip(&c2).all(|(x, y)| same(*x, *y)), "matmul_nt did not run the kernel");
    }

    /// GFLOP/s of `matmul_nt_f32` (packing included) against the `gemm` crate, one thread.
    /// `cargo test -p dsv4-backend-cpu --release f32_gemm -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_f32_gemm() {
        let run = runs("bench_f32_gemm");
        let mut rng = Rng(4);
        for (m, k, n) in [
            (12, 1024, 256),
            (96, 1024, 256),
            (96, 512, 256),
            (512, 1024, 256),
            (512, 2048, 256),
            (512, 4096, 64),
            (512, 4096, 24),
            (512, 4096, 1024),
            (8, 512, 8192),
            (64, 512, 8192),
        ] {
            // Normal values only (uniform in [-1, 1]): `value` also draws denormals, whose
            // operands take microcode assists on Intel cores (42 GFLOP/s instead of 136 on one
            // such core); activations and weights in a real run are normal.
            let normal = |rng: &mut Rng| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0;
            let a: Vec<f32> = (0..m * k).map(|_| normal(&mut rng)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| normal(&mut rng)).collect();
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
            let tg = best(&mut || crate::gemm::matmul_nt_gemm_crate(&a, &b, &mut c2, m, k, n));
            let line = format!("m={m} k={k} n={n}: gemm crate {:.1} GFLOP/s", flop / tg * 1e-9);
            if run {
                let tf = best(&mut || assert!(matmul_nt_f32(&a, &b, &mut c1, m, k, n)));
                // `matmul_nt_weights` runs the kernel on swapped operands when m < n.
                let ts = best(&mut || crate::gemm::matmul_nt_weights(&a, &b, &mut c1, m, k, n));
                println!(
                    "{line}, avx512 kernel {:.1} GFLOP/s ({:.2}x), matmul_nt_weights {:.1}",
                    flop / tf * 1e-9,
                    tg / tf,
                    flop / ts * 1e-9
                );
            } else {
                println!("{line}, avx512 kernel not available");
            }
        }
    }
}
