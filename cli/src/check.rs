//! `dsv4 check`: the same input through several backends, compared block by block. This is what
//! a user runs after installing on a new cluster.
//!
//! Per block it prints the largest absolute and relative difference of the block's output and,
//! on CSA layers, how much of the lightning indexer's top-k selection the two backends share.
//! Top-k is discontinuous, so a selection that differs is worth seeing even when the outputs
//! still agree; it is reported, and the tolerance judges the outputs.

use std::collections::HashSet;

use anyhow::{bail, Result};
use dsv4_core::kv::KvDtype;
use dsv4_core::model::Trace;
use dsv4_core::{Backend, Batch, DeviceTensor, Precision};

use crate::kv_args::KvArgs;
use crate::parallel_args::ParallelArgs;
use crate::BackendChoice;

/// One block's output on one backend.
struct BlockOutput {
    name: String,
    values: Vec<f32>,
    /// The indexer's picks as (k, rows of k key-pool entries), on CSA layers.
    picks: Option<(usize, Vec<i32>)>,
}

/// One backend's run: its description and every block's output.
struct Run {
    backend: String,
    blocks: Vec<BlockOutput>,
}

fn trace<B: Backend>(be: &B, spec: &str, ids: &[u32], kv: &KvArgs) -> Result<Run> {
    // A few passes over each weight, not a long decode: a resident copy would cost more than it
    // saves.
    let model = crate::load::load_model(be, spec, kv.precision, kv.weight_memory.one_pass())?;
    trace_model(be, &model, ids, kv)
}

/// [`trace`] split over the ranks of `parallel` on `backend`; rank 0's outputs (every rank
/// holds the whole residual stream and logits). With data-parallel attention the prompt is rank
/// 0's sequence and the other ranks serve their experts in its step, as in `dsv4 logits`.
fn trace_split(backend: BackendChoice, spec: &str, ids: &[u32], kv: &KvArgs, parallel: &ParallelArgs) -> Result<Run> {
    let (cfg, ckpt, layout) = crate::parallel_args::open_split(backend, spec, kv.weight_memory.one_pass(), parallel)?;
    let mut runs = on_ranks!(backend, parallel, layout, |be, ctx| {
        let serves_prompt = ctx.layout.dp_rank() == 0;
        let model = crate::load::load_opened(be, cfg.clone(), &ckpt, spec, kv.precision, ctx)?;
        if !serves_prompt {
            // The traced prompt is one step: one idle step.
            model.idle_step(be)?;
            return Ok(Run { backend: String::new(), blocks: vec![] });
        }
        trace_model(be, &model, ids, kv)
    })?;
    let mut run = runs.swap_remove(0);
    let dp = if layout.data_parallel_attention { ", data-parallel attention" } else { "" };
    run.backend = format!("{} on {} ranks (TP {}, EP {}{dp})", run.backend, layout.world, layout.tp, layout.ep);
    Ok(run)
}

fn trace_model<B: Backend>(be: &B, model: &dsv4_core::Model<B>, ids: &[u32], kv: &KvArgs) -> Result<Run> {
    let precision = kv.precision;
    if kv.kv_cache_memory.is_some() {
        // The traced forward sizes its own pool; a budget given must still hold the prompt
        // (`config_for_run` refuses one that does not).
        kv.config_for_run(be, &model.cfg, ids.len(), ids.len())?;
    }
    let mut tr = Trace::default();
    let logits = model.forward_with(be, &Batch::prefill(&[ids])?, kv.kv_dtype(be), Some(&mut tr))?;
    let mut blocks = vec![];
    if let Some(e) = &tr.embed {
        blocks.push(BlockOutput { name: "embedding".into(), values: be.download(e)?, picks: None });
    }
    for (i, (l, picks)) in tr.layers.iter().zip(&tr.indexer_picks).enumerate() {
        let kind = model.blocks[i].attn.kind;
        let picks = match picks {
            Some(p) => Some((*p.shape().last().unwrap_or(&0), be.download_index(p)?)),
            None => None,
        };
        blocks.push(BlockOutput { name: format!("layer {i} ({kind})"), values: be.download(l)?, picks });
    }
    blocks.push(BlockOutput { name: "logits".into(), values: be.download(&logits)?, picks: None });
    Ok(Run { backend: format!("{} [{precision}]", be.describe()), blocks })
}

