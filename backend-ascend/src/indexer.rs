//! `indexer_select` on Huawei's lightning indexer `aclnnLightningIndexerV2` (ops-transformer
//! `attention/lightning_indexer_v2/docs/aclnnLightningIndexerV2.md`): the indexer's scores
//! `Σ_h w_h · relu(q_h · k)` and the top-k per query in one launch, instead of Matmul, Relu,
//! Mul, ReduceSum, Topk and a host round trip.
//!
//! * Used in `bf16` only (the kernel takes BF16/FP16 q and k; `official` scores with the
//!   official BF16 einsum, which the composition computes), with the index head dim 128 (the
//!   kernel's only one), 1..=64 heads, a BF16 key pool, and k within the SoC's topk values
//!   (1..=8192 on the 950; 1..=2048, 3072, 4096, .., 8192 on Atlas A2/A3).
//!   Anything else composes.
//! * q is cast to BF16 on the device (exact in `bf16`, whose activations are BF16 values);
//!   `dI^-1/2` is folded into the FLOAT weights (one aclnnMuls).
//! * The keys are paged (layout PA_BBND). When the sequence's key rows fill whole aligned
//!   blocks of the pool in order (as dsv4's paged state lays them out, and known on the host),
//!   the pool itself is the kernel's key tensor, `[rows / bs, bs, 1, 128]`, and the block
//!   table names the pool blocks; otherwise the rows are gathered (aclnnIndexSelect) into a
//!   contiguous BF16 block, padded with zero rows to whole blocks of 128 rows (of N rounded
//!   up to 16 when N is smaller).
//! * Each query's visible keys `0..v_t` are expressed exactly, in one of three ways:
//!   - every query sees all N keys: one TND batch, maskMode 0;
//!   - the causal pattern of compressed keys (dsv4's CSA: `v_t = ⌊(p_t + 1) / ratio⌋` for
//!     consecutive positions `p_t`): one TND batch with maskMode 3 (right-down causal),
//!     cmpRatio = ratio and cmpResidualK = the remainder, which by the operator's mask rule
//!     gives query t the keys `j < ⌊(N·ratio + r − T + t + 1) / ratio⌋`; the ratio and
//!     remainder are found from the `v_t`;
//!   - anything else: each query its own batch (cuSeqlensQ = 0, 1, .., T) over the same
//!     blocks, sequsedK[t] = v_t, maskMode 0 (bounded by the block table's size, else compose).
//! * On the 950 the AICPU pre-pass `aclnnLightningIndexerV2Metadata` computes the core split
//!   from the same lengths first (the docs require its output there; A2/A3 take none).
//! * The kernel's picks are positions in the sequence (−1 for empty slots); they become pool
//!   rows `key_rows[n] + offset` on the device: −1 → N (aclnnLtScalar,
//!   aclnnInplaceMaskedFillScalar), then aclnnIndexSelect from `[key_rows + offset, −1]`.
//!
//! Checked against the composition on a tiny input when the device opens
//! ([`AscendBackend::self_test_indexer`]); a failing call switches the kernel off.

use std::ffi::{c_char, CStr};
use std::ops::Range;
use std::ptr::null_mut;

use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::{composed, DevicePool, IndexScores, Precision, RowFormat};
use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;
use dsv4_core::Backend;

use crate::acl::{AclScalar, Buffer};
use crate::kernels::SocFamily;
use crate::{AscendBackend, AscendIndex, AscendPool, AscendTensor, Mem};

/// The kernel's only head size.
const HEAD_DIM: usize = 128;
/// Query heads it takes (with one key head).
const MAX_HEADS: usize = 64;
/// Rows per block of a gathered key block.
const GATHER_BLOCK: usize = 128;
/// The largest block table the per-query-batch form uploads (entries); larger calls compose.
const MAX_TABLE: usize = 1 << 20;

