//! Collectives over HCCL: [`HcclCommunicator`] implements dsv4's
//! [`Communicator`](dsv4_core::parallel::Communicator) on device tensors, enqueued on the
//! backend's stream, and [`run_ranks`] runs one rank per device as threads of this process;
//! [`run_node_ranks`] runs this process's share of a world over several processes (nodes),
//! node 0's root info reaching the others over [`NodeGroup`]'s TCP rendezvous. With an HCCL rank
//! table ([`HcclBootstrap::from_rank_table`], [`run_bootstrapped`]) every rank joins with
//! `HcclCommInitClusterInfo(table, global rank)` instead of the root info; the processes still
//! meet over the rendezvous (readiness, failures, serve's decisions).
//!
//! # How each collective maps onto HCCL (f32 activations, `HCCL_DATA_TYPE_FP32`)
//!
//! * `all_reduce_sum`: `HcclAllReduce` (SUM) into a new tensor; stream ordered, no host sync.
//! * `reduce_scatter_sum` along `dim`: a strided copy makes every rank's part of `dim`
//!   contiguous (`[size, outer, part·inner]`; none when `dim`'s outer extent is 1), then
//!   `HcclReduceScatter`; stream ordered.
//! * `broadcast`: `HcclBroadcast` from the root's own tensor (returned as it is there) into a new
//!   tensor elsewhere; stream ordered.
//! * `all_gather` along `dim`: the ranks first exchange their shapes (a small metadata
//!   all-gather, read on the host), because the trait lets `dim` differ between ranks; then
//!   `HcclAllGather` into `[size · n]` (each part zero-padded to the largest when the sizes
//!   differ) and a rearrangement on the device with the backend's strided copy / concat when
//!   `dim` is not the outermost.
//! * `all_to_all_v`: the metadata exchange carries every rank's `send_rows`, so every rank knows
//!   the whole count matrix (HCCL requires matching send/receive counts on both sides), then one
//!   `HcclAlltoAllV` with element counts and displacements.
//! * `barrier`: `HcclBarrier`, then the stream is synchronised (it returns once every rank has
//!   called it).
//! * `split`: the metadata exchange carries the colours, so every member passes the same
//!   ascending `rankIds`, then `HcclCreateSubCommConfig` on the *global* communicator (HCCL
//!   cannot split a sub-communicator, so a split of one is made from the global communicator
//!   with the members' global ranks), with a `subCommId` derived from the parent, the split's
//!   sequence number and the group's first member, unique within the global communicator.
//!
//! The metadata exchange also gives the strict checks of the in-process communicator where it
//! runs (all-gather, all-to-all-v, split): invalid arguments on one rank, disagreeing dims or
//! shapes and different collectives at the same step fail on *every* rank with one message.
//! All-reduce, reduce-scatter and broadcast stay purely stream-ordered: their arguments are
//! checked on the calling rank only, and HCCL itself reports (or times out on) ranks that
//! disagree.
//!
//! # Errors
//!
//! Every HCCL failure is [`Error::Comm`] naming the function, the status
//! (`HCCL_E_PARA (1)`), `HcclGetErrorString` and the runtime's (or the emulator's) recent error
//! message. Traffic follows [`dsv4_core::parallel::Traffic`]'s rules exactly as
//! [`dsv4_core::parallel::LocalComm`] counts it (the metadata exchanges are not counted).

use std::ffi::{c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use dsv4_ascend_sys::hccl::{self as h, HcclComm, HcclDataType, HcclReduceOp, HcclResult, HcclRootInfo};
use dsv4_core::backend::Backend;
use dsv4_core::error::{Error, Result};
use dsv4_core::parallel::dispatch::{self, DispatchArgs, Dispatched, Route};
use dsv4_core::parallel::exchange::{invalid_args, starts, AllToAllPlan, GatherPlan, Meta, ScatterPlan};
use dsv4_core::parallel::{
    run_threads, CollectiveKind, Communicator, NodeGroup, ParallelLayout, RankContext, RankTable, Traffic,
};
use dsv4_core::Precision;

use crate::acl::{err, Device};
use crate::{moe_distribute, numel, AscendBackend, AscendTensor};

/// A communicator config whose `hcclExecTimeOut` is dsv4's communicator timeout
/// ([`dsv4_core::parallel::local::default_timeout`], `DSV4_COMM_TIMEOUT_S`, default 600 s) in
/// whole seconds ([`h::exec_timeout_seconds`]): a collective whose peer never arrives (a dead
/// rank) fails after that long instead of HCCL_EXEC_TIMEOUT's 1836 s.
fn exec_timeout_config() -> h::HcclCommConfig {
    let mut config = h::HcclCommConfig::init();
    config.hcclExecTimeOut = h::exec_timeout_seconds(dsv4_core::parallel::local::default_timeout());
    config
}

/// The HCCL library, loaded on first use (single-device runs never load it).
pub fn library() -> Result<&'static h::Hccl> {
    h::hccl().map_err(|e| err(e.to_string()))
}

/// One HCCL communicator handle, destroyed (after the stream drains) when the last user is
/// gone. A sub-communicator keeps its global communicator alive, so that HCCL sees the
/// sub-communicators destroyed first.
struct Handle {
    hccl: &'static h::Hccl,
    comm: HcclComm,
    dev: Arc<Device>,
    parent: Option<Arc<Handle>>,
}

// SAFETY: the handle is an opaque pointer that HCCL accepts from any thread once the device is
// set on it (every use goes through `Device::enter` first); the communicator serialises its
// own calls with a mutex.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // Queued collectives still use the communicator: drain the stream first. A drop cannot
        // return an error, so failures are reported on stderr (a leaked communicator on a
        // device that is going away anyway), never silently ignored.
        if let Err(e) = self.dev.synchronize() {
            eprintln!(
                "dsv4: destroying the HCCL communicator on device {}: draining its stream failed: {e}",
                self.dev.id
            );
        }
        if let Ok(destroy) = self.hccl.HcclCommDestroy() {
            // SAFETY: a communicator from HcclCommInitRootInfo[Config], HcclCommInitClusterInfo[Config]
            // or HcclCreateSubCommConfig, owned by this handle, destroyed once; its
            // sub-communicators (which hold this handle) are gone.
            let code = unsafe { destroy(self.comm) };
            if let Err(msg) = check(self.hccl, self.dev.api, code, "HcclCommDestroy") {
                eprintln!("dsv4: device {}: {msg}", self.dev.id);
            }
        }
    }
}

/// One rank of an HCCL communicator on one Ascend device.
pub struct HcclCommunicator {
    handle: Arc<Handle>,
    rank: usize,
    size: usize,
    /// The members' ranks in the global communicator, ascending (this rank's is `[rank]`).
    global_ranks: Vec<u32>,
    /// This communicator's `subCommId` (0 for a global one), for deriving its children's.
    id: u64,
    /// Splits made from this communicator so far.
    splits: AtomicU64,
    traffic: Mutex<Traffic>,
    /// Collectives on one communicator run one at a time.
    busy: Mutex<()>,
    /// `HcclGetCommName`, read on first use (MC2 kernels name the communicator by it).
    name: std::sync::OnceLock<CString>,
    /// The MC2 kernels' decision for this (EP) communicator, made on first use: the
    /// communicator of their own they run on (both docs: no other operator on the MC2
    /// communication domain), or why they are not used.
    mc2: Mutex<Option<std::result::Result<Arc<HcclCommunicator>, String>>>,
    /// Whether rank 0 said that a dispatch composed because its shapes did not allow MC2.
    mc2_declined_said: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for HcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HcclCommunicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.handle.dev.id)
            .field("global_ranks", &self.global_ranks)
            .finish()
    }
}

