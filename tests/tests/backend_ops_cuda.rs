//! The op-level backend suite on CUDA, once there is a CUDA backend to run it on.
//!
//! `backend-cuda` only detects the driver library so far: it has no `dsv4_core::Backend`
//! implementation, so there is nothing to instantiate `dsv4_tests::backend_suite!` with. When
//! it has one, this file becomes `backend_suite!(cuda())` behind a check that a device opens
//! (printing the reason and passing when none does).

#[test]
fn cuda_backend_suite() {
    println!("CUDA backend has no Backend implementation yet: the op-level suite does not run on CUDA");
}
