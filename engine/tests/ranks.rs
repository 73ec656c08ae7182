//! One engine over several ranks (`dsv4 serve --devices N` on the CPU backend): rank 0's
//! engine serves, the others replay its decisions, and the model's collectives join them. The
//! answers equal one device's, through batching, preemption, prefix reuse and cancellation; a
//! rank that dies stops the engine with a clear error instead of a hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::kv::{KvConfig, KvDtype};
use dsv4_core::parallel::{Communicator, LocalComm, ParallelLayout, RankContext, Traffic};
use dsv4_core::sampling::SamplingParams;
use dsv4_core::{builtin, Backend, Model, ModelConfig};
use dsv4_engine::{
    EngineConfig, EngineEvent, EngineHandle, FinishReason, GenerationRequest, RankBuild, RequestStream, SubmitError,
};

type Kv = fn(&ModelConfig) -> KvConfig;

/// An engine over `builtin:tiny` split `world`/`tp`/`ep`; rank `dies.0` panics at its
/// `dies.1`-th expert combine, like a worker that dies mid-step.
fn ranked(config: EngineConfig, split: (usize, usize, usize), kv: Kv, dies: Option<(usize, usize)>) -> EngineHandle {
    ranked_on(config, split, kv, dies, false)
}

/// What the ranks of a data-parallel engine did: under data-parallel attention each all-gather
/// is a step's agreement on the group's largest batch, to which each rank gives its tokens.
#[derive(Default)]
struct Agreements {
    /// All-gathers, every rank's.
    calls: AtomicUsize,
    /// Tokens each rank stepped (its contributions), by rank.
    tokens: [AtomicUsize; 4],
}

/// An engine over `builtin:tiny` with data-parallel attention on `world` ranks (EP `world`, at
/// most 4): each rank its own sequences. Rank `dies.0` panics at its `dies.1`-th expert
/// exchange; `seen` records the steps' agreements.
fn data_parallel(
    config: EngineConfig,
    world: usize,
    kv: Kv,
    dies: Option<(usize, usize)>,
    seen: Arc<Agreements>,
) -> EngineHandle {
    let (cfg, _) = builtin::tiny().unwrap();
    let layout = ParallelLayout::new(world, 1, world, &cfg).unwrap().with_data_parallel_attention().unwrap();
    let builds: Vec<RankBuild<CpuBackend>> = LocalComm::world(world)
        .into_iter()
        .enumerate()
        .map(|(rank, world_comm)| {
            let seen = seen.clone();
            Box::new(move || {
                let be = CpuBackend::new();
                let (cfg, ckpt) = builtin::tiny()?;
                let mut ctx = RankContext::new(layout.rank(rank), &world_comm as &dyn Communicator<CpuBackend>)?;
                let dies_at = dies.filter(|d| d.0 == rank).map(|d| AtomicUsize::new(d.1));
                let inner = ctx.ep.take().expect("the test splits experts");
                ctx.ep = Some(Arc::new(Faulty { inner, dies_at, deaf: false, seen: Some(seen) }));
                let model = Model::load_rank(&be, cfg, &ckpt, &mut |_, _, _| {}, ctx)?;
                let kv = kv(&model.cfg);
                Ok((be, model, kv))
            }) as RankBuild<CpuBackend>
        })
        .collect();
    EngineHandle::spawn_data_parallel(config, builds).expect("engine starts")
}

/// [`ranked`]; with `deaf`, a rank whose expert collective fails waits for ever instead of
/// returning the error, as on NCCL's blocking communicators when a peer is gone.
fn ranked_on(
    config: EngineConfig,
    (world, tp, ep): (usize, usize, usize),
    kv: Kv,
    dies: Option<(usize, usize)>,
    deaf: bool,
) -> EngineHandle {
    let (cfg, _) = builtin::tiny().unwrap();
    let layout = ParallelLayout::new(world, tp, ep, &cfg).unwrap();
    let builds: Vec<RankBuild<CpuBackend>> = LocalComm::world(world)
        .into_iter()
        .enumerate()
        .map(|(rank, world_comm)| {
            Box::new(move || {
                let be = CpuBackend::new();
                let (cfg, ckpt) = builtin::tiny()?;
                let mut ctx = RankContext::new(layout.rank(rank), &world_comm as &dyn Communicator<CpuBackend>)?;
                let dies_at = dies.filter(|d| d.0 == rank).map(|d| AtomicUsize::new(d.1));
                if dies_at.is_some() || deaf {
                    let inner = ctx.ep.take().expect("the test splits experts");
                    ctx.ep = Some(Arc::new(Faulty { inner, dies_at, deaf, seen: None }));
                }
                let model = Model::load_rank(&be, cfg, &ckpt, &mut |_, _, _| {}, ctx)?;
                let kv = kv(&model.cfg);
                Ok((be, model, kv))
            }) as RankBuild<CpuBackend>
        })
        .collect();
    EngineHandle::spawn_ranks(config, builds).expect("engine starts")
}

