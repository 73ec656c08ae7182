//! Prefix reuse: a sequence that starts from another's cached pages gives exactly (bitwise, on
//! the CPU) the logits a fresh run gives, whether the two prompts diverge inside a CSA window,
//! inside an HCA window, or past the sliding window after the reuse point. V4 needs more than
//! the compressed KV for that: the sliding-window rows and the compressors' carry (the raw rows
//! of the incomplete window and, for CSA, of the window before it) at the reuse point, which
//! live in the cached window block of the last reused page. If either were not restored, the
//! tokens between the reuse point and the divergence would be computed from a wrong state and
//! these comparisons would fail.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::generate::{Control, GenerateOptions, Session};
use dsv4_core::kv::{KvCache, KvConfig, KvDtype, Sequence};
use dsv4_core::model::Logits;
use dsv4_core::sampling::SamplingParams;
use dsv4_core::{Backend, Batch, Model};
use dsv4_tests::{fixtures_dir, load_model, read_reference};

/// `mixed_f32`: window 8, CSA ratio 4, HCA ratio 16; blocks of 16 tokens.
const BLOCK: usize = 16;

fn config(dtype: KvDtype, seqs: usize) -> KvConfig {
    KvConfig { dtype, block_tokens: BLOCK, compressed_blocks: seqs * 8, window_blocks: seqs * 8 }
}

/// Feeds `tokens` to `seq` in steps of `BLOCK` up to position `split`, then the rest in one
/// step; returns the last step's logits.
fn feed<B: Backend>(
    be: &B,
    model: &Model<B>,
    cache: &mut KvCache<B>,
    seq: &mut Sequence,
    tokens: &[u32],
    split: usize,
) -> Vec<f32> {
    let mut last = vec![];
    let mut steps: Vec<(usize, usize)> =
        (seq.pos()..split).step_by(BLOCK).map(|s| (s, (s + BLOCK).min(split))).collect();
    if split < tokens.len() {
        steps.push((split.max(seq.pos()), tokens.len()));
    }
    for (a, b) in steps {
        let batch = Batch::new(&[(&tokens[a..b], a)]).unwrap();
        last = be.download(&model.step(be, &batch, cache, &mut [&mut *seq], Logits::All).unwrap()).unwrap();
    }
    last
}

/// A prompt that shares A's first `d` tokens, then differs (in a way `salt` picks).
fn diverging_with(a: &[u32], d: usize, len: usize, salt: u32) -> Vec<u32> {
    let mut b = a[..d].to_vec();
    b.extend((d..len).map(|i| (a[i % a.len()] + salt + i as u32) % 256));
    b
}

fn diverging(a: &[u32], d: usize, len: usize) -> Vec<u32> {
    diverging_with(a, d, len, 7)
}

fn fresh_run<B: Backend>(be: &B, model: &Model<B>, dtype: KvDtype, tokens: &[u32], split: usize) -> Vec<f32> {
    let mut cache = model.new_cache(be, config(dtype, 1)).unwrap();
    let mut seq = cache.new_sequence();
    feed(be, model, &mut cache, &mut seq, tokens, split)
}

