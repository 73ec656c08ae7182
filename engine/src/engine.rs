//! The engine thread and its handle.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use dsv4_core::kv::{CarrySnapshot, KvCache, KvConfig, Sequence};
use dsv4_core::model::Logits;
use dsv4_core::sampling::Sampler;
use dsv4_core::speculative::Speculator;
use dsv4_core::{Backend, Batch, Model};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender, WeakUnboundedSender};

use crate::data_parallel::DataParallel;
use crate::logprobs::token_logprobs;
use crate::replica::{Mirror, Tick};
use crate::request::{EngineEvent, FinishReason, GenerationRequest, Usage};
use crate::scheduler::{self, Candidate};
use crate::stats::EngineStats;

/// Limits of the engine, fixed at start (vLLM's flag names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences in one step (`--max-num-seqs`; of each rank under data-parallel
    /// attention).
    pub max_num_seqs: usize,
    /// Most tokens in one step, decode tokens and prompt chunks together
    /// (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt plus generated tokens (`--max-model-len`); `0` takes the
    /// model's context, capped by what the pool can hold.
    pub max_model_len: usize,
    /// Most requests waiting for admission; beyond it `submit` answers
    /// [`SubmitError::QueueFull`].
    pub max_waiting: usize,
    /// Prompts are fed in chunks of this many tokens, at fixed offsets, so a prompt is
    /// computed the same way alone and in a full batch. At most `max_num_batched_tokens`.
    pub prefill_chunk: usize,
    /// Tokens the checkpoint's MTP block drafts per decode step of every request
    /// (`--speculative-tokens`; speculative decoding, [`dsv4_core::speculative`]); 0: none.
    pub speculative_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: 0,
            max_waiting: 1024,
            prefill_chunk: 512,
            speculative_tokens: 0,
        }
    }
}

/// What the engine is serving, known once it has started.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub backend: String,
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the engine accepts.
    pub max_model_len: usize,
    pub kv: KvConfig,
    /// Device bytes of the pools.
    pub kv_bytes: usize,
    pub config: EngineConfig,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request itself is unusable (empty prompt, id outside the vocabulary, bad sampling
    /// parameters): a client error.
    #[error("{0}")]
    Invalid(String),
    /// The prompt leaves no room to generate within `max_model_len`.
    #[error(
        "the prompt has {prompt_tokens} tokens but this server's maximum context length is {max_model_len} tokens \
         (prompt and completion together); shorten the prompt"
    )]
    PromptTooLong { prompt_tokens: usize, max_model_len: usize },
    /// The waiting queue is full: retry later (HTTP 503).
    #[error("the server is at capacity: {waiting} requests are already waiting for a free slot; retry later")]
    QueueFull { waiting: usize },
    /// The engine thread has stopped.
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    /// The server takes no more requests ([`EngineHandle::fail_requests`]): why (HTTP 503).
    #[error("{0}")]
    Closed(String),
}

/// The events of one request. Dropping it cancels the request.
pub struct RequestStream {
    rx: UnboundedReceiver<EngineEvent>,
}

impl RequestStream {
    /// The next event; `None` once the request has finished (after `Finished` or `Error`).
    pub async fn recv(&mut self) -> Option<EngineEvent> {
        self.rx.recv().await
    }

    /// Blocking form of [`recv`](Self::recv), for callers outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<EngineEvent> {
        self.rx.blocking_recv()
    }
}

pub(crate) struct Submitted {
    /// Unique per engine, in submission order (how a follower engine names the request).
    pub(crate) id: u64,
    pub(crate) req: GenerationRequest,
    sampler: Sampler,
    out: UnboundedSender<EngineEvent>,
}

impl Submitted {
    /// A follower's copy of a request the leader admitted: nobody listens to its events.
    pub(crate) fn replica(id: u64, req: GenerationRequest) -> Result<Self, String> {
        let sampler = Sampler::new(req.sampling).map_err(|e| e.to_string())?;
        Ok(Submitted { id, req, sampler, out: unbounded_channel().0 })
    }
}

/// The mirrors of `ranks` local engines: rank 0 leads, telling the others (and `remote`, a
/// follower outside this process, when given) each tick; every other rank follows.
fn lead_and_follow(ranks: usize, remote: Option<mpsc::Sender<Tick>>) -> Vec<Mirror> {
    let (mut told, heard): (Vec<_>, Vec<_>) = (1..ranks).map(|_| mpsc::channel::<Tick>()).unzip();
    told.extend(remote);
    let mut mirrors = vec![Mirror::Lead(told)];
    mirrors.extend(heard.into_iter().map(Mirror::Follow));
    mirrors
}

/// Where the leader's node sends each encoded tick (false: the other side is gone).
pub type TickSink = Box<dyn FnMut(Vec<u8>) -> bool + Send>;

/// Where a follower node reads the leader's encoded ticks (None: the leader ended).
pub type TickSource = Box<dyn FnMut() -> Option<Vec<u8>> + Send>;

/// What loads one rank's backend, model and pool configuration, on that rank's engine thread.
pub type RankBuild<B> = Box<dyn FnOnce() -> Result<(B, Model<B>, KvConfig), BuildError> + Send>;

pub(crate) struct Shared {
    /// The next request id.
    next_id: std::sync::atomic::AtomicU64,
    stats: Mutex<EngineStats>,
    /// Requests submitted but not yet admitted (under data-parallel attention one counter for
    /// every rank: the queue limit is the group's).
    waiting: Arc<AtomicUsize>,
    /// Set when the engine thread ends (why).
    stopped: Mutex<Option<String>>,
    /// When it stopped, in the order of every engine's stops in this process (0: running).
    stop_order: std::sync::atomic::AtomicU64,
    /// The event streams of the requests submitted, without keeping them open (a finished
    /// request's stream ends when the engine drops its sender), and whether requests are still
    /// taken: [`EngineHandle::fail_requests`].
    streams: Mutex<OpenStreams>,
}

/// What [`EngineHandle::fail_requests`] reaches, under one lock with whether it has run (so
/// that a request submitted while it runs is either reached or refused, never missed).
#[derive(Default)]
struct OpenStreams {
    senders: Vec<WeakUnboundedSender<EngineEvent>>,
    /// Set by `fail_requests`: later submissions are refused with it.
    closed: Option<String>,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submitted>,
    /// Every rank's state in rank order, the first the leader's (the one requests go to): a
    /// follower that stops is seen here even while the leader waits for it in a collective that
    /// nothing will wake (NCCL's).
    ranks: Arc<Vec<Arc<Shared>>>,
    info: Arc<EngineInfo>,
    /// Each rank runs sequences of its own ([`crate::data_parallel`]): the counters are the
    /// sum of the ranks'.
    data_parallel: bool,
}

