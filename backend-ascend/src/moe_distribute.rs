//! The expert-parallel exchange (`--moe-exchange all-to-all`, `dsv4_core::parallel::dispatch`)
//! through Huawei's MC2 kernels (ops-transformer `mc2/moe_distribute_dispatch_v2`,
//! `mc2/moe_distribute_combine_v2`): `aclnnMoeDistributeDispatchV2` sends each (token, expert)
//! row of a rank's BF16 tokens to the expert's rank, `aclnnMoeDistributeCombineV2` brings the
//! expert outputs back and sums them per token, weighted, both on the EP communicator named by
//! `HcclGetCommName`.
//!
//! Where it applies: on a device that can use them ([`why_not_here`]: Atlas A3,
//! [`crate::kernels::MOE_DISTRIBUTE`] chosen, the symbols present), which the EP group agrees on
//! by a vote; and for a call whose shapes allow it ([`why_not`], the same answer on every rank):
//! bf16/official activations (the rows travel as BF16, which is exact only there), hidden
//! 1024..=8192, top-k ≤ 16, at most 1024 experts split evenly, at most 512 tokens per rank, and
//! the dispatch's share of HCCL's window within `HCCL_BUFFSIZE` ([`window_bytes`]). The kernels
//! run on a communicator of their own, split off the EP group once (both docs: no other operator
//! on the MC2 communication domain), called as vllm-ascend calls them on A3: tpWorldSize 1,
//! groupTp the group's own name, a one-entry tpRecvCounts handed back as tpSendCounts.
//!
//! A3 carries no routing weights with the rows (`expertScalesOptional` must be NULL there), so
//! the experts run unweighted and the combine applies the weights: in BF16 the weight then
//! multiplies `w2`'s output instead of its input, one rounding apart from V4's order. Every rank
//! must dispatch at least one token (`0 < Bs`): a rank whose slice is empty dispatches one zero
//! token with zero weights to `top_k` distinct experts (its own first) and drops its combined
//! row.
//!
//! Self-test: on its first applicable call the EP group splits off the kernels' communicator and
//! runs a synthetic round trip on it (every rank's tokens to experts it knows, each expert
//! scaling its rows by its id + 1) against the host's sums; the ranks agree by an all-reduce of
//! their verdicts on the EP communicator. A disagreement, or an error (which poisons only the
//! kernels' communicator), switches the kernels off on every rank with the reason (`dsv4
//! devices` then says why) and the composition runs. An error after that is a collective failure
//! and ends the run (the kernels are opt-in, `DSV4_ASCEND_FUSED=all`). Emulator-verified, not
//! hardware-verified.

use std::ffi::CStr;
use std::ptr::{null, null_mut};
use std::sync::Arc;

use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::DeviceTensor;
use dsv4_core::error::{Error, Result};
use dsv4_core::parallel::dispatch::{check_args, DispatchArgs, Dispatched, Route};
use dsv4_core::Backend;

use crate::acl::Buffer;
use crate::kernels::SocFamily;
use crate::{AscendBackend, AscendIndex, AscendTensor, Mem};

/// The docs' limits on Atlas A3 (aclnnMoeDistributeDispatchV2.md, 约束说明).
const HIDDEN: std::ops::RangeInclusive<usize> = 1024..=8192;
const MOST_TOKENS: usize = 512;
const MOST_TOP_K: usize = 16;
const MOST_EXPERTS: usize = 1024;

/// What a dispatch left for its combine.
struct Mc2Route {
    /// `[BS', K]` the dispatched expert ids (BS' = max(BS, 1)).
    ids: AscendIndex,
    /// `[BS', K]` FLOAT: the routing weights the combine applies.
    scales: AscendTensor,
    /// INT32 `[A · 128]` and `[EP · L]`: the dispatch's assist info and receive counts.
    assist: Arc<Buffer>,
    counts: Arc<Buffer>,
    /// INT32 `[1]`: the dispatch's tpRecvCounts, the combine's tpSendCounts.
    tp_counts: Arc<Buffer>,
    /// Rows of expandX (A), `globalBs`, the experts (and this rank's), the tokens dispatched
    /// (BS').
    a: usize,
    local: usize,
    /// The pairs this rank sent to its own experts (padding included): the rows it got back
    /// from itself.
    own: usize,
    global_bs: usize,
    experts: usize,
    dispatched: usize,
}

