//! Matrix-vector kernels on a weight row in its stored form: `F32`, `BF16`, `F16`, FP8 e4m3fn
//! with block scales and FP4 e2m1 with group scales (DeepSeek V4's checkpoint formats: FP8 in
//! 128×128 blocks with E8M0 or F32 scales, FP4 in 1×32 groups with E8M0 scales, the element
//! and scale encodings of the OCP Microscaling (MX) spec; see `dsv4_core::quant`).
//!
//! The packed row is decoded in registers, a 32-value chunk at a time, and every decoded chunk
//! is multiplied into all input rows before the next one is read, so the weight is streamed
//! once in its stored size, whatever the number of input rows.
//!
//! # One summation order for every instruction set
//!
//! Every path sums in the *canonical order*, so all of them give the same bits:
//!
//! * value `j` of the row is the table value times its scale, one f32 multiply
//!   (`E4M3_TO_F32[code] * scale`, `E2M1_TO_F32[code] * scale`; BF16/F16/F32 exactly);
//! * the row is padded with zeros to a multiple of 32, and element `j` goes into lane `j % 32`
//!   as `acc = fma(w[j], x[j], acc)` (one rounding), lanes starting at `+0.0`, `j` increasing;
//!   padded elements are real `fma(0, 0, acc)` steps (they turn a `-0.0` lane into `+0.0`);
//! * the 32 lanes are reduced pairwise: `acc[i] + acc[i + 16]`, then `+ 8`, `+ 4`, `+ 2`, `+ 1`.
//!
//! [`Isa::Scalar`] is the reference: `[f32; 32]` arrays and `f32::mul_add`, table look-ups
//! for decoding. On aarch64 that is the only path (NEON is baseline there and LLVM vectorises
//! the 32-lane loops; there is no hand-written NEON kernel, as no aarch64 machine is at hand to
//! test one). On x86-64 without FMA hardware `mul_add` is a libm call: slow but exact.
//! [`Isa::Avx2`] keeps a chunk in four 8-lane registers, [`Isa::Avx512`] in two 16-lane ones
//! (`x86.rs`).

use dsv4_core::quant::{E2M1_TO_F32, E4M3_TO_F32};

use std::sync::atomic::{AtomicU8, Ordering};

use super::fp8_fold::FoldedPair;
use super::prefetch;
use super::Isa;

/// Values per chunk: the number of accumulator lanes of the canonical order.
pub(crate) const LANES: usize = 32;

/// A weight row of `k` values in its stored form, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Row<'a> {
    /// `k` values.
    F32(&'a [f32]),
    /// `2k` bytes, little-endian bf16 (f32 bits = `u16 << 16`).
    Bf16(&'a [u8]),
    /// `2k` bytes, little-endian IEEE binary16.
    F16(&'a [u8]),
    /// `k` e4m3fn codes; value `j` = `E4M3(codes[j]) * scales[j / block]`.
    Fp8 { codes: &'a [u8], scales: &'a [f32], block: usize },
    /// `k / 2` bytes, two e2m1 codes per byte, low nibble first (value `2i` is the low nibble of
    /// byte `i`); value `j` = `E2M1(code j) * scales[j / group]`. `k` is even.
    Fp4 { codes: &'a [u8], scales: &'a [f32], group: usize },
}

impl Row<'_> {
    /// The number of values `k`.
    pub fn len(&self) -> usize {
        match *self {
            Row::F32(v) => v.len(),
            Row::Bf16(b) | Row::F16(b) => b.len() / 2,
            Row::Fp8 { codes, .. } => codes.len(),
            Row::Fp4 { codes, .. } => codes.len() * 2,
        }
    }

    /// Values per scale (`block` or `group`), or `None` for unscaled formats.
    pub(crate) fn block(&self) -> Option<usize> {
        match *self {
            Row::F32(_) | Row::Bf16(_) | Row::F16(_) => None,
            Row::Fp8 { block, .. } => Some(block),
            Row::Fp4 { group, .. } => Some(group),
        }
    }

    /// Whether the row has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first byte of the row's storage and the bytes that hold one chunk of [`LANES`]
    /// values (for prefetching the row as a stream).
    #[inline(always)]
    pub(crate) fn stream(&self) -> (*const u8, usize) {
        match *self {
            Row::F32(v) => (v.as_ptr().cast(), 4 * LANES),
            Row::Bf16(b) | Row::F16(b) => (b.as_ptr(), 2 * LANES),
            Row::Fp8 { codes, .. } => (codes.as_ptr(), LANES),
            Row::Fp4 { codes, .. } => (codes.as_ptr(), LANES / 2),
        }
    }

    /// Panics unless the slices agree with each other (the kernels read by pointer).
    fn check(&self) {
        let k = self.len();
        match *self {
            Row::F32(_) => {}
            Row::Bf16(b) | Row::F16(b) => assert!(b.len() % 2 == 0, "a 16-bit row needs an even byte count"),
            Row::Fp8 { scales, block, .. } => {
                assert!(block > 0, "an FP8 row needs a block size of at least 1");
                assert!(scales.len() >= k.div_ceil(block), "FP8 row: {k} values need {} scales", k.div_ceil(block));
            }
            Row::Fp4 { scales, group, .. } => {
                assert!(group > 0, "an FP4 row needs a group size of at least 1");
                assert!(scales.len() >= k.div_ceil(group), "FP4 row: {k} values need {} scales", k.div_ceil(group));
            }
        }
    }

    /// Value `j`, decoded through the scalar tables (the definition every path matches).
    #[inline]
    pub(crate) fn value(&self, j: usize) -> f32 {
        match *self {
            Row::F32(v) => v[j],
            Row::Bf16(b) => bf16_at(b, j),
            Row::F16(b) => f16_at(b, j),
            Row::Fp8 { codes, scales, block } => E4M3_TO_F32[codes[j] as usize] * scales[j / block],
            Row::Fp4 { codes, scales, group } => E2M1_TO_F32[nibble(codes, j) as usize] * scales[j / group],
        }
    }
}

/// bf16 element `j` of little-endian bytes, widened exactly.
#[inline(always)]
fn bf16_at(b: &[u8], j: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[2 * j], b[2 * j + 1]]) as u32) << 16)
}

/// IEEE half element `j` of little-endian bytes, widened exactly.
#[inline(always)]
fn f16_at(b: &[u8], j: usize) -> f32 {
    half::f16::from_le_bytes([b[2 * j], b[2 * j + 1]]).to_f32()
}

/// FP4 code `j` of a packed row (low nibble first).
#[inline(always)]
fn nibble(codes: &[u8], j: usize) -> u8 {
    (codes[j / 2] >> (4 * (j % 2))) & 0xF
}

