//! Speculative decoding with the MTP block (spec §D.5): lossless against plain decoding.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::checkpoint::Checkpoint;
use dsv4_core::generate::{Control, GenerateOptions, Generation};
use dsv4_core::kv::KvDtype;
use dsv4_core::model::mtp::MtpState;
use dsv4_core::model::Logits;
use dsv4_core::sampling::{Sampler, SamplingParams};
use dsv4_core::speculative::Speculator;
use dsv4_core::{Backend, Batch, Model};
use dsv4_tests::{fixtures_dir, load_model, max_rel_err, read_reference};

fn run<B: Backend>(be: &B, model: &Model<B>, prompt: &[u32], n: usize, k: usize) -> Generation {
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        prefill_chunk: 16,
        speculative_tokens: k,
        ..Default::default()
    };
    dsv4_tests::session(be, model).generate(be, prompt, &opts, &mut |_| Ok(Control::Continue)).unwrap()
}

#[test]
fn greedy_speculation_equals_plain_greedy() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    assert!(model.mtp.is_some());
    let ids = read_reference(&case).input_ids;
    for &(start, n) in &[(10usize, 40usize), (30, 60)] {
        let prompt = &ids[..start];
        let plain = run(&be, &model, prompt, n, 0);
        // 5 drafts: more than the smallest compression ratio, so most drafted steps cross a
        // window end.
        for k in [1, 2, 3, 5] {
            let spec = run(&be, &model, prompt, n, k);
            let s = spec.speculation.unwrap();
            eprintln!("prompt {start} k={k}: {s:?}");
            assert_eq!(spec.tokens, plain.tokens, "k = {k}, prompt {start}");
        }
    }
}

