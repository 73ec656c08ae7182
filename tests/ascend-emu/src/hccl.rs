//! HCCL (Huawei Collective Communication Library) on the emulator: the communicator and
//! collective functions dsv4 uses, with the C signatures, result codes and type values of the
//! public headers (`hccl/hccl.h`, `hccl/hccl_comm.h`, `hccl/hccl_types.h`).
//!
//! Model. Ranks are threads of this process, each with its own current device
//! (`aclrtSetDevice` is per thread), so a communicator of n ranks needs n distinct logical
//! devices (`DSV4_ASCEND_EMU_DEVICES`, after `ASCEND_RT_VISIBLE_DEVICES`).
//! * `HcclGetRootInfo` (device set) writes a blob naming a new rendezvous; only blobs it wrote
//!   are accepted. `HcclCommInitRootInfo[Config]` (device set) blocks until all nRanks ranks
//!   joined and fails, on every rank that joined or joins later, when the ranks disagree on
//!   nRanks (or on the configured name), a rank id is out of range or joined twice, two ranks
//!   share a device, or a blob has already formed a communicator.
//! * `HcclCommInitClusterInfo[Config]` (device set) reads the rank table at the path (HCCL's
//!   JSON "ranktable", version 1.0 or 1.2: `status` "completed", `server_count` = the servers of
//!   `server_list`, unique `server_id`s, every `rank_id` 0..n-1 exactly once, `device_id`s
//!   distinct per server) and joins the world it describes as `rank` (its `rank_id`). The world is
//!   named by the `server_id` of the server holding rank 0 (on hardware the ranks meet at the
//!   addresses the table gives), so ranks of one world may pass different files with the same
//!   contents, as the nodes of a multi-host run do. A path that is NULL, too long (4096 bytes with
//!   the NUL) or unreadable, or a malformed table, fails the caller only (HCCL_E_OPEN_FILE_FAILURE
//!   / HCCL_E_PARA; its peers then time out); a rank not in the table, a calling thread whose
//!   device's physical id is not the table's `device_id` for that rank, and tables that
//!   disagree with the first joiner's (servers, device ids or device IPs of any rank) fail every
//!   rank of the world, as do the root-info checks. A world that formed frees its name for a
//!   later one; a failed one stays failed for latecomers.
//! * `HcclCreateSubCommConfig` is collective over the listed ranks of a global communicator
//!   (they must agree on rankNum, rankIds and the name; rankIds ascending; subCommRankId is the
//!   caller's index there); a rank outside passes `rankIds = NULL, subCommId = 0xFFFFFFFF` and
//!   gets a NULL handle without waiting. Splitting a sub-communicator is refused, as documented.
//! * A collective is a blocking rendezvous at the call: the k-th collective a rank issues on a
//!   communicator meets the k-th of every other rank (dsv4 issues them from every rank thread in
//!   the same order). At the call the rank's stream is first run up to that point (so the
//!   operands hold what the work queued before produced), the input is read, and once every
//!   rank has arrived the results are computed (reductions in rank order, rounding to the data
//!   type after each step, so every rank gets identical bits) and queued on the stream as
//!   writes of the output: the host reading the output before synchronising the stream is
//!   refused like for any other queued work.
//! * Strict checks, each failing on every rank of the communicator: a collective on a thread
//!   with no device or another device than the rank's, a stream that is not a live stream of
//!   that device, a destroyed communicator handle (a handle never created fails only the caller,
//!   as nothing names its peers), buffers that are not allocations of the rank's device large
//!   enough for the count (or misaligned for the type), ranks calling different collectives at
//!   the same step, disagreeing counts / data types / reduce ops / roots, AlltoAllV counts that
//!   do not pair up (what rank i sends to j must be what j expects from i) or that reach past
//!   the buffers. The rank that detects the misuse returns its code (HCCL_E_PARA, HCCL_E_PTR for
//!   a NULL pointer, HCCL_E_NOT_SUPPORT for a data type / reduce op the SoC's HCCL lacks); the
//!   others return the same code with a message naming the rank and the cause, all readable
//!   with `aclGetRecentErrMsg`.
//! * Poisoning: after a failed collective the communicator is unusable; every later collective
//!   or split on it fails at once with the first failure's code and message (a real
//!   communicator is in an unknown state after a mismatch). Queries and HcclCommDestroy work.
//! * Injected failures (`DSV4_ASCEND_EMU_HCCL_FAIL=DEVICE:N`, for tests): the N-th collective
//!   called on DEVICE fails on that rank only, and its peers wait until the timeout.
//! * Timeouts: a rendezvous (init, split or collective) that not every rank reaches within
//!   `DSV4_ASCEND_EMU_HCCL_TIMEOUT_S` seconds (default 120; fractions allowed), read when a
//!   rank starts waiting, fails with HCCL_E_TIMEOUT on the ranks that came, and the
//!   communicator (or root info) is poisoned, so latecomers get the same error. A communicator
//!   made with a config whose `hcclExecTimeOut` is set (whole seconds, the first joiner's; 0:
//!   never) uses that for its collectives instead, as HCCL's communicator-level setting takes
//!   precedence over `HCCL_EXEC_TIMEOUT` (a sub-communicator: its own config).
//! * MC2 operators (`mc2.rs`: aclnnMoeDistributeDispatchV2 / CombineV2) name their communicator
//!   by its `HcclGetCommName` string (`comm_named`) and take part in its sequence as one step
//!   each (`mc2_step`, the same rendezvous, checks, poisoning and timeouts as a collective; a NULL
//!   stream is the thread's default stream there, as for any aclnn launch).
//! * `HcclCommDestroy` marks the handle destroyed (later use is reported as such); it returns
//!   HCCL_E_AGAIN while another thread is inside a call on that handle, as documented.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dsv4_ascend_sys::aclrtStream;
use half::{bf16, f16};

use crate::{current_device, emu, fail, soc_name, Emu, Task, TaskKind};

/// `HcclResult` (a C enum: `int`).
pub type HcclResult = i32;
pub type HcclComm = *mut c_void;
/// `HcclDataType` (C enum).
pub type HcclDataType = i32;
/// `HcclReduceOp` (C enum).
pub type HcclReduceOp = i32;

pub const HCCL_SUCCESS: HcclResult = 0;
pub(crate) const HCCL_E_PARA: HcclResult = 1;
const HCCL_E_PTR: HcclResult = 2;
const HCCL_E_NOT_SUPPORT: HcclResult = 5;
const HCCL_E_TIMEOUT: HcclResult = 9;
const HCCL_E_OPEN_FILE_FAILURE: HcclResult = 10;
const HCCL_E_RUNTIME: HcclResult = 15;
const HCCL_E_AGAIN: HcclResult = 20;

pub const HCCL_ROOT_INFO_BYTES: usize = 4108;
const COMM_NAME_MAX_LENGTH: usize = 128;
const HCCL_COMM_CONFIG_MAGIC_WORD: u32 = 0xf0f0_f0f0;
/// Offset of `hcclCommName` in `HcclCommConfig` (after the 24-byte info block and two u32).
const CONFIG_NAME_OFFSET: usize = 32;
/// Offset of `int32_t hcclExecTimeOut` in `HcclCommConfig`.
const CONFIG_EXEC_TIMEOUT_OFFSET: usize = 316;
const _: () = assert!(
    CONFIG_EXEC_TIMEOUT_OFFSET == std::mem::offset_of!(dsv4_ascend_sys::hccl::HcclCommConfig, hcclExecTimeOut)
        && CONFIG_NAME_OFFSET == std::mem::offset_of!(dsv4_ascend_sys::hccl::HcclCommConfig, hcclCommName)
);
/// `hcclExecTimeOut` of a config that leaves it unset.
const EXEC_TIMEOUT_NOT_SET: i32 = -1;
/// `subCommId` of a rank that takes no part in a split (with `rankIds == NULL`).
const NO_SUB_COMM: u64 = 0xFFFF_FFFF;

const REDUCE_SUM: i32 = 0;
const REDUCE_PROD: i32 = 1;
const REDUCE_MAX: i32 = 2;
const REDUCE_MIN: i32 = 3;

/// `HcclRootInfo`: an opaque 4108-byte blob.
#[repr(C)]
pub struct HcclRootInfo {
    pub internal: [c_char; HCCL_ROOT_INFO_BYTES],
}

/// `HcclCommConfig`, read by offset (its first 24 bytes are `{size_t size; uint32_t magicWord;
/// uint32_t version; uint64_t reserved}` as written by the header's static inline
/// `HcclCommConfigInit`).
#[repr(C)]
pub struct HcclCommConfig {
    _opaque: [u8; 0],
}

const COMM_HANDLE_BASE: u64 = 0x0c00_0000_0000;
const ROOT_MAGIC: &[u8; 16] = b"dsv4-emu-hccl-r1";
const ROOT_CHECK: u64 = 0x9e37_79b9_7f4a_7c15;

type Fail = (HcclResult, String);

// ------------------------------------------------------------------------------------ state

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum JoinKey {
    Root(u64),
    /// A rank table's world: a hash of the server_id holding rank 0.
    Cluster(u64),
    /// (parent group, subCommId)
    Sub(u64, u64),
}

#[derive(Clone, PartialEq, Debug, Default)]
struct Spec {
    n_ranks: u32,
    /// The name asked for in a config (None: the default).
    name: Option<String>,
    /// Sub-communicators: the parent ranks, in sub-rank order.
    rank_ids: Vec<u32>,
    /// The collective timeout its config asks for (`hcclExecTimeOut`); not compared between
    /// ranks (the first joiner's wins).
    exec_timeout: Option<Duration>,
    /// Rank tables: what the table says of each rank (one line per rank, in rank order).
    table: Vec<String>,
    /// Rank tables: each rank's physical device id.
    table_devices: Vec<i32>,
}

