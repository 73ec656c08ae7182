//! The quantised weight formats of official V4 checkpoints (spec §D.4): exact decoding tables,
//! detection of a weight's stored form from its dtype and its `.scale` sibling, layout checks,
//! and the reference dequantiser used by tests and by backends that dequantise at load time.
//!
//! * **F8_E4M3** (e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
//!   `0x7F`/`0xFF` are NaN, largest finite ±448, exponent 0 holds the subnormals `m/8 · 2⁻⁶`.
//! * **E2M1** (FP4): 16 codes, two per byte along the input dimension, low nibble first.
//! * **F8_E8M0** scale byte `b`: `2^(b−127)`; `b = 255` is NaN and is rejected at load.
//!
//! Every decoded weight value is `code · 2^k`, which f32 represents exactly (as long as the
//! product stays inside f32's range, which any real scale does), so dequantising is exact and
//! a packed kernel and a dequantise-at-load kernel see bit-identical weights.

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, StoredWeight, WeightFormat};

/// FP8 weights: one scale per `FP8_BLOCK × FP8_BLOCK` block.
pub const FP8_BLOCK: usize = 128;
/// FP4 weights: one scale per `FP4_GROUP` consecutive inputs of a row.
pub const FP4_GROUP: usize = 32;

const fn e4m3_value(b: u8) -> f32 {
    let sign = (b >> 7) as u32;
    let exp = ((b >> 3) & 0xF) as u32;
    let mant = (b & 7) as u32;
    if exp == 15 && mant == 7 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: mant/8 · 2^-6 = mant · 2^-9 (exact in f32).
        mant as f32 * (1.0 / 512.0)
    } else {
        // Normal: re-bias the exponent (7 → 127) and left-align the 3 mantissa bits.
        f32::from_bits(((exp + 120) << 23) | (mant << 20))
    };
    if sign == 1 {
        -magnitude
    } else {
        magnitude
    }
}

const fn build_e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_value(i as u8);
        i += 1;
    }
    t
}

/// Every F8_E4M3 (e4m3fn) byte as f32. `0x80` is −0.0; `0x7F` and `0xFF` are NaN.
pub static E4M3_TO_F32: [f32; 256] = build_e4m3_table();

/// Every E2M1 (FP4) code as f32 (spec §D.4).
pub static E2M1_TO_F32: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The E8M0 byte that means NaN.
pub const E8M0_NAN: u8 = 255;

#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TO_F32[b as usize]
}

/// The value of a 4-bit code (only the low nibble of `code` is read).
#[inline]
pub fn e2m1_to_f32(code: u8) -> f32 {
    E2M1_TO_F32[(code & 0xF) as usize]
}

/// `2^(b−127)`, or `None` for the NaN byte 255. `b = 0` is 2⁻¹²⁷, an f32 subnormal (exact).
#[inline]
pub fn e8m0_to_f32(b: u8) -> Option<f32> {
    match b {
        E8M0_NAN => None,
        0 => Some(f32::from_bits(1 << 22)),
        b => Some(f32::from_bits((b as u32) << 23)),
    }
}

/// `2^(b−127)` for a byte already validated by [`validate_scale`] (255 gives NaN). Written
/// without branches, so a loop over a row's scales vectorises.
#[inline]
pub fn e8m0_to_f32_unchecked(b: u8) -> f32 {
    let normal = (b as u32) << 23;
    let bits = if b == 0 { 1 << 22 } else { normal };
    f32::from_bits(if b == E8M0_NAN { 0x7FC0_0000 } else { bits })
}

/// The name of the scale that belongs to a weight: `x.weight` → `x.scale`. transformers'
/// `x.weight_scale_inv` is renamed to `x.scale` when the checkpoint is opened.
pub fn scale_name(weight_name: &str) -> Option<String> {
    weight_name.strip_suffix(".weight").map(|stem| format!("{stem}.scale"))
}

