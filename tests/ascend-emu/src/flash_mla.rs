//! Huawei's V4 attention kernel `aclnnSparseFlashMla` and its AICPU pre-pass
//! `aclnnSparseFlashMlaMetadata` (ops-transformer `attention/sparse_flash_mla/docs/
//! aclnnSparseFlashMla.md`, `attention/sparse_flash_mla_metadata/docs/
//! aclnnSparseFlashMlaMetadata.md`), with the documented constraints per SoC.
//!
//! Emulated: the "SWA sparse ori_kv" scenario (oriKv + oriSparseIndices + oriTopkLength,
//! oriMaskMode 0, no cmpKv) with paged KV (layout PA_BBND: a block table and sequsedOriKv per
//! batch) and q in TND or BSND. The A2/A3 kernels read sparse ori_kv rows through the block
//! table only (ops-transformer `op_kernel/arch22`, `GetOriSparseKeyGmOffset`), so a BSND/TND KV
//! is refused there; on the 950 it is not emulated. The SWA band, CSA and HCA scenarios
//! (cmpKv, masks 3/4) are refused with "not emulated" rather than guessed at.
//!
//! Per SoC, for this scenario: Atlas A2/A3 take non-negative windows and cmpMaskMode 3 (their
//! error tables); the 950's host checker (`op_host/checkers/mask_checker.cpp`) wants both
//! windows -1 unless oriMaskMode is 4, and cmpMaskMode 0 without cmpKv.
//!
//! Numerics, as the kernel computes them (the doc's online softmax, S2 in tiles of 512, from
//! row_max = sink and row_sum = 1): per query token and head, scores of the token's first
//! `oriTopkLength` indexed rows; per tile the running max and sum in float, and the
//! probabilities `exp(s - max)` cast to the KV dtype before `P·V` (the A2/A3 kernel keeps them
//! in a `KV_T` buffer, `vec1ResGm`); the output divided by the sum and rounded once to its
//! dtype. Values are f64 otherwise.
//!
//! The metadata's real layout (per-core FA/FD task ranges) depends on the core count; the
//! emulator writes one core's range covering everything, and signs the unused tail
//! ([`META_SIGNATURE`]) with the parameters it was computed for, so that the main operator can
//! refuse metadata from another call's shapes (a stale or missing pre-pass).

use std::ffi::{c_char, c_void, CStr};

use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclTensor, aclnnStatus, aclrtStream};

use crate::fused::{optional, v4_attention_family};
use crate::mem::{decode, dtype_name, encode, Desc};
use crate::ops::{contiguous_out, plan, shape_is, ws_for, R};
use crate::{get_workspace, launch, soc_name, Emu, Plan};

launcher!(aclnnSparseFlashMlaMetadata, aclnnSparseFlashMla);

/// Metadata length (INT32 elements), fixed by the docs.
const META_LEN: usize = 1024;
/// Where the emulator's signature starts in the metadata (after the largest real layout:
/// 9 INT32 per AI Core and 8 per vector core stay far below it).
const META_SIGNATURE: usize = 1016;
/// "SFMA": marks metadata written by this emulator's aclnnSparseFlashMlaMetadata.
const META_MAGIC: i64 = 0x5346_4d41;
/// The only head size the kernel takes (448 nope + 64 rope channels).
const HEAD_DIM: usize = 512;

/// A documented "nullptr or empty tensor".
fn must_be_absent(e: &Emu, p: *const aclTensor, name: &str, why: &str) -> R<()> {
    match optional(e, p, name)? {
        Some(d) if d.numel() != 0 => Err(format!("{name} must be NULL or an empty tensor ({why})")),
        _ => Ok(()),
    }
}

fn int32(d: &Desc, name: &str) -> R<()> {
    if d.dtype != aclDataType::ACL_INT32 {
        return Err(format!("{name} must be INT32, got {}", dtype_name(d.dtype)));
    }
    Ok(())
}