/// The MTP forward against the generator's float64 reference of the official
/// `MTPBlock.forward` (`official_fp8/mtp_reference.safetensors`, FP8 MTP weights): every row
/// fed in one step and in uneven chunks from our own main residual, and a three-row chain
/// that feeds the block its own output (drafting k > 1).
fn check_mtp_forward<B: Backend>(be: B) {
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let r = Checkpoint::open_file(&case.join("mtp_reference.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("mtp_meta.json")).unwrap()).unwrap();
    assert_eq!(meta["valid"], true);
    assert!(meta["rows_below_margin"].as_array().unwrap().is_empty(), "every row's routing is clear");
    let ids: Vec<u32> = r.get("input_ids").unwrap().to_i64_vec().unwrap().into_iter().map(|v| v as u32).collect();
    let want = r.get("mtp_logits").unwrap().to_f32_vec().unwrap();
    let (n, v) = (ids.len(), model.cfg.vocab_size);

    // The main residual of every position, from a whole-prompt step.
    let mut cache = model.new_cache(&be, dsv4_tests::kv_config(&model.cfg, KvDtype::F32, 1, n, n)).unwrap();
    let mut seq = cache.new_sequence();
    let batch = Batch::new(&[(&ids, 0)]).unwrap();
    let (_, h) = model.step_with_residual(&be, &batch, &mut cache, &mut [&mut seq], Logits::LastPerSequence).unwrap();

    for chunk in [n - 1, 37] {
        let mut state = MtpState::new(&be, &model.cfg, KvDtype::F32, chunk).unwrap();
        let mut got = vec![];
        let mut start = 0;
        while start < n - 1 {
            let len = chunk.min(n - 1 - start);
            let rows = be.narrow(&h, 0, start, len).unwrap();
            let (logits, _) = model
                .mtp_forward(&be, &rows, &ids[start + 1..start + 1 + len], start, &mut state, Logits::All)
                .unwrap();
            got.extend(be.download(&logits).unwrap());
            start += len;
        }
        let err = max_rel_err(&got, &want);
        eprintln!("MTP logits, chunks of {chunk}: {err:.2e}");
        assert!(err <= 1e-4, "chunks of {chunk}: {err:.2e}");
        assert_eq!(got.len(), (n - 1) * v);
    }

    // The chain: rows 0..=s from the main residual, then three rows fed the block's own output.
    let s = r.get("mtp_chain_start").unwrap().to_i64_vec().unwrap()[0] as usize;
    let want_chain = r.get("mtp_chain_logits").unwrap().to_f32_vec().unwrap();
    let mut state = MtpState::new(&be, &model.cfg, KvDtype::F32, s + 1).unwrap();
    let rows = be.narrow(&h, 0, 0, s + 1).unwrap();
    let (_, out) = model.mtp_forward(&be, &rows, &ids[1..s + 2], 0, &mut state, Logits::LastPerSequence).unwrap();
    let mut x = be.narrow(&out, 0, s, 1).unwrap();
    let mut got = vec![];
    for j in 1..=3 {
        let (logits, out) = model.mtp_forward(&be, &x, &[ids[s + j + 1]], s + j, &mut state, Logits::All).unwrap();
        got.extend(be.download(&logits).unwrap());
        x = out;
    }
    let err = max_rel_err(&got, &want_chain);
    eprintln!("MTP chain logits: {err:.2e}");
    assert!(err <= 1e-4, "chain: {err:.2e}");
}

#[test]
fn mtp_forward_matches_the_reference() {
    check_mtp_forward(CpuBackend::new());
}

#[test]
fn mtp_forward_matches_the_reference_on_the_ascend_emulator() {
    dsv4_tests::use_ascend_emulator();
    check_mtp_forward(dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}")));
}

#[test]
fn mtp_forward_matches_the_reference_on_the_cuda_emulator() {
    check_mtp_forward(dsv4_backend_cuda::CudaBackend::new(dsv4_cuda_emu::EmulatedDevice::new()));
}

/// Rollbacks restore the carry through the backend's pool reads and writes: greedy
/// speculation on the Ascend emulator equals plain greedy there.
#[test]
fn greedy_speculation_equals_plain_greedy_on_the_ascend_emulator() {
    dsv4_tests::use_ascend_emulator();
    let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let prompt = &read_reference(&case).input_ids[..20];
    let plain = run(&be, &model, prompt, 24, 0);
    assert_eq!(run(&be, &model, prompt, 24, 2).tokens, plain.tokens);
}

/// Drafts chosen by the test (the plain greedy continuation, with the draft at a chosen offset
/// made wrong) so that every acceptance length occurs, at most offsets within the compression
/// windows: rollbacks that keep every accepted token and rollbacks that must go back further
/// (a window ended after the last accepted token), across the HCA window end and page end at
/// 128, and the output stays the plain greedy output.
#[test]
fn rollbacks_at_every_offset_keep_greedy_output_exact() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let v = model.cfg.vocab_size as u32;
    let (prompt, n) = (&ids[..100], 120);
    let plain = run(&be, &model, prompt, n, 0).tokens;
    for k in [1, 2, 3, 5usize] {
        let mut cache = model.new_cache(&be, dsv4_tests::kv_config(&model.cfg, KvDtype::F32, 1, 512, 16)).unwrap();
        let mut seq = cache.new_sequence();
        let mut spec = Speculator::new(&be, &model, k, 16, KvDtype::F32).unwrap();
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut logits = vec![];
        for part in prompt.chunks(16) {
            let start = seq.pos();
            let batch = Batch::new(&[(part, start)]).unwrap();
            let (l, h) =
                model.step_with_residual(&be, &batch, &mut cache, &mut [&mut seq], Logits::LastPerSequence).unwrap();
            logits = be.download(&l).unwrap();
            spec.push(&be, &model, Some((&h, start)), prompt).unwrap();
        }
        let mut tokens = prompt.to_vec();
        tokens.push(sampler.sample(&logits));
        seq.set_rollback_depth(spec.main_rollback_depth());
        let mut accepted_lengths = vec![0usize; k + 1];
        let mut rollback_offsets = std::collections::BTreeSet::new();
        let (mut step, mut fallbacks, mut exact) = (0, 0, 0);
        while tokens.len() < prompt.len() + n {
            spec.push(&be, &model, None, &tokens).unwrap().expect("a row to draft from");
            let k_now = spec.drafts_for(&seq, tokens.len(), k);
            let done = tokens.len() - prompt.len();
            // A scrambled number of right drafts per step, the next one wrong.
            let good = ((step * 2654435761usize) >> 7) % (k + 1);
            let drafts: Vec<u32> = (0..k_now)
                .map(|j| {
                    let t = plain.get(done + j).copied().unwrap_or(0);
                    if j == good {
                        (t + 1) % v
                    } else {
                        t
                    }
                })
                .collect();
            let before = seq.pos();
            let verdict = spec.verify(&be, &model, &mut cache, &mut seq, &tokens, &drafts, &mut sampler).unwrap();
            if k_now == k {
                accepted_lengths[verdict.accepted] += 1;
            }
            tokens.extend(verdict.tokens);
            if verdict.accepted < k_now {
                // Wanted: the state of every accepted token; an earlier point when a window
                // ended in between (those tokens are fed again).
                let wanted = tokens.len() - 1;
                rollback_offsets.insert(wanted % 4);
                assert!(seq.pos() >= before && seq.pos() <= wanted);
                fallbacks += usize::from(seq.pos() < wanted);
                exact += usize::from(seq.pos() == wanted);
            }
            step += 1;
        }
        assert_eq!(&tokens[prompt.len()..prompt.len() + n], &plain[..], "k = {k}");
        assert!(accepted_lengths.iter().all(|&c| c > 0), "k = {k}: acceptance lengths {accepted_lengths:?}");
        eprintln!(
            "k = {k}: acceptance lengths {accepted_lengths:?}, rollbacks wanted at positions mod 4 \
             {rollback_offsets:?}, {exact} exact, {fallbacks} to an earlier point"
        );
        assert!(rollback_offsets.len() >= 3, "k = {k}: rollbacks at most offsets of a CSA window");
        assert!(fallbacks > 0, "k = {k}: no rollback had to go back further");
        assert!(exact > 0, "k = {k}: no rollback kept every accepted token");
    }
}

/// Sampling with speculation draws from the same distribution as plain sampling: over many
/// seeds, the frequencies of the third generated token (which comes from verify steps, after
/// accepted and rejected drafts) agree. With N runs per side a frequency difference has a
/// standard deviation of at most √(2·0.25/N) = 0.018 at N = 1500; the bound 0.09 is 5 of those
/// (the seeds are fixed, so the outcome is deterministic).
#[test]
fn sampling_with_speculation_keeps_the_distribution() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let prompt = &ids[..12];
    let v = model.cfg.vocab_size;
    let n = 1500;
    let mut session = dsv4_tests::session(&be, &model);
    let mut third = |k: usize, accepted: &mut usize| -> Vec<f64> {
        let mut counts = vec![0usize; v];
        for seed in 0..n as u64 {
            let opts = GenerateOptions {
                max_new_tokens: 3,
                sampling: SamplingParams { temperature: 0.7, top_k: 8, top_p: 1.0, seed },
                prefill_chunk: 16,
                speculative_tokens: k,
                ..Default::default()
            };
            let g = session.generate(&be, prompt, &opts, &mut |_| Ok(Control::Continue)).unwrap();
            *accepted += g.speculation.map_or(0, |s| s.accepted);
            counts[g.tokens[2] as usize] += 1;
        }
        counts.into_iter().map(|c| c as f64 / n as f64).collect()
    };
    let mut accepted = 0;
    let plain = third(0, &mut accepted);
    let spec = third(2, &mut accepted);
    assert!(accepted > 0, "no draft was accepted: the test does not reach the acceptance path");
    let worst = plain.iter().zip(&spec).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("{accepted} drafts accepted; largest frequency difference {worst:.4}");
    assert!(worst < 0.09, "largest frequency difference {worst}");
}

