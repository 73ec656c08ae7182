//! The emulator (`tests/ascend-emu`) catches misuse of the AscendCL / aclnn API the way the
//! documentation says the runtime rejects it: each test plants one misuse through the raw
//! FFI of `dsv4-ascend-sys` and expects the error code plus a message from
//! `aclGetRecentErrMsg`. Also: the emulator exports every declared function, the backend
//! surfaces the runtime's error text, leaks nothing, and honours ASCEND_RT_VISIBLE_DEVICES.

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use dsv4_ascend_sys::*;
use dsv4_core::Backend;
use dsv4_tests::raw_acl::{api, recent_error as msg};

fn setup() {
    dsv4_tests::use_ascend_emulator();
}

fn malloc(api: &Api, bytes: usize) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    let st = unsafe { api.aclrtMalloc().unwrap()(&mut p, bytes, aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST) };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
    p
}

fn free(api: &Api, p: *mut c_void) -> aclError {
    // SAFETY: the emulator validates the pointer.
    unsafe { api.aclrtFree().unwrap()(p) }
}

/// A contiguous tensor over `data` (storage = the view).
fn tensor(api: &Api, data: *mut c_void, dims: &[i64], dtype: aclDataType) -> *mut aclTensor {
    let mut st = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * dims[i + 1];
    }
    strided(api, data, dims, &st, 0, dims, dtype)
}

fn strided(
    api: &Api,
    data: *mut c_void,
    dims: &[i64],
    st: &[i64],
    off: i64,
    storage: &[i64],
    dtype: aclDataType,
) -> *mut aclTensor {
    // SAFETY: arrays valid for the call.
    unsafe {
        api.aclCreateTensor().unwrap()(
            dims.as_ptr(),
            dims.len() as u64,
            dtype,
            st.as_ptr(),
            off,
            aclFormat::ACL_FORMAT_ND,
            storage.as_ptr(),
            storage.len() as u64,
            data,
        )
    }
}

fn scalar_f32(api: &Api, mut v: f32) -> *mut aclScalar {
    // SAFETY: a live f32.
    unsafe { api.aclCreateScalar().unwrap()(&mut v as *mut f32 as *mut c_void, aclDataType::ACL_FLOAT) }
}

fn stream(api: &Api) -> aclrtStream {
    let mut s = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { api.aclrtCreateStream().unwrap()(&mut s) }, ACL_SUCCESS, "{}", msg(api));
    s
}

fn sync(api: &Api, s: aclrtStream) -> aclError {
    // SAFETY: a stream handle (validated by the emulator).
    unsafe { api.aclrtSynchronizeStream().unwrap()(s) }
}

/// Plans `out = x * 2` (aclnnMuls) and returns the executor.
fn plan_muls(api: &Api, x: *mut aclTensor, out: *mut aclTensor) -> (*mut aclOpExecutor, u64) {
    let two = scalar_f32(api, 2.0);
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects and out-pointers.
    let st = unsafe { api.aclnnMulsGetWorkspaceSize().unwrap()(x, two, out, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_SUCCESS, "{}", msg(api));
    (ex, ws)
}

fn launch_muls(api: &Api, ex: *mut aclOpExecutor, s: aclrtStream) -> aclnnStatus {
    // SAFETY: the emulator validates the executor.
    unsafe { api.aclnnMuls().unwrap()(null_mut(), 0, ex, s) }
}

fn upload(api: &Api, dst: *mut c_void, v: &[f32]) {
    // SAFETY: host slice of the given length.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            dst,
            v.len() * 4,
            v.as_ptr() as *const c_void,
            v.len() * 4,
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
}

fn download(api: &Api, src: *mut c_void, n: usize) -> (aclError, Vec<f32>) {
    let mut v = vec![0f32; n];
    // SAFETY: host buffer of n floats.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            v.as_mut_ptr() as *mut c_void,
            n * 4,
            src,
            n * 4,
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    };
    (st, v)
}