fn single(config: EngineConfig, kv: Kv) -> EngineHandle {
    EngineHandle::spawn(config, move || {
        let be = CpuBackend::new();
        let (cfg, ckpt) = builtin::tiny()?;
        let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {})?;
        let kv = kv(&model.cfg);
        Ok((be, model, kv))
    })
    .unwrap()
}

/// A communicator that forwards to `inner`; it panics at its `dies_at`-th all-reduce or
/// all-to-all (a worker that dies mid-step), and when `deaf` a call that fails waits for ever
/// instead of returning the error (what a blocking NCCL communicator does when a peer is gone).
/// `seen` records its all-gathers.
struct Faulty<B: Backend> {
    inner: Arc<dyn Communicator<B>>,
    dies_at: Option<AtomicUsize>,
    deaf: bool,
    seen: Option<Arc<Agreements>>,
}

impl<B: Backend> Faulty<B> {
    fn maybe_die(&self) {
        if self.dies_at.as_ref().is_some_and(|left| left.fetch_sub(1, Ordering::SeqCst) == 1) {
            panic!("worker killed by the test");
        }
    }
}

impl<B: Backend> Faulty<B> {
    fn pass<T>(&self, out: dsv4_core::Result<T>) -> dsv4_core::Result<T> {
        if self.deaf && out.is_err() {
            loop {
                std::thread::park();
            }
        }
        out
    }
}

impl<B: Backend> Communicator<B> for Faulty<B> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum(&self, be: &B, x: &B::Tensor) -> dsv4_core::Result<B::Tensor> {
        self.maybe_die();
        self.pass(self.inner.all_reduce_sum(be, x))
    }
    fn all_gather(&self, be: &B, x: &B::Tensor, dim: usize) -> dsv4_core::Result<B::Tensor> {
        if let Some(seen) = &self.seen {
            seen.calls.fetch_add(1, Ordering::SeqCst);
            if let [tokens] = be.download(x)?[..] {
                seen.tokens[self.inner.rank()].fetch_add(tokens as usize, Ordering::SeqCst);
            }
        }
        self.pass(self.inner.all_gather(be, x, dim))
    }
    fn reduce_scatter_sum(&self, be: &B, x: &B::Tensor, dim: usize) -> dsv4_core::Result<B::Tensor> {
        self.pass(self.inner.reduce_scatter_sum(be, x, dim))
    }
    fn all_to_all_v(&self, be: &B, x: &B::Tensor, rows: &[usize]) -> dsv4_core::Result<(B::Tensor, Vec<usize>)> {
        self.maybe_die();
        self.pass(self.inner.all_to_all_v(be, x, rows))
    }
    fn broadcast(&self, be: &B, x: &B::Tensor, root: usize) -> dsv4_core::Result<B::Tensor> {
        self.pass(self.inner.broadcast(be, x, root))
    }
    fn barrier(&self) -> dsv4_core::Result<()> {
        self.pass(self.inner.barrier())
    }
    fn split(&self, colour: usize) -> dsv4_core::Result<Box<dyn Communicator<B>>> {
        self.inner.split(colour)
    }
    fn traffic(&self) -> Traffic {
        self.inner.traffic()
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens, stop_token_ids: vec![], logprobs: None }
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i.wrapping_mul(2654435761).wrapping_add(seed * 977) >> 9) % 250).collect()
}

/// A request's tokens and how it ended.
type Answer = (Vec<u32>, Result<FinishReason, String>);

fn collect(mut s: RequestStream) -> Answer {
    let mut toks = vec![];
    while let Some(e) = s.blocking_recv() {
        match e {
            EngineEvent::Admitted { .. } => {}
            EngineEvent::Token { id, .. } => toks.push(id),
            EngineEvent::Finished { reason, .. } => return (toks, Ok(reason)),
            EngineEvent::Error { message, .. } | EngineEvent::Unavailable { message } => return (toks, Err(message)),
        }
    }
    panic!("the stream ended without Finished or Error");
}

/// One device's answers to `reqs`, submitted all at once (`together`) or one after another.
fn one_device(reqs: &[GenerationRequest], together: bool) -> Vec<Answer> {
    let e = single(CONFIG, roomy);
    if together {
        let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        streams.into_iter().map(collect).collect()
    } else {
        reqs.iter().map(|r| collect(e.submit(r.clone()).unwrap())).collect()
    }
}