/// `out[i] = Σ_j w[j] · xs[i·k + j]` for every input row `i` (`k = w.len()`,
/// `m = out.len()`, `xs.len() = m·k`), in the canonical order (module docs), so every
/// instruction set gives the same bits. Any `m` works; up to 8 rows (4 with AVX2) share one
/// decode of the weight.
///
/// Panics if `isa` is not supported by this CPU (use [`Isa::active`]) or the lengths disagree.
pub fn dot_rows(isa: Isa, w: &Row, xs: &[f32], out: &mut [f32]) {
    w.check();
    assert_eq!(xs.len(), out.len() * w.len(), "dot_rows: {} input rows of {} values", out.len(), w.len());
    match isa {
        // SAFETY: the scalar lanes run on any CPU; the lengths were checked above.
        Isa::Scalar => unsafe { dot_rows_with::<Scalar, 8>(w, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "dot_rows: this CPU does not support avx2+fma+f16c");
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the row and the slices
            // agree in length (checked above).
            unsafe { super::x86::dot_rows_avx2(w, xs, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "dot_rows: this CPU does not support avx512f/bw/dq/vl");
            // SAFETY: the CPU has AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C (checked above); the
            // row and the slices agree in length (checked above).
            unsafe { super::x86::dot_rows_avx512(w, xs, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        other => panic!("dot_rows: {} is not supported on this CPU", other.name()),
    }
}

/// A matrix whose rows [`dot_many`] reads one after another (a weight in its stored form).
pub trait Rows: Sync {
    /// Row `r` (values `k`, the same for every row), its scales decoded into `scratch` where
    /// the format has them. `scratch` is reused from row to row, so an implementation may keep
    /// scales there that rows share (FP8 rows of one 128-row block).
    fn row<'a>(&'a self, r: usize, scratch: &'a mut RowScratch) -> Row<'a>;

    /// An FP8 matrix's codes and scale blocks, for the one-input-row kernel that walks a block
    /// of rows at a time (`fp8_fold::rows`); `None` (the default) for other forms. Must describe
    /// the same matrix as [`Rows::row`] (the two paths must give the same bits).
    fn fp8_blocks(&self) -> Option<Fp8Blocks<'_>> {
        None
    }

    /// The scales of FP8 row block `b` (one per `block_cols` values), replacing the contents of
    /// `out`. Called only when [`Rows::fp8_blocks`] is `Some`.
    fn fp8_block_scales(&self, _b: usize, _out: &mut Vec<f32>) {}

    /// An FP4 matrix with E8M0 scales per 32 values, for the one-input-row kernel that reads
    /// the codes and scale bytes directly ([`super::fp4_f32`]); `None` (the default) for other
    /// forms. Must describe the same matrix as [`Rows::row`] (the two paths must give the same
    /// bits).
    fn fp4_groups(&self) -> Option<Fp4Groups<'_>> {
        None
    }

    /// A BF16 matrix's bytes (`[rows, k]` row-major) and `k`, so that a GEMV slices its rows
    /// directly instead of calling [`Rows::row`] per row (the calls showed as 2.5-3% of decode
    /// in perf; a 1024×1024 GEMV from cache went from 33-42 to 24-31 µs); `None` (the default)
    /// for other forms. Must describe the same matrix as [`Rows::row`].
    fn bf16_rows(&self) -> Option<(&[u8], usize)> {
        None
    }
}

/// The codes of an FP8 matrix ([`Rows::fp8_blocks`]): `codes` is `[rows, k]` e4m3fn, row-major,
/// with one scale per `block_rows × block_cols` block.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Blocks<'a> {
    pub codes: &'a [u8],
    pub k: usize,
    pub block_rows: usize,
    pub block_cols: usize,
    /// Which row blocks hold no NaN code (`0x7F`, `0xFF`), found when a decode GEMV first
    /// reaches each block. The folded kernel skips its per-chunk NaN test (about a fifth of its
    /// vector work) on such blocks; elsewhere it keeps the test, and a call that meets a NaN
    /// declines (the general path then declines the row pairs that hold one).
    pub nan_free: &'a NanFreeBlocks,
}

impl Fp8Blocks<'_> {
    /// Whether row block `b` holds no NaN code ([`NanFreeBlocks`]: scanned on the first ask).
    /// Panics if `b` is not a block of the codes.
    pub fn block_nan_free(&self, b: usize) -> bool {
        let rows = self.codes.len() / self.k.max(1);
        let first = b * self.block_rows;
        assert!(first < rows, "Fp8Blocks::block_nan_free: block {b} of {rows} rows");
        let end = (first + self.block_rows).min(rows);
        self.nan_free.get(b, &self.codes[first * self.k..end * self.k])
    }
}

/// Per row block of an FP8 matrix: whether its codes hold no NaN (`0x7F`, `0xFF`). Unknown
/// until asked; the first [`NanFreeBlocks::get`] for a block scans that block's codes (128 rows
/// of a checkpoint matrix: a few microseconds), so the scans of a matrix are spread over the
/// tasks of its first decode GEMV, which read those rows next anyway. Two tasks may scan one
/// block at once: both find the same answer, as the codes never change.
#[derive(Debug, Default)]
pub struct NanFreeBlocks(Box<[AtomicU8]>);

/// [`NanFreeBlocks`]' states of a block.
const UNKNOWN: u8 = 0;
const CLEAN: u8 = 1;
const HAS_NAN: u8 = 2;

impl NanFreeBlocks {
    /// `blocks` row blocks, none scanned yet.
    pub fn new(blocks: usize) -> Self {
        NanFreeBlocks((0..blocks).map(|_| AtomicU8::new(UNKNOWN)).collect())
    }

    /// What is known of block `b`: `Some(true)` clean, `Some(false)` holds a NaN, `None` not
    /// scanned yet (or past the end).
    pub fn known(&self, b: usize) -> Option<bool> {
        match self.0.get(b)?.load(Ordering::Relaxed) {
            CLEAN => Some(true),
            HAS_NAN => Some(false),
            _ => None,
        }
    }

    /// Whether row block `b`, whose codes are `codes`, holds no NaN code; `codes` is scanned
    /// the first time a block is asked about. `false` for a block past the end. The caller
    /// ([`Fp8Blocks::block_nan_free`]) passes the same codes for a block every time.
    fn get(&self, b: usize, codes: &[u8]) -> bool {
        let Some(state) = self.0.get(b) else { return false };
        match state.load(Ordering::Relaxed) {
            CLEAN => true,
            HAS_NAN => false,
            _ => {
                let clean = fp8_codes_nan_free(codes);
                state.store(if clean { CLEAN } else { HAS_NAN }, Ordering::Relaxed);
                clean
            }
        }
    }
}

/// Whether none of `codes` (e4m3fn) is a NaN (`0x7F` or `0xFF`). One pass without early exit
/// per 4 KiB piece, which the compiler vectorises.
pub fn fp8_codes_nan_free(codes: &[u8]) -> bool {
    !codes.chunks(4096).any(|c| c.iter().fold(false, |nan, &b| nan | (b & 0x7F == 0x7F)))
}

/// The codes and scales of an FP4 matrix ([`Rows::fp4_groups`]): `codes` is `[rows, k / 2]`
/// (two e2m1 codes a byte, low nibble first), `scales` `[rows, k / 32]` E8M0 bytes, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Fp4Groups<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    pub k: usize,
}

/// Per-thread scratch of [`Rows::row`]: decoded scales and which rows they belong to.
#[derive(Debug, Default)]
pub struct RowScratch {
    /// The scales of the row (or row block) `key`.
    pub scales: Vec<f32>,
    /// What `scales` were decoded for (an implementation's own key), `None` at first.
    pub key: Option<usize>,
}

