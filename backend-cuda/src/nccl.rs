//! NCCL under the communicator: [`NcclComm`] implements [`DeviceComm`] over libnccl, through
//! cudarc's NCCL bindings (`cudarc::nccl::{result, sys}`), for the GPUs of one process, each
//! rank driven from its own thread (how dsv4 runs ranks).
//!
//! CI runs the communicator over the CUDA emulator's implementation of the same trait; the
//! unit tests below cover the argument checks and the missing library. On a GPU,
//! `tests/cuda_nccl.rs`'s `gpu::` tests run the calls on real NCCL: on one H200 (NCCL 2.28) the
//! blocking communicators of `ncclCommInitAll` passed the suite in worlds of one rank; the
//! non-blocking join by unique id below (its suite, and the world of two whose second rank never
//! joins) was written after that run and has not met a GPU yet.
//!
//! * **Library.** libnccl is opened at run time, like the other CUDA libraries
//!   ([`crate::driver::NCCL`]): [`NcclComm::init_all`] first checks that a library cudarc will
//!   load is there and has every function called here (NCCL 2.18 or newer, for
//!   `ncclCommSplit`), so a missing one is an error that says what to install, never cudarc's
//!   panic. Single-GPU runs never open it.
//! * **Communicators.** `ncclCommInitAll(comms, ndev, devlist)` (NCCL API, "Communicator
//!   Creation and Management Functions") makes one member per GPU of this process, rank `i` on
//!   `devlist[i]` (blocking: every rank is here). Over several processes each rank joins with
//!   `ncclCommInitRankConfig` and a **non-blocking** config (`blocking = 0`), polled with
//!   `ncclCommGetAsyncError` until it is ready or `DSV4_COMM_TIMEOUT_S` has passed (then
//!   `ncclCommAbort`: a rank that never joins, because its node died before, is an error, not a
//!   wait for ever; NCCL user guide, "Fault Tolerance"). Every call on a non-blocking member is
//!   settled the same way (NCCL may return `ncclInProgress` from any call of one).
//!   `ncclCommSplit(comm, colour, key, &new, NULL)` makes sub-communicators (ranked by key, ties
//!   by parent rank; a NULL config inherits the parent's, so blocking or not). A member is dropped with
//!   `ncclCommDestroy`, or `ncclCommAbort` once one of its calls failed or
//!   `ncclCommGetAsyncError` reports an error (a broken communicator may never finish its
//!   operations, and destroying waits for them).
//! * **Calls.** Each trait method is one NCCL call ("Collective Communication Functions":
//!   `ncclAllReduce`, `ncclAllGather`, `ncclReduceScatter`, `ncclBroadcast`; "Point To Point
//!   Communication Functions" inside "Group Calls": `ncclGroupStart`, `ncclSend` / `ncclRecv`,
//!   `ncclGroupEnd`), enqueued on the device's one stream, so it is ordered with the backend's
//!   kernels like any other work on it. f32 sums are `ncclFloat32` / `ncclSum`, bytes
//!   `ncclUint8`. Calls on one member are serialised by a mutex (NCCL communicators are not
//!   thread-safe; NCCL user guide, "Thread safety").
//! * **Checks before every call** (nothing is enqueued when one fails): the device is the
//!   member's, every range lies inside a buffer of that device, the sizes agree (NCCL cannot
//!   check them; a mismatch reads or writes past a range), and send and receive ranges either
//!   do not overlap or are NCCL's in-place forms (user guide, "In-place Operations": the same
//!   range for all-reduce and broadcast, the rank's own part of the receive range for
//!   all-gather, of the send range for reduce-scatter). Zero-byte calls are checked, then
//!   skipped (every rank passes the same counts, so every rank skips them).
//! * **Errors** are [`Error::Comm`] naming the NCCL function, the status (`ncclResult_t` name
//!   and number), `ncclGetErrorString`'s text and `ncclGetLastError`'s (process-wide: with one
//!   thread per rank it may be another rank's); `NCCL_DEBUG=WARN` makes NCCL log more. After
//!   a failed call the member refuses every further call (its peers are out of step with it).
//! * **Not done:** the timeout of [`DeviceComm`] (`DSV4_COMM_TIMEOUT_S`) once the ranks have
//!   met. A peer that stops later shows as a stream that never finishes (a collective's kernel
//!   waits on the GPU; the backend's synchronisation, outside this module, waits for it), and
//!   in one process (`ncclCommInitAll`, blocking) also as an `ncclGroupEnd` that does not
//!   return. Bounding that needs the stream polled against a deadline and the communicator
//!   aborted past it; the `dsv4` binary instead ends the process when a rank fails.

use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;
use dsv4_core::error::{Error, Result};

use crate::collective::{DeviceComm, InitByUniqueId, Span, Transfer};
use crate::driver::{guard, DriverDevice, NCCL};

/// One rank's member of an NCCL communicator, on one GPU. See the module documentation.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    /// Held across every NCCL call on `comm`.
    lock: Mutex<()>,
    /// Set when a call failed or an asynchronous error was seen: dropping aborts the
    /// communicator instead of destroying it.
    broken: AtomicBool,
    rank: usize,
    size: usize,
    /// The CUDA device (ordinal) the member was made for.
    ordinal: usize,
    /// A non-blocking communicator (joined by unique id): every call is settled with
    /// [`settle`] within `timeout`.
    nonblocking: bool,
    timeout: Duration,
}

// SAFETY: an NCCL communicator handle is not tied to the thread that made it: NCCL's only
// threading rule is that one communicator object is not used by two threads at once (user
// guide, "Thread safety"), which `lock` ensures; the handle is owned by this value and
// destroyed once, in `Drop`.
unsafe impl Send for NcclComm {}