/// Why an engine could not start.
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

impl Shared {
    fn new(waiting: Arc<AtomicUsize>) -> Self {
        Shared {
            next_id: Default::default(),
            stats: Mutex::new(EngineStats::default()),
            waiting,
            stopped: Mutex::new(None),
            stop_order: Default::default(),
            streams: Mutex::new(OpenStreams::default()),
        }
    }

    /// Records that the engine stopped and why (the first reason given wins).
    fn stop(&self, why: String) {
        static STOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.is_none() {
            *stopped = Some(why);
            self.stop_order.store(STOPS.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        }
    }

    fn stopped(&self) -> Option<String> {
        self.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Records a stop when the engine thread ends in any way (a panic while stopping included),
/// so that a handle never waits on a thread that is gone.
struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.stop("the engine thread ended while stopping (a panic)".into());
    }
}

impl EngineHandle {
    /// Starts the engine thread. `build` runs on it and returns the backend, the loaded model
    /// and the pool's configuration (backend handles never leave the thread). Returns once
    /// the model is loaded and the pool allocated, or with the error that stopped it.
    pub fn spawn<B, F>(config: EngineConfig, build: F) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
        F: FnOnce() -> Result<(B, Model<B>, KvConfig), BuildError> + Send + 'static,
    {
        Self::spawn_ranks(config, vec![Box::new(build) as RankBuild<B>])
    }

    /// Starts one engine thread per rank of a multi-device model ([`crate::replica`]):
    /// `builds[r]` runs on rank r's thread and loads that rank's part of the model (all of
    /// them at once: splitting the communicators is collective). Rank 0's engine serves the
    /// handle; the others follow it. Returns once every rank is ready, or with the first
    /// rank's error (the others are then stopped).
    pub fn spawn_ranks<B>(config: EngineConfig, builds: Vec<RankBuild<B>>) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
    {
        let mirrors = lead_and_follow(builds.len(), None);
        Self::spawn_mirrored(config, builds, mirrors.into_iter().map(|m| (m, None)).collect())
    }

    /// Starts one engine thread per rank of a model split with data-parallel attention
    /// ([`crate::data_parallel`]): each rank runs sequences of its own, rank 0's engine hands
    /// each request to the rank holding the fewest, and the ranks step together through the
    /// model's MoE exchange. `builds[r]` runs on rank r's thread, as for
    /// [`EngineHandle::spawn_ranks`]; each rank's model must be loaded with data-parallel
    /// attention. The handle's counters are the sums of the ranks'. One process only (the
    /// requests and their streams stay in it). Returns once every rank is ready, or with the
    /// first rank's error.
    pub fn spawn_data_parallel<B>(config: EngineConfig, builds: Vec<RankBuild<B>>) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
    {
        let parts = crate::data_parallel::group(builds.len());
        // Each rank decides for its own sequences: its mirror leads no one.
        Self::spawn_mirrored(config, builds, parts.into_iter().map(|p| (Mirror::Lead(vec![]), Some(p))).collect())
    }

    /// [`EngineHandle::spawn_ranks`] on the leader's node of a run over several processes
    /// (`dsv4 serve --nnodes`): besides this process's followers, every tick rank 0's engine
    /// decides goes, encoded, to `remote` (which sends it to the other nodes' followers, see
    /// [`EngineHandle::spawn_followers`]), on a thread of its own. When `remote` returns false
    /// (a node is gone) the engine stops as it does when a local rank stops.
    pub fn spawn_ranks_leading<B>(
        config: EngineConfig,
        builds: Vec<RankBuild<B>>,
        mut remote: TickSink,
    ) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
    {
        let (remote_tx, remote_rx) = mpsc::channel::<Tick>();
        std::thread::Builder::new().name("dsv4-engine-remote".into()).spawn(move || {
            for tick in remote_rx {
                if !remote(tick.encode()) {
                    return;
                }
            }
        })?;
        let mirrors = lead_and_follow(builds.len(), Some(remote_tx));
        Self::spawn_mirrored(config, builds, mirrors.into_iter().map(|m| (m, None)).collect())
    }