/// Why this device cannot use the MC2 kernels at all (`None`: it can): the kernels' state
/// (policy, symbols, an earlier self-test) and the SoC. Per process: the EP group agrees on it by
/// a vote before the first launch (`HcclCommunicator::moe_dispatch`).
pub(crate) fn why_not_here(be: &AscendBackend) -> Option<String> {
    let state = &be.kernels.moe_distribute;
    if !state.usable() {
        return Some(state.why());
    }
    if SocFamily::of(&be.soc) != SocFamily::AtlasA3 {
        return Some(format!("not supported on {}", be.soc));
    }
    None
}

/// Why the MC2 kernels do not apply to this call (`None`: they do). Depends only on what every
/// rank of the group shares: the precision, the shapes, the group's size and `HCCL_BUFFSIZE`
/// (which HCCL requires to be the same on every rank).
pub(crate) fn why_not(args: &DispatchArgs<'_, AscendBackend>, size: usize) -> Option<String> {
    if !args.precision.rounds_to_bf16() {
        return Some("the activations are f32 (the kernels move BF16 rows: bf16/official only)".into());
    }
    let hidden = args.x.shape().get(1).copied().unwrap_or(0);
    let top_k = args.weights.shape().get(1).copied().unwrap_or(0);
    let experts = args.held.last().map_or(0, |h| h.end);
    let local = args.held.first().map_or(0, |h| h.len());
    let even = args.held.iter().all(|h| h.len() == local);
    if !HIDDEN.contains(&hidden) {
        return Some(format!("hidden size {hidden} is outside {HIDDEN:?}"));
    }
    if top_k == 0 || top_k > MOST_TOP_K.min(experts) || experts > MOST_EXPERTS || !even || !(2..=768).contains(&size) {
        return Some(format!(
            "top-k {top_k}, {experts} experts over {size} ranks (need top-k ≤ {MOST_TOP_K}, ≤ {MOST_EXPERTS} experts \
             split evenly, 2..=768 ranks)"
        ));
    }
    if args.most_tokens == 0 || args.most_tokens > MOST_TOKENS {
        return Some(format!("{} tokens per rank (the kernels take 1..={MOST_TOKENS})", args.most_tokens));
    }
    let need = window_bytes(args.most_tokens, size, local, top_k, hidden);
    let have = match hccl_buffsize_mb() {
        Ok(mb) => mb.saturating_mul(1 << 20),
        Err(v) => return Some(format!("HCCL_BUFFSIZE={v:?} is not a whole number of MiB")),
    };
    if need > have {
        return Some(format!(
            "{} tokens per rank need {} MiB of HCCL's window, more than HCCL_BUFFSIZE ({} MiB; raise it on every \
             rank)",
            args.most_tokens,
            need.div_ceil(1 << 20),
            have >> 20
        ));
    }
    None
}

/// The bytes of HCCL's window the dispatch needs (Atlas A3, no quantisation, no shared-expert
/// ranks): the dispatch tiling's `((maxBs · tokenNeedSizeDispatch · epWorldSize · L) + (maxBs ·
/// tokenNeedSizeCombine · K)) · 2`, tokens of `align512(align32(2H) + 44)` and `align512(2H)`
/// bytes (ops-transformer `mc2/moe_distribute_dispatch_v2/op_host/..._tiling.cpp`, which refuses
/// "HCCL_BUFFSIZE is too SMALL" above `HCCL_BUFFSIZE`).
pub(crate) fn window_bytes(most_tokens: usize, size: usize, local: usize, top_k: usize, hidden: usize) -> usize {
    let align = |v: usize, a: usize| v.div_ceil(a) * a;
    let dispatch = align(align(2 * hidden, 32) + 44, 512);
    let combine = align(2 * hidden, 512);
    (most_tokens * dispatch * size * local + most_tokens * combine * top_k) * 2
}

/// `HCCL_BUFFSIZE` in MiB (HCCL's default: 200 when unset), or the value that is not a number.
fn hccl_buffsize_mb() -> std::result::Result<usize, String> {
    match std::env::var("HCCL_BUFFSIZE") {
        Err(_) => Ok(200),
        Ok(v) => v.trim().parse().map_err(|_| v),
    }
}

