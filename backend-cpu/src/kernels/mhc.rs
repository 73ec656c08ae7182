//! The mHC post-mapping of one token (spec §B.3), `X'_k = post_k · y + Σ_j comb[j, k] · X_j`,
//! with the arithmetic of `Backend::hc_post`'s composition: the product `post_k · y` rounded,
//! the mix one FMA chain over the streams `j` from `+0.0` (what the `gemm` crate's kernel does
//! for the composition's n×n by n×D products where [`same_as_gemm`] says so), then the sum of
//! the two.
//!
//! The chain runs stream by stream over a whole output row (`mix[i] = fma(c, x_j[i], mix[i])`),
//! which the compiler vectorises; compiled inside a `#[target_feature(enable = "fma")]` copy on
//! x86-64 the `mul_add` is one `vfmadd` per 8 or 16 values (the baseline build has no FMA, and
//! there `f32::mul_add` is a call to the C library's `fmaf`, 7 times slower than the
//! composition). Same bits either way: `mul_add` is the fused operation on every path.

use super::Isa;

/// Whether the `gemm` crate (0.18) computes the composition's `[n, n] × [n, D]` product as one
/// FMA chain per output over the `n` streams from `+0.0`, which is what [`post_token`]
/// computes; the CPU backend's `hc_post` uses the kernel only then (mHC has n = 4). It does not:
/// for D = 1 (another loop order); for n ≤ 2, which it sends to a plain `a · b + c` loop
/// without FMA; for n > 512, which it splits into blocks of 512 summed apart; and on x86-64
/// CPUs without FMA, where its scalar kernel multiplies and adds apart (found by review: the
/// bits differed in each case; `tests/ops.rs` covers n = 3..8).
pub(crate) fn same_as_gemm(n: usize, d: usize) -> bool {
    gemm_fuses() && d >= 2 && (3..=512).contains(&n)
}

/// Whether the `gemm` crate's kernels multiply-add fused on this CPU: x86-64 with FMA, aarch64.
fn gemm_fuses() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// One token: `x` `[n, d]` (its streams), `y` `[d]`, `post` `[n]`, `comb` `[n, n]` (row `j`,
/// column `k`), `out` `[n, d]`.
///
/// Panics if the lengths disagree with `n` and `d`.
pub(crate) fn post_token(isa: Isa, x: &[f32], y: &[f32], post: &[f32], comb: &[f32], out: &mut [f32]) {
    let (n, d) = (post.len(), y.len());
    assert!(
        x.len() == n * d && comb.len() == n * n && out.len() == n * d,
        "hc_post: x {} values, comb {}, out {} for n = {n}, d = {d}",
        x.len(),
        comb.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            assert!(isa.is_supported(), "hc_post: this CPU does not support {}", isa.name());
            // SAFETY: every set above Scalar includes AVX2 and FMA (`Isa` docs), checked just
            // above.
            unsafe { post_fma(x, y, post, comb, out) }
        }
        _ => post_any(x, y, post, comb, out),
    }
}

/// [`post_any`] compiled with FMA.
///
/// # Safety
///
/// The CPU supports FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn post_fma(x: &[f32], y: &[f32], post: &[f32], comb: &[f32], out: &mut [f32]) {
    post_any(x, y, post, comb, out)
}

#[inline(always)]
fn post_any(x: &[f32], y: &[f32], post: &[f32], comb: &[f32], out: &mut [f32]) {
    let (n, d) = (post.len(), y.len());
    for (k, row) in out.chunks_exact_mut(d).enumerate() {
        row.fill(0.0);
        for j in 0..n {
            let c = comb[j * n + k];
            for (m, &v) in row.iter_mut().zip(&x[j * d..(j + 1) * d]) {
                *m = c.mul_add(v, *m);
            }
        }
        let p = post[k];
        for (m, &v) in row.iter_mut().zip(y) {
            // `mix + p·v`: the same sum as the composition's `p·v + mix` (IEEE addition
            // commutes; only which NaN payload survives may differ, which Rust leaves open).
            *m += p * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{bits, spread};
    use super::*;

    /// Every instruction set this CPU supports gives the portable path's bits, on odd widths and
    /// values of both signs and magnitudes far apart; and the portable path is the definition:
    /// `post_k · y + (FMA chain over j from +0)`, checked value by value.
    #[test]
    fn every_isa_gives_the_definition() {
        let mut val = spread(0x9e37_79b9, 12);
        for (n, d) in [(4, 1024), (4, 37), (1, 5), (8, 16), (3, 2)] {
            let x: Vec<f32> = (0..n * d).map(|_| val()).collect();
            let y: Vec<f32> = (0..d).map(|_| val()).collect();
            let post: Vec<f32> = (0..n).map(|_| val()).collect();
            let comb: Vec<f32> = (0..n * n).map(|_| val()).collect();
            let mut want = vec![0f32; n * d];
            post_token(Isa::Scalar, &x, &y, &post, &comb, &mut want);
            for k in 0..n {
                for i in 0..d {
                    let mix = (0..n).fold(0f32, |m, j| comb[j * n + k].mul_add(x[j * d + i], m));
                    assert_eq!(want[k * d + i].to_bits(), (post[k] * y[i] + mix).to_bits(), "n={n} d={d} k={k} i={i}");
                }
            }
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut got = vec![f32::NAN; n * d];
                post_token(isa, &x, &y, &post, &comb, &mut got);
                assert_eq!(bits(&got), bits(&want), "{} n={n} d={d}", isa.name());
            }
        }
    }

    #[test]
    fn the_kernel_is_used_only_where_gemm_sums_alike() {
        let fma = gemm_fuses();
        assert_eq!(same_as_gemm(4, 1024), fma);
        assert_eq!(same_as_gemm(3, 2), fma);
        assert_eq!(same_as_gemm(512, 7), fma);
        for (n, d) in [(4, 1), (2, 1024), (1, 1024), (513, 1024), (0, 8)] {
            assert!(!same_as_gemm(n, d), "n={n} d={d}");
        }
    }

    #[test]
    #[should_panic(expected = "hc_post")]
    fn lengths_that_disagree_panic() {
        post_token(Isa::Scalar, &[0.0; 7], &[0.0; 2], &[0.0; 4], &[0.0; 16], &mut [0.0; 8]);
    }
}