    /// The engines of a node other than the leader's in a run over several processes: every
    /// rank here follows the leader, replaying the ticks `source` yields (the leader's
    /// [`EngineHandle::spawn_ranks_leading`] sends them) until it yields `None` or a tick that
    /// does not decode. The handle serves no requests; [`EngineHandle::stopped`] says when and
    /// why the engines stopped.
    pub fn spawn_followers<B>(
        config: EngineConfig,
        builds: Vec<RankBuild<B>>,
        mut source: TickSource,
    ) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
    {
        let (tick_txs, tick_rxs): (Vec<_>, Vec<_>) = (0..builds.len()).map(|_| mpsc::channel::<Tick>()).unzip();
        std::thread::Builder::new().name("dsv4-engine-ticks".into()).spawn(move || {
            while let Some(bytes) = source() {
                let tick = match Tick::decode(&bytes) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("dsv4: a tick from the leader's node does not decode ({e}); stopping");
                        return;
                    }
                };
                if !tick_txs.iter().all(|tx| tx.send(tick.clone()).is_ok()) {
                    return;
                }
            }
        })?;
        Self::spawn_mirrored(config, builds, tick_rxs.into_iter().map(|rx| (Mirror::Follow(rx), None)).collect())
    }

    /// The leader's state (rank 0's: the queue, the counters, the request streams).
    fn leader(&self) -> &Shared {
        &self.ranks[0]
    }

    /// Why the engine stopped, once it has (None while it runs): the reason of the first rank
    /// that stopped (`"rank r's engine stopped: why"` for r > 0, r in this process's rank
    /// order). A rank's engine stops when its step fails, when it panics, or when its inputs end.
    /// On a backend whose collectives cannot time out (NCCL's blocking communicators), a
    /// follower that stops leaves rank 0 waiting for ever, so this is the only sign of it: `dsv4
    /// serve` watches it and ends the process.
    pub fn stopped(&self) -> Option<String> {
        // The first rank that stopped: the others' reasons are often its consequences ("the
        // engine of another rank stopped").
        let (r, s) = self
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, s)| s.stop_order.load(Ordering::SeqCst) != 0)
            .min_by_key(|(_, s)| s.stop_order.load(Ordering::SeqCst))?;
        let why = s.stopped()?;
        Some(if r == 0 { why } else { format!("rank {r}'s engine stopped: {why}") })
    }

    /// Starts the rank engines, each with its part (`roles[r]`): a mirror of rank 0's
    /// decisions, or a part of a data-parallel group.
    fn spawn_mirrored<B>(
        config: EngineConfig,
        builds: Vec<RankBuild<B>>,
        roles: Vec<(Mirror, Option<DataParallel>)>,
    ) -> Result<EngineHandle, BuildError>
    where
        B: Backend + 'static,
    {
        if config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 || config.prefill_chunk == 0 {
            return Err("--max-num-seqs, --max-num-batched-tokens and the prefill chunk must be at least 1".into());
        }
        if builds.is_empty() {
            return Err("an engine needs at least one rank".into());
        }
        let (tx, rx) = mpsc::channel::<Submitted>();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<EngineInfo, String>)>();
        let mut rx = Some(rx);
        let mut gos = vec![];
        // Each rank its own state; the handle reads them all (the leader's, rank 0, for requests).
        let data_parallel = roles.iter().any(|(_, dp)| dp.is_some());
        let group_waiting = Arc::new(AtomicUsize::new(0));
        let waiting = || match data_parallel {
            true => group_waiting.clone(),
            false => Arc::new(AtomicUsize::new(0)),
        };
        let ranks: Arc<Vec<Arc<Shared>>> =
            Arc::new((0..builds.len()).map(|_| Arc::new(Shared::new(waiting()))).collect());
        for (rank, (build, (mirror, dp))) in builds.into_iter().zip(roles).enumerate() {
            // Rank 0 reads the handle's queue; a follower's queue is never written.
            let rx = rx.take().unwrap_or_else(|| mpsc::channel().1);
            let shared = ranks[rank].clone();
            let (ready_tx, (go_tx, go_rx)) = (ready_tx.clone(), mpsc::channel::<bool>());
            gos.push(go_tx);
            let name = if rank == 0 { "dsv4-engine".to_string() } else { format!("dsv4-engine-rank-{rank}") };
            std::thread::Builder::new().name(name).spawn(move || {
                // A build that panics is reported like one that fails: the other ranks may be
                // waiting for this one in a collective, and the caller must hear of it.
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).unwrap_or_else(|p| {
                    Err(format!("loading panicked: {}", dsv4_core::parallel::panic_message(p.as_ref())).into())
                });
                let (be, model, kv) = match built {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send((rank, Err(e.to_string())));
                        return;
                    }
                };
                let mut engine = match Engine::new(&be, &model, kv, config, shared.clone(), mirror, dp) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send((rank, Err(e)));
                        return;
                    }
                };
                let _ = ready_tx.send((rank, Ok(engine.info.clone())));
                // Every rank must be ready before any runs: a follower replays from the start.
                if go_rx.recv() != Ok(true) {
                    return;
                }
                let _stop = StopOnExit(shared.clone());
                engine.run(rx);
            })?;
        }
        drop(ready_tx);
        let mut info = None;
        let mut failure = None;
        for _ in 0..gos.len() {
            match ready_rx.recv() {
                Ok((0, Ok(i))) => info = Some(i),
                Ok((_, Ok(_))) => {}
                Ok((rank, Err(e))) => {
                    let e = if gos.len() > 1 { format!("rank {rank}: {e}") } else { e };
                    failure.get_or_insert(e);
                    // A rank that failed has dropped its communicators: the others' loads fail
                    // too, or finish; either way they report.
                }
                Err(_) => {
                    failure.get_or_insert("an engine thread stopped while starting".into());
                    break;
                }
            }
        }
        let go = failure.is_none();
        for g in &gos {
            let _ = g.send(go);
        }
        match (failure, info) {
            (Some(e), _) => Err(e.into()),
            (None, Some(info)) => Ok(EngineHandle { tx, ranks, info: Arc::new(info), data_parallel }),
            (None, None) => Err("rank 0's engine did not start".into()),
        }
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Ends every request still open with [`EngineEvent::Unavailable`]`(message)`, from outside
    /// the engine thread, and refuses every later submission ([`SubmitError::Closed`]): for a
    /// server that is shutting down, or about to end the process because a rank stopped while
    /// rank 0's engine waits for it in a collective (and so cannot answer them itself). The
    /// clients then get an error in the API's shape instead of a connection that just closes.
    pub fn fail_requests(&self, message: &str) {
        let senders = {
            let mut open = self.leader().streams.lock().unwrap_or_else(|e| e.into_inner());
            open.closed.get_or_insert_with(|| message.to_string());
            std::mem::take(&mut open.senders)
        };
        for out in senders.iter().filter_map(|w| w.upgrade()) {
            let _ = out.send(EngineEvent::Unavailable { message: message.to_string() });
        }
    }

    /// Counters as of the last step. Under data-parallel attention, the sums of the ranks':
    /// `steps_total` counts each rank's steps with tokens, and the free blocks are the pools'
    /// together (a request still needs room in one rank's pool).
    pub fn stats(&self) -> EngineStats {
        let of = |r: &Shared| *r.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = match self.data_parallel {
            true => self.ranks.iter().fold(EngineStats::default(), |sum, r| sum + of(r)),
            false => of(self.leader()),
        };
        // Preempted requests wait too (for blocks), as vLLM counts them.
        s.waiting = self.leader().waiting.load(Ordering::Relaxed) + s.preempted;
        s
    }

    /// Checks `req` and queues it. Errors are immediate; everything later arrives on the
    /// stream.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream, SubmitError> {
        if let Some(why) = self.leader().stopped() {
            return Err(SubmitError::Stopped(why));
        }
        let info = &self.info;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the vocabulary (ids 0 to {})",
                info.vocab_size.saturating_sub(1)
            )));
        }
        if req.prompt.len() >= info.max_model_len {
            return Err(SubmitError::PromptTooLong {
                prompt_tokens: req.prompt.len(),
                max_model_len: info.max_model_len,
            });
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        let sampler = Sampler::new(req.sampling).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let waiting = self.leader().waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= info.config.max_waiting {
            self.leader().waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting });
        }
        let (out, rx) = unbounded_channel();
        {
            let mut open = self.leader().streams.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = &open.closed {
                self.leader().waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(SubmitError::Closed(why.clone()));
            }
            open.senders.retain(|w| w.strong_count() > 0);
            open.senders.push(out.downgrade());
        }
        let id = self.leader().next_id.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Submitted { id, req, sampler, out }).is_err() {
            self.leader().waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped("the engine thread is gone".into()));
        }
        Ok(RequestStream { rx })
    }
}