/// Checks every scale value: E8M0 bytes must not be 255 (NaN), F32 scales must be finite.
pub fn validate_scale(scale: &HostTensor) -> Result<()> {
    match scale.dtype {
        DType::F8E8M0 => {
            let b = scale.bytes();
            // `contains` on bytes is a memchr: a fast pass over the whole scale tensor.
            if b.contains(&E8M0_NAN) {
                let at = b.iter().position(|&v| v == E8M0_NAN).unwrap_or(0);
                return Err(scale
                    .err(format!("E8M0 scale element {at} (of shape {:?}) is 255, which encodes NaN", scale.shape)));
            }
            Ok(())
        }
        DType::F32 => {
            let bad =
                scale.bytes().chunks_exact(4).position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
            match bad {
                Some(at) => Err(scale.err(format!("F32 scale element {at} is not finite"))),
                None => Ok(()),
            }
        }
        other => Err(scale.err(format!("a scale must be F8_E8M0 or F32, found {other}"))),
    }
}

/// Decodes scale element `i` of a validated scale tensor's bytes.
#[inline]
pub fn scale_at(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
        _ => e8m0_to_f32_unchecked(bytes[i]),
    }
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

impl StoredWeight {
    /// Works out how a checkpoint weight is stored from its own dtype and the presence of a
    /// scale tensor (never from its name), checks every shape against the logical shape the
    /// config implies, and validates the scales:
    ///
    /// * F32 / BF16 / F16 without a scale → [`WeightFormat::Float`];
    /// * F8_E4M3 `[N, K]` with a scale `[⌈N/128⌉, ⌈K/128⌉]` (F8_E8M0 or F32) →
    ///   [`WeightFormat::Fp8Block`];
    /// * I8 / U8 `[N, K/2]` with a scale `[N, ⌈K/32⌉]` (F8_E8M0 or F32) → [`WeightFormat::Fp4Group`],
    ///   logical shape `[N, K]`.
    pub fn detect(data: &HostTensor, scale: Option<&HostTensor>, logical: &[usize]) -> Result<StoredWeight> {
        let shape_err = |want: Vec<usize>| Error::Shape {
            name: data.name.clone(),
            file: data.source.clone(),
            expected: want,
            actual: data.shape.clone(),
            note: String::new(),
        };
        let format = match data.dtype {
            d if d.is_float() && d != DType::F64 => {
                if let Some(s) = scale {
                    return Err(data.err(format!(
                        "{d} weight has a scale tensor `{}` (in {}); only F8_E4M3 and packed FP4 weights take scales",
                        s.name, s.source
                    )));
                }
                if data.shape != logical {
                    return Err(shape_err(logical.to_vec()));
                }
                WeightFormat::Float
            }
            DType::F8E4M3 => {
                if logical.len() != 2 {
                    return Err(data.err(format!("an F8_E4M3 weight must be a matrix, the config expects {logical:?}")));
                }
                if data.shape != logical {
                    return Err(shape_err(logical.to_vec()));
                }
                WeightFormat::Fp8Block { rows: FP8_BLOCK, cols: FP8_BLOCK }
            }
            DType::I8 | DType::U8 => {
                if logical.len() != 2 {
                    return Err(data.err(format!(
                        "a packed FP4 ({}) weight must be a matrix, the config expects {logical:?}",
                        data.dtype
                    )));
                }
                let (n, k) = (logical[0], logical[1]);
                if k % 2 != 0 {
                    return Err(data.err(format!(
                        "packed FP4 weight: the config's input dimension {k} is odd, but two FP4 codes share a byte"
                    )));
                }
                if data.shape != [n, k / 2] {
                    return Err(data.err(format!(
                        "packed FP4 ({}) weight has shape {:?}; the config's [{n}, {k}] needs [{n}, {}] (two codes per byte)",
                        data.dtype,
                        data.shape,
                        k / 2
                    )));
                }
                WeightFormat::Fp4Group { group: FP4_GROUP }
            }
            other => {
                let msg = format!("dtype {other} cannot hold a weight matrix");
                return Err(data.err(msg + " (expected F32, BF16, F16, F8_E4M3 or packed FP4 in I8/U8)"));
            }
        };
        if format != WeightFormat::Float && scale.is_none() {
            return Err(data.err(format!(
                "{} weight has no scale tensor `{}` in the checkpoint",
                data.dtype,
                scale_name(&data.name).unwrap_or_else(|| format!("{}.scale", data.name))
            )));
        }
        let w = StoredWeight {
            name: data.name.clone(),
            shape: logical.to_vec(),
            format,
            data: data.clone(),
            scale: scale.cloned(),
        };
        w.validate()?;
        if let Some(s) = &w.scale {
            validate_scale(s)?;
        }
        Ok(w)
    }