/// A speculative session continues a chat turn (only the new tokens are prefilled, the MTP
/// block keeps its rows) and gives what a fresh plain session gives; an empty prompt is an
/// error, and a checkpoint without an MTP block says so.
#[test]
fn a_speculative_session_continues_turns_exactly() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let opts = |k: usize, n: usize| GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        prefill_chunk: 16,
        speculative_tokens: k,
        ..Default::default()
    };
    let mut session = dsv4_tests::session(&be, &model);
    let first = session.generate(&be, &ids[..40], &opts(3, 17), &mut |_| Ok(Control::Continue)).unwrap();
    let mut turn2 = ids[..40].to_vec();
    turn2.extend(&first.tokens);
    turn2.extend(&ids[100..133]);
    let second = session.generate(&be, &turn2, &opts(3, 30), &mut |_| Ok(Control::Continue)).unwrap();
    assert!(second.prefilled < turn2.len() - 40, "the turn continued ({} prefilled)", second.prefilled);
    let fresh = run(&be, &model, &turn2, 30, 0);
    assert_eq!(second.tokens, fresh.tokens);

    let err = session.generate(&be, &[], &opts(2, 3), &mut |_| Ok(Control::Continue)).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let tiny = dsv4_core::builtin::tiny().unwrap();
    let tiny = Model::load(&be, tiny.0, &tiny.1, &mut |_, _, _| {}).unwrap();
    let err = dsv4_tests::session(&be, &tiny).generate(&be, &[5, 6], &opts(2, 3), &mut |_| Ok(Control::Continue));
    assert!(err.unwrap_err().to_string().contains("MTP block"));
}