/// How each query's visible keys `0..v_t` are expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// Every query sees all N keys: one batch, no mask.
    All,
    /// One batch, maskMode 3 with this cmpRatio and cmpResidualK.
    Causal { ratio: usize, residual: usize },
    /// One batch per query with its own key count, no mask.
    PerQuery,
}

impl Visibility {
    /// The cheapest form that reproduces `ends` (each query's `v_t`) exactly over `n` keys.
    fn of(ends: &[usize], n: usize) -> Visibility {
        if ends.iter().all(|&e| e == n) {
            return Visibility::All;
        }
        let t = ends.len() as i64;
        for ratio in 1..=128usize {
            for residual in 0..ratio {
                let seen = |i: usize| {
                    let end = (n * ratio + residual) as i64 - t + i as i64 + 1;
                    if end < 0 {
                        0
                    } else {
                        (end as usize / ratio).min(n)
                    }
                };
                // From the last query back: a wrong guess usually fails at once.
                if (0..ends.len()).rev().all(|i| seen(i) == ends[i]) {
                    return Visibility::Causal { ratio, residual };
                }
            }
        }
        Visibility::PerQuery
    }
}

/// Whether `rows` fill aligned blocks of `bs` pool rows in order (the last one possibly in
/// part); the pool blocks they name.
fn whole_blocks(rows: &[i32], bs: usize) -> Option<Vec<i32>> {
    rows.chunks(bs)
        .map(|c| {
            let first = c[0];
            let ok = first >= 0
                && (first as usize).is_multiple_of(bs)
                && c.iter().enumerate().all(|(i, &r)| r as i64 == first as i64 + i as i64);
            ok.then_some(first / bs as i32)
        })
        .collect()
}

/// The largest block size (a multiple of 16 up to 1024 that divides the pool, as the kernel's
/// paged layout takes) whose aligned blocks `rows` fill in order, and those blocks.
fn pool_blocks(rows: &[i32], pool_rows: usize) -> Option<(usize, Vec<i32>)> {
    let mut bs = pool_rows.min(1024) / 16 * 16;
    while bs >= 16 {
        if pool_rows.is_multiple_of(bs) {
            if let Some(blocks) = whole_blocks(rows, bs) {
                return Some((bs, blocks));
            }
        }
        bs -= 16;
    }
    None
}

/// The top-k values the kernel takes on this SoC family.
fn topk_supported(family: SocFamily, k: usize) -> bool {
    match family {
        SocFamily::Ascend950 => (1..=8192).contains(&k),
        _ => (1..=2048).contains(&k) || ((3072..=8192).contains(&k) && k.is_multiple_of(1024)),
    }
}

/// Where the kernel's key tensor lives.
enum KeySource<'a> {
    /// The pool's own block.
    Pool(&'a AscendPool),
    /// A gathered copy of the sequence's rows.
    Gathered(Buffer),
}

/// The keys as the kernel reads them: `[blocks, bs, 1, 128]` BF16, and the blocks the
/// sequence's keys are in, in order.
struct Keys<'a> {
    src: KeySource<'a>,
    blocks: usize,
    bs: usize,
    table_row: Vec<i32>,
}

impl Keys<'_> {
    fn mem(&self) -> Mem<'_> {
        match &self.src {
            KeySource::Pool(p) => p.mem(),
            KeySource::Gathered(buf) => Mem { buf, offset: 0, dtype: Dt::ACL_BF16 },
        }
    }
}

