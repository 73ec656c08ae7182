//! Prefill logits of every reference fixture (transformers 5.23.0, float64) on the CPU backend.
//!
//! Tolerance: max |Δlogit| / max |logit| ≤ 1e-4. The fixtures' own float32-vs-float64 runs
//! agree to ~1e-6 relative (see each meta.json), so an f32 implementation of the same math
//! lands around 1e-6; 1e-4 leaves room for operation-order differences (mHC norm order, MoE
//! accumulation order, libm ulps) while any real semantic error (a wrong mask, a swapped
//! half, a missed clamp, a different top-k pick) moves logits by 1e-2 or more.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::{Backend, Batch};
use dsv4_tests::primitives_only::PrimitivesOnly;
use dsv4_tests::{check_every_fixture, load_model, max_rel_err, read_reference};

const TOLERANCE: f64 = 1e-4;

/// The fixture at the widths of Ascend's `aclnnCompressor` (hidden 1024, entries of 512 and 128,
/// HCA windows of 128; `tests/fixtures/wide/compressor_dims`): prefill, and prefill chunks with
/// decode steps that complete the HCA window inside a chunk and CSA windows in decode steps.
#[test]
fn the_wide_fixture_matches_the_reference() {
    let be = CpuBackend::new();
    let case = dsv4_tests::wide_case("compressor_dims");
    let err = dsv4_tests::prefill_error(&be, &case);
    println!("compressor_dims prefill: max rel err {err:.2e}");
    assert!(err <= TOLERANCE, "prefill {err:.3e}");
    let (model, r) = (load_model(&be, &case), read_reference(&case));
    let steps = [100, 1, 1, 1, 27, 1, 1];
    let got = dsv4_tests::run_in_steps(&be, &model, &r.input_ids, &steps);
    let err = max_rel_err(&got, &r.logits);
    println!("compressor_dims in steps {steps:?}: max rel err {err:.2e}");
    assert!(err <= TOLERANCE, "in steps {err:.3e}");
}

#[test]
fn every_fixture_matches_the_reference() {
    check_every_fixture(&CpuBackend::new(), TOLERANCE);
}

/// The same fixtures with every fused op computed by the trait's default composition of
/// primitives: what a new backend inherits before it overrides anything.
#[test]
fn default_fused_compositions_match_the_reference() {
    check_every_fixture(&PrimitivesOnly(CpuBackend::new()), TOLERANCE);
}

/// Several sequences of different lengths in one forward step (the token dimension a server
/// batches into) give each sequence exactly the logits it gets alone. Lengths straddle the
/// compression ratios so that some sequences have no complete window on some layers.
#[test]
fn batched_sequences_match_their_solo_runs() {
    let be = CpuBackend::new();
    for name in ["mixed_f32", "odd_hc2", "fused_dims"] {
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
            // Same ops on the same rows; only the summation order of the matrix products
            // differs (a 1-token sequence alone takes the GEMV kernel, batched it takes the
            // GEMM's blocking), a few f32 ulps per product carried through the layers: 5e-6 is
            // 20× below the fixtures' 1e-4 and far above what one wrong row would give.
            let err = max_rel_err(got, &solo);
            assert!(err <= 5e-6, "{name}: sequence of {} tokens differs by {err:.2e} when batched", p.len());
            row += p.len();
        }
    }
}
