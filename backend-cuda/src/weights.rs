//! Weights and the products that read them: `upload_weight`, `linear`, `grouped_linear`,
//! `embedding`, and the activation `matmul` (kernels in `kernels/weights.cu`, GEMMs through
//! [`Device::gemm`]).
//!
//! What a stored weight becomes on the device, and its bytes per parameter:
//!
//! | stored | kept as | bytes / parameter |
//! |---|---|---|
//! | F32 | F32 | 4 |
//! | BF16 | BF16 ([`GemmType::Bf16`]) | 2 |
//! | F16, F64 | F32 (converted on the host; F16 exactly) | 4 |
//! | FP8 blocks, FP4 groups | dequantised on the host (`dsv4_core::quant::dequantize`): BF16 when every value is exact in BF16 (E8M0 scales: always, short of the BF16 range's ends), else F32 | 2 (else 4) |
//!
//! as `backend-ascend`'s `upload_weight` does for what it does not keep packed. FP8 and FP4
//! weights thus take 2 bytes per parameter instead of 1 or ½: kernels that read the packed forms
//! are later work.
//!
//! Products, all with f32 accumulation:
//! * up to [`GEMV_MAX_ROWS`] rows of x (decoding): a GEMV kernel (`dsv4_gemv_f32` /
//!   `dsv4_gemv_bf16`) reads the weight in its stored type, one warp per output column;
//!   `grouped_linear` takes it too, each column reading its group's slice of x;
//! * more rows: cuBLAS through [`Device::gemm`] on f32 operands. A BF16 weight is first widened
//!   into an f32 temporary (`dsv4_widen_bf16`): cuBLAS has no f32 × bf16 GEMM, and rounding x to
//!   BF16 instead would change the numbers. The widening reads 2 and writes 4 bytes per
//!   parameter, small next to a GEMM of more than 8 rows. `grouped_linear` runs one batched GEMM
//!   over the groups, x and the result moved between `[M, G, ..]` and `[G, M, ..]` by
//!   `dsv4_swap01_f32` (cuBLAS's batches need dense matrices).

use std::borrow::Cow;

use dsv4_core::backend_checks::{self as checks, MatmulDims};
use dsv4_core::error::{Error, Result};
use dsv4_core::tensor::{DType, StoredWeight, WeightFormat};

use crate::backend::CudaBackend;
use crate::device::{Device, Gemm, GemmType, KernelArg, LaunchConfig};
use crate::memory::elementwise_launch;
use crate::tensor::{CudaIndex, CudaTensor, CudaWeight};

/// Rows of x up to which `linear` and `grouped_linear` take the GEMV kernel
/// (`DSV4_GEMV_MAX_M`).
pub(crate) const GEMV_MAX_ROWS: usize = 8;
/// Threads per block of the GEMV kernels: one warp per output column.
const GEMV_THREADS: u32 = 256;
/// Most blocks of a GEMV launch (the kernel walks the columns grid-stride).
const GEMV_MAX_BLOCKS: usize = 65_535;

/// Whether every value is exactly a BF16 value (NaN counts as one: it stays a NaN).
fn exact_in_bf16(v: &[f32]) -> bool {
    v.iter().all(|x| f32::from_bits(x.to_bits() & 0xFFFF_0000) == *x || x.is_nan())
}

/// The BF16 bits of a value that is exact in BF16 (a NaN stays a quiet NaN).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else {
        (b >> 16) as u16
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The launch of a GEMV over `n` output columns (8 warps per block, one column each).
pub(crate) fn gemv_launch(n: usize) -> LaunchConfig {
    let warps = (GEMV_THREADS / 32) as usize;
    LaunchConfig::linear(u32::try_from(n.div_ceil(warps).clamp(1, GEMV_MAX_BLOCKS)).unwrap_or(u32::MAX), GEMV_THREADS)
}

/// `linear`'s GEMM: x `[m, k]` from f32 element `x_offset` of its buffer, times W `[n, k]`
/// transposed, into a fresh `[m, n]`.
pub(crate) fn linear_gemm(m: usize, n: usize, k: usize, x_offset: usize) -> Gemm {
    Gemm {
        batch: 1,
        m,
        n,
        k,
        transpose_b: true,
        a_type: GemmType::F32,
        b_type: GemmType::F32,
        a_offset: x_offset,
        b_offset: 0,
        c_offset: 0,
        stride_a: m * k,
        stride_b: n * k,
        stride_c: m * n,
    }
}

