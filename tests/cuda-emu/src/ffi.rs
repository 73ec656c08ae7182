//! The C++ side of the emulator as Rust sees it: the kernel table that build.rs compiled
//! (`cpp/dsv4emu_abi.h`, mirrored here) turned into [`KernelInfo`]s looked up by name, and the
//! one call that runs a launch.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CStr};
use std::sync::OnceLock;

const PARAM_POINTER: c_uint = 1;
const PARAM_INT: c_uint = 2;
const PARAM_LONG_LONG: c_uint = 3;
const PARAM_FLOAT: c_uint = 4;

/// `dsv4emu_param`.
#[repr(C)]
struct RawParam {
    kind: c_uint,
    size: c_uint,
    pointee_const: c_uint,
    pointee_align: c_uint,
    type_name: *const c_char,
}

/// `dsv4emu_kernel`. `entry` is a C++ function pointer the runtime calls; Rust never does.
#[repr(C)]
pub(crate) struct RawKernel {
    name: *const c_char,
    file: *const c_char,
    entry: *const c_void,
    arity: c_uint,
    params: *const RawParam,
}

extern "C" {
    fn dsv4emu_kernel_count() -> c_ulong;
    fn dsv4emu_kernel_at(i: c_ulong) -> *const RawKernel;
    fn dsv4emu_launch(
        kernel: *const RawKernel,
        params: *const *mut c_void,
        grid: *const c_uint,
        block: *const c_uint,
        shared_bytes: c_uint,
    ) -> c_int;
    fn dsv4emu_last_error() -> *const c_char;
    fn dsv4emu_set_reverse_order(reverse: c_uint);
}

/// Whether the threads of each block start last-first in this OS thread's next launches.
pub(crate) fn set_reverse_order(reverse: bool) {
    // SAFETY: sets a thread-local flag of the runtime; no pointers.
    unsafe { dsv4emu_set_reverse_order(c_uint::from(reverse)) }
}

/// What a kernel parameter is, as its C++ type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `T*` or `const T*`.
    Pointer { pointee_const: bool, pointee_align: usize },
    /// `int` or `unsigned int`.
    Int,
    /// `long long`.
    LongLong,
    /// `float`.
    Float,
}

/// One parameter of a kernel.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub kind: ParamKind,
    /// Its C++ type, e.g. `const float*`.
    pub type_name: &'static str,
}

/// One kernel compiled into the emulator.
#[derive(Debug)]
pub struct KernelInfo {
    pub name: &'static str,
    /// Its source file: a name of `dsv4_backend_cuda::kernels::SOURCES`, or `selftest.cu`.
    pub file: &'static str,
    pub params: Vec<ParamInfo>,
    raw: RawKernelRef,
}

/// The address of a table entry, which is immutable static data of the C++ library.
#[derive(Debug)]
struct RawKernelRef(*const RawKernel);

// SAFETY: the pointer is to a `const` table entry in the library's static data, never written
// and alive for the whole process; sharing it between threads is sharing a `&'static`.
unsafe impl Send for RawKernelRef {}
// SAFETY: as for Send: immutable static data.
unsafe impl Sync for RawKernelRef {}

/// # Safety
/// `p` is null or a NUL-terminated string in the library's static data.
unsafe fn static_str(p: *const c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    // SAFETY: per this function's contract, `p` is a NUL-terminated string that lives forever.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("(non-UTF-8 name)")
}

fn registry() -> &'static HashMap<&'static str, KernelInfo> {
    static REGISTRY: OnceLock<HashMap<&'static str, KernelInfo>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        // SAFETY: a plain function of the C++ library with no arguments.
        let n = unsafe { dsv4emu_kernel_count() };
        let mut map = HashMap::new();
        for i in 0..n {
            // SAFETY: `i` is below the count, so the library returns a pointer to a table entry
            // in its static data (or null, which is skipped).
            let raw = unsafe { dsv4emu_kernel_at(i) };
            if raw.is_null() {
                continue;
            }
            // SAFETY: `raw` points to a `dsv4emu_kernel` in static data (see above).
            let k = unsafe { &*raw };
            let params = (0..k.arity as usize)
                .map(|j| {
                    // SAFETY: `params` holds `arity` (+1) entries, generated from the kernel's type.
                    let p = unsafe { &*k.params.add(j) };
                    let kind = match p.kind {
                        PARAM_POINTER => ParamKind::Pointer {
                            pointee_const: p.pointee_const != 0,
                            pointee_align: p.pointee_align.max(1) as usize,
                        },
                        PARAM_INT => ParamKind::Int,
                        PARAM_LONG_LONG => ParamKind::LongLong,
                        PARAM_FLOAT => ParamKind::Float,
                        other => unreachable!("dsv4emu_table.h refuses parameter kind {other} at compile time"),
                    };
                    debug_assert!(
                        p.size as usize == if matches!(kind, ParamKind::Int | ParamKind::Float) { 4 } else { 8 }
                    );
                    // SAFETY: type names are string literals of dsv4emu_table.h.
                    ParamInfo { kind, type_name: unsafe { static_str(p.type_name) } }
                })
                .collect();
            // SAFETY: name and file are string literals of the generated tables.
            let (name, file) = unsafe { (static_str(k.name), static_str(k.file)) };
            map.insert(name, KernelInfo { name, file, params, raw: RawKernelRef(raw) });
        }
        map
    })
}

/// The kernel called `name`, if the emulator has it.
pub fn kernel(name: &str) -> Option<&'static KernelInfo> {
    registry().get(name)
}

/// Every kernel compiled into the emulator (backend kernels and the emulator's test kernels),
/// in no particular order.
pub fn kernels() -> impl Iterator<Item = &'static KernelInfo> {
    registry().values()
}

/// One kernel argument's value, as `kernelParams[i]` points at it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union ArgValue {
    pub(crate) ptr: *mut c_void,
    pub(crate) i32: i32,
    pub(crate) u32: u32,
    pub(crate) i64: i64,
    pub(crate) f32: f32,
}

/// Runs `kernel` with `args` (already checked against its parameters) over the grid on this
/// thread; the runtime's message on failure.
pub(crate) fn run(
    kernel: &KernelInfo,
    args: &mut [ArgValue],
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
) -> Result<(), String> {
    let params: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut ArgValue as *mut c_void).collect();
    // SAFETY: `kernel.raw` is a table entry of the library; `params` has one pointer per
    // parameter (the caller checked the count), each to a live value of the parameter's size
    // whose pointers, if any, are addresses inside live buffers the caller holds for the call;
    // grid and block are 3-element arrays. The call runs the kernel to completion before
    // returning and keeps none of the pointers.
    let status = unsafe { dsv4emu_launch(kernel.raw.0, params.as_ptr(), grid.as_ptr(), block.as_ptr(), shared_bytes) };
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the library's per-thread message, NUL-terminated, valid until the next launch
    // on this thread; copied at once.
    let msg = unsafe { CStr::from_ptr(dsv4emu_last_error()) }.to_string_lossy().into_owned();
    Err(msg)
}
