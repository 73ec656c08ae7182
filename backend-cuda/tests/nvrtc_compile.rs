//! Every kernel source compiles with NVRTC, with the options the GPU device uses, for sm_80
//! (A100) and sm_90 (H100/H200), and the PTX has an `.entry` for every kernel of the file.
//!
//! Needs only `libnvrtc` (no GPU, no driver): CI installs it from the `nvidia-cuda-nvrtc-cu12`
//! wheel (`.ci/run`) and sets `DSV4_REQUIRE_NVRTC=1`, which turns a missing library into a
//! failure. Elsewhere, without the library, the test prints why and passes.

use dsv4_backend_cuda::driver::{self, compile_ptx};
use dsv4_backend_cuda::kernels::SOURCES;

const ARCHS: [u32; 2] = [80, 90];

/// The library's version, or `None` (with the reason printed) when it cannot be loaded and is
/// not required.
fn nvrtc() -> Option<(i32, i32)> {
    let required = std::env::var("DSV4_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let found = driver::NVRTC
        .find()
        .map_err(|e| e.to_string())
        .and_then(|file| driver::nvrtc_version().map(|v| (file, v)).map_err(|e| e.to_string()));
    match found {
        Ok((file, v)) => {
            println!("NVRTC {}.{} from {file}", v.0, v.1);
            Some(v)
        }
        Err(why) if required => panic!("DSV4_REQUIRE_NVRTC=1 but NVRTC is unusable: {why}"),
        Err(why) => {
            println!("skipped: NVRTC is not available here ({why}); set DSV4_REQUIRE_NVRTC=1 to make this a failure");
            None
        }
    }
}

/// Names of the `.entry` directives of a PTX module.
fn entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| {
            l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry "))
        })
        .map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or(""))
        .collect()
}

#[test]
fn every_kernel_source_compiles_to_ptx_for_sm80_and_sm90() {
    let Some(_) = nvrtc() else { return };
    let archs = driver::nvrtc_archs().expect("NVRTC lists its architectures");
    let mut failures = Vec::new();
    let mut kernels = 0;
    for arch in ARCHS {
        assert!(archs.contains(&arch), "this NVRTC does not compile for compute_{arch} (it has {archs:?})");
        for source in SOURCES {
            match compile_ptx(&source.program(), source.file, arch) {
                Ok(ptx) => {
                    assert!(ptx.contains(&format!(".target sm_{arch}")), "{}: PTX for another target", source.file);
                    let found = entries(&ptx);
                    for k in source.kernels() {
                        if !found.contains(&k) {
                            failures.push(format!("{} (compute_{arch}): no .entry {k} in the PTX", source.file));
                        }
                        kernels += 1;
                    }
                }
                Err(e) => failures.push(format!("{} (compute_{arch}): {e}", source.file)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    println!("{} files, {} kernels compiled for compute_{ARCHS:?}", SOURCES.len(), kernels / ARCHS.len());
}

#[test]
fn a_compile_error_comes_back_with_the_compiler_log() {
    let Some(_) = nvrtc() else { return };
    let e =
        compile_ptx("extern \"C\" __global__ void dsv4_broken(float* x) { x[0] = undeclared_name; }", "broken.cu", 80)
            .unwrap_err()
            .to_string();
    assert!(e.contains("broken.cu") && e.contains("undeclared_name") && e.contains("compute_80"), "{e}");
}

#[test]
fn entries_are_read_from_ptx_directives() {
    let ptx = ".version 8.7\n.target sm_90\n.visible .entry dsv4_a(\n\t.param .u64 p\n)\n{\n}\n.entry dsv4_b (\n";
    assert_eq!(entries(ptx), vec!["dsv4_a", "dsv4_b"]);
}