impl HcclCommunicator {
    /// On one rank (the root) of a communicator of `size` ranks about to be made:
    /// `HcclGetRootInfo`, the blob every rank passes to [`HcclCommunicator::init_rank`]. Loads
    /// HCCL on first use.
    pub fn root_info(be: &AscendBackend, size: usize) -> Result<HcclRootInfo> {
        let hccl = library()?;
        be.dev.enter()?;
        let f = hccl.HcclGetRootInfo().map_err(|e| err(e.to_string()))?;
        let mut info = HcclRootInfo::default();
        // SAFETY: out-pointer to a local blob of the documented size.
        let code = unsafe { f(&mut info) };
        check(hccl, be.dev.api, code, "HcclGetRootInfo").map_err(|msg| Error::Comm { rank: 0, size, msg })?;
        Ok(info)
    }

    /// Collective over the `size` ranks (each on its own thread or process, with its own
    /// device): joins the communicator described by `root` as rank `rank`
    /// (`HcclCommInitRootInfoConfig` with `hcclExecTimeOut` = `DSV4_COMM_TIMEOUT_S`, or
    /// `HcclCommInitRootInfo` on a CANN without it) on `be`'s device and stream.
    pub fn init_rank(be: &AscendBackend, root: &HcclRootInfo, rank: usize, size: usize) -> Result<HcclCommunicator> {
        let comm_err = |msg: String| Error::Comm { rank, size, msg };
        let hccl = library()?;
        if rank >= size {
            return Err(comm_err(format!("rank {rank} is not a rank of {size}")));
        }
        let (r, n) = (u32::try_from(rank), u32::try_from(size));
        let (Ok(r), Ok(n)) = (r, n) else { return Err(comm_err(format!("{size} ranks are too many for HCCL"))) };
        be.dev.enter()?;
        let mut comm: HcclComm = std::ptr::null_mut();
        match hccl.HcclCommInitRootInfoConfig() {
            Ok(f) if hccl.honours_exec_timeout() => {
                let config = exec_timeout_config();
                // SAFETY: `root` is a live blob from HcclGetRootInfo; `config` was initialised as
                // the API requires and outlives the call; `comm` is an out-pointer to a local.
                let code = unsafe { f(n, root, r, &config, &mut comm) };
                check(hccl, be.dev.api, code, "HcclCommInitRootInfoConfig").map_err(comm_err)?;
            }
            // An older CANN: the communicator keeps HCCL_EXEC_TIMEOUT.
            _ => {
                let f = hccl.HcclCommInitRootInfo().map_err(|e| err(e.to_string()))?;
                // SAFETY: `root` is a live blob from HcclGetRootInfo; `comm` is an out-pointer to
                // a local.
                let code = unsafe { f(n, root, r, &mut comm) };
                check(hccl, be.dev.api, code, "HcclCommInitRootInfo").map_err(comm_err)?;
            }
        }
        let handle = Arc::new(Handle { hccl, comm, dev: be.dev.clone(), parent: None });
        let c = HcclCommunicator::new(handle, rank, size, (0..n).collect(), 0);
        c.verify()?;
        Ok(c)
    }

    /// Collective over the ranks of the rank table at `table` (each on its own thread or process,
    /// on the device the table gives it): joins the world the table describes as `rank` (its
    /// `rank_id`) with `HcclCommInitClusterInfoConfig` (`hcclExecTimeOut` = `DSV4_COMM_TIMEOUT_S`),
    /// or `HcclCommInitClusterInfo` on a CANN without it, on `be`'s device and stream; `size` is
    /// the table's number of ranks (checked against HCCL's).
    pub fn init_rank_from_table(
        be: &AscendBackend,
        table: &CStr,
        rank: usize,
        size: usize,
    ) -> Result<HcclCommunicator> {
        let comm_err = |msg: String| Error::Comm { rank, size, msg };
        let hccl = library()?;
        if table.to_bytes_with_nul().len() > h::CLUSTER_INFO_PATH_MAX {
            return Err(comm_err(format!(
                "the rank table's path is longer than HCCL's {} bytes: {}",
                h::CLUSTER_INFO_PATH_MAX,
                table.to_string_lossy()
            )));
        }
        let Ok(r) = u32::try_from(rank) else { return Err(comm_err(format!("rank {rank} is too large for HCCL"))) };
        be.dev.enter()?;
        let mut comm: HcclComm = std::ptr::null_mut();
        match hccl.HcclCommInitClusterInfoConfig() {
            Ok(f) if hccl.honours_exec_timeout() => {
                let mut config = exec_timeout_config();
                // SAFETY: `table` is a NUL-terminated path that outlives the call; `config` was
                // initialised as the API requires and outlives the call; `comm` is an out-pointer
                // to a local.
                let code = unsafe { f(table.as_ptr(), r, &mut config, &mut comm) };
                check(hccl, be.dev.api, code, "HcclCommInitClusterInfoConfig").map_err(comm_err)?;
            }
            // An older CANN: the communicator keeps HCCL_EXEC_TIMEOUT.
            _ => {
                let f = hccl.HcclCommInitClusterInfo().map_err(|e| err(e.to_string()))?;
                // SAFETY: `table` is a NUL-terminated path that outlives the call; `comm` is an
                // out-pointer to a local.
                let code = unsafe { f(table.as_ptr(), r, &mut comm) };
                check(hccl, be.dev.api, code, "HcclCommInitClusterInfo").map_err(comm_err)?;
            }
        }
        let handle = Arc::new(Handle { hccl, comm, dev: be.dev.clone(), parent: None });
        let c = HcclCommunicator::new(handle, rank, size, (0..size as u32).collect(), 0);
        c.verify()?;
        Ok(c)
    }

