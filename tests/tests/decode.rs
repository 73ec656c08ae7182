//! Incremental decoding equals the full forward: for every fixture, the logits produced while
//! decoding token by token (after a prefill of P tokens), or while prefilling in chunks, match
//! the reference's full-sequence logits at every position. Decoding crosses many window and
//! compression boundaries (sequences of 61-300 tokens, windows 6-8, ratios 2-128).
//!
//! Tolerance 1e-4 as in the conformance suite: the incremental path computes the same
//! quantities on differently blocked tensors, so it lands at the same ~1e-6 level.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::kv::layout::sequence_footprint;
use dsv4_core::kv::KvDtype;
use dsv4_core::model::Logits;
use dsv4_core::{Backend, Batch, Model};
use dsv4_tests::{check_decode_schedules, kv_config, load_model, max_rel_err, read_reference, run_in_steps};

const TOLERANCE: f64 = 1e-4;

#[test]
fn decode_and_chunked_prefill_match_the_full_forward() {
    check_decode_schedules(&CpuBackend::new(), TOLERANCE);
}

/// One decode step advancing several sequences at different positions and lengths gives each
/// the logits it gets alone.
#[test]
fn batched_decode_matches_solo_decode() {
    let be = CpuBackend::new();
    let case = dsv4_tests::fixtures_dir().join("mixed_f32");
    let model = load_model(&be, &case);
    let ids = read_reference(&case).input_ids;
    let prompts: [&[u32]; 3] = [&ids[..40], &ids[5..9], &ids[50..73]];
    let mut cache = model.new_cache(&be, kv_config(&model.cfg, KvDtype::F32, 3, 64, 40)).unwrap();
    let mut seqs: Vec<_> = prompts.iter().map(|_| cache.new_sequence()).collect();
    // Prefill all three in one step, then 12 batched decode steps.
    {
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        model.step(&be, &Batch::prefill(&prompts).unwrap(), &mut cache, &mut refs, Logits::LastPerSequence).unwrap();
    }
    let mut batched: Vec<Vec<f32>> = vec![vec![]; 3];
    for step in 0..12 {
        let next: Vec<[u32; 1]> = (0..3).map(|k| [ids[(k * 31 + step * 7) % ids.len()]]).collect();
        let parts: Vec<(&[u32], usize)> = next.iter().zip(&seqs).map(|(t, s)| (&t[..], s.pos())).collect();
        let batch = Batch::new(&parts).unwrap();
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        let logits =
            be.download(&model.step(&be, &batch, &mut cache, &mut refs, Logits::LastPerSequence).unwrap()).unwrap();
        let v = model.cfg.vocab_size;
        for k in 0..3 {
            batched[k].extend_from_slice(&logits[k * v..(k + 1) * v]);
        }
    }
    for k in 0..3 {
        let mut seq: Vec<u32> = prompts[k].to_vec();
        seq.extend((0..12).map(|step| ids[(k * 31 + step * 7) % ids.len()]));
        let mut steps = vec![prompts[k].len()];
        steps.extend([1; 12]);
        let solo = run_in_steps(&be, &model, &seq, &steps);
        let v = model.cfg.vocab_size;
        let solo_decode = &solo[prompts[k].len() * v..];
        // Same data, only GEMM blocking differs: tight bound.
        let err = max_rel_err(&batched[k], solo_decode);
        assert!(err <= 1e-6, "sequence {k}: batched decode differs by {err:.2e}");
    }
}

/// The blocks a live sequence holds are exactly what the layout (what `dsv4 inspect` prints)
/// says for its length, byte for byte, in every row format, at lengths around window, ratio and
/// block boundaries; releasing it returns every block.
#[test]
fn pool_bytes_equal_the_layout() {
    let be = CpuBackend::new();
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {}).unwrap();
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 271).collect();
    for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8] {
        let config = kv_config(&model.cfg, dtype, 1, 200, 100);
        let mut cache = model.new_cache(&be, config).unwrap();
        assert_eq!(cache.device_bytes(), config.total_bytes(&model.cfg), "{dtype}: pool bytes");
        let mut seq = cache.new_sequence();
        let mut fed = 0;
        for n in [1usize, 3, 12, 16, 17, 31, 64, 65, 100, 128, 129, 200] {
            let batch = Batch::new(&[(&ids[fed..n], fed)]).unwrap();
            model.step(&be, &batch, &mut cache, &mut [&mut seq], Logits::LastPerSequence).unwrap();
            fed = n;
            let want = sequence_footprint(&model.cfg, dtype, config.block_tokens, n);
            assert_eq!(cache.sequence_bytes(&seq), want.held_bytes, "{dtype}: after {n} tokens");
            assert_eq!(seq.compressed_blocks(), want.compressed_blocks, "{dtype}: after {n} tokens");
            assert_eq!(seq.window_blocks(), want.window_blocks, "{dtype}: after {n} tokens");
            assert_eq!(cache.used_blocks(), (want.compressed_blocks, want.window_blocks));
        }
        cache.release(&mut seq);
        assert_eq!(cache.used_blocks(), (0, 0));
    }
}
