//! Huawei's fused MoE kernels (ops-transformer): `aclnnGroupedMatmulV4` and
//! `aclnnMoeGatingTopKV2`, in the forms dsv4 uses, with the documented constraints. Parts of
//! the operators dsv4 does not use (quantised GMM, K- or N-axis grouping, bias, grouped expert
//! selection) are refused with "not emulated" rather than guessed at.
//!
//! Grouped matmul forms emulated (`gmm/grouped_matmul/docs/aclnnGroupedMatmulV4.md`, the non-quantised scenario):
//! x, weight and out all FLOAT32, BFLOAT16 or FLOAT16, one x and one out, groups along M with a
//! single 3-D weight or a list of 2-D weights (FLOAT32 with a single weight only on A2/A3; the
//! 310P takes FLOAT16 only). The antiquant forms (pseudo-quantised: A16W8 / A16W4, x BFLOAT16/FLOAT16 with
//! an INT8/INT4 weight and `antiquantScaleOptional`) are checked against the docs and then
//! refused as not emulated; the docs allow INT8 weights per-channel only (antiquantScale
//! `[E, N]`), so a per-group scale on an INT8 weight is refused as the documented misuse.

use std::ffi::c_void;

use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclTensor, aclTensorList, aclnnStatus, aclrtStream};

use crate::mem::{dtype_name, Desc};
use crate::ops::{contiguous_out, need_float, need_index, plan, same_dtype, shape_is, ws_for, R};
use crate::{get_workspace, launch, soc_name, Emu, Plan};

launcher!(aclnnGroupedMatmulV4, aclnnMoeGatingTopKV2);

/// `DSV4_ASCEND_EMU_QUIRKS` (comma-separated) makes the emulator behave like other CANN
/// releases, so dsv4's self-tests can be tested: `gating-bias-in-weights` (an older
/// MoeGatingTopK revision documents the output weights as taken after adding the bias),
/// `gmm-no-fp32` (a build that rejects FLOAT32 grouped matmul), `sfmla-ignores-sinks` (an
/// attention kernel that leaves the sinks out of the softmax) and
/// `matmul-bf16-accumulates-in-bf16` (Matmul / BatchMatMul with a BF16 output rounding every
/// partial sum, not only the result), `fp4-high-nibble-first` (FLOAT4_E2M1 reads take the
/// element at an even offset from the high nibble: the nibble order no doc states) and
/// `cast-without-low-precision` (an aclnnCast without the 950's FP8 / FP4 paths).
pub(crate) fn quirk(name: &str) -> bool {
    std::env::var("DSV4_ASCEND_EMU_QUIRKS").is_ok_and(|v| v.split(',').any(|q| q.trim() == name))
}

/// The SoC families the CANN docs name (`Ascend910B*` = Atlas A2, `Ascend910_93*` = A3); any
/// other name is "other", which `aclInit` refuses.
pub(crate) fn family() -> &'static str {
    let soc = soc_name();
    if soc.starts_with("Ascend910B") {
        "A2"
    } else if soc.starts_with("Ascend910_93") {
        "A3"
    } else if soc.starts_with("Ascend950") {
        "950"
    } else if soc.starts_with("Ascend310P") {
        "310P"
    } else if ["Ascend910A", "Ascend910ProA", "Ascend910ProB", "Ascend910PremiumA"].iter().any(|p| soc.starts_with(p)) {
        // The first Atlas 910 (no aclnn operators V4 needs): `dsv4 devices` says it cannot run V4.
        "910A"
    } else {
        "other"
    }
}