    fn new(handle: Arc<Handle>, rank: usize, size: usize, global_ranks: Vec<u32>, id: u64) -> HcclCommunicator {
        HcclCommunicator {
            handle,
            rank,
            size,
            global_ranks,
            id,
            splits: AtomicU64::new(0),
            traffic: Mutex::new(Traffic::default()),
            busy: Mutex::new(()),
            name: std::sync::OnceLock::new(),
            mc2: Mutex::new(None),
            mc2_declined_said: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `HcclGetCommName`: the name MC2 kernels take as `groupEp`.
    fn comm_name(&self) -> Result<&CStr> {
        if let Some(n) = self.name.get() {
            return Ok(n);
        }
        let f = self.handle.hccl.HcclGetCommName().map_err(|e| self.error(e.to_string()))?;
        let mut buf = vec![0 as std::ffi::c_char; h::HCCL_COMM_NAME_MAX_LENGTH as usize];
        // SAFETY: `buf` holds HCCL_COMM_NAME_MAX_LENGTH bytes, the most the call writes; the
        // communicator is ours and live.
        let code = unsafe { f(self.handle.comm, buf.as_mut_ptr()) };
        self.check(code, "HcclGetCommName")?;
        let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        let name = CString::new(bytes).map_err(|e| self.error(e.to_string()))?;
        Ok(self.name.get_or_init(|| name))
    }

    /// The communicator the MC2 kernels run this EP group's dispatches on, or `None` where they
    /// are not used. The first call decides, on every rank together (collective: every rank
    /// calls it at the same dispatch, `moe_distribute::why_not` being the same everywhere):
    /// a vote that every rank can use them (`why_not_here`: policy, CANN symbols, SoC), a
    /// communicator of their own (a split), the self-test on it, and a vote on its verdicts; a
    /// self-test that fails or errors (on the new communicator, which a failure poisons) switches
    /// the kernels off with the reason, and the composition runs.
    fn mc2_group(
        &self,
        be: &AscendBackend,
        args: &DispatchArgs<'_, AscendBackend>,
    ) -> Result<Option<Arc<HcclCommunicator>>> {
        let mut state = self.mc2.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(decided) = &*state {
            return Ok(decided.as_ref().ok().cloned());
        }
        let here = moe_distribute::why_not_here(be);
        if self.any_rank(be, here.is_some())? {
            let why = here.unwrap_or_else(|| "another rank of the EP group cannot use them".into());
            *state = Some(Err(why));
            return Ok(None);
        }
        let say = |what: &str| {
            if self.rank == 0 {
                eprintln!("dsv4: EP group of {} ranks: the MoE exchange {what}", self.size);
            }
        };
        let group = Arc::new(self.split_hccl(0)?);
        let why = match self.mc2_self_test(be, &group, args.held, args.x.shape[1], args.weights.shape[1]) {
            Ok(why) => why,
            Err(e) => Some(format!("self-test failed: {e}")),
        };
        if self.any_rank(be, why.is_some())? {
            let why = why.unwrap_or_else(|| "the MC2 self-test failed on another rank of the EP group".into());
            say(&format!("composes: the MC2 kernels are switched off ({why})"));
            be.kernels.moe_distribute.disable(why.clone());
            *state = Some(Err(why));
            return Ok(None);
        }
        say("runs on MC2 (aclnnMoeDistributeDispatchV2 / CombineV2; self-test passed)");
        *state = Some(Ok(group.clone()));
        Ok(Some(group))
    }

    /// Collective: whether `flag` holds on any rank.
    fn any_rank(&self, be: &AscendBackend, flag: bool) -> Result<bool> {
        let votes = self.all_reduce_sum(be, &be.upload(&[f32::from(flag)], &[1])?)?;
        Ok(be.download(&votes)?[0] > 0.0)
    }

    /// The MC2 round trip of synthetic tokens on `group`, each expert scaling its rows by its
    /// id + 1, against the host's sums; `Some(why)` when they differ by more than 2⁻⁶ of the
    /// largest sum (the roundings involved, of the scaled rows and of the sums to BF16, stay
    /// within 2⁻⁸; a row sent to the wrong token or expert moves a sum by far more).
    fn mc2_self_test(
        &self,
        be: &AscendBackend,
        group: &HcclCommunicator,
        held: &[std::ops::Range<usize>],
        hidden: usize,
        top_k: usize,
    ) -> Result<Option<String>> {
        use dsv4_core::backend::BinaryOp;
        let experts = held.last().map_or(0, |h| h.end);
        let (x, ids, w) = moe_distribute::self_test_tokens(self.rank, hidden, top_k, experts);
        let (xt, wt) = (be.upload(&x, &[2, hidden])?, be.upload(&w, &[2, top_k])?);
        let args = DispatchArgs { x: &xt, ids: &ids, weights: &wt, held, most_tokens: 2, precision: Precision::Bf16 };
        let name = group.comm_name()?;
        let kind = CollectiveKind::AllToAllV;
        let d = {
            let _busy = group.enter(Some(be), kind)?;
            moe_distribute::dispatch(be, name, self.rank, self.size, &args).map_err(group.wrap(kind))?
        };
        let start = held[self.rank].start as i32;
        let factors: Vec<f32> = d.experts.iter().map(|&e| (start + e + 1) as f32).collect();
        let ys = if factors.is_empty() {
            d.rows.clone()
        } else {
            be.binary(&d.rows, &be.upload(&factors, &[factors.len(), 1])?, BinaryOp::Mul)?
        };
        let got = {
            let _busy = group.enter(Some(be), kind)?;
            moe_distribute::combine(be, name, self.rank, self.size, &ys, &d).map_err(group.wrap(kind))?
        };
        let got = be.download(&got)?;
        let want = moe_distribute::self_test_expected(&x, &ids, &w, hidden, top_k);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        Ok((got.len() != want.len() || worst > scale * 2f64.powi(-6)).then(|| {
            format!(
                "self-test: the MC2 round trip is {worst:.3e} off the host's sums (largest {scale:.3e}; {} values \
                 for {})",
                got.len(),
                want.len()
            )
        }))
    }

    /// Checks HCCL's own idea of this rank and size (`HcclGetRankId`, `HcclGetRankSize`).
    fn verify(&self) -> Result<()> {
        let hccl = self.handle.hccl;
        let (mut r, mut n) = (u32::MAX, 0u32);
        let f = hccl.HcclGetRankId().map_err(|e| self.error(e.to_string()))?;
        // SAFETY: our live communicator and an out-pointer to a local.
        self.check(unsafe { f(self.handle.comm, &mut r) }, "HcclGetRankId")?;
        let f = hccl.HcclGetRankSize().map_err(|e| self.error(e.to_string()))?;
        // SAFETY: as above.
        self.check(unsafe { f(self.handle.comm, &mut n) }, "HcclGetRankSize")?;
        if (r as usize, n as usize) != (self.rank, self.size) {
            return Err(self.error(format!(
                "HCCL reports rank {r} of {n} for the communicator made as rank {} of {}",
                self.rank, self.size
            )));
        }
        Ok(())
    }

    /// The device the communicator runs on.
    pub fn device(&self) -> i32 {
        self.handle.dev.id
    }

    fn error(&self, msg: String) -> Error {
        Error::Comm { rank: self.rank, size: self.size, msg }
    }

    fn check(&self, code: HcclResult, what: &str) -> Result<()> {
        check(self.handle.hccl, self.handle.dev.api, code, what).map_err(|m| self.error(m))
    }

    /// Locks the communicator for one collective, after checking that `be` is its device.
    fn enter(&self, be: Option<&AscendBackend>, kind: CollectiveKind) -> Result<MutexGuard<'_, ()>> {
        if let Some(be) = be {
            if !Arc::ptr_eq(&be.dev, &self.handle.dev) {
                return Err(self.error(format!(
                    "{} was given a backend of device {}, but the communicator runs on device {}'s stream",
                    kind.name(),
                    be.dev.id,
                    self.handle.dev.id
                )));
            }
        }
        let guard = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        self.handle.dev.enter().map_err(|e| self.error(format!("{}: {e}", kind.name())))?;
        Ok(guard)
    }

    fn record(&self, kind: CollectiveKind, values: usize) {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).record(kind, values as u64 * 4);
    }