fn roomy(cfg: &ModelConfig) -> KvConfig {
    KvConfig::for_sequences(cfg, KvDtype::F32, 8, 160, 16)
}

/// Four prompts' worth of compressed blocks: growing past their first page preempts.
fn tight(cfg: &ModelConfig) -> KvConfig {
    KvConfig { compressed_blocks: 4, window_blocks: 16, ..KvConfig::for_sequences(cfg, KvDtype::F32, 1, 128, 16) }
}

const CONFIG: EngineConfig = EngineConfig {
    prefill_chunk: 16,
    max_num_batched_tokens: 64,
    max_num_seqs: 64,
    max_model_len: 0,
    max_waiting: 1024,
    speculative_tokens: 0,
};

/// Submits a request whose client leaves after 3 tokens, then `reqs` (on a `tight` pool, so
/// that they preempt each other), and checks their answers are `want` and something was
/// preempted.
fn run_with_a_client_that_leaves(e: &EngineHandle, reqs: &[GenerationRequest], want: &[Answer]) {
    let mut gone = e.submit(greedy(prompt(7, 12), 90)).unwrap();
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut seen = 0;
    while seen < 3 {
        if let Some(EngineEvent::Token { .. }) = gone.blocking_recv() {
            seen += 1;
        }
    }
    drop(gone);
    let got: Vec<_> = streams.into_iter().map(collect).collect();
    assert_eq!(got, want);
    assert!(e.stats().preemptions_total > 0, "nothing was preempted: the test does not test preemption");
}

#[test]
fn a_split_engine_answers_as_one_device_does() {
    let reqs: Vec<_> =
        [5, 40, 17, 1, 33, 9].iter().enumerate().map(|(i, &n)| greedy(prompt(i as u32, n), 14)).collect();
    let want = one_device(&reqs, true);
    for layout in [(2, 1, 2), (4, 2, 2)] {
        let e = ranked(CONFIG, layout, roomy, None);
        let s: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let got: Vec<_> = s.into_iter().map(collect).collect();
        assert_eq!(got, want, "{layout:?}");
        // The same prompt again reuses its cached pages on every rank alike.
        let again = collect(e.submit(reqs[1].clone()).unwrap());
        assert_eq!(again, want[1], "{layout:?} with a reused prefix");
    }
}