/// (max |a-b|, max |a-b| / max |reference|); NaN anywhere counts as an infinite difference.
fn diff(reference: &[f32], other: &[f32]) -> (f64, f64) {
    if reference.len() != other.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let scale = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let d = reference.iter().zip(other).fold(0f64, |m, (&a, &b)| {
        let x = (a as f64 - b as f64).abs();
        if x.is_nan() {
            f64::INFINITY
        } else {
            m.max(x)
        }
    });
    (d, d / scale)
}

/// How far two backends' top-k picks (`-1` = none, ignored) agree: per query, the picks both
/// made over the larger of the two pick counts, summed over all queries. Order within a query
/// does not matter. 1.0 when neither picked anything; 0.0 when the shapes differ.
fn pick_overlap(reference: (usize, &[i32]), other: (usize, &[i32])) -> f64 {
    let ((k, a), (kb, b)) = (reference, other);
    if k != kb || a.len() != b.len() {
        return 0.0;
    }
    let (mut shared, mut total) = (0usize, 0usize);
    for (ra, rb) in a.chunks(k.max(1)).zip(b.chunks(k.max(1))) {
        let want: HashSet<i32> = ra.iter().copied().filter(|&i| i >= 0).collect();
        let got: HashSet<i32> = rb.iter().copied().filter(|&i| i >= 0).collect();
        total += want.len().max(got.len());
        shared += want.intersection(&got).count();
    }
    if total == 0 {
        1.0
    } else {
        shared as f64 / total as f64
    }
}

/// The comparison of one backend against the reference, as printed; returns the worst relative
/// difference of the judged blocks and how many blocks were judged. With `stop_at_selection`, the first block whose top-k
/// selections differ and every block after it are printed but not judged (in bf16 a selection that flips on
/// a rounding difference makes every later block diverge, docs/precision.md).
fn report(
    reference: &Run,
    other: &Run,
    tokens: usize,
    tolerance: f64,
    stop_at_selection: bool,
    out: &mut String,
) -> (f64, usize) {
    use std::fmt::Write;
    let mut worst = 0f64;
    let mut after_selection = false;
    let mut judged_blocks = 0;
    let _ = writeln!(out, "{}\n  vs {} on {tokens} tokens:", other.backend, reference.backend);
    let _ = writeln!(out, "  {:<36} {:>12} {:>12} {:>14}", "block", "max abs", "max rel", "top-k overlap");
    for (a, b) in reference.blocks.iter().zip(&other.blocks) {
        let (abs, rel) = diff(&a.values, &b.values);
        let overlap = match (&a.picks, &b.picks) {
            (Some((ka, pa)), Some((kb, pb))) => Some(pick_overlap((*ka, pa), (*kb, pb))),
            (None, None) => None,
            // One backend selected and the other did not: nothing is shared.
            _ => Some(0.0),
        };
        let selections_differ = overlap.is_some_and(|o| o < 1.0);
        // The block whose selection differs already computes with other keys.
        after_selection |= stop_at_selection && selections_differ;
        let judged = !after_selection;
        if judged {
            worst = worst.max(rel);
            judged_blocks += 1;
        }
        let overlap_text = overlap.map_or("-".to_string(), |o| format!("{:.1}%", 100.0 * o));
        let mut flags = vec![];
        if selections_differ {
            flags.push("selections differ");
        }
        if !judged {
            flags.push(if selections_differ { "not judged" } else { "after a differing selection, not judged" });
        } else if rel > tolerance {
            flags.push("above tolerance");
        }
        let flag = if flags.is_empty() { String::new() } else { format!("  <-- {}", flags.join(", ")) };
        let _ = writeln!(out, "  {:<36} {abs:>12.3e} {rel:>12.3e} {overlap_text:>14}{flag}", a.name);
    }
    (worst, judged_blocks)
}

/// The default `--tolerance` of a precision: f32 backends agree to a few f32 ulps carried
/// through the layers; in bf16 one value rounded to the other BF16 neighbour differs by a BF16
/// ulp (2^-7 to 2^-6 of itself), and a few such flips per block are expected between any two
/// backends. `official-f32` has no BF16 rounding, so backends agree to f32 noise (1e-7 on the
/// fixtures) until a value lands on the other side of an e4m3 rounding tie, which moves it by an
/// e4m3 ulp (2^-4 to 2^-3 of itself) and the blocks after it by 1e-3 to 1e-1 (CPU against the
/// Ascend emulator on 200 tokens of `official_qsim`: 1.4e-7 at layer 0, 1.7e-2 at layer 2), so
/// it gets the bf16 tolerance too. So do f32 activations over bf16 or fp8 rows (`kv_dtype`):
/// a stored value the backends round to different neighbours moves what reads it (on the
/// official_fp8 fixture, fp8 rows, CPU against the 950 emulator: 1.8e-4 at the logits, with
/// 7.9e-6 at layer 0 and every selection equal).
pub fn default_tolerance(precision: Precision, kv_dtype: Option<KvDtype>) -> f64 {
    match (precision, kv_dtype.unwrap_or_default()) {
        (Precision::F32, KvDtype::F32) => 1e-4,
        _ => 5e-2,
    }
}

