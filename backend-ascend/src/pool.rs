//! Pools of the paged decoding state (`dsv4_core::kv`) in device memory: one block per pool,
//! allocated and zeroed once, written in place row by row.
//!
//! * F32 rows are an ACL_FLOAT `[rows, width]` matrix, BF16 rows an ACL_BF16 one.
//! * `pool_write` scatters whole rows with `aclnnInplaceIndexCopy` along dim 0 (ops-nn
//!   `index/scatter_update/docs/aclnnIndexCopy&aclnnInplaceIndexCopy.md`: selfRef
//!   FLOAT/BFLOAT16/FLOAT16/INT*/…, index INT32/INT64 of at most one dimension with one entry
//!   per source row, source of selfRef's dtype and rank; supported on Atlas A2 and A3, and on
//!   the Ascend 950 in the current version of the page (an older copy marks the 950 ×); not on
//!   the Atlas inference (310P) or training (910A) series; see also
//!   `shared/spec/ascend-api.md` §2.2).
//!   That page does not support out-of-range indices and leaves the order of repeated ones
//!   unspecified, so the slots are checked on the host first: from the values an uploaded index
//!   keeps, or a download otherwise. BF16 pools get the f32 rows through `aclnnCast` into a
//!   pooled temporary first (round to nearest even, as `RowFormat::encode`).
//! * `pool_read` is `index_select` on the pool's block: aclnnIndexSelect in the stored type,
//!   then aclnnCast to FLOAT for BF16 (exact); `-1` slots give zero rows.
//! * fp8 rows (`--kv-dtype fp8`, [`RowFormat::Fp8`]: e4m3 codes, the rotary part in BF16, one
//!   E8M0 scale byte per 64 codes) are kept as their bytes, `[rows, row_bytes]` ACL_UINT8: 584
//!   bytes for a V4 row of 512 values, against 1024 in BF16. Only on the Ascend 950, whose
//!   aclnnCast reads FLOAT8_E4M3FN (`aclnnCast.md`'s 950 table; `shared/spec/ascend-api.md`
//!   §0.4), and only while the native low-bit forms' self-test at open has found that cast
//!   exact (`kernels::NATIVE_LOW_BIT_WEIGHTS`); elsewhere `alloc_pool` refuses them, naming
//!   the reason.
//!   - Writing encodes the rows on the host with [`RowFormat::encode`] (the definition the CPU
//!     backend uses: a block's power-of-two scale needs its amax's exponent, i.e. integer bit
//!     operators this backend does not use), then scatters the bytes with
//!     aclnnInplaceIndexCopy as above. The download drains the stream, as the `official`
//!     activation quantisation's round trips do.
//!   - Reading gathers the bytes with aclnnIndexSelect and decodes them on the device: the
//!     codes through aclnnCast (FLOAT8_E4M3FN → FLOAT, exact), the scale bytes as in the
//!     native weights (`e8m0_as_f32`), a broadcast aclnnMul, and the BF16 rotary part through
//!     aclnnInplaceCopy (exact). The result equals [`RowFormat::decode`] bit for bit.
//!   - The fused attention kernel pages BF16 pools only, so attention over fp8 rows is
//!     composed.

use dsv4_core::backend::{DevicePool, RowFormat};
use dsv4_core::backend_checks::{self as checks, IndexBounds};
use dsv4_core::error::Result;
use dsv4_core::kv::format::FP8_KV_BLOCK;
use dsv4_core::Backend;

use crate::acl::AclScalar;
use crate::acl::{self, err, esize, Buffer};
use crate::kernels::SocFamily;
use crate::{numel, AscendBackend, AscendIndex, AscendTensor, Dt, Mem};

/// One pool: `rows` rows of `width` values in one device block, stored as FLOAT, BFLOAT16, or
/// fp8 row bytes (UINT8).
pub struct AscendPool {
    buf: Buffer,
    rows: usize,
    /// Elements of `dtype` per stored row: `width`, or the fp8 format's `row_bytes(width)`.
    stored_width: usize,
    /// Rows the block holds: `rows`, and for BF16 pools up to the next multiple of 16 (128 from
    /// 128 rows on; [`KERNEL_ROWS`]), zero and never addressed, so that `aclnnSparseFlashMla`
    /// can page every BF16 kv pool (it takes blocks of a multiple of 16 rows; `attention.rs`).
    stored_rows: usize,
    width: usize,
    format: RowFormat,
    dtype: Dt,
}

