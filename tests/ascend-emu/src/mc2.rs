//! MC2 expert-parallel operators: `aclnnMoeDistributeDispatchV2` and
//! `aclnnMoeDistributeCombineV2`, from the ops-transformer docs
//! `mc2/moe_distribute_dispatch_v2/docs/aclnnMoeDistributeDispatchV2.md` and
//! `mc2/moe_distribute_combine_v2/docs/aclnnMoeDistributeCombineV2.md` as read in
//! `xwqtju/ops-transformer` at commit 2b0ebbfdc19ddd0dea1ea403050f29571a7a7cbf (both docs last
//! changed by 2b7873015c6eb909f1a70e364be641717f8a0fd9, 2025-10-23). Where the docs leave the
//! values of an output to the implementation ("assistInfoForCombineOut, epRecvCounts,
//! tpRecvCounts, expandScales ... 元素值可能不同 ... 模型其他业务逻辑不应对其存在依赖"), the
//! emulator follows the A3 kernel of that commit (`op_kernel/moe_distribute_dispatch_v2.h`,
//! `op_kernel/moe_distribute_combine_v2.h`) and the infershape (`op_host/
//! moe_distribute_dispatch_v2_infershape.cpp`).
//!
//! Model. The EP group is named by `groupEp`, the `HcclGetCommName` string of a communicator
//! (`hccl.rs`); the calling thread's device must hold a live rank of it, whose size and rank
//! must be `epWorldSize` / `epRankId`. A launch is one step of that communicator's rendezvous
//! sequence, exactly like an HCCL collective: the stream is run up to the launch, the inputs are
//! read, all ranks meet (a rank launching dispatch while another calls an all-reduce or combine
//! at the same step fails every rank and poisons the communicator, as do disagreeing
//! attributes), the outputs are computed and queued on the stream as writes. Rank r holds the
//! experts `r·L .. (r+1)·L`, L = localExpertNum = moeExpertNum / epWorldSize.
//!
//! Dispatch outputs, for the receiving rank r:
//! * expandXOut `[A, H]`: the received token rows grouped by local expert (0..L), within an
//!   expert by source rank (0..epWorldSize), within a source rank by token index b, then k
//!   (every (b, k) with `expertIds[b][k] = r·L + expert`). Rows past the received total are
//!   left untouched.
//! * expertTokenNumsOut INT64 `[L]`: per local expert the rows received (expertTokenNumsType 1)
//!   or their inclusive prefix sum (0).
//! * epRecvCountsOut INT32: element `e·epWorldSize + s` (local expert e, source rank s) is the
//!   inclusive prefix sum of the row counts over that order, i.e. the end row of the (e, s)
//!   block in expandXOut (the A3 kernel's layout); the last of the epWorldSize·L is the total.
//!   On A2 the tensor is longer (moeExpertNum + 2·globalBs·K·serverNum); its tail is untouched.
//! * assistInfoForCombineOut INT32 `[A·128]`: for row i, elements `3i, 3i+1, 3i+2` = (source
//!   rank, token index b, k) (the kernel's 3 ints per row); the rest is untouched.
//! * expandScalesOut (A2 with expertScalesOptional): FLOAT `[A]`, row i's expertScales[b][k]
//!   from its source rank; otherwise untouched.
//! * dynamicScalesOut (quantMode 2 only) and tpRecvCountsOut (TP only) are untouched.
//!
//! Combine, for the token owner s: `xOut[b] = Σ_k expertScales[b][k]·expandX_r[i]` over k in
//! order, where rank r = expertIds[b][k] / L and row i of its expandX is the one whose
//! assistInfo says (s, b, k), plus sharedExpertXOptional[b] (unscaled), in f32 (each product
//! rounded to f32, then added), rounded once to xOut's dtype (the A3 kernel's LocalWindowCopy).
//! Combine reads only the first epSendCounts[epWorldSize·L − 1] rows and checks what it reads:
//! the counts non-decreasing and within A, each row's (s, b, k) in range, of the block's source
//! rank, routed by expertIds to the block's expert, and every routed (b, k) returned exactly once.
//!
//! SoCs and the documented limits enforced (GetWorkspaceSize; NULL required tensor: 161001,
//! dtype: 161002, shape / value / not emulated / communicator: 561002; another SoC: 161002):
//! * Atlas A3 (`Ascend910_93*`): H in [1024, 8192]; 0 < Bs ≤ 512; epWorldSize in [2, 768];
//!   moeExpertNum in (0, 1024]; tpWorldSize in [0, 2] (2: TP, not emulated), tpRankId 0;
//!   expertShardType 0; sharedExpertNum in [0, 4], sharedExpertRankNum in [0, epWorldSize)
//!   (with 0 shared-expert ranks sharedExpertNum must be 0 or 1): only 0 / 0 is emulated;
//!   commAlg NULL (or ""); expertScalesOptional NULL; combine's sharedExpertXOptional `[Bs, H]`
//!   or 3-D with the first two dims' product Bs; expandScalesOptional NULL; epRecvCounts
//!   `[epWorldSize·L]`.
//! * Atlas A2 (`Ascend910B*`): commAlg NULL / "" (then HCCL_INTRA_PCIE_ENABLE=1 with
//!   HCCL_INTRA_ROCE_ENABLE=0 selects "hierarchy", else "fullmesh"), "fullmesh" or
//!   "hierarchy"; fullmesh: epWorldSize in {16, 32, 64, 128, 256}, H in (0, 7168] and a multiple
//!   of 32, L ≤ 24; hierarchy: epWorldSize in {16, 32, 64}, H in (0, 10240] and a multiple of 32;
//!   0 < Bs ≤ 256; moeExpertNum in (0, 512]; groupTp empty, tpWorldSize / tpRankId /
//!   expertShardType / sharedExpertNum / sharedExpertRankNum 0; expertScalesOptional FLOAT
//!   `[Bs, K]` or NULL; epRecvCounts `[moeExpertNum + 2·globalBs'·K·serverNum]` with
//!   globalBs' = globalBs or Bs·epWorldSize when 0, serverNum = epWorldSize / 8 (the
//!   infershape's RANK_NUM_PER_NODE); combine's sharedExpertXOptional NULL.
//! * Both: x / expandX FLOAT16 or BFLOAT16, expandXOut / xOut / sharedExpertX of that dtype;
//!   expertIds INT32 `[Bs, K]` with 0 < K ≤ 16 and K ≤ moeExpertNum; expertScales FLOAT32
//!   `[Bs, K]`; moeExpertNum % epWorldSize = 0; groupEp of length [1, 128) (groupTp may name
//!   the same group without a TP domain, as vllm-ascend passes it on A3 with tpWorldSize 1);
//!   tpRecvCountsOut required, INT32 1-D of at least max(tpWorldSize, 1) entries (the op-api
//!   wrapper's null check, stricter than the doc); on A3 combine's tpSendCountsOptional
//!   required, INT32 `[max(tpWorldSize, 1)]` (A3's tiling check; on A2 it must be NULL);
//!   A (expandX rows) ≥ globalBs'·min(L, K); assistInfo INT32 `[A·128]`; expertTokenNums
//!   INT64 `[L]`; globalBs 0 (every rank the same Bs, checked at the launch) or maxBs·epWorldSize
//!   (≥ Bs·epWorldSize, a multiple of epWorldSize; at the launch: exactly the largest Bs times
//!   epWorldSize); expertIds values in [0, moeExpertNum) (at the launch).
//! * Not emulated (refused, naming the parameter): quantMode 2 (and scalesOptional), any
//!   xActiveMaskOptional, a TP domain (tpWorldSize 2), shared-expert ranks or sharedExpertNum 1,
//!   commQuantMode 2. Reserved arguments (activationScale, weightScale, groupList, outDtype,
//!   groupListType) must be NULL / 0, as documented. Ascend 950 and
//!   other SoCs are refused (the product table lists A2 and A3 only; an earlier revision of the
//!   same docs marks 昇腾910_95 ×). HCCL_BUFFSIZE is not modelled.
//!
//! A failure at the launch (communicator, rendezvous, the data checks above) returns
//! ACLNN_ERR_RUNTIME_ERROR (361001) on every rank, with the HCCL code in the message.

use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

use dsv4_ascend_sys::{
    aclDataType, aclOpExecutor, aclTensor, aclnnStatus, aclrtStream, ACLNN_ERR_INNER_TILING_ERROR,
    ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, ACLNN_ERR_RUNTIME_ERROR, ACLNN_SUCCESS,
};

use crate::fused::family;
use crate::hccl::{comm_named, mc2_step, Mc2Job, Mc2Plan, Writes};
use crate::mem::{decode, dtype_name, elem_size, encode, Desc};
use crate::ops::{plan, ws_for};
use crate::{executor_job, fail, get_workspace_coded, launch, soc_name, Emu, Plan};

const DISPATCH: &str = "aclnnMoeDistributeDispatchV2";
const COMBINE: &str = "aclnnMoeDistributeCombineV2";
const DOC_D: &str = "aclnnMoeDistributeDispatchV2.md";
const DOC_C: &str = "aclnnMoeDistributeCombineV2.md";
/// assistInfoForCombine elements per row of A (the doc's `A * 128`).
const ASSIST_PER_A: usize = 128;
/// Elements of assistInfo the emulator uses per received row (the kernel's EXPAND_IDX_INFO).
const ASSIST_USED: usize = 3;

type Refusal = (aclnnStatus, String);
type Rf<T> = Result<T, Refusal>;

fn tiling(m: String) -> Refusal {
    (ACLNN_ERR_INNER_TILING_ERROR, m)
}

