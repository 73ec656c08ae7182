//! Device forms of the checkpoint's weights: what a device keeps for each stored form, chosen
//! so that every weight value survives exactly. (What the Ascend backend still widens to f32 per
//! call, and what it multiplies in BF16 as kept, is in `docs/precision.md`.)
//!
//! Ascend's matmuls take FP8 / FP4 / E8M0 inputs on the 950 only; on Atlas A2 (910B) and A3
//! (910C) an FP8 + MXFP4 checkpoint must be converted (`../shared/spec/ascend-api.md` §0 item 4,
//! §2.6: `aclnnQuantMatmulV5` footnote 2, `aclnnWeightQuantBatchMatmulV2`). The conversions
//! here lose nothing:
//!
//! | stored (spec §D.4) | 950 | 910B / 910C | bytes per parameter |
//! |---|---|---|---|
//! | BF16 | BF16 | BF16 | 2 |
//! | FP8 e4m3, 128×128 E8M0 scales | FP8 + E8M0 (native; scale bytes 3..=246, whole column blocks) | **BF16**: e4m3·2^k is a BF16 value for every code when the scale byte is in 3..=246 | 1 + 1/16384 → 2 |
//! | FP8 e4m3, 128×128 F32 scales (Base checkpoints' experts) | F32 (not kept natively yet) | F32 (e4m3 times a non-power-of-two scale is not BF16 in general) | 4 → 4 |
//! | FP4 e2m1, 1×32 F32 scales | F32 | F32 | 0.5 + 4/32 → 4 |
//! | FP4 e2m1, 1×32 E8M0 scales | MXFP4 (native; scale bytes 1..=252) | **INT8 + one BF16 scale per 32** (A16W8, antiquant group 32): 2·e2m1 is an integer in [−12, 12] and the scale 2^(b−128) a BF16 value for every byte | 0.5 + 1/32 → 1 + 2/32 |
//! | F32 (mHC mixers, routers in F32 checkpoints) | F32 | F32 | 4 |
//!
//! INT4 cannot hold 2·e2m1 (±12 is outside −8..7), so A2/A3 pay 1 byte per expert weight for
//! exactness; a W4A8 deployment (msmodelslim) re-quantises and is not the checkpoint any more.

use crate::quant::{e2m1_to_f32, e4m3_to_f32, E8M0_NAN, FP4_GROUP, FP8_BLOCK};
use crate::tensor::{DType, WeightFormat};

/// The Ascend SoC families whose weight support differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocFamily {
    /// Atlas A2, `Ascend910B*`: BF16 and INT8/INT4 weight-quant matmuls, no FP8/FP4.
    A2,
    /// Atlas A3, `Ascend910_93*` (910C): as A2 for matmuls.
    A3,
    /// `Ascend950*`: FP8 e4m3 and MXFP4 (E2M1 with E8M0 scales) matmuls natively.
    A5,
}

impl SocFamily {
    /// The family of an `aclrtGetSocName` string, or of the short names `--soc` takes
    /// (`910b`, `910c`, `950`).
    pub fn from_name(s: &str) -> Option<SocFamily> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("ascend").unwrap_or(&s);
        if s.starts_with("910b") || s == "a2" {
            Some(SocFamily::A2)
        } else if s.starts_with("910_93") || s.starts_with("910c") || s == "a3" {
            Some(SocFamily::A3)
        } else if s.starts_with("950") || s == "a5" {
            Some(SocFamily::A5)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SocFamily::A2 => "910B (Atlas A2)",
            SocFamily::A3 => "910C (Atlas A3)",
            SocFamily::A5 => "950",
        }
    }

    /// Whether FP8 / MXFP4 matmul inputs are native.
    pub fn has_fp8_fp4_matmul(self) -> bool {
        self == SocFamily::A5
    }
}