#[test]
fn the_emulator_exports_every_declared_function() {
    let api = api();
    let missing: Vec<&&str> = FUNCTION_NAMES.iter().filter(|n| !api.has(n)).collect();
    assert!(missing.is_empty(), "not exported by the emulator: {missing:?}");
}

#[test]
fn a_second_acl_init_is_refused() {
    let api = api();
    // SAFETY: NULL config is allowed.
    assert_eq!(unsafe { api.aclInit().unwrap()(null()) }, ACL_ERROR_REPEAT_INITIALIZE);
    assert!(msg(api).contains("already initialised"));
}

#[test]
fn a_thread_without_a_device_has_no_context() {
    let api = api();
    std::thread::spawn(move || {
        let mut p = null_mut();
        // SAFETY: out-pointer to a local.
        let st = unsafe { api.aclrtMalloc().unwrap()(&mut p, 64, aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST) };
        assert_eq!(st, ACL_ERROR_RT_CONTEXT_NULL);
        assert!(msg(api).contains("aclrtSetDevice"), "{}", msg(api));
    })
    .join()
    .unwrap();
}

#[test]
fn tensor_data_must_be_32_byte_aligned() {
    let api = api();
    let p = malloc(api, 1024);
    let t = tensor(api, (p as usize + 4) as *mut c_void, &[4], aclDataType::ACL_FLOAT);
    assert!(t.is_null());
    assert!(msg(api).contains("not 32-byte aligned"), "{}", msg(api));
    assert_eq!(free(api, p), ACL_SUCCESS);
}

#[test]
fn views_must_stay_inside_their_storage_and_storage_inside_the_allocation() {
    let api = api();
    let p = malloc(api, 64);
    // A [4, 4] view with row stride 5 reaches element 18 of a 16-element storage.
    assert!(strided(api, p, &[4, 4], &[5, 1], 0, &[16], aclDataType::ACL_FLOAT).is_null());
    assert!(msg(api).contains("outside the storage"), "{}", msg(api));
    // 32 floats of storage do not fit in a 64-byte allocation.
    assert!(tensor(api, p, &[32], aclDataType::ACL_FLOAT).is_null());
    assert!(msg(api).contains("run past the end"), "{}", msg(api));
    assert!(strided(api, p, &[2], &[-1], 1, &[2], aclDataType::ACL_FLOAT).is_null());
    assert!(msg(api).contains("negative"), "{}", msg(api));
    assert_eq!(free(api, p), ACL_SUCCESS);
}