impl DevicePool for AscendPool {
    fn rows(&self) -> usize {
        self.rows
    }

    fn width(&self) -> usize {
        self.width
    }

    fn format(&self) -> RowFormat {
        self.format
    }
}

/// BF16 pools hold a multiple of this many rows ([`AscendPool`]'s `stored_rows`), and of
/// [`KERNEL_BLOCK`] from that many rows on: the kernel then pages them in blocks of at least 128
/// rows, so its block table stays short (at most 127 zero rows: 127 KiB of 512-wide BF16 rows).
pub(crate) const KERNEL_ROWS: usize = 16;
pub(crate) const KERNEL_BLOCK: usize = 128;

/// The rows a BF16 pool of `rows` holds (None when that overflows).
fn kernel_rows(rows: usize) -> Option<usize> {
    rows.checked_next_multiple_of(if rows >= KERNEL_BLOCK { KERNEL_BLOCK } else { KERNEL_ROWS })
}

impl AscendPool {
    /// The rows the device block holds (a multiple of [`KERNEL_ROWS`] for BF16 pools): what the
    /// attention kernel may page; rows past [`DevicePool::rows`] are zero and never indexed.
    pub(crate) fn stored_rows(&self) -> usize {
        self.stored_rows
    }

    /// The element type the rows are stored in (`ACL_FLOAT`, `ACL_BF16`, or `ACL_UINT8` for fp8
    /// row bytes).
    pub fn dtype(&self) -> Dt {
        self.dtype
    }

    pub(crate) fn mem(&self) -> Mem<'_> {
        Mem { buf: &self.buf, offset: 0, dtype: self.dtype }
    }
}

/// Checks that no slot repeats (the ranges are checked by `backend_checks::pool_write`).
fn check_distinct(slots: &[i32]) -> Result<()> {
    let mut order: Vec<(i32, usize)> = slots.iter().copied().zip(0..).collect();
    order.sort_unstable();
    if let Some(w) = order.windows(2).find(|w| w[0].0 == w[1].0) {
        let (a, b) = (w[0].1.min(w[1].1), w[0].1.max(w[1].1));
        return Err(err(format!(
            "pool_write: slot {} is written twice (entries {a} and {b}); aclnnInplaceIndexCopy leaves the order \
             of repeated writes unspecified",
            w[0].0
        )));
    }
    Ok(())
}

impl AscendBackend {
    pub(crate) fn new_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<AscendPool> {
        checks::alloc_pool(self.name(), rows, width, format)?;
        let dtype = match format {
            RowFormat::F32 => Dt::ACL_FLOAT,
            RowFormat::Bf16 => Dt::ACL_BF16,
            RowFormat::Fp8 { .. } => match self.fp8_rows_unavailable() {
                None => Dt::ACL_UINT8,
                Some(why) => return Err(err(format!("{why}; use --kv-dtype bf16 (or f32)"))),
            },
        };
        let stored_width = format.row_bytes(width) / esize(dtype);
        if let Some(why) = self.unable_to_run_v4() {
            return Err(err(why));
        }
        let stored_rows = match format {
            RowFormat::Bf16 => kernel_rows(rows),
            _ => Some(rows),
        }
        .ok_or_else(|| err(format!("alloc_pool: {rows} rows do not fit in memory")))?;
        let bytes = stored_rows
            .checked_mul(stored_width)
            .and_then(|n| n.checked_mul(esize(dtype)))
            .ok_or_else(|| err(format!("alloc_pool: {rows} rows of {width} values do not fit in memory")))?;
        let buf = self
            .dev
            .alloc(bytes.max(1))
            .map_err(|e| err(format!("alloc_pool: {rows} rows of {width} {format:?} values ({bytes} bytes): {e}")))?;
        self.dev.zero(&buf)?;
        Ok(AscendPool { buf, rows, stored_width, stored_rows, width, format, dtype })
    }

