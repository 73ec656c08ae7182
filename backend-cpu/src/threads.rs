//! The CPU backend's one pool of threads: a fixed team that spins between jobs.
//!
//! Decoding a token runs hundreds of small parallel pieces (one GEMV per weight matrix, a few
//! tens of microseconds each). A pool whose idle threads sleep — rayon's, which this backend
//! used before — pays a futex wake-up and a latch wait per piece, which a profile of decode put
//! at ~16% of the time. This team's workers instead spin on a job counter for a while after
//! each job (`SPIN`), so the next job of the same token starts within a cache-line transfer;
//! only a team idle for longer than that parks (on a condvar) and is woken on the next job.
//! llama.cpp's CPU backend does the same.
//!
//! A job is `f(part, parts)` run once for every `part` in `0..parts` (`parts` = team size),
//! part 0 on the calling thread. [`for_each`] hands out items from a shared counter, so a part
//! that starts late takes fewer. Every item is computed the same way on whichever thread, so
//! results never depend on the team size.
//!
//! The team is process-wide, sized once: `DSV4_THREADS` if set, else the number of physical
//! cores this process may run on. A job started while the team is busy (another thread's
//! job, or a job started from inside a job) runs on the calling thread alone.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// The environment variable that sets the team size.
pub const THREADS_ENV: &str = "DSV4_THREADS";

/// How long an idle worker spins for the next job before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// A job as the workers see it: a pointer to the caller's closure, valid while the job runs.
type JobRef = *const (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// Incremented to start each job; workers wait for it to change.
    epoch: AtomicU64,
    /// The running job (set before `epoch` is incremented, read after it is seen).
    job: UnsafeCell<Option<JobRef>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    /// Workers parked on `wake` (they wait for `epoch` to pass the value they saw).
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread that holds the team's `busy` lock, before it
// publishes the job with a release increment of `epoch`, and is cleared only after every
// worker has reported done (acquire load of `pending` reaching 0); workers read it only
// between seeing the new epoch (acquire) and decrementing `pending` (release). So the cell is
// never written while read; everything else in `Shared` is atomics or locks.
unsafe impl Sync for Shared {}

struct Team {
    shared: &'static Shared,
    /// Held by the thread whose job is running.
    busy: Mutex<()>,
    /// Team size, the calling thread included.
    size: usize,
}

thread_local! {
    /// Set on team workers, and on a caller while its job runs: a nested job runs inline.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let size = configured_size();
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        }));
        for part in 1..size {
            std::thread::Builder::new()
                .name(format!("dsv4-cpu-{part}"))
                .spawn(move || worker(shared, part, size))
                .expect("spawning a CPU worker thread");
        }
        Team { shared, busy: Mutex::new(()), size }
    })
}

/// The team size: `DSV4_THREADS` when set to a positive number, else the physical cores.
fn configured_size() -> usize {
    if let Some(n) = std::env::var(THREADS_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    physical_cores()
}

/// Physical cores among the CPUs this process may use: the logical CPU count, divided by the
/// SMT width that Linux reports (`thread_siblings_list` of cpu0); the logical count elsewhere.
fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let siblings = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        .ok()
        .map(|s| count_cpus(s.trim()))
        .unwrap_or(1)
        .max(1);
    (logical / siblings).max(1)
}

/// Number of CPUs in a Linux CPU list such as `0,64` or `0-1`.
fn count_cpus(list: &str) -> usize {
    list.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}