/// `aclnnMoeDistributeDispatchV2` for this rank's part (`why_not` said it applies).
pub(crate) fn dispatch(
    be: &AscendBackend,
    group: &CStr,
    rank: usize,
    size: usize,
    args: &DispatchArgs<'_, AscendBackend>,
) -> Result<Dispatched<AscendBackend>> {
    let (bs, hidden, top_k) = check_args(args, size)?;
    let experts = args.held.last().map_or(0, |h| h.end);
    let local = args.held[rank].len();
    // An empty slice dispatches one zero token with zero weights to this rank's own experts.
    let (x, ids, scales, n) = if bs == 0 {
        // Distinct experts, as a router's: the first from this rank's own (why_not: top-k ≤ experts).
        let ids: Vec<i32> = (0..top_k).map(|j| ((args.held[rank].start + j) % experts) as i32).collect();
        (be.full(&[1, hidden], 0.0)?, ids, be.full(&[1, top_k], 0.0)?, 1)
    } else {
        (args.x.clone(), args.ids.to_vec(), args.weights.clone(), bs)
    };
    let xb = be.cast_to(&x, Dt::ACL_BF16)?;
    let own = ids.iter().filter(|&&id| args.held[rank].contains(&(id as usize))).count();
    let ids = be.upload_index(&ids, &[n, top_k])?;
    let global_bs = args.most_tokens * size;
    let a = global_bs * local.min(top_k);
    let expand = be.alloc(a * hidden, Dt::ACL_BF16)?;
    let assist = Arc::new(be.alloc(a * 128, Dt::ACL_INT32)?);
    let token_nums = be.alloc(local, Dt::ACL_INT64)?;
    let counts = Arc::new(be.alloc(size * local, Dt::ACL_INT32)?);
    // Without a TP domain, as vllm-ascend calls these kernels on A3: tpWorldSize 1, groupTp the
    // EP group's name, and a one-entry tpRecvCounts that the combine takes back as tpSendCounts
    // (the op-api wrapper refuses a NULL one, and A3's combine tiling wants [tpWorldSize]).
    let tp_counts = Arc::new(be.alloc(1, Dt::ACL_INT32)?);
    {
        let xv = be.cview(Mem::bf16(&xb), &[n, hidden])?;
        let iv = be.iv(&ids)?;
        let ev = be.cview(Mem::bf16(&expand), &[a, hidden])?;
        let av = be.cview(Mem { buf: &assist, offset: 0, dtype: Dt::ACL_INT32 }, &[a * 128])?;
        let tv = be.cview(Mem { buf: &token_nums, offset: 0, dtype: Dt::ACL_INT64 }, &[local])?;
        let cv = be.cview(Mem { buf: &counts, offset: 0, dtype: Dt::ACL_INT32 }, &[size * local])?;
        let pv = be.cview(Mem { buf: &tp_counts, offset: 0, dtype: Dt::ACL_INT32 }, &[1])?;
        aclnn!(
            be,
            aclnnMoeDistributeDispatchV2
                / aclnnMoeDistributeDispatchV2GetWorkspaceSize(
                    xv.ptr(),
                    iv.ptr(),
                    null(), // scalesOptional: no quantisation
                    null(), // xActiveMaskOptional: every token
                    null(), // expertScalesOptional: NULL on A3
                    group.as_ptr(),
                    size as i64,
                    rank as i64,
                    experts as i64,
                    group.as_ptr(), // groupTp: unused without a TP domain
                    1,              // tpWorldSize
                    0,              // tpRankId
                    0,              // expertShardType
                    0,              // sharedExpertNum
                    0,              // sharedExpertRankNum
                    0,              // quantMode
                    global_bs as i64,
                    1, // expertTokenNumsType: counts
                    c"".as_ptr(),
                    ev.ptr(),
                    null_mut(), // dynamicScalesOut
                    av.ptr(),
                    tv.ptr(),
                    cv.ptr(),
                    pv.ptr(),   // tpRecvCountsOut
                    null_mut()  // expandScalesOut
                )
        )?;
    }
    let mut bytes = vec![0u8; local * 8];
    be.dev.download_bytes(token_nums.ptr, &mut bytes)?;
    let mut local_ids = Vec::new();
    for (e, c) in bytes.chunks_exact(8).enumerate() {
        let c = i64::from_le_bytes(c.try_into().unwrap_or_default());
        if c < 0 || local_ids.len() as i64 + c > a as i64 {
            return Err(Error::backend(
                be.name(),
                format!("aclnnMoeDistributeDispatchV2: expert {e} received {c} rows, outside 0..={a}"),
            ));
        }
        local_ids.extend(std::iter::repeat_n(e as i32, c as usize));
    }
    let r = local_ids.len();
    let rows = be.new_tensor(&[r, hidden])?;
    if r > 0 {
        be.cast_into(be.cview(Mem::bf16(&expand), &[r, hidden])?, be.tv(&rows)?, Dt::ACL_FLOAT)?;
    }
    let route = Mc2Route { ids, scales, assist, counts, tp_counts, a, local, own, global_bs, experts, dispatched: n };
    Ok(Dispatched {
        rows: AscendTensor { bf16: true, ..rows },
        experts: local_ids,
        weights: None,
        tokens: bs,
        route: Route::Device(Box::new(route)),
    })
}