/// `out[j·m + i] = row(start + j) · xs[i·k .. (i+1)·k]` for `j` in `0..n` and the `m =
/// out.len() / n` input rows: [`dot_rows`] on `n` consecutive rows, with the instruction set
/// checked and dispatched once for all of them (so each row costs its decode and its
/// multiply-adds, not a call). Same bits as [`dot_rows`] row by row.
///
/// Panics if `isa` is not supported, `n` is 0 with a non-empty `out`, or the lengths disagree.
pub fn dot_many<W: Rows>(isa: Isa, w: &W, start: usize, n: usize, xs: &[f32], out: &mut [f32]) {
    if n == 0 {
        assert!(out.is_empty(), "dot_many: no rows but {} outputs", out.len());
        return;
    }
    assert_eq!(out.len() % n, 0, "dot_many: {} outputs for {n} rows", out.len());
    match isa {
        // SAFETY: the scalar lanes run on any CPU; `dot_many_with` checks every row and length.
        Isa::Scalar => unsafe { dot_many_with::<Scalar, W, 8>(w, start, n, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "dot_many: this CPU does not support avx2+fma+f16c");
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `dot_many_with` checks
            // every row and length.
            unsafe { super::x86::dot_many_avx2(w, start, n, xs, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "dot_many: this CPU does not support avx512f/bw/dq/vl");
            // SAFETY: the CPU has AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C (checked above);
            // `dot_many_with` checks every row and length.
            unsafe { super::x86::dot_many_avx512(w, start, n, xs, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        other => panic!("dot_many: {} is not supported on this CPU", other.name()),
    }
}

/// [`dot_many`] on the instruction set `S`: each row checked, then [`dot_rows_with`].
///
/// # Safety
///
/// The CPU supports `S`.
#[inline(always)]
pub(crate) unsafe fn dot_many_with<S: Lanes, W: Rows, const G: usize>(
    w: &W,
    start: usize,
    n: usize,
    xs: &[f32],
    out: &mut [f32],
) where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    let m = out.len() / n;
    let mut scratch = RowScratch::default();
    let mut decoded = Vec::new();
    if let (1, Some(isa), Some(blocks)) = (m, S::FOLDS_FP8, w.fp8_blocks()) {
        // SAFETY: `FOLDS_FP8` names AVX2 or AVX-512, a set the CPU supports (the caller
        // guarantees `S`); `rows` checks the lengths.
        if unsafe { super::fp8_fold::rows(isa, w, blocks, start, n, xs, out) } {
            return;
        }
    }
    if let (1, Some(isa), Some(groups)) = (m, S::FP4_TABLES, w.fp4_groups()) {
        // SAFETY: `FP4_TABLES` names a set the CPU supports (the caller guarantees `S`);
        // `rows` checks the lengths.
        if unsafe { super::fp4_f32::rows(isa, groups, start, n, xs, out) } {
            return;
        }
    }
    if m == 1 {
        // One input row (decode): rows two at a time, their chunks interleaved. The pair is
        // row i and row i + n/2, far apart: two adjacent rows interleaved make one
        // zig-zagging stream within a page, which the hardware prefetchers do not follow (a
        // 265 MB BF16 head took 18.5 ms instead of 10.6), while two distant rows are two
        // clean sequential streams.
        let mut second = RowScratch::default();
        // The input in the split layout, made when a pair first needs it.
        let mut split = Vec::new();
        // The folds of `fp8_fold`, taken from the thread when an FP8 pair first needs them.
        let mut folded: Option<FoldedPair> = None;
        let h = n / 2;
        let bf16 = w.bf16_rows();
        for i in 0..h {
            let (j0, j1) = (i, i + h);
            let (r0, r1) = match bf16 {
                Some((bytes, k)) => {
                    let row = |r: usize| Row::Bf16(&bytes[r * 2 * k..(r + 1) * 2 * k]);
                    (row(start + j0), row(start + j1))
                }
                None => (w.row(start + j0, &mut scratch), w.row(start + j1, &mut second)),
            };
            r0.check();
            r1.check();
            assert!(xs.len() == r0.len() && xs.len() == r1.len(), "dot_many: one input row of {} values", xs.len());
            // No closures here: a closure gets the target features of the function it is
            // written in (none: this one is inlined into `#[target_feature]` entry points), so
            // the kernels inside one stay instructions only if the inliner takes the closure
            // too; through `Option::or_else` it did not, and AVX2 decode ran 15 times slower.
            let mut got = None;
            if S::FOLDS_FP8.is_some() && matches!(r0, Row::Fp8 { .. }) {
                if folded.is_none() {
                    folded = Some(FoldedPair::take(xs));
                }
                if let Some(f) = folded.as_mut() {
                    // SAFETY: `FOLDS_FP8` names AVX2 or AVX-512, so the CPU has AVX2 and FMA;
                    // the rows and lengths were checked above.
                    got = unsafe { f.pair(&r0, &r1) };
                }
            }
            if got.is_none() {
                // SAFETY: the caller guarantees `S`; both rows and the lengths were checked above.
                got = unsafe { pair_any::<S>(&r0, &r1, xs, &mut split) };
            }
            match got {
                Some((a, b)) => (out[j0], out[j1]) = (a, b),
                // SAFETY: as above.
                None => unsafe {
                    dot_rows_with::<S, G>(&r0, xs, &mut out[j0..j0 + 1]);
                    dot_rows_with::<S, G>(&r1, xs, &mut out[j1..j1 + 1]);
                },
            }
        }
        if n % 2 == 1 {
            let j = n - 1;
            let row = w.row(start + j, &mut scratch);
            row.check();
            assert_eq!(xs.len(), row.len(), "dot_many: one input row of {} values", row.len());
            // SAFETY: as above.
            unsafe { dot_rows_with::<S, G>(&row, xs, &mut out[j..j + 1]) }
        }
        return;
    }
    if S::TILE_INPUTS > 1 && (2..=S::TILE_MOST_INPUTS).contains(&m) {
        // Several input rows (batched decode, a speculative verify step): tiles of rows ×
        // input rows with the weights decoded in registers ([`tile_any`]). (No input rows,
        // `m = 0`, leave nothing to compute: the loop below does nothing.)
        // SAFETY: the caller guarantees `S`; `tiled` checks every row and length.
        if unsafe { tiled::<S, W>(w, start, n, xs, out) } {
            return;
        }
    }
    for (j, o) in out.chunks_exact_mut(m.max(1)).take(n).enumerate() {
        let row = w.row(start + j, &mut scratch);
        row.check();
        let k = row.len();
        assert_eq!(xs.len(), m * k, "dot_many: {m} input rows of {k} values");
        if matches!(row, Row::F32(_)) {
            // SAFETY: the caller guarantees `S`; the row and the lengths were checked above.
            unsafe { dot_rows_with::<S, G>(&row, xs, o) }
        } else {
            // Several input rows where no tiles run (the scalar lanes, AVX2 past
            // `TILE_MOST_INPUTS`, rows not in whole chunks): decode the row once into L1 (the
            // values `dot_rows_with` would decode, bit for bit: `decode_row`'s contract) and
            // run the f32 kernel on it.
            decoded.resize(k, 0f32);
            // SAFETY: as above; `decoded` has `k` values.
            unsafe {
                decode_with::<S>(&row, &mut decoded);
                dot_rows_with::<S, G>(&Row::F32(&decoded), xs, o)
            }
        }
    }
}

/// [`dot_many_with`] for `m = out.len() / n > 1` input rows, in tiles: [`Lanes::TILE_ROWS`]
/// weight rows (far apart, as the one-row path pairs them: two clean memory streams) against
/// up to [`Lanes::TILE_INPUTS`] input rows, each chunk decoded in registers once per tile and
/// multiplied into every input row of it ([`tile`]), the inputs' chunks loaded once for the
/// tile's rows. The columns are taken in slices whose `m` input rows fit in L1
/// ([`TILE_INPUT_BYTES`]), a group of rows ([`TILE_WEIGHT_BYTES`], in L2 meanwhile) going
/// through one slice before the next: the inputs are then read from L1, not L2, and each
/// weight byte is still fetched from memory once. The
/// accumulators wait in memory between slices (exact: a store and a load change no bits), so
/// each output's lanes see the canonical `fma` sequence and the bits are those of
/// [`dot_rows`].
///
/// Why: decoding a row into memory and running the f32 kernel on it read all `m · k` input
/// values from L2 for every weight row; on a 2-vCPU Zen 4 (one 512-bit load a cycle) four
/// input rows then cost about 8 one-row GEMVs (`tests/gemv_bench.rs`).
///
/// Returns `false`, having written nothing, when the first row is not in whole chunks of whole
/// blocks (the caller's row-by-row path then computes everything). A unit of rows whose
/// blocks turn out not to fit (a block without an exact fast decode) is computed row by row
/// here.
///
/// # Safety
///
/// The CPU supports `S`.
#[inline(always)]
unsafe fn tiled<S: Lanes, W: Rows>(w: &W, start: usize, n: usize, xs: &[f32], out: &mut [f32]) -> bool
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    let m = out.len() / n;
    let (mut scratch, mut second) = (RowScratch::default(), RowScratch::default());
    // The rows' length, blocks and layout (one weight: all rows alike, checked below).
    let (k, blocks, split_layout, format) = {
        let first = w.row(start, &mut scratch);
        first.check();
        (first.len(), first.block(), row_splits::<S>(&first), format_of(&first))
    };
    assert_eq!(xs.len(), m * k, "dot_many: {m} input rows of {k} values");
    let block = blocks.unwrap_or(k);
    if k == 0 || !k.is_multiple_of(LANES) || !block.is_multiple_of(LANES) {
        return false;
    }
    // Slices of whole blocks (FP8's 128, FP4's 32; one chunk for the unscaled formats).
    let unit = if blocks.is_some() { block } else { LANES };
    let slice = (TILE_INPUT_BYTES / (4 * m)).max(unit) / unit * unit;
    // Units of rows: pairs `t, t + h` (or single rows), then the odd row left.
    let r = S::TILE_ROWS.clamp(1, 2);
    let h = n / r;
    let mut units: Vec<([usize; 2], usize)> = (0..h).map(|t| ([t, t + h], r)).collect();
    units.extend((h * r..n).map(|j| ([j, j], 1)));
    let mut failed = vec![false; units.len()];
    // The inputs in the split layout, for formats that decode in it (made when first needed).
    let mut split = Vec::new();
    let mut decoded = Vec::new();
    // Units a group: their rows (at most TILE_WEIGHT_BYTES, counted as f32) stay in L2 while
    // the group goes through the slices, so no weight byte is fetched from memory twice.
    let group = (TILE_WEIGHT_BYTES / (2 * 4 * k)).max(1);
    // The group's accumulators, `2 · m` a unit (row q, input i at `q · m + i`), reused.
    let mut acc = Vec::with_capacity(group * 2 * m);
    for first_unit in (0..units.len()).step_by(group) {
        let group = first_unit..(first_unit + group).min(units.len());
        acc.clear();
        // SAFETY: the caller guarantees `S`.
        acc.resize(group.len() * 2 * m, unsafe { S::zero() });
        let mut j0 = 0;
        while j0 < k {
            let j1 = (j0 + slice).min(k);
            for (u, &(rows, r)) in units.iter().enumerate().take(group.end).skip(group.start) {
                if failed[u] {
                    continue;
                }
                let r0 = w.row(start + rows[0], &mut scratch);
                let r1 = if r == 2 { Some(w.row(start + rows[1], &mut second)) } else { None };
                for row in std::iter::once(&r0).chain(r1.as_ref()) {
                    row.check();
                    assert!(
                        row.len() == k && row.block() == blocks && format_of(row) == format,
                        "dot_many: rows of different shapes or formats"
                    );
                }
                let at = (u - group.start) * 2 * m;
                let a = &mut acc[at..at + 2 * m];
                let mut i = 0;
                while i < m {
                    let g = (m - i).min(S::TILE_INPUTS).min(MAX_TILE_INPUTS);
                    // SAFETY: the caller guarantees `S`; the rows were checked, they and every
                    // input row have `k` values (a multiple of 32, in blocks of whole chunks).
                    if !unsafe { tile_any::<S>(&r0, r1.as_ref(), xs, k, &mut split, (i, g), (j0, j1), a) } {
                        failed[u] = true;
                        break;
                    }
                    i += g;
                }
            }
            j0 = j1;
        }
        // The group's outputs.
        for (u, &(rows, r)) in units.iter().enumerate().take(group.end).skip(group.start) {
            for (q, &row) in rows[..r].iter().enumerate() {
                let o = &mut out[row * m..(row + 1) * m];
                if failed[u] {
                    // Row by row, as the caller's fallback does (rare: extreme scales).
                    let wr = w.row(start + row, &mut scratch);
                    decoded.resize(k, 0f32);
                    // SAFETY: the caller guarantees `S`; the row was checked above.
                    unsafe {
                        decode_with::<S>(&wr, &mut decoded);
                        dot_rows_with::<S, 4>(&Row::F32(&decoded), xs, o);
                    }
                    continue;
                }
                let at = (u - group.start) * 2 * m + q * m;
                for (v, &a) in o.iter_mut().zip(&acc[at..at + m]) {
                    // SAFETY: the caller guarantees `S`.
                    *v = unsafe {
                        if split_layout {
                            S::reduce_split(a)
                        } else {
                            S::reduce(a)
                        }
                    };
                }
            }
        }
    }
    true
}

/// The input bytes one slice of [`tiled`] keeps in L1 for all input rows (half of a 32 KiB
/// L1, leaving the rest to the weights and the accumulators).
const TILE_INPUT_BYTES: usize = 16 << 10;

/// The weight bytes (as f32) of the rows [`tiled`] takes through all column slices before the
/// next rows: a quarter of a 1 MiB L2.
const TILE_WEIGHT_BYTES: usize = 256 << 10;

/// The most input rows one tile takes on any instruction set.
const MAX_TILE_INPUTS: usize = 4;

/// The row's format, as a number ([`tiled`] checks that a weight's rows share it).
fn format_of(row: &Row) -> u8 {
    match row {
        Row::F32(_) => 0,
        Row::Bf16(_) => 1,
        Row::F16(_) => 2,
        Row::Fp8 { .. } => 3,
        Row::Fp4 { .. } => 4,
    }
}

/// Whether `S` decodes the row's format in the split layout ([`Decode::SPLIT`]).
#[inline(always)]
fn row_splits<S: Lanes>(row: &Row) -> bool
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    match row {
        Row::F32(_) => <F32Dec as Decode<S>>::SPLIT,
        Row::Bf16(_) => <Bf16Dec as Decode<S>>::SPLIT,
        Row::F16(_) => <F16Dec as Decode<S>>::SPLIT,
        Row::Fp8 { .. } => <Fp8Dec as Decode<S>>::SPLIT,
        Row::Fp4 { .. } => <Fp4Dec as Decode<S>>::SPLIT,
    }
}

/// [`tile`] for the rows' format (`r1`, if any, is of `r0`'s format: the caller checks).
/// `inputs = (first, g)` picks input rows `first..first + g` (`g ≤ MAX_TILE_INPUTS`) of
/// `xs_all` (all input rows, `k` values each); `split` is empty or holds all of them in the
/// split layout ([`split_input`] per row), made here when a splitting format first needs it.
/// `acc` holds the unit's `2 · m` accumulators (row `q`, input `i` at `q · m + i`).
///
/// # Safety
///
/// The CPU supports `S`; both rows are checked and `k` long, `xs_all` holds the input rows,
/// `cols` is a range of whole blocks inside `0..k`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_any<S: Lanes>(
    r0: &Row,
    r1: Option<&Row>,
    xs_all: &[f32],
    k: usize,
    split: &mut Vec<f32>,
    inputs: (usize, usize),
    cols: (usize, usize),
    acc: &mut [S::W],
) -> bool
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    macro_rules! go {
        ($dec:ident) => {{
            let d0 = $dec(*r0);
            match r1 {
                Some(r1) => tile_g::<S, _, 2>([&d0, &$dec(*r1)], xs_all, k, split, inputs, cols, acc),
                None => tile_g::<S, _, 1>([&d0], xs_all, k, split, inputs, cols, acc),
            }
        }};
    }
    // SAFETY (each arm): forwarded from the caller.
    unsafe {
        match r0 {
            Row::F32(_) => go!(F32Dec),
            Row::Bf16(_) => go!(Bf16Dec),
            Row::F16(_) => go!(F16Dec),
            Row::Fp8 { .. } => go!(Fp8Dec),
            Row::Fp4 { .. } => go!(Fp4Dec),
        }
    }
}

