//! Tensor, index and weight storage of the CPU backend.

use std::sync::Arc;

use dsv4_core::backend::DeviceTensor;
use dsv4_core::error::{Error, Result};
use dsv4_core::quant::{scale_at, E2M1_TO_F32, E4M3_TO_F32, FP4_GROUP, FP8_BLOCK};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight, WeightFormat};
use half::f16;
use ndarray::{ArrayViewD, IxDyn};

#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Arc<Vec<f32>>,
}

impl DeviceTensor for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl CpuTensor {
    pub(crate) fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: Arc::new(data) }
    }

    pub(crate) fn view(&self) -> ArrayViewD<'_, f32> {
        ArrayViewD::from_shape(IxDyn(&self.shape), &self.data).expect("shape matches data length")
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

#[derive(Clone, Debug)]
pub struct CpuIndex {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Arc<Vec<i32>>,
}

impl DeviceTensor for CpuIndex {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl CpuIndex {
    pub(crate) fn new(shape: Vec<usize>, data: Vec<i32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuIndex { shape, data: Arc::new(data) }
    }

    pub(crate) fn view(&self) -> ArrayViewD<'_, i32> {
        ArrayViewD::from_shape(IxDyn(&self.shape), &self.data).expect("shape matches data length")
    }
}

/// Element storage of a weight.
#[derive(Debug)]
pub(crate) enum WeightData {
    /// F32 / BF16 / F16 elements exactly as stored: a zero-copy view of the checkpoint
    /// bytes (the memory map stays alive through the view).
    Float { dtype: DType, data: HostTensor },
    /// FP8 e4m3 codes `[N, K]` with one scale per `block_rows × block_cols` block.
    Fp8 { data: HostTensor, scale: HostTensor, block_rows: usize, block_cols: usize },
    /// FP4 e2m1 codes, two per byte along K (low nibble first), one scale per `group` inputs.
    Fp4 { data: HostTensor, scale: HostTensor, group: usize },
    /// Every value dequantised to f32 at load: the reference path
    /// ([`CpuWeight::dequantized`], or `DSV4_CPU_DEQUANTIZE=1`).
    F32(Vec<f32>),
}

/// A weight viewed as a matrix `[rows, cols]` (its outer dimension by everything else, in
/// its logical shape: a packed FP4 `[N, K/2]` tensor is a `[N, K]` matrix).
///
/// By default the stored form is kept (zero-copy) and widened to f32 row by row inside the
/// GEMM/GEMV, so a weight is never held twice and decode reads 1 byte per FP8 value and half
/// a byte per FP4 value.
#[derive(Debug)]
pub struct CpuWeight {
    pub(crate) shape: Vec<usize>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: WeightData,
}

fn unsupported(w: &StoredWeight, what: String) -> Error {
    Error::Tensor {
        name: w.name.clone(),
        file: w.data.source.clone(),
        msg: format!("the CPU backend cannot use {what}"),
    }
}

/// The environment switch for the dequantise-at-load reference path.
pub const DEQUANTIZE_ENV: &str = "DSV4_CPU_DEQUANTIZE";

impl CpuWeight {
    /// Keeps the stored form (the CPU default): no copy of the weight's bytes is made.
    pub fn from_stored(w: &StoredWeight) -> Result<Self> {
        w.validate()?;
        let t = &w.data;
        let data = match w.format {
            WeightFormat::Float => match t.dtype {
                DType::F32 | DType::BF16 | DType::F16 => WeightData::Float { dtype: t.dtype, data: t.clone() },
                other => return Err(unsupported(w, format!("{other} weights"))),
            },
            WeightFormat::Fp8Block { rows, cols } => WeightData::Fp8 {
                data: t.clone(),
                scale: w.scale.clone().expect("validated"),
                block_rows: rows,
                block_cols: cols,
            },
            WeightFormat::Fp4Group { group } => {
                WeightData::Fp4 { data: t.clone(), scale: w.scale.clone().expect("validated"), group }
            }
        };
        Ok(Self::with_data(w, data))
    }

    /// The reference path: every value dequantised to f32 once, at load (4 bytes per value).
    pub fn dequantized(w: &StoredWeight) -> Result<Self> {
        if matches!(w.data.dtype, DType::F64) {
            return Err(unsupported(w, "F64 weights".into()));
        }
        let values = dsv4_core::quant::dequantize(w)?;
        Ok(Self::with_data(w, WeightData::F32(values)))
    }

    fn with_data(w: &StoredWeight, data: WeightData) -> Self {
        let rows = *w.shape.first().unwrap_or(&1);
        let cols = w.shape.iter().skip(1).product();
        CpuWeight { shape: w.shape.clone(), rows, cols, data }
    }

    /// Whether the weight is held as dequantised f32 (the reference path).
    pub fn is_dequantized(&self) -> bool {
        matches!(self.data, WeightData::F32(_))
    }

    /// Bytes this weight keeps (shared with the checkpoint's memory map unless dequantised).
    pub fn size_bytes(&self) -> usize {
        match &self.data {
            WeightData::Float { data, .. } => data.size_bytes(),
            WeightData::Fp8 { data, scale, .. } | WeightData::Fp4 { data, scale, .. } => {
                data.size_bytes() + scale.size_bytes()
            }
            WeightData::F32(v) => v.len() * 4,
        }
    }