/// The rows of an MC2 dispatch that came from other ranks (0 for another dispatch).
pub(crate) fn remote_rows(d: &Dispatched<AscendBackend>) -> usize {
    match &d.route {
        Route::Device(r) => r.downcast_ref::<Mc2Route>().map_or(0, |r| d.experts.len().saturating_sub(r.own)),
        Route::Composed { .. } => 0,
    }
}

/// `aclnnMoeDistributeCombineV2` of `outputs` (the unweighted expert outputs of `d.rows`).
pub(crate) fn combine(
    be: &AscendBackend,
    group: &CStr,
    rank: usize,
    size: usize,
    outputs: &AscendTensor,
    d: &Dispatched<AscendBackend>,
) -> Result<AscendTensor> {
    let Route::Device(route) = &d.route else {
        return Err(Error::Input(
            "moe_combine: the dispatch was composed, not made by aclnnMoeDistributeDispatchV2".into(),
        ));
    };
    let Some(route) = route.downcast_ref::<Mc2Route>() else {
        return Err(Error::Input("moe_combine: the dispatch was made by another kernel".into()));
    };
    let (r, hidden) = (d.experts.len(), d.rows.shape()[1]);
    if outputs.shape() != [r, hidden] {
        return Err(Error::Input(format!(
            "moe_combine: outputs {:?} do not match the {r} dispatched rows of width {hidden}",
            outputs.shape()
        )));
    }
    let (a, n, local) = (route.a, route.dispatched, route.local);
    let expand = be.alloc(a * hidden, Dt::ACL_BF16)?;
    if r > 0 {
        be.cast_into(be.tv(outputs)?, be.cview(Mem::bf16(&expand), &[r, hidden])?, Dt::ACL_BF16)?;
    }
    let out = be.alloc(n * hidden, Dt::ACL_BF16)?;
    {
        let ev = be.cview(Mem::bf16(&expand), &[a, hidden])?;
        let iv = be.iv(&route.ids)?;
        let av = be.cview(Mem { buf: &route.assist, offset: 0, dtype: Dt::ACL_INT32 }, &[a * 128])?;
        let cv = be.cview(Mem { buf: &route.counts, offset: 0, dtype: Dt::ACL_INT32 }, &[size * local])?;
        let sv = be.tv(&route.scales)?;
        let pv = be.cview(Mem { buf: &route.tp_counts, offset: 0, dtype: Dt::ACL_INT32 }, &[1])?;
        let ov = be.cview(Mem::bf16(&out), &[n, hidden])?;
        aclnn!(
            be,
            aclnnMoeDistributeCombineV2
                / aclnnMoeDistributeCombineV2GetWorkspaceSize(
                    ev.ptr(),
                    iv.ptr(),
                    av.ptr(),
                    cv.ptr(),
                    sv.ptr(),
                    pv.ptr(), // tpSendCountsOptional: the dispatch's tpRecvCounts
                    null(),   // xActiveMaskOptional
                    null(),   // activationScaleOptional
                    null(),   // weightScaleOptional
                    null(),   // groupListOptional
                    null(),   // expandScalesOptional: NULL on A3
                    null(),   // sharedExpertXOptional: the shared expert is added by the MoE
                    group.as_ptr(),
                    size as i64,
                    rank as i64,
                    route.experts as i64,
                    group.as_ptr(), // groupTp, as at the dispatch
                    1,              // tpWorldSize
                    0,              // tpRankId
                    0,              // expertShardType
                    0,              // sharedExpertNum
                    0,              // sharedExpertRankNum
                    route.global_bs as i64,
                    0, // outDtype: as expandX
                    0, // commQuantMode
                    0, // groupListType
                    c"".as_ptr(),
                    ov.ptr()
                )
        )?;
    }
    let summed = be.new_tensor(&[d.tokens, hidden])?;
    if d.tokens > 0 {
        be.cast_into(be.cview(Mem::bf16(&out), &[d.tokens, hidden])?, be.tv(&summed)?, Dt::ACL_FLOAT)?;
    }
    Ok(AscendTensor { bf16: true, ..summed })
}

