//! BF16 rounding of f32 slices in place: [`dsv4_core::precision::round_bf16`] per value (the
//! definition of `Backend::round_to_bf16`), compiled inside `#[target_feature]` copies so the
//! loop runs 16 (AVX-512) or 8 (AVX2) values per instruction. Integer operations and a select
//! only, so every path gives the same bits.
//!
//! The rounding points of the `bf16` precision run on every sub-layer output; as a scalar loop
//! writing a new tensor they were 8% of a 512-token `bf16` prefill of the 0.75 B benchmark
//! model (`dsv4 bench --precision bf16 --profile`).

use dsv4_core::precision::round_bf16;

use super::Isa;

/// Every value of `x` rounded to the nearest BF16 value (ties to even), in place.
pub(crate) fn round_bf16_slice(isa: Isa, x: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "round_bf16: this CPU does not support avx512");
            // SAFETY: the CPU supports the features the copy is compiled with (checked above).
            unsafe { x86::round_avx512(x) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "round_bf16: this CPU does not support avx2");
            // SAFETY: as above.
            unsafe { x86::round_avx2(x) }
        }
        _ => round_any(x),
    }
}

#[inline(always)]
fn round_any(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round_bf16(*v));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(super) unsafe fn round_avx512(x: &mut [f32]) {
        super::round_any(x)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn round_avx2(x: &mut [f32]) {
        super::round_any(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path gives `round_bf16`'s bits, on halfway cases both ways, NaNs (with payloads,
    /// both signs), infinities, the overflow to inf, subnormals and random bit patterns, at
    /// lengths below, at and past one and two vectors of either width.
    #[test]
    fn every_isa_rounds_as_round_bf16() {
        let mut xs: Vec<f32> =
            [0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x7f7f_ffff, 0xff7f_8000, 0x0000_8000, 0x0001_8000]
                .iter()
                .map(|&b| f32::from_bits(b))
                .collect();
        xs.extend([f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffc1_2345), f32::INFINITY, -0.0]);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        xs.extend((0..5000).map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from_bits(s as u32)
        }));
        for isa in Isa::supported() {
            for len in [0, 1, 7, 15, 16, 17, 33, xs.len()] {
                let mut got = xs[..len].to_vec();
                round_bf16_slice(isa, &mut got);
                for (i, (&g, &x)) in got.iter().zip(&xs).enumerate() {
                    assert_eq!(g.to_bits(), round_bf16(x).to_bits(), "{isa:?}: value {i} ({:#010x})", x.to_bits());
                }
            }
        }
    }
}
