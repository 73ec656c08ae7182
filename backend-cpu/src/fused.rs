//! CPU kernels for V4's fused ops. The trait's default compositions materialise gathered keys
//! `[T, K, d]` and dense `[T, N]` score masks, which is fine for short prompts but not for long
//! contexts; these stream over each query's keys instead. Same semantics, f32 accumulation.
//!
//! Keys are read straight from the pool: an `f32` pool's rows are borrowed, other formats are
//! decoded into a buffer private to the thread, so the summation order, and for `f32` pools
//! every bit, is the same whatever the format.
//!
//! Dot products use `dot`'s fixed order (eight interleaved partial sums), which vectorises;
//! on x86_64 the indexer's scores and the attention logits are computed four keys at a time
//! with SSE2 or AVX (`x86`), in the same order, so with the same bits.
//!
//! Work is spread over queries when there are enough of them (prefill). A decode step has one
//! query per sequence, so when its work is large enough (`SHARE_WORK`) the threads share the
//! query instead: `indexer_select` hands out its keys a range at a time and merges the threads'
//! best k (exact: the selection order is total), `sparse_attention` hands out its heads. Every
//! score and every output is computed the same way whichever thread computes it, so results
//! do not depend on the number of threads or on how the work was shared.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Mutex;

use dsv4_core::backend::{DevicePool, RowFormat};
use dsv4_core::error::{Error, Result};
use rayon::prelude::*;

use crate::par::MIN_WORK;
use crate::pool::CpuPool;
use crate::storage::{CpuIndex, CpuTensor};

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

/// `Σ a[i]·b[i]` in a fixed order: eight interleaved partial sums (lane `i % 8`) added pairwise,
/// then the tail. The partial sums are independent, so the loop vectorises. They start at `-0.0`,
/// the additive identity (`-0.0 + x == x` for every x), so an unrolled loop needs no extra add.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [-0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = -0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// [`dot`] over the first `N` values of `a` and `b` (all of them when `N` is 0): the same sum,
/// with the length known at compile time, so that the loop is unrolled.
#[inline(always)]
fn dot_n<const N: usize>(a: &[f32], b: &[f32]) -> f32 {
    if N == 0 {
        dot(a, b)
    } else {
        dot(&a[..N], &b[..N])
    }
}

/// Multiply-adds each thread should get before a kernel shares one query's work among
/// threads. Handing work to a pool thread, which is usually asleep during a decode step, and
/// waiting for it costs tens of microseconds; this much work takes about as long.
const SHARE_WORK: usize = 1 << 18;

/// How many threads should share the work of `t` queries (`work` multiply-adds in all) that can
/// each be split into `items` parts: 1 when the queries are enough to fill the pool or the work
/// is too small to hand off; else up to the pool's size, with `share_work` (normally
/// [`SHARE_WORK`]) each at least.
fn sharers(t: usize, items: usize, work: usize, share_work: usize) -> usize {
    let threads = rayon::current_num_threads();
    if t == 0 || t >= threads || work < MIN_WORK {
        return 1;
    }
    threads.min(work / share_work.max(1)).min(t * items).max(1)
}

/// `CpuPool::check_rows`, after a quick pass (min and max, which vectorises) that settles the
/// usual case: every entry valid.
fn check_rows(pool: &CpuPool, op: &str, what: &str, ids: &[i32], allow_none: bool) -> Result<()> {
    let (lo, hi) = ids.iter().fold((i32::MAX, i32::MIN), |(lo, hi), &i| (lo.min(i), hi.max(i)));
    if ids.is_empty() || (lo >= -i32::from(allow_none) && (hi < 0 || (hi as usize) < pool.rows())) {
        return Ok(());
    }
    pool.check_rows(op, what, ids, allow_none)
}

/// Runs `work` on the calling thread and, at the same time, on `helpers` tasks of the pool, each
/// with its own state from `init`; returns the states (in no particular order). The calling
/// thread starts at once and helpers join when the pool gets to them, so `work` should claim its
/// share from a shared counter: a helper that starts late finds less to do, or nothing.
fn together<S: Send>(helpers: usize, init: impl Fn() -> S + Sync, work: impl Fn(&mut S) + Sync) -> Vec<S> {
    let done = Mutex::new(Vec::with_capacity(helpers + 1));
    let mut own = init();
    if helpers == 0 {
        work(&mut own);
    } else {
        rayon::in_place_scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|_| {
                    let mut state = init();
                    work(&mut state);
                    done.lock().unwrap_or_else(|e| e.into_inner()).push(state);
                });
            }
            work(&mut own);
        });
    }
    let mut all = done.into_inner().unwrap_or_else(|e| e.into_inner());
    all.push(own);
    all
}

/// Pool rows `rows` decoded into `decoded` when the pool is not `f32` (an `f32` pool's rows are
/// borrowed instead: see [`row_slices`]).
fn decode_rows(pool: &CpuPool, rows: &[usize], decoded: &mut Vec<f32>) {
    if pool.format() == RowFormat::F32 {
        return;
    }
    let d = pool.width();
    decoded.clear();
    decoded.resize(rows.len() * d, 0.0);
    for (j, &r) in rows.iter().enumerate() {
        pool.read_row(r, &mut decoded[j * d..(j + 1) * d]);
    }
}