impl AscendBackend {
    /// The fused indexer, or None when the kernel does not apply (then the composition runs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn indexer_select_fused(
        &self,
        q: &AscendTensor,
        keys: &AscendPool,
        key_rows: &AscendIndex,
        weights: &AscendTensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
        act: Precision,
    ) -> Result<Option<AscendIndex>> {
        let state = &self.kernels.lightning_indexer;
        if !state.usable() || act != Precision::Bf16 {
            return Ok(None);
        }
        checks::indexer_select(
            self.name(),
            &q.shape,
            keys.rows(),
            keys.width(),
            &key_rows.shape,
            key_rows.bounds(),
            &weights.shape,
            valid,
            k,
        )?;
        let (t, heads, d) = (q.shape[0], q.shape[1], q.shape[2]);
        let n = key_rows.shape[0];
        if d != HEAD_DIM
            || !(1..=MAX_HEADS).contains(&heads)
            || t == 0
            || n == 0
            || i32::try_from(n).is_err()
            || !topk_supported(SocFamily::of(&self.soc), k)
            || keys.dtype() != Dt::ACL_BF16
            || valid.iter().any(|r| r.start != 0)
        {
            return Ok(None);
        }
        if key_rows.host.is_some() {
            // The mapped rows must fit in i32 (as the composition's).
            checks::offset_index(self.name(), &key_rows.shape, offset, key_rows.bounds())?;
        }
        let ends: Vec<usize> = valid.iter().map(|r| r.end).collect();
        let vis = Visibility::of(&ends, n);
        if vis == Visibility::PerQuery && t * n.div_ceil(16) > MAX_TABLE {
            return Ok(None);
        }
        self.fused(state, || self.lightning_indexer(q, keys, key_rows, weights, &ends, vis, k, offset))
    }

    /// The kernel's key tensor for the sequence: the pool itself when the rows are whole
    /// blocks of it (known on the host), else a gathered copy.
    fn indexer_keys<'a>(&self, keys: &'a AscendPool, key_rows: &AscendIndex, n: usize) -> Result<Keys<'a>> {
        // The block's rows, a multiple of 16 for a BF16 pool (`pool::KERNEL_ROWS`).
        let held = keys.stored_rows();
        if let Some((bs, table_row)) = key_rows.host.as_deref().and_then(|h| pool_blocks(h, held)) {
            return Ok(Keys { src: KeySource::Pool(keys), blocks: held / bs, bs, table_row });
        }
        let bs = GATHER_BLOCK.min(n.div_ceil(16) * 16);
        let blocks = n.div_ceil(bs);
        let buf = self.alloc(blocks * bs * HEAD_DIM, Dt::ACL_BF16)?;
        let m = Mem { buf: &buf, offset: 0, dtype: Dt::ACL_BF16 };
        {
            let (pv, iv, ov) =
                (self.cview(keys.mem(), &[keys.rows(), HEAD_DIM])?, self.iv(key_rows)?, self.cview(m, &[n, HEAD_DIM])?);
            aclnn!(self, aclnnIndexSelect / aclnnIndexSelectGetWorkspaceSize(pv.ptr(), 0, iv.ptr(), ov.ptr()))?;
        }
        if blocks * bs > n {
            // Zero the padding rows (never visible, but the kernel may load whole blocks).
            let pad = self.view(m, &[blocks * bs - n, HEAD_DIM], &[HEAD_DIM, 1], n * HEAD_DIM)?;
            self.fill(&pad, &self.f32s(0.0)?)?;
        }
        Ok(Keys { src: KeySource::Gathered(buf), blocks, bs, table_row: (0..blocks as i32).collect() })
    }

    #[allow(clippy::too_many_arguments)]
    fn lightning_indexer(
        &self,
        q: &AscendTensor,
        pool: &AscendPool,
        key_rows: &AscendIndex,
        weights: &AscendTensor,
        ends: &[usize],
        vis: Visibility,
        k: usize,
        offset: i32,
    ) -> Result<AscendIndex> {
        let (t, heads) = (q.shape[0], q.shape[1]);
        let n = key_rows.shape[0];
        // BF16 queries (exact in bf16, whose activations are BF16 values already).
        let qb = self.cast_to(q, Dt::ACL_BF16)?;
        let qm = Mem { buf: &qb, offset: 0, dtype: Dt::ACL_BF16 };
        // The kernel's score has no 1/sqrt(dI): fold it into the weights.
        let w = self.affine(weights, (HEAD_DIM as f32).powf(-0.5), 0.0)?;
        let keys = self.indexer_keys(pool, key_rows, n)?;

        // Batches, per-batch key counts, mask.
        let (batch, used_k, mask, ratio, residual): (usize, Vec<i32>, i64, usize, Option<i32>) = match vis {
            Visibility::All => (1, vec![n as i32], 0, 1, None),
            Visibility::Causal { ratio, residual } => {
                (1, vec![n as i32], 3, ratio, (ratio != 1).then_some(residual as i32))
            }
            Visibility::PerQuery => (t, ends.iter().map(|&e| e as i32).collect(), 0, 1, None),
        };
        let cu_q: Vec<i32> = if batch == 1 { vec![0, t as i32] } else { (0..=t as i32).collect() };
        let table: Vec<i32> = (0..batch).flat_map(|_| keys.table_row.iter().copied()).collect();
        let cols = keys.table_row.len();
        let cu_q = self.upload_index(&cu_q, &[batch + 1])?;
        let used_k = self.upload_index(&used_k, &[batch])?;
        let table = self.upload_index(&table, &[batch, cols])?;
        let residual = residual.map(|r| self.upload_index(&[r], &[1])).transpose()?;
        let tnd = c"TND";
        let paged = c"PA_BBND";
        // The API takes the layouts as `char*`; it does not write through them.
        let text = |s: &CStr| s.as_ptr() as *mut c_char;
        let none = || -> *mut sys::aclTensor { null_mut() };

        // The 950's AICPU pre-pass (the core split from the same lengths).
        let meta = if SocFamily::of(&self.soc) == SocFamily::Ascend950 {
            let meta = self.alloc(1024, Dt::ACL_INT32)?;
            let (cq, uk, mv) = (
                self.iv(&cu_q)?,
                self.iv(&used_k)?,
                self.cview(Mem { buf: &meta, offset: 0, dtype: Dt::ACL_INT32 }, &[1024])?,
            );
            let rv = residual.as_ref().map(|r| self.iv(r)).transpose()?;
            aclnn!(
                self,
                aclnnLightningIndexerV2Metadata
                    / aclnnLightningIndexerV2MetadataGetWorkspaceSize(
                        cq.ptr(),
                        none(),
                        none(),
                        uk.ptr(),
                        rv.as_ref().map_or(none(), |r| r.ptr()),
                        heads as i64,
                        1,               // numHeadsK
                        HEAD_DIM as i64, // headDim
                        k as i64,
                        batch as i64,
                        -1, // maxSeqlenQ: any
                        -1, // maxSeqlenK: any (sequsedK gives them)
                        text(tnd),
                        text(paged),
                        mask,
                        ratio as i64,
                        mv.ptr()
                    )
            )?;
            Some(meta)
        } else {
            None
        };

        // Picks [T, 1, k] (positions in the sequence, -1 = none); values are not returned but
        // the tensor is required.
        let picks = self.new_index(&[t, k])?;
        let values = self.alloc(t * k, Dt::ACL_FLOAT)?;
        {
            let qv = self.cview(qm, &q.shape)?;
            let kv = self.cview(keys.mem(), &[keys.blocks, keys.bs, 1, HEAD_DIM])?;
            let wv = self.tv(&w)?;
            let (cq, uk, tv) = (self.iv(&cu_q)?, self.iv(&used_k)?, self.iv(&table)?);
            let rv = residual.as_ref().map(|r| self.iv(r)).transpose()?;
            let mv = meta
                .as_ref()
                .map(|m| self.cview(Mem { buf: m, offset: 0, dtype: Dt::ACL_INT32 }, &[1024]))
                .transpose()?;
            let pv = self.cview(self.imem(&picks), &[t, 1, k])?;
            let vv = self.cview(Mem { buf: &values, offset: 0, dtype: Dt::ACL_FLOAT }, &[t, 1, k])?;
            aclnn!(
                self,
                aclnnLightningIndexerV2
                    / aclnnLightningIndexerV2GetWorkspaceSize(
                        qv.ptr(),
                        kv.ptr(),
                        wv.ptr(),
                        cq.ptr(),
                        none(), // cuSeqlensK: not with PA_BBND
                        none(), // sequsedQ
                        uk.ptr(),
                        rv.as_ref().map_or(none(), |r| r.ptr()),
                        tv.ptr(),
                        none(), // outputIdxOffset: the offset is applied below
                        mv.as_ref().map_or(none(), |m| m.ptr()),
                        k as i64,
                        -1, // maxSeqlenQ (A2/A3 take only -1)
                        text(tnd),
                        text(paged),
                        mask,
                        ratio as i64,
                        0, // returnValue: indices only
                        pv.ptr(),
                        vv.ptr()
                    )
            )?;
        }

        // Positions → pool rows: -1 → n, then rows from [key_rows + offset, -1].
        let ext = match key_rows.host.as_deref() {
            Some(h) => {
                let v: Vec<i32> = h.iter().map(|&r| r + offset).chain([-1]).collect();
                self.upload_index(&v, &[n + 1])?
            }
            None => {
                let shifted = self.offset_index(key_rows, offset)?;
                self.concat_index(&[&shifted, &self.upload_index(&[-1], &[1])?], 0)?
            }
        };
        let none_flag = self.index_flag(&picks, None)?;
        {
            let (pv, fv) = (
                self.cview(self.imem(&picks), &[t * k])?,
                self.cview(Mem { buf: &none_flag, offset: 0, dtype: Dt::ACL_BOOL }, &[t * k])?,
            );
            let past = AclScalar::i32(self.api(), n as i32)?;
            aclnn!(
                self,
                aclnnInplaceMaskedFillScalar
                    / aclnnInplaceMaskedFillScalarGetWorkspaceSize(pv.ptr(), fv.ptr(), past.ptr())
            )?;
        }
        let out = self.new_index(&[t, k])?;
        {
            let (ev, pv, ov) =
                (self.iv(&ext)?, self.cview(self.imem(&picks), &[t * k])?, self.cview(self.imem(&out), &[t * k])?);
            aclnn!(self, aclnnIndexSelect / aclnnIndexSelectGetWorkspaceSize(ev.ptr(), 0, pv.ptr(), ov.ptr()))?;
        }
        Ok(out)
    }

    /// Runs `aclnnLightningIndexerV2` on tiny inputs (dI = 128) against the composition,
    /// covering the three visibility forms and both key tensors (the pool's own blocks and a
    /// gathered copy), and switches the kernel off with the reason when the picks differ as
    /// sets per query, or when anything in the test fails (the device still opens, composing).
    /// Each query's last visible and first invisible keys score highest of all
    /// ([`self_test_queries`]), so a visibility off by one key changes its picks.
    pub(crate) fn self_test_indexer(&self) -> Result<()> {
        self.self_test(&self.kernels.lightning_indexer, || self.compare_indexer_with_composition())
    }

    fn compare_indexer_with_composition(&self) -> Result<()> {
        let state = &self.kernels.lightning_indexer;
        let (rows, n, t, heads, k, offset) = SELF_TEST;
        let kv = self_test_keys(n);
        let blockwise: Vec<i32> = (16..32).chain(48..64).chain(0..8).collect();
        let scattered: Vec<i32> = (0..n as i32).map(|j| (j * 37 + 5) % rows as i32).collect();
        let [causal, uneven, all] = self_test_visibility(n, t);
        for (order, valid) in [(&blockwise, &causal), (&scattered, &uneven), (&scattered, &all), (&blockwise, &uneven)]
        {
            let ends: Vec<usize> = valid.iter().map(|r| r.end).collect();
            let (qv, wv) = self_test_queries(&ends, n, heads);
            let (q, w) = (self.upload(&qv, &[t, heads, HEAD_DIM])?, self.upload(&wv, &[t, heads])?);
            let mut pool = self.alloc_pool(rows, HEAD_DIM, RowFormat::Bf16)?;
            self.pool_write(&mut pool, &self.upload_index(order, &[n])?, &self.upload(&kv, &[n, HEAD_DIM])?)?;
            let key_rows = self.upload_index(order, &[n])?;
            let got = match self.indexer_select_fused(&q, &pool, &key_rows, &w, valid, k, offset, Precision::Bf16)? {
                Some(g) => self.download_index(&g)?,
                // The kernel failed and `fused` switched it off with the reason (these inputs
                // are always in its range).
                None => return Ok(()),
            };
            let want = self.download_index(&composed::indexer_select(
                self,
                &q,
                &pool,
                &key_rows,
                &w,
                valid,
                k,
                offset,
                IndexScores::F32,
            )?)?;
            for (i, (g, w)) in got.chunks(k).zip(want.chunks(k)).enumerate() {
                let (mut gs, mut ws) = (g.to_vec(), w.to_vec());
                gs.sort_unstable();
                ws.sort_unstable();
                if gs != ws {
                    state.disable(format!(
                        "self-test disagreed with the composition ({:?}, query {i}, visible keys {:?}): \
                         picks (pool rows) {g:?} vs {w:?}",
                        Visibility::of(&ends, n),
                        valid[i]
                    ));
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The self-test's pool rows, keys N, queries T, heads, k and row offset.
const SELF_TEST: (usize, usize, usize, usize, usize, i32) = (64, 40, 8, 2, 6, 7);

/// The self-test's keys `[n, 128]` (n ≤ 64): key j is 1 in channel j and 0.5 in channel
/// 64 + j, so query channel j (head 0) and 64 + j (head 1) score key j alone.
fn self_test_keys(n: usize) -> Vec<f32> {
    let mut kv = vec![0f32; n * HEAD_DIM];
    for j in 0..n {
        kv[j * HEAD_DIM + j] = 1.0;
        kv[j * HEAD_DIM + 64 + j] = 0.5;
    }
    kv
}

/// The self-test's visible counts over `n` keys for `t` queries, one per form: the causal
/// pattern of compressed keys (ratio 4, remainder 2: counts n − 2, n − 1 and n for t = 8),
/// arbitrary counts (0, fewer than k, k, n − 1, n, not monotone), and all keys.
fn self_test_visibility(n: usize, t: usize) -> [Vec<Range<usize>>; 3] {
    let causal = (0..t).map(|i| 0..(n * 4 + 2 - t + i + 1) / 4).collect();
    let uneven = [3, 0, n, 17, 6, 1, n - 1, 24].iter().cycle().take(t).map(|&e| 0..e).collect();
    [causal, uneven, vec![0..n; t]]
}

/// The self-test's queries `[t, heads, 128]` and (positive) weights `[t, heads]` over
/// [`self_test_keys`] for the visible counts `ends`: query i scores key j `m_i · s_ij` with
/// distinct integers `s_ij`, the largest two (2n + 2 and 2n + 1) at its last visible key
/// `ends[i] − 1` and its first invisible one `ends[i]`, so one key more or less changes its
/// picks. `s = 2·d0 + relu(d1)` over the heads (weights 2·m_i and m_i), with d1 = −3 (cut by
/// the relu) where s is even. All values are exact in BF16; n must be coprime to 23 and ≤ 64,
/// heads ≥ 2 (heads past the second are zero).
fn self_test_queries(ends: &[usize], n: usize, heads: usize) -> (Vec<f32>, Vec<f32>) {
    let t = ends.len();
    let mut qv = vec![0f32; t * heads * HEAD_DIM];
    let mut wv = vec![0f32; t * heads];
    for (i, &v) in ends.iter().enumerate() {
        for j in 0..n {
            let s = if j + 1 == v {
                2 * n + 2
            } else if j == v {
                2 * n + 1
            } else {
                (j * 23 + i * 7) % n + 1
            };
            let (d0, d1) = (s / 2, if s % 2 == 1 { 1.0 } else { -3.0 });
            qv[i * heads * HEAD_DIM + j] = d0 as f32;
            qv[(i * heads + 1) * HEAD_DIM + 64 + j] = 2.0 * d1;
        }
        let m = 1.0 + (i % 3) as f32 / 2.0;
        wv[i * heads] = 2.0 * m;
        wv[i * heads + 1] = m;
    }
    (qv, wv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_finds_the_cheapest_exact_form() {
        assert_eq!(Visibility::of(&[5, 5, 5], 5), Visibility::All);
        // CSA with ratio 4: queries at positions 61..84 over the 84 / 4 = 21 keys so far.
        let ends: Vec<usize> = (61..84).map(|p| (p + 1) / 4).collect();
        assert_eq!(Visibility::of(&ends, 21), Visibility::Causal { ratio: 4, residual: 0 });
        let ends: Vec<usize> = (40..51).map(|p| (p + 1) / 7).collect();
        assert_eq!(Visibility::of(&ends, 7), Visibility::Causal { ratio: 7, residual: 2 });
        // Plain right-down causal, and queries that see nothing yet.
        assert_eq!(Visibility::of(&[3, 4, 5], 5), Visibility::Causal { ratio: 1, residual: 0 });
        assert_eq!(Visibility::of(&[0, 0, 1, 1, 2], 2), Visibility::Causal { ratio: 2, residual: 0 });
        // Not causal: the last query must see every key, and counts must not fall.
        assert_eq!(Visibility::of(&[3, 0, 5], 5), Visibility::PerQuery);
        assert_eq!(Visibility::of(&[5, 4], 5), Visibility::PerQuery);
        // Every Causal answer reproduces the counts through the operator's mask rule.
        for (ends, n) in [(vec![1usize, 1, 2, 2, 2, 3], 3usize), (vec![0, 1, 1, 1], 1), (vec![2, 3], 3)] {
            if let Visibility::Causal { ratio, residual } = Visibility::of(&ends, n) {
                let t = ends.len() as i64;
                for (i, &e) in ends.iter().enumerate() {
                    let end = (n * ratio + residual) as i64 - t + i as i64 + 1;
                    assert_eq!(if end < 0 { 0 } else { (end as usize / ratio).min(n) }, e, "{ends:?}");
                }
            }
        }
    }

    #[test]
    fn key_rows_in_whole_pool_blocks_are_found() {
        let rows: Vec<i32> = (32..64).chain(0..20).collect();
        assert_eq!(pool_blocks(&rows, 128), Some((32, vec![1, 0])));
        // Aligned to 16 but not to 32: blocks of 16.
        let rows: Vec<i32> = (16..32).chain(96..112).chain(0..5).collect();
        assert_eq!(pool_blocks(&rows, 128), Some((16, vec![1, 6, 0])));
        // A whole pool in order is one block of up to 1024 rows.
        let rows: Vec<i32> = (0..2048).collect();
        assert_eq!(pool_blocks(&rows, 2048), Some((1024, vec![0, 1])));
        // Scattered rows, a block out of order inside, or a pool that no block size divides.
        assert_eq!(pool_blocks(&[3, 7, 1], 64), None);
        let rows: Vec<i32> = (0..16).rev().collect();
        assert_eq!(pool_blocks(&rows, 64), None);
        assert_eq!(pool_blocks(&(0..8).collect::<Vec<_>>(), 40), None);
    }

    #[test]
    fn topk_limits_follow_the_soc() {
        assert!(topk_supported(SocFamily::AtlasA2, 2048) && topk_supported(SocFamily::AtlasA3, 3072));
        assert!(!topk_supported(SocFamily::AtlasA2, 3000) && topk_supported(SocFamily::Ascend950, 3000));
        assert!(!topk_supported(SocFamily::Ascend950, 8193) && !topk_supported(SocFamily::AtlasA2, 0));
    }

    /// The self-test's inputs, on the host: the three forms are the ones named, the values are
    /// exact in BF16, the weights positive, every query's scores distinct, and its last visible
    /// and first invisible keys score highest of all keys, so that a visibility one key
    /// longer or shorter changes its top-k set.
    #[test]
    fn self_test_boundary_keys_score_highest() {
        let (_, n, t, heads, k, _) = SELF_TEST;
        let kv = self_test_keys(n);
        let bf16 = |v: &f32| f32::from_bits(v.to_bits() & 0xffff_0000) == *v;
        assert!(kv.iter().all(bf16));
        let forms = self_test_visibility(n, t);
        let want = [Visibility::Causal { ratio: 4, residual: 2 }, Visibility::PerQuery, Visibility::All];
        for (valid, form) in forms.iter().zip(want) {
            let ends: Vec<usize> = valid.iter().map(|r| r.end).collect();
            assert_eq!(Visibility::of(&ends, n), form, "{ends:?}");
            let (qv, wv) = self_test_queries(&ends, n, heads);
            assert!(qv.iter().all(bf16) && wv.iter().all(bf16) && wv.iter().all(|&w| w > 0.0));
            for (i, &v) in ends.iter().enumerate() {
                let score = |j: usize| -> f64 {
                    (0..heads)
                        .map(|h| {
                            let q = &qv[(i * heads + h) * HEAD_DIM..][..HEAD_DIM];
                            let dot: f64 =
                                q.iter().zip(&kv[j * HEAD_DIM..][..HEAD_DIM]).map(|(a, b)| (a * b) as f64).sum();
                            wv[i * heads + h] as f64 * dot.max(0.0)
                        })
                        .sum()
                };
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
                assert!(order.windows(2).all(|w| score(w[0]) > score(w[1])), "{form:?} query {i}: a tie");
                let top: Vec<usize> = (v.saturating_sub(1)..(v + 1).min(n)).collect();
                assert_eq!(order[..top.len()], top[..], "{form:?} query {i} (visible 0..{v}): {order:?}");
                // One key more, or one fewer: the top k of the visible keys differ.
                let picks = |v: usize| {
                    let mut p: Vec<usize> = order.iter().copied().filter(|&j| j < v).take(k).collect();
                    p.sort_unstable();
                    p
                };
                if v < n {
                    assert_ne!(picks(v), picks(v + 1), "{form:?} query {i}");
                }
                if v > 0 {
                    assert_ne!(picks(v), picks(v - 1), "{form:?} query {i}");
                }
            }
        }
    }

    /// With the emulator (`DSV4_ASCEND_EMULATOR` set, e.g. `DSV4_ASCEND_EMULATOR=$PWD/target/
    /// debug/libdsv4_ascend_emu.so` after `cargo build -p dsv4-ascend-emu`) and the kernel
    /// opted in: the self-test agrees with the composition at open and again here, launching
    /// the kernel once per case, and keeps it on. Without the emulator this test says that it
    /// skipped (shown with `--nocapture`); `tests/tests/ascend_lightning_indexer.rs` opens the
    /// device, which runs the self-test, on the emulator as A2, A3 and 950.
    #[test]
    fn self_test_passes_on_the_emulator() {
        if std::env::var_os(sys::EMULATOR_VAR).is_none() {
            eprintln!(
                "SKIPPED self_test_passes_on_the_emulator: {} is not set (build the emulator with \
                 `cargo build -p dsv4-ascend-emu` and point it at target/debug/libdsv4_ascend_emu.so)",
                sys::EMULATOR_VAR
            );
            return;
        }
        let be = crate::open_with(0, crate::FusedPolicy::All).unwrap();
        assert!(be.kernels.lightning_indexer.usable(), "at open: {:?}", be.fused_kernels());
        let before = crate::emulator_launches("aclnnLightningIndexerV2").unwrap();
        be.self_test_indexer().unwrap();
        assert!(be.kernels.lightning_indexer.usable(), "{:?}", be.fused_kernels());
        assert_eq!(crate::emulator_launches("aclnnLightningIndexerV2").unwrap() - before, 4);
    }
}