/// `grouped_linear`'s batched GEMM, one batch per group g: x `[g, m, k]` (x with its first two
/// axes swapped) times group g's rows `[r, k]` of W `[g·r, k]` transposed, into `[g, m, r]`.
pub(crate) fn grouped_gemm(groups: usize, m: usize, k: usize, r: usize) -> Gemm {
    Gemm {
        batch: groups,
        m,
        n: r,
        k,
        transpose_b: true,
        a_type: GemmType::F32,
        b_type: GemmType::F32,
        a_offset: 0,
        b_offset: 0,
        c_offset: 0,
        stride_a: m * k,
        stride_b: r * k,
        stride_c: m * r,
    }
}

/// `matmul`'s batched GEMM: a `[batch, m, k]` from element `a_offset`, b `[batch, k, n]` (or
/// `[batch, n, k]` with `transpose_b`) from `b_offset`, a 2-D b shared by every batch element
/// (stride 0), into a fresh `[batch, m, n]`.
pub(crate) fn matmul_gemm(d: &MatmulDims, transpose_b: bool, a_offset: usize, b_offset: usize) -> Gemm {
    Gemm {
        batch: d.batch,
        m: d.m,
        n: d.n,
        k: d.k,
        transpose_b,
        a_type: GemmType::F32,
        b_type: GemmType::F32,
        a_offset,
        b_offset,
        c_offset: 0,
        stride_a: d.m * d.k,
        stride_b: if d.shared_b { 0 } else { d.k * d.n },
        stride_c: d.m * d.n,
    }
}

impl<D: Device> CudaBackend<D> {
    /// See the module docs for what each stored form becomes.
    pub(crate) fn upload_stored(&self, w: &StoredWeight) -> Result<CudaWeight<D>> {
        let (dtype, bytes): (GemmType, Cow<'_, [u8]>) = match (w.format, w.data.dtype) {
            (WeightFormat::Float, DType::F32) => (GemmType::F32, Cow::Borrowed(w.data.bytes())),
            (WeightFormat::Float, DType::BF16) => (GemmType::Bf16, Cow::Borrowed(w.data.bytes())),
            (WeightFormat::Float, DType::F16 | DType::F64) => {
                (GemmType::F32, Cow::Owned(f32_bytes(&w.data.to_f32_vec()?)))
            }
            (WeightFormat::Float, other) => {
                return Err(Error::Tensor {
                    name: w.name.clone(),
                    file: w.data.source.clone(),
                    msg: format!("the CUDA backend cannot use {other} weights"),
                })
            }
            _ => {
                let v = dsv4_core::quant::dequantize(w)?;
                if exact_in_bf16(&v) {
                    (GemmType::Bf16, Cow::Owned(v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect()))
                } else {
                    (GemmType::F32, Cow::Owned(f32_bytes(&v)))
                }
            }
        };
        let numel = checks::numel(Self::NAME, "upload_weight", &w.shape)?;
        if numel.checked_mul(dtype.bytes()) != Some(bytes.len()) {
            return Err(Error::backend(
                Self::NAME,
                format!("upload_weight {}: {} bytes of {dtype:?} for shape {:?}", w.name, bytes.len(), w.shape),
            ));
        }
        let buf = if bytes.is_empty() { self.dev.alloc_zeroed(0)? } else { self.dev.upload(&bytes)? };
        Ok(CudaWeight { buf, shape: w.shape.clone(), dtype })
    }

    /// The weight as f32 for a GEMM: a widened temporary for BF16, None for F32 (use it as is).
    fn widened(&self, w: &CudaWeight<D>) -> Result<Option<D::Buffer>> {
        match w.dtype {
            GemmType::F32 => Ok(None),
            GemmType::Bf16 => {
                let n = checks::numel(Self::NAME, "linear", &w.shape)?;
                let out = self.dev.alloc_zeroed(n * 4)?;
                if n > 0 {
                    self.dev.launch(
                        "dsv4_widen_bf16",
                        elementwise_launch(n),
                        &[KernelArg::Out(&out, 0), KernelArg::In(&w.buf, 0), KernelArg::count(n)],
                    )?;
                }
                Ok(Some(out))
            }
        }
    }

