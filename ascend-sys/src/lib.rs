//! Raw AscendCL / aclnn FFI, resolved at run time with `libloading` so that building dsv4
//! needs no CANN install.
//!
//! This crate currently finds the runtime libraries; the function table (bindgen output of a
//! header written from the public documentation) arrives with the Ascend backend issue.

use std::path::{Path, PathBuf};

/// The libraries dsv4 needs from a CANN toolkit.
pub const RUNTIME_LIBRARY: &str = "libascendcl.so";

/// Environment variables that point at a CANN install, in the order they are consulted.
pub const TOOLKIT_VARS: &[&str] = &["DSV4_ASCEND_LIB_DIR", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"];

/// Standard install locations tried after the variables.
pub const STANDARD_DIRS: &[&str] =
    &["/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/latest", "/usr/local/Ascend/cann"];

/// Why the runtime could not be found, with what was tried.
#[derive(Debug, Clone)]
pub struct NotFound {
    pub tried: Vec<PathBuf>,
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Ascend runtime ({RUNTIME_LIBRARY}) was not found; tried {}. Install CANN and set \
             ASCEND_TOOLKIT_HOME (e.g. `source /usr/local/Ascend/ascend-toolkit/set_env.sh`), or set \
             DSV4_ASCEND_LIB_DIR to the directory that holds {RUNTIME_LIBRARY}",
            if self.tried.is_empty() {
                "nothing".to_string()
            } else {
                self.tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            }
        )
    }
}

/// Candidate paths of `libascendcl.so`, most specific first.
pub fn candidate_paths() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![];
    for var in TOOLKIT_VARS {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(v);
            dirs.push(p.clone());
            dirs.push(p.join("lib64"));
        }
    }
    for d in STANDARD_DIRS {
        dirs.push(Path::new(d).join("lib64"));
    }
    dirs.into_iter().map(|d| d.join(RUNTIME_LIBRARY)).collect()
}

/// Loads the AscendCL runtime library from the first candidate that exists and loads.
pub fn load_runtime() -> Result<(PathBuf, libloading::Library), NotFound> {
    let tried = candidate_paths();
    for p in &tried {
        if p.exists() {
            // SAFETY: loading a shared library runs its initialisers; libascendcl.so is the
            // vendor runtime the user pointed us at, loaded once and kept for the process.
            if let Ok(lib) = unsafe { libloading::Library::new(p) } {
                return Ok((p.clone(), lib));
            }
        }
    }
    Err(NotFound { tried })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runtime_names_the_variable() {
        // No CANN on CI machines: the error must say what to set.
        if load_runtime().is_ok() {
            return;
        }
        let msg = load_runtime().unwrap_err().to_string();
        assert!(msg.contains("ASCEND_TOOLKIT_HOME") && msg.contains(RUNTIME_LIBRARY), "{msg}");
    }
}
