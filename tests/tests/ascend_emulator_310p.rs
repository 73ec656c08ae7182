//! The emulator posing as an Atlas inference-series NPU (Ascend 310P3, `DSV4_ASCEND_EMU_SOC`):
//! the device opens, but it cannot hold V4's decoding state (no `aclnnInplaceIndexCopy` there),
//! so the backend says so up front (`unable_to_run_v4`, which `dsv4 devices` and `--backend
//! auto` read) and a KV pool is refused with the same reason. A separate test binary, because
//! the SoC is fixed for the process. Emulator-verified, not hardware-verified.

use dsv4_core::backend::{Backend, RowFormat};

#[test]
fn a_310p_opens_but_says_it_cannot_run_v4() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend310P3");
    let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.soc(), "Ascend310P3");
    let why = be.unable_to_run_v4().expect("a 310P cannot run V4");
    assert!(why.contains("aclnnInplaceIndexCopy") && why.contains("Ascend310P3"), "{why}");
    let e = be.alloc_pool(16, 8, RowFormat::F32).err().expect("no KV pool on a 310P").to_string();
    assert!(e.contains(&why), "{e}");
}
