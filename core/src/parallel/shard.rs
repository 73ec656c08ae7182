//! Cutting one rank's part out of a stored weight (rows for column-parallel layers, columns for
//! row-parallel ones), keeping the stored form where the cut falls on the form's block or group
//! boundaries, so a rank holds FP8/FP4 as compactly as one device would.
//!
//! A cut through the middle of an FP8 128×128 block or an FP4 32-wide group has no stored form
//! (the part's blocks would not start at its origin); that part is dequantised exactly to F32
//! instead ([`crate::quant::dequantize`]: every code times its scale). This happens only on
//! small test models; V4's head and group sizes (512, 1024) are multiples of 128.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::quant::dequantize;
use crate::tensor::{DType, HostTensor, Storage, StoredWeight, WeightFormat};

/// Rows `range` of the `[N, K]` (or `[N]`) weight `w`.
pub fn rows(w: &StoredWeight, range: Range<usize>) -> Result<StoredWeight> {
    let n = w.shape[0];
    check(w, &range, n, "rows")?;
    if range == (0..n) {
        return Ok(w.clone());
    }
    let name = format!("{}[rows {}..{}]", w.name, range.start, range.end);
    let (start, len) = (range.start, range.len());
    let scale_rows = match w.format {
        WeightFormat::Float => None,
        WeightFormat::Fp4Group { .. } => Some((start, len)),
        WeightFormat::Fp8Block { rows: block, .. } => {
            if !aligned(&range, block, n) {
                return dequantised(w, &name, range, 0..w.shape[1]);
            }
            Some((start / block, range.end.div_ceil(block) - start / block))
        }
    };
    let mut shape = w.shape.clone();
    shape[0] = len;
    Ok(StoredWeight {
        name: name.clone(),
        shape,
        format: w.format,
        data: w.data.rows_outer(start, len, name.clone())?,
        scale: match (&w.scale, scale_rows) {
            (Some(s), Some((s0, sl))) => Some(s.rows_outer(s0, sl, format!("{name}.scale"))?),
            _ => None,
        },
    })
}

/// Columns `range` of the `[N, K]` weight `w` (a copy: columns are strided).
pub fn cols(w: &StoredWeight, range: Range<usize>) -> Result<StoredWeight> {
    if w.shape.len() != 2 {
        return Err(tensor_err(w, format!("cannot cut columns of a weight of shape {:?}", w.shape)));
    }
    let (n, k) = (w.shape[0], w.shape[1]);
    check(w, &range, k, "columns")?;
    if range == (0..k) {
        return Ok(w.clone());
    }
    let name = format!("{}[cols {}..{}]", w.name, range.start, range.end);
    let (data, scale) = match w.format {
        WeightFormat::Float => (copy_cols(&w.data, &name, range.clone())?, None),
        WeightFormat::Fp8Block { cols: block, .. } => {
            if !aligned(&range, block, k) {
                return dequantised(w, &name, 0..n, range);
            }
            let s = w.scale.as_ref().ok_or_else(|| tensor_err(w, "an FP8 weight without its scale".into()))?;
            let scale_cols = range.start / block..range.end.div_ceil(block);
            (copy_cols(&w.data, &name, range.clone())?, Some(copy_cols(s, &format!("{name}.scale"), scale_cols)?))
        }
        WeightFormat::Fp4Group { group } => {
            if !aligned(&range, group, k) || !range.start.is_multiple_of(2) || !range.end.is_multiple_of(2) {
                return dequantised(w, &name, 0..n, range);
            }
            let s = w.scale.as_ref().ok_or_else(|| tensor_err(w, "an FP4 weight without its scale".into()))?;
            let scale_cols = range.start / group..range.end.div_ceil(group);
            // Two codes per byte: the packed columns are half the logical ones.
            (
                copy_cols(&w.data, &name, range.start / 2..range.end / 2)?,
                Some(copy_cols(s, &format!("{name}.scale"), scale_cols)?),
            )
        }
    };
    Ok(StoredWeight { name, shape: vec![n, range.len()], format: w.format, data, scale })
}

/// Whether `range` of a dimension of size `n` starts on a block boundary and ends on one or at
/// the end of the dimension.
fn aligned(range: &Range<usize>, block: usize, n: usize) -> bool {
    range.start.is_multiple_of(block) && (range.end.is_multiple_of(block) || range.end == n)
}

fn check(w: &StoredWeight, range: &Range<usize>, n: usize, what: &str) -> Result<()> {
    if range.is_empty() || range.end > n {
        return Err(tensor_err(w, format!("cannot cut {what} {}..{} out of {n}", range.start, range.end)));
    }
    Ok(())
}

fn tensor_err(w: &StoredWeight, msg: String) -> Error {
    Error::Tensor { name: w.name.clone(), file: w.data.source.clone(), msg }
}

