//! Emulated device memory and tensor descriptors.
//!
//! Device addresses are synthetic (never dereferenceable on the host, like real device
//! memory) and never reused, so a use after free is always recognised. Each allocation is
//! backed by a host buffer that starts filled with 0xFF bytes (NaN as f32/f16/bf16), so that
//! reading memory nothing wrote shows up in results.

use std::collections::BTreeMap;

use dsv4_ascend_sys::aclDataType;
use half::{bf16, f16};

/// First synthetic device address; far from where Linux maps host memory.
pub const DEVICE_BASE: u64 = 0x1000_0000_0000;
/// Allocation granularity of the synthetic address space (real aclrtMalloc: 32-byte aligned).
pub const DEVICE_ALIGN: u64 = 512;

pub struct DevAlloc {
    pub size: usize,
    /// None once freed (the address range stays reserved forever).
    pub data: Option<Vec<u8>>,
    pub device: i32,
    pub owner: std::thread::ThreadId,
    /// Queued (not yet executed) stream tasks that read / write this allocation.
    pub pending_reads: u32,
    pub pending_writes: u32,
}

#[derive(Default)]
pub struct Memory {
    pub allocs: BTreeMap<u64, DevAlloc>,
    pub next: u64,
    /// While a reused executor's kernel runs: the data addresses its tensors were given with
    /// aclSetInputTensorAddr / aclSetOutputTensorAddr, by tensor handle (the kernel closures
    /// hold the descriptors from planning).
    pub relocated: std::collections::HashMap<u64, u64>,
}

impl Memory {
    /// The allocation containing `addr` (live or freed) and its base.
    pub fn find(&self, addr: u64) -> Option<(u64, &DevAlloc)> {
        let (&base, a) = self.allocs.range(..=addr).next_back()?;
        (addr < base + a.size.max(1) as u64).then_some((base, a))
    }

    /// Checks that `[addr, addr + len)` lies inside one live allocation; returns its base.
    pub fn check_range(&self, addr: u64, len: usize, what: &str) -> Result<u64, String> {
        let Some((base, a)) = self.find(addr) else {
            return Err(format!("{what}: address {addr:#x} is not device memory returned by aclrtMalloc"));
        };
        if a.data.is_none() {
            return Err(format!(
                "{what}: address {addr:#x} belongs to an allocation ({base:#x}, {} bytes) that was already freed \
                 with aclrtFree (use after free)",
                a.size
            ));
        }
        let end = addr - base + len as u64;
        if end > a.size as u64 {
            return Err(format!(
                "{what}: {len} bytes at {addr:#x} run past the end of the allocation at {base:#x} ({} bytes) by {} bytes",
                a.size,
                end - a.size as u64
            ));
        }
        Ok(base)
    }

    pub fn bytes(&self, addr: u64, len: usize, what: &str) -> Result<&[u8], String> {
        let base = self.check_range(addr, len, what)?;
        let a = &self.allocs[&base];
        let off = (addr - base) as usize;
        Ok(&a.data.as_ref().expect("checked live")[off..off + len])
    }

    pub fn bytes_mut(&mut self, addr: u64, len: usize, what: &str) -> Result<&mut [u8], String> {
        let base = self.check_range(addr, len, what)?;
        let a = self.allocs.get_mut(&base).expect("found");
        let off = (addr - base) as usize;
        Ok(&mut a.data.as_mut().expect("checked live")[off..off + len])
    }
}

/// Size in bytes of one element, for the types the emulator implements.
pub fn elem_size(dt: aclDataType) -> Option<usize> {
    Some(match dt {
        aclDataType::ACL_FLOAT | aclDataType::ACL_INT32 | aclDataType::ACL_UINT32 => 4,
        aclDataType::ACL_FLOAT16 | aclDataType::ACL_BF16 | aclDataType::ACL_INT16 | aclDataType::ACL_UINT16 => 2,
        aclDataType::ACL_INT8 | aclDataType::ACL_UINT8 | aclDataType::ACL_BOOL => 1,
        aclDataType::ACL_INT64 | aclDataType::ACL_UINT64 | aclDataType::ACL_DOUBLE => 8,
        _ => return None,
    })
}

pub fn dtype_name(dt: aclDataType) -> String {
    match dt {
        aclDataType::ACL_FLOAT => "FLOAT".into(),
        aclDataType::ACL_FLOAT16 => "FLOAT16".into(),
        aclDataType::ACL_BF16 => "BFLOAT16".into(),
        aclDataType::ACL_DOUBLE => "DOUBLE".into(),
        aclDataType::ACL_INT8 => "INT8".into(),
        aclDataType::ACL_UINT8 => "UINT8".into(),
        aclDataType::ACL_INT16 => "INT16".into(),
        aclDataType::ACL_UINT16 => "UINT16".into(),
        aclDataType::ACL_INT32 => "INT32".into(),
        aclDataType::ACL_UINT32 => "UINT32".into(),
        aclDataType::ACL_INT64 => "INT64".into(),
        aclDataType::ACL_UINT64 => "UINT64".into(),
        aclDataType::ACL_BOOL => "BOOL".into(),
        other => format!("aclDataType({})", other.0),
    }
}

