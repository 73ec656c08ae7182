//! `dsv4 inspect`: what a checkpoint contains, as the config describes it, and what its decoding
//! state costs at a given context length.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use dsv4_core::config::{AttentionKind, RoutingKind};
use dsv4_core::model::cache::cache_layout;
use dsv4_core::{builtin, Checkpoint, ModelConfig};

/// Layer schedule and shape summary (config only).
pub fn schedule_report(cfg: &ModelConfig) -> String {
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
    s
}

/// Parameter counts and storage by dtype (needs the weights).
pub fn weights_report(cfg: &ModelConfig, ckpt: &Checkpoint) -> String {
    let mut s = String::new();
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
    s += &format!(
        "parameters: {} total, {} active per token (embedding and head included)\n",
        human(total),
        human(active)
    );
    if mtp > 0 {
        s += &format!("MTP block: {} parameters (not used by prefill)\n", human(mtp));
    }
    s += "storage by dtype:\n";
    for (dt, (count, bytes)) in by_dtype {
        s += &format!("  {dt:<8} {count:>6} tensors {bytes:>12} bytes\n");
    }
    s
}

/// Decoding-state bytes per sequence at `context` tokens, by layer type (dsv4 keeps f32 state).
pub fn cache_report(cfg: &ModelConfig, context: usize) -> String {
    const ELEM: usize = 4;
    let layout = cache_layout(cfg, context, ELEM);
    let mut rows: BTreeMap<&str, (usize, [usize; 4])> = BTreeMap::new();
    for l in &layout {
        let name = match l.kind {
            AttentionKind::Sliding => "sliding",
            AttentionKind::Csa { .. } => "CSA",
            AttentionKind::Hca { .. } => "HCA",
        };
        let e = rows.entry(name).or_default();
        e.0 += 1;
        for (acc, v) in e.1.iter_mut().zip([l.window, l.entries, l.index_keys, l.carry]) {
            *acc += v;
        }
    }
    let mut s = format!("decoding state per sequence at {context} tokens (f32 values):\n");
    s += &format!(
        "  {:<8} {:>6} {:>14} {:>14} {:>14} {:>12} {:>14}\n",
        "layers", "count", "window", "entries", "indexer keys", "carry", "total"
    );
    for (name, (count, b)) in &rows {
        s += &format!(
            "  {name:<8} {count:>6} {:>14} {:>14} {:>14} {:>12} {:>14}\n",
            b[0],
            b[1],
            b[2],
            b[3],
            b.iter().sum::<usize>()
        );
    }
    let total: usize = layout.iter().map(|l| l.total()).sum();
    let growing: usize = layout.iter().map(|l| l.entries + l.index_keys).sum();
    s += &format!("  total {total} bytes ({:.1} MiB)\n", total as f64 / (1 << 20) as f64);
    if context > 0 {
        s += &format!(
            "  growth: {:.1} bytes per token (compressed entries + indexer keys; the window and carry are fixed)\n",
            growing as f64 / context as f64
        );
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

pub fn run(spec: &str, context: Option<usize>) -> Result<()> {
    // A directory with only config.json (e.g. configs/deepseek-v4-flash) is enough for the
    // schedule and the cache sizes.
    let dir = Path::new(spec);
    let config_only = spec != builtin::TINY_NAME
        && dir.join("config.json").exists()
        && !std::fs::read_dir(dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    if config_only {
        let cfg = ModelConfig::from_dir(dir)?;
        print!("{}", schedule_report(&cfg));
        println!("weights: none in {} (config only)", dir.display());
        if let Some(n) = context {
            print!("{}", cache_report(&cfg, n));
        }
        return Ok(());
    }
    let (cfg, ckpt) = crate::load::open(spec)?;
    print!("{}{}", schedule_report(&cfg), weights_report(&cfg, &ckpt));
    if let Some(n) = context {
        print!("{}", cache_report(&cfg, n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiny_model_report() {
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        insta::assert_snapshot!(format!("{}{}", super::schedule_report(&cfg), super::weights_report(&cfg, &ckpt)));
    }

    #[test]
    fn flash_cache_report() {
        let cfg = dsv4_core::ModelConfig::from_dir(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/deepseek-v4-flash"
        )))
        .unwrap();
        insta::assert_snapshot!(super::cache_report(&cfg, 1 << 20));
    }
}