/// Rows `rows` of `pool` as f32 slices: borrowed from an `f32` pool, else from `decoded` as
/// [`decode_rows`] left it.
fn row_slices<'a>(pool: &'a CpuPool, rows: &[usize], decoded: &'a [f32]) -> Vec<&'a [f32]> {
    if pool.format() == RowFormat::F32 {
        return rows.iter().map(|&r| pool.f32_row(r).expect("an f32 pool")).collect();
    }
    if pool.width() == 0 {
        return vec![&[]; rows.len()];
    }
    decoded.chunks_exact(pool.width()).collect()
}

/// One head of one query: `oh = Σ_j softmax([q·k_j·scale]_j ∪ {sink})_j · k_j` (the sink takes
/// part in the normalisation only). `oh` starts zeroed; `logits` is scratch. `D` is the head
/// width when known at compile time, else 0 (same result).
#[inline(always)]
fn attend<const D: usize>(qh: &[f32], keys: &[&[f32]], sink: f32, scale: f32, logits: &mut Vec<f32>, oh: &mut [f32]) {
    logits.clear();
    logits.resize(keys.len(), 0.0);
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if D > 0 && D.is_multiple_of(8) {
        done = x86::logits::<D>(qh, keys, scale, logits);
    }
    for (l, key) in logits.iter_mut().zip(keys).skip(done) {
        *l = dot_n::<D>(qh, key) * scale;
    }
    let max = logits.iter().fold(sink, |max, &l| max.max(l));
    let mut denom = (sink - max).exp();
    for l in logits.iter_mut() {
        *l = (*l - max).exp();
        denom += *l;
    }
    if D == 0 {
        for (p, key) in logits.iter().zip(keys) {
            let w = p / denom;
            oh.iter_mut().zip(key.iter()).for_each(|(acc, v)| *acc += w * v);
        }
    } else {
        // Accumulated in a local array, which can stay in registers, then stored (`oh` is zero).
        let mut acc = [0f32; D];
        for (p, key) in logits.iter().zip(keys) {
            let w = p / denom;
            acc.iter_mut().zip(&key[..D]).for_each(|(acc, v)| *acc += w * v);
        }
        oh[..D].copy_from_slice(&acc);
    }
}

/// [`attend`] with the common head widths compiled for their width.
fn attend_head(qh: &[f32], keys: &[&[f32]], sink: f32, scale: f32, logits: &mut Vec<f32>, oh: &mut [f32]) {
    match qh.len() {
        32 => attend::<32>(qh, keys, sink, scale, logits, oh),
        64 => attend::<64>(qh, keys, sink, scale, logits, oh),
        128 => attend::<128>(qh, keys, sink, scale, logits, oh),
        512 => attend::<512>(qh, keys, sink, scale, logits, oh),
        _ => attend::<0>(qh, keys, sink, scale, logits, oh),
    }
}

/// Buffers of one `sparse_attention` worker, reused from query to query.
struct AttnScratch {
    /// The query whose key rows `rows` (and `decoded`) hold, if any.
    query: Option<usize>,
    rows: Vec<usize>,
    decoded: Vec<f32>,
    logits: Vec<f32>,
}

impl AttnScratch {
    fn new() -> Self {
        AttnScratch { query: None, rows: Vec::new(), decoded: Vec::new(), logits: Vec::new() }
    }
}

/// Attention over explicit key rows of a pool with a per-head sink (see `Backend::sparse_attention`).
pub fn sparse_attention(
    q: &CpuTensor,
    kv: &CpuPool,
    idx: &CpuIndex,
    sinks: &CpuTensor,
    scale: f32,
) -> Result<CpuTensor> {
    sparse_attention_sharing(q, kv, idx, sinks, scale, SHARE_WORK)
}