struct Join {
    spec: Spec,
    /// Rank tables: the file the first rank passed.
    origin: String,
    /// Rank → its device.
    joined: HashMap<u32, i32>,
    failed: Option<Fail>,
    group: Option<u64>,
    claimed: u32,
}

#[derive(Clone, PartialEq, Debug)]
enum Call {
    AllReduce {
        count: u64,
        dtype: i32,
        op: i32,
    },
    AllGather {
        count: u64,
        dtype: i32,
    },
    ReduceScatter {
        count: u64,
        dtype: i32,
        op: i32,
    },
    Broadcast {
        count: u64,
        dtype: i32,
        root: u32,
    },
    AlltoAllV {
        dtype: i32,
        send_counts: Vec<u64>,
        recv_counts: Vec<u64>,
    },
    Barrier,
    /// An MC2 operator (`mc2.rs`) as one step of the communicator's sequence: its name, the
    /// attributes every rank must pass alike, and the rank's planned job.
    Mc2 {
        op: &'static str,
        attrs: Vec<(&'static str, i64)>,
        job: Mc2Job,
    },
}

/// A rank's planned MC2 job (`mc2::Job`), opaque here; never compared (the attributes are).
#[derive(Clone)]
pub(crate) struct Mc2Job(pub Arc<dyn Any + Send + Sync>);

impl PartialEq for Mc2Job {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Mc2Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mc2Job")
    }
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::AllReduce { .. } => "HcclAllReduce",
            Call::AllGather { .. } => "HcclAllGather",
            Call::ReduceScatter { .. } => "HcclReduceScatter",
            Call::Broadcast { .. } => "HcclBroadcast",
            Call::AlltoAllV { .. } => "HcclAlltoAllV",
            Call::Barrier => "HcclBarrier",
            Call::Mc2 { op, .. } => op,
        }
    }
}

struct Arrival {
    call: Call,
    /// What the rank contributes (AlltoAllV: one chunk per destination rank).
    inputs: Vec<Vec<u8>>,
    /// Where its output goes: the receive buffer, and for AlltoAllV the byte offset per source.
    recv: u64,
    recv_offsets: Vec<u64>,
}

/// One rank's output: (device address, bytes) writes.
pub(crate) type Writes = Vec<(u64, Vec<u8>)>;

struct Step {
    arrivals: Vec<Option<Arrival>>,
    /// Per rank: the writes (address, bytes) of its output, taken by the rank.
    done: Option<Vec<Writes>>,
    picked: u32,
}

struct Group {
    name: String,
    n: u32,
    devices: Vec<i32>,
    handles: Vec<u64>,
    /// Sub-communicators: the parent group.
    parent: Option<u64>,
    /// The collective timeout from its config (`hcclExecTimeOut`), else
    /// `DSV4_ASCEND_EMU_HCCL_TIMEOUT_S`.
    exec_timeout: Option<Duration>,
    poisoned: Option<Fail>,
    /// Per rank: the number of collectives it issued.
    seq: Vec<u64>,
    steps: HashMap<u64, Step>,
    live: u32,
}

struct Handle {
    group: u64,
    rank: u32,
    destroyed: bool,
    busy: bool,
}

#[derive(Default)]
struct Hccl {
    next_id: u64,
    roots: HashSet<u64>,
    joins: HashMap<JoinKey, Join>,
    groups: HashMap<u64, Group>,
    handles: HashMap<u64, Handle>,
}

static STATE: LazyLock<Mutex<Hccl>> = LazyLock::new(|| Mutex::new(Hccl::default()));
static CHANGED: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, Hccl> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The variable that injects a rank's failure, for tests of what the others do then:
/// `DEVICE:N` makes the N-th collective (1-based) called on `DEVICE` fail on that rank alone,
/// with HCCL_E_RUNTIME, without poisoning the communicator: its peers are not told and wait,
/// until the timeout, as on hardware when a rank's device or process fails. MC2 launches
/// (`mc2.rs`) count as collectives of their communicator.
const FAIL_VAR: &str = "DSV4_ASCEND_EMU_HCCL_FAIL";

/// Why [`FAIL_VAR`] fails this call on `device` (counting the device's collectives), if it
/// does; a value that is not `DEVICE:N` with N ≥ 1 fails every call, naming it (a typo must not
/// turn a fault test into a healthy run).
fn injected_failure(device: i32) -> Option<String> {
    static CALLS: LazyLock<Mutex<HashMap<i32, usize>>> = LazyLock::new(Default::default);
    let v = std::env::var(FAIL_VAR).ok()?;
    let parsed = v
        .split_once(':')
        .and_then(|(d, n)| Some((d.trim().parse::<i32>().ok()?, n.trim().parse::<usize>().ok().filter(|&n| n >= 1)?)));
    let Some((dev, nth)) = parsed else {
        return Some(format!("{FAIL_VAR}={v:?} is not DEVICE:N (a device id and N >= 1)"));
    };
    if dev != device {
        return None;
    }
    let mut calls = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    let count = calls.entry(device).or_insert(0);
    *count += 1;
    (*count == nth).then(|| format!("a failure injected by {FAIL_VAR} on device {device}"))
}

/// The variable with the emulator's rendezvous timeout.
const TIMEOUT_VAR: &str = "DSV4_ASCEND_EMU_HCCL_TIMEOUT_S";

/// `DSV4_ASCEND_EMU_HCCL_TIMEOUT_S` (default 120 s).
fn timeout() -> Duration {
    std::env::var(TIMEOUT_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(120))
}

fn ret(r: Result<(), Fail>) -> HcclResult {
    match r {
        Ok(()) => HCCL_SUCCESS,
        Err((code, msg)) => fail(code, msg),
    }
}

fn para(msg: impl Into<String>) -> Fail {
    (HCCL_E_PARA, msg.into())
}

impl Hccl {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A handle that was created (live or destroyed).
    fn handle(&self, comm: u64, what: &str) -> Result<&Handle, Fail> {
        if comm == 0 {
            return Err((HCCL_E_PTR, format!("{what}: comm is NULL")));
        }
        self.handles.get(&comm).ok_or_else(|| {
            para(format!(
                "{what}: {comm:#x} is not a communicator created by HcclCommInitRootInfo or HcclCreateSubCommConfig"
            ))
        })
    }

    /// A live handle.
    fn live(&self, comm: u64, what: &str) -> Result<&Handle, Fail> {
        let h = self.handle(comm, what)?;
        if h.destroyed {
            return Err(para(format!(
                "{what}: communicator {comm:#x} ({}, rank {}) was destroyed with HcclCommDestroy (use after destroy)",
                self.groups[&h.group].name, h.rank
            )));
        }
        Ok(h)
    }

    fn name_in_use(&self, name: &str) -> bool {
        self.groups.values().any(|g| g.live > 0 && g.name == name)
    }

    fn poison(&mut self, gid: u64, f: &Fail) {
        if let Some(g) = self.groups.get_mut(&gid) {
            if g.poisoned.is_none() {
                g.poisoned = Some(f.clone());
            }
        }
        CHANGED.notify_all();
    }
}

/// Clears the handle's busy mark when a call ends.
struct Busy(u64);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(h) = state().handles.get_mut(&self.0) {
            h.busy = false;
        }
    }
}

/// Marks `comm` busy for the duration of a call (HcclCommDestroy from another thread then
/// returns HCCL_E_AGAIN); fails if another thread is inside a call on it.
fn enter(st: &mut Hccl, comm: u64, what: &str) -> Result<Busy, Fail> {
    let h = st.handles.get_mut(&comm).expect("checked");
    if h.busy {
        return Err(para(format!("{what}: communicator {comm:#x} is in use by another thread (one thread per rank)")));
    }
    h.busy = true;
    Ok(Busy(comm))
}

// ------------------------------------------------------------------------------- data types

/// (name, element size) of a documented `HcclDataType`.
fn dtype_info(dt: i32) -> Option<(&'static str, usize)> {
    Some(match dt {
        0 => ("INT8", 1),
        1 => ("INT16", 2),
        2 => ("INT32", 4),
        3 => ("FP16", 2),
        4 => ("FP32", 4),
        5 => ("INT64", 8),
        6 => ("UINT64", 8),
        7 => ("UINT8", 1),
        8 => ("UINT16", 2),
        9 => ("UINT32", 4),
        10 => ("FP64", 8),
        11 => ("BFP16", 2),
        12 => ("INT128", 16),
        14 => ("HIF8", 1),
        15 => ("FP8E4M3", 1),
        16 => ("FP8E5M2", 1),
        17 => ("FP8E8M0", 1),
        _ => return None,
    })
}

fn dtype_name(dt: i32) -> String {
    dtype_info(dt).map_or_else(|| format!("HcclDataType({dt})"), |(n, _)| n.to_string())
}

fn op_name(op: i32) -> String {
    match op {
        REDUCE_SUM => "SUM".into(),
        REDUCE_PROD => "PROD".into(),
        REDUCE_MAX => "MAX".into(),
        REDUCE_MIN => "MIN".into(),
        o => format!("HcclReduceOp({o})"),
    }
}

fn is_950() -> bool {
    soc_name().starts_with("Ascend950")
}