    /// A backend error during `kind`, as a communicator error.
    fn wrap(&self, kind: CollectiveKind) -> impl Fn(Error) -> Error + '_ {
        move |e| self.error(format!("{}: {e}", kind.name()))
    }

    fn ptr(t: &AscendTensor) -> *mut c_void {
        (t.buf.ptr + (t.offset * 4) as u64) as *mut c_void
    }

    /// Every rank's [`Meta`] (a small `HcclAllGather` of UINT64 words, read on the host),
    /// checked as [`Meta::decode_all`] does on every rank.
    fn exchange(&self, me: Meta) -> Result<Vec<Meta>> {
        let words = me.encode(self.rank, self.size);
        let len = words.len();
        let dev = &self.handle.dev;
        let send = dev.alloc(len * 8).map_err(self.wrap(me.kind))?;
        let recv = dev.alloc(len * 8 * self.size).map_err(self.wrap(me.kind))?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        dev.upload_bytes(&send, &bytes).map_err(self.wrap(me.kind))?;
        let f = self.handle.hccl.HcclAllGather().map_err(|e| self.error(e.to_string()))?;
        // SAFETY: `send` holds `len` u64 words, `recv` room for `size · len`; both are live device
        // blocks, used in order on our stream (returned to the pool only after the stream drains
        // below); the communicator and stream are ours.
        let code = unsafe {
            f(
                send.ptr as *mut c_void,
                recv.ptr as *mut c_void,
                len as u64,
                HcclDataType::HCCL_DATA_TYPE_UINT64,
                self.handle.comm,
                dev.stream,
            )
        };
        self.check(code, "HcclAllGather")?;
        let mut out = vec![0u8; len * 8 * self.size];
        dev.download_bytes(recv.ptr, &mut out).map_err(self.wrap(me.kind))?;
        let words: Vec<u64> =
            out.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        Meta::decode_all(&words, self.size, me.kind).map_err(|m| self.error(m))
    }

    /// A new f32 tensor on the device (a communicator error on failure).
    fn alloc(&self, be: &AscendBackend, kind: CollectiveKind, shape: &[usize]) -> Result<AscendTensor> {
        be.new_tensor(shape).map_err(self.wrap(kind))
    }
}

/// A status as a message (None on success): the function, the status name and number,
/// `HcclGetErrorString` and the runtime's recent error message.
fn check(hccl: &h::Hccl, api: &dsv4_ascend_sys::Api, code: HcclResult, what: &str) -> std::result::Result<(), String> {
    if code == HcclResult::HCCL_SUCCESS {
        return Ok(());
    }
    let mut msg = format!("{what} failed with {} ({})", h::result_name(code), code.0);
    if let Some(s) = hccl.error_string(code) {
        msg.push_str(&format!(": {s}"));
    }
    msg.push_str(&format!("; {}", api.recent_error().unwrap_or_else(|| "no detail from aclGetRecentErrMsg".into())));
    Err(msg)
}

