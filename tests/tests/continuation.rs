//! Greedy continuations produced by transformers' own `generate` (with its V4 cache, float64)
//! are reproduced token for token by dsv4's cached decoding, and each step's logits match the
//! reference's at the conformance tolerance (1e-4 relative).

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::sampling::argmax;
use dsv4_core::Checkpoint;
use dsv4_tests::{fixture_cases, load_model, max_rel_err};

#[test]
fn greedy_continuations_match_transformers_generate() {
    let be = CpuBackend::new();
    let mut checked = 0;
    for case in fixture_cases() {
        let path = case.join("continuation.safetensors");
        if !path.exists() {
            continue;
        }
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let c = Checkpoint::open_file(&path).unwrap();
        let ids =
            |n: &str| -> Vec<u32> { c.get(n).unwrap().to_i64_vec().unwrap().into_iter().map(|v| v as u32).collect() };
        let (prompt, want) = (ids("prompt_ids"), ids("greedy_ids"));
        let want_logits = c.get("greedy_logits").unwrap().to_f32_vec().unwrap();
        let model = load_model(&be, &case);
        let v = model.cfg.vocab_size;
        let mut session = dsv4_tests::session(&be, &model);
        let mut logits = session.feed(&be, &prompt, 64).unwrap();
        let mut got = vec![];
        let mut worst = 0f64;
        for (step, &expected) in want.iter().enumerate() {
            worst = worst.max(max_rel_err(&logits, &want_logits[step * v..(step + 1) * v]));
            let tok = argmax(&logits);
            got.push(tok);
            assert_eq!(tok, expected, "{name}: generated token {step} (prompt {} tokens)", prompt.len());
            logits = session.feed(&be, &[tok], 1).unwrap();
        }
        println!(
            "{name}: {} prompt + {} greedy tokens identical; worst step logits rel err {worst:.2e}",
            prompt.len(),
            got.len()
        );
        assert!(worst <= 1e-4, "{name}: {worst:.3e}");
        checked += 1;
    }
    assert!(checked >= 3, "expected continuation fixtures, found {checked}");
}
