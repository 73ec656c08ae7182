//! `dsv4 inspect`: what a checkpoint contains, as the config describes it.

use std::collections::BTreeMap;

use anyhow::Result;
use dsv4_core::config::{AttentionKind, RoutingKind};
use dsv4_core::{Checkpoint, ModelConfig};

/// The report as text (kept separate from printing so it can be snapshot-tested).
pub fn report(cfg: &ModelConfig, ckpt: &Checkpoint) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "DeepSeek-V4: {} layers, hidden {}, {} heads x {} (rope {}), vocab {}, hc_mult {}",
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.rope_dim, cfg.vocab_size, cfg.hc_mult
    ));
    line(format!(
        "experts: {} routed (top {}), 1 shared, width {}; sliding window {}; index top-k {}",
        cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.sliding_window, cfg.index_topk
    ));
    line("layer schedule:".into());
    for (i, (a, r)) in cfg.attention.iter().zip(&cfg.routing).enumerate() {
        let attn = match a {
            AttentionKind::Sliding => "sliding window".to_string(),
            AttentionKind::Csa { ratio } => format!("CSA (compress {ratio}, overlap, indexer)"),
            AttentionKind::Hca { ratio } => format!("HCA (compress {ratio})"),
        };
        let moe = match r {
            RoutingKind::Hash => "hash-routed MoE",
            RoutingKind::TopK => "top-k MoE",
        };
        line(format!("  {i:>3}  {attn:<36} {moe}"));
    }

    let (mut total, mut routed, mut mtp) = (0usize, 0usize, 0usize);
    let mut by_dtype: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in ckpt.tensors() {
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.size_bytes();
        if t.name.starts_with("mtp.") {
            mtp += t.numel();
        } else if t.dtype.is_float() {
            total += t.numel();
            if t.name.contains(".ffn.experts.") {
                routed += t.numel();
            }
        }
    }
    let active = total - routed + routed * cfg.num_experts_per_tok / cfg.n_routed_experts;
    line(format!(
        "parameters: {} total, {} active per token (embedding and head included)",
        human(total),
        human(active)
    ));
    if mtp > 0 {
        line(format!("MTP block: {} parameters (not used by prefill)", human(mtp)));
    }
    line("storage by dtype:".into());
    for (dt, (count, bytes)) in by_dtype {
        line(format!("  {dt:<8} {count:>6} tensors {:>12} bytes", bytes));
    }
    s
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn run(spec: &str) -> Result<()> {
    let (cfg, ckpt) = crate::load::open(spec)?;
    print!("{}", report(&cfg, &ckpt));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiny_model_report() {
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        insta::assert_snapshot!(super::report(&cfg, &ckpt));
    }
}
