//! Emulated NCCL: [`EmuComm`], a member of a communicator between [`EmulatedDevice`]s of one
//! process, implementing the CUDA backend's [`DeviceComm`] with NCCL's semantics, so that the
//! backend's communicator runs its multi-rank path in CI without a GPU or libnccl.
//!
//! # What is emulated
//!
//! * `ncclCommInitAll` ([`EmuComm::world`]): one member per device, rank `r` on `devices[r]`;
//!   the devices must be distinct.
//! * `ncclAllReduce` (f32 sum), `ncclAllGather` and `ncclBroadcast` (bytes),
//!   `ncclReduceScatter` (f32 sum), a group of `ncclSend`/`ncclRecv`, and `ncclCommSplit`: the
//!   methods of [`DeviceComm`], whose docs give the semantics.
//!
//! The members are meant to be driven from different threads, one per rank, as NCCL's ranks
//! are driven by different processes or threads.
//!
//! # How a call runs
//!
//! A call first validates its arguments on the calling member (below). It then reads its send
//! bytes into host memory under its device's stream lock (in stream order, after the work the
//! thread queued before), and *posts* them with a description of the call into its slot of the
//! group's current step. The last member to arrive *completes* the step: it checks that every
//! member made the same call with matching sizes (and root), and wakes the others. Every member
//! then computes its own result from the posts, with the same code, and writes it into its
//! receive range under its own device's stream lock. f32 sums are taken in rank order
//! (rank 0's value + rank 1's + …), so every rank gets the same bits. Steps are numbered by a
//! generation counter; one retained completed step is enough, as a member posts to the next
//! step only after it has taken its copy of the previous one.
//!
//! # What is checked
//!
//! On the calling member, before it posts:
//! * the `dev` passed is the member's own device, and every buffer belongs to it;
//! * every span lies inside its buffer;
//! * sizes are consistent: all-reduce `send.bytes == recv.bytes`, a multiple of 4;
//!   all-gather `recv.bytes == size · send.bytes`; reduce-scatter
//!   `send.bytes == size · recv.bytes`, `recv.bytes` a multiple of 4; broadcast
//!   `root < size` and, on the root, `send.bytes == recv.bytes` (a non-root's `send` is not
//!   read, so it is not checked, as NCCL ignores it); every transfer's peer `< size`;
//! * overlaps that NCCL leaves undefined: a send and a receive range that overlap in one buffer
//!   are refused unless they are NCCL's in-place layout (the same range for all-reduce and
//!   broadcast; `send` = part `rank` of `recv` for all-gather; `recv` = part `rank` of `send`
//!   for reduce-scatter); in a send/receive group, receive ranges must not overlap each other
//!   or a send range.
//!
//! Invalid arguments fail the call on that member *and* poison the group at that step, so that
//! the other members fail there too (naming the rank and its bad argument) instead of waiting
//! for a call that will never come (NCCL would hang).
//!
//! By the completing member, identically for every member: that all made the same NCCL call,
//! with the same counts (and root); for a send/receive group, that every send from rank a to
//! rank b is matched, in order per pair of ranks, by a receive on b from a of the same byte
//! count (zero-byte transfers included: they need their zero-byte partner). A mismatch fails
//! the call on every member with one message listing every rank's call.
//!
//! # Failures
//!
//! Nothing hangs or panics. Errors are [`Error::Comm`] and their messages name the NCCL
//! function emulated ("ncclAllReduce: …"). A failure poisons the group: every member waiting
//! in that step fails with the reason, a member arriving at it later gets the same message at
//! once, and every later call fails at once with "`<function>` refused: the communicator failed
//! earlier: `<reason>`". Besides the checks above, failures are:
//! * a member that leaves: dropping an [`EmuComm`] (its thread ended or panicked) poisons its
//!   group, so the members waiting for it fail promptly with "rank r left the communicator";
//! * a timeout: a member that waited [`EmuComm::timeout`] (from
//!   [`dsv4_core::parallel::local::default_timeout`], `DSV4_COMM_TIMEOUT_S`) for its peers
//!   fails naming the ranks that did not arrive.
//!
//! A call that completed stays a success even if the group fails before a waiter wakes.
//! Communicators made by `split` are independent of their parent: dropping or poisoning one
//! leaves the other working.
//!
//! # What is not emulated
//!
//! * Asynchrony: on a GPU a NCCL call is enqueued on the stream and returns at once; here it
//!   completes (every rank's data exchanged and written) before it returns.
//! * The stream is not held while a member waits for its peers: work another thread queues on
//!   the same device between the read of the send bytes and the write of the result runs in
//!   between, where on a GPU it would run after the collective.
//! * NCCL's reduction order: NCCL sums along rings or trees, in an order that depends on the
//!   algorithm, topology and size; here the order is always rank order. Both give the same
//!   bits on every rank, but not the same bits as each other.
//! * Anything beyond the calls above: other data types and operations, `NCCL_SPLIT_NOCOLOR`,
//!   asynchronous error queries and `ncclCommAbort` (errors are returned by the failing call),
//!   multi-process bootstrap (`ncclGetUniqueId`/`ncclCommInitRank`).

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dsv4_backend_cuda::collective::{DeviceComm, InitByUniqueId, Span, Transfer};
use dsv4_core::error::{Error, Result};
use dsv4_core::parallel::local::default_timeout;

