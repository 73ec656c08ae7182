//! Memory the host can give this process now: `MemAvailable` of `/proc/meminfo`, capped by the
//! headroom of the process's memory cgroup and its ancestors: the limit less the usage less
//! the inactive file cache, which the kernel reclaims before it kills (v2: `memory.max`,
//! `memory.current`, `inactive_file` of `memory.stat`; v1: `memory.limit_in_bytes`,
//! `memory.usage_in_bytes`, `total_inactive_file`; the working set as kubelet and `docker
//! stats` count it). Without the cap, a container limited to 8 GiB on a 512 GiB host would be
//! told about the host's memory, and `--weight-memory auto` or a `--kv-cache-memory` fraction
//! would size past the limit, where the kernel kills the process. Without the cache term, a
//! checkpoint read once stays charged to the cgroup as cache and the next run would see
//! almost no room. Limits set above the cgroup namespace's root, a memory controller mounted
//! elsewhere than `/sys/fs/cgroup[/memory]`, and v2's `memory.high` are not seen.

use std::path::Path;

/// What [`available`] reads, for tests: the text of `/proc/meminfo`, of `/proc/self/cgroup`,
/// and a file reader for the cgroup filesystem.
pub(crate) fn available_from(
    meminfo: &str,
    proc_cgroup: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<usize> {
    let host = dsv4_core::kv::mem_available(meminfo)?;
    Some(cgroup_headroom(proc_cgroup, read).map_or(host, |c| host.min(c)))
}

/// `MemAvailable`, capped by the cgroup headroom (module docs); None off Linux.
pub(crate) fn available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    available_from(&meminfo, &cgroup, &|p| std::fs::read_to_string(p).ok())
}

/// A limit at or above this is "no limit" (cgroup v1 writes about 2⁶³ rounded to a page).
const UNLIMITED: u64 = 1 << 62;

/// The smallest headroom over the memory cgroup of this process and its ancestors, or None
/// when none of them has a limit (or the files are not there).
fn cgroup_headroom(proc_cgroup: &str, read: &dyn Fn(&Path) -> Option<String>) -> Option<usize> {
    let mut best: Option<u64> = None;
    for line in proc_cgroup.lines() {
        // `hierarchy-id:controllers:path`; v2 is `0::path`, v1's memory one `N:memory:path`.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (root, limit_file, usage_file, cache_key) = if id == "0" && controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        } else {
            continue;
        };
        // The cgroup itself, then each ancestor up to the root of the hierarchy.
        let mut dir = Some(Path::new(path));
        while let Some(d) = dir {
            let base = Path::new(root).join(d.strip_prefix("/").unwrap_or(d));
            let limit = read(&base.join(limit_file)).and_then(|s| parse_limit(&s));
            let usage = read(&base.join(usage_file)).and_then(|s| s.trim().parse::<u64>().ok());
            if let (Some(limit), Some(usage)) = (limit, usage) {
                let cache = read(&base.join("memory.stat")).and_then(|s| stat_value(&s, cache_key)).unwrap_or(0);
                let room = limit.saturating_sub(usage.saturating_sub(cache));
                best = Some(best.map_or(room, |b| b.min(room)));
            }
            dir = d.parent();
        }
    }
    best.map(|b| usize::try_from(b).unwrap_or(usize::MAX))
}

/// The value of `key` in a `memory.stat` text (`key value` lines).
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some(key)).then(|| parts.next()?.parse().ok()).flatten()
    })
}

