//! Host-side tensors: a typed, shaped, zero-copy view into checkpoint bytes (a memory map or
//! an owned buffer). This is what the loader hands to a backend's `upload_weight`; the
//! backend decides whether to keep the stored form or convert it.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element types that appear in V4 checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    /// FP8 e4m3fn (used from the official-checkpoint issue on).
    F8E4M3,
    /// Power-of-two scale byte.
    F8E8M0,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E8M0 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E8M0 => DType::F8E8M0,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => return None,
        })
    }

    /// The dtype named by a safetensors header string (`"F8_E4M3"`, `"BF16"`, ...).
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E8M0" => DType::F8E8M0,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes shared by many tensor views.
#[derive(Clone)]
pub enum Storage {
    Mmap(Arc<memmap2::Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A shaped, typed view into checkpoint bytes. Cloning is cheap.
#[derive(Clone)]
pub struct HostTensor {
    /// Canonical (official) tensor name.
    pub name: String,
    /// Where the bytes came from, for error messages (a file name or "builtin").
    pub source: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Storage,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({} {} {:?} from {})", self.name, self.dtype, self.shape, self.source)
    }
}

impl HostTensor {
    /// A view of `len` bytes at `offset` in `storage`. Fails (never panics) if the range or
    /// the byte count does not fit.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        storage: Storage,
        offset: usize,
        len: usize,
    ) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            file: source.clone(),
            msg: format!("shape {shape:?} overflows"),
        })?;
        let want = numel.checked_mul(dtype.size_bytes());
        let end = offset.checked_add(len);
        if want != Some(len) || end.is_none_or(|e| e > storage.bytes().len()) {
            return Err(Error::Tensor {
                name,
                file: source,
                msg: format!(
                    "{dtype} {shape:?} needs {want:?} bytes but the data range is {offset}..{end:?} of {} bytes",
                    storage.bytes().len()
                ),
            });
        }
        Ok(HostTensor { name, source, dtype, shape, storage, offset, len })
    }

    /// An owned f32 tensor (used by the built-in model and by tests).
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Result<Self> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        HostTensor::new(name, "builtin", DType::F32, shape, Storage::Owned(Arc::new(bytes)), 0, len)
    }

    /// An owned tensor from raw little-endian bytes.
    pub fn from_bytes(name: impl Into<String>, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len();
        HostTensor::new(name, "builtin", dtype, shape, Storage::Owned(Arc::new(bytes)), 0, len)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> usize {
        self.len
    }

    pub(crate) fn err(&self, msg: impl Into<String>) -> Error {
        Error::Tensor { name: self.name.clone(), file: self.source.clone(), msg: msg.into() }
    }

    /// Index `i` along the outermost dimension, as a view with that dimension dropped.
    /// Used to read per-expert slices out of transformers' fused expert tensors.
    pub fn index_outer(&self, i: usize, name: impl Into<String>) -> Result<HostTensor> {
        self.rows_outer(i, 1, name).map(|mut t| {
            t.shape.remove(0);
            t
        })
    }

    /// Rows `start..start+count` of the outermost dimension, as a view.
    pub fn rows_outer(&self, start: usize, count: usize, name: impl Into<String>) -> Result<HostTensor> {
        let outer = *self.shape.first().ok_or_else(|| self.err("cannot slice a scalar"))?;
        if start + count > outer {
            return Err(self.err(format!("rows {start}..{} out of range for outer dim {outer}", start + count)));
        }
        let row_bytes = self.len / outer.max(1);
        let mut shape = self.shape.clone();
        shape[0] = count;
        HostTensor::new(
            name,
            self.source.clone(),
            self.dtype,
            shape,
            self.storage.clone(),
            self.offset + start * row_bytes,
            count * row_bytes,
        )
    }

    /// Exact conversion of a float tensor to f32 (BF16/F16 widen exactly; F64 rounds).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F64 => {
                b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunks_exact(8)")) as f32).collect()
            }
            other => return Err(self.err(format!("expected a floating-point tensor, found {other}"))),
        })
    }

    /// Integer tensor as i64 (I64, I32, U8, I8).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::I64 => {
                b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8)"))).collect()
            }
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            DType::U8 => b.iter().map(|&v| v as i64).collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            other => return Err(self.err(format!("expected an integer tensor, found {other}"))),
        })
    }

    /// Checks the shape against what the config implies.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<&Self> {
        if self.shape != expected {
            return Err(Error::Shape {
                name: self.name.clone(),
                file: self.source.clone(),
                expected: expected.to_vec(),
                actual: self.shape.clone(),
                note: String::new(),
            });
        }
        Ok(self)
    }
}

/// How a weight matrix is stored in the checkpoint (spec §D.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// F32 / BF16 / F16 elements, no scale.
    Float,
    /// FP8 e4m3 elements with one power-of-two (E8M0) or F32 scale per `rows × cols` block.
    Fp8Block { rows: usize, cols: usize },
    /// FP4 e2m1 codes packed two per byte along the input dimension (low nibble first), with
    /// one E8M0 scale per `group` inputs of a row.
    Fp4Group { group: usize },
}

/// A weight as the loader hands it to a backend: the logical matrix shape `[N, K]` (or the
/// table shape), the stored form and, for quantised formats, the scale tensor. Backends pick
/// their own representation from this (keep packed, convert, or dequantise).
#[derive(Debug, Clone)]
pub struct StoredWeight {
    pub name: String,
    /// Logical shape (for FP4, twice the stored inner dimension).
    pub shape: Vec<usize>,
    pub format: WeightFormat,
    pub data: HostTensor,
    pub scale: Option<HostTensor>,
}

impl StoredWeight {
    /// A plain floating-point weight.
    pub fn float(data: HostTensor) -> Result<Self> {
        if !data.dtype.is_float() {
            return Err(data.err(format!("expected a floating-point weight, found {}", data.dtype)));
        }
        Ok(StoredWeight {
            name: data.name.clone(),
            shape: data.shape.clone(),
            format: WeightFormat::Float,
            data,
            scale: None,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.data.size_bytes() + self.scale.as_ref().map_or(0, |s| s.size_bytes())
    }
}