fn check(dtype: KvDtype) {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("mixed_f32");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let a = &ids[..80];
    // (divergence, what it exercises); the reuse point is the last block boundary before it.
    let cases = [
        (50, "inside a CSA window and an HCA window"),
        (52, "at a CSA boundary, inside an HCA window"),
        (60, "past the sliding window after the reuse point"),
        (64, "at a block boundary"),
        (71, "inside a CSA window, second reuse point"),
    ];
    for (d, what) in cases {
        let b = diverging(a, d, 90);
        let reuse_point = (d / BLOCK) * BLOCK;
        // Fresh: B alone, in the same steps up to the reuse point.
        let want = fresh_run(&be, &model, dtype, &b, reuse_point);

        // A runs (and stays live), then B reuses A's pages.
        let mut cache = model.new_cache(&be, config(dtype, 2)).unwrap();
        let mut seq_a = cache.new_sequence();
        feed(&be, &model, &mut cache, &mut seq_a, a, a.len());
        let mut seq_b = cache.new_sequence();
        let reused = cache.reuse_prefix(&mut seq_b, &b).unwrap();
        assert_eq!(reused, reuse_point, "{dtype} d={d}: reused tokens");
        let got = feed(&be, &model, &mut cache, &mut seq_b, &b, reuse_point);
        assert!(got == want, "{dtype} d={d} ({what}): reused run differs from a fresh one");

        // Again after A is released (its full pages stay cached), for a third prompt.
        cache.release(&mut seq_b);
        cache.release(&mut seq_a);
        let c = diverging_with(a, d, 90, 101);
        let mut seq_c = cache.new_sequence();
        assert_eq!(cache.reuse_prefix(&mut seq_c, &c).unwrap(), reuse_point);
        let got = feed(&be, &model, &mut cache, &mut seq_c, &c, reuse_point);
        assert!(got == fresh_run(&be, &model, dtype, &c, reuse_point), "{dtype} d={d} ({what}): reuse after release");
    }
}

#[test]
fn reused_prefixes_equal_fresh_runs_f32() {
    check(KvDtype::F32);
}

#[test]
fn reused_prefixes_equal_fresh_runs_bf16() {
    check(KvDtype::Bf16);
}

#[test]
fn reused_prefixes_equal_fresh_runs_fp8() {
    check(KvDtype::Fp8);
}

/// Reuse needs every page's compressed block and the window block at the reuse point; when the
/// window block has been evicted, reuse falls back to an earlier point (or none), never to a
/// wrong state.
#[test]
fn evicted_window_blocks_shorten_the_reuse() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("mixed_f32");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let a = &ids[..80];
    // Exactly enough window blocks for one running sequence in 16-token steps: A's released
    // window pages are evicted as B allocates its own.
    let cfg = KvConfig { dtype: KvDtype::F32, block_tokens: BLOCK, compressed_blocks: 16, window_blocks: 3 };
    let mut cache = model.new_cache(&be, cfg).unwrap();
    let mut seq_a = cache.new_sequence();
    feed(&be, &model, &mut cache, &mut seq_a, a, a.len());
    cache.release(&mut seq_a);
    // A's last three window pages (32..80) are cached, so reuse at 64 works.
    let b = diverging(a, 70, 90);
    let mut seq_b = cache.new_sequence();
    assert_eq!(cache.reuse_prefix(&mut seq_b, &b).unwrap(), 64);
    cache.release(&mut seq_b);
    // A prompt diverging at 20 needs A's window page 0, long evicted: no reuse.
    let c = diverging(a, 20, 40);
    let mut seq_c = cache.new_sequence();
    assert_eq!(cache.reuse_prefix(&mut seq_c, &c).unwrap(), 0);
    let got = feed(&be, &model, &mut cache, &mut seq_c, &c, 16);
    assert!(got == fresh_run(&be, &model, KvDtype::F32, &c, 16));
}

/// A sequence that cannot get the blocks a step needs gets a clear error and keeps its state;
/// releasing another sequence makes room at once.
#[test]
fn a_full_pool_is_a_clear_error_and_release_frees_at_once() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("mixed_f32");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let cfg = KvConfig { dtype: KvDtype::F32, block_tokens: BLOCK, compressed_blocks: 5, window_blocks: 6 };
    let mut cache = model.new_cache(&be, cfg).unwrap();
    let mut a = cache.new_sequence();
    feed(&be, &model, &mut cache, &mut a, &ids[..64], 64);
    let mut b = cache.new_sequence();
    assert!(!cache.can_append(&b, 32));
    let batch = Batch::new(&[(&ids[..32], 0)]).unwrap();
    let err = model.step(&be, &batch, &mut cache, &mut [&mut b], Logits::All).unwrap_err().to_string();
    assert!(err.contains("KV cache is full") && err.contains("--kv-cache-memory"), "{err}");
    assert_eq!(b.pos(), 0, "a refused step leaves the sequence as it was");
    cache.release(&mut a);
    assert!(cache.can_append(&b, 32));
    model.step(&be, &batch, &mut cache, &mut [&mut b], Logits::All).unwrap();
}