#[test]
fn operators_check_dtypes_and_shapes() {
    let api = api();
    let p = malloc(api, 1024);
    let (ints, f) = (tensor(api, p, &[2, 2], aclDataType::ACL_INT32), tensor(api, p, &[2, 2], aclDataType::ACL_FLOAT));
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects and out-pointers.
    let st = unsafe { api.aclnnMatmulGetWorkspaceSize().unwrap()(ints, ints, ints, 0, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("supported: FLOAT"), "{}", msg(api));
    let wrong = tensor(api, p, &[3, 2], aclDataType::ACL_FLOAT);
    // SAFETY: as above.
    let st = unsafe { api.aclnnSoftmaxGetWorkspaceSize().unwrap()(f, 1, wrong, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("expected [2, 2]"), "{}", msg(api));
    let odd = tensor(api, p, &[1, 2, 3], aclDataType::ACL_FLOAT);
    let cs = tensor(api, p, &[1, 1, 3], aclDataType::ACL_FLOAT);
    let out = tensor(api, p, &[1, 2, 3], aclDataType::ACL_FLOAT);
    // SAFETY: as above.
    let st =
        unsafe { api.aclnnRotaryPositionEmbeddingGetWorkspaceSize().unwrap()(odd, cs, cs, 1, out, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("must be even"), "{}", msg(api));
    // A non-contiguous output.
    let t_out = strided(api, p, &[2, 2], &[1, 2], 0, &[4], aclDataType::ACL_FLOAT);
    // SAFETY: as above.
    let st = unsafe { api.aclnnSigmoidGetWorkspaceSize().unwrap()(f, t_out, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("must be contiguous"), "{}", msg(api));
    // aclnnTopk wants INT64 indices.
    let vals = tensor(api, p, &[2, 1], aclDataType::ACL_FLOAT);
    let idx = tensor(api, p, &[2, 1], aclDataType::ACL_INT32);
    // SAFETY: as above.
    let st = unsafe { api.aclnnTopkGetWorkspaceSize().unwrap()(f, 1, -1, true, true, vals, idx, &mut ws, &mut ex) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("INT64"), "{}", msg(api));
}

#[test]
fn a_workspace_smaller_than_requested_is_refused() {
    let api = api();
    let s = stream(api);
    let p = malloc(api, 256);
    let x = tensor(api, p, &[4, 4], aclDataType::ACL_FLOAT);
    let o = tensor(api, malloc(api, 256), &[4, 4], aclDataType::ACL_FLOAT);
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects and out-pointers.
    assert_eq!(unsafe { api.aclnnMatmulGetWorkspaceSize().unwrap()(x, x, o, 0, &mut ws, &mut ex) }, ACLNN_SUCCESS);
    assert!(ws > 0);
    let small = malloc(api, ws as usize / 2);
    // SAFETY: the emulator validates everything.
    let st = unsafe { api.aclnnMatmul().unwrap()(small, ws / 2, ex, s) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("smaller than"), "{}", msg(api));
    // Claiming the right size with a block that is too small is caught too.
    // SAFETY: as above.
    let st = unsafe { api.aclnnMatmul().unwrap()(small, ws, ex, s) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("run past the end"), "{}", msg(api));
    // And a workspace that overlaps an operand.
    let big = malloc(api, ws as usize + 256);
    let xo = tensor(api, big, &[4, 4], aclDataType::ACL_FLOAT);
    let (mut ws2, mut ex2) = (0u64, null_mut());
    // SAFETY: as above.
    assert_eq!(unsafe { api.aclnnMatmulGetWorkspaceSize().unwrap()(x, x, xo, 0, &mut ws2, &mut ex2) }, ACLNN_SUCCESS);
    // SAFETY: as above.
    let st = unsafe { api.aclnnMatmul().unwrap()(big, ws2, ex2, s) };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("overlaps operand"), "{}", msg(api));
}

#[test]
fn a_non_repeatable_executor_runs_once() {
    let api = api();
    let s = stream(api);
    let (p, q) = (malloc(api, 64), malloc(api, 64));
    upload(api, p, &[1.0, 2.0, 3.0, 4.0]);
    let (x, o) = (tensor(api, p, &[4], aclDataType::ACL_FLOAT), tensor(api, q, &[4], aclDataType::ACL_FLOAT));
    let (ex, _) = plan_muls(api, x, o);
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    assert_eq!(launch_muls(api, ex, s), ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("already launched"), "{}", msg(api));
    // A repeatable one runs as often as asked and is then destroyed explicitly.
    let (ex, _) = plan_muls(api, x, o);
    // SAFETY: a fresh executor.
    assert_eq!(unsafe { api.aclSetAclOpExecutorRepeatable().unwrap()(ex) }, ACLNN_SUCCESS);
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    assert_eq!(sync(api, s), ACL_SUCCESS, "{}", msg(api));
    // SAFETY: as above.
    assert_eq!(unsafe { api.aclDestroyAclOpExecutor().unwrap()(ex) }, ACLNN_SUCCESS);
    // SAFETY: as above.
    assert_eq!(unsafe { api.aclDestroyAclOpExecutor().unwrap()(ex) }, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("already destroyed"), "{}", msg(api));
    assert_eq!(download(api, q, 4).1, vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn use_after_free_and_double_free_are_caught() {
    let api = api();
    let s = stream(api);
    let (p, q) = (malloc(api, 64), malloc(api, 64));
    let (x, o) = (tensor(api, p, &[4], aclDataType::ACL_FLOAT), tensor(api, q, &[4], aclDataType::ACL_FLOAT));
    let (ex, _) = plan_muls(api, x, o);
    assert_eq!(free(api, p), ACL_SUCCESS);
    assert_eq!(launch_muls(api, ex, s), ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("use after free"), "{}", msg(api));
    assert!(tensor(api, p, &[4], aclDataType::ACL_FLOAT).is_null());
    assert!(msg(api).contains("use after free"), "{}", msg(api));
    assert_eq!(free(api, p), ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("double free"), "{}", msg(api));
    assert_eq!(free(api, (q as usize + 32) as *mut c_void), ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("inside the allocation"), "{}", msg(api));
}

#[test]
fn the_host_must_synchronise_before_touching_memory_that_queued_work_uses() {
    let api = api();
    let s = stream(api);
    let (p, q) = (malloc(api, 64), malloc(api, 64));
    upload(api, p, &[1.0, 2.0, 3.0, 4.0]);
    let (x, o) = (tensor(api, p, &[4], aclDataType::ACL_FLOAT), tensor(api, q, &[4], aclDataType::ACL_FLOAT));
    let (ex, _) = plan_muls(api, x, o);
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    // Reading the output before the stream ran.
    let (st, _) = download(api, q, 4);
    assert_eq!(st, ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("aclrtSynchronizeStream"), "{}", msg(api));
    // Overwriting the input the queued kernel still reads.
    // SAFETY: host slice of 4 floats.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            p,
            16,
            [0f32; 4].as_ptr() as *const c_void,
            16,
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("overwriting"), "{}", msg(api));
    // Freeing it, or destroying the stream, with the work still queued.
    assert_eq!(free(api, p), ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("still used by"), "{}", msg(api));
    // SAFETY: a live stream.
    assert_eq!(unsafe { api.aclrtDestroyStream().unwrap()(s) }, ACL_ERROR_RT_PARAM_INVALID);
    assert!(msg(api).contains("synchronise the stream"), "{}", msg(api));
    // Device-to-host async copies need pinned memory.
    let mut host = [0f32; 4];
    // SAFETY: host buffer of 16 bytes.
    let st = unsafe {
        api.aclrtMemcpyAsync().unwrap()(
            host.as_mut_ptr() as *mut c_void,
            16,
            q,
            16,
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST,
            s,
        )
    };
    assert_eq!(st, ACL_ERROR_INVALID_PARAM);
    assert!(msg(api).contains("aclrtMallocHost"), "{}", msg(api));
    // After synchronising, all is well.
    assert_eq!(sync(api, s), ACL_SUCCESS, "{}", msg(api));
    assert_eq!(download(api, q, 4), (ACL_SUCCESS, vec![2.0, 4.0, 6.0, 8.0]));
    // SAFETY: a drained stream.
    assert_eq!(unsafe { api.aclrtDestroyStream().unwrap()(s) }, ACL_SUCCESS);
    assert_eq!(sync(api, s), ACL_ERROR_RT_PARAM_INVALID);
    assert!(msg(api).contains("destroyed"), "{}", msg(api));
}

#[test]
fn uninitialised_device_memory_reads_as_nan() {
    let api = api();
    let p = malloc(api, 64);
    let (st, v) = download(api, p, 4);
    assert_eq!(st, ACL_SUCCESS);
    assert!(v.iter().all(|x| x.is_nan()), "{v:?}");
}

#[test]
fn a_tensor_list_owns_its_members() {
    let api = api();
    let p = malloc(api, 64);
    let (a, b) = (tensor(api, p, &[2], aclDataType::ACL_FLOAT), tensor(api, p, &[2], aclDataType::ACL_FLOAT));
    let members = [a as *const aclTensor, b as *const aclTensor];
    // SAFETY: two live tensors.
    let list = unsafe { api.aclCreateTensorList().unwrap()(members.as_ptr(), 2) };
    assert!(!list.is_null(), "{}", msg(api));
    // SAFETY: the emulator validates handles.
    unsafe {
        assert_eq!(api.aclDestroyTensor().unwrap()(a), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("owns it"), "{}", msg(api));
        assert_eq!(api.aclDestroyTensorList().unwrap()(list), ACLNN_SUCCESS);
        assert_eq!(api.aclDestroyTensor().unwrap()(b), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("aclDestroyTensorList"), "{}", msg(api));
        assert_eq!(api.aclDestroyTensorList().unwrap()(list), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("double destroy"), "{}", msg(api));
    }
}

#[test]
fn an_object_destroyed_before_the_launch_is_caught() {
    let api = api();
    let s = stream(api);
    let (p, q) = (malloc(api, 64), malloc(api, 64));
    let (x, o) = (tensor(api, p, &[4], aclDataType::ACL_FLOAT), tensor(api, q, &[4], aclDataType::ACL_FLOAT));
    let (ex, _) = plan_muls(api, x, o);
    // SAFETY: a live tensor.
    assert_eq!(unsafe { api.aclDestroyTensor().unwrap()(x) }, ACLNN_SUCCESS);
    assert_eq!(launch_muls(api, ex, s), ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("between GetWorkspaceSize and the launch"), "{}", msg(api));
    // An executor launched through another operator's entry point.
    let x2 = tensor(api, p, &[4], aclDataType::ACL_FLOAT);
    let (ex, _) = plan_muls(api, x2, o);
    // SAFETY: the emulator validates the executor.
    assert_eq!(unsafe { api.aclnnSigmoid().unwrap()(null_mut(), 0, ex, s) }, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("aclnnMulsGetWorkspaceSize"), "{}", msg(api));
}

#[test]
fn a_faulting_kernel_is_reported_at_synchronisation() {
    let api = api();
    let s = stream(api);
    let (p, i, q) = (malloc(api, 64), malloc(api, 64), malloc(api, 64));
    upload(api, p, &[1.0, 2.0, 3.0, 4.0]);
    // SAFETY: host slice.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            i,
            8,
            [7i32, 0].as_ptr() as *const c_void,
            8,
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_SUCCESS);
    let (x, idx, o) = (
        tensor(api, p, &[4, 1], aclDataType::ACL_FLOAT),
        tensor(api, i, &[2], aclDataType::ACL_INT32),
        tensor(api, q, &[2, 1], aclDataType::ACL_FLOAT),
    );
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects and out-pointers.
    assert_eq!(
        unsafe { api.aclnnIndexSelectGetWorkspaceSize().unwrap()(x, 0, idx, o, &mut ws, &mut ex) },
        ACLNN_SUCCESS
    );
    // SAFETY: as above.
    assert_eq!(unsafe { api.aclnnIndexSelect().unwrap()(null_mut(), 0, ex, s) }, ACLNN_SUCCESS);
    assert_eq!(sync(api, s), ACL_ERROR_RT_AICORE_EXCEPTION);
    assert!(msg(api).contains("index 7 is outside 0..4"), "{}", msg(api));
}

#[test]
fn the_backend_surfaces_the_runtime_error_text_and_leaks_nothing() {
    setup();
    let kinds = [
        dsv4emuObjectKind::DSV4EMU_TENSORS,
        dsv4emuObjectKind::DSV4EMU_SCALARS,
        dsv4emuObjectKind::DSV4EMU_INT_ARRAYS,
        dsv4emuObjectKind::DSV4EMU_TENSOR_LISTS,
        dsv4emuObjectKind::DSV4EMU_EXECUTORS,
        dsv4emuObjectKind::DSV4EMU_DEVICE_ALLOCATIONS,
        dsv4emuObjectKind::DSV4EMU_HOST_ALLOCATIONS,
        dsv4emuObjectKind::DSV4EMU_STREAMS,
    ];
    {
        let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
        let api = runtime().unwrap();
        let live = |k| {
            // SAFETY: plain enum argument.
            unsafe { api.dsv4emu_live_objects().unwrap()(k) }
        };
        let x = be.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]).unwrap();
        let idx = be.upload_index(&[2, -1, 0], &[3]).unwrap();
        let y = be.index_select(&x, &idx).unwrap();
        let z = be.concat(&[&y, &x], 0).unwrap();
        let s = be.softmax(&be.reduce(&z, 1, dsv4_core::backend::ReduceOp::Sum).unwrap(), 0).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![5.0, 6.0, 0.0, 0.0, 1.0, 2.0]);
        assert_eq!(be.download(&s).unwrap().len(), 6);
        // Only device memory (tensors and the pool), the stream and the executor cache (its
        // executors and the aclTensors they were planned with) stay alive between ops; trim
        // empties the cache.
        be.trim().unwrap();
        for k in &kinds[..5] {
            assert_eq!(live(*k), 0, "live objects of kind {k:?} after the ops");
        }
        // An index past the table: the backend refuses one whose values it knows on the host
        // (an upload); one computed on the device (here the top-1 position of 10 values) faults
        // the kernel, and the error carries the runtime's text.
        let table = be.upload(&[0.0; 8], &[4, 2]).unwrap();
        let uploaded = be.upload_index(&[9], &[1]).unwrap();
        let e = be.index_select(&table, &uploaded).err().expect("a known out-of-range index must fail").to_string();
        assert!(e.contains("index 9 is outside the 4 rows"), "{e}");
        let mut ten = [0.0f32; 10];
        ten[9] = 1.0;
        let (_, bad) = be.topk(&be.upload(&ten, &[10]).unwrap(), 1).unwrap();
        let r = be.index_select(&table, &bad).and_then(|t| be.download(&t));
        let e = r.expect_err("out-of-range index must fail").to_string();
        assert!(e.contains("aclrtSynchronizeStream") && e.contains("outside 0..4"), "{e}");
        drop((x, idx, y, z, s, table, uploaded, bad));
        drop(be);
        for k in kinds {
            assert_eq!(live(k), 0, "live objects of kind {k:?} after dropping the backend");
        }
    }
}