/// [`sparse_attention`], sharing a query's heads among threads from `share_work` multiply-adds
/// per thread.
fn sparse_attention_sharing(
    q: &CpuTensor,
    kv: &CpuPool,
    idx: &CpuIndex,
    sinks: &CpuTensor,
    scale: f32,
    share_work: usize,
) -> Result<CpuTensor> {
    let (t, h, d) = match q.shape[..] {
        [t, h, d] => (t, h, d),
        _ => return Err(err(format!("sparse_attention: q {:?}", q.shape))),
    };
    if kv.width() != d || idx.shape.len() != 2 || idx.shape[0] != t || sinks.data.len() != h {
        return Err(err(format!(
            "sparse_attention: q {:?}, kv a pool of width {}, idx {:?}, sinks {:?}",
            q.shape,
            kv.width(),
            idx.shape,
            sinks.shape
        )));
    }
    let k = idx.shape[1];
    check_rows(kv, "sparse_attention", "key index", &idx.data, true)?;
    let mut out = vec![0f32; t * h * d];
    // Heads `heads` of query `ti`, whose outputs are `o` (`d` values per head, zeroed).
    let run = |s: &mut AttnScratch, ti: usize, heads: Range<usize>, o: &mut [f32]| {
        if s.query != Some(ti) {
            s.rows.clear();
            s.rows.extend(idx.data[ti * k..(ti + 1) * k].iter().filter(|&&i| i >= 0).map(|&i| i as usize));
            decode_rows(kv, &s.rows, &mut s.decoded);
            s.query = Some(ti);
        }
        let keys = row_slices(kv, &s.rows, &s.decoded);
        for (hi, oh) in heads.zip(o.chunks_exact_mut(d.max(1))) {
            let qh = &q.data[(ti * h + hi) * d..(ti * h + hi + 1) * d];
            attend_head(qh, &keys, sinks.data[hi], scale, &mut s.logits, oh);
        }
    };
    let work = t * h * k * d;
    let sharing = sharers(t, h, work, share_work);
    if sharing > 1 {
        // Few queries (decode): their heads are shared out one at a time.
        let heads: Vec<Mutex<&mut [f32]>> = out.chunks_mut(d).map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        together(sharing - 1, AttnScratch::new, |s| loop {
            let c = next.fetch_add(1, AtomicOrdering::Relaxed);
            let Some(o) = heads.get(c) else { break };
            run(s, c / h, c % h..c % h + 1, &mut o.lock().unwrap_or_else(|e| e.into_inner()));
        });
    } else if work < MIN_WORK || t <= 1 {
        let mut s = AttnScratch::new();
        out.chunks_mut((h * d).max(1)).enumerate().for_each(|(ti, o)| run(&mut s, ti, 0..h, o));
    } else {
        out.par_chunks_mut((h * d).max(1))
            .enumerate()
            .for_each_init(AttnScratch::new, |s, (ti, o)| run(s, ti, 0..h, o));
    }
    Ok(CpuTensor::new(vec![t, h, d], out))
}

/// A scored key as one number whose ascending order is the selection order: descending score
/// (`f32::total_cmp`), ties to the lower key number (as `Backend::topk`). The high half is the
/// score's total-order bits, inverted; the low half the key number. A total order, so the top k
/// of a set are unique, and the top k of a union are the top k of the parts' top k.
type Scored = u64;

fn scored(score: f32, key: u32) -> Scored {
    let b = score.to_bits();
    // Ascending as `total_cmp`: negative values (sign set) reversed below the positive ones.
    let ordered = if b >> 31 == 1 { !b } else { b | 1 << 31 };
    (u64::from(!ordered) << 32) | u64::from(key)
}

/// The score of a [`Scored`] (bit for bit).
fn score_of(s: Scored) -> f32 {
    let ordered = !((s >> 32) as u32);
    f32::from_bits(if ordered >> 31 == 1 { ordered & !(1 << 31) } else { !ordered })
}

/// The key number of a [`Scored`].
fn key_of(s: Scored) -> usize {
    s as u32 as usize
}

/// Keeps the first `k` of `v` (in no particular order).
fn keep_best(v: &mut Vec<Scored>, k: usize) {
    if v.len() > k {
        if k > 0 {
            v.select_nth_unstable(k - 1);
        }
        v.truncate(k);
    }
}

/// Keys `indexer_select` scores before it looks at their scores.
const SCORE_BLOCK: usize = 64;

/// One query's indexer scoring: `Σ_h w_h · relu(q_h·key)·scale` for a key row.
struct Scorer<'a> {
    /// `[nh, dh]`.
    q: &'a [f32],
    /// `[nh]`.
    w: &'a [f32],
    dh: usize,
    scale: f32,
}

/// `max(x, 0)`, `+0.0` for zeros and NaN (as x86's `maxps(x, 0)`, which the SIMD scorer uses).
#[inline(always)]
fn relu(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

impl Scorer<'_> {
    /// The score of a key row; `DH` is the head width `dh` when the caller knows it at compile
    /// time, else 0. Same value either way. The heads' terms are added in order from `-0.0`.
    #[inline(always)]
    fn score<const DH: usize>(&self, key: &[f32]) -> f32 {
        let dh = if DH == 0 { self.dh } else { DH };
        self.w
            .iter()
            .enumerate()
            .fold(-0.0, |sum, (h, w)| sum + w * (relu(dot_n::<DH>(&self.q[h * dh..(h + 1) * dh], key)) * self.scale))
    }

    /// `out[j]` = the score of key row `row(j)`, bit for bit as [`Scorer::score`].
    #[inline(always)]
    fn score_rows<'a, const DH: usize>(&self, row: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if DH > 0 && DH.is_multiple_of(8) {
            done = x86::score_rows::<DH>(self, &row, out);
        }
        for (j, o) in out.iter_mut().enumerate().skip(done) {
            *o = self.score::<DH>(row(j));
        }
    }
}