use crate::{in_range, EmuBuffer, EmulatedDevice};

const ALL_REDUCE: &str = "ncclAllReduce";
const ALL_GATHER: &str = "ncclAllGather";
const REDUCE_SCATTER: &str = "ncclReduceScatter";
const BROADCAST: &str = "ncclBroadcast";
const SEND_RECV: &str = "ncclSend/ncclRecv";
const SPLIT: &str = "ncclCommSplit";
const INIT_ALL: &str = "ncclCommInitAll";

/// One member (rank) of an emulated NCCL communicator, bound to one [`EmulatedDevice`].
/// `Send + Sync`: move it into the rank's thread; dropping it tells the other members that
/// this rank has left.
pub struct EmuComm {
    group: Arc<Group>,
    rank: usize,
    /// The id of the member's `EmulatedDevice`.
    device: u64,
}

/// The state the members of one communicator share.
struct Group {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    /// Signalled when a step completes and when the group is poisoned.
    wake: Condvar,
}

struct State {
    /// The step being collected (steps completed so far).
    generation: u64,
    /// Each member's post to the current step.
    slots: Vec<Option<Post>>,
    /// Members that have posted to the current step.
    arrived: usize,
    /// The last completed step, until every waiter has taken its copy.
    done: Option<Arc<Exchange>>,
    /// Waiters of the last step that have not taken `done` yet.
    unread: usize,
    /// Why the group can no longer run calls, and the step it failed in; set once.
    poison: Option<(Poison, u64)>,
    /// Calls each member has entered (its next call is step `calls[rank]`), to tell a member
    /// arriving at the step that failed from one calling after it.
    calls: Vec<u64>,
}

impl State {
    /// Poisons the group unless it already failed (the first reason wins).
    fn set_poison(&mut self, poison: Poison) {
        if self.poison.is_none() {
            self.poison = Some((poison, self.generation));
        }
    }
}

/// What one member called, with the arguments the others must agree with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// `bytes` = `4 · count`.
    AllReduce {
        bytes: usize,
    },
    /// `bytes` = the send count.
    AllGather {
        bytes: usize,
    },
    /// `bytes` = `4 · recvcount`.
    ReduceScatter {
        bytes: usize,
    },
    Broadcast {
        bytes: usize,
        root: usize,
    },
    /// `(peer, bytes)` of every send and every receive, in the order given.
    SendRecv {
        sends: Vec<(usize, usize)>,
        recvs: Vec<(usize, usize)>,
    },
    Split {
        colour: usize,
        key: usize,
    },
}

impl Call {
    /// The NCCL function emulated.
    fn function(&self) -> &'static str {
        match self {
            Call::AllReduce { .. } => ALL_REDUCE,
            Call::AllGather { .. } => ALL_GATHER,
            Call::ReduceScatter { .. } => REDUCE_SCATTER,
            Call::Broadcast { .. } => BROADCAST,
            Call::SendRecv { .. } => SEND_RECV,
            Call::Split { .. } => SPLIT,
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transfers = |list: &[(usize, usize)], dir: &str| {
            if list.is_empty() {
                "none".to_string()
            } else {
                list.iter()
                    .map(|(peer, bytes)| format!("{bytes} bytes {dir} rank {peer}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        match self {
            Call::AllReduce { bytes } => write!(f, "{ALL_REDUCE}(count {} f32)", bytes / 4),
            Call::AllGather { bytes } => write!(f, "{ALL_GATHER}(sendcount {bytes} bytes)"),
            Call::ReduceScatter { bytes } => write!(f, "{REDUCE_SCATTER}(recvcount {} f32)", bytes / 4),
            Call::Broadcast { bytes, root } => write!(f, "{BROADCAST}(count {bytes} bytes, root {root})"),
            Call::SendRecv { sends, recvs } => {
                write!(f, "{SEND_RECV}(sends: {}; receives: {})", transfers(sends, "to"), transfers(recvs, "from"))
            }
            Call::Split { colour, key } => write!(f, "{SPLIT}(colour {colour}, key {key})"),
        }
    }
}

/// One member's contribution to a step: its call and the bytes it sends (one vector for a
/// collective, none on a broadcast's non-root or for a split, one per send of a group).
struct Post {
    call: Call,
    data: Vec<Vec<u8>>,
}

/// A completed step: every member's post, in rank order.
struct Exchange {
    posts: Vec<Post>,
    /// For a split: each member's new group and its rank there.
    split: Vec<(Arc<Group>, usize)>,
}

enum Poison {
    /// The rank whose `EmuComm` was dropped.
    Left(usize),
    /// Any other failure, described once for every member.
    Failed(String),
}

impl Poison {
    /// The message for a member that was waiting in (or arrives at) the step that failed,
    /// calling `function`.
    fn during(&self, function: &str) -> String {
        match self {
            Poison::Left(r) => format!("{function}: rank {r} left the communicator (its EmuComm was dropped)"),
            Poison::Failed(msg) => msg.clone(),
        }
    }

    /// The message for a member that calls `function` at a step after the one that failed.
    fn earlier(&self, function: &str) -> String {
        let why = match self {
            Poison::Left(r) => format!("rank {r} left the communicator (its EmuComm was dropped)"),
            Poison::Failed(msg) => msg.clone(),
        };
        format!("{function} refused: the communicator failed earlier: {why}")
    }
}

impl Group {
    fn new(size: usize, timeout: Duration) -> Arc<Group> {
        Arc::new(Group {
            size,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                slots: (0..size).map(|_| None).collect(),
                arrived: 0,
                done: None,
                unread: 0,
                poison: None,
                calls: vec![0; size],
            }),
            wake: Condvar::new(),
        })
    }

    /// The state, also after a thread panicked holding the lock: every update is complete
    /// before anything that could panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn poison(&self, poison: Poison) {
        self.lock().set_poison(poison);
        self.wake.notify_all();
    }
}

