//! A CPU emulator of the AscendCL / aclnn C API subset that dsv4 declares in
//! `ascend-sys/include/dsv4_ascend.h`, built as a shared library (`libdsv4_ascend_emu.so`)
//! that dsv4 loads through `DSV4_ASCEND_EMULATOR` exactly as it loads CANN.
//!
//! It implements the documented semantics on the CPU and is strict where the documentation
//! is, because its job is to catch misuse before it reaches hardware:
//! * device memory has synthetic addresses that the host cannot dereference, is never reused
//!   (use after free and double free are recognised), starts as NaN bytes, and is bounds
//!   checked against every tensor's storage;
//! * `aclCreateTensor` checks 32-byte alignment, strides and storage bounds;
//! * every operator checks dtypes and shapes as its documentation states, and launches check
//!   the workspace (size, liveness, overlap with the operands);
//! * a stream is a queue executed at `aclrtSynchronizeStream`: the host reading device memory
//!   that queued work writes (or writing memory queued work uses) before synchronising is an
//!   error, as is freeing it;
//! * executors are single-use unless `aclSetAclOpExecutorRepeatable`; a repeatable one may be
//!   given new operand addresses (`aclSetInputTensorAddr` / `aclSetOutputTensorAddr`, checked
//!   against what was planned) and then computes on those; tensor lists own their members;
//!   handles are never reused, so any use of a destroyed object is reported (what it was and
//!   how it ended for the last 65536 destroyed; the objects themselves are dropped, so host
//!   memory stays bounded however many operators a process launches).
//!
//! Every failure returns the documented error code and leaves a message for
//! `aclGetRecentErrMsg`. `ASCEND_RT_VISIBLE_DEVICES` is applied at `aclInit`;
//! `DSV4_ASCEND_EMU_DEVICES` (default 2) sets the number of physical devices,
//! `DSV4_ASCEND_EMU_MEMORY_MB` (default 16384) their memory and `DSV4_ASCEND_EMU_SOC` the name
//! `aclrtGetSocName` reports (default `Ascend910B3`; a name of no family the CANN docs name is
//! refused by `aclInit`; per-SoC limits follow it, e.g. FLOAT32
//! grouped matmul only with a 3-D weight on A2/A3, sqrt-softplus gating and no aclnnSoftplus on
//! the 950, aclnnInplaceIndexCopy on A2/A3/950 only). `DSV4_ASCEND_EMU_QUIRKS` makes some kernels behave like other CANN
//! releases (`gating-bias-in-weights`, `gmm-no-fp32`, `matmul-bf16-accumulates-in-bf16`; see `fused.rs`).
//! FLOAT8_E4M3FN, FLOAT8_E8M0 and FLOAT4_E2M1 tensors (FP4 two codes a byte, the element at
//! an even offset in the low nibble; views may start at an odd element) are accepted by
//! `aclCreateTensor` but count as neither float nor integer, so only `aclnnCast` (the 950's
//! conversion paths) and `aclnnWeightQuantBatchMatmulV2` (`weight_quant.rs`) take them.
//! HCCL (communicators whose ranks are threads, each on its own device, and the collectives
//! dsv4 uses) is in `hccl.rs`; `DSV4_ASCEND_EMU_HCCL_TIMEOUT_S` (default 120) bounds its rendezvous.
//!
//! Deliberate emulator choices where the documentation says nothing: `aclnnTopk` breaks ties
//! towards the lower index; `aclnnInplaceIndexCopy` refuses repeated indices (the docs leave
//! the order of their writes unspecified); `aclrtMemcpyAsync` from pageable host memory copies at the call (the
//! documented "synchronous" behaviour), while into pageable memory (device to host) it is
//! refused; synchronous `aclrtMemcpy` does not wait for streams.

#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]

mod mem;
#[macro_use]
mod ops;
mod compressor;
mod flash_mla;
mod fused;
mod hccl;
mod indexer;
mod mc2;
#[cfg(test)]
mod test_support;
mod weight_quant;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::thread::ThreadId;

use dsv4_ascend_sys::*;
use mem::{elem_size, Desc, DevAlloc, Memory, DEVICE_ALIGN, DEVICE_BASE};

pub use mem::{broadcast, expand};

/// First synthetic handle value for host-side objects (tensors, streams, ...).
const HANDLE_BASE: u64 = 0x0e00_0000_0000;

/// Operator state an executor keeps for its launch (MC2 operators, `mc2.rs`).
pub(crate) type Extra = Arc<dyn std::any::Any + Send + Sync>;

/// What [`executor_job`] returns: the plan's extra state, the operands read and written.
pub(crate) type ExecutorJob = (Option<Extra>, Vec<Desc>, Vec<Desc>);

/// The computation of one launched operator, run when its stream executes.
pub(crate) type OpFn = dyn Fn(&mut Memory) -> Result<(), String> + Send + Sync;

/// How many destroyed objects (and executors their launch released) keep a record, for
/// telling a use after destroy what the handle was; older ones are forgotten (their handles are
/// still recognised as once handed out, never reused). A record per object ever destroyed, or
/// the destroyed object itself, would grow with every launch: thousands per decode step.
const TOMBS_KEPT: usize = 1 << 16;

pub(crate) enum ScalarVal {
    Float(f64),
    Int(i64),
}

impl ScalarVal {
    pub(crate) fn as_f64(&self) -> f64 {
        match self {
            ScalarVal::Float(v) => *v,
            ScalarVal::Int(v) => *v as f64,
        }
    }
}

pub(crate) struct TensorObj {
    pub desc: Desc,
    /// The tensor list that owns it, if any.
    pub list: Option<u64>,
}

pub(crate) struct Executor {
    pub op: &'static str,
    pub workspace: u64,
    pub repeatable: bool,
    pub launches: u32,
    /// Data addresses the operands had at planning (`reads` then `writes`), so a launch can
    /// tell which were moved by aclSetInputTensorAddr / aclSetOutputTensorAddr.
    pub planned: Vec<u64>,
    /// Object handles the plan refers to (checked for liveness at launch).
    pub objects: Vec<u64>,
    pub reads: Vec<Desc>,
    pub writes: Vec<Desc>,
    pub run: Arc<OpFn>,
    /// Operator state the launch itself needs (MC2 operators, `mc2.rs`).
    pub extra: Option<Extra>,
}

enum Obj {
    Tensor(TensorObj),
    Scalar(ScalarVal),
    IntArray(Vec<i64>),
    List(Vec<u64>),
    Executor(Executor),
    Event(Event),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Tensor(_) => "aclTensor",
            Obj::Scalar(_) => "aclScalar",
            Obj::IntArray(_) => "aclIntArray",
            Obj::List(_) => "aclTensorList",
            Obj::Executor(_) => "aclOpExecutor",
            Obj::Event(_) => "aclrtEvent",
        }
    }

    fn kind_id(&self) -> u32 {
        match self {
            Obj::Tensor(_) => 0,
            Obj::Scalar(_) => 1,
            Obj::IntArray(_) => 2,
            Obj::List(_) => 3,
            Obj::Executor(_) => 4,
            Obj::Event(_) => 8,
        }
    }
}

/// A live object. Destroying one drops it (with everything it holds: an executor's kernel, its
/// operand descriptions) and leaves a [`Tomb`].
struct Entry {
    obj: Obj,
    owner: ThreadId,
}

/// What is remembered of a destroyed object, for messages.
struct Tomb {
    kind: &'static str,
    /// Why it is no longer live.
    ended_by: &'static str,
    /// A single-use executor released by its launch: its operator.
    launched: Option<&'static str>,
}

#[derive(Default)]
struct Event {
    /// The stream whose queue holds this event's record marker.
    pending_on: Option<u64>,
}

enum TaskKind {
    Op {
        op: &'static str,
        run: Arc<OpFn>,
        workspace: Option<(u64, usize)>,
        /// Tensor handle → data address, for a reused executor whose addresses were set.
        relocated: Vec<(u64, u64)>,
    },
    /// Host-to-device copy of bytes captured at the call (pageable source).
    H2dBytes {
        dst: u64,
        bytes: Vec<u8>,
    },
    /// Host-to-device copy read from pinned host memory when the task runs.
    H2dPinned {
        dst: u64,
        src: u64,
        len: usize,
    },
    D2hPinned {
        dst: u64,
        src: u64,
        len: usize,
    },
    D2d {
        dst: u64,
        src: u64,
        len: usize,
    },
    Memset {
        dst: u64,
        value: u8,
        len: usize,
    },
    Record(u64),
    Wait(u64),
}

struct Task {
    kind: TaskKind,
    /// Allocation bases this task reads / writes (pending counts).
    reads: Vec<u64>,
    writes: Vec<u64>,
    /// Pinned host allocations it uses.
    host: Vec<u64>,
}

struct Stream {
    device: i32,
    owner: ThreadId,
    queue: VecDeque<Task>,
    live: bool,
}

