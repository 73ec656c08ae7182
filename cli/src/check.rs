//! `dsv4 check`: the same input through several backends, compared block by block. This is what
//! a user runs after installing on a new cluster.

use anyhow::{bail, Result};
use dsv4_core::model::Trace;
use dsv4_core::{Backend, Batch};

use crate::BackendChoice;

/// One backend's run: its description and every block output, downloaded as (block, values).
struct Run {
    backend: String,
    blocks: Vec<(String, Vec<f32>)>,
}

fn trace<B: Backend>(be: &B, spec: &str, ids: &[u32]) -> Result<Run> {
    let model = crate::load::load_model(be, spec)?;
    let mut tr = Trace::default();
    let logits = model.forward_traced(be, &Batch::prefill(&[ids])?, Some(&mut tr))?;
    let mut out = vec![];
    if let Some(e) = &tr.embed {
        out.push(("embedding".to_string(), be.download(e)?));
    }
    for (i, l) in tr.layers.iter().enumerate() {
        let kind = format!("{:?}", model.blocks[i].attn.kind);
        out.push((format!("layer {i} ({kind})"), be.download(l)?));
    }
    out.push(("logits".to_string(), be.download(&logits)?));
    Ok(Run { backend: be.describe(), blocks: out })
}

/// (max |a-b|, max |a-b| / max |reference|).
fn diff(reference: &[f32], other: &[f32]) -> (f64, f64) {
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

pub fn run(spec: &str, backends: &[BackendChoice], ids: Option<Vec<u32>>, tolerance: f64) -> Result<()> {
    if backends.len() < 2 {
        bail!("give at least two backends to compare, e.g. --backends cpu,ascend");
    }
    let (cfg, _) = crate::load::open(spec)?;
    let ids =
        ids.unwrap_or_else(|| (0..200u64).map(|i| (((i * 2654435761) >> 7) % cfg.vocab_size as u64) as u32).collect());
    let mut runs = vec![];
    for &b in backends {
        runs.push(with_backend!(b, |be| trace(be, spec, &ids))?);
    }
    let (ref_name, reference) = (&runs[0].backend, &runs[0].blocks);
    let mut worst = 0f64;
    for Run { backend: name, blocks: other } in &runs[1..] {
        println!("{name}\n  vs {ref_name} on {} tokens:", ids.len());
        println!("  {:<36} {:>12} {:>12}", "block", "max abs", "max rel");
        for ((block, a), (_, b)) in reference.iter().zip(other) {
            let (abs, rel) = diff(a, b);
            worst = worst.max(rel);
            let flag = if rel > tolerance { "  <-- above tolerance" } else { "" };
            println!("  {block:<36} {abs:>12.3e} {rel:>12.3e}{flag}");
        }
    }
    if worst > tolerance {
        bail!("backends disagree: worst relative difference {worst:.3e} > tolerance {tolerance:.1e}");
    }
    println!("ok: worst relative difference {worst:.3e} (tolerance {tolerance:.1e})");
    Ok(())
}