/// [`Scorer::score`] and the attention logits four keys at a time with SSE2, or AVX where the
/// CPU has it: the same operations in the same order (so the same bits: no fused multiply-add),
/// with the four keys' last additions done side by side.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Scorer;

    /// `s[i..i + 4]`.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn load4(s: &[f32], i: usize) -> __m128 {
        let s = &s[i..i + 4];
        // SAFETY: `s` is 4 f32 values, 16 readable bytes; `_mm_loadu_ps` needs no alignment.
        unsafe { _mm_loadu_ps(s.as_ptr()) }
    }

    /// `s[i..i + 8]`.
    #[inline]
    #[target_feature(enable = "avx")]
    fn load8(s: &[f32], i: usize) -> __m256 {
        let s = &s[i..i + 8];
        // SAFETY: `s` is 8 f32 values, 32 readable bytes; `_mm256_loadu_ps` needs no alignment.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// `v` as four values.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn store(v: __m128) -> [f32; 4] {
        let mut out = [0f32; 4];
        // SAFETY: `out` is 4 f32 values, 16 writable bytes; `_mm_storeu_ps` needs no alignment.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// `[a0 + a4, a1 + a5, a2 + a6, a3 + a7]` for the eight partial sums a of `dot(q, k)` over
    /// `D` values (a multiple of 8), lanes 0..4 and 4..8 in two registers.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn folded_sse2<const D: usize>(q: &[f32], k: &[f32]) -> __m128 {
        let (q, k) = (&q[..D], &k[..D]);
        let (mut lo, mut hi) = (_mm_set1_ps(-0.0), _mm_set1_ps(-0.0));
        for c in (0..D).step_by(8) {
            lo = _mm_add_ps(lo, _mm_mul_ps(load4(q, c), load4(k, c)));
            hi = _mm_add_ps(hi, _mm_mul_ps(load4(q, c + 4), load4(k, c + 4)));
        }
        _mm_add_ps(lo, hi)
    }

    /// [`folded_sse2`] with the eight partial sums in one AVX register.
    #[inline]
    #[target_feature(enable = "avx")]
    fn folded_avx<const D: usize>(q: &[f32], k: &[f32]) -> __m128 {
        let (q, k) = (&q[..D], &k[..D]);
        let mut acc = _mm256_set1_ps(-0.0);
        for c in (0..D).step_by(8) {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(load8(q, c), load8(k, c)));
        }
        _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc))
    }

    /// The four dot products whose [`folded_sse2`] values are `f`: each is
    /// `(f_0 + f_1) + (f_2 + f_3)`, as in `dot`, done on the transposed values.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn dots4(f: [__m128; 4]) -> __m128 {
        // c_i = [f0_i, f1_i, f2_i, f3_i].
        let (t0, t1) = (_mm_unpacklo_ps(f[0], f[1]), _mm_unpackhi_ps(f[0], f[1]));
        let (t2, t3) = (_mm_unpacklo_ps(f[2], f[3]), _mm_unpackhi_ps(f[2], f[3]));
        let (c0, c1) = (_mm_movelh_ps(t0, t2), _mm_movehl_ps(t2, t0));
        let (c2, c3) = (_mm_movelh_ps(t1, t3), _mm_movehl_ps(t3, t1));
        _mm_add_ps(_mm_add_ps(c0, c1), _mm_add_ps(c2, c3))
    }

    /// `score_rows` and `logits` (see the dispatchers below) for one instruction set.
    macro_rules! kernels {
        ($feature:literal, $folded:ident, $score_rows:ident, $logits:ident) => {
            #[target_feature(enable = $feature)]
            pub(super) fn $score_rows<'a, const DH: usize>(
                s: &Scorer<'_>,
                row: &impl Fn(usize) -> &'a [f32],
                out: &mut [f32],
            ) -> usize {
                let (zero, scale) = (_mm_setzero_ps(), _mm_set1_ps(s.scale));
                for (i, o) in out.chunks_exact_mut(4).enumerate() {
                    let k = [row(4 * i), row(4 * i + 1), row(4 * i + 2), row(4 * i + 3)];
                    let mut sum = _mm_set1_ps(-0.0);
                    for (qh, &w) in s.q.chunks_exact(DH).zip(s.w) {
                        let f = [
                            $folded::<DH>(qh, k[0]),
                            $folded::<DH>(qh, k[1]),
                            $folded::<DH>(qh, k[2]),
                            $folded::<DH>(qh, k[3]),
                        ];
                        // `maxps(x, 0)` is `relu`: it returns the second operand unless the first
                        // is greater.
                        let relu = _mm_max_ps(dots4(f), zero);
                        sum = _mm_add_ps(sum, _mm_mul_ps(_mm_set1_ps(w), _mm_mul_ps(relu, scale)));
                    }
                    o.copy_from_slice(&store(sum));
                }
                out.len() / 4 * 4
            }

            #[target_feature(enable = $feature)]
            pub(super) fn $logits<const D: usize>(q: &[f32], keys: &[&[f32]], scale: f32, out: &mut [f32]) -> usize {
                let scale = _mm_set1_ps(scale);
                for (k, o) in keys.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
                    let f =
                        [$folded::<D>(q, k[0]), $folded::<D>(q, k[1]), $folded::<D>(q, k[2]), $folded::<D>(q, k[3])];
                    o.copy_from_slice(&store(_mm_mul_ps(dots4(f), scale)));
                }
                keys.len().min(out.len()) / 4 * 4
            }
        };
    }

    kernels!("sse2", folded_sse2, score_rows_sse2, logits_sse2);
    kernels!("avx", folded_avx, score_rows_avx, logits_avx);

    /// `out[j]` = the score of key row `row(j)` for the first multiple of 4 of `out`; returns
    /// how many (`DH` a non-zero multiple of 8).
    #[inline]
    pub(super) fn score_rows<'a, const DH: usize>(
        s: &Scorer<'_>,
        row: &impl Fn(usize) -> &'a [f32],
        out: &mut [f32],
    ) -> usize {
        if is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (just checked), all `score_rows_avx` needs.
            unsafe { score_rows_avx::<DH>(s, row, out) }
        } else {
            // SAFETY: `score_rows_sse2` only needs SSE2, which every x86_64 CPU has (it is part
            // of the x86_64 baseline, which the compiler assumes everywhere).
            unsafe { score_rows_sse2::<DH>(s, row, out) }
        }
    }

    /// `out[j] = dot(q, keys[j]) * scale` for the first multiple of 4 of `out` (as many as
    /// `keys`); returns how many (`D` a non-zero multiple of 8).
    #[inline]
    pub(super) fn logits<const D: usize>(q: &[f32], keys: &[&[f32]], scale: f32, out: &mut [f32]) -> usize {
        if is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (just checked), all `logits_avx` needs.
            unsafe { logits_avx::<D>(q, keys, scale, out) }
        } else {
            // SAFETY: as in `score_rows`: SSE2 is part of the x86_64 baseline.
            unsafe { logits_sse2::<D>(q, keys, scale, out) }
        }
    }
}