/// `dsv4 serve --devices N --data-parallel-attention`: each rank runs the requests rank 0 hands
/// it, the others join its steps with their experts; the answers equal one device's, and an
/// idle engine does not keep stepping.
#[test]
fn a_data_parallel_engine_answers_as_one_device_does_and_rests_when_idle() {
    let reqs: Vec<_> =
        [5, 40, 17, 1, 33, 9, 22].iter().enumerate().map(|(i, &n)| greedy(prompt(i as u32, n), 14)).collect();
    let want = one_device(&reqs, true);
    for world in [2, 4] {
        let seen = Arc::new(Agreements::default());
        let e = data_parallel(CONFIG, world, roomy, None, seen.clone());
        let s: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let got: Vec<_> = s.into_iter().map(collect).collect();
        assert_eq!(got, want, "world {world}");
        let stepped: Vec<usize> = seen.tokens[..world].iter().map(|t| t.load(Ordering::SeqCst)).collect();
        assert!(stepped.iter().all(|&t| t > 0), "world {world}: some rank ran no sequence: {stepped:?}");
        // One at a time too (one rank works, the others serve their experts), with a prefix
        // reused on whichever rank holds it.
        for (r, w) in reqs.iter().zip(&want).take(3) {
            assert_eq!(collect(e.submit(r.clone()).unwrap()), *w, "world {world}, one at a time");
        }
        let s = e.stats();
        assert_eq!((s.requests_finished_total, s.running, s.waiting), (10, 0, 0), "world {world}: {s:?}");
        assert_eq!(s.generation_tokens_total, 10 * 14, "world {world}");
        // Idle: every rank waits (the leader for requests, the others for the leader), so
        // nothing gathers any more.
        // (The last iteration may still be ending: wait until a tenth of a second passes
        // without an all-gather, for at most 10 s.)
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut before = seen.calls.load(Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = seen.calls.load(Ordering::SeqCst);
            if now == before {
                break;
            }
            assert!(Instant::now() < deadline, "world {world}: an idle engine kept stepping");
            before = now;
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(seen.calls.load(Ordering::SeqCst), before, "world {world}: an idle engine kept stepping");
    }
}

#[test]
fn a_data_parallel_engine_preempts_and_cancels_on_each_rank() {
    let reqs: Vec<_> = (0..6).map(|i| greedy(prompt(100 + i, 10), 100)).collect();
    let want = one_device(&reqs, false);
    let e = data_parallel(CONFIG, 2, tight, None, Arc::default());
    run_with_a_client_that_leaves(&e, &reqs, &want);
    let s = e.stats();
    assert_eq!((s.requests_failed_total, s.requests_cancelled_total), (0, 1));
    assert_eq!(collect(e.submit(reqs[0].clone()).unwrap()), want[0]);
}

/// A request queued on a follower (each rank runs one sequence at a time) whose client leaves
/// is dropped there; the group's queue count comes back to 0.
#[test]
fn a_data_parallel_follower_drops_a_queued_request_whose_client_left() {
    let config = EngineConfig { max_num_seqs: 1, ..CONFIG };
    let e = data_parallel(config, 2, roomy, None, Arc::default());
    let reqs: Vec<_> = (0..4).map(|i| greedy(prompt(300 + i, 10), 60)).collect();
    let want = one_device(&reqs, false);
    // In turn: ranks 0, 1, 0, 1; the last two wait behind the first two.
    let mut streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let queued_on_rank_1 = streams.pop().unwrap();
    drop(queued_on_rank_1);
    let got: Vec<_> = streams.into_iter().map(collect).collect();
    assert_eq!(got, want[..3]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.stats().requests_cancelled_total == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = e.stats();
    assert_eq!((s.requests_finished_total, s.requests_cancelled_total, s.waiting, s.running), (3, 1, 0, 0), "{s:?}");
}

#[test]
fn a_data_parallel_rank_that_dies_stops_the_engine_with_an_error() {
    for dies in [0, 1] {
        let e = data_parallel(CONFIG, 2, roomy, Some((dies, 60)), Arc::default());
        let start = Instant::now();
        // Two requests: one on each rank.
        let streams = [e.submit(greedy(prompt(3, 20), 200)).unwrap(), e.submit(greedy(prompt(4, 20), 200)).unwrap()];
        for s in streams {
            let (toks, end) = collect(s);
            let message = end.expect_err("the request fails");
            assert!(message.contains("left the communicator") || message.contains("stopped"), "{message}");
            assert!(toks.len() < 200);
        }
        std::thread::sleep(Duration::from_millis(100));
        let why = e.stopped().expect("the engine stopped");
        assert!(why.contains(&format!("rank {dies}")) || dies == 0, "{why}");
        assert!(matches!(e.submit(greedy(prompt(4, 5), 5)), Err(SubmitError::Stopped(_))));
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn preemption_and_cancellation_replay_on_every_rank() {
    let reqs: Vec<_> = (0..4).map(|i| greedy(prompt(100 + i, 10), 100)).collect();
    let want = one_device(&reqs, false);
    let e = ranked(CONFIG, (2, 2, 2), tight, None);
    run_with_a_client_that_leaves(&e, &reqs, &want);
    let s = e.stats();
    assert_eq!((s.requests_failed_total, s.requests_cancelled_total), (0, 1));
    // Afterwards the ranks are still in step: a new request answers as one device does.
    assert_eq!(collect(e.submit(reqs[0].clone()).unwrap()), want[0]);
}

#[test]
fn a_rank_that_dies_stops_the_engine_with_an_error() {
    let e = ranked(CONFIG, (2, 1, 2), roomy, Some((1, 60)));
    let start = Instant::now();
    let (toks, end) = collect(e.submit(greedy(prompt(3, 20), 200)).unwrap());
    let message = end.expect_err("the request fails");
    assert!(message.contains("rank 1") && message.contains("left the communicator"), "{message}");
    assert!(toks.len() < 200);
    // The engine has stopped: new requests are refused with the reason, at once.
    std::thread::sleep(Duration::from_millis(100));
    match e.submit(greedy(prompt(4, 5), 5)) {
        Err(SubmitError::Stopped(why)) => assert!(why.contains("model step failed"), "{why}"),
        other => panic!("expected Stopped, got {:?}", other.map(|_| "a stream")),
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_rank_that_dies_fails_the_queued_requests_with_its_error_too() {
    // One sequence at a time: the second request is still queued when rank 1 dies.
    let config = EngineConfig { max_num_seqs: 1, ..CONFIG };
    let e = ranked(config, (2, 1, 2), roomy, Some((1, 60)));
    let running = e.submit(greedy(prompt(3, 20), 200)).unwrap();
    let queued = e.submit(greedy(prompt(5, 20), 200)).unwrap();
    for (what, s) in [("running", running), ("queued", queued)] {
        let message = collect(s).1.expect_err("the request fails");
        assert!(message.contains("rank 1") && message.contains("left the communicator"), "{what}: {message}");
    }
}

/// On a communicator that cannot time out (NCCL's), rank 0 waits for ever for a rank that
/// died: the handle still says which rank stopped and why, which is what `dsv4 serve` watches
/// to end the process instead of hanging.
#[test]
fn a_rank_that_dies_while_rank_0_waits_for_ever_is_reported() {
    let e = ranked_on(CONFIG, (2, 1, 2), roomy, Some((1, 60)), true);
    let stream = e.submit(greedy(prompt(3, 20), 200)).unwrap();
    let start = Instant::now();
    while e.stopped().is_none() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = e.stopped().expect("the handle reports the dead rank");
    assert!(why.contains("rank 1's engine stopped") && why.contains("worker killed by the test"), "{why}");
    // Rank 0 is still waiting (this test leaves its thread parked), and its request with it.
    drop(stream);
}

/// `dsv4 serve --nnodes 2` at the engine level: ranks 0-1 (the leader's node) and 2-3 (a
/// follower node, every engine there a follower) as separate engine groups whose only link is
/// the leader's ticks as bytes (here a channel; between processes, `NodeGroup`'s socket). The
/// answers equal one device's, through preemption, prefix reuse and a client that leaves.
#[test]
fn an_engine_over_two_nodes_answers_as_one_device_does() {
    let reqs: Vec<_> = (0..4).map(|i| greedy(prompt(200 + i, 10), 100)).collect();
    let want = one_device(&reqs, false);
    let (cfg, _) = builtin::tiny().unwrap();
    let layout = ParallelLayout::new(4, 2, 2, &cfg).unwrap();
    let mut builds: Vec<RankBuild<CpuBackend>> = LocalComm::world(4)
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            Box::new(move || {
                let be = CpuBackend::new();
                let (cfg, ckpt) = builtin::tiny()?;
                let ctx = RankContext::new(layout.rank(rank), &comm as &dyn Communicator<CpuBackend>)?;
                let model = Model::load_rank(&be, cfg, &ckpt, &mut |_, _, _| {}, ctx)?;
                let kv = tight(&model.cfg);
                Ok((be, model, kv))
            }) as RankBuild<CpuBackend>
        })
        .collect();
    let node1 = builds.split_off(2);
    let (wire_tx, wire_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    // Loading is collective, so the two nodes start at the same time.
    let follower = std::thread::spawn(move || {
        EngineHandle::spawn_followers(CONFIG, node1, Box::new(move || wire_rx.recv().ok())).expect("node 1 starts")
    });
    let sink = Box::new(move |bytes: Vec<u8>| {
        counted.fetch_add(1, Ordering::SeqCst);
        wire_tx.send(bytes).is_ok()
    });
    let e = EngineHandle::spawn_ranks_leading(CONFIG, builds, sink).expect("node 0 starts");
    let node1 = follower.join().unwrap();
    run_with_a_client_that_leaves(&e, &reqs, &want);
    assert_eq!(collect(e.submit(reqs[0].clone()).unwrap()), want[0], "a reused prefix");
    assert!(sent.load(Ordering::SeqCst) > 10, "the ticks went over the wire");
    assert!(node1.stopped().is_none(), "node 1 still runs: {:?}", node1.stopped());
    // The leader's node ends: node 1's engines stop, saying so.
    drop(e);
    let start = Instant::now();
    while node1.stopped().is_none() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = node1.stopped().expect("node 1 stops when the leader's ticks end");
    assert!(why.contains("rank 0's engine stopped"), "{why}");
}

/// A rank whose load panics is reported like one whose load fails (the caller hears which rank
/// and why), and the handle says which rank stopped first when one dies while running.
#[test]
fn a_panicking_load_is_an_error_and_the_first_stop_is_reported() {
    let builds: Vec<RankBuild<CpuBackend>> =
        vec![Box::new(|| panic!("the loader fell over")), Box::new(|| panic!("the loader fell over"))];
    let e = EngineHandle::spawn_ranks(CONFIG, builds).err().expect("the engine does not start");
    let e = e.to_string();
    assert!(e.contains(": loading panicked: the loader fell over"), "{e}");
    // Rank 1 dies first; rank 0 stops because of it: the handle names rank 1's cause.
    let e = ranked(CONFIG, (2, 1, 2), roomy, Some((1, 60)));
    let _ = collect(e.submit(greedy(prompt(3, 20), 200)).unwrap());
    let why = e.stopped().expect("stopped");
    assert!(why.starts_with("rank 1's engine stopped: the engine thread panicked: worker killed by the test"), "{why}");
}
