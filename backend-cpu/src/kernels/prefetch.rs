//! Software prefetch of the decode GEMVs' weight streams.
//!
//! A decode step reads each weight once, from memory, as a few long sequential streams: the
//! paired rows of [`super::weights::dot_many`] (row `i` with row `i + n/2`), two a thread. On
//! the 2-vCPU Intel Xeon measured on 2026-12-05 (AVX-512 with BF16 and VNNI, AMX; 300 MiB of
//! L3) the hardware prefetchers alone held those streams at 17-21 GB/s of the 26-33 GB/s the
//! read-bandwidth probe of `dsv4 bench` reached in the same runs. Asking for every line
//! [`AHEAD`] bytes before the kernel loads it took the 265 MB BF16 head of the 0.75 B benchmark
//! model from 12.3-15.0 ms to 8.7-11.8 ms (`tests/gemv_bench.rs`, `GEMV_BENCH_SHAPES=129280x1024`,
//! interleaved runs), and in three interleaved `dsv4 bench --contexts 512 --decode-steps 64
//! --profile` pairs the head from 13.3-15.3 to 11.0-11.8 ms and a decode step from 24.6-29.2 to
//! 21.7-22.8 ms. Distances of 1 to 8 KiB measured alike in both; 256 and 512 bytes did not help
//! the head. The AMD Zen 4 where the kernels were
//! tuned reached 80% of its read bandwidth without it; it has not been measured with it.

/// How far ahead of the load a weight line is asked for, in bytes of the same stream.
pub(crate) const AHEAD: usize = 2048;

/// Bytes per cache line: a stream needs one [`ahead`] per line.
const LINE: usize = 64;

/// [`ahead`] of `base + offset` when `offset` starts a [`LINE`] of the stream that begins at
/// `base`: for kernels that step through a stream in pieces smaller than a line (FP8: 32
/// bytes a chunk, FP4: 16 bytes a group), so that each line is asked for once.
#[inline(always)]
pub(crate) fn each_line(base: *const u8, offset: usize) {
    if offset.is_multiple_of(LINE) {
        ahead(base.wrapping_add(offset));
    }
}

/// Asks for the cache line [`AHEAD`] bytes past `p` to be brought into L1. A hint: it never
/// faults, whatever the address (past the end of the weights included), and changes no
/// result. A no-op off x86-64.
#[inline(always)]
pub(crate) fn ahead(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `prefetcht0` (SSE, part of x86-64's baseline) is a hint that never faults or
        // changes memory; the address is computed with `wrapping_add` (no out-of-bounds
        // pointer arithmetic).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