/// The first-use self-test's synthetic call on rank `rank` of `size`: 2 tokens of `hidden`
/// BF16 values, each routed to `top_k` consecutive experts of `experts` starting at an offset
/// that differs per rank and token, with weights (k + 1)/8. Returns (x, ids, weights) on the
/// host.
pub(crate) fn self_test_tokens(
    rank: usize,
    hidden: usize,
    top_k: usize,
    experts: usize,
) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let x = (0..2 * hidden).map(|i| (((rank * 7 + i * 3) % 17) as f32 - 8.0) / 8.0).collect();
    let ids = (0..2).flat_map(|b| (0..top_k).map(move |k| ((rank * 3 + b * 5 + k) % experts) as i32)).collect();
    let weights = (0..2 * top_k).map(|i| ((i % top_k) + 1) as f32 / 8.0).collect();
    (x, ids, weights)
}

/// What the self-test's combine must give for one rank's tokens, each expert scaling its rows
/// by its id + 1: `x[b] · Σ_k w[b,k]·(id[b,k] + 1)`.
pub(crate) fn self_test_expected(x: &[f32], ids: &[i32], weights: &[f32], hidden: usize, top_k: usize) -> Vec<f64> {
    (0..x.len() / hidden)
        .flat_map(|b| {
            let f: f64 = (0..top_k).map(|k| weights[b * top_k + k] as f64 * (ids[b * top_k + k] + 1) as f64).sum();
            x[b * hidden..(b + 1) * hidden].iter().map(move |&v| v as f64 * f)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_bound_follows_the_dispatch_tiling() {
        // Hidden 4096, 16 experts a rank on EP 16, top-6: 8704-byte dispatch tokens (4096·2
        // rounded to 32, plus 44, rounded to 512) and 8192-byte combine tokens, doubled.
        let per_token = (8704 * 16 * 16 + 8192 * 6) * 2;
        assert_eq!(window_bytes(1, 16, 16, 6, 4096), per_token);
        let default = 200usize << 20;
        assert!(window_bytes(46, 16, 16, 6, 4096) <= default && window_bytes(47, 16, 16, 6, 4096) > default);
        // The test model's (hidden 1024, 2 experts a rank on EP 2, top-2) fits with room.
        assert!(window_bytes(512, 2, 2, 2, 1024) < default);
    }

    #[test]
    fn the_self_test_tokens_are_bf16_values_with_distinct_experts() {
        let (x, ids, w) = self_test_tokens(3, 1024, 6, 16);
        assert!(x.iter().all(|&v| (v * 8.0).fract() == 0.0 && v.abs() <= 1.0));
        for b in 0..2 {
            let mut t: Vec<i32> = ids[b * 6..(b + 1) * 6].to_vec();
            t.sort();
            t.dedup();
            assert_eq!(t.len(), 6);
        }
        assert_eq!(w[..6], [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]);
        let e = self_test_expected(&x, &ids, &w, 1024, 6);
        assert_eq!(e.len(), 2048);
    }
}
