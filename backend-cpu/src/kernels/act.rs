//! SiLU and the clamped SwiGLU of the routed experts (spec §B.5 step 4) over slices, with an
//! exponential of our own so that the loops vectorise.
//!
//! `f32::exp` is a call into the C library per value, which keeps the loop around it scalar:
//! the SwiGLU of a 512-token prefill's routed experts (about 1.6 M values a layer of the 0.75 B
//! benchmark model) took about a tenth of the experts' time in `tests/moe_bench.rs`, at the
//! expert GEMMs' side. [`exp`] is plain arithmetic (FMA, a rounding shift, exponent bits), so
//! the same source compiled inside `#[target_feature]` copies runs 16 (AVX-512) or 8 (AVX2)
//! values per instruction, and gives **the same bits on every path**: every operation is an
//! IEEE operation with one rounding (`mul_add` is the fused one everywhere), in the same order.
//! The C library's `expf` does not give that: glibc picks an FMA or a non-FMA variant by CPU.
//! Call the slice functions, not [`exp`] in a loop of your own: outside a `#[target_feature]`
//! copy an x86-64 build has no FMA instruction, and each `mul_add` becomes a call to the C
//! library's `fmaf` (about 8 times libm's `expf`; what `DSV4_CPU_ISA=scalar` runs).
//!
//! Every SiLU of the CPU backend goes through here (`Backend::unary` with `UnaryOp::Silu`, and
//! the fused expert FFNs in `moe.rs`), so the fused experts still equal the composition
//! (`swiglu` = clamps, `unary(Silu)`, `Mul`) bit for bit.
//!
//! # Accuracy
//!
//! [`exp`] is Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 split in two parts,
//! exact products), `e^r` by a degree-7 polynomial, then `· 2ⁿ` in two exact steps and one
//! rounding (so overflow gives `+inf` and small results underflow gradually). Within 2 ulp of
//! `e^x` for every f32 (tested over a dense sweep against f64); SiLU adds two roundings (the
//! `1 + e^-v` and the division), inside the 4-ulp bound that `backend_suite` checks every
//! backend's SiLU against.

use super::Isa;

