//! The engine on the CPU backend with the built-in tiny model: batching must not change what
//! a request computes, a full pool makes requests wait or preempt (never corrupts them), a
//! dropped stream frees its blocks, and limits are errors.

use std::time::{Duration, Instant};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::kv::{KvConfig, KvDtype};
use dsv4_core::sampling::SamplingParams;
use dsv4_core::{builtin, Checkpoint, Model, ModelConfig};
use dsv4_engine::{
    EngineConfig, EngineEvent, EngineHandle, FinishReason, GenerationRequest, RequestStream, SubmitError,
};

/// An engine over `builtin:tiny` whose pool holds `seqs` sequences of `tokens` tokens.
fn engine(config: EngineConfig, seqs: usize, tokens: usize) -> EngineHandle {
    engine_with(config, move |cfg| KvConfig::for_sequences(cfg, KvDtype::F32, seqs, tokens, config.prefill_chunk))
}

fn engine_with(config: EngineConfig, kv: impl FnOnce(&ModelConfig) -> KvConfig + Send + 'static) -> EngineHandle {
    spawn(config, builtin::tiny, kv).expect("engine starts")
}

/// Starts an engine over the checkpoint `open` gives, with the pool `kv` sizes; Err says why
/// it did not start.
fn spawn(
    config: EngineConfig,
    open: impl FnOnce() -> dsv4_core::Result<(ModelConfig, Checkpoint)> + Send + 'static,
    kv: impl FnOnce(&ModelConfig) -> KvConfig + Send + 'static,
) -> Result<EngineHandle, dsv4_engine::BuildError> {
    EngineHandle::spawn(config, move || {
        let be = CpuBackend::new();
        let (cfg, ckpt) = open()?;
        let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {})?;
        let kv = kv(&model.cfg);
        Ok((be, model, kv))
    })
}

/// Why an engine over `builtin:tiny` with `config` did not start.
fn tiny_refusal(config: EngineConfig) -> String {
    let kv = |cfg: &ModelConfig| KvConfig::for_sequences(cfg, KvDtype::F32, 1, 64, 16);
    spawn(config, builtin::tiny, kv).err().expect("refused").to_string()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens, stop_token_ids: vec![], logprobs: None }
}

/// A prompt of `n` ids that differs per `seed`.
fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i.wrapping_mul(2654435761).wrapping_add(seed * 977) >> 9) % 250).collect()
}