fn invalid(m: String) -> Refusal {
    (ACLNN_ERR_PARAM_INVALID, m)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Soc {
    A2,
    A3,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alg {
    /// A3 (no commAlg).
    None,
    Fullmesh,
    Hierarchy,
}

fn soc(doc: &str) -> Rf<Soc> {
    match family() {
        "A2" => Ok(Soc::A2),
        "A3" => Ok(Soc::A3),
        _ => Err(invalid(format!(
            "not supported on {}: {doc} supports Atlas A2 and Atlas A3 only (Ascend 950 / 910_95: ×)",
            soc_name()
        ))),
    }
}

/// A C string argument: None for NULL.
unsafe fn c_str(p: *const c_char) -> Option<String> {
    // SAFETY: the caller passes NULL or a NUL-terminated string.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The attributes both operators share, checked.
struct Common {
    soc: Soc,
    alg: Alg,
    group: String,
    ep: usize,
    rank: usize,
    moe: usize,
    local: usize,
    global_bs: usize,
    tp: i64,
    shared: i64,
}

struct Attrs {
    group_ep: Option<String>,
    ep: i64,
    rank: i64,
    moe: i64,
    group_tp: Option<String>,
    tp: i64,
    tp_rank: i64,
    shard: i64,
    shared: i64,
    shared_ranks: i64,
    global_bs: i64,
    comm_alg: Option<String>,
}

fn common(a: &Attrs, doc: &str) -> Rf<Common> {
    let soc = soc(doc)?;
    let s = soc_name();
    let Some(group) = a.group_ep.clone() else {
        return Err((ACLNN_ERR_PARAM_NULLPTR, format!("groupEp is NULL ({doc})")));
    };
    if group.is_empty() || group.len() >= 128 {
        return Err(tiling(format!("groupEp {group:?} has length {}; it must be in [1, 128) ({doc})", group.len())));
    }
    let tp_name = a.group_tp.clone().unwrap_or_default();
    let alg = match soc {
        Soc::A2 => {
            if !tp_name.is_empty() {
                return Err(tiling(format!(
                    "groupTp {tp_name:?}: the TP domain is not supported on {s} (Atlas A2: 传空字符即可, {doc})"
                )));
            }
            match a.comm_alg.as_deref().unwrap_or("") {
                "" => {
                    let on = |v: &str| std::env::var(v).map(|x| x.trim() == "1").unwrap_or(false);
                    let off = |v: &str| std::env::var(v).map(|x| x.trim() == "0").unwrap_or(true);
                    if on("HCCL_INTRA_PCIE_ENABLE") && off("HCCL_INTRA_ROCE_ENABLE") {
                        Alg::Hierarchy
                    } else {
                        Alg::Fullmesh
                    }
                }
                "fullmesh" => Alg::Fullmesh,
                "hierarchy" => Alg::Hierarchy,
                other => {
                    return Err(tiling(format!(
                        "commAlg {other:?}: Atlas A2 takes NULL, \"\", \"fullmesh\" or \"hierarchy\" ({doc})"
                    )))
                }
            }
        }
        Soc::A3 => {
            // Without a TP domain (tpWorldSize 0 or 1) groupTp is not used, and vllm-ascend passes
            // the EP group's name there with tpWorldSize 1 on A3; with one it must be another group.
            if tp_name.len() >= 128 || (a.tp > 1 && tp_name == group) {
                return Err(tiling(format!(
                    "groupTp {tp_name:?}: its length must be in [1, 128) and it must differ from groupEp ({doc})"
                )));
            }
            if let Some(c) = a.comm_alg.as_deref().filter(|c| !c.is_empty()) {
                return Err(tiling(format!("commAlg {c:?}: not supported on {s} (Atlas A3: 传空指针即可, {doc})")));
            }
            Alg::None
        }
    };
    // TP domain.
    match soc {
        Soc::A2 if a.tp != 0 || a.tp_rank != 0 => {
            return Err(tiling(format!(
                "tpWorldSize {} / tpRankId {}: the TP domain is not supported on {s} (Atlas A2: 传0, {doc})",
                a.tp, a.tp_rank
            )))
        }
        Soc::A3 if !(0..=2).contains(&a.tp) => {
            return Err(tiling(format!("tpWorldSize {} is outside [0, 2] ({doc})", a.tp)))
        }
        Soc::A3 if a.tp == 2 => {
            return Err(tiling(format!("tpWorldSize 2 (a TP domain, groupTp {tp_name:?}) is not emulated ({doc})")))
        }
        Soc::A3 if a.tp_rank != 0 => {
            return Err(tiling(format!(
                "tpRankId {}: without a TP domain (tpWorldSize {}) it must be 0 (无TP域通信时传0, {doc})",
                a.tp_rank, a.tp
            )))
        }
        _ => {}
    }
    if a.shard != 0 {
        return Err(tiling(format!("expertShardType {}: only 0 is supported ({doc})", a.shard)));
    }
    match soc {
        Soc::A2 if a.shared != 0 || a.shared_ranks != 0 => {
            return Err(tiling(format!(
                "sharedExpertNum {} / sharedExpertRankNum {}: shared experts are not supported on {s} (Atlas A2: \
                 传0, {doc})",
                a.shared, a.shared_ranks
            )))
        }
        Soc::A3 => {
            if !(0..=4).contains(&a.shared) {
                return Err(tiling(format!("sharedExpertNum {} is outside [0, 4] ({doc})", a.shared)));
            }
            if a.shared_ranks < 0 || a.shared_ranks >= a.ep.max(1) {
                return Err(tiling(format!(
                    "sharedExpertRankNum {} is outside [0, epWorldSize = {}) ({doc})",
                    a.shared_ranks, a.ep
                )));
            }
            if a.shared_ranks == 0 && a.shared > 1 {
                return Err(tiling(format!(
                    "sharedExpertNum {} with sharedExpertRankNum 0: it must be 0 or 1 ({doc})",
                    a.shared
                )));
            }
            if a.shared_ranks > 0 && (a.shared == 0 || a.shared_ranks % a.shared != 0) {
                return Err(tiling(format!(
                    "sharedExpertRankNum {} must be a multiple of sharedExpertNum {} ({doc})",
                    a.shared_ranks, a.shared
                )));
            }
            if a.shared_ranks > 0 {
                return Err(tiling(format!(
                    "sharedExpertRankNum {} (shared-expert ranks) is not emulated ({doc})",
                    a.shared_ranks
                )));
            }
            if a.shared == 1 {
                return Err(tiling(format!(
                    "sharedExpertNum 1 with sharedExpertRankNum 0 is not emulated (pass 0; on A3 combine adds \
                     sharedExpertXOptional) ({doc})"
                )));
            }
        }
        _ => {}
    }
    // EP domain.
    let ep_ok = match alg {
        Alg::None => (2..=768).contains(&a.ep),
        Alg::Fullmesh => [16, 32, 64, 128, 256].contains(&a.ep),
        Alg::Hierarchy => [16, 32, 64].contains(&a.ep),
    };
    if !ep_ok {
        return Err(tiling(match alg {
            Alg::None => format!("epWorldSize {} is outside [2, 768] (Atlas A3, {doc})", a.ep),
            Alg::Fullmesh => format!("epWorldSize {}: commAlg \"fullmesh\" takes 16, 32, 64, 128, 256 ({doc})", a.ep),
            Alg::Hierarchy => format!("epWorldSize {}: commAlg \"hierarchy\" takes 16, 32, 64 ({doc})", a.ep),
        }));
    }
    if a.rank < 0 || a.rank >= a.ep {
        return Err(tiling(format!("epRankId {} is outside [0, epWorldSize = {}) ({doc})", a.rank, a.ep)));
    }
    let moe_max = if soc == Soc::A2 { 512 } else { 1024 };
    if a.moe <= 0 || a.moe > moe_max {
        return Err(tiling(format!("moeExpertNum {} is outside (0, {moe_max}] on {s} ({doc})", a.moe)));
    }
    if a.moe % a.ep != 0 {
        return Err(tiling(format!(
            "moeExpertNum {} is not a multiple of epWorldSize - sharedExpertRankNum = {} ({doc})",
            a.moe, a.ep
        )));
    }
    let local = (a.moe / a.ep) as usize;
    if alg == Alg::Fullmesh && local > 24 {
        return Err(tiling(format!("moeExpertNum / epWorldSize = {local} > 24 (Atlas A2 fullmesh, {doc})")));
    }
    if a.global_bs < 0 {
        return Err(tiling(format!("globalBs {} is negative ({doc})", a.global_bs)));
    }
    // Bs is at most 512 on either SoC, so a larger globalBs cannot be maxBs * epWorldSize (and
    // would overflow the row counts computed from it).
    if a.global_bs > 512 * a.ep {
        return Err(tiling(format!("globalBs {} is more than 512 * epWorldSize ({doc})", a.global_bs)));
    }
    if a.global_bs % a.ep != 0 {
        return Err(tiling(format!(
            "globalBs {} is not 0 nor maxBs * epWorldSize (not a multiple of {}) ({doc})",
            a.global_bs, a.ep
        )));
    }
    // The communicator.
    let (_, rank, n) = comm_named(&group, doc, false).map_err(tiling)?;
    if n as i64 != a.ep {
        return Err(tiling(format!(
            "epWorldSize {} does not match the size {n} of communicator {group:?} (groupEp, {doc})",
            a.ep
        )));
    }
    if rank as i64 != a.rank {
        return Err(tiling(format!(
            "epRankId {} is not this rank's id {rank} in communicator {group:?} (groupEp, {doc})",
            a.rank
        )));
    }
    Ok(Common {
        soc,
        alg,
        group,
        ep: a.ep as usize,
        rank: a.rank as usize,
        moe: a.moe as usize,
        local,
        global_bs: a.global_bs as usize,
        tp: a.tp,
        shared: a.shared,
    })
}

impl Common {
    /// What every rank must pass alike (the docs' 约束 3, plus the data layout).
    fn attrs(&self, h: usize, k: usize, dtype: aclDataType) -> Vec<(&'static str, i64)> {
        vec![
            ("epWorldSize", self.ep as i64),
            ("moeExpertNum", self.moe as i64),
            ("globalBs", self.global_bs as i64),
            ("tpWorldSize", self.tp),
            ("sharedExpertNum", self.shared),
            ("commAlg", self.alg as i64),
            ("H", h as i64),
            ("K", k as i64),
            ("data type", dtype.0 as i64),
        ]
    }

    fn check_bs_h(&self, bs: usize, h: usize, doc: &str) -> Rf<()> {
        let s = soc_name();
        let bs_max = if self.soc == Soc::A2 { 256 } else { 512 };
        if bs == 0 || bs > bs_max {
            return Err(tiling(format!("Bs = {bs} is outside (0, {bs_max}] on {s} ({doc})")));
        }
        let h_ok = match self.alg {
            Alg::None => (1024..=8192).contains(&h),
            Alg::Fullmesh => h > 0 && h <= 7168 && h.is_multiple_of(32),
            Alg::Hierarchy => h > 0 && h <= 10240 && h.is_multiple_of(32),
        };
        if !h_ok {
            return Err(tiling(match self.alg {
                Alg::None => format!("H = {h} is outside [1024, 8192] (Atlas A3, {doc})"),
                Alg::Fullmesh => format!("H = {h}: fullmesh takes (0, 7168] and a multiple of 32 ({doc})"),
                Alg::Hierarchy => format!("H = {h}: hierarchy takes (0, 10240] and a multiple of 32 ({doc})"),
            }));
        }
        if self.global_bs != 0 && self.global_bs < bs * self.ep {
            return Err(tiling(format!(
                "globalBs {} < Bs * epWorldSize = {} (it is 0 or maxBs * epWorldSize, {doc})",
                self.global_bs,
                bs * self.ep
            )));
        }
        Ok(())
    }

    fn global_real(&self, bs: usize) -> usize {
        if self.global_bs == 0 {
            bs * self.ep
        } else {
            self.global_bs
        }
    }

    /// The length of epRecvCounts / epSendCounts.
    fn counts_len(&self, bs: usize, k: usize) -> usize {
        match self.soc {
            Soc::A3 => self.ep * self.local,
            Soc::A2 => self.moe + 2 * self.global_real(bs) * k * (self.ep / 8),
        }
    }

    fn counts_what(&self) -> &'static str {
        match self.soc {
            Soc::A3 => "epWorldSize * localExpertNum",
            Soc::A2 => "moeExpertNum + 2 * globalBs * K * serverNum (serverNum = epWorldSize / 8)",
        }
    }
}

fn need(e: &Emu, p: *const aclTensor, name: &str) -> Rf<Desc> {
    if p.is_null() {
        return Err((ACLNN_ERR_PARAM_NULLPTR, format!("{name} is NULL; it is a required argument")));
    }
    e.tensor(p, name).map_err(invalid)
}

fn opt(e: &Emu, p: *const aclTensor, name: &str) -> Rf<Option<Desc>> {
    if p.is_null() {
        Ok(None)
    } else {
        e.tensor(p, name).map(Some).map_err(invalid)
    }
}

fn dtype_is(d: &Desc, want: &[aclDataType], name: &str, doc: &str) -> Rf<()> {
    if !want.contains(&d.dtype) {
        let names: Vec<String> = want.iter().map(|&t| dtype_name(t)).collect();
        return Err(invalid(format!("{name} must be {}, got {} ({doc})", names.join(" or "), dtype_name(d.dtype))));
    }
    Ok(())
}

fn shape_is(d: &Desc, want: &[usize], name: &str, what: &str, doc: &str) -> Rf<()> {
    if d.dims != want {
        return Err(tiling(format!("{name} has shape {:?}; it must be [{what}] = {want:?} ({doc})", d.dims)));
    }
    Ok(())
}

fn x_dtypes() -> [aclDataType; 2] {
    [aclDataType::ACL_FLOAT16, aclDataType::ACL_BF16]
}

/// Values of the view `d` (row-major) from its storage bytes.
fn values(d: &Desc, storage: &[u8]) -> Vec<f64> {
    let es = elem_size(d.dtype).expect("byte-sized dtype");
    d.offsets().into_iter().map(|o| decode(d.dtype, &storage[o * es..(o + 1) * es])).collect()
}

/// Writes for the row-major elements `first..first + vals.len()` of the view `d`.
fn put(d: &Desc, first: usize, vals: &[f64], out: &mut Writes) {
    if vals.is_empty() {
        return;
    }
    let es = elem_size(d.dtype).expect("byte-sized dtype");
    if d.is_contiguous() {
        let mut bytes = vec![0u8; vals.len() * es];
        for (i, v) in vals.iter().enumerate() {
            encode(d.dtype, *v, &mut bytes[i * es..(i + 1) * es]);
        }
        out.push((d.data + ((d.offset + first) * es) as u64, bytes));
    } else {
        let offs = d.offsets();
        for (i, v) in vals.iter().enumerate() {
            let mut b = vec![0u8; es];
            encode(d.dtype, *v, &mut b);
            out.push((d.data + (offs[first + i] * es) as u64, b));
        }
    }
}

/// The operand's current address (a reused executor's tensors may have been moved).
fn now(d: &Desc, ops: &[Desc]) -> Desc {
    let mut d = d.clone();
    if let Some(o) = ops.iter().find(|o| o.handle == d.handle) {
        d.data = o.data;
    }
    d
}

fn read(d: &Desc) -> (u64, usize) {
    (d.data, d.storage_bytes())
}

// ------------------------------------------------------------------------------- the jobs

#[derive(Clone)]
struct DispatchJob {
    rank: usize,
    local: usize,
    moe: usize,
    global_bs: usize,
    bs: usize,
    h: usize,
    k: usize,
    a: usize,
    cumulative: bool,
    x: Desc,
    ids: Desc,
    scales: Option<Desc>,
    expand_x: Desc,
    assist: Desc,
    token_nums: Desc,
    recv_counts: Desc,
    expand_scales: Option<Desc>,
}

#[derive(Clone)]
struct CombineJob {
    local: usize,
    moe: usize,
    bs: usize,
    h: usize,
    k: usize,
    a: usize,
    expand_x: Desc,
    ids: Desc,
    assist: Desc,
    send_counts: Desc,
    scales: Desc,
    shared_x: Option<Desc>,
    x_out: Desc,
}

#[derive(Clone)]
enum Job {
    Dispatch(DispatchJob),
    Combine(CombineJob),
}

/// What GetWorkspaceSize leaves for the launch (the executor's `extra`).
struct Planned {
    group: String,
    ep: usize,
    rank: usize,
    attrs: Vec<(&'static str, i64)>,
    job: Job,
}

impl Job {
    fn relocated(&self, ops: &[Desc]) -> Job {
        match self {
            Job::Dispatch(j) => Job::Dispatch(DispatchJob {
                x: now(&j.x, ops),
                ids: now(&j.ids, ops),
                scales: j.scales.as_ref().map(|d| now(d, ops)),
                expand_x: now(&j.expand_x, ops),
                assist: now(&j.assist, ops),
                token_nums: now(&j.token_nums, ops),
                recv_counts: now(&j.recv_counts, ops),
                expand_scales: j.expand_scales.as_ref().map(|d| now(d, ops)),
                ..j.clone()
            }),
            Job::Combine(j) => Job::Combine(CombineJob {
                expand_x: now(&j.expand_x, ops),
                ids: now(&j.ids, ops),
                assist: now(&j.assist, ops),
                send_counts: now(&j.send_counts, ops),
                scales: now(&j.scales, ops),
                shared_x: j.shared_x.as_ref().map(|d| now(d, ops)),
                x_out: now(&j.x_out, ops),
                ..j.clone()
            }),
        }
    }

    /// What the rendezvous reads, in the order `compute` expects.
    fn reads(&self) -> Vec<(u64, usize)> {
        match self {
            Job::Dispatch(j) => {
                let mut r = vec![read(&j.x), read(&j.ids)];
                r.extend(j.scales.as_ref().map(read));
                r
            }
            Job::Combine(j) => {
                let mut r =
                    vec![read(&j.expand_x), read(&j.ids), read(&j.assist), read(&j.send_counts), read(&j.scales)];
                r.extend(j.shared_x.as_ref().map(read));
                r
            }
        }
    }
}

/// Every rank's output writes, once all arrived (called by `hccl.rs`).
pub(crate) fn compute(op: &str, ranks: &[(&Mc2Job, &[Vec<u8>])]) -> Result<Vec<Writes>, String> {
    let jobs: Vec<(&Job, &[Vec<u8>])> =
        ranks.iter().map(|(j, inputs)| (j.0.downcast_ref::<Job>().expect("an mc2 job"), *inputs)).collect();
    if let (Job::Dispatch(_), _) = jobs[0] {
        let d: Vec<(&DispatchJob, &[Vec<u8>])> = jobs
            .iter()
            .map(|(j, i)| match j {
                Job::Dispatch(d) => (d, *i),
                Job::Combine(_) => unreachable!("same operator checked"),
            })
            .collect();
        dispatch(&d).map_err(|m| format!("{op}: {m}"))
    } else {
        let c: Vec<(&CombineJob, &[Vec<u8>])> = jobs
            .iter()
            .map(|(j, i)| match j {
                Job::Combine(c) => (c, *i),
                Job::Dispatch(_) => unreachable!("same operator checked"),
            })
            .collect();
        combine(&c).map_err(|m| format!("{op}: {m}"))
    }
}

/// Checks the expertIds values and the ranks' Bs against globalBs.
fn check_ids(
    ids: &[Vec<f64>],
    k: usize,
    moe: usize,
    bss: &[usize],
    global_bs: Option<usize>,
    doc: &str,
) -> Result<(), String> {
    for (r, v) in ids.iter().enumerate() {
        if let Some(i) = v.iter().position(|&e| !(0.0..moe as f64).contains(&e)) {
            return Err(format!(
                "expertIds[{}][{}] = {} on rank {r} is outside [0, moeExpertNum = {moe}) ({doc})",
                i / k,
                i % k,
                v[i]
            ));
        }
    }
    let Some(global_bs) = global_bs else {
        return Ok(());
    };
    let n = bss.len();
    let max = *bss.iter().max().expect("ranks");
    if global_bs == 0 && bss.iter().any(|&b| b != max) {
        return Err(format!(
            "the ranks' Bs differ ({bss:?}) but globalBs is 0: with different Bs, globalBs must be maxBs * \
             epWorldSize = {} ({doc})",
            max * n
        ));
    }
    if global_bs != 0 && global_bs != max * n {
        return Err(format!(
            "globalBs {global_bs} is not maxBs * epWorldSize = {max} * {n} = {} (the ranks' Bs: {bss:?}) ({doc})",
            max * n
        ));
    }
    Ok(())
}

fn dispatch(jobs: &[(&DispatchJob, &[Vec<u8>])]) -> Result<Vec<Writes>, String> {
    let n = jobs.len();
    let j0 = jobs[0].0;
    let (l, k, h) = (j0.local, j0.k, j0.h);
    let ids: Vec<Vec<f64>> = jobs.iter().map(|(j, i)| values(&j.ids, &i[1])).collect();
    let bss: Vec<usize> = jobs.iter().map(|(j, _)| j.bs).collect();
    check_ids(&ids, k, j0.moe, &bss, Some(j0.global_bs), DOC_D)?;
    let xs: Vec<Vec<f64>> = jobs.iter().map(|(j, i)| values(&j.x, &i[0])).collect();
    let scales: Vec<Option<Vec<f64>>> = jobs.iter().map(|(j, i)| j.scales.as_ref().map(|d| values(d, &i[2]))).collect();
    let mut out = Vec::with_capacity(n);
    for (r, (j, _)) in jobs.iter().enumerate() {
        debug_assert_eq!(j.rank, r);
        // Rows in order: local expert, source rank, token, k.
        let mut rows: Vec<(usize, usize, usize)> = vec![];
        let mut ends = Vec::with_capacity(l * n);
        let mut per_expert = vec![0usize; l];
        for (e, count) in per_expert.iter_mut().enumerate() {
            let global = (r * l + e) as f64;
            for s in 0..n {
                for b in 0..bss[s] {
                    for kk in 0..k {
                        if ids[s][b * k + kk] == global {
                            rows.push((s, b, kk));
                            *count += 1;
                        }
                    }
                }
                ends.push(rows.len() as f64);
            }
        }
        if rows.len() > j.a {
            return Err(format!(
                "rank {r} receives {} rows, more than expandXOut's A = {} rows ({DOC_D}: A is the most a rank may \
                 receive)",
                rows.len(),
                j.a
            ));
        }
        let mut w: Writes = vec![];
        let mut ex = Vec::with_capacity(rows.len() * h);
        let mut assist = Vec::with_capacity(rows.len() * ASSIST_USED);
        for &(s, b, kk) in &rows {
            ex.extend_from_slice(&xs[s][b * h..(b + 1) * h]);
            assist.extend([s as f64, b as f64, kk as f64]);
        }
        put(&j.expand_x, 0, &ex, &mut w);
        put(&j.assist, 0, &assist, &mut w);
        let mut acc = 0usize;
        let nums: Vec<f64> = per_expert
            .iter()
            .map(|&c| {
                acc += c;
                if j.cumulative {
                    acc as f64
                } else {
                    c as f64
                }
            })
            .collect();
        put(&j.token_nums, 0, &nums, &mut w);
        put(&j.recv_counts, 0, &ends, &mut w);
        if let Some(es) = &j.expand_scales {
            let mut sc = Vec::with_capacity(rows.len());
            for &(s, b, kk) in &rows {
                let Some(theirs) = scales[s].as_ref() else {
                    return Err(format!("rank {s} passed no expertScalesOptional while this rank passed them"));
                };
                sc.push(theirs[b * k + kk]);
            }
            put(es, 0, &sc, &mut w);
        }
        out.push(w);
    }
    Ok(out)
}

fn combine(jobs: &[(&CombineJob, &[Vec<u8>])]) -> Result<Vec<Writes>, String> {
    let n = jobs.len();
    let j0 = jobs[0].0;
    let (l, k, h) = (j0.local, j0.k, j0.h);
    let ids: Vec<Vec<f64>> = jobs.iter().map(|(j, i)| values(&j.ids, &i[1])).collect();
    let bss: Vec<usize> = jobs.iter().map(|(j, _)| j.bs).collect();
    // globalBs is checked by dispatch; combine only needs the ids in range.
    check_ids(&ids, k, j0.moe, &bss, None, DOC_C)?;
    // Where each (source rank, token, k) comes back from: (expert rank, row).
    let mut from: Vec<Vec<Option<(usize, usize)>>> = bss.iter().map(|&b| vec![None; b * k]).collect();
    let mut expand: Vec<Vec<f64>> = Vec::with_capacity(n);
    for (r, (j, inp)) in jobs.iter().enumerate() {
        let counts = values(&j.send_counts, &inp[3]);
        let assist = values(&j.assist, &inp[2]);
        let mut prev = 0.0;
        for (idx, &end) in counts.iter().enumerate().take(l * n) {
            if end < prev || end > j.a as f64 || end.fract() != 0.0 {
                return Err(format!(
                    "epSendCounts[{idx}] = {end} on rank {r}: the counts must be non-decreasing prefix sums within \
                     A = {} (pass dispatch's epRecvCountsOut) ({DOC_C})",
                    j.a
                ));
            }
            let (e, s) = (idx / n, idx % n);
            let global = (r * l + e) as f64;
            for i in prev as usize..end as usize {
                let (s2, b, kk) = (assist[i * ASSIST_USED], assist[i * ASSIST_USED + 1], assist[i * ASSIST_USED + 2]);
                let bad = |why: &str| {
                    Err(format!(
                        "rank {r}, expandX row {i} (expert {global}, from rank {s}): assistInfoForCombine says \
                         (rank {s2}, token {b}, k {kk}): {why} (pass dispatch's assistInfoForCombineOut / \
                         epRecvCountsOut, and the expertIds given to dispatch) ({DOC_C})"
                    ))
                };
                if s2 != s as f64 {
                    return bad("another source rank than the block's");
                }
                if !(0.0..bss[s] as f64).contains(&b) || !(0.0..k as f64).contains(&kk) {
                    return bad("out of range");
                }
                let t = b as usize * k + kk as usize;
                if ids[s][t] != global {
                    return bad(&format!("rank {s}'s expertIds sends that pair to expert {}", ids[s][t]));
                }
                if from[s][t].is_some() {
                    return bad("a pair returned twice");
                }
                from[s][t] = Some((r, i));
            }
            prev = end;
        }
        expand.push(values(&j.expand_x, &inp[0]));
    }
    let mut out = Vec::with_capacity(n);
    for (s, (j, inp)) in jobs.iter().enumerate() {
        let scales = values(&j.scales, &inp[4]);
        let shared = j.shared_x.as_ref().map(|d| values(d, &inp[5]));
        let mut x = Vec::with_capacity(j.bs * h);
        for b in 0..j.bs {
            let mut acc = vec![0f32; h];
            for kk in 0..k {
                let Some((r, i)) = from[s][b * k + kk] else {
                    return Err(format!(
                        "rank {s}'s (token {b}, k {kk}) goes to expert {}, but no expandX row of rank {} carries it \
                         (assistInfoForCombine / epSendCounts are not dispatch's outputs for these expertIds) \
                         ({DOC_C})",
                        ids[s][b * k + kk],
                        ids[s][b * k + kk] as usize / l
                    ));
                };
                let w = scales[b * k + kk] as f32;
                let row = &expand[r][i * h..(i + 1) * h];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += w * *v as f32;
                }
            }
            if let Some(sh) = &shared {
                for (a, v) in acc.iter_mut().zip(&sh[b * h..(b + 1) * h]) {
                    *a += *v as f32;
                }
            }
            x.extend(acc.iter().map(|&v| v as f64));
        }
        let mut w = vec![];
        put(&j.x_out, 0, &x, &mut w);
        out.push(w);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------- the C entries

/// The launch: the usual executor / workspace / operand checks (queuing the operator on the
/// stream), then the rendezvous step that computes and queues the outputs.
fn mc2_launch(
    op: &'static str,
    workspace: *mut c_void,
    workspace_size: u64,
    executor: *mut aclOpExecutor,
    stream: aclrtStream,
) -> aclnnStatus {
    let (extra, reads, writes) = match executor_job(executor, op) {
        Ok(v) => v,
        Err(m) => return fail(ACLNN_ERR_PARAM_INVALID, m),
    };
    let Some(p) = extra.and_then(|x| x.downcast::<Planned>().ok()) else {
        return fail(ACLNN_ERR_PARAM_INVALID, format!("{op}: the executor was not planned by {op}GetWorkspaceSize"));
    };
    let st = launch(op, workspace, workspace_size, executor, stream);
    if st != ACLNN_SUCCESS {
        return st;
    }
    let ops: Vec<Desc> = reads.into_iter().chain(writes).collect();
    let job = p.job.relocated(&ops);
    let r = comm_named(&p.group, op, true).map_err(|m| (crate::hccl::HCCL_E_PARA, m)).and_then(|(comm, _, _)| {
        mc2_step(op, comm, stream, |_, rank, n| {
            if n as usize != p.ep || rank as usize != p.rank {
                return Err(format!(
                    "{op}: communicator {:?} has {n} ranks and this is rank {rank}, but epWorldSize is {} and \
                     epRankId {}",
                    p.group, p.ep, p.rank
                ));
            }
            Ok(Mc2Plan { attrs: p.attrs.clone(), reads: job.reads(), job: Mc2Job(Arc::new(job.clone())) })
        })
    });
    match r {
        Ok(()) => ACLNN_SUCCESS,
        Err((code, m)) => fail(ACLNN_ERR_RUNTIME_ERROR, format!("{m} (HCCL result {code})")),
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMoeDistributeDispatchV2GetWorkspaceSize(
    x: *const aclTensor,
    expertIds: *const aclTensor,
    scalesOptional: *const aclTensor,
    xActiveMaskOptional: *const aclTensor,
    expertScalesOptional: *const aclTensor,
    groupEp: *const c_char,
    epWorldSize: i64,
    epRankId: i64,
    moeExpertNum: i64,
    groupTp: *const c_char,
    tpWorldSize: i64,
    tpRankId: i64,
    expertShardType: i64,
    sharedExpertNum: i64,
    sharedExpertRankNum: i64,
    quantMode: i64,
    globalBs: i64,
    expertTokenNumsType: i64,
    commAlg: *const c_char,
    expandXOut: *mut aclTensor,
    dynamicScalesOut: *mut aclTensor,
    assistInfoForCombineOut: *mut aclTensor,
    expertTokenNumsOut: *mut aclTensor,
    epRecvCountsOut: *mut aclTensor,
    tpRecvCountsOut: *mut aclTensor,
    expandScalesOut: *mut aclTensor,
    workspaceSize: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    // SAFETY: NULL or NUL-terminated strings from the caller.
    let attrs = unsafe {
        Attrs {
            group_ep: c_str(groupEp),
            ep: epWorldSize,
            rank: epRankId,
            moe: moeExpertNum,
            group_tp: c_str(groupTp),
            tp: tpWorldSize,
            tp_rank: tpRankId,
            shard: expertShardType,
            shared: sharedExpertNum,
            shared_ranks: sharedExpertRankNum,
            global_bs: globalBs,
            comm_alg: c_str(commAlg),
        }
    };
    // The communicator is looked up before the emulator's lock is taken.
    let c = match common(&attrs, DOC_D) {
        Ok(c) => c,
        Err((code, m)) => return fail(code, format!("{DISPATCH}GetWorkspaceSize: {m}")),
    };
    get_workspace_coded(DISPATCH, workspaceSize, executor, |e: &Emu| {
        let doc = DOC_D;
        let xd = need(e, x, "x")?;
        let idd = need(e, expertIds, "expertIds")?;
        let exd = need(e, expandXOut, "expandXOut")?;
        let asd = need(e, assistInfoForCombineOut, "assistInfoForCombineOut")?;
        let tnd = need(e, expertTokenNumsOut, "expertTokenNumsOut")?;
        let rcd = need(e, epRecvCountsOut, "epRecvCountsOut")?;
        if !xActiveMaskOptional.is_null() {
            return Err(tiling(format!(
                "xActiveMaskOptional is not emulated (pass NULL: every token takes part) ({doc})"
            )));
        }
        match quantMode {
            0 => {}
            2 => return Err(tiling(format!("quantMode 2 (dynamic quantisation) is not emulated ({doc})"))),
            q => return Err(tiling(format!("quantMode {q}: supported 0 (none) and 2 (dynamic) ({doc})"))),
        }
        if !scalesOptional.is_null() {
            return Err(tiling(format!("scalesOptional must be NULL with quantMode 0 (非量化场景传空指针, {doc})")));
        }
        if !matches!(expertTokenNumsType, 0 | 1) {
            return Err(tiling(format!(
                "expertTokenNumsType {expertTokenNumsType}: 0 (prefix sums) or 1 (counts) ({doc})"
            )));
        }
        dtype_is(&xd, &x_dtypes(), "x", doc)?;
        dtype_is(&idd, &[aclDataType::ACL_INT32], "expertIds", doc)?;
        if xd.dims.len() != 2 {
            return Err(tiling(format!("x has shape {:?}; it must be 2-D [Bs, H] ({doc})", xd.dims)));
        }
        let (bs, h) = (xd.dims[0], xd.dims[1]);
        if idd.dims.len() != 2 || idd.dims[0] != bs {
            return Err(tiling(format!("expertIds has shape {:?}; it must be [Bs = {bs}, K] ({doc})", idd.dims)));
        }
        let k = idd.dims[1];
        if k == 0 || k > 16 || k > c.moe {
            return Err(tiling(format!("K = {k}: it must satisfy 0 < K <= 16 and K <= moeExpertNum ({doc})")));
        }
        c.check_bs_h(bs, h, doc)?;
        let scd = opt(e, expertScalesOptional, "expertScalesOptional")?;
        if let Some(sd) = &scd {
            if c.soc == Soc::A3 {
                return Err(tiling(format!(
                    "expertScalesOptional is not supported on {} (Atlas A3: 传空指针即可, {doc})",
                    soc_name()
                )));
            }
            dtype_is(sd, &[aclDataType::ACL_FLOAT], "expertScalesOptional", doc)?;
            shape_is(sd, &[bs, k], "expertScalesOptional", "Bs, K", doc)?;
        }
        // Outputs.
        dtype_is(&exd, &[xd.dtype], "expandXOut (x's dtype with quantMode 0)", doc)?;
        let need_a = c.global_real(bs) * c.local.min(k);
        if exd.dims.len() != 2 || exd.dims[1] != h || exd.dims[0] < need_a {
            return Err(tiling(format!(
                "expandXOut has shape {:?}; it must be [A, H = {h}] with A >= {} * min(localExpertNum, K) = {need_a} \
                 ({doc})",
                exd.dims,
                if c.global_bs == 0 { "Bs * epWorldSize" } else { "globalBs" }
            )));
        }
        let a = exd.dims[0];
        dtype_is(&asd, &[aclDataType::ACL_INT32], "assistInfoForCombineOut", doc)?;
        shape_is(&asd, &[a * ASSIST_PER_A], "assistInfoForCombineOut", "A * 128", doc)?;
        dtype_is(&tnd, &[aclDataType::ACL_INT64], "expertTokenNumsOut", doc)?;
        shape_is(&tnd, &[c.local], "expertTokenNumsOut", "localExpertNum", doc)?;
        dtype_is(&rcd, &[aclDataType::ACL_INT32], "epRecvCountsOut", doc)?;
        shape_is(&rcd, &[c.counts_len(bs, k)], "epRecvCountsOut", c.counts_what(), doc)?;
        if let Some(d) = opt(e, dynamicScalesOut, "dynamicScalesOut")? {
            dtype_is(&d, &[aclDataType::ACL_FLOAT], "dynamicScalesOut", doc)?;
            shape_is(&d, &[a], "dynamicScalesOut", "A", doc)?;
        }
        // Required whatever the TP domain: the op-api wrapper's null check
        // (op_host/op_api/aclnn_moe_distribute_dispatch_v2.cpp, OP_CHECK_NULL(tpRecvCounts)),
        // stricter than the doc's "无TP域通信时传空".
        let Some(d) = opt(e, tpRecvCountsOut, "tpRecvCountsOut")? else {
            return Err((
                ACLNN_ERR_PARAM_NULLPTR,
                format!("tpRecvCountsOut is NULL (the op-api wrapper requires it, INT32 [max(tpWorldSize, 1)]; {doc})"),
            ));
        };
        dtype_is(&d, &[aclDataType::ACL_INT32], "tpRecvCountsOut", doc)?;
        if d.dims.len() != 1 || (d.dims[0] as i64) < c.tp.max(1) {
            return Err(tiling(format!(
                "tpRecvCountsOut has shape {:?}; it must be 1-D with max(tpWorldSize, 1) = {} elements ({doc})",
                d.dims,
                c.tp.max(1)
            )));
        }
        let esd = opt(e, expandScalesOut, "expandScalesOut")?;
        if let Some(d) = &esd {
            dtype_is(d, &[aclDataType::ACL_FLOAT], "expandScalesOut", doc)?;
            if d.dims.len() != 1 {
                return Err(tiling(format!("expandScalesOut has shape {:?}; it must be 1-D ({doc})", d.dims)));
            }
        }
        let expand_scales = if scd.is_some() {
            let Some(d) = esd.clone() else {
                return Err((
                    ACLNN_ERR_PARAM_NULLPTR,
                    format!("expandScalesOut is NULL; with expertScalesOptional it carries the rows' weights ({doc})"),
                ));
            };
            shape_is(&d, &[a], "expandScalesOut", "A", doc)?;
            Some(d)
        } else {
            None
        };
        let mut reads = vec![xd.clone(), idd.clone()];
        reads.extend(scd.clone());
        let mut writes = vec![exd.clone(), asd.clone(), tnd.clone(), rcd.clone()];
        writes.extend(expand_scales.clone());
        let job = Job::Dispatch(DispatchJob {
            rank: c.rank,
            local: c.local,
            moe: c.moe,
            global_bs: c.global_bs,
            bs,
            h,
            k,
            a,
            cumulative: expertTokenNumsType == 0,
            x: xd.clone(),
            ids: idd,
            scales: scd,
            expand_x: exd.clone(),
            assist: asd,
            token_nums: tnd,
            recv_counts: rcd,
            expand_scales,
        });
        let planned = Planned { group: c.group.clone(), ep: c.ep, rank: c.rank, attrs: c.attrs(h, k, xd.dtype), job };
        Ok(mc2_plan(ws_for(&exd), reads, writes, planned))
    })
}

fn mc2_plan(ws: u64, reads: Vec<Desc>, writes: Vec<Desc>, planned: Planned) -> Plan {
    // The outputs are written by the rendezvous (queued writes), not by the kernel slot.
    let mut p = plan(ws, reads, writes, vec![], |_| Ok(()));
    p.extra = Some(Arc::new(planned));
    p
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMoeDistributeDispatchV2(
    workspace: *mut c_void,
    workspaceSize: u64,
    executor: *mut aclOpExecutor,
    stream: aclrtStream,
) -> aclnnStatus {
    mc2_launch(DISPATCH, workspace, workspaceSize, executor, stream)
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMoeDistributeCombineV2GetWorkspaceSize(
    expandX: *const aclTensor,
    expertIds: *const aclTensor,
    assistInfoForCombine: *const aclTensor,
    epSendCounts: *const aclTensor,
    expertScales: *const aclTensor,
    tpSendCountsOptional: *const aclTensor,
    xActiveMaskOptional: *const aclTensor,
    activationScaleOptional: *const aclTensor,
    weightScaleOptional: *const aclTensor,
    groupListOptional: *const aclTensor,
    expandScalesOptional: *const aclTensor,
    sharedExpertXOptional: *const aclTensor,
    groupEp: *const c_char,
    epWorldSize: i64,
    epRankId: i64,
    moeExpertNum: i64,
    groupTp: *const c_char,
    tpWorldSize: i64,
    tpRankId: i64,
    expertShardType: i64,
    sharedExpertNum: i64,
    sharedExpertRankNum: i64,
    globalBs: i64,
    outDtype: i64,
    commQuantMode: i64,
    groupListType: i64,
    commAlg: *const c_char,
    xOut: *mut aclTensor,
    workspaceSize: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    // SAFETY: NULL or NUL-terminated strings from the caller.
    let attrs = unsafe {
        Attrs {
            group_ep: c_str(groupEp),
            ep: epWorldSize,
            rank: epRankId,
            moe: moeExpertNum,
            group_tp: c_str(groupTp),
            tp: tpWorldSize,
            tp_rank: tpRankId,
            shard: expertShardType,
            shared: sharedExpertNum,
            shared_ranks: sharedExpertRankNum,
            global_bs: globalBs,
            comm_alg: c_str(commAlg),
        }
    };
    let c = match common(&attrs, DOC_C) {
        Ok(c) => c,
        Err((code, m)) => return fail(code, format!("{COMBINE}GetWorkspaceSize: {m}")),
    };
    get_workspace_coded(COMBINE, workspaceSize, executor, |e: &Emu| {
        let doc = DOC_C;
        let exd = need(e, expandX, "expandX")?;
        let idd = need(e, expertIds, "expertIds")?;
        let asd = need(e, assistInfoForCombine, "assistInfoForCombine")?;
        let scd_counts = need(e, epSendCounts, "epSendCounts")?;
        let scd = need(e, expertScales, "expertScales")?;
        let xod = need(e, xOut, "xOut")?;
        if !xActiveMaskOptional.is_null() {
            return Err(tiling(format!(
                "xActiveMaskOptional is not emulated (pass NULL: every token takes part) ({doc})"
            )));
        }
        for (p, name) in [
            (activationScaleOptional, "activationScaleOptional"),
            (weightScaleOptional, "weightScaleOptional"),
            (groupListOptional, "groupListOptional"),
        ] {
            if !p.is_null() {
                return Err(tiling(format!("{name} is a reserved argument: pass NULL (预留参数, {doc})")));
            }
        }
        // Atlas A3's tiling checks tpSendCounts as a 1-D tensor of max(tpWorldSize, 1) entries
        // even without a TP domain (moe_distribute_combine_v2_tiling.cpp; vllm-ascend passes the
        // dispatch's tpRecvCounts with tpWorldSize 1), stricter than the doc's "传空指针".
        match (c.soc, opt(e, tpSendCountsOptional, "tpSendCountsOptional")?) {
            (Soc::A3, None) => {
                return Err(tiling(format!(
                    "tpSendCountsOptional is NULL: Atlas A3 requires the dispatch's tpRecvCounts, INT32 \
                     [max(tpWorldSize, 1)] ({doc})"
                )))
            }
            (Soc::A3, Some(d)) => {
                dtype_is(&d, &[aclDataType::ACL_INT32], "tpSendCountsOptional", doc)?;
                if d.dims.len() != 1 || d.dims[0] as i64 != c.tp.max(1) {
                    return Err(tiling(format!(
                        "tpSendCountsOptional has shape {:?}; it must be [max(tpWorldSize, 1)] = [{}] ({doc})",
                        d.dims,
                        c.tp.max(1)
                    )));
                }
            }
            (_, Some(_)) => {
                return Err(tiling(format!(
                    "tpSendCountsOptional must be NULL on Atlas A2 (无TP域通信传空指针, {doc})"
                )))
            }
            (_, None) => {}
        }
        if outDtype != 0 || groupListType != 0 {
            return Err(tiling(format!(
                "outDtype {outDtype} / groupListType {groupListType}: reserved, pass 0 (预留参数, {doc})"
            )));
        }
        match commQuantMode {
            0 => {}
            2 => return Err(tiling(format!("commQuantMode 2 (int8 communication) is not emulated ({doc})"))),
            q => return Err(tiling(format!("commQuantMode {q}: 0 or 2 ({doc})"))),
        }
        dtype_is(&exd, &x_dtypes(), "expandX", doc)?;
        dtype_is(&idd, &[aclDataType::ACL_INT32], "expertIds", doc)?;
        dtype_is(&asd, &[aclDataType::ACL_INT32], "assistInfoForCombine", doc)?;
        dtype_is(&scd_counts, &[aclDataType::ACL_INT32], "epSendCounts", doc)?;
        dtype_is(&scd, &[aclDataType::ACL_FLOAT], "expertScales", doc)?;
        dtype_is(&xod, &[exd.dtype], "xOut (expandX's dtype)", doc)?;
        if idd.dims.len() != 2 {
            return Err(tiling(format!("expertIds has shape {:?}; it must be 2-D [Bs, K] ({doc})", idd.dims)));
        }
        let (bs, k) = (idd.dims[0], idd.dims[1]);
        if k == 0 || k > 16 || k > c.moe {
            return Err(tiling(format!("K = {k}: it must satisfy 0 < K <= 16 and K <= moeExpertNum ({doc})")));
        }
        if exd.dims.len() != 2 {
            return Err(tiling(format!("expandX has shape {:?}; it must be 2-D [A, H] ({doc})", exd.dims)));
        }
        let (a, h) = (exd.dims[0], exd.dims[1]);
        c.check_bs_h(bs, h, doc)?;
        let need_a = c.global_real(bs) * c.local.min(k);
        if a < need_a {
            return Err(tiling(format!(
                "expandX has A = {a} rows; A must be >= {need_a} (globalBs' * min(localExpertNum, K), {doc})"
            )));
        }
        shape_is(&asd, &[a * ASSIST_PER_A], "assistInfoForCombine", "A * 128", doc)?;
        shape_is(&scd_counts, &[c.counts_len(bs, k)], "epSendCounts", c.counts_what(), doc)?;
        shape_is(&scd, &[bs, k], "expertScales", "Bs, K", doc)?;
        shape_is(&xod, &[bs, h], "xOut", "Bs, H", doc)?;
        let esd = opt(e, expandScalesOptional, "expandScalesOptional")?;
        if let Some(d) = &esd {
            if c.soc == Soc::A3 {
                return Err(tiling(format!(
                    "expandScalesOptional is reserved on {} (Atlas A3: 传空指针即可, {doc})",
                    soc_name()
                )));
            }
            dtype_is(d, &[aclDataType::ACL_FLOAT], "expandScalesOptional", doc)?;
            shape_is(d, &[a], "expandScalesOptional", "A", doc)?;
        }
        let shd = opt(e, sharedExpertXOptional, "sharedExpertXOptional")?;
        if let Some(d) = &shd {
            if c.soc == Soc::A2 {
                return Err(tiling(format!(
                    "sharedExpertXOptional is reserved on {} (Atlas A2: 传空指针即可, {doc})",
                    soc_name()
                )));
            }
            dtype_is(d, &[exd.dtype], "sharedExpertXOptional (expandX's dtype)", doc)?;
            let ok = match d.dims.as_slice() {
                [b, hh] => *b == bs && *hh == h,
                [b0, b1, hh] => b0 * b1 == bs && *hh == h,
                _ => false,
            };
            if !ok {
                return Err(tiling(format!(
                    "sharedExpertXOptional has shape {:?}; it must be [Bs, H] = [{bs}, {h}] or 3-D with the first two \
                     dims' product Bs ({doc})",
                    d.dims
                )));
            }
        }
        let mut reads = vec![exd.clone(), idd.clone(), asd.clone(), scd_counts.clone(), scd.clone()];
        reads.extend(shd.clone());
        reads.extend(esd);
        let job = Job::Combine(CombineJob {
            local: c.local,
            moe: c.moe,
            bs,
            h,
            k,
            a,
            expand_x: exd.clone(),
            ids: idd,
            assist: asd,
            send_counts: scd_counts,
            scales: scd,
            shared_x: shd,
            x_out: xod.clone(),
        });
        let planned = Planned { group: c.group.clone(), ep: c.ep, rank: c.rank, attrs: c.attrs(h, k, exd.dtype), job };
        Ok(mc2_plan(ws_for(&xod), reads, vec![xod], planned))
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMoeDistributeCombineV2(
    workspace: *mut c_void,
    workspaceSize: u64,
    executor: *mut aclOpExecutor,
    stream: aclrtStream,
) -> aclnnStatus {
    mc2_launch(COMBINE, workspace, workspaceSize, executor, stream)
}

const _: dsv4_ascend_sys::pfn::aclnnMoeDistributeDispatchV2GetWorkspaceSize =
    aclnnMoeDistributeDispatchV2GetWorkspaceSize;
const _: dsv4_ascend_sys::pfn::aclnnMoeDistributeDispatchV2 = aclnnMoeDistributeDispatchV2;
const _: dsv4_ascend_sys::pfn::aclnnMoeDistributeCombineV2GetWorkspaceSize =
    aclnnMoeDistributeCombineV2GetWorkspaceSize;
const _: dsv4_ascend_sys::pfn::aclnnMoeDistributeCombineV2 = aclnnMoeDistributeCombineV2;

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, CStr, CString};
    use std::ptr::{null, null_mut};

    use dsv4_ascend_sys::{aclDataType, aclTensor};

    use super::*;
    use crate::hccl::{
        HcclAllReduce, HcclCommDestroy, HcclCommInitRootInfo, HcclGetCommName, HcclGetRootInfo, HcclRootInfo,
    };
    use crate::test_support::{bf16_bytes, device, download, lcg, run, setup, tensor};

    const A2: &str = "Ascend910B3";
    const A3: &str = "Ascend910_9391";
    const S950: &str = "Ascend950PR_9599";
    const BF16: aclDataType = aclDataType::ACL_BF16;
    const F32: aclDataType = aclDataType::ACL_FLOAT;
    const I32: aclDataType = aclDataType::ACL_INT32;
    const I64: aclDataType = aclDataType::ACL_INT64;

    /// Runs `f(rank, groupEp)` on `n` threads, rank r on device r, with a communicator of n ranks.
    fn world<T: Send>(n: usize, soc: &str, f: impl Fn(usize, &str, usize) -> T + Sync) -> Vec<T> {
        setup(soc);
        let mut root = HcclRootInfo { internal: [0; crate::hccl::HCCL_ROOT_INFO_BYTES] };
        // SAFETY: a root info blob of the documented size.
        assert_eq!(unsafe { HcclGetRootInfo(&mut root) }, 0);
        let root = &root;
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let f = &f;
                    sc.spawn(move || {
                        setup(soc);
                        // SAFETY: plain integer argument.
                        assert_eq!(unsafe { crate::aclrtSetDevice(r as i32) }, 0);
                        let mut comm = null_mut();
                        // SAFETY: the blob from HcclGetRootInfo; an out-pointer.
                        assert_eq!(unsafe { HcclCommInitRootInfo(n as u32, root, r as u32, &mut comm) }, 0);
                        let mut name = [0 as c_char; 128];
                        // SAFETY: a 128-byte buffer.
                        assert_eq!(unsafe { HcclGetCommName(comm, name.as_mut_ptr()) }, 0);
                        // SAFETY: NUL-terminated by HcclGetCommName.
                        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
                        let out = f(r, &name, comm as usize);
                        // SAFETY: the handle made above.
                        unsafe { HcclCommDestroy(comm) };
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    fn bits(v: &[u8], es: usize) -> Vec<u8> {
        v.to_vec().chunks(es).flat_map(|c| c.to_vec()).collect()
    }

    fn bf(v: f64) -> f64 {
        half::bf16::from_f64(v).to_f64()
    }

    fn i32s(v: &[u8]) -> Vec<i64> {
        v.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
    }

    fn i64s(v: &[u8]) -> Vec<i64> {
        v.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn f32s(v: &[u8]) -> Vec<f64> {
        v.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    }

    fn bf16s(v: &[u8]) -> Vec<f64> {
        v.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
    }

    fn zeros(n: usize) -> *mut c_void {
        device(&vec![0u8; n])
    }

    /// One test scenario: every rank's Bs, H, K, moeExpertNum, globalBs, ...
    #[derive(Clone)]
    struct Case {
        soc: &'static str,
        n: usize,
        bs: Vec<usize>,
        h: usize,
        k: usize,
        moe: usize,
        global_bs: usize,
        /// expertScalesOptional to dispatch (A2).
        scales_in: bool,
        shared: bool,
        alg: Option<&'static str>,
        counts: bool,
    }

    /// Deterministic routing: distinct experts per token; rank 0's token 0 stays on rank 0.
    fn routing(c: &Case, r: usize) -> Vec<i64> {
        let mut rnd = lcg(17 + r as u64);
        let l = c.moe / c.n;
        let mut ids = vec![];
        for b in 0..c.bs[r] {
            let mut chosen: Vec<i64> = vec![];
            while chosen.len() < c.k {
                let e = if r == 0 && b == 0 { (chosen.len() % l) as i64 } else { (rnd() * c.moe as f64) as i64 };
                if !chosen.contains(&e) {
                    chosen.push(e);
                } else if r == 0 && b == 0 {
                    // Fewer local experts than K: fill with the next ones.
                    let next = (0..c.moe as i64).find(|x| !chosen.contains(x)).unwrap();
                    chosen.push(next);
                }
            }
            ids.extend(chosen);
        }
        ids
    }

    struct Dispatched {
        expand_x: *mut c_void,
        rows: usize,
        counts: Vec<i64>,
        assist: *mut c_void,
        recv: *mut c_void,
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch_ws(
        x: *const aclTensor,
        ids: *const aclTensor,
        scales: *const aclTensor,
        mask: *const aclTensor,
        group: *const c_char,
        ep: i64,
        rank: i64,
        moe: i64,
        tp: i64,
        quant: i64,
        global_bs: i64,
        alg: *const c_char,
        outs: [*mut aclTensor; 7],
        counts: i64,
        ws: *mut u64,
        ex: *mut *mut aclOpExecutor,
    ) -> i32 {
        // SAFETY: forwarded.
        unsafe {
            aclnnMoeDistributeDispatchV2GetWorkspaceSize(
                x,
                ids,
                null(),
                mask,
                scales,
                group,
                ep,
                rank,
                moe,
                null(),
                tp,
                0,
                0,
                0,
                0,
                quant,
                global_bs,
                counts,
                alg,
                outs[0],
                outs[1],
                outs[2],
                outs[3],
                outs[4],
                outs[5],
                outs[6],
                ws,
                ex,
            )
        }
    }

    /// Dispatch then combine on every rank; checks every output against a host computation.
    fn round_trip(c: &Case) {
        let results = world(c.n, c.soc, |r, group, _| {
            let gname = CString::new(group).unwrap();
            let l = c.moe / c.n;
            let (bs, h, k) = (c.bs[r], c.h, c.k);
            let gb = if c.global_bs == 0 { bs * c.n } else { c.global_bs };
            let a = gb * l.min(k);
            let mut rnd = lcg(100 + r as u64);
            let xv: Vec<f64> = (0..bs * h).map(|_| bf(rnd() * 4.0 - 2.0)).collect();
            let ids = routing(c, r);
            let wts: Vec<f64> = (0..bs * k).map(|_| (rnd() as f32) as f64).collect();
            let x = tensor(&[bs as i64, h as i64], BF16, device(&bf16_bytes(&xv)));
            let idt = tensor(
                &[bs as i64, k as i64],
                I32,
                device(&ids.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect::<Vec<_>>()),
            );
            let wbytes: Vec<u8> = wts.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
            let wt = tensor(&[bs as i64, k as i64], F32, device(&wbytes));
            let clen = match c.soc {
                A2 => c.moe + 2 * gb * k * (c.n / 8),
                _ => c.n * l,
            };
            let ex_p = zeros(a * h * 2);
            let as_p = zeros(a * 128 * 4);
            let tn_p = zeros(l * 8);
            let rc_p = zeros(clen * 4);
            let es_p = zeros(a * 4);
            let tp_counts = tensor(&[1], I32, zeros(4));
            let outs = [
                tensor(&[a as i64, h as i64], BF16, ex_p),
                null_mut(),
                tensor(&[(a * 128) as i64], I32, as_p),
                tensor(&[l as i64], I64, tn_p),
                tensor(&[clen as i64], I32, rc_p),
                tp_counts,
                if c.scales_in { tensor(&[a as i64], F32, es_p) } else { null_mut() },
            ];
            let alg = c.alg.map(|s| CString::new(s).unwrap());
            run(
                // SAFETY: tensors made above.
                |ws, ex| unsafe {
                    dispatch_ws(
                        x,
                        idt,
                        if c.scales_in { wt } else { null() },
                        null(),
                        gname.as_ptr(),
                        c.n as i64,
                        r as i64,
                        c.moe as i64,
                        0,
                        0,
                        c.global_bs as i64,
                        alg.as_ref().map_or(null(), |s| s.as_ptr()),
                        outs,
                        if c.counts { 1 } else { 0 },
                        ws,
                        ex,
                    )
                },
                aclnnMoeDistributeDispatchV2,
            )
            .unwrap_or_else(|m| panic!("dispatch on rank {r}: {m}"));
            let nums = i64s(&download(tn_p, l * 8));
            let counts: Vec<i64> = if c.counts {
                nums.clone()
            } else {
                nums.iter()
                    .scan(0, |p, &v| {
                        let d = v - *p;
                        *p = v;
                        Some(d)
                    })
                    .collect()
            };
            let rows = counts.iter().sum::<i64>() as usize;
            let d = Dispatched { expand_x: ex_p, rows, counts, assist: as_p, recv: rc_p };
            let got = bf16s(&download(d.expand_x, d.rows * h * 2));
            let scales_out = if c.scales_in { f32s(&download(es_p, d.rows * 4)) } else { vec![] };
            // The expert outputs: row * (1 + global expert / 8), in bf16, into a NaN-padded buffer.
            let mut y = vec![f64::NAN; a * h];
            let mut row = 0;
            for (e, &cnt) in d.counts.iter().enumerate() {
                let f = 1.0 + (r * l + e) as f64 / 8.0;
                for _ in 0..cnt {
                    for j in 0..h {
                        y[row * h + j] = bf(got[row * h + j] * f);
                    }
                    row += 1;
                }
            }
            let yt = tensor(&[a as i64, h as i64], BF16, device(&bf16_bytes(&y)));
            let ast = tensor(&[(a * 128) as i64], I32, d.assist);
            let rct = tensor(&[clen as i64], I32, d.recv);
            let shv: Vec<f64> = (0..bs * h).map(|_| bf(rnd() - 0.5)).collect();
            let sht =
                if c.shared { tensor(&[bs as i64, h as i64], BF16, device(&bf16_bytes(&shv))) } else { null_mut() };
            let xo_p = zeros(bs * h * 2);
            let xo = tensor(&[bs as i64, h as i64], BF16, xo_p);
            run(
                // SAFETY: tensors made above.
                |ws, ex| unsafe {
                    aclnnMoeDistributeCombineV2GetWorkspaceSize(
                        yt,
                        idt,
                        ast,
                        rct,
                        wt,
                        if c.soc == A3 { tp_counts } else { null() },
                        null(),
                        null(),
                        null(),
                        null(),
                        null(),
                        sht,
                        gname.as_ptr(),
                        c.n as i64,
                        r as i64,
                        c.moe as i64,
                        null(),
                        0,
                        0,
                        0,
                        0,
                        0,
                        c.global_bs as i64,
                        0,
                        0,
                        0,
                        alg.as_ref().map_or(null(), |s| s.as_ptr()),
                        xo,
                        ws,
                        ex,
                    )
                },
                aclnnMoeDistributeCombineV2,
            )
            .unwrap_or_else(|m| panic!("combine on rank {r}: {m}"));
            let xout = download(xo_p, bs * h * 2);
            (xv, ids, wts, shv, got, d.counts, scales_out, xout, i32s(&download(d.recv, clen * 4)))
        });
        // Host model.
        let l = c.moe / c.n;
        for (r, res) in results.iter().enumerate() {
            let (_, _, _, _, got, counts, scales_out, _, recv) = res;
            let mut want = vec![];
            let mut want_scales = vec![];
            let mut want_counts = vec![];
            let mut ends = vec![];
            for e in 0..l {
                let mut cnt = 0;
                for (s, other) in results.iter().enumerate() {
                    let (xv, ids, wts, ..) = other;
                    for b in 0..c.bs[s] {
                        for kk in 0..c.k {
                            if ids[b * c.k + kk] == (r * l + e) as i64 {
                                want.extend_from_slice(&xv[b * c.h..(b + 1) * c.h]);
                                want_scales.push(wts[b * c.k + kk]);
                                cnt += 1;
                            }
                        }
                    }
                    ends.push((want.len() / c.h) as i64);
                }
                want_counts.push(cnt as i64);
            }
            assert_eq!(counts, &want_counts, "rank {r} expertTokenNums");
            assert_eq!(got, &want, "rank {r} expandXOut");
            assert_eq!(&recv[..c.n * l], &ends[..], "rank {r} epRecvCounts");
            if c.scales_in {
                assert_eq!(scales_out, &want_scales, "rank {r} expandScalesOut");
            }
        }
        for (s, res) in results.iter().enumerate() {
            let (xv, ids, wts, shv, _, _, _, xout, _) = res;
            let mut want = vec![];
            for b in 0..c.bs[s] {
                let mut acc = vec![0f32; c.h];
                for kk in 0..c.k {
                    let e = ids[b * c.k + kk] as usize;
                    let f = 1.0 + e as f64 / 8.0;
                    for j in 0..c.h {
                        acc[j] += wts[b * c.k + kk] as f32 * bf(xv[b * c.h + j] * f) as f32;
                    }
                }
                if c.shared {
                    for j in 0..c.h {
                        acc[j] += shv[b * c.h + j] as f32;
                    }
                }
                want.extend(acc.iter().map(|&v| v as f64));
            }
            assert_eq!(bits(xout, 2), bf16_bytes(&want), "rank {s} xOut");
        }
    }

    fn a3(n: usize, bs: Vec<usize>) -> Case {
        Case {
            soc: A3,
            n,
            bs,
            h: 1024,
            k: 3,
            moe: 8,
            global_bs: 0,
            scales_in: false,
            shared: false,
            alg: None,
            counts: true,
        }
    }

    #[test]
    fn round_trip_two_ranks() {
        round_trip(&a3(2, vec![3, 3]));
        round_trip(&Case { shared: true, counts: false, ..a3(2, vec![4, 4]) });
    }

    #[test]
    fn round_trip_four_ranks_different_bs() {
        // Different Bs per rank: globalBs = maxBs * epWorldSize.
        round_trip(&Case { global_bs: 5 * 4, shared: true, ..a3(4, vec![5, 1, 3, 2]) });
    }

    #[test]
    fn round_trip_a2_sixteen_ranks_with_expand_scales() {
        let c = Case {
            soc: A2,
            n: 16,
            bs: vec![2; 16],
            h: 64,
            k: 2,
            moe: 32,
            global_bs: 0,
            scales_in: true,
            shared: false,
            alg: Some("fullmesh"),
            counts: true,
        };
        round_trip(&c);
    }

    /// Dispatch with H 1024, K 2, moeExpertNum 4, no globalBs, on A3, with overrides.
    struct DArgs {
        group: CString,
        ep: i64,
        rank: i64,
        bs: usize,
        h: usize,
        x_dtype: aclDataType,
        scales: bool,
        mask: bool,
        tp: i64,
        quant: i64,
        a: usize,
        null_out: bool,
        /// tpRecvCountsOut NULL (the op-api wrapper refuses it).
        null_tp: bool,
        /// A communicator handle to destroy between planning and launching (0: none).
        destroy: usize,
    }

    fn try_dispatch(d: &DArgs) -> Result<(), (i32, String)> {
        let (k, l) = (2usize, 2usize);
        let x = tensor(&[d.bs as i64, d.h as i64], d.x_dtype, zeros(d.bs.max(1) * d.h * 4));
        let ids: Vec<u8> = (0..d.bs * k).flat_map(|i| ((i % 4) as i32).to_le_bytes()).collect();
        let idt = tensor(&[d.bs as i64, k as i64], I32, device(&ids));
        let wt = tensor(&[d.bs as i64, k as i64], F32, zeros(d.bs.max(1) * k * 4));
        let mask = tensor(&[d.bs as i64], aclDataType::ACL_BOOL, zeros(d.bs.max(1)));
        let outs = [
            if d.null_out { null_mut() } else { tensor(&[d.a as i64, d.h as i64], BF16, zeros(d.a.max(1) * d.h * 2)) },
            null_mut(),
            tensor(&[(d.a * 128) as i64], I32, zeros(d.a.max(1) * 128 * 4)),
            tensor(&[l as i64], I64, zeros(l * 8)),
            tensor(&[4], I32, zeros(16)),
            if d.null_tp { null_mut() } else { tensor(&[1], I32, zeros(4)) },
            null_mut(),
        ];
        let (mut ws, mut ex) = (0u64, null_mut());
        // SAFETY: tensors made above.
        let st = unsafe {
            dispatch_ws(
                x,
                idt,
                if d.scales { wt } else { null() },
                if d.mask { mask } else { null() },
                d.group.as_ptr(),
                d.ep,
                d.rank,
                4,
                d.tp,
                d.quant,
                0,
                null(),
                outs,
                1,
                &mut ws,
                &mut ex,
            )
        };
        if st != 0 {
            return Err((st, crate::test_support::last_error()));
        }
        if d.destroy != 0 {
            // SAFETY: a communicator handle of this rank, not used by another thread now.
            assert_eq!(unsafe { HcclCommDestroy(d.destroy as _) }, 0);
        }
        let wsp = if ws > 0 { zeros(ws as usize) } else { null_mut() };
        // SAFETY: the executor planned above, its workspace, the default stream.
        let st = unsafe { aclnnMoeDistributeDispatchV2(wsp, ws, ex, null_mut()) };
        if st != 0 {
            return Err((st, crate::test_support::last_error()));
        }
        // SAFETY: the default stream.
        unsafe { crate::aclrtSynchronizeStream(null_mut()) };
        Ok(())
    }

    #[test]
    fn refused_on_other_socs() {
        setup(S950);
        let g = CString::new("ep").unwrap();
        let (mut ws, mut ex) = (0u64, null_mut());
        let outs = [null_mut(); 7];
        // SAFETY: NULL tensors are allowed to reach the checks.
        let st = unsafe {
            dispatch_ws(null(), null(), null(), null(), g.as_ptr(), 2, 0, 4, 0, 0, 0, null(), outs, 1, &mut ws, &mut ex)
        };
        assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
        assert!(
            crate::test_support::last_error().contains("not supported on Ascend950"),
            "{}",
            crate::test_support::last_error()
        );
        // SAFETY: as above.
        let st = unsafe {
            aclnnMoeDistributeCombineV2GetWorkspaceSize(
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                null(),
                g.as_ptr(),
                2,
                0,
                4,
                null(),
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                null(),
                null_mut(),
                &mut ws,
                &mut ex,
            )
        };
        assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
        assert!(crate::test_support::last_error().contains("not supported on Ascend950"));
    }

    #[test]
    fn refusals_and_a_mismatched_step() {
        world(2, A3, |r, group, comm| {
            let base = DArgs {
                group: CString::new(group).unwrap(),
                ep: 2,
                rank: r as i64,
                bs: 2,
                h: 1024,
                x_dtype: BF16,
                scales: false,
                mask: false,
                tp: 0,
                quant: 0,
                a: 8,
                null_out: false,
                null_tp: false,
                destroy: 0,
            };
            let refuse = |d: DArgs, code: i32, needle: &str| {
                let (c, m) = try_dispatch(&d).expect_err(needle);
                assert!(m.contains(needle), "{needle:?} not in {m}");
                assert_eq!(c, code, "{m}");
            };
            let t = ACLNN_ERR_INNER_TILING_ERROR;
            let g = || CString::new(group).unwrap();
            refuse(
                DArgs { group: CString::new("no-such-group").unwrap(), ..base_clone(&base) },
                t,
                "names no live communicator",
            );
            refuse(DArgs { ep: 4, group: g(), ..base_clone(&base) }, t, "does not match the size 2");
            refuse(DArgs { rank: 1 - r as i64, group: g(), ..base_clone(&base) }, t, "is not this rank's id");
            refuse(
                DArgs { x_dtype: F32, group: g(), ..base_clone(&base) },
                ACLNN_ERR_PARAM_INVALID,
                "x must be FLOAT16 or BFLOAT16",
            );
            refuse(DArgs { bs: 0, a: 8, group: g(), ..base_clone(&base) }, t, "Bs = 0");
            refuse(DArgs { h: 512, group: g(), ..base_clone(&base) }, t, "H = 512");
            refuse(
                DArgs { quant: 2, group: g(), ..base_clone(&base) },
                t,
                "quantMode 2 (dynamic quantisation) is not emulated",
            );
            refuse(DArgs { mask: true, group: g(), ..base_clone(&base) }, t, "xActiveMaskOptional is not emulated");
            refuse(DArgs { tp: 2, group: g(), ..base_clone(&base) }, t, "tpWorldSize 2");
            refuse(
                DArgs { null_tp: true, group: g(), ..base_clone(&base) },
                ACLNN_ERR_PARAM_NULLPTR,
                "tpRecvCountsOut is NULL",
            );
            refuse(DArgs { scales: true, group: g(), ..base_clone(&base) }, t, "expertScalesOptional is not supported");
            refuse(DArgs { a: 7, group: g(), ..base_clone(&base) }, t, "expandXOut has shape [7, 1024]");
            refuse(
                DArgs { null_out: true, group: g(), ..base_clone(&base) },
                ACLNN_ERR_PARAM_NULLPTR,
                "expandXOut is NULL",
            );
            // A good step, then rank 0 dispatches while rank 1 all-reduces: both fail, and the
            // communicator stays unusable.
            try_dispatch(&base).unwrap();
            if r == 0 {
                let (c, m) = try_dispatch(&base).expect_err("mismatch");
                assert_eq!(c, ACLNN_ERR_RUNTIME_ERROR);
                assert!(m.contains("different collectives"), "{m}");
            } else {
                let buf = zeros(16);
                // SAFETY: a device buffer of 4 floats; the rank's communicator; the default stream is
                // not allowed for HCCL, so make one.
                let st = unsafe {
                    let mut s = null_mut();
                    assert_eq!(crate::aclrtCreateStream(&mut s), 0);
                    HcclAllReduce(buf, buf, 4, 4, 0, comm as _, s)
                };
                assert_ne!(st, 0);
                assert!(crate::test_support::last_error().contains("different collectives"));
            }
            let (_, m) = try_dispatch(&base).expect_err("poisoned");
            assert!(m.contains("unusable after an earlier failure"), "{m}");
        });
    }

    /// A launch on a communicator destroyed after planning fails, and fails its peer at once
    /// (the group is poisoned) instead of leaving it to the timeout.
    #[test]
    fn a_launch_on_a_destroyed_communicator_fails_every_rank_at_once() {
        world(2, A3, |r, group, comm| {
            let base = DArgs {
                group: CString::new(group).unwrap(),
                ep: 2,
                rank: r as i64,
                bs: 2,
                h: 1024,
                x_dtype: BF16,
                scales: false,
                mask: false,
                tp: 0,
                quant: 0,
                a: 8,
                null_out: false,
                null_tp: false,
                destroy: if r == 0 { comm } else { 0 },
            };
            let t = std::time::Instant::now();
            let (_, m) = try_dispatch(&base).expect_err("destroyed");
            assert!(m.contains("destroyed"), "rank {r}: {m}");
            assert!(t.elapsed().as_secs() < 30, "rank {r} waited {:?}", t.elapsed());
        });
    }

    fn base_clone(d: &DArgs) -> DArgs {
        DArgs { group: d.group.clone(), ..*d }
    }
}
