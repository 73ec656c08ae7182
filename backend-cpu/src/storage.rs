//! Tensor, index and weight storage of the CPU backend.

use std::sync::Arc;

use dsv4_core::backend::DeviceTensor;
use dsv4_core::error::{Error, Result};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight, WeightFormat};

use crate::kernels::weights::{decode_row, Fp4Groups, Fp8Blocks, NanFreeBlocks, Row, RowScratch, Rows};
use crate::kernels::Isa;
use ndarray::{ArrayViewD, IxDyn};

#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Arc<Vec<f32>>,
    /// Every value is a BF16 value (made by `round_to_bf16`, or a reshape, slice, gather or
    /// concatenation of such tensors): a GEMM may then multiply in BF16 with f32 accumulation
    /// (`kernels::bf16_gemm`; for one row on FP4 weights `kernels::fp4_bf16`), which is exact per
    /// product but sums in another order and flushes denormals, so bf16 results depend on
    /// whether the CPU has AVX512-BF16 and uses it (`DSV4_CPU_BF16_PRODUCTS`). Both kernels trust the flag: it must only be set on
    /// tensors whose every value is a BF16 value.
    pub(crate) bf16: bool,
}

impl DeviceTensor for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl CpuTensor {
    pub(crate) fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: Arc::new(data), bf16: false }
    }

    /// The same tensor, marked as holding BF16 values only when `bf16` (see the field).
    pub(crate) fn with_bf16(mut self, bf16: bool) -> Self {
        self.bf16 = bf16;
        self
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
}