/// Re-runs this test binary with ASCEND_RT_VISIBLE_DEVICES=1 (of the emulator's 2 devices):
/// the runtime then shows one device, index 0.
#[test]
fn visible_devices_are_honoured() {
    if std::env::var_os("DSV4_TEST_VISIBLE_CHILD").is_some() {
        setup();
        let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
        drop(be);
        let e = dsv4_backend_ascend::open(1).err().map(|e| e.to_string()).expect("only one device is visible");
        assert!(e.contains("1 device(s)") && e.contains("ASCEND_RT_VISIBLE_DEVICES"), "{e}");
        return;
    }
    setup();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "visible_devices_are_honoured", "--nocapture"])
        .env("DSV4_TEST_VISIBLE_CHILD", "1")
        .env("ASCEND_RT_VISIBLE_DEVICES", "1")
        .env(EMULATOR_VAR, std::env::var_os(EMULATOR_VAR).unwrap())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[test]
fn events_order_work_across_streams() {
    let api = api();
    let (s1, s2) = (stream(api), stream(api));
    let (p, q, r) = (malloc(api, 64), malloc(api, 64), malloc(api, 64));
    upload(api, p, &[1.0, 2.0, 3.0, 4.0]);
    let t = |d| tensor(api, d, &[4], aclDataType::ACL_FLOAT);
    let (ex, _) = plan_muls(api, t(p), t(q));
    assert_eq!(launch_muls(api, ex, s1), ACLNN_SUCCESS);
    let mut ev = null_mut();
    // SAFETY: out-pointer to a local; live handles below.
    unsafe {
        assert_eq!(api.aclrtCreateEvent().unwrap()(&mut ev), ACL_SUCCESS);
        assert_eq!(api.aclrtRecordEvent().unwrap()(ev, s1), ACL_SUCCESS);
        assert_eq!(api.aclrtStreamWaitEvent().unwrap()(s2, ev), ACL_SUCCESS);
    }
    // s2 consumes s1's output after waiting for the event.
    let (ex, _) = plan_muls(api, t(q), t(r));
    assert_eq!(launch_muls(api, ex, s2), ACLNN_SUCCESS);
    // SAFETY: a live event.
    assert_eq!(unsafe { api.aclrtDestroyEvent().unwrap()(ev) }, ACL_ERROR_RT_PARAM_INVALID);
    assert!(msg(api).contains("synchronise first"), "{}", msg(api));
    assert_eq!(sync(api, s2), ACL_SUCCESS, "{}", msg(api));
    assert_eq!(download(api, r, 4), (ACL_SUCCESS, vec![4.0, 8.0, 12.0, 16.0]));
    // SAFETY: the event has been reached.
    assert_eq!(unsafe { api.aclrtDestroyEvent().unwrap()(ev) }, ACL_SUCCESS);
}

