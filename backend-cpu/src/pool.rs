//! Pools of the paged decoding state on the CPU: rows in host memory, written in place.
//!
//! An `f32` pool keeps its rows as `f32` values, so the fused kernels borrow a row with no copy
//! ([`CpuPool::f32_row`]); a `bf16` / `fp8` pool keeps the encoded bytes of
//! [`RowFormat::encode`] and decodes a row when it is read. Either way the memory is allocated
//! zeroed by the allocator (`calloc`, which maps fresh pages for large sizes): a multi-GB pool
//! commits no memory until its rows are written, and an allocation the system refuses is an
//! error rather than an abort.

use std::alloc::{alloc_zeroed, Layout};

use dsv4_core::backend::{DevicePool, RowFormat};
use dsv4_core::error::{Error, Result};

use crate::kernels::attn;
use crate::kernels::Isa;
use crate::par;
use crate::storage::{CpuIndex, CpuTensor};

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

/// Element types whose all-zero bit pattern is a valid value (`0u8`, `+0.0f32`).
trait ZeroBits: Copy {}
impl ZeroBits for u8 {}
impl ZeroBits for f32 {}

/// `n` zero values in memory straight from `alloc_zeroed` (never written here, so the pages of a
/// large allocation stay uncommitted until used); None if the size overflows or the allocator
/// refuses it.
fn try_zeroed_vec<T: ZeroBits>(n: usize) -> Option<Vec<T>> {
    let layout = Layout::array::<T>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size (checked above), as `alloc_zeroed` requires.
    let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was just allocated by the global allocator with `Layout::array::<T>(n)`,
    // which is exactly the layout a `Vec<T>` of capacity `n` deallocates with (alignment of T,
    // size `n * size_of::<T>()`); all `n` elements are initialised, because the memory is zeroed
    // and zero bits are a valid `T` (`ZeroBits`: u8 and f32 only); the Vec takes sole ownership.
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

#[derive(Debug)]
enum Storage {
    /// `RowFormat::F32`: `rows * width` values, row-major.
    F32(Vec<f32>),
    /// Any other format: `rows * row_bytes` encoded bytes.
    Bytes(Vec<u8>),
}

/// A pool of `rows` rows of `width` values stored as `format`, in host memory.
#[derive(Debug)]
pub struct CpuPool {
    rows: usize,
    width: usize,
    format: RowFormat,
    /// Bytes of one encoded row (`format.row_bytes(width)`).
    row_bytes: usize,
    storage: Storage,
}

impl DevicePool for CpuPool {
    fn rows(&self) -> usize {
        self.rows
    }

    fn width(&self) -> usize {
        self.width
    }

    fn format(&self) -> RowFormat {
        self.format
    }

    fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

impl CpuPool {
    /// A pool whose every row is zero (in every format, zero bytes decode to zeros). Errors when
    /// the size overflows or the memory cannot be allocated.
    pub fn new(rows: usize, width: usize, format: RowFormat) -> Result<Self> {
        // Any format takes at most 4 bytes per value plus a few bytes of scales and padding, so
        // below this bound `row_bytes` cannot overflow.
        if width > usize::MAX / 8 {
            return Err(err(format!("alloc_pool: rows of {width} values are too wide")));
        }
        let row_bytes = format.row_bytes(width);
        let too_big = || {
            err(format!(
                "alloc_pool: cannot allocate {rows} rows of {width} values as {format:?} ({rows} × {row_bytes} bytes)"
            ))
        };
        let bytes = rows.checked_mul(row_bytes).ok_or_else(too_big)?;
        let storage = match format {
            RowFormat::F32 => Storage::F32(try_zeroed_vec(rows * width).ok_or_else(too_big)?),
            _ => Storage::Bytes(try_zeroed_vec(bytes).ok_or_else(too_big)?),
        };
        Ok(CpuPool { rows, width, format, row_bytes, storage })
    }

    /// Row `r` of an `f32` pool, borrowed (no copy); None for other formats.
    ///
    /// Panics if `r` is not a row of the pool.
    #[inline]
    pub fn f32_row(&self, r: usize) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(&v[r * self.width..(r + 1) * self.width]),
            Storage::Bytes(_) => None,
        }
    }

    /// Decodes row `r` into `out` (`width` values), bit for bit as `RowFormat::decode`.
    ///
    /// Panics if `r` is not a row of the pool or `out` has the wrong length.
    #[inline]
    pub fn read_row(&self, r: usize, out: &mut [f32]) {
        self.decode_row(Isa::active(), r, out);
    }

    /// [`CpuPool::read_row`] with the kernels of `isa` (every instruction set gives the same bits).
    ///
    /// Panics if `r` is not a row of the pool, `out` has the wrong length or the CPU does not
    /// support `isa`.
    #[inline]
    pub fn decode_row(&self, isa: Isa, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.width, "read_row: output length");
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[r * self.width..(r + 1) * self.width]),
            Storage::Bytes(b) => {
                attn::decode_row(isa, self.format, &b[r * self.row_bytes..(r + 1) * self.row_bytes], out)
            }
        }
    }

    /// Rows `rows` decoded into `out` (`rows.len()` rows of `width` values) with the kernels of
    /// `isa`, bit for bit as [`CpuPool::read_row`].
    ///
    /// Panics if a row is not in the pool, `out` has the wrong length or the CPU does not
    /// support `isa`.
    pub fn decode_rows(&self, isa: Isa, rows: &[usize], out: &mut [f32]) {
        assert_eq!(out.len(), rows.len() * self.width, "decode_rows: output length");
        match &self.storage {
            Storage::F32(v) => {
                for (&r, o) in rows.iter().zip(out.chunks_exact_mut(self.width.max(1))) {
                    o.copy_from_slice(&v[r * self.width..(r + 1) * self.width]);
                }
            }
            Storage::Bytes(b) => attn::decode_rows(isa, self.format, b, self.row_bytes, rows, out),
        }
    }

    /// Row `r` as f32 values: borrowed from an `f32` pool, else decoded into `scratch`
    /// (`width` values) and returned from there.
    #[cfg(test)]
    pub(crate) fn row<'a>(&'a self, r: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match &self.storage {
            Storage::F32(v) => &v[r * self.width..(r + 1) * self.width],
            Storage::Bytes(_) => {
                self.read_row(r, scratch);
                scratch
            }
        }
    }

    /// An error naming the first entry of `ids` that is not a row of the pool (`-1` allowed when
    /// `allow_none`).
    pub(crate) fn check_rows(&self, op: &str, what: &str, ids: &[i32], allow_none: bool) -> Result<()> {
        let bad = ids.iter().find(|&&i| !((allow_none && i == -1) || (i >= 0 && (i as usize) < self.rows)));
        match bad {
            Some(b) => Err(err(format!("{op}: {what} {b} is outside the pool's {} rows", self.rows))),
            None => Ok(()),
        }
    }

    /// `Backend::pool_write`: row i of `values` `[n, width]` encoded into row `slots[i]`, in
    /// place. Everything is checked before any row is written, so a failed write changes nothing.
    pub(crate) fn write(&mut self, slots: &CpuIndex, values: &CpuTensor) -> Result<()> {
        let n = slots.data.len();
        if slots.shape.len() != 1 || values.shape != [n, self.width] {
            return Err(err(format!(
                "pool_write: values {:?} and slots {:?} for a pool of width {} (need values [n, {}] and slots [n])",
                values.shape, slots.shape, self.width, self.width
            )));
        }
        self.check_rows("pool_write", "slot", &slots.data, false)?;
        // Rows in ascending slot order: repeats are neighbours, and the rows can be split off
        // the storage as disjoint mutable slices.
        let mut order: Vec<(usize, usize)> = slots.data.iter().enumerate().map(|(i, &s)| (s as usize, i)).collect();
        order.sort_unstable();
        if let Some(w) = order.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(err(format!("pool_write: slot {} is written twice in one call", w[0].0)));
        }
        let (width, format) = (self.width, self.format);
        let src = |i: usize| &values.data[i * width..(i + 1) * width];
        let work = n * width;
        match &mut self.storage {
            Storage::F32(v) => {
                let rows = split_rows(v, width, &order);
                par::for_each_owned(rows, work, |(dst, i): (&mut [f32], usize)| dst.copy_from_slice(src(i)));
            }
            Storage::Bytes(b) => {
                let rows = split_rows(b, self.row_bytes, &order);
                par::for_each_owned(rows, work, |(dst, i): (&mut [u8], usize)| format.encode(src(i), dst));
            }
        }
        Ok(())
    }

    /// `Backend::pool_read`: decoded rows at `slots` (any shape) → `slots.shape ++ [width]`,
    /// zeros for `-1`.
    pub(crate) fn read(&self, slots: &CpuIndex) -> Result<CpuTensor> {
        self.check_rows("pool_read", "slot", &slots.data, true)?;
        let width = self.width;
        let isa = Isa::active();
        let out = par::filled(slots.data.len() * width, width, slots.data.len() * width, |i, o| {
            let s = slots.data[i];
            if s >= 0 {
                self.decode_row(isa, s as usize, o);
            }
        });
        let mut shape = slots.shape.clone();
        shape.push(width);
        Ok(CpuTensor::new(shape, out))
    }
}

/// Disjoint mutable rows (`row` elements each) of `data` at the slots of `order` (ascending,
/// distinct `(slot, source)` pairs), each paired with its source index.
fn split_rows<'a, T>(data: &'a mut [T], row: usize, order: &[(usize, usize)]) -> Vec<(&'a mut [T], usize)> {
    let mut out = Vec::with_capacity(order.len());
    let (mut rest, mut next) = (data, 0usize);
    for &(slot, i) in order {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((slot - next) * row);
        let (dst, tail) = tail.split_at_mut(row);
        out.push((dst, i));
        rest = tail;
        next = slot + 1;
    }
    out
}
