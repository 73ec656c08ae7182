//! "Device" memory of the emulator: host allocations with a stable address, aligned to 256 bytes
//! like cudaMalloc's, between two guard zones.
//!
//! The guards hold a fixed pattern (the 32-bit word 0x7fc0dead: a NaN as f32, a huge index as
//! i32) and are checked after every launch that was given the buffer, so a kernel writing
//! before or past its buffer is reported instead of silently corrupting a neighbour; a kernel
//! reading past the end sees NaNs.
//!
//! The bytes are only ever touched through raw pointers (by kernels, and here by copies), never
//! as Rust references: like device memory, a buffer may be read by one launch while another
//! thread's work writes it, which is the caller's race to avoid as on a GPU, not undefined
//! behaviour of this crate.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use dsv4_core::error::{Error, Result};

/// Alignment of every buffer's first byte (cudaMalloc guarantees 256).
pub const ALIGN: usize = 256;
/// Bytes of guard before and after every buffer.
pub const GUARD: usize = 256;
/// The guard pattern, as little-endian bytes of a 32-bit word.
const GUARD_WORD: [u8; 4] = 0x7fc0_deadu32.to_le_bytes();

/// A buffer of the emulated device; freed on drop.
#[derive(Debug)]
pub struct EmuBuffer {
    /// Start of the allocation: the front guard, then `len` bytes, then the back guard.
    base: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// The `EmulatedDevice` that allocated it (see `EmulatedDevice::id`).
    device: u64,
}

// SAFETY: the buffer owns its allocation; its bytes are accessed only through raw pointers
// (kernels, copies), as device memory is, and the device serialises its work.
unsafe impl Send for EmuBuffer {}
// SAFETY: as for Send; `&EmuBuffer` gives no safe access to the bytes.
unsafe impl Sync for EmuBuffer {}

impl EmuBuffer {
    /// A buffer of `len` bytes of device `device`, all zero.
    pub(crate) fn zeroed(device: u64, len: usize) -> Result<EmuBuffer> {
        Self::allocate(device, len, true)
    }

    /// A buffer of `len` bytes of device `device` whose contents are unspecified, filled with
    /// the f32 NaN 0x7FC00001 (as i32 2143289345, outside every tensor): a kernel that reads
    /// before the backend's write shows in the results instead of reading zeros by luck.
    pub(crate) fn poisoned(device: u64, len: usize) -> Result<EmuBuffer> {
        let buf = Self::allocate(device, len, false)?;
        let pattern: Vec<u8> = [0x01u8, 0x00, 0xC0, 0x7F].iter().copied().cycle().take(len).collect();
        buf.write_from(0, &pattern);
        Ok(buf)
    }

    /// A buffer of `len` bytes of device `device` whose contents the caller overwrites at once.
    pub(crate) fn for_overwrite(device: u64, len: usize) -> Result<EmuBuffer> {
        Self::allocate(device, len, false)
    }

    fn allocate(device: u64, len: usize, zero: bool) -> Result<EmuBuffer> {
        let too_big = || Error::backend("cuda", format!("emulated device: cannot allocate {len} bytes"));
        let total = len.checked_add(2 * GUARD).ok_or_else(too_big)?;
        let layout = Layout::from_size_align(total, ALIGN).map_err(|_| too_big())?;
        // SAFETY: `layout` has a non-zero size (at least the two guards).
        let raw = unsafe {
            if zero {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        let base = NonNull::new(raw).ok_or_else(|| {
            Error::backend("cuda", format!("emulated device: out of host memory allocating {len} bytes"))
        })?;
        let buf = EmuBuffer { base, len, layout, device };
        buf.restore_guards();
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of byte `offset` (at most `len`).
    pub(crate) fn addr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.len, "offset {offset} past a buffer of {} bytes", self.len);
        // SAFETY: GUARD + offset is within the allocation (offset <= len, GUARD + len + GUARD
        // bytes allocated).
        unsafe { self.base.as_ptr().add(GUARD + offset) }
    }

    /// The device that allocated it.
    pub(crate) fn device(&self) -> u64 {
        self.device
    }

    /// Whether `self` and `other` are the same buffer.
    pub(crate) fn same(&self, other: &EmuBuffer) -> bool {
        self.base == other.base
    }

    /// Where the guards no longer hold their pattern: (bytes written before the start, bytes
    /// written past the end), counted as the extent of the damage from the buffer's edge.
    pub(crate) fn guard_damage(&self) -> (usize, usize) {
        let front = (0..GUARD).find(|&i| self.guard_byte(i) != GUARD_WORD[i % 4]).map_or(0, |i| GUARD - i);
        let back = (0..GUARD)
            .rev()
            .find(|&i| self.guard_byte(GUARD + self.len + i) != GUARD_WORD[(GUARD + self.len + i) % 4])
            .map_or(0, |i| i + 1);
        (front, back)
    }

    fn guard_byte(&self, at: usize) -> u8 {
        // SAFETY: callers pass `at` inside one of the guards, which are inside the allocation;
        // a raw read, not a reference (see the module docs).
        unsafe { self.base.as_ptr().add(at).read() }
    }

    /// Writes the guard pattern again (after damage was reported, and at allocation).
    pub(crate) fn restore_guards(&self) {
        for at in (0..GUARD).chain(GUARD + self.len..2 * GUARD + self.len) {
            // SAFETY: `at` is inside one of the guards, inside the allocation.
            unsafe { self.base.as_ptr().add(at).write(GUARD_WORD[at % 4]) };
        }
    }

    /// Copies `len` bytes at `offset` out to `out` (range checked by the caller).
    pub(crate) fn read_into(&self, offset: usize, out: &mut [u8]) {
        assert!(offset.checked_add(out.len()).is_some_and(|end| end <= self.len));
        // SAFETY: the source range is inside the buffer (asserted), `out` is a distinct Rust
        // slice (it cannot alias device memory, which is never borrowed).
        unsafe { std::ptr::copy_nonoverlapping(self.addr(offset), out.as_mut_ptr(), out.len()) };
    }

    /// Copies `bytes` in at `offset` (range checked by the caller).
    pub(crate) fn write_from(&self, offset: usize, bytes: &[u8]) {
        assert!(offset.checked_add(bytes.len()).is_some_and(|end| end <= self.len));
        // SAFETY: the destination range is inside the buffer (asserted); `bytes` is a Rust
        // slice, so not device memory.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr(offset), bytes.len()) };
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        // SAFETY: `base` was allocated with `layout` and is freed once, here.
        unsafe { dealloc(self.base.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_guarded() {
        for len in [0usize, 1, 3, 255, 256, 257, 4096] {
            let b = EmuBuffer::zeroed(0, len).unwrap();
            assert_eq!(b.addr(0) as usize % ALIGN, 0, "len {len}");
            let mut bytes = vec![1u8; len];
            b.read_into(0, &mut bytes);
            assert!(bytes.iter().all(|&x| x == 0));
            assert_eq!(b.guard_damage(), (0, 0));
            // SAFETY: one byte before the start and three past the end are inside the guards.
            unsafe {
                b.addr(0).sub(1).write(0);
                b.addr(len).add(2).write(0);
            }
            assert_eq!(b.guard_damage(), (1, 3));
            b.restore_guards();
            assert_eq!(b.guard_damage(), (0, 0));
        }
    }
}
