//! BF16 × BF16 → f32 matrix products for prefill with Intel AMX (`tdpbf16ps` on tile
//! registers): the `bf16` precision's prefill GEMMs on Xeons since Sapphire Rapids.
//!
//! [`matmul_nt_amx`] has the contract of [`super::bf16_gemm::matmul_nt_bf16`]: `c = a · bᵀ` for
//! an `a` of BF16 values held in f32 (trusted, a `debug_assert`) and a `b` checked while it is
//! packed (`false` at the first value that is not a BF16 value; the caller then runs another
//! kernel). Why a second BF16 kernel: on the Intel cores measured (2-vCPU Xeon, 2026-12-05)
//! `vdpbf16ps` ran at half the f32 FMA rate, so BF16 products were off there by default
//! ([`super::bf16_gemm::chosen`]); one `tdpbf16ps` does 16 × 16 × 32 products (Intel's
//! optimisation manual: one per 16 cycles on Sapphire Rapids, 1024 FLOP a cycle against
//! AVX-512's 64).
//!
//! # Arithmetic
//!
//! Intel SDM vol. 2, TDPBF16PS ("Dot Product of BF16 Tiles Accumulated into Packed Single
//! Precision Tile"): for each output `(m, n)` and each pair `p` of the tile's 16,
//!
//! ```text
//! tmp.fp32[n] += make_fp32(src1.row[m].bf16[2p+0]) * make_fp32(src2.row[p].bf16[2n+0])
//! tmp.fp32[n] += make_fp32(src1.row[m].bf16[2p+1]) * make_fp32(src2.row[p].bf16[2n+1])
//! ```
//!
//! with round-to-nearest-even, input BF16 denormals read as zero and output denormals flushed
//! (MXCSR is not consulted). The SDM fixes that order only as pseudo-code; how the hardware
//! groups the 32 products of one instruction is not documented as exact, so this module does not
//! promise the bits of [`super::bf16_gemm`] (nor of an f32 GEMM): its tests hold it to the bound
//! of any f32 summation of exact products, `k · 2⁻²⁴ · Σₚ |a_p · b_p|` (first order), the
//! accuracy budget of the `bf16` precision (`docs/precision.md`). What it does promise: each
//! output is the same chain of instructions over `k` in ascending blocks of 32 values whatever
//! `m`, `n`, the tile position or the thread (the k blocks carry the sum through the output
//! tile), so the bits of a row do not depend on how a matrix is cut into tasks (tested).
//!
//! # Layout and blocking
//!
//! `b` is packed by [`super::bf16_gemm`]'s packer into panels of 32 columns, `[k/2][32]` BF16
//! pairs each (128 bytes a pair index), padded here with zero pairs to a multiple of 16 pairs:
//! a B tile is 16 pair rows × 16 columns of one panel (64 bytes a row, stride 128), the second
//! half of the panel the other B tile. The rows of `a` go 32 at a time (a strip: two A tiles of
//! 16 rows); `k` is cut into blocks of `KCP` = 256 pairs, the strip's block packed as
//! `[32][256]` pairs (32 KiB, row stride 1 KiB), then multiplied by every panel: a 32 × 32 f32
//! output tile in four C tiles (`tmm0-3`), two A tiles (`tmm4-5`), two B tiles (`tmm6-7`), four
//! `tdpbf16ps` per 16 pairs. Edge tiles (partial `m` or `n`) run through a 32 × 32 buffer on the
//! stack; rows past `m` and pairs past `k` are zero.
//!
//! # The operating system
//!
//! Linux keeps AMX's 8 KiB of tile data off until a process asks for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, kernel documentation
//! `arch/x86/xstate.rst`); [`available`] asks once per process and is false where that is
//! refused or on other systems. Each call configures the tiles (`ldtilecfg`) on its thread and
//! releases them (`tilerelease`) when done.

/// The environment variable that turns the AMX kernel off (`off`) or leaves it to the CPU
/// (`auto`, the default, or `on`), e.g. to compare it with the `vdpbf16ps` or f32 kernels. The BF16
/// products switch ([`super::BF16_PRODUCTS_ENV`] `off`) turns it off too.
pub const AMX_ENV: &str = "DSV4_CPU_AMX";