/// [`tile`] with the input count `g` as a constant, on the inputs in the decoder's layout.
///
/// # Safety
///
/// As [`tile_any`].
#[inline(always)]
unsafe fn tile_g<S: Lanes, D: Decode<S>, const R: usize>(
    d: [&D; R],
    xs_all: &[f32],
    k: usize,
    split: &mut Vec<f32>,
    (first, g): (usize, usize),
    cols: (usize, usize),
    acc: &mut [S::W],
) -> bool {
    let input: &[f32] = if D::SPLIT {
        if split.is_empty() {
            // Every input row, so the later tiles find them made.
            let mut one = Vec::with_capacity(k);
            for x in xs_all.chunks_exact(k) {
                split_input(x, &mut one);
                split.extend_from_slice(&one);
            }
        }
        &split[first * k..(first + g) * k]
    } else {
        &xs_all[first * k..(first + g) * k]
    };
    let m = xs_all.len() / k;
    // SAFETY (each arm): forwarded from the caller.
    unsafe {
        match g {
            1 => tile::<S, D, R, 1>(d, input, k, cols, acc, (first, m)),
            2 => tile::<S, D, R, 2>(d, input, k, cols, acc, (first, m)),
            3 => tile::<S, D, R, 3>(d, input, k, cols, acc, (first, m)),
            _ => tile::<S, D, R, 4>(d, input, k, cols, acc, (first, m)),
        }
    }
}