pub fn is_float(dt: aclDataType) -> bool {
    matches!(dt, aclDataType::ACL_FLOAT | aclDataType::ACL_FLOAT16 | aclDataType::ACL_BF16)
}

pub fn is_int(dt: aclDataType) -> bool {
    matches!(
        dt,
        aclDataType::ACL_INT8
            | aclDataType::ACL_UINT8
            | aclDataType::ACL_INT16
            | aclDataType::ACL_UINT16
            | aclDataType::ACL_INT32
            | aclDataType::ACL_UINT32
            | aclDataType::ACL_INT64
            | aclDataType::ACL_UINT64
    )
}

pub fn decode(dt: aclDataType, b: &[u8]) -> f64 {
    match dt {
        aclDataType::ACL_FLOAT => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        aclDataType::ACL_FLOAT16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        aclDataType::ACL_BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        aclDataType::ACL_DOUBLE => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        aclDataType::ACL_INT8 => b[0] as i8 as f64,
        aclDataType::ACL_UINT8 => b[0] as f64,
        aclDataType::ACL_BOOL => (b[0] != 0) as u8 as f64,
        aclDataType::ACL_INT16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        aclDataType::ACL_UINT16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        aclDataType::ACL_INT32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        aclDataType::ACL_UINT32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        aclDataType::ACL_INT64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
        aclDataType::ACL_UINT64 => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
        _ => f64::NAN,
    }
}

pub fn encode(dt: aclDataType, v: f64, out: &mut [u8]) {
    match dt {
        aclDataType::ACL_FLOAT => out[..4].copy_from_slice(&(v as f32).to_le_bytes()),
        aclDataType::ACL_FLOAT16 => out[..2].copy_from_slice(&f16::from_f64(v).to_le_bytes()),
        aclDataType::ACL_BF16 => out[..2].copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        aclDataType::ACL_DOUBLE => out[..8].copy_from_slice(&v.to_le_bytes()),
        aclDataType::ACL_INT8 => out[0] = v as i8 as u8,
        aclDataType::ACL_UINT8 => out[0] = v as u8,
        aclDataType::ACL_BOOL => out[0] = (v != 0.0) as u8,
        aclDataType::ACL_INT16 => out[..2].copy_from_slice(&(v as i16).to_le_bytes()),
        aclDataType::ACL_UINT16 => out[..2].copy_from_slice(&(v as u16).to_le_bytes()),
        aclDataType::ACL_INT32 => out[..4].copy_from_slice(&(v as i32).to_le_bytes()),
        aclDataType::ACL_UINT32 => out[..4].copy_from_slice(&(v as u32).to_le_bytes()),
        aclDataType::ACL_INT64 => out[..8].copy_from_slice(&(v as i64).to_le_bytes()),
        aclDataType::ACL_UINT64 => out[..8].copy_from_slice(&(v as u64).to_le_bytes()),
        _ => {}
    }
}

/// What an aclTensor describes: a strided view (element units) into a storage buffer.
#[derive(Clone, Debug)]
pub struct Desc {
    pub handle: u64,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
    pub dtype: aclDataType,
    pub storage_elems: usize,
    pub data: u64,
}

impl Desc {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn esize(&self) -> usize {
        elem_size(self.dtype).expect("validated at creation")
    }

