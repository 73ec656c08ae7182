//! CPU kernels for V4's fused ops. The trait's default compositions materialise gathered keys
//! `[T, K, d]` and dense `[T, N]` score masks, which is fine for short prompts but not for long
//! contexts; these stream over each query's keys instead. Same semantics, f32 accumulation.

use std::ops::Range;

use dsv4_core::error::{Error, Result};

use crate::storage::{CpuIndex, CpuTensor};

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Attention over explicit key rows with a per-head sink (see `Backend::sparse_attention`).
pub fn sparse_attention(
    q: &CpuTensor,
    kv: &CpuTensor,
    idx: &CpuIndex,
    sinks: &CpuTensor,
    scale: f32,
) -> Result<CpuTensor> {
    let (t, h, d) = match q.shape[..] {
        [t, h, d] => (t, h, d),
        _ => return Err(err(format!("sparse_attention: q {:?}", q.shape))),
    };
    if kv.shape.len() != 2 || kv.shape[1] != d || idx.shape.len() != 2 || idx.shape[0] != t || sinks.data.len() != h {
        return Err(err(format!(
            "sparse_attention: q {:?}, kv {:?}, idx {:?}, sinks {:?}",
            q.shape, kv.shape, idx.shape, sinks.shape
        )));
    }
    let (n, k) = (kv.shape[0], idx.shape[1]);
    if let Some(bad) = idx.data.iter().find(|&&i| i < -1 || i >= n as i32) {
        return Err(err(format!("sparse_attention: key index {bad} outside {n} rows")));
    }
    let mut out = vec![0f32; t * h * d];
    crate::par::chunks_mut(&mut out, h * d, t * h * k * d, |ti, o| {
        let keys: Vec<&[f32]> = idx.data[ti * k..(ti + 1) * k]
            .iter()
            .filter(|&&i| i >= 0)
            .map(|&i| &kv.data[i as usize * d..(i as usize + 1) * d])
            .collect();
        let mut logits = vec![0f32; keys.len()];
        for hi in 0..h {
            let qh = &q.data[(ti * h + hi) * d..(ti * h + hi + 1) * d];
            let sink = sinks.data[hi];
            let mut max = sink;
            for (l, key) in logits.iter_mut().zip(&keys) {
                *l = dot(qh, key) * scale;
                max = max.max(*l);
            }
            let mut denom = (sink - max).exp();
            for l in logits.iter_mut() {
                *l = (*l - max).exp();
                denom += *l;
            }
            let oh = &mut o[hi * d..(hi + 1) * d];
            for (p, key) in logits.iter().zip(&keys) {
                let w = p / denom;
                oh.iter_mut().zip(key.iter()).for_each(|(acc, v)| *acc += w * v);
            }
        }
    });
    Ok(CpuTensor::new(vec![t, h, d], out))
}

/// Lightning-indexer selection over each query's valid range only (see `Backend::indexer_select`).
pub fn indexer_select(
    q: &CpuTensor,
    keys: &CpuTensor,
    weights: &CpuTensor,
    valid: &[Range<usize>],
    k: usize,
    offset: i32,
) -> Result<CpuIndex> {
    let (t, nh, dh) = match q.shape[..] {
        [t, nh, dh] => (t, nh, dh),
        _ => return Err(err(format!("indexer_select: q {:?}", q.shape))),
    };
    let n = keys.shape[0];
    if keys.shape.len() != 2 || keys.shape[1] != dh || weights.shape != [t, nh] || valid.len() != t {
        return Err(err(format!(
            "indexer_select: q {:?}, keys {:?}, weights {:?}",
            q.shape, keys.shape, weights.shape
        )));
    }
    if let Some(r) = valid.iter().find(|r| r.end > n || r.start > r.end) {
        return Err(err(format!("indexer_select: valid range {r:?} outside {n} keys")));
    }
    let scale = (dh as f32).powf(-0.5);
    let mut out = vec![-1i32; t * k];
    let work: usize = valid.iter().map(|r| r.len()).sum::<usize>() * q.shape[1] * dh;
    crate::par::chunks_mut(&mut out, k, work, |ti, o| {
        let r = valid[ti].clone();
        let mut scored: Vec<(f32, usize)> = r
            .map(|s| {
                let key = &keys.data[s * dh..(s + 1) * dh];
                let score: f32 = (0..nh)
                    .map(|hi| {
                        let qh = &q.data[(ti * nh + hi) * dh..(ti * nh + hi + 1) * dh];
                        weights.data[ti * nh + hi] * (dot(qh, key).max(0.0) * scale)
                    })
                    .sum();
                (score, s)
            })
            .collect();
        // Descending score, ties to the lower index (as Backend::topk). That is a total order,
        // so selecting the first k and sorting only them gives exactly the full sort's prefix.
        let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if scored.len() > k && k > 0 {
            scored.select_nth_unstable_by(k - 1, order);
            scored.truncate(k);
        }
        scored.sort_by(order);
        for (slot, (_, s)) in o.iter_mut().zip(scored) {
            *slot = s as i32 + offset;
        }
    });
    Ok(CpuIndex::new(vec![t, k], out))
}