/// What a device keeps for one weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceForm {
    /// BF16 values (2 bytes).
    Bf16,
    /// F16 values as stored (2 bytes).
    F16,
    /// F32 values (4 bytes).
    F32,
    /// FP8 e4m3 codes with their block scales, as stored (950).
    Fp8Blocks { scale_bytes: usize, block: usize },
    /// MXFP4: e2m1 codes, two per byte, one E8M0 per `group` (950).
    Mxfp4 { group: usize },
    /// INT8 `2·e2m1` with one BF16 scale `2^(b−128)` per `group` inputs (A2/A3).
    Int8Groups { group: usize },
}

impl DeviceForm {
    /// The form a `soc` keeps for a weight stored as `format` (element dtype `dtype`, scale
    /// dtype `scale` for quantised forms).
    pub fn for_stored(format: WeightFormat, dtype: DType, scale: Option<DType>, soc: SocFamily) -> DeviceForm {
        match format {
            WeightFormat::Float => match dtype {
                DType::BF16 => DeviceForm::Bf16,
                DType::F16 => DeviceForm::F16,
                _ => DeviceForm::F32,
            },
            WeightFormat::Fp8Block { rows, cols } => {
                let e8m0 = scale == Some(DType::F8E8M0);
                match (soc.has_fp8_fp4_matmul(), e8m0) {
                    (true, true) => DeviceForm::Fp8Blocks { scale_bytes: 1, block: rows * cols },
                    (false, true) => DeviceForm::Bf16,
                    // F32 block scales: dsv4 keeps the dequantised values on every SoC.
                    (_, false) => DeviceForm::F32,
                }
            }
            // MXFP4 and the INT8 form need power-of-two (E8M0) scales; MX takes groups of 32.
            WeightFormat::Fp4Group { group } if scale == Some(DType::F8E8M0) => {
                if soc.has_fp8_fp4_matmul() && group == 32 {
                    DeviceForm::Mxfp4 { group }
                } else {
                    DeviceForm::Int8Groups { group }
                }
            }
            WeightFormat::Fp4Group { .. } => DeviceForm::F32,
        }
    }

    /// Device bytes per parameter (scales included, spread over the values they cover).
    pub fn bytes_per_param(self) -> f64 {
        match self {
            DeviceForm::Bf16 | DeviceForm::F16 => 2.0,
            DeviceForm::F32 => 4.0,
            DeviceForm::Fp8Blocks { scale_bytes, block } => 1.0 + scale_bytes as f64 / block as f64,
            DeviceForm::Mxfp4 { group } => 0.5 + 1.0 / group as f64,
            DeviceForm::Int8Groups { group } => 1.0 + 2.0 / group as f64,
        }
    }

    pub fn name(self) -> String {
        match self {
            DeviceForm::Bf16 => "BF16".into(),
            DeviceForm::F16 => "F16".into(),
            DeviceForm::F32 => "F32".into(),
            DeviceForm::Fp8Blocks { scale_bytes: 1, .. } => "FP8 + E8M0 blocks".into(),
            DeviceForm::Fp8Blocks { .. } => "FP8 + F32 blocks".into(),
            DeviceForm::Mxfp4 { group } => format!("MXFP4 (E8M0 per {group})"),
            DeviceForm::Int8Groups { group } => format!("INT8 + BF16 scale per {group}"),
        }
    }
}

/// The weights an official V4 release stores as FP8 with 128×128 E8M0 scales (spec §D.2): the
/// attention projections, the indexer's `wq_b`, the shared experts and MTP's `e_proj`/`h_proj`.
pub const OFFICIAL_FP8_WEIGHTS: [&str; 11] = [
    ".attn.wq_a.weight",
    ".attn.wq_b.weight",
    ".attn.wkv.weight",
    ".attn.wo_a.weight",
    ".attn.wo_b.weight",
    ".attn.indexer.wq_b.weight",
    ".ffn.shared_experts.w1.weight",
    ".ffn.shared_experts.w2.weight",
    ".ffn.shared_experts.w3.weight",
    ".e_proj.weight",
    ".h_proj.weight",
];