impl EmuComm {
    /// `ncclCommInitAll`: a communicator over `devices`, member `r` on `devices[r]`, with the
    /// [`default_timeout`]. The devices must be distinct and there must be at least one.
    pub fn world(devices: &[&EmulatedDevice]) -> Result<Vec<EmuComm>> {
        Self::world_with_timeout(devices, default_timeout())
    }

    /// As [`EmuComm::world`], with calls failing after waiting `timeout` for their peers
    /// (for tests, instead of setting `DSV4_COMM_TIMEOUT_S`).
    pub fn world_with_timeout(devices: &[&EmulatedDevice], timeout: Duration) -> Result<Vec<EmuComm>> {
        let size = devices.len();
        if size == 0 {
            return Err(Error::Comm { rank: 0, size: 0, msg: format!("{INIT_ALL}: no devices (ndev must be ≥ 1)") });
        }
        for (r, d) in devices.iter().enumerate() {
            if let Some(first) = devices[..r].iter().position(|e| e.id == d.id) {
                return Err(Error::Comm {
                    rank: r,
                    size,
                    msg: format!(
                        "{INIT_ALL}: devices[{first}] and devices[{r}] are the same device (emulated device {}); \
                         every rank needs its own",
                        d.id
                    ),
                });
            }
        }
        let group = Group::new(size, timeout);
        Ok(devices.iter().enumerate().map(|(rank, d)| EmuComm { group: group.clone(), rank, device: d.id }).collect())
    }

    /// How long a call waits for its peers.
    pub fn timeout(&self) -> Duration {
        self.group.timeout
    }

    fn error(&self, msg: String) -> Error {
        Error::Comm { rank: self.rank, size: self.group.size, msg }
    }

    /// A failure found on this member after its call took part in the step: poisons the group
    /// so that the others' later calls fail.
    fn fail(&self, msg: String) -> Error {
        self.group.poison(Poison::Failed(msg.clone()));
        self.error(msg)
    }

    /// A failure found on this member before it posted its call of `function`: counts the
    /// call as this member's step and poisons the group at that step, so that the others fail
    /// in it too (at once if they are waiting in it or arrive later). If the group had already
    /// failed, the call fails as any call after a failure does.
    fn fail_unposted(&self, function: &str, msg: String) -> Error {
        let mut st = self.group.lock();
        let step = st.calls[self.rank];
        st.calls[self.rank] += 1;
        if let Some((p, failed_at)) = &st.poison {
            let msg = if step == *failed_at { p.during(function) } else { p.earlier(function) };
            return self.error(msg);
        }
        st.set_poison(Poison::Failed(msg.clone()));
        drop(st);
        self.group.wake.notify_all();
        self.error(msg)
    }

    /// Invalid arguments to `function` on this member (they poison the group).
    fn invalid(&self, function: &str, what: String) -> Error {
        self.fail_unposted(function, format!("{function}: rank {} called it with invalid arguments: {what}", self.rank))
    }

    /// `dev` is this member's device.
    fn check_device(&self, function: &str, dev: &EmulatedDevice) -> Result<()> {
        if dev.id == self.device {
            Ok(())
        } else {
            Err(self.invalid(
                function,
                format!(
                    "it was given emulated device {}, but this member belongs to emulated device {}",
                    dev.id, self.device
                ),
            ))
        }
    }

    /// `buf` belongs to this member's device.
    fn check_buffer(&self, function: &str, name: &str, buf: &EmuBuffer) -> Result<()> {
        if buf.device() == self.device {
            Ok(())
        } else {
            Err(self.invalid(
                function,
                format!(
                    "the {name} buffer ({} bytes) belongs to emulated device {}, not to this member's device {}",
                    buf.len(),
                    buf.device(),
                    self.device
                ),
            ))
        }
    }