/// A 64-bit FNV-1a mix, for sub-communicator ids.
fn mix(words: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Communicator<AscendBackend> for HcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, be: &AscendBackend, x: &AscendTensor) -> Result<AscendTensor> {
        let kind = CollectiveKind::AllReduce;
        let _busy = self.enter(Some(be), kind)?;
        let n = numel(&x.shape);
        let out = self.alloc(be, kind, &x.shape)?;
        if n > 0 {
            let f = self.handle.hccl.HcclAllReduce().map_err(|e| self.error(e.to_string()))?;
            // SAFETY: `x` and `out` are live device tensors of `n` f32 each (the input is only
            // read); the communicator and the stream are ours, and later users of `out` are
            // ordered after the collective on the same stream.
            let code = unsafe {
                f(
                    Self::ptr(x),
                    Self::ptr(&out),
                    n as u64,
                    HcclDataType::HCCL_DATA_TYPE_FP32,
                    HcclReduceOp::HCCL_REDUCE_SUM,
                    self.handle.comm,
                    self.handle.dev.stream,
                )
            };
            self.check(code, "HcclAllReduce")?;
        }
        self.record(kind, n);
        Ok(out)
    }

    fn all_gather(&self, be: &AscendBackend, x: &AscendTensor, dim: usize) -> Result<AscendTensor> {
        let kind = CollectiveKind::AllGather;
        let _busy = self.enter(Some(be), kind)?;
        let shape = x.shape.clone();
        let metas = self.exchange(GatherPlan::meta(self.rank, &shape, dim))?;
        let plan = GatherPlan::new(&metas, &shape, dim).map_err(|m| self.error(m))?;
        let GatherPlan { outer, len, inner, max, chunk, .. } = plan;
        if chunk == 0 {
            // Nothing to move on any rank (every rank computed the same sizes).
            let out = self.alloc(be, kind, &plan.out_shape)?;
            self.record(kind, numel(&shape));
            return Ok(out);
        }
        // This rank's part, zero-padded along `dim` to the largest part.
        let padded;
        let send = if len == max {
            x
        } else {
            let mut pad_shape = shape.clone();
            pad_shape[dim] = max - len;
            let zeros = be.full(&pad_shape, 0.0).map_err(self.wrap(kind))?;
            padded = be.concat(&[x, &zeros], dim).map_err(self.wrap(kind))?;
            &padded
        };
        let gathered = self.alloc(be, kind, &[self.size * chunk])?;
        let f = self.handle.hccl.HcclAllGather().map_err(|e| self.error(e.to_string()))?;
        // SAFETY: `send` holds `chunk` f32 and `gathered` `size · chunk`, both live device tensors;
        // the communicator and stream are ours; later reads are ordered after it on the stream.
        let code = unsafe {
            f(
                Self::ptr(send),
                Self::ptr(&gathered),
                chunk as u64,
                HcclDataType::HCCL_DATA_TYPE_FP32,
                self.handle.comm,
                self.handle.dev.stream,
            )
        };
        self.check(code, "HcclAllGather")?;
        // `gathered` is `[size, outer, max, inner]`; the result is `[outer, total, inner]`.
        let out = if plan.equal_parts() {
            if outer == 1 {
                gathered
            } else {
                be.gather_view(&gathered, &[outer, self.size, max * inner], &[max * inner, chunk, 1], 0)
                    .map_err(self.wrap(kind))?
            }
        } else {
            let parts: Vec<AscendTensor> = plan
                .lens
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > 0)
                .map(|(r, &l)| be.gather_view(&gathered, &[outer, l * inner], &[max * inner, 1], r * chunk))
                .collect::<Result<_>>()
                .map_err(self.wrap(kind))?;
            let refs: Vec<&AscendTensor> = parts.iter().collect();
            be.concat(&refs, 1).map_err(self.wrap(kind))?
        };
        let out = be.reshape(&out, &plan.out_shape).map_err(self.wrap(kind))?;
        self.record(kind, numel(&shape));
        Ok(out)
    }

    fn reduce_scatter_sum(&self, be: &AscendBackend, x: &AscendTensor, dim: usize) -> Result<AscendTensor> {
        let kind = CollectiveKind::ReduceScatter;
        let _busy = self.enter(Some(be), kind)?;
        let (size, shape) = (self.size, x.shape.clone());
        let plan = ScatterPlan::new(self.rank, size, &shape, dim).map_err(|m| self.error(m))?;
        let (n, outer, part, inner, len) = (numel(&shape), plan.outer, plan.part, plan.inner, shape[dim]);
        let out = self.alloc(be, kind, &plan.out_shape)?;
        if n > 0 {
            // Rank r's part of every outer row, made contiguous: `[size, outer, part · inner]`.
            let arranged;
            let send = if outer == 1 {
                x
            } else {
                arranged = be
                    .gather_view(x, &[size, outer, part * inner], &[part * inner, len * inner, 1], 0)
                    .map_err(self.wrap(kind))?;
                &arranged
            };
            let f = self.handle.hccl.HcclReduceScatter().map_err(|e| self.error(e.to_string()))?;
            // SAFETY: `send` holds `size · count` f32 and `out` `count`, both live device tensors;
            // the communicator and stream are ours; later reads are ordered after it.
            let code = unsafe {
                f(
                    Self::ptr(send),
                    Self::ptr(&out),
                    (n / size) as u64,
                    HcclDataType::HCCL_DATA_TYPE_FP32,
                    HcclReduceOp::HCCL_REDUCE_SUM,
                    self.handle.comm,
                    self.handle.dev.stream,
                )
            };
            self.check(code, "HcclReduceScatter")?;
        }
        self.record(kind, n);
        Ok(out)
    }

    /// Receiving no rows gives a `[0, ..]` tensor.
    fn all_to_all_v(
        &self,
        be: &AscendBackend,
        x: &AscendTensor,
        send_rows: &[usize],
    ) -> Result<(AscendTensor, Vec<usize>)> {
        let kind = CollectiveKind::AllToAllV;
        let _busy = self.enter(Some(be), kind)?;
        let (size, shape) = (self.size, x.shape.clone());
        let metas = self.exchange(AllToAllPlan::meta(self.rank, size, &shape, send_rows))?;
        let AllToAllPlan { width, counts, out_shape, moved } =
            AllToAllPlan::new(&metas, self.rank, &shape).map_err(|m| self.error(m))?;
        let rows = shape[0];
        let out = self.alloc(be, kind, &out_shape)?;
        if moved * width > 0 {
            let words = |v: Vec<usize>| -> Vec<u64> { v.into_iter().map(|c| (c * width) as u64).collect() };
            let (send_counts, recv_counts) = (words(send_rows.to_vec()), words(counts.clone()));
            let (sdispls, rdispls) = (words(starts(send_rows)), words(starts(&counts)));
            let f = self.handle.hccl.HcclAlltoAllV().map_err(|e| self.error(e.to_string()))?;
            // SAFETY: the four host arrays hold `size` u64 each and live across the call; `x` holds
            // the sent elements at the send displacements and `out` room for every received one;
            // both are live device tensors; the communicator and stream are ours.
            let code = unsafe {
                f(
                    Self::ptr(x),
                    send_counts.as_ptr() as *const c_void,
                    sdispls.as_ptr() as *const c_void,
                    HcclDataType::HCCL_DATA_TYPE_FP32,
                    Self::ptr(&out),
                    recv_counts.as_ptr() as *const c_void,
                    rdispls.as_ptr() as *const c_void,
                    HcclDataType::HCCL_DATA_TYPE_FP32,
                    self.handle.comm,
                    self.handle.dev.stream,
                )
            };
            self.check(code, "HcclAlltoAllV")?;
        }
        self.record(kind, (rows - send_rows[self.rank]) * width);
        Ok((out, counts))
    }

    fn broadcast(&self, be: &AscendBackend, x: &AscendTensor, root: usize) -> Result<AscendTensor> {
        let kind = CollectiveKind::Broadcast;
        let _busy = self.enter(Some(be), kind)?;
        if root >= self.size {
            return Err(self.error(invalid_args(
                self.rank,
                kind,
                format!("root {root} is not a rank of {}", self.size),
            )));
        }
        let n = numel(&x.shape);
        let is_root = self.rank == root;
        // The root sends from its own tensor, which HCCL only reads there.
        let out = if is_root { x.clone() } else { self.alloc(be, kind, &x.shape)? };
        if n > 0 {
            let f = self.handle.hccl.HcclBroadcast().map_err(|e| self.error(e.to_string()))?;
            // SAFETY: `out` is a live device tensor of `n` f32 (the root's input, read; a new tensor
            // elsewhere, written); the communicator and stream are ours.
            let code = unsafe {
                f(
                    Self::ptr(&out),
                    n as u64,
                    HcclDataType::HCCL_DATA_TYPE_FP32,
                    root as u32,
                    self.handle.comm,
                    self.handle.dev.stream,
                )
            };
            self.check(code, "HcclBroadcast")?;
        }
        self.record(kind, if is_root { n } else { 0 });
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        let kind = CollectiveKind::Barrier;
        let _busy = self.enter(None, kind)?;
        let f = self.handle.hccl.HcclBarrier().map_err(|e| self.error(e.to_string()))?;
        // SAFETY: our live communicator and stream.
        let code = unsafe { f(self.handle.comm, self.handle.dev.stream) };
        self.check(code, "HcclBarrier")?;
        self.handle.dev.synchronize().map_err(self.wrap(kind))?;
        self.record(kind, 0);
        Ok(())
    }

    fn split(&self, colour: usize) -> Result<Box<dyn Communicator<AscendBackend>>> {
        Ok(Box::new(self.split_hccl(colour)?))
    }

    fn traffic(&self) -> Traffic {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Through MC2 (`moe_distribute`) where it applies and the group decided to use it
    /// (`mc2_group`), else the composition over HcclAlltoAllV.
    fn moe_dispatch(
        &self,
        be: &AscendBackend,
        args: &DispatchArgs<'_, AscendBackend>,
    ) -> Result<Dispatched<AscendBackend>> {
        let group = match moe_distribute::why_not(args, self.size) {
            None => self.mc2_group(be, args)?,
            Some(why) => {
                // Said once, by the group's rank 0, where the kernels would otherwise be used.
                if self.rank == 0
                    && moe_distribute::why_not_here(be).is_none()
                    && !self.mc2_declined_said.swap(true, Ordering::Relaxed)
                {
                    eprintln!("dsv4: EP group: a dispatch composes instead of using MC2: {why} (said once)");
                }
                None
            }
        };
        let Some(group) = group else { return dispatch::dispatch(self, be, args) };
        let kind = CollectiveKind::AllToAllV;
        let name = group.comm_name()?;
        let _busy = group.enter(Some(be), kind)?;
        let d = moe_distribute::dispatch(be, name, self.rank, self.size, args).map_err(group.wrap(kind))?;
        // The rows this rank sent to other ranks, as BF16, counted on the EP communicator.
        let remote = args.ids.iter().filter(|&&id| !args.held[self.rank].contains(&(id as usize))).count();
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).record(kind, (remote * args.x.shape[1] * 2) as u64);
        Ok(d)
    }

    fn moe_combine(
        &self,
        be: &AscendBackend,
        outputs: &AscendTensor,
        d: &Dispatched<AscendBackend>,
    ) -> Result<AscendTensor> {
        let group = self.mc2.lock().unwrap_or_else(PoisonError::into_inner).clone().and_then(|g| g.ok());
        let (Route::Device(_), Some(group)) = (&d.route, group) else { return dispatch::combine(self, be, outputs, d) };
        let kind = CollectiveKind::AllToAllV;
        let name = group.comm_name()?;
        let _busy = group.enter(Some(be), kind)?;
        let out = moe_distribute::combine(be, name, self.rank, self.size, outputs, d).map_err(group.wrap(kind))?;
        let bytes = moe_distribute::remote_rows(d) * d.rows.shape[1] * 2;
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).record(kind, bytes as u64);
        Ok(out)
    }
}