/// Everything a stream says: the tokens, then how it ended.
fn collect(mut s: RequestStream) -> (Vec<u32>, Result<FinishReason, String>, usize) {
    let (mut toks, mut cached) = (vec![], 0);
    while let Some(e) = s.blocking_recv() {
        match e {
            EngineEvent::Admitted { cached_tokens } => cached = cached_tokens,
            EngineEvent::Token { id, .. } => toks.push(id),
            EngineEvent::Finished { reason, usage } => {
                assert_eq!(usage.completion_tokens, toks.len());
                return (toks, Ok(reason), cached);
            }
            EngineEvent::Error { message, .. } | EngineEvent::Unavailable { message } => {
                return (toks, Err(message), cached)
            }
        }
    }
    panic!("the stream ended without Finished or Error");
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn greedy_output_is_the_same_alone_and_in_a_full_batch() {
    let config = EngineConfig { prefill_chunk: 16, max_num_batched_tokens: 64, ..Default::default() };
    // Twelve decoding together: more rows than the CPU backend's matrix-vector path takes.
    let lens = [5, 40, 17, 1, 64, 33, 9, 70, 2, 28, 45, 12];
    let alone: Vec<_> = {
        let e = engine(config, 1, 128);
        lens.iter().enumerate().map(|(i, &n)| collect(e.submit(greedy(prompt(i as u32, n), 12)).unwrap()).0).collect()
    };
    let e = engine(config, lens.len(), 128);
    let streams: Vec<_> =
        lens.iter().enumerate().map(|(i, &n)| e.submit(greedy(prompt(i as u32, n), 12)).unwrap()).collect();
    let together: Vec<_> = streams.into_iter().map(|s| collect(s).0).collect();
    assert_eq!(alone, together);
    assert!(together.iter().all(|t| t.len() == 12));
    // The prompts ran concurrently: fewer steps than one at a time would take.
    let s = e.stats();
    assert_eq!((s.running, s.waiting, s.requests_finished_total), (0, 0, 12));
    assert!(s.steps_total < 12 * 12, "{} steps", s.steps_total);
}

#[test]
fn a_full_pool_preempts_the_youngest_and_outputs_stay_exact() {
    // Four short prompts are admitted at once, each into one compressed block; the pool has
    // four, so when they grow past their first page the youngest must give theirs up.
    let config = EngineConfig { prefill_chunk: 16, max_num_batched_tokens: 64, ..Default::default() };
    let reqs: Vec<_> = (0..4).map(|i| greedy(prompt(100 + i, 10), 100)).collect();
    let alone: Vec<_> = {
        let e = engine(config, 1, 128);
        reqs.iter().map(|r| collect(e.submit(r.clone()).unwrap()).0).collect()
    };
    let e = engine_with(config, |cfg| KvConfig {
        compressed_blocks: 4,
        window_blocks: 16,
        ..KvConfig::for_sequences(cfg, KvDtype::F32, 1, 128, 16)
    });
    assert_eq!(e.info().kv.block_tokens, 64, "the test assumes 64-token pages");
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let together: Vec<_> = streams.into_iter().map(|s| collect(s).0).collect();
    assert_eq!(alone, together);
    let s = e.stats();
    assert_eq!(s.requests_failed_total, 0);
    assert!(s.preemptions_total > 0, "nothing was preempted: the test does not test preemption");
    assert_eq!((s.compressed_blocks_used, s.window_blocks_used), (0, 0));
}

#[test]
fn a_dropped_stream_is_cancelled_and_frees_its_blocks() {
    let e = engine(EngineConfig::default(), 2, 512);
    let mut s = e.submit(greedy(prompt(7, 30), 400)).unwrap();
    let mut got = 0;
    while got < 3 {
        if let Some(EngineEvent::Token { .. }) = s.blocking_recv() {
            got += 1;
        }
    }
    assert!(e.stats().compressed_blocks_used + e.stats().window_blocks_used > 0);
    drop(s);
    wait_until("the blocks are back", || {
        let s = e.stats();
        s.running == 0 && s.compressed_blocks_used == 0 && s.window_blocks_used == 0
    });
    assert_eq!(e.stats().requests_cancelled_total, 1);
    // The engine goes on serving.
    assert_eq!(collect(e.submit(greedy(prompt(8, 10), 3)).unwrap()).0.len(), 3);
}

#[test]
fn a_repeated_prompt_reuses_its_cached_prefix_with_the_same_output() {
    let e = engine(EngineConfig::default(), 2, 512);
    let p = prompt(9, 300);
    let (first, _, cached) = collect(e.submit(greedy(p.clone(), 8)).unwrap());
    assert_eq!(cached, 0);
    let (second, _, cached) = collect(e.submit(greedy(p, 8)).unwrap());
    assert!(cached > 0, "nothing reused");
    assert_eq!(first, second);
    let s = e.stats();
    assert_eq!(s.prefix_cache_hits_total, cached as u64);
}

#[test]
fn generation_ends_at_a_stop_token_max_tokens_or_the_context() {
    let e = engine(EngineConfig { max_model_len: 40, ..Default::default() }, 1, 64);
    let p = prompt(11, 20);
    let (toks, reason, _) = collect(e.submit(greedy(p.clone(), 5)).unwrap());
    assert_eq!((toks.len(), reason), (5, Ok(FinishReason::Length)));
    let stop = GenerationRequest { stop_token_ids: vec![toks[2]], ..greedy(p.clone(), 5) };
    let (t, reason, _) = collect(e.submit(stop).unwrap());
    assert_eq!(reason, Ok(FinishReason::Stop));
    assert_eq!(t.last(), Some(&toks[2]));
    let (t, reason, _) = collect(e.submit(greedy(p, 100)).unwrap());
    assert_eq!((t.len(), reason), (20, Ok(FinishReason::ContextLength)));
}

#[test]
fn bad_requests_are_refused_up_front() {
    let e = engine(EngineConfig { max_model_len: 40, max_waiting: 2, max_num_seqs: 1, ..Default::default() }, 1, 64);
    assert_eq!(
        e.submit(greedy(prompt(1, 40), 1)).err(),
        Some(SubmitError::PromptTooLong { prompt_tokens: 40, max_model_len: 40 })
    );
    assert!(matches!(e.submit(greedy(vec![], 1)), Err(SubmitError::Invalid(_))));
    assert!(matches!(e.submit(greedy(vec![5, 100_000], 1)), Err(SubmitError::Invalid(m)) if m.contains("100000")));
    assert!(matches!(e.submit(greedy(vec![5], 0)), Err(SubmitError::Invalid(_))));
    let bad_sampling =
        GenerationRequest { sampling: SamplingParams { top_p: 0.0, ..Default::default() }, ..greedy(vec![5], 1) };
    assert!(matches!(e.submit(bad_sampling), Err(SubmitError::Invalid(_))));
    // A request that cannot finish during the test runs; two more wait; the next is refused.
    // (Polling `stats()` for the running request raced with a short request finishing between
    // polls on a busy CI machine; the first token on its own stream is proof that it runs.)
    let e = engine(EngineConfig { max_waiting: 2, max_num_seqs: 1, ..Default::default() }, 1, 4096);
    let mut long = e.submit(greedy(prompt(2, 10), 4000)).unwrap();
    loop {
        match long.blocking_recv() {
            Some(EngineEvent::Token { .. }) => break,
            Some(EngineEvent::Admitted { .. }) => {}
            other => panic!("the long request ended early: {other:?}"),
        }
    }
    let held = [e.submit(greedy(prompt(3, 10), 1)).unwrap(), e.submit(greedy(prompt(4, 10), 1)).unwrap()];
    assert!(matches!(e.submit(greedy(prompt(5, 10), 1)), Err(SubmitError::QueueFull { waiting: 2 })));
    // Dropping the long request's stream cancels it; the two that waited then run.
    drop(long);
    for s in held {
        assert!(collect(s).1.is_ok());
    }
    assert_eq!(e.stats().waiting, 0);
}

#[test]
fn the_engine_reports_why_it_could_not_start() {
    let err = tiny_refusal(EngineConfig { max_model_len: 1 << 30, ..Default::default() });
    assert!(err.contains("--max-model-len"), "{err}");
}

/// `official_fp8` (a checkpoint with an MTP block) from the fixtures.
fn mtp_checkpoint() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases/official_fp8")
}