fn list(api: &Api, members: &[*mut aclTensor]) -> *mut aclTensorList {
    let m: Vec<*const aclTensor> = members.iter().map(|&t| t as *const aclTensor).collect();
    // SAFETY: live tensors; the list takes them over.
    let l = unsafe { api.aclCreateTensorList().unwrap()(m.as_ptr(), m.len() as u64) };
    assert!(!l.is_null(), "{}", msg(api));
    l
}

/// aclnnGroupedMatmulV4 GetWorkspaceSize with dsv4's non-quantised single-output arguments:
/// (status, workspace size, executor).
fn plan_gmm(
    api: &Api,
    x: *mut aclTensorList,
    w: *mut aclTensorList,
    gl: *mut aclTensor,
    out: *mut aclTensorList,
) -> (i32, u64, *mut aclOpExecutor) {
    let (mut ws, mut ex) = (0u64, null_mut());
    let n: *const aclTensorList = null();
    let f = api.aclnnGroupedMatmulV4GetWorkspaceSize().unwrap();
    // SAFETY: live objects or NULL for the optional lists; out-pointers to locals.
    let st =
        unsafe { f(x, w, n, n, n, n, n, n, gl, n, n, n, 3, 0, 1, 0, out, null_mut(), null_mut(), &mut ws, &mut ex) };
    (st, ws, ex)
}