    /// `bytes` bytes at `offset` lie inside `buf`.
    fn check_range(&self, function: &str, name: &str, buf: &EmuBuffer, offset: usize, bytes: usize) -> Result<()> {
        if in_range(offset, bytes, buf.len()) {
            Ok(())
        } else {
            Err(self.invalid(
                function,
                format!(
                    "{name}: {bytes} bytes at offset {offset} run past the end of its buffer of {} bytes",
                    buf.len()
                ),
            ))
        }
    }

    /// `span` is of this member's device and inside its buffer.
    fn check_span(&self, function: &str, name: &str, span: Span<'_, EmuBuffer>) -> Result<()> {
        self.check_buffer(function, name, span.buf)?;
        self.check_range(function, name, span.buf, span.offset, span.bytes)
    }

    /// `send` and `recv` do not overlap, or only as NCCL's in-place layout (`in_place`, the
    /// caller's test of it; `layout` describes it).
    fn check_overlap(
        &self,
        function: &str,
        send: Span<'_, EmuBuffer>,
        recv: Span<'_, EmuBuffer>,
        in_place: bool,
        layout: &str,
    ) -> Result<()> {
        if in_place || !overlap(send.buf, (send.offset, send.bytes), recv.buf, (recv.offset, recv.bytes)) {
            return Ok(());
        }
        Err(self.invalid(
            function,
            format!(
                "send [{}, {}) and recv [{}, {}) overlap in one buffer, which NCCL leaves undefined unless {layout}",
                send.offset,
                send.offset + send.bytes,
                recv.offset,
                recv.offset + recv.bytes
            ),
        ))
    }

    /// Reads `ranges` of `buf` in stream order (already validated).
    fn read(
        &self,
        function: &str,
        dev: &EmulatedDevice,
        buf: &EmuBuffer,
        ranges: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        dev.read_ranges(function, buf, ranges).map_err(|e| {
            self.fail_unposted(function, format!("{function}: rank {}: reading the send buffer failed: {e}", self.rank))
        })
    }

    /// Writes `ranges` into `buf` in stream order (already validated).
    fn write(&self, function: &str, dev: &EmulatedDevice, buf: &EmuBuffer, ranges: &[(usize, &[u8])]) -> Result<()> {
        dev.write_ranges(function, buf, ranges).map_err(|e| {
            self.fail(format!("{function}: rank {}: writing the result into the recv buffer failed: {e}", self.rank))
        })
    }

    /// Posts this member's call and waits until every member has posted to the same step,
    /// then returns the completed step (or the reason the group failed).
    fn exchange(&self, post: Post) -> Result<Arc<Exchange>> {
        let group = &*self.group;
        let function = post.call.function();
        let mut st = group.lock();
        let step = st.calls[self.rank];
        st.calls[self.rank] += 1;
        if let Some((p, failed_at)) = &st.poison {
            let msg = if step == *failed_at { p.during(function) } else { p.earlier(function) };
            return Err(self.error(msg));
        }
        if let Some(pending) = &st.slots[self.rank] {
            // Only possible when two threads share this member and call at once.
            let msg = format!(
                "{function}: rank {} called it while its {} has not completed (two threads used the same member \
                 at once)",
                self.rank,
                pending.call.function()
            );
            st.set_poison(Poison::Failed(msg.clone()));
            drop(st);
            group.wake.notify_all();
            return Err(self.error(msg));
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(post);
        st.arrived += 1;

        if st.arrived == group.size {
            // This member completes the step.
            let posts: Vec<Post> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.arrived = 0;
            return match complete(posts, group.timeout) {
                Ok(ex) => {
                    let ex = Arc::new(ex);
                    st.generation += 1;
                    st.unread = group.size - 1;
                    st.done = (st.unread > 0).then(|| ex.clone());
                    drop(st);
                    group.wake.notify_all();
                    Ok(ex)
                }
                Err(msg) => {
                    st.set_poison(Poison::Failed(msg.clone()));
                    drop(st);
                    group.wake.notify_all();
                    Err(self.error(msg))
                }
            };
        }

        let deadline = Instant::now() + group.timeout;
        loop {
            // Completion first: a step that completed stays a success even if the group was
            // poisoned before this member woke up.
            if st.generation != generation {
                let Some(ex) = st.done.clone() else {
                    let msg = format!("{function}: internal error: the completed step is gone");
                    st.set_poison(Poison::Failed(msg.clone()));
                    drop(st);
                    group.wake.notify_all();
                    return Err(self.error(msg));
                };
                st.unread -= 1;
                if st.unread == 0 {
                    st.done = None;
                }
                return Ok(ex);
            }
            if let Some((p, _)) = &st.poison {
                return Err(self.error(p.during(function)));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..group.size).filter(|&r| st.slots[r].is_none()).collect();
                let present: Vec<usize> = (0..group.size).filter(|&r| st.slots[r].is_some()).collect();
                let msg = format!(
                    "{function}: timed out after {:?} waiting for the other ranks: {} did not arrive at this step \
                     ({} did)",
                    group.timeout,
                    ranks(&missing),
                    ranks(&present)
                );
                st.set_poison(Poison::Failed(msg.clone()));
                drop(st);
                group.wake.notify_all();
                return Err(self.error(msg));
            }
            st = group.wake.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Drop for EmuComm {
    /// This member leaves: the others' pending and later calls fail.
    fn drop(&mut self) {
        self.group.poison(Poison::Left(self.rank));
    }
}

impl fmt::Debug for EmuComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmuComm")
            .field("rank", &self.rank)
            .field("size", &self.group.size)
            .field("device", &self.device)
            .field("timeout", &self.group.timeout)
            .finish()
    }
}

/// Whether the non-empty ranges `a` of `abuf` and `b` of `bbuf` share a byte.
fn overlap(abuf: &EmuBuffer, a: (usize, usize), bbuf: &EmuBuffer, b: (usize, usize)) -> bool {
    abuf.same(bbuf) && a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// "rank 2" / "ranks 0, 1 and 3" / "no rank".
fn ranks(list: &[usize]) -> String {
    match list {
        [] => "no rank".into(),
        [r] => format!("rank {r}"),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|r| r.to_string()).collect();
            format!("ranks {} and {last}", init.join(", "))
        }
    }
}

