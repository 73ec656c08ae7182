//! CPU kernels for V4's fused ops. The trait's default compositions materialise gathered keys
//! `[T, K, d]` and dense `[T, N]` score masks, which is fine for short prompts but not for long
//! contexts; these stream over each query's keys instead. Same semantics, f32 accumulation.
//!
//! Keys are read straight from the pool: an `f32` pool's rows are borrowed, other formats are
//! decoded, once for all the queries of a call that read rows again and again (a prefill's:
//! [`DecodedRows`]), else into a buffer private to the thread, so the summation order, and for
//! `f32` pools every bit, is the same whatever the format.
//!
//! The indexer's scores, the attention logits, softmax and weighted sums and the decoding of
//! pool rows are the SIMD kernels of `kernels::attn` (scalar, AVX2 or AVX-512, picked by
//! `kernels::Isa`), which give the same bits on every instruction set.
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

use crate::kernels::attn::{self, IndexQuery};
use crate::kernels::Isa;
use crate::par::{self, MIN_WORK};
use crate::pool::CpuPool;
use crate::storage::{CpuIndex, CpuTensor};
use crate::threads;

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

/// Multiply-adds each thread should get before a kernel shares one query's work among the
/// threads of the team. The hand-off to a spinning team costs about a microsecond, and to a
/// parked one tens of microseconds; this much work takes about 15 microseconds on one core.
const SHARE_WORK: usize = 1 << 18;