/// The stored form (format, element dtype, scale dtype) of an official V4 release's weight
/// (spec §D.2): [`OFFICIAL_FP8_WEIGHTS`] FP8, routed experts FP4 with E8M0 per 32, the mHC
/// mixers F32, the other matrices BF16. For config-only directories (`dsv4 inspect --soc`).
pub fn official_stored_form(name: &str) -> (WeightFormat, DType, Option<DType>) {
    if name.contains(".ffn.experts.") {
        (WeightFormat::Fp4Group { group: FP4_GROUP }, DType::I8, Some(DType::F8E8M0))
    } else if OFFICIAL_FP8_WEIGHTS.iter().any(|s| name.ends_with(s)) {
        (WeightFormat::Fp8Block { rows: FP8_BLOCK, cols: FP8_BLOCK }, DType::F8E4M3, Some(DType::F8E8M0))
    } else if name.contains(".hc_") || name.starts_with("hc_") {
        (WeightFormat::Float, DType::F32, None)
    } else {
        (WeightFormat::Float, DType::BF16, None)
    }
}

/// The scale bytes for which every FP8 code times `2^(b−127)` is a BF16 value: below 3 the
/// smallest subnormal e4m3 (2⁻⁹) falls under BF16's smallest subnormal (2⁻¹³³), above 246 the
/// largest (448) overflows BF16.
pub const FP8_BF16_EXACT_SCALES: std::ops::RangeInclusive<u8> = 3..=246;

/// The E8M0 scale bytes with which the 950 keeps FP4 e2m1 as MXFP4: every code times
/// `2^(b−127)` is then a BF16 value (6·2^(b−127) overflows BF16 above 252) and the scale an F32
/// normal number (byte 0 is the subnormal 2⁻¹²⁷, 255 NaN). Other bytes keep the INT8 form.
pub const MXFP4_NATIVE_SCALES: std::ops::RangeInclusive<u8> = 1..=252;

/// The BF16 bits of FP8 code `code` times the E8M0 scale `2^(scale−127)`, or None when that
/// value is not a BF16 value (scale outside [`FP8_BF16_EXACT_SCALES`] for some codes, the NaN
/// scale 255) . The NaN codes 0x7F / 0xFF give a BF16 NaN.
pub fn fp8_as_bf16(code: u8, scale: u8) -> Option<u16> {
    if scale == E8M0_NAN {
        return None;
    }
    let v = e4m3_to_f32(code) as f64 * 2f64.powi(scale as i32 - 127);
    if v.is_nan() {
        return Some(0x7FC0 | (((code >> 7) as u16) << 15));
    }
    let f = v as f32;
    // Exact in f32 and in BF16: the f64 value survives both narrowings.
    let bits = f.to_bits();
    (f as f64 == v && bits & 0xFFFF == 0 && f.is_finite()).then_some((bits >> 16) as u16)
}

/// The INT8 form of an FP4 e2m1 code (low nibble): `2·e2m1`, an integer in [−12, 12].
pub fn fp4_as_int8(code: u8) -> i8 {
    (2.0 * e2m1_to_f32(code)) as i8
}

/// The BF16 bits of the INT8 form's group scale for E8M0 byte `scale`: `2^(scale−128)` (half
/// the FP4 scale, since the codes were doubled), or None for the NaN byte. Every other byte gives
/// a BF16 value (2⁻¹²⁸ is a BF16 subnormal).
pub fn int8_group_scale_bf16(scale: u8) -> Option<u16> {
    if scale == E8M0_NAN {
        return None;
    }
    let f = (2f64.powi(scale as i32 - 128)) as f32;
    let bits = f.to_bits();
    debug_assert_eq!(bits & 0xFFFF, 0);
    Some((bits >> 16) as u16)
}