/// "rank 0 <call>, rank 1 <call>, …": every rank's call, for a message every rank reports.
fn calls(posts: &[Post]) -> String {
    posts.iter().enumerate().map(|(r, p)| format!("rank {r} {}", p.call)).collect::<Vec<_>>().join(", ")
}

/// Checks that the posts of one step fit together and builds the completed step; the error is
/// the message every member reports.
fn complete(posts: Vec<Post>, timeout: Duration) -> Result<Exchange, String> {
    let function = posts[0].call.function();
    if posts.iter().any(|p| p.call.function() != function) {
        return Err(format!("the ranks made different NCCL calls at the same step: {}", calls(&posts)));
    }
    let mut split = Vec::new();
    match &posts[0].call {
        Call::AllReduce { .. } | Call::AllGather { .. } | Call::ReduceScatter { .. } => {
            if posts.iter().any(|p| p.call != posts[0].call) {
                return Err(format!("{function}: the ranks' counts differ: {}", calls(&posts)));
            }
        }
        Call::Broadcast { root, .. } => {
            if posts.iter().any(|p| !matches!(p.call, Call::Broadcast { root: r, .. } if r == *root)) {
                return Err(format!("{function}: the ranks disagree on the root: {}", calls(&posts)));
            }
            if posts.iter().any(|p| p.call != posts[0].call) {
                return Err(format!("{function}: the ranks' counts differ: {}", calls(&posts)));
            }
        }
        Call::SendRecv { .. } => {
            let transfers = |r: usize| match &posts[r].call {
                Call::SendRecv { sends, recvs } => (sends.as_slice(), recvs.as_slice()),
                _ => (&[][..], &[][..]),
            };
            let n = posts.len();
            let mut problems = Vec::new();
            for a in 0..n {
                for b in 0..n {
                    let sent: Vec<usize> = transfers(a).0.iter().filter(|t| t.0 == b).map(|t| t.1).collect();
                    let received: Vec<usize> = transfers(b).1.iter().filter(|t| t.0 == a).map(|t| t.1).collect();
                    if sent != received {
                        problems.push(format!(
                            "rank {a} sends {sent:?} bytes to rank {b}, which receives {received:?} bytes from rank {a}"
                        ));
                    }
                }
            }
            if !problems.is_empty() {
                return Err(format!(
                    "{function}: sends and receives do not match (in order per pair of ranks): {}; the calls: {}",
                    problems.join("; "),
                    calls(&posts)
                ));
            }
        }
        Call::Split { .. } => {
            let of = |p: &Post| match p.call {
                Call::Split { colour, key } => (colour, key),
                _ => (usize::MAX, usize::MAX),
            };
            let mut slots: Vec<Option<(Arc<Group>, usize)>> = vec![None; posts.len()];
            let mut colours: Vec<usize> = posts.iter().map(|p| of(p).0).collect();
            colours.sort_unstable();
            colours.dedup();
            for colour in colours {
                // The members of this colour, ranked by (key, rank).
                let mut members: Vec<(usize, usize)> =
                    posts.iter().enumerate().filter(|(_, p)| of(p).0 == colour).map(|(r, p)| (of(p).1, r)).collect();
                members.sort_unstable();
                let group = Group::new(members.len(), timeout);
                for (new_rank, &(_, r)) in members.iter().enumerate() {
                    slots[r] = Some((group.clone(), new_rank));
                }
            }
            split = slots.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| {
                format!("{function}: internal error: a rank got no new communicator: {}", calls(&posts))
            })?;
        }
    }
    Ok(Exchange { posts, split })
}

fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
}

/// The elementwise f32 sum of `parts` (equal lengths, multiples of 4) in their order: part 0's
/// value + part 1's + …, as little-endian bytes.
fn sum_f32<'a>(mut parts: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let Some(first) = parts.next() else { return Vec::new() };
    let mut acc: Vec<f32> = (0..first.len() / 4).map(|i| f32_at(first, i)).collect();
    for p in parts {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += f32_at(p, i);
        }
    }
    acc.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl DeviceComm<EmulatedDevice> for EmuComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum_f32(
        &self,
        dev: &EmulatedDevice,
        send: Span<'_, EmuBuffer>,
        recv: Span<'_, EmuBuffer>,
    ) -> Result<()> {
        let f = ALL_REDUCE;
        self.check_device(f, dev)?;
        self.check_span(f, "send", send)?;
        self.check_span(f, "recv", recv)?;
        if send.bytes != recv.bytes || !recv.bytes.is_multiple_of(4) {
            return Err(self.invalid(
                f,
                format!(
                    "send is {} bytes and recv {} bytes; both must be 4·count bytes for one count",
                    send.bytes, recv.bytes
                ),
            ));
        }
        self.check_overlap(f, send, recv, send.offset == recv.offset, "they are the same range")?;
        let data = self.read(f, dev, send.buf, &[(send.offset, send.bytes)])?;
        let ex = self.exchange(Post { call: Call::AllReduce { bytes: send.bytes }, data })?;
        let sum = sum_f32(ex.posts.iter().map(|p| p.data[0].as_slice()));
        self.write(f, dev, recv.buf, &[(recv.offset, &sum)])
    }

    fn all_gather_bytes(
        &self,
        dev: &EmulatedDevice,
        send: Span<'_, EmuBuffer>,
        recv: Span<'_, EmuBuffer>,
    ) -> Result<()> {
        let f = ALL_GATHER;
        let size = self.group.size;
        self.check_device(f, dev)?;
        self.check_span(f, "send", send)?;
        self.check_span(f, "recv", recv)?;
        if send.bytes.checked_mul(size) != Some(recv.bytes) {
            return Err(self.invalid(
                f,
                format!("recv is {} bytes, not {size} ranks × the {} bytes of send", recv.bytes, send.bytes),
            ));
        }
        let in_place = recv.offset.checked_add(self.rank * send.bytes) == Some(send.offset);
        self.check_overlap(f, send, recv, in_place, "send is part `rank` of recv (in place)")?;
        let data = self.read(f, dev, send.buf, &[(send.offset, send.bytes)])?;
        let ex = self.exchange(Post { call: Call::AllGather { bytes: send.bytes }, data })?;
        let ranges: Vec<(usize, &[u8])> =
            ex.posts.iter().enumerate().map(|(r, p)| (recv.offset + r * send.bytes, p.data[0].as_slice())).collect();
        self.write(f, dev, recv.buf, &ranges)
    }

    fn reduce_scatter_sum_f32(
        &self,
        dev: &EmulatedDevice,
        send: Span<'_, EmuBuffer>,
        recv: Span<'_, EmuBuffer>,
    ) -> Result<()> {
        let f = REDUCE_SCATTER;
        let size = self.group.size;
        self.check_device(f, dev)?;
        self.check_span(f, "send", send)?;
        self.check_span(f, "recv", recv)?;
        if recv.bytes.checked_mul(size) != Some(send.bytes) || !recv.bytes.is_multiple_of(4) {
            return Err(self.invalid(
                f,
                format!(
                    "send is {} bytes and recv {} bytes; send must be {size} ranks × recv, and recv 4·recvcount bytes",
                    send.bytes, recv.bytes
                ),
            ));
        }
        // In place: recv is part `rank` of send, i.e. send starts `rank · recv.bytes` before it.
        let in_place = send.offset.checked_add(self.rank * recv.bytes) == Some(recv.offset);
        self.check_overlap(f, send, recv, in_place, "recv is part `rank` of send (in place)")?;
        let data = self.read(f, dev, send.buf, &[(send.offset, send.bytes)])?;
        let ex = self.exchange(Post { call: Call::ReduceScatter { bytes: recv.bytes }, data })?;
        let part = self.rank * recv.bytes..(self.rank + 1) * recv.bytes;
        let sum = sum_f32(ex.posts.iter().map(|p| &p.data[0][part.clone()]));
        self.write(f, dev, recv.buf, &[(recv.offset, &sum)])
    }

    fn broadcast_bytes(
        &self,
        dev: &EmulatedDevice,
        send: Span<'_, EmuBuffer>,
        recv: Span<'_, EmuBuffer>,
        root: usize,
    ) -> Result<()> {
        let f = BROADCAST;
        let size = self.group.size;
        self.check_device(f, dev)?;
        if root >= size {
            return Err(self.invalid(f, format!("root {root} is not a rank of this communicator of {size}")));
        }
        self.check_span(f, "recv", recv)?;
        let is_root = self.rank == root;
        let data = if is_root {
            self.check_span(f, "send", send)?;
            if send.bytes != recv.bytes {
                return Err(self.invalid(
                    f,
                    format!(
                        "on the root, send is {} bytes and recv {} bytes; they must be equal",
                        send.bytes, recv.bytes
                    ),
                ));
            }
            self.check_overlap(f, send, recv, send.offset == recv.offset, "they are the same range")?;
            self.read(f, dev, send.buf, &[(send.offset, send.bytes)])?
        } else {
            Vec::new()
        };
        let ex = self.exchange(Post { call: Call::Broadcast { bytes: recv.bytes, root }, data })?;
        self.write(f, dev, recv.buf, &[(recv.offset, ex.posts[root].data[0].as_slice())])
    }

    fn send_recv(
        &self,
        dev: &EmulatedDevice,
        send: &EmuBuffer,
        sends: &[Transfer],
        recv: &EmuBuffer,
        recvs: &[Transfer],
    ) -> Result<()> {
        let f = SEND_RECV;
        let size = self.group.size;
        self.check_device(f, dev)?;
        self.check_buffer(f, "send", send)?;
        self.check_buffer(f, "recv", recv)?;
        for (name, buf, list) in [("send", send, sends), ("recv", recv, recvs)] {
            for (i, t) in list.iter().enumerate() {
                if t.peer >= size {
                    return Err(self.invalid(
                        f,
                        format!("{name} {i} names peer {}, not a rank of this communicator of {size}", t.peer),
                    ));
                }
                self.check_range(f, &format!("{name} {i} (peer {})", t.peer), buf, t.offset, t.bytes)?;
            }
        }
        for (i, a) in recvs.iter().enumerate() {
            for (j, b) in recvs.iter().enumerate().skip(i + 1) {
                if overlap(recv, (a.offset, a.bytes), recv, (b.offset, b.bytes)) {
                    return Err(self.invalid(
                        f,
                        format!(
                            "recv {i} [{}, {}) and recv {j} [{}, {}) overlap (both would write the same bytes)",
                            a.offset,
                            a.offset + a.bytes,
                            b.offset,
                            b.offset + b.bytes
                        ),
                    ));
                }
            }
            for (j, s) in sends.iter().enumerate() {
                if overlap(recv, (a.offset, a.bytes), send, (s.offset, s.bytes)) {
                    return Err(self.invalid(
                        f,
                        format!(
                            "recv {i} [{}, {}) overlaps send {j} [{}, {}) in one buffer, which NCCL leaves undefined",
                            a.offset,
                            a.offset + a.bytes,
                            s.offset,
                            s.offset + s.bytes
                        ),
                    ));
                }
            }
        }
        let ranges: Vec<(usize, usize)> = sends.iter().map(|t| (t.offset, t.bytes)).collect();
        let data = self.read(f, dev, send, &ranges)?;
        let call = Call::SendRecv {
            sends: sends.iter().map(|t| (t.peer, t.bytes)).collect(),
            recvs: recvs.iter().map(|t| (t.peer, t.bytes)).collect(),
        };
        let ex = self.exchange(Post { call, data })?;
        // The k-th receive from rank a is a's k-th send to this rank (matched by `complete`).
        let mut taken = vec![0usize; size];
        let mut writes: Vec<(usize, &[u8])> = Vec::with_capacity(recvs.len());
        for t in recvs {
            let from = &ex.posts[t.peer];
            let Call::SendRecv { sends: theirs, .. } = &from.call else {
                return Err(self.fail(format!("{f}: internal error: a completed step of another call")));
            };
            let k = taken[t.peer];
            taken[t.peer] += 1;
            let Some(index) = theirs.iter().enumerate().filter(|(_, s)| s.0 == self.rank).map(|(i, _)| i).nth(k) else {
                return Err(self.fail(format!("{f}: internal error: an unmatched receive passed the checks")));
            };
            writes.push((t.offset, from.data[index].as_slice()));
        }
        self.write(f, dev, recv, &writes)
    }

    fn split(&self, dev: &EmulatedDevice, colour: usize, key: usize) -> Result<EmuComm> {
        self.check_device(SPLIT, dev)?;
        let ex = self.exchange(Post { call: Call::Split { colour, key }, data: Vec::new() })?;
        let Some((group, rank)) = ex.split.get(self.rank).cloned() else {
            return Err(self.fail(format!("{SPLIT}: internal error: the completed split has no group for this rank")));
        };
        Ok(EmuComm { group, rank, device: self.device })
    }
}