fn open_mtp_checkpoint() -> dsv4_core::Result<(ModelConfig, Checkpoint)> {
    let dir = mtp_checkpoint();
    Ok((ModelConfig::from_dir(&dir)?, Checkpoint::open(&dir)?))
}

fn mtp_engine(config: EngineConfig, seqs: usize, tokens: usize) -> EngineHandle {
    let kv = move |cfg: &ModelConfig| KvConfig::for_sequences(cfg, KvDtype::F32, seqs, tokens, config.prefill_chunk);
    spawn(config, open_mtp_checkpoint, kv).expect("engine starts")
}

/// Speculative decoding in the engine: requests with drafts and requests still prefilling
/// share steps, and every request's greedy output is the plain engine's, token for token,
/// also for a request that reuses a cached prefix (its MTP block starts without the prefix's
/// rows) and with log-probabilities.
#[test]
fn speculative_decoding_in_the_engine_keeps_greedy_output() {
    let plain = EngineConfig { prefill_chunk: 16, max_num_batched_tokens: 64, ..Default::default() };
    let lens = [5, 40, 17, 1, 64, 33, 9, 70];
    let prompt =
        |i: usize, n: usize| -> Vec<u32> { (0..n as u32).map(|j| 2 + (j * 31 + i as u32 * 17) % 120).collect() };
    let outputs = |config: EngineConfig| -> Vec<Vec<u32>> {
        let e = mtp_engine(config, lens.len() + 1, 256);
        let streams: Vec<_> =
            lens.iter().enumerate().map(|(i, &n)| e.submit(greedy(prompt(i, n), 20)).unwrap()).collect();
        let mut out: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).0).collect();
        // A prompt longer than a page (128 tokens here), then the same again: the second one's
        // first page comes from the prefix cache.
        out.push(collect(e.submit(greedy(prompt(9, 150), 20)).unwrap()).0);
        let again = GenerationRequest { logprobs: Some(2), ..greedy(prompt(9, 150), 20) };
        let (t, reason, cached) = collect(e.submit(again).unwrap());
        assert!(cached > 0, "the second request reused the cached prefix");
        assert_eq!(reason, Ok(FinishReason::Length));
        out.push(t);
        out
    };
    let want = outputs(plain);
    for k in [1, 3] {
        let got = outputs(EngineConfig { speculative_tokens: k, ..plain });
        assert_eq!(got, want, "speculative_tokens = {k}");
    }
}

