//! `dsv4 inspect`: what a checkpoint contains, as the config describes it, and what its decoding
//! state costs at a given context length.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use dsv4_core::config::{AttentionKind, RoutingKind};
use dsv4_core::kv::format::FP8_KV_BLOCK;
use dsv4_core::kv::layout::{block_bytes, default_block_tokens, layer_layouts, sequence_footprint, LayerLayout};
use dsv4_core::kv::{human_bytes, KvDtype, RowFormat};
use dsv4_core::model::loader::{
    check_expected, expected_mtp_tensors, expected_tensors, mtp_layers_present, stored_weight, TensorRole,
};
use dsv4_core::quant::scale_name;
use dsv4_core::tensor::{DType, HostTensor};
use dsv4_core::weight_forms::{checkpoint_form, official_stored_form, DeviceForm, SocFamily};
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

/// A row format as `inspect` shows it: for `fp8`, how the row's bytes divide.
fn format_name(f: RowFormat, width: usize) -> String {
    match f {
        RowFormat::F32 => "f32".into(),
        RowFormat::Bf16 => "bf16".into(),
        RowFormat::Fp8 { rope } => {
            let rope = rope.min(width);
            let nope = width - rope;
            let used = nope + 2 * rope + nope.div_ceil(FP8_KV_BLOCK);
            let pad = f.row_bytes(width) - used;
            let pad = if pad > 0 { format!(" + {pad} pad") } else { String::new() };
            format!("fp8 ({nope} e4m3 + {rope} bf16 + {} scales{pad})", nope.div_ceil(FP8_KV_BLOCK))
        }
    }
}

/// One pool of one layer type: (name, format, width, rows per block, whether the rows are in
/// compressed blocks).
fn pools(l: &LayerLayout, block_tokens: usize) -> Vec<(&'static str, RowFormat, usize, usize, bool)> {
    let mut p = vec![("window rows", l.attn_format, l.head_dim, block_tokens, false)];
    if let Some(c) = l.compressor {
        let e = l.entries_per_block(block_tokens);
        p.push(("entries", l.attn_format, l.head_dim, e, true));
        if let Some((ic, f)) = l.indexer {
            p.push(("indexer keys", f, ic.dim, e, true));
        }
        p.push(("carry", RowFormat::F32, c.width(), 2 * c.carry_rows(), false));
        if let Some((ic, _)) = l.indexer {
            p.push(("indexer carry", RowFormat::F32, ic.width(), 2 * ic.carry_rows(), false));
        }
    }
    p
}