impl HcclCommunicator {
    /// [`Communicator::split`] as the concrete type (the MC2 kernels' own communicator).
    fn split_hccl(&self, colour: usize) -> Result<HcclCommunicator> {
        let kind = CollectiveKind::Split;
        let _busy = self.enter(None, kind)?;
        let metas = self.exchange(Meta::of(kind, colour as u64))?;
        let members: Vec<usize> = (0..self.size).filter(|&r| metas[r].arg == colour as u64).collect();
        let sub_rank = members.iter().position(|&r| r == self.rank).unwrap_or(0);
        let mut ids: Vec<u32> = members.iter().map(|&r| self.global_ranks[r]).collect();
        let seq = self.splits.fetch_add(1, Ordering::Relaxed);
        let mut id = mix(&[self.id, seq, ids[0] as u64]);
        if id == h::HCCL_INVALID_SUB_COMM_ID as u64 || id == 0 {
            id ^= 0x5a5a;
        }
        // HCCL splits only a global communicator: a sub-communicator's split is made from its
        // global one, with the members' global ranks.
        let global = self.handle.parent.clone().unwrap_or_else(|| self.handle.clone());
        let f = self.handle.hccl.HcclCreateSubCommConfig().map_err(|e| self.error(e.to_string()))?;
        let mut config = exec_timeout_config();
        let mut parent_comm = global.comm;
        let mut sub: HcclComm = std::ptr::null_mut();
        // SAFETY: `parent_comm` holds the live global communicator; `ids` has `ids.len()` entries
        // and `config` was initialised as the API requires; both outlive the call; `sub` is an
        // out-pointer to a local.
        let code = unsafe {
            f(&mut parent_comm, ids.len() as u32, ids.as_mut_ptr(), id, sub_rank as u32, &mut config, &mut sub)
        };
        self.check(code, "HcclCreateSubCommConfig")?;
        let handle =
            Arc::new(Handle { hccl: self.handle.hccl, comm: sub, dev: self.handle.dev.clone(), parent: Some(global) });
        let size = ids.len();
        let c = HcclCommunicator::new(handle, sub_rank, size, ids, id);
        c.verify()?;
        self.record(kind, 0);
        Ok(c)
    }
}

/// Where rank 0 hands the root info to the other ranks of this process, and where every rank
/// says whether it is ready to join, so that no rank enters `HcclCommInitRootInfo` (which
/// blocks until every rank has) when another has already failed.
///
/// In a run over several processes ([`NodeGroup`]), the rank that completes this process's
/// gate (the last to arrive, or the first to fail) also does the processes' exchange: node 0
/// sends its root info to the others over TCP once every node is ready, or every node's ranks
/// fail with the first failure.
struct Gate {
    state: Mutex<GateState>,
    wake: Condvar,
    node: Option<Arc<NodeGroup>>,
}

#[derive(Default)]
struct GateState {
    /// What global rank 0 hands the others: the root info's bytes, or with a rank table its
    /// fingerprint (so the nodes check they read the same table).
    root: Option<Vec<u8>>,
    ready: usize,
    /// The first failure before joining (this process's or another node's), as the message.
    failed: Option<String>,
    /// Multi-node: a rank has taken on the exchange between the nodes.
    exchanging: bool,
    /// Multi-node: the exchange is done and succeeded (`root` is node 0's).
    exchanged: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports this rank ready (rank 0 with the root info) or failed, then waits until every
    /// rank is ready (the root info) or one failed (the error to return). `rank` and `world`
    /// are global (as in the error messages); `local` ranks arrive at this process's gate.
    fn arrive(
        &self,
        rank: usize,
        world: usize,
        local: usize,
        ready: std::result::Result<Option<Vec<u8>>, String>,
    ) -> Result<Vec<u8>> {
        let mut st = self.lock();
        match ready {
            Ok(root) => {
                if let Some(root) = root {
                    st.root = Some(root);
                }
                st.ready += 1;
            }
            Err(msg) => {
                if st.failed.is_none() {
                    st.failed = Some(format!("rank {rank} left the communicator (it failed before joining: {msg})"));
                }
            }
        }
        if let Some(node) = &self.node {
            // The last local arrival (or the first failure) speaks for this process.
            if !st.exchanging && (st.ready == local || st.failed.is_some()) {
                st.exchanging = true;
                let mine = match &st.failed {
                    Some(msg) => Err(msg.clone()),
                    None => Ok(st.root.clone()),
                };
                drop(st);
                let shared = node.share(mine);
                st = self.lock();
                match shared {
                    Ok(bytes) => {
                        st.root = Some(bytes);
                        st.exchanged = true;
                    }
                    Err(e) => {
                        let msg = match e {
                            Error::Comm { msg, .. } => msg,
                            e => e.to_string(),
                        };
                        st.failed.get_or_insert(msg);
                    }
                }
            }
        }
        self.wake.notify_all();
        let deadline = Instant::now() + dsv4_core::parallel::local::default_timeout();
        loop {
            if let Some(msg) = &st.failed {
                return Err(Error::Comm { rank, size: world, msg: msg.clone() });
            }
            if st.ready == local && (self.node.is_none() || st.exchanged) {
                if let Some(root) = &st.root {
                    return Ok(root.clone());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm {
                    rank,
                    size: world,
                    msg: format!(
                        "timed out waiting for {} of {local} ranks of this process to open their devices{}",
                        local - st.ready.min(local),
                        if self.node.is_some() { " (or for the other nodes)" } else { "" }
                    ),
                });
            }
            st = self.wake.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Reports a failure to the gate if the rank leaves (an error or a panic) before arriving.
struct Arrival<'g> {
    gate: &'g Gate,
    rank: usize,
    world: usize,
    local: usize,
    done: bool,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.gate.arrive(self.rank, self.world, self.local, Err("its worker stopped".into()));
        }
    }
}

/// How the ranks of one process join one HCCL world: rank r opens its device, rank 0 makes the
/// root info and hands it to the others, and every rank joins (`HcclCommInitRootInfo`) once all
/// have opened their devices. Shared by the rank threads; each calls [`HcclBootstrap::join`]
/// once. [`run_ranks`] is built on it, and so is anything that starts its rank threads itself
/// (the serving engine's).
///
/// Over several processes ([`HcclBootstrap::on_nodes`]) this process's ranks are global ranks
/// `base..base + devices.len()` of the group's world, and the root info comes from node 0 over
/// the group's TCP connections. With an HCCL rank table ([`HcclBootstrap::from_rank_table`]) the
/// ranks join with `HcclCommInitClusterInfo` instead, after the same readiness gate.
pub struct HcclBootstrap {
    gate: Gate,
    devices: Vec<i32>,
    /// This process's first global rank and the world over every process.
    base: usize,
    world: usize,
    /// How the ranks join: None for the root info, else the rank table.
    table: Option<TableJoin>,
}

