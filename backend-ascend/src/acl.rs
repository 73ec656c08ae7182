//! Safe(r) wrappers over the raw API: the device context, one stream, a caching pool of
//! device memory, RAII for every ACL object, and [`Device::call`], the one helper every aclnn
//! operator goes through (GetWorkspaceSize → workspace from the pool → launch, with the
//! runtime's own error text on failure).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::{Arc, Mutex};

use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclnnStatus, Api};
use dsv4_core::error::{Error, Result};

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::backend("ascend", msg)
}

thread_local! {
    /// Devices `aclrtSetDevice` has been called for on this thread (the context is per thread).
    static DEVICES_SET: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// Size classes of the pool: 512-byte steps up to 64 KiB, then powers of two up to 64 MiB,
/// then 2 MiB steps. Blocks are reused only within a class.
fn size_class(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= 64 << 10 {
        b.div_ceil(512) * 512
    } else if b <= 64 << 20 {
        b.next_power_of_two()
    } else {
        b.div_ceil(2 << 20) * (2 << 20)
    }
}

/// Element size of the dtypes the backend creates, in bytes (1 for FLOAT4_E2M1, which packs two
/// elements into a byte: see [`bytes_for`] and [`elems_in`]).
pub(crate) fn esize(dt: aclDataType) -> usize {
    match dt {
        aclDataType::ACL_FLOAT | aclDataType::ACL_INT32 => 4,
        aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16 => 2,
        aclDataType::ACL_INT64 | aclDataType::ACL_DOUBLE => 8,
        _ => 1,
    }
}

/// Bytes `elems` elements of `dt` take: two FLOAT4_E2M1 codes share a byte.
pub(crate) fn bytes_for(elems: usize, dt: aclDataType) -> usize {
    if dt == aclDataType::ACL_FLOAT4_E2M1 {
        elems.div_ceil(2)
    } else {
        elems * esize(dt)
    }
}

/// Elements of `dt` that `bytes` bytes hold.
pub(crate) fn elems_in(bytes: usize, dt: aclDataType) -> usize {
    if dt == aclDataType::ACL_FLOAT4_E2M1 {
        bytes * 2
    } else {
        bytes / esize(dt)
    }
}

/// Everything tied to one device: the API, the stream and the memory pool. Shared by the
/// backend and every buffer, so memory is returned (and the stream destroyed) only when the
/// last user is gone.
pub(crate) struct Device {
    pub api: &'static Api,
    pub id: i32,
    pub(crate) stream: sys::aclrtStream,
    /// Reusable executors per operator and operand layout (see `executors`).
    pub(crate) executors: Mutex<crate::executors::ExecutorCache>,
    pool: Mutex<Pool>,
    /// Pinned host buffers: `busy` ones may still be read by queued copies (until the next
    /// synchronisation), `idle` ones are reused by later uploads.
    staging: Mutex<Staging>,
}

#[derive(Default)]
struct Staging {
    busy: Vec<(*mut c_void, usize)>,
    idle: Vec<(*mut c_void, usize)>,
}

/// Idle pinned bytes kept for reuse; beyond this they are freed at synchronisation.
const IDLE_STAGING_LIMIT: usize = 64 << 20;

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<u64>>,
    /// Bytes held from aclrtMalloc (in use or cached).
    held: usize,
}

// SAFETY: the raw stream handle and pinned pointers are only used through ACL calls, which are
// thread-safe once the device context is set on the calling thread (`Device::enter` does that
// before every call); the mutable state is behind mutexes.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

/// Bytes of pinned staging after which uploads synchronise to release them.
const STAGING_LIMIT: usize = 64 << 20;