/// The paged decoding state in `dtype` (spec §C.1), from the config alone: per layer type its
/// pools, their row format and bytes per row; the bytes of a compressed and a window block;
/// and with `context`, what one sequence holds at that many tokens. These are the numbers a
/// live pool holds (`kv::layout`, tested against `KvCache` byte for byte).
pub fn cache_report(cfg: &ModelConfig, dtype: KvDtype, context: Option<usize>) -> String {
    use std::fmt::Write;
    let bt = default_block_tokens(cfg);
    let layouts = layer_layouts(cfg, dtype);
    let mut kinds: Vec<(AttentionKind, usize, &LayerLayout)> = vec![];
    for l in &layouts {
        match kinds.iter_mut().find(|(k, _, _)| *k == l.kind) {
            Some(e) => e.1 += 1,
            None => kinds.push((l.kind, 1, l)),
        }
    }
    let mut s = String::new();
    let _ =
        writeln!(s, "decoding state, --kv-dtype {dtype}, blocks of {bt} tokens (bytes/block: all layers of the type):");
    let _ = writeln!(
        s,
        "  {:<8} {:>5}  {:<14} {:<43} {:>6} {:>9} {:>10} {:>12}  in block",
        "layers", "count", "pool", "row format", "width", "bytes/row", "rows/block", "bytes/block"
    );
    let (mut comp, mut win) = (0usize, 0usize);
    for (kind, count, l) in &kinds {
        for (i, (pool, f, width, rows, compressed)) in pools(l, bt).into_iter().enumerate() {
            let bytes = count * rows * f.row_bytes(width);
            if compressed {
                comp += bytes;
            } else {
                win += bytes;
            }
            let (name, n) = if i == 0 { (kind.to_string(), count.to_string()) } else { (String::new(), String::new()) };
            let block = if compressed { "compressed" } else { "window" };
            let _ = writeln!(
                s,
                "  {name:<8} {n:>5}  {pool:<14} {:<43} {width:>6} {:>9} {rows:>10} {bytes:>12}  {block}",
                format_name(f, width),
                f.row_bytes(width)
            );
        }
    }
    let bb = block_bytes(cfg, dtype, bt);
    debug_assert_eq!((comp, win), (bb.compressed, bb.window));
    let _ = writeln!(
        s,
        "  bytes per block: compressed {} ({}), window {} ({})",
        bb.compressed,
        human_bytes(bb.compressed),
        bb.window,
        human_bytes(bb.window)
    );
    let Some(n) = context else { return s };
    if n > cfg.max_position_embeddings {
        let max = cfg.max_position_embeddings;
        let _ = writeln!(s, "note: {n} tokens is past this model's context ({max} tokens, max_position_embeddings)");
    }
    let fp = sequence_footprint(cfg, dtype, bt, n);
    let _ = writeln!(
        s,
        "one sequence at {n} tokens: {} compressed blocks ({}), {} window blocks ({})",
        fp.compressed_blocks,
        human_bytes(fp.compressed_blocks * bb.compressed),
        fp.window_blocks,
        human_bytes(fp.window_blocks * bb.window)
    );
    let _ = writeln!(s, "  held: {} bytes ({})", fp.held_bytes, human_bytes(fp.held_bytes));
    if n > 0 {
        let _ = writeln!(
            s,
            "  per token: {:.1} bytes of compressed rows ({} / {n}: entries and indexer keys, without block \
             rounding; the window and carry are bounded)",
            fp.compressed_row_bytes as f64 / n as f64,
            fp.compressed_row_bytes
        );
    }
    let others: Vec<String> = [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8]
        .into_iter()
        .map(|d| {
            let f = sequence_footprint(cfg, d, bt, n);
            format!("{d} {} held", human_bytes(f.held_bytes))
        })
        .collect();
    let _ = writeln!(s, "  at {n} tokens by format: {}", others.join(", "));
    s
}

pub(crate) fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Device bytes on an Ascend SoC family when every matrix is kept in its device form
/// ([`dsv4_core::weight_forms`]): per form, the tensors, parameters and bytes; small parameters
/// (norms, biases, sinks, mHC bases) are f32 on the device, `tid2eid` stays on the host. With
/// `ckpt` None (a config-only directory) the official release's stored forms are assumed.
pub fn device_bytes_report(cfg: &ModelConfig, ckpt: Option<&Checkpoint>, soc: SocFamily) -> String {
    let empty = Checkpoint::from_tensors(vec![]).expect("an empty checkpoint");
    let source = ckpt.unwrap_or(&empty);
    let mut expected = expected_tensors(cfg, source);
    // The official releases ship the MTP block(s) the config announces, and dsv4 loads them.
    let mtp: Vec<usize> = match ckpt {
        Some(c) => mtp_layers_present(cfg, c),
        None => (0..cfg.num_mtp_layers).collect(),
    };
    for i in mtp {
        expected.extend(expected_mtp_tensors(cfg, source, i));
    }
    let mut by_form: BTreeMap<DeviceForm, (usize, usize)> = BTreeMap::new();
    let (mut stored_bytes, mut fallback) = (0f64, 0usize);
    for e in &expected {
        let params: usize = e.shape.iter().product();
        let form = match e.role {
            TensorRole::Ints => continue,
            TensorRole::Param => DeviceForm::F32,
            TensorRole::Weight | TensorRole::FusedExperts => {
                // A checkpoint's weights as the loader reads them (missing or invalid ones are
                // tensor_check's to report); a config-only directory's in the official forms.
                let (stored, form, dtype) = match ckpt {
                    Some(c) => match stored_weight(c, &e.name, &e.shape) {
                        Ok(w) => (
                            DeviceForm::for_stored(
                                w.format,
                                w.data.dtype,
                                w.scale.as_ref().map(|s| s.dtype),
                                SocFamily::A5,
                            ),
                            checkpoint_form(&w, soc),
                            w.data.dtype,
                        ),
                        Err(_) => continue,
                    },
                    None => {
                        let (format, dtype, scale) = official_stored_form(&e.name);
                        let form = |soc| DeviceForm::for_stored(format, dtype, scale, soc);
                        (form(SocFamily::A5), form(soc), dtype)
                    }
                };
                stored_bytes += stored.bytes_per_param() * params as f64;
                fallback += usize::from(form == DeviceForm::F32 && dtype == DType::F8E4M3);
                form
            }
        };
        let entry = by_form.entry(form).or_default();
        entry.0 += 1;
        entry.1 += params;
    }
    let mut s = format!(
        "device weights on Ascend {} ({}; every value kept exactly, nothing widened beyond what the SoC's matmuls need):\n",
        soc.name(),
        if ckpt.is_some() { "this checkpoint's stored forms" } else { "the official release's stored forms, spec §D.2" }
    );
    s += &format!("  {:<28} {:>8} {:>16} {:>10} {:>18}\n", "form", "tensors", "parameters", "bytes/par", "bytes");
    let mut total = 0f64;
    for (form, (count, params)) in &by_form {
        let bytes = form.bytes_per_param() * *params as f64;
        total += bytes;
        s += &format!(
            "  {:<28} {count:>8} {:>16} {:>10.4} {:>18}\n",
            form.name(),
            human(*params),
            form.bytes_per_param(),
            format!("{:.0} ({})", bytes, human_bytes(bytes as usize))
        );
    }
    s += &format!(
        "  total {:.0} bytes ({}); the checkpoint stores its matrices in {}\n",
        total,
        human_bytes(total as usize),
        human_bytes(stored_bytes as usize)
    );
    if fallback > 0 {
        s += &format!(
            "  {fallback} FP8 tensors have F32 block scales: kept as F32 on this SoC (e4m3 times a non-power-of-two scale is not a BF16 value)\n"
        );
    }
    s
}