/// Element size of a type the data-movement collectives accept (A2/A3 lists: every integer
/// and float type up to 64 bits; no INT128 / 8-bit floats).
fn movable(dt: i32, what: &str) -> Result<usize, Fail> {
    match dtype_info(dt) {
        None => Err(para(format!("{what}: {dt} is not an HcclDataType"))),
        Some((_, size)) if (0..=11).contains(&dt) => Ok(size),
        Some((name, _)) => {
            Err((HCCL_E_NOT_SUPPORT, format!("{what}: data type {name} is not supported by this collective")))
        }
    }
}

/// Element size of a type + reduce op the reducing collectives accept on this SoC (A2/A3: int8,
/// int16, int32, int64, fp16, fp32, bfp16, PROD not for int16 / bfp16; the 950 adds uint64 and
/// fp64).
fn reducible(dt: i32, op: i32, what: &str) -> Result<usize, Fail> {
    let (name, size) = dtype_info(dt).ok_or_else(|| para(format!("{what}: {dt} is not an HcclDataType")))?;
    if !(REDUCE_SUM..=REDUCE_MIN).contains(&op) {
        return Err(para(format!("{what}: {op} is not an HcclReduceOp (SUM 0, PROD 1, MAX 2, MIN 3)")));
    }
    let ok = matches!(dt, 0 | 1 | 2 | 3 | 4 | 5 | 11) || (is_950() && matches!(dt, 6 | 10));
    if !ok {
        return Err((HCCL_E_NOT_SUPPORT, format!("{what}: data type {name} cannot be reduced on {}", soc_name())));
    }
    if op == REDUCE_PROD && matches!(dt, 1 | 11) {
        return Err((HCCL_E_NOT_SUPPORT, format!("{what}: PROD does not support {name}")));
    }
    Ok(size)
}

/// Element-wise `op` over the inputs in rank order, rounding to the type after every step.
fn reduce(dt: i32, op: i32, inputs: &[&[u8]]) -> Vec<u8> {
    macro_rules! ints {
        ($t:ty) => {{
            const S: usize = std::mem::size_of::<$t>();
            let get = |c: &[u8]| <$t>::from_le_bytes(c.try_into().expect("element"));
            let mut acc: Vec<$t> = inputs[0].chunks_exact(S).map(get).collect();
            for inp in &inputs[1..] {
                for (a, c) in acc.iter_mut().zip(inp.chunks_exact(S)) {
                    let x = get(c);
                    *a = match op {
                        REDUCE_SUM => a.wrapping_add(x),
                        REDUCE_PROD => a.wrapping_mul(x),
                        REDUCE_MAX => (*a).max(x),
                        _ => (*a).min(x),
                    };
                }
            }
            acc.iter().flat_map(|v| v.to_le_bytes()).collect()
        }};
    }
    macro_rules! floats {
        ($t:ty, $wide:ty, $to:expr, $from:expr) => {{
            const S: usize = std::mem::size_of::<$t>();
            let get = |c: &[u8]| <$t>::from_le_bytes(c.try_into().expect("element"));
            let mut acc: Vec<$t> = inputs[0].chunks_exact(S).map(get).collect();
            for inp in &inputs[1..] {
                for (a, c) in acc.iter_mut().zip(inp.chunks_exact(S)) {
                    let (p, x): ($wide, $wide) = ($to(*a), $to(get(c)));
                    *a = $from(match op {
                        REDUCE_SUM => p + x,
                        REDUCE_PROD => p * x,
                        REDUCE_MAX => p.max(x),
                        _ => p.min(x),
                    });
                }
            }
            acc.iter().flat_map(|v| v.to_le_bytes()).collect()
        }};
    }
    match dt {
        0 => ints!(i8),
        1 => ints!(i16),
        2 => ints!(i32),
        5 => ints!(i64),
        6 => ints!(u64),
        3 => floats!(f16, f32, f16::to_f32, f16::from_f32),
        11 => floats!(bf16, f32, bf16::to_f32, bf16::from_f32),
        4 => floats!(f32, f32, |v: f32| v, |v: f32| v),
        10 => floats!(f64, f64, |v: f64| v, |v: f64| v),
        _ => unreachable!("reducible() admitted {dt}"),
    }
}

// ------------------------------------------------------------------------------- root info

fn encode_root(id: u64) -> [u8; HCCL_ROOT_INFO_BYTES] {
    let mut b = [0u8; HCCL_ROOT_INFO_BYTES];
    b[..16].copy_from_slice(ROOT_MAGIC);
    b[16..24].copy_from_slice(&id.to_le_bytes());
    b[24..32].copy_from_slice(&(id ^ ROOT_CHECK).to_le_bytes());
    b
}

fn decode_root(b: &[u8]) -> Option<u64> {
    if &b[..16] != ROOT_MAGIC {
        return None;
    }
    let id = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let check = u64::from_le_bytes(b[24..32].try_into().ok()?);
    (check == id ^ ROOT_CHECK).then_some(id)
}

/// What a config asks for.
#[derive(Default)]
struct Config {
    /// `hcclCommName`, if set.
    name: Option<String>,
    /// `hcclExecTimeOut`, if set (0: never time out).
    exec_timeout: Option<Duration>,
}

/// Reads and validates an `HcclCommConfig` the caller initialised with `HcclCommConfigInit`.
unsafe fn read_config(config: *const HcclCommConfig, what: &str) -> Result<Config, Fail> {
    if config.is_null() {
        return Err((HCCL_E_PTR, format!("{what}: config is NULL (initialise one with HcclCommConfigInit)")));
    }
    let p = config as *const u8;
    // SAFETY: the caller passes an HcclCommConfig, whose first 24 bytes are the info block.
    let (size, magic, version) = unsafe {
        (
            (p as *const usize).read_unaligned(),
            (p.add(8) as *const u32).read_unaligned(),
            (p.add(12) as *const u32).read_unaligned(),
        )
    };
    if magic != HCCL_COMM_CONFIG_MAGIC_WORD {
        return Err(para(format!(
            "{what}: config magic word is {magic:#x}, not {HCCL_COMM_CONFIG_MAGIC_WORD:#x}: the config must be \
             initialised with HcclCommConfigInit before use"
        )));
    }
    if version == 0 || !(CONFIG_NAME_OFFSET..=1 << 20).contains(&size) {
        return Err(para(format!(
            "{what}: config info block is invalid (size {size}, version {version}); initialise it with HcclCommConfigInit"
        )));
    }
    if size < CONFIG_NAME_OFFSET + COMM_NAME_MAX_LENGTH {
        return Ok(Config::default());
    }
    // SAFETY: `size` (as HcclCommConfigInit wrote it) covers hcclCommName.
    let raw = unsafe { std::slice::from_raw_parts(p.add(CONFIG_NAME_OFFSET), COMM_NAME_MAX_LENGTH) };
    let Some(end) = raw.iter().position(|&b| b == 0) else {
        return Err(para(format!(
            "{what}: config hcclCommName is not NUL-terminated within {COMM_NAME_MAX_LENGTH} bytes"
        )));
    };
    let name = (end > 0).then(|| String::from_utf8_lossy(&raw[..end]).into_owned());
    if size < CONFIG_EXEC_TIMEOUT_OFFSET + 4 {
        return Ok(Config { name, exec_timeout: None });
    }
    // SAFETY: `size` covers hcclExecTimeOut.
    let secs = unsafe { (p.add(CONFIG_EXEC_TIMEOUT_OFFSET) as *const i32).read_unaligned() };
    let exec_timeout = match secs {
        EXEC_TIMEOUT_NOT_SET => None,
        // As on Atlas A2/A3: 0 is "never" (here: a century).
        0 => Some(Duration::from_secs(100 * 365 * 86_400)),
        s if s > 0 => Some(Duration::from_secs(s as u64)),
        s => {
            return Err(para(format!(
                "{what}: config hcclExecTimeOut is {s}; it must be a number of seconds >= 0, or -1 (not set)"
            )))
        }
    };
    Ok(Config { name, exec_timeout })
}

/// The caller's device, checked like the runtime would.
fn calling_device(what: &str) -> Result<i32, Fail> {
    let e = emu();
    e.require_init(what).map_err(|(_, m)| para(m))?;
    current_device().ok_or_else(|| {
        para(format!("{what}: no device is set on this thread; call aclrtSetDevice first (it is per thread)"))
    })
}

// ------------------------------------------------------------------------------ rendezvous

/// Joins the rendezvous `key` as `rank` on `device`; blocks until every rank joined (returns
/// the new handle of this rank) or the rendezvous failed.
fn join(key: JoinKey, spec: Spec, rank: u32, device: i32, what: &str) -> Result<u64, Fail> {
    join_from(key, spec, rank, device, (device, String::new()), what)
}