/// A layout string; NULL means the documented default "BSND".
unsafe fn layout(p: *const c_char, name: &str) -> R<String> {
    if p.is_null() {
        return Ok("BSND".into());
    }
    // SAFETY: the caller passes a NUL-terminated C string (the API takes `char*`).
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    match s.as_str() {
        "BSND" | "TND" => Ok(s),
        "PA_BBND" if name == "layoutKvOptional" => Ok(s),
        _ => Err(format!(
            "{name} {s:?} is not supported (\"BSND\" or \"TND\"{})",
            if name == "layoutKvOptional" { ", \"PA_BBND\"" } else { "" }
        )),
    }
}

/// The head counts the docs allow: N1 in 1..=128, N2 = 1; on Atlas A2/A3 N1/N2 also a power
/// of two.
fn check_heads(fam: &str, n1: usize, n2: usize) -> R<()> {
    if !(1..=128).contains(&n1) || n2 != 1 {
        return Err(format!("N1 = {n1} query heads and N2 = {n2} KV heads: N1 must be in 1..=128 and N2 = 1"));
    }
    if fam != "950" && !n1.is_power_of_two() {
        return Err(format!("N1/N2 = {n1}: {} takes a power of two in 1..=128", soc_name()));
    }
    Ok(())
}

/// The mask and window arguments of the sparse ori_kv scenario, per SoC.
fn check_sparse_modes(fam: &str, ori_mask: i64, cmp_mask: i64, win_left: i64, win_right: i64, cmp_ratio: i64) -> R<()> {
    if ori_mask != 0 {
        return Err(format!(
            "oriMaskMode {ori_mask}: the SWA sparse ori_kv scenario (oriSparseIndices given) takes 0 (no mask)"
        ));
    }
    if fam == "950" {
        // mask_checker CheckFeature: without the band mask both windows are -1; without cmpKv
        // cmpMaskMode is 0.
        if win_left != -1 || win_right != -1 {
            return Err(format!(
                "oriWinLeft {win_left} / oriWinRight {win_right}: {} takes -1 unless oriMaskMode is 4",
                soc_name()
            ));
        }
        if cmp_mask != 0 {
            return Err(format!("cmpMaskMode {cmp_mask}: {} takes 0 without cmpKv", soc_name()));
        }
        return Ok(());
    }
    if cmp_mask != 3 {
        return Err(format!("cmpMaskMode {cmp_mask} is not supported on {} (3)", soc_name()));
    }
    if win_left < 0 || win_right < 0 {
        return Err(format!(
            "oriWinLeft {win_left} / oriWinRight {win_right}: the SWA sparse ori_kv scenario takes non-negative windows"
        ));
    }
    if cmp_ratio != 1 {
        return Err(format!("cmpRatio {cmp_ratio}: the SWA scenario takes 1"));
    }
    Ok(())
}

/// The KV layout of the sparse ori_kv scenario: paged (PA_BBND) is what the kernels read
/// sparse rows through.
fn check_sparse_kv_layout(fam: &str, lkv: &str) -> R<()> {
    match (lkv, fam) {
        ("PA_BBND", _) => Ok(()),
        (_, "950") => Err(format!("layoutKvOptional {lkv:?} with oriSparseIndices is not emulated (PA_BBND is)")),
        _ => Err(format!(
            "layoutKvOptional {lkv:?} with oriSparseIndices: {} reads sparse ori_kv rows through \
             oriBlockTable only (PA_BBND)",
            soc_name()
        )),
    }
}

/// Sequence boundaries from a `cuSeqlens` tensor (`B + 1` prefix sums starting at 0, ending at
/// `total`), checked when the stream runs.
fn boundaries(v: &[f64], total: usize, name: &str) -> R<Vec<usize>> {
    if v.first() != Some(&0.0) {
        return Err(format!("{name} must start at 0, got {:?}", v.first()));
    }
    let b: Vec<usize> = v.iter().map(|&x| x.max(0.0) as usize).collect();
    if v.windows(2).any(|w| w[1] < w[0]) {
        return Err(format!("{name} must be non-decreasing, got {v:?}"));
    }
    if b.last() != Some(&total) {
        return Err(format!("{name} ends at {:?}, but the tensor has {total} tokens", b.last()));
    }
    Ok(b)
}

