//! Prefill logits of every reference fixture (transformers 5.23.0, float64) on the CPU backend.
//!
//! Tolerance: max |Δlogit| / max |logit| ≤ 1e-4. The fixtures' own float32-vs-float64 runs
//! agree to ~1e-6 relative (see each meta.json), so an f32 implementation of the same math
//! lands around 1e-6; 1e-4 leaves room for operation-order differences (mHC norm order, MoE
//! accumulation order, libm ulps) while any real semantic error (a wrong mask, a swapped
//! half, a missed clamp, a different top-k pick) moves logits by 1e-2 or more.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::model::Trace;
use dsv4_core::{Backend, Batch};
use dsv4_tests::primitives_only::PrimitivesOnly;
use dsv4_tests::{fixture_cases, load_model, max_rel_err, read_reference};

const TOLERANCE: f64 = 1e-4;

#[test]
fn every_fixture_matches_the_reference() {
    check_every_fixture(&CpuBackend::new());
}

/// The same fixtures with every fused op computed by the trait's default composition of
/// primitives: what a new backend inherits before it overrides anything.
#[test]
fn default_fused_compositions_match_the_reference() {
    check_every_fixture(&PrimitivesOnly(CpuBackend::new()));
}

fn check_every_fixture<B: Backend>(be: &B) {
    let cases = fixture_cases();
    assert!(cases.len() >= 5, "expected the committed fixture cases, found {}", cases.len());
    let mut failures = vec![];
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(be, case);
        let reference = read_reference(case);
        let batch = Batch::prefill(&[&reference.input_ids]).unwrap();
        let mut trace = Trace::default();
        let logits = model.forward_traced(be, &batch, Some(&mut trace)).unwrap();
        let logits = be.download(&logits).unwrap();
        let err = max_rel_err(&logits, &reference.logits);
        let per_layer: Vec<String> = trace
            .layers
            .iter()
            .zip(&reference.layer_out)
            .map(|(got, want)| format!("{:.1e}", max_rel_err(&be.download(got).unwrap(), want)))
            .collect();
        println!(
            "{} {name}: n={} max rel err {err:.2e}; per layer {per_layer:?}",
            be.describe(),
            reference.input_ids.len()
        );
        if err > TOLERANCE {
            failures.push(format!("{name}: {err:.3e} (layers {per_layer:?})"));
        }
    }
    assert!(failures.is_empty(), "cases above {TOLERANCE}: {failures:#?}");
}

/// Several sequences of different lengths in one forward step (the token dimension a server
/// batches into) give each sequence exactly the logits it gets alone. Lengths straddle the
/// compression ratios so that some sequences have no complete window on some layers.
#[test]
fn batched_sequences_match_their_solo_runs() {
    let be = CpuBackend::new();
    for name in ["mixed_f32", "odd_hc2"] {
        let case = dsv4_tests::fixtures_dir().join(name);
        let model = load_model(&be, &case);
        let ids = read_reference(&case).input_ids;
        let prompts: Vec<&[u32]> = vec![&ids[..], &ids[3..5], &ids[10..47], &ids[1..2], &ids[20..]];
        let batched = be.download(&model.forward(&be, &Batch::prefill(&prompts).unwrap()).unwrap()).unwrap();
        let vocab = model.cfg.vocab_size;
        let mut row = 0;
        for p in &prompts {
            let solo = be.download(&model.forward(&be, &Batch::prefill(&[p]).unwrap()).unwrap()).unwrap();
            let got = &batched[row * vocab..(row + p.len()) * vocab];
            // Same ops on the same rows; only GEMM blocking can differ, so the bound is tight.
            let err = max_rel_err(got, &solo);
            assert!(err <= 1e-6, "{name}: sequence of {} tokens differs by {err:.2e} when batched", p.len());
            row += p.len();
        }
    }
}