/// The antiquant (pseudo-quantised) scenarios: x BFLOAT16/FLOAT16 with an INT8 weight (A16W8; INT4, A16W4,
/// has no emulated dtype) and `antiquantScaleOptional` (+ optional offset), as
/// `aclnnGroupedMatmulV4.md` documents them for Atlas A2/A3 (the A16W8 constraints: per-channel only,
/// antiquantScale `[E, N]` for a single weight; x, weight and out single tensors; groupType
/// -1/0; actType 0; groupListType 0/1; not on the 310P) and the 950 (its antiquant constraints: INT8
/// per-channel; per-group, of 32/64/128/256 values, for INT4 only). dsv4 does not use them
/// (its FP4 experts' INT8 form has a BF16 scale per 32 values of K), so a call that passes
/// every documented check is still refused, as not emulated. Returns the reason.
#[allow(clippy::too_many_arguments)]
fn antiquant_refusal(
    e: &Emu,
    fam: &str,
    x: *const aclTensorList,
    weight: *const aclTensorList,
    scale: *const aclTensorList,
    offset: *const aclTensorList,
    group_type: i64,
    group_list_type: i64,
    act_type: i64,
) -> R<String> {
    let (xs, ws) = (e.tensor_list(x, "x")?, e.tensor_list(weight, "weight")?);
    let (Some(xd), Some(wd)) = (xs.first(), ws.first()) else {
        return Ok("antiquant: x and weight must not be empty".into());
    };
    if fam == "310P" {
        return Ok(format!(
            "antiquant (x {}, weight {}) is not supported on {}",
            dtype_name(xd.dtype),
            dtype_name(wd.dtype),
            soc_name()
        ));
    }
    if wd.dtype != aclDataType::ACL_INT8 {
        return Ok(format!(
            "antiquant arguments are set but weight is {}: the antiquant forms take an INT8 or INT4 weight",
            dtype_name(wd.dtype)
        ));
    }
    if !matches!(xd.dtype, aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16) {
        return Ok(format!(
            "an INT8 weight with x {} is no documented form: A16W8 (antiquant) takes x BFLOAT16 or FLOAT16 \
             (and INT8 x is the A8W8 quantised form)",
            dtype_name(xd.dtype)
        ));
    }
    if xs.len() != 1 || ws.len() != 1 || wd.dims.len() != 3 {
        // The formula section allows single x, weight and y tensors only (the constraint tables also
        // list weight-list shapes for groupType -1; the stricter reading is checked).
        return Ok("A16W8 supports only single x, weight and out tensors (one 3-D weight [E, K, N])".into());
    }
    if !matches!(group_type, -1 | 0) || act_type != 0 || !matches!(group_list_type, 0 | 1) {
        return Ok(format!(
            "A16W8 supports groupType -1 or 0, actType 0 and groupListType 0/1, got {group_type}, {act_type}, {group_list_type}"
        ));
    }
    if scale.is_null() {
        return Ok("an INT8 weight with BFLOAT16/FLOAT16 x (A16W8) needs antiquantScaleOptional".into());
    }
    let ss = e.tensor_list(scale, "antiquantScaleOptional")?;
    let [sd] = &ss[..] else {
        return Ok(format!("antiquantScaleOptional must hold one tensor (as weight), got {}", ss.len()));
    };
    if sd.dtype != xd.dtype {
        return Ok(format!(
            "antiquantScaleOptional must be {} (x's dtype), got {}",
            dtype_name(xd.dtype),
            dtype_name(sd.dtype)
        ));
    }
    let (g, k, n) = (wd.dims[0], wd.dims[1], wd.dims[2]);
    if sd.dims.len() == 3 && sd.dims[0] == g && sd.dims[2] == n {
        let groups = sd.dims[1];
        let size = if groups > 0 && k % groups == 0 {
            format!("groups of {} values of K = {k}", k / groups)
        } else {
            format!("{groups} groups, which do not divide K = {k}")
        };
        return Ok(format!(
            "per-group antiquantScaleOptional {:?} ({size}) with an INT8 weight: A16W8 supports per-channel \
             quantisation only (antiquantScale [E, N] = [{g}, {n}]); per-group scales are documented for INT4 weights only",
            sd.dims
        ));
    }
    if sd.dims != [g, n] {
        return Ok(format!(
            "antiquantScaleOptional has shape {:?}; per-channel A16W8 takes [E, N] = [{g}, {n}]",
            sd.dims
        ));
    }
    if !offset.is_null() {
        let os = e.tensor_list(offset, "antiquantOffsetOptional")?;
        if os.len() != 1 || os[0].dtype != xd.dtype || os[0].dims != sd.dims {
            return Ok(format!(
                "antiquantOffsetOptional must be one {} tensor of antiquantScaleOptional's shape {:?}",
                dtype_name(xd.dtype),
                sd.dims
            ));
        }
    }
    Ok("A16W8 per-channel antiquant is a documented form but not emulated (dsv4 does not use it)".into())
}

