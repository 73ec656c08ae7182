//! `dsv4 inspect`: what a checkpoint contains, as the config describes it, and what its decoding
//! state costs at a given context length.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use dsv4_core::config::{AttentionKind, RoutingKind};
use dsv4_core::model::cache::cache_layout;
use dsv4_core::model::loader::{check_expected, expected_mtp_tensors, expected_tensors, mtp_layers_present};
use dsv4_core::quant::scale_name;
use dsv4_core::tensor::{DType, HostTensor};
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
        let params = parameters(ckpt, t);
        if t.name.starts_with("mtp.") {
            mtp += params;
        } else {
            total += params;
            if t.name.contains(".ffn.experts.") {
                routed += params;
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
    for l in tensor_check(cfg, ckpt) {
        s += &l;
        s.push('\n');
    }
    s
}

/// Parameters a tensor holds: its element count, twice that for packed FP4 (two per byte),
/// none for scales and integer tables.
fn parameters(ckpt: &Checkpoint, t: &HostTensor) -> usize {
    // A scale is the `x.scale` beside a quantised (non-float) `x.weight`.
    let is_scale = || {
        t.name
            .strip_suffix(".scale")
            .is_some_and(|stem| ckpt.get(&format!("{stem}.weight")).is_some_and(|w| !w.dtype.is_float()))
    };
    match t.dtype {
        d if (d.is_float() || d == DType::F8E4M3) && !is_scale() => t.numel(),
        DType::I8 | DType::U8 if scale_name(&t.name).is_some_and(|s| ckpt.contains(&s)) => 2 * t.numel(),
        _ => 0,
    }
}

/// How many names to list per category before summarising.
const LIST_LIMIT: usize = 20;

/// The checkpoint against the tensors the config calls for (`loader::expected_tensors`, the
/// list the loader is tested to read exactly): missing ones, ones that would not load (dtype,
/// shape, scale), ones nothing reads, and the MTP block.
fn tensor_check(cfg: &ModelConfig, ckpt: &Checkpoint) -> Vec<String> {
    let mut expected = expected_tensors(cfg, ckpt);
    let main = expected.len();
    let mtp_layers = mtp_layers_present(cfg, ckpt);
    for &i in &mtp_layers {
        expected.extend(expected_mtp_tensors(cfg, ckpt, i));
    }
    let (mut missing, mut problems, mut covered) = (vec![], vec![], BTreeSet::new());
    for e in &expected {
        if !ckpt.contains(&e.name) {
            missing.push(format!("{} {:?}", e.name, e.shape));
            continue;
        }
        covered.insert(e.name.clone());
        if let Some(s) = scale_name(&e.name).filter(|s| ckpt.contains(s)) {
            covered.insert(s);
        }
        if let Err(err) = check_expected(ckpt, e) {
            problems.push(err.to_string());
        }
    }
    let unused: Vec<String> =
        ckpt.tensors().filter(|t| !covered.contains(&t.name)).map(|t| format!("{} ({})", t.name, t.source)).collect();

    let mut out = vec![];
    let mtp_note = if mtp_layers.is_empty() { String::new() } else { format!(" + {} MTP", expected.len() - main) };
    if missing.is_empty() && problems.is_empty() && unused.is_empty() {
        out.push(format!("tensors: all {main}{mtp_note} the config calls for are present and loadable; nothing else"));
    } else {
        out.push(format!(
            "tensors: {main}{mtp_note} called for by the config; {} missing, {} not loadable, {} unused",
            missing.len(),
            problems.len(),
            unused.len()
        ));
    }
    let mut list = |title: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        out.push(format!("{title} ({}):", items.len()));
        for i in items.iter().take(LIST_LIMIT) {
            out.push(format!("  {i}"));
        }
        if items.len() > LIST_LIMIT {
            out.push(format!("  ... and {} more", items.len() - LIST_LIMIT));
        }
    };
    list("missing: the config expects them, the files lack them", missing);
    list("not loadable", problems);
    list("unused: in the files, not called for by the config", unused);
    if cfg.num_mtp_layers > 0 && mtp_layers.is_empty() {
        out.push(format!(
            "MTP: the config declares {} layer(s); the checkpoint has no mtp.* tensors (they are optional)",
            cfg.num_mtp_layers
        ));
    } else if !mtp_layers.is_empty() {
        out.push(format!("MTP: layer(s) {mtp_layers:?} present"));
    }
    out
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

    /// The tiny model with one tensor dropped, one the config does not use, an attention
    /// projection stored as FP8 with a NaN scale, and a stray tensor.
    #[test]
    fn missing_unused_and_broken_tensors_are_listed() {
        use dsv4_core::tensor::{DType, HostTensor};
        use dsv4_core::Checkpoint;

        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        let mut ts: Vec<HostTensor> = ckpt
            .tensors()
            .filter(|t| t.name != "layers.2.attn.wkv.weight" && t.name != "layers.1.attn.wq_a.weight")
            .cloned()
            .collect();
        ts.push(HostTensor::from_f32("layers.9.attn_norm.weight", vec![2], &[1.0, 1.0]).unwrap());
        ts.push(HostTensor::from_f32("layers.3.attn.wq_a.extra", vec![1], &[1.0]).unwrap());
        ts.push(
            HostTensor::from_bytes("layers.1.attn.wq_a.weight", DType::F8E4M3, vec![32, 64], vec![0x38; 2048]).unwrap(),
        );
        ts.push(HostTensor::from_bytes("layers.1.attn.wq_a.scale", DType::F8E8M0, vec![1, 1], vec![255]).unwrap());
        let broken = Checkpoint::from_tensors(ts).unwrap();
        let report = super::weights_report(&cfg, &broken);
        for want in [
            "1 missing, 1 not loadable, 2 unused",
            "missing: the config expects them, the files lack them (1):\n  layers.2.attn.wkv.weight [32, 64]\n",
            "not loadable (1):\n  tensor `layers.1.attn.wq_a.scale` in builtin: E8M0 scale element 0 (of shape [1, 1]) is 255",
            "unused: in the files, not called for by the config (2):\n  layers.3.attn.wq_a.extra (builtin)\n  layers.9.attn_norm.weight (builtin)\n",
            "  F8_E4M3       1 tensors         2048 bytes",
            "  F8_E8M0       1 tensors            1 bytes",
            "MTP: the config declares 1 layer(s); the checkpoint has no mtp.* tensors",
        ] {
            assert!(report.contains(want), "missing `{want}` in:\n{report}");
        }
        // FP8 values count as parameters and their scale does not: relative to the intact
        // model, only wkv (32·64) is gone and the two stray tensors (3) are added.
        let count = |r: &str| {
            let l = r.lines().find(|l| l.starts_with("parameters:")).unwrap().to_string();
            l.split_whitespace().nth(1).unwrap().trim_end_matches('K').parse::<f64>().unwrap()
        };
        let intact = super::weights_report(&cfg, &ckpt);
        assert!((count(&intact) - count(&report) - (32.0 * 64.0 - 3.0) / 1e3).abs() < 0.11, "{intact}\n{report}");
    }
}