/// `Session` (what `dsv4 chat` runs) reuses the pool's cached prefix when a prompt does not
/// extend the previous one (an edited turn), and the result equals a fresh session's.
#[test]
fn session_reuses_cached_pages_for_an_edited_prompt() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("mixed_f32");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let greedy = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        prefill_chunk: BLOCK,
        ..Default::default()
    };
    let mut session = Session::new(&be, &model, config(KvDtype::F32, 2)).unwrap();
    session.generate(&be, &ids[..70], &greedy, &mut |_| Ok(Control::Continue)).unwrap();
    let edited = diverging(&ids[..70], 40, 75);
    let out = session.generate(&be, &edited, &greedy, &mut |_| Ok(Control::Continue)).unwrap();
    assert_eq!(out.prefix_cached, 32);
    assert_eq!(out.prefilled, 75 - 32);
    let mut fresh = Session::new(&be, &model, config(KvDtype::F32, 1)).unwrap();
    let want = fresh.generate(&be, &edited, &greedy, &mut |_| Ok(Control::Continue)).unwrap();
    assert_eq!(out.tokens, want.tokens);
}

fn tiny() -> Model<CpuBackend> {
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    Model::load(&CpuBackend::new(), cfg, &ckpt, &mut |_, _, _| {}).unwrap()
}

/// A released sequence's pages are evicted last page first, so what survives is still a
/// reusable prefix (reuse walks the pages from the first).
#[test]
fn eviction_keeps_the_head_of_a_released_prefix() {
    let be = CpuBackend::new();
    let m = tiny();
    let kv = KvConfig { dtype: KvDtype::F32, block_tokens: 16, compressed_blocks: 4, window_blocks: 20 };
    let mut c = m.new_cache(&be, kv).unwrap();
    let a: Vec<u32> = (0..49u32).map(|i| (i * 7 + 3) % 271).collect();
    let mut sa = c.new_sequence();
    m.step(&be, &Batch::new(&[(&a, 0)]).unwrap(), &mut c, &mut [&mut sa], Logits::LastPerSequence).unwrap();
    c.release(&mut sa); // A's pages 0-2 cached and idle, page 3 free
                        // B takes the free block and evicts one cached page of A.
    let b: Vec<u32> = (0..20u32).map(|i| (i * 11 + 5) % 271).collect();
    let mut sb = c.new_sequence();
    m.step(&be, &Batch::new(&[(&b, 0)]).unwrap(), &mut c, &mut [&mut sb], Logits::LastPerSequence).unwrap();
    let mut again = c.new_sequence();
    assert_eq!(c.reuse_prefix(&mut again, &a).unwrap(), 32, "the evicted page must be A's last, not its first");
}

/// Reuse refuses a sequence that holds blocks (a fresh one whose first step failed after
/// planning), so nothing leaks.
#[test]
fn reuse_refuses_a_sequence_that_holds_blocks() {
    let be = CpuBackend::new();
    let m = tiny();
    let kv = KvConfig { dtype: KvDtype::F32, block_tokens: 16, compressed_blocks: 16, window_blocks: 16 };
    let mut c = m.new_cache(&be, kv).unwrap();
    let a: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 271).collect();
    let mut sa = c.new_sequence();
    m.step(&be, &Batch::new(&[(&a, 0)]).unwrap(), &mut c, &mut [&mut sa], Logits::LastPerSequence).unwrap();
    c.release(&mut sa);
    let mut s = c.new_sequence();
    drop(c.plan_step(&be, &Batch::new(&[(&a[..20], 0)]).unwrap(), &mut [&mut s]).unwrap());
    let e = c.reuse_prefix(&mut s, &a).unwrap_err().to_string();
    assert!(e.contains("release this one first"), "{e}");
    let e = m.step(&be, &Batch::new(&[(&a[..1], 0)]).unwrap(), &mut c, &mut [&mut s], Logits::All).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
    c.release(&mut s);
    assert_eq!(c.used_blocks(), (0, 0), "blocks leaked");
}
