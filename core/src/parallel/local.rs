//! The in-process communicator: ranks that are threads of one process exchange tensors
//! through host memory. It serves every [`Backend`] by staging (download → exchange the
//! `Vec<f32>`s → upload); `dsv4 --devices N` uses it on the CPU backend and CI's multi-rank
//! conformance tests run on it, so it is strict rather than fast.
//!
//! # How a collective runs
//!
//! The ranks of one communicator share a [`Group`]: a mutex-protected [`State`] and a condvar.
//! Collectives are numbered by a generation counter. A rank *posts* its call (what it called,
//! its arguments, its shape and its host data) into its slot of the current generation and
//! waits; the last rank to arrive *completes* the generation: it checks every post against
//! the others, moves the posts into a shared [`Exchange`], advances the generation and wakes
//! the waiters. Every rank then computes its own result from the exchange outside the lock,
//! with the same code, so sums (always taken in rank order, rank 0 + rank 1 + …) have the same
//! bits on every rank.
//!
//! One retained exchange is enough: generation `g + 1` cannot complete before every rank has
//! posted to it, and a rank posts to `g + 1` only after it has taken its copy of `g`.
//!
//! # Failures
//!
//! Nothing here hangs or panics. A failure *poisons* the group: every rank waiting in the
//! current collective wakes and returns [`Error::Comm`] with the reason, a rank that arrives at
//! that step later gets the same message at once, and every collective after it fails at once
//! with "`<kind>` refused: the communicator failed earlier: `<reason>`". Failures are:
//! - ranks calling different collectives at the same step, or with disagreeing shapes, dims or
//!   roots (found by the completing rank, reported identically on every rank);
//! - invalid arguments (a dim out of range, a root ≥ `size()`, `send_rows` of the wrong length
//!   or sum, a dim not divisible into `size()` parts). These are found by the calling rank
//!   before it posts: it **poisons the group immediately** and returns the error, so the other
//!   ranks fail at the same step (naming the rank and its bad argument) without waiting for a
//!   collective that cannot complete;
//! - a rank that leaves: dropping a [`LocalComm`] (its worker thread returned, or panicked and
//!   unwound) poisons its group, so the others fail promptly instead of waiting for it;
//! - a timeout: a rank that has waited [`LocalComm::timeout`] for its peers poisons the group
//!   naming the ranks that did not arrive;
//! - a backend error while staging (download or upload) on one rank.
//!
//! A successful collective is never turned into a failure afterwards: a waiter first checks
//! whether its generation completed, then whether the group is poisoned.
//!
//! Groups made by [`LocalComm::split`] are independent of their parent: dropping (or poisoning)
//! the parent leaves the children working, and dropping a child poisons only the child's group.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::comm::{CollectiveKind, Communicator, Traffic};
use crate::backend::{Backend, DeviceTensor};
use crate::error::{Error, Result};

/// Environment variable with the default collective timeout, in seconds.
pub const TIMEOUT_ENV: &str = "DSV4_COMM_TIMEOUT_S";

/// The timeout when [`TIMEOUT_ENV`] is unset or not a positive number of seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The timeout [`LocalComm::world`] uses: [`TIMEOUT_ENV`] if it holds a positive number of
/// seconds (fractions allowed), else [`DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    parse_timeout(std::env::var(TIMEOUT_ENV).ok().as_deref())
}

