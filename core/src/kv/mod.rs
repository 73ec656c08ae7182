//! The paged decoding state (spec §C): device pools allocated once from a memory budget, with
//! per-sequence block tables, rows appended in place, a choice of row formats (`f32`, `bf16`,
//! the official `fp8`), and prefix reuse that restores the sliding window and the compressors'
//! carry along with the compressed KV.
//!
//! * [`format`]: row formats and their codec (bytes per row of each);
//! * [`layout`]: what a block holds and a sequence's footprint, from the config alone;
//! * [`blocks`]: the block allocator with reference counts and the prefix-cache index;
//! * [`cache`]: the pools themselves ([`KvCache`]), sequences, and the per-step plan of rows
//!   that the graph reads and writes.

pub mod blocks;
pub mod cache;
pub mod format;
pub mod layout;

pub use cache::{
    human_bytes, CacheStats, CarrySnapshot, KindPlan, KvCache, KvConfig, LayerPools, SeqCompressPlan, Sequence,
    StepPlan,
};
pub use format::{KvDtype, RowFormat};

/// `MemAvailable` of a `/proc/meminfo` text, in bytes (the CPU backend's free memory caps it by
/// the memory cgroup's headroom).
pub fn mem_available(meminfo: &str) -> Option<usize> {
    proc_bytes_field(meminfo, "MemAvailable")
}

/// The value of the `field: N [kB]` line of a `/proc` text (`/proc/meminfo`,
/// `/proc/self/smaps_rollup`), in bytes; None when the line is missing, malformed or overflows.
pub fn proc_bytes_field(text: &str, field: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let mut parts = line[field.len() + 1..].split_whitespace();
    let value: usize = parts.next()?.parse().ok()?;
    let scale = match parts.next() {
        None => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}