/// Fails, naming the first of `ids` the runtime does not have (and how many it has), unless
/// every one is a device of this process.
pub fn require_devices(api: &'static Api, ids: &[i32]) -> Result<()> {
    let mut count = 0u32;
    let f = api.aclrtGetDeviceCount().map_err(|e| err(e.to_string()))?;
    // SAFETY: out-pointer to a local.
    check(api, "aclrtGetDeviceCount", unsafe { f(&mut count) })?;
    let mut missing: Vec<i32> = ids.iter().copied().filter(|&id| id < 0 || id as u32 >= count).collect();
    missing.sort_unstable();
    let Some(&first) = missing.first() else { return Ok(()) };
    let vis = sys::visible_devices()
        .map(|v| format!(" ({} is {v:?}; device ids index the visible devices)", sys::VISIBLE_DEVICES_VAR))
        .unwrap_or_default();
    let others = match missing.len() {
        1 => String::new(),
        _ => format!(" (nor do {})", missing[1..].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    Err(err(format!("device {first} does not exist{others}: the runtime reports {count} device(s){vis}")))
}

impl Device {
    /// Sets `id` on this thread and creates the stream.
    pub fn open(api: &'static Api, id: i32) -> Result<Arc<Device>> {
        require_devices(api, &[id])?;
        set_device(api, id)?;
        let mut stream = null_mut();
        let f = api.aclrtCreateStream().map_err(|e| err(e.to_string()))?;
        // SAFETY: out-pointer to a local; the device is set on this thread.
        check(api, "aclrtCreateStream", unsafe { f(&mut stream) })?;
        Ok(Arc::new(Device {
            api,
            id,
            stream,
            pool: Mutex::new(Pool::default()),
            staging: Mutex::new(Staging::default()),
            executors: Mutex::new(crate::executors::ExecutorCache::new(api)),
        }))
    }

    /// Makes this device current on the calling thread (once per thread).
    pub fn enter(&self) -> Result<()> {
        set_device(self.api, self.id)
    }

    /// Blocks until the stream is drained; pinned staging buffers become reusable.
    pub fn synchronize(&self) -> Result<()> {
        self.enter()?;
        let f = self.api.aclrtSynchronizeStream().map_err(|e| err(e.to_string()))?;
        // SAFETY: our live stream.
        let r = check(self.api, "aclrtSynchronizeStream", unsafe { f(self.stream) });
        let excess = {
            let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
            let busy = std::mem::take(&mut s.busy);
            s.idle.extend(busy);
            s.idle.sort_by_key(|(_, n)| *n);
            let mut kept = 0;
            let mut excess = vec![];
            s.idle.retain(|&(p, n)| {
                kept += n;
                if kept > IDLE_STAGING_LIMIT {
                    excess.push(p);
                }
                kept <= IDLE_STAGING_LIMIT
            });
            excess
        };
        self.free_host(excess);
        r
    }

    fn free_host(&self, buffers: Vec<*mut c_void>) {
        if let Ok(free) = self.api.aclrtFreeHost() {
            for p in buffers {
                // SAFETY: allocated by aclrtMallocHost; no queued copy reads it (the stream was
                // drained, or the copies were discarded by a failed stream).
                unsafe { free(p) };
            }
        }
    }

    /// A pinned host buffer of at least `len` bytes (reused when possible), marked busy.
    fn staging_buffer(&self, len: usize) -> Result<(*mut c_void, usize)> {
        let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let found = s.idle.iter().position(|&(_, n)| n >= len).map(|i| s.idle.remove(i));
        let buf = match found {
            Some(b) => b,
            None => {
                let malloc_host = self.api.aclrtMallocHost().map_err(|e| err(e.to_string()))?;
                let size = size_class(len);
                let mut host = null_mut();
                // SAFETY: out-pointer to a local, non-zero size.
                check(self.api, "aclrtMallocHost", unsafe { malloc_host(&mut host, size) })?;
                (host, size)
            }
        };
        s.busy.push(buf);
        Ok(buf)
    }

    /// Device memory of at least `bytes`, from the pool.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Buffer> {
        let class = size_class(bytes);
        let cached = self.pool.lock().unwrap_or_else(|p| p.into_inner()).free.get_mut(&class).and_then(Vec::pop);
        let ptr = match cached {
            Some(p) => p,
            None => match self.malloc(class) {
                Ok(p) => p,
                Err(first) => {
                    // Out of memory: give the cached blocks back and try once more.
                    self.trim()?;
                    self.malloc(class).map_err(|_| first)?
                }
            },
        };
        Ok(Buffer { dev: self.clone(), ptr, bytes: class })
    }

    fn malloc(&self, bytes: usize) -> Result<u64> {
        self.enter()?;
        let f = self.api.aclrtMalloc().map_err(|e| err(e.to_string()))?;
        let mut p = null_mut();
        // SAFETY: out-pointer to a local, non-zero size.
        check(self.api, "aclrtMalloc", unsafe {
            f(&mut p, bytes, sys::aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST)
        })?;
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).held += bytes;
        Ok(p as u64)
    }

    /// Frees every cached block (after the stream has drained, since queued work may still
    /// use blocks that were returned to the pool).
    pub fn trim(&self) -> Result<()> {
        self.synchronize()?;
        let free = self.api.aclrtFree().map_err(|e| err(e.to_string()))?;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for (class, blocks) in pool.free.drain().collect::<Vec<_>>() {
            for p in blocks {
                // SAFETY: a block from aclrtMalloc that no buffer refers to, with no queued work.
                check(self.api, "aclrtFree", unsafe { free(p as *mut c_void) })?;
                pool.held -= class;
            }
        }
        Ok(())
    }

    /// Bytes currently held from aclrtMalloc.
    pub fn held_bytes(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).held
    }

    /// Host → device, ordered on the stream: through a pinned staging buffer, so the copy is
    /// asynchronous and cannot overtake queued work that still reads a reused block.
    pub fn upload_bytes(self: &Arc<Self>, dst: &Buffer, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.enter()?;
        let memcpy = self.api.aclrtMemcpyAsync().map_err(|e| err(e.to_string()))?;
        let (host, _) = self.staging_buffer(bytes.len())?;
        // SAFETY: `host` holds at least `bytes.len()` writable bytes, is not read by any queued
        // copy (it was idle), and does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host as *mut u8, bytes.len()) };
        let staged_total: usize =
            self.staging.lock().unwrap_or_else(|p| p.into_inner()).busy.iter().map(|(_, n)| n).sum();
        // SAFETY: dst is a live device block of `dst.bytes >= bytes.len()` bytes; the pinned
        // source stays allocated until the next synchronisation.
        check(self.api, "aclrtMemcpyAsync", unsafe {
            memcpy(
                dst.ptr as *mut c_void,
                dst.bytes,
                host,
                bytes.len(),
                sys::aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
                self.stream,
            )
        })?;
        if staged_total > STAGING_LIMIT {
            self.synchronize()?;
        }
        Ok(())
    }

    /// Zeroes every byte of `dst`, ordered on the stream (aclrtMemsetAsync).
    pub fn zero(&self, dst: &Buffer) -> Result<()> {
        self.enter()?;
        let memset = self.api.aclrtMemsetAsync().map_err(|e| err(e.to_string()))?;
        // SAFETY: dst is a live device block of `dst.bytes` bytes (maxCount = count = its size);
        // the stream is ours, so later work that uses the block runs after the fill.
        check(self.api, "aclrtMemsetAsync", unsafe {
            memset(dst.ptr as *mut c_void, dst.bytes, 0, dst.bytes, self.stream)
        })
    }

    /// Device → host after draining the stream.
    pub fn download_bytes(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.synchronize()?;
        if out.is_empty() {
            return Ok(());
        }
        let memcpy = self.api.aclrtMemcpy().map_err(|e| err(e.to_string()))?;
        // SAFETY: `out` is writable for its length; `src` lies in a live device block holding
        // at least that many bytes; no queued work remains.
        check(self.api, "aclrtMemcpy", unsafe {
            memcpy(
                out.as_mut_ptr() as *mut c_void,
                out.len(),
                src as *const c_void,
                out.len(),
                sys::aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        })
    }

    /// The one path every aclnn operator takes: `plan` calls `<op>GetWorkspaceSize` with the
    /// two out-pointers; the workspace comes from the pool (returned right after the launch,
    /// which is safe on a single in-order stream); `launch` enqueues it. Failures carry
    /// `aclGetRecentErrMsg`.
    pub fn call(
        self: &Arc<Self>,
        op: &str,
        launch: std::result::Result<sys::pfn::aclnnAdd, sys::MissingSymbol>,
        plan: impl FnOnce(*mut u64, *mut *mut aclOpExecutor) -> std::result::Result<aclnnStatus, sys::MissingSymbol>,
    ) -> Result<()> {
        self.enter()?;
        let launch = launch.map_err(|e| err(e.to_string()))?;
        let mut ws_size = 0u64;
        let mut exec: *mut aclOpExecutor = null_mut();
        let status = plan(&mut ws_size, &mut exec).map_err(|e| err(e.to_string()))?;
        check(self.api, &format!("{op}GetWorkspaceSize"), status)?;
        let workspace = if ws_size > 0 {
            match self.alloc(ws_size as usize) {
                Ok(b) => Some(b),
                Err(e) => {
                    if let Ok(destroy) = self.api.aclDestroyAclOpExecutor() {
                        // SAFETY: an executor from the successful GetWorkspaceSize, never launched.
                        unsafe { destroy(exec) };
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        let ws_ptr = workspace.as_ref().map_or(null_mut(), |b| b.ptr as *mut c_void);
        // SAFETY: the executor from GetWorkspaceSize, a workspace of at least the size it asked
        // for (or NULL when it asked for none), and our live stream.
        check(self.api, op, unsafe { launch(ws_ptr, ws_size, exec, self.stream) })?;
        drop(workspace);
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Best effort: drain, drop the cached executors, free the pool and the staging buffers,
        // destroy the stream.
        let _ = self.trim();
        self.executors.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let idle: Vec<_> = {
            let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
            let busy = std::mem::take(&mut s.busy);
            s.idle.drain(..).chain(busy).map(|(p, _)| p).collect()
        };
        self.free_host(idle);
        if let Ok(f) = self.api.aclrtDestroyStream() {
            // SAFETY: our stream, drained above, never used again.
            unsafe { f(self.stream) };
        }
    }
}

/// `aclrtSetDevice` once per thread and device (the context is per thread).
fn set_device(api: &Api, id: i32) -> Result<()> {
    if DEVICES_SET.with(|d| d.borrow().contains(&id)) {
        return Ok(());
    }
    let f = api.aclrtSetDevice().map_err(|e| err(e.to_string()))?;
    // SAFETY: plain integer argument.
    check(api, "aclrtSetDevice", unsafe { f(id) })?;
    DEVICES_SET.with(|d| d.borrow_mut().push(id));
    Ok(())
}

/// Turns a status into a Result with the runtime's detailed message.
pub(crate) fn check(api: &Api, what: &str, status: i32) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    let detail = api.recent_error().unwrap_or_else(|| "no detail from aclGetRecentErrMsg".into());
    Err(err(format!("{what} failed with error {status}: {detail}")))
}

/// A block of device memory from the pool; returned to the pool on drop.
pub(crate) struct Buffer {
    dev: Arc<Device>,
    pub ptr: u64,
    pub bytes: usize,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // Queued work may still use the block; whoever gets it next is ordered after that work
        // on the same stream, and host-side writes go through the stream too.
        self.dev.pool.lock().unwrap_or_else(|p| p.into_inner()).free.entry(self.bytes).or_default().push(self.ptr);
    }
}

/// An `aclTensor` view over a buffer; destroyed on drop.
pub(crate) struct AclTensor {
    api: &'static Api,
    raw: *mut sys::aclTensor,
    /// The device address it was created over (its storage start).
    pub addr: u64,
    /// Everything but the address, which is what a reusable executor freezes.
    pub layout: TensorLayout,
}

/// An `aclTensor`'s description without its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TensorLayout {
    pub dtype: i32,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
    pub storage: usize,
}

impl AclTensor {
    /// A view with element `strides` and element `offset` into `buf`, whose whole extent is
    /// described as 1-D storage (the data pointer is the block start, so it is aligned).
    pub fn new(
        api: &'static Api,
        buf: &Buffer,
        dtype: aclDataType,
        dims: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<AclTensor> {
        let d: Vec<i64> = dims.iter().map(|&v| v as i64).collect();
        let s: Vec<i64> = strides.iter().map(|&v| v as i64).collect();
        let storage_elems = elems_in(buf.bytes, dtype);
        let storage = [storage_elems as i64];
        let f = api.aclCreateTensor().map_err(|e| err(e.to_string()))?;
        // SAFETY: the arrays live across the call and have the lengths passed; the data pointer
        // is a live device block of `buf.bytes` bytes.
        let raw = unsafe {
            f(
                d.as_ptr(),
                d.len() as u64,
                dtype,
                s.as_ptr(),
                offset as i64,
                sys::aclFormat::ACL_FORMAT_ND,
                storage.as_ptr(),
                1,
                buf.ptr as *mut c_void,
            )
        };
        if raw.is_null() {
            let detail = api.recent_error().unwrap_or_default();
            return Err(err(format!(
                "aclCreateTensor({dims:?}, strides {strides:?}, offset {offset}) failed: {detail}"
            )));
        }
        let layout = TensorLayout {
            dtype: dtype.0,
            dims: dims.to_vec(),
            strides: strides.to_vec(),
            offset,
            storage: storage_elems,
        };
        Ok(AclTensor { api, raw, addr: buf.ptr, layout })
    }

    pub fn ptr(&self) -> *mut sys::aclTensor {
        self.raw
    }

    /// Gives up ownership (a tensor list now owns it).
    fn into_raw(self) -> *mut sys::aclTensor {
        let raw = self.raw;
        std::mem::forget(self);
        raw
    }
}

impl Drop for AclTensor {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclDestroyTensor() {
            // SAFETY: created by aclCreateTensor, owned by us, destroyed once.
            unsafe { f(self.raw) };
        }
    }
}

/// An `aclTensorList`, which owns its member tensors (destroying it destroys them).
pub(crate) struct AclTensorList {
    api: &'static Api,
    raw: *mut sys::aclTensorList,
}

impl AclTensorList {
    pub fn new(api: &'static Api, members: Vec<AclTensor>) -> Result<AclTensorList> {
        let ptrs: Vec<*const sys::aclTensor> = members.iter().map(|t| t.ptr() as *const _).collect();
        let f = api.aclCreateTensorList().map_err(|e| err(e.to_string()))?;
        // SAFETY: `ptrs` holds live tensors for the duration of the call.
        let raw = unsafe { f(ptrs.as_ptr(), ptrs.len() as u64) };
        if raw.is_null() {
            let detail = api.recent_error().unwrap_or_default();
            return Err(err(format!("aclCreateTensorList failed: {detail}")));
        }
        // The list owns the members now.
        for m in members {
            m.into_raw();
        }
        Ok(AclTensorList { api, raw })
    }

    pub fn ptr(&self) -> *mut sys::aclTensorList {
        self.raw
    }
}

impl Drop for AclTensorList {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclDestroyTensorList() {
            // SAFETY: created by aclCreateTensorList, owned by us; this also destroys the
            // members, which nobody else owns.
            unsafe { f(self.raw) };
        }
    }
}