/// Columns `cols` of `R` weight rows against `M` input rows (`x`, `M · k` values, in the split
/// layout when `D::SPLIT`): every chunk of each row decoded once, in registers, and multiplied
/// into the `M` accumulators of that row, which are taken from and put back into `acc` (row
/// `q`, input `first + i` at `q · m + first + i`). Each accumulator sees the `fma`s of
/// [`group`] (or of [`pair`]'s split layout), so the bits are the canonical ones. `false`
/// when a block's fast decode is not exact for one of the rows (the accumulators are then
/// partial: the caller computes the rows again another way).
///
/// # Safety
///
/// The CPU supports `S`; the rows are checked, `k` long (a multiple of 32, in blocks of whole
/// chunks), `x.len() == M · k` and `cols` is a range of whole blocks inside `0..k`.
#[inline(always)]
unsafe fn tile<S: Lanes, D: Decode<S>, const R: usize, const M: usize>(
    d: [&D; R],
    x: &[f32],
    k: usize,
    (j0, j1): (usize, usize),
    acc: &mut [S::W],
    (first, m): (usize, usize),
) -> bool {
    let block = d[0].row().block().unwrap_or(k);
    debug_assert!(x.len() == M * k && j1 <= k && j0.is_multiple_of(LANES) && j1.is_multiple_of(LANES));
    let mut a = [[S::zero(); M]; R];
    for q in 0..R {
        for i in 0..M {
            a[q][i] = acc[q * m + first + i];
        }
    }
    let mut j = j0;
    while j < j1 {
        let b = j / block;
        let Some(s0) = d[0].scale(b) else { return false };
        let mut s = [s0; R];
        for q in 1..R {
            let Some(sq) = d[q].scale(b) else { return false };
            s[q] = sq;
        }
        let end = ((b + 1) * block).min(j1);
        while j < end {
            // The inputs' chunks are loaded once for the tile's rows (no closure: see
            // `dot_many_with` on target features).
            let mut xv = [S::zero(); M];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = S::load(x.as_ptr().add(i * k + j));
            }
            for q in 0..R {
                let wv = if D::SPLIT { d[q].chunk_split(j, s[q]) } else { d[q].chunk(j, s[q]) };
                for i in 0..M {
                    a[q][i] = S::fma_reg(wv, xv[i], a[q][i]);
                }
            }
            j += LANES;
        }
    }
    for q in 0..R {
        for i in 0..M {
            acc[q * m + first + i] = a[q][i];
        }
    }
    true
}