struct HostAlloc {
    size: usize,
    layout: std::alloc::Layout,
    owner: ThreadId,
    pending: u32,
}

pub(crate) struct Emu {
    initialized: bool,
    finalized: bool,
    /// Physical device ids visible to this process, in logical order.
    visible: Vec<i32>,
    capacity: usize,
    used: HashMap<i32, usize>,
    pub(crate) mem: Memory,
    host: HashMap<u64, HostAlloc>,
    objects: HashMap<u64, Entry>,
    /// The most recently destroyed objects ([`TOMBS_KEPT`]), oldest first in `tomb_order`.
    tombs: HashMap<u64, Tomb>,
    tomb_order: VecDeque<u64>,
    streams: HashMap<u64, Stream>,
    default_streams: HashMap<(ThreadId, i32), u64>,
    next_handle: u64,
    launches: HashMap<String, u64>,
    total_launches: u64,
    /// GetWorkspaceSize calls per operator (fewer than launches when executors are reused).
    plans: HashMap<String, u64>,
}

static EMU: LazyLock<Mutex<Emu>> = LazyLock::new(|| {
    Mutex::new(Emu {
        initialized: false,
        finalized: false,
        visible: vec![],
        capacity: 0,
        used: HashMap::new(),
        mem: Memory { allocs: Default::default(), next: DEVICE_BASE, relocated: Default::default() },
        host: HashMap::new(),
        objects: HashMap::new(),
        tombs: HashMap::new(),
        tomb_order: VecDeque::new(),
        streams: HashMap::new(),
        default_streams: HashMap::new(),
        next_handle: HANDLE_BASE,
        launches: HashMap::new(),
        total_launches: 0,
        plans: HashMap::new(),
    })
});

thread_local! {
    /// (current device, SetDevice count) of this thread.
    static DEVICE: RefCell<Option<(i32, u32)>> = const { RefCell::new(None) };
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    static RETURNED_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

pub(crate) fn emu() -> MutexGuard<'static, Emu> {
    // A panic inside the emulator aborts (extern "C"), so poisoning cannot be observed; be
    // robust anyway.
    EMU.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records `msg` for aclGetRecentErrMsg and returns `code`.
pub(crate) fn fail<T: From<i32>>(code: i32, msg: impl Into<String>) -> T {
    let msg = msg.into();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(format!("[dsv4-ascend-emu] {msg}")));
    T::from(code)
}

fn current_device() -> Option<i32> {
    DEVICE.with(|d| d.borrow().map(|(dev, _)| dev))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl Emu {
    fn handle(&mut self) -> u64 {
        self.next_handle += 16;
        self.next_handle
    }

    fn insert(&mut self, obj: Obj) -> u64 {
        let h = self.handle();
        self.objects.insert(h, Entry { obj, owner: std::thread::current().id() });
        h
    }

    /// Ends live object `h`: drops it and keeps a [`Tomb`] (the oldest beyond [`TOMBS_KEPT`]
    /// are forgotten).
    fn bury(&mut self, h: u64, ended_by: &'static str, launched: Option<&'static str>) {
        let Some(entry) = self.objects.remove(&h) else { return };
        self.tombs.insert(h, Tomb { kind: entry.obj.kind(), ended_by, launched });
        self.tomb_order.push_back(h);
        while self.tomb_order.len() > TOMBS_KEPT {
            let old = self.tomb_order.pop_front().expect("non-empty");
            self.tombs.remove(&old);
        }
    }

    /// Whether `h` is a handle this runtime handed out (handles are never reused).
    fn handed_out(&self, h: u64) -> bool {
        h > HANDLE_BASE && h <= self.next_handle && (h - HANDLE_BASE).is_multiple_of(16)
    }

    /// The kind of object `h` is or was, when known.
    fn kind_of(&self, h: u64) -> Option<&'static str> {
        self.objects.get(&h).map(|e| e.obj.kind()).or_else(|| self.tombs.get(&h).map(|t| t.kind))
    }

    fn require_init(&self, what: &str) -> Result<(), (i32, String)> {
        if !self.initialized || self.finalized {
            return Err((ACL_ERROR_UNINITIALIZE, format!("{what}: aclInit has not been called (or aclFinalize has)")));
        }
        Ok(())
    }

    fn require_device(&self, what: &str) -> Result<i32, (i32, String)> {
        self.require_init(what)?;
        current_device().ok_or_else(|| {
            (
                ACL_ERROR_RT_CONTEXT_NULL,
                format!("{what}: no device is set on this thread; call aclrtSetDevice first (it is per thread)"),
            )
        })
    }

    /// A live object of the expected kind, or a message saying what is wrong with the handle.
    fn live(&self, h: u64, kind: &str, what: &str) -> Result<&Obj, String> {
        if h == 0 {
            return Err(format!("{what}: {kind} is NULL"));
        }
        if let Some(e) = self.objects.get(&h) {
            return match e.obj.kind() {
                k if k != kind => Err(format!("{what}: {h:#x} is a {k}, not a {kind}")),
                _ => Ok(&e.obj),
            };
        }
        match self.tombs.get(&h) {
            Some(t) if t.kind != kind => Err(format!("{what}: {h:#x} is a {}, not a {kind}", t.kind)),
            Some(Tomb { launched: Some(op), .. }) => Err(format!(
                "{what}: executor {h:#x} ({op}) was already launched, which released it (non-repeatable executors are single-use)"
            )),
            Some(t) => {
                Err(format!("{what}: {kind} {h:#x} was already destroyed ({}): use after destroy", t.ended_by))
            }
            None if self.handed_out(h) && !self.streams.contains_key(&h) => Err(format!(
                "{what}: {h:#x} is not a live object: it was already destroyed (long enough ago that what it was \
                 is forgotten): use after destroy"
            )),
            None => Err(format!("{what}: {h:#x} is not a {kind} created by this runtime")),
        }
    }

    pub(crate) fn tensor(&self, h: *const aclTensor, what: &str) -> Result<Desc, String> {
        match self.live(h as u64, "aclTensor", what)? {
            Obj::Tensor(t) => {
                self.mem.check_range(t.desc.data, t.desc.storage_bytes(), what)?;
                Ok(t.desc.clone())
            }
            _ => unreachable!("kind checked"),
        }
    }

    pub(crate) fn scalar(&self, h: *const aclScalar, what: &str) -> Result<f64, String> {
        match self.live(h as u64, "aclScalar", what)? {
            Obj::Scalar(s) => Ok(s.as_f64()),
            _ => unreachable!("kind checked"),
        }
    }

    pub(crate) fn int_array(&self, h: *const aclIntArray, what: &str) -> Result<Vec<i64>, String> {
        match self.live(h as u64, "aclIntArray", what)? {
            Obj::IntArray(v) => Ok(v.clone()),
            _ => unreachable!("kind checked"),
        }
    }

    pub(crate) fn tensor_list(&self, h: *const aclTensorList, what: &str) -> Result<Vec<Desc>, String> {
        match self.live(h as u64, "aclTensorList", what)? {
            Obj::List(members) => {
                members.iter().map(|&m| self.tensor(m as *const aclTensor, what)).collect::<Result<Vec<_>, _>>()
            }
            _ => unreachable!("kind checked"),
        }
    }

    fn stream_id(&mut self, s: aclrtStream, what: &str) -> Result<u64, (i32, String)> {
        let dev = self.require_device(what)?;
        if s.is_null() {
            let key = (std::thread::current().id(), dev);
            if let Some(&id) = self.default_streams.get(&key) {
                return Ok(id);
            }
            let id = self.handle();
            self.streams.insert(id, Stream { device: dev, owner: key.0, queue: VecDeque::new(), live: true });
            self.default_streams.insert(key, id);
            return Ok(id);
        }
        match self.streams.get(&(s as u64)) {
            None => {
                Err((ACL_ERROR_RT_PARAM_INVALID, format!("{what}: {s:p} is not a stream created by aclrtCreateStream")))
            }
            Some(st) if !st.live => {
                Err((ACL_ERROR_RT_PARAM_INVALID, format!("{what}: stream {s:p} was destroyed (use after destroy)")))
            }
            Some(st) if st.device != dev => Err((
                ACL_ERROR_RT_STREAM_CONTEXT,
                format!("{what}: stream {s:p} belongs to device {} but this thread's device is {dev}", st.device),
            )),
            Some(_) => Ok(s as u64),
        }
    }

    fn enqueue(&mut self, sid: u64, task: Task) {
        for b in &task.reads {
            if let Some(a) = self.mem.allocs.get_mut(b) {
                a.pending_reads += 1;
            }
        }
        for b in &task.writes {
            if let Some(a) = self.mem.allocs.get_mut(b) {
                a.pending_writes += 1;
            }
        }
        for h in &task.host {
            if let Some(a) = self.host.get_mut(h) {
                a.pending += 1;
            }
        }
        self.streams.get_mut(&sid).expect("checked stream").queue.push_back(task);
    }

    fn retire(&mut self, task: &Task) {
        for b in &task.reads {
            if let Some(a) = self.mem.allocs.get_mut(b) {
                a.pending_reads -= 1;
            }
        }
        for b in &task.writes {
            if let Some(a) = self.mem.allocs.get_mut(b) {
                a.pending_writes -= 1;
            }
        }
        for h in &task.host {
            if let Some(a) = self.host.get_mut(h) {
                a.pending -= 1;
            }
        }
    }

    /// Executes `sid`'s queue in order, up to and including the record of `until` (all if None).
    fn run_stream(&mut self, sid: u64, until: Option<u64>) -> Result<(), (i32, String)> {
        loop {
            let Some(task) = self.streams.get_mut(&sid).and_then(|s| s.queue.pop_front()) else {
                return Ok(());
            };
            let result = self.execute(&task);
            self.retire(&task);
            if let Err(e) = result {
                // The stream is broken: drop what is left, as a real runtime reports the first
                // failed task at synchronisation and discards the rest.
                let rest: Vec<Task> =
                    self.streams.get_mut(&sid).map(|s| s.queue.drain(..).collect()).unwrap_or_default();
                for t in &rest {
                    self.retire(t);
                }
                return Err(e);
            }
            if let (Some(ev), TaskKind::Record(r)) = (until, &task.kind) {
                if ev == *r {
                    return Ok(());
                }
            }
        }
    }

    fn execute(&mut self, task: &Task) -> Result<(), (i32, String)> {
        let rt = |m: String| (ACL_ERROR_RT_AICORE_EXCEPTION, m);
        match &task.kind {
            TaskKind::Op { op, run, workspace, relocated } => {
                if let Some((ws, len)) = workspace {
                    // Scribble over the workspace before and after the kernel: an operand that
                    // aliases it is corrupted visibly.
                    self.mem.bytes_mut(*ws, *len, op).map_err(rt)?.fill(0xEE);
                }
                self.mem.relocated = relocated.iter().copied().collect();
                let r = run(&mut self.mem).map_err(|m| rt(format!("{op}: {m}")));
                self.mem.relocated.clear();
                r?;
                if let Some((ws, len)) = workspace {
                    self.mem.bytes_mut(*ws, *len, op).map_err(rt)?.fill(0xEE);
                }
                Ok(())
            }
            TaskKind::H2dBytes { dst, bytes } => {
                self.mem.bytes_mut(*dst, bytes.len(), "aclrtMemcpyAsync").map_err(rt)?.copy_from_slice(bytes);
                Ok(())
            }
            TaskKind::H2dPinned { dst, src, len } => {
                // SAFETY: `src..src+len` lies in a pinned allocation that cannot be freed while
                // this task is pending (aclrtFreeHost refuses).
                let data = unsafe { std::slice::from_raw_parts(*src as *const u8, *len) }.to_vec();
                self.mem.bytes_mut(*dst, *len, "aclrtMemcpyAsync").map_err(rt)?.copy_from_slice(&data);
                Ok(())
            }
            TaskKind::D2hPinned { dst, src, len } => {
                let data = self.mem.bytes(*src, *len, "aclrtMemcpyAsync").map_err(rt)?;
                // SAFETY: as above, the pinned destination is kept alive while pending.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), *dst as *mut u8, *len) };
                Ok(())
            }
            TaskKind::D2d { dst, src, len } => {
                let data = self.mem.bytes(*src, *len, "aclrtMemcpyAsync").map_err(rt)?.to_vec();
                self.mem.bytes_mut(*dst, *len, "aclrtMemcpyAsync").map_err(rt)?.copy_from_slice(&data);
                Ok(())
            }
            TaskKind::Memset { dst, value, len } => {
                self.mem.bytes_mut(*dst, *len, "aclrtMemsetAsync").map_err(rt)?.fill(*value);
                Ok(())
            }
            TaskKind::Record(ev) => {
                if let Some(Entry { obj: Obj::Event(e), .. }) = self.objects.get_mut(ev) {
                    e.pending_on = None;
                }
                Ok(())
            }
            TaskKind::Wait(ev) => {
                let other = match self.objects.get(ev) {
                    Some(Entry { obj: Obj::Event(e), .. }) => e.pending_on,
                    _ => None,
                };
                match other {
                    Some(s) => self.run_stream(s, Some(*ev)),
                    None => Ok(()),
                }
            }
        }
    }

    fn count_live(&self, kind: u32, me: ThreadId) -> u64 {
        match kind {
            0..=4 | 8 => self.objects.values().filter(|e| e.owner == me && e.obj.kind_id() == kind).count() as u64,
            5 => self.mem.allocs.values().filter(|a| a.owner == me && a.data.is_some()).count() as u64,
            6 => self.host.values().filter(|a| a.owner == me).count() as u64,
            7 => self.streams.iter().filter(|(id, s)| s.owner == me && s.live && !self.is_default(**id)).count() as u64,
            _ => 0,
        }
    }

    fn is_default(&self, id: u64) -> bool {
        self.default_streams.values().any(|&d| d == id)
    }
}