/// The rank-table route: the path HCCL reads and what dsv4 read of it.
struct TableJoin {
    path: CString,
    table: RankTable,
}

/// HCCL's root info as bytes (what crosses the nodes' connections).
fn root_bytes(root: &HcclRootInfo) -> Vec<u8> {
    root.internal.iter().map(|&b| b as u8).collect()
}

/// Bytes from node 0 back into a root info.
fn root_from(bytes: &[u8]) -> std::result::Result<HcclRootInfo, String> {
    if bytes.len() != std::mem::size_of::<HcclRootInfo>() {
        return Err(format!(
            "node 0 sent a {}-byte root info, not HCCL's {} (was it given a rank table, and this node not?)",
            bytes.len(),
            std::mem::size_of::<HcclRootInfo>()
        ));
    }
    let mut root = HcclRootInfo::default();
    for (d, b) in root.internal.iter_mut().zip(bytes) {
        *d = *b as _;
    }
    Ok(root)
}

/// Physical NPU ids, as a rank table's `device_id`s give them, of this process's device ids
/// `devices` (what `--devices` and `aclrtSetDevice` take): see [`physical_ids`].
pub fn physical_devices(devices: &[i32], visible: Option<&str>) -> Result<Vec<usize>> {
    let all = physical_ids(visible)?;
    devices
        .iter()
        .map(|&d| {
            usize::try_from(d).ok().and_then(|i| all.get(i).copied()).ok_or_else(|| {
                Error::config("devices", format!("device {d} is not one of this process's {} device(s)", all.len()))
            })
        })
        .collect()
}

/// For every device id of this process (0..aclrtGetDeviceCount), its physical NPU id: through
/// `visible` (the value of `ASCEND_RT_VISIBLE_DEVICES`: device id i is its i-th entry, a logical
/// id; else the same id), then through the runtime's `aclrtGetPhyDevIdByLogicDevId` (inside a
/// container the logical ids are renumbered from 0 and differ from the physical ones; outside
/// they are equal; hicann/runtime `docs/api_docs/aclrtGetPhyDevIdByLogicDevId.md`). Where the
/// runtime lacks that function (older CANN), logical ids are taken as physical.
pub fn physical_ids(visible: Option<&str>) -> Result<Vec<usize>> {
    let api = dsv4_ascend_sys::runtime().map_err(|e| crate::acl::err(e.to_string()))?;
    let count_of = api.aclrtGetDeviceCount().map_err(|e| crate::acl::err(e.to_string()))?;
    let mut count = 0u32;
    // SAFETY: out-pointer to a local.
    crate::acl::check(api, "aclrtGetDeviceCount", unsafe { count_of(&mut count) })?;
    let listed = visible_devices(visible)?;
    (0..count as usize)
        .map(|user| {
            let logical = match &listed {
                None => user,
                Some(l) => *l.get(user).ok_or_else(|| {
                    Error::config("devices", format!("device {user} is not in ASCEND_RT_VISIBLE_DEVICES={visible:?}"))
                })?,
            };
            let Ok(to_physical) = api.aclrtGetPhyDevIdByLogicDevId() else { return Ok(logical) };
            let mut physical = -1i32;
            let id = i32::try_from(logical).map_err(|_| Error::config("devices", format!("{logical} is too large")))?;
            // SAFETY: out-pointer to a local; the runtime is initialised (`runtime()`).
            crate::acl::check(api, "aclrtGetPhyDevIdByLogicDevId", unsafe { to_physical(id, &mut physical) })?;
            usize::try_from(physical)
                .map_err(|_| crate::acl::err(format!("logical NPU {logical} has physical id {physical}")))
        })
        .collect()
}

/// The physical NPU ids `visible` (the value of `ASCEND_RT_VISIBLE_DEVICES`) lists, logical id i
/// being the i-th; `None` when it is unset or empty (logical ids are physical ones).
pub fn visible_devices(visible: Option<&str>) -> Result<Option<Vec<usize>>> {
    let Some(visible) = visible.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(None) };
    visible
        .split(',')
        .map(|x| {
            x.trim().parse().map_err(|_| {
                Error::config("devices", format!("ASCEND_RT_VISIBLE_DEVICES={visible:?} is not a list of ids"))
            })
        })
        .collect::<Result<Vec<usize>>>()
        .map(Some)
}

impl HcclBootstrap {
    /// A world of `devices.len()` ranks, rank r on device `devices[r]`. Loads HCCL now, so a
    /// missing `libhccl.so` is reported before any device is opened.
    pub fn new(devices: &[i32]) -> Result<Self> {
        library()?;
        // Every device exists, checked before any rank opens one and loads (a missing one
        // would otherwise surface from whichever rank thread reached it first, after the others
        // loaded their weights).
        let api = dsv4_ascend_sys::runtime().map_err(|e| crate::acl::err(e.to_string()))?;
        crate::acl::require_devices(api, devices)?;
        Ok(HcclBootstrap {
            gate: Gate { state: Mutex::new(GateState::default()), wake: Condvar::new(), node: None },
            devices: devices.to_vec(),
            base: 0,
            world: devices.len(),
            table: None,
        })
    }