// ------------------------------------------------------------------ init by unique id

const GET_UNIQUE_ID: &str = "ncclGetUniqueId";
const INIT_RANK: &str = "ncclCommInitRank";

/// The ids made by [`EmuComm::unique_id`] whose communicators are not complete yet, and who
/// has joined each. The emulated communicator lives in one process, so the "nodes" of a test
/// are threads of it; what crosses between them is the id's bytes, as between hosts.
static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
/// Signalled when a rank joins.
static JOINED: Condvar = Condvar::new();

struct Pending {
    id: Vec<u8>,
    /// The size the first joining rank gave.
    size: Option<usize>,
    /// Each rank's device once it joined.
    ranks: Vec<Option<u64>>,
    /// Made when the last rank joins.
    group: Option<Arc<Group>>,
    /// Why a rank's join failed: the ranks waiting fail with it (stricter than NCCL, whose
    /// other ranks would wait for ever; the emulator's rule is "fail every rank, never hang").
    failed: Option<String>,
    /// Ranks that took their member of the complete group.
    taken: usize,
    /// When the id was made.
    made: Instant,
}

fn pending() -> MutexGuard<'static, Vec<Pending>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmuComm {
    /// How many ranks have joined the communicator of `id` so far (`None` once it is complete,
    /// given up, or for an id not made here): for tests that need a rank to be waiting.
    pub fn ranks_joined(id: &[u8]) -> Option<usize> {
        pending().iter().find(|p| p.id == id).map(|p| p.ranks.iter().filter(|r| r.is_some()).count())
    }
}