fn code_of(r: Result<(), (i32, String)>) -> aclError {
    match r {
        Ok(()) => ACL_SUCCESS,
        Err((code, msg)) => fail(code, msg),
    }
}

/// Writes through an out-pointer after checking it.
unsafe fn put<T>(p: *mut T, v: T, what: &str) -> Result<(), (i32, String)> {
    if p.is_null() {
        return Err((ACL_ERROR_INVALID_PARAM, format!("{what}: output pointer is NULL")));
    }
    // SAFETY: non-null, and the caller passed a pointer to writable storage of type T.
    unsafe { p.write(v) };
    Ok(())
}

// ------------------------------------------------------------------------------- runtime

#[no_mangle]
pub unsafe extern "C" fn aclInit(_configPath: *const c_char) -> aclError {
    let mut e = emu();
    if e.initialized && !e.finalized {
        return fail(
            ACL_ERROR_REPEAT_INITIALIZE,
            "aclInit: already initialised (aclInit may be called once per process)",
        );
    }
    // A SoC name no family matches would only fail later, on the first operator whose
    // support depends on the family.
    if crate::fused::family() == "other" {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!(
                "aclInit: DSV4_ASCEND_EMU_SOC={:?} is not a SoC the emulator knows: give a name of the Ascend910B* (A2), \
                 Ascend910_93* (A3), Ascend950*, Ascend310P* or Ascend910A/ProA/ProB/PremiumA family, e.g. Ascend910B3, Ascend910_9391 or \
                 Ascend950PR_9599",
                soc_name()
            ),
        );
    }
    let physical = env_usize("DSV4_ASCEND_EMU_DEVICES", 2) as i32;
    e.visible = match std::env::var("ASCEND_RT_VISIBLE_DEVICES") {
        Err(_) => (0..physical).collect(),
        Ok(v) => {
            let mut ids = vec![];
            for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match part.parse::<i32>() {
                    Ok(id) if (0..physical).contains(&id) && !ids.contains(&id) => ids.push(id),
                    _ => {
                        return fail(
                            ACL_ERROR_RT_INVALID_DEVICEID,
                            format!("aclInit: ASCEND_RT_VISIBLE_DEVICES={v:?} names device {part:?}, but devices are 0..{physical}"),
                        )
                    }
                }
            }
            ids
        }
    };
    e.capacity = env_usize("DSV4_ASCEND_EMU_MEMORY_MB", 16384) << 20;
    e.initialized = true;
    e.finalized = false;
    ACL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn aclFinalize() -> aclError {
    let mut e = emu();
    if !e.initialized || e.finalized {
        return fail(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize: not initialised or already finalised");
    }
    e.finalized = true;
    ACL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn aclGetRecentErrMsg() -> *const c_char {
    let msg = LAST_ERROR.with(|e| e.borrow_mut().take());
    RETURNED_ERROR.with(|r| {
        let mut r = r.borrow_mut();
        *r = msg.map(|m| CString::new(m.replace('\0', " ")).expect("no NUL"));
        r.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSetDevice(deviceId: i32) -> aclError {
    let e = emu();
    if let Err((c, m)) = e.require_init("aclrtSetDevice") {
        return fail(c, m);
    }
    if deviceId < 0 || deviceId as usize >= e.visible.len() {
        let vis = std::env::var("ASCEND_RT_VISIBLE_DEVICES")
            .map(|v| format!(" (ASCEND_RT_VISIBLE_DEVICES={v:?})"))
            .unwrap_or_default();
        return fail(
            ACL_ERROR_RT_INVALID_DEVICEID,
            format!("aclrtSetDevice: device {deviceId} does not exist; {} device(s) are visible{vis}", e.visible.len()),
        );
    }
    DEVICE.with(|d| {
        let mut d = d.borrow_mut();
        *d = Some(match *d {
            Some((dev, n)) if dev == deviceId => (dev, n + 1),
            _ => (deviceId, 1),
        });
    });
    ACL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn aclrtResetDevice(deviceId: i32) -> aclError {
    let e = emu();
    if let Err((c, m)) = e.require_init("aclrtResetDevice") {
        return fail(c, m);
    }
    drop(e);
    DEVICE.with(|d| {
        let mut d = d.borrow_mut();
        match *d {
            Some((dev, n)) if dev == deviceId => {
                *d = if n > 1 { Some((dev, n - 1)) } else { None };
                ACL_SUCCESS
            }
            _ => fail(
                ACL_ERROR_RT_INVALID_DEVICEID,
                format!("aclrtResetDevice: device {deviceId} is not set on this thread"),
            ),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetDevice(deviceId: *mut i32) -> aclError {
    let e = emu();
    code_of(e.require_device("aclrtGetDevice").and_then(|d| unsafe { put(deviceId, d, "aclrtGetDevice") }))
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetDeviceCount(count: *mut u32) -> aclError {
    let e = emu();
    code_of(
        e.require_init("aclrtGetDeviceCount")
            .and_then(|()| unsafe { put(count, e.visible.len() as u32, "aclrtGetDeviceCount") }),
    )
}

/// The physical id of logical NPU `logical` (0..DSV4_ASCEND_EMU_DEVICES): the
/// `DSV4_ASCEND_EMU_PHYSICAL_IDS` list's entry (a container's view: logical ids renumbered from
/// 0), else the same id (no container).
pub(crate) fn physical_of(logical: i32) -> Option<i32> {
    match std::env::var("DSV4_ASCEND_EMU_PHYSICAL_IDS") {
        Err(_) => Some(logical),
        Ok(list) => {
            let ids: Vec<i32> = list.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            usize::try_from(logical).ok().and_then(|l| ids.get(l).copied())
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetPhyDevIdByLogicDevId(logicDevId: i32, phyDevId: *mut i32) -> aclError {
    let e = emu();
    let physical = env_usize("DSV4_ASCEND_EMU_DEVICES", 2) as i32;
    code_of(e.require_init("aclrtGetPhyDevIdByLogicDevId").and_then(|()| {
        match physical_of(logicDevId).filter(|_| (0..physical).contains(&logicDevId)) {
            // SAFETY: `put` checks the pointer; the caller passes writable storage for an i32.
            Some(p) => unsafe { put(phyDevId, p, "aclrtGetPhyDevIdByLogicDevId") },
            None => Err((
                ACL_ERROR_RT_INVALID_DEVICEID,
                format!("aclrtGetPhyDevIdByLogicDevId: logical device {logicDevId} does not exist (0..{physical})"),
            )),
        }
    }))
}

static SOC: LazyLock<CString> = LazyLock::new(|| {
    CString::new(std::env::var("DSV4_ASCEND_EMU_SOC").unwrap_or_else(|_| "Ascend910B3".into())).unwrap_or_default()
});

#[cfg(test)]
thread_local! {
    /// Unit tests: the SoC this thread's calls see (the process-wide one is read once).
    pub(crate) static SOC_OVERRIDE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The SoC this emulator pretends to be (`DSV4_ASCEND_EMU_SOC`, default `Ascend910B3`).
pub(crate) fn soc_name() -> String {
    #[cfg(test)]
    if let Some(s) = SOC_OVERRIDE.with(|o| o.borrow().clone()) {
        return s;
    }
    SOC.to_string_lossy().into_owned()
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetSocName() -> *const c_char {
    SOC.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetMemInfo(attr: aclrtMemAttr, free: *mut usize, total: *mut usize) -> aclError {
    let e = emu();
    let r = e.require_device("aclrtGetMemInfo").and_then(|dev| {
        if attr.0 > 5 {
            return Err((ACL_ERROR_INVALID_PARAM, format!("aclrtGetMemInfo: unknown aclrtMemAttr {}", attr.0)));
        }
        let used = e.used.get(&dev).copied().unwrap_or(0);
        // SAFETY: caller-provided out-pointers, checked for NULL by `put`.
        unsafe {
            put(free, e.capacity.saturating_sub(used), "aclrtGetMemInfo")?;
            put(total, e.capacity, "aclrtGetMemInfo")
        }
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateStream(stream: *mut aclrtStream) -> aclError {
    let mut e = emu();
    let r = e.require_device("aclrtCreateStream").and_then(|dev| {
        if stream.is_null() {
            return Err((ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: output pointer is NULL".into()));
        }
        let id = e.handle();
        let owner = std::thread::current().id();
        e.streams.insert(id, Stream { device: dev, owner, queue: VecDeque::new(), live: true });
        // SAFETY: checked non-null above.
        unsafe { put(stream, id as aclrtStream, "aclrtCreateStream") }
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtDestroyStream(stream: aclrtStream) -> aclError {
    let mut e = emu();
    if stream.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtDestroyStream: stream is NULL (the default stream cannot be destroyed)",
        );
    }
    let r = e.stream_id(stream, "aclrtDestroyStream").and_then(|sid| {
        let s = e.streams.get_mut(&sid).expect("checked");
        if !s.queue.is_empty() {
            return Err((
                ACL_ERROR_RT_PARAM_INVALID,
                format!(
                    "aclrtDestroyStream: {} task(s) are still queued on {stream:p}; synchronise the stream before destroying it",
                    s.queue.len()
                ),
            ));
        }
        s.live = false;
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSynchronizeStream(stream: aclrtStream) -> aclError {
    let mut e = emu();
    let r = e.stream_id(stream, "aclrtSynchronizeStream").and_then(|sid| e.run_stream(sid, None));
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSynchronizeDevice() -> aclError {
    let mut e = emu();
    let r = e.require_device("aclrtSynchronizeDevice").and_then(|dev| {
        let mut ids: Vec<u64> = e.streams.iter().filter(|(_, s)| s.device == dev).map(|(id, _)| *id).collect();
        ids.sort();
        ids.into_iter().try_for_each(|id| e.run_stream(id, None))
    });
    code_of(r)
}

// ---------------------------------------------------------------------------------- events

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateEvent(event: *mut aclrtEvent) -> aclError {
    let mut e = emu();
    let r = e.require_device("aclrtCreateEvent").and_then(|_| {
        if event.is_null() {
            return Err((ACL_ERROR_INVALID_PARAM, "aclrtCreateEvent: output pointer is NULL".into()));
        }
        let h = e.insert(Obj::Event(Event::default()));
        // SAFETY: checked non-null.
        unsafe { put(event, h as aclrtEvent, "aclrtCreateEvent") }
    });
    code_of(r)
}

fn event_state(e: &Emu, ev: aclrtEvent, what: &str) -> Result<Option<u64>, (i32, String)> {
    match e.live(ev as u64, "aclrtEvent", what) {
        Ok(Obj::Event(x)) => Ok(x.pending_on),
        Ok(_) => unreachable!("kind checked"),
        Err(m) => Err((ACL_ERROR_RT_PARAM_INVALID, m)),
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclrtDestroyEvent(event: aclrtEvent) -> aclError {
    let mut e = emu();
    let r = event_state(&e, event, "aclrtDestroyEvent").and_then(|pending| {
        if pending.is_some() {
            return Err((
                ACL_ERROR_RT_PARAM_INVALID,
                "aclrtDestroyEvent: the event is recorded on a stream that has not reached it; synchronise first"
                    .into(),
            ));
        }
        e.bury(event as u64, "aclrtDestroyEvent", None);
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtRecordEvent(event: aclrtEvent, stream: aclrtStream) -> aclError {
    let mut e = emu();
    let r = event_state(&e, event, "aclrtRecordEvent").and_then(|_| {
        let sid = e.stream_id(stream, "aclrtRecordEvent")?;
        if let Some(Entry { obj: Obj::Event(x), .. }) = e.objects.get_mut(&(event as u64)) {
            x.pending_on = Some(sid);
        }
        e.enqueue(sid, Task { kind: TaskKind::Record(event as u64), reads: vec![], writes: vec![], host: vec![] });
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtStreamWaitEvent(stream: aclrtStream, event: aclrtEvent) -> aclError {
    let mut e = emu();
    let r = event_state(&e, event, "aclrtStreamWaitEvent").and_then(|_| {
        let sid = e.stream_id(stream, "aclrtStreamWaitEvent")?;
        e.enqueue(sid, Task { kind: TaskKind::Wait(event as u64), reads: vec![], writes: vec![], host: vec![] });
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSynchronizeEvent(event: aclrtEvent) -> aclError {
    let mut e = emu();
    let r = event_state(&e, event, "aclrtSynchronizeEvent").and_then(|pending| match pending {
        Some(sid) => e.run_stream(sid, Some(event as u64)),
        None => Ok(()),
    });
    code_of(r)
}

// ---------------------------------------------------------------------------------- memory

#[no_mangle]
pub unsafe extern "C" fn aclrtMalloc(devPtr: *mut *mut c_void, size: usize, policy: aclrtMemMallocPolicy) -> aclError {
    let mut e = emu();
    let r = e.require_device("aclrtMalloc").and_then(|dev| {
        if devPtr.is_null() {
            return Err((ACL_ERROR_INVALID_PARAM, "aclrtMalloc: devPtr is NULL".into()));
        }
        if size == 0 {
            return Err((ACL_ERROR_INVALID_PARAM, "aclrtMalloc: size is 0".into()));
        }
        if policy.0 & 0xff > 5 {
            return Err((ACL_ERROR_INVALID_PARAM, format!("aclrtMalloc: unknown policy {:#x}", policy.0)));
        }
        // Documented: the size is rounded up to 32 bytes, plus 32 bytes.
        let real = (size.div_ceil(32) + 1) * 32;
        let used = e.used.get(&dev).copied().unwrap_or(0);
        if used + real > e.capacity {
            return Err((
                ACL_ERROR_RT_MEMORY_ALLOCATION,
                format!(
                    "aclrtMalloc: out of device memory ({size} bytes requested, {} of {} free)",
                    e.capacity - used,
                    e.capacity
                ),
            ));
        }
        *e.used.entry(dev).or_default() += real;
        let addr = e.mem.next;
        e.mem.next += (real as u64).div_ceil(DEVICE_ALIGN) * DEVICE_ALIGN + DEVICE_ALIGN;
        let owner = std::thread::current().id();
        e.mem.allocs.insert(
            addr,
            DevAlloc { size, data: Some(vec![0xFF; size]), device: dev, owner, pending_reads: 0, pending_writes: 0 },
        );
        // SAFETY: checked non-null.
        unsafe { put(devPtr, addr as *mut c_void, "aclrtMalloc") }
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtFree(devPtr: *mut c_void) -> aclError {
    let mut e = emu();
    let addr = devPtr as u64;
    let r = e.require_device("aclrtFree").and_then(|_| {
        let a = match e.mem.allocs.get_mut(&addr) {
            None => {
                let inside = e
                    .mem
                    .find(addr)
                    .map(|(b, _)| format!(" (it points inside the allocation at {b:#x})"))
                    .unwrap_or_default();
                return Err((
                    ACL_ERROR_INVALID_PARAM,
                    format!("aclrtFree: {addr:#x} is not an address returned by aclrtMalloc{inside}"),
                ));
            }
            Some(a) => a,
        };
        if a.data.is_none() {
            return Err((ACL_ERROR_INVALID_PARAM, format!("aclrtFree: {addr:#x} was already freed (double free)")));
        }
        if a.pending_reads + a.pending_writes > 0 {
            return Err((
                ACL_ERROR_INVALID_PARAM,
                format!(
                    "aclrtFree: {addr:#x} is still used by {} queued task(s); synchronise the stream before freeing",
                    a.pending_reads + a.pending_writes
                ),
            ));
        }
        a.data = None;
        let (dev, real) = (a.device, (a.size.div_ceil(32) + 1) * 32);
        *e.used.entry(dev).or_default() -= real;
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMallocHost(hostPtr: *mut *mut c_void, size: usize) -> aclError {
    let mut e = emu();
    let r = e.require_init("aclrtMallocHost").and_then(|()| {
        if hostPtr.is_null() || size == 0 {
            return Err((ACL_ERROR_INVALID_PARAM, format!("aclrtMallocHost: hostPtr {hostPtr:p}, size {size}")));
        }
        let layout =
            std::alloc::Layout::from_size_align(size, 64).map_err(|e| (ACL_ERROR_INVALID_PARAM, e.to_string()))?;
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err((ACL_ERROR_BAD_ALLOC, "aclrtMallocHost: out of host memory".into()));
        }
        e.host.insert(p as u64, HostAlloc { size, layout, owner: std::thread::current().id(), pending: 0 });
        // SAFETY: checked non-null.
        unsafe { put(hostPtr, p as *mut c_void, "aclrtMallocHost") }
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtFreeHost(hostPtr: *mut c_void) -> aclError {
    let mut e = emu();
    let r = e.require_init("aclrtFreeHost").and_then(|()| {
        let Some(a) = e.host.get(&(hostPtr as u64)) else {
            return Err((
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtFreeHost: {hostPtr:p} was not returned by aclrtMallocHost (or was already freed)"),
            ));
        };
        if a.pending > 0 {
            return Err((
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtFreeHost: {hostPtr:p} is used by {} queued copy task(s); synchronise first", a.pending),
            ));
        }
        let a = e.host.remove(&(hostPtr as u64)).expect("present");
        // SAFETY: allocated by aclrtMallocHost with this layout, not yet freed.
        unsafe { std::alloc::dealloc(hostPtr as *mut u8, a.layout) };
        Ok(())
    });
    code_of(r)
}

fn is_device(e: &Emu, addr: u64) -> bool {
    addr >= DEVICE_BASE && addr < e.mem.next
}

/// The pinned allocation holding `[addr, addr+len)`, if any.
fn pinned(e: &Emu, addr: u64, len: usize) -> Option<u64> {
    e.host.iter().find(|(b, a)| addr >= **b && addr + len as u64 <= **b + a.size as u64).map(|(b, _)| *b)
}

fn check_copy(
    e: &Emu,
    dst: u64,
    dest_max: usize,
    src: u64,
    count: usize,
    kind: aclrtMemcpyKind,
    what: &str,
) -> Result<(), (i32, String)> {
    let inv = |m: String| (ACL_ERROR_INVALID_PARAM, format!("{what}: {m}"));
    if count > dest_max {
        return Err(inv(format!("count {count} exceeds destMax {dest_max}")));
    }
    if dst == 0 || src == 0 {
        return Err(inv("NULL pointer".into()));
    }
    let (dst_dev, src_dev) = match kind {
        aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_HOST => (false, false),
        aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE => (true, false),
        aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST => (false, true),
        aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_DEVICE => (true, true),
        k => return Err(inv(format!("unknown aclrtMemcpyKind {}", k.0))),
    };
    for (addr, is_dev, role) in [(dst, dst_dev, "destination"), (src, src_dev, "source")] {
        if is_dev {
            e.mem.check_range(addr, count, &format!("{what} {role}")).map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?;
        } else if is_device(e, addr) {
            return Err(inv(format!("the {role} {addr:#x} is device memory but the copy kind says host")));
        }
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpy(
    dst: *mut c_void,
    destMax: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
) -> aclError {
    let mut e = emu();
    let (d, s) = (dst as u64, src as u64);
    let r = e.require_device("aclrtMemcpy").and_then(|_| {
        check_copy(&e, d, destMax, s, count, kind, "aclrtMemcpy")?;
        let hazard = |e: &Emu, addr: u64, writing: bool, role: &str| -> Result<(), (i32, String)> {
            let (base, a) = e.mem.find(addr).expect("checked");
            let busy = if writing { a.pending_reads + a.pending_writes } else { a.pending_writes };
            if busy > 0 {
                return Err((
                    ACL_ERROR_INVALID_PARAM,
                    format!(
                        "aclrtMemcpy: the {role} (allocation {base:#x}) is {} by {busy} task(s) still queued on a stream; \
                         the host must call aclrtSynchronizeStream before {} it",
                        if writing { "used" } else { "written" },
                        if writing { "overwriting" } else { "reading" }
                    ),
                ));
            }
            Ok(())
        };
        match kind {
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE => {
                hazard(&e, d, true, "destination")?;
                // SAFETY: the caller's host buffer of `count` bytes.
                let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, count) };
                e.mem.bytes_mut(d, count, "aclrtMemcpy").map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?.copy_from_slice(bytes);
            }
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST => {
                hazard(&e, s, false, "source")?;
                let bytes = e.mem.bytes(s, count, "aclrtMemcpy").map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?;
                // SAFETY: the caller's host buffer of at least `count` (<= destMax) bytes.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, count) };
            }
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_DEVICE => {
                hazard(&e, s, false, "source")?;
                hazard(&e, d, true, "destination")?;
                let bytes = e.mem.bytes(s, count, "aclrtMemcpy").map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?.to_vec();
                e.mem.bytes_mut(d, count, "aclrtMemcpy").map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?.copy_from_slice(&bytes);
            }
            _ => {
                // SAFETY: two host buffers of `count` bytes, as the caller promises.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, count) };
            }
        }
        Ok(())
    });
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpyAsync(
    dst: *mut c_void,
    destMax: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
    stream: aclrtStream,
) -> aclError {
    let mut e = emu();
    let (d, s) = (dst as u64, src as u64);
    let r = (|| {
        let sid = e.stream_id(stream, "aclrtMemcpyAsync")?;
        check_copy(&e, d, destMax, s, count, kind, "aclrtMemcpyAsync")?;
        let base = |e: &Emu, a: u64| e.mem.find(a).expect("checked").0;
        let task = match kind {
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE => match pinned(&e, s, count) {
                Some(h) => Task {
                    kind: TaskKind::H2dPinned { dst: d, src: s, len: count },
                    reads: vec![],
                    writes: vec![base(&e, d)],
                    host: vec![h],
                },
                None => {
                    // Pageable source: the documented behaviour is a copy made before returning.
                    // SAFETY: the caller's host buffer of `count` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, count) }.to_vec();
                    Task {
                        kind: TaskKind::H2dBytes { dst: d, bytes },
                        reads: vec![],
                        writes: vec![base(&e, d)],
                        host: vec![],
                    }
                }
            },
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST => {
                match pinned(&e, d, count) {
                    Some(h) => Task {
                        kind: TaskKind::D2hPinned { dst: d, src: s, len: count },
                        reads: vec![base(&e, s)],
                        writes: vec![],
                        host: vec![h],
                    },
                    None => return Err((
                        ACL_ERROR_INVALID_PARAM,
                        "aclrtMemcpyAsync: device-to-host into pageable host memory; use memory from aclrtMallocHost \
                         (or aclrtMemcpy after aclrtSynchronizeStream)"
                            .to_string(),
                    )),
                }
            }
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_DEVICE => {
                if !d.is_multiple_of(64) || !s.is_multiple_of(64) {
                    return Err((
                        ACL_ERROR_MEMORY_ADDRESS_UNALIGNED,
                        format!("aclrtMemcpyAsync: device-to-device copies need 64-byte aligned addresses (dst {d:#x}, src {s:#x})"),
                    ));
                }
                Task {
                    kind: TaskKind::D2d { dst: d, src: s, len: count },
                    reads: vec![base(&e, s)],
                    writes: vec![base(&e, d)],
                    host: vec![],
                }
            }
            _ => {
                return Err((
                    ACL_ERROR_INVALID_PARAM,
                    "aclrtMemcpyAsync: host-to-host copies are not asynchronous".into(),
                ));
            }
        };
        e.enqueue(sid, task);
        Ok(())
    })();
    code_of(r)
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemsetAsync(
    devPtr: *mut c_void,
    maxCount: usize,
    value: i32,
    count: usize,
    stream: aclrtStream,
) -> aclError {
    let mut e = emu();
    let d = devPtr as u64;
    let r = (|| {
        let sid = e.stream_id(stream, "aclrtMemsetAsync")?;
        if count > maxCount {
            return Err((
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtMemsetAsync: count {count} exceeds maxCount {maxCount}"),
            ));
        }
        let base = e.mem.check_range(d, count, "aclrtMemsetAsync").map_err(|m| (ACL_ERROR_INVALID_PARAM, m))?;
        e.enqueue(
            sid,
            Task {
                kind: TaskKind::Memset { dst: d, value: value as u8, len: count },
                reads: vec![],
                writes: vec![base],
                host: vec![],
            },
        );
        Ok(())
    })();
    code_of(r)
}

// ------------------------------------------------------------------------------ object API

/// Reads `n` i64 from a caller array (NULL allowed only when n == 0).
unsafe fn i64s(p: *const i64, n: u64) -> Option<Vec<i64>> {
    if n == 0 {
        return Some(vec![]);
    }
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller passes `n` readable values.
    Some(unsafe { std::slice::from_raw_parts(p, n as usize) }.to_vec())
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateTensor(
    viewDims: *const i64,
    viewDimsNum: u64,
    dataType: aclDataType,
    stride: *const i64,
    offset: i64,
    format: aclFormat,
    storageDims: *const i64,
    storageDimsNum: u64,
    tensorData: *mut c_void,
) -> *mut aclTensor {
    let mut e = emu();
    let what = "aclCreateTensor";
    let r = (|| -> Result<u64, String> {
        // SAFETY: arrays of the given lengths, as documented.
        let (dims, strides, storage) =
            unsafe { (i64s(viewDims, viewDimsNum), i64s(stride, viewDimsNum), i64s(storageDims, storageDimsNum)) };
        let (Some(dims), Some(strides), Some(storage)) = (dims, strides, storage) else {
            return Err(format!("{what}: viewDims, stride and storageDims must not be NULL"));
        };
        if viewDimsNum > 8 {
            return Err(format!("{what}: {viewDimsNum} dimensions; at most 8 are supported"));
        }
        let Some(bits) = mem::elem_bits(dataType) else {
            return Err(format!("{what}: data type {} is not supported by the emulator", dataType.0));
        };
        if format != aclFormat::ACL_FORMAT_ND
            && format != aclFormat::ACL_FORMAT_NCHW
            && format != aclFormat::ACL_FORMAT_NCL
        {
            return Err(format!("{what}: format {} is not supported by the emulator (use ACL_FORMAT_ND)", format.0));
        }
        if dims.iter().chain(&storage).any(|&d| d < 0) || strides.iter().any(|&s| s < 0) || offset < 0 {
            return Err(format!(
                "{what}: negative size, stride or offset (dims {dims:?}, strides {strides:?}, offset {offset}, storage {storage:?})"
            ));
        }
        let numel: i64 = dims.iter().product();
        let storage_elems: i64 = storage.iter().product();
        if numel > 0 {
            let last = offset + dims.iter().zip(&strides).map(|(d, s)| (d - 1) * s).sum::<i64>();
            if last >= storage_elems {
                return Err(format!(
                    "{what}: the view (dims {dims:?}, strides {strides:?}, offset {offset}) reaches element {last}, \
                     outside the storage {storage:?} of {storage_elems} elements"
                ));
            }
        }
        let data = tensorData as u64;
        if !data.is_multiple_of(32) {
            return Err(format!("{what}: tensorData {data:#x} is not 32-byte aligned"));
        }
        if data == 0 {
            if storage_elems > 0 {
                return Err(format!("{what}: tensorData is NULL for a non-empty storage {storage:?}"));
            }
        } else {
            // FLOAT4_E2M1 packs two elements a byte: an odd element count ends in a half byte.
            e.mem.check_range(data, (storage_elems as usize * bits).div_ceil(8), what)?;
        }
        let desc = Desc {
            handle: 0,
            dims: dims.iter().map(|&d| d as usize).collect(),
            strides: strides.iter().map(|&s| s as usize).collect(),
            offset: offset as usize,
            dtype: dataType,
            storage_elems: storage_elems as usize,
            data,
        };
        let h = e.insert(Obj::Tensor(TensorObj { desc, list: None }));
        if let Some(Entry { obj: Obj::Tensor(t), .. }) = e.objects.get_mut(&h) {
            t.desc.handle = h;
        }
        Ok(h)
    })();
    match r {
        Ok(h) => h as *mut aclTensor,
        Err(m) => {
            fail::<i32>(ACLNN_ERR_PARAM_INVALID, m);
            std::ptr::null_mut()
        }
    }
}

fn destroy(e: &mut Emu, h: u64, kind: &'static str, how: &'static str) -> aclnnStatus {
    if h == 0 {
        return fail(ACLNN_ERR_PARAM_NULLPTR, format!("{how}: {kind} is NULL"));
    }
    match e.live(h, kind, how) {
        Err(m) => fail(ACLNN_ERR_PARAM_INVALID, m.replace("use after destroy", "double destroy")),
        Ok(_) => {
            e.bury(h, how, None);
            ACLNN_SUCCESS
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclDestroyTensor(tensor: *const aclTensor) -> aclnnStatus {
    let mut e = emu();
    let h = tensor as u64;
    if let Some(Entry { obj: Obj::Tensor(t), .. }) = e.objects.get(&h) {
        if let Some(list) = t.list {
            return fail(
                ACLNN_ERR_PARAM_INVALID,
                format!("aclDestroyTensor: tensor {h:#x} belongs to tensor list {list:#x}, which owns it; aclDestroyTensorList destroys it"),
            );
        }
    }
    destroy(&mut e, h, "aclTensor", "aclDestroyTensor")
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateScalar(value: *mut c_void, dataType: aclDataType) -> *mut aclScalar {
    let mut e = emu();
    if value.is_null() {
        fail::<i32>(ACLNN_ERR_PARAM_NULLPTR, "aclCreateScalar: value is NULL");
        return std::ptr::null_mut();
    }
    let Some(es) = elem_size(dataType).filter(|_| !mem::is_low_precision(dataType)) else {
        fail::<i32>(
            ACLNN_ERR_PARAM_INVALID,
            format!("aclCreateScalar: data type {} ({}) is not supported", dataType.0, mem::dtype_name(dataType)),
        );
        return std::ptr::null_mut();
    };
    // SAFETY: the caller passes a host value of the given type.
    let bytes = unsafe { std::slice::from_raw_parts(value as *const u8, es) };
    let v = mem::decode(dataType, bytes);
    let s = if mem::is_int(dataType) { ScalarVal::Int(v as i64) } else { ScalarVal::Float(v) };
    e.insert(Obj::Scalar(s)) as *mut aclScalar
}

#[no_mangle]
pub unsafe extern "C" fn aclDestroyScalar(scalar: *const aclScalar) -> aclnnStatus {
    destroy(&mut emu(), scalar as u64, "aclScalar", "aclDestroyScalar")
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateIntArray(value: *const i64, size: u64) -> *mut aclIntArray {
    let mut e = emu();
    // SAFETY: `size` readable values.
    match unsafe { i64s(value, size) } {
        Some(v) => e.insert(Obj::IntArray(v)) as *mut aclIntArray,
        None => {
            fail::<i32>(ACLNN_ERR_PARAM_NULLPTR, "aclCreateIntArray: value is NULL");
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclDestroyIntArray(array: *const aclIntArray) -> aclnnStatus {
    destroy(&mut emu(), array as u64, "aclIntArray", "aclDestroyIntArray")
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateTensorList(value: *const *const aclTensor, size: u64) -> *mut aclTensorList {
    let mut e = emu();
    let r = (|| -> Result<u64, String> {
        if size > 0 && value.is_null() {
            return Err("aclCreateTensorList: value is NULL".into());
        }
        // SAFETY: `size` tensor pointers.
        let members: Vec<u64> = if size == 0 {
            vec![]
        } else {
            unsafe { std::slice::from_raw_parts(value, size as usize) }.iter().map(|p| *p as u64).collect()
        };
        for (i, &m) in members.iter().enumerate() {
            e.tensor(m as *const aclTensor, &format!("aclCreateTensorList member {i}"))?;
            if let Some(Entry { obj: Obj::Tensor(TensorObj { list: Some(l), .. }), .. }) = e.objects.get(&m) {
                return Err(format!("aclCreateTensorList: member {i} ({m:#x}) already belongs to tensor list {l:#x}"));
            }
            if members[..i].contains(&m) {
                return Err(format!(
                    "aclCreateTensorList: tensor {m:#x} appears twice; the list would destroy it twice"
                ));
            }
        }
        let h = e.insert(Obj::List(members.clone()));
        for m in members {
            if let Some(Entry { obj: Obj::Tensor(t), .. }) = e.objects.get_mut(&m) {
                t.list = Some(h);
            }
        }
        Ok(h)
    })();
    match r {
        Ok(h) => h as *mut aclTensorList,
        Err(m) => {
            fail::<i32>(ACLNN_ERR_PARAM_INVALID, m);
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclDestroyTensorList(array: *const aclTensorList) -> aclnnStatus {
    let mut e = emu();
    let h = array as u64;
    let members = match e.live(h, "aclTensorList", "aclDestroyTensorList") {
        Ok(Obj::List(m)) => m.clone(),
        _ => return destroy(&mut e, h, "aclTensorList", "aclDestroyTensorList"),
    };
    for m in members {
        e.bury(m, "by aclDestroyTensorList, which owns its members", None);
    }
    destroy(&mut e, h, "aclTensorList", "aclDestroyTensorList")
}

fn executor_mut<'e>(e: &'e mut Emu, h: u64, what: &str) -> Result<&'e mut Executor, String> {
    e.live(h, "aclOpExecutor", what)?;
    // A launched single-use executor is no longer live (its launch released it).
    match &mut e.objects.get_mut(&h).expect("live").obj {
        Obj::Executor(x) => Ok(x),
        _ => unreachable!("kind checked"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclSetAclOpExecutorRepeatable(executor: *mut aclOpExecutor) -> aclnnStatus {
    let mut e = emu();
    match executor_mut(&mut e, executor as u64, "aclSetAclOpExecutorRepeatable") {
        Err(m) => fail(ACLNN_ERR_PARAM_INVALID, m),
        // The docs exclude operators that copy internally; an input the kernel cannot read as
        // it is (anything but contiguous or a transpose of the last two dimensions) would need
        // such a copy, so the emulator refuses to make those executors repeatable.
        Ok(x) if x.reads.iter().any(|d| !d.is_contiguous() && !d.is_transposed_last_two()) => {
            let d = x.reads.iter().find(|d| !d.is_contiguous() && !d.is_transposed_last_two()).expect("found");
            let m = format!(
                "aclSetAclOpExecutorRepeatable: {} reads the non-contiguous view {}, which needs an internal copy; \
                 such executors cannot be reused",
                x.op,
                d.describe()
            );
            fail(ACLNN_ERR_PARAM_INVALID, m)
        }
        Ok(x) => {
            x.repeatable = true;
            ACLNN_SUCCESS
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclDestroyAclOpExecutor(executor: *mut aclOpExecutor) -> aclnnStatus {
    let mut e = emu();
    let h = executor as u64;
    match executor_mut(&mut e, h, "aclDestroyAclOpExecutor") {
        Err(m) => fail(ACLNN_ERR_PARAM_INVALID, m),
        Ok(_) => destroy(&mut e, h, "aclOpExecutor", "aclDestroyAclOpExecutor"),
    }
}

/// aclSetInputTensorAddr / aclSetOutputTensorAddr: operand `index` (inputs and outputs
/// counted separately, in parameter order, as planned) of a repeatable executor gets a new data
/// address; everything else about the tensor stays as planned.
fn set_tensor_addr(
    executor: *mut aclOpExecutor,
    index: usize,
    tensor: *mut aclTensor,
    addr: *mut c_void,
    output: bool,
    what: &str,
) -> aclnnStatus {
    let mut e = emu();
    let h = executor as u64;
    let r = (|| -> Result<(), (i32, String)> {
        let inv = |m: String| (ACLNN_ERR_PARAM_INVALID, format!("{what}: {m}"));
        if executor.is_null() || tensor.is_null() {
            return Err((ACLNN_ERR_INNER_NULLPTR, format!("{what}: executor or tensor is NULL")));
        }
        let addr = addr as u64;
        if !addr.is_multiple_of(32) {
            return Err(inv(format!("address {addr:#x} is not 32-byte aligned")));
        }
        e.live(tensor as u64, "aclTensor", what).map_err(|m| (ACLNN_ERR_PARAM_INVALID, m))?;
        let x = executor_mut(&mut e, h, what).map_err(|m| (ACLNN_ERR_PARAM_INVALID, m))?;
        if !x.repeatable {
            return Err(inv(format!(
                "executor {h:#x} ({}) is not repeatable: call aclSetAclOpExecutorRepeatable right after its \
                 GetWorkspaceSize",
                x.op
            )));
        }
        let list = if output { &mut x.writes } else { &mut x.reads };
        let kind = if output { "outputs" } else { "inputs" };
        let n = list.len();
        let d = list.get_mut(index).ok_or_else(|| inv(format!("index {index} is outside the {n} {kind} planned")))?;
        if d.handle != tensor as u64 {
            return Err(inv(format!(
                "tensor {:#x} is not {kind}[{index}] of this executor (that is {:#x})",
                tensor as u64, d.handle
            )));
        }
        // The same aclTensor planned in several places moves as one.
        for o in x.reads.iter_mut().chain(x.writes.iter_mut()).filter(|o| o.handle == tensor as u64) {
            o.data = addr;
        }
        if let Some(Entry { obj: Obj::Tensor(t), .. }) = e.objects.get_mut(&(tensor as u64)) {
            t.desc.data = addr;
        }
        Ok(())
    })();
    match r {
        Ok(()) => ACLNN_SUCCESS,
        Err((c, m)) => fail(c, m),
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclSetInputTensorAddr(
    executor: *mut aclOpExecutor,
    index: usize,
    tensor: *mut aclTensor,
    addr: *mut c_void,
) -> aclnnStatus {
    set_tensor_addr(executor, index, tensor, addr, false, "aclSetInputTensorAddr")
}

#[no_mangle]
pub unsafe extern "C" fn aclSetOutputTensorAddr(
    executor: *mut aclOpExecutor,
    index: usize,
    tensor: *mut aclTensor,
    addr: *mut c_void,
) -> aclnnStatus {
    set_tensor_addr(executor, index, tensor, addr, true, "aclSetOutputTensorAddr")
}

// ---------------------------------------------------------------------- aclnn two-phase calls

/// What an operator's GetWorkspaceSize produces.
pub(crate) struct Plan {
    pub workspace: u64,
    pub objects: Vec<u64>,
    pub reads: Vec<Desc>,
    pub writes: Vec<Desc>,
    pub run: Arc<OpFn>,
    /// Operator state its launch needs (MC2 operators, `mc2.rs`); None for the others.
    pub extra: Option<Extra>,
}

/// Phase one: validates through `plan` and creates the executor.
pub(crate) fn get_workspace(
    op: &'static str,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
    plan: impl FnOnce(&Emu) -> Result<Plan, String>,
) -> aclnnStatus {
    get_workspace_coded(op, workspace_size, executor, |e: &Emu| plan(e).map_err(|m| (ACLNN_ERR_PARAM_INVALID, m)))
}

/// [`get_workspace`] where the plan chooses the status of a refusal.
pub(crate) fn get_workspace_coded(
    op: &'static str,
    workspace_size: *mut u64,
    executor: *mut *mut aclOpExecutor,
    plan: impl FnOnce(&Emu) -> Result<Plan, (aclnnStatus, String)>,
) -> aclnnStatus {
    let what = format!("{op}GetWorkspaceSize");
    if workspace_size.is_null() || executor.is_null() {
        return fail(ACLNN_ERR_PARAM_NULLPTR, format!("{what}: workspaceSize or executor is NULL"));
    }
    let mut e = emu();
    let p = match plan(&e) {
        Ok(p) => p,
        Err((code, m)) => return fail(code, format!("{what}: {m}")),
    };
    let ws = p.workspace;
    *e.plans.entry(op.to_string()).or_default() += 1;
    let planned = p.reads.iter().chain(&p.writes).map(|d| d.data).collect();
    let h = e.insert(Obj::Executor(Executor {
        op,
        workspace: ws,
        repeatable: false,
        launches: 0,
        planned,
        objects: p.objects,
        reads: p.reads,
        writes: p.writes,
        run: p.run,
        extra: p.extra,
    }));
    // SAFETY: both out-pointers checked non-null above.
    unsafe {
        workspace_size.write(ws);
        executor.write(h as *mut aclOpExecutor);
    }
    ACLNN_SUCCESS
}

/// What a launch of `executor` (planned by `op`) will use: the plan's extra state and the
/// operands with their current addresses (after aclSetInputTensorAddr / aclSetOutputTensorAddr).
pub(crate) fn executor_job(executor: *mut aclOpExecutor, op: &'static str) -> Result<ExecutorJob, String> {
    let mut e = emu();
    let x = executor_mut(&mut e, executor as u64, op)?;
    if x.op != op {
        return Err(format!(
            "{op}: executor {:#x} was planned by {}GetWorkspaceSize, not {op}GetWorkspaceSize",
            executor as u64, x.op
        ));
    }
    Ok((x.extra.clone(), x.reads.clone(), x.writes.clone()))
}

/// Phase two: checks the executor, workspace and operands, then queues the kernel.
pub(crate) fn launch(
    op: &'static str,
    workspace: *mut c_void,
    workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: aclrtStream,
) -> aclnnStatus {
    let mut e = emu();
    let h = executor as u64;
    let r = (|| -> Result<(), (i32, String)> {
        let inv = |m: String| (ACLNN_ERR_PARAM_INVALID, format!("{op}: {m}"));
        let sid = e.stream_id(stream, op)?;
        let x = executor_mut(&mut e, h, op).map_err(|m| (ACLNN_ERR_PARAM_INVALID, m))?;
        if x.op != op {
            return Err(inv(format!(
                "executor {h:#x} was planned by {}GetWorkspaceSize, not {op}GetWorkspaceSize",
                x.op
            )));
        }
        let (need, objects, reads, writes, run) =
            (x.workspace, x.objects.clone(), x.reads.clone(), x.writes.clone(), x.run.clone());
        let relocated: Vec<(u64, u64)> = reads
            .iter()
            .chain(&writes)
            .zip(&x.planned)
            .filter(|(d, &p)| d.data != p)
            .map(|(d, _)| (d.handle, d.data))
            .collect();
        if workspace_size < need {
            return Err(inv(format!(
                "workspaceSize {workspace_size} is smaller than the {need} bytes GetWorkspaceSize asked for"
            )));
        }
        let ws = workspace as u64;
        let mut ws_region = None;
        if need > 0 {
            if ws == 0 {
                return Err(inv(format!("workspace is NULL but {need} bytes are required")));
            }
            e.mem
                .check_range(ws, workspace_size as usize, &format!("{op} workspace"))
                .map_err(|m| (ACLNN_ERR_PARAM_INVALID, m))?;
            for d in reads.iter().chain(&writes) {
                let (lo, hi) = (d.data, d.data + d.storage_bytes() as u64);
                if ws < hi && lo < ws + workspace_size {
                    return Err(inv(format!(
                        "the workspace {ws:#x}+{workspace_size} overlaps operand {}",
                        d.describe()
                    )));
                }
            }
            ws_region = Some((ws, workspace_size as usize));
        }
        for &o in &objects {
            if let Err(m) = e.live(o, e.kind_of(o).unwrap_or("object"), op) {
                return Err(inv(format!("{m} (destroyed between GetWorkspaceSize and the launch)")));
            }
        }
        let mut rb = vec![];
        let mut wb = vec![];
        for (d, out) in reads.iter().map(|d| (d, false)).chain(writes.iter().map(|d| (d, true))) {
            let base = e
                .mem
                .check_range(d.data, d.storage_bytes(), op)
                .map_err(|m| (ACLNN_ERR_PARAM_INVALID, format!("{op}: {m}")))?;
            if out {
                wb.push(base)
            } else {
                rb.push(base)
            }
        }
        if let Some((w, _)) = ws_region {
            wb.push(e.mem.find(w).expect("checked").0);
        }
        let x = executor_mut(&mut e, h, op).map_err(|m| (ACLNN_ERR_PARAM_INVALID, m))?;
        x.launches += 1;
        if !x.repeatable {
            // Released by its launch (the queued task holds the kernel it needs).
            e.bury(h, "launched", Some(op));
        }
        *e.launches.entry(op.to_string()).or_default() += 1;
        e.total_launches += 1;
        e.enqueue(
            sid,
            Task {
                kind: TaskKind::Op { op, run, workspace: ws_region, relocated },
                reads: rb,
                writes: wb,
                host: vec![],
            },
        );
        Ok(())
    })();
    match r {
        Ok(()) => ACLNN_SUCCESS,
        Err((c, m)) => fail(c, m),
    }
}

// ------------------------------------------------------------------------- emulator extras

#[no_mangle]
pub unsafe extern "C" fn dsv4emu_live_objects(kind: dsv4emuObjectKind) -> u64 {
    emu().count_live(kind.0, std::thread::current().id())
}

#[no_mangle]
pub unsafe extern "C" fn dsv4emu_plan_count(op: *const c_char) -> u64 {
    let e = emu();
    if op.is_null() {
        return e.plans.values().sum();
    }
    // SAFETY: a NUL-terminated name from the caller.
    let name = unsafe { CStr::from_ptr(op) }.to_string_lossy();
    e.plans.get(name.as_ref()).copied().unwrap_or(0)
}

#[no_mangle]
pub unsafe extern "C" fn dsv4emu_launch_count(op: *const c_char) -> u64 {
    let e = emu();
    if op.is_null() {
        return e.total_launches;
    }
    // SAFETY: a NUL-terminated name from the caller.
    let name = unsafe { CStr::from_ptr(op) }.to_string_lossy();
    e.launches.get(name.as_ref()).copied().unwrap_or(0)
}

/// Every exported function has exactly the signature `ascend-sys` declares.
macro_rules! check_signatures {
    ($($name:ident),* $(,)?) => { $( const _: dsv4_ascend_sys::pfn::$name = $name; )* };
}

check_signatures!(
    aclInit,
    aclFinalize,
    aclGetRecentErrMsg,
    aclrtSetDevice,
    aclrtResetDevice,
    aclrtGetDevice,
    aclrtGetDeviceCount,
    aclrtGetPhyDevIdByLogicDevId,
    aclrtGetSocName,
    aclrtGetMemInfo,
    aclrtCreateStream,
    aclrtDestroyStream,
    aclrtSynchronizeStream,
    aclrtSynchronizeDevice,
    aclrtCreateEvent,
    aclrtDestroyEvent,
    aclrtRecordEvent,
    aclrtStreamWaitEvent,
    aclrtSynchronizeEvent,
    aclrtMalloc,
    aclrtFree,
    aclrtMallocHost,
    aclrtFreeHost,
    aclrtMemcpy,
    aclrtMemcpyAsync,
    aclrtMemsetAsync,
    aclCreateTensor,
    aclDestroyTensor,
    aclCreateScalar,
    aclDestroyScalar,
    aclCreateIntArray,
    aclDestroyIntArray,
    aclCreateTensorList,
    aclDestroyTensorList,
    aclSetAclOpExecutorRepeatable,
    aclDestroyAclOpExecutor,
    aclSetInputTensorAddr,
    aclSetOutputTensorAddr,
    dsv4emu_live_objects,
    dsv4emu_launch_count,
);
