//! The Ascend backend. This build only detects the runtime: the `Backend` implementation over
//! aclnn (and its CI emulator) is the Ascend backend issue's work, so opening the backend is an
//! error that says so rather than a silent fallback.

use dsv4_core::error::{Error, Result};

/// What `dsv4 devices` prints for Ascend.
pub fn probe() -> std::result::Result<String, String> {
    match dsv4_ascend_sys::load_runtime() {
        Ok((path, _lib)) => Ok(format!("runtime found at {}", path.display())),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens the Ascend backend; fails with an actionable message on this build.
pub fn open() -> Result<std::convert::Infallible> {
    match dsv4_ascend_sys::load_runtime() {
        Err(e) => Err(Error::backend("ascend", e.to_string())),
        Ok((path, _)) => Err(Error::backend(
            "ascend",
            format!(
                "runtime found at {}, but this build of dsv4 does not implement the Ascend backend yet; use --backend cpu",
                path.display()
            ),
        )),
    }
}
