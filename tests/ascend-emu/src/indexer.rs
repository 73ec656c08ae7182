//! Huawei's lightning indexer `aclnnLightningIndexerV2` and its AICPU pre-pass
//! `aclnnLightningIndexerV2Metadata` (ops-transformer `attention/lightning_indexer_v2/docs/
//! aclnnLightningIndexerV2.md`, `attention/lightning_indexer_v2_metadata/docs/
//! aclnnLightningIndexerV2Metadata.md`), with the documented constraints per SoC.
//!
//! Per query token (one row of q), over the keys its batch may see:
//! `score(j) = Σ_h w[h] · relu(q[h] · k[j])`, then the `topk` best keys. Emulated in full:
//! layouts BSND/BSND, TND/TND and q in BSND or TND over paged keys (PA_BBND through a block
//! table), mask modes 0 (every key of the batch) and 3 (right-down causal over compressed keys:
//! with `S1` the batch's queries, `S2` its keys, `c` = cmpRatio and `r` = its cmpResidualK, query
//! `i` sees the keys `j < ⌊(S2·c + r − S1 + i + 1) / c⌋`, none when that is negative),
//! `sequsedK`/`sequsedQ` (per SoC), returnValue 0/1. `outputIdxOffsetOptional` is refused as not
//! emulated (the doc gives it shape (B,), the operator's own host checks and test golden one
//! offset per query).
//!
//! Numerics: the scores in f64 from the stored BF16/FP16 q and k and FLOAT w. The picks are
//! written in descending score order, ties to the lower key (the doc leaves the order open;
//! dsv4 treats the picks as a set); slots past the visible keys are −1 (sparseValues −inf).
//! With returnValue 0 sparseValues is left untouched.
//!
//! The metadata's real layout (per-core ranges, 36 AI Cores × 8 + 72 vector cores × 8 INT32)
//! depends on the core count; the emulator enables one core and signs the unused tail
//! ([`META_SIGNATURE`]) with the parameters and sequence lengths it was computed for, so that
//! the main operator refuses metadata from another call (a stale or missing pre-pass).

use std::ffi::{c_char, c_void, CStr};

use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclTensor, aclnnStatus, aclrtStream};

use crate::fused::{optional, v4_attention_family};
use crate::mem::{dtype_name, Desc, Memory};
use crate::ops::{contiguous_out, plan, shape_is, ws_for, R};
use crate::{get_workspace, launch, soc_name, Emu, Plan};

launcher!(aclnnLightningIndexerV2Metadata, aclnnLightningIndexerV2);

/// Metadata length (INT32 elements), fixed by the docs.
const META_LEN: usize = 1024;
/// Where the emulator's signature starts (after the real layout's 36·8 + 72·8 = 864 INT32).
const META_SIGNATURE: usize = 1008;
/// "LIV2": marks metadata written by this emulator's aclnnLightningIndexerV2Metadata.
const META_MAGIC: i64 = 0x4c49_5632;
/// The only head size the kernel takes.
const HEAD_DIM: usize = 128;
/// Query heads per key head (N1 with N2 = 1).
const MAX_HEADS: usize = 64;
const MAX_TOPK: i64 = 8192;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Bsnd,
    Tnd,
    Paged,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Bsnd => "BSND",
            Layout::Tnd => "TND",
            Layout::Paged => "PA_BBND",
        }
    }
}

/// A layout argument (required: the docs give no default).
unsafe fn layout(p: *const c_char, name: &str, key: bool) -> R<Layout> {
    if p.is_null() {
        return Err(format!("{name} is NULL; it must name the layout"));
    }
    // SAFETY: the caller passes a NUL-terminated C string (the API takes `char*`).
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    match (s.as_str(), key) {
        ("BSND", _) => Ok(Layout::Bsnd),
        ("TND", _) => Ok(Layout::Tnd),
        ("PA_BBND", true) => Ok(Layout::Paged),
        _ => {
            Err(format!("{name} {s:?} is not supported ({})", if key { "BSND, TND or PA_BBND" } else { "BSND or TND" }))
        }
    }
}

/// An optional tensor: NULL or an empty tensor means "not given".
fn opt(e: &Emu, p: *const aclTensor, name: &str) -> R<Option<Desc>> {
    Ok(optional(e, p, name)?.filter(|d| d.numel() != 0))
}

fn absent(d: &Option<Desc>, name: &str, why: &str) -> R<()> {
    if d.is_some() {
        return Err(format!("{name} must be NULL here ({why})"));
    }
    Ok(())
}

/// A 1-D INT32 tensor of `len` elements.
fn int32_1d(d: &Desc, len: usize, name: &str, what: &str) -> R<()> {
    if d.dtype != aclDataType::ACL_INT32 {
        return Err(format!("{name} must be INT32, got {}", dtype_name(d.dtype)));
    }
    if d.dims != [len] {
        return Err(format!("{name} has shape {:?}; it must be 1-D ({what}) = [{len}]", d.dims));
    }
    Ok(())
}