/// How many parts of the thread team should share the work of `t` queries (`work`
/// multiply-adds in all) that can each be split into `items` parts: 1 when the queries are
/// enough to fill the team or the work is too small to hand off; else up to the team's size,
/// with `share_work` (normally [`SHARE_WORK`]) each at least.
fn sharers(t: usize, items: usize, work: usize, share_work: usize) -> usize {
    let threads = threads::size();
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

/// Runs `work` on up to `parts` parts of the backend's thread team at once ([`threads::run`];
/// the calling thread is one of them), each with its own state from `init`; returns the states
/// of the parts that ran, in no particular order. A part may start late, or not at all (a busy
/// team runs one part, on the calling thread), so `work` should claim its share from a shared
/// counter until none is left.
fn together<S: Send>(parts: usize, init: impl Fn() -> S + Sync, work: impl Fn(&mut S) + Sync) -> Vec<S> {
    if parts <= 1 {
        let mut own = init();
        work(&mut own);
        return vec![own];
    }
    let done = Mutex::new(Vec::with_capacity(parts));
    threads::run(&|part, _| {
        if part < parts {
            let mut state = init();
            work(&mut state);
            done.lock().unwrap_or_else(|e| e.into_inner()).push(state);
        }
    });
    done.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// `f(state, i, pieces[i])` for every piece, on up to `parts` parts of the team (see
/// [`together`]), each with its own state from `init`.
fn for_pieces<T: Send, S: Send>(
    parts: usize,
    pieces: Vec<&mut [T]>,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    if parts <= 1 {
        let mut state = init();
        pieces.into_iter().enumerate().for_each(|(i, o)| f(&mut state, i, o));
        return;
    }
    // One lock per piece, each taken once (uncontended): the pieces are disjoint.
    let pieces: Vec<Mutex<&mut [T]>> = pieces.into_iter().map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    together(parts, init, |state| loop {
        let i = next.fetch_add(1, AtomicOrdering::Relaxed);
        let Some(piece) = pieces.get(i) else { break };
        f(state, i, &mut piece.lock().unwrap_or_else(|e| e.into_inner()));
    });
}

/// Pool rows `rows` decoded into `decoded` (SIMD, bit for bit as `RowFormat::decode`) when the
/// pool is not `f32` (an `f32` pool's rows are borrowed instead: see [`row_slices`]).
fn decode_rows(isa: Isa, pool: &CpuPool, rows: &[usize], decoded: &mut Vec<f32>) {
    if pool.format() == RowFormat::F32 {
        return;
    }
    let d = pool.width();
    decoded.clear();
    decoded.resize(rows.len() * d, 0.0);
    pool.decode_rows(isa, rows, decoded);
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

/// The rows of a non-`f32` pool that a call's queries read, each decoded once for all of them.
/// A prefill's queries share most of their keys (the window's rows, the compressed entries
/// before them), so decoding each query's rows for itself decoded every row about as many
/// times as there are queries that read it: in a 512-token `bf16` prefill of the 0.75 B
/// benchmark model, 9 of `sparse_attention`'s 20 ms a layer.
struct DecodedRows {
    /// The lowest pool row read.
    lo: usize,
    /// The slot in `values` of pool row `lo + i` (`u32::MAX`: not read).
    slot: Vec<u32>,
    /// The rows read, decoded, in pool-row order (`width` values each).
    values: Vec<f32>,
    width: usize,
}

/// Bytes a call may spend on [`DecodedRows`] (its slot map, row list and decoded rows
/// together); beyond this each query decodes its own rows as before.
const DECODE_ONCE_BYTES: usize = 64 << 20;

impl DecodedRows {
    /// The valid rows of `ids` (`-1` entries skipped; `ids` already checked against the pool),
    /// decoded, if the pool is not `f32`, the queries make at least `reads` ≥ 2 reads a row
    /// (else decoding each query's rows costs no more, and stays in the cache: a decode step's
    /// few queries), and the map, list and rows fit in `budget` bytes. The setup (a pass over
    /// `ids` and one over the span of rows they name) runs on the calling thread.
    fn new(isa: Isa, pool: &CpuPool, ids: &[i32], reads: usize, budget: usize) -> Option<Self> {
        let width = pool.width();
        if pool.format() == RowFormat::F32 || width == 0 {
            return None;
        }
        let (lo, hi) = ids.iter().filter(|&&i| i >= 0).fold((usize::MAX, 0), |(lo, hi), &i| {
            let i = i as usize;
            (lo.min(i), hi.max(i))
        });
        if lo > hi || (hi - lo + 1).saturating_mul(4) > budget {
            return None;
        }
        // Row ids are i32, so fewer than 2^31 rows: a slot number never reaches the u32::MAX
        // that marks a row not read.
        let mut slot = vec![u32::MAX; hi - lo + 1];
        for &i in ids.iter().filter(|&&i| i >= 0) {
            slot[i as usize - lo] = 0;
        }
        let count = slot.iter().filter(|&&s| s != u32::MAX).count();
        let bytes = slot.len() * 4 + count.saturating_mul(8 + width * 4);
        if reads < 2 * count || bytes > budget {
            return None;
        }
        let mut rows = Vec::with_capacity(count);
        for (j, s) in slot.iter_mut().enumerate() {
            if *s != u32::MAX {
                *s = rows.len() as u32;
                rows.push(lo + j);
            }
        }
        const ROWS_PER_TASK: usize = 16;
        let values = par::filled(rows.len() * width, ROWS_PER_TASK * width, rows.len() * width, |i, o| {
            let first = i * ROWS_PER_TASK;
            pool.decode_rows(isa, &rows[first..first + o.len() / width], o)
        });
        Some(DecodedRows { lo, slot, values, width })
    }

    /// Pool row `r` (one of those read), decoded.
    fn row(&self, r: usize) -> &[f32] {
        let s = self.slot[r - self.lo] as usize;
        &self.values[s * self.width..(s + 1) * self.width]
    }
}

/// Buffers of one `sparse_attention` worker, reused from query to query.
struct AttnScratch {
    /// The query whose key rows `rows` (and `decoded`) hold, if any.
    query: Option<usize>,
    rows: Vec<usize>,
    decoded: Vec<f32>,
    probs: Vec<f32>,
}

impl AttnScratch {
    fn new() -> Self {
        AttnScratch { query: None, rows: Vec::new(), decoded: Vec::new(), probs: Vec::new() }
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
    sparse_attention_with(Isa::active(), q, kv, idx, sinks, scale, SHARE_WORK, DECODE_ONCE_BYTES)
}

/// [`sparse_attention`] with the kernels of `isa`, sharing a query's heads among threads from
/// `share_work` multiply-adds per thread, and with several queries decoding the rows of a
/// non-`f32` pool once for all ([`DecodedRows`]) within `decode_once_bytes`. Neither choice
/// changes a bit of the result (the same decoded values, the same kernels).
#[allow(clippy::too_many_arguments)]
fn sparse_attention_with(
    isa: Isa,
    q: &CpuTensor,
    kv: &CpuPool,
    idx: &CpuIndex,
    sinks: &CpuTensor,
    scale: f32,
    share_work: usize,
    decode_once_bytes: usize,
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
    let mut out = par::zeroed(t * h * d);
    if out.is_empty() {
        return Ok(CpuTensor::new(vec![t, h, d], out));
    }
    let once = if t > 1 {
        let reads = idx.data.iter().filter(|&&i| i >= 0).count();
        DecodedRows::new(isa, kv, &idx.data, reads, decode_once_bytes)
    } else {
        None
    };
    // Heads `heads` of query `ti`, whose outputs are `o` (`d` values per head).
    let run = |s: &mut AttnScratch, ti: usize, heads: Range<usize>, o: &mut [f32]| {
        if s.query != Some(ti) {
            s.rows.clear();
            s.rows.extend(idx.data[ti * k..(ti + 1) * k].iter().filter(|&&i| i >= 0).map(|&i| i as usize));
            if once.is_none() {
                decode_rows(isa, kv, &s.rows, &mut s.decoded);
            }
            s.query = Some(ti);
        }
        let keys = match &once {
            Some(once) => s.rows.iter().map(|&r| once.row(r)).collect(),
            None => row_slices(kv, &s.rows, &s.decoded),
        };
        let qh = &q.data[(ti * h + heads.start) * d..(ti * h + heads.end) * d];
        attn::attend(isa, qh, &keys, &sinks.data[heads], scale, &mut s.probs, o);
    };
    let work = t * h * k * d;
    let sharing = sharers(t, h, work, share_work);
    if sharing > 1 {
        // Few queries (decode): their heads are shared out in blocks, one per thread.
        let block = h.div_ceil(sharing);
        let blocks = h.div_ceil(block);
        let parts: Vec<&mut [f32]> = out.chunks_mut(h * d).flat_map(|o| o.chunks_mut(block * d)).collect();
        for_pieces(sharing, parts, AttnScratch::new, |s, i, o| {
            let (ti, start) = (i / blocks, (i % blocks) * block);
            run(s, ti, start..start + o.len() / d, o)
        });
    } else {
        let parts = if work < MIN_WORK || t <= 1 { 1 } else { threads::size() };
        for_pieces(parts, out.chunks_mut(h * d).collect(), AttnScratch::new, |s, ti, o| run(s, ti, 0..h, o));
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

    /// Scores keys `range` (key n is pool row `key_rows[n]`) with the kernels of `isa`, reading
    /// the rows of a non-`f32` pool from `decoded` where the call decoded them once for all.
    fn feed(
        &mut self,
        isa: Isa,
        q: &IndexQuery,
        keys: &CpuPool,
        decoded_once: Option<&DecodedRows>,
        key_rows: &[i32],
        range: Range<usize>,
    ) {
        let k = self.k;
        if k == 0 {
            return;
        }
        let cap = 2 * k.max(32);
        let TopK { best, bar, full, decoded, .. } = self;
        // The bar's score, -inf until there is a bar: a lower score (as floats, so also in the
        // total order) cannot make it, which is a cheaper first test.
        let mut low = if *full { score_of(*bar) } else { f32::NEG_INFINITY };
        // Keys `start..` with scores `scores` as candidates.
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
        // Keys are scored a block at a time, then filtered.
        let width = keys.width();
        let mut scores = [0f32; SCORE_BLOCK];
        let blocks = range.clone().step_by(SCORE_BLOCK).map(|start| start..(start + SCORE_BLOCK).min(range.end));
        if width == 0 || keys.format() == RowFormat::F32 || decoded_once.is_some() {
            let mut block: [&[f32]; SCORE_BLOCK] = [&[]; SCORE_BLOCK];
            for r in blocks {
                for (b, &row) in block.iter_mut().zip(&key_rows[r.clone()]) {
                    *b = match decoded_once {
                        Some(once) => once.row(row as usize),
                        None => keys.f32_row(row as usize).unwrap_or(&[]),
                    };
                }
                attn::index_scores(isa, q, &block[..r.len()], &mut scores[..r.len()]);
                take(&scores[..r.len()], r.start);
            }
        } else {
            decoded.resize(SCORE_BLOCK * width, 0.0);
            let mut rows = [0usize; SCORE_BLOCK];
            for r in blocks {
                for (row, &kr) in rows.iter_mut().zip(&key_rows[r.clone()]) {
                    *row = kr as usize;
                }
                keys.decode_rows(isa, &rows[..r.len()], &mut decoded[..r.len() * width]);
                let mut block: [&[f32]; SCORE_BLOCK] = [&[]; SCORE_BLOCK];
                for (b, row) in block.iter_mut().zip(decoded.chunks_exact(width)) {
                    *b = row;
                }
                attn::index_scores(isa, q, &block[..r.len()], &mut scores[..r.len()]);
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
    indexer_select_with(Isa::active(), q, keys, key_rows, weights, valid, k, offset, SHARE_WORK, DECODE_ONCE_BYTES)
}

/// [`indexer_select`] with the kernels of `isa`, sharing a query's keys among threads from
/// `share_work` multiply-adds per thread, and with several queries decoding the keys of a
/// non-`f32` pool once for all ([`DecodedRows`]) within `decode_once_bytes` (a prefill's
/// queries score the same keys, each a prefix of them). Neither choice changes the result.
#[allow(clippy::too_many_arguments)]
fn indexer_select_with(
    isa: Isa,
    q: &CpuTensor,
    keys: &CpuPool,
    key_rows: &CpuIndex,
    weights: &CpuTensor,
    valid: &[Range<usize>],
    k: usize,
    offset: i32,
    share_work: usize,
    decode_once_bytes: usize,
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
    // Query `ti` laid out for the kernels, in `iq`.
    let prepare = |iq: &mut IndexQuery, ti: usize| {
        iq.set(&q.data[ti * nh * dh..(ti + 1) * nh * dh], &weights.data[ti * nh..(ti + 1) * nh], dh, scale)
    };
    let rows = &key_rows.data[..];
    let mut out = vec![-1i32; t * k];
    if k == 0 {
        return Ok(CpuIndex::new(vec![t, k], out));
    }
    // Keys scored, all queries together.
    let reads: usize = valid.iter().map(|r| r.len()).sum();
    let work = reads * nh * dh;
    // Keys `lo..hi` (from the first key any query scores to the last: the model's queries
    // score prefixes), decoded once when several queries read them again and again.
    let read = valid.iter().filter(|r| !r.is_empty());
    let (lo, hi) = read.fold((n, 0), |(lo, hi), r| (lo.min(r.start), hi.max(r.end)));
    let once =
        if t > 1 && lo < hi { DecodedRows::new(isa, keys, &rows[lo..hi], reads, decode_once_bytes) } else { None };
    let once = once.as_ref();
    let longest = valid.iter().map(|r| r.len()).max().unwrap_or(0);
    // Keys a thread claims at a time when threads share a query's keys: about 2^16 multiply-adds.
    let claim = ((1 << 16) / (nh * dh).max(1)).clamp(SCORE_BLOCK, 4096);
    let sharing = sharers(t, longest.div_ceil(claim), work, share_work);
    // Query `ti` on one thread.
    let run = |(top, iq): &mut (TopK, IndexQuery), ti: usize, o: &mut [i32]| {
        prepare(iq, ti);
        top.clear();
        top.feed(isa, iq, keys, once, rows, valid[ti].clone());
        write_picks(top.finish(), k, rows, offset, o);
    };
    if sharing > 1 {
        // Few queries (decode): the threads share each query's keys, `claim` at a time, and
        // their best k are merged.
        let (mut cands, mut iq) = (Vec::new(), IndexQuery::default());
        for (ti, o) in out.chunks_mut(k).enumerate() {
            prepare(&mut iq, ti);
            let r = valid[ti].clone();
            let next = AtomicUsize::new(r.start);
            let tops = together(
                sharing,
                || TopK::new(k),
                |top| loop {
                    let start = next.fetch_add(claim, AtomicOrdering::Relaxed);
                    if start >= r.end {
                        break;
                    }
                    top.feed(isa, &iq, keys, once, rows, start..(start + claim).min(r.end));
                },
            );
            cands.clear();
            for mut top in tops {
                cands.extend_from_slice(top.finish());
            }
            write_picks(&mut cands, k, rows, offset, o);
        }
    } else {
        let parts = if work < MIN_WORK || t <= 1 { 1 } else { threads::size() };
        let init = || (TopK::new(k), IndexQuery::default());
        for_pieces(parts, out.chunks_mut(k).collect(), init, run);
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

    /// The specification: every valid key scored (by the scalar kernel, one at a time), all of
    /// them sorted by rank, the first k kept.
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
            let iq = IndexQuery::new(
                &q.data[ti * nh * dh..(ti + 1) * nh * dh],
                &w.data[ti * nh..(ti + 1) * nh],
                dh,
                (dh as f32).powf(-0.5),
            );
            let score = |row: &[f32]| {
                let mut s = [0f32];
                attn::index_scores(Isa::Scalar, &iq, &[row], &mut s);
                s[0]
            };
            let mut all: Vec<(f32, usize)> =
                r.clone().map(|n| (score(keys.row(key_rows[n] as usize, &mut row)), n)).collect();
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

    #[test]
    fn indexer_select_is_the_same_on_every_isa_and_however_the_keys_are_shared() {
        let mut rng = Rng(1);
        let (nh, rows, n, t) = (3, 5000, 6000, 6);
        // Key rows in a scrambled order, some rows used by several keys (exact ties), row 0
        // not among them (rows decoded once start past it).
        let key_rows: Vec<i32> = (0..n).map(|i| (1 + (i * 7919) % (rows - 1)) as i32).collect();
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
                    for isa in Isa::supported() {
                        let case = format!("{isa:?}, dh {dh}, {format:?}, k {k}");
                        // All queries, their keys decoded once (within 64 MiB, and short of the
                        // rows by one byte) or per query.
                        for decode_once in [DECODE_ONCE_BYTES, (rows - 1) * (dh + 3) * 4 - 1, 0] {
                            let all = indexer_select_with(isa, &q, &p, &kr, &w, &valid, k, 9, SHARE_WORK, decode_once)
                                .unwrap();
                            assert_eq!(
                                *all.data, want,
                                "{case}, all queries, decoding once within {decode_once} bytes"
                            );
                        }
                        // One query at a time, on one thread and with its keys shared among the
                        // team's threads.
                        for ti in 0..t {
                            let qi = CpuTensor::new(vec![1, nh, dh], q.data[ti * nh * dh..(ti + 1) * nh * dh].to_vec());
                            let wi = CpuTensor::new(vec![1, nh], w.data[ti * nh..(ti + 1) * nh].to_vec());
                            for share_work in [usize::MAX, 1] {
                                let one = indexer_select_with(
                                    isa,
                                    &qi,
                                    &p,
                                    &kr,
                                    &wi,
                                    &valid[ti..ti + 1],
                                    k,
                                    9,
                                    share_work,
                                    0,
                                )
                                .unwrap();
                                assert_eq!(*one.data, want[ti * k..(ti + 1) * k], "{case}, query {ti}, {share_work}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_attention_is_the_same_on_every_isa_and_however_the_heads_are_shared() {
        let mut rng = Rng(2);
        let (h, rows, k) = (5, 900, 700);
        for d in [24, 32, 37] {
            for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 8 }] {
                let p = pool(format, rows, d, &rng.vec(rows * d));
                for t in [1, 2, 7] {
                    let q = CpuTensor::new(vec![t, h, d], rng.vec(t * h * d));
                    // Every other row from row 50 of the pool (the rows decoded once start at a
                    // row other than 0, with gaps), most read by several queries, some entries -1.
                    let idx: Vec<i32> =
                        (0..t * k).map(|i| if i % 11 == 3 { -1 } else { (50 + 2 * ((i * 31) % 425)) as i32 }).collect();
                    let idx = CpuIndex::new(vec![t, k], idx);
                    let sinks = CpuTensor::new(vec![h], rng.vec(h));
                    let want = sparse_attention_with(Isa::Scalar, &q, &p, &idx, &sinks, 0.3, usize::MAX, 0).unwrap();
                    for isa in Isa::supported() {
                        for share_work in [usize::MAX, SHARE_WORK, 1] {
                            // Rows decoded per query, once for all, and a budget just short
                            // of the rows (the map fits, the rows do not).
                            let short = (1699 + 425 * d) * 4 - 1;
                            for decode_once in [0, DECODE_ONCE_BYTES, short] {
                                let case = format!(
                                    "{isa:?}, d {d}, {format:?}, T {t}, sharing from {share_work}, \
                                     decoding once within {decode_once} bytes"
                                );
                                let got =
                                    sparse_attention_with(isa, &q, &p, &idx, &sinks, 0.3, share_work, decode_once)
                                        .unwrap();
                                assert_eq!(bits(&got.data), bits(&want.data), "{case}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// `DecodedRows` holds each row read, decoded as the pool decodes it, at the slot its row
    /// number maps to; it is built within its budget to the byte (slot map, row list, rows) and
    /// only when the rows are read at least twice each on average.
    #[test]
    fn rows_decoded_once_are_the_rows_read_within_the_budget() {
        let mut rng = Rng(3);
        let (rows, d) = (40, 12);
        let p = pool(RowFormat::Bf16, rows, d, &rng.vec(rows * d));
        // Rows 7, 9, 30 (twice) and 31, with -1 entries: a span of 25 rows, 4 of them read.
        let ids = [9, -1, 30, 7, 30, 31, -1];
        let exact = 25 * 4 + 4 * (8 + d * 4);
        for isa in Isa::supported() {
            let once = DecodedRows::new(isa, &p, &ids, 8, exact).expect("within the budget");
            for r in [7, 9, 30, 31] {
                let mut want = vec![0f32; d];
                p.decode_rows(Isa::Scalar, &[r], &mut want);
                assert_eq!(bits(once.row(r)), bits(&want), "{isa:?}: row {r}");
            }
            assert!(DecodedRows::new(isa, &p, &ids, 8, exact - 1).is_none(), "one byte short");
            assert!(DecodedRows::new(isa, &p, &ids, 7, exact).is_none(), "fewer than two reads a row");
            assert!(DecodedRows::new(isa, &p, &[-1, -1], 8, exact).is_none(), "no row read");
            let f = pool(RowFormat::F32, rows, d, &rng.vec(rows * d));
            assert!(DecodedRows::new(isa, &f, &ids, 8, exact).is_none(), "an f32 pool is borrowed");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }
}