    /// The scale shape a quantised weight of logical shape `[N, K]` needs (None for Float).
    pub fn expected_scale_shape(format: WeightFormat, logical: &[usize]) -> Option<Vec<usize>> {
        match (format, logical) {
            (WeightFormat::Float, _) => None,
            (WeightFormat::Fp8Block { rows, cols }, [n, k]) => Some(vec![n.div_ceil(rows), k.div_ceil(cols)]),
            (WeightFormat::Fp4Group { group }, [n, k]) => Some(vec![*n, k.div_ceil(group)]),
            _ => Some(vec![]),
        }
    }

    /// Checks that data, scale and logical shape agree (cheap; no element is read). Backends
    /// call this before indexing, so even a hand-built `StoredWeight` cannot make them read
    /// out of bounds.
    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        match self.format {
            WeightFormat::Float => {
                if !d.dtype.is_float() || d.shape != self.shape || self.scale.is_some() {
                    return Err(d.err(format!(
                        "inconsistent float weight: {} {:?} for logical shape {:?}{}",
                        d.dtype,
                        d.shape,
                        self.shape,
                        if self.scale.is_some() { " with a scale" } else { "" }
                    )));
                }
                Ok(())
            }
            WeightFormat::Fp8Block { .. } | WeightFormat::Fp4Group { .. } => {
                let (fp4, rows, cols) = match self.format {
                    WeightFormat::Fp8Block { rows, cols } => (false, rows, cols),
                    WeightFormat::Fp4Group { group } => (true, 1, group),
                    WeightFormat::Float => unreachable!("matched above"),
                };
                let [n, k] = self.shape[..] else {
                    return Err(d.err(format!("a quantised weight must be a matrix, logical shape {:?}", self.shape)));
                };
                if rows == 0 || cols == 0 || (fp4 && cols % 2 != 0) {
                    return Err(d.err(format!("unusable quantisation block {:?}", self.format)));
                }
                let (want_dtype_ok, want_shape) = if fp4 {
                    (matches!(d.dtype, DType::I8 | DType::U8), vec![n, k / 2])
                } else {
                    (d.dtype == DType::F8E4M3, vec![n, k])
                };
                if !want_dtype_ok || d.shape != want_shape || (fp4 && k % 2 != 0) {
                    return Err(d.err(format!(
                        "{} data {:?} does not fit a {:?} weight of logical shape {:?}",
                        d.dtype, d.shape, self.format, self.shape
                    )));
                }
                let s =
                    self.scale.as_ref().ok_or_else(|| d.err(format!("{:?} weight without a scale", self.format)))?;
                let want = Self::expected_scale_shape(self.format, &self.shape).unwrap_or_default();
                if !matches!(s.dtype, DType::F8E8M0 | DType::F32) {
                    return Err(s.err(format!("scale of `{}` must be F8_E8M0 or F32, found {}", d.name, s.dtype)));
                }
                if s.shape != want {
                    let what = if fp4 {
                        format!("one per {cols} inputs of each row")
                    } else {
                        format!("one per {rows}×{cols} block")
                    };
                    return Err(s.err(format!(
                        "scale of `{}` ({} {}, logical {}) has shape {}, expected {} ({what})",
                        d.name,
                        d.dtype,
                        shape_str(&d.shape),
                        shape_str(&self.shape),
                        shape_str(&s.shape),
                        shape_str(&want)
                    )));
                }
                Ok(())
            }
        }
    }
}

/// The exact f32 values of a weight, row-major in its logical shape. The reference for every
/// packed kernel, and what the dequantise-at-load path of a backend keeps.
pub fn dequantize(w: &StoredWeight) -> Result<Vec<f32>> {
    w.validate()?;
    match w.format {
        WeightFormat::Float => w.data.to_f32_vec(),
        WeightFormat::Fp8Block { rows, cols } => {
            let (n, k) = (w.shape[0], w.shape[1]);
            let s = w.scale.as_ref().expect("validated");
            validate_scale(s)?;
            let (sd, sb, sk) = (s.dtype, s.bytes(), k.div_ceil(cols));
            let q = w.data.bytes();
            let mut out = Vec::with_capacity(n * k);
            for r in 0..n {
                for c in 0..k {
                    out.push(e4m3_to_f32(q[r * k + c]) * scale_at(sd, sb, (r / rows) * sk + c / cols));
                }
            }
            Ok(out)
        }
        WeightFormat::Fp4Group { group } => {
            let (n, k) = (w.shape[0], w.shape[1]);
            let s = w.scale.as_ref().expect("validated");
            validate_scale(s)?;
            let (sd, sb, sk) = (s.dtype, s.bytes(), k.div_ceil(group));
            let q = w.data.bytes();
            let mut out = Vec::with_capacity(n * k);
            for r in 0..n {
                for c in 0..k {
                    let byte = q[r * (k / 2) + c / 2];
                    let code = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    out.push(e2m1_to_f32(code) * scale_at(sd, sb, r * sk + c / group));
                }
            }
            Ok(out)
        }
    }
}