/// An `aclScalar` (the value is copied at creation).
pub(crate) struct AclScalar {
    api: &'static Api,
    raw: *mut sys::aclScalar,
    /// (dtype, value bits): what a reusable executor freezes.
    pub key: (i32, u64),
}

impl AclScalar {
    fn new(api: &'static Api, value: *mut c_void, dtype: aclDataType, bits: u64) -> Result<AclScalar> {
        let f = api.aclCreateScalar().map_err(|e| err(e.to_string()))?;
        // SAFETY: `value` points at a live host value of `dtype`, copied by the call.
        let raw = unsafe { f(value, dtype) };
        if raw.is_null() {
            return Err(err(format!("aclCreateScalar failed: {}", api.recent_error().unwrap_or_default())));
        }
        Ok(AclScalar { api, raw, key: (dtype.0, bits) })
    }

    pub fn f32(api: &'static Api, mut v: f32) -> Result<AclScalar> {
        Self::new(api, &mut v as *mut f32 as *mut c_void, aclDataType::ACL_FLOAT, v.to_bits() as u64)
    }

    pub fn i32(api: &'static Api, mut v: i32) -> Result<AclScalar> {
        Self::new(api, &mut v as *mut i32 as *mut c_void, aclDataType::ACL_INT32, v as u32 as u64)
    }

