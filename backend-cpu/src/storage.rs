//! Tensor, index and weight storage of the CPU backend.

use std::sync::Arc;

use dsv4_core::backend::DeviceTensor;
use dsv4_core::error::{Error, Result};
use dsv4_core::tensor::{DType, StoredWeight, WeightFormat};
use half::{bf16, f16};
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

/// Element storage of a weight: the checkpoint's own type, never a widened copy.
#[derive(Debug)]
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A weight viewed as a matrix `[rows, cols]` (its outer dimension by everything else).
#[derive(Debug)]
pub struct CpuWeight {
    pub(crate) shape: Vec<usize>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: WeightData,
}

impl CpuWeight {
    pub(crate) fn from_stored(w: &StoredWeight) -> Result<Self> {
        if w.format != WeightFormat::Float {
            return Err(Error::Tensor {
                name: w.name.clone(),
                file: w.data.source.clone(),
                msg: format!("the CPU backend cannot use {:?} weights yet", w.format),
            });
        }
        let t = &w.data;
        let b = t.bytes();
        let data = match t.dtype {
            DType::F32 => {
                WeightData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            DType::BF16 => WeightData::Bf16(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
            DType::F16 => WeightData::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            other => {
                return Err(Error::Tensor {
                    name: t.name.clone(),
                    file: t.source.clone(),
                    msg: format!("the CPU backend cannot use {other} weights yet"),
                })
            }
        };
        let rows = *t.shape.first().unwrap_or(&1);
        let cols = t.shape.iter().skip(1).product();
        Ok(CpuWeight { shape: t.shape.clone(), rows, cols, data })
    }

    /// Widens rows `start..start+n` into `out` (length n·cols), exactly.
    pub(crate) fn rows_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        let (a, b) = (start * self.cols, (start + n) * self.cols);
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[a..b]),
            WeightData::Bf16(v) => out.iter_mut().zip(&v[a..b]).for_each(|(o, x)| *o = x.to_f32()),
            WeightData::F16(v) => out.iter_mut().zip(&v[a..b]).for_each(|(o, x)| *o = x.to_f32()),
        }
    }

    /// Borrowed f32 rows when the weight is stored in f32 (no widening needed).
    pub(crate) fn f32_rows(&self, start: usize, n: usize) -> Option<&[f32]> {
        match &self.data {
            WeightData::F32(v) => Some(&v[start * self.cols..(start + n) * self.cols]),
            _ => None,
        }
    }
}
