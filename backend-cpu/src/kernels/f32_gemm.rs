//! f32 matrix products for prefill with AVX-512 F or AVX2 + FMA: `c = a · bᵀ`, one FMA chain
//! per output.
//!
//! The `gemm` crate (the general path, [`crate::gemm`]) runs its AVX2 micro-kernel on a stable
//! compiler (its AVX-512 one needs nightly), and the bits of its products depend on its
//! blocking. This kernel is [`super::bf16_gemm`]'s blocking with f32 lanes and two micro-kernels
//! behind one blocking:
//!
//! * AVX-512: an 8 × 32 tile of outputs in 16 zmm accumulators; per `k` index two zmm of `b`
//!   and eight broadcasts of `a`, 16 FMAs per 10 loads. On one Zen 4 core (`bench_f32_gemm`,
//!   the prefill shapes of the 0.75 B benchmark model: m ≈ 100 tokens per routed expert or 512,
//!   k = 512 to 4096, n = 24 to 256 weight rows a task) it ran at 75-110 GFLOP/s, 1.0 to 1.6
//!   times the `gemm` crate in the same run, against a peak of about 118.
//! * AVX2 + FMA (the x86-64 floor, [`Isa::Avx2`]): a 6 × 16 tile in 12 ymm accumulators (the
//!   Haswell shape of BLIS: 12 accumulators, two `b` registers and a broadcast fill the 16
//!   ymm registers); per `k` index two ymm of `b` and six broadcasts, 12 FMAs per 8 loads.
//!
//! # Arithmetic
//!
//! Every output is `c[i, j] = fma(a[i, k−1], b[j, k−1], … fma(a[i, 1], b[j, 1], fma(a[i, 0],
//! b[j, 0], +0)) …)`: one IEEE f32 FMA chain over `p = 0, 1, …, k − 1` from `+0`, whatever
//! the blocking (the k blocks carry the sum through the output tile), tile position, `m`, `n`,
//! thread or instruction set. So the bits of a product do not depend on how a matrix is cut
//! into tasks (the `gemm` crate's do) nor on whether the CPU has AVX-512, and a scalar
//! `f32::mul_add` loop gives them exactly (NaN payloads aside): the tests compare bit for bit,
//! on both micro-kernels wherever the CPU runs them. Denormals are kept (MXCSR's defaults,
//! Rust's).
//!
//! Compared with the exact sum, the error is within `k · 2⁻²⁴ · Σₚ |a_p · b_p|` (first order),
//! the bound of any sequential f32 sum.
//!
//! # Layout and blocking
//!
//! `b` is packed into panels of `NR` output columns (32 for AVX-512, 16 for AVX2), `[k][NR]`
//! f32 each (zero past `n`), transposed in registers (16 × 16 zmm or 8 × 8 ymm at a time),
//! 256 columns at a time into a thread-local buffer (up to `256 · k · 4` bytes, kept between
//! calls). For each such block, the rows of `a` go `MR` (8 or 6) at a time (a strip), read in
//! place (`MR` sequential streams); for each strip, `k` is cut into blocks of `KC` = 256, and the
//! strip's block is multiplied by every panel's block (256 KiB for the 256 columns). A last
//! strip of fewer than `MR` rows is copied into an `[MR][256]` buffer, zero past `m`. Edge
//! tiles (partial `m` or `n`) run through an `MR × NR` buffer on the stack; a last panel of at
//! most `NR / 2` columns runs a tile of one register per row (half the work of a whole one),
//! and on AVX-512 one of at most 8 columns a tile of one ymm register per row.
//!
//! [`matmul_nt_widened_weights`] is the layout for a weight held packed (FP4, FP8) against
//! fewer input rows than weight rows: the inputs are the panels, the weight's rows the strips,
//! each strip widened into a small buffer as it comes and multiplied over the whole `k`, the
//! finished tiles stored transposed.

use super::Isa;

/// The fewest rows of `a` the kernel takes (an AVX-512 tile's, for either micro-kernel, so that
/// both take the same shapes); fewer go to the `gemm` crate:
/// the kernel packs all of `b` for them, which on one row costs ten times the products (m = 1,
/// k = 512, n = 8192: 3.2 ms against 0.3).
pub(crate) const MIN_ROWS: usize = 8;

/// The instruction set the kernel runs with here: [`Isa::active`] where that is AVX2 or
/// AVX-512 (so `DSV4_CPU_ISA=scalar` turns it off, and `avx2` picks the AVX2 micro-kernel on an
/// AVX-512 CPU); `None` on other CPUs and architectures.
pub(crate) fn kernel_isa() -> Option<Isa> {
    Some(Isa::active()).filter(|&isa| has_micro_kernel(isa))
}

/// Whether the kernel has a micro-kernel for `isa` (AVX2 or AVX-512, on x86-64).
fn has_micro_kernel(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2
}

/// `isa` where it has a micro-kernel, else None. Panics, naming `op`, if the CPU does not
/// support it.
fn micro_kernel(isa: Option<Isa>, op: &str) -> Option<Isa> {
    let isa = isa.filter(|&i| has_micro_kernel(i))?;
    assert!(isa.is_supported(), "{op}: this CPU does not support {}", isa.name());
    Some(isa)
}

/// Whether this CPU (and `DSV4_CPU_ISA`) runs the kernel: [`kernel_isa`] is some.
pub(crate) fn available() -> bool {
    kernel_isa().is_some()
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
    matmul_nt_f32_with(kernel_isa(), a, b, c, m, k, n)
}

