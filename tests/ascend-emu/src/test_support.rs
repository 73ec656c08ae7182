//! Unit-test helpers: the emulator's C API driven in-process, on device 0, with the SoC chosen
//! per test thread (`SOC_OVERRIDE`; the process-wide `DSV4_ASCEND_EMU_SOC` is read once).

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::Once;

use dsv4_ascend_sys::{aclDataType, aclFormat, aclOpExecutor, aclTensor, aclrtMemMallocPolicy, aclrtMemcpyKind};

use crate::mem::contiguous_strides;

/// Initialises the emulator once, sets device 0 on this thread and makes this thread's calls
/// see `soc`.
pub(crate) fn setup(soc: &str) {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // The MC2 tests (`mc2.rs`) run communicators of up to 16 ranks, a device each.
        if std::env::var_os("DSV4_ASCEND_EMU_DEVICES").is_none() {
            std::env::set_var("DSV4_ASCEND_EMU_DEVICES", "16");
        }
        // SAFETY: NULL config path is allowed.
        assert_eq!(unsafe { crate::aclInit(null()) }, 0, "{}", last_error())
    });
    // SAFETY: plain integer argument.
    assert_eq!(unsafe { crate::aclrtSetDevice(0) }, 0, "{}", last_error());
    crate::SOC_OVERRIDE.with(|o| *o.borrow_mut() = Some(soc.to_string()));
}

/// The message of the last failure on this thread ("" when none).
pub(crate) fn last_error() -> String {
    // SAFETY: returns NULL or a NUL-terminated string owned by this thread.
    let p = unsafe { crate::aclGetRecentErrMsg() };
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-NULL, NUL-terminated.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Device memory holding `bytes` (at least 1 byte allocated).
pub(crate) fn device(bytes: &[u8]) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    let st = unsafe { crate::aclrtMalloc(&mut p, bytes.len().max(1), aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST) };
    assert_eq!(st, 0, "{}", last_error());
    if !bytes.is_empty() {
        // SAFETY: a host slice of that many bytes.
        let st = unsafe {
            crate::aclrtMemcpy(
                p,
                bytes.len(),
                bytes.as_ptr() as *const c_void,
                bytes.len(),
                aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
            )
        };
        assert_eq!(st, 0, "{}", last_error());
    }
    p
}

/// `n` bytes of device memory at `p`.
pub(crate) fn download(p: *mut c_void, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: a host buffer of n bytes.
    let st = unsafe {
        crate::aclrtMemcpy(v.as_mut_ptr() as *mut c_void, n, p, n, aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST)
    };
    assert_eq!(st, 0, "{}", last_error());
    v
}

/// A strided view over `storage` (element counts) at `data`.
pub(crate) fn view(
    dims: &[i64],
    strides: &[i64],
    offset: i64,
    dt: aclDataType,
    storage: &[i64],
    data: *mut c_void,
) -> *mut aclTensor {
    // SAFETY: arrays of the given lengths.
    let t = unsafe {
        crate::aclCreateTensor(
            dims.as_ptr(),
            dims.len() as u64,
            dt,
            strides.as_ptr(),
            offset,
            aclFormat::ACL_FORMAT_ND,
            storage.as_ptr(),
            storage.len() as u64,
            data,
        )
    };
    assert!(!t.is_null(), "aclCreateTensor: {}", last_error());
    t
}

/// A contiguous tensor of `dims` at `data`.
pub(crate) fn tensor(dims: &[i64], dt: aclDataType, data: *mut c_void) -> *mut aclTensor {
    let st: Vec<i64> =
        contiguous_strides(&dims.iter().map(|&d| d as usize).collect::<Vec<_>>()).iter().map(|&s| s as i64).collect();
    view(dims, &st, 0, dt, dims, data)
}

/// The transpose of a contiguous `[dims[1], dims[0]]` storage, viewed as `dims` (strides [1, rows]).
pub(crate) fn transposed(dims: [i64; 2], dt: aclDataType, data: *mut c_void) -> *mut aclTensor {
    view(&dims, &[1, dims[0]], 0, dt, &[dims[1], dims[0]], data)
}

pub(crate) type Launcher = unsafe extern "C" fn(*mut c_void, u64, *mut aclOpExecutor, *mut c_void) -> i32;

/// Runs phase one (`plan` fills workspace size and executor and returns its status), then the
/// launch and a synchronisation; Err(message) from whichever step failed.
pub(crate) fn run(plan: impl FnOnce(*mut u64, *mut *mut aclOpExecutor) -> i32, launch: Launcher) -> Result<(), String> {
    let (mut ws, mut ex) = (0u64, null_mut());
    if plan(&mut ws, &mut ex) != 0 {
        return Err(last_error());
    }
    let wsp = if ws > 0 { device(&vec![0u8; ws as usize]) } else { null_mut() };
    // SAFETY: an executor planned above, the workspace it asked for, the default stream.
    if unsafe { launch(wsp, ws, ex, null_mut()) } != 0 {
        return Err(last_error());
    }
    // SAFETY: the default stream.
    if unsafe { crate::aclrtSynchronizeStream(null_mut()) } != 0 {
        return Err(last_error());
    }
    Ok(())
}

pub(crate) fn bf16_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::bf16::from_f64(x).to_le_bytes()).collect()
}

/// A deterministic pseudo-random sequence in [0, 1).
pub(crate) fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}