/// The `k` values of the row widened to f32 into `out` (length `k`): exactly the values
/// [`dot_rows`] multiplies with, bit for bit equal to the scalar tables times the scales
/// (FP8's NaN codes `0x7F`/`0xFF` give NaN).
///
/// Panics if `isa` is not supported by this CPU or `out.len() != w.len()`.
pub fn decode_row(isa: Isa, w: &Row, out: &mut [f32]) {
    w.check();
    assert_eq!(out.len(), w.len(), "decode_row: the row has {} values", w.len());
    match isa {
        // SAFETY: the scalar lanes run on any CPU; the lengths were checked above.
        Isa::Scalar => unsafe { decode_with::<Scalar>(w, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "decode_row: this CPU does not support avx2+fma+f16c");
            // SAFETY: the CPU has AVX2, FMA and F16C and the lengths agree (checked above).
            unsafe { super::x86::decode_row_avx2(w, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "decode_row: this CPU does not support avx512f/bw/dq/vl");
            // SAFETY: the CPU has every feature of `Isa::Avx512` and the lengths agree (checked above).
            unsafe { super::x86::decode_row_avx512(w, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        other => panic!("decode_row: {} is not supported on this CPU", other.name()),
    }
}

/// `Σ a[j]·b[j]` in the canonical order: the same bits as [`dot_rows`] with `Row::F32(a)` and
/// the single input row `b`. Panics if the lengths differ or `isa` is not supported.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    dot_rows(isa, &Row::F32(a), b, &mut out);
    out[0]
}

// ---------------------------------------------------------------------------------------------
// The shared driver: one instruction set's 32-lane vector type (`Lanes`) and one format's
// chunk decoder (`Decode`) are plugged into the chunk loop below. Everything is
// `#[inline(always)]`, so it is compiled inside the `#[target_feature]` entry points of `x86.rs`.

/// A 32-lane f32 vector of one instruction set (the accumulator of one input row).
///
/// # Safety
///
/// Every method may only run on a CPU with the instruction set of the implementing type, and
/// pointer arguments must be valid for 32 f32 values.
pub(crate) trait Lanes {
    /// 32 f32 lanes (lane `l` holds chunk element `l`).
    type W: Copy;
    /// All lanes `+0.0`.
    unsafe fn zero() -> Self::W;
    /// Lanes `p[0..32]`.
    unsafe fn load(p: *const f32) -> Self::W;
    /// Writes the lanes to `p[0..32]`.
    unsafe fn store(w: Self::W, p: *mut f32);
    /// `fma(w[l], x[l], acc[l])` for every lane, each rounded once.
    unsafe fn fma(w: Self::W, x: *const f32, acc: Self::W) -> Self::W;
    /// [`Lanes::fma`] with the input in registers (a tile reuses it for several rows).
    unsafe fn fma_reg(w: Self::W, x: Self::W, acc: Self::W) -> Self::W {
        let mut b = [0f32; LANES];
        // SAFETY: `b` holds 32 values; the CPU supports `Self` (trait contract).
        unsafe {
            Self::store(x, b.as_mut_ptr());
            Self::fma(w, b.as_ptr(), acc)
        }
    }
    /// The canonical pairwise reduction (16, 8, 4, 2, 1).
    unsafe fn reduce(acc: Self::W) -> f32;
    /// The instruction set [`super::fp8_fold`]'s kernel runs with on these lanes, if any. An
    /// implementation may name only AVX2 or AVX-512, and only a set its own includes (the
    /// kernel is called on this promise).
    const FOLDS_FP8: Option<Isa> = None;
    /// The instruction set [`super::fp4_f32`]'s kernel runs with on these lanes, if any. An
    /// implementation may name only a set its own includes (the kernel is called on this
    /// promise).
    const FP4_TABLES: Option<Isa> = None;
    /// Weight rows (1 or 2) of one tile of several input rows ([`tiled`]).
    const TILE_ROWS: usize = 1;
    /// Input rows of one tile (at most `MAX_TILE_INPUTS`); 1 (the default) leaves several
    /// input rows to the decode-then-multiply path. A tile holds `TILE_ROWS · TILE_INPUTS`
    /// 32-lane accumulators, plus the decoded chunks, in registers.
    const TILE_INPUTS: usize = 1;
    /// The most input rows that go through tiles; more take the decode-then-multiply path.
    const TILE_MOST_INPUTS: usize = usize::MAX;
    /// The canonical reduction of an accumulator in the *split layout* (see
    /// [`Decode::chunk_split`]): the 16 even lanes first, then the 16 odd ones. (This default
    /// is the definition; the x86 lanes, the only ones whose decoders split, override it.) The canonical
    /// tree pairs lanes 16, 8, 4 and 2 apart, which keeps their parity, so it is the tree over
    /// the even lanes (8, 4, 2, 1 apart in the split layout), the same over the odd ones, and
    /// their sum last.
    unsafe fn reduce_split(acc: Self::W) -> f32 {
        let mut a = [0f32; LANES];
        // SAFETY: `a` holds 32 values; the CPU supports `Self` (trait contract).
        unsafe { Self::store(acc, a.as_mut_ptr()) };
        let (mut even, mut odd) = ([0f32; LANES / 2], [0f32; LANES / 2]);
        even.copy_from_slice(&a[..LANES / 2]);
        odd.copy_from_slice(&a[LANES / 2..]);
        reduce16(even) + reduce16(odd)
    }
}

/// The canonical tree over 16 values: `v[i] + v[i + 8]`, then `+ 4`, `+ 2`, `+ 1`.
fn reduce16(mut v: [f32; LANES / 2]) -> f32 {
    let mut h = LANES / 4;
    while h > 0 {
        for i in 0..h {
            v[i] += v[i + h];
        }
        h /= 2;
    }
    v[0]
}

/// The split layout of one 32-value chunk: position `p < 16` holds value `2p`, position
/// `16 + p` value `2p + 1` (the even values, then the odd ones).
#[inline(always)]
pub(crate) fn split_index(p: usize) -> usize {
    if p < LANES / 2 {
        2 * p
    } else {
        2 * (p - LANES / 2) + 1
    }
}

/// `x` with every full 32-value chunk in the split layout ([`split_index`]); a tail shorter
/// than a chunk is copied as it is.
pub(crate) fn split_input(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        out.extend((0..LANES).map(|p| c[split_index(p)]));
    }
    out.extend_from_slice(chunks.remainder());
}

/// The decoder of one stored format for one instruction set.
///
/// # Safety
///
/// As [`Lanes`]; `chunk(j, _)` reads elements `j..j + 32`, which must lie inside the row.
pub(crate) trait Decode<S: Lanes>: DecodedRow {
    /// A block's scale, prepared for `chunk` (a broadcast register, a scaled table).
    type Scale: Copy;
    /// The prepared scale of block `b`, or `None` when the fast decode would not be exact for
    /// it (then its values go through [`Row::value`]).
    unsafe fn scale(&self, b: usize) -> Option<Self::Scale>;
    /// Values `j..j + 32`, all in one block whose prepared scale is `s`.
    unsafe fn chunk(&self, j: usize, s: Self::Scale) -> S::W;
    /// Whether [`Decode::chunk_split`] is cheaper than [`Decode::chunk`] (so the one-input-row
    /// path permutes its input once and uses it).
    const SPLIT: bool = false;
    /// The values of [`Decode::chunk`] in the split layout ([`split_index`]): the same bits,
    /// in the order that formats packing neighbouring values together decode most cheaply
    /// (FP4's two nibbles of a byte, FP8's two bytes of a 16-bit word). Multiplied into an
    /// input in the same layout, each lane sees the same `fma`s as with `chunk`; the
    /// accumulator is then reduced by [`Lanes::reduce_split`].
    unsafe fn chunk_split(&self, j: usize, s: Self::Scale) -> S::W {
        // SAFETY: the trait contract is `chunk`'s.
        unsafe { to_split::<S>(self.chunk(j, s)) }
    }
}

/// A chunk in the canonical layout moved into the split layout through memory (the generic
/// [`Decode::chunk_split`], and the rare paths of the fast ones).
///
/// # Safety
///
/// The CPU supports `S`.
#[inline(always)]
pub(crate) unsafe fn to_split<S: Lanes>(w: S::W) -> S::W {
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    // SAFETY: `a` and `b` hold 32 values; the caller guarantees `S`.
    unsafe {
        S::store(w, a.as_mut_ptr());
        for (p, v) in b.iter_mut().enumerate() {
            *v = a[split_index(p)];
        }
        S::load(b.as_ptr())
    }
}

/// [`dot_rows`] on the instruction set `S`, input rows taken `G` at a time (at most 8).
///
/// # Safety
///
/// The CPU supports `S`; `w` is checked and `xs.len() == out.len() * w.len()`.
#[inline(always)]
pub(crate) unsafe fn dot_rows_with<S: Lanes, const G: usize>(w: &Row, xs: &[f32], out: &mut [f32])
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    match *w {
        Row::F32(v) => rows::<S, _, G>(&F32Dec(Row::F32(v)), xs, out),
        Row::Bf16(b) => rows::<S, _, G>(&Bf16Dec(Row::Bf16(b)), xs, out),
        Row::F16(b) => rows::<S, _, G>(&F16Dec(Row::F16(b)), xs, out),
        Row::Fp8 { .. } => rows::<S, _, G>(&Fp8Dec(*w), xs, out),
        Row::Fp4 { .. } => rows::<S, _, G>(&Fp4Dec(*w), xs, out),
    }
}

/// [`decode_row`] on the instruction set `S`.
///
/// # Safety
///
/// The CPU supports `S`; `w` is checked and `out.len() == w.len()`.
#[inline(always)]
pub(crate) unsafe fn decode_with<S: Lanes>(w: &Row, out: &mut [f32])
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    match *w {
        Row::F32(v) => out.copy_from_slice(v),
        Row::Bf16(b) => decode::<S, _>(&Bf16Dec(Row::Bf16(b)), out),
        Row::F16(b) => decode::<S, _>(&F16Dec(Row::F16(b)), out),
        Row::Fp8 { .. } => decode::<S, _>(&Fp8Dec(*w), out),
        Row::Fp4 { .. } => decode::<S, _>(&Fp4Dec(*w), out),
    }
}