    /// The world of the HCCL rank table at `path` (`RANK_TABLE_FILE`): this process's local rank
    /// r (global rank `node.base() + r`, or r without `node`) on device `devices[r]` joins with
    /// `HcclCommInitClusterInfo(path, global rank)`. The table is read and checked against the
    /// run first ([`RankTable::check_run`]: server i of its `server_list` is node i, this node's
    /// devices, through `ASCEND_RT_VISIBLE_DEVICES`, are its server's in rank order), so a wrong
    /// table fails here, naming the file and the field, before any device opens. Over several
    /// processes the nodes still meet over `node`'s connections; node 0 sends what it read of
    /// the table instead of a root info, and a node whose table differs fails every node.
    pub fn from_rank_table(path: &Path, devices: &[i32], node: Option<Arc<NodeGroup>>) -> Result<Self> {
        let table = RankTable::read(path)?;
        let (nnodes, node_rank) = node.as_ref().map_or((1, 0), |n| (n.nnodes(), n.node_rank()));
        let visible = std::env::var("ASCEND_RT_VISIBLE_DEVICES").ok();
        let listed = visible_devices(visible.as_deref())?;
        table.check_run_visible(
            nnodes,
            node_rank,
            &physical_devices(devices, visible.as_deref())?,
            listed.as_deref(),
        )?;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Input(format!("rank table {}: the path contains a NUL byte", path.display())))?;
        let mut boot = match node {
            Some(node) => HcclBootstrap::on_nodes(devices, node)?,
            None => HcclBootstrap::new(devices)?,
        };
        if table.world() != boot.world {
            return Err(Error::Input(format!(
                "rank table {}: {} ranks, but the run has {}",
                path.display(),
                table.world(),
                boot.world
            )));
        }
        boot.table = Some(TableJoin { path: c_path, table });
        Ok(boot)
    }

    /// This process's part of a world over the processes of `node`: its local rank r (global
    /// rank `node.base() + r`) on device `devices[r]`. `devices.len()` must be the group's ranks
    /// per process.
    pub fn on_nodes(devices: &[i32], node: Arc<NodeGroup>) -> Result<Self> {
        if devices.len() != node.local_ranks() {
            return Err(Error::config(
                "devices",
                format!("{} devices for a node of {} ranks", devices.len(), node.local_ranks()),
            ));
        }
        library()?;
        let (base, world) = (node.base(), node.world());
        Ok(HcclBootstrap {
            gate: Gate { state: Mutex::new(GateState::default()), wake: Condvar::new(), node: Some(node) },
            devices: devices.to_vec(),
            base,
            world,
            table: None,
        })
    }

    /// The global rank of this process's local rank `local`.
    pub fn global_rank(&self, local: usize) -> usize {
        self.base + local
    }

    /// On local rank `rank`'s thread: opens its device and joins the world. If any rank fails
    /// before joining (here, or by dropping out: an error or a panic on its thread before it
    /// calls this; on any node), every rank's `join` fails instead of waiting in
    /// `HcclCommInitRootInfo`.
    pub fn join(&self, rank: usize) -> Result<(AscendBackend, HcclCommunicator)> {
        let (global, world, local) = (self.base + rank, self.world, self.devices.len());
        let mut arrival = Arrival { gate: &self.gate, rank: global, world, local, done: false };
        let opened = usize::try_from(self.devices[rank])
            .map_err(|_| err(format!("device {} is not a device index", self.devices[rank])))
            .and_then(crate::open)
            .and_then(|be| {
                let token = match (global, &self.table) {
                    (0, None) => Some(root_bytes(&HcclCommunicator::root_info(&be, world)?)),
                    (0, Some(t)) => Some(t.table.fingerprint().into_bytes()),
                    _ => None,
                };
                Ok((be, token))
            });
        let report = match &opened {
            Ok((_, token)) => Ok(token.clone()),
            Err(e) => Err(e.to_string()),
        };
        arrival.done = true;
        let token = self.gate.arrive(global, world, local, report);
        let (be, _) = opened?;
        let token = token?;
        let comm_err = |msg: String| Error::Comm { rank: global, size: world, msg };
        let comm = match &self.table {
            None => HcclCommunicator::init_rank(&be, &root_from(&token).map_err(comm_err)?, global, world)?,
            Some(t) => {
                let mine = t.table.fingerprint();
                if token != mine.as_bytes() {
                    return Err(comm_err(format!(
                        "node 0 read another rank table than this node's {} (node 0: {:?}; here: {mine:?})",
                        t.table.path.display(),
                        String::from_utf8_lossy(&token)
                    )));
                }
                HcclCommunicator::init_rank_from_table(&be, &t.path, global, world)?
            }
        };
        Ok((be, comm))
    }

    /// Reports local rank `rank` failed before joining (e.g. a build step before `join`
    /// failed), so the others do not wait for it.
    pub fn abandon(&self, rank: usize, why: &str) {
        let _ = self.gate.arrive(self.base + rank, self.world, self.devices.len(), Err(why.to_string()));
    }
}

/// Runs `f(backend, context)` for every rank of `layout` on its own thread: rank r opens device
/// `devices[r]` (an index into the visible devices), rank 0 makes the HCCL root info and hands it
/// to the others in-process, every rank joins the world communicator (`HcclCommInitRootInfo`),
/// splits its TP and EP groups ([`RankContext::new`]) and runs `f`. Results in rank order.
///
/// Like [`dsv4_core::parallel::run_local`], a failing rank ends the run with its own error: a
/// rank that fails before the communicator exists stops the others before they join it, and
/// after that the error returned is the first one to happen (a peer's consequential failure
/// comes later). HCCL is loaded before any device is opened, so a missing `libhccl.so` is
/// reported at once.
pub fn run_ranks<T, E, F>(devices: &[i32], layout: ParallelLayout, f: F) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&AscendBackend, RankContext<AscendBackend>) -> std::result::Result<T, E> + Sync,
{
    if devices.len() != layout.world {
        return Err(E::from(Error::config(
            "devices",
            format!("{} devices for a layout of {} ranks", devices.len(), layout.world),
        )));
    }
    let boot = HcclBootstrap::new(devices).map_err(E::from)?;
    run_bootstrapped(&boot, layout, f)
}

/// [`run_ranks`] for this process's part of a run over several processes: `devices` are this
/// node's (local rank r on `devices[r]`, global rank `node.base() + r`), `layout` is the whole
/// world's (`node.world()` ranks), and the root info comes from node 0 over `node`'s
/// connections. Returns this process's ranks' results, in rank order.
pub fn run_node_ranks<T, E, F>(
    devices: &[i32],
    layout: ParallelLayout,
    node: Arc<NodeGroup>,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&AscendBackend, RankContext<AscendBackend>) -> std::result::Result<T, E> + Sync,
{
    if layout.world != node.world() {
        return Err(E::from(Error::config(
            "devices",
            format!("a layout of {} ranks over nodes of {} ranks in all", layout.world, node.world()),
        )));
    }
    let boot = HcclBootstrap::on_nodes(devices, node).map_err(E::from)?;
    run_bootstrapped(&boot, layout, f)
}

/// [`run_ranks`] / [`run_node_ranks`] over a bootstrap made beforehand (e.g.
/// [`HcclBootstrap::from_rank_table`]): this process's ranks, in rank order. `layout` is the
/// whole world's.
pub fn run_bootstrapped<T, E, F>(boot: &HcclBootstrap, layout: ParallelLayout, f: F) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&AscendBackend, RankContext<AscendBackend>) -> std::result::Result<T, E> + Sync,
{
    if layout.world != boot.world {
        return Err(E::from(Error::config(
            "devices",
            format!("a layout of {} ranks for a world of {} ranks", layout.world, boot.world),
        )));
    }
    let local = boot.devices.len();
    let order = AtomicUsize::new(0);
    let results = run_threads(local, |rank| -> std::result::Result<_, E> {
        let failed = |e: E| (Some(order.fetch_add(1, Ordering::SeqCst)), Err(e));
        let (be, comm) = match boot.join(rank) {
            Ok(x) => x,
            Err(e) => return Ok(failed(E::from(e))),
        };
        let out = RankContext::new(layout.rank(boot.global_rank(rank)), &comm as &dyn Communicator<AscendBackend>)
            .map_err(E::from)
            .and_then(|ctx| f(&be, ctx));
        // The failure is ordered before this rank's communicators are destroyed (which is what
        // makes its peers fail).
        let out = match out {
            Ok(v) => (None, Ok(v)),
            Err(e) => failed(e),
        };
        drop(comm);
        drop(be);
        Ok(out)
    })?;
    let mut out = Vec::with_capacity(local);
    let mut errors = vec![];
    for (seq, r) in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => errors.push((seq.unwrap_or(usize::MAX), e)),
        }
    }
    if errors.is_empty() {
        return Ok(out);
    }
    // The cause: the first failure that is not a report of another rank leaving.
    let left = |e: &E| e.to_string().contains(" left the communicator");
    errors.sort_by_key(|(seq, e)| (left(e), *seq));
    Err(errors.swap_remove(0).1)
}