/// The fused MoE kernels' documented limits on Atlas A2 (the emulator's default SoC): FLOAT32
/// grouped matmul only with a single 3-D weight, an INT64 group list, and sqrt-softplus gating
/// (normType 2) only on the 950. A group list that does not cover x's rows fails the kernel.
#[test]
fn fused_moe_kernels_check_their_documented_limits() {
    let api = api();
    let p = malloc(api, 4096);
    let f = aclDataType::ACL_FLOAT;
    // x [4, 2], two experts' weights [2, 3] as a list: refused for FLOAT32 on A2.
    let (st, _, _) = plan_gmm(
        api,
        list(api, &[tensor(api, p, &[4, 2], f)]),
        list(api, &[tensor(api, p, &[2, 3], f), tensor(api, p, &[2, 3], f)]),
        tensor(api, p, &[2], aclDataType::ACL_INT64),
        list(api, &[tensor(api, p, &[4, 3], f)]),
    );
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("single tensors"), "{}", msg(api));
    // One 3-D weight, but an INT32 group list.
    let (st, _, _) = plan_gmm(
        api,
        list(api, &[tensor(api, p, &[4, 2], f)]),
        list(api, &[tensor(api, p, &[2, 2, 3], f)]),
        tensor(api, p, &[2], aclDataType::ACL_INT32),
        list(api, &[tensor(api, p, &[4, 3], f)]),
    );
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("INT64"), "{}", msg(api));

    // Valid plan whose group list covers 3 of x's 4 rows: the kernel fails at the sync.
    let s = stream(api);
    let (xd, wd, od, gd) = (malloc(api, 64), malloc(api, 64), malloc(api, 64), malloc(api, 64));
    upload(api, xd, &[1.0; 8]);
    upload(api, wd, &[1.0; 12]);
    let counts: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    // SAFETY: 16 readable host bytes into a 64-byte device block.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            gd,
            64,
            counts.as_ptr() as *const c_void,
            16,
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
    let (x, w) = (list(api, &[tensor(api, xd, &[4, 2], f)]), list(api, &[tensor(api, wd, &[2, 2, 3], f)]));
    let (gl, out) = (tensor(api, gd, &[2], aclDataType::ACL_INT64), list(api, &[tensor(api, od, &[4, 3], f)]));
    let (st, ws, ex) = plan_gmm(api, x, w, gl, out);
    assert_eq!(st, ACLNN_SUCCESS, "{}", msg(api));
    let wsp = malloc(api, ws as usize);
    // SAFETY: the executor just planned, a workspace of the size asked, a live stream.
    assert_eq!(unsafe { api.aclnnGroupedMatmulV4().unwrap()(wsp, ws, ex, s) }, ACLNN_SUCCESS, "{}", msg(api));
    assert_ne!(sync(api, s), ACL_SUCCESS);
    assert!(msg(api).contains("covers 3 rows but x has 4"), "{}", msg(api));

    // Gating with V4's sqrt-softplus scores is a 950 kernel.
    let (mut ws, mut ex) = (0u64, null_mut());
    let (lx, y, idx, norm) = (
        tensor(api, p, &[2, 4], f),
        tensor(api, p, &[2, 2], f),
        tensor(api, p, &[2, 2], aclDataType::ACL_INT32),
        tensor(api, p, &[2, 4], f),
    );
    // SAFETY: live tensors, NULL optionals, out-pointers to locals.
    let st = unsafe {
        api.aclnnMoeGatingTopKV2GetWorkspaceSize().unwrap()(
            lx,
            null(),
            null(),
            null(),
            2,
            1,
            1,
            0,
            1,
            2,
            false,
            1.0,
            1e-20,
            y,
            idx,
            norm,
            &mut ws,
            &mut ex,
        )
    };
    assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("only on Ascend 950"), "{}", msg(api));
}

