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
//! * The fp8 row format (`--kv-dtype fp8`) is refused: its e4m3 codes need FLOAT8_E4M3FN
//!   operators, which only the Ascend 950 has (`shared/spec/ascend-api.md` §0.4).

use dsv4_core::backend::{DevicePool, RowFormat};
use dsv4_core::backend_checks::{self as checks, IndexBounds};
use dsv4_core::error::Result;
use dsv4_core::Backend;

use crate::acl::{self, err, esize, Buffer};
use crate::{numel, AscendBackend, AscendIndex, AscendTensor, Dt, Mem};

/// One pool: `rows` rows of `width` values in one device block, stored as FLOAT or BFLOAT16.
pub struct AscendPool {
    buf: Buffer,
    rows: usize,
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

    /// The element type the rows are stored in (`ACL_FLOAT` or `ACL_BF16`).
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
            RowFormat::Fp8 { .. } => {
                return Err(err("the fp8 KV format is not implemented on the Ascend backend yet: its e4m3 rows need \
                     FLOAT8_E4M3FN operators, which only the Ascend 950 has; use --kv-dtype bf16 (or f32)"))
            }
        };
        if let Some(why) = self.unable_to_run_v4() {
            return Err(err(why));
        }
        let stored_rows = match format {
            RowFormat::Bf16 => kernel_rows(rows),
            _ => Some(rows),
        }
        .ok_or_else(|| err(format!("alloc_pool: {rows} rows do not fit in memory")))?;
        let bytes = stored_rows
            .checked_mul(width)
            .and_then(|n| n.checked_mul(esize(dtype)))
            .ok_or_else(|| err(format!("alloc_pool: {rows} rows of {width} values do not fit in memory")))?;
        let buf = self
            .dev
            .alloc(bytes.max(1))
            .map_err(|e| err(format!("alloc_pool: {rows} rows of {width} {format:?} values ({bytes} bytes): {e}")))?;
        self.dev.zero(&buf)?;
        Ok(AscendPool { buf, rows, stored_rows, width, format, dtype })
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
        let dst = self.cview(pool.mem(), &[pool.rows, width])?;
        let index = self.cview(self.imem(slots), &[n])?;
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
        self.select_rows(pool.mem(), pool.rows, pool.width, slots, &shape)
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