pub fn run(spec: &str, context: Option<usize>, kv_dtype: Option<KvDtype>, soc: Option<SocFamily>) -> Result<()> {
    let state = |cfg: &ModelConfig| {
        if context.is_some() || kv_dtype.is_some() {
            print!("{}", cache_report(cfg, kv_dtype.unwrap_or_default(), context));
            // The sizes hold for any backend, but say when the --soc given cannot hold them.
            let target = soc.map(dsv4_core::parallel::plan::WeightTarget::Soc);
            if let Some(t) = target.filter(|t| kv_dtype == Some(KvDtype::Fp8) && !t.has_fp8_kv_rows()) {
                println!(
                    "note: the Ascend backend keeps no fp8 rows on {} (the 950 only): use --kv-dtype bf16 there",
                    t.name()
                );
            }
        }
    };
    // A directory with only config.json (e.g. configs/deepseek-v4-flash) is enough for the
    // schedule and the cache sizes.
    let dir = Path::new(spec);
    let config_only = spec != builtin::TINY_NAME
        && dir.join("config.json").exists()
        && !std::fs::read_dir(dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    if config_only {
        let cfg = crate::load::config_from_dir(dir)?;
        print!("{}", schedule_report(&cfg));
        println!("weights: none in {} (config only)", dir.display());
        if let Some(soc) = soc {
            print!("{}", device_bytes_report(&cfg, None, soc));
        }
        state(&cfg);
        return Ok(());
    }
    let (cfg, ckpt) = crate::load::open(spec)?;
    print!("{}{}", schedule_report(&cfg), weights_report(&cfg, &ckpt));
    if let Some(soc) = soc {
        print!("{}", device_bytes_report(&cfg, Some(&ckpt), soc));
    }
    state(&cfg);
    Ok(())
}

#[cfg(test)]
mod tests {
    use dsv4_core::kv::KvDtype;

    #[test]
    fn tiny_model_report() {
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        insta::assert_snapshot!(format!("{}{}", super::schedule_report(&cfg), super::weights_report(&cfg, &ckpt)));
    }

    fn config(name: &str) -> dsv4_core::ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name);
        dsv4_core::ModelConfig::from_dir(&dir).unwrap()
    }

    /// Device bytes of the official releases per SoC family: the parameter totals are the
    /// published 284B / 1.6T, 950 keeps the checkpoint's bytes, 910B/C pay 1.0625 bytes per
    /// routed-expert parameter (INT8) and 2 per FP8 one (BF16).
    #[test]
    fn device_bytes_of_the_official_releases() {
        use dsv4_core::weight_forms::SocFamily;
        for name in ["deepseek-v4-flash", "deepseek-v4-pro"] {
            let cfg = config(name);
            for soc in [SocFamily::A2, SocFamily::A5] {
                let r = super::device_bytes_report(&cfg, None, soc);
                insta::assert_snapshot!(format!("device_bytes_{name}_{soc:?}"), r);
            }
        }
        // The built-in model's own checkpoint (BF16/F32 stored, no FP8/FP4): the same on every SoC.
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        let a2 = super::device_bytes_report(&cfg, Some(&ckpt), SocFamily::A2);
        let a5 = super::device_bytes_report(&cfg, Some(&ckpt), SocFamily::A5);
        assert_eq!(a2.lines().skip(1).collect::<Vec<_>>(), a5.lines().skip(1).collect::<Vec<_>>());
    }

    #[test]
    fn flash_cache_report() {
        let cfg = config("deepseek-v4-flash");
        let fp8 = super::cache_report(&cfg, KvDtype::Fp8, Some(1 << 20));
        // V4's 512-wide rows with 64 rotary channels: 448 e4m3 + 128 rope bytes + 7 scales,
        // padded to 584; indexer keys (128 wide) stay bf16.
        assert!(fp8.contains("fp8 (448 e4m3 + 64 bf16 + 7 scales + 1 pad)    512       584"), "{fp8}");
        assert!(fp8.contains("indexer keys   bf16                                           128       256"), "{fp8}");
        insta::assert_snapshot!("flash_cache_report_fp8", fp8);
        insta::assert_snapshot!("flash_cache_report_bf16", super::cache_report(&cfg, KvDtype::Bf16, Some(1 << 20)));
        insta::assert_snapshot!("flash_cache_report_f32", super::cache_report(&cfg, KvDtype::F32, Some(1 << 20)));
    }

    #[test]
    fn pro_cache_report() {
        let cfg = config("deepseek-v4-pro");
        insta::assert_snapshot!("pro_cache_report_fp8", super::cache_report(&cfg, KvDtype::Fp8, Some(1 << 20)));
    }

    /// A context past the model's is reported with a note saying so; one within it without.
    #[test]
    fn a_context_past_the_model_is_noted() {
        let cfg = config("deepseek-v4-flash");
        let max = cfg.max_position_embeddings;
        let past = super::cache_report(&cfg, KvDtype::Fp8, Some(max + 1));
        let note = format!("note: {} tokens is past this model's context ({max} tokens", max + 1);
        assert!(past.contains(&note), "{past}");
        assert!(!super::cache_report(&cfg, KvDtype::Fp8, Some(max)).contains("note:"));
    }

    /// The report's numbers are the layout's: the per-pool rows add up to the block sizes, and
    /// the held bytes are `sequence_footprint`'s.
    #[test]
    fn report_totals_are_the_layout_totals() {
        use dsv4_core::kv::layout::{block_bytes, default_block_tokens, sequence_footprint};
        for cfg in [config("deepseek-v4-flash"), config("deepseek-v4-pro"), dsv4_core::builtin::tiny().unwrap().0] {
            let bt = default_block_tokens(&cfg);
            for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8] {
                let r = super::cache_report(&cfg, dtype, Some(1000));
                let (mut comp, mut win) = (0, 0);
                for line in r.lines().filter(|l| l.ends_with(" compressed") || l.ends_with(" window")) {
                    let bytes: usize = line.split_whitespace().rev().nth(1).unwrap().parse().unwrap();
                    if line.ends_with(" compressed") {
                        comp += bytes;
                    } else {
                        win += bytes;
                    }
                }
                let bb = block_bytes(&cfg, dtype, bt);
                assert_eq!((comp, win), (bb.compressed, bb.window), "{r}");
                let held = sequence_footprint(&cfg, dtype, bt, 1000).held_bytes;
                assert!(r.contains(&format!("  held: {held} bytes (")), "{r}");
            }
        }
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