/// The nearest code of a value table (ties to the lower code index), skipping NaN entries.
fn nearest(table: &[f32], v: f32) -> u8 {
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &t) in table.iter().enumerate() {
        let d = (t - v).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// The power-of-two E8M0 scale byte for a block whose largest magnitude is `amax`, such that
/// `amax / scale ≤ max_code` (the official `2^ceil(log2(amax / max_code))`).
fn pow2_scale_byte(amax: f32, max_code: f32) -> u8 {
    if amax <= 0.0 || !amax.is_finite() {
        return 127;
    }
    let e = (amax as f64 / max_code as f64).log2().ceil() as i32;
    (e + 127).clamp(0, 254) as u8
}

/// Quantises an `[n, k]` f32 matrix to FP8 e4m3 with one E8M0 scale per 128×128 block (round
/// to nearest). Returns (codes `[n, k]`, scale bytes `[⌈n/128⌉, ⌈k/128⌉]`). For building test
/// checkpoints; [`dequantize`] of the result is exact, not the input.
pub fn quantize_fp8_block(values: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(values.len(), n * k, "quantize_fp8_block: {n}x{k} needs {} values", n * k);
    let (sn, sk) = (n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK));
    let mut scales = vec![127u8; sn * sk];
    for (bi, s) in scales.iter_mut().enumerate() {
        let (br, bc) = (bi / sk, bi % sk);
        let mut amax = 0f32;
        for r in br * FP8_BLOCK..((br + 1) * FP8_BLOCK).min(n) {
            for c in bc * FP8_BLOCK..((bc + 1) * FP8_BLOCK).min(k) {
                amax = amax.max(values[r * k + c].abs());
            }
        }
        *s = pow2_scale_byte(amax, 448.0);
    }
    let finite: Vec<f32> = E4M3_TO_F32.iter().map(|v| if v.is_nan() { f32::INFINITY } else { *v }).collect();
    let mut codes = vec![0u8; n * k];
    for r in 0..n {
        for c in 0..k {
            let s = e8m0_to_f32_unchecked(scales[(r / FP8_BLOCK) * sk + c / FP8_BLOCK]);
            codes[r * k + c] = nearest(&finite, values[r * k + c] / s);
        }
    }
    (codes, scales)
}

