//! Row formats of the paged decoding state and their host-side codec.
//!
//! A pool row is one cached vector (a sliding-window K=V row, a compressed entry, an indexer
//! key, or a compressor carry row). Its bytes per row, for a row of `width` values of which the
//! trailing `rope` are rotary channels:
//!
//! | format | bytes per row | V4 attention row (512, rope 64) | indexer key (128) |
//! |---|---|---|---|
//! | `f32` | 4·width | 2048 | 512 |
//! | `bf16` | 2·width | 1024 | 256 |
//! | `fp8` | (width − rope) e4m3 + 2·rope BF16 + ⌈(width − rope)/64⌉ UE8M0 scales, rounded up to 8 | **584** | 256 (BF16, see below) |
//!
//! The `fp8` layout is the official inference's KV numerics (spec §B.8) stored the way vLLM
//! stores V4's KV (spec §C.1): the non-rope channels quantised to e4m3 in blocks of 64 with a
//! power-of-two scale `2^ceil(log2(max(amax, 1e-4) / 448))` (values `clamp(x / s, ±448)`,
//! rounded to nearest even), the rope channels rounded to BF16. Within the row: the e4m3 codes,
//! then the BF16 rope values (little-endian), then one scale byte (e8m0: exponent + 127) per
//! block, then zero padding. Decoding is exact (`code · 2^e` is representable in f32), so a
//! decoded row equals the official code's fake-quantised BF16 value of the same input.
//!
//! Indexer keys have no fp8 layout: the official code stores them after a Hadamard rotation
//! with FP4 fake-quantisation, which only makes sense together with the same treatment of the
//! indexer query (the precision issue's `official` mode). Under `--kv-dtype fp8` they are BF16.

use std::fmt;
use std::str::FromStr;

use half::bf16;

use crate::quant::E4M3_TO_F32;

/// Channels per e4m3 scale block in the `fp8` row format.
pub const FP8_KV_BLOCK: usize = 64;
/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// How the rows of one pool are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowFormat {
    F32,
    Bf16,
    /// Official KV rows: the first `width − rope` channels e4m3 with one scale per 64, the last
    /// `rope` BF16.
    Fp8 {
        rope: usize,
    },
}

/// The parts of one `fp8` row of `width` values (layout in [`RowFormat::Fp8`]): `nope` e4m3
/// codes, the `rope` values as bf16 bytes, then one E8M0 scale byte per [`FP8_KV_BLOCK`] codes
/// (and padding). Shared by [`RowFormat::decode`] and the backends' own decoders.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Row<'a> {
    /// Values stored as e4m3 codes (`width` minus the rope part).
    pub nope: usize,
    /// `nope` e4m3fn codes.
    pub codes: &'a [u8],
    /// The rope part, `2 · (width − nope)` bytes of little-endian bf16.
    pub rope: &'a [u8],
    /// The block scales (E8M0 bytes), then any padding.
    pub scales: &'a [u8],
}

impl<'a> Fp8Row<'a> {
    /// Splits `bytes` (at least `row_bytes(width)`) of a row whose last `rope` values (at most
    /// `width`) are bf16.
    pub fn split(bytes: &'a [u8], width: usize, rope: usize) -> Fp8Row<'a> {
        let rope = rope.min(width);
        let nope = width - rope;
        let (codes, rest) = bytes.split_at(nope);
        let (rope, scales) = rest.split_at(2 * rope);
        Fp8Row { nope, codes, rope, scales }
    }
}

/// The multiplier of an `fp8` row block's E8M0 scale byte: `2^(s − 127)`, exact.
#[inline]
pub fn fp8_block_scale(s: u8) -> f32 {
    ((s as i32 - 127) as f32).exp2()
}

impl RowFormat {
    /// Bytes one row of `width` values takes (the table in the module docs).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            RowFormat::F32 => 4 * width,
            RowFormat::Bf16 => 2 * width,
            RowFormat::Fp8 { rope } => {
                let nope = width - rope.min(width);
                (nope + 2 * rope.min(width) + nope.div_ceil(FP8_KV_BLOCK)).next_multiple_of(8)
            }
        }
    }

    /// Encodes `values` (one row) into `out` (`row_bytes(values.len())` bytes).
    pub fn encode(self, values: &[f32], out: &mut [u8]) {
        debug_assert_eq!(out.len(), self.row_bytes(values.len()));
        match self {
            RowFormat::F32 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            RowFormat::Bf16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            RowFormat::Fp8 { rope } => {
                let rope = rope.min(values.len());
                let nope = values.len() - rope;
                let (codes, rest) = out.split_at_mut(nope);
                let (rope_out, rest) = rest.split_at_mut(2 * rope);
                let (scales, pad) = rest.split_at_mut(nope.div_ceil(FP8_KV_BLOCK));
                for ((block, code_block), scale) in
                    values[..nope].chunks(FP8_KV_BLOCK).zip(codes.chunks_mut(FP8_KV_BLOCK)).zip(scales.iter_mut())
                {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let e = fp8_scale_exponent(amax);
                    *scale = (e + 127) as u8;
                    let inv = (-e as f32).exp2();
                    for (v, c) in block.iter().zip(code_block.iter_mut()) {
                        *c = e4m3_encode((v * inv).clamp(-E4M3_MAX, E4M3_MAX));
                    }
                }
                for (v, o) in values[nope..].iter().zip(rope_out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
                pad.fill(0);
            }
        }
    }

    /// Decodes one row of `out.len()` values from `bytes`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            RowFormat::F32 => {
                for (b, o) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            RowFormat::Bf16 => {
                for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                    *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            RowFormat::Fp8 { rope } => {
                let Fp8Row { nope, codes, rope: rope_in, scales } = Fp8Row::split(bytes, out.len(), rope);
                for ((code_block, o), &s) in
                    codes.chunks(FP8_KV_BLOCK).zip(out[..nope].chunks_mut(FP8_KV_BLOCK)).zip(scales)
                {
                    let scale = fp8_block_scale(s);
                    for (c, v) in code_block.iter().zip(o.iter_mut()) {
                        *v = E4M3_TO_F32[*c as usize] * scale;
                    }
                }
                for (b, o) in rope_in.chunks_exact(2).zip(out[nope..].iter_mut()) {
                    *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    /// `values` after a round trip through this format (what attention reads back).
    pub fn round_trip(self, values: &[f32]) -> Vec<f32> {
        let mut bytes = vec![0u8; self.row_bytes(values.len())];
        self.encode(values, &mut bytes);
        let mut out = vec![0f32; values.len()];
        self.decode(&bytes, &mut out);
        out
    }
}

/// The exponent `e` of the official power-of-two scale `2^e = 2^ceil(log2(max(amax, 1e-4) / 448))`.
pub fn fp8_scale_exponent(amax: f32) -> i32 {
    let amax = if amax.is_finite() { amax.max(1e-4) } else { E4M3_MAX };
    ((amax as f64) / E4M3_MAX as f64).log2().ceil() as i32
}

/// f32 → e4m3fn code, round to nearest, ties to even; |v| must be ≤ 448 (saturated by the caller).
pub fn e4m3_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return 0x7F;
    }
    // Codes 0x00..=0x7E are the non-negative finite values in increasing order.
    let table = &E4M3_TO_F32[..0x7F];
    let hi = table.partition_point(|&t| t <= a); // first code above a
    if hi == 0 {
        return sign;
    }
    let lo = hi - 1;
    if hi == table.len() {
        return sign | lo as u8;
    }
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code as u8
}

/// The decoding state's row format, chosen at start (`--kv-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    /// The conformance reference: rows exactly as computed.
    #[default]
    F32,
    Bf16,
    /// The official inference's KV numerics (see the module docs).
    Fp8,
}