/// [`join`] with the caller's physical device id and, for a rank table, the file it read.
fn join_from(
    key: JoinKey,
    spec: Spec,
    rank: u32,
    device: i32,
    (physical, origin): (i32, String),
    what: &str,
) -> Result<u64, Fail> {
    let limit = timeout();
    let deadline = Instant::now() + limit;
    let mut st = state();
    {
        let st = &mut *st;
        let j = st.joins.entry(key).or_insert_with(|| Join {
            spec: spec.clone(),
            origin: origin.clone(),
            joined: HashMap::new(),
            failed: None,
            group: None,
            claimed: 0,
        });
        if let Some((code, m)) = &j.failed {
            return Err((*code, format!("{what}: this rendezvous already failed: {m}")));
        }
        if let Some(gid) = j.group {
            return Err(para(format!(
                "{what}: this root info / subCommId already formed a communicator ({}); get a new one",
                st.groups[&gid].name
            )));
        }
        let n = j.spec.n_ranks;
        let mismatch = if j.spec.table != spec.table {
            let at = j.spec.table.iter().zip(&spec.table).position(|(a, b)| a != b).unwrap_or(0);
            Some(format!(
                "rank {rank}'s rank table ({origin}) disagrees with the one the ranks that joined before read ({}): \
                 {} there, {} here",
                j.origin,
                j.spec.table.get(at).map_or("nothing", String::as_str),
                spec.table.get(at).map_or("nothing", String::as_str)
            ))
        } else if j.spec.n_ranks != spec.n_ranks {
            Some(format!("rank {rank} passes {} ranks but the ranks that joined before pass {n}", spec.n_ranks))
        } else if j.spec.rank_ids != spec.rank_ids {
            Some(format!(
                "rank {rank} passes rankIds {:?} but the ranks that joined before pass {:?}",
                spec.rank_ids, j.spec.rank_ids
            ))
        } else if j.spec.name != spec.name {
            Some(format!(
                "rank {rank} asks for the name {:?} but the ranks that joined before ask for {:?}",
                spec.name, j.spec.name
            ))
        } else if rank >= n && !spec.table.is_empty() {
            Some(format!("rank {rank} is not in the rank table {origin} (its rank_ids are 0..{n})"))
        } else if rank >= n {
            Some(format!("rank id {rank} is out of range for {n} ranks"))
        } else if spec.table_devices.get(rank as usize).is_some_and(|&d| d != physical) {
            Some(format!(
                "rank {rank} runs on device {physical} (physical id; logical {device}), but the rank table {origin} \
                 puts it on device_id {} ({}); set that device on the thread first",
                spec.table_devices[rank as usize], spec.table[rank as usize]
            ))
        } else if j.joined.contains_key(&rank) {
            Some(format!("rank id {rank} joined twice"))
        } else if let Some((r, _)) = j.joined.iter().find(|(_, d)| **d == device) {
            Some(format!("ranks {r} and {rank} are both on device {device} (one device per rank)"))
        } else {
            None
        };
        if let Some(m) = mismatch {
            j.failed = Some(para(m.clone()));
            CHANGED.notify_all();
            return Err(para(format!("{what}: {m}")));
        }
        j.joined.insert(rank, device);
        if j.joined.len() as u32 == n {
            let (spec, devices) = (j.spec.clone(), (0..n).map(|r| j.joined[&r]).collect::<Vec<_>>());
            let gid = st.id();
            let name = match (&spec.name, key) {
                (Some(name), _) => name.clone(),
                (None, JoinKey::Sub(pg, sub_id)) => format!("{}_sub_{sub_id}", st.groups[&pg].name),
                (None, JoinKey::Root(id)) => format!("dsv4emu_hccl_comm_{id}"),
                (None, JoinKey::Cluster(_)) => format!("dsv4emu_hccl_cluster_{gid}"),
            };
            let taken = st.name_in_use(&name);
            let j = st.joins.get_mut(&key).expect("present");
            if taken {
                let m = format!("the communicator name {name:?} is already used by a live communicator");
                j.failed = Some(para(m.clone()));
                CHANGED.notify_all();
                return Err(para(format!("{what}: {m}")));
            }
            j.group = Some(gid);
            let handles: Vec<u64> = (0..n).map(|r| COMM_HANDLE_BASE + (gid << 16) + 16 * r as u64).collect();
            for (r, h) in handles.iter().enumerate() {
                st.handles.insert(*h, Handle { group: gid, rank: r as u32, destroyed: false, busy: false });
            }
            let parent_group = match key {
                JoinKey::Sub(pg, _) => Some(pg),
                JoinKey::Root(_) | JoinKey::Cluster(_) => None,
            };
            st.groups.insert(
                gid,
                Group {
                    name,
                    n,
                    devices,
                    handles,
                    parent: parent_group,
                    exec_timeout: spec.exec_timeout,
                    poisoned: None,
                    seq: vec![0; n as usize],
                    steps: HashMap::new(),
                    live: n,
                },
            );
            CHANGED.notify_all();
        }
    }
    loop {
        let st2 = &mut *st;
        let j = st2.joins.get_mut(&key).expect("present");
        if let Some(gid) = j.group {
            j.claimed += 1;
            if j.claimed == j.spec.n_ranks {
                if let JoinKey::Sub(..) | JoinKey::Cluster(_) = key {
                    // A later split may reuse the subCommId once this one is destroyed (a later
                    // world, the rank table's servers).
                    st2.joins.remove(&key);
                }
            }
            return Ok(st2.groups[&gid].handles[rank as usize]);
        }
        if let Some((code, m)) = &j.failed {
            return Err((*code, format!("{what}: {m}")));
        }
        let now = Instant::now();
        if now >= deadline {
            let mut have: Vec<u32> = j.joined.keys().copied().collect();
            have.sort();
            let missing: Vec<u32> = (0..j.spec.n_ranks).filter(|r| !have.contains(r)).collect();
            let m = format!(
                "timed out after {:.1} s (DSV4_ASCEND_EMU_HCCL_TIMEOUT_S): ranks {missing:?} never joined \
                 (ranks {have:?} of {} did)",
                limit.as_secs_f64(),
                j.spec.n_ranks
            );
            j.failed = Some((HCCL_E_TIMEOUT, m.clone()));
            CHANGED.notify_all();
            return Err((HCCL_E_TIMEOUT, format!("{what}: {m}")));
        }
        st = CHANGED.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

// --------------------------------------------------------------------------- communicators

#[no_mangle]
pub unsafe extern "C" fn HcclGetRootInfo(rootInfo: *mut HcclRootInfo) -> HcclResult {
    let r = (|| {
        if rootInfo.is_null() {
            return Err((HCCL_E_PTR, "HcclGetRootInfo: rootInfo is NULL".to_string()));
        }
        calling_device("HcclGetRootInfo")?;
        let mut st = state();
        let id = st.id();
        st.roots.insert(id);
        let blob = encode_root(id);
        // SAFETY: non-null pointer to the caller's 4108-byte HcclRootInfo.
        unsafe { std::ptr::copy_nonoverlapping(blob.as_ptr(), rootInfo as *mut u8, HCCL_ROOT_INFO_BYTES) };
        Ok(())
    })();
    ret(r)
}

unsafe fn init_root_info(
    nRanks: u32,
    rootInfo: *const HcclRootInfo,
    rank: u32,
    config: Config,
    comm: *mut HcclComm,
    what: &str,
) -> Result<(), Fail> {
    if rootInfo.is_null() || comm.is_null() {
        return Err((HCCL_E_PTR, format!("{what}: rootInfo ({rootInfo:p}) or comm ({comm:p}) is NULL")));
    }
    trace_init(what, rank);
    let device = calling_device(what)?;
    // SAFETY: a non-null pointer to the caller's HcclRootInfo (4108 bytes).
    let blob = unsafe { std::slice::from_raw_parts(rootInfo as *const u8, HCCL_ROOT_INFO_BYTES) };
    let id = decode_root(blob).filter(|id| state().roots.contains(id)).ok_or_else(|| {
        para(format!(
            "{what}: the root info was not produced by HcclGetRootInfo (missing root info: get it on the root \
             rank and pass the same blob to every rank)"
        ))
    })?;
    if nRanks == 0 {
        return Err(para(format!("{what}: nRanks is 0")));
    }
    let visible = emu().visible.len() as u32;
    if nRanks > visible {
        return Err(para(format!("{what}: nRanks {nRanks} exceeds the {visible} visible device(s) (one per rank)")));
    }
    let spec = Spec {
        n_ranks: nRanks,
        name: config.name,
        rank_ids: vec![],
        exec_timeout: config.exec_timeout,
        ..Spec::default()
    };
    let h = join(JoinKey::Root(id), spec, rank, device, what)?;
    // SAFETY: checked non-null above.
    unsafe { comm.write(h as HcclComm) };
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitRootInfo(
    nRanks: u32,
    rootInfo: *const HcclRootInfo,
    rank: u32,
    comm: *mut HcclComm,
) -> HcclResult {
    // SAFETY: pointers checked inside.
    ret(unsafe { init_root_info(nRanks, rootInfo, rank, Config::default(), comm, "HcclCommInitRootInfo") })
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitRootInfoConfig(
    nRanks: u32,
    rootInfo: *const HcclRootInfo,
    rank: u32,
    config: *const HcclCommConfig,
    comm: *mut HcclComm,
) -> HcclResult {
    let what = "HcclCommInitRootInfoConfig";
    // SAFETY: the config is checked for NULL and read within the size it declares.
    let r = unsafe { read_config(config, what) }
        // SAFETY: pointers checked inside.
        .and_then(|config| unsafe { init_root_info(nRanks, rootInfo, rank, config, comm, what) });
    ret(r)
}

// ------------------------------------------------------------------------------ rank tables

/// What a rank table says, as the emulator reads it.
struct ClusterTable {
    /// Per rank, in rank order: (server_id, device_id, the line compared between ranks).
    ranks: Vec<(String, i32, String)>,
}

/// A field of the table that must be a non-negative integer, written as a JSON string: HCCL's
/// parser refuses a JSON number ("is not string", HCCL_E_PARA).
fn table_number(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads and checks the rank table at `path` as HCCL would before joining.
fn read_cluster_table(path: &str, what: &str) -> Result<ClusterTable, Fail> {
    use serde_json::Value;
    let text = std::fs::read_to_string(path)
        .map_err(|e| (HCCL_E_OPEN_FILE_FAILURE, format!("{what}: cannot read the rank table {path}: {e}")))?;
    let bad = |field: &str, msg: String| para(format!("{what}: rank table {path}: {field}: {msg}"));
    let root: Value =
        serde_json::from_str(&text).map_err(|e| para(format!("{what}: rank table {path} is not JSON: {e}")))?;
    match root.get("status").and_then(Value::as_str) {
        Some("completed") => {}
        other => return Err(bad("status", format!("{other:?}, not \"completed\""))),
    }
    match root.get("version").and_then(Value::as_str) {
        Some("1.0" | "1.2") => {}
        other => return Err(bad("version", format!("{other:?}; this emulator reads 1.0 and 1.2"))),
    }
    let Some(servers) = root.get("server_list").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        return Err(bad("server_list", "missing, empty or not a list".into()));
    };
    if table_number(root.get("server_count")) != Some(servers.len() as u64) {
        return Err(bad("server_count", format!("{:?} for {} servers", root.get("server_count"), servers.len())));
    }
    let mut by_rank: HashMap<u64, (String, i32, String)> = HashMap::new();
    let mut server_ids = HashSet::new();
    for (i, server) in servers.iter().enumerate() {
        let Some(id) = server.get("server_id").and_then(Value::as_str).filter(|s| !s.is_empty()) else {
            return Err(bad(&format!("server_list[{i}].server_id"), "missing or not a string".into()));
        };
        if !server_ids.insert(id.to_string()) {
            return Err(bad(&format!("server_list[{i}].server_id"), format!("{id:?} appears twice")));
        }
        let Some(devices) = server.get("device").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
            return Err(bad(&format!("server_list[{i}].device"), "missing, empty or not a list".into()));
        };
        let mut seen = HashSet::new();
        for (k, d) in devices.iter().enumerate() {
            let at = format!("server_list[{i}].device[{k}]");
            let dev = table_number(d.get("device_id")).and_then(|v| i32::try_from(v).ok());
            let Some(dev) = dev else { return Err(bad(&format!("{at}.device_id"), "missing or not a number".into())) };
            let Some(rank) = table_number(d.get("rank_id")) else {
                return Err(bad(&format!("{at}.rank_id"), "missing or not a number".into()));
            };
            if root.get("version").and_then(Value::as_str) == Some("1.2")
                && table_number(d.get("super_device_id")).is_none()
            {
                return Err(bad(&format!("{at}.super_device_id"), "missing or not a number (version 1.2)".into()));
            }
            if !seen.insert(dev) {
                return Err(bad(&format!("{at}.device_id"), format!("device {dev} appears twice on server {id:?}")));
            }
            let ip = d.get("device_ip").and_then(Value::as_str).unwrap_or("");
            let line = format!("rank {rank}: server {id:?} device_id {dev} device_ip {ip:?}");
            if by_rank.insert(rank, (id.to_string(), dev, line)).is_some() {
                return Err(bad(&format!("{at}.rank_id"), format!("rank {rank} appears twice")));
            }
        }
    }
    let n = by_rank.len() as u64;
    let mut ranks = Vec::with_capacity(n as usize);
    for r in 0..n {
        let Some(entry) = by_rank.remove(&r) else {
            return Err(bad("rank_id", format!("the {n} rank ids are not 0..{n}: rank {r} is missing")));
        };
        ranks.push(entry);
    }
    Ok(ClusterTable { ranks })
}

/// With `DSV4_ASCEND_EMU_TRACE_INIT` set, each communicator initialisation says on stderr which
/// function made it and for which rank: how a test tells a rank-table join from a root-info
/// one (both give the same world, so results alone cannot).
fn trace_init(what: &str, rank: u32) {
    if std::env::var_os("DSV4_ASCEND_EMU_TRACE_INIT").is_some() {
        eprintln!("ascend-emu: {what} rank {rank}");
    }
}

/// A 64-bit FNV-1a hash, naming a rank table's world.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

unsafe fn init_cluster_info(
    clusterInfo: *const c_char,
    rank: u32,
    config: Config,
    comm: *mut HcclComm,
    what: &str,
) -> Result<(), Fail> {
    if clusterInfo.is_null() || comm.is_null() {
        return Err((HCCL_E_PTR, format!("{what}: clusterInfo ({clusterInfo:p}) or comm ({comm:p}) is NULL")));
    }
    // SAFETY: non-null; the caller passes a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(clusterInfo) };
    if path.to_bytes_with_nul().len() > 4096 {
        return Err(para(format!("{what}: the rank table path is longer than 4096 bytes (with the NUL)")));
    }
    let path = path.to_string_lossy().into_owned();
    trace_init(what, rank);
    if !path.ends_with(".json") {
        return Err(para(format!("{what}: the rank table path {path} does not end in .json (HCCL takes only those)")));
    }
    let device = calling_device(what)?;
    let table = read_cluster_table(&path, what)?;
    let logical = emu().visible.get(device as usize).copied().unwrap_or(device);
    let physical = crate::physical_of(logical).unwrap_or(logical);
    let n = table.ranks.len() as u32;
    let visible = emu().visible.len() as u32;
    if n > visible {
        return Err(para(format!(
            "{what}: the rank table {path} lists {n} ranks but this process sees {visible} device(s) (the emulator \
             runs every rank in one process, one device each)"
        )));
    }
    let key = JoinKey::Cluster(fnv(&table.ranks[0].0));
    let spec = Spec {
        n_ranks: n,
        name: config.name,
        exec_timeout: config.exec_timeout,
        table: table.ranks.iter().map(|r| r.2.clone()).collect(),
        table_devices: table.ranks.iter().map(|r| r.1).collect(),
        ..Spec::default()
    };
    let h = join_from(key, spec, rank, device, (physical, path), what)?;
    // SAFETY: checked non-null above.
    unsafe { comm.write(h as HcclComm) };
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitClusterInfo(
    clusterInfo: *const c_char,
    rank: u32,
    comm: *mut HcclComm,
) -> HcclResult {
    // SAFETY: pointers checked inside.
    ret(unsafe { init_cluster_info(clusterInfo, rank, Config::default(), comm, "HcclCommInitClusterInfo") })
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitClusterInfoConfig(
    clusterInfo: *const c_char,
    rank: u32,
    config: *mut HcclCommConfig,
    comm: *mut HcclComm,
) -> HcclResult {
    let what = "HcclCommInitClusterInfoConfig";
    // SAFETY: the config is checked for NULL and read within the size it declares.
    let r = unsafe { read_config(config, what) }
        // SAFETY: pointers checked inside.
        .and_then(|config| unsafe { init_cluster_info(clusterInfo, rank, config, comm, what) });
    ret(r)
}

#[no_mangle]
pub unsafe extern "C" fn HcclCreateSubCommConfig(
    comm: *mut HcclComm,
    rankNum: u32,
    rankIds: *mut u32,
    subCommId: u64,
    subCommRankId: u32,
    config: *mut HcclCommConfig,
    subComm: *mut HcclComm,
) -> HcclResult {
    let what = "HcclCreateSubCommConfig";
    let r = (|| {
        if comm.is_null() || subComm.is_null() {
            return Err((HCCL_E_PTR, format!("{what}: comm ({comm:p}) or subComm ({subComm:p}) is NULL")));
        }
        // SAFETY: non-null pointer to the caller's HcclComm (the global communicator).
        let parent = unsafe { comm.read() } as u64;
        let (gid, prank, pdev, pname, _busy) = {
            let mut st = state();
            let h = st.live(parent, what)?;
            let (gid, prank) = (h.group, h.rank);
            let g = &st.groups[&gid];
            if g.parent.is_some() {
                return Err((
                    HCCL_E_NOT_SUPPORT,
                    format!("{what}: {} is a sub-communicator; only a global communicator can be split", g.name),
                ));
            }
            if let Some((code, m)) = &g.poisoned {
                return Err((
                    *code,
                    format!("{what}: communicator {} is unusable after an earlier failure: {m}", g.name),
                ));
            }
            let (pdev, pname) = (g.devices[prank as usize], g.name.clone());
            let busy = enter(&mut st, parent, what)?;
            (gid, prank, pdev, pname, busy)
        };
        let device = calling_device(what)?;
        if device != pdev {
            return Err(para(format!(
                "{what}: this thread's device is {device}, but rank {prank} of {pname} is on device {pdev}"
            )));
        }
        if rankIds.is_null() {
            if subCommId == NO_SUB_COMM {
                // SAFETY: checked non-null above.
                unsafe { subComm.write(std::ptr::null_mut()) };
                return Ok(());
            }
            return Err((
                HCCL_E_PTR,
                format!("{what}: rankIds is NULL (a rank outside the split passes subCommId 0xFFFFFFFF with it)"),
            ));
        }
        // SAFETY: config checked for NULL and read within the size it declares.
        let config = unsafe { read_config(config, what) }?;
        let n_parent = state().groups[&gid].n;
        if rankNum == 0 || rankNum > n_parent {
            return Err(para(format!("{what}: rankNum {rankNum} is not in 1..={n_parent} (the ranks of {pname})")));
        }
        // SAFETY: a non-null host array of rankNum u32, as documented.
        let ids: Vec<u32> =
            (0..rankNum as usize).map(|i| unsafe { (rankIds as *const u32).add(i).read_unaligned() }).collect();
        if let Some(bad) = ids.iter().find(|&&r| r >= n_parent) {
            return Err(para(format!("{what}: rankIds {ids:?} names rank {bad}, but {pname} has {n_parent} ranks")));
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(para(format!("{what}: rankIds {ids:?} must be in ascending order without repeats")));
        }
        let Some(mine) = ids.iter().position(|&r| r == prank) else {
            return Err(para(format!("{what}: rankIds {ids:?} does not contain the caller's rank {prank} in {pname}")));
        };
        if mine as u32 != subCommRankId {
            return Err(para(format!(
                "{what}: subCommRankId is {subCommRankId}, but the caller (rank {prank} of {pname}) is at index {mine} of rankIds {ids:?}"
            )));
        }
        let spec = Spec {
            n_ranks: rankNum,
            name: config.name,
            rank_ids: ids,
            exec_timeout: config.exec_timeout,
            ..Spec::default()
        };
        let h = join(JoinKey::Sub(gid, subCommId), spec, subCommRankId, device, what)?;
        // SAFETY: checked non-null above.
        unsafe { subComm.write(h as HcclComm) };
        Ok(())
    })();
    ret(r)
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommDestroy(comm: HcclComm) -> HcclResult {
    let what = "HcclCommDestroy";
    let mut st = state();
    let r = st.live(comm as u64, what).map(|h| (h.group, h.busy)).and_then(|(gid, busy)| {
        if busy {
            return Err((
                HCCL_E_AGAIN,
                format!("{what}: comm is in use by a call on another thread, please try again later"),
            ));
        }
        st.handles.get_mut(&(comm as u64)).expect("checked").destroyed = true;
        let g = st.groups.get_mut(&gid).expect("group");
        g.live -= 1;
        Ok(())
    });
    drop(st);
    ret(r)
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetRankSize(comm: HcclComm, rankSize: *mut u32) -> HcclResult {
    let st = state();
    let r = st.live(comm as u64, "HcclGetRankSize").and_then(|h| {
        if rankSize.is_null() {
            return Err((HCCL_E_PTR, "HcclGetRankSize: rankSize is NULL".into()));
        }
        // SAFETY: checked non-null.
        unsafe { rankSize.write(st.groups[&h.group].n) };
        Ok(())
    });
    drop(st);
    ret(r)
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetRankId(comm: HcclComm, rank: *mut u32) -> HcclResult {
    let st = state();
    let r = st.live(comm as u64, "HcclGetRankId").and_then(|h| {
        if rank.is_null() {
            return Err((HCCL_E_PTR, "HcclGetRankId: rank is NULL".into()));
        }
        // SAFETY: checked non-null.
        unsafe { rank.write(h.rank) };
        Ok(())
    });
    drop(st);
    ret(r)
}

/// Writes the name (at most 127 bytes and a NUL) into the caller's 128-byte buffer.
#[no_mangle]
pub unsafe extern "C" fn HcclGetCommName(comm: HcclComm, commName: *mut c_char) -> HcclResult {
    let st = state();
    let r = st.live(comm as u64, "HcclGetCommName").and_then(|h| {
        if commName.is_null() {
            return Err((HCCL_E_PTR, "HcclGetCommName: commName is NULL".into()));
        }
        let name = st.groups[&h.group].name.as_bytes();
        let n = name.len().min(COMM_NAME_MAX_LENGTH - 1);
        // SAFETY: the documented buffer of COMM_NAME_MAX_LENGTH (128) bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr(), commName as *mut u8, n);
            commName.add(n).write(0);
        }
        Ok(())
    });
    drop(st);
    ret(r)
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetErrorString(code: HcclResult) -> *const c_char {
    let s: &'static CStr = match code {
        0 => c"no error",
        1 => c"parameter error",
        2 => c"empty pointer",
        3 => c"memory error",
        4 => c"internal error",
        5 => c"not support feature",
        6 => c"not found specific resource",
        7 => c"resource unavailable",
        8 => c"call system interface error",
        9 => c"timeout",
        10 => c"open file fail",
        11 => c"tcp connect fail",
        12 => c"roce connect fail",
        13 => c"tcp transfer fail",
        14 => c"roce transfer fail",
        15 => c"call runtime api fail",
        16 => c"call driver api fail",
        17 => c"call profiling api fail",
        18 => c"call cce api fail",
        19 => c"call network api fail",
        20 => c"try again",
        21 => c"error cqe",
        22 => c"error communicator suspending",
        23 => c"retry constraint",
        24 => c"out of memory",
        1041 => c"the error information is in the status",
        _ => c"unknown error",
    };
    s.as_ptr()
}

// ------------------------------------------------------------------------------ collectives

/// What a rank's call reads and where its output goes, as validated against its memory.
struct Plan {
    call: Call,
    /// (address, bytes) read at the call, in order (AlltoAllV: one per destination rank).
    reads: Vec<(u64, usize)>,
    recv: u64,
    recv_offsets: Vec<u64>,
}

struct Ctx {
    rank: u32,
    n: u32,
    device: i32,
}

/// Checks that `elems` elements of `esize` bytes at `ptr` are device memory of `device`
/// (nothing for 0 elements); returns the byte length.
fn dev_buf(e: &Emu, ptr: u64, elems: u64, esize: usize, ctx: &Ctx, what: &str, role: &str) -> Result<usize, Fail> {
    if elems == 0 {
        return Ok(0);
    }
    if ptr == 0 {
        return Err((HCCL_E_PTR, format!("{what}: {role} is NULL")));
    }
    let len = elems
        .checked_mul(esize as u64)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| para(format!("{what}: {elems} elements overflow")))?;
    let base = e.mem.check_range(ptr, len, &format!("{what} {role}")).map_err(para)?;
    let dev = e.mem.allocs[&base].device;
    if dev != ctx.device {
        return Err(para(format!(
            "{what}: {role} {ptr:#x} is memory of device {dev}, but rank {} of the communicator is on device {}",
            ctx.rank, ctx.device
        )));
    }
    if !ptr.is_multiple_of(esize as u64) {
        return Err(para(format!("{what}: {role} {ptr:#x} is not aligned to the {esize}-byte data type")));
    }
    Ok(len)
}

/// Why two ranks' calls at the same step disagree.
fn mismatch(a: &Call, ra: u32, b: &Call, rb: u32) -> Option<String> {
    if std::mem::discriminant(a) != std::mem::discriminant(b) || a.name() != b.name() {
        return Some(format!(
            "ranks called different collectives at the same step: rank {ra} {}, rank {rb} {}",
            a.name(),
            b.name()
        ));
    }
    let field = |what: &str, x: String, y: String| {
        (x != y).then(|| format!("{} {what} differs between ranks: rank {ra} passes {x}, rank {rb} {y}", a.name()))
    };
    match (a, b) {
        (Call::AllReduce { count, dtype, op }, Call::AllReduce { count: c2, dtype: d2, op: o2 })
        | (Call::ReduceScatter { count, dtype, op }, Call::ReduceScatter { count: c2, dtype: d2, op: o2 }) => {
            field("count", count.to_string(), c2.to_string())
                .or_else(|| field("data type", dtype_name(*dtype), dtype_name(*d2)))
                .or_else(|| field("reduce op", op_name(*op), op_name(*o2)))
        }
        (Call::AllGather { count, dtype }, Call::AllGather { count: c2, dtype: d2 }) => {
            field("count", count.to_string(), c2.to_string())
                .or_else(|| field("data type", dtype_name(*dtype), dtype_name(*d2)))
        }
        (Call::Broadcast { count, dtype, root }, Call::Broadcast { count: c2, dtype: d2, root: r2 }) => {
            field("count", count.to_string(), c2.to_string())
                .or_else(|| field("data type", dtype_name(*dtype), dtype_name(*d2)))
                .or_else(|| field("root", root.to_string(), r2.to_string()))
        }
        (Call::AlltoAllV { dtype, .. }, Call::AlltoAllV { dtype: d2, .. }) => {
            field("data type", dtype_name(*dtype), dtype_name(*d2))
        }
        (Call::Mc2 { attrs, .. }, Call::Mc2 { attrs: a2, .. }) => {
            attrs.iter().zip(a2).find_map(|((name, x), (_, y))| field(name, x.to_string(), y.to_string()))
        }
        _ => None,
    }
}

/// Every rank's output writes, once all arrived.
fn compute(arr: &[Arrival]) -> Result<Vec<Writes>, String> {
    let n = arr.len();
    let inputs = |k: usize| arr.iter().map(|a| a.inputs[k].as_slice()).collect::<Vec<_>>();
    Ok(match &arr[0].call {
        Call::AllReduce { dtype, op, .. } => {
            let out = reduce(*dtype, *op, &inputs(0));
            arr.iter().map(|a| vec![(a.recv, out.clone())]).collect()
        }
        Call::ReduceScatter { dtype, op, .. } => {
            let out = reduce(*dtype, *op, &inputs(0));
            let part = out.len() / n;
            arr.iter().enumerate().map(|(r, a)| vec![(a.recv, out[r * part..(r + 1) * part].to_vec())]).collect()
        }
        Call::AllGather { .. } => {
            let out: Vec<u8> = inputs(0).concat();
            arr.iter().map(|a| vec![(a.recv, out.clone())]).collect()
        }
        Call::Broadcast { root, .. } => {
            let data = &arr[*root as usize].inputs[0];
            arr.iter()
                .enumerate()
                .map(|(r, a)| if r == *root as usize { vec![] } else { vec![(a.recv, data.clone())] })
                .collect()
        }
        Call::AlltoAllV { .. } => {
            for (i, a) in arr.iter().enumerate() {
                for (j, b) in arr.iter().enumerate() {
                    let (Call::AlltoAllV { send_counts, .. }, Call::AlltoAllV { recv_counts, .. }) = (&a.call, &b.call)
                    else {
                        unreachable!("same collective checked")
                    };
                    if send_counts[j] != recv_counts[i] {
                        return Err(format!(
                            "HcclAlltoAllV counts do not pair up: rank {i} sends {} element(s) to rank {j} \
                             (sendCounts[{j}]), but rank {j} expects {} from rank {i} (recvCounts[{i}])",
                            send_counts[j], recv_counts[i]
                        ));
                    }
                }
            }
            (0..n)
                .map(|j| {
                    (0..n)
                        .filter(|&i| !arr[i].inputs[j].is_empty())
                        .map(|i| (arr[j].recv + arr[j].recv_offsets[i], arr[i].inputs[j].clone()))
                        .collect()
                })
                .collect()
        }
        Call::Barrier => vec![vec![]; n],
        Call::Mc2 { op, .. } => {
            let ranks: Vec<(&Mc2Job, &[Vec<u8>])> = arr
                .iter()
                .map(|a| match &a.call {
                    Call::Mc2 { job, .. } => (job, a.inputs.as_slice()),
                    _ => unreachable!("same collective checked"),
                })
                .collect();
            crate::mc2::compute(op, &ranks)?
        }
    })
}

/// Runs one collective for the calling rank: checks, rendezvous, queued output writes.
fn collective(
    what: &'static str,
    comm: HcclComm,
    stream: aclrtStream,
    plan: impl FnOnce(&Emu, &Ctx) -> Result<Plan, Fail>,
) -> HcclResult {
    ret(collective_core(what, comm as u64, stream, false, plan))
}

/// [`collective`] without recording the failure; `default_stream`: a NULL stream means the
/// thread's default stream (aclnn launches), else it is refused (HCCL).
fn collective_core(
    what: &'static str,
    comm: u64,
    stream: aclrtStream,
    default_stream: bool,
    plan: impl FnOnce(&Emu, &Ctx) -> Result<Plan, Fail>,
) -> Result<(), Fail> {
    // Phase A: the communicator.
    let (gid, ctx, gname, (limit, limit_from), _busy) = {
        let mut st = state();
        let (gid, rank, destroyed) = match st.handle(comm, what) {
            Ok(h) => (h.group, h.rank, h.destroyed),
            Err(f) => return Err(f),
        };
        if destroyed {
            let f = st.live(comm, what).err().expect("destroyed");
            st.poison(gid, &(f.0, format!("rank {rank}: {}", f.1)));
            return Err(f);
        }
        let g = &st.groups[&gid];
        if let Some((code, m)) = &g.poisoned {
            return Err((*code, format!("{what}: communicator {} is unusable after an earlier failure: {m}", g.name)));
        }
        let ctx = Ctx { rank, n: g.n, device: g.devices[rank as usize] };
        let gname = g.name.clone();
        let limit = g.exec_timeout.map(|t| (t, "hcclExecTimeOut")).unwrap_or((timeout(), TIMEOUT_VAR));
        match enter(&mut st, comm, what) {
            Ok(b) => (gid, ctx, gname, limit, b),
            Err(f) => {
                st.poison(gid, &(f.0, format!("rank {rank}: {}", f.1)));
                return Err(f);
            }
        }
    };
    if let Some(why) = injected_failure(ctx.device) {
        return Err((HCCL_E_RUNTIME, format!("{what}: {why} (rank {} of {gname})", ctx.rank)));
    }
    let local_failure = |f: Fail| -> Result<(), Fail> {
        state().poison(gid, &(f.0, format!("rank {}: {}", ctx.rank, f.1)));
        Err((f.0, format!("{} (rank {} of communicator {gname})", f.1, ctx.rank)))
    };
    // Phase B: device, stream and buffers; run the stream up to here; read the inputs.
    let (sid, plan, inputs) = {
        let mut e = emu();
        let r = (|| {
            e.require_init(what).map_err(|(_, m)| para(m))?;
            let dev = current_device().ok_or_else(|| {
                para(format!(
                    "{what}: no device is set on this thread; call aclrtSetDevice({}) (rank {}'s device) first",
                    ctx.device, ctx.rank
                ))
            })?;
            if dev != ctx.device {
                return Err(para(format!(
                    "{what}: this thread's device is {dev}, but rank {} of {gname} is on device {}",
                    ctx.rank, ctx.device
                )));
            }
            if stream.is_null() && !default_stream {
                return Err((HCCL_E_PTR, format!("{what}: stream is NULL")));
            }
            let sid = e.stream_id(stream, what).map_err(|(_, m)| para(m))?;
            let plan = plan(&e, &ctx)?;
            e.run_stream(sid, None).map_err(|(c, m)| {
                (HCCL_E_RUNTIME, format!("{what}: work queued earlier on the stream failed (ACL error {c}): {m}"))
            })?;
            let inputs = plan
                .reads
                .iter()
                .map(|&(a, l)| if l == 0 { Ok(vec![]) } else { e.mem.bytes(a, l, what).map(<[u8]>::to_vec) })
                .collect::<Result<Vec<_>, _>>()
                .map_err(para)?;
            Ok((sid, plan, inputs))
        })();
        match r {
            Ok(v) => v,
            Err(f) => {
                drop(e);
                return local_failure(f);
            }
        }
    };
    // Phase C: the rendezvous.
    let deadline = Instant::now() + limit;
    let rank = ctx.rank as usize;
    let call = plan.call.clone();
    let mut st = state();
    let seq;
    {
        let st = &mut *st;
        let g = st.groups.get_mut(&gid).expect("group");
        if let Some((code, m)) = &g.poisoned {
            return Err((*code, format!("{what}: communicator {gname} is unusable after an earlier failure: {m}")));
        }
        seq = g.seq[rank];
        g.seq[rank] += 1;
        let n = g.n as usize;
        let step = g.steps.entry(seq).or_insert_with(|| Step {
            arrivals: (0..n).map(|_| None).collect(),
            done: None,
            picked: 0,
        });
        let first = step.arrivals.iter().enumerate().find_map(|(r, a)| a.as_ref().map(|a| (r as u32, &a.call)));
        if let Some(m) = first.and_then(|(r0, c0)| mismatch(c0, r0, &call, ctx.rank)) {
            let f = para(m);
            st.poison(gid, &f);
            return Err((f.0, format!("{what}: {}", f.1)));
        }
        step.arrivals[rank] =
            Some(Arrival { call: call.clone(), inputs, recv: plan.recv, recv_offsets: plan.recv_offsets });
        if step.arrivals.iter().all(Option::is_some) {
            let arr: Vec<Arrival> = step.arrivals.iter_mut().map(|a| a.take().expect("all")).collect();
            match compute(&arr) {
                Ok(w) => step.done = Some(w),
                Err(m) => {
                    let f = para(m);
                    st.poison(gid, &f);
                    return Err((f.0, format!("{what}: {}", f.1)));
                }
            }
            CHANGED.notify_all();
        }
    }
    let writes = loop {
        let g = st.groups.get_mut(&gid).expect("group");
        let n = g.n;
        if let Some(step) = g.steps.get_mut(&seq) {
            if let Some(done) = &mut step.done {
                let mine = std::mem::take(&mut done[rank]);
                step.picked += 1;
                if step.picked == n {
                    g.steps.remove(&seq);
                }
                break mine;
            }
        }
        if let Some((code, m)) = &g.poisoned {
            return Err((*code, format!("{what}: collective #{seq} on {gname} failed: {m}")));
        }
        let now = Instant::now();
        if now >= deadline {
            let step = &g.steps[&seq];
            let missing: Vec<usize> = (0..n as usize).filter(|r| step.arrivals[*r].is_none()).collect();
            let f = (
                HCCL_E_TIMEOUT,
                format!(
                    "collective #{seq} ({}) on {gname} timed out after {:.1} s ({limit_from}): \
                     ranks {missing:?} never called it",
                    call.name(),
                    limit.as_secs_f64()
                ),
            );
            st.poison(gid, &f);
            return Err((f.0, format!("{what}: {}", f.1)));
        }
        st = CHANGED.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    };
    drop(st);
    // Phase D: queue the output writes on the stream, in order with the work around them.
    let mut e = emu();
    let r = (|| {
        if !e.streams.get(&sid).is_some_and(|s| s.live) {
            return Err(para(format!("{what}: the stream was destroyed during the call")));
        }
        for (addr, bytes) in writes.into_iter().filter(|(_, b)| !b.is_empty()) {
            let base = e.mem.check_range(addr, bytes.len(), what).map_err(para)?;
            e.enqueue(
                sid,
                Task { kind: TaskKind::H2dBytes { dst: addr, bytes }, reads: vec![], writes: vec![base], host: vec![] },
            );
        }
        Ok(())
    })();
    drop(e);
    r
}

/// MC2 operators: the calling thread's live communicator named `name` (the `HcclGetCommName`
/// string), as (handle, rank, size).
pub(crate) fn comm_named(name: &str, what: &str, at_launch: bool) -> Result<(u64, u32, u32), String> {
    let device = calling_device(what).map_err(|f| f.1)?;
    let st = state();
    let named = |destroyed: bool| -> Vec<(u64, u32, u32)> {
        let mut found: Vec<(u64, u32, u32)> = st
            .handles
            .iter()
            .filter(|(_, h)| h.destroyed == destroyed)
            .filter_map(|(&id, h)| {
                let g = &st.groups[&h.group];
                (g.name == name && g.devices[h.rank as usize] == device).then_some((id, h.rank, g.n))
            })
            .collect();
        found.sort_unstable();
        found
    };
    // At a launch a destroyed communicator is still named: its step then fails as a collective
    // on a destroyed handle does, poisoning the group so its peers fail at once instead of
    // waiting. Planning (GetWorkspaceSize) refuses it on the caller alone.
    let mut found = named(false);
    if found.is_empty() && at_launch {
        found = named(true);
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "{what}: groupEp {name:?} names no live communicator of this rank's device {device} (pass the \
             HcclGetCommName of a communicator this device's rank holds)"
        )),
        _ => Err(format!("{what}: groupEp {name:?} names {} communicators of device {device}", found.len())),
    }
}

/// The per-rank plan of one MC2 step: what is read at the call (in order), and the job
/// `mc2::compute` gets with those bytes.
pub(crate) struct Mc2Plan {
    pub attrs: Vec<(&'static str, i64)>,
    pub reads: Vec<(u64, usize)>,
    pub job: Mc2Job,
}

/// Runs an MC2 operator's launch as one step of the rendezvous sequence of the communicator
/// `comm` (from [`comm_named`]), exactly like a collective: the stream is drained up to the
/// call, the reads are taken, every rank's step meets, `mc2::compute` gives each rank's output
/// writes, and they are queued on the stream. `plan` gets the rank and size.
pub(crate) fn mc2_step(
    op: &'static str,
    comm: u64,
    stream: aclrtStream,
    plan: impl FnOnce(&Emu, u32, u32) -> Result<Mc2Plan, String>,
) -> Result<(), (i32, String)> {
    collective_core(op, comm, stream, true, |e, ctx| {
        let p = plan(e, ctx.rank, ctx.n).map_err(para)?;
        for &(addr, len) in &p.reads {
            if len > 0 {
                let base = e.mem.check_range(addr, len, op).map_err(para)?;
                let dev = e.mem.allocs[&base].device;
                if dev != ctx.device {
                    return Err(para(format!(
                        "{op}: operand {addr:#x} is memory of device {dev}, but rank {} of the communicator is on \
                         device {}",
                        ctx.rank, ctx.device
                    )));
                }
            }
        }
        Ok(Plan { call: Call::Mc2 { op, attrs: p.attrs, job: p.job }, reads: p.reads, recv: 0, recv_offsets: vec![] })
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclAllReduce(
    sendBuf: *mut c_void,
    recvBuf: *mut c_void,
    count: u64,
    dataType: HcclDataType,
    op: HcclReduceOp,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let what = "HcclAllReduce";
    collective(what, comm, stream, |e, ctx| {
        let es = reducible(dataType, op, what)?;
        let len = dev_buf(e, sendBuf as u64, count, es, ctx, what, "sendBuf")?;
        dev_buf(e, recvBuf as u64, count, es, ctx, what, "recvBuf")?;
        Ok(Plan {
            call: Call::AllReduce { count, dtype: dataType, op },
            reads: vec![(sendBuf as u64, len)],
            recv: recvBuf as u64,
            recv_offsets: vec![],
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclAllGather(
    sendBuf: *mut c_void,
    recvBuf: *mut c_void,
    sendCount: u64,
    dataType: HcclDataType,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let what = "HcclAllGather";
    collective(what, comm, stream, |e, ctx| {
        let es = movable(dataType, what)?;
        let len = dev_buf(e, sendBuf as u64, sendCount, es, ctx, what, "sendBuf")?;
        let total = sendCount.checked_mul(ctx.n as u64).ok_or_else(|| para(format!("{what}: sendCount overflows")))?;
        dev_buf(e, recvBuf as u64, total, es, ctx, what, "recvBuf (rankSize x sendCount elements)")?;
        Ok(Plan {
            call: Call::AllGather { count: sendCount, dtype: dataType },
            reads: vec![(sendBuf as u64, len)],
            recv: recvBuf as u64,
            recv_offsets: vec![],
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclReduceScatter(
    sendBuf: *mut c_void,
    recvBuf: *mut c_void,
    recvCount: u64,
    dataType: HcclDataType,
    op: HcclReduceOp,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let what = "HcclReduceScatter";
    collective(what, comm, stream, |e, ctx| {
        let es = reducible(dataType, op, what)?;
        let total = recvCount.checked_mul(ctx.n as u64).ok_or_else(|| para(format!("{what}: recvCount overflows")))?;
        let len = dev_buf(e, sendBuf as u64, total, es, ctx, what, "sendBuf (rankSize x recvCount elements)")?;
        dev_buf(e, recvBuf as u64, recvCount, es, ctx, what, "recvBuf")?;
        Ok(Plan {
            call: Call::ReduceScatter { count: recvCount, dtype: dataType, op },
            reads: vec![(sendBuf as u64, len)],
            recv: recvBuf as u64,
            recv_offsets: vec![],
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclBroadcast(
    buf: *mut c_void,
    count: u64,
    dataType: HcclDataType,
    root: u32,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let what = "HcclBroadcast";
    collective(what, comm, stream, |e, ctx| {
        let es = movable(dataType, what)?;
        if root >= ctx.n {
            return Err(para(format!("{what}: root {root} is not a rank of this {}-rank communicator", ctx.n)));
        }
        let len = dev_buf(e, buf as u64, count, es, ctx, what, "buf")?;
        let reads = if root == ctx.rank { vec![(buf as u64, len)] } else { vec![(0, 0)] };
        Ok(Plan {
            call: Call::Broadcast { count, dtype: dataType, root },
            reads,
            recv: buf as u64,
            recv_offsets: vec![],
        })
    })
}

/// `n` u64 from a host array.
unsafe fn host_u64s(p: *const c_void, n: u32, what: &str, name: &str) -> Result<Vec<u64>, Fail> {
    if p.is_null() {
        return Err((HCCL_E_PTR, format!("{what}: {name} is NULL")));
    }
    // SAFETY: the documented host array of rankSize uint64_t.
    Ok((0..n as usize).map(|i| unsafe { (p as *const u64).add(i).read_unaligned() }).collect())
}

#[no_mangle]
pub unsafe extern "C" fn HcclAlltoAllV(
    sendBuf: *const c_void,
    sendCounts: *const c_void,
    sdispls: *const c_void,
    sendType: HcclDataType,
    recvBuf: *const c_void,
    recvCounts: *const c_void,
    rdispls: *const c_void,
    recvType: HcclDataType,
    comm: HcclComm,
    stream: aclrtStream,
) -> HcclResult {
    let what = "HcclAlltoAllV";
    collective(what, comm, stream, |e, ctx| {
        let es = movable(sendType, what)?;
        movable(recvType, what)?;
        if sendType != recvType {
            return Err(para(format!(
                "{what}: sendType {} and recvType {} differ (no conversion is done)",
                dtype_name(sendType),
                dtype_name(recvType)
            )));
        }
        // SAFETY: host arrays of rankSize entries, checked for NULL.
        let (sc, sd, rc, rd) = unsafe {
            (
                host_u64s(sendCounts, ctx.n, what, "sendCounts")?,
                host_u64s(sdispls, ctx.n, what, "sdispls")?,
                host_u64s(recvCounts, ctx.n, what, "recvCounts")?,
                host_u64s(rdispls, ctx.n, what, "rdispls")?,
            )
        };
        let (s, r) = (sendBuf as u64, recvBuf as u64);
        if s != 0 && s == r && sc.iter().chain(&rc).any(|&c| c > 0) {
            return Err(para(format!("{what}: sendBuf and recvBuf are the same address {s:#x}")));
        }
        let at = |base: u64, displ: u64, role: &str, j: usize| {
            displ
                .checked_mul(es as u64)
                .and_then(|o| base.checked_add(o))
                .ok_or_else(|| para(format!("{what}: {role}[{j}] = {displ} overflows")))
        };
        let mut reads = vec![];
        for j in 0..ctx.n as usize {
            let addr = at(s, sd[j], "sdispls", j)?;
            let len = dev_buf(
                e,
                addr,
                sc[j],
                es,
                ctx,
                what,
                &format!("send region for rank {j} (sdispls[{j}] = {}, sendCounts[{j}] = {})", sd[j], sc[j]),
            )?;
            reads.push((addr, len));
        }
        let mut regions = vec![];
        let mut offsets = vec![];
        for j in 0..ctx.n as usize {
            let addr = at(r, rd[j], "rdispls", j)?;
            let len = dev_buf(
                e,
                addr,
                rc[j],
                es,
                ctx,
                what,
                &format!("receive region for rank {j} (rdispls[{j}] = {}, recvCounts[{j}] = {})", rd[j], rc[j]),
            )?;
            offsets.push(addr - r);
            if len > 0 {
                regions.push((addr, addr + len as u64, j));
            }
        }
        regions.sort();
        if let Some(w) = regions.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(para(format!(
                "{what}: the receive regions for ranks {} and {} overlap (rdispls / recvCounts)",
                w[0].2, w[1].2
            )));
        }
        Ok(Plan {
            call: Call::AlltoAllV { dtype: sendType, send_counts: sc, recv_counts: rc },
            reads,
            recv: r,
            recv_offsets: offsets,
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclBarrier(comm: HcclComm, stream: aclrtStream) -> HcclResult {
    collective("HcclBarrier", comm, stream, |_, _| {
        Ok(Plan { call: Call::Barrier, reads: vec![], recv: 0, recv_offsets: vec![] })
    })
}