/// The best `k` keys of those fed to it. Keeps at most `2·max(k, 32)` candidates: when the buffer
/// fills, it is cut to its best k, and later keys that do not come before the k-th of those are
/// skipped.
struct TopK {
    k: usize,
    best: Vec<Scored>,
    /// Once `full`, the k-th best key so far: a later key must come before it to be kept.
    bar: Scored,
    full: bool,
    /// A block of decoded key rows, for pools that are not `f32`.
    decoded: Vec<f32>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK { k, best: Vec::with_capacity(2 * k.max(32)), bar: 0, full: false, decoded: Vec::new() }
    }

    fn clear(&mut self) {
        self.best.clear();
        self.full = false;
    }

    /// Scores keys `range` (key n is pool row `key_rows[n]`).
    fn feed(&mut self, s: &Scorer<'_>, keys: &CpuPool, key_rows: &[i32], range: Range<usize>) {
        match s.dh {
            16 => self.feed_n::<16>(s, keys, key_rows, range),
            32 => self.feed_n::<32>(s, keys, key_rows, range),
            64 => self.feed_n::<64>(s, keys, key_rows, range),
            128 => self.feed_n::<128>(s, keys, key_rows, range),
            _ => self.feed_n::<0>(s, keys, key_rows, range),
        }
    }

    fn feed_n<const DH: usize>(&mut self, s: &Scorer<'_>, keys: &CpuPool, key_rows: &[i32], range: Range<usize>) {
        let k = self.k;
        if k == 0 {
            return;
        }
        let cap = 2 * k.max(32);
        let TopK { best, bar, full, decoded, .. } = self;
        // Keys `start..` with scores `scores` as candidates.
        // The bar's score, -inf until there is a bar: a lower score (as floats, so also in the
        // total order) cannot make it, which is a cheaper first test.
        let mut low = if *full { score_of(*bar) } else { f32::NEG_INFINITY };
        let mut take = |scores: &[f32], start: usize| {
            for (&sc, key) in scores.iter().zip(start..) {
                if sc < low {
                    continue;
                }
                let c = scored(sc, key as u32);
                if *full && c >= *bar {
                    continue;
                }
                best.push(c);
                if best.len() == cap {
                    best.select_nth_unstable(k - 1);
                    best.truncate(k);
                    *bar = best[k - 1];
                    *full = true;
                    low = score_of(*bar);
                }
            }
        };
        // Keys are scored a block at a time with no branch between them, then filtered.
        let width = keys.width();
        let mut scores = [0f32; SCORE_BLOCK];
        let blocks = range.clone().step_by(SCORE_BLOCK).map(|start| start..(start + SCORE_BLOCK).min(range.end));
        if width == 0 {
            for r in blocks {
                s.score_rows::<DH>(|_| &[], &mut scores[..r.len()]);
                take(&scores[..r.len()], r.start);
            }
        } else if keys.format() == RowFormat::F32 {
            for r in blocks {
                let rows = &key_rows[r.clone()];
                s.score_rows::<DH>(|j| keys.f32_row(rows[j] as usize).expect("an f32 pool"), &mut scores[..r.len()]);
                take(&scores[..r.len()], r.start);
            }
        } else {
            decoded.resize(SCORE_BLOCK * width, 0.0);
            for r in blocks {
                let mut block: [&[f32]; SCORE_BLOCK] = [&[]; SCORE_BLOCK];
                let scratch = decoded.chunks_exact_mut(width);
                for ((b, &row), scratch) in block.iter_mut().zip(&key_rows[r.clone()]).zip(scratch) {
                    *b = keys.row(row as usize, scratch);
                }
                s.score_rows::<DH>(|j| block[j], &mut scores[..r.len()]);
                take(&scores[..r.len()], r.start);
            }
        }
    }

    /// The best k of the keys fed, in no particular order.
    fn finish(&mut self) -> &mut Vec<Scored> {
        keep_best(&mut self.best, self.k);
        &mut self.best
    }
}