/// Quantises an `[n, k]` f32 matrix (k even) to FP4 e2m1, two codes per byte, low nibble
/// first, with one E8M0 scale per 32 inputs. Returns (bytes `[n, k/2]`, scales `[n, ⌈k/32⌉]`).
pub fn quantize_fp4_group(values: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(values.len(), n * k, "quantize_fp4_group: {n}x{k} needs {} values", n * k);
    assert!(k.is_multiple_of(2), "quantize_fp4_group: k must be even");
    let sk = k.div_ceil(FP4_GROUP);
    let mut scales = vec![127u8; n * sk];
    for r in 0..n {
        for g in 0..sk {
            let row = &values[r * k + g * FP4_GROUP..r * k + ((g + 1) * FP4_GROUP).min(k)];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            scales[r * sk + g] = pow2_scale_byte(amax, 6.0);
        }
    }
    let mut packed = vec![0u8; n * k / 2];
    for r in 0..n {
        for c in 0..k {
            let s = e8m0_to_f32_unchecked(scales[r * sk + c / FP4_GROUP]);
            let code = nearest(&E2M1_TO_F32, values[r * k + c] / s);
            packed[r * (k / 2) + c / 2] |= if c % 2 == 0 { code } else { code << 4 };
        }
    }
    (packed, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3fn by the textbook formula, in f64, independent of the bit tricks above.
    fn e4m3_formula(b: u8) -> f64 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0xF) as i32;
        let m = (b & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            sign * (m / 8.0) * 2f64.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    #[test]
    fn all_256_e4m3_codes() {
        let mut nan = 0;
        for b in 0..=255u8 {
            let got = e4m3_to_f32(b);
            let want = e4m3_formula(b);
            if want.is_nan() {
                assert!(got.is_nan(), "code {b:#04x}");
                nan += 1;
                continue;
            }
            assert_eq!(got as f64, want, "code {b:#04x}");
            // Sign of zero too.
            assert_eq!(got.is_sign_negative(), b & 0x80 != 0, "sign of code {b:#04x}");
        }
        assert_eq!(nan, 2, "only 0x7F and 0xFF are NaN");
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn all_16_e2m1_codes() {
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for code in 0..16u8 {
            // e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa; exponent 0 is subnormal m/2.
            let (s, e, m) = ((code >> 3) & 1, (code >> 1) & 3, code & 1);
            let mag = if e == 0 { m as f32 * 0.5 } else { (1.0 + m as f32 * 0.5) * 2f32.powi(e as i32 - 1) };
            assert_eq!(mag, want[(code & 7) as usize]);
            let v = e2m1_to_f32(code);
            assert_eq!(v.abs(), mag, "code {code}");
            assert_eq!(v.is_sign_negative(), s == 1, "sign of code {code}");
            // Only the low nibble is read.
            assert_eq!(e2m1_to_f32(code | 0xF0).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn e8m0_edges() {
        assert_eq!(e8m0_to_f32(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0_to_f32(0).unwrap() as f64, 2f64.powi(-127));
        assert_eq!(e8m0_to_f32(1), Some(2f32.powi(-126)));
        assert_eq!(e8m0_to_f32(126), Some(0.5));
        assert_eq!(e8m0_to_f32(127), Some(1.0));
        assert_eq!(e8m0_to_f32(128), Some(2.0));
        assert_eq!(e8m0_to_f32(254).unwrap() as f64, 2f64.powi(127));
        assert_eq!(e8m0_to_f32(255), None);
        assert!(e8m0_to_f32_unchecked(255).is_nan());
        for b in 0..255u8 {
            assert_eq!(e8m0_to_f32(b).unwrap() as f64, 2f64.powi(b as i32 - 127), "byte {b}");
            assert_eq!(e8m0_to_f32_unchecked(b).to_bits(), e8m0_to_f32(b).unwrap().to_bits(), "byte {b}");
        }
    }

    fn tensor(name: &str, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> HostTensor {
        HostTensor::from_bytes(name, dtype, shape.to_vec(), bytes).unwrap()
    }

    #[test]
    fn fp8_blocks_on_shapes_that_are_not_multiples_of_128() {
        let (n, k) = (130, 257);
        let q: Vec<u8> =
            (0..n * k).map(|i| ((i * 37 + 11) % 256) as u8).map(|b| if b & 0x7F == 0x7F { 0 } else { b }).collect();
        let (sn, sk) = (2, 3);
        let s: Vec<u8> = (0..sn * sk).map(|i| 120 + i as u8).collect();
        let w = StoredWeight::detect(
            &tensor("a.weight", DType::F8E4M3, &[n, k], q.clone()),
            Some(&tensor("a.scale", DType::F8E8M0, &[sn, sk], s.clone())),
            &[n, k],
        )
        .unwrap();
        assert_eq!(w.format, WeightFormat::Fp8Block { rows: 128, cols: 128 });
        let d = dequantize(&w).unwrap();
        for (r, c) in [(0, 0), (127, 127), (128, 0), (129, 256), (5, 128), (128, 255), (0, 256)] {
            let scale = 2f64.powi(s[(r / 128) * sk + c / 128] as i32 - 127);
            assert_eq!(d[r * k + c] as f64, e4m3_formula(q[r * k + c]) * scale, "({r}, {c})");
        }
        // F32 block scales (Base checkpoints).
        let sf: Vec<u8> = (0..sn * sk).flat_map(|i| (0.25f32 * (i + 1) as f32).to_le_bytes()).collect();
        let w = StoredWeight::detect(
            &tensor("a.weight", DType::F8E4M3, &[n, k], q.clone()),
            Some(&tensor("a.scale", DType::F32, &[sn, sk], sf)),
            &[n, k],
        )
        .unwrap();
        let d = dequantize(&w).unwrap();
        assert_eq!(d[129 * k + 256], e4m3_to_f32(q[129 * k + 256]) * 0.25 * 6.0);
    }

    #[test]
    fn fp4_low_nibble_is_the_even_element() {
        // Row 0: byte 0x21 → element 0 = code 1 (0.5), element 1 = code 2 (1.0).
        let (n, k) = (2, 64);
        let mut q = vec![0u8; n * k / 2];
        q[0] = 0x21;
        q[1] = 0xF7; // element 2 = code 7 (6), element 3 = code 15 (−6)
        q[k / 2 + 16] = 0x9A; // row 1, elements 32, 33 = code 10 (−1), code 9 (−0.5)
        let s = vec![127, 128, 126, 130]; // [2, 2]
        let w = StoredWeight::detect(
            &tensor("e.weight", DType::I8, &[n, k / 2], q),
            Some(&tensor("e.scale", DType::F8E8M0, &[n, 2], s)),
            &[n, k],
        )
        .unwrap();
        assert_eq!(w.format, WeightFormat::Fp4Group { group: 32 });
        let d = dequantize(&w).unwrap();
        assert_eq!(&d[..4], &[0.5, 1.0, 6.0, -6.0]);
        assert_eq!(d[k + 32], -8.0);
        assert_eq!(d[k + 33], -0.5 * 8.0);
        assert_eq!(d[k], 0.0);
    }

    #[test]
    fn detection_errors_name_the_tensor() {
        let f = |name: &str, dt, shape: &[usize], n| tensor(name, dt, shape, vec![0u8; n]);
        // Scale of the wrong shape.
        let e = StoredWeight::detect(
            &f("x.weight", DType::F8E4M3, &[256, 128], 256 * 128),
            Some(&f("x.scale", DType::F8E8M0, &[1, 1], 1)),
            &[256, 128],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.scale") && e.contains("[2, 1]"), "{e}");
        // Missing scale.
        let e =
            StoredWeight::detect(&f("x.weight", DType::F8E4M3, &[4, 4], 16), None, &[4, 4]).unwrap_err().to_string();
        assert!(e.contains("x.weight") && e.contains("x.scale"), "{e}");
        // NaN scale.
        let e = StoredWeight::detect(
            &f("x.weight", DType::I8, &[4, 16], 64),
            Some(&tensor("x.scale", DType::F8E8M0, &[4, 1], vec![127, 127, 255, 127])),
            &[4, 32],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.scale") && e.contains("NaN") && e.contains("element 2"), "{e}");
        // Float weight with a scale.
        let e = StoredWeight::detect(
            &f("x.weight", DType::BF16, &[4, 4], 32),
            Some(&f("x.scale", DType::F8E8M0, &[1, 1], 1)),
            &[4, 4],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.weight") && e.contains("has a scale"), "{e}");
        // FP4 with an odd input dimension.
        let e = StoredWeight::detect(
            &f("x.weight", DType::I8, &[4, 2], 8),
            Some(&f("x.scale", DType::F8E8M0, &[4, 1], 4)),
            &[4, 5],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.weight") && e.contains("odd"), "{e}");
        // Integer tables are not weights.
        let e = StoredWeight::detect(&f("x.weight", DType::I64, &[4], 32), None, &[4]).unwrap_err().to_string();
        assert!(e.contains("I64"), "{e}");
    }

    #[test]
    fn quantisers_round_trip_exactly_representable_values() {
        let (n, k) = (3, 64);
        let vals: Vec<f32> = (0..n * k).map(|i| E2M1_TO_F32[i % 16] * 4.0).collect();
        let (q, s) = quantize_fp4_group(&vals, n, k);
        let w = StoredWeight::detect(
            &tensor("a.weight", DType::I8, &[n, k / 2], q),
            Some(&tensor("a.scale", DType::F8E8M0, &[n, 2], s)),
            &[n, k],
        )
        .unwrap();
        assert_eq!(dequantize(&w).unwrap(), vals);
        let vals: Vec<f32> = (0..n * k).map(|i| E4M3_TO_F32[(i * 7) % 126] / 64.0).collect();
        let (q, s) = quantize_fp8_block(&vals, n, k);
        let w = StoredWeight::detect(
            &tensor("a.weight", DType::F8E4M3, &[n, k], q),
            Some(&tensor("a.scale", DType::F8E8M0, &[1, 1], s)),
            &[n, k],
        )
        .unwrap();
        assert_eq!(dequantize(&w).unwrap(), vals);
    }
}