    /// `out[i, j] = Σ_c x[i, (j / r)·…, c] · w[j, c]` by the GEMV kernel: `m` rows of x, each of
    /// `groups` slices of `k`, against `groups · r` weight rows.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        x: &CudaTensor<D>,
        w: &CudaWeight<D>,
        out: &CudaTensor<D>,
        m: usize,
        groups: usize,
        r: usize,
        k: usize,
    ) -> Result<()> {
        let kernel = match w.dtype {
            GemmType::F32 => "dsv4_gemv_f32",
            GemmType::Bf16 => "dsv4_gemv_bf16",
        };
        let n = groups * r;
        self.dev.launch(
            kernel,
            gemv_launch(n),
            &[
                KernelArg::Out(&out.buf, 0),
                KernelArg::In(&x.buf, x.offset),
                KernelArg::In(&w.buf, 0),
                KernelArg::count(m),
                KernelArg::count(n),
                KernelArg::count(k),
                KernelArg::count(r),
                KernelArg::count(groups * k),
                KernelArg::count(k),
            ],
        )
    }

    /// `[a, b, c]` → `[b, a, c]` into a fresh buffer; `src` from byte `offset`.
    fn swap01(&self, src: &D::Buffer, offset: usize, a: usize, b: usize, c: usize) -> Result<D::Buffer> {
        let out = self.dev.alloc_zeroed(a * b * c * 4)?;
        self.dev.launch(
            "dsv4_swap01_f32",
            elementwise_launch(a * b * c),
            &[
                KernelArg::Out(&out, 0),
                KernelArg::In(src, offset),
                KernelArg::count(a),
                KernelArg::count(b),
                KernelArg::count(c),
            ],
        )?;
        Ok(out)
    }

    pub(crate) fn linear_op(&self, x: &CudaTensor<D>, w: &CudaWeight<D>) -> Result<CudaTensor<D>> {
        let shape = checks::linear(Self::NAME, &x.shape, &w.shape)?;
        let (n, k) = checks::weight_matrix(&w.shape);
        let total: usize = shape.iter().product();
        if total == 0 || k == 0 {
            return self.fill(&shape, 0.0); // nothing to sum
        }
        let out = self.new_tensor(&shape)?;
        let m = total / n;
        if m <= GEMV_MAX_ROWS {
            self.gemv(x, w, &out, m, 1, n, k)?;
            return Ok(out);
        }
        let wide = self.widened(w)?;
        self.dev.gemm(&linear_gemm(m, n, k, x.offset / 4), &x.buf, wide.as_ref().unwrap_or(&w.buf), &out.buf)?;
        Ok(out)
    }

    pub(crate) fn grouped_linear_op(
        &self,
        x: &CudaTensor<D>,
        w: &CudaWeight<D>,
        groups: usize,
    ) -> Result<CudaTensor<D>> {
        let shape = checks::grouped_linear(Self::NAME, &x.shape, &w.shape, groups)?;
        let (m, k, r) = (shape[0], x.shape[2], shape[2]);
        if m * r == 0 || k == 0 {
            return self.fill(&shape, 0.0); // nothing to sum
        }
        let out = self.new_tensor(&shape)?;
        if m <= GEMV_MAX_ROWS {
            self.gemv(x, w, &out, m, groups, r, k)?;
            return Ok(out);
        }
        let wide = self.widened(w)?;
        let wbuf = wide.as_ref().unwrap_or(&w.buf);
        if groups == 1 {
            // [M, 1, K] is [1, M, K] already.
            self.dev.gemm(&linear_gemm(m, r, k, x.offset / 4), &x.buf, wbuf, &out.buf)?;
            return Ok(out);
        }
        let xt = self.swap01(&x.buf, x.offset, m, groups, k)?;
        let yt = self.dev.alloc_zeroed(groups * m * r * 4)?;
        self.dev.gemm(&grouped_gemm(groups, m, k, r), &xt, wbuf, &yt)?;
        let y = self.swap01(&yt, 0, groups, m, r)?;
        Ok(CudaTensor { buf: std::sync::Arc::new(y), offset: 0, shape })
    }

    /// Rows of the table, BF16 tables widened per value (exact).
    pub(crate) fn embedding_op(&self, table: &CudaWeight<D>, ids: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        let shape = checks::embedding(Self::NAME, &table.shape, &ids.shape, ids.bounds())?;
        let (v, d) = checks::weight_matrix(&table.shape);
        let out = self.new_tensor(&shape)?;
        let n: usize = ids.shape.iter().product();
        if n * d == 0 {
            return Ok(out);
        }
        let kernel = match table.dtype {
            GemmType::F32 => "dsv4_embedding_f32",
            GemmType::Bf16 => "dsv4_embedding_bf16",
        };
        self.dev.launch(
            kernel,
            elementwise_launch(n * d),
            &[
                KernelArg::Out(&out.buf, 0),
                KernelArg::In(&table.buf, 0),
                KernelArg::In(&ids.buf, ids.offset),
                KernelArg::count(n),
                KernelArg::count(d),
                KernelArg::count(v),
            ],
        )?;
        Ok(out)
    }

    pub(crate) fn matmul_op(&self, a: &CudaTensor<D>, b: &CudaTensor<D>, transpose_b: bool) -> Result<CudaTensor<D>> {
        let dims = checks::matmul(Self::NAME, &a.shape, &b.shape, transpose_b)?;
        if dims.batch * dims.m * dims.n == 0 || dims.k == 0 {
            return self.fill(&dims.out, 0.0); // nothing to sum
        }
        let out = self.new_tensor(&dims.out)?;
        self.dev.gemm(&matmul_gemm(&dims, transpose_b, a.offset / 4, b.offset / 4), &a.buf, &b.buf, &out.buf)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_exactness_and_bits() {
        assert!(exact_in_bf16(&[0.0, -0.0, 1.0, -2.5, f32::INFINITY, f32::NAN, 448.0 * 2f32.powi(-20)]));
        assert!(!exact_in_bf16(&[1.0 + f32::EPSILON]));
        assert_eq!(bf16_bits(-2.5), 0xC020);
        assert_eq!(bf16_bits(f32::from_bits(0x7F80_0001)) & 0x7FC0, 0x7FC0, "NaN stays a NaN");
    }

    #[test]
    fn gemv_launch_has_one_warp_per_column() {
        assert_eq!(gemv_launch(130), LaunchConfig::linear(17, 256));
        assert_eq!(gemv_launch(1), LaunchConfig::linear(1, 256));
        assert_eq!(gemv_launch(0), LaunchConfig::linear(1, 256));
        assert_eq!(gemv_launch(1 << 30), LaunchConfig::linear(65_535, 256));
    }

    #[test]
    fn linear_is_one_gemm_against_the_transposed_weight() {
        let g = linear_gemm(9, 3, 200, 12);
        assert_eq!((g.batch, g.m, g.n, g.k, g.transpose_b), (1, 9, 3, 200, true));
        assert_eq!((g.a_offset, g.b_offset, g.c_offset), (12, 0, 0));
        assert_eq!((g.a_type, g.b_type), (GemmType::F32, GemmType::F32));
    }

    #[test]
    fn grouped_linear_batches_over_groups() {
        // x [70, 2, 64] swapped to [2, 70, 64]; W [2·320, 64]; result [2, 70, 320].
        let g = grouped_gemm(2, 70, 64, 320);
        assert_eq!((g.batch, g.m, g.n, g.k, g.transpose_b), (2, 70, 320, 64, true));
        assert_eq!((g.stride_a, g.stride_b, g.stride_c), (70 * 64, 320 * 64, 70 * 320));
    }

    #[test]
    fn matmul_strides_share_a_2d_b() {
        let d = checks::matmul("t", &[2, 3, 4, 5], &[2, 3, 5, 6], false).unwrap();
        let g = matmul_gemm(&d, false, 0, 10);
        assert_eq!((g.batch, g.m, g.n, g.k, g.transpose_b), (6, 4, 6, 5, false));
        assert_eq!((g.stride_a, g.stride_b, g.stride_c, g.b_offset), (20, 30, 24, 10));
        let d = checks::matmul("t", &[2, 4, 5], &[6, 5], true).unwrap();
        let g = matmul_gemm(&d, true, 3, 0);
        assert_eq!((g.batch, g.m, g.n, g.k, g.transpose_b), (2, 4, 6, 5, true));
        assert_eq!((g.stride_a, g.stride_b, g.stride_c, g.a_offset), (20, 0, 24, 3));
    }
}
