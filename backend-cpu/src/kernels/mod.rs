//! SIMD kernels of the CPU backend and the choice of instruction set they run with.
//!
//! One release binary runs on every x86-64 CPU: the kernels are compiled several times, each
//! copy inside a `#[target_feature]` function, and [`Isa::active`] picks the best copy the CPU
//! supports at run time (`is_x86_feature_detected!`). `target-cpu=native` is not needed.
//!
//! `DSV4_CPU_ISA=scalar|avx2|avx512` lowers the choice (to test a lower path on a machine
//! that has a higher one, or to compare speeds); a request above what the CPU supports is
//! refused with a warning and the best supported set is used.

use std::sync::OnceLock;

pub(crate) mod act;
pub(crate) mod amx;
pub mod attn;
pub(crate) mod bf16_gemm;
pub(crate) mod e8m0;
pub(crate) mod f32_gemm;
pub(crate) mod fp4_bf16;
mod fp4_f32;
mod fp8_fold;
pub(crate) mod mhc;
pub(crate) mod norm;
pub(crate) mod prefetch;
pub(crate) mod round;
pub mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use weights::{
    decode_row, dot, dot_many, dot_rows, fp8_codes_nan_free, Fp4Groups, Fp8Blocks, NanFreeBlocks, Row, RowScratch, Rows,
};

/// Whether GEMMs on BF16 inputs may multiply with `vdpbf16ps` (prefill ones where
/// [`amx_available`] is false, and the FP4 experts' decode GEMVs): x86-64 with AVX512-BF16,
/// `DSV4_CPU_ISA` not lowered below `avx512`, and `DSV4_CPU_BF16_PRODUCTS` `on`, or `auto` on a
/// CPU that is not an Intel one (`dsv4 bench` reads prefill against the BF16 dot peak then,
/// unless AMX runs it). See [`bf16_gemm::chosen`].
pub fn bf16_gemm_available() -> bool {
    bf16_gemm::chosen()
}

pub use amx::AMX_ENV;
pub use bf16_gemm::BF16_PRODUCTS_ENV;

/// Whether prefill GEMMs on BF16 inputs multiply on AMX tiles (`tdpbf16ps`): x86-64 Linux with
/// AMX-BF16, `DSV4_CPU_ISA` not lowered below `avx512`, and neither `DSV4_CPU_AMX` nor
/// `DSV4_CPU_BF16_PRODUCTS` `off`. It takes precedence over [`bf16_gemm_available`] for
/// prefill. See [`amx::chosen`].
pub fn amx_available() -> bool {
    amx::chosen()
}

/// Whether prefill GEMMs on BF16 inputs multiply in BF16 at all: [`amx_available`] or
/// [`bf16_gemm_available`].
pub(crate) fn bf16_prefill_products() -> bool {
    amx::chosen() || bf16_gemm::chosen()
}

/// Whether a slice of `len` values holds a `rows × cols` matrix: `false` also when the size
/// overflows (a plain `rows * cols` wraps in release builds and would pass a length check).
pub(crate) fn holds(len: usize, rows: usize, cols: usize) -> bool {
    rows.checked_mul(cols).is_some_and(|need| len >= need)
}

/// The environment variable that lowers the instruction set the kernels use.
pub const ISA_ENV: &str = "DSV4_CPU_ISA";

/// An instruction set a kernel can be compiled for, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no `target_feature`: the reference every other path is tested against.
    /// On aarch64 the compiler vectorises it with NEON, which is part of the baseline there.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (Haswell, Zen 1 and later): the x86-64 floor.
    Avx2,
    /// x86-64 with AVX-512 F, BW, DQ and VL (Skylake-SP, Ice Lake, Zen 4 and later), on top of
    /// everything [`Isa::Avx2`] needs.
    Avx512,
}

impl Isa {
    /// Every set, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// The name `DSV4_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a `DSV4_CPU_ISA` value.
    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every set this CPU supports, lowest first (what the kernel tests run through).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best set this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().rev().find(|i| i.is_supported()).unwrap_or(Isa::Scalar)
    }

    /// The set the backend's kernels use: [`Isa::best`], lowered by `DSV4_CPU_ISA` when set.
    /// Read once per process.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::best();
            match std::env::var(ISA_ENV) {
                Err(_) => best,
                Ok(v) => match Isa::from_name(&v) {
                    Some(want) if want <= best => want,
                    Some(want) => {
                        eprintln!(
                            "warning: {ISA_ENV}={} is not supported by this CPU; using {}",
                            want.name(),
                            best.name()
                        );
                        best
                    }
                    None => {
                        eprintln!("warning: {ISA_ENV}={v:?} is not one of scalar, avx2, avx512; using {}", best.name());
                        best
                    }
                },
            }
        })
    }
}

/// Helpers of the kernels' bit-for-bit tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// Values of both signs with magnitudes spread from about `2^-e` to `2^e`: a xorshift32
    /// stream from `seed` (not 0), each value `(u − 0.5) · 2^(s mod (2e + 1) − e)` with `u` the
    /// state scaled to [0, 1].
    pub(crate) fn spread(seed: u32, e: u32) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 2f32.powi((s % (2 * e + 1)) as i32 - e as i32)
        }
    }

    /// The bits of each value: compares f32 slices bit for bit (the sign of zero and NaNs
    /// included).
    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_supported() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::from_name("sse"), None);
        assert!(Isa::supported().contains(&Isa::Scalar));
        assert!(Isa::best().is_supported() && Isa::active() <= Isa::best());
    }
}