pub fn run(
    spec: &str,
    backends: &[BackendChoice],
    ids: Option<Vec<u32>>,
    tolerance: Option<f64>,
    kv: &KvArgs,
    parallel: &ParallelArgs,
) -> Result<()> {
    let tolerance = tolerance.unwrap_or_else(|| default_tolerance(kv.precision, kv.kv_dtype_arg));
    if backends.len() < 2 {
        bail!("give at least two backends to compare, e.g. --backends cpu,ascend");
    }
    let (cfg, _) = crate::load::open(spec)?;
    let ids =
        ids.unwrap_or_else(|| (0..200u64).map(|i| (((i * 2654435761) >> 7) % cfg.vocab_size as u64) as u32).collect());
    if let Some(node) = parallel.nodes().filter(|n| n.node_rank != 0) {
        // Another node of a run over several processes: it takes part in the split runs; node 0
        // runs the reference and reports.
        for &b in &backends[1..] {
            trace_split(b, spec, &ids, kv, parallel)?;
        }
        eprintln!("node {}: done; node 0 reports the comparison", node.node_rank);
        return Ok(());
    }
    match kv.kv_dtype_arg {
        Some(dtype) => println!("precision: {}, decoding state: {dtype} rows", kv.precision),
        None if kv.precision.simulates_quant() => {
            println!("precision: {}, decoding state: the precision's default rows on each backend", kv.precision)
        }
        // The precision's default (`Precision::default_kv_dtype`): bf16 rows where it rounds.
        None if kv.precision.rounds_to_bf16() => println!("precision: {}, decoding state: bf16 rows", kv.precision),
        None => println!("precision: {}, decoding state: f32 rows", kv.precision),
    }
    let mut runs = vec![];
    if parallel.world() > 1 {
        // The reference last when the others are split: over several nodes the other
        // processes wait for node 0 to meet them, which it does at its first split run.
        for &b in &backends[1..] {
            runs.push(trace_split(b, spec, &ids, kv, parallel)?);
        }
        runs.insert(0, with_backend!(backends[0], |be| trace(be, spec, &ids, kv))?);
    } else {
        for &b in backends {
            runs.push(with_backend!(b, |be| trace(be, spec, &ids, kv))?);
        }
    }
    let (mut worst, mut judged, mut blocks) = (0f64, usize::MAX, 0);
    for other in &runs[1..] {
        let mut text = String::new();
        let stop_at_selection = kv.precision != Precision::F32;
        let (w, j) = report(&runs[0], other, ids.len(), tolerance, stop_at_selection, &mut text);
        (worst, judged, blocks) = (worst.max(w), judged.min(j), runs[0].blocks.len());
        print!("{text}");
    }
    if kv.precision != Precision::F32 {
        // Like is compared with like above; how far the reduced precision is from the f32
        // reference is the expected effect of the precision, reported but not judged.
        // The reference is f32 throughout, its decoding state included.
        let f32_args = KvArgs { precision: Precision::F32, kv_dtype_arg: None, ..kv.clone() };
        let reference = with_backend!(backends[0], |be| trace(be, spec, &ids, &f32_args))?;
        let mut text = String::new();
        report(&reference, &runs[0], ids.len(), f64::INFINITY, false, &mut text);
        print!(
            "distance of {} to the f32 reference (informative; docs/precision.md gives the expected budget):\n{text}",
            kv.precision
        );
    }
    if worst > tolerance {
        let hint = if kv.precision != Precision::F32 {
            format!(
                " (in {}, a value the backends round to different neighbours differs by a BF16 or e4m3 ulp, and where \
                 that changes a top-k selection (an indexer's, flagged above, or a router's choice of experts, which \
                 this report does not track) the blocks after it diverge further, most on random-weight models; \
                 compare at --precision f32 for a kernel check, or raise --tolerance)",
                kv.precision
            )
        } else if kv.kv_dtype_arg.unwrap_or_default() == KvDtype::F32 {
            String::new()
        } else {
            format!(
                " (with --kv-dtype {}, backends that differ in the last f32 bit can round a stored value differently, \
                 which top-k selections then amplify; compare at --kv-dtype f32 for a kernel check, or raise --tolerance)",
                kv.kv_dtype_arg.unwrap_or_default()
            )
        };
        bail!("backends disagree: worst relative difference {worst:.3e} > tolerance {tolerance:.1e}{hint}");
    }
    if judged < blocks {
        println!(
            "ok: worst relative difference {worst:.3e} (tolerance {tolerance:.1e}) over the {judged} of {blocks} blocks \
             before the first differing selection; the rest are reported above, not judged"
        );
    } else {
        println!("ok: worst relative difference {worst:.3e} (tolerance {tolerance:.1e})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_f32_on_f32_rows_gets_the_kernel_tolerance() {
        assert_eq!(default_tolerance(Precision::F32, None), 1e-4);
        assert_eq!(default_tolerance(Precision::F32, Some(KvDtype::F32)), 1e-4);
        for kv in [KvDtype::Bf16, KvDtype::Fp8] {
            assert_eq!(default_tolerance(Precision::F32, Some(kv)), 5e-2);
        }
        for p in [Precision::Bf16, Precision::Official, Precision::OfficialF32] {
            assert_eq!(default_tolerance(p, None), 5e-2);
        }
    }

    #[test]
    fn overlap_is_a_set_share_per_query() {
        // Two queries of k = 3; order inside a query is irrelevant, -1 is "no pick".
        let a = [5, 2, 9, 1, -1, -1];
        assert_eq!(pick_overlap((3, &a), (3, &[9, 5, 2, 1, -1, -1])), 1.0);
        // One of four real picks differs.
        assert_eq!(pick_overlap((3, &a), (3, &[5, 2, 7, 1, -1, -1])), 0.75);
        // An extra pick the reference did not make counts against the overlap too.
        assert_eq!(pick_overlap((3, &a), (3, &[5, 2, 9, 1, 4, -1])), 0.8);
        // Picks moved to another query are not shared.
        assert_eq!(pick_overlap((3, &a), (3, &[1, -1, -1, 5, 2, 9])), 0.0);
        assert_eq!(pick_overlap((2, &[-1, -1]), (2, &[-1, -1])), 1.0);
        assert_eq!(pick_overlap((2, &[1, 2]), (1, &[1, 2])), 0.0);
    }

    #[test]
    fn diff_is_relative_to_the_reference_scale_and_catches_nan() {
        let (abs, rel) = diff(&[2.0, -4.0], &[2.5, -4.0]);
        assert_eq!((abs, rel), (0.5, 0.125));
        assert_eq!(diff(&[1.0], &[f32::NAN]).1, f64::INFINITY);
        assert_eq!(diff(&[1.0], &[1.0, 2.0]).1, f64::INFINITY);
    }

    fn run_of(picks: Option<Vec<i32>>, last: f32) -> Run {
        Run {
            backend: "test backend".into(),
            blocks: vec![
                BlockOutput { name: "layer 0 (CSA/4)".into(), values: vec![1.0, 2.0], picks: picks.map(|p| (2, p)) },
                BlockOutput { name: "logits".into(), values: vec![4.0, last], picks: None },
            ],
        }
    }

    #[test]
    fn report_flags_differences_in_outputs_and_selections() {
        let reference = run_of(Some(vec![0, 1, 1, 2]), 8.0);
        let mut text = String::new();
        assert_eq!(report(&reference, &run_of(Some(vec![1, 0, 2, 1]), 8.0), 2, 1e-4, false, &mut text), (0.0, 2));
        insta::assert_snapshot!("check_report_agreeing", text);
        let mut text = String::new();
        let worst = report(&reference, &run_of(Some(vec![0, 1, 1, 3]), 8.5), 2, 1e-4, false, &mut text);
        assert_eq!(worst, (0.0625, 2));
        insta::assert_snapshot!("check_report_disagreeing", text);
        // In bf16 the block whose selection differs, and every later one, are not judged.
        let mut text = String::new();
        let worst = report(&reference, &run_of(Some(vec![0, 1, 1, 3]), 8.5), 2, 1e-4, true, &mut text);
        assert_eq!(worst, (0.0, 0));
        insta::assert_snapshot!("check_report_disagreeing_bf16", text);
        // Without a differing selection every block is judged in bf16 too.
        let mut text = String::new();
        let worst = report(&reference, &run_of(Some(vec![1, 0, 2, 1]), 8.5), 2, 1e-4, true, &mut text);
        assert_eq!(worst, (0.0625, 2));
    }
}