/// One session used with and without speculation, and with a larger prefill chunk later: each
/// call gives what a fresh plain session gives (the MTP state starts over when a plain call
/// moved the sequence on, and is rebuilt for a longer chunk).
#[test]
fn a_session_mixes_plain_and_speculative_calls() {
    let be = CpuBackend::new();
    let case = fixtures_dir().join("official_fp8");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let opts = |k: usize, chunk: usize| GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::greedy(),
        prefill_chunk: chunk,
        speculative_tokens: k,
        ..Default::default()
    };
    let mut session = dsv4_tests::session(&be, &model);
    let mut prompt = ids[..20].to_vec();
    for (k, chunk) in [(2, 8), (0, 8), (2, 8), (2, 64), (3, 16)] {
        let g = session.generate(&be, &prompt, &opts(k, chunk), &mut |_| Ok(Control::Continue)).unwrap();
        let fresh = run(&be, &model, &prompt, 12, 0);
        assert_eq!(g.tokens, fresh.tokens, "k = {k}, chunk {chunk}");
        prompt.extend(&g.tokens);
        prompt.extend(&ids[prompt.len()..prompt.len() + 5]);
    }
}

/// `builtin:tiny-mtp` is `builtin:tiny` (the same main tensors, byte for byte) plus an MTP
/// block that loads, and speculative greedy decoding on it equals plain greedy: what the
/// server's SDK suite runs with `--speculative-tokens` in CI.
#[test]
fn builtin_tiny_mtp_is_tiny_plus_a_working_mtp_block() {
    let (_, tiny) = dsv4_core::builtin::tiny().unwrap();
    let (cfg, with_mtp) = dsv4_core::builtin::by_name(dsv4_core::builtin::TINY_MTP_NAME).unwrap().unwrap();
    let mut extra = 0;
    for t in with_mtp.tensors() {
        match tiny.get(&t.name) {
            Some(same) => assert!(same.bytes() == t.bytes() && same.shape == t.shape, "{} differs", t.name),
            None => {
                assert!(t.name.starts_with("mtp.0."), "{} is new but not an MTP tensor", t.name);
                extra += 1;
            }
        }
    }
    assert_eq!(tiny.len() + extra, with_mtp.len(), "every tiny tensor is kept");
    let be = CpuBackend::new();
    let model = Model::load(&be, cfg, &with_mtp, &mut |_, _, _| {}).unwrap();
    assert!(model.mtp.is_some(), "the MTP block loads");
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 271).collect();
    let plain = run(&be, &model, &prompt, 40, 0);
    for k in [1, 2, 3] {
        let spec = run(&be, &model, &prompt, 40, k);
        assert_eq!(spec.tokens, plain.tokens, "k = {k}");
        assert!(spec.speculation.unwrap().drafted > 0);
    }
}
