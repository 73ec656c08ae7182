//! `dsv4 bench`: prefill and decode speed at several context lengths, with the memory copy
//! bandwidth measured in the same run so that decode can be read against its roofline
//! (decode is memory-bound: every active weight and the visible cache are read per token).

use std::time::Instant;

use anyhow::{bail, Result};
use dsv4_core::generate::Session;
use dsv4_core::kv::human_bytes;
use dsv4_core::kv::layout::sequence_footprint;
use dsv4_core::sampling::argmax;
use dsv4_core::{Backend, Checkpoint, ModelConfig};

use crate::kv_args::{self, KvArgs};

/// Best-of-5 `copy_from_slice` bandwidth over a 256 MiB buffer, in bytes/s (read + write).
fn copy_bandwidth() -> f64 {
    let n = 64 << 20; // f32 elements = 256 MiB
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    (2 * n * 4) as f64 / best
}

/// Weight bytes one decode token reads: everything but the routed experts it does not use.
fn active_weight_bytes(cfg: &ModelConfig, ckpt: &Checkpoint) -> f64 {
    let (mut dense, mut routed) = (0usize, 0usize);
    for t in ckpt.tensors().filter(|t| !t.name.starts_with("mtp.")) {
        if t.name.contains(".ffn.experts.") {
            routed += t.size_bytes();
        } else {
            dense += t.size_bytes();
        }
    }
    dense as f64 + routed as f64 * cfg.num_experts_per_tok as f64 / cfg.n_routed_experts as f64
}

/// Positions the run feeds: each context is prefilled from where the last one's decode
/// stopped (at least one token), then `decode_steps` tokens are decoded.
fn tokens_needed(contexts: &[usize], decode_steps: usize) -> usize {
    contexts.iter().fold(0, |pos, &ctx| ctx.max(pos + 1) + decode_steps)
}

pub fn run<B: Backend>(
    be: &B,
    spec: &str,
    contexts: &[usize],
    decode_steps: usize,
    chunk: usize,
    kv: &KvArgs,
) -> Result<()> {
    let mut contexts = contexts.to_vec();
    contexts.sort_unstable();
    contexts.dedup();
    if contexts.is_empty() {
        bail!("give at least one context length, e.g. --contexts 1024,8192");
    }
    let bandwidth = copy_bandwidth();
    let (cfg, ckpt) = crate::load::open(spec)?;
    let weight_bytes = active_weight_bytes(&cfg, &ckpt);
    let needed = tokens_needed(&contexts, decode_steps);
    if needed >= cfg.max_position_embeddings {
        bail!(
            "contexts up to {} + {decode_steps} decode steps need {needed} positions, more than the model's {}",
            contexts[contexts.len() - 1],
            cfg.max_position_embeddings
        );
    }
    let model = crate::load::load_model(be, spec)?;
    let config = kv.config_for_run(be, &cfg, needed, chunk)?;
    let block_tokens = config.block_tokens;
    println!("backend: {}", be.describe());
    println!("model: {spec}; active weights {:.2} MB per token", weight_bytes / 1e6);
    println!("{}", kv_args::describe(&cfg, &config));
    println!("memory copy bandwidth (this run): {:.2} GB/s", bandwidth / 1e9);
    println!(
        "{:>9} {:>14} {:>14} {:>12} {:>14} {:>16} {:>14} {:>10}",
        "context",
        "prefill tok/s",
        "decode ms/tok",
        "kv bytes/tok",
        "kv held",
        "bytes read/tok",
        "achieved GB/s",
        "roofline"
    );
    // Deterministic pseudo-random prompt over the vocabulary.
    let vocab = cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..needed as u64).map(|i| ((i.wrapping_mul(2654435761) >> 7) % vocab) as u32).collect();
    let mut session = Session::new(be, &model, config)?;
    let mut logits = vec![];
    for &ctx in &contexts {
        // Prefill up to ctx (continuing from the previous context, decode tokens included).
        let pos = session.sequence().pos();
        let target = ctx.max(pos + 1);
        let todo = &prompt[pos..target];
        let t = Instant::now();
        logits = session.feed(be, todo, chunk)?;
        let prefill_rate = todo.len() as f64 / t.elapsed().as_secs_f64();
        // The format's cost per token of context, and what the sequence holds now.
        let fp = sequence_footprint(&cfg, kv.kv_dtype, block_tokens, target);
        let kv_per_token = fp.compressed_row_bytes as f64 / target as f64;
        let held = session.state_bytes();
        let t = Instant::now();
        for _ in 0..decode_steps {
            let tok = argmax(&logits);
            logits = session.feed(be, &[tok], 1)?;
        }
        be.synchronize()?;
        let per_token = t.elapsed().as_secs_f64() / decode_steps.max(1) as f64;
        let bytes = weight_bytes + held as f64;
        let achieved = bytes / per_token;
        println!(
            "{target:>9} {prefill_rate:>14.1} {:>14.3} {kv_per_token:>12.1} {:>14} {bytes:>16.0} {:>14.3} {:>9.2}%",
            per_token * 1e3,
            human_bytes(held),
            achieved / 1e9,
            100.0 * achieved / bandwidth
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pool_covers_every_context_and_its_decode_steps() {
        assert_eq!(super::tokens_needed(&[1024, 8192], 32), 8192 + 32);
        // Decode tokens of one context run past the next: it starts one token later.
        assert_eq!(super::tokens_needed(&[100, 110], 32), 100 + 32 + 1 + 32);
        assert_eq!(super::tokens_needed(&[0], 4), 5);
    }
}