/// The family of a SoC that Huawei's V4 attention kernels support (Atlas A2, A3, Ascend 950),
/// or the refusal on any other.
pub(crate) fn v4_attention_family() -> R<&'static str> {
    match family() {
        f @ ("A2" | "A3" | "950") => Ok(f),
        _ => Err(format!("not supported on {} (Atlas A2, Atlas A3 and Ascend 950 only)", soc_name())),
    }
}

/// An optional tensor argument: None for NULL (an empty tensor is still a tensor).
pub(crate) fn optional(e: &Emu, p: *const aclTensor, name: &str) -> R<Option<Desc>> {
    if p.is_null() {
        Ok(None)
    } else {
        e.tensor(p, name).map(Some)
    }
}

fn null_or_err(p: *const c_void, name: &str) -> R<()> {
    if !p.is_null() {
        return Err(format!("{name} must be NULL here (only the non-quantised form without activation is emulated)"));
    }
    Ok(())
}

/// Whether `d` is a view of its last two dimensions transposed (strides `[.., 1, rows]`) over a
/// contiguous block; `Ok(false)` when it is contiguous, an error for anything else.
fn transposed(d: &Desc, name: &str) -> R<bool> {
    if d.is_contiguous() {
        return Ok(false);
    }
    if d.is_transposed_last_two() {
        return Ok(true);
    }
    Err(format!(
        "{name} must be contiguous or its last two dimensions transposed (a non-contiguous view), got {}",
        d.describe()
    ))
}