/// The row a decoder reads, whatever the instruction set: every decoder holds its `Row`.
pub(crate) trait DecodedRow {
    /// The row.
    fn row(&self) -> &Row<'_>;
}

macro_rules! decoded_row {
    ($($t:ident),*) => {$(
        impl DecodedRow for $t<'_> {
            #[inline(always)]
            fn row(&self) -> &Row<'_> {
                &self.0
            }
        }
    )*};
}
decoded_row!(F32Dec, Bf16Dec, F16Dec, Fp8Dec, Fp4Dec);

/// The decoders, one per format; each holds its `Row` (of that variant only).
pub(crate) struct F32Dec<'a>(pub Row<'a>);
/// See [`F32Dec`].
pub(crate) struct Bf16Dec<'a>(pub Row<'a>);
/// See [`F32Dec`].
pub(crate) struct F16Dec<'a>(pub Row<'a>);
/// See [`F32Dec`].
pub(crate) struct Fp8Dec<'a>(pub Row<'a>);
/// See [`F32Dec`].
pub(crate) struct Fp4Dec<'a>(pub Row<'a>);

/// The row's bytes (16-bit formats and FP4), values (F32) or codes, as a base pointer.
macro_rules! row_parts {
    ($row:expr, F32) => {
        match $row {
            Row::F32(v) => v,
            _ => unreachable!(),
        }
    };
    ($row:expr, Half) => {
        match $row {
            Row::Bf16(b) | Row::F16(b) => b,
            _ => unreachable!(),
        }
    };
    ($row:expr, Scaled) => {
        match $row {
            Row::Fp8 { codes, scales, block } => (codes, scales, block),
            Row::Fp4 { codes, scales, group } => (codes, scales, group),
            _ => unreachable!(),
        }
    };
}
pub(crate) use row_parts;

/// [`pair`] for two rows of the same format, `None` when they differ.
///
/// # Safety
///
/// The CPU supports `S`; both rows are checked and `x.len()` is their length.
#[inline(always)]
unsafe fn pair_any<S: Lanes>(r0: &Row, r1: &Row, x: &[f32], split: &mut Vec<f32>) -> Option<(f32, f32)>
where
    for<'a> F32Dec<'a>: Decode<S>,
    for<'a> Bf16Dec<'a>: Decode<S>,
    for<'a> F16Dec<'a>: Decode<S>,
    for<'a> Fp8Dec<'a>: Decode<S>,
    for<'a> Fp4Dec<'a>: Decode<S>,
{
    match (*r0, *r1) {
        (Row::F32(_), Row::F32(_)) => pair(&F32Dec(*r0), &F32Dec(*r1), x, split),
        (Row::Bf16(_), Row::Bf16(_)) => pair(&Bf16Dec(*r0), &Bf16Dec(*r1), x, split),
        (Row::F16(_), Row::F16(_)) => pair(&F16Dec(*r0), &F16Dec(*r1), x, split),
        (Row::Fp8 { .. }, Row::Fp8 { .. }) => pair(&Fp8Dec(*r0), &Fp8Dec(*r1), x, split),
        (Row::Fp4 { .. }, Row::Fp4 { .. }) => pair(&Fp4Dec(*r0), &Fp4Dec(*r1), x, split),
        _ => None,
    }
}

/// Two rows against one input row `x`, their chunks interleaved: two independent decode and
/// multiply-add streams, which keep the core and the memory system busier than one. Each
/// row's lanes see exactly the `fma`s of [`group`] with `M = 1`, so the bits are the same.
/// `None` (no result) unless both rows are whole chunks (`k` a multiple of 32) in
/// blocks of whole chunks with every block's fast decode exact: those go row by row.
/// (A generic version over `R` rows in arrays compiled worse: 4 streams were slower than 2.)
/// Formats with [`Decode::SPLIT`] decode in the split layout and multiply with `split`, the
/// input in that layout ([`split_input`], made here when the first such pair needs it): the
/// same `fma`s per lane, so the same bits.
///
/// # Safety
///
/// The CPU supports `S`; both rows are checked, `x.len()` is their length and `split` is
/// empty or `split_input(x)`.
#[inline(always)]
unsafe fn pair<S: Lanes, D: Decode<S>>(d0: &D, d1: &D, x: &[f32], split: &mut Vec<f32>) -> Option<(f32, f32)> {
    let k = d0.row().len();
    let block = d0.row().block().unwrap_or(k.max(LANES));
    if d1.row().len() != k
        || d1.row().block() != d0.row().block()
        || !k.is_multiple_of(LANES)
        || !block.is_multiple_of(LANES)
    {
        return None;
    }
    let blocks = k.div_ceil(block);
    // A block whose fast decode is not exact (`scale` is `None`) sends both rows down the
    // row-by-row path, dropping what was summed so far; it takes extreme scales, so it is rare.
    let (mut acc0, mut acc1) = (S::zero(), S::zero());
    // `D::SPLIT` is a constant: each format compiles to one of the two decodes.
    if D::SPLIT && split.is_empty() {
        split_input(x, split);
    }
    let input: &[f32] = if D::SPLIT { split } else { x };
    debug_assert_eq!(input.len(), k);
    // Each row's bytes are asked for ahead of the loads ([`super::prefetch`]).
    let ((mut p0, step), (mut p1, _)) = (d0.row().stream(), d1.row().stream());
    let mut j = 0;
    for b in 0..blocks {
        let (s0, s1) = (d0.scale(b)?, d1.scale(b)?);
        let end = (j + block).min(k);
        while j < end {
            let (w0, w1) = if D::SPLIT {
                (d0.chunk_split(j, s0), d1.chunk_split(j, s1))
            } else {
                (d0.chunk(j, s0), d1.chunk(j, s1))
            };
            prefetch::ahead(p0);
            prefetch::ahead(p1);
            if step > 64 {
                // F32 rows: a chunk is two cache lines.
                prefetch::ahead(p0.wrapping_add(64));
                prefetch::ahead(p1.wrapping_add(64));
            }
            (p0, p1) = (p0.wrapping_add(step), p1.wrapping_add(step));
            let xp = input.as_ptr().add(j);
            acc0 = S::fma(w0, xp, acc0);
            acc1 = S::fma(w1, xp, acc1);
            j += LANES;
        }
    }
    if D::SPLIT {
        Some((S::reduce_split(acc0), S::reduce_split(acc1)))
    } else {
        Some((S::reduce(acc0), S::reduce(acc1)))
    }
}