    pub(crate) fn write_rows(&self, pool: &mut AscendPool, slots: &AscendIndex, values: &AscendTensor) -> Result<()> {
        let (n, width) = (numel(&slots.shape), pool.width);
        checks::pool_write(self.name(), pool.rows, width, &slots.shape, &values.shape, None)?;
        if n == 0 {
            return Ok(());
        }
        // The slots' values: kept from the upload, or downloaded (which drains the stream).
        let downloaded;
        let host = match &slots.host {
            Some(h) => &h[..],
            None => {
                downloaded = self.download_index(slots)?;
                &downloaded[..]
            }
        };
        checks::pool_write(self.name(), pool.rows, width, &slots.shape, &values.shape, IndexBounds::of(host))?;
        check_distinct(host)?;
        if width == 0 {
            return Ok(());
        }
        let dst = self.cview(pool.mem(), &[pool.rows, pool.stored_width])?;
        let index = self.cview(self.imem(slots), &[n])?;
        if let RowFormat::Fp8 { .. } = pool.format {
            let rb = pool.stored_width;
            let mut bytes = vec![0u8; n * rb];
            let host = self.download(values)?;
            for (row, out) in host.chunks_exact(width).zip(bytes.chunks_exact_mut(rb)) {
                pool.format.encode(row, out);
            }
            let tmp = self.alloc(n * rb, Dt::ACL_UINT8)?;
            self.dev.upload_bytes(&tmp, &bytes)?;
            let src = self.cview(Mem { buf: &tmp, offset: 0, dtype: Dt::ACL_UINT8 }, &[n, rb])?;
            return aclnn!(
                self,
                aclnnInplaceIndexCopy / aclnnInplaceIndexCopyGetWorkspaceSize(dst.ptr(), 0, index.ptr(), src.ptr())
            );
        }
        let rows = self.cview(self.tmem(values), &[n, width])?;
        if pool.dtype == Dt::ACL_FLOAT {
            return aclnn!(
                self,
                aclnnInplaceIndexCopy / aclnnInplaceIndexCopyGetWorkspaceSize(dst.ptr(), 0, index.ptr(), rows.ptr())
            );
        }
        // Round the rows to the pool's type first (a pooled temporary).
        let tmp = self.alloc(n * width, pool.dtype)?;
        let narrow = Mem { buf: &tmp, offset: 0, dtype: pool.dtype };
        let dt = pool.dtype;
        aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [rows] => [self.cview(narrow, &[n, width])?],
            attrs [dt.0], |i, o| (i[0].ptr(), dt, o[0].ptr()))?;
        let src = self.cview(narrow, &[n, width])?;
        aclnn!(
            self,
            aclnnInplaceIndexCopy / aclnnInplaceIndexCopyGetWorkspaceSize(dst.ptr(), 0, index.ptr(), src.ptr())
        )
    }

    /// Slots whose values are not known on the host are not range-checked here (that would
    /// drain the stream on every read); an out-of-range one faults aclnnIndexSelect, which
    /// surfaces at the next synchronisation.
    pub(crate) fn read_rows(&self, pool: &AscendPool, slots: &AscendIndex) -> Result<AscendTensor> {
        let shape = checks::pool_read(self.name(), pool.rows, pool.width, &slots.shape, slots.bounds())?;
        match pool.format {
            RowFormat::Fp8 { rope } => {
                let (rb, width) = (pool.stored_width, pool.width);
                self.select_rows_as(pool.mem(), pool.rows, rb, slots, &shape, width, |bytes, n, out| {
                    self.decode_fp8_rows(bytes, n, rb, width, rope.min(width), out)
                })
            }
            _ => self.select_rows(pool.mem(), pool.rows, pool.width, slots, &shape),
        }
    }

    /// Why this device cannot hold fp8 rows, or None when it can (see the module doc).
    pub(crate) fn fp8_rows_unavailable(&self) -> Option<String> {
        if SocFamily::of(self.soc()) != SocFamily::Ascend950 {
            return Some(format!(
                "fp8 KV rows need aclnnCast's FLOAT8_E4M3FN paths, which only the Ascend 950 has (this device: {})",
                self.soc()
            ));
        }
        let native = &self.kernels.native_weights;
        (!native.usable()).then(|| {
            format!(
                "fp8 KV rows are read through aclnnCast's FLOAT8_E4M3FN path, which the native low-bit forms' \
                 self-test checks, and those are switched off here: {}",
                native.why()
            )
        })
    }

    /// `n` gathered fp8 rows (`bytes`: `[n, rb]` UINT8 in [`RowFormat::Fp8`]'s layout) decoded
    /// into `out` (`[n, width]` f32, the last `rope` values from BF16): codes × 2^(scale − 127)
    /// per block of [`FP8_KV_BLOCK`], exactly as [`RowFormat::decode`].
    fn decode_fp8_rows(
        &self,
        bytes: Mem<'_>,
        n: usize,
        rb: usize,
        width: usize,
        rope: usize,
        out: &AscendTensor,
    ) -> Result<()> {
        let nope = width - rope;
        let u8s = |buf: &Buffer, dims: &[usize]| self.cview(Mem { buf, offset: 0, dtype: Dt::ACL_UINT8 }, dims);
        let out_cols = |cols: usize, at: usize| self.view(self.tmem(out), &[n, cols], &[width, 1], at);
        if nope > 0 {
            // The codes, padded with code 0 (zero) to whole blocks, so that the scales broadcast
            // over `[n, blocks, 64]`.
            let blocks = nope.div_ceil(FP8_KV_BLOCK);
            let padded = blocks * FP8_KV_BLOCK;
            let codes = self.alloc(n * padded, Dt::ACL_UINT8)?;
            if padded != nope {
                self.fill(&u8s(&codes, &[n, padded])?, &AclScalar::i32(self.api(), 0)?)?;
            }
            self.copy(
                &self.view(Mem { buf: &codes, offset: 0, dtype: Dt::ACL_UINT8 }, &[n, nope], &[padded, 1], 0)?,
                &self.view(bytes, &[n, nope], &[rb, 1], 0)?,
            )?;
            let values = self.new_tensor(&[n, blocks, FP8_KV_BLOCK])?;
            let fp8 = Mem { buf: &codes, offset: 0, dtype: Dt::ACL_FLOAT8_E4M3FN };
            self.cast_into(
                self.cview(fp8, &[n, padded])?,
                self.cview(self.tmem(&values), &[n, padded])?,
                Dt::ACL_FLOAT,
            )?;
            let scale_bytes = self.alloc(n * blocks, Dt::ACL_UINT8)?;
            self.copy(&u8s(&scale_bytes, &[n, blocks])?, &self.view(bytes, &[n, blocks], &[rb, 1], nope + 2 * rope)?)?;
            let scales = self.e8m0_as_f32(&scale_bytes, 0, n * blocks)?;
            let scales = self.cview(Mem { buf: &scales, offset: 0, dtype: Dt::ACL_FLOAT }, &[n, blocks, 1])?;
            let scaled = self.new_tensor(&[n, blocks, FP8_KV_BLOCK])?;
            let (vv, sv) = (self.tv(&values)?, self.tv(&scaled)?);
            aclnn!(self, aclnnMul / aclnnMulGetWorkspaceSize(vv.ptr(), scales.ptr(), sv.ptr()))?;
            self.copy(&out_cols(nope, 0)?, &self.view(self.tmem(&scaled), &[n, nope], &[padded, 1], 0)?)?;
        }
        if rope > 0 {
            // The rotary part's bytes, copied out to an aligned block, then widened.
            let bf16 = self.alloc(n * rope, Dt::ACL_BF16)?;
            self.copy(&u8s(&bf16, &[n, 2 * rope])?, &self.view(bytes, &[n, 2 * rope], &[rb, 1], nope)?)?;
            self.copy(
                &out_cols(rope, nope)?,
                &self.cview(Mem { buf: &bf16, offset: 0, dtype: Dt::ACL_BF16 }, &[n, rope])?,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_must_be_distinct() {
        assert!(check_distinct(&[3, 0, 2]).is_ok());
        let e = check_distinct(&[2, 0, 2]).unwrap_err().to_string();
        assert!(e.contains("slot 2 is written twice (entries 0 and 2)"), "{e}");
    }

    #[test]
    fn bf16_pools_round_up_to_kernel_blocks() {
        assert_eq!(kernel_rows(0), Some(0));
        assert_eq!(kernel_rows(40), Some(48));
        assert_eq!(kernel_rows(127), Some(128));
        assert_eq!(kernel_rows(129), Some(256));
        assert_eq!(kernel_rows(1024), Some(1024));
        assert_eq!(kernel_rows(usize::MAX), None);
    }
}
