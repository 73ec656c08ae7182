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

/// Size in bytes of one element, for the whole-byte types the emulator implements (None for
/// FLOAT4_E2M1, two elements a byte: see [`elem_bits`]).
pub fn elem_size(dt: aclDataType) -> Option<usize> {
    Some(match dt {
        aclDataType::ACL_FLOAT | aclDataType::ACL_INT32 | aclDataType::ACL_UINT32 => 4,
        aclDataType::ACL_FLOAT16 | aclDataType::ACL_BF16 | aclDataType::ACL_INT16 | aclDataType::ACL_UINT16 => 2,
        aclDataType::ACL_INT8 | aclDataType::ACL_UINT8 | aclDataType::ACL_BOOL => 1,
        aclDataType::ACL_FLOAT8_E4M3FN | aclDataType::ACL_FLOAT8_E8M0 => 1,
        aclDataType::ACL_INT64 | aclDataType::ACL_UINT64 | aclDataType::ACL_DOUBLE => 8,
        _ => return None,
    })
}

/// Size in bits of one element: 4 for FLOAT4_E2M1 (element offset `o` is the low nibble of
/// byte `o / 2` when `o` is even, the high nibble when odd), 8 × [`elem_size`] otherwise.
pub fn elem_bits(dt: aclDataType) -> Option<usize> {
    if dt == aclDataType::ACL_FLOAT4_E2M1 {
        return Some(4);
    }
    elem_size(dt).map(|b| b * 8)
}

/// The 8- and 4-bit float types (FLOAT8_E4M3FN, FLOAT8_E8M0, FLOAT4_E2M1): neither float nor
/// integer for the operators (only aclnnCast and aclnnWeightQuantBatchMatmulV2 take them).
pub fn is_low_precision(dt: aclDataType) -> bool {
    matches!(dt, aclDataType::ACL_FLOAT8_E4M3FN | aclDataType::ACL_FLOAT8_E8M0 | aclDataType::ACL_FLOAT4_E2M1)
}