#[test]
fn speculation_needs_an_mtp_block() {
    let err = tiny_refusal(EngineConfig { speculative_tokens: 2, ..Default::default() });
    assert!(err.contains("MTP block"), "{err}");
}

/// A full pool preempts speculating requests too (their MTP block starts over when they come
/// back, from their cached prefix), and the outputs stay the plain engine's.
#[test]
fn speculating_requests_survive_preemption() {
    let config =
        EngineConfig { prefill_chunk: 16, max_num_batched_tokens: 64, speculative_tokens: 2, ..Default::default() };
    let reqs: Vec<_> = (0..4u32).map(|i| greedy((0..10).map(|j| 2 + (j * 13 + i * 29) % 120).collect(), 130)).collect();
    let alone: Vec<_> = {
        let e = mtp_engine(EngineConfig { speculative_tokens: 0, ..config }, 1, 256);
        reqs.iter().map(|r| collect(e.submit(r.clone()).unwrap()).0).collect()
    };
    let kv = |cfg: &ModelConfig| KvConfig {
        compressed_blocks: 5,
        window_blocks: 16,
        ..KvConfig::for_sequences(cfg, KvDtype::F32, 1, 256, 16)
    };
    let e = spawn(config, open_mtp_checkpoint, kv).expect("engine starts");
    assert_eq!(e.info().kv.block_tokens, 128, "the test assumes 128-token pages");
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let together: Vec<_> = streams.into_iter().map(collect).collect();
    for (i, (t, reason, _)) in together.iter().enumerate() {
        assert_eq!(reason, &Ok(FinishReason::Length), "request {i}");
        assert_eq!(t, &alone[i], "request {i}");
    }
    let s = e.stats();
    assert_eq!(s.requests_failed_total, 0);
    assert!(s.preemptions_total > 0, "nothing was preempted: the test does not test preemption");
    assert!(s.spec_draft_tokens_total > 0);
}

/// A step budget of k + 1 tokens: requests share it, drafts shrink to what is left, nobody
/// waits forever; a budget below k + 1 is refused at start.
#[test]
fn speculation_fits_a_small_step_budget() {
    let config = EngineConfig { prefill_chunk: 4, max_num_batched_tokens: 4, ..Default::default() };
    let reqs: Vec<_> = (0..3u32).map(|i| greedy((0..9).map(|j| 3 + (j * 7 + i * 11) % 120).collect(), 12)).collect();
    let run = |config: EngineConfig| -> Vec<Vec<u32>> {
        let e = mtp_engine(config, 3, 64);
        let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        streams.into_iter().map(|s| collect(s).0).collect()
    };
    assert_eq!(run(EngineConfig { speculative_tokens: 3, ..config }), run(config));
    let kv = |cfg: &ModelConfig| KvConfig::for_sequences(cfg, KvDtype::F32, 1, 64, 4);
    let refused = spawn(EngineConfig { speculative_tokens: 4, ..config }, open_mtp_checkpoint, kv);
    let err = refused.err().expect("refused").to_string();
    assert!(err.contains("--max-num-batched-tokens"), "{err}");
}