phase_one!(aclnnGroupedMatmulV4GetWorkspaceSize = "aclnnGroupedMatmulV4", e, (
    x: *const aclTensorList, weight: *const aclTensorList, biasOptional: *const aclTensorList,
    scaleOptional: *const aclTensorList, offsetOptional: *const aclTensorList,
    antiquantScaleOptional: *const aclTensorList, antiquantOffsetOptional: *const aclTensorList,
    perTokenScaleOptional: *const aclTensorList, groupListOptional: *const aclTensor,
    activationInputOptional: *const aclTensorList, activationQuantScaleOptional: *const aclTensorList,
    activationQuantOffsetOptional: *const aclTensorList, splitItem: i64, groupType: i64, groupListType: i64,
    actType: i64, out: *mut aclTensorList, activationFeatureOutOptional: *mut aclTensorList,
    dynQuantScaleOutOptional: *mut aclTensorList) {
    let fam = family();
    if !matches!(fam, "A2" | "A3" | "950" | "310P") {
        return Err(format!("not supported on {}", soc_name()));
    }
    // An INT8 weight (or any antiquant argument): the antiquant forms, checked, then refused.
    let int8_weight = e.tensor_list(weight, "weight")?.iter().any(|w| w.dtype == aclDataType::ACL_INT8);
    let int8_x = e.tensor_list(x, "x")?.iter().any(|x| x.dtype == aclDataType::ACL_INT8);
    if !antiquantScaleOptional.is_null() || !antiquantOffsetOptional.is_null() || (int8_weight && !int8_x) {
        return Err(antiquant_refusal(
            e,
            fam,
            x,
            weight,
            antiquantScaleOptional,
            antiquantOffsetOptional,
            groupType,
            groupListType,
            actType,
        )?);
    }
    for (p, n) in [
        (biasOptional, "biasOptional"),
        (scaleOptional, "scaleOptional"),
        (offsetOptional, "offsetOptional"),
        (perTokenScaleOptional, "perTokenScaleOptional"),
        (activationInputOptional, "activationInputOptional"),
        (activationQuantScaleOptional, "activationQuantScaleOptional"),
        (activationQuantOffsetOptional, "activationQuantOffsetOptional"),
        (activationFeatureOutOptional as *const aclTensorList, "activationFeatureOutOptional"),
        (dynQuantScaleOutOptional as *const aclTensorList, "dynQuantScaleOutOptional"),
    ] {
        null_or_err(p as *const c_void, n)?;
    }
    if groupType != 0 {
        return Err(format!("groupType {groupType}: only 0 (groups along M) is emulated"));
    }
    if !(2..=3).contains(&splitItem) {
        return Err(format!("splitItem {splitItem}: a single output tensor needs 2 or 3"));
    }
    if !(0..=1).contains(&groupListType) {
        return Err(format!("groupListType {groupListType}: the non-quantised form takes 0 (cumsum) or 1 (counts)"));
    }
    if actType != 0 {
        return Err(format!("actType {actType}: non-quantised grouped matmul supports only 0"));
    }
    let xs = e.tensor_list(x, "x")?;
    let ws = e.tensor_list(weight, "weight")?;
    let os = e.tensor_list(out as *const aclTensorList, "out")?;
    if xs.len() != 1 || os.len() != 1 {
        return Err(format!("groupType 0 with splitItem {splitItem} takes one x and one out tensor, got {} and {}", xs.len(), os.len()));
    }
    let (xd, od) = (&xs[0], &os[0]);
    need_float(xd, "x")?;
    if xd.dims.len() != 2 || !xd.is_contiguous() {
        return Err(format!("x must be a contiguous 2-D tensor (it may not be transposed), got {}", xd.describe()));
    }
    let single = ws.len() == 1 && ws[0].dims.len() == 3;
    let groups = if single { ws[0].dims[0] } else { ws.len() };
    if groups == 0 {
        return Err("weight is empty".into());
    }
    if single && groups > 1024 {
        return Err(format!("{groups} groups: a 3-D weight allows at most 1024"));
    }
    if !single && groups > 128 {
        return Err(format!("{groups} weight tensors: a weight list allows at most 128"));
    }
    // Atlas A2/A3 take FLOAT32 only when x, weight and out are all single tensors.
    if xd.dtype == aclDataType::ACL_FLOAT && !single && matches!(fam, "A2" | "A3") {
        return Err("FLOAT32 is supported only when x, weight and out are single tensors (a 3-D weight)".into());
    }
    if quirk("gmm-no-fp32") && xd.dtype == aclDataType::ACL_FLOAT {
        return Err("FLOAT32 is not supported by this build (emulator quirk gmm-no-fp32)".into());
    }
    if fam == "310P" && xd.dtype != aclDataType::ACL_FLOAT16 {
        return Err(format!("{} supports FLOAT16 only, got {}", soc_name(), dtype_name(xd.dtype)));
    }
    let k = xd.dims[1];
    let mut n = None;
    let mut trans = None;
    for (i, w) in ws.iter().enumerate() {
        let name = format!("weight[{i}]");
        same_dtype(xd, "x", w, &name)?;
        let want_rank = if single { 3 } else { 2 };
        if w.dims.len() != want_rank {
            return Err(format!("{name} must be {want_rank}-D, got {:?}", w.dims));
        }
        let t = transposed(w, &name)?;
        if *trans.get_or_insert(t) != t {
            return Err("the transpose state must be the same for each tensor in weight".into());
        }
        let r = w.dims.len();
        if w.dims[r - 2] != k {
            return Err(format!("{name} {:?} does not take K = {k} from x {:?}", w.dims, xd.dims));
        }
        if *n.get_or_insert(w.dims[r - 1]) != w.dims[r - 1] {
            return Err("every weight tensor must have the same N".into());
        }
    }
    let n = n.expect("at least one weight");
    if k >= 65536 || n >= 65536 {
        return Err(format!("the last dimension of x and weight must be below 65536 (K = {k}, N = {n})"));
    }
    same_dtype(xd, "x", od, "out")?;
    shape_is(od, &[xd.dims[0], n], "out")?;
    contiguous_out(od, "out")?;
    let gl = e.tensor(groupListOptional, "groupListOptional")?;
    if gl.dtype != aclDataType::ACL_INT64 {
        return Err(format!("groupListOptional must be INT64, got {}", dtype_name(gl.dtype)));
    }
    shape_is(&gl, &[groups], "groupListOptional (one entry per group)")?;
    let m = xd.dims[0];
    let wsz = ws_for(od);
    let (rx, rw, rg, wo) = (xd.clone(), ws.clone(), gl.clone(), od.clone());
    let mut reads = xs.clone();
    reads.extend(ws.iter().cloned());
    reads.push(gl);
    Ok(plan(wsz, reads, os, vec![x as u64, weight as u64, out as u64], move |mem| {
        let counts: Vec<i64> = rg.read(mem, "groupListOptional")?.iter().map(|&v| v as i64).collect();
        let mut sizes = vec![];
        let mut prev = 0i64;
        for (g, &c) in counts.iter().enumerate() {
            let size = if groupListType == 0 { c - prev } else { c };
            if c < 0 || size < 0 {
                return Err(format!(
                    "groupListOptional[{g}] = {c}: {} must be non-negative{}",
                    if groupListType == 0 { "a cumsum" } else { "a count" },
                    if groupListType == 0 { " and non-decreasing" } else { "" }
                ));
            }
            prev = if groupListType == 0 { c } else { prev + c };
            sizes.push(size as usize);
        }
        let total: usize = sizes.iter().sum();
        if total != m {
            return Err(format!("groupListOptional covers {total} rows but x has {m}"));
        }
        let xv = rx.read(mem, "x")?;
        // Weights as [G][K][N].
        let wv: Vec<f64> = rw.iter().map(|w| w.read(mem, "weight")).collect::<R<Vec<_>>>()?.concat();
        let mut y = vec![0f64; m * n];
        let mut row = 0;
        for (g, &rows) in sizes.iter().enumerate() {
            let wg = &wv[g * k * n..(g + 1) * k * n];
            for i in row..row + rows {
                for j in 0..n {
                    y[i * n + j] = (0..k).map(|kk| xv[i * k + kk] * wg[kk * n + j]).sum();
                }
            }
            row += rows;
        }
        wo.write(mem, &y, "out")
    }))
});