phase_one!(aclnnSparseFlashMlaMetadataGetWorkspaceSize = "aclnnSparseFlashMlaMetadata", e, (
    cuSeqlensQOptional: *const aclTensor, cuSeqlensOriKvOptional: *const aclTensor,
    cuSeqlensCmpKvOptional: *const aclTensor, sequsedQOptional: *const aclTensor,
    sequsedOriKvOptional: *const aclTensor, sequsedCmpKvOptional: *const aclTensor,
    cmpResidualKvOptional: *const aclTensor, oriTopkLengthOptional: *const aclTensor,
    cmpTopkLengthOptional: *const aclTensor, numHeadsQ: i64, numHeadsKv: i64, headDim: i64, batchSize: i64,
    maxSeqlenQ: i64, maxSeqlenOriKv: i64, maxSeqlenCmpKv: i64, oriTopk: i64, cmpTopk: i64, cmpRatio: i64,
    oriMaskMode: i64, cmpMaskMode: i64, oriWinLeft: i64, oriWinRight: i64, layoutQOptional: *const c_char,
    layoutKvOptional: *const c_char, hasOriKv: bool, hasCmpKv: bool, metaData: *const aclTensor) {
    let fam = v4_attention_family()?;
    if numHeadsQ < 1 || numHeadsKv < 1 {
        return Err(format!("numHeadsQ {numHeadsQ} / numHeadsKv {numHeadsKv} must be positive"));
    }
    check_heads(fam, numHeadsQ as usize, numHeadsKv as usize)?;
    if headDim != HEAD_DIM as i64 {
        return Err(format!("headDim {headDim}: only {HEAD_DIM} is supported"));
    }
    if batchSize < 0 || maxSeqlenQ < 0 || maxSeqlenOriKv < 0 || maxSeqlenCmpKv < 0 {
        return Err("batchSize and the maxSeqlen* arguments must not be negative".into());
    }
    if !hasOriKv {
        return Err("hasOriKv must be true: every scenario passes oriKv".into());
    }
    if hasCmpKv || cmpTopk != 0 {
        return Err("the CSA/HCA scenarios (hasCmpKv, cmpTopk) are not emulated".into());
    }
    if fam != "950" {
        must_be_absent(e, sequsedQOptional, "sequsedQOptional", "not supported on Atlas A2/A3")?;
    } else if optional(e, sequsedQOptional, "sequsedQOptional")?.is_some_and(|d| d.numel() != 0) {
        return Err("sequsedQOptional is not emulated".into());
    }
    must_be_absent(e, cmpTopkLengthOptional, "cmpTopkLengthOptional", "reserved")?;
    for (p, n) in [
        (cuSeqlensCmpKvOptional, "cuSeqlensCmpKvOptional"),
        (sequsedCmpKvOptional, "sequsedCmpKvOptional"),
        (cmpResidualKvOptional, "cmpResidualKvOptional"),
    ] {
        must_be_absent(e, p, n, "no cmpKv")?;
    }
    if oriTopk <= 0 {
        return Err(format!(
            "oriTopk {oriTopk}: only the SWA sparse ori_kv scenario (oriTopk > 0 with oriTopkLengthOptional) is emulated"
        ));
    }
    check_sparse_modes(fam, oriMaskMode, cmpMaskMode, oriWinLeft, oriWinRight, cmpRatio)?;
    // SAFETY: the layouts are NUL-terminated C strings or NULL.
    let (lq, lkv) = unsafe { (layout(layoutQOptional, "layoutQOptional")?, layout(layoutKvOptional, "layoutKvOptional")?) };
    check_sparse_kv_layout(fam, &lkv)?;
    let topk_len = optional(e, oriTopkLengthOptional, "oriTopkLengthOptional")?
        .filter(|d| d.numel() != 0)
        .ok_or("oriTopkLengthOptional is required in the SWA sparse ori_kv scenario")?;
    int32(&topk_len, "oriTopkLengthOptional")?;
    let (batch, tokens) = match (lq.as_str(), topk_len.dims.as_slice()) {
        ("TND", [t1, n2]) if *n2 == numHeadsKv as usize => (None, *t1),
        ("BSND", [b, s1, n2]) if *n2 == numHeadsKv as usize => (Some(*b), b * s1),
        _ => {
            return Err(format!(
                "oriTopkLengthOptional has shape {:?}; layout {lq} takes {}",
                topk_len.dims,
                if lq == "TND" { "(T1, N2)" } else { "(B, S1, N2)" }
            ))
        }
    };
    let mut reads = vec![topk_len.clone()];
    let batch = match batch {
        Some(b) => b,
        None => {
            let cq = optional(e, cuSeqlensQOptional, "cuSeqlensQOptional")?.ok_or("cuSeqlensQOptional is required for layout TND")?;
            int32(&cq, "cuSeqlensQOptional")?;
            if cq.dims.len() != 1 || cq.dims[0] < 2 {
                return Err(format!("cuSeqlensQOptional must be 1-D (B + 1,), got {:?}", cq.dims));
            }
            reads.push(cq.clone());
            cq.dims[0] - 1
        }
    };
    must_be_absent(e, cuSeqlensOriKvOptional, "cuSeqlensOriKvOptional", "layout PA_BBND takes sequsedOriKvOptional")?;
    let used = optional(e, sequsedOriKvOptional, "sequsedOriKvOptional")?
        .filter(|d| d.numel() != 0)
        .ok_or("sequsedOriKvOptional is required for layout PA_BBND")?;
    int32(&used, "sequsedOriKvOptional")?;
    shape_is(&used, &[batch], "sequsedOriKvOptional (B,)")?;
    let md = e.tensor(metaData, "metaData")?;
    int32(&md, "metaData")?;
    shape_is(&md, &[META_LEN], "metaData")?;
    contiguous_out(&md, "metaData")?;
    let (n1, k, lq_code) = (numHeadsQ, oriTopk, if lq == "TND" { 1 } else { 0 });
    let out = md.clone();
    Ok(plan(ws_for(&md), reads, vec![md], vec![], move |mem| {
        // One core takes every (batch, head-group) row and the whole key range.
        let mut v = vec![0f64; META_LEN];
        v[0] = 1.0;
        v[4] = tokens as f64;
        v[5] = n1 as f64;
        v[6] = k as f64;
        v[8] = (k as u64).div_ceil(512) as f64;
        v[META_SIGNATURE] = META_MAGIC as f64;
        v[META_SIGNATURE + 1] = n1 as f64;
        v[META_SIGNATURE + 2] = k as f64;
        v[META_SIGNATURE + 3] = tokens as f64;
        v[META_SIGNATURE + 4] = lq_code as f64;
        out.write(mem, &v, "metaData")
    }))
});

