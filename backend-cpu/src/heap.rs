//! The process heap the CPU backend's activations live in: mimalloc, which the `dsv4` binary
//! installs as its global allocator (`cli/src/main.rs`), and how long it keeps freed pages.
//!
//! mimalloc returns memory that stayed free for `purge_delay` (1 s in v3) to the kernel. A
//! prefill's activations are megabytes each, on transparent huge pages: once returned, the
//! next allocation faults them in and the kernel zeroes them again. In a `perf` profile of
//! `dsv4 bench --contexts 512,512,512` on the 0.75 B benchmark model, those faults
//! (`clear_page_erms` under `do_huge_pmd_anonymous_page`) and the `madvise` calls took about
//! 5% of the samples; with a 10 s delay the run took 3.4 thousand page faults instead of
//! 5.7 to 8.3 thousand (`perf stat -e page-faults`), the rest being the weights'. A server
//! between requests keeps its activation memory the same way for [`FREED_PAGES_KEPT_MS`].

use std::os::raw::{c_int, c_long};

/// How long freed heap pages stay with the process before they go back to the kernel, in
/// milliseconds.
pub const FREED_PAGES_KEPT_MS: i64 = 10_000;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (`include/mimalloc.h`; libmimalloc-sys
/// 0.1.49 builds v3 and names no constant for it). `purge_delay_is_option_15` checks the index
/// against the option's documented default.
const MI_OPTION_PURGE_DELAY: c_int = 15;

// The `mimalloc` library that libmimalloc-sys builds and links (`links = "mimalloc"`); its
// option functions are part of its public C API (`mimalloc.h`).
extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
    #[cfg(test)]
    fn mi_option_get(option: c_int) -> c_long;
}

// Links the C library this module calls into (the crate is otherwise unused here).
use libmimalloc_sys as _;

/// Makes mimalloc keep freed pages for [`FREED_PAGES_KEPT_MS`] (module docs), unless
/// `MIMALLOC_PURGE_DELAY` is set in the environment (then the user's value stands). Call it
/// once, early in `main`; without mimalloc as the global allocator it changes nothing.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores the value in mimalloc's option table (an atomic
    // store); any option index below `_mi_option_last` is valid, and 15 is one (see
    // `MI_OPTION_PURGE_DELAY`).
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, FREED_PAGES_KEPT_MS as c_long) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index 15 is `purge_delay`: its v3 default is 1000 ms, a value no neighbouring option
    /// defaults to; after [`keep_freed_pages`] it holds [`FREED_PAGES_KEPT_MS`].
    #[test]
    fn purge_delay_is_option_15() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            panic!("unset MIMALLOC_PURGE_DELAY to run this test: it checks mimalloc's default");
        }
        // SAFETY: reads mimalloc's option table; 15 is a valid index (see above).
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        keep_freed_pages();
        // SAFETY: as above.
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, FREED_PAGES_KEPT_MS as c_long);
    }
}
