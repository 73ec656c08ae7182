//! Raw AscendCL calls for the emulator tests that drive operators through the FFI of
//! `dsv4-ascend-sys` (to plant misuse or check an operator against a host reference): the
//! emulator's API with device 0 set, device memory, and tensors over it. Every call asserts
//! success with the runtime's own message.
//!
//! The `*mut c_void` arguments are device addresses: the host never dereferences them, the
//! (emulated) runtime validates them against its allocations, so the functions stay safe.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::c_void;
use std::ptr::null_mut;

use dsv4_ascend_sys::*;

/// The emulator's API with device 0 set on this thread.
pub fn api() -> &'static Api {
    crate::use_ascend_emulator();
    let api = runtime().unwrap_or_else(|e| panic!("{e}"));
    assert!(api.is_emulator());
    // SAFETY: plain integer argument.
    assert_eq!(unsafe { api.aclrtSetDevice().unwrap()(0) }, ACL_SUCCESS);
    api
}

/// `aclGetRecentErrMsg`, or "" when there is none.
pub fn recent_error(api: &Api) -> String {
    api.recent_error().unwrap_or_default()
}

/// `bytes` (at least one) of device memory.
pub fn malloc(api: &Api, bytes: usize) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    let st =
        unsafe { api.aclrtMalloc().unwrap()(&mut p, bytes.max(1), aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST) };
    assert_eq!(st, ACL_SUCCESS, "{}", recent_error(api));
    p
}

/// Copies `bytes` to `dst` (nothing for an empty slice).
pub fn upload_bytes(api: &Api, dst: *mut c_void, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: a host slice of that many bytes; the emulator checks the device side.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            dst,
            bytes.len(),
            bytes.as_ptr() as *const c_void,
            bytes.len(),
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_SUCCESS, "{}", recent_error(api));
}

/// `n` bytes from `src`.
pub fn download_bytes(api: &Api, src: *mut c_void, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: a host buffer of n bytes.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(v.as_mut_ptr() as *mut c_void, n, src, n, aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST)
    };
    assert_eq!(st, ACL_SUCCESS, "{}", recent_error(api));
    v
}

/// Fresh device memory holding `bytes`.
pub fn device_bytes(api: &Api, bytes: &[u8]) -> *mut c_void {
    let p = malloc(api, bytes.len());
    upload_bytes(api, p, bytes);
    p
}

/// Row-major strides of `dims`.
pub fn contiguous_strides(dims: &[i64]) -> Vec<i64> {
    (0..dims.len()).map(|i| dims[i + 1..].iter().product()).collect()
}

/// An `aclTensor` over `data`: `dims` with `strides` from element 0 of a storage of
/// `storage_elems` elements.
pub fn strided_tensor(
    api: &Api,
    data: *mut c_void,
    dims: &[i64],
    strides: &[i64],
    storage_elems: i64,
    dtype: aclDataType,
) -> *mut aclTensor {
    // SAFETY: arrays valid for the call; the emulator validates the rest.
    let t = unsafe {
        api.aclCreateTensor().unwrap()(
            dims.as_ptr(),
            dims.len() as u64,
            dtype,
            strides.as_ptr(),
            0,
            aclFormat::ACL_FORMAT_ND,
            [storage_elems].as_ptr(),
            1,
            data,
        )
    };
    assert!(!t.is_null(), "{}", recent_error(api));
    t
}

/// A contiguous `aclTensor` over `data` (storage = its elements).
pub fn tensor(api: &Api, data: *mut c_void, dims: &[i64], dtype: aclDataType) -> *mut aclTensor {
    strided_tensor(api, data, dims, &contiguous_strides(dims), dims.iter().product(), dtype)
}

/// A contiguous tensor over fresh device memory holding `bytes`.
pub fn tensor_of(api: &Api, dims: &[i64], dtype: aclDataType, bytes: &[u8]) -> *mut aclTensor {
    tensor(api, device_bytes(api, bytes), dims, dtype)
}

/// A contiguous INT32 tensor holding `v`.
pub fn i32_tensor(api: &Api, dims: &[i64], v: &[i32]) -> *mut aclTensor {
    tensor_of(api, dims, aclDataType::ACL_INT32, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
}

/// A contiguous tensor of zero bytes, `esize` bytes per element.
pub fn zero_tensor(api: &Api, dims: &[i64], dtype: aclDataType, esize: usize) -> *mut aclTensor {
    tensor_of(api, dims, dtype, &vec![0u8; dims.iter().product::<i64>() as usize * esize])
}