/// Batch boundaries from a `cuSeqlens` tensor: B + 1 prefix sums, 0 first, non-decreasing,
/// ending at `total` when given (checked when the stream runs).
fn boundaries(v: &[f64], total: Option<usize>, name: &str) -> R<Vec<usize>> {
    if v.first() != Some(&0.0) {
        return Err(format!("{name} must start at 0, got {v:?}"));
    }
    if v.windows(2).any(|w| w[1] < w[0]) {
        return Err(format!("{name} must be non-decreasing, got {v:?}"));
    }
    let b: Vec<usize> = v.iter().map(|&x| x as usize).collect();
    if let Some(t) = total {
        if b.last() != Some(&t) {
            return Err(format!("{name} ends at {:?}, but the tensor has {t} tokens", b.last()));
        }
    }
    Ok(b)
}

fn lengths(v: &[f64], name: &str) -> R<Vec<usize>> {
    if let Some(x) = v.iter().find(|x| **x < 0.0) {
        return Err(format!("{name} has the negative length {x}"));
    }
    Ok(v.iter().map(|&x| x as usize).collect())
}

fn read_opt(d: &Option<Desc>, mem: &Memory, name: &str) -> R<Option<Vec<f64>>> {
    d.as_ref().map(|d| d.read(mem, name)).transpose()
}

fn check_residuals(r: &[usize], cmp_ratio: i64) -> R<()> {
    if let Some(x) = r.iter().find(|&&x| x as i64 >= cmp_ratio) {
        return Err(format!("cmpResidualKOptional has {x}; every element must be below cmpRatio {cmp_ratio}"));
    }
    Ok(())
}

/// The topk values the SoC takes: 1..=8192 on the 950; on Atlas A2/A3 1..=2048 and the
/// multiples of 1024 up to 8192.
fn check_topk(fam: &str, topk: i64) -> R<()> {
    if !(1..=MAX_TOPK).contains(&topk) {
        return Err(format!("topk {topk} is outside 1..={MAX_TOPK}"));
    }
    if fam != "950" && topk > 2048 && topk % 1024 != 0 {
        return Err(format!(
            "topk {topk} is not supported on {} (1..=2048, 3072, 4096, 5120, 6144, 7168 or 8192)",
            soc_name()
        ));
    }
    Ok(())
}

fn check_modes(mask_mode: i64, cmp_ratio: i64) -> R<()> {
    if !matches!(mask_mode, 0 | 3) {
        return Err(format!("maskMode {mask_mode} is not 0 (no mask) or 3 (right-down causal)"));
    }
    if !(1..=128).contains(&cmp_ratio) {
        return Err(format!("cmpRatio {cmp_ratio} is outside 1..=128"));
    }
    Ok(())
}

/// cmpResidualK is given exactly when cmpRatio != 1 and maskMode is 3.
fn check_residual_presence(d: &Option<Desc>, mask_mode: i64, cmp_ratio: i64, batch: usize) -> R<()> {
    let needed = cmp_ratio != 1 && mask_mode == 3;
    match d {
        None if needed => {
            Err(format!("cmpResidualKOptional is required when cmpRatio ({cmp_ratio}) is not 1 and maskMode is 3"))
        }
        Some(_) if !needed => Err(format!(
            "cmpResidualKOptional must be NULL unless cmpRatio is not 1 and maskMode is 3 \
             (cmpRatio {cmp_ratio}, maskMode {mask_mode})"
        )),
        Some(d) => int32_1d(d, batch, "cmpResidualKOptional", "B"),
        None => Ok(()),
    }
}