/// The query's picks from its candidates (a superset of its top k): the top k in rank order as
/// pool rows + `offset`, `-1` past them.
fn write_picks(cands: &mut Vec<Scored>, k: usize, key_rows: &[i32], offset: i32, o: &mut [i32]) {
    keep_best(cands, k);
    cands.sort_unstable();
    o.fill(-1);
    for (slot, &c) in o.iter_mut().zip(cands.iter()) {
        *slot = key_rows[key_of(c)] + offset;
    }
}

/// Lightning-indexer selection over each query's valid range only (see `Backend::indexer_select`):
/// key n is row `key_rows[n]` of the pool `keys`.
#[allow(clippy::too_many_arguments)]
pub fn indexer_select(
    q: &CpuTensor,
    keys: &CpuPool,
    key_rows: &CpuIndex,
    weights: &CpuTensor,
    valid: &[Range<usize>],
    k: usize,
    offset: i32,
) -> Result<CpuIndex> {
    indexer_select_sharing(q, keys, key_rows, weights, valid, k, offset, SHARE_WORK)
}

/// [`indexer_select`], sharing a query's keys among threads from `share_work` multiply-adds per
/// thread.
#[allow(clippy::too_many_arguments)]
fn indexer_select_sharing(
    q: &CpuTensor,
    keys: &CpuPool,
    key_rows: &CpuIndex,
    weights: &CpuTensor,
    valid: &[Range<usize>],
    k: usize,
    offset: i32,
    share_work: usize,
) -> Result<CpuIndex> {
    let (t, nh, dh) = match q.shape[..] {
        [t, nh, dh] => (t, nh, dh),
        _ => return Err(err(format!("indexer_select: q {:?}", q.shape))),
    };
    let n = key_rows.data.len();
    if key_rows.shape.len() != 1 || keys.width() != dh || weights.shape != [t, nh] || valid.len() != t {
        return Err(err(format!(
            "indexer_select: q {:?}, keys a pool of width {}, key_rows {:?}, weights {:?}, {} validity ranges",
            q.shape,
            keys.width(),
            key_rows.shape,
            weights.shape,
            valid.len()
        )));
    }
    if u32::try_from(n).is_err() {
        return Err(err(format!("indexer_select: {n} keys are more than 2^32")));
    }
    check_rows(keys, "indexer_select", "key row", &key_rows.data, false)?;
    if let Some(r) = valid.iter().find(|r| r.end > n || r.start > r.end) {
        return Err(err(format!("indexer_select: valid range {r:?} outside {n} keys")));
    }
    if k > n {
        return Err(err(format!("indexer_select: k = {k} but only {n} keys")));
    }
    let scale = (dh as f32).powf(-0.5);
    let scorer = |ti: usize| Scorer {
        q: &q.data[ti * nh * dh..(ti + 1) * nh * dh],
        w: &weights.data[ti * nh..(ti + 1) * nh],
        dh,
        scale,
    };
    let rows = &key_rows.data[..];
    let mut out = vec![-1i32; t * k];
    if k == 0 {
        return Ok(CpuIndex::new(vec![t, k], out));
    }
    let work: usize = valid.iter().map(|r| r.len()).sum::<usize>() * nh * dh;
    let longest = valid.iter().map(|r| r.len()).max().unwrap_or(0);
    // Keys a thread claims at a time when threads share a query's keys: about 2^16 multiply-adds.
    let claim = ((1 << 16) / (nh * dh).max(1)).clamp(SCORE_BLOCK, 4096);
    let sharing = sharers(t, longest.div_ceil(claim), work, share_work);
    // Query `ti` on one thread.
    let run = |top: &mut TopK, ti: usize, o: &mut [i32]| {
        top.clear();
        top.feed(&scorer(ti), keys, rows, valid[ti].clone());
        write_picks(top.finish(), k, rows, offset, o);
    };
    if sharing > 1 {
        // Few queries (decode): the threads share each query's keys, `claim` at a time, and
        // their best k are merged.
        let mut cands = Vec::new();
        for (ti, o) in out.chunks_mut(k).enumerate() {
            let (r, s) = (valid[ti].clone(), scorer(ti));
            let next = AtomicUsize::new(r.start);
            let tops = together(
                sharing - 1,
                || TopK::new(k),
                |top| loop {
                    let start = next.fetch_add(claim, AtomicOrdering::Relaxed);
                    if start >= r.end {
                        break;
                    }
                    top.feed(&s, keys, rows, start..(start + claim).min(r.end));
                },
            );
            cands.clear();
            for mut top in tops {
                cands.extend_from_slice(top.finish());
            }
            write_picks(&mut cands, k, rows, offset, o);
        }
    } else if work < MIN_WORK || t <= 1 {
        let mut top = TopK::new(k);
        out.chunks_mut(k).enumerate().for_each(|(ti, o)| run(&mut top, ti, o));
    } else {
        out.par_chunks_mut(k).enumerate().for_each_init(|| TopK::new(k), |top, (ti, o)| run(top, ti, o));
    }
    Ok(CpuIndex::new(vec![t, k], out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SplitMix64 stream of values in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    fn pool(format: RowFormat, rows: usize, width: usize, values: &[f32]) -> CpuPool {
        let mut p = CpuPool::new(rows, width, format).unwrap();
        let slots = CpuIndex::new(vec![rows], (0..rows as i32).collect());
        p.write(&slots, &CpuTensor::new(vec![rows, width], values.to_vec())).unwrap();
        p
    }

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    /// The specification: every valid key scored, all of them sorted by rank, the first k kept.
    #[allow(clippy::too_many_arguments)]
    fn select_by_full_sort(
        q: &CpuTensor,
        keys: &CpuPool,
        key_rows: &[i32],
        w: &CpuTensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
    ) -> Vec<i32> {
        let (nh, dh) = (q.shape[1], q.shape[2]);
        let mut out = vec![-1; valid.len() * k];
        let mut row = vec![0f32; dh];
        for (ti, r) in valid.iter().enumerate() {
            let s = Scorer {
                q: &q.data[ti * nh * dh..(ti + 1) * nh * dh],
                w: &w.data[ti * nh..(ti + 1) * nh],
                dh,
                scale: (dh as f32).powf(-0.5),
            };
            let mut all: Vec<(f32, usize)> =
                r.clone().map(|n| (s.score::<0>(keys.row(key_rows[n] as usize, &mut row)), n)).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (slot, (_, n)) in out[ti * k..(ti + 1) * k].iter_mut().zip(all) {
                *slot = key_rows[n] + offset;
            }
        }
        out
    }

    #[test]
    fn the_selection_order_is_total_cmp_then_the_key_number() {
        let values = [
            f32::NEG_INFINITY,
            -1.5,
            -f32::MIN_POSITIVE / 2.0,
            -0.0,
            0.0,
            f32::MIN_POSITIVE / 2.0,
            1.5,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        for &a in &values {
            for &b in &values {
                for (ka, kb) in [(3u32, 3u32), (3, 4), (4, 3), (0, u32::MAX - 1)] {
                    let want = b.total_cmp(&a).then(ka.cmp(&kb));
                    assert_eq!(scored(a, ka).cmp(&scored(b, kb)), want, "{a} #{ka} vs {b} #{kb}");
                    assert_eq!(score_of(scored(a, ka)).to_bits(), a.to_bits());
                }
            }
        }
        assert_eq!(key_of(scored(-3.0, 77)), 77);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    fn scores_match<const DH: usize>(rng: &mut Rng) {
        let nh = 3;
        let q = rng.vec(nh * DH);
        let w = [0.7, -0.3, 0.0];
        let s = Scorer { q: &q, w: &w, dh: DH, scale: (DH as f32).powf(-0.5) };
        let mut rows: Vec<Vec<f32>> = (0..37).map(|_| rng.vec(DH)).collect();
        rows[5].fill(0.0);
        rows[6] = q[..DH].iter().zip(&q[DH..2 * DH]).map(|(a, b)| -a - b).collect();
        rows[7] = q[..DH].iter().map(|v| -v).collect();
        let want: Vec<f32> = rows.iter().map(|r| s.score::<0>(r)).collect();
        let mut got = vec![0f32; rows.len()];
        s.score_rows::<DH>(|j| &rows[j], &mut got);
        assert_eq!(bits(&got), bits(&want), "dh {DH}");
        #[cfg(target_arch = "x86_64")]
        {
            let row = |j: usize| &rows[j][..];
            let n = rows.len() / 4 * 4;
            // SAFETY: SSE2 is part of the x86_64 baseline.
            assert_eq!(unsafe { x86::score_rows_sse2::<DH>(&s, &row, &mut got) }, n);
            assert_eq!(bits(&got[..n]), bits(&want[..n]), "dh {DH}, SSE2");
            if is_x86_feature_detected!("avx") {
                got.fill(0.0);
                // SAFETY: the CPU has AVX (just checked).
                assert_eq!(unsafe { x86::score_rows_avx::<DH>(&s, &row, &mut got) }, n);
                assert_eq!(bits(&got[..n]), bits(&want[..n]), "dh {DH}, AVX");
            }
        }
    }

    fn attention_matches<const D: usize>(rng: &mut Rng) {
        let q = rng.vec(D);
        let rows: Vec<Vec<f32>> = (0..37).map(|_| rng.vec(D)).collect();
        let keys: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
        let (mut fast, mut plain, mut logits) = (vec![0f32; D], vec![0f32; D], Vec::new());
        attend::<D>(&q, &keys, 0.25, 0.3, &mut logits, &mut fast);
        attend::<0>(&q, &keys, 0.25, 0.3, &mut logits, &mut plain);
        assert_eq!(bits(&fast), bits(&plain), "d {D}");
        #[cfg(target_arch = "x86_64")]
        {
            let want: Vec<f32> = keys.iter().map(|k| dot(&q, k) * 0.3).collect();
            let n = keys.len() / 4 * 4;
            let mut got = vec![0f32; keys.len()];
            // SAFETY: SSE2 is part of the x86_64 baseline.
            assert_eq!(unsafe { x86::logits_sse2::<D>(&q, &keys, 0.3, &mut got) }, n);
            assert_eq!(bits(&got[..n]), bits(&want[..n]), "d {D}, SSE2");
            if is_x86_feature_detected!("avx") {
                got.fill(0.0);
                // SAFETY: the CPU has AVX (just checked).
                assert_eq!(unsafe { x86::logits_avx::<D>(&q, &keys, 0.3, &mut got) }, n);
                assert_eq!(bits(&got[..n]), bits(&want[..n]), "d {D}, AVX");
            }
        }
    }

    #[test]
    fn kernels_for_known_widths_are_the_generic_ones_bit_for_bit() {
        let mut rng = Rng(3);
        scores_match::<16>(&mut rng);
        scores_match::<32>(&mut rng);
        scores_match::<64>(&mut rng);
        scores_match::<128>(&mut rng);
        attention_matches::<32>(&mut rng);
        attention_matches::<64>(&mut rng);
        attention_matches::<128>(&mut rng);
        attention_matches::<512>(&mut rng);
    }

    #[test]
    fn indexer_select_is_the_same_however_the_keys_are_shared() {
        let mut rng = Rng(1);
        let (nh, rows, n, t) = (3, 5000, 6000, 6);
        // Key rows in a scrambled order, some rows used by several keys (exact ties).
        let key_rows: Vec<i32> = (0..n).map(|i| ((i * 7919) % rows) as i32).collect();
        let kr = CpuIndex::new(vec![n], key_rows.clone());
        let valid = vec![0..n, 0..0, 100..5900, 0..40, 0..n, 3000..n];
        for dh in [16, 20] {
            let keys: Vec<f32> = rng.vec(rows * dh);
            let q = CpuTensor::new(vec![t, nh, dh], rng.vec(t * nh * dh));
            // Query 4 weighs every head 0: all its scores tie and the lowest key numbers win.
            let mut w = rng.vec(t * nh);
            w[4 * nh..5 * nh].fill(0.0);
            let w = CpuTensor::new(vec![t, nh], w);
            for format in [RowFormat::F32, RowFormat::Bf16] {
                let p = pool(format, rows, dh, &keys);
                for k in [0, 1, 7, 64, 600] {
                    let want = select_by_full_sort(&q, &p, &key_rows, &w, &valid, k, 9);
                    let lowest: Vec<i32> = key_rows[..k.min(3)].iter().map(|r| r + 9).collect();
                    assert_eq!(&want[4 * k..4 * k + k.min(3)], &lowest[..]);
                    let case = |threads| format!("dh {dh}, {format:?}, k {k}, {threads} threads");
                    for threads in [1, 2, 3, 8] {
                        let all = in_pool(threads, || indexer_select(&q, &p, &kr, &w, &valid, k, 9).unwrap());
                        assert_eq!(*all.data, want, "{}, all queries", case(threads));
                        // One query at a time, its keys shared among the threads.
                        for ti in 0..t {
                            let qi = CpuTensor::new(vec![1, nh, dh], q.data[ti * nh * dh..(ti + 1) * nh * dh].to_vec());
                            let wi = CpuTensor::new(vec![1, nh], w.data[ti * nh..(ti + 1) * nh].to_vec());
                            let one = in_pool(threads, || {
                                indexer_select_sharing(&qi, &p, &kr, &wi, &valid[ti..ti + 1], k, 9, 1).unwrap()
                            });
                            assert_eq!(*one.data, want[ti * k..(ti + 1) * k], "{}, query {ti}", case(threads));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_attention_is_the_same_however_the_heads_are_shared() {
        let mut rng = Rng(2);
        let (h, rows, k) = (5, 900, 700);
        for d in [24, 32] {
            for format in [RowFormat::F32, RowFormat::Fp8 { rope: 8 }] {
                let p = pool(format, rows, d, &rng.vec(rows * d));
                for t in [1, 2, 7] {
                    let q = CpuTensor::new(vec![t, h, d], rng.vec(t * h * d));
                    let idx: Vec<i32> =
                        (0..t * k).map(|i| if i % 11 == 3 { -1 } else { ((i * 31) % rows) as i32 }).collect();
                    let idx = CpuIndex::new(vec![t, k], idx);
                    let sinks = CpuTensor::new(vec![h], rng.vec(h));
                    let one = in_pool(1, || sparse_attention(&q, &p, &idx, &sinks, 0.3).unwrap());
                    for threads in [2, 3, 8] {
                        let got = in_pool(threads, || sparse_attention(&q, &p, &idx, &sinks, 0.3).unwrap());
                        assert_eq!(got.data, one.data, "d {d}, {format:?}, T {t}, {threads} threads");
                        let shared =
                            in_pool(threads, || sparse_attention_sharing(&q, &p, &idx, &sinks, 0.3, 1).unwrap());
                        assert_eq!(shared.data, one.data, "d {d}, {format:?}, T {t}, {threads} threads, shared");
                    }
                }
            }
        }
    }
}