    pub fn ptr(&self) -> *mut sys::aclScalar {
        self.raw
    }
}

impl Drop for AclScalar {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclDestroyScalar() {
            // SAFETY: created by aclCreateScalar, owned by us, destroyed once.
            unsafe { f(self.raw) };
        }
    }
}

/// An `aclIntArray` (values copied at creation).
pub(crate) struct AclIntArray {
    api: &'static Api,
    raw: *mut sys::aclIntArray,
}

impl AclIntArray {
    pub fn new(api: &'static Api, values: &[i64]) -> Result<AclIntArray> {
        let f = api.aclCreateIntArray().map_err(|e| err(e.to_string()))?;
        // SAFETY: `values` is readable for its length during the call.
        let raw = unsafe { f(values.as_ptr(), values.len() as u64) };
        if raw.is_null() {
            return Err(err(format!("aclCreateIntArray failed: {}", api.recent_error().unwrap_or_default())));
        }
        Ok(AclIntArray { api, raw })
    }

    pub fn ptr(&self) -> *mut sys::aclIntArray {
        self.raw
    }
}

impl Drop for AclIntArray {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclDestroyIntArray() {
            // SAFETY: created by aclCreateIntArray, owned by us, destroyed once.
            unsafe { f(self.raw) };
        }
    }
}

/// The SoC name the runtime reports (`aclrtGetSocName`).
pub(crate) fn soc_name(api: &Api) -> String {
    let Ok(f) = api.aclrtGetSocName() else { return "unknown SoC".into() };
    // SAFETY: no arguments; returns NULL or a static NUL-terminated string.
    let p = unsafe { f() };
    if p.is_null() {
        return "unknown SoC".into();
    }
    // SAFETY: non-null and NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Free and total device memory, if the runtime reports them.
pub(crate) fn mem_info(dev: &Device) -> Option<(usize, usize)> {
    dev.enter().ok()?;
    let f = dev.api.aclrtGetMemInfo().ok()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: out-pointers to locals.
    let st = unsafe { f(sys::aclrtMemAttr::ACL_HBM_MEM, &mut free, &mut total) };
    (st == 0).then_some((free, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_monotonic_and_cover_the_request() {
        let mut last = 0;
        for b in [1, 511, 512, 513, 65536, 65537, 1 << 20, (64 << 20) + 1, 100 << 20] {
            let c = size_class(b);
            assert!(c >= b && c >= last, "{b} -> {c}");
            last = c;
        }
        assert_eq!(size_class(0), 512);
    }
}