// SAFETY: every NCCL call through a shared reference holds `lock` for its whole duration
// (group start, calls and group end included), so the communicator is never used by two
// threads at once, which is all NCCL asks of its non-thread-safe communicators; the other
// fields are immutable or atomic.
unsafe impl Sync for NcclComm {}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.ordinal)
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .finish()
    }
}

impl NcclComm {
    /// A communicator over `devices` (`ncclCommInitAll`), one member per device, rank `i` on
    /// `devices[i]`, each to be driven from its own thread afterwards. Fails with what to install
    /// when libnccl is missing (never a panic), and when the devices are not distinct GPUs.
    pub fn init_all(devices: &[&DriverDevice]) -> Result<Vec<NcclComm>> {
        NCCL.require()?;
        let size = devices.len();
        let fail = |msg: String| Error::Comm { rank: 0, size, msg: format!("ncclCommInitAll: {msg}") };
        if devices.is_empty() {
            return Err(fail("no devices were given".to_string()));
        }
        let ordinals: Vec<usize> = devices.iter().map(|d| d.ordinal()).collect();
        for (i, o) in ordinals.iter().enumerate() {
            if let Some(j) = ordinals[..i].iter().position(|p| p == o) {
                return Err(fail(format!(
                    "ranks {j} and {i} are both on CUDA device {o}; NCCL needs one GPU per rank ({ordinals:?})"
                )));
            }
        }
        let devlist: Vec<c_int> = ordinals
            .iter()
            .map(|&o| c_int::try_from(o).map_err(|_| fail(format!("CUDA device {o} does not fit a C int"))))
            .collect::<Result<_>>()?;
        let ndev = c_int::try_from(size).map_err(|_| fail(format!("{size} ranks do not fit a C int")))?;
        direct_access_off();
        guard("creating NCCL communicators (ncclCommInitAll)", || {
            let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); size];
            // SAFETY: `comms` has room for the `ndev` handles NCCL writes and `devlist` holds
            // `ndev` distinct device ordinals (checked above); the library is loaded and has the
            // function (`NCCL.require()` above).
            let made = unsafe { result::comm_init_all(comms.as_mut_ptr(), ndev, devlist.as_ptr()) };
            if let Err(e) = made {
                return Err(fail(format!("over CUDA devices {ordinals:?}: {}", status_text(&e))));
            }
            if let Some(i) = comms.iter().position(|c| c.is_null()) {
                // Hand back what was made: the members below are destroyed when dropped.
                let _made: Vec<NcclComm> = comms
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.is_null())
                    .map(|(rank, &comm)| NcclComm::new(comm, rank, size, ordinals[rank]))
                    .collect();
                return Err(fail(format!("succeeded but gave no communicator for rank {i}")));
            }
            Ok(comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| NcclComm::new(comm, rank, size, ordinals[rank]))
                .collect())
        })
    }

    fn new(comm: sys::ncclComm_t, rank: usize, size: usize, ordinal: usize) -> NcclComm {
        NcclComm {
            comm,
            lock: Mutex::new(()),
            broken: AtomicBool::new(false),
            rank,
            size,
            ordinal,
            nonblocking: false,
            timeout: dsv4_core::parallel::local::default_timeout(),
        }
    }

    /// `ncclCommInitRankConfig` with a non-blocking config on `dev`, as rank `rank` of `size`,
    /// from node 0's unique `id`: returns once every rank has joined, or fails, also when they
    /// have not all joined within `timeout` (the communicator is then aborted). What
    /// [`InitByUniqueId::init_rank`] does with `DSV4_COMM_TIMEOUT_S`.
    pub fn init_rank_within(
        dev: &DriverDevice,
        id: &[u8],
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<NcclComm> {
        NCCL.require()?;
        let fail = |msg: String| Error::Comm { rank, size, msg: format!("ncclCommInitRankConfig: {msg}") };
        if id.len() != UNIQUE_ID_BYTES {
            return Err(fail(format!("a unique id of {} bytes, not NCCL's {UNIQUE_ID_BYTES}", id.len())));
        }
        if rank >= size {
            return Err(fail(format!("rank {rank} is not a rank of {size}")));
        }
        let (Ok(r), Ok(n)) = (c_int::try_from(rank), c_int::try_from(size)) else {
            return Err(fail(format!("{size} ranks do not fit a C int")));
        };
        let mut unique = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (d, &b) in unique.internal.iter_mut().zip(id) {
            *d = b as std::ffi::c_char;
        }
        direct_access_off();
        dev.bind()?;
        guard("joining an NCCL communicator (ncclCommInitRankConfig)", || {
            let version =
                result::get_nccl_version().map_err(|e| fail(format!("ncclGetVersion: {}", status_text(&e))))?;
            let mut config = nonblocking_config(version);
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` is an out-pointer to a local; `unique` is a full 128-byte id passed
            // by value; `r < n` (checked above); `config` is a whole ncclConfig_t made as
            // NCCL_CONFIG_INITIALIZER makes it (NCCL reads `size` bytes of it at most); the
            // device's context is current on this thread (NCCL makes the member for the current
            // device) and the library has the function (`NCCL.require()` above).
            let made = unsafe { result::comm_init_rank_config(&mut comm, n, unique, r, &mut config) };
            if let Err(e) = made {
                if !comm.is_null() {
                    // SAFETY: the handle NCCL gave back, released once here.
                    let _ = unsafe { result::comm_abort(comm) };
                }
                return Err(fail(format!("as rank {rank} of {size}: {}", status_text(&e))));
            }
            if comm.is_null() {
                return Err(fail("succeeded but gave no communicator".to_string()));
            }
            let mut member = NcclComm::new(comm, rank, size, dev.ordinal());
            member.nonblocking = true;
            member.timeout = timeout;
            // Dropped (aborted, being broken) if the others do not come.
            member.settle("ncclCommInitRankConfig", || {
                format!("joining as rank {rank} of {size} (the other ranks must join too)")
            })?;
            Ok(member)
        })
    }

    /// On a non-blocking member, waits until its last call has finished (`ncclCommGetAsyncError`
    /// no longer `ncclInProgress`) or `timeout` has passed; the member is broken (aborted when
    /// dropped) when it failed or did not finish. A blocking member's calls have finished when
    /// they return: nothing to wait for.
    fn settle(&self, func: &str, doing: impl FnOnce() -> String) -> Result<()> {
        if !self.nonblocking {
            return Ok(());
        }
        match settle(self.comm, self.timeout) {
            Ok(()) => Ok(()),
            Err(why) => {
                self.broken.store(true, Ordering::Relaxed);
                Err(self.error(func, format!("{} {why}", doing())))
            }
        }
    }

    /// The CUDA device (ordinal) this member belongs to.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn error(&self, func: &str, msg: impl fmt::Display) -> Error {
        Error::Comm { rank: self.rank, size: self.size, msg: format!("{func}: {msg}") }
    }

    /// `Ok` when `dev` is this member's device.
    fn check_device(&self, func: &str, dev: &DriverDevice) -> Result<()> {
        match dev.ordinal() == self.ordinal {
            true => Ok(()),
            false => Err(self.error(
                func,
                format!(
                    "called with CUDA device {}, but this member of the communicator belongs to device {}",
                    dev.ordinal(),
                    self.ordinal
                ),
            )),
        }
    }

    /// Takes the member's lock, refuses a communicator with an asynchronous error, and binds the
    /// device's context to the thread: what every call does before calling NCCL.
    fn enter(&self, func: &str, dev: &DriverDevice) -> Result<MutexGuard<'_, ()>> {
        let held = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.broken.load(Ordering::Relaxed) {
            // Its peers are out of step with it now: a further call could wait for ever.
            return Err(self.error(
                func,
                "an earlier call on this communicator failed; it cannot be used again (it is aborted when dropped)",
            ));
        }
        if let Some(e) = async_error(self.comm) {
            self.broken.store(true, Ordering::Relaxed);
            return Err(self.error(
                func,
                format!(
                    "an earlier operation of this communicator failed on the GPU ({e}); it cannot be used \
                     again (it is aborted when dropped)"
                ),
            ));
        }
        dev.bind()?;
        Ok(held)
    }

    /// `Ok` for a call that succeeded; else an error naming `func`, what it was asked to do and
    /// NCCL's status, and the member is marked broken.
    fn check(
        &self,
        func: &str,
        doing: impl FnOnce() -> String,
        r: std::result::Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        match r {
            Ok(_) => self.settle(func, doing),
            Err(e) => {
                self.broken.store(true, Ordering::Relaxed);
                Err(self.error(func, format!("{} failed: {}", doing(), status_text(&e))))
            }
        }
    }

    /// [`Self::check`] for a call inside an open group (`ncclGroupStart`, `ncclSend`,
    /// `ncclRecv`): nothing runs before `ncclGroupEnd`, which is what is settled.
    fn check_queued(
        &self,
        func: &str,
        doing: impl FnOnce() -> String,
        r: std::result::Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        r.map(drop).map_err(|e| {
            self.broken.store(true, Ordering::Relaxed);
            self.error(func, format!("{} failed: {}", doing(), status_text(&e)))
        })
    }
}

/// Sets `NCCL_P2P_DIRECT_DISABLE=1` unless the user set it. With every rank in one process,
/// NCCL would otherwise read and write the peers' buffers directly by pointer, and dsv4's
/// buffers come from the device's stream-ordered memory pool (`cuMemAllocAsync`), which peer
/// access does not open to other GPUs (CUDA programming guide, "Stream Ordered Memory
/// Allocator": pool memory needs `cuMemPoolSetAccess`). NCCL documents this variable for
/// exactly that case ("user buffers allocated with APIs which do not automatically make them
/// accessible to other GPUs managed by the same process"): NCCL then copies through its own
/// buffers. Read by NCCL when the communicators are made. Set once per process
/// ([`crate::open_devices`] calls it on the main thread before any rank thread starts; the
/// calls at communicator creation are then no-ops): writing the environment while another
/// thread reads it (NCCL's `getenv` in a concurrent `ncclCommInitRank`) is a data race in libc.
pub(crate) fn direct_access_off() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const VAR: &str = "NCCL_P2P_DIRECT_DISABLE";
        if std::env::var_os(VAR).is_none() {
            std::env::set_var(VAR, "1");
        }
    });
}

/// The device's stream as NCCL's `cudaStream_t` (the same `CUstream_st*` handle).
fn stream(dev: &DriverDevice) -> sys::cudaStream_t {
    dev.cu_stream().cast()
}

/// A span's device range: its address (range-checked against its buffer, which must be of
/// `dev`) and length.
fn region(dev: &DriverDevice, span: Span<'_, CudaSlice<u8>>, what: &str) -> Result<Region> {
    Ok(Region { addr: dev.range(span.buf, span.offset, span.bytes, what)?, bytes: span.bytes })
}

/// A C string NCCL returned (static, or NCCL's thread's last-error buffer), or "".
fn c_str(text: *const std::ffi::c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: NCCL returns NUL-terminated strings that stay valid at least until its next call
    // on this thread; the text is copied out here.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}

/// `ncclUnhandledCudaError (1): unhandled cuda error (...); last error: ...`.
fn status_text(e: &NcclError) -> String {
    let status = e.0;
    // SAFETY: ncclGetErrorString takes any status and returns a static string; the library is
    // loaded (a communicator, or the check before `ncclCommInitAll`, exists).
    let text = c_str(unsafe { sys::ncclGetErrorString(status) });
    // SAFETY: ncclGetLastError ignores its communicator argument (NULL is allowed) and returns
    // NCCL's process-wide last-error buffer (`ncclLastError` in NCCL's debug.cc), which another
    // rank's thread may be rewriting: the copy may be torn or another rank's text, which the
    // message says; it is NUL-terminated within its fixed size, so the read stays inside it.
    let last = c_str(unsafe { sys::ncclGetLastError(std::ptr::null_mut()) });
    let mut out = format!("{status:?} ({}): {text}", status as u32);
    if !last.is_empty() {
        out.push_str(&format!("; NCCL's last error in this process (possibly another rank's): {}", last.trim_end()));
    }
    out.push_str(" (NCCL_DEBUG=WARN makes NCCL log more)");
    out
}

/// The communicator's asynchronous error, if it has one (`ncclCommGetAsyncError`).
fn async_error(comm: sys::ncclComm_t) -> Option<String> {
    let mut status = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is a live communicator and `status` a valid out-pointer.
    let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut status) };
    if let Err(e) = asked.result() {
        return Some(format!("ncclCommGetAsyncError failed: {}", status_text(&e)));
    }
    status.result().err().map(|e| status_text(&e))
}

/// Polls `comm` (`ncclCommGetAsyncError`) until its operation in progress has finished:
/// `Ok` once it reports `ncclSuccess`, `Err` (why, to follow "what was being done") when it
/// reports an error or is still in progress after `timeout`.
fn settle(comm: sys::ncclComm_t, timeout: Duration) -> std::result::Result<(), String> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        let mut status = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator and `status` a valid out-pointer.
        let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut status) };
        if let Err(e) = asked.result() {
            return Err(format!("could not be checked: ncclCommGetAsyncError failed: {}", status_text(&e)));
        }
        match status.result() {
            Ok(NcclStatus::InProgress) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(format!("failed: {}", status_text(&e))),
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "did not finish within {:.0} s (DSV4_COMM_TIMEOUT_S): a rank did not take part (its process stopped, \
                 or is stuck); the communicator is aborted",
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// `NCCL_CONFIG_INITIALIZER` (nccl.h) with `blocking = 0`: the struct's size, NCCL's magic, the
/// library's `version` (NCCL reads the fields that version has, at most `size` bytes: the
/// bindings' struct may be newer than the library), every other field undefined (NCCL's
/// defaults).
fn nonblocking_config(version: c_int) -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as std::ffi::c_uint,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Bytes of NCCL's unique id (`NCCL_UNIQUE_ID_BYTES` in nccl.h).
const UNIQUE_ID_BYTES: usize = 128;

impl InitByUniqueId<DriverDevice> for NcclComm {
    fn unique_id() -> Result<Vec<u8>> {
        NCCL.require()?;
        guard("making an NCCL unique id (ncclGetUniqueId)", || {
            let id = result::get_uniqueid().map_err(|e| Error::Comm {
                rank: 0,
                size: 0,
                msg: format!("ncclGetUniqueId: {}", status_text(&e)),
            })?;
            Ok(id.internal.iter().map(|&b| b as u8).collect())
        })
    }

    /// [`NcclComm::init_rank_within`] `DSV4_COMM_TIMEOUT_S` (600 s by default).
    fn init_rank(dev: &DriverDevice, id: &[u8], rank: usize, size: usize) -> Result<NcclComm> {
        NcclComm::init_rank_within(dev, id, rank, size, dsv4_core::parallel::local::default_timeout())
    }
}

impl DeviceComm<DriverDevice> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(
        &self,
        dev: &DriverDevice,
        send: Span<'_, CudaSlice<u8>>,
        recv: Span<'_, CudaSlice<u8>>,
    ) -> Result<()> {
        const F: &str = "ncclAllReduce";
        self.check_device(F, dev)?;
        guard("an NCCL all-reduce", || {
            let s = region(dev, send, "all-reduce send range")?;
            let r = region(dev, recv, "all-reduce receive range")?;
            let count = plan_all_reduce(s, r).map_err(|m| self.error(F, m))?;
            if count == 0 {
                return Ok(());
            }
            let _held = self.enter(F, dev)?;
            // SAFETY: both ranges are `4·count` bytes inside live buffers of this member's device
            // (checked above), the same range or disjoint; the call is enqueued on the device's
            // stream, which orders it before any later free of the buffers; the lock is held.
            let done = unsafe {
                result::all_reduce(
                    s.addr as *const c_void,
                    r.addr as *mut c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream(dev),
                )
            };
            self.check(F, || format!("summing {count} f32"), done)
        })
    }

    fn all_gather_bytes(
        &self,
        dev: &DriverDevice,
        send: Span<'_, CudaSlice<u8>>,
        recv: Span<'_, CudaSlice<u8>>,
    ) -> Result<()> {
        const F: &str = "ncclAllGather";
        self.check_device(F, dev)?;
        guard("an NCCL all-gather", || {
            let s = region(dev, send, "all-gather send range")?;
            let r = region(dev, recv, "all-gather receive range")?;
            plan_all_gather(self.rank, self.size, s, r).map_err(|m| self.error(F, m))?;
            if s.bytes == 0 {
                return Ok(());
            }
            let _held = self.enter(F, dev)?;
            // SAFETY: the send range (`s.bytes`) and the receive range (`size · s.bytes`) lie
            // inside live buffers of this member's device, disjoint or in NCCL's in-place form
            // (checked above); enqueued on the device's stream; the lock is held.
            let done = unsafe {
                result::all_gather(
                    s.addr as *const c_void,
                    r.addr as *mut c_void,
                    s.bytes,
                    sys::ncclDataType_t::ncclUint8,
                    self.comm,
                    stream(dev),
                )
            };
            self.check(F, || format!("gathering {} bytes from each of {} ranks", s.bytes, self.size), done)
        })
    }

    fn reduce_scatter_sum_f32(
        &self,
        dev: &DriverDevice,
        send: Span<'_, CudaSlice<u8>>,
        recv: Span<'_, CudaSlice<u8>>,
    ) -> Result<()> {
        const F: &str = "ncclReduceScatter";
        self.check_device(F, dev)?;
        guard("an NCCL reduce-scatter", || {
            let s = region(dev, send, "reduce-scatter send range")?;
            let r = region(dev, recv, "reduce-scatter receive range")?;
            let count = plan_reduce_scatter(self.rank, self.size, s, r).map_err(|m| self.error(F, m))?;
            if count == 0 {
                return Ok(());
            }
            let _held = self.enter(F, dev)?;
            // SAFETY: the send range (`size · 4·count` bytes) and the receive range (`4·count`)
            // lie inside live buffers of this member's device, disjoint or in NCCL's in-place
            // form (checked above); enqueued on the device's stream; the lock is held.
            let done = unsafe {
                result::reduce_scatter(
                    s.addr as *const c_void,
                    r.addr as *mut c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream(dev),
                )
            };
            self.check(F, || format!("summing and scattering {count} f32 per rank"), done)
        })
    }

    fn broadcast_bytes(
        &self,
        dev: &DriverDevice,
        send: Span<'_, CudaSlice<u8>>,
        recv: Span<'_, CudaSlice<u8>>,
        root: usize,
    ) -> Result<()> {
        const F: &str = "ncclBroadcast";
        self.check_device(F, dev)?;
        guard("an NCCL broadcast", || {
            let r = region(dev, recv, "broadcast receive range")?;
            // The send range is read on the root only; elsewhere NCCL ignores it (it is given the
            // receive range), but the buffer must still be this device's.
            let s = match self.rank == root {
                true => Some(region(dev, send, "broadcast send range")?),
                false => {
                    dev.range(send.buf, 0, 0, "broadcast send buffer")?;
                    None
                }
            };
            plan_broadcast(self.rank, self.size, root, s, r).map_err(|m| self.error(F, m))?;
            if r.bytes == 0 {
                return Ok(());
            }
            let s = s.unwrap_or(r);
            // `root < size`, and `size` came from a C int.
            let root_c =
                c_int::try_from(root).map_err(|_| self.error(F, format!("root {root} does not fit a C int")))?;
            let _held = self.enter(F, dev)?;
            // SAFETY: the receive range (and on the root the send range, of the same length, the
            // same range or disjoint) lies inside live buffers of this member's device (checked
            // above); enqueued on the device's stream; the lock is held.
            let done = unsafe {
                result::broadcast(
                    s.addr as *const c_void,
                    r.addr as *mut c_void,
                    r.bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root_c,
                    self.comm,
                    stream(dev),
                )
            };
            self.check(F, || format!("broadcasting {} bytes from rank {root}", r.bytes), done)
        })
    }

    fn send_recv(
        &self,
        dev: &DriverDevice,
        send: &CudaSlice<u8>,
        sends: &[Transfer],
        recv: &CudaSlice<u8>,
        recvs: &[Transfer],
    ) -> Result<()> {
        const F: &str = "ncclSend/ncclRecv";
        self.check_device(F, dev)?;
        guard("NCCL sends and receives", || {
            let ranges = |buf: &CudaSlice<u8>, list: &[Transfer], what: &str| -> Result<Vec<(usize, Region)>> {
                list.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let addr = dev.range(buf, t.offset, t.bytes, &format!("{what} {i} (rank {})", t.peer))?;
                        Ok((t.peer, Region { addr, bytes: t.bytes }))
                    })
                    .collect()
            };
            let s = ranges(send, sends, "send")?;
            let r = ranges(recv, recvs, "receive")?;
            plan_send_recv(self.rank, self.size, &s, &r).map_err(|m| self.error(F, m))?;
            if s.iter().chain(&r).all(|(_, g)| g.bytes == 0) {
                return Ok(());
            }
            let _held = self.enter(F, dev)?;
            let st = stream(dev);
            self.check_queued("ncclGroupStart", || "opening the group".to_string(), result::group_start())?;
            // Every call after a failure is skipped, but the group is always closed.
            let mut first: Result<()> = Ok(());
            for (i, &(peer, g)) in s.iter().enumerate().filter(|(_, (_, g))| g.bytes > 0) {
                // SAFETY: `g` lies inside a live buffer of this member's device that no receive
                // of this group writes (checked above); `peer < size`, which fits a C int;
                // enqueued on the device's stream; the lock is held.
                let done = unsafe {
                    result::send(
                        g.addr as *const c_void,
                        g.bytes,
                        sys::ncclDataType_t::ncclUint8,
                        peer as c_int,
                        self.comm,
                        st,
                    )
                };
                first = self.check_queued("ncclSend", || format!("send {i} ({} bytes to rank {peer})", g.bytes), done);
                if first.is_err() {
                    break;
                }
            }
            if first.is_ok() {
                for (i, &(peer, g)) in r.iter().enumerate().filter(|(_, (_, g))| g.bytes > 0) {
                    // SAFETY: `g` lies inside a live buffer of this member's device, overlapping
                    // no other receive and no send of this group (checked above); as above.
                    let done = unsafe {
                        result::recv(
                            g.addr as *mut c_void,
                            g.bytes,
                            sys::ncclDataType_t::ncclUint8,
                            peer as c_int,
                            self.comm,
                            st,
                        )
                    };
                    first = self.check_queued(
                        "ncclRecv",
                        || format!("receive {i} ({} bytes from rank {peer})", g.bytes),
                        done,
                    );
                    if first.is_err() {
                        break;
                    }
                }
            }
            let n = (s.len(), r.len());
            let closed = self.check(
                "ncclGroupEnd",
                || format!("running the group of {} sends and {} receives", n.0, n.1),
                result::group_end(),
            );
            first.and(closed)
        })
    }

    fn split(&self, dev: &DriverDevice, colour: usize, key: usize) -> Result<NcclComm> {
        const F: &str = "ncclCommSplit";
        self.check_device(F, dev)?;
        // NCCL's colours are non-negative C ints (NCCL_SPLIT_NOCOLOR, -1, is not asked for).
        let c = c_int::try_from(colour).map_err(|_| self.error(F, format!("colour {colour} does not fit a C int")))?;
        let k = c_int::try_from(key).map_err(|_| self.error(F, format!("key {key} does not fit a C int")))?;
        guard("splitting an NCCL communicator", || {
            let _held = self.enter(F, dev)?;
            let mut new: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `self.comm` is live and `new` a valid out-pointer; a NULL config makes the
            // new communicator inherit the parent's; the lock is held.
            let made = unsafe { sys::ncclCommSplit(self.comm, c, k, &mut new, std::ptr::null_mut()) };
            self.check(F, || format!("splitting with colour {colour} and key {key}"), made.result())?;
            if new.is_null() {
                return Err(self.error(F, format!("gave no communicator for colour {colour}")));
            }
            // Owned from here: dropped (destroyed) if asking its rank or size fails. It inherits
            // the parent's config, so it is non-blocking when the parent is, and settled here.
            let mut member = NcclComm::new(new, 0, 0, self.ordinal);
            member.nonblocking = self.nonblocking;
            member.timeout = self.timeout;
            member.settle(F, || format!("making the communicator of colour {colour}"))?;
            // SAFETY: `new` is the live communicator just made.
            let rank = unsafe { result::comm_user_rank(new) };
            // SAFETY: as above.
            let size = unsafe { result::comm_count(new) };
            let (rank, size) = match (rank, size) {
                (Ok(r), Ok(s)) if r >= 0 && r < s => (r as usize, s as usize),
                (Ok(r), Ok(s)) => return Err(self.error(F, format!("the new communicator has rank {r} of {s}"))),
                (Err(e), _) => return Err(self.error(F, format!("ncclCommUserRank failed: {}", status_text(&e)))),
                (_, Err(e)) => return Err(self.error(F, format!("ncclCommCount failed: {}", status_text(&e)))),
            };
            member.rank = rank;
            member.size = size;
            Ok(member)
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let (comm, broken) = (self.comm, *self.broken.get_mut());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let failed = async_error(comm);
            let (func, done) = match broken || failed.is_some() {
                // SAFETY: `comm` is live and released exactly once, here; nothing else uses it
                // (`&mut self`).
                true => ("ncclCommAbort", unsafe { result::comm_abort(comm) }),
                // SAFETY: as above.
                false => ("ncclCommDestroy", unsafe { result::comm_destroy(comm) }),
            };
            done.err().map(|e| format!("{func} failed: {}", status_text(&e)))
        }));
        self.comm = std::ptr::null_mut();
        let problem = match outcome {
            Ok(None) => return,
            Ok(Some(msg)) => msg,
            Err(_) => "releasing it panicked inside the NCCL bindings".to_string(),
        };
        eprintln!(
            "dsv4: NCCL communicator (rank {} of {}, CUDA device {}): {problem}",
            self.rank, self.size, self.ordinal
        );
    }
}

// ------------------------------------------------------------------------------- argument checks

/// A byte range of device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    addr: u64,
    bytes: usize,
}

impl Region {
    fn end(self) -> u64 {
        self.addr + self.bytes as u64
    }

    /// Whether the two share a byte (an empty range shares none).
    fn overlaps(self, other: Region) -> bool {
        self.bytes > 0 && other.bytes > 0 && self.addr < other.end() && other.addr < self.end()
    }

    /// `bytes` bytes from byte `from` of this range.
    fn part(self, from: usize, bytes: usize) -> Region {
        Region { addr: self.addr + from as u64, bytes }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes at {:#x}", self.bytes, self.addr)
    }
}

/// f32 elements in `bytes` bytes.
fn f32_count(bytes: usize, what: &str) -> std::result::Result<usize, String> {
    match bytes % 4 {
        0 => Ok(bytes / 4),
        _ => Err(format!("the {what} is {bytes} bytes, not a whole number of f32")),
    }
}

/// The same range (in place) or disjoint ones.
fn same_or_apart(send: Region, recv: Region) -> std::result::Result<(), String> {
    match send.overlaps(recv) && send != recv {
        true => Err(format!(
            "the send range ({send}) partly overlaps the receive range ({recv}); NCCL allows the same range (in \
             place) or disjoint ones"
        )),
        false => Ok(()),
    }
}

/// `ncclAllReduce`: equal ranges of whole f32, the same or disjoint; the element count.
fn plan_all_reduce(send: Region, recv: Region) -> std::result::Result<usize, String> {
    if send.bytes != recv.bytes {
        return Err(format!(
            "the send range is {} bytes and the receive range {}; they must be equal",
            send.bytes, recv.bytes
        ));
    }
    let count = f32_count(send.bytes, "send range")?;
    same_or_apart(send, recv)?;
    Ok(count)
}

/// `ncclAllGather`: `recv` is `size` times `send`; overlapping only as `send` = rank `rank`'s part
/// of `recv` (in place).
fn plan_all_gather(rank: usize, size: usize, send: Region, recv: Region) -> std::result::Result<(), String> {
    if send.bytes.checked_mul(size) != Some(recv.bytes) {
        return Err(format!(
            "the receive range is {} bytes; it must be {size} ranks × the {} bytes sent",
            recv.bytes, send.bytes
        ));
    }
    let own = recv.part(rank * send.bytes, send.bytes);
    if send.overlaps(recv) && send != own {
        return Err(format!(
            "the send range ({send}) overlaps the receive range ({recv}) but is not rank {rank}'s part of it ({own}), \
             the one in-place form NCCL allows"
        ));
    }
    Ok(())
}

/// `ncclReduceScatter`: `send` is `size` times `recv`, of whole f32; overlapping only as `recv` =
/// rank `rank`'s part of `send` (in place). The element count per rank.
fn plan_reduce_scatter(rank: usize, size: usize, send: Region, recv: Region) -> std::result::Result<usize, String> {
    if recv.bytes.checked_mul(size) != Some(send.bytes) {
        return Err(format!(
            "the send range is {} bytes; it must be {size} ranks × the {} bytes received",
            send.bytes, recv.bytes
        ));
    }
    let count = f32_count(recv.bytes, "receive range")?;
    let own = send.part(rank * recv.bytes, recv.bytes);
    if recv.overlaps(send) && recv != own {
        return Err(format!(
            "the receive range ({recv}) overlaps the send range ({send}) but is not rank {rank}'s part of it ({own}), \
             the one in-place form NCCL allows"
        ));
    }
    Ok(count)
}

/// `ncclBroadcast`: a root among the ranks; on the root (`send` given) ranges of one length, the
/// same or disjoint.
fn plan_broadcast(
    rank: usize,
    size: usize,
    root: usize,
    send: Option<Region>,
    recv: Region,
) -> std::result::Result<(), String> {
    if root >= size {
        return Err(format!("root {root} is not a rank of this communicator of {size}"));
    }
    if let (true, Some(send)) = (rank == root, send) {
        if send.bytes != recv.bytes {
            return Err(format!(
                "on the root the send range is {} bytes and the receive range {}; they must be equal",
                send.bytes, recv.bytes
            ));
        }
        same_or_apart(send, recv)?;
    }
    Ok(())
}

/// A group of `ncclSend`s and `ncclRecv`s (peer, range): every peer a rank, no receive
/// overlapping another or a send (except a local copy onto its own range: a send to and a
/// receive from this rank of the same range).
fn plan_send_recv(
    rank: usize,
    size: usize,
    sends: &[(usize, Region)],
    recvs: &[(usize, Region)],
) -> std::result::Result<(), String> {
    for (what, list) in [("send", sends), ("receive", recvs)] {
        if let Some((i, (peer, _))) = list.iter().enumerate().find(|(_, (peer, _))| *peer >= size) {
            return Err(format!("{what} {i} names rank {peer}, but the communicator has {size} ranks"));
        }
    }
    for (i, &(rpeer, r)) in recvs.iter().enumerate() {
        if let Some(j) = recvs[..i].iter().position(|&(_, other)| other.overlaps(r)) {
            return Err(format!("receives {j} ({}) and {i} ({r}) write overlapping bytes", recvs[j].1));
        }
        let local = |speer: usize, s: Region| speer == rank && rpeer == rank && s == r;
        if let Some(j) = sends.iter().position(|&(speer, s)| s.overlaps(r) && !local(speer, s)) {
            return Err(format!("receive {i} ({r}) writes bytes that send {j} ({}) reads", sends[j].1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: u64, bytes: usize) -> Region {
        Region { addr, bytes }
    }

    /// What NCCL_CONFIG_INITIALIZER makes, but non-blocking: NCCL checks the magic, reads at
    /// most `size` bytes and takes every undefined field as its default.
    #[test]
    fn the_join_config_is_the_initializer_made_non_blocking() {
        let c = nonblocking_config(22803);
        assert_eq!(
            (c.size, c.magic, c.version, c.blocking),
            (std::mem::size_of::<sys::ncclConfig_t>(), 0xcafebeef, 22803, 0)
        );
        assert!(c.netName.is_null() && c.commName.is_null());
        for v in [c.cgaClusterSize, c.minCTAs, c.maxCTAs, c.splitShare, c.collnetEnable, c.CTAPolicy, c.nvlsCTAs] {
            assert_eq!(v, i32::MIN);
        }
    }

    #[test]
    fn without_libnccl_making_a_communicator_says_what_to_install() {
        // No device is needed to get as far as the library check, which comes first.
        match NCCL.find() {
            Ok(file) => {
                println!(
                    "skipped: this machine has NCCL ({file}), so the missing-library error cannot be seen here; \
                     an empty device list must still be refused"
                );
                let e = NcclComm::init_all(&[]).unwrap_err().to_string();
                assert!(e.contains("ncclCommInitAll") && e.contains("no devices"), "{e}");
            }
            Err(_) => {
                let e = NcclComm::init_all(&[]).unwrap_err().to_string();
                assert!(e.starts_with("backend `cuda`"), "{e}");
                assert!(e.contains("NCCL") && e.contains("could not be loaded"), "{e}");
                assert!(e.contains("libnccl.so") && e.contains("To fix: install NCCL"), "{e}");
                assert!(e.contains("nvidia-nccl-cu12") && e.contains("LD_LIBRARY_PATH"), "{e}");
            }
        }
    }

    #[test]
    fn nccl_is_looked_for_under_the_names_cudarc_loads() {
        let names = NCCL.candidates();
        assert!(names.contains(&"libnccl.so".to_string()), "{names:?}");
        // NCCL's soname is not one of them (hence the hint to link it as libnccl.so).
        assert!(!names.contains(&"libnccl.so.2".to_string()), "{names:?}");
        assert_eq!(NCCL.name, "NCCL");
    }

    #[test]
    fn all_reduce_takes_equal_ranges_of_f32_in_place_or_apart() {
        assert_eq!(plan_all_reduce(at(0x1000, 64), at(0x2000, 64)), Ok(16));
        assert_eq!(plan_all_reduce(at(0x1000, 64), at(0x1000, 64)), Ok(16), "in place");
        assert_eq!(plan_all_reduce(at(0x1000, 0), at(0x1000, 0)), Ok(0));
        assert!(plan_all_reduce(at(0x1000, 64), at(0x2000, 60)).unwrap_err().contains("must be equal"));
        assert!(plan_all_reduce(at(0x1000, 6), at(0x2000, 6)).unwrap_err().contains("whole number of f32"));
        let e = plan_all_reduce(at(0x1000, 64), at(0x1020, 64)).unwrap_err();
        assert!(e.contains("partly overlaps"), "{e}");
        // Adjacent ranges share no byte.
        assert_eq!(plan_all_reduce(at(0x1000, 64), at(0x1040, 64)), Ok(16));
    }

    #[test]
    fn all_gather_receives_every_ranks_part_and_may_send_from_its_own() {
        assert_eq!(plan_all_gather(1, 4, at(0x9000, 8), at(0x1000, 32)), Ok(()));
        assert_eq!(plan_all_gather(1, 4, at(0x1008, 8), at(0x1000, 32)), Ok(()), "in place");
        assert_eq!(plan_all_gather(0, 4, at(0x1000, 0), at(0x2000, 0)), Ok(()));
        let e = plan_all_gather(2, 4, at(0x1008, 8), at(0x1000, 32)).unwrap_err();
        assert!(e.contains("not rank 2's part"), "{e}");
        let e = plan_all_gather(0, 4, at(0x9000, 8), at(0x1000, 24)).unwrap_err();
        assert!(e.contains("4 ranks × the 8 bytes"), "{e}");
        assert!(plan_all_gather(0, 2, at(0, usize::MAX), at(0x1000, 8)).is_err(), "overflow");
    }

    #[test]
    fn reduce_scatter_sends_every_ranks_part_and_may_receive_into_its_own() {
        assert_eq!(plan_reduce_scatter(0, 2, at(0x1000, 32), at(0x2000, 16)), Ok(4));
        assert_eq!(plan_reduce_scatter(1, 2, at(0x1000, 32), at(0x1010, 16)), Ok(4), "in place");
        assert_eq!(plan_reduce_scatter(1, 2, at(0x1000, 0), at(0x1000, 0)), Ok(0));
        let e = plan_reduce_scatter(0, 2, at(0x1000, 32), at(0x1010, 16)).unwrap_err();
        assert!(e.contains("not rank 0's part"), "{e}");
        assert!(plan_reduce_scatter(0, 2, at(0x1000, 30), at(0x2000, 16)).unwrap_err().contains("2 ranks ×"));
        assert!(plan_reduce_scatter(0, 2, at(0x1000, 12), at(0x2000, 6)).unwrap_err().contains("whole number"));
    }

    #[test]
    fn broadcast_needs_a_root_among_the_ranks_and_matching_ranges_on_it() {
        assert_eq!(plan_broadcast(0, 2, 0, Some(at(0x1000, 5)), at(0x2000, 5)), Ok(()));
        assert_eq!(plan_broadcast(0, 2, 0, Some(at(0x1000, 5)), at(0x1000, 5)), Ok(()), "in place");
        assert_eq!(plan_broadcast(1, 2, 0, None, at(0x2000, 5)), Ok(()), "not read off the root");
        assert!(plan_broadcast(0, 2, 2, None, at(0x2000, 5)).unwrap_err().contains("root 2"));
        assert!(plan_broadcast(0, 2, 0, Some(at(0x1000, 4)), at(0x2000, 5)).unwrap_err().contains("must be equal"));
        assert!(plan_broadcast(0, 2, 0, Some(at(0x1000, 5)), at(0x1001, 5)).unwrap_err().contains("overlaps"));
    }

    #[test]
    fn grouped_transfers_name_ranks_and_never_write_what_they_read() {
        let sends = [(0, at(0x1000, 8)), (1, at(0x1008, 8)), (2, at(0x1010, 0))];
        let recvs = [(0, at(0x2000, 8)), (1, at(0x2008, 8)), (2, at(0x1000, 0))];
        assert_eq!(plan_send_recv(0, 3, &sends, &recvs), Ok(()));
        assert_eq!(plan_send_recv(0, 3, &[], &[]), Ok(()));
        let e = plan_send_recv(0, 2, &sends, &[]).unwrap_err();
        assert!(e.contains("send 2 names rank 2") && e.contains("2 ranks"), "{e}");
        let e = plan_send_recv(0, 3, &sends, &[(3, at(0x2000, 8))]).unwrap_err();
        assert!(e.contains("receive 0 names rank 3"), "{e}");
        let e = plan_send_recv(0, 3, &sends, &[(1, at(0x2000, 8)), (2, at(0x2004, 8))]).unwrap_err();
        assert!(e.contains("receives 0") && e.contains("and 1"), "{e}");
        let e = plan_send_recv(0, 3, &sends, &[(1, at(0x1004, 8))]).unwrap_err();
        assert!(e.contains("receive 0") && e.contains("send 0"), "{e}");
        // A local copy onto its own range is allowed; from another rank it is not.
        assert_eq!(plan_send_recv(1, 3, &[(1, at(0x1000, 8))], &[(1, at(0x1000, 8))]), Ok(()));
        assert!(plan_send_recv(1, 3, &[(2, at(0x1000, 8))], &[(1, at(0x1000, 8))]).is_err());
    }

    /// Compile-time: the member can be shared with and moved to the rank's thread.
    #[test]
    fn a_member_is_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<NcclComm>();
    }
}
