//! The generation loop against the full forward.

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::generate::{Control, GenerateOptions, StopReason};
use dsv4_core::sampling::{argmax, SamplingParams};
use dsv4_core::{Backend, Batch, Model};
use dsv4_tests::{fixtures_dir, load_model, read_reference};

fn load(be: &CpuBackend, name: &str) -> (Model<CpuBackend>, Vec<u32>) {
    let case = fixtures_dir().join(name);
    (load_model(be, &case), read_reference(&case).input_ids)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, sampling: SamplingParams::greedy(), prefill_chunk: 16, ..Default::default() }
}

/// Greedy decoding with the cache picks, at every step, the argmax of the full forward over
/// prompt + generated tokens (the fixtures have clear margins, so argmax is stable).
#[test]
fn greedy_generation_agrees_with_the_full_forward() {
    let be = CpuBackend::new();
    for name in ["mixed_f32", "odd_hc2", "official", "fused_dims"] {
        let (model, ids) = load(&be, name);
        let prompt = &ids[..ids.len().min(40)];
        let mut session = dsv4_tests::session(&be, &model);
        let out = session.generate(&be, prompt, &greedy(24), &mut |_| Ok(Control::Continue)).unwrap();
        assert_eq!(out.tokens.len(), 24);
        assert_eq!(out.stop, StopReason::MaxTokens);
        let mut all = prompt.to_vec();
        all.extend(&out.tokens);
        let logits = be.download(&model.forward(&be, &Batch::prefill(&[&all]).unwrap()).unwrap()).unwrap();
        let v = model.cfg.vocab_size;
        for (i, &tok) in out.tokens.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            assert_eq!(argmax(&logits[row * v..(row + 1) * v]), tok, "{name}: generated token {i}");
        }
    }
}

/// A session reusing its state for a prompt that extends the previous one (a chat turn) gives
/// what a fresh session gives; a prompt that does not extend it starts over.
#[test]
fn session_reuse_equals_a_fresh_session() {
    let be = CpuBackend::new();
    let (model, ids) = load(&be, "mixed_f32");
    let mut reused = dsv4_tests::session(&be, &model);
    let first = reused.generate(&be, &ids[..30], &greedy(5), &mut |_| Ok(Control::Continue)).unwrap();
    let mut turn2 = ids[..30].to_vec();
    turn2.extend(&first.tokens);
    turn2.extend(&ids[40..52]);
    let second = reused.generate(&be, &turn2, &greedy(8), &mut |_| Ok(Control::Continue)).unwrap();
    // Only the part not yet fed was prefilled (the last sampled token + the new turn).
    assert_eq!(second.prefilled, 1 + 12);
    let fresh =
        dsv4_tests::session(&be, &model).generate(&be, &turn2, &greedy(8), &mut |_| Ok(Control::Continue)).unwrap();
    assert_eq!(second.tokens, fresh.tokens);
    // A diverging prompt rebuilds the state.
    let third = reused.generate(&be, &ids[5..20], &greedy(3), &mut |_| Ok(Control::Continue)).unwrap();
    assert_eq!(third.prefilled, 15);
    let fresh = dsv4_tests::session(&be, &model)
        .generate(&be, &ids[5..20], &greedy(3), &mut |_| Ok(Control::Continue))
        .unwrap();
    assert_eq!(third.tokens, fresh.tokens);
}

#[test]
fn stops_on_eos_and_on_caller_request() {
    let be = CpuBackend::new();
    let (model, ids) = load(&be, "odd_hc2");
    let free =
        dsv4_tests::session(&be, &model).generate(&be, &ids[..20], &greedy(6), &mut |_| Ok(Control::Continue)).unwrap();
    // Declare the third generated token an EOS: generation stops right after emitting it.
    let opts = GenerateOptions { stop_token_ids: vec![free.tokens[2]], ..greedy(6) };
    let out =
        dsv4_tests::session(&be, &model).generate(&be, &ids[..20], &opts, &mut |_| Ok(Control::Continue)).unwrap();
    let first_eos = free.tokens.iter().position(|&t| t == free.tokens[2]).unwrap();
    assert_eq!(out.tokens, free.tokens[..=first_eos]);
    assert_eq!(out.stop, StopReason::Eos);
    let mut seen = 0;
    let out = dsv4_tests::session(&be, &model)
        .generate(&be, &ids[..20], &greedy(6), &mut |_| {
            seen += 1;
            Ok(if seen == 2 { Control::Stop } else { Control::Continue })
        })
        .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (2, StopReason::Caller));
}

/// A generation that reaches the model's context ends there with its own reason, not as if the
/// token budget had run out: the prompt and the generated tokens fill the context exactly.
#[test]
fn stops_at_the_context_length() {
    let be = CpuBackend::new();
    let (mut model, ids) = load(&be, "odd_hc2");
    model.cfg.max_position_embeddings = 30;
    let out = dsv4_tests::session(&be, &model)
        .generate(&be, &ids[..20], &greedy(24), &mut |_| Ok(Control::Continue))
        .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (10, StopReason::ContextLength));
    // A budget that runs out at the same token is the budget.
    let out = dsv4_tests::session(&be, &model)
        .generate(&be, &ids[..20], &greedy(10), &mut |_| Ok(Control::Continue))
        .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (10, StopReason::MaxTokens));
}

#[test]
fn prompt_past_the_context_is_an_error() {
    let be = CpuBackend::new();
    let (model, _) = load(&be, "odd_hc2");
    let too_long = vec![1u32; model.cfg.max_position_embeddings];
    let e = dsv4_tests::session(&be, &model)
        .generate(&be, &too_long, &greedy(1), &mut |_| Ok(Control::Continue))
        .unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    let e =
        dsv4_tests::session(&be, &model).generate(&be, &[], &greedy(1), &mut |_| Ok(Control::Continue)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}