/// A limit file's value in bytes; None for "max" (v2) or a value at [`UNLIMITED`] (v1).
fn parse_limit(s: &str) -> Option<u64> {
    let v: u64 = s.trim().parse().ok()?;
    (v < UNLIMITED).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MEMINFO: &str = "MemTotal: 134217728 kB\nMemFree: 1000 kB\nMemAvailable: 67108864 kB\n";
    const HOST: usize = 64 << 30;

    fn files(pairs: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |p: &Path| map.get(p.to_str().unwrap()).cloned()
    }

    #[test]
    fn no_cgroup_limit_leaves_mem_available() {
        assert_eq!(available_from(MEMINFO, "", &files(&[])), Some(HOST));
        // v2 with `max`, v1 with the "unlimited" value this machine's cgroup v1 reports.
        let v2 = files(&[("/sys/fs/cgroup/memory.max", "max\n"), ("/sys/fs/cgroup/memory.current", "5\n")]);
        assert_eq!(available_from(MEMINFO, "0::/\n", &v2), Some(HOST));
        let v1 = files(&[
            ("/sys/fs/cgroup/memory/a/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/a/memory.usage_in_bytes", "4838424576\n"),
        ]);
        assert_eq!(available_from(MEMINFO, "4:memory:/a\n0::/\n", &v1), Some(HOST));
    }

    #[test]
    fn a_cgroup_limit_caps_it() {
        // v2: an 8 GiB container using 3 GiB has 5 GiB left.
        let v2 =
            files(&[("/sys/fs/cgroup/memory.max", "8589934592\n"), ("/sys/fs/cgroup/memory.current", "3221225472\n")]);
        assert_eq!(available_from(MEMINFO, "0::/\n", &v2), Some(5 << 30));
        // v1, the limit on an ancestor (the cgroup's own is unlimited); the smallest wins.
        let v1 = files(&[
            ("/sys/fs/cgroup/memory/k8s/pod/memory.limit_in_bytes", "9223372036854771712"),
            ("/sys/fs/cgroup/memory/k8s/pod/memory.usage_in_bytes", "1073741824"),
            ("/sys/fs/cgroup/memory/k8s/memory.limit_in_bytes", "2147483648"),
            ("/sys/fs/cgroup/memory/k8s/memory.usage_in_bytes", "1073741824"),
        ]);
        assert_eq!(available_from(MEMINFO, "7:cpu,cpuacct:/k8s/pod\n4:memory:/k8s/pod\n", &v1), Some(1 << 30));
        // Inactive file cache counts as room (v2 `inactive_file`; v1 the hierarchical total,
        // not the cgroup's own `inactive_file`).
        let cached = files(&[
            ("/sys/fs/cgroup/memory.max", "8589934592\n"),
            ("/sys/fs/cgroup/memory.current", "7516192768\n"),
            (
                "/sys/fs/cgroup/memory.stat",
                "anon 1073741824\nfile 6442450944\nactive_file 2147483648\ninactive_file 4294967296\n",
            ),
        ]);
        assert_eq!(available_from(MEMINFO, "0::/\n", &cached), Some(5 << 30));
        let v1_cached = files(&[
            ("/sys/fs/cgroup/memory/c/memory.limit_in_bytes", "4294967296"),
            ("/sys/fs/cgroup/memory/c/memory.usage_in_bytes", "4294967296"),
            ("/sys/fs/cgroup/memory/c/memory.stat", "inactive_file 1\ntotal_inactive_file 1073741824\n"),
        ]);
        assert_eq!(available_from(MEMINFO, "4:memory:/c\n", &v1_cached), Some(1 << 30));
        // Usage over the limit: nothing left, not an underflow.
        let over = files(&[("/sys/fs/cgroup/x/memory.max", "100"), ("/sys/fs/cgroup/x/memory.current", "200")]);
        assert_eq!(available_from(MEMINFO, "0::/x\n", &over), Some(0));
        // A cgroup limit above the host's available memory leaves the host's figure.
        let big = files(&[("/sys/fs/cgroup/memory.max", "137438953472"), ("/sys/fs/cgroup/memory.current", "0")]);
        assert_eq!(available_from(MEMINFO, "0::/", &big), Some(HOST));
    }

    #[test]
    fn unreadable_or_garbled_files_are_ignored() {
        let junk = files(&[("/sys/fs/cgroup/memory.max", "lots"), ("/sys/fs/cgroup/memory.current", "12")]);
        assert_eq!(available_from(MEMINFO, "0::/\ngarbage line\n", &junk), Some(HOST));
        assert_eq!(available_from("no such field", "0::/", &junk), None);
    }

    #[test]
    fn this_machine_answers() {
        if Path::new("/proc/meminfo").exists() {
            let a = available().expect("Linux has MemAvailable");
            assert!(a > 0);
        }
    }
}