fn parse_timeout(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// One rank of an in-process communicator. `Send + Sync`: move it into the rank's worker
/// thread or share it by `Arc`; dropping it tells the other ranks this one has left.
///
/// Besides the [`Communicator`] impl (for every backend) it has inherent `rank`, `size`,
/// `barrier`, `split` and `traffic`, which need no backend type; the inherent `split` returns
/// a `LocalComm` (the trait's returns it boxed).
pub struct LocalComm {
    group: Arc<Group>,
    rank: usize,
    traffic: Mutex<Traffic>,
}

/// The state the ranks of one communicator share.
struct Group {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    /// Signalled when a generation completes and when the group is poisoned.
    wake: Condvar,
}

struct State {
    /// The collective being collected (collectives completed so far).
    generation: u64,
    /// Each rank's post to the current generation.
    slots: Vec<Option<Post>>,
    /// Ranks that have posted to the current generation.
    arrived: usize,
    /// The last completed generation, until every waiter has taken its copy.
    done: Option<Arc<Exchange>>,
    /// Waiters of the last generation that have not taken `done` yet.
    unread: usize,
    /// Why the group can no longer run collectives, and the generation it failed in; set
    /// once, never cleared.
    poison: Option<(Poison, u64)>,
    /// Collectives each rank has entered (its next call is step `calls[rank]`), to tell a rank
    /// that arrives at the step that failed from one that calls after it.
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

/// What one rank called, with the arguments the other ranks must agree with.
#[derive(Debug, Clone)]
enum Call {
    AllReduce,
    AllGather { dim: usize },
    ReduceScatter { dim: usize },
    AllToAllV { send_rows: Vec<usize> },
    Broadcast { root: usize },
    Barrier,
    Split { colour: usize },
}

impl Call {
    fn kind(&self) -> CollectiveKind {
        match self {
            Call::AllReduce => CollectiveKind::AllReduce,
            Call::AllGather { .. } => CollectiveKind::AllGather,
            Call::ReduceScatter { .. } => CollectiveKind::ReduceScatter,
            Call::AllToAllV { .. } => CollectiveKind::AllToAllV,
            Call::Broadcast { .. } => CollectiveKind::Broadcast,
            Call::Barrier => CollectiveKind::Barrier,
            Call::Split { .. } => CollectiveKind::Split,
        }
    }
}

/// One rank's contribution to a collective: its call, its tensor's shape and its data (empty
/// for barrier, split, and broadcast on a non-root rank).
struct Post {
    call: Call,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// A completed collective: every rank's post, in rank order.
struct Exchange {
    posts: Vec<Post>,
    /// For a split: each rank's new group and its rank there.
    split: Vec<(Arc<Group>, usize)>,
}

enum Poison {
    /// The rank whose `LocalComm` was dropped.
    Left(usize),
    /// Any other failure, described once for every rank.
    Failed(String),
}

impl Poison {
    /// The message for a rank that was waiting in (or arrives at) the step `kind` that failed.
    fn during(&self, kind: CollectiveKind) -> String {
        match self {
            Poison::Left(r) => format!("rank {r} left the communicator (its worker stopped) during {}", kind.name()),
            Poison::Failed(msg) => msg.clone(),
        }
    }

    /// The message for a rank that calls `kind` at a step after the one that failed.
    fn earlier(&self, kind: CollectiveKind) -> String {
        let why = match self {
            Poison::Left(r) => format!("rank {r} left the communicator (its worker stopped)"),
            Poison::Failed(msg) => msg.clone(),
        };
        format!("{} refused: the communicator failed earlier: {why}", kind.name())
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

    /// The state, also after a thread panicked while holding the lock: every update below is
    /// complete before anything that could panic, so the state is never half-written.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Poisons the group with `poison` unless it already failed (the first reason wins).
    fn poison(&self, poison: Poison) {
        self.lock().set_poison(poison);
        self.wake.notify_all();
    }
}

impl LocalComm {
    /// `n` connected ranks (rank `i` at index `i`) with the [`default_timeout`].
    pub fn world(n: usize) -> Vec<LocalComm> {
        Self::world_with_timeout(n, default_timeout())
    }

    /// `n` connected ranks whose collectives fail after waiting `timeout` for their peers.
    pub fn world_with_timeout(n: usize, timeout: Duration) -> Vec<LocalComm> {
        let group = Group::new(n, timeout);
        (0..n).map(|rank| LocalComm::member(group.clone(), rank)).collect()
    }

    fn member(group: Arc<Group>, rank: usize) -> LocalComm {
        LocalComm { group, rank, traffic: Mutex::new(Traffic::default()) }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.group.size
    }

    /// How long a collective waits for its peers.
    pub fn timeout(&self) -> Duration {
        self.group.timeout
    }

    /// What this rank has put into this communicator's successful collectives (a failed
    /// collective is not counted).
    pub fn traffic(&self) -> Traffic {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.exchange(Post { call: Call::Barrier, shape: Vec::new(), data: Vec::new() })?;
        self.record(CollectiveKind::Barrier, 0);
        Ok(())
    }

    /// Collective: the ranks calling with the same `colour` form a new communicator, ordered
    /// by their rank here, with this communicator's timeout. The new group is independent of
    /// this one.
    pub fn split(&self, colour: usize) -> Result<LocalComm> {
        let ex = self.exchange(Post { call: Call::Split { colour }, shape: Vec::new(), data: Vec::new() })?;
        let Some((group, rank)) = ex.split.get(self.rank).cloned() else {
            return Err(self.fail("split: internal error: the completed split has no group for this rank".into()));
        };
        self.record(CollectiveKind::Split, 0);
        Ok(LocalComm::member(group, rank))
    }

    fn record(&self, kind: CollectiveKind, values: usize) {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).record(kind, values as u64 * 4);
    }

    fn error(&self, msg: String) -> Error {
        Error::Comm { rank: self.rank, size: self.group.size, msg }
    }

    /// A failure found on this rank alone after its call took part in the exchange: poisons
    /// the group so that the other ranks' later collectives fail.
    fn fail(&self, msg: String) -> Error {
        self.group.poison(Poison::Failed(msg.clone()));
        self.error(msg)
    }

    /// A failure found on this rank alone before it posted its call: counts the call as this
    /// rank's step and poisons the group at that step, so that the other ranks fail in it too
    /// (at once if they are waiting in it or arrive later).
    fn fail_unposted(&self, msg: String) -> Error {
        let mut st = self.group.lock();
        st.calls[self.rank] += 1;
        st.set_poison(Poison::Failed(msg.clone()));
        drop(st);
        self.group.wake.notify_all();
        self.error(msg)
    }

    /// Invalid arguments to `kind` on this rank (see the module docs: they poison the group).
    fn invalid(&self, kind: CollectiveKind, what: String) -> Error {
        self.fail_unposted(format!("rank {} called {} with invalid arguments: {what}", self.rank, kind.name()))
    }

    /// `x` on the host, checked against its shape.
    fn download<B: Backend>(&self, be: &B, kind: CollectiveKind, x: &B::Tensor) -> Result<Vec<f32>> {
        let data = be.download(x).map_err(|e| {
            self.fail_unposted(format!("rank {}: {}: downloading the input failed: {e}", self.rank, kind.name()))
        })?;
        if data.len() != x.numel() {
            return Err(self.fail_unposted(format!(
                "rank {}: {}: the backend downloaded {} values for shape {:?}",
                self.rank,
                kind.name(),
                data.len(),
                x.shape()
            )));
        }
        Ok(data)
    }

    fn upload<B: Backend>(&self, be: &B, kind: CollectiveKind, data: &[f32], shape: &[usize]) -> Result<B::Tensor> {
        be.upload(data, shape).map_err(|e| {
            self.fail(format!("rank {}: {}: uploading the result {shape:?} failed: {e}", self.rank, kind.name()))
        })
    }

    /// Posts this rank's call and waits until every rank has posted to the same generation,
    /// then returns the completed exchange (or the reason the group failed).
    fn exchange(&self, post: Post) -> Result<Arc<Exchange>> {
        let group = &*self.group;
        let kind = post.call.kind();
        let mut st = group.lock();
        let step = st.calls[self.rank];
        st.calls[self.rank] += 1;
        if let Some((p, failed_at)) = &st.poison {
            // A rank arriving at the step that failed gets the same message as the ranks that
            // were waiting in it; later steps say that the communicator failed earlier.
            let msg = if step == *failed_at { p.during(kind) } else { p.earlier(kind) };
            return Err(self.error(msg));
        }
        if let Some(pending) = &st.slots[self.rank] {
            // Only possible when two threads share this rank and call at once.
            let msg = format!(
                "rank {} called {} while its {} has not completed (two threads used the same rank at once)",
                self.rank,
                kind.name(),
                pending.call.kind().name()
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
            // This rank completes the generation.
            let posts: Vec<Post> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.arrived = 0;
            let result = complete(posts, group.timeout);
            match result {
                Ok(ex) => {
                    let ex = Arc::new(ex);
                    st.generation += 1;
                    st.unread = group.size - 1;
                    st.done = (st.unread > 0).then(|| ex.clone());
                    drop(st);
                    group.wake.notify_all();
                    return Ok(ex);
                }
                Err(msg) => {
                    st.set_poison(Poison::Failed(msg.clone()));
                    drop(st);
                    group.wake.notify_all();
                    return Err(self.error(msg));
                }
            }
        }

        let started = Instant::now();
        let deadline = started + group.timeout;
        loop {
            // Completion first: a collective that completed stays a success even if the group
            // was poisoned (a rank left, another failed) before this rank woke up.
            if st.generation != generation {
                let Some(ex) = st.done.clone() else {
                    let msg = format!("{}: internal error: the completed exchange is gone", kind.name());
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
                return Err(self.error(p.during(kind)));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..group.size).filter(|&r| st.slots[r].is_none()).collect();
                let present: Vec<usize> = (0..group.size).filter(|&r| st.slots[r].is_some()).collect();
                let msg = format!(
                    "{} timed out after {:?}: {} did not call it ({} did)",
                    kind.name(),
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

impl Drop for LocalComm {
    /// This rank leaves: the other ranks' pending and later collectives fail.
    fn drop(&mut self) {
        self.group.poison(Poison::Left(self.rank));
    }
}

impl fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("size", &self.group.size)
            .field("timeout", &self.group.timeout)
            .finish()
    }
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

/// "rank 0 X, rank 1 Y, …" for an error message that lists every rank's value.
fn per_rank<T>(posts: &[Post], f: impl Fn(&Post) -> T) -> String
where
    T: fmt::Display,
{
    posts.iter().enumerate().map(|(r, p)| format!("rank {r} {}", f(p))).collect::<Vec<_>>().join(", ")
}

fn describe_shape(shape: &[usize]) -> String {
    format!("{shape:?} ({} values)", shape.iter().product::<usize>())
}

/// Checks that the posts of one generation fit together and builds the exchange; the error is
/// the message every rank reports.
fn complete(posts: Vec<Post>, timeout: Duration) -> Result<Exchange, String> {
    let kind = posts[0].call.kind();
    if posts.iter().any(|p| p.call.kind() != kind) {
        return Err(format!(
            "ranks called different collectives at the same step: {}",
            per_rank(&posts, |p| p.call.kind().name())
        ));
    }
    let name = kind.name();
    let all_equal = |f: &dyn Fn(&Post) -> Vec<usize>| posts.windows(2).all(|w| f(&w[0]) == f(&w[1]));
    let same_shapes = || -> Result<(), String> {
        if all_equal(&|p| p.shape.clone()) {
            Ok(())
        } else {
            Err(format!("{name}: the ranks' shapes differ: {}", per_rank(&posts, |p| describe_shape(&p.shape))))
        }
    };
    let mut split = Vec::new();
    match &posts[0].call {
        Call::AllReduce => same_shapes()?,
        Call::ReduceScatter { .. } | Call::AllGather { .. } => {
            let dim_of = |p: &Post| match p.call {
                Call::ReduceScatter { dim } | Call::AllGather { dim } => dim,
                _ => usize::MAX,
            };
            if !all_equal(&|p| vec![dim_of(p)]) {
                return Err(format!("{name}: the ranks disagree on dim: {}", per_rank(&posts, |p| dim_of(p))));
            }
            if kind == CollectiveKind::ReduceScatter {
                same_shapes()?;
            } else {
                // The shapes must agree except in `dim` (which every rank checked is in range).
                let dim = dim_of(&posts[0]);
                let others = |p: &Post| {
                    let mut s = p.shape.clone();
                    if dim < s.len() {
                        s[dim] = 0;
                    }
                    s
                };
                if !all_equal(&|p| vec![p.shape.len()]) || !all_equal(&others) {
                    return Err(format!(
                        "all_gather: the ranks' shapes differ outside dim {dim}: {}",
                        per_rank(&posts, |p| describe_shape(&p.shape))
                    ));
                }
            }
        }
        Call::AllToAllV { .. } => {
            if !all_equal(&|p| p.shape[1..].to_vec()) {
                return Err(format!(
                    "all_to_all_v: the ranks' rows differ (shape after the row dim, and values per row): {}",
                    per_rank(&posts, |p| format!("{:?} ({})", &p.shape[1..], p.shape[1..].iter().product::<usize>()))
                ));
            }
        }
        Call::Broadcast { .. } => {
            let root_of = |p: &Post| match p.call {
                Call::Broadcast { root } => root,
                _ => usize::MAX,
            };
            if !all_equal(&|p| vec![root_of(p)]) {
                return Err(format!("broadcast: the ranks disagree on the root: {}", per_rank(&posts, |p| root_of(p))));
            }
            same_shapes()?;
        }
        Call::Barrier => {}
        Call::Split { .. } => {
            let colour_of = |p: &Post| match p.call {
                Call::Split { colour } => colour,
                _ => usize::MAX,
            };
            // Each colour's members, in rank order, become the ranks of a new group.
            let mut groups: Vec<(usize, Arc<Group>, usize)> = Vec::new(); // (colour, group, members so far)
            let colours: Vec<usize> = posts.iter().map(colour_of).collect();
            for &c in &colours {
                if !groups.iter().any(|g| g.0 == c) {
                    let members = colours.iter().filter(|&&x| x == c).count();
                    groups.push((c, Group::new(members, timeout), 0));
                }
            }
            for &c in &colours {
                if let Some(g) = groups.iter_mut().find(|g| g.0 == c) {
                    split.push((g.1.clone(), g.2));
                    g.2 += 1;
                }
            }
        }
    }
    Ok(Exchange { posts, split })
}

/// `(outer, len, inner)` of `shape` around `dim`: the product of the dims before it, its size
/// and the product of the dims after it.
fn around(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (shape[..dim].iter().product(), shape[dim], shape[dim + 1..].iter().product())
}

/// The sum over ranks, in rank order, of `posts[..].data[range]`, appended to `out`.
fn sum_into(out: &mut Vec<f32>, posts: &[Post], start: usize, end: usize) {
    let base = out.len();
    out.extend_from_slice(&posts[0].data[start..end]);
    for p in &posts[1..] {
        for (acc, v) in out[base..].iter_mut().zip(&p.data[start..end]) {
            *acc += *v;
        }
    }
}

impl<B: Backend> Communicator<B> for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let kind = CollectiveKind::AllReduce;
        let data = self.download(be, kind, x)?;
        let n = data.len();
        let ex = self.exchange(Post { call: Call::AllReduce, shape: x.shape().to_vec(), data })?;
        let mut sum = Vec::with_capacity(n);
        sum_into(&mut sum, &ex.posts, 0, n);
        let out = self.upload(be, kind, &sum, x.shape())?;
        self.record(kind, n);
        Ok(out)
    }

    fn all_gather(&self, be: &B, x: &B::Tensor, dim: usize) -> Result<B::Tensor> {
        let kind = CollectiveKind::AllGather;
        let shape = x.shape().to_vec();
        if dim >= shape.len() {
            return Err(self.invalid(kind, format!("dim {dim} is out of range for shape {shape:?}")));
        }
        let data = self.download(be, kind, x)?;
        let n = data.len();
        let ex = self.exchange(Post { call: Call::AllGather { dim }, shape: shape.clone(), data })?;
        let (outer, _, inner) = around(&shape, dim);
        let total: usize = ex.posts.iter().map(|p| p.shape[dim]).sum();
        let mut out = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for p in &ex.posts {
                let chunk = p.shape[dim] * inner;
                out.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
            }
        }
        let mut out_shape = shape;
        out_shape[dim] = total;
        let out = self.upload(be, kind, &out, &out_shape)?;
        self.record(kind, n);
        Ok(out)
    }

    fn reduce_scatter_sum(&self, be: &B, x: &B::Tensor, dim: usize) -> Result<B::Tensor> {
        let kind = CollectiveKind::ReduceScatter;
        let size = self.group.size;
        let shape = x.shape().to_vec();
        if dim >= shape.len() {
            return Err(self.invalid(kind, format!("dim {dim} is out of range for shape {shape:?}")));
        }
        if shape[dim] % size != 0 {
            return Err(self.invalid(
                kind,
                format!("dim {dim} of shape {shape:?} has size {}, not a multiple of the {size} ranks", shape[dim]),
            ));
        }
        let data = self.download(be, kind, x)?;
        let n = data.len();
        let ex = self.exchange(Post { call: Call::ReduceScatter { dim }, shape: shape.clone(), data })?;
        let (outer, len, inner) = around(&shape, dim);
        let part = len / size;
        let mut out = Vec::with_capacity(outer * part * inner);
        for o in 0..outer {
            let start = (o * len + self.rank * part) * inner;
            sum_into(&mut out, &ex.posts, start, start + part * inner);
        }
        let mut out_shape = shape;
        out_shape[dim] = part;
        let out = self.upload(be, kind, &out, &out_shape)?;
        self.record(kind, n);
        Ok(out)
    }

    /// Receiving no rows uploads a tensor `[0, ..]`: a backend that refuses empty tensors makes
    /// that rank's call fail (and poisons the group); the CPU backend accepts them.
    fn all_to_all_v(&self, be: &B, x: &B::Tensor, send_rows: &[usize]) -> Result<(B::Tensor, Vec<usize>)> {
        let kind = CollectiveKind::AllToAllV;
        let size = self.group.size;
        let shape = x.shape().to_vec();
        let Some(&rows) = shape.first() else {
            return Err(self.invalid(kind, "x is a scalar; it needs a row dim".into()));
        };
        if send_rows.len() != size {
            return Err(self.invalid(kind, format!("{} send_rows for {size} ranks", send_rows.len())));
        }
        let sent = send_rows.iter().try_fold(0usize, |a, &b| a.checked_add(b));
        if sent != Some(rows) {
            return Err(
                self.invalid(kind, format!("send_rows {send_rows:?} do not sum to the {rows} rows of {shape:?}"))
            );
        }
        let data = self.download(be, kind, x)?;
        let width: usize = shape[1..].iter().product();
        let post = Post { call: Call::AllToAllV { send_rows: send_rows.to_vec() }, shape: shape.clone(), data };
        let ex = self.exchange(post)?;
        let mut out = Vec::new();
        let mut counts = Vec::with_capacity(size);
        for p in &ex.posts {
            let Call::AllToAllV { send_rows: theirs } = &p.call else {
                return Err(self.fail("all_to_all_v: internal error: a post of another kind".into()));
            };
            let start: usize = theirs[..self.rank].iter().sum();
            let n = theirs[self.rank];
            out.extend_from_slice(&p.data[start * width..(start + n) * width]);
            counts.push(n);
        }
        let mut out_shape = shape;
        out_shape[0] = counts.iter().sum();
        let out = self.upload(be, kind, &out, &out_shape)?;
        self.record(kind, (rows - send_rows[self.rank]) * width);
        Ok((out, counts))
    }

    fn broadcast(&self, be: &B, x: &B::Tensor, root: usize) -> Result<B::Tensor> {
        let kind = CollectiveKind::Broadcast;
        let size = self.group.size;
        if root >= size {
            return Err(self.invalid(kind, format!("root {root} is not a rank of {size}")));
        }
        let is_root = self.rank == root;
        // Only the root's data travels.
        let data = if is_root { self.download(be, kind, x)? } else { Vec::new() };
        let n = data.len();
        let ex = self.exchange(Post { call: Call::Broadcast { root }, shape: x.shape().to_vec(), data })?;
        let out = if is_root { x.clone() } else { self.upload(be, kind, &ex.posts[root].data, x.shape())? };
        self.record(kind, n);
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        LocalComm::barrier(self)
    }

    fn split(&self, colour: usize) -> Result<Box<dyn Communicator<B>>> {
        Ok(Box::new(LocalComm::split(self, colour)?))
    }

    fn traffic(&self) -> Traffic {
        LocalComm::traffic(self)
    }
}

#[cfg(test)]
mod tests {
    //! The machinery without a backend (barrier, split, failures); the data collectives are
    //! tested on the CPU backend in `tests/tests/local_comm.rs`.

    use std::thread;

    use super::*;

    /// Runs `f(comm)` for every rank of `world` on its own thread; the results in rank order.
    fn on_ranks<T: Send>(world: Vec<LocalComm>, f: impl Fn(LocalComm) -> T + Sync) -> Vec<T> {
        thread::scope(|s| {
            let handles: Vec<_> = world.into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn msg(e: Error) -> (usize, String) {
        match e {
            Error::Comm { rank, msg, .. } => (rank, msg),
            other => panic!("not a Comm error: {other}"),
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<LocalComm>();
    }

    #[test]
    fn timeout_from_the_environment_value() {
        assert_eq!(parse_timeout(None), DEFAULT_TIMEOUT);
        assert_eq!(parse_timeout(Some("2.5")), Duration::from_millis(2500));
        assert_eq!(parse_timeout(Some(" 7 ")), Duration::from_secs(7));
        for bad in ["", "x", "0", "-3", "inf", "NaN", "1e300"] {
            assert_eq!(parse_timeout(Some(bad)), DEFAULT_TIMEOUT, "{bad:?}");
        }
    }

    #[test]
    fn barriers_on_one_to_four_ranks() {
        for n in 1..=4 {
            let out = on_ranks(LocalComm::world(n), |c| {
                assert_eq!((c.size(), c.timeout()), (n, default_timeout()));
                for _ in 0..50 {
                    c.barrier()?;
                }
                Ok::<_, Error>(c.rank())
            });
            let ranks: Vec<usize> = out.into_iter().map(Result::unwrap).collect();
            assert_eq!(ranks, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn split_orders_members_by_rank_and_groups_are_independent() {
        let out = on_ranks(LocalComm::world(5), |c| {
            let colour = [1, 0, 1, 0, 1][c.rank()];
            let sub = c.split(colour).unwrap();
            for _ in 0..20 {
                sub.barrier().unwrap();
            }
            // The parent leaving does not affect the child groups.
            drop(c);
            sub.barrier().unwrap();
            let t = sub.traffic();
            (colour, sub.rank(), sub.size(), t.by_kind[&CollectiveKind::Barrier])
        });
        assert_eq!(
            out,
            vec![(1, 0, 3, (21, 0)), (0, 0, 2, (21, 0)), (1, 1, 3, (21, 0)), (0, 1, 2, (21, 0)), (1, 2, 3, (21, 0))]
        );
    }

    #[test]
    fn dropping_a_child_poisons_only_the_child_group() {
        let out = on_ranks(LocalComm::world(4), |c| {
            let sub = c.split(c.rank() % 2).unwrap();
            if c.rank() == 3 {
                drop(sub);
                c.barrier().unwrap();
                return None;
            }
            let r = sub.barrier().map_err(msg);
            c.barrier().unwrap();
            Some(r)
        });
        assert!(matches!(out[0], Some(Ok(()))) && matches!(out[2], Some(Ok(()))), "{out:?}");
        let (rank, m) = out[1].clone().unwrap().unwrap_err();
        assert_eq!(rank, 0);
        assert_eq!(m, "rank 1 left the communicator (its worker stopped) during barrier");
    }

    #[test]
    fn different_collectives_fail_on_every_rank() {
        let out = on_ranks(LocalComm::world(3), |c| {
            let r = if c.rank() == 1 { c.split(0).map(drop) } else { c.barrier() };
            r.map_err(msg).unwrap_err().1
        });
        for m in &out {
            assert_eq!(
                m,
                "ranks called different collectives at the same step: rank 0 barrier, rank 1 split, rank 2 barrier"
            );
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_promptly_and_poisons() {
        let start = Instant::now();
        let out = on_ranks(LocalComm::world(3), |c| {
            c.barrier().unwrap();
            if c.rank() == 2 {
                return Vec::new();
            }
            let first = c.barrier().map_err(msg).unwrap_err().1;
            let later = c.barrier().map_err(msg).unwrap_err().1;
            vec![first, later]
        });
        assert!(start.elapsed() < Duration::from_secs(2));
        for m in &out[..2] {
            // Whether rank 2 left before or while they waited, they fail at the step it missed.
            assert_eq!(m[0], "rank 2 left the communicator (its worker stopped) during barrier");
            assert_eq!(
                m[1],
                "barrier refused: the communicator failed earlier: rank 2 left the communicator (its worker stopped)"
            );
        }
    }

    #[test]
    fn timeout_names_the_missing_ranks() {
        let out = on_ranks(LocalComm::world_with_timeout(4, Duration::from_millis(200)), |c| {
            if c.rank() == 2 {
                // Alive, but never calls until the others gave up.
                thread::sleep(Duration::from_millis(600));
                return c.barrier().map_err(msg).unwrap_err().1;
            }
            let t = Instant::now();
            let m = c.barrier().map_err(msg).unwrap_err().1;
            assert!(t.elapsed() >= Duration::from_millis(190) && t.elapsed() < Duration::from_secs(2));
            m
        });
        for m in [&out[0], &out[1], &out[3]] {
            assert_eq!(m, "barrier timed out after 200ms: rank 2 did not call it (ranks 0, 1 and 3 did)");
        }
        // The late rank arrives at the step that failed: the same message.
        assert_eq!(out[2], out[0]);
    }

    #[test]
    fn zero_ranks_and_one_rank() {
        assert!(LocalComm::world(0).is_empty());
        let c = LocalComm::world(1).pop().unwrap();
        c.barrier().unwrap();
        let sub = c.split(7).unwrap();
        assert_eq!((sub.rank(), sub.size()), (0, 1));
        assert_eq!(c.traffic().calls(), 0);
        assert_eq!(c.traffic().by_kind.len(), 2);
    }

    #[test]
    fn rank_lists() {
        assert_eq!(ranks(&[]), "no rank");
        assert_eq!(ranks(&[3]), "rank 3");
        assert_eq!(ranks(&[0, 1]), "ranks 0 and 1");
        assert_eq!(ranks(&[0, 1, 3]), "ranks 0, 1 and 3");
    }
}
