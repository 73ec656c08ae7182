//! The fixtures that check the official fp8 numerics, shared by the CPU's and the emulators'
//! test binaries: the `kv_fp8` cases (an fp8 decoding state under f32 precision) and the
//! `official_qsim*` cases (`--precision official-f32`), whose references the fixture generator
//! computed with its own torch code for the official quantisation (`tests/fixtures/README.md`).
//! Tolerance 1e-4 of max|logit|, as for every f32 case.

use dsv4_core::kv::KvDtype;
use dsv4_core::model::Trace;
use dsv4_core::{Backend, Batch, Precision};

use crate::{
    chunks, decode_schedules, fixture_cases_with_kv, kv_config, layer_errors, load_model, max_rel_err, official_cases,
    read_reference, run_in_steps_with,
};

const TOLERANCE: f64 = 1e-4;

/// `kv_fp8`: references computed by transformers (float64 and float32, agreeing) with the
/// official KV quantisation simulated in the generator (`tests/fixtures/README.md`). The fp8
/// pool must reproduce them: the whole prompt in one step within the conformance tolerance
/// 1e-4, and every decode schedule too. The same model with an f32 state must miss them by far
/// (0.4 relative), so the case really checks the quantisation.
pub fn check_fp8_state_cases<B: Backend>(be: &B) {
    let cases = fixture_cases_with_kv(KvDtype::Fp8);
    assert!(!cases.is_empty(), "the kv_fp8 fixture is missing");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(be, &case);
        let r = read_reference(&case);
        let n = r.input_ids.len();
        let batch = Batch::prefill(&[&r.input_ids]).unwrap();
        let err =
            max_rel_err(&be.download(&model.forward_with(be, &batch, KvDtype::Fp8, None).unwrap()).unwrap(), &r.logits);
        println!("{} {name}: fp8 state, whole prompt: {err:.2e}", be.name());
        assert!(err <= TOLERANCE, "{name}: {err:.3e}");
        let f32_err =
            max_rel_err(&be.download(&model.forward_with(be, &batch, KvDtype::F32, None).unwrap()).unwrap(), &r.logits);
        assert!(f32_err > 1e-2, "{name}: an f32 state is within {f32_err:.2e} of the fp8 reference");
        for (label, steps) in decode_schedules(n) {
            let config = kv_config(&model.cfg, KvDtype::Fp8, 1, n, 17);
            let err = max_rel_err(&run_in_steps_with(be, &model, &r.input_ids, &steps, config), &r.logits);
            println!("{} {name}: fp8 state, {label}: {err:.2e}", be.name());
            assert!(err <= TOLERANCE, "{name} / {label}: {err:.3e}");
        }
    }
}

/// Every official case on `be` with the decoding state stored as `kv` (the official precisions
/// quantise KV rows before storing them, so any format gives the fp8 numerics).
pub fn check_official_cases<B: Backend>(be: &B, kv: KvDtype) {
    let cases = official_cases();
    assert!(cases.len() >= 2, "the official_qsim fixtures are missing: {cases:?}");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let mut model = load_model(be, &case);
        model.precision = Precision::OfficialF32;
        let r = read_reference(&case);
        let n = r.input_ids.len();
        let batch = Batch::prefill(&[&r.input_ids]).unwrap();
        let mut trace = Trace::default();
        let logits = be.download(&model.forward_with(be, &batch, kv, Some(&mut trace)).unwrap()).unwrap();
        let err = max_rel_err(&logits, &r.logits);
        let layers: Vec<String> = layer_errors(be, &trace, &r).iter().map(|e| format!("{e:.1e}")).collect();
        println!("{} {name}: official-f32, {kv} state, whole prompt: logits {err:.2e}, layers {layers:?}", be.name());
        assert!(err <= TOLERANCE, "{name}: official-f32 logits {err:.3e} > {TOLERANCE:.0e} (layers {layers:?})");

        // The simulation matters: plain f32 misses the reference.
        model.precision = Precision::F32;
        let plain = be.download(&model.forward_with(be, &batch, kv, None).unwrap()).unwrap();
        let plain_err = max_rel_err(&plain, &r.logits);
        println!("{} {name}: f32 precision, {kv} state: {plain_err:.2e} (must be far)", be.name());
        assert!(plain_err > 1e-2, "{name}: the unquantised run is within {plain_err:.2e} of the official reference");
        model.precision = Precision::OfficialF32;

        // Incremental decoding computes the same per-row quantisation.
        let schedules: Vec<(&str, Vec<usize>)> = vec![
            ("token by token", vec![1; n]),
            ("prefill 17 then decode", std::iter::once(17).chain(std::iter::repeat_n(1, n - 17)).collect()),
            ("chunks of 5", chunks(n, 5)),
        ];
        for (label, steps) in schedules {
            let config = kv_config(&model.cfg, kv, 1, n, 17);
            let err = max_rel_err(&run_in_steps_with(be, &model, &r.input_ids, &steps, config), &r.logits);
            println!("{} {name}: official-f32, {label}: {err:.2e}", be.name());
            assert!(err <= TOLERANCE, "{name} / {label}: {err:.3e}");
        }
    }
}