/// Whether the prefill GEMMs on BF16 inputs use this kernel: [`available`], and neither
/// [`AMX_ENV`] nor [`super::BF16_PRODUCTS_ENV`] says `off`. Decided once a process.
pub(crate) fn chosen() -> bool {
    static CHOSEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if std::env::var(super::BF16_PRODUCTS_ENV).as_deref() == Ok("off") {
            return false;
        }
        match std::env::var(AMX_ENV).as_deref() {
            Ok("off") => false,
            // `on` cannot do more than `auto`: the kernel runs where the CPU and system allow.
            Ok("auto" | "on") | Err(_) => available(),
            Ok(other) => {
                eprintln!("warning: {AMX_ENV}={other:?} is not one of auto, on, off; using auto");
                available()
            }
        }
    })
}

/// Whether this CPU and system run the kernel: x86-64 with AMX-TILE and AMX-BF16
/// ([`cpu_has_amx_bf16`]), the AVX-512 kernels active (`DSV4_CPU_ISA` not lowered: the packing
/// uses AVX-512 BW), and Linux granting this process the tile data (asked once). Decided once a
/// process (CPUID traps to the hypervisor in a VM; this runs for every prefill task).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            super::Isa::active() == super::Isa::Avx512 && cpu_has_amx_bf16() && x86::tile_data_granted()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Whether the CPU has AMX-TILE and AMX-BF16: CPUID.(EAX=07H, ECX=0):EDX bits 24 and 22,
/// whatever the system and `DSV4_CPU_ISA` allow. False off x86-64.
pub fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only where leaf 0 lists it.
        // (`__cpuid` is a safe function in newer Rust, hence the allowance.)
        #[allow(unused_unsafe)]
        unsafe {
            if __cpuid(0).eax < 7 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// FLOP of one iteration of [`peak_loop`]: four `tdpbf16ps` of 16 × 16 outputs, 32 products
/// each, 2 FLOP a product.
pub(crate) const PEAK_FLOPS_PER_ITER: f64 = (4 * 16 * 16 * 32 * 2) as f64;

/// `iters` × four independent `tdpbf16ps` on tiles that stay in registers (the machine's AMX
/// peak, `crate::machine`), returning one output so the work is not optimised away. Returns
/// `None`, running nothing, where [`available`] is false.
pub(crate) fn peak_loop(iters: u64) -> Option<f32> {
    if !available() {
        return None;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // SAFETY: `available()`: the CPU has AMX-TILE/AMX-BF16 and the system granted the
        // tile data.
        Some(unsafe { x86::peak_loop(iters) })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = iters;
        None
    }
}

/// `c[m, n] = a[m, k] · bᵀ`, b `[n, k]`, all row-major f32 slices, overwriting c, as BF16 × BF16
/// products with f32 accumulation on AMX tiles (module documentation). The caller guarantees
/// every value of `a` is a BF16 value held in f32 (low 16 bits zero; debug_assert it). Returns
/// false, leaving `c` unspecified, when some value of `b` is not exactly a BF16 value or
/// [`available`] is false; the caller then runs another kernel. Single-threaded (the caller
/// parallelises over blocks of b's rows). With `m == 0` or `n == 0` it returns `true` (when
/// available) without reading `b`; with `k == 0`, `c` is zeroed.
///
/// Panics if a slice is shorter than its shape. Uses thread-local buffers of about `n · k · 2`
/// bytes (rounded up to whole panels and 16 pairs) and 32 KiB (the strip), kept between calls.
pub(crate) fn matmul_nt_amx(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
    use super::holds;
    assert!(
        holds(a.len(), m, k) && holds(b.len(), n, k) && holds(c.len(), m, n),
        "matmul_nt_amx: slices shorter than their shapes (or a size overflows)"
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
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // SAFETY: `available()` holds: the CPU has AVX-512 F/BW, AMX-TILE and AMX-BF16, and the
        // system granted the tile data; the slices are cut to their shapes, `m, n, k > 0`.
        unsafe { x86::matmul_nt(&a[..m * k], &b[..n * k], &mut c[..m * n], m, k, n) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod x86 {
    use std::arch::asm;
    use std::cell::RefCell;
    use std::sync::OnceLock;

    use super::super::bf16_gemm::x86::{pack_a_strip, pack_b_panel, KCP, NV, STRIP_LINES};
    use super::super::x86::{tile_in, tile_out, Line, ZERO_LINE};

    /// Rows of `a` per strip: two A tiles of 16.
    const MR: usize = 32;
    /// Columns per packed panel of `b`: two B tiles of 16 ([`super::super::bf16_gemm`]'s panel).
    const NR: usize = 16 * NV;
    /// Pairs per tile step (the rows of a B tile, 64 bytes of an A tile's row).
    const STEP: usize = 16;
    /// Bytes between rows of a packed strip (an A tile's stride).
    const STRIP_STRIDE: usize = STRIP_LINES * 64;
    /// Bytes between pair rows of a packed panel (a B tile's stride).
    const PANEL_STRIDE: usize = NV * 64;

    /// Asks Linux, once per process, for the AMX tile data state (`ARCH_REQ_XCOMP_PERM` with
    /// `XFEATURE_XTILEDATA`): without it the first tile instruction raises SIGILL. The grant is
    /// per process, for every thread.
    pub(super) fn tile_data_granted() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        static GRANTED: OnceLock<bool> = OnceLock::new();
        *GRANTED.get_or_init(|| {
            // SAFETY: `arch_prctl` with this request only changes the process's permitted
            // extended state; it takes two integers and touches no memory of ours.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }

    /// The `ldtilecfg` operand (Intel SDM vol. 2, LDTILECFG, "Tile configuration" layout):
    /// palette 1, eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            colsb[t] = 64;
            rows[t] = 16;
            t += 1;
        }
        TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows }
    };

    thread_local! {
        /// The packed `b` of the last call on this thread: `[n/NR panels][kp16][NV lines]`.
        static PACKED_B: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
        /// The packed block of the current strip: `[MR][STRIP_LINES]` lines.
        static STRIP: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// [`super::matmul_nt_amx`] for `m, n, k > 0` and exact slice lengths.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512 F/BW, AMX-TILE and AMX-BF16, and the system granted the tile
    /// data ([`tile_data_granted`]); `a.len() == m·k`, `b.len() == n·k`, `c.len() == m·n`.
    pub(super) unsafe fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) -> bool {
        let kp16 = k.div_ceil(2).next_multiple_of(STEP);
        let lines = n.div_ceil(NR) * kp16 * NV;
        PACKED_B.with_borrow_mut(|packed| {
            STRIP.with_borrow_mut(|strip| {
                if packed.len() < lines {
                    packed.resize(lines, ZERO_LINE);
                }
                if strip.len() < MR * STRIP_LINES {
                    strip.resize(MR * STRIP_LINES, ZERO_LINE);
                }
                // SAFETY: the caller guarantees the CPU features, the grant and the lengths;
                // the buffers hold the lines `run` needs.
                unsafe { run(a, b, c, m, k, n, &mut packed[..lines], &mut strip[..MR * STRIP_LINES]) }
            })
        })
    }

    /// [`super::peak_loop`]: A tiles of BF16 1.0, B tiles of 2⁻¹⁰ (the sums stay far from
    /// overflow), C tiles `tmm0-3` accumulating.
    ///
    /// # Safety
    ///
    /// As [`matmul_nt`]'s (the CPU features and the grant).
    pub(super) unsafe fn peak_loop(iters: u64) -> f32 {
        let ones = [Line([0x3F80_3F80; 16]); 16];
        let small = [Line([0x3A80_3A80; 16]); 16];
        let mut out = [ZERO_LINE; 16];
        // SAFETY: the caller's; every tile load and store covers 16 rows of 64 bytes of the
        // 1 KiB arrays at stride 64; one block from the configuration to the release, declaring
        // every tile register clobbered; `iters` is at least 1 in the loop (checked first).
        unsafe {
            asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm5, [{a} + {s}*1]",
                "tileloadd tmm6, [{b} + {s}*1]", "tileloadd tmm7, [{b} + {s}*1]",
                "test {n}, {n}",
                "jz 3f",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                "3:",
                "tilestored [{o} + {s}*1], tmm3",
                "tilerelease",
                cfg = in(reg) &CONFIG, a = in(reg) ones.as_ptr(), b = in(reg) small.as_ptr(),
                o = in(reg) out.as_mut_ptr(), s = in(reg) 64usize, n = inout(reg) iters => _,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            );
        }
        f32::from_bits(out[15].0[15])
    }

    /// Packs `b`, then multiplies strip by strip and block by block (module documentation).
    ///
    /// # Safety
    ///
    /// As [`matmul_nt`]'s, and `packed.len() == ⌈n/NR⌉·kp16·NV`, `strip.len() == MR·STRIP_LINES`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        packed: &mut [Line],
        strip: &mut [Line],
    ) -> bool {
        let kp = k.div_ceil(2);
        let kp16 = kp.next_multiple_of(STEP);
        let panels = n.div_ceil(NR);
        for (j, panel) in packed.chunks_exact_mut(kp16 * NV).enumerate() {
            let (body, pad) = panel.split_at_mut(kp * NV);
            // SAFETY: this function's features (AVX-512 F/BW); the body has `kp·NV` lines and
            // `j·NR < n`.
            if !unsafe { pack_b_panel(b, k, n, j, body) } {
                return false;
            }
            pad.fill(ZERO_LINE);
        }
        let mut edge = [0f32; MR * NR];
        // SAFETY: the CPU has AMX-TILE and the process its tile data; CONFIG is a valid
        // palette-1 configuration (8 tiles within the palette's 16 rows × 64 bytes). The
        // configuration stays until `tilerelease` below: nothing in between but `tile`'s blocks
        // uses AMX (compiled code issues tile instructions only through AMX intrinsics or the
        // `x86_amx` type, which nothing here uses, and libc's copies use none); each `tile`
        // block keeps its tile data to itself. A panic in between would skip the release: the
        // next call's `ldtilecfg` overwrites the configuration anyway.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags)) };
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            for pk0 in (0..kp).step_by(KCP) {
                let kcp = KCP.min(kp - pk0);
                let steps = kcp.div_ceil(STEP);
                // SAFETY: this function's features (AVX-512 F/BW); rows i0.. of `a` (a multiple
                // of k values), mr of them, pairs pk0..pk0 + kcp <= ⌈k/2⌉, and the strip's
                // MR·STRIP_LINES lines.
                unsafe { pack_a_strip::<MR>(&a[i0 * k..], k, mr, pk0, kcp, strip) };
                for j in 0..panels {
                    let (j0, nr) = (j * NR, NR.min(n - j * NR));
                    let panel = &packed[(j * kp16 + pk0) * NV..(j * kp16 + pk0 + steps * STEP) * NV];
                    let (at, size, shape) = ((i0, j0), (mr, nr), (MR, NR));
                    let (p, ld) = tile_in(c, n, at, size, shape, pk0 > 0, &mut edge);
                    // SAFETY: the tiles are configured; the strip holds MR rows of `steps`
                    // lines, the panel `steps·STEP·NV` lines, and `tile_in` gives MR rows of NR
                    // writable values at stride `ld`.
                    unsafe { tile(strip, panel, steps, p, ld, pk0 > 0) };
                    tile_out(c, n, at, size, shape, &edge);
                }
            }
        }
        // SAFETY: AMX-TILE; returns the tiles to their initial state.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        true
    }

    /// The 32 × 32 output tile at `c` (row stride `ldc` values) becomes (`load`: the tile plus)
    /// the products of the strip's `steps·16` pairs with the panel's: C tiles `tmm0` (rows 0-15,
    /// columns 0-15), `tmm1` (0-15, 16-31), `tmm2` (16-31, 0-15), `tmm3` (16-31, 16-31); A tiles
    /// `tmm4-5` (rows 0-15 and 16-31 of the strip), B tiles `tmm6-7` (the panel's two halves).
    /// One `asm!` block from the C tiles' load to their store, so no tile data lives across
    /// compiled code; it declares every tile register clobbered.
    ///
    /// # Safety
    ///
    /// The tiles are configured as [`CONFIG`]; `strip` holds MR rows of STRIP_LINES lines with
    /// `1 <= steps <= STRIP_LINES`, `panel.len() >= steps·STEP·NV`, and `c` points at MR rows of
    /// NR writable f32 with row stride `ldc`.
    #[inline(always)]
    unsafe fn tile(strip: &[Line], panel: &[Line], steps: usize, c: *mut f32, ldc: usize, load: bool) {
        debug_assert!(strip.len() >= MR * STRIP_LINES && (1..=STRIP_LINES).contains(&steps));
        debug_assert!(panel.len() >= steps * STEP * NV);
        // SAFETY: the caller's. Each tile load or store touches 16 rows of 64 bytes from its base
        // at its stride: C rows of `c`'s MR × NR block (`c`, `c + 16` values, and 16 rows down);
        // A rows inside the strip (line q of rows 0-15, and of rows 16-31 16 KiB on, `a1`);
        // B rows inside the panel (pair rows 16q..16q+16 at 128 bytes each, the first or second
        // 64 bytes); q < steps. The loop counter and pointers are the block's own copies.
        unsafe {
            asm!(
                "test {load}, {load}",
                "jz 2f",
                "tileloadd tmm0, [{c} + {sc}*1]",
                "tileloadd tmm1, [{c} + {sc}*1 + 64]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                "tileloadd tmm3, [{c2} + {sc}*1 + 64]",
                "jmp 3f",
                "2:",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                // No step (callers give at least one): leave the sums as they are.
                "test {steps}, {steps}",
                "jz 4f",
                "3:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a} + {sa}*1 + {a1}]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 64",
                "add {b}, {bstep}",
                "dec {steps}",
                "jnz 3b",
                "4:",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c2} + {sc}*1 + 64], tmm3",
                load = in(reg) load as usize,
                c = in(reg) c,
                c2 = in(reg) c.add(16 * ldc),
                sc = in(reg) ldc * 4,
                a = inout(reg) strip.as_ptr() => _,
                b = inout(reg) panel.as_ptr() => _,
                steps = inout(reg) steps => _,
                sa = in(reg) STRIP_STRIDE,
                sb = in(reg) PANEL_STRIDE,
                a1 = const 16 * STRIP_STRIDE,
                bstep = const STEP * PANEL_STRIDE,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The BF16 GEMM's test values and f64 reference, shared: both kernels take the same inputs.
    use super::super::bf16_gemm::tests::{bf16, int, reference};
    use dsv4_core::test_data::Rng;

    /// Returns whether the AMX kernel runs here; if not, says that only `false` was checked.
    /// `ci/run` runs these tests on a CPU without AMX as well, where this is all they can check;
    /// `amx_runs_where_the_cpu_has_it` makes sure a CPU that has AMX runs them.
    fn runs(test: &str) -> bool {
        if available() {
            return true;
        }
        eprintln!(
            "{test}: the AMX kernel is not available here (no AMX-BF16, {} below avx512, or the \
             system refused the tile data): only checked that matmul_nt_amx returns false",
            super::super::ISA_ENV
        );
        false
    }

    const MS: [usize; 6] = [1, 7, 16, 33, 64, 100];
    const NS: [usize; 6] = [1, 15, 32, 33, 64, 65];
    const KS: [usize; 10] = [0, 1, 2, 3, 31, 32, 33, 513, 1000, 1025];

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn amx_runs_where_the_cpu_has_it() {
        let active = super::super::Isa::active() == super::super::Isa::Avx512;
        let want = active && cpu_has_amx_bf16();
        if !want {
            eprintln!("amx_runs_where_the_cpu_has_it: no AMX-BF16 here (or DSV4_CPU_ISA below avx512)");
        }
        // Linux grants the tile data (5.16 and later, with signal stacks large enough for the
        // tile state, as Rust's are): a CPU with AMX-BF16 whose prefill silently lost it would
        // be a regression worth a failing test.
        assert_eq!(available(), want, "AMX-BF16 CPU: {}", cpu_has_amx_bf16());
    }

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
                    assert_eq!(matmul_nt_amx(&a, &b, &mut c, m, k, n), run, "({m},{k},{n})");
                    if !run {
                        continue;
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (want, mag) = reference(&a, &b, k, i, j);
                            // The bound of any f32 summation of the k exact products, each
                            // step rounding once (relative error ≤ 2⁻²⁴, |partial sums| ≤
                            // Σ|a_p b_p|): γ_k ≤ 1.001·k·2⁻²⁴ for k ≤ 1025, plus the f64
                            // reference's k·2⁻⁵³; no value here is near denormal.
                            let bound = 1.001 * k as f64 * 2f64.powi(-24) * mag + mag * 1e-12;
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= bound,
                                "({m},{k},{n}) at ({i},{j}): got {got}, want {want}, bound {bound}"
                            );
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
                    // |a|, |b| ≤ 8 and k ≤ 2049: every partial sum is a multiple of 1/4 below
                    // 2¹⁸, exact in f32, so any summation order gives the f64 sum bit for bit.
                    let a: Vec<f32> = (0..m * k).map(|_| int(&mut rng)).collect();
                    let b: Vec<f32> = (0..n * k).map(|_| int(&mut rng) * 0.25).collect();
                    let mut c = vec![f32::NAN; m * n];
                    assert_eq!(matmul_nt_amx(&a, &b, &mut c, m, k, n), run, "({m},{k},{n})");
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

    /// The bits of an output row do not depend on which rows and columns share its call (the
    /// tile it lands in, an edge tile or a whole one): the model's GEMMs are cut into tasks
    /// by thread count.
    #[test]
    fn the_bits_do_not_depend_on_the_cut() {
        let mut rng = Rng(5);
        let run = runs("the_bits_do_not_depend_on_the_cut");
        let (m, k, n) = (77, 1100, 70);
        let a: Vec<f32> = (0..m * k).map(|_| bf16(&mut rng)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| bf16(&mut rng)).collect();
        let mut whole = vec![0f32; m * n];
        assert_eq!(matmul_nt_amx(&a, &b, &mut whole, m, k, n), run);
        if !run {
            return;
        }
        for (r0, rows, c0, cols) in [(5, 1, 0, n), (3, 40, 7, 33), (64, 13, 69, 1), (0, m, 32, 38)] {
            let mut part = vec![0f32; rows * cols];
            let (ap, bp) = (&a[r0 * k..(r0 + rows) * k], &b[c0 * k..(c0 + cols) * k]);
            assert!(matmul_nt_amx(ap, bp, &mut part, rows, k, cols));
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        part[i * cols + j].to_bits(),
                        whole[(r0 + i) * n + c0 + j].to_bits(),
                        "rows {r0}+{rows}, columns {c0}+{cols}: ({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_value_of_b_that_is_not_bf16_is_refused() {
        let mut rng = Rng(3);
        let run = runs("a_value_of_b_that_is_not_bf16_is_refused");
        for (m, k, n) in [(5, 37, 33), (40, 1000, 64), (3, 1, 1), (9, 64, 70)] {
            let a: Vec<f32> = (0..m * k).map(|_| int(&mut rng)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| int(&mut rng)).collect();
            for at in [0, (n * k) / 2, n * k - 1] {
                for low in [1u32, 0x8000, 0xFFFF] {
                    let mut bad = b.clone();
                    bad[at] = f32::from_bits(bad[at].to_bits() | low);
                    let mut c = vec![0f32; m * n];
                    assert!(!matmul_nt_amx(&a, &bad, &mut c, m, k, n), "({m},{k},{n}) bad at {at}");
                }
            }
            // The untouched b goes through, correctly (the packing buffer held the bad one).
            let mut c = vec![f32::NAN; m * n];
            assert_eq!(matmul_nt_amx(&a, &b, &mut c, m, k, n), run);
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
        assert_eq!(matmul_nt_amx(&a, &b, &mut c, m, k, n), run);
        if !run {
            return;
        }
        for i in 0..m {
            assert_eq!(c[i * n], 2.5);
            assert_eq!(c[i * n + 1], f32::INFINITY);
            assert!(c[i * n + 2].is_nan());
            assert_eq!(c[i * n + 3], 2.0);
        }
        // inf · 0 inside k is NaN, as in f32.
        let (a3, b3) = ([f32::INFINITY, 1.0], [0.0f32, 1.0]);
        let mut c3 = [0f32];
        assert!(matmul_nt_amx(&a3, &b3, &mut c3, 1, 2, 1));
        assert!(c3[0].is_nan());
        // A lone denormal input counts as zero (SDM: input denormals are treated as zero).
        let (a1, b1) = ([1.0f32], [f32::from_bits(0x0001_0000)]);
        let mut c1 = [f32::NAN];
        assert!(matmul_nt_amx(&a1, &b1, &mut c1, 1, 1, 1));
        assert_eq!(c1[0], 0.0);
        // The zero pairs that pad `b` to whole tiles are zeroed on every call: this thread's
        // packing buffer held NaNs there from a longer `b`, which the zero pairs of `a` would
        // turn into a NaN result (0 · NaN).
        let nans = vec![f32::from_bits(0x7FC0_0000); 64];
        assert!(matmul_nt_amx(&[1.0; 64], &nans, &mut c1, 1, 64, 1));
        assert!(c1[0].is_nan());
        let (a2, b2) = ([f32::INFINITY, 1.0, 2.0], [1.0f32, 1.0, 1.0]);
        assert!(matmul_nt_amx(&a2, &b2, &mut c1, 1, 3, 1));
        assert_eq!(c1[0], f32::INFINITY);
    }

    #[test]
    fn empty_shapes() {
        let run = runs("empty_shapes");
        let mut c = [f32::NAN; 6];
        assert_eq!(matmul_nt_amx(&[], &[], &mut c, 2, 0, 3), run);
        if run {
            assert!(c.iter().all(|x| x.to_bits() == 0));
        }
        assert_eq!(matmul_nt_amx(&[], &[1.0; 4], &mut [], 0, 4, 1), run);
        assert_eq!(matmul_nt_amx(&[1.0; 4], &[], &mut [], 1, 4, 0), run);
    }

    /// The peak loop computes what it says (so the machine's AMX peak times real work): each of
    /// `iters` steps adds 32 products 1 · 2⁻¹⁰ to every output of `tmm3`.
    #[test]
    fn the_peak_loop_accumulates() {
        let run = runs("the_peak_loop_accumulates");
        assert_eq!(peak_loop(100), run.then_some(100.0 / 32.0));
    }

    /// GFLOP/s of the AMX kernel against the f32 kernel (`gemm::matmul_nt_weights`) and the
    /// `vdpbf16ps` one, one thread:
    /// `cargo test --release -p dsv4-backend-cpu --lib bench_amx -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_amx() {
        let run = runs("bench_amx");
        let mut rng = Rng(4);
        for (m, k, n) in [(96, 1024, 256), (512, 1024, 256), (512, 4096, 64), (512, 2048, 256), (2048, 7168, 64)] {
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
            let t32 = best(&mut || crate::gemm::matmul_nt_weights(&a, &b, &mut c2, m, k, n));
            let mut line = format!("m={m} k={k} n={n}: f32 {:.1} GFLOP/s", flop / t32 * 1e-9);
            if super::super::bf16_gemm::available() {
                let tv = best(&mut || assert!(super::super::bf16_gemm::matmul_nt_bf16(&a, &b, &mut c1, m, k, n)));
                line += &format!(", vdpbf16ps {:.1}", flop / tv * 1e-9);
            }
            if run {
                let ta = best(&mut || assert!(matmul_nt_amx(&a, &b, &mut c1, m, k, n)));
                line += &format!(", amx {:.1} ({:.2}x f32)", flop / ta * 1e-9, t32 / ta);
                let worst = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                line += &format!("; max |amx - f32| = {worst:e}");
            }
            println!("{line}");
        }
    }
}