/// FNV-1a of a list of lengths, folded to 31 bits (stored in an INT32).
fn fingerprint(v: &[usize]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v.iter().copied().chain([v.len()]) {
        for b in (x as u64).to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    ((h ^ (h >> 32)) & 0x7fff_ffff) as i64
}

/// What the metadata was computed for: the attributes and every batch's effective lengths.
#[derive(Debug, PartialEq)]
struct Signature {
    heads: i64,
    topk: i64,
    mask_mode: i64,
    cmp_ratio: i64,
    layouts: i64,
    batch: usize,
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    residuals: Vec<usize>,
}

impl Signature {
    fn values(&self) -> [i64; 10] {
        [
            META_MAGIC,
            self.heads,
            self.topk,
            self.mask_mode,
            self.cmp_ratio,
            self.layouts,
            self.batch as i64,
            fingerprint(&self.q_lens),
            fingerprint(&self.k_lens),
            fingerprint(&self.residuals),
        ]
    }

    fn layout_code(q: Layout, k: Layout) -> i64 {
        let code = |l: Layout| match l {
            Layout::Bsnd => 0,
            Layout::Tnd => 1,
            Layout::Paged => 2,
        };
        code(q) * 4 + code(k)
    }

    /// Refuses metadata that this emulator did not compute for these arguments.
    fn check(&self, meta: &[f64]) -> R<()> {
        let got: Vec<i64> = meta[META_SIGNATURE..META_SIGNATURE + 10].iter().map(|&v| v as i64).collect();
        if got[0] != META_MAGIC {
            return Err(
                "metadataOptional was not written by aclnnLightningIndexerV2Metadata (run the pre-pass first)".into()
            );
        }
        let want = self.values();
        let names = ["", "numHeadsQ", "topk", "maskMode", "cmpRatio", "the layouts", "the batch size"];
        for (i, n) in names.iter().enumerate().skip(1) {
            if got[i] != want[i] {
                return Err(format!(
                    "metadataOptional was computed for different arguments ({n}: {} there, {} here)",
                    got[i], want[i]
                ));
            }
        }
        if got[7..] != want[7..] {
            return Err(format!(
                "metadataOptional was computed for different sequence lengths or residuals \
                 (here: q {:?}, k {:?}, residuals {:?})",
                self.q_lens, self.k_lens, self.residuals
            ));
        }
        Ok(())
    }
}

phase_one!(aclnnLightningIndexerV2MetadataGetWorkspaceSize = "aclnnLightningIndexerV2Metadata", e, (
    cuSeqlensQOptional: *const aclTensor, cuSeqlensKOptional: *const aclTensor,
    sequsedQOptional: *const aclTensor, sequsedKOptional: *const aclTensor,
    cmpResidualKOptional: *const aclTensor, numHeadsQ: i64, numHeadsK: i64, headDim: i64, topk: i64,
    batchSize: i64, maxSeqlenQ: i64, maxSeqlenK: i64, layoutQOptional: *mut c_char,
    layoutKOptional: *mut c_char, maskMode: i64, cmpRatio: i64, metadata: *const aclTensor) {
    v4_attention_family()?;
    if !(1..=MAX_HEADS as i64).contains(&numHeadsQ) {
        return Err(format!("numHeadsQ {numHeadsQ} is outside 1..={MAX_HEADS}"));
    }
    if numHeadsK != 1 {
        return Err(format!("numHeadsK {numHeadsK}: only 1 is supported"));
    }
    if headDim != HEAD_DIM as i64 {
        return Err(format!("headDim {headDim}: only {HEAD_DIM} is supported"));
    }
    if !(1..=MAX_TOPK).contains(&topk) {
        return Err(format!("topk {topk} is outside 1..={MAX_TOPK}"));
    }
    if batchSize < 0 {
        return Err(format!("batchSize {batchSize} is negative"));
    }
    if maxSeqlenQ < -1 || maxSeqlenK < -1 {
        return Err(format!("maxSeqlenQ {maxSeqlenQ} / maxSeqlenK {maxSeqlenK} must be -1 (any) or non-negative"));
    }
    check_modes(maskMode, cmpRatio)?;
    // SAFETY: the layouts are NUL-terminated C strings or NULL.
    let (lq, lk) = unsafe {
        (layout(layoutQOptional, "layoutQOptional", false)?, layout(layoutKOptional, "layoutKOptional", true)?)
    };
    if lk != Layout::Paged && lq != lk {
        return Err(format!(
            "layoutQOptional {} and layoutKOptional {} must be the same outside PA_BBND",
            lq.name(),
            lk.name()
        ));
    }
    let cq = opt(e, cuSeqlensQOptional, "cuSeqlensQOptional")?;
    let ck = opt(e, cuSeqlensKOptional, "cuSeqlensKOptional")?;
    let (sq, sk) = (opt(e, sequsedQOptional, "sequsedQOptional")?, opt(e, sequsedKOptional, "sequsedKOptional")?);
    let res = opt(e, cmpResidualKOptional, "cmpResidualKOptional")?;
    if lq == Layout::Tnd && cq.is_none() {
        return Err("cuSeqlensQOptional is required when layoutQOptional is TND".into());
    }
    if lk == Layout::Tnd && ck.is_none() {
        return Err("cuSeqlensKOptional is required when layoutKOptional is TND".into());
    }
    if lk == Layout::Paged && sk.is_none() {
        return Err("sequsedKOptional is required when layoutKOptional is PA_BBND".into());
    }
    if lq == Layout::Bsnd && sq.is_none() && maxSeqlenQ <= 0 {
        return Err(format!(
            "maxSeqlenQ {maxSeqlenQ}: with layoutQOptional BSND and no sequsedQOptional it must be S1 (> 0)"
        ));
    }
    if lk == Layout::Bsnd && sk.is_none() && maxSeqlenK <= 0 {
        return Err(format!(
            "maxSeqlenK {maxSeqlenK}: with layoutKOptional BSND and no sequsedKOptional it must be S2 (> 0)"
        ));
    }
    let seqs = [
        (&cq, "cuSeqlensQOptional"),
        (&ck, "cuSeqlensKOptional"),
        (&sq, "sequsedQOptional"),
        (&sk, "sequsedKOptional"),
    ];
    for (d, n) in seqs {
        if let Some(d) = d {
            if d.dtype != aclDataType::ACL_INT32 || d.dims.len() != 1 {
                return Err(format!("{n} must be a 1-D INT32 tensor, got {}", d.describe()));
            }
        }
    }
    // The batch: sequsedQ's length, else (TND) cuSeqlensQ's minus one, else batchSize; the
    // key side by the same rule must agree.
    let batch_of = |s: &Option<Desc>, c: &Option<Desc>, tnd: bool| match (s, c) {
        (Some(s), _) => s.dims[0],
        (None, Some(c)) if tnd => c.dims[0] - 1,
        _ => batchSize as usize,
    };
    let b = batch_of(&sq, &cq, lq == Layout::Tnd);
    let bk = batch_of(&sk, &ck, lk == Layout::Tnd);
    if b != bk {
        return Err(format!("the query side names {b} batches but the key side {bk}"));
    }
    if b == 0 {
        return Err("the batch is empty (pass sequsedQOptional, cuSeqlensQOptional or batchSize > 0)".into());
    }
    for (d, n) in [(&cq, "cuSeqlensQOptional"), (&ck, "cuSeqlensKOptional")] {
        if let Some(d) = d {
            int32_1d(d, b + 1, n, "B + 1")?;
        }
    }
    check_residual_presence(&res, maskMode, cmpRatio, b)?;
    let md = e.tensor(metadata, "metadata")?;
    int32_1d(&md, META_LEN, "metadata", "fixed size")?;
    contiguous_out(&md, "metadata")?;
    let layouts = Signature::layout_code(lq, lk);
    let reads: Vec<Desc> = [&cq, &ck, &sq, &sk, &res].into_iter().flatten().cloned().collect();
    let out = md.clone();
    Ok(plan(ws_for(&md), reads, vec![md], vec![], move |mem| {
        let lens = |s: &Option<Desc>, c: &Option<Desc>, tnd: bool, max: i64, n: &str| -> R<Vec<usize>> {
            if let Some(v) = read_opt(s, mem, n)? {
                return lengths(&v, n);
            }
            if tnd {
                let c = boundaries(&read_opt(c, mem, "cuSeqlens")?.expect("checked"), None, n)?;
                return Ok(c.windows(2).map(|w| w[1] - w[0]).collect());
            }
            Ok(vec![max.max(0) as usize; b])
        };
        let q_lens = lens(&sq, &cq, lq == Layout::Tnd, maxSeqlenQ, "sequsedQOptional / cuSeqlensQOptional")?;
        let k_lens = lens(&sk, &ck, lk == Layout::Tnd, maxSeqlenK, "sequsedKOptional / cuSeqlensKOptional")?;
        let residuals = match read_opt(&res, mem, "cmpResidualKOptional")? {
            Some(v) => lengths(&v, "cmpResidualKOptional")?,
            None => vec![],
        };
        check_residuals(&residuals, cmpRatio)?;
        let sig = Signature {
            heads: numHeadsQ,
            topk,
            mask_mode: maskMode,
            cmp_ratio: cmpRatio,
            layouts,
            batch: b,
            q_lens,
            k_lens,
            residuals,
        };
        // One AI Core takes every (batch, head) row and the whole key range.
        let mut v = vec![0f64; META_LEN];
        v[0] = 1.0;
        v[4] = b as f64;
        for (i, x) in sig.values().into_iter().enumerate() {
            v[META_SIGNATURE + i] = x as f64;
        }
        out.write(mem, &v, "metadata")
    }))
});

/// Everything the kernel needs besides the memory, fixed at planning.
struct Job {
    lq: Layout,
    lk: Layout,
    batch: usize,
    /// Query rows per batch (BSND); keys per batch (BSND) or the block size (PA_BBND).
    s1: usize,
    s2: usize,
    heads: usize,
    topk: usize,
    max_seqlen_q: i64,
    mask_mode: i64,
    cmp_ratio: i64,
    return_value: bool,
    q: Desc,
    k: Desc,
    w: Desc,
    cu_q: Option<Desc>,
    cu_k: Option<Desc>,
    used_q: Option<Desc>,
    used_k: Option<Desc>,
    residual: Option<Desc>,
    table: Option<Desc>,
    meta: Option<Desc>,
    indices: Desc,
    values: Desc,
}

impl Job {
    fn run(&self, mem: &mut Memory) -> R<()> {
        let b = self.batch;
        // Each batch's query rows (first row, count).
        let q_rows: Vec<(usize, usize)> = match self.lq {
            Layout::Tnd => {
                let cu = self.cu_q.as_ref().expect("checked").read(mem, "cuSeqlensQOptional")?;
                let c = boundaries(&cu, Some(self.q.dims[0]), "cuSeqlensQOptional")?;
                c.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
            }
            _ => (0..b).map(|i| (i * self.s1, self.s1)).collect(),
        };
        // Each batch's first key row (BSND, TND) and how many keys it has at most.
        let (k_start, k_cap): (Vec<usize>, Vec<usize>) = match self.lk {
            Layout::Bsnd => ((0..b).map(|i| i * self.s2).collect(), vec![self.s2; b]),
            Layout::Tnd => {
                let cu = self.cu_k.as_ref().expect("checked").read(mem, "cuSeqlensKOptional")?;
                let c = boundaries(&cu, Some(self.k.dims[0]), "cuSeqlensKOptional")?;
                (c[..b].to_vec(), c.windows(2).map(|w| w[1] - w[0]).collect())
            }
            Layout::Paged => (vec![0; b], vec![self.table.as_ref().expect("checked").dims[1] * self.s2; b]),
        };
        self.finish(mem, q_rows, k_start, k_cap)
    }

    /// `k_start[b]`: the batch's first key row (BSND, TND); `k_cap[b]`: its keys before
    /// sequsedK (for PA_BBND what its block table row holds).
    fn finish(&self, mem: &mut Memory, q_rows: Vec<(usize, usize)>, k_start: Vec<usize>, k_cap: Vec<usize>) -> R<()> {
        let b = self.batch;
        // Used lengths.
        let q_used: Vec<usize> = match read_opt(&self.used_q, mem, "sequsedQOptional")? {
            Some(v) => {
                let u = lengths(&v, "sequsedQOptional")?;
                for (i, (&u, &(_, rows))) in u.iter().zip(&q_rows).enumerate() {
                    if u > rows {
                        return Err(format!("sequsedQOptional[{i}] = {u} exceeds the batch's {rows} query rows"));
                    }
                }
                u
            }
            None => q_rows.iter().map(|r| r.1).collect(),
        };
        let k_used: Vec<usize> = match read_opt(&self.used_k, mem, "sequsedKOptional")? {
            None => k_cap.clone(),
            Some(v) => {
                let u = lengths(&v, "sequsedKOptional")?;
                for (i, (&u, &cap)) in u.iter().zip(&k_cap).enumerate() {
                    if u > cap && self.lk == Layout::Paged {
                        return Err(format!(
                            "sequsedKOptional[{i}] = {u} needs more than the block table's {} blocks of {} tokens",
                            cap / self.s2,
                            self.s2
                        ));
                    }
                    if u > cap {
                        return Err(format!("sequsedKOptional[{i}] = {u} exceeds the batch's {cap} keys"));
                    }
                }
                u
            }
        };
        if self.max_seqlen_q >= 0 {
            if let Some((i, &l)) = q_used.iter().enumerate().find(|(_, &l)| l as i64 > self.max_seqlen_q) {
                return Err(format!("batch {i} has {l} queries, more than maxSeqlenQ {}", self.max_seqlen_q));
            }
        }
        let residuals = match read_opt(&self.residual, mem, "cmpResidualKOptional")? {
            Some(v) => lengths(&v, "cmpResidualKOptional")?,
            None => vec![],
        };
        check_residuals(&residuals, self.cmp_ratio)?;
        if let Some(m) = &self.meta {
            let sig = Signature {
                heads: self.heads as i64,
                topk: self.topk as i64,
                mask_mode: self.mask_mode,
                cmp_ratio: self.cmp_ratio,
                layouts: Signature::layout_code(self.lq, self.lk),
                batch: b,
                q_lens: q_used.clone(),
                k_lens: k_used.clone(),
                residuals: residuals.clone(),
            };
            sig.check(&m.read(mem, "metadataOptional")?)?;
        }
        let table = match &self.table {
            Some(t) => {
                let v = t.read(mem, "blockTableOptional")?;
                let blocks = self.k.dims[0];
                let cols = t.dims[1];
                for (i, &l) in k_used.iter().enumerate() {
                    for c in 0..l.div_ceil(self.s2) {
                        let id = v[i * cols + c];
                        if id < 0.0 || id as usize >= blocks {
                            return Err(format!(
                                "blockTableOptional[{i}][{c}] = {id} is outside the {blocks} blocks of k"
                            ));
                        }
                    }
                }
                Some((v, cols))
            }
            None => None,
        };
        let (qv, kv, wv) = (self.q.read(mem, "q")?, self.k.read(mem, "k")?, self.w.read(mem, "w")?);
        let (n1, d, topk) = (self.heads, HEAD_DIM, self.topk);
        // Row-major element offset of key j of batch i in k.
        let key_at = |i: usize, j: usize| -> usize {
            match (&table, self.lk) {
                (Some((t, cols)), _) => {
                    let block = t[i * cols + j / self.s2] as usize;
                    (block * self.s2 + j % self.s2) * d
                }
                _ => (k_start[i] + j) * d,
            }
        };
        let rows_total = self.indices.numel() / topk;
        let mut idx = vec![-1f64; rows_total * topk];
        let mut val = vec![f64::NEG_INFINITY; rows_total * topk];
        for i in 0..b {
            let row0 = q_rows[i].0;
            let (sq, sk) = (q_used[i], k_used[i]);
            for r in 0..sq {
                let visible = if self.mask_mode == 3 {
                    let c = self.cmp_ratio;
                    let res = residuals.get(i).copied().unwrap_or(0) as i64;
                    let end = sk as i64 * c + res - sq as i64 + r as i64 + 1;
                    if end < 0 {
                        0
                    } else {
                        ((end / c) as usize).min(sk)
                    }
                } else {
                    sk
                };
                let row = row0 + r;
                let qrow = &qv[row * n1 * d..(row + 1) * n1 * d];
                let wrow = &wv[row * n1..(row + 1) * n1];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let key = &kv[key_at(i, j)..key_at(i, j) + d];
                        (0..n1)
                            .map(|h| {
                                let dot: f64 = qrow[h * d..(h + 1) * d].iter().zip(key).map(|(a, b)| a * b).sum();
                                wrow[h] * dot.max(0.0)
                            })
                            .sum()
                    })
                    .collect();
                let mut order: Vec<usize> = (0..visible).collect();
                order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                for (slot, &j) in order.iter().take(topk).enumerate() {
                    idx[row * topk + slot] = j as f64;
                    val[row * topk + slot] = scores[j];
                }
            }
        }
        self.indices.write(mem, &idx, "sparseIndices")?;
        if self.return_value {
            self.values.write(mem, &val, "sparseValues")?;
        }
        Ok(())
    }
}

