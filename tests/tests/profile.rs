//! `Profiled<B>` (core/src/profile.rs): wrapping a backend changes no result, the profile
//! holds the fused ops the graph calls, and an op's inner calls are not recorded on their own.

use std::time::Instant;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::primitives_only::PrimitivesOnly;
use dsv4_core::profile::Profiled;
use dsv4_core::{Backend, Model};
use dsv4_tests::run_in_steps;

/// builtin:tiny's 24-token prompt in chunks of 8 (prefill, several rows per linear), then four
/// single-token steps (decode, one row).
const STEPS: [usize; 7] = [8, 8, 8, 1, 1, 1, 1];

fn tiny<B: Backend>(be: &B) -> Model<B> {
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    Model::load(be, cfg, &ckpt, &mut |_, _, _| {}).unwrap()
}

fn ids() -> Vec<u32> {
    (0..STEPS.iter().sum::<usize>() as u32).map(|i| (i * 37 + 11) % 271).collect()
}

/// Every token's logits through `Profiled<CpuBackend>` equal the bare backend's bit for bit: the
/// wrapper forwards to the same kernels (the CPU backend's fused overrides, not the trait's
/// default compositions, which round differently).
#[test]
fn profiled_logits_are_bit_identical() {
    let bare = CpuBackend::new();
    let want = run_in_steps(&bare, &tiny(&bare), &ids(), &STEPS);
    let prof = Profiled::new(CpuBackend::new(), true);
    let got = run_in_steps(&prof, &tiny(&prof), &ids(), &STEPS);
    assert_eq!(got.len(), want.len());
    let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} logits differ", want.len());
    assert!(!prof.take().entries.is_empty());
}

/// The profile of a run holds the fused ops the CPU backend overrides, once per call the graph
/// makes; what those ops call inside (the Sinkhorn step of `hc_pre`, the experts' SwiGLU) is
/// not recorded on its own.
#[test]
fn profile_holds_the_fused_ops_the_graph_calls() {
    let prof = Profiled::new(CpuBackend::new(), false);
    let model = tiny(&prof);
    let layers = model.cfg.num_layers;
    let steps = STEPS.len() as u64;
    prof.take(); // loading: upload_weight and friends
    let start = Instant::now();
    run_in_steps(&prof, &model, &ids(), &STEPS);
    let wall = start.elapsed();
    let p = prof.take();
    let calls = |key: &str| p.get(key).unwrap_or_else(|| panic!("no `{key}` in\n{p}")).calls;
    // Overridden by the CPU backend.
    for op in ["hc_pre", "sparse_attention", "indexer_select", "moe_experts", "expert_ffn"] {
        assert!(p.get(op).is_some(), "no `{op}` in\n{p}");
    }
    // mHC before attention and before the FFN of every layer, every step; the head once a step.
    assert_eq!(calls("hc_pre"), 2 * layers as u64 * steps, "{p}");
    assert_eq!(calls("hc_post"), 2 * layers as u64 * steps, "{p}");
    assert_eq!(calls("hc_head"), steps, "{p}");
    // One shared expert per routed-expert call: the routed experts' own expert_ffn calls (inside
    // moe_experts) are not counted.
    assert_eq!(calls("expert_ffn"), calls("moe_experts"), "{p}");
    assert!(p.get("sinkhorn").is_none() && p.get("swiglu").is_none(), "inner calls recorded:\n{p}");
    // The head `[vocab, hidden]` on one row in the decode steps and on the chunk's 8 rows in
    // the prefill steps (run_in_steps asks for every row's logits); likewise the embedding.
    assert_eq!(calls("linear [271, 64] m=1"), 4, "{p}");
    assert_eq!(calls("linear [271, 64] m>1"), 3, "{p}");
    assert_eq!(calls("embedding [271, 64] m>1") + calls("embedding [271, 64] m=1"), steps, "{p}");
    // Nothing nested is counted twice, so the entries fit in the wall time.
    assert!(p.total() <= wall, "{:?} recorded in {wall:?}", p.total());
    // take() resets.
    assert!(prof.take().entries.is_empty());
}

/// A fused op the inner backend does not override runs the trait's default composition on the
/// inner backend: one entry for the op, none for the primitives it is made of.
#[test]
fn inner_calls_of_a_fused_op_are_not_recorded() {
    let prof = Profiled::new(PrimitivesOnly(CpuBackend::new()), true);
    let (t, n, d) = (2, 4, 8);
    let up = |shape: &[usize]| {
        let len = shape.iter().product::<usize>();
        prof.upload(&(0..len).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), shape).unwrap()
    };
    let (x, y, post, comb) = (up(&[t, n, d]), up(&[t, d]), up(&[t, n]), up(&[t, n, n]));
    assert_eq!(prof.take().get("upload").map(|e| e.calls), Some(4));
    let out = prof.hc_post(&x, &y, &post, &comb).unwrap();
    let p = prof.take();
    assert_eq!(p.entries.len(), 1, "{p}");
    assert_eq!((p.entries[0].key.as_str(), p.entries[0].calls), ("hc_post", 1));
    // And the value is the inner backend's.
    let inner = prof.inner().hc_post(&x, &y, &post, &comb).unwrap();
    assert_eq!(prof.download(&out).unwrap(), prof.inner().download(&inner).unwrap());
    assert!(prof.take().get("download").is_some(), "download is timed");
}
