//! Matrix products of many rows (prefill): the `gemm` crate, or this crate's AVX-512 / AVX2 kernel.
//!
//! `gemm` (the kernels behind faer) dispatches at run time among its micro-kernels; on a stable
//! compiler that is AVX2+FMA at best (gemm-f32 builds its AVX-512 ones only with its `nightly`
//! feature). It was chosen over `matrixmultiply` (ndarray's `dot`), which was about 40% slower.
//! Where AVX2 + FMA or AVX-512 is available and `a` has at least 8 rows, [`matmul_nt`] runs
//! [`crate::kernels::f32_gemm`] instead (with AVX-512, 1.0 to 1.7 times as fast on the prefill
//! shapes in three runs of its `bench_f32_gemm`; with AVX2, 0.8 to 1.8 times; and its bits
//! depend neither on how a matrix is cut nor on the instruction set). Both run single-threaded
//! here: the backend's thread team spreads the blocks.

/// `c[m, n] = a[m, k] · bᵀ` for `b` `[n, k]` (both row-major), overwriting `c`: the kernel of
/// [`crate::kernels::f32_gemm`] where it runs (AVX2 or AVX-512, `m ≥ 8`), else the `gemm` crate.
///
/// Panics if a slice is shorter than its shape.
pub(crate) fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    if !crate::kernels::f32_gemm::matmul_nt_f32(a, b, c, m, k, n) {
        matmul(a, b, c, m, k, n, true)
    }
}

/// [`matmul_nt`] for input rows `a` against a block of weight rows `b` (`linear`): with fewer
/// rows in `a` than in `b` (a routed expert's tokens against a block of its weight rows: about
/// 100 against 256 in a 512-token prefill of the 0.75 B benchmark model, about 12 in
/// V4-Flash's 256 experts), the f32 kernel computes `cᵀ = b · aᵀ` and transposes it: it
/// packs (transposes) the operand it multiplies from the right, so the smaller one is packed.
/// The bits are the same, NaN payloads aside (which NaN propagates depends on the operand
/// order): every output is the same FMA chain over `k` either way (multiplication commutes
/// exactly). (96, 1024, 256) ran at 108 GFLOP/s against 97 on one Zen 4 core
/// (`bench_f32_gemm`). Activation products (`Backend::matmul`) keep [`matmul_nt`]: the swap's
/// buffer and strided transpose were not measured there.
///
/// Panics if a slice is shorter than its shape.
pub(crate) fn matmul_nt_weights(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    use crate::kernels::f32_gemm::{self, MIN_ROWS};
    if (MIN_ROWS..n).contains(&m) && f32_gemm::available() {
        assert!(c.len() >= m * n, "matmul_nt_weights: c shorter than its shape");
        let mut ct = vec![0f32; n * m];
        if f32_gemm::matmul_nt_f32(b, a, &mut ct, n, k, m) {
            transpose(&ct, n, m, c);
            return;
        }
    }
    matmul_nt(a, b, c, m, k, n)
}

/// `dst[m, n] = srcᵀ` for `src` `[n, m]` (both row-major): the results of kernels that
/// produce a weight row's outputs for every input row together.
///
/// Panics if a slice is shorter than `n · m`.
pub(crate) fn transpose(src: &[f32], n: usize, m: usize, dst: &mut [f32]) {
    assert!(src.len() >= n * m && dst.len() >= n * m, "transpose: slices shorter than [{n}, {m}]");
    for (j, col) in src[..n * m].chunks_exact(m.max(1)).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            dst[i * n + j] = v;
        }
    }
}

/// [`matmul_nt`] through the `gemm` crate always (the path of CPUs without AVX2).
#[cfg(test)]
pub(crate) fn matmul_nt_gemm_crate(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    matmul(a, b, c, m, k, n, true)
}

/// `c[m, n] = a[m, k] · b` for `b` `[k, n]` (both row-major), overwriting `c`.
pub(crate) fn matmul_nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    matmul(a, b, c, m, k, n, false)
}

fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, b_transposed: bool) {
    use crate::kernels::holds;
    assert!(
        holds(a.len(), m, k) && holds(b.len(), k, n) && holds(c.len(), m, n),
        "matmul: slices shorter than their shapes (or a size overflows)"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    // b as a [k, n] matrix: element (p, j) at p·rs + j·cs.
    let (b_rs, b_cs) = if b_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the pointers cover `m·k`, `k·n` and `m·n` elements (asserted above) with the
    // strides given (row-major a and c; b read as [k, n] through its strides), `c` is
    // exclusively borrowed and does not alias `a` or `b`; `alpha` is ignored since
    // `read_dst` is false (c is overwritten with `beta · a·b`, beta = 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values::bits;

    /// With fewer rows in `a` than in `b`, `matmul_nt` computes `cᵀ` (the kernel on swapped
    /// operands): the bits must be those of the kernel on `a · bᵀ`, for values whose sums
    /// depend on the order (magnitudes 2^-12 to 2^12, both signs), shapes with partial tiles
    /// on both sides, and `m` at the bounds of the swap (8, and n − 1).
    #[test]
    fn fewer_rows_of_a_give_the_kernels_bits() {
        use crate::kernels::f32_gemm;
        if !f32_gemm::available() {
            eprintln!("fewer_rows_of_a_give_the_kernels_bits: no f32 kernel on this CPU: nothing is swapped");
            return;
        }
        let mut seed = 0x5a5a_1234u64;
        let mut value = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 2f32.powi(((seed >> 20) % 25) as i32 - 12)
        };
        for (m, k, n) in [(8, 64, 9), (12, 1024, 256), (96, 300, 256), (31, 17, 33), (255, 40, 256), (40, 1, 300)] {
            let a: Vec<f32> = (0..m * k).map(|_| value()).collect();
            let b: Vec<f32> = (0..n * k).map(|_| value()).collect();
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            matmul_nt_weights(&a, &b, &mut got, m, k, n);
            assert!(f32_gemm::matmul_nt_f32(&a, &b, &mut want, m, k, n));
            assert_eq!(bits(&got), bits(&want), "({m}, {k}, {n})");
        }
    }

    #[test]
    fn products_match_a_plain_f64_loop() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (17, 33, 65), (40, 129, 9), (2, 0, 3)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 * 0.25 - 1.0).collect();
            let mut bt = vec![0f32; k * n];
            for p in 0..k {
                for j in 0..n {
                    bt[j * k + p] = b[p * n + j];
                }
            }
            let (mut c1, mut c2, mut c3) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            matmul_nn(&a, &b, &mut c1, m, k, n);
            matmul_nt(&a, &bt, &mut c2, m, k, n);
            matmul_nt_gemm_crate(&a, &bt, &mut c3, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                    // Small integers and quarters: every product and partial sum is exact.
                    assert_eq!(c1[i * n + j] as f64, want, "nn ({m},{k},{n}) at ({i},{j})");
                    assert_eq!(c2[i * n + j] as f64, want, "nt ({m},{k},{n}) at ({i},{j})");
                    assert_eq!(c3[i * n + j] as f64, want, "nt, gemm crate ({m},{k},{n}) at ({i},{j})");
                }
            }
        }
    }
}