impl KvDtype {
    /// The format of attention rows (window rows and compressed entries) whose trailing `rope`
    /// channels are rotary.
    pub fn attention_format(self, rope: usize) -> RowFormat {
        match self {
            KvDtype::F32 => RowFormat::F32,
            KvDtype::Bf16 => RowFormat::Bf16,
            KvDtype::Fp8 => RowFormat::Fp8 { rope },
        }
    }

    /// The format of the lightning indexer's keys.
    pub fn index_key_format(self) -> RowFormat {
        match self {
            KvDtype::F32 => RowFormat::F32,
            KvDtype::Bf16 | KvDtype::Fp8 => RowFormat::Bf16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(KvDtype::F32),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "fp8" | "fp8_e4m3" | "fp8_ds_mla" => Ok(KvDtype::Fp8),
            other => Err(format!("unknown KV dtype `{other}` (expected f32, bf16 or fp8)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_row_sizes() {
        assert_eq!(RowFormat::Fp8 { rope: 64 }.row_bytes(512), 584);
        assert_eq!(RowFormat::Bf16.row_bytes(512), 1024);
        assert_eq!(RowFormat::F32.row_bytes(128), 512);
    }

    #[test]
    fn e4m3_rounds_to_nearest_even() {
        for code in 0u8..0x7E {
            let v = E4M3_TO_F32[code as usize];
            assert_eq!(e4m3_encode(v), code);
            assert_eq!(e4m3_encode(-v), if code == 0 { 0x80 } else { code | 0x80 });
            let mid = (v + E4M3_TO_F32[code as usize + 1]) / 2.0;
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(e4m3_encode(mid), even, "midpoint after code {code:#x}");
        }
        assert_eq!(e4m3_encode(448.0), 0x7E);
    }

    #[test]
    fn fp8_rows_follow_the_official_formula() {
        // 70 non-rope channels (a full and a partial block) and 6 rope channels.
        let f = RowFormat::Fp8 { rope: 6 };
        let v: Vec<f32> = (0..76).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.173 + i as f32 * 1e-3).collect();
        let got = f.round_trip(&v);
        for (block, out) in v[..70].chunks(64).zip(got[..70].chunks(64)) {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            let s = (amax.max(1e-4) / 448.0).log2().ceil().exp2();
            for (x, y) in block.iter().zip(out) {
                let want = E4M3_TO_F32[e4m3_encode((*x as f64 / s).clamp(-448.0, 448.0) as f32) as usize] as f64 * s;
                assert_eq!(*y as f64, want);
                assert!((*y - x).abs() <= x.abs() / 16.0 + 1e-9, "{x} -> {y}");
            }
        }
        for (x, y) in v[70..].iter().zip(&got[70..]) {
            assert_eq!(*y, bf16::from_f32(*x).to_f32());
        }
        // A zero block decodes to zeros.
        assert!(f.round_trip(&[0.0; 76]).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn kv_dtype_parses() {
        assert_eq!("BF16".parse::<KvDtype>().unwrap(), KvDtype::Bf16);
        assert!("int4".parse::<KvDtype>().unwrap_err().contains("f32, bf16 or fp8"));
    }
}