    /// Bytes of the storage buffer (what must lie inside one allocation).
    pub fn storage_bytes(&self) -> usize {
        self.storage_elems * self.esize()
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for (d, s) in self.dims.iter().zip(&self.strides).rev() {
            if *d != 1 && *s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }

    /// Whether the view is its last two dimensions transposed over contiguous data (strides
    /// `[.., 1, rows]`), which matmul kernels read directly.
    pub fn is_transposed_last_two(&self) -> bool {
        let r = self.dims.len();
        if r < 2 {
            return false;
        }
        let mut swapped = self.dims.clone();
        swapped.swap(r - 2, r - 1);
        let mut st = contiguous_strides(&swapped);
        st.swap(r - 2, r - 1);
        st == self.strides
    }

    /// Element offsets (into storage) of the view, in row-major view order.
    pub fn offsets(&self) -> Vec<usize> {
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        if self.is_contiguous() {
            out.extend(self.offset..self.offset + n);
            return out;
        }
        let rank = self.dims.len();
        let mut idx = vec![0usize; rank];
        let mut off = self.offset;
        for _ in 0..n {
            out.push(off);
            for a in (0..rank).rev() {
                idx[a] += 1;
                off += self.strides[a];
                if idx[a] < self.dims[a] {
                    break;
                }
                off -= self.strides[a] * self.dims[a];
                idx[a] = 0;
            }
        }
        out
    }

    /// The device bytes `[lo, hi)` the view's elements lie in (None for an empty view).
    pub fn span(&self) -> Option<(u64, u64)> {
        if self.numel() == 0 {
            return None;
        }
        let last = self.offset + self.dims.iter().zip(&self.strides).map(|(d, s)| (d - 1) * s).sum::<usize>();
        let es = self.esize() as u64;
        Some((self.data + self.offset as u64 * es, self.data + (last as u64 + 1) * es))
    }

    /// Whether the two views share device bytes (element ranges, not exact element sets).
    pub fn overlaps(&self, other: &Desc) -> bool {
        match (self.span(), other.span()) {
            (Some((a, b)), Some((c, d))) => a < d && c < b,
            _ => false,
        }
    }

    /// The view with axis `axis` fixed at `at` (one slice, rank one lower).
    pub fn slice(&self, axis: usize, at: usize) -> Desc {
        let mut d = self.clone();
        d.offset += at * self.strides[axis];
        d.dims.remove(axis);
        d.strides.remove(axis);
        d
    }

    pub fn describe(&self) -> String {
        format!("{} {:?} (strides {:?}, offset {})", dtype_name(self.dtype), self.dims, self.strides, self.offset)
    }

    /// Reads the view as f64 values in row-major order.
    pub fn read(&self, mem: &Memory, what: &str) -> Result<Vec<f64>, String> {
        let es = self.esize();
        let data = mem.relocated.get(&self.handle).copied().unwrap_or(self.data);
        let bytes = mem.bytes(data, self.storage_bytes(), what)?;
        Ok(self.offsets().into_iter().map(|o| decode(self.dtype, &bytes[o * es..(o + 1) * es])).collect())
    }

    /// Writes row-major values into the view, rounding to its dtype.
    pub fn write(&self, mem: &mut Memory, vals: &[f64], what: &str) -> Result<(), String> {
        debug_assert_eq!(vals.len(), self.numel());
        let es = self.esize();
        let dtype = self.dtype;
        let offsets = self.offsets();
        let data = mem.relocated.get(&self.handle).copied().unwrap_or(self.data);
        let bytes = mem.bytes_mut(data, self.storage_bytes(), what)?;
        for (o, v) in offsets.into_iter().zip(vals) {
            encode(dtype, *v, &mut bytes[o * es..(o + 1) * es]);
        }
        Ok(())
    }
}

/// Contiguous row-major strides.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// numpy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Values of a row-major tensor of shape `dims` broadcast to `out` (which `dims` broadcasts to).
pub fn expand(vals: &[f64], dims: &[usize], out: &[usize]) -> Vec<f64> {
    if dims == out {
        return vals.to_vec();
    }
    let n: usize = out.iter().product();
    let rank = out.len();
    // Source strides aligned to `out`, 0 where broadcast.
    let src = contiguous_strides(dims);
    let mut st = vec![0usize; rank];
    for i in 0..dims.len() {
        let o = rank - dims.len() + i;
        st[o] = if dims[i] == 1 { 0 } else { src[i] };
    }
    let mut res = Vec::with_capacity(n);
    let mut idx = vec![0usize; rank];
    let mut off = 0usize;
    for _ in 0..n {
        res.push(vals[off]);
        for a in (0..rank).rev() {
            idx[a] += 1;
            off += st[a];
            if idx[a] < out[a] {
                break;
            }
            off -= st[a] * out[a];
            idx[a] = 0;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_offsets_follow_the_view() {
        let d = Desc {
            handle: 0,
            dims: vec![2, 3],
            strides: vec![1, 2],
            offset: 1,
            dtype: aclDataType::ACL_FLOAT,
            storage_elems: 7,
            data: 0,
        };
        assert_eq!(d.offsets(), vec![1, 3, 5, 2, 4, 6]);
        assert!(!d.is_contiguous());
    }

    #[test]
    fn spans_overlaps_and_slices_follow_the_view() {
        let d = |dims: Vec<usize>, strides: Vec<usize>, offset: usize| Desc {
            handle: 0,
            dims,
            strides,
            offset,
            dtype: aclDataType::ACL_FLOAT,
            storage_elems: 16,
            data: 0x1000,
        };
        // Rows 0 and 2 of a [4, 4] block: elements 0..4 and 8..12, so bytes 0..48.
        let every_other = d(vec![2, 4], vec![8, 1], 0);
        assert_eq!(every_other.span(), Some((0x1000, 0x1000 + 48)));
        assert!(every_other.overlaps(&d(vec![4], vec![1], 4)));
        assert!(!every_other.overlaps(&d(vec![4], vec![1], 12)));
        assert!(!every_other.overlaps(&d(vec![0, 4], vec![4, 1], 0)), "an empty view overlaps nothing");
        // Column 2 of a [4, 4] block: elements 2, 6, 10, 14.
        let col = d(vec![4, 4], vec![4, 1], 0).slice(1, 2);
        assert_eq!((col.dims.clone(), col.offsets()), (vec![4], vec![2, 6, 10, 14]));
    }

    #[test]
    fn expand_broadcasts_rows_and_columns() {
        assert_eq!(expand(&[1.0, 2.0], &[2, 1], &[2, 3]), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(expand(&[1.0, 2.0, 3.0], &[3], &[2, 3]), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }
}