/// Every chosen request's sequence, borrowed mutably at once, in batch order.
fn chosen_sequences<'s, B: Backend>(active: &'s mut [Active<B>], chosen: &[(usize, usize)]) -> Vec<&'s mut Sequence> {
    let mut slots: Vec<Option<&mut Active<B>>> = active.iter_mut().map(Some).collect();
    chosen.iter().map(|&(i, _)| &mut slots[i].take().expect("each sequence chosen once").seq).collect()
}

/// One request's rows in a speculative step.
struct StepPart<B: Backend> {
    /// Tokens fed (pending tokens, then drafts), from position `start`.
    feed: Vec<u32>,
    start: usize,
    drafts: Vec<u32>,
    /// The carry before the step, when the request verifies drafts.
    snap: Option<CarrySnapshot<B>>,
}

/// A request the engine is working on.
struct Active<B: Backend> {
    sub: Submitted,
    seq: Sequence,
    /// Prompt then generated tokens: everything that must end up in the state.
    tokens: Vec<u32>,
    generated: usize,
    cached_tokens: usize,
    /// Admission order (preemption takes the youngest first).
    admitted: u64,
    /// The MTP drafting state, when the engine decodes speculatively.
    spec: Option<Speculator<B>>,
    /// Drafts the step being composed verifies for this request.
    drafts: usize,
    /// Whether the step being composed verifies drafts for this request (it has a drafting
    /// state that is ready; perhaps 0 drafts near its end).
    speculating: bool,
}

impl<B: Backend> Active<B> {
    /// Tokens still to feed before the next sample.
    fn pending(&self) -> usize {
        self.tokens.len() - self.seq.pos()
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.sub.req.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated,
        }
    }
}

struct Engine<'a, B: Backend> {
    be: &'a B,
    model: &'a Model<B>,
    cache: KvCache<B>,
    config: EngineConfig,
    info: EngineInfo,
    shared: Arc<Shared>,
    waiting: VecDeque<Submitted>,
    active: Vec<Active<B>>,
    /// Requests preempted for blocks, youngest first: re-admitted before new ones.
    preempted: VecDeque<Active<B>>,
    admissions: u64,
    stats: EngineStats,
    /// This engine's part in a group of ranks ([`crate::replica`]).
    mirror: Mirror,
    /// Its part in a data-parallel group ([`crate::data_parallel`]), where each rank runs
    /// sequences of its own (then `mirror` leads no one).
    dp: Option<DataParallel>,
}

impl<'a, B: Backend> Engine<'a, B> {
    fn new(
        be: &'a B,
        model: &'a Model<B>,
        kv: KvConfig,
        mut config: EngineConfig,
        shared: Arc<Shared>,
        mirror: Mirror,
        dp: Option<DataParallel>,
    ) -> Result<Self, String> {
        match (dp.is_some(), model.rank.layout.layout.data_parallel_attention) {
            (true, false) => {
                return Err("a data-parallel engine needs a model loaded with data-parallel attention".into())
            }
            (false, true) => {
                return Err("a model loaded with data-parallel attention runs in a data-parallel engine \
                            (EngineHandle::spawn_data_parallel): each rank its own sequences"
                    .into())
            }
            _ => {}
        }
        if config.speculative_tokens > 0 {
            // First: a split model does not load its MTP block, so the next check would blame
            // the checkpoint.
            if mirror.is_replicated() || dp.is_some() {
                return Err("--speculative-tokens runs on one device for now; drop it or --devices".into());
            }
            if model.mtp.is_none() {
                return Err("--speculative-tokens drafts with the checkpoint's MTP block (mtp.0.*), which this \
                            checkpoint does not have (transformers drops it when it saves a model); drop \
                            --speculative-tokens"
                    .into());
            }
            let k = config.speculative_tokens;
            if k > dsv4_core::speculative::MAX_SPECULATIVE_TOKENS || k + 1 > config.max_num_batched_tokens {
                return Err(format!(
                    "--speculative-tokens {k}: a verify step feeds k + 1 tokens, so k must be at most {} and below \
                     --max-num-batched-tokens ({})",
                    dsv4_core::speculative::MAX_SPECULATIVE_TOKENS,
                    config.max_num_batched_tokens
                ));
            }
        }
        let cache = model.new_cache(be, kv).map_err(|e| e.to_string())?;
        let cfg = &model.cfg;
        let capacity = kv.token_capacity(cfg).unwrap_or(usize::MAX);
        let max_model_len = match config.max_model_len {
            0 => cfg.max_position_embeddings.min(capacity),
            n if n > cfg.max_position_embeddings => {
                return Err(format!(
                    "--max-model-len {n} is longer than the model's context ({} positions)",
                    cfg.max_position_embeddings
                ))
            }
            n if n > capacity => {
                return Err(format!(
                    "--max-model-len {n} does not fit the KV cache, which holds {capacity} tokens; raise \
                     --kv-cache-memory or lower --max-model-len"
                ))
            }
            n => n,
        };
        config.max_model_len = max_model_len;
        config.prefill_chunk = config.prefill_chunk.min(config.max_num_batched_tokens);
        let info = EngineInfo {
            backend: be.describe(),
            vocab_size: cfg.vocab_size,
            max_model_len,
            kv,
            kv_bytes: cache.device_bytes(),
            config,
        };
        let mut engine = Engine {
            be,
            model,
            cache,
            config,
            info,
            shared,
            waiting: VecDeque::new(),
            active: vec![],
            preempted: VecDeque::new(),
            admissions: 0,
            stats: EngineStats::default(),
            mirror,
            dp,
        };
        engine.publish();
        Ok(engine)
    }