impl InitByUniqueId<EmulatedDevice> for EmuComm {
    /// 128 bytes, as NCCL's: a process-unique counter and the process id, the rest a fixed
    /// pattern.
    fn unique_id() -> Result<Vec<u8>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = vec![0xa5u8; 128];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        let mut all = pending();
        // Ids nobody joined (a share that failed, a test that only looked at the id) and whose
        // joins would have timed out by now are dropped, so the registry does not grow.
        let now = Instant::now();
        all.retain(|p| {
            now.duration_since(p.made) < default_timeout()
                || (p.failed.is_none() && p.ranks.iter().any(Option::is_some))
        });
        all.push(Pending {
            id: id.clone(),
            size: None,
            ranks: Vec::new(),
            group: None,
            taken: 0,
            failed: None,
            made: now,
        });
        Ok(id)
    }

    /// Waits up to [`default_timeout`] for the other ranks; an id not made here (or already
    /// used up), disagreeing sizes, a rank joined twice and a device joined twice are errors.
    fn init_rank(dev: &EmulatedDevice, id: &[u8], rank: usize, size: usize) -> Result<EmuComm> {
        let fail = |msg: String| Error::Comm { rank, size, msg: format!("{INIT_RANK}: {msg}") };
        if rank >= size {
            return Err(fail(format!("rank {rank} is not a rank of {size}")));
        }
        let deadline = Instant::now() + default_timeout();
        let mut all = pending();
        let find = |all: &[Pending]| all.iter().position(|p| p.id == id);
        let Some(i) = find(&all) else {
            return Err(fail(format!(
                "an id that {GET_UNIQUE_ID} did not make in this process, or whose communicator is complete"
            )));
        };
        let p = &mut all[i];
        if let Some(why) = &p.failed {
            return Err(fail(format!("another rank failed to join: {why}")));
        }
        let refused =
            match p.size {
                Some(s) if s != size => Some(format!("the ranks disagree on the size: {s} and {size}")),
                Some(_) if p.ranks[rank].is_some() => Some(format!("rank {rank} joined twice")),
                _ => p.ranks.iter().position(|d| *d == Some(dev.id)).map(|other| {
                    format!("ranks {other} and {rank} are on the same device (emulated device {})", dev.id)
                }),
            };
        if let Some(why) = refused {
            // Every rank waiting on this id fails too, with this reason.
            p.failed = Some(format!("rank {rank}: {why}"));
            JOINED.notify_all();
            return Err(fail(why));
        }
        if p.size.is_none() {
            p.size = Some(size);
            p.ranks = vec![None; size];
        }
        p.ranks[rank] = Some(dev.id);
        if p.ranks.iter().all(Option::is_some) {
            p.group = Some(Group::new(size, default_timeout()));
            JOINED.notify_all();
        }
        loop {
            let Some(i) = find(&all) else {
                return Err(fail("the communicator was given up while this rank waited".into()));
            };
            if let Some(why) = all[i].failed.clone() {
                return Err(fail(format!("another rank failed to join: {why}")));
            }
            if let Some(group) = all[i].group.clone() {
                all[i].taken += 1;
                if all[i].taken == size {
                    all.remove(i);
                }
                return Ok(EmuComm { group, rank, device: dev.id });
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..size).filter(|&r| all[i].ranks[r].is_none()).collect();
                // Given up: the ranks still waiting fail too, and a late rank finds no id.
                all.remove(i);
                JOINED.notify_all();
                return Err(fail(format!(
                    "timed out after {:?} waiting for ranks {missing:?} to join",
                    default_timeout()
                )));
            }
            all = JOINED.wait_timeout(all, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}