/// FLOAT8_E4M3FN: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals, no infinities;
/// S.1111.111 is NaN.
pub fn decode_e4m3fn(b: u8) -> f64 {
    let (e, m) = ((b >> 3) & 0xF, b & 7);
    if e == 0xF && m == 7 {
        return f64::NAN;
    }
    let mag = if e == 0 { m as f64 / 8.0 * 2f64.powi(-6) } else { (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7) };
    if b & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// FLOAT4_E2M1 (the low 4 bits of `code`): sign bit 3, exponent bits 2..1 (bias 1), mantissa
/// bit 0; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
pub fn decode_e2m1(code: u8) -> f64 {
    let (e, m) = ((code >> 1) & 3, code & 1);
    let mag = if e == 0 { m as f64 * 0.5 } else { (1.0 + m as f64 / 2.0) * 2f64.powi(e as i32 - 1) };
    if code & 8 != 0 {
        -mag
    } else {
        mag
    }
}

/// FLOAT8_E8M0: 2^(b − 127); 0xFF is NaN.
pub fn decode_e8m0(b: u8) -> f64 {
    if b == 0xFF {
        f64::NAN
    } else {
        2f64.powi(b as i32 - 127)
    }
}

/// Round to nearest (ties to the even code) among the non-negative codes `0..=max_code` of a
/// format whose magnitudes increase with the code, saturating at `max_code`.
fn nearest_code(mag: f64, max_code: u8, decode: fn(u8) -> f64) -> u8 {
    if mag >= decode(max_code) {
        return max_code;
    }
    // The largest code whose magnitude is <= mag (codes are monotonic in magnitude).
    let (mut lo, mut hi) = (0u8, max_code);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if decode(mid) <= mag {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let (below, above) = (decode(lo), decode(lo + 1));
    match (mag - below).total_cmp(&(above - mag)) {
        std::cmp::Ordering::Less => lo,
        std::cmp::Ordering::Greater => lo + 1,
        std::cmp::Ordering::Equal => {
            if lo % 2 == 0 {
                lo
            } else {
                lo + 1
            }
        }
    }
}

/// FLOAT8_E4M3FN encoding: round to nearest even, saturating to ±448; NaN stays NaN.
pub fn encode_e4m3fn(v: f64) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    sign | nearest_code(v.abs(), 0x7E, decode_e4m3fn)
}

/// FLOAT4_E2M1 encoding (a 4-bit code): round to nearest even, saturating to ±6. The format has
/// no NaN, so NaN has no encoding (None).
pub fn encode_e2m1(v: f64) -> Option<u8> {
    if v.is_nan() {
        return None;
    }
    let sign = if v.is_sign_negative() { 8 } else { 0 };
    Some(sign | nearest_code(v.abs(), 7, decode_e2m1))
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
        aclDataType::ACL_FLOAT8_E4M3FN => "FLOAT8_E4M3FN".into(),
        aclDataType::ACL_FLOAT8_E8M0 => "FLOAT8_E8M0".into(),
        aclDataType::ACL_FLOAT4_E2M1 => "FLOAT4_E2M1".into(),
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
        aclDataType::ACL_FLOAT8_E4M3FN => decode_e4m3fn(b[0]),
        aclDataType::ACL_FLOAT8_E8M0 => decode_e8m0(b[0]),
        // One code in the low nibble (Desc::read extracts it from its byte).
        aclDataType::ACL_FLOAT4_E2M1 => decode_e2m1(b[0] & 0xF),
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
        aclDataType::ACL_FLOAT8_E4M3FN => out[0] = encode_e4m3fn(v),
        // FLOAT4_E2M1 (nibbles, no NaN) and FLOAT8_E8M0 are written by Desc::write only.
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

    /// Bits of one element (4 for FLOAT4_E2M1).
    pub fn bits(&self) -> usize {
        elem_bits(self.dtype).expect("validated at creation")
    }

    /// Bytes of the storage buffer (what must lie inside one allocation); an FP4 storage of an
    /// odd number of elements ends in a half-used byte.
    pub fn storage_bytes(&self) -> usize {
        (self.storage_elems * self.bits()).div_ceil(8)
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
        let bits = self.bits() as u64;
        Some((self.data + self.offset as u64 * bits / 8, self.data + ((last as u64 + 1) * bits).div_ceil(8)))
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
        let data = mem.relocated.get(&self.handle).copied().unwrap_or(self.data);
        let bytes = mem.bytes(data, self.storage_bytes(), what)?;
        let offsets = self.offsets();
        if self.dtype == aclDataType::ACL_FLOAT4_E2M1 {
            let high_first = crate::fused::quirk("fp4-high-nibble-first");
            return Ok(offsets.into_iter().map(|o| decode_e2m1(nibble(bytes[o / 2], o, high_first))).collect());
        }
        let es = self.bits() / 8;
        Ok(offsets.into_iter().map(|o| decode(self.dtype, &bytes[o * es..(o + 1) * es])).collect())
    }

    /// Writes row-major values into the view, rounding to its dtype. FLOAT4_E2M1 elements are
    /// nibbles (the other nibble of their byte is kept); NaN has no FLOAT4_E2M1 encoding, and
    /// writing FLOAT8_E8M0 is not emulated.
    pub fn write(&self, mem: &mut Memory, vals: &[f64], what: &str) -> Result<(), String> {
        debug_assert_eq!(vals.len(), self.numel());
        let dtype = self.dtype;
        if dtype == aclDataType::ACL_FLOAT8_E8M0 {
            return Err(format!("{what}: writing FLOAT8_E8M0 is not emulated"));
        }
        let offsets = self.offsets();
        let data = mem.relocated.get(&self.handle).copied().unwrap_or(self.data);
        let bytes = mem.bytes_mut(data, self.storage_bytes(), what)?;
        if dtype == aclDataType::ACL_FLOAT4_E2M1 {
            for (o, v) in offsets.into_iter().zip(vals) {
                let Some(code) = encode_e2m1(*v) else {
                    return Err(format!(
                        "{what}: NaN has no FLOAT4_E2M1 encoding (the format has no NaN; what the kernel writes is \
                         not emulated)"
                    ));
                };
                let b = &mut bytes[o / 2];
                *b = if o % 2 == 0 { (*b & 0xF0) | code } else { (*b & 0x0F) | (code << 4) };
            }
            return Ok(());
        }
        let es = self.bits() / 8;
        for (o, v) in offsets.into_iter().zip(vals) {
            encode(dtype, *v, &mut bytes[o * es..(o + 1) * es]);
        }
        Ok(())
    }
}

/// The FLOAT4_E2M1 code of element offset `o` in its byte `b` (low nibble for an even offset;
/// the other way round under the `fp4-high-nibble-first` quirk, a packing dsv4's self-test at
/// device open must catch).
fn nibble(b: u8, o: usize, high_first: bool) -> u8 {
    if o.is_multiple_of(2) != high_first {
        b & 0xF
    } else {
        b >> 4
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

    /// A Memory with one live allocation of `size` bytes (all 0xFF) at DEVICE_BASE.
    fn memory(size: usize) -> Memory {
        let mut m = Memory::default();
        m.allocs.insert(
            DEVICE_BASE,
            DevAlloc {
                size,
                data: Some(vec![0xFF; size]),
                device: 0,
                owner: std::thread::current().id(),
                pending_reads: 0,
                pending_writes: 0,
            },
        );
        m
    }

    fn fp4(dims: Vec<usize>, strides: Vec<usize>, offset: usize, storage_elems: usize) -> Desc {
        Desc { handle: 1, dims, strides, offset, dtype: aclDataType::ACL_FLOAT4_E2M1, storage_elems, data: DEVICE_BASE }
    }

    #[test]
    fn fp4_elements_are_nibbles_low_first() {
        // Storage of 9 elements: 5 bytes, the last half used.
        let whole = fp4(vec![9], vec![1], 0, 9);
        assert_eq!(whole.storage_bytes(), 5);
        let mut mem = memory(5);
        mem.allocs.get_mut(&DEVICE_BASE).unwrap().data = Some(vec![0x21, 0x43, 0x65, 0x87, 0xA9]);
        // Codes 1, 2, 3, ..., 9: element 0 is the low nibble of byte 0, element 1 its high nibble.
        let want: Vec<f64> = [1u8, 2, 3, 4, 5, 6, 7, 8, 9].iter().map(|&c| decode_e2m1(c)).collect();
        assert_eq!(whole.read(&mem, "t").unwrap(), want);
        assert_eq!(want[..3], [0.5, 1.0, 1.5]);
        // A view into the middle starting at an odd element offset: elements 3..7.
        let mid = fp4(vec![4], vec![1], 3, 9);
        assert_eq!(mid.span(), Some((DEVICE_BASE + 1, DEVICE_BASE + 4)));
        assert_eq!(mid.read(&mem, "t").unwrap(), want[3..7].to_vec());
        // Writing through it changes exactly those nibbles: 3 at offset 3 (high nibble of byte 1),
        // -6 at 4 (low of byte 2), 0.5 at 5 (high of byte 2), -0 at 6 (low of byte 3).
        mid.write(&mut mem, &[3.0, -6.0, 0.5, -0.0], "t").unwrap();
        let bytes = mem.allocs[&DEVICE_BASE].data.clone().unwrap();
        assert_eq!(bytes, vec![0x21, 0x53, 0x1F, 0x88, 0xA9]);
        // Strided: every other element from offset 1 (high nibbles).
        let odd = fp4(vec![4], vec![2], 1, 9);
        assert_eq!(odd.read(&mem, "t").unwrap(), [0x2u8, 0x5, 0x1, 0x8].map(decode_e2m1).to_vec());
        assert!(odd.overlaps(&mid) && !fp4(vec![1], vec![1], 8, 9).overlaps(&mid));
        // NaN has no FLOAT4_E2M1 encoding.
        assert!(fp4(vec![1], vec![1], 8, 9).write(&mut mem, &[f64::NAN], "t").unwrap_err().contains("NaN"));
    }

    /// e4m3fn by an independent construction: the same bits placed into an f32.
    fn e4m3_reference(b: u8) -> f64 {
        let (s, e, m) = ((b >> 7) as u32, ((b >> 3) & 0xF) as u32, (b & 7) as u32);
        if e == 15 && m == 7 {
            return f64::NAN;
        }
        let mag = if e == 0 {
            // Subnormal: m × 2^-9.
            m as f64 / 512.0
        } else {
            f32::from_bits(((e + 120) << 23) | (m << 20)) as f64
        };
        if s == 1 {
            -mag
        } else {
            mag
        }
    }

    #[test]
    fn e4m3fn_decodes_all_256_codes() {
        for b in 0..=255u8 {
            let (got, want) = (decode_e4m3fn(b), e4m3_reference(b));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{b:#04x}: {got} vs {want}");
            assert_eq!(decode(aclDataType::ACL_FLOAT8_E4M3FN, &[b]).to_bits(), got.to_bits());
        }
        assert_eq!((decode_e4m3fn(0x7E), decode_e4m3fn(0x38), decode_e4m3fn(0x01)), (448.0, 1.0, 2f64.powi(-9)));
        assert!(decode_e4m3fn(0x7F).is_nan() && decode_e4m3fn(0xFF).is_nan() && !decode_e4m3fn(0x78).is_nan());
        assert_eq!(decode_e4m3fn(0x78), 256.0, "exponent 15 is finite in the fn variant");
    }

    #[test]
    fn e2m1_decodes_all_16_codes() {
        let mags: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for c in 0..16u8 {
            let want = if c >= 8 { -mags[c as usize - 8] } else { mags[c as usize] };
            assert_eq!(decode_e2m1(c).to_bits(), want.to_bits(), "code {c:#x}");
        }
    }

    #[test]
    fn e8m0_decodes_powers_of_two() {
        assert_eq!((decode_e8m0(127), decode_e8m0(128), decode_e8m0(120)), (1.0, 2.0, 2f64.powi(-7)));
        assert_eq!(decode_e8m0(0), 2f64.powi(-127));
        assert!(decode_e8m0(255).is_nan());
    }

    #[test]
    fn encodes_round_to_nearest_even_and_saturate() {
        for b in 0..=255u8 {
            let v = decode_e4m3fn(b);
            if !v.is_nan() {
                assert_eq!(encode_e4m3fn(v), b, "{v}");
            }
        }
        // 1.0 and 1.125 are neighbours: the midpoint goes to the even code 0x38 (1.0); the
        // next midpoint (1.1875) to 0x3A (1.25).
        assert_eq!(encode_e4m3fn(1.0625), 0x38);
        assert_eq!(encode_e4m3fn(1.1875), 0x3A);
        assert_eq!(encode_e4m3fn(1.07), 0x39);
        assert_eq!((encode_e4m3fn(1e9), encode_e4m3fn(-500.0), encode_e4m3fn(f64::INFINITY)), (0x7E, 0xFE, 0x7E));
        assert_eq!(encode_e4m3fn(2f64.powi(-11)), 0x00, "half the smallest subnormal ties to zero");
        assert!(decode_e4m3fn(encode_e4m3fn(f64::NAN)).is_nan());
        for c in 0..16u8 {
            let v = decode_e2m1(c);
            if c != 8 {
                assert_eq!(encode_e2m1(v), Some(c), "{v}");
            }
        }
        // Midpoints: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4; saturation.
        let e = |v: f64| decode_e2m1(encode_e2m1(v).unwrap());
        assert_eq!(
            [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0].map(e),
            [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]
        );
        assert_eq!(e(-5.1), -6.0);
        assert_eq!(encode_e2m1(f64::NAN), None);
    }

    #[test]
    fn low_precision_types_are_not_numeric() {
        for dt in [aclDataType::ACL_FLOAT8_E4M3FN, aclDataType::ACL_FLOAT8_E8M0, aclDataType::ACL_FLOAT4_E2M1] {
            assert!(!is_float(dt) && !is_int(dt) && is_low_precision(dt), "{}", dtype_name(dt));
        }
        assert_eq!(elem_bits(aclDataType::ACL_FLOAT4_E2M1), Some(4));
        assert_eq!(elem_size(aclDataType::ACL_FLOAT4_E2M1), None);
        assert_eq!(elem_bits(aclDataType::ACL_FLOAT8_E8M0), Some(8));
    }
}