phase_one!(aclnnSparseFlashMlaGetWorkspaceSize = "aclnnSparseFlashMla", e, (
    q: *const aclTensor, oriKvOptional: *const aclTensor, cmpKvOptional: *const aclTensor,
    oriSparseIndicesOptional: *const aclTensor, cmpSparseIndicesOptional: *const aclTensor,
    oriBlockTableOptional: *const aclTensor, cmpBlockTableOptional: *const aclTensor,
    cuSeqlensQOptional: *const aclTensor, cuSeqlensOriKvOptional: *const aclTensor,
    cuSeqlensCmpKvOptional: *const aclTensor, sequsedQOptional: *const aclTensor,
    sequsedOriKvOptional: *const aclTensor, sequsedCmpKvOptional: *const aclTensor,
    cmpResidualKvOptional: *const aclTensor, oriTopkLengthOptional: *const aclTensor,
    cmpTopkLengthOptional: *const aclTensor, sinksOptional: *const aclTensor, metadataOptional: *const aclTensor,
    softmaxScale: f64, cmpRatio: i64, oriMaskMode: i64, cmpMaskMode: i64, oriWinLeft: i64, oriWinRight: i64,
    layoutQOptional: *mut c_char, layoutKvOptional: *mut c_char, topkValueMode: i64, returnSoftmaxLse: bool,
    attnOutOut: *const aclTensor, softmaxLseOutOptional: *const aclTensor) {
    let fam = v4_attention_family()?;
    let qd = e.tensor(q, "q")?;
    if !matches!(qd.dtype, aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16) {
        return Err(format!("q must be BFLOAT16 or FLOAT16, got {}", dtype_name(qd.dtype)));
    }
    if qd.numel() == 0 {
        return Err("q must not be empty".into());
    }
    // SAFETY: the layouts are NUL-terminated C strings or NULL.
    let (lq, lkv) = unsafe { (layout(layoutQOptional, "layoutQOptional")?, layout(layoutKvOptional, "layoutKvOptional")?) };
    if lkv != "PA_BBND" && lq != lkv {
        return Err(format!("layoutQOptional {lq:?} and layoutKvOptional {lkv:?} must be the same outside PA_BBND"));
    }
    let tnd = lq == "TND";
    // (batch, S1 or T1, N1, D); TND's batch comes from cuSeqlensQ.
    let (s1, n1, d) = match (tnd, qd.dims.as_slice()) {
        (true, [t1, n1, d]) => (*t1, *n1, *d),
        (false, [_, s1, n1, d]) => (*s1, *n1, *d),
        _ => return Err(format!("q has shape {:?}; layout {lq} takes {}", qd.dims, if tnd { "(T1, N1, D)" } else { "(B, S1, N1, D)" })),
    };
    if d != HEAD_DIM {
        return Err(format!("D = {d}: only {HEAD_DIM} (448 nope + 64 rope) is supported"));
    }
    let kv = optional(e, oriKvOptional, "oriKvOptional")?.ok_or("oriKvOptional is required in every scenario")?;
    if kv.dtype != qd.dtype {
        return Err(format!("oriKvOptional ({}) must have q's dtype ({})", dtype_name(kv.dtype), dtype_name(qd.dtype)));
    }
    if optional(e, cmpKvOptional, "cmpKvOptional")?.is_some() || optional(e, cmpSparseIndicesOptional, "cmpSparseIndicesOptional")?.is_some() {
        return Err("the CSA/HCA scenarios (cmpKvOptional, cmpSparseIndicesOptional) are not emulated".into());
    }
    let idx = optional(e, oriSparseIndicesOptional, "oriSparseIndicesOptional")?.ok_or(
        "oriSparseIndicesOptional is required: only the SWA sparse ori_kv scenario is emulated (the band-masked SWA is not)",
    )?;
    check_sparse_kv_layout(fam, &lkv)?;
    // Paged KV: (blocks, block size, N2, D).
    let (nblocks, bs, n2) = match kv.dims.as_slice() {
        [nb, bs, n2, dk] if *dk == HEAD_DIM => (*nb, *bs, *n2),
        _ => return Err(format!("oriKvOptional has shape {:?}; layout PA_BBND takes (blocks, block_size, N2, D = {HEAD_DIM})", kv.dims)),
    };
    check_heads(fam, n1, n2)?;
    if !(1..=1024).contains(&bs) || (fam != "950" && bs % 16 != 0) {
        return Err(format!(
            "ori_block_size {bs}: 1..=1024{}",
            if fam != "950" { format!(", a multiple of 16 on {}", soc_name()) } else { String::new() }
        ));
    }
    if kv.dims.len() == 4 && !kv.is_contiguous() {
        // Only the block axis may be strided (as in the other paged kernels).
        let row = kv.strides[1] == n2 * HEAD_DIM && kv.strides[2] == HEAD_DIM && kv.strides[3] == 1;
        if !row {
            return Err(format!("oriKvOptional must be contiguous within a block, got {}", kv.describe()));
        }
    }
    must_be_absent(e, cmpBlockTableOptional, "cmpBlockTableOptional", "no cmpKv")?;
    for (p, n) in [
        (cuSeqlensCmpKvOptional, "cuSeqlensCmpKvOptional"),
        (sequsedCmpKvOptional, "sequsedCmpKvOptional"),
        (cmpResidualKvOptional, "cmpResidualKvOptional"),
    ] {
        must_be_absent(e, p, n, "no cmpKv")?;
    }
    must_be_absent(e, sequsedQOptional, "sequsedQOptional", "not supported yet")?;
    must_be_absent(e, cmpTopkLengthOptional, "cmpTopkLengthOptional", "reserved")?;
    must_be_absent(e, cuSeqlensOriKvOptional, "cuSeqlensOriKvOptional", "layout PA_BBND takes sequsedOriKvOptional")?;
    if topkValueMode != 1 {
        return Err(format!("topkValueMode {topkValueMode}: only 1 is supported"));
    }
    if !softmaxScale.is_finite() {
        return Err(format!("softmaxScale {softmaxScale} must be finite"));
    }
    int32(&idx, "oriSparseIndicesOptional")?;
    let bq = if tnd {
        None
    } else {
        Some(qd.dims[0])
    };
    let k = match (tnd, idx.dims.as_slice()) {
        (true, [t1, nn, k]) if *t1 == s1 && *nn == n2 => *k,
        (false, [b, ss, nn, k]) if Some(*b) == bq && *ss == s1 && *nn == n2 => *k,
        _ => {
            return Err(format!(
                "oriSparseIndicesOptional has shape {:?}; expected {} with q {:?}",
                idx.dims,
                if tnd { "(T1, N2, K)" } else { "(B, S1, N2, K)" },
                qd.dims
            ))
        }
    };
    if k == 0 {
        return Err("oriSparseIndicesOptional has K = 0".into());
    }
    check_sparse_modes(fam, oriMaskMode, cmpMaskMode, oriWinLeft, oriWinRight, cmpRatio)?;
    let len = optional(e, oriTopkLengthOptional, "oriTopkLengthOptional")?
        .filter(|d| d.numel() != 0)
        .ok_or("oriTopkLengthOptional is required with oriSparseIndicesOptional")?;
    int32(&len, "oriTopkLengthOptional")?;
    shape_is(&len, &idx.dims[..idx.dims.len() - 1], "oriTopkLengthOptional (oriSparseIndicesOptional without its last dim)")?;
    let sinks = optional(e, sinksOptional, "sinksOptional")?.ok_or("sinksOptional is required")?;
    if sinks.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("sinksOptional must be FLOAT32, got {}", dtype_name(sinks.dtype)));
    }
    shape_is(&sinks, &[n1], "sinksOptional (N1,)")?;
    let meta = optional(e, metadataOptional, "metadataOptional")?
        .ok_or("metadataOptional is required: run aclnnSparseFlashMlaMetadata first")?;
    int32(&meta, "metadataOptional")?;
    shape_is(&meta, &[META_LEN], "metadataOptional")?;
    let cq = if tnd {
        let cq = optional(e, cuSeqlensQOptional, "cuSeqlensQOptional")?.ok_or("cuSeqlensQOptional is required for layout TND")?;
        int32(&cq, "cuSeqlensQOptional")?;
        if cq.dims.len() != 1 || cq.dims[0] < 2 {
            return Err(format!("cuSeqlensQOptional must be 1-D (B + 1,), got {:?}", cq.dims));
        }
        Some(cq)
    } else {
        None
    };
    let batch = bq.unwrap_or_else(|| cq.as_ref().map_or(1, |c| c.dims[0] - 1));
    let table = optional(e, oriBlockTableOptional, "oriBlockTableOptional")?
        .filter(|d| d.numel() != 0)
        .ok_or("oriBlockTableOptional is required for layout PA_BBND")?;
    int32(&table, "oriBlockTableOptional")?;
    if table.dims.len() != 2 || table.dims[0] != batch {
        return Err(format!("oriBlockTableOptional has shape {:?}; expected (B = {batch}, max blocks per batch)", table.dims));
    }
    let used = optional(e, sequsedOriKvOptional, "sequsedOriKvOptional")?
        .filter(|d| d.numel() != 0)
        .ok_or("sequsedOriKvOptional is required for layout PA_BBND")?;
    int32(&used, "sequsedOriKvOptional")?;
    shape_is(&used, &[batch], "sequsedOriKvOptional (B,)")?;
    let out = e.tensor(attnOutOut, "attnOutOut")?;
    if out.dtype != qd.dtype {
        return Err(format!("attnOutOut ({}) must have q's dtype ({})", dtype_name(out.dtype), dtype_name(qd.dtype)));
    }
    shape_is(&out, &qd.dims, "attnOutOut (q's shape)")?;
    contiguous_out(&out, "attnOutOut")?;
    let tokens = bq.map_or(s1, |b| b * s1);
    let lse = if returnSoftmaxLse {
        let l = optional(e, softmaxLseOutOptional, "softmaxLseOutOptional")?.ok_or("returnSoftmaxLse needs softmaxLseOutOptional")?;
        if l.dtype != aclDataType::ACL_FLOAT {
            return Err(format!("softmaxLseOutOptional must be FLOAT32, got {}", dtype_name(l.dtype)));
        }
        let want: Vec<usize> = if tnd { vec![n2, s1, n1 / n2] } else { vec![batch, n2, s1, n1 / n2] };
        shape_is(&l, &want, "softmaxLseOutOptional")?;
        contiguous_out(&l, "softmaxLseOutOptional")?;
        Some(l)
    } else {
        None
    };
    let mut reads = vec![qd.clone(), kv.clone(), idx.clone(), len.clone(), sinks.clone(), meta.clone(), table.clone(), used.clone()];
    // Read as well as written where rows may be left unwritten.
    reads.push(out.clone());
    reads.extend(cq.iter().cloned());
    let mut writes = vec![out.clone()];
    writes.extend(lse.iter().cloned());
    let lq_code = if tnd { 1.0 } else { 0.0 };
    let kv_dtype = kv.dtype;
    let ignore_sinks = crate::fused::quirk("sfmla-ignores-sinks");
    let fam_a2a3 = fam != "950";
    Ok(plan(ws_for(&out), reads, writes, vec![], move |mem| {
        let m = meta.read(mem, "metadataOptional")?;
        let signed = m[META_SIGNATURE] == META_MAGIC as f64;
        let want = [n1 as f64, k as f64, tokens as f64, lq_code];
        if !signed || m[META_SIGNATURE + 1..META_SIGNATURE + 5] != want {
            return Err(format!(
                "metadataOptional was not produced by aclnnSparseFlashMlaMetadata for this call (N1 {n1}, K {k}, {tokens} query tokens, \
                 layout {}): {}",
                if tnd { "TND" } else { "BSND" },
                if signed { "it was computed for other parameters" } else { "it holds no metadata" }
            ));
        }
        let (qv, kvv, iv, lv, sv) = (
            qd.read(mem, "q")?,
            kv.read(mem, "oriKvOptional")?,
            idx.read(mem, "oriSparseIndicesOptional")?,
            len.read(mem, "oriTopkLengthOptional")?,
            sinks.read(mem, "sinksOptional")?,
        );
        let (tv, uv) = (table.read(mem, "oriBlockTableOptional")?, used.read(mem, "sequsedOriKvOptional")?);
        let per_batch = table.dims[1];
        // Each query token's batch.
        let mut batch_of = vec![0usize; tokens];
        match &cq {
            Some(c) => {
                let b = boundaries(&c.read(mem, "cuSeqlensQOptional")?, s1, "cuSeqlensQOptional")?;
                for (i, w) in b.windows(2).enumerate() {
                    batch_of[w[0]..w[1]].fill(i);
                }
            }
            None => {
                for (t, slot) in batch_of.iter_mut().enumerate() {
                    *slot = t / s1;
                }
            }
        }
        // Logical row r of batch b → the physical row of the paged KV.
        let physical = |t: usize, r: f64, valid: f64| -> R<usize> {
            let b = batch_of[t];
            let n_kv = uv[b];
            if n_kv < 0.0 || n_kv as usize > per_batch * bs {
                return Err(format!("sequsedOriKvOptional[{b}] = {n_kv} is outside 0..={}", per_batch * bs));
            }
            if r < 0.0 || r >= n_kv {
                return Err(format!(
                    "oriSparseIndicesOptional[{t}] names KV row {r} among its first {valid} (valid) entries; \
                     the batch has {n_kv} rows"
                ));
            }
            let (blk, off) = (r as usize / bs, r as usize % bs);
            let id = tv[b * per_batch + blk];
            if id < 0.0 || id as usize >= nblocks {
                return Err(format!("oriBlockTableOptional[{b}][{blk}] = {id} is outside 0..{nblocks}"));
            }
            Ok(id as usize * bs + off)
        };
        // A value as the KV dtype holds it (the probabilities before P·V).
        let as_kv = |v: f64| {
            let mut b = [0u8; 2];
            encode(kv_dtype, v, &mut b);
            decode(kv_dtype, &b)
        };
        // The A2/A3 kernel neither initialises a TND output nor writes a row without valid
        // indices (`InitOutputSingleCore` runs for other layouts only): such rows keep what the
        // buffer held.
        let mut o = if tnd && fam_a2a3 { out.read(mem, "attnOutOut")? } else { vec![0f64; tokens * n1 * HEAD_DIM] };
        let mut lse_v = vec![0f64; tokens * n1];
        for t in 0..tokens {
            let valid = lv[t];
            if valid < 0.0 || valid as usize > k {
                return Err(format!("oriTopkLengthOptional[{t}] = {valid} is outside 0..={k}"));
            }
            let rows: Vec<usize> =
                iv[t * k..t * k + valid as usize].iter().map(|&r| physical(t, r, valid)).collect::<R<_>>()?;
            if rows.is_empty() && tnd && fam_a2a3 {
                continue;
            }
            o[t * n1 * HEAD_DIM..(t + 1) * n1 * HEAD_DIM].fill(0.0);
            for h in 0..n1 {
                let qh = &qv[(t * n1 + h) * HEAD_DIM..(t * n1 + h + 1) * HEAD_DIM];
                let oh = &mut o[(t * n1 + h) * HEAD_DIM..(t * n1 + h + 1) * HEAD_DIM];
                // Online softmax over tiles of 512 rows, from row_max = sink, row_sum = 1.
                let (mut mx, mut sum) = if ignore_sinks { (f64::NEG_INFINITY, 0f64) } else { (sv[h], 1f64) };
                for tile in rows.chunks(512) {
                    let scores: Vec<f64> = tile
                        .iter()
                        .map(|&r| softmaxScale * qh.iter().zip(&kvv[r * HEAD_DIM..(r + 1) * HEAD_DIM]).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let new_mx = scores.iter().cloned().fold(mx, f64::max);
                    let rescale = (mx - new_mx).exp();
                    sum *= rescale;
                    oh.iter_mut().for_each(|v| *v *= rescale);
                    for (&r, s) in tile.iter().zip(&scores) {
                        let p = (s - new_mx).exp();
                        sum += p;
                        let pk = as_kv(p);
                        for (acc, v) in oh.iter_mut().zip(&kvv[r * HEAD_DIM..(r + 1) * HEAD_DIM]) {
                            *acc += pk * v;
                        }
                    }
                    mx = new_mx;
                }
                if sum > 0.0 {
                    oh.iter_mut().for_each(|v| *v /= sum);
                }
                lse_v[t * n1 + h] = mx + sum.ln();
            }
        }
        out.write(mem, &o, "attnOutOut")?;
        if let Some(l) = &lse {
            // Stored (N2 = 1, tokens, N1) for TND and (B, N2 = 1, S1, N1) for BSND: both are
            // token-major, head-minor, like the computed order.
            l.write(mem, &lse_v, "softmaxLseOutOptional")?;
        }
        Ok(())
    }))
});