/// [`matmul_nt_f32`] with the micro-kernel of `isa` (`None`, or `Some(Isa::Scalar)`: no kernel,
/// `false`). Panics if the CPU does not support `isa`.
fn matmul_nt_f32_with(isa: Option<Isa>, a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
    use super::holds;
    assert!(
        holds(a.len(), m, k) && holds(b.len(), n, k) && holds(c.len(), m, n),
        "matmul_nt_f32: slices shorter than their shapes (or a size overflows)"
    );
    let Some(isa) = micro_kernel(isa, "matmul_nt_f32") else {
        return false;
    };
    if m > 0 && m < MIN_ROWS {
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
        // SAFETY: the CPU supports `isa` (asserted above), AVX2 + FMA or AVX-512 F; the slices
        // are cut to exactly `m·k`, `n·k` and `m·n` values (checked above), and `m, n, k > 0`.
        unsafe { x86::matmul_nt(isa, &a[..m * k], &b[..n * k], &mut c[..m * n], m, k, n) };
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
/// as its strips: each strip of `MR` weight rows is widened into a small buffer as it comes and
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
/// bytes, on either instruction set) exceed 1 MiB (they would not stay in L2 while every strip
/// passes over them): the caller then widens the rows itself. Panics if `a` or `c` is shorter
/// than its shape.
pub(crate) fn matmul_nt_widened_weights(
    a: &[f32],
    widen: &mut dyn FnMut(usize, &mut [f32]),
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) -> bool {
    matmul_nt_widened_weights_with(kernel_isa(), a, widen, c, m, k, n)
}

/// [`matmul_nt_widened_weights`] with the micro-kernel of `isa` (as [`matmul_nt_f32_with`]).
fn matmul_nt_widened_weights_with(
    isa: Option<Isa>,
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
    let Some(isa) = micro_kernel(isa, "matmul_nt_widened_weights") else {
        return false;
    };
    if m < MIN_ROWS || m >= n || k == 0 || !widened_panels_fit(m, k) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU supports `isa` (asserted above); the slices are cut to exactly `m·k`
        // and `m·n` values (checked above); `0 < MIN_ROWS <= m < n` and `k > 0`. Any number of
        // panels is fine: the packing buffer is sized to them.
        unsafe { x86::matmul_widened_rhs(isa, &a[..m * k], widen, &mut c[..m * n], m, k, n) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = widen;
        false
    }
}

/// Packed panels larger than this put the k blocks outermost (see `run`), and input panels of
/// the widened layout larger than this are declined ([`widened_panels_fit`]).
const K_OUTER_BYTES: usize = 1 << 20;

/// Whether `m` input rows' panels fit in [`K_OUTER_BYTES`] (counted as `⌈m/32⌉ · k · 128`
/// bytes, AVX-512's panels, so that both instruction sets take the same shapes):
/// [`matmul_nt_widened_weights`] passes every strip over all of them, so they must stay in L2.
fn widened_panels_fit(m: usize, k: usize) -> bool {
    m.div_ceil(32) * k * 128 <= K_OUTER_BYTES
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::super::x86::{first_lanes, tile_in, tile_out, transpose16, Line, ZERO_LINE};
    use super::{Isa, K_OUTER_BYTES};

    /// Values of `k` per cache block (a multiple of 16).
    const KC: usize = 256;
    /// How many `k` indices ahead of the one it multiplies a tile prefetches its packed panel
    /// (2 KiB ahead for AVX-512's 128-byte rows, 1 KiB for AVX2's 64-byte ones). A block's
    /// panels (up to 1 MiB; one 256 KiB k block of them where k blocks go outermost) stream
    /// from L2 through every tile, and the hardware prefetcher alone
    /// left the FMAs waiting on them: on one core of an Intel Xeon with two 512-bit FMA units,
    /// the micro-kernel on panels in L1 ran at 87% of the FMA peak but whole GEMMs at 62-78%;
    /// prefetching moved `bench_f32_gemm`'s (512, 1024, 256) from 175-180 to 184-206 GFLOP/s
    /// in two interleaved rounds. A prefetch past the panel's end cannot fault, even on an
    /// unmapped address (`prefetcht0` is a hint), and fetches at most `16 · NV` lines per tile
    /// that it does not read, usually the next k block's or panel's.
    const PANEL_PREFETCH: usize = 16;
    /// Columns of `b` packed and multiplied together: a `k`-block of their panels (256 KiB)
    /// stays in L2 while every strip of `a` passes over it. (With all of a wide `b` at once,
    /// e.g. V4-Flash's 1024-row `wo_a` groups, the strips read it from L3 and the AVX-512
    /// kernel ran at 1.3 to 1.6 times the `gemm` crate's time.)
    const BLOCK_COLUMNS: usize = 256;
    /// The most rows and columns of any micro-kernel's tile (AVX-512's), which size the
    /// buffers of partial strips and edge tiles.
    const MAX_MR: usize = 8;
    const MAX_NR: usize = 32;

    /// One instruction set's micro-kernel and packing of `b` panels; the blocking around them
    /// ([`run`], [`run_widened_rhs`]) is shared.
    trait MicroKernel {
        /// Rows of `a` per tile (at most [`MAX_MR`]).
        const MR: usize;
        /// `Line`s (16 f32) of a packed panel per `k` index.
        const NV: usize;
        /// Columns per tile and per packed panel (at most [`MAX_NR`]).
        const NR: usize = 16 * Self::NV;

        /// The first `cols` columns (`1 <= cols <= NR`) of the `MR × NR` tile at `c` (row stride
        /// `ldc`; the kernel computes and writes `cols` rounded up to 8, `NR / 2` or `NR`) become
        /// (`load`: those columns plus) the products of the strip's `kc` values (`MR` rows at
        /// `ap`, row stride `lda`) with the panel's `kc` lines-per-`k`, `k` ascending: each
        /// output's FMA chain continued.
        ///
        /// # Safety
        ///
        /// The CPU supports the micro-kernel's instruction set; `ap` points at `MR` rows of `kc`
        /// readable f32 with row stride `lda`; `panel.len() >= kc·NV`, and `c` points at `MR`
        /// rows of `NR` writable f32 with row stride `ldc`.
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile(
            cols: usize,
            ap: *const f32,
            lda: usize,
            panel: &[Line],
            kc: usize,
            c: *mut f32,
            ldc: usize,
            load: bool,
        );

        /// Packs rows `j·NR .. j·NR + NR` of `b` (zero past `n`) as `[k][NR]` f32.
        ///
        /// # Safety
        ///
        /// The CPU supports the micro-kernel's instruction set; `b.len() == n·k`, `j·NR < n`,
        /// `out.len() == k·NV`.
        unsafe fn pack_b_panel(b: &[f32], k: usize, n: usize, j: usize, out: &mut [Line]);
    }

    /// The AVX-512 F micro-kernel: 8 × 32 (module documentation).
    struct Avx512;
    /// The AVX2 + FMA micro-kernel: 6 × 16 (module documentation).
    struct Avx2;

    thread_local! {
        /// The packed panels of the current block: `[panels][k][NV lines]`.
        static PACKED: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// [`super::matmul_nt_f32`] for `m, n, k > 0` and exact slice lengths.
    ///
    /// # Safety
    ///
    /// The CPU supports `isa`, which is AVX2 or AVX-512; `a.len() == m·k`, `b.len() == n·k`,
    /// `c.len() == m·n`, and `m, n, k > 0`.
    pub(super) unsafe fn matmul_nt(isa: Isa, a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
        /// The lines of `K`'s packed block: `min(⌈n/NR⌉, BLOCK_COLUMNS/NR)·k·NV`.
        fn lines<K: MicroKernel>(n: usize, k: usize) -> usize {
            n.div_ceil(K::NR).min(BLOCK_COLUMNS / K::NR) * k * K::NV
        }
        // SAFETY (both calls): the caller guarantees the CPU features `run_*` is compiled with,
        // the slice lengths and `m, n, k > 0`; `packed` holds the kernel's `lines`.
        match isa {
            Isa::Avx512 => with_packed(lines::<Avx512>(n, k), |packed| unsafe { run_avx512(a, b, c, m, k, n, packed) }),
            Isa::Avx2 => with_packed(lines::<Avx2>(n, k), |packed| unsafe { run_avx2(a, b, c, m, k, n, packed) }),
            Isa::Scalar => unreachable!("the f32 GEMM has no scalar micro-kernel"),
        }
    }

    /// `f` on this thread's first `lines` lines of [`PACKED`], grown to them if needed (and
    /// kept, as a GEMM library keeps its packing buffer). Panics if `f` re-enters.
    fn with_packed<R>(lines: usize, f: impl FnOnce(&mut [Line]) -> R) -> R {
        PACKED.with_borrow_mut(|packed| {
            if packed.len() < lines {
                packed.resize(lines, ZERO_LINE);
            }
            f(&mut packed[..lines])
        })
    }

    /// [`run`] with AVX-512.
    ///
    /// # Safety
    ///
    /// As [`run`]'s, with AVX-512 F.
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, packed: &mut [Line]) {
        // SAFETY: this function's features are the micro-kernel's; the rest is the caller's.
        unsafe { run::<Avx512>(a, b, c, m, k, n, packed) }
    }

    /// [`run`] with AVX2 + FMA.
    ///
    /// # Safety
    ///
    /// As [`run`]'s, with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, packed: &mut [Line]) {
        // SAFETY: this function's features are the micro-kernel's; the rest is the caller's.
        unsafe { run::<Avx2>(a, b, c, m, k, n, packed) }
    }

    /// Packs `b` a block of panels at a time, and multiplies each block by every strip of `a`
    /// (see the module documentation).
    ///
    /// # Safety
    ///
    /// The CPU supports `K`'s instruction set; `a.len() == m·k`, `b.len() == n·k`,
    /// `c.len() == m·n`, `packed.len() == min(⌈n/NR⌉, BLOCK_COLUMNS/NR)·k·NV`, and `m, n, k > 0`.
    #[inline(always)]
    unsafe fn run<K: MicroKernel>(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
    ) {
        let (mr_full, nr_full, nv) = (K::MR, K::NR, K::NV);
        let panels = n.div_ceil(nr_full);
        let mut strip = Strip([0.0; MAX_MR * KC]);
        let mut edge = [0f32; MAX_MR * MAX_NR];
        for jb in (0..panels).step_by(BLOCK_COLUMNS / nr_full) {
            let block = jb..panels.min(jb + BLOCK_COLUMNS / nr_full);
            for (j, panel) in block.clone().zip(packed.chunks_exact_mut(k * nv)) {
                // SAFETY: `K`'s features; the panel has `k·NV` lines, `j·NR < n`.
                unsafe { K::pack_b_panel(b, k, n, j, panel) };
            }
            // Strips of `a` outermost while the block's packed panels (`columns · k · 4`
            // bytes) fit in L2 alongside the rest: each strip then streams its rows in order.
            // Past that (k > 1024 for 256 columns, i.e. more than K_OUTER_BYTES), k blocks go
            // outermost, so that one k block of the panels (256 KiB) stays in L2 while every
            // strip passes over it: on one Intel core (2 MiB L2) m = 512, k = 4096, n = 1024
            // went from 1.17 to 1.5 times the `gemm` crate with AVX-512, while narrow or
            // short-k shapes lost 5-9% in that order. Each output sums its k blocks in
            // ascending order either way: the bits are the same.
            let strips = (0..m).step_by(mr_full);
            let k_blocks = (0..k).step_by(KC);
            let order: Vec<(usize, usize)> = if block.len() * k * nr_full * 4 > K_OUTER_BYTES {
                k_blocks.flat_map(|k0| strips.clone().map(move |i0| (i0, k0))).collect()
            } else {
                strips.flat_map(|i0| k_blocks.clone().map(move |k0| (i0, k0))).collect()
            };
            for (i0, k0) in order {
                let (mr, kc, load) = (mr_full.min(m - i0), KC.min(k - k0), k0 > 0);
                // A full strip is read in place (row stride k); a partial one is copied into
                // `strip` with zero rows after it.
                let (ap, lda) = if mr == mr_full {
                    (a[i0 * k + k0..].as_ptr(), k)
                } else {
                    pack_a_strip(&a[i0 * k..], k, (mr, mr_full), k0, kc, &mut strip);
                    (strip.0.as_ptr(), KC)
                };
                for j in block.clone() {
                    let (j0, nr) = (j * nr_full, nr_full.min(n - j * nr_full));
                    let p0 = (j - jb) * k + k0;
                    let panel = &packed[p0 * nv..(p0 + kc) * nv];
                    let (at, size, shape) = ((i0, j0), (mr, nr), (mr_full, nr_full));
                    let (p, ld) = tile_in(c, n, at, size, shape, load, &mut edge);
                    // SAFETY: `K`'s features; `ap` is rows i0..i0+MR <= m of `a` from column k0
                    // (k0 + kc <= k, so row r's kc values lie inside `a[i0·k + k0..]`) or the
                    // strip buffer for a partial strip; `tile_in` gives MR rows of NR writable
                    // values at stride `ld` (inside `c` for a whole tile, else the edge buffer).
                    // A last panel of at most NR/2 columns runs a narrower tile, which computes
                    // those (rounded up to 8 or NR/2) and leaves the edge buffer's other
                    // columns, which `tile_out` does not copy back.
                    unsafe { K::tile(nr, ap, lda, panel, kc, p, ld, load) };
                    tile_out(c, n, at, size, shape, &edge);
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
    /// The CPU supports `isa`, which is AVX2 or AVX-512; `a.len() == m·k`, `c.len() == m·n`,
    /// and `m, n, k > 0`.
    ///
    /// `widen` runs while this thread's packing buffer is borrowed: it must not call the f32
    /// GEMM itself (that would panic on the buffer's `RefCell`).
    pub(super) unsafe fn matmul_widened_rhs(
        isa: Isa,
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        assert!(m > 0 && n > 0 && k > 0 && a.len() == m * k && c.len() == m * n);
        // SAFETY (both calls): the caller guarantees the CPU features and the lengths;
        // `packed` holds `⌈m/NR⌉ · k · NV` lines of the kernel that runs.
        match isa {
            Isa::Avx512 => with_packed(m.div_ceil(Avx512::NR) * k * Avx512::NV, |packed| unsafe {
                widened_rhs_avx512(a, widen, c, m, k, n, packed)
            }),
            Isa::Scalar => unreachable!("the f32 GEMM has no scalar micro-kernel"),
            Isa::Avx2 => with_packed(m.div_ceil(Avx2::NR) * k * Avx2::NV, |packed| unsafe {
                widened_rhs_avx2(a, widen, c, m, k, n, packed)
            }),
        }
    }

    /// [`run_widened_rhs`] with AVX-512.
    ///
    /// # Safety
    ///
    /// As [`run_widened_rhs`]'s, with AVX-512 F.
    #[target_feature(enable = "avx512f")]
    unsafe fn widened_rhs_avx512(
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
    ) {
        // SAFETY: this function's features are the micro-kernel's; the rest is the caller's.
        unsafe { run_widened_rhs::<Avx512>(a, widen, c, m, k, n, packed) }
    }

    /// [`run_widened_rhs`] with AVX2 + FMA.
    ///
    /// # Safety
    ///
    /// As [`run_widened_rhs`]'s, with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widened_rhs_avx2(
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
    ) {
        // SAFETY: this function's features are the micro-kernel's; the rest is the caller's.
        unsafe { run_widened_rhs::<Avx2>(a, widen, c, m, k, n, packed) }
    }

    /// The row stride of a widened strip, in values: `k` rounded up to a multiple of 16, plus
    /// 16, so that a power-of-two `k` does not put the strip's rows 4 KiB apart (in one L1 set).
    fn widened_stride(k: usize) -> usize {
        k.next_multiple_of(16) + 16
    }

    /// See [`matmul_widened_rhs`].
    ///
    /// # Safety
    ///
    /// As [`matmul_widened_rhs`]'s with `K`'s instruction set, and
    /// `packed.len() == ⌈m/NR⌉·k·NV`.
    #[inline(always)]
    unsafe fn run_widened_rhs<K: MicroKernel>(
        a: &[f32],
        widen: &mut dyn FnMut(usize, &mut [f32]),
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
    ) {
        let (mr_full, nr_full, nv) = (K::MR, K::NR, K::NV);
        for (j, panel) in packed.chunks_exact_mut(k * nv).enumerate() {
            // SAFETY: `K`'s features; the panel has `k·NV` lines, `j·NR < m`.
            unsafe { K::pack_b_panel(a, k, m, j, panel) };
        }
        let ws = widened_stride(k);
        let mut wide = vec![0f32; mr_full * ws];
        let mut edge = [0f32; MAX_MR * MAX_NR];
        for i0 in (0..n).step_by(mr_full) {
            let nr_rows = mr_full.min(n - i0);
            for (r, row) in wide.chunks_exact_mut(ws).enumerate() {
                if r < nr_rows {
                    widen(i0 + r, &mut row[..k]);
                } else {
                    row[..k].fill(0.0);
                }
            }
            for (j, panel) in packed.chunks_exact(k * nv).enumerate() {
                let (j0, cols) = (j * nr_full, nr_full.min(m - j * nr_full));
                // SAFETY: `K`'s features; `wide` holds MR rows of `ws >= k` values, the panel
                // `k·NV` lines, and `edge` MR rows of NR values (row stride NR).
                unsafe { K::tile(cols, wide.as_ptr(), ws, panel, k, edge.as_mut_ptr(), nr_full, false) };
                // Edge row r is weight row i0 + r against inputs j0.., i.e. column i0 + r of
                // c's rows j0..: each input row takes the strip's `nr_rows` values.
                for col in 0..cols {
                    let dst = &mut c[(j0 + col) * n + i0..][..nr_rows];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = edge[r * nr_full + col];
                    }
                }
            }
        }
    }

    /// The `[MR][KC]` values of a partial strip of `a` (rows past `m` zero), aligned to a cache
    /// line, for the largest `MR`.
    #[repr(C, align(64))]
    struct Strip([f32; MAX_MR * KC]);

    /// Copies values `k0 .. k0 + kc` of the first `mr` rows of `rows` (the rows of `a` from the
    /// strip's first on) into `strip`, row `r` at `r·KC ..`; rows `mr .. mr_full` become zero.
    fn pack_a_strip(rows: &[f32], k: usize, (mr, mr_full): (usize, usize), k0: usize, kc: usize, strip: &mut Strip) {
        debug_assert!(rows.len() >= mr * k && kc <= KC && k0 + kc <= k && mr_full <= MAX_MR);
        for r in 0..mr_full {
            let dst = &mut strip.0[r * KC..r * KC + kc];
            if r < mr {
                dst.copy_from_slice(&rows[r * k + k0..r * k + k0 + kc]);
            } else {
                dst.fill(0.0);
            }
        }
    }

    impl MicroKernel for Avx512 {
        const MR: usize = 8;
        const NV: usize = 2;

        #[inline(always)]
        unsafe fn tile(
            cols: usize,
            ap: *const f32,
            lda: usize,
            panel: &[Line],
            kc: usize,
            c: *mut f32,
            ldc: usize,
            load: bool,
        ) {
            // SAFETY: the caller's (the trait's contract): each variant computes the first
            // `cols` columns rounded up to 8, 16 or 32.
            unsafe {
                match cols {
                    0..=8 => tile_avx512::<0, 1>(ap, lda, panel, kc, c, ldc, load),
                    9..=16 => tile_avx512::<1, 0>(ap, lda, panel, kc, c, ldc, load),
                    _ => tile_avx512::<2, 0>(ap, lda, panel, kc, c, ldc, load),
                }
            }
        }

        #[inline(always)]
        unsafe fn pack_b_panel(b: &[f32], k: usize, n: usize, j: usize, out: &mut [Line]) {
            const NV: usize = Avx512::NV;
            const NR: usize = Avx512::NR;
            debug_assert!(b.len() == n * k && j * NR < n && out.len() == k * NV);
            // SAFETY: AVX-512 F as the caller guarantees; every masked load reads inside `b`
            // (row < n, `min(k - k0, 16)` values from column k0 < k), every store writes a line
            // of `out` (index k0 + pp < k), 64-byte aligned as `Line` is `align(64)`.
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
    }

    /// The AVX-512 tile: the first `16·L + 8·H` columns of the 8 × 32 tile, in `L` zmm and `H`
    /// ymm accumulators a row: 2, 0 for a whole panel, 1, 0 for a last panel of at most 16
    /// columns, 0, 1 for one of at most 8. A routed expert's tokens are such a last panel on
    /// swapped operands (about 10 to 380 tokens an expert in a 512-token chunk of the 0.75 B
    /// benchmark model). On Zen 4 a ymm FMA takes half a zmm's time, and 8 columns of a
    /// 256-row, k = 1024 block (`matmul_nt_widened_weights`, 8 input rows) took 67 µs instead
    /// of the half tile's 102 on one core; where a ymm FMA is not faster (two 512-bit FMA
    /// units), a quarter costs what a half does. (A 24-column variant, a zmm and a ymm a row,
    /// took as long as the whole tile: LLVM broadcast each value twice, or spilled.)
    ///
    /// # Safety
    ///
    /// [`MicroKernel::tile`]'s, with AVX-512 F, `L + H <= 2`, `H <= 1` and `L + H >= 1`.
    #[inline(always)]
    unsafe fn tile_avx512<const L: usize, const H: usize>(
        ap: *const f32,
        lda: usize,
        panel: &[Line],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        const MR: usize = Avx512::MR;
        const NV: usize = Avx512::NV;
        debug_assert!(panel.len() >= kc * NV && L + H <= NV && H <= 1 && L + H >= 1);
        // SAFETY: AVX-512 F (which implies AVX2 and FMA) as the caller guarantees; the strip
        // reads stay in row r's kc values (p < kc), the aligned panel loads are the first L
        // whole `Line`s and the first half of line L (`align(64)`, so 32-byte aligned) among
        // its kc·NV lines (L + H <= NV), and the tile's loads and stores in the MR × (16L + 8H)
        // block the caller vouches for. The prefetches dereference nothing (their addresses
        // past the panel are formed with `wrapping_add`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); L]; MR];
            let mut half = [[_mm256_setzero_ps(); H]; MR];
            if load {
                for r in 0..MR {
                    for (v, x) in acc[r].iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                    }
                    for x in half[r].iter_mut() {
                        *x = _mm256_loadu_ps(c.add(r * ldc + 16 * L));
                    }
                }
            }
            let bp = panel.as_ptr();
            for p in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + PANEL_PREFETCH) * NV).cast());
                if L + H > 1 {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + PANEL_PREFETCH) * NV + 1).cast());
                }
                let mut bv = [_mm512_setzero_ps(); L];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_load_ps(bp.add(p * NV + v).cast());
                }
                let mut bh = [_mm256_setzero_ps(); H];
                for x in bh.iter_mut() {
                    *x = _mm256_load_ps(bp.add(p * NV + L).cast());
                }
                for r in 0..MR {
                    let a = *ap.add(r * lda + p);
                    let av = _mm512_set1_ps(a);
                    for (x, &bw) in acc[r].iter_mut().zip(&bv) {
                        *x = _mm512_fmadd_ps(av, bw, *x);
                    }
                    let ah = _mm256_set1_ps(a);
                    for (x, &bw) in half[r].iter_mut().zip(&bh) {
                        *x = _mm256_fmadd_ps(ah, bw, *x);
                    }
                }
            }
            for r in 0..MR {
                for (v, x) in acc[r].iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * ldc + 16 * v), *x);
                }
                for x in half[r].iter() {
                    _mm256_storeu_ps(c.add(r * ldc + 16 * L), *x);
                }
            }
        }
    }

    impl MicroKernel for Avx2 {
        const MR: usize = 6;
        const NV: usize = 1;

        #[inline(always)]
        unsafe fn tile(
            cols: usize,
            ap: *const f32,
            lda: usize,
            panel: &[Line],
            kc: usize,
            c: *mut f32,
            ldc: usize,
            load: bool,
        ) {
            // SAFETY: the caller's (the trait's contract); up to 8 columns run the first ymm
            // only.
            unsafe {
                if cols <= 8 {
                    tile_avx2::<1>(ap, lda, panel, kc, c, ldc, load)
                } else {
                    tile_avx2::<2>(ap, lda, panel, kc, c, ldc, load)
                }
            }
        }

        #[inline(always)]
        unsafe fn pack_b_panel(b: &[f32], k: usize, n: usize, j: usize, out: &mut [Line]) {
            const NR: usize = Avx2::NR;
            debug_assert!(b.len() == n * k && j * NR < n && out.len() == k);
            // SAFETY: AVX2 as the caller guarantees; every masked load reads inside `b` (row
            // < n, `min(k - k0, 8)` values from column k0 < k; `maskload` does not touch the
            // masked-off lanes), every store writes half a line of `out` (index k0 + pp < k),
            // 32-byte aligned as `Line` is `align(64)`.
            unsafe {
                let mut rows = [_mm256_setzero_ps(); 8];
                for k0 in (0..k).step_by(8) {
                    let cols = 8.min(k - k0);
                    let mask = first_lanes8(cols);
                    for g in 0..2 {
                        for (r, row) in rows.iter_mut().enumerate() {
                            let jr = j * NR + g * 8 + r;
                            *row = if jr < n {
                                _mm256_maskload_ps(b.as_ptr().add(jr * k + k0), mask)
                            } else {
                                _mm256_setzero_ps()
                            };
                        }
                        let t = transpose8(&rows);
                        for (pp, v) in t.iter().take(cols).enumerate() {
                            let line: *mut Line = &mut out[k0 + pp];
                            _mm256_store_ps(line.cast::<f32>().add(8 * g), *v);
                        }
                    }
                }
            }
        }
    }

    /// The `vmaskmovps` mask of the first `n` (at most 8) of 8 lanes.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX.
    #[inline(always)]
    unsafe fn first_lanes8(n: usize) -> __m256i {
        static LANES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        debug_assert!(n <= 8);
        // SAFETY: 8 i32 from index 8 − n <= 8 lie inside the 16; AVX as the caller guarantees.
        unsafe { _mm256_loadu_si256(LANES[8 - n..].as_ptr().cast()) }
    }

    /// The 8 × 8 transpose of `r` (row i of the result is lane i of every input register).
    ///
    /// # Safety
    ///
    /// The CPU supports AVX.
    #[inline(always)]
    unsafe fn transpose8(r: &[__m256; 8]) -> [__m256; 8] {
        // SAFETY: register-only AVX operations; the caller guarantees AVX.
        unsafe {
            // t0 = (r0[0], r1[0], r0[1], r1[1] | r0[4], r1[4], r0[5], r1[5]), ...
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            // s0 = (r0[0], r1[0], r2[0], r3[0] | r0[4], r1[4], r2[4], r3[4]), ...
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ]
        }
    }

    /// The AVX2 tile: the first `L·8` columns of the 6 × 16 tile (`L` is 2, or 1 for a last
    /// panel of at most 8 columns).
    ///
    /// # Safety
    ///
    /// [`MicroKernel::tile`]'s, with AVX2 + FMA and `1 <= L <= 2`.
    #[inline(always)]
    unsafe fn tile_avx2<const L: usize>(
        ap: *const f32,
        lda: usize,
        panel: &[Line],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        const MR: usize = Avx2::MR;
        debug_assert!(panel.len() >= kc && (1..=2).contains(&L));
        // SAFETY: AVX2 + FMA as the caller guarantees; the strip reads stay in row r's kc values
        // (p < kc), the aligned panel loads are halves of `Line`s (`align(64)`) among its kc
        // lines (v < L <= 2), and the tile's loads and stores in the MR × L·8 block the caller
        // vouches for. The prefetches dereference nothing (as in `tile_avx512`).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); L]; MR];
            if load {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(c.add(r * ldc + 8 * v));
                    }
                }
            }
            let bp = panel.as_ptr().cast::<f32>();
            for p in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(16 * (p + PANEL_PREFETCH)).cast());
                let mut bv = [_mm256_setzero_ps(); L];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_load_ps(bp.add(16 * p + 8 * v));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*ap.add(r * lda + p));
                    for (x, &bw) in row.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(av, bw, *x);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    _mm256_storeu_ps(c.add(r * ldc + 8 * v), *x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use dsv4_core::test_data::Rng;

    /// The instruction sets with a micro-kernel that this CPU runs (whatever `DSV4_CPU_ISA`
    /// says: the tests check every micro-kernel the machine has, AVX2 on an AVX-512 CPU too);
    /// where there is none, says that only `false` was checked (on `None` and `Scalar`).
    fn kernels(test: &str) -> Vec<Isa> {
        let isas: Vec<Isa> = Isa::supported().into_iter().filter(|&i| has_micro_kernel(i)).collect();
        if isas.is_empty() {
            eprintln!("{test}: no f32 GEMM micro-kernel runs here (no AVX2): only checked that it declines");
        }
        isas
    }

    /// Instruction sets to call the kernel with: every micro-kernel's, and two that must
    /// decline (no kernel, scalar).
    fn all_isas(test: &str) -> Vec<Option<Isa>> {
        [None, Some(Isa::Scalar)].into_iter().chain(kernels(test).into_iter().map(Some)).collect()
    }

    /// Whether `isa` runs a micro-kernel.
    fn has_kernel(isa: Option<Isa>) -> bool {
        isa.is_some_and(has_micro_kernel)
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
    /// Last tiles of every width around the narrow-tile cuts of both micro-kernels (8 of 16
    /// columns for AVX2; 8 and 16 of 32 for AVX-512) and whole ones.
    const NS: [usize; 13] = [1, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 64, 65];
    const KS: [usize; 10] = [0, 1, 2, 15, 16, 17, 255, 256, 257, 1025];

    /// `matmul_nt_widened_weights` gives the FMA chain too (its whole-`k` tiles, stored
    /// transposed), with every row widened once; it declines exactly the shapes it documents.
    /// Inputs of 8 to 256 rows (partial panels of 1, 8, 15, 16, 17 and 31 columns), weights of
    /// more rows than inputs (partial strips), `k` across cache lines and past 1024 (where 256
    /// input rows no longer fit its 1 MiB of panels).
    #[test]
    fn widened_weights_are_the_fma_chain_bit_for_bit() {
        let mut rng = Rng(8);
        let isas = all_isas("widened_weights_are_the_fma_chain_bit_for_bit");
        for (m, n) in [
            (8, 9),
            (8, 64),
            (15, 64),
            (16, 17),
            (17, 40),
            (24, 40),
            (25, 64),
            (40, 64),
            (48, 64),
            (49, 64),
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
                let want = reference(&a, &w, m, k, n);
                for &isa in &isas {
                    let mut c = vec![f32::NAN; m * n];
                    let mut widened = vec![0usize; n];
                    let mut widen = |j: usize, row: &mut [f32]| {
                        widened[j] += 1;
                        row.copy_from_slice(&w[j * k..(j + 1) * k]);
                    };
                    let takes = has_kernel(isa) && m.div_ceil(32) * k * 128 <= 1 << 20;
                    let took = matmul_nt_widened_weights_with(isa, &a, &mut widen, &mut c, m, k, n);
                    assert_eq!(took, takes, "{isa:?} ({m},{k},{n})");
                    if !takes {
                        assert!(widened.iter().all(|&t| t == 0), "{isa:?} ({m},{k},{n}): widened rows it declined");
                        continue;
                    }
                    assert!(widened.iter().all(|&t| t == 1), "{isa:?} ({m},{k},{n}): rows widened {widened:?} times");
                    for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                        assert!(same(x, y), "{isa:?} ({m},{k},{n}) at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                    }
                }
            }
        }
        // Not its shapes: as many input rows as weight rows or more, fewer than 8, no k.
        let mut never = |_: usize, _: &mut [f32]| panic!("widened a row of a declined shape");
        for isa in isas {
            for (m, k, n) in [(8, 4, 8), (9, 4, 8), (7, 4, 64), (8, 0, 64)] {
                let mut c = vec![0f32; m * n];
                let took = matmul_nt_widened_weights_with(isa, &vec![1.0; m * k], &mut never, &mut c, m, k, n);
                assert!(!took, "{isa:?} ({m},{k},{n})");
            }
        }
    }

    #[test]
    fn products_are_the_fma_chain_bit_for_bit() {
        let mut rng = Rng(7);
        let isas = all_isas("products_are_the_fma_chain_bit_for_bit");
        for m in MS {
            for n in NS {
                for k in KS {
                    let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
                    let b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
                    let want = reference(&a, &b, m, k, n);
                    for &isa in &isas {
                        let mut c = vec![f32::NAN; m * n];
                        let takes = has_kernel(isa) && m >= MIN_ROWS;
                        assert_eq!(matmul_nt_f32_with(isa, &a, &b, &mut c, m, k, n), takes, "{isa:?} ({m},{k},{n})");
                        if !takes {
                            continue;
                        }
                        for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                            assert!(same(x, y), "{isa:?} ({m},{k},{n}) at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                        }
                    }
                }
            }
        }
    }

    /// A block of 256 columns past `K_OUTER_BYTES` (256 · 1100 · 4 bytes) takes the k-blocks-
    /// outermost order, the last 4 columns (alone in their block) the strips-outermost one: both
    /// give the chain's bits, partial strips, tiles and k blocks included.
    #[test]
    fn both_loop_orders_give_the_fma_chain() {
        let (m, k, n) = (17, 1100, 260);
        let mut rng = Rng(12);
        let a: Vec<f32> = (0..m * k).map(|_| value(&mut rng)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
        let want = reference(&a, &b, m, k, n);
        for isa in all_isas("both_loop_orders_give_the_fma_chain") {
            let mut c = vec![f32::NAN; m * n];
            assert_eq!(matmul_nt_f32_with(isa, &a, &b, &mut c, m, k, n), has_kernel(isa), "{isa:?}");
            if has_kernel(isa) {
                for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                    assert!(same(x, y), "{isa:?} at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                }
            }
        }
    }

    #[test]
    fn infinities_nans_and_signed_zeros() {
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
        let want = reference(&a, &b, m, k, n);
        for isa in all_isas("infinities_nans_and_signed_zeros") {
            let mut c = vec![f32::NAN; m * n];
            assert_eq!(matmul_nt_f32_with(isa, &a, &b, &mut c, m, k, n), has_kernel(isa), "{isa:?}");
            if has_kernel(isa) {
                assert_eq!(c[0].to_bits(), 0, "{isa:?}: {:e}", c[0]);
                for (i, (&x, &y)) in c.iter().zip(&want).enumerate() {
                    assert!(same(x, y), "{isa:?} at ({}, {}): {x:e} vs {y:e}", i / n, i % n);
                }
                assert!(c.iter().any(|v| v.is_nan()) && c.iter().any(|v| v.is_infinite()));
            }
        }
    }

    #[test]
    fn empty_shapes() {
        for isa in all_isas("empty_shapes") {
            let run = has_kernel(isa);
            let mut c = vec![1f32; 27];
            assert_eq!(matmul_nt_f32_with(isa, &[], &[], &mut c, 9, 0, 3), run);
            if run {
                assert!(c.iter().all(|&v| v.to_bits() == 0));
            }
            // Fewer rows than a tile go to the `gemm` crate.
            assert!(!matmul_nt_f32_with(isa, &[1.0; 4], &[1.0; 4], &mut [0.0], 1, 4, 1));
            assert_eq!(matmul_nt_f32_with(isa, &[], &[1.0; 4], &mut [], 0, 4, 1), run);
            assert_eq!(matmul_nt_f32_with(isa, &[1.0; 36], &[], &mut [], 9, 4, 0), run);
        }
    }

    /// Sizes whose product overflows are refused, not wrapped into a length check that empty
    /// slices pass (which then read out of bounds).
    #[test]
    #[should_panic(expected = "slices shorter than their shapes")]
    fn overflowing_sizes_panic() {
        matmul_nt_f32(&[], &[], &mut [], 1 << 60, 1 << 20, 16);
    }

    /// `gemm::matmul_nt` reaches the kernel wherever it can run (same bits on inexact data, which
    /// the `gemm` crate's order would change), and it can run on every x86-64 CPU with AVX2, FMA
    /// and F16C unless `DSV4_CPU_ISA` lowers the set; with the best instruction set there is.
    #[test]
    fn matmul_nt_dispatches_to_the_kernel() {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os(super::super::ISA_ENV).is_none() {
            let has =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            assert_eq!(available(), has, "CPU with AVX2, FMA and F16C: {has}");
            assert_eq!(kernel_isa(), has.then(Isa::best), "the best set's micro-kernel runs");
        }
        if !available() {
            eprintln!("matmul_nt_dispatches_to_the_kernel: the kernel does not run here");
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
        let isas = kernels("bench_f32_gemm");
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
            let mut line = format!("m={m} k={k} n={n}: gemm crate {:.1} GFLOP/s", flop / tg * 1e-9);
            for &isa in &isas {
                let tf = best(&mut || assert!(matmul_nt_f32_with(Some(isa), &a, &b, &mut c1, m, k, n)));
                line += &format!(", {} kernel {:.1} ({:.2}x)", isa.name(), flop / tf * 1e-9, tg / tf);
            }
            // `matmul_nt_weights` runs the kernel on swapped operands when m < n (the active set).
            if available() {
                let ts = best(&mut || crate::gemm::matmul_nt_weights(&a, &b, &mut c1, m, k, n));
                line += &format!(", matmul_nt_weights {:.1}", flop / ts * 1e-9);
            }
            println!("{line}");
        }
    }
}
