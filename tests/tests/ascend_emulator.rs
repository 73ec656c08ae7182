//! The conformance suite on the Ascend backend, running on dsv4's CPU emulator of AscendCL /
//! aclnn (`tests/ascend-emu`, loaded through `DSV4_ASCEND_EMULATOR` like a CANN install):
//! every fixture's prefill logits, and decode / chunked prefill against the full forward,
//! with the CPU backend's tolerances. Emulator-verified, not hardware-verified.

use std::path::{Path, PathBuf};
use std::sync::Once;

use dsv4_backend_ascend::AscendBackend;
use dsv4_core::Backend;

const TOLERANCE: f64 = 1e-4;

/// Builds the emulator library (a no-op when fresh) and points the loader at it, once.
fn backend() -> AscendBackend {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        if std::env::var_os(dsv4_ascend_sys::EMULATOR_VAR).is_none() {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
            let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO")));
            let lib = dsv4_ascend_sys::emulator::build(&cargo, &manifest).unwrap_or_else(|e| panic!("{e}"));
            // Set before any thread loads the runtime (this Once runs first in every test).
            std::env::set_var(dsv4_ascend_sys::EMULATOR_VAR, lib);
        }
    });
    dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_fixture_matches_the_reference_on_the_emulator() {
    let be = backend();
    assert!(be.describe().contains("emulator"), "{}", be.describe());
    dsv4_tests::check_every_fixture(&be, TOLERANCE);
}

#[test]
fn decode_and_chunked_prefill_match_the_full_forward_on_the_emulator() {
    dsv4_tests::check_decode_schedules(&backend(), TOLERANCE);
}