    /// Widens row `r` into `out` (length cols), exactly.
    #[inline]
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        let k = self.cols;
        debug_assert_eq!(out.len(), k);
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[r * k..(r + 1) * k]),
            WeightData::Float { dtype, data } => {
                let b = data.bytes();
                match dtype {
                    DType::F32 => {
                        for (o, c) in out.iter_mut().zip(b[r * k * 4..(r + 1) * k * 4].chunks_exact(4)) {
                            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                    DType::BF16 => {
                        for (o, c) in out.iter_mut().zip(b[r * k * 2..(r + 1) * k * 2].chunks_exact(2)) {
                            *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                        }
                    }
                    _ => {
                        for (o, c) in out.iter_mut().zip(b[r * k * 2..(r + 1) * k * 2].chunks_exact(2)) {
                            *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                        }
                    }
                }
            }
            WeightData::Fp8 { data, scale, block_rows, block_cols } => {
                let q = &data.bytes()[r * k..(r + 1) * k];
                let scales = Scales {
                    dtype: scale.dtype,
                    bytes: scale.bytes(),
                    row: (r / block_rows) * k.div_ceil(*block_cols),
                };
                match *block_cols {
                    FP8_BLOCK => decode_fp8::<FP8_BLOCK>(q, out, &scales),
                    b => decode_fp8_dyn(q, out, &scales, b),
                }
            }
            WeightData::Fp4 { data, scale, group } => {
                let half = k / 2;
                let q = &data.bytes()[r * half..(r + 1) * half];
                let scales = Scales { dtype: scale.dtype, bytes: scale.bytes(), row: r * k.div_ceil(*group) };
                match *group {
                    FP4_GROUP => decode_fp4::<FP4_GROUP>(q, out, &scales),
                    g => decode_fp4_dyn(q, out, &scales, g),
                }
            }
        }
    }

    /// Widens rows `start..start+n` into `out` (length n·cols), exactly.
    pub(crate) fn rows_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        for (i, o) in out.chunks_exact_mut(self.cols.max(1)).take(n).enumerate() {
            self.row_f32(start + i, o);
        }
    }

    /// Borrowed f32 rows when the weight is held as f32 (no widening needed).
    pub(crate) fn f32_rows(&self, start: usize, n: usize) -> Option<&[f32]> {
        match &self.data {
            WeightData::F32(v) => Some(&v[start * self.cols..(start + n) * self.cols]),
            _ => None,
        }
    }
}

/// One row's scales: element `row + j` is the scale of block (or group) j.
struct Scales<'a> {
    dtype: DType,
    bytes: &'a [u8],
    row: usize,
}

impl Scales<'_> {
    #[inline(always)]
    fn get(&self, j: usize) -> f32 {
        scale_at(self.dtype, self.bytes, self.row + j)
    }
}

#[inline(always)]
fn fp8_block(q: &[u8], out: &mut [f32], s: f32) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = E4M3_TO_F32[q as usize] * s;
    }
}

#[inline(always)]
fn fp4_group(q: &[u8], out: &mut [f32], s: f32) {
    for (o, &b) in out.chunks_exact_mut(2).zip(q) {
        o[0] = E2M1_TO_F32[(b & 0xF) as usize] * s;
        o[1] = E2M1_TO_F32[(b >> 4) as usize] * s;
    }
}

/// FP8 row decode with the block width known at compile time (the fast, official case).
fn decode_fp8<const B: usize>(q: &[u8], out: &mut [f32], s: &Scales) {
    let (qc, oc) = (q.chunks_exact(B), out.chunks_exact_mut(B));
    let (qr, j_tail) = (qc.remainder(), q.len() / B);
    for (j, (q, o)) in qc.zip(oc).enumerate() {
        let q: &[u8; B] = q.try_into().expect("chunk of B");
        fp8_block(q, o, s.get(j));
    }
    if !qr.is_empty() {
        fp8_block(qr, &mut out[j_tail * B..], s.get(j_tail));
    }
}

fn decode_fp8_dyn(q: &[u8], out: &mut [f32], s: &Scales, b: usize) {
    for (j, (q, o)) in q.chunks(b).zip(out.chunks_mut(b)).enumerate() {
        fp8_block(q, o, s.get(j));
    }
}

/// FP4 row decode with the group width known at compile time (`G` values, `G/2` bytes).
fn decode_fp4<const G: usize>(q: &[u8], out: &mut [f32], s: &Scales) {
    let half = G / 2;
    let (qc, oc) = (q.chunks_exact(half), out.chunks_exact_mut(G));
    let (qr, j_tail) = (qc.remainder(), q.len() / half);
    for (j, (q, o)) in qc.zip(oc).enumerate() {
        fp4_group(q, o, s.get(j));
    }
    if !qr.is_empty() {
        fp4_group(qr, &mut out[j_tail * G..], s.get(j_tail));
    }
}

fn decode_fp4_dyn(q: &[u8], out: &mut [f32], s: &Scales, g: usize) {
    for (j, (q, o)) in q.chunks(g / 2).zip(out.chunks_mut(g)).enumerate() {
        fp4_group(q, o, s.get(j));
    }
}