phase_one!(aclnnMoeGatingTopKV2GetWorkspaceSize = "aclnnMoeGatingTopKV2", e, (
    x: *const aclTensor, biasOptional: *const aclTensor, inputIdsOptional: *const aclTensor,
    tid2eidOptional: *const aclTensor, k: i64, kGroup: i64, groupCount: i64, groupSelectMode: i64,
    renorm: i64, normType: i64, outFlag: bool, routedScalingFactor: f64, eps: f64,
    yOut: *const aclTensor, expertIdxOut: *const aclTensor, outOut: *const aclTensor) {
    let fam = family();
    if !matches!(fam, "A2" | "A3" | "950") {
        return Err(format!("not supported on {}", soc_name()));
    }
    let xd = e.tensor(x, "x")?;
    need_float(&xd, "x")?;
    if xd.dims.len() != 2 || xd.numel() == 0 {
        return Err(format!("x must be a non-empty 2-D tensor [batch, experts], got {:?}", xd.dims));
    }
    let (b, ne) = (xd.dims[0], xd.dims[1]);
    if ne > 2048 {
        return Err(format!("{ne} experts: at most 2048"));
    }
    if !(0..=2).contains(&normType) {
        return Err(format!("normType {normType} is not 0 (softmax), 1 (sigmoid) or 2 (sqrt-softplus)"));
    }
    // dsv4's spec notes (shared/spec/ascend-api.md §2.4): normType 2 only on the 950.
    if normType == 2 && fam != "950" {
        return Err(format!("normType 2 (sqrt-softplus) is supported only on Ascend 950, not {}", soc_name()));
    }
    if !(0..=1).contains(&renorm) || !(0..=1).contains(&groupSelectMode) {
        return Err(format!("renorm {renorm} and groupSelectMode {groupSelectMode} must each be 0 or 1"));
    }
    if groupCount < 1 || kGroup < 1 || kGroup > groupCount || ne % groupCount as usize != 0 {
        return Err(format!("kGroup {kGroup} / groupCount {groupCount} invalid for {ne} experts"));
    }
    if normType == 2 && groupCount != 1 {
        return Err("groupCount must be 1 when normType is 2".into());
    }
    if groupCount > 1 && kGroup != groupCount {
        return Err("group-limited selection (kGroup < groupCount) is not emulated".into());
    }
    if k < 1 || k as usize > ne {
        return Err(format!("k = {k} is outside 1..={ne}"));
    }
    let k = k as usize;
    let bias = if biasOptional.is_null() { None } else { Some(e.tensor(biasOptional, "biasOptional")?) };
    if let Some(bd) = &bias {
        same_dtype(&xd, "x", bd, "biasOptional")?;
        shape_is(bd, &[ne], "biasOptional")?;
    }
    let hash = match (inputIdsOptional.is_null(), tid2eidOptional.is_null()) {
        (true, true) => None,
        (false, false) => {
            let (ids, table) = (e.tensor(inputIdsOptional, "inputIdsOptional")?, e.tensor(tid2eidOptional, "tid2eidOptional")?);
            need_index(&ids, "inputIdsOptional")?;
            need_index(&table, "tid2eidOptional")?;
            shape_is(&ids, &[b], "inputIdsOptional")?;
            if table.dims.len() != 2 || table.dims[1] != k {
                return Err(format!("tid2eidOptional must be [numKeys, k = {k}], got {:?}", table.dims));
            }
            if k > 64 {
                return Err(format!("hash routing supports k <= 64, got {k}"));
            }
            Some((ids, table))
        }
        _ => return Err("hash routing needs both inputIdsOptional and tid2eidOptional".into()),
    };
    let (yd, id, od) = (e.tensor(yOut, "yOut")?, e.tensor(expertIdxOut, "expertIdxOut")?, e.tensor(outOut, "outOut")?);
    same_dtype(&xd, "x", &yd, "yOut")?;
    shape_is(&yd, &[b, k], "yOut")?;
    if id.dtype != aclDataType::ACL_INT32 {
        return Err(format!("expertIdxOut must be INT32, got {}", dtype_name(id.dtype)));
    }
    shape_is(&id, &[b, k], "expertIdxOut")?;
    if od.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("outOut must be FLOAT32, got {}", dtype_name(od.dtype)));
    }
    shape_is(&od, &[b, ne], "outOut")?;
    for (d, n) in [(&yd, "yOut"), (&id, "expertIdxOut"), (&od, "outOut")] {
        contiguous_out(d, n)?;
    }
    let wsz = ws_for(&od);
    let mut reads = vec![xd.clone()];
    reads.extend(bias.iter().cloned());
    if let Some((i, t)) = &hash {
        reads.extend([i.clone(), t.clone()]);
    }
    let writes = vec![yd.clone(), id.clone(), od.clone()];
    Ok(plan(wsz, reads, writes, vec![], move |mem| {
        let xv = xd.read(mem, "x")?;
        let norm: Vec<f64> = match normType {
            0 => xv
                .chunks(ne)
                .flat_map(|r| {
                    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = r.iter().map(|v| (v - m).exp()).sum();
                    r.iter().map(move |v| (v - m).exp() / s).collect::<Vec<_>>()
                })
                .collect(),
            1 => xv.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
            _ => xv.iter().map(|&v| (v.max(0.0) + (-v.abs()).exp().ln_1p()).sqrt()).collect(),
        };
        let bv = bias.as_ref().map(|d| d.read(mem, "biasOptional")).transpose()?;
        let picks: Vec<usize> = match &hash {
            Some((ids, table)) => {
                let (iv, tv) = (ids.read(mem, "inputIdsOptional")?, table.read(mem, "tid2eidOptional")?);
                let keys = table.dims[0];
                let mut out = Vec::with_capacity(b * k);
                for (t, &id) in iv.iter().enumerate() {
                    if id < 0.0 || id as usize >= keys {
                        return Err(format!("inputIdsOptional[{t}] = {id} is outside 0..{keys}"));
                    }
                    for &x in &tv[id as usize * k..(id as usize + 1) * k] {
                        if x < 0.0 || x as usize >= ne {
                            return Err(format!("tid2eidOptional names expert {x}, outside 0..{ne}"));
                        }
                        out.push(x as usize);
                    }
                }
                out
            }
            None => (0..b)
                .flat_map(|t| {
                    let score = |j: usize| norm[t * ne + j] + bv.as_ref().map_or(0.0, |bv| bv[j]);
                    let mut order: Vec<usize> = (0..ne).collect();
                    // Ties go to the lower index (as the emulator's aclnnTopk).
                    order.sort_by(|&p, &q| score(q).total_cmp(&score(p)).then(p.cmp(&q)));
                    order.truncate(k);
                    order
                })
                .collect(),
        };
        let mut y = vec![0f64; b * k];
        let biased = quirk("gating-bias-in-weights");
        for t in 0..b {
            let g: Vec<f64> = picks[t * k..(t + 1) * k]
                .iter()
                .map(|&j| norm[t * ne + j] + if biased { bv.as_ref().map_or(0.0, |bv| bv[j]) } else { 0.0 })
                .collect();
            let denom = if normType != 0 || renorm == 1 { g.iter().sum::<f64>() + eps } else { 1.0 };
            for (j, v) in g.iter().enumerate() {
                y[t * k + j] = v / denom * routedScalingFactor;
            }
        }
        yd.write(mem, &y, "yOut")?;
        id.write(mem, &picks.iter().map(|&p| p as f64).collect::<Vec<_>>(), "expertIdxOut")?;
        if outFlag {
            od.write(mem, &norm, "outOut")?;
        }
        Ok(())
    }))
});