/// `e^x` (module docs), NaN for NaN; `+inf` above about 88.72, `+0` below about −103.97.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding it rounds a value of magnitude below 2²² to an integer (to even).
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits, so `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // The clamp keeps n in [-150, 128]: e^-104 is below half the smallest denormal, e^89 above
    // f32::MAX. (NaN passes through; the result is NaN then, and chosen as x at the end.)
    let xc = x.clamp(-104.0, 89.0);
    let z = xc * LOG2E + SHIFT;
    let n = z - SHIFT;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let er = p.mul_add(r * r, r) + 1.0;
    // n as an integer: z lies in [2²³, 2²⁴), where its low mantissa bits count units.
    let ni = z.to_bits() as i32 - SHIFT.to_bits() as i32;
    // 2ⁿ as 2ᵃ · 2ᵇ, both normal for n in [-150, 128]: `er · 2ᵃ` is exact, the second product
    // rounds once.
    let a = ni >> 1;
    let b = ni - a;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * pow2(a) * pow2(b);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `v / (1 + e^-v)`, with [`exp`].
#[inline(always)]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + exp(-v))
}

/// The clamped SwiGLU of one value pair, as `Backend::swiglu`'s composition computes it:
/// `silu(min(g, limit)) · clamp(u, −limit, limit)`, where the clamps are `f32::max` then
/// `f32::min` (a NaN gate becomes −inf, a NaN up −limit, as the `clamp` op does).
#[inline(always)]
pub(crate) fn swiglu(g: f32, u: f32, limit: f32) -> f32 {
    let g = g.max(f32::NEG_INFINITY).min(limit);
    let u = u.max(-limit).min(limit);
    silu(g) * u
}

/// `out[i] = silu(x[i])`.
///
/// Panics if the lengths differ, or if the CPU does not support `isa`.
pub(crate) fn silu_slice(isa: Isa, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "silu: {} values in, {} out", x.len(), out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "silu: this CPU does not support avx512");
            // SAFETY: AVX-512 F (and the AVX2 set under it) checked just above.
            unsafe { x86::silu_avx512(x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "silu: this CPU does not support avx2");
            // SAFETY: AVX2 and FMA checked just above.
            unsafe { x86::silu_avx2(x, out) }
        }
        _ => silu_any(x, out),
    }
}

/// `out[i] = swiglu(g[i], u[i], limit)`, times `weight` when given (one rounding more, as the
/// composition's `Mul` by the routing weight).
///
/// Panics if the lengths differ, or if the CPU does not support `isa`.
pub(crate) fn swiglu_slice(isa: Isa, g: &[f32], u: &[f32], limit: f32, weight: Option<f32>, out: &mut [f32]) {
    assert!(
        g.len() == out.len() && u.len() == out.len(),
        "swiglu: {} gates, {} ups, {} outputs",
        g.len(),
        u.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "swiglu: this CPU does not support avx512");
            // SAFETY: AVX-512 F (and the AVX2 set under it) checked just above.
            unsafe { x86::swiglu_avx512(g, u, limit, weight, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "swiglu: this CPU does not support avx2");
            // SAFETY: AVX2 and FMA checked just above.
            unsafe { x86::swiglu_avx2(g, u, limit, weight, out) }
        }
        _ => swiglu_any(g, u, limit, weight, out),
    }
}

#[inline(always)]
fn silu_any(x: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = silu(v));
}

#[inline(always)]
fn swiglu_any(g: &[f32], u: &[f32], limit: f32, weight: Option<f32>, out: &mut [f32]) {
    let pairs = out.iter_mut().zip(g.iter().zip(u));
    match weight {
        Some(w) => pairs.for_each(|(o, (&g, &u))| *o = swiglu(g, u, limit) * w),
        None => pairs.for_each(|(o, (&g, &u))| *o = swiglu(g, u, limit)),
    }
}

/// The portable loops compiled with AVX-512 and with AVX2 + FMA: the compiler vectorises them
/// (`mul_add` becomes `vfmadd`), with the bits of the portable copy.
#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    ///
    /// The CPU supports AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn silu_avx512(x: &[f32], out: &mut [f32]) {
        super::silu_any(x, out)
    }

    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_avx2(x: &[f32], out: &mut [f32]) {
        super::silu_any(x, out)
    }

    /// # Safety
    ///
    /// The CPU supports AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn swiglu_avx512(g: &[f32], u: &[f32], limit: f32, weight: Option<f32>, out: &mut [f32]) {
        super::swiglu_any(g, u, limit, weight, out)
    }

    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu_avx2(g: &[f32], u: &[f32], limit: f32, weight: Option<f32>, out: &mut [f32]) {
        super::swiglu_any(g, u, limit, weight, out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::bits;
    use super::*;

    /// Distance in units in the last place between an f32 and the f64 it approximates.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// Within 2 ulp of f64's `exp` on a dense sweep of the whole range (every 97th f32 from
    /// −104 to 89, about 23 M values, plus the ends), normal and denormal results alike.
    #[test]
    fn exp_is_within_two_ulp() {
        let (lo, hi) = ((-104.0f32).to_bits(), 89.0f32.to_bits());
        let negatives = (0u32..=lo - 0x8000_0000).step_by(97).map(|b| f32::from_bits(0x8000_0000 | b));
        let positives = (0u32..=hi).step_by(97).map(f32::from_bits);
        let mut worst = (0.0, 0.0f32);
        for x in negatives.chain(positives).chain([-104.0, 89.0, 88.72, -87.3, -103.9]) {
            let want = (x as f64).exp();
            let got = exp(x);
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
                continue;
            }
            // Denormal results: within 1 unit of the smallest denormal.
            let e = if want < f32::MIN_POSITIVE as f64 {
                (got as f64 - want).abs() / f32::from_bits(1) as f64
            } else {
                ulps(got, want)
            };
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 2.0, "exp: {:.2} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY).to_bits(), 0);
        assert_eq!(exp(-200.0).to_bits(), 0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-103.0) > 0.0, "gradual underflow");
    }

    /// Every instruction set gives the scalar bits, for SiLU and for the SwiGLU with and
    /// without a routing weight, on values across the whole range, the clamps' edges, ±0,
    /// ±inf, NaN and denormals, at lengths that leave every vector tail.
    #[test]
    fn every_isa_gives_the_scalar_bits() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let special = [0.0, -0.0, 10.0, -10.0, 9.999999, 10.000001, 88.72, -88.72, 103.9, -103.9, 1e-40, -1e-40];
        let special = special.into_iter().chain([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN]);
        let mut values: Vec<f32> = special.collect();
        values.extend((0..3000).map(|_| ((next() % 400_001) as f32 / 1000.0) - 200.0));
        values.extend((0..3000).map(|_| f32::from_bits(next() as u32)));
        let ups: Vec<f32> = values.iter().rev().copied().collect();
        for len in [0, 1, 7, 8, 15, 16, 17, 31, 33, values.len()] {
            let (x, u) = (&values[..len], &ups[..len]);
            let mut want = vec![0f32; len];
            silu_any(x, &mut want);
            let mut want_swiglu = vec![0f32; len];
            swiglu_any(x, u, 10.0, None, &mut want_swiglu);
            let mut want_weighted = vec![0f32; len];
            swiglu_any(x, u, 10.0, Some(0.37), &mut want_weighted);
            for isa in Isa::supported() {
                let mut got = vec![0f32; len];
                silu_slice(isa, x, &mut got);
                assert_eq!(bits(&got), bits(&want), "silu, {}, {len} values", isa.name());
                swiglu_slice(isa, x, u, 10.0, None, &mut got);
                assert_eq!(bits(&got), bits(&want_swiglu), "swiglu, {}, {len} values", isa.name());
                swiglu_slice(isa, x, u, 10.0, Some(0.37), &mut got);
                assert_eq!(bits(&got), bits(&want_weighted), "weighted swiglu, {}, {len} values", isa.name());
            }
        }
    }

    /// SiLU within 4 ulp of f64 (two roundings on top of [`exp`]'s error) from −88 (below, e^-v
    /// overflows f32 and SiLU gives −0, as it does with the C library's `expf`) to 100, and the
    /// clamps as the composition's `clamp` op applies them.
    #[test]
    fn silu_and_swiglu_against_f64() {
        for i in -17_600..=20_000 {
            let v = i as f32 / 200.0;
            let want = v as f64 / (1.0 + (-(v as f64)).exp());
            assert!(ulps(silu(v), want) <= 4.0, "silu({v}) = {} against {want}", silu(v));
        }
        assert_eq!(silu(-100.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(swiglu(50.0, 50.0, 10.0), silu(10.0) * 10.0);
        assert_eq!(swiglu(-50.0, -50.0, 10.0), silu(-50.0) * -10.0);
        assert_eq!(swiglu(f32::NAN, 1.0, 10.0).to_bits(), silu(f32::NEG_INFINITY).to_bits());
        assert_eq!(swiglu(1.0, f32::NAN, 10.0), silu(1.0) * -10.0);
    }
}