/// Runs the input rows through [`group`], `G` (or the rest) at a time.
#[inline(always)]
unsafe fn rows<S: Lanes, D: Decode<S>, const G: usize>(d: &D, xs: &[f32], out: &mut [f32]) {
    let k = d.row().len();
    let mut r = 0;
    while r < out.len() {
        let g = (out.len() - r).min(G);
        let (x, o) = (&xs[r * k..(r + g) * k], &mut out[r..r + g]);
        match g {
            1 => group::<S, D, 1>(d, x, o),
            2 => group::<S, D, 2>(d, x, o),
            3 => group::<S, D, 3>(d, x, o),
            4 => group::<S, D, 4>(d, x, o),
            5 => group::<S, D, 5>(d, x, o),
            6 => group::<S, D, 6>(d, x, o),
            7 => group::<S, D, 7>(d, x, o),
            _ => group::<S, D, 8>(d, x, o),
        }
        r += g;
    }
}

/// `M` input rows (`xs` is `M·k` values) against the row, accumulators in registers.
///
/// Full chunks inside a block are decoded by `D::chunk` with the block's scale; the tail
/// chunk, chunks of blocks whose size is not a multiple of 32 (they may straddle two scales)
/// and blocks whose fast decode would not be exact go through [`Row::value`] into a
/// zero-padded buffer. Either way the lanes see the canonical sequence of `fma`s.
#[inline(always)]
unsafe fn group<S: Lanes, D: Decode<S>, const M: usize>(d: &D, xs: &[f32], out: &mut [f32]) {
    let k = d.row().len();
    let x: [&[f32]; M] = std::array::from_fn(|i| &xs[i * k..(i + 1) * k]);
    let mut acc = [S::zero(); M];
    let full = k / LANES * LANES;
    let block = d.row().block().unwrap_or(full.max(LANES));
    let mut j = 0;
    if block.is_multiple_of(LANES) {
        let mut b = 0;
        while j < full {
            let end = (j + block).min(full);
            match d.scale(b) {
                Some(s) => {
                    while j < end {
                        let w = d.chunk(j, s);
                        for i in 0..M {
                            acc[i] = S::fma(w, x[i].as_ptr().add(j), acc[i]);
                        }
                        j += LANES;
                    }
                }
                None => {
                    while j < end {
                        slow_chunk::<S, M>(d.row(), j, &x, &mut acc);
                        j += LANES;
                    }
                }
            }
            b += 1;
        }
    }
    while j < k {
        slow_chunk::<S, M>(d.row(), j, &x, &mut acc);
        j += LANES;
    }
    for i in 0..M {
        out[i] = S::reduce(acc[i]);
    }
}

/// The chunk at `j` through [`Row::value`], zero-padded past `k` (as are the inputs).
#[inline(always)]
unsafe fn slow_chunk<S: Lanes, const M: usize>(w: &Row, j: usize, x: &[&[f32]; M], acc: &mut [S::W; M]) {
    let n = (w.len() - j).min(LANES);
    let mut wb = [0f32; LANES];
    for (l, v) in wb[..n].iter_mut().enumerate() {
        *v = w.value(j + l);
    }
    let wv = S::load(wb.as_ptr());
    for i in 0..M {
        let mut xb = [0f32; LANES];
        xb[..n].copy_from_slice(&x[i][j..j + n]);
        acc[i] = S::fma(wv, xb.as_ptr(), acc[i]);
    }
}

/// Decodes the whole row into `out` (same chunking as [`group`]).
#[inline(always)]
unsafe fn decode<S: Lanes, D: Decode<S>>(d: &D, out: &mut [f32]) {
    let k = d.row().len();
    let full = k / LANES * LANES;
    let block = d.row().block().unwrap_or(full.max(LANES));
    let mut j = 0;
    if block.is_multiple_of(LANES) {
        let mut b = 0;
        while j < full {
            let end = (j + block).min(full);
            if let Some(s) = d.scale(b) {
                while j < end {
                    S::store(d.chunk(j, s), out[j..j + LANES].as_mut_ptr());
                    j += LANES;
                }
            }
            // A block without a fast scale is left to the loop below.
            while j < end {
                out[j] = d.row().value(j);
                j += 1;
            }
            b += 1;
        }
    }
    for (o, jj) in out[j..].iter_mut().zip(j..) {
        *o = d.row().value(jj);
    }
}

// ---------------------------------------------------------------------------------------------
// The scalar reference (and the aarch64 path).

/// Portable lanes: `[f32; 32]`, `f32::mul_add`.
pub(crate) struct Scalar;

impl Lanes for Scalar {
    type W = [f32; LANES];

    #[inline(always)]
    unsafe fn zero() -> Self::W {
        [0.0; LANES]
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::W {
        // SAFETY: the caller passes a pointer valid for 32 values (trait contract).
        unsafe { p.cast::<[f32; LANES]>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn store(w: Self::W, p: *mut f32) {
        // SAFETY: the caller passes a pointer valid for 32 values (trait contract).
        unsafe { p.cast::<[f32; LANES]>().write_unaligned(w) }
    }

    #[inline(always)]
    unsafe fn fma(w: Self::W, x: *const f32, acc: Self::W) -> Self::W {
        // SAFETY: the caller passes a pointer valid for 32 values (trait contract).
        let x = unsafe { Self::load(x) };
        std::array::from_fn(|l| w[l].mul_add(x[l], acc[l]))
    }

    #[inline(always)]
    unsafe fn reduce(acc: Self::W) -> f32 {
        reduce32(&acc)
    }
}

/// The canonical reduction of 32 lanes: `s16[i] = a[i] + a[i+16]`, then 8, 4, 2, 1.
#[inline(always)]
pub(crate) fn reduce32(a: &[f32; LANES]) -> f32 {
    let s16: [f32; 16] = std::array::from_fn(|i| a[i] + a[i + 16]);
    let s8: [f32; 8] = std::array::from_fn(|i| s16[i] + s16[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2: [f32; 2] = std::array::from_fn(|i| s4[i] + s4[i + 2]);
    s2[0] + s2[1]
}

impl Decode<Scalar> for F32Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [f32; LANES] {
        let v = row_parts!(self.0, F32);
        v[j..j + LANES].try_into().expect("a chunk")
    }
}

impl Decode<Scalar> for Bf16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [f32; LANES] {
        let b = row_parts!(self.0, Half);
        std::array::from_fn(|l| bf16_at(b, j + l))
    }
}

impl Decode<Scalar> for F16Dec<'_> {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(&self, _: usize) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, _: ()) -> [f32; LANES] {
        let b = row_parts!(self.0, Half);
        std::array::from_fn(|l| f16_at(b, j + l))
    }
}

impl Decode<Scalar> for Fp8Dec<'_> {
    type Scale = f32;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<f32> {
        Some(row_parts!(self.0, Scaled).1[b])
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, s: f32) -> [f32; LANES] {
        let codes = row_parts!(self.0, Scaled).0;
        std::array::from_fn(|l| E4M3_TO_F32[codes[j + l] as usize] * s)
    }
}

impl Decode<Scalar> for Fp4Dec<'_> {
    type Scale = f32;
    #[inline(always)]
    unsafe fn scale(&self, b: usize) -> Option<f32> {
        Some(row_parts!(self.0, Scaled).1[b])
    }
    #[inline(always)]
    unsafe fn chunk(&self, j: usize, s: f32) -> [f32; LANES] {
        let codes = row_parts!(self.0, Scaled).0;
        std::array::from_fn(|l| E2M1_TO_F32[nibble(codes, j + l) as usize] * s)
    }
}

#[cfg(test)]
#[path = "weights_tests.rs"]
mod tests;