/// Columns `cols` of every row of the row-major 2-D tensor `t`, as an owned tensor.
fn copy_cols(t: &HostTensor, name: &str, cols: Range<usize>) -> Result<HostTensor> {
    let (n, k) = (t.shape[0], t.shape[1]);
    let es = t.dtype.size_bytes();
    let src = t.bytes();
    let mut out = Vec::with_capacity(n * cols.len() * es);
    for r in 0..n {
        out.extend_from_slice(&src[(r * k + cols.start) * es..(r * k + cols.end) * es]);
    }
    let len = out.len();
    HostTensor::new(name, t.source.clone(), t.dtype, vec![n, cols.len()], Storage::Owned(Arc::new(out)), 0, len)
}

/// The exact f32 values of the block `rows × cols` of `w`, as a float weight.
fn dequantised(w: &StoredWeight, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<StoredWeight> {
    let k = w.shape[1];
    let all = dequantize(w)?;
    let mut bytes = Vec::with_capacity(rows.len() * cols.len() * 4);
    for r in rows.clone() {
        for v in &all[r * k + cols.start..r * k + cols.end] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let len = bytes.len();
    let shape = vec![rows.len(), cols.len()];
    let data =
        HostTensor::new(name, w.data.source.clone(), DType::F32, shape, Storage::Owned(Arc::new(bytes)), 0, len)?;
    StoredWeight::float(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_fp4_group, quantize_fp8_block, scale_name};

    fn f32_weight(n: usize, k: usize) -> (StoredWeight, Vec<f32>) {
        let v: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect();
        (StoredWeight::float(HostTensor::from_f32("w", vec![n, k], &v).unwrap()).unwrap(), v)
    }

    fn quantised(n: usize, k: usize, fp4: bool) -> StoredWeight {
        let (w, v) = f32_weight(n, k);
        let (codes, scales, dtype, data_shape, scale_shape) = if fp4 {
            let (c, s) = quantize_fp4_group(&v, n, k);
            (c, s, DType::I8, vec![n, k / 2], vec![n, k.div_ceil(32)])
        } else {
            let (c, s) = quantize_fp8_block(&v, n, k);
            (c, s, DType::F8E4M3, vec![n, k], vec![n.div_ceil(128), k.div_ceil(128)])
        };
        let data = HostTensor::from_bytes("w", dtype, data_shape, codes).unwrap();
        let scale =
            HostTensor::from_bytes(scale_name("w.weight").unwrap(), DType::F8E8M0, scale_shape, scales).unwrap();
        let _ = w;
        StoredWeight::detect(&data, Some(&scale), &[n, k]).unwrap()
    }

    /// The cut's values equal the same rows/columns of the whole weight's values, whatever form
    /// the cut keeps.
    fn assert_cut(w: &StoredWeight, r: Range<usize>, c: Range<usize>, cut: &StoredWeight, keeps_form: bool) {
        let k = w.shape[1];
        let all = dequantize(w).unwrap();
        let want: Vec<f32> = r.clone().flat_map(|i| all[i * k + c.start..i * k + c.end].to_vec()).collect();
        assert_eq!(cut.shape, vec![r.len(), c.len()]);
        assert_eq!(dequantize(cut).unwrap(), want, "{} rows {r:?} cols {c:?}", w.name);
        assert_eq!(cut.format == w.format, keeps_form, "{:?} → {:?}", w.format, cut.format);
    }

    #[test]
    fn float_cuts_are_exact() {
        let (w, _) = f32_weight(6, 10);
        assert_cut(&w, 2..5, 0..10, &rows(&w, 2..5).unwrap(), true);
        assert_cut(&w, 0..6, 3..7, &cols(&w, 3..7).unwrap(), true);
        assert!(rows(&w, 4..7).is_err());
        assert!(cols(&w, 5..5).is_err());
    }

    #[test]
    fn fp8_cuts_keep_the_form_on_block_boundaries_and_dequantise_elsewhere() {
        let w = quantised(300, 260, false);
        assert_cut(&w, 128..300, 0..260, &rows(&w, 128..300).unwrap(), true);
        assert_cut(&w, 0..128, 0..260, &rows(&w, 0..128).unwrap(), true);
        assert_cut(&w, 0..300, 128..256, &cols(&w, 128..256).unwrap(), true);
        assert_cut(&w, 0..300, 256..260, &cols(&w, 256..260).unwrap(), true);
        assert_cut(&w, 100..200, 0..260, &rows(&w, 100..200).unwrap(), false);
        assert_cut(&w, 0..300, 64..200, &cols(&w, 64..200).unwrap(), false);
    }

    #[test]
    fn fp4_cuts_keep_the_form_on_group_boundaries_and_dequantise_elsewhere() {
        let w = quantised(5, 96, true);
        assert_cut(&w, 1..4, 0..96, &rows(&w, 1..4).unwrap(), true);
        assert_cut(&w, 0..5, 32..96, &cols(&w, 32..96).unwrap(), true);
        assert_cut(&w, 0..5, 16..48, &cols(&w, 16..48).unwrap(), false);
    }
}