/// Element storage of a weight.
#[derive(Debug)]
pub(crate) enum WeightData {
    /// BF16 / F16 elements exactly as stored: a zero-copy view of the checkpoint
    /// bytes (the memory map stays alive through the view).
    Float { dtype: DType, data: HostTensor },
    /// FP8 e4m3 codes `[N, K]` with one scale per `block_rows × block_cols` block; `nan_free`:
    /// which row blocks hold no NaN code, scanned as decode GEMVs reach them
    /// ([`Fp8Blocks::nan_free`]).
    Fp8 { data: HostTensor, scale: HostTensor, block_rows: usize, block_cols: usize, nan_free: NanFreeBlocks },
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
    /// Made by [`CpuWeight::dequantized`] (an F32-stored weight is also held as f32 values,
    /// but is not a dequantised copy).
    dequantized: bool,
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
                // F32 matrices (small: routers, mHC mixers) are copied, aligned for the kernels.
                DType::F32 => WeightData::F32(
                    t.bytes().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                ),
                DType::BF16 | DType::F16 => WeightData::Float { dtype: t.dtype, data: t.clone() },
                other => return Err(unsupported(w, format!("{other} weights"))),
            },
            WeightFormat::Fp8Block { rows, cols } => WeightData::Fp8 {
                data: t.clone(),
                scale: w.scale.clone().expect("validated"),
                block_rows: rows,
                block_cols: cols,
                nan_free: NanFreeBlocks::new(w.shape[0].div_ceil(rows.max(1))),
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
        Ok(CpuWeight { dequantized: true, ..Self::with_data(w, WeightData::F32(values)) })
    }

    fn with_data(w: &StoredWeight, data: WeightData) -> Self {
        let rows = *w.shape.first().unwrap_or(&1);
        let cols = w.shape.iter().skip(1).product();
        CpuWeight { shape: w.shape.clone(), rows, cols, data, dequantized: false }
    }

    /// Whether the weight is held as dequantised f32 (the reference path).
    pub fn is_dequantized(&self) -> bool {
        self.dequantized
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

    /// Row `r` in its stored form, for the SIMD kernels ([`crate::kernels::weights`]); the
    /// row's block or group scales are decoded into `scales` (a few per row).
    ///
    /// Panics if `r` is not a row of the weight.
    pub(crate) fn row<'a>(&'a self, r: usize, scales: &'a mut Vec<f32>) -> Row<'a> {
        let k = self.cols;
        match &self.data {
            WeightData::F32(v) => Row::F32(&v[r * k..(r + 1) * k]),
            WeightData::Float { dtype: DType::BF16, data } => Row::Bf16(&data.bytes()[r * k * 2..(r + 1) * k * 2]),
            WeightData::Float { data, .. } => Row::F16(&data.bytes()[r * k * 2..(r + 1) * k * 2]),
            WeightData::Fp8 { data, scale, block_rows, block_cols, .. } => {
                let per_row = k.div_ceil(*block_cols);
                decode_scales(scale, (r / block_rows) * per_row, per_row, scales);
                Row::Fp8 { codes: &data.bytes()[r * k..(r + 1) * k], scales, block: *block_cols }
            }
            WeightData::Fp4 { data, scale, group } => {
                let per_row = k.div_ceil(*group);
                decode_scales(scale, r * per_row, per_row, scales);
                Row::Fp4 { codes: &data.bytes()[r * k / 2..(r + 1) * k / 2], scales, group: *group }
            }
        }
    }

    /// Widens rows `start..start+n` into `out` (length n·cols), exactly (the SIMD decoders of
    /// [`crate::kernels::weights::decode_row`], bit-identical to the scalar tables).
    pub(crate) fn rows_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        let (isa, mut scales) = (Isa::active(), Vec::new());
        for (i, o) in out.chunks_exact_mut(self.cols.max(1)).take(n).enumerate() {
            decode_row(isa, &self.row(start + i, &mut scales), o);
        }
    }

    /// Widens row `r` into `out` (`cols` values), as [`Self::rows_f32`] does; `scales` is the
    /// caller's buffer for the row's decoded scales, kept between calls.
    pub(crate) fn row_f32(&self, r: usize, scales: &mut Vec<f32>, out: &mut [f32]) {
        decode_row(Isa::active(), &self.row(r, scales), out);
    }

    /// The packed codes and E8M0 scale bytes of an FP4 weight in groups of 32 (DeepSeek V4's
    /// routed experts), for [`crate::kernels::fp4_bf16`]; `None` for any other form.
    pub(crate) fn fp4_e8m0(&self) -> Option<(&[u8], &[u8])> {
        match &self.data {
            WeightData::Fp4 { data, scale, group }
                if *group == crate::kernels::fp4_bf16::GROUP && scale.dtype == DType::F8E8M0 =>
            {
                Some((data.bytes(), scale.bytes()))
            }
            _ => None,
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

/// FP4 rows whose group scales [`Rows::row`] decodes together: one decode (a vectorised loop)
/// instead of a short one per row, which cost a third of a decode-time FP4 GEMV's time.
const FP4_SCALE_ROWS: usize = 64;

/// Rows for [`crate::kernels::dot_many`]: as [`CpuWeight::row`], but an FP8 row block's
/// scales are decoded once for all its rows, and an FP4 weight's scales once per
/// [`FP4_SCALE_ROWS`] rows (`scratch.key` is the block).
impl Rows for CpuWeight {
    #[inline]
    fn row<'a>(&'a self, r: usize, scratch: &'a mut RowScratch) -> Row<'a> {
        let k = self.cols;
        match &self.data {
            WeightData::Fp8 { data, block_rows, block_cols, .. } => {
                let block = r / block_rows;
                if scratch.key != Some(block) {
                    self.fp8_block_scales(block, &mut scratch.scales);
                    scratch.key = Some(block);
                }
                Row::Fp8 { codes: &data.bytes()[r * k..(r + 1) * k], scales: &scratch.scales, block: *block_cols }
            }
            WeightData::Fp4 { data, scale, group } => {
                let per_row = k.div_ceil(*group);
                let block = r / FP4_SCALE_ROWS;
                let first = block * FP4_SCALE_ROWS;
                if scratch.key != Some(block) {
                    let n = FP4_SCALE_ROWS.min(self.rows - first);
                    decode_scales(scale, first * per_row, n * per_row, &mut scratch.scales);
                    scratch.key = Some(block);
                }
                let at = (r - first) * per_row;
                Row::Fp4 {
                    codes: &data.bytes()[r * k / 2..(r + 1) * k / 2],
                    scales: &scratch.scales[at..at + per_row],
                    group: *group,
                }
            }
            _ => {
                scratch.key = None;
                CpuWeight::row(self, r, &mut scratch.scales)
            }
        }
    }

    fn bf16_rows(&self) -> Option<(&[u8], usize)> {
        match &self.data {
            WeightData::Float { dtype: DType::BF16, data } => Some((data.bytes(), self.cols)),
            _ => None,
        }
    }

    fn fp8_blocks(&self) -> Option<Fp8Blocks<'_>> {
        match &self.data {
            WeightData::Fp8 { data, block_rows, block_cols, nan_free, .. } => Some(Fp8Blocks {
                codes: data.bytes(),
                k: self.cols,
                block_rows: *block_rows,
                block_cols: *block_cols,
                nan_free,
            }),
            _ => None,
        }
    }

    fn fp4_groups(&self) -> Option<Fp4Groups<'_>> {
        match &self.data {
            WeightData::Fp4 { data, scale, group: 32 } if scale.dtype == DType::F8E8M0 => {
                Some(Fp4Groups { codes: data.bytes(), scales: scale.bytes(), k: self.cols })
            }
            _ => None,
        }
    }

    fn fp8_block_scales(&self, b: usize, out: &mut Vec<f32>) {
        if let WeightData::Fp8 { scale, block_cols, .. } = &self.data {
            let per_row = self.cols.div_ceil(*block_cols);
            decode_scales(scale, b * per_row, per_row, out);
        }
    }
}

/// Scales `first..first+count` of a scale tensor (E8M0 or F32) as f32 values, into `out`.
fn decode_scales(scale: &HostTensor, first: usize, count: usize, out: &mut Vec<f32>) {
    let bytes = scale.bytes();
    out.clear();
    match scale.dtype {
        DType::F32 => out.extend(
            bytes[4 * first..4 * (first + count)].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        _ => {
            out.resize(count, 0.0);
            crate::kernels::e8m0::e8m0_to_f32s(Isa::active(), &bytes[first..first + count], out);
        }
    }
}