/// [`DeviceForm::for_stored`] of a checkpoint's weight, with the fallbacks the Ascend backend
/// takes on its data (it decides with this function): FP8 → BF16 needs every E8M0 scale byte in
/// [`FP8_BF16_EXACT_SCALES`] (else F32), and so do the 950's FP8 blocks, which also need whole
/// column blocks of a matrix (else BF16); MXFP4 needs every scale byte in
/// [`MXFP4_NATIVE_SCALES`] and FP4 → INT8 whole groups (else INT8, or BF16). `dsv4 inspect
/// --soc` and `dsv4 plan` count with it.
pub fn checkpoint_form(w: &crate::tensor::StoredWeight, soc: SocFamily) -> DeviceForm {
    let form = DeviceForm::for_stored(w.format, w.data.dtype, w.scale.as_ref().map(|s| s.dtype), soc);
    let cols: usize = w.shape.iter().skip(1).product();
    let scales_in = |range: std::ops::RangeInclusive<u8>| {
        w.scale.as_ref().is_some_and(|s| s.bytes().iter().all(|b| range.contains(b)))
    };
    match (form, w.format) {
        (DeviceForm::Bf16, WeightFormat::Fp8Block { .. }) if !scales_in(FP8_BF16_EXACT_SCALES) => DeviceForm::F32,
        (DeviceForm::Fp8Blocks { .. }, WeightFormat::Fp8Block { cols: bc, .. }) => {
            let whole = w.shape.len() == 2 && bc > 0 && cols.is_multiple_of(bc) && w.data.dtype == DType::F8E4M3;
            match (scales_in(FP8_BF16_EXACT_SCALES), whole) {
                (true, true) => form,
                (true, false) => DeviceForm::Bf16,
                (false, _) => DeviceForm::F32,
            }
        }
        (DeviceForm::Mxfp4 { group }, _) if !(cols.is_multiple_of(group) && scales_in(MXFP4_NATIVE_SCALES)) => {
            checkpoint_form(w, SocFamily::A3)
        }
        (DeviceForm::Int8Groups { group }, _) if group == 0 || !cols.is_multiple_of(group) => DeviceForm::Bf16,
        _ => form,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::e8m0_to_f32;

    fn bf16(bits: u16) -> f32 {
        f32::from_bits((bits as u32) << 16)
    }

    /// Every FP8 code at every scale: the BF16 form, where it exists, is the stored value bit
    /// for bit, and it exists for every code exactly on the documented scale range.
    #[test]
    fn fp8_codes_convert_to_bf16_exactly_on_the_documented_scales() {
        for scale in 0..=254u8 {
            let mut all = true;
            for code in 0..=255u8 {
                let want = e4m3_to_f32(code) * e8m0_to_f32(scale).unwrap();
                match fp8_as_bf16(code, scale) {
                    Some(h) if want.is_nan() => assert!(bf16(h).is_nan(), "code {code:#x}"),
                    // f32 arithmetic can flush where f64 does not; compare against f64.
                    Some(h) => assert_eq!(
                        bf16(h) as f64,
                        e4m3_to_f32(code) as f64 * 2f64.powi(scale as i32 - 127),
                        "code {code:#x} scale {scale}"
                    ),
                    None => all = false,
                }
                if let Some(h) = fp8_as_bf16(code, scale) {
                    if !want.is_nan() && want != 0.0 && want.is_normal() {
                        assert_eq!(bf16(h).to_bits(), want.to_bits(), "code {code:#x} scale {scale}");
                    }
                }
            }
            assert_eq!(all, FP8_BF16_EXACT_SCALES.contains(&scale), "scale byte {scale}");
        }
        assert_eq!(fp8_as_bf16(0x38, E8M0_NAN), None);
        // Real checkpoints' scales sit near 2^-10..2^-5 (bytes 117..122).
        assert!(FP8_BF16_EXACT_SCALES.contains(&117) && FP8_BF16_EXACT_SCALES.contains(&122));
    }

    /// Every FP4 code at every scale: `int8 · scale` equals `e2m1 · 2^(b−127)` bit for bit.
    #[test]
    fn fp4_codes_convert_to_int8_with_group_scales_exactly() {
        for code in 0..16u8 {
            let q = fp4_as_int8(code);
            assert!((-12..=12).contains(&q), "{q}");
            assert_eq!(q as f32, 2.0 * e2m1_to_f32(code), "code {code:#x}");
        }
        for scale in 0..=254u8 {
            let s = bf16(int8_group_scale_bf16(scale).unwrap());
            for code in 0..16u8 {
                let want = e2m1_to_f32(code) as f64 * 2f64.powi(scale as i32 - 127);
                assert_eq!((fp4_as_int8(code) as f64) * (s as f64), want, "code {code:#x} scale {scale}");
            }
        }
        assert_eq!(int8_group_scale_bf16(E8M0_NAN), None);
    }

    /// The MXFP4 scale bytes are exactly those for which the scale is an F32 normal number (the
    /// Ascend backend builds it from its exponent bits) and every code times it a finite BF16
    /// value (the BF16 matmuls read it so).
    #[test]
    fn mxfp4_native_scales_are_the_bytes_the_950_forms_hold() {
        for b in 0..=255u8 {
            let scale = 2f64.powi(b as i32 - 127);
            let normal = b != E8M0_NAN && (scale as f32).is_normal();
            let bf16_values = (0..16u8).all(|code| {
                let v = (e2m1_to_f32(code) as f64 * scale) as f32;
                v.is_finite() && v.to_bits() & 0xffff == 0 && v as f64 == e2m1_to_f32(code) as f64 * scale
            });
            assert_eq!(MXFP4_NATIVE_SCALES.contains(&b), normal && bf16_values, "scale byte {b}");
        }
    }

    #[test]
    fn forms_and_bytes_per_soc() {
        let fp8 = WeightFormat::Fp8Block { rows: 128, cols: 128 };
        let fp4 = WeightFormat::Fp4Group { group: 32 };
        let e8 = Some(DType::F8E8M0);
        assert_eq!(DeviceForm::for_stored(fp8, DType::F8E4M3, e8, SocFamily::A2), DeviceForm::Bf16);
        assert_eq!(DeviceForm::for_stored(fp8, DType::F8E4M3, Some(DType::F32), SocFamily::A3), DeviceForm::F32);
        assert_eq!(DeviceForm::for_stored(fp4, DType::I8, e8, SocFamily::A2), DeviceForm::Int8Groups { group: 32 });
        assert_eq!(DeviceForm::for_stored(fp4, DType::I8, Some(DType::F32), SocFamily::A2), DeviceForm::F32);
        // F32-scaled FP8 is dequantised on the 950 too; MX takes groups of 32 only.
        assert_eq!(DeviceForm::for_stored(fp8, DType::F8E4M3, Some(DType::F32), SocFamily::A5), DeviceForm::F32);
        let fp4_16 = WeightFormat::Fp4Group { group: 16 };
        assert_eq!(DeviceForm::for_stored(fp4_16, DType::I8, e8, SocFamily::A5), DeviceForm::Int8Groups { group: 16 });
        let native = DeviceForm::for_stored(fp8, DType::F8E4M3, e8, SocFamily::A5);
        assert_eq!(native.bytes_per_param(), 1.0 + 1.0 / 16384.0);
        assert_eq!(DeviceForm::for_stored(fp4, DType::I8, e8, SocFamily::A5).bytes_per_param(), 0.53125);
        assert_eq!(DeviceForm::Int8Groups { group: 32 }.bytes_per_param(), 1.0625);
        for (name, soc) in [
            ("Ascend910B3", SocFamily::A2),
            ("Ascend910_9391", SocFamily::A3),
            ("Ascend950PR_9599", SocFamily::A5),
            ("910c", SocFamily::A3),
        ] {
            assert_eq!(SocFamily::from_name(name), Some(soc), "{name}");
        }
        assert_eq!(SocFamily::from_name("Ascend310P3"), None);
    }
}