fn worker(shared: &'static Shared, part: usize, parts: usize) {
    IN_JOB.with(|f| f.set(true));
    let mut seen = 0u64;
    loop {
        seen = wait_for_job(shared, seen);
        // SAFETY: the epoch we just saw (acquire) was published after `job` was set, and the
        // job stays set until `pending` reaches 0, which needs our decrement below.
        let job = unsafe { (*shared.job.get()).expect("a job is set while its epoch runs") };
        // SAFETY: the caller's closure outlives the job: `run` does not return before every
        // worker has decremented `pending`.
        let f = unsafe { &*job };
        if catch_unwind(AssertUnwindSafe(|| f(part, parts))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

/// One round of a spin-wait: a pause instruction for the first rounds, then a yield of the
/// time slice, so that on a machine with more runnable threads than cores the thread being
/// waited for gets to run (spinning through its time slice would delay it by a whole slice).
#[inline]
fn relax(spins: u32) {
    if spins < 256 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Waits until the epoch differs from `seen`: spinning for [`SPIN`], then parked.
fn wait_for_job(shared: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = shared.epoch.load(Ordering::Acquire);
        if now != seen {
            return now;
        }
        spins = spins.wrapping_add(1);
        relax(spins);
        if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
            break;
        }
    }
    let mut parked = shared.parked.lock().unwrap_or_else(|e| e.into_inner());
    *parked += 1;
    loop {
        let now = shared.epoch.load(Ordering::Acquire);
        if now != seen {
            *parked -= 1;
            return now;
        }
        parked = shared.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
    }
}

/// The number of parts a job is split into (the team size).
pub fn size() -> usize {
    team().size
}

/// Runs `f(part, parts)` for every part of the team, part 0 on this thread, and returns when
/// all are done. When the team is busy or has one thread, runs `f(0, 1)` here instead.
///
/// Panics (after every part has finished) if a part panicked.
pub fn run(f: &(dyn Fn(usize, usize) + Sync)) {
    let team = team();
    if team.size == 1 || IN_JOB.with(|j| j.get()) {
        return f(0, 1);
    }
    // A poisoned lock only means an earlier job panicked (and reported it): the team is fine.
    let _busy = match team.busy.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return f(0, 1),
    };
    let shared = team.shared;
    shared.pending.store(team.size - 1, Ordering::Relaxed);
    // SAFETY: the cell is only written under `busy` (held), while no job runs (the previous
    // job's `pending` reached 0 before its `run` returned). The lifetime is erased: the
    // closure outlives the job because this function waits for every worker below.
    unsafe {
        let erased: JobRef = std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), JobRef>(f);
        *shared.job.get() = Some(erased);
    }
    shared.epoch.fetch_add(1, Ordering::Release);
    {
        let parked = shared.parked.lock().unwrap_or_else(|e| e.into_inner());
        if *parked > 0 {
            shared.wake.notify_all();
        }
    }
    IN_JOB.with(|j| j.set(true));
    let own = catch_unwind(AssertUnwindSafe(|| f(0, team.size)));
    IN_JOB.with(|j| j.set(false));
    let mut spins = 0u32;
    while shared.pending.load(Ordering::Acquire) != 0 {
        spins = spins.wrapping_add(1);
        relax(spins);
    }
    // SAFETY: every worker is done with the job (pending is 0), and we hold `busy`.
    unsafe { *shared.job.get() = None };
    let worker_panicked = shared.panicked.swap(false, Ordering::Relaxed);
    if let Err(p) = own {
        std::panic::resume_unwind(p);
    }
    assert!(!worker_panicked, "a CPU worker thread panicked");
}

/// Calls `f(item)` for every item in `0..n`, spread over the team: parts claim `grain` items
/// at a time from a shared counter. Runs on this thread alone when `work` (a cost estimate:
/// elements or multiply-adds) is below `min_work`.
pub fn for_each(n: usize, grain: usize, work: usize, min_work: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if work < min_work || n == 1 {
        return (0..n).for_each(f);
    }
    let grain = grain.max(1);
    let next = AtomicUsize::new(0);
    run(&|_, _| loop {
        let start = next.fetch_add(grain, Ordering::Relaxed);
        if start >= n {
            break;
        }
        (start..(start + grain).min(n)).for_each(&f);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_and_nested_jobs_run_inline() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..200 {
            for_each(hits.len(), 7, usize::MAX, 0, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                if i == 3 {
                    // A nested job: runs on this thread, every item once.
                    let inner = AtomicUsize::new(0);
                    for_each(10, 1, usize::MAX, 0, |_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(inner.load(Ordering::Relaxed), 10);
                }
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 200));
    }

    #[test]
    fn concurrent_callers_and_parked_workers_are_served() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..50 {
                        let sum = AtomicUsize::new(0);
                        for_each(100, 3, usize::MAX, 0, |i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 4950);
                        if t == 0 && round % 10 == 0 {
                            // Long enough for idle workers to park.
                            std::thread::sleep(SPIN * 2);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_is_reported_and_the_team_stays_usable() {
        let r = std::panic::catch_unwind(|| for_each(64, 1, usize::MAX, 0, |i| assert!(i != 40, "item 40")));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        for_each(64, 1, usize::MAX, 0, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpus("0"), 1);
        assert_eq!(count_cpus("0,64"), 2);
        assert_eq!(count_cpus("0-3,8"), 5);
        assert!(physical_cores() >= 1);
    }
}