    /// The engine loop: until every handle is dropped (or, on several ranks, a rank fails).
    /// Returns why it stopped; every request still queued, preempted or running then gets that
    /// reason as its error (not a stream that just ends).
    fn run(&mut self, rx: mpsc::Receiver<Submitted>) -> String {
        // A panic (a bug, or a backend that gave up) stops the engine like a failed step: the
        // requests get its message and the handle sees it, rather than streams that just end.
        let (why, panicked) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(&rx))) {
            Ok(why) => (why, false),
            Err(p) => (format!("the engine thread panicked: {}", dsv4_core::parallel::panic_message(p.as_ref())), true),
        };
        // Stopped before the queue is drained: a request submitted from now on is refused, not
        // queued behind a drain that has passed.
        self.shared.stop(why.clone());
        let message = format!("the engine has stopped: {why}");
        let waiting: Vec<Submitted> = self.waiting.drain(..).chain(rx.try_iter()).collect();
        for s in waiting {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let usage = Usage { prompt_tokens: s.req.prompt.len(), ..Default::default() };
            let _ = s.out.send(EngineEvent::Error { message: message.clone(), usage });
        }
        for mut a in self.preempted.drain(..).chain(std::mem::take(&mut self.active)) {
            // After a panic the cache may be inconsistent (releasing could panic again); it is
            // dropped with the engine anyway.
            if !panicked {
                self.cache.release(&mut a.seq);
            }
            let _ = a.sub.out.send(EngineEvent::Error { message: message.clone(), usage: a.usage() });
        }
        why
    }

    /// [`Engine::run`]'s loop: one iteration's inputs, one step, until the engine stops.
    fn serve(&mut self, rx: &mpsc::Receiver<Submitted>) -> String {
        loop {
            if let Err(why) = self.begin_iteration(rx) {
                return why;
            }
            let progressed = match self.step() {
                Ok(p) => p,
                Err(why) => return why,
            };
            self.publish();
            if !progressed && self.active.is_empty() {
                // Nothing runs and the head of the queue (a preempted request first) cannot be
                // admitted: it never will be. (A data-parallel rank holding nothing comes here
                // too, with nothing to fail.)
                const TOO_SMALL: &str =
                    "the KV cache is too small for this request even with nothing else running; raise \
                     --kv-cache-memory";
                if let Some(a) = self.preempted.pop_front() {
                    self.stats.requests_failed_total += 1;
                    self.publish();
                    let _ = a.sub.out.send(EngineEvent::Error { message: TOO_SMALL.into(), usage: a.usage() });
                } else if let Some(s) = self.waiting.pop_front() {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.stats.requests_failed_total += 1;
                    self.publish();
                    let _ = s.out.send(EngineEvent::Error {
                        message: TOO_SMALL.into(),
                        usage: Usage { prompt_tokens: s.req.prompt.len(), ..Default::default() },
                    });
                }
            } else if !progressed {
                // Waiting for blocks that running requests will free; do not spin.
                std::thread::sleep(Duration::from_millis(1));
            }
            let held = self.held();
            if let Some(Err(why)) = self.dp.as_mut().map(|dp| dp.report(held)) {
                return why;
            }
        }
    }

    /// Requests this engine holds: queued, preempted or running.
    fn held(&self) -> usize {
        self.waiting.len() + self.preempted.len() + self.active.len()
    }

    /// Whether a failed step stops the engine: on several ranks it leaves their states apart.
    fn in_group(&self) -> bool {
        self.mirror.is_replicated() || self.dp.is_some()
    }

    fn publish(&mut self) {
        let (cu, wu) = self.cache.used_blocks();
        let (cf, wf) = self.cache.available_blocks();
        let s = &mut self.stats;
        s.running = self.active.len();
        s.preempted = self.preempted.len();
        s.compressed_blocks_used = cu;
        s.compressed_blocks_free = cf;
        s.window_blocks_used = wu;
        s.window_blocks_free = wf;
        s.prefix_cache_queries_total = self.cache.stats.prefix_queries;
        s.prefix_cache_hits_total = self.cache.stats.prefix_hits;
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = *s;
    }

    /// The iteration's inputs: the requests that arrived and the requests whose client left.
    /// The leader reads them (blocking while it has nothing to do) and tells the followers; a
    /// follower receives them from the leader. Under data-parallel attention the leader shares
    /// the arrivals out (blocking only while no rank holds a request) and a follower receives
    /// its share; each notices its own clients that left. Err(why) stops the engine.
    fn begin_iteration(&mut self, rx: &mpsc::Receiver<Submitted>) -> Result<(), String> {
        if let Mirror::Follow(ticks) = &self.mirror {
            let (arrived, cancelled) = match ticks.recv() {
                Ok(Tick::Begin { arrived, cancelled }) => (arrived, cancelled),
                Ok(Tick::After { .. }) => return Err("this rank's engine is out of step with rank 0's".into()),
                Err(_) => return Err("rank 0's engine stopped".into()),
            };
            for (id, req) in arrived {
                self.shared.waiting.fetch_add(1, Ordering::SeqCst);
                self.waiting.push_back(Submitted::replica(id, req)?);
            }
            self.drop_ids(&cancelled);
            return Ok(());
        }
        if let Some(dp @ DataParallel::Follow { .. }) = &self.dp {
            // A data-parallel follower: the leader's share for this iteration starts it.
            let share = dp.receive()?;
            self.waiting.extend(share);
            let cancelled = self.cancelled_ids();
            self.drop_ids(&cancelled);
            return Ok(());
        }
        let mut arrived = vec![];
        // Under data-parallel attention the leader waits only when no rank holds a request.
        let others_busy = self.dp.as_ref().is_some_and(|dp| dp.followers_busy());
        if self.held() == 0 && !others_busy {
            match rx.recv() {
                Ok(s) => arrived.push(s),
                Err(_) => return Err("every handle was dropped".into()),
            }
        }
        while let Ok(s) = rx.try_recv() {
            arrived.push(s);
        }
        let told: Vec<(u64, GenerationRequest)> = match self.mirror.is_replicated() {
            true => arrived.iter().map(|s| (s.id, s.req.clone())).collect(),
            false => vec![],
        };
        let held = self.held();
        let arrived = match &mut self.dp {
            Some(dp) => match dp.share(arrived, held) {
                Ok(mine) => mine,
                Err((why, unsent)) => {
                    // Kept, so that stopping answers each with the error.
                    self.waiting.extend(unsent);
                    return Err(why);
                }
            },
            None => arrived,
        };
        self.waiting.extend(arrived);
        let cancelled = self.cancelled_ids();
        if !self.mirror.tell(|| Tick::Begin { arrived: told.clone(), cancelled: cancelled.clone() }) {
            return Err("the engine of another rank stopped".into());
        }
        self.drop_ids(&cancelled);
        Ok(())
    }

    /// Requests whose stream was dropped.
    fn cancelled_ids(&self) -> Vec<u64> {
        let waiting = self.waiting.iter().filter(|s| s.out.is_closed()).map(|s| s.id);
        let preempted = self.preempted.iter().filter(|a| a.sub.out.is_closed()).map(|a| a.sub.id);
        let active = self.active.iter().filter(|a| a.sub.out.is_closed()).map(|a| a.sub.id);
        waiting.chain(preempted).chain(active).collect()
    }

    /// Cancels the requests `ids`: their blocks go back at once.
    fn drop_ids(&mut self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !ids.contains(&s.id));
        let gone = before - self.waiting.len();
        self.shared.waiting.fetch_sub(gone, Ordering::SeqCst);
        let mut cancelled = gone as u64;
        let before = self.preempted.len();
        self.preempted.retain(|a| !ids.contains(&a.sub.id));
        cancelled += (before - self.preempted.len()) as u64;
        let mut i = 0;
        while i < self.active.len() {
            if ids.contains(&self.active[i].sub.id) {
                let mut a = self.active.swap_remove(i);
                self.cache.release(&mut a.seq);
                cancelled += 1;
            } else {
                i += 1;
            }
        }
        self.stats.requests_cancelled_total += cancelled;
    }

    /// Moves a request from the queue into the batch: reuses its cached prefix.
    fn admit(&mut self, sub: Submitted) -> Active<B> {
        let mut seq = self.cache.new_sequence();
        let cached = self.cache.reuse_prefix(&mut seq, &sub.req.prompt).unwrap_or(0);
        let spec = self.speculator(&mut seq, &sub.req.prompt);
        self.admissions += 1;
        self.stats.prompt_tokens_total += sub.req.prompt.len() as u64;
        let _ = sub.out.send(EngineEvent::Admitted { cached_tokens: cached });
        Active {
            tokens: sub.req.prompt.clone(),
            sub,
            seq,
            generated: 0,
            cached_tokens: cached,
            admitted: self.admissions,
            spec,
            drafts: 0,
            speculating: false,
        }
    }

    /// A drafting state for a request whose sequence `seq` starts from `tokens[..seq.pos()]`
    /// (a cached prefix), when the engine speculates. None when it does not, or when the MTP
    /// block's own small pool cannot be allocated (the request then decodes plainly).
    fn speculator(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Option<Speculator<B>> {
        let k = self.config.speculative_tokens;
        if k == 0 {
            return None;
        }
        let dtype = self.cache.config.dtype;
        match Speculator::new(self.be, self.model, k, self.config.prefill_chunk, dtype) {
            Ok(mut s) => {
                s.restart_at(seq.pos(), tokens);
                seq.set_rollback_depth(s.main_rollback_depth());
                Some(s)
            }
            Err(e) => {
                eprintln!("dsv4: speculative decoding off for one request: {e}");
                None
            }
        }
    }

    /// Preempts (by recomputation) the youngest request admitted after `active[keep]`: its
    /// blocks are released at once and it waits, ahead of new requests, to be fed again from
    /// its cached prefix. Returns false if there is none.
    fn preempt_younger(&mut self, keep: usize) -> bool {
        let after = self.active[keep].admitted;
        let victim = (0..self.active.len())
            .filter(|&i| self.active[i].admitted > after)
            .max_by_key(|&i| self.active[i].admitted);
        let Some(v) = victim else { return false };
        let mut a = self.active.remove(v);
        self.cache.release(&mut a.seq);
        self.stats.preemptions_total += 1;
        self.preempted.push_front(a);
        true
    }

    /// Composes and runs one step. Returns whether any tokens were computed; Err(why) stops
    /// the engine.
    fn step(&mut self) -> Result<bool, String> {
        // Decoding and part-prefilled requests first (oldest first), then new admissions.
        self.active.sort_by_key(|a| a.admitted);
        let mut plan = scheduler::StepBudget::new(&self.cache, &self.config);
        let mut chosen: Vec<(usize, usize)> = vec![]; // (active index, tokens this step)
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            // A speculating request past its prompt feeds its pending tokens and its drafts.
            // (One that was preempted prefills again first: its MTP block needs the rows.)
            let decoding = a.spec.as_ref().is_some_and(|s| a.generated > 0 && s.ready(a.tokens.len()));
            a.drafts = match &a.spec {
                Some(s) if decoding => s.drafts_for(
                    &a.seq,
                    a.tokens.len(),
                    (a.sub.req.max_tokens - a.generated - 1)
                        .min(self.info.max_model_len.saturating_sub(a.tokens.len()))
                        // The token budget left: a request never waits for room for all k.
                        .min(plan.tokens.saturating_sub(a.pending())),
                ),
                _ => 0,
            };
            let take = if decoding { a.pending() + a.drafts } else { a.pending().min(self.config.prefill_chunk) };
            a.speculating = decoding;
            let a = &self.active[i];
            let need = self.cache.blocks_needed(&a.seq, take);
            match plan.try_take(Candidate { tokens: take, blocks: need }) {
                scheduler::Decision::Take => chosen.push((i, take)),
                scheduler::Decision::NoTokenBudget | scheduler::Decision::NoSeqBudget => {}
                scheduler::Decision::NoBlocks => {
                    // Make room by preempting the youngest request admitted after this one,
                    // then compose the step again.
                    if self.preempt_younger(i) {
                        chosen.clear();
                        plan = scheduler::StepBudget::new(&self.cache, &self.config);
                        i = 0;
                        continue;
                    }
                    if i == 0 {
                        // The oldest request alone does not fit the pool: it never will.
                        let mut a = self.active.remove(0);
                        self.cache.release(&mut a.seq);
                        self.stats.requests_failed_total += 1;
                        let _ = a.sub.out.send(EngineEvent::Error {
                            message: "the KV cache is full with this request alone; raise --kv-cache-memory or \
                                      lower --max-model-len"
                                .into(),
                            usage: a.usage(),
                        });
                        chosen.clear();
                        plan = scheduler::StepBudget::new(&self.cache, &self.config);
                        continue;
                    }
                }
            }
            i += 1;
        }
        // Preempted requests come back first, then new ones, first come first served, while
        // their prompts fit.
        let bt = self.cache.config.block_tokens;
        let depth = match self.config.speculative_tokens {
            0 => 0,
            k => dsv4_core::speculative::rollback_depth(k),
        };
        let per_seq_windows =
            KvConfig::window_blocks_per_sequence(&self.model.cfg, bt, self.config.prefill_chunk + depth);
        loop {
            if self.active.len() >= self.config.max_num_seqs {
                break;
            }
            let prompt = match (self.preempted.front(), self.waiting.front()) {
                (Some(a), _) => a.tokens.len(),
                (None, Some(s)) => s.req.prompt.len(),
                (None, None) => break,
            };
            let (comp, win) = self.cache.blocks_needed(&self.cache.new_sequence(), prompt);
            if !plan.admits((comp, win.min(per_seq_windows)), self.active.len()) {
                break;
            }
            if !plan.fits(Candidate { tokens: prompt.min(self.config.prefill_chunk), blocks: (0, 0) }) {
                break;
            }
            let a = match self.preempted.pop_front() {
                Some(mut a) => {
                    let _ = self.cache.reuse_prefix(&mut a.seq, &a.tokens);
                    if let Some(spec) = &mut a.spec {
                        spec.restart_at(a.seq.pos(), &a.tokens);
                    }
                    a
                }
                None => {
                    let sub = self.waiting.pop_front().expect("non-empty");
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.admit(sub)
                }
            };
            let take = a.pending().min(self.config.prefill_chunk);
            let need = self.cache.blocks_needed(&a.seq, take);
            // Admitted requests prefill first (a preempted one feeds its tokens again).
            let mut a = a;
            (a.speculating, a.drafts) = (false, 0);
            self.active.push(a);
            if plan.try_take(Candidate { tokens: take, blocks: need }) == scheduler::Decision::Take {
                chosen.push((self.active.len() - 1, take));
            }
        }
        if chosen.is_empty() {
            if self.dp.is_some() {
                // Other ranks may step: this one's experts serve their tokens.
                self.model.idle_step(self.be).map_err(|e| format!("model step failed: {e}"))?;
            }
            return Ok(false);
        }
        self.run_step(&chosen)?;
        Ok(true)
    }

    /// Runs the model on the chosen rows, then samples (leader) or takes the leader's tokens
    /// (follower). Err(why) stops the engine: a failed step of a multi-rank engine, or a rank
    /// that stopped.
    fn run_step(&mut self, chosen: &[(usize, usize)]) -> Result<(), String> {
        if chosen.iter().any(|&(i, _)| self.active[i].spec.is_some()) {
            return self.run_speculative_step(chosen);
        }
        let parts: Vec<(Vec<u32>, usize)> = chosen
            .iter()
            .map(|&(i, take)| {
                let a = &self.active[i];
                let pos = a.seq.pos();
                (a.tokens[pos..pos + take].to_vec(), pos)
            })
            .collect();
        let refs: Vec<(&[u32], usize)> = parts.iter().map(|(t, p)| (t.as_slice(), *p)).collect();
        let result = Batch::new(&refs).and_then(|batch| {
            let mut seqs = chosen_sequences(&mut self.active, chosen);
            let logits = self.model.step(self.be, &batch, &mut self.cache, &mut seqs, Logits::LastPerSequence)?;
            self.be.download(&logits)
        });
        self.stats.steps_total += 1;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The chosen sequences' state is undefined now: fail them; others go on.
                let message = format!("model step failed: {e}");
                self.fail_chosen(chosen, &message);
                // On several ranks a failed step (a collective that failed, a rank that died)
                // leaves the ranks' states apart: stop, so every request gets this error.
                return if self.in_group() { Err(message) } else { Ok(()) };
            }
        };
        if let Mirror::Follow(ticks) = &self.mirror {
            let (tokens, ended) = match ticks.recv() {
                Ok(Tick::After { tokens, ended }) => (tokens, ended),
                Ok(Tick::Begin { .. }) => return Err("this rank's engine is out of step with rank 0's".into()),
                Err(_) => return Err("rank 0's engine stopped".into()),
            };
            for (id, token) in tokens {
                if let Some(a) = self.active.iter_mut().find(|a| a.sub.id == id) {
                    a.tokens.push(token);
                    a.generated += 1;
                }
            }
            let mut i = 0;
            while i < self.active.len() {
                if ended.contains(&self.active[i].sub.id) {
                    let mut a = self.active.swap_remove(i);
                    self.cache.release(&mut a.seq);
                } else {
                    i += 1;
                }
            }
            self.publish();
            return Ok(());
        }
        let vocab = self.info.vocab_size;
        let mut sampled = vec![];
        let mut finished = vec![];
        for (k, &(i, _)) in chosen.iter().enumerate() {
            let a = &mut self.active[i];
            if a.pending() > 0 {
                continue; // mid-prompt: no token yet
            }
            let row = &logits[k * vocab..(k + 1) * vocab];
            let id = a.sub.sampler.sample(row);
            sampled.push((a.sub.id, id));
            if let Some(end) = self.deliver(i, id, row) {
                finished.push((i, end));
            }
        }
        self.end_step(finished, sampled)
    }

    /// Fails every chosen request of a step that failed (their state is undefined now).
    fn fail_chosen(&mut self, chosen: &[(usize, usize)], message: &str) {
        let mut failed: Vec<usize> = chosen.iter().map(|&(i, _)| i).collect();
        failed.sort_unstable_by(|a, b| b.cmp(a));
        for i in failed {
            let mut a = self.active.swap_remove(i);
            self.cache.release(&mut a.seq);
            self.stats.requests_failed_total += 1;
            let _ = a.sub.out.send(EngineEvent::Error { message: message.to_string(), usage: a.usage() });
        }
    }

    /// Hands request `i` its next token `id`, chosen from logits `row`. Returns how the
    /// request ends when it does: `Some(reason)`, or `None` when its client is gone.
    fn deliver(&mut self, i: usize, id: u32, row: &[f32]) -> Option<Option<FinishReason>> {
        let a = &mut self.active[i];
        let lp = a.sub.req.logprobs.map(|n| token_logprobs(row, id, n));
        a.tokens.push(id);
        a.generated += 1;
        self.stats.generation_tokens_total += 1;
        let delivered = a.sub.out.send(EngineEvent::Token { id, logprobs: lp }).is_ok();
        let reason = if a.sub.req.stop_token_ids.contains(&id) {
            Some(FinishReason::Stop)
        } else if a.generated >= a.sub.req.max_tokens {
            Some(FinishReason::Length)
        } else if a.tokens.len() >= self.info.max_model_len {
            Some(FinishReason::ContextLength)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.stats.requests_finished_total += 1;
            Some(Some(reason))
        } else if !delivered {
            self.stats.requests_cancelled_total += 1;
            Some(None) // the client is gone
        } else {
            None
        }
    }

    /// Ends a step: the `finished` requests (active index, reason; None = cancelled) leave,
    /// followers hear the `sampled` tokens.
    fn end_step(
        &mut self,
        mut finished: Vec<(usize, Option<FinishReason>)>,
        sampled: Vec<(u64, u32)>,
    ) -> Result<(), String> {
        // Blocks go back and the counters are published before `Finished` is sent, so a
        // client that has seen its request finish sees its blocks free too.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        let ended: Vec<u64> = finished.iter().map(|&(i, _)| self.active[i].sub.id).collect();
        let followers_up = self.mirror.tell(|| Tick::After { tokens: sampled.clone(), ended: ended.clone() });
        let mut done = vec![];
        for (i, reason) in finished {
            let mut a = self.active.swap_remove(i);
            self.cache.release(&mut a.seq);
            done.push((a, reason));
        }
        self.publish();
        for (a, reason) in done {
            if let Some(reason) = reason {
                let _ = a.sub.out.send(EngineEvent::Finished { reason, usage: a.usage() });
            }
        }
        if !followers_up {
            return Err("the engine of another rank stopped".into());
        }
        Ok(())
    }

    /// [`run_step`](Self::run_step) for a batch with speculating requests (one device):
    /// each decoding one drafts with its MTP block, feeds its pending tokens and the drafts,
    /// and keeps the longest accepted prefix plus the main model's own next token
    /// ([`Speculator::judge`]); prefilling ones hand their residual rows to their MTP block;
    /// the others run as in a plain step.
    fn run_speculative_step(&mut self, chosen: &[(usize, usize)]) -> Result<(), String> {
        let (be, model) = (self.be, self.model);
        let mut parts: Vec<StepPart<B>> = vec![];
        let mut rows = vec![];
        for &(i, take) in chosen {
            let a = &mut self.active[i];
            let pos = a.seq.pos();
            let base: usize = parts.iter().map(|p| p.feed.len()).sum();
            if let (Some(spec), true) = (&mut a.spec, a.speculating) {
                let drafted = (|| -> dsv4_core::Result<(Vec<u32>, CarrySnapshot<B>)> {
                    let drafts = match spec.push(be, model, None, &a.tokens)? {
                        Some(first) => spec.draft(be, model, first, a.drafts)?,
                        None => vec![],
                    };
                    Ok((drafts, self.cache.snapshot_carry(be, &a.seq)?))
                })();
                match drafted {
                    Ok((drafts, snap)) => {
                        let mut feed = a.tokens[pos..].to_vec();
                        feed.extend_from_slice(&drafts);
                        rows.extend(base + a.tokens.len() - 1 - pos..base + feed.len());
                        parts.push(StepPart { feed, start: pos, drafts, snap: Some(snap) });
                        continue;
                    }
                    Err(e) => {
                        // Its main state is untouched: it decodes plainly from here.
                        eprintln!("dsv4: speculative decoding off for one request: {e}");
                        (a.spec, a.speculating) = (None, false);
                    }
                }
            }
            let feed = a.tokens[pos..(pos + take).min(a.tokens.len())].to_vec();
            rows.push(base + feed.len() - 1);
            parts.push(StepPart { feed, start: pos, drafts: vec![], snap: None });
        }
        let result = (|| -> dsv4_core::Result<(Vec<f32>, B::Tensor)> {
            let refs: Vec<(&[u32], usize)> = parts.iter().map(|p| (p.feed.as_slice(), p.start)).collect();
            let batch = Batch::new(&refs)?;
            let mut seqs = chosen_sequences(&mut self.active, chosen);
            let (logits, h) = model.step_rows(be, &batch, &mut self.cache, &mut seqs, &rows)?;
            Ok((be.download(&logits)?, h))
        })();
        self.stats.steps_total += 1;
        let (logits, h) = match result {
            Ok(x) => x,
            Err(e) => {
                let message = format!("model step failed: {e}");
                self.fail_chosen(chosen, &message);
                return Ok(());
            }
        };
        let vocab = self.info.vocab_size;
        let (mut sampled, mut finished) = (vec![], vec![]);
        let (mut row_end, mut h_end) = (0, 0);
        for (&(i, _), StepPart { feed, start: pos, drafts, snap }) in chosen.iter().zip(parts) {
            let snap_taken = snap.is_some();
            let n_rows = if snap_taken { drafts.len() + 1 } else { 1 };
            let (row0, h0) = (row_end, h_end);
            (row_end, h_end) = (row0 + n_rows, h0 + feed.len());
            let logit_rows = &logits[row0 * vocab..(row0 + n_rows) * vocab];
            // This request's residual rows, for its MTP block (copied only if it has one).
            let h_rows = || be.narrow(&h, 0, h0, feed.len()).map_err(|e| e.to_string());
            let a = &mut self.active[i];
            let verdict = match (snap, &mut a.spec) {
                (Some(snap), Some(spec)) => h_rows().and_then(|h| {
                    spec.judge(
                        be,
                        &mut self.cache,
                        &mut a.seq,
                        &a.tokens,
                        &drafts,
                        logit_rows,
                        &h,
                        snap,
                        &mut a.sub.sampler,
                    )
                    .map_err(|e| e.to_string())
                }),
                (_, spec) => {
                    // Prefill chunk (or plain request): the MTP block takes its residual rows.
                    if let Some(spec) = spec {
                        let fed = h_rows()
                            .and_then(|h| spec.push(be, model, Some((&h, pos)), &a.tokens).map_err(|e| e.to_string()));
                        if let Err(e) = fed {
                            a.spec = None; // decode plainly from here
                            eprintln!("dsv4: speculative decoding off for one request: {e}");
                        }
                    }
                    if a.pending() > 0 {
                        continue; // mid-prompt: no token yet
                    }
                    let id = a.sub.sampler.sample(logit_rows);
                    Ok(dsv4_core::speculative::Verdict { tokens: vec![id], accepted: 0 })
                }
            };
            let verdict = match verdict {
                Ok(v) => v,
                Err(e) => {
                    // This request's state is undefined now: it fails, the others go on.
                    self.stats.requests_failed_total += 1;
                    let _ = a.sub.out.send(EngineEvent::Error {
                        message: format!("speculative step failed: {e}"),
                        usage: a.usage(),
                    });
                    finished.push((i, None));
                    continue;
                }
            };
            if snap_taken {
                self.stats.spec_draft_tokens_total += drafts.len() as u64;
                self.stats.spec_accepted_tokens_total += verdict.accepted as u64;
            }
            for (j, id) in verdict.tokens.into_iter().enumerate() {
                sampled.push((self.active[i].sub.id, id));
                if let Some(end) = self.deliver(i, id, &logit_rows[j * vocab..(j + 1) * vocab]) {
                    finished.push((i, end));
                    break;
                }
            }
        }
        self.end_step(finished, sampled)
    }
}