/// A repeatable executor relaunched on new buffers through aclSetInputTensorAddr /
/// aclSetOutputTensorAddr computes on the new data; the setters refuse a single-use executor,
/// an index past the planned operands, a tensor that was not planned there, and an unaligned
/// address.
#[test]
fn a_reused_executor_runs_on_the_addresses_it_is_given() {
    let api = api();
    let s = stream(api);
    let f = aclDataType::ACL_FLOAT;
    let (p, q) = (malloc(api, 64), malloc(api, 64));
    upload(api, p, &[1.0, 2.0, 3.0, 4.0]);
    let (x, o) = (tensor(api, p, &[4], f), tensor(api, q, &[4], f));
    let (ex, _) = plan_muls(api, x, o);
    let set_in = api.aclSetInputTensorAddr().unwrap();
    let set_out = api.aclSetOutputTensorAddr().unwrap();
    // SAFETY: live or deliberately wrong handles and addresses, validated by the emulator.
    unsafe {
        assert_eq!(set_in(ex, 0, x, p), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("not repeatable"), "{}", msg(api));
        assert_eq!(api.aclSetAclOpExecutorRepeatable().unwrap()(ex), ACLNN_SUCCESS);
    }
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    let (p2, q2) = (malloc(api, 64), malloc(api, 64));
    upload(api, p2, &[10.0, 20.0, 30.0, 40.0]);
    // SAFETY: as above.
    unsafe {
        assert_eq!(set_in(ex, 1, x, p2), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("outside the 1 inputs"), "{}", msg(api));
        assert_eq!(set_in(ex, 0, o, p2), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("is not inputs[0]"), "{}", msg(api));
        assert_eq!(set_in(ex, 0, x, (p2 as *mut u8).add(4) as *mut c_void), ACLNN_ERR_PARAM_INVALID);
        assert!(msg(api).contains("32-byte aligned"), "{}", msg(api));
        assert_eq!(set_in(ex, 0, x, p2), ACLNN_SUCCESS, "{}", msg(api));
        assert_eq!(set_out(ex, 0, o, q2), ACLNN_SUCCESS, "{}", msg(api));
    }
    assert_eq!(launch_muls(api, ex, s), ACLNN_SUCCESS);
    assert_eq!(sync(api, s), ACL_SUCCESS, "{}", msg(api));
    assert_eq!(download(api, q, 4).1, vec![2.0, 4.0, 6.0, 8.0]);
    assert_eq!(download(api, q2, 4).1, vec![20.0, 40.0, 60.0, 80.0]);
    // SAFETY: our repeatable executor, no queued launch left.
    assert_eq!(unsafe { api.aclDestroyAclOpExecutor().unwrap()(ex) }, ACLNN_SUCCESS);
}