phase_one!(aclnnLightningIndexerV2GetWorkspaceSize = "aclnnLightningIndexerV2", e, (
    q: *const aclTensor, k: *const aclTensor, w: *const aclTensor, cuSeqlensQOptional: *const aclTensor,
    cuSeqlensKOptional: *const aclTensor, sequsedQOptional: *const aclTensor, sequsedKOptional: *const aclTensor,
    cmpResidualKOptional: *const aclTensor, blockTableOptional: *const aclTensor,
    outputIdxOffsetOptional: *const aclTensor, metadataOptional: *const aclTensor, topk: i64, maxSeqlenQ: i64,
    layoutQ: *mut c_char, layoutK: *mut c_char, maskMode: i64, cmpRatio: i64, returnValue: i64,
    sparseIndices: *const aclTensor, sparseValues: *const aclTensor) {
    let fam = v4_attention_family()?;
    let a2a3 = fam != "950";
    // SAFETY: the layouts are NUL-terminated C strings or NULL.
    let (lq, lk) = unsafe { (layout(layoutQ, "layoutQ", false)?, layout(layoutK, "layoutK", true)?) };
    if lk != Layout::Paged && lq != lk {
        return Err(format!(
            "layoutQ {} and layoutK {} must be the same unless layoutK is PA_BBND",
            lq.name(),
            lk.name()
        ));
    }
    check_topk(fam, topk)?;
    check_modes(maskMode, cmpRatio)?;
    if !matches!(returnValue, 0 | 1) {
        return Err(format!("returnValue {returnValue} is not 0 (indices only) or 1 (indices and values)"));
    }
    if maxSeqlenQ < -1 {
        return Err(format!("maxSeqlenQ {maxSeqlenQ} must be -1 (any length) or non-negative"));
    }
    if a2a3 && maxSeqlenQ != -1 {
        return Err(format!("maxSeqlenQ {maxSeqlenQ}: not supported on {} (pass -1)", soc_name()));
    }

    // q [B, S1, N1, D] or [T1, N1, D], BF16/FP16, contiguous, not empty.
    let qd = e.tensor(q, "q")?;
    if !matches!(qd.dtype, aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16) {
        return Err(format!("q must be BFLOAT16 or FLOAT16, got {}", dtype_name(qd.dtype)));
    }
    let (bq, s1, n1, dq) = match (lq, qd.dims.as_slice()) {
        (Layout::Bsnd, [b, s, n, d]) => (Some(*b), *s, *n, *d),
        (Layout::Tnd, [t, n, d]) => (None, *t, *n, *d),
        _ => {
            return Err(format!(
                "q has shape {:?}; layoutQ {} takes {}",
                qd.dims,
                lq.name(),
                if lq == Layout::Tnd { "(T1, N1, D)" } else { "(B, S1, N1, D)" }
            ))
        }
    };
    if qd.numel() == 0 {
        return Err(format!("q {:?} is empty (not supported)", qd.dims));
    }
    if dq != HEAD_DIM {
        return Err(format!("q has head dim D = {dq}: only {HEAD_DIM} is supported"));
    }
    if !(1..=MAX_HEADS).contains(&n1) {
        return Err(format!("q has N1 = {n1} heads: 1..={MAX_HEADS} are supported"));
    }
    contiguous_out(&qd, "q")?;

    // k [B, S2, N2, D], [T2, N2, D] or [blocks, block_size, N2, D], q's dtype.
    let kd = e.tensor(k, "k")?;
    if kd.dtype != qd.dtype {
        return Err(format!("k ({}) must have q's dtype ({})", dtype_name(kd.dtype), dtype_name(qd.dtype)));
    }
    let (k0, s2, n2, dk) = match (lk, kd.dims.as_slice()) {
        (Layout::Bsnd | Layout::Paged, [a, s, n, d]) => (*a, *s, *n, *d),
        (Layout::Tnd, [t, n, d]) => (*t, 0, *n, *d),
        _ => {
            return Err(format!(
                "k has shape {:?}; layoutK {} takes {}",
                kd.dims,
                lk.name(),
                match lk {
                    Layout::Bsnd => "(B, S2, N2, D)",
                    Layout::Tnd => "(T2, N2, D)",
                    Layout::Paged => "(block_num, block_size, N2, D)",
                }
            ))
        }
    };
    if dk != HEAD_DIM {
        return Err(format!("k has head dim D = {dk}: only {HEAD_DIM} is supported"));
    }
    if n2 != 1 {
        return Err(format!("k has N2 = {n2} heads: only 1 is supported"));
    }
    if kd.numel() == 0 {
        return Err(format!("k {:?} is empty (not supported)", kd.dims));
    }
    if lk == Layout::Paged {
        // The docs: block_size 1..=1024 with 32-byte blocks; the operator's host checks take
        // multiples of 16 in 16..=1024, which the emulator enforces (the stricter of the two).
        if !(16..=1024).contains(&s2) || s2 % 16 != 0 {
            return Err(format!("PA_BBND block_size {s2} must be a multiple of 16 in 16..=1024"));
        }
        // Only axis 0 (the blocks) may be strided.
        let inner = [s2 * n2 * dk, n2 * dk, dk, 1];
        if (1..4).any(|a| kd.dims[a] != 1 && kd.strides[a] != inner[a]) {
            return Err(format!("k {}: in PA_BBND only axis 0 may be non-contiguous", kd.describe()));
        }
    } else if !kd.is_contiguous() {
        return Err(format!("k {} must be contiguous (only PA_BBND's axis 0 may be strided)", kd.describe()));
    }

    // w: q's shape without D, FLOAT.
    let wd = e.tensor(w, "w")?;
    if wd.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("w must be FLOAT, got {}", dtype_name(wd.dtype)));
    }
    shape_is(&wd, &qd.dims[..qd.dims.len() - 1], "w")?;
    contiguous_out(&wd, "w")?;

    // Optional inputs and the batch.
    let cq = opt(e, cuSeqlensQOptional, "cuSeqlensQOptional")?;
    let ck = opt(e, cuSeqlensKOptional, "cuSeqlensKOptional")?;
    let uq = opt(e, sequsedQOptional, "sequsedQOptional")?;
    let uk = opt(e, sequsedKOptional, "sequsedKOptional")?;
    let res = opt(e, cmpResidualKOptional, "cmpResidualKOptional")?;
    let table = opt(e, blockTableOptional, "blockTableOptional")?;
    let offset = opt(e, outputIdxOffsetOptional, "outputIdxOffsetOptional")?;
    let meta = opt(e, metadataOptional, "metadataOptional")?;
    let batch = match (lq, bq) {
        (Layout::Bsnd, Some(b)) => {
            absent(&cq, "cuSeqlensQOptional", "layoutQ is BSND")?;
            b
        }
        _ => {
            let c = cq.as_ref().ok_or("cuSeqlensQOptional is required when layoutQ is TND")?;
            if c.dims.len() != 1 || c.dims[0] < 2 {
                return Err(format!("cuSeqlensQOptional has shape {:?}; it must be (B + 1,) with B >= 1", c.dims));
            }
            c.dims[0] - 1
        }
    };
    if let Some(c) = &cq {
        int32_1d(c, batch + 1, "cuSeqlensQOptional", "B + 1")?;
    }
    match lk {
        Layout::Tnd => {
            let c = ck.as_ref().ok_or("cuSeqlensKOptional is required when layoutK is TND")?;
            int32_1d(c, batch + 1, "cuSeqlensKOptional", "B + 1, as cuSeqlensQOptional")?;
        }
        Layout::Bsnd => {
            absent(&ck, "cuSeqlensKOptional", "layoutK is BSND")?;
            if k0 != batch {
                return Err(format!("q has batch {batch} but k (BSND) has {k0}"));
            }
        }
        Layout::Paged => absent(&ck, "cuSeqlensKOptional", "layoutK is PA_BBND")?,
    }
    if lk == Layout::Paged {
        let t = table.as_ref().ok_or("blockTableOptional is required when layoutK is PA_BBND")?;
        if t.dtype != aclDataType::ACL_INT32 || t.dims.len() != 2 || t.dims[0] != batch {
            return Err(format!(
                "blockTableOptional must be INT32 (B = {batch}, max blocks per batch), got {}",
                t.describe()
            ));
        }
        contiguous_out(t, "blockTableOptional")?;
        let u = uk.as_ref().ok_or("sequsedKOptional is required when layoutK is PA_BBND")?;
        int32_1d(u, batch, "sequsedKOptional", "B")?;
    } else {
        absent(&table, "blockTableOptional", "a block table belongs to layoutK PA_BBND")?;
        if let Some(u) = &uk {
            if a2a3 {
                return Err(format!("sequsedKOptional is supported on {} only with layoutK PA_BBND", soc_name()));
            }
            int32_1d(u, batch, "sequsedKOptional", "B")?;
        }
    }
    if let Some(u) = &uq {
        if a2a3 {
            return Err(format!("sequsedQOptional is not supported on {}", soc_name()));
        }
        int32_1d(u, batch, "sequsedQOptional", "B")?;
    }
    if offset.is_some() {
        if a2a3 {
            return Err(format!("outputIdxOffsetOptional is not supported on {}", soc_name()));
        }
        return Err(
            "outputIdxOffsetOptional is not emulated (its shape differs between the doc and the operator)".into()
        );
    }
    check_residual_presence(&res, maskMode, cmpRatio, batch)?;
    match (&meta, a2a3) {
        (None, false) => {
            return Err("metadataOptional is required on the Ascend 950 (from aclnnLightningIndexerV2Metadata)".into())
        }
        (Some(_), true) => {
            return Err(format!(
                "metadataOptional on {} is not emulated (the docs require it on the Ascend 950 only)",
                soc_name()
            ))
        }
        (Some(m), false) => {
            int32_1d(m, META_LEN, "metadataOptional", "fixed size")?;
        }
        (None, true) => {}
    }

    // Outputs: [B, S1, N2, topk] or [T1, N2, topk].
    let topk = topk as usize;
    let mut out_dims = qd.dims.clone();
    let r = out_dims.len();
    out_dims[r - 2] = 1;
    out_dims[r - 1] = topk;
    let id = e.tensor(sparseIndices, "sparseIndices")?;
    if id.dtype != aclDataType::ACL_INT32 {
        return Err(format!("sparseIndices must be INT32, got {}", dtype_name(id.dtype)));
    }
    shape_is(&id, &out_dims, "sparseIndices")?;
    contiguous_out(&id, "sparseIndices")?;
    let vd = e.tensor(sparseValues, "sparseValues")?;
    if vd.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("sparseValues must be FLOAT, got {}", dtype_name(vd.dtype)));
    }
    shape_is(&vd, &out_dims, "sparseValues")?;
    contiguous_out(&vd, "sparseValues")?;
    for (d, n) in [(&id, "sparseIndices"), (&vd, "sparseValues")] {
        for (x, xn) in [(&qd, "q"), (&kd, "k"), (&wd, "w")] {
            if d.overlaps(x) {
                return Err(format!("{n} overlaps the input {xn}"));
            }
        }
    }
    if id.overlaps(&vd) {
        return Err("sparseIndices and sparseValues overlap".into());
    }

    let mut reads = vec![qd.clone(), kd.clone(), wd.clone()];
    reads.extend([&cq, &ck, &uq, &uk, &res, &table, &meta].into_iter().flatten().cloned());
    let job = Job {
        lq,
        lk,
        batch,
        s1,
        s2,
        heads: n1,
        topk,
        max_seqlen_q: maxSeqlenQ,
        mask_mode: maskMode,
        cmp_ratio: cmpRatio,
        return_value: returnValue == 1,
        q: qd,
        k: kd,
        w: wd,
        cu_q: cq,
        cu_k: ck,
        used_q: uq,
        used_k: uk,
        residual: res,
        table,
        meta,
        indices: id.clone(),
        values: vd.clone(),
    };
    Ok(plan(ws_for(&id), reads, vec![id, vd], vec![], move |mem| job.run(mem)))
});
