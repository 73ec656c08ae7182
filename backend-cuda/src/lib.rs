//! The CUDA backend. This build only detects the driver library (`libcuda.so.1`) at run time:
//! the `Backend` implementation is the CUDA backend issue's work, so opening it is an error
//! that says so.

use dsv4_core::error::{Error, Result};

const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// What `dsv4 devices` prints for CUDA.
pub fn probe() -> std::result::Result<String, String> {
    // SAFETY: loading the system's CUDA driver library runs its initialisers only; nothing is
    // called through it here.
    match unsafe { libloading::Library::new(DRIVER_LIBRARY) } {
        Ok(_) => Ok(format!("driver library {DRIVER_LIBRARY} found")),
        Err(e) => Err(format!(
            "the CUDA driver library {DRIVER_LIBRARY} could not be loaded ({e}); install the NVIDIA driver \
             or add its directory to LD_LIBRARY_PATH"
        )),
    }
}

/// Opens the CUDA backend; fails with an actionable message on this build.
pub fn open() -> Result<std::convert::Infallible> {
    match probe() {
        Err(e) => Err(Error::backend("cuda", e)),
        Ok(found) => Err(Error::backend(
            "cuda",
            format!("{found}, but this build of dsv4 does not implement the CUDA backend yet; use --backend cpu"),
        )),
    }
}
