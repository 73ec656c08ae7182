//! `aclnnWeightQuantBatchMatmulV2` (ops-nn
//! `matmul/weight_quant_batch_matmul_v2/docs/aclnnWeightQuantBatchMatmulV2.md`):
//! y = x @ ANTIQUANT(weight), ANTIQUANT(w) = (w + antiquantOffset) · antiquantScale.
//!
//! Forms emulated (everything else is refused: documented misuse with the doc's reason,
//! documented forms the emulator does not implement as "not emulated"):
//! * SoCs: Atlas A2 (`Ascend910B*`), A3 (`Ascend910_93*`) and the Ascend 950; the 310P
//!   ("Atlas 推理系列产品", batched FLOAT16-only rules) is not emulated; other SoCs are unsupported.
//! * x FLOAT16 / BFLOAT16, 2-D (m, k), contiguous; weight 2-D (k, n), contiguous or the
//!   transpose of contiguous storage (strides [1, k]); y (m, n) of x's dtype, contiguous; k and
//!   n in [1, 65535] on A2/A3, [1, 2^31 − 1] on the 950; no empty tensors.
//! * INT8 weight (all three): antiquantScale of x's dtype, per tensor ((1,) / (1, 1), group 0),
//!   per channel ((n,) / (1, n), group 0) or per group ((⌈k/g⌉, n), g = antiquantGroupSize a
//!   multiple of 32 in [32, k − 1]); antiquantOffsetOptional NULL or of x's dtype and the scale's
//!   shape.
//! * FLOAT8_E4M3FN weight (950 only): per channel only, scale of x's dtype, no offset.
//! * FLOAT4_E2M1 weight (950 only): the MX mode, scale FLOAT8_E8M0 (⌈k/32⌉, n), group 32, no
//!   offset; n even, and the storage's last dimension (k for a transposed weight) too.
//! * antiquantScale / antiquantOffsetOptional laid out like weight (transposed with a transposed
//!   weight); quantScaleOptional, quantOffsetOptional and biasOptional NULL.
//!
//! The kernel antiquantises into x's dtype (the exact f64 value of (w + offset) · scale,
//! rounded once) and multiplies with [`matmul_values`], aclnnMatmul's own loop, so the result
//! equals "dequantise into an x-dtype tensor, then aclnnMatmul" bit for bit (with the
//! `matmul-bf16-accumulates-in-bf16` quirk too).

use std::ffi::c_void;

use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclTensor, aclnnStatus, aclrtStream};
use half::{bf16, f16};

use crate::fused::{family, optional, quirk};
use crate::mem::{dtype_name, Desc};
use crate::ops::{matmul_values, plan, ws_for, R};
use crate::{get_workspace, launch, soc_name, Emu, Plan};

launcher!(aclnnWeightQuantBatchMatmulV2);

const DOC: &str = "matmul/weight_quant_batch_matmul_v2/docs/aclnnWeightQuantBatchMatmulV2.md";

/// How antiquantScale (and the offset) map onto weight element (kk, nn).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// One value.
    Tensor,
    /// One value per column nn.
    Channel,
    /// Value [kk / g][nn] (per-group, and the MX mode with g = 32).
    Group(usize),
}

/// A 2-D view's layout as the docs distinguish it: contiguous, or transposed (strides [1, rows]
/// over contiguous storage). A view with a dimension of 1 can be both.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Contiguous,
    Transposed,
    Either,
}

fn layout(d: &Desc) -> Option<Layout> {
    match (d.is_contiguous(), d.dims.len() == 2 && d.is_transposed_last_two()) {
        (true, true) => Some(Layout::Either),
        (true, false) => Some(Layout::Contiguous),
        (false, true) => Some(Layout::Transposed),
        (false, false) => None,
    }
}

/// antiquantScale / antiquantOffsetOptional must be laid out like weight ("连续性要求和weight保持一致":
/// non-contiguous only as the transposed view, with a transposed weight).
fn same_layout(d: &Desc, name: &str, w: Layout) -> R<()> {
    let Some(l) = layout(d) else {
        return Err(format!(
            "{name} {} is neither contiguous nor a transposed view (non-contiguous tensors are supported only \
             transposed, {DOC})",
            d.describe()
        ));
    };
    let clash = matches!((l, w), (Layout::Contiguous, Layout::Transposed) | (Layout::Transposed, Layout::Contiguous));
    if clash {
        let (lw, ld) =
            if w == Layout::Transposed { ("transposed", "contiguous") } else { ("contiguous", "transposed") };
        return Err(format!(
            "{name} {} is {ld} but weight is {lw}: its contiguity must be the same as weight's (only the \
             transposed case is non-contiguous, and then for both; {DOC})",
            d.describe()
        ));
    }
    Ok(())
}

/// Rounds to x's dtype (the antiquantised weight the cube reads).
fn round_to(dt: aclDataType, v: f64) -> f64 {
    if dt == aclDataType::ACL_BF16 {
        bf16::from_f64(v).to_f64()
    } else {
        f16::from_f64(v).to_f64()
    }
}

phase_one!(aclnnWeightQuantBatchMatmulV2GetWorkspaceSize = "aclnnWeightQuantBatchMatmulV2", e, (
    x: *const aclTensor, weight: *const aclTensor, antiquantScale: *const aclTensor,
    antiquantOffsetOptional: *const aclTensor, quantScaleOptional: *const aclTensor,
    quantOffsetOptional: *const aclTensor, biasOptional: *const aclTensor, antiquantGroupSize: i32,
    y: *const aclTensor) {
    wqbmm_plan(
        e,
        x,
        weight,
        antiquantScale,
        antiquantOffsetOptional,
        quantScaleOptional,
        quantOffsetOptional,
        biasOptional,
        antiquantGroupSize,
        y,
    )
});

#[allow(clippy::too_many_arguments)]
fn wqbmm_plan(
    e: &Emu,
    x: *const aclTensor,
    weight: *const aclTensor,
    scale: *const aclTensor,
    offset: *const aclTensor,
    quant_scale: *const aclTensor,
    quant_offset: *const aclTensor,
    bias: *const aclTensor,
    group: i32,
    y: *const aclTensor,
) -> R<Plan> {
    let soc = soc_name();
    let fam = family();
    match fam {
        "A2" | "A3" | "950" => {}
        "310P" => {
            return Err(format!(
                "the Atlas inference series ({soc}) has its own rules (batched x/weight, FLOAT16 only, {DOC}); \
                 not emulated"
            ))
        }
        _ => {
            return Err(format!(
                "not supported on {soc} ({DOC}: Atlas A2, Atlas A3, the Atlas inference series and the Ascend 950)"
            ))
        }
    }
    let a23 = fam != "950";
    let (xd, wd, sd, yd) =
        (e.tensor(x, "x")?, e.tensor(weight, "weight")?, e.tensor(scale, "antiquantScale")?, e.tensor(y, "y")?);
    let od = optional(e, offset, "antiquantOffsetOptional")?;

    // Reserved / output quantisation, bias.
    if !quant_offset.is_null() && quant_scale.is_null() {
        return Err(format!("quantOffsetOptional is given but quantScaleOptional is NULL ({DOC})"));
    }
    if !quant_scale.is_null() || !quant_offset.is_null() {
        return Err(if a23 {
            "quantScaleOptional / quantOffsetOptional (an INT8 y, output quantisation) are not emulated".into()
        } else {
            format!("quantScaleOptional and quantOffsetOptional are reserved on {soc} and must be NULL ({DOC})")
        });
    }
    if !bias.is_null() {
        return Err("biasOptional: a bias is not emulated (pass NULL)".into());
    }

    // x.
    if !matches!(xd.dtype, aclDataType::ACL_FLOAT16 | aclDataType::ACL_BF16) {
        return Err(format!("x has dtype {}; supported: FLOAT16, BFLOAT16", dtype_name(xd.dtype)));
    }
    if xd.dims.len() != 2 {
        return Err(format!("x must be 2-D (m, k), got {:?}", xd.dims));
    }
    if !xd.is_contiguous() {
        if !a23 {
            return Err(format!(
                "x {} is not contiguous: on the Ascend 950 x cannot be transposed, so it must be contiguous ({DOC})",
                xd.describe()
            ));
        }
        if xd.is_transposed_last_two() {
            return Err(format!(
                "a transposed x {} is a documented form on Atlas A2/A3 but not emulated",
                xd.describe()
            ));
        }
        return Err(format!(
            "x {} is non-contiguous: only a transposed x is supported ({DOC}: 仅转置场景支持)",
            xd.describe()
        ));
    }

    // weight.
    if wd.dims.len() != 2 {
        return Err(format!("weight must be 2-D (k, n), got {:?}", wd.dims));
    }
    let Some(wl) = layout(&wd) else {
        return Err(format!(
            "weight {} is neither contiguous nor the transpose of contiguous storage (non-contiguous weight is \
             supported only transposed: 仅转置场景支持非连续, {DOC})",
            wd.describe()
        ));
    };
    let (m, k, n) = (xd.dims[0], xd.dims[1], wd.dims[1]);
    if wd.dims[0] != k {
        return Err(format!("weight {:?} does not take x's reduce dimension k = {k} (x {:?})", wd.dims, xd.dims));
    }
    for (d, name) in [(&xd, "x"), (&wd, "weight"), (&sd, "antiquantScale"), (&yd, "y")] {
        if d.numel() == 0 {
            return Err(format!("{name} {:?} is empty: empty tensors are not supported ({DOC})", d.dims));
        }
    }
    if od.as_ref().is_some_and(|o| o.numel() == 0) {
        return Err(format!("antiquantOffsetOptional is empty: empty tensors are not supported ({DOC})"));
    }
    let max_kn = if a23 { 65535 } else { (1usize << 31) - 1 };
    if k > max_kn || n > max_kn {
        return Err(format!("k = {k} and n = {n} must lie in [1, {max_kn}] on {soc} ({DOC})"));
    }
    if m > (1usize << 31) - 1 {
        return Err(format!("m = {m} must lie in [1, 2^31 - 1] ({DOC})"));
    }

    // The quantisation mode, per weight dtype.
    let footnote2 = |what: &str| {
        format!(
            "{what} is not supported on Atlas A2/A3 ({soc}): footnote 2 of the dtype lists in {DOC} marks it \
             unsupported there (Ascend 950 only)"
        )
    };
    let group_shape = |g: usize| vec![k.div_ceil(g), n];
    let per_tensor = sd.dims == [1] || sd.dims == [1, 1];
    let per_channel = sd.dims == [n] || sd.dims == [1, n];
    let mode = match wd.dtype {
        aclDataType::ACL_INT8 => {
            if matches!(sd.dtype, aclDataType::ACL_UINT64 | aclDataType::ACL_INT64) {
                return Err(if a23 {
                    format!(
                        "an antiquantScale of {} (the aclnnTransQuantParamV2 per-channel form) is not emulated",
                        dtype_name(sd.dtype)
                    )
                } else {
                    format!(
                        "antiquantScale {} is not supported on {soc} (footnote 1 of the dtype list, {DOC})",
                        dtype_name(sd.dtype)
                    )
                });
            }
            if sd.dtype != xd.dtype {
                return Err(format!(
                    "antiquantScale has dtype {}; with an INT8 weight it must be x's dtype {} ({DOC})",
                    dtype_name(sd.dtype),
                    dtype_name(xd.dtype)
                ));
            }
            if group != 0 {
                if group < 32 || group % 32 != 0 || group as usize >= k {
                    return Err(format!(
                        "antiquantGroupSize {group}: the per-group mode takes a multiple of 32 in [32, k - 1] = \
                         [32, {}] ({DOC}); other modes take 0",
                        k as i64 - 1
                    ));
                }
                let g = group as usize;
                if sd.dims != group_shape(g) {
                    return Err(format!(
                        "antiquantScale has shape {:?}; per-group with antiquantGroupSize {g} takes (ceil(k/g), n) = \
                         {:?} ({DOC})",
                        sd.dims,
                        group_shape(g)
                    ));
                }
                Mode::Group(g)
            } else if per_tensor {
                Mode::Tensor
            } else if per_channel {
                Mode::Channel
            } else {
                return Err(format!(
                    "antiquantScale has shape {:?}, which with antiquantGroupSize 0 is neither per-tensor ((1,) or \
                     (1, 1)) nor per-channel ((n,) or (1, n), n = {n}); a per-group scale needs antiquantGroupSize \
                     ({DOC})",
                    sd.dims
                ));
            }
        }
        aclDataType::ACL_FLOAT8_E4M3FN => {
            if a23 {
                return Err(footnote2("a FLOAT8_E4M3FN weight"));
            }
            if sd.dtype != xd.dtype {
                return Err(format!(
                    "antiquantScale has dtype {}; with a FLOAT8_E4M3FN weight it must be x's dtype {} ({DOC})",
                    dtype_name(sd.dtype),
                    dtype_name(xd.dtype)
                ));
            }
            if group != 0 || !per_channel {
                return Err(format!(
                    "a FLOAT8_E4M3FN weight supports only per-channel quantisation (C量化): antiquantScale (n,) or \
                     (1, n) with n = {n} and antiquantGroupSize 0, got shape {:?} and antiquantGroupSize {group} \
                     ({DOC}, A16W8 on the Ascend 950)",
                    sd.dims
                ));
            }
            if od.is_some() {
                return Err(format!(
                    "antiquantOffsetOptional must be NULL with a FLOAT8_E4M3FN weight ({DOC}, A16W8 on the Ascend 950)"
                ));
            }
            Mode::Channel
        }
        aclDataType::ACL_FLOAT4_E2M1 => {
            if a23 {
                return Err(footnote2("a FLOAT4_E2M1 weight"));
            }
            if sd.dtype != aclDataType::ACL_FLOAT8_E8M0 {
                return Err(format!(
                    "antiquantScale has dtype {}; a FLOAT4_E2M1 weight (the MX mode) takes FLOAT8_E8M0 ({DOC})",
                    dtype_name(sd.dtype)
                ));
            }
            if group != 32 {
                return Err(format!(
                    "antiquantGroupSize {group}: the MX mode (FLOAT4_E2M1 weight) supports only 32 ({DOC})"
                ));
            }
            if sd.dims != group_shape(32) {
                return Err(format!(
                    "antiquantScale has shape {:?}; the MX mode takes (ceil(k/32), n) = {:?} ({DOC})",
                    sd.dims,
                    group_shape(32)
                ));
            }
            if od.is_some() {
                return Err(format!("antiquantOffsetOptional must be NULL in the MX mode ({DOC})"));
            }
            // "the weight's last dimension 2-aligned": n of the documented (k, n) shape, and (the
            // stricter reading, since codes pack in pairs along storage) the storage's last
            // dimension, k for a transposed weight (told apart by the strides when a dimension
            // of 1 makes the view both). Both are checked.
            let stored_transposed = wd.strides[1] != 1 || (k > 1 && wd.strides[0] == 1);
            let last = if stored_transposed { k } else { n };
            for (what, d) in [("n", n), ("the storage's last dimension", last)] {
                if d % 2 != 0 {
                    return Err(format!(
                        "weight {}: the last dimension of a FLOAT4_E2M1 weight must be even ({what} is {d}) ({DOC})",
                        wd.describe()
                    ));
                }
            }
            Mode::Group(32)
        }
        aclDataType::ACL_INT32 | aclDataType::ACL_FLOAT => {
            return Err(format!(
                "a {} weight (INT4 / FLOAT4_E2M1 values packed by aclnnConvertWeightToINT4Pack) is not emulated",
                dtype_name(wd.dtype)
            ))
        }
        other => {
            return Err(format!(
            "weight has dtype {}; supported: INT8, INT4, FLOAT8_E4M3FN, HIFLOAT8, INT32, FLOAT, FLOAT4_E2M1 ({DOC}; \
                 the emulator implements INT8, FLOAT8_E4M3FN and FLOAT4_E2M1)",
            dtype_name(other)
        ))
        }
    };
    same_layout(&sd, "antiquantScale", wl)?;
    if let Some(o) = &od {
        // Only INT8 weights reach here with an offset.
        if o.dtype != xd.dtype {
            return Err(format!(
                "antiquantOffsetOptional has dtype {}; it must be x's dtype {} (INT32 offsets go with UINT64/INT64 \
                 scales, not emulated) ({DOC})",
                dtype_name(o.dtype),
                dtype_name(xd.dtype)
            ));
        }
        if o.dims != sd.dims {
            return Err(format!(
                "antiquantOffsetOptional has shape {:?}; it must be antiquantScale's {:?} ({DOC})",
                o.dims, sd.dims
            ));
        }
        same_layout(o, "antiquantOffsetOptional", wl)?;
    }

    // y.
    if yd.dtype != xd.dtype {
        return Err(if yd.dtype == aclDataType::ACL_INT8 {
            format!("y is INT8, which needs quantScaleOptional (output quantisation; {DOC}); not emulated")
        } else {
            format!(
                "y has dtype {}; without quantScaleOptional it must be x's dtype {}",
                dtype_name(yd.dtype),
                dtype_name(xd.dtype)
            )
        });
    }
    if yd.dims != [m, n] {
        return Err(format!("y has shape {:?}, expected (m, n) = {:?}", yd.dims, [m, n]));
    }
    if !yd.is_contiguous() {
        return Err(format!("y must be contiguous, got {}", yd.describe()));
    }

    let ws = ws_for(&yd);
    let bf16_sums = yd.dtype == aclDataType::ACL_BF16 && quirk("matmul-bf16-accumulates-in-bf16");
    let xdt = xd.dtype;
    let (rx, rw, rs, ro, wy) = (xd.clone(), wd.clone(), sd.clone(), od.clone(), yd.clone());
    let mut reads = vec![xd, wd, sd];
    reads.extend(od);
    Ok(plan(ws, reads, vec![yd], vec![], move |mem| {
        let xv = rx.read(mem, "x")?;
        let wv = rw.read(mem, "weight")?;
        let sv = rs.read(mem, "antiquantScale")?;
        let ov = ro.as_ref().map(|o| o.read(mem, "antiquantOffsetOptional")).transpose()?;
        let mut deq = Vec::with_capacity(k * n);
        for kk in 0..k {
            for nn in 0..n {
                let at = match mode {
                    Mode::Tensor => 0,
                    Mode::Channel => nn,
                    Mode::Group(g) => (kk / g) * n + nn,
                };
                let off = ov.as_ref().map_or(0.0, |o| o[at]);
                deq.push(round_to(xdt, (wv[kk * n + nn] + off) * sv[at]));
            }
        }
        wy.write(mem, &matmul_values(&xv, &deq, m, k, n, bf16_sums), "y")
    }))
}

#[cfg(test)]
mod tests {
    use std::ptr::null;

    use dsv4_ascend_sys::{aclDataType, aclTensor};

    use crate::mem::{decode_e2m1, decode_e4m3fn, decode_e8m0};
    use crate::ops::{aclnnMatmul, aclnnMatmulGetWorkspaceSize};
    use crate::test_support::{bf16_bytes, device, download, lcg, run, setup, tensor, transposed};

    use super::{aclnnWeightQuantBatchMatmulV2, aclnnWeightQuantBatchMatmulV2GetWorkspaceSize};

    const A2: &str = "Ascend910B3";
    const S950: &str = "Ascend950PR_9599";
    const BF16: aclDataType = aclDataType::ACL_BF16;

    #[derive(Clone, Copy)]
    struct Args {
        x: *mut aclTensor,
        w: *mut aclTensor,
        scale: *mut aclTensor,
        offset: *const aclTensor,
        bias: *const aclTensor,
        group: i32,
        y: *mut aclTensor,
    }

    fn wqbmm(a: &Args) -> Result<(), String> {
        run(
            // SAFETY: tensors created by this test; out-pointers from `run`.
            |ws, ex| unsafe {
                aclnnWeightQuantBatchMatmulV2GetWorkspaceSize(
                    a.x,
                    a.w,
                    a.scale,
                    a.offset,
                    null(),
                    null(),
                    a.bias,
                    a.group,
                    a.y,
                    ws,
                    ex,
                )
            },
            aclnnWeightQuantBatchMatmulV2,
        )
    }

    /// y bytes of aclnnMatmul(x, w) with w the host-dequantised BF16 weight [k, n] (row-major).
    fn matmul_reference(x: *mut aclTensor, deq: &[f64], m: usize, k: usize, n: usize) -> Vec<u8> {
        let w = tensor(&[k as i64, n as i64], BF16, device(&bf16_bytes(deq)));
        let yp = device(&vec![0u8; m * n * 2]);
        let y = tensor(&[m as i64, n as i64], BF16, yp);
        // SAFETY: tensors created here.
        run(|ws, ex| unsafe { aclnnMatmulGetWorkspaceSize(x, w, y, 1, ws, ex) }, aclnnMatmul).unwrap();
        download(yp, m * n * 2)
    }

    fn bf16_round(v: f64) -> f64 {
        half::bf16::from_f64(v).to_f64()
    }

    /// x BF16 [m, k] with values in [-2, 2).
    fn x_tensor(m: usize, k: usize, seed: u64) -> *mut aclTensor {
        let mut r = lcg(seed);
        let xv: Vec<f64> = (0..m * k).map(|_| bf16_round(r() * 4.0 - 2.0)).collect();
        tensor(&[m as i64, k as i64], BF16, device(&bf16_bytes(&xv)))
    }

    fn y_tensor(m: usize, n: usize) -> (*mut aclTensor, *mut std::ffi::c_void) {
        let yp = device(&vec![0u8; m * n * 2]);
        (tensor(&[m as i64, n as i64], BF16, yp), yp)
    }

    /// INT8 weight [k, n] (transposed storage when `trans`), per-group BF16 scale and offset
    /// [k/g, n] laid out the same way, and the host dequantisation (row-major [k, n]).
    struct Int8Case {
        w: *mut aclTensor,
        scale: *mut aclTensor,
        offset: *mut aclTensor,
        deq: Vec<f64>,
    }

    fn int8_case(k: usize, n: usize, g: usize, w_trans: bool, s_trans: bool) -> Int8Case {
        let mut r = lcg(7);
        let wq: Vec<i8> = (0..k * n).map(|_| (r() * 256.0 - 128.0) as i8).collect(); // [k][n]
        let groups = k.div_ceil(g);
        let sv: Vec<f64> = (0..groups * n).map(|_| bf16_round(0.001 + r() * 0.02)).collect(); // [G][n]
        let ov: Vec<f64> = (0..groups * n).map(|_| bf16_round(r() * 8.0 - 4.0)).collect();
        let store = |vals: &[f64], rows: usize, trans: bool| -> *mut aclTensor {
            // Stored [n][rows] when transposed.
            let host: Vec<f64> = if trans {
                (0..n).flat_map(|c| (0..rows).map(move |q| vals[q * n + c])).collect()
            } else {
                vals.to_vec()
            };
            let p = device(&bf16_bytes(&host));
            if trans {
                transposed([rows as i64, n as i64], BF16, p)
            } else {
                tensor(&[rows as i64, n as i64], BF16, p)
            }
        };
        let wbytes: Vec<u8> = if w_trans {
            (0..n).flat_map(|c| (0..k).map(move |q| (q, c))).map(|(q, c)| wq[q * n + c] as u8).collect()
        } else {
            wq.iter().map(|&v| v as u8).collect()
        };
        let wp = device(&wbytes);
        let w = if w_trans {
            transposed([k as i64, n as i64], aclDataType::ACL_INT8, wp)
        } else {
            tensor(&[k as i64, n as i64], aclDataType::ACL_INT8, wp)
        };
        let deq = (0..k * n)
            .map(|i| {
                let (q, c) = (i / n, i % n);
                let at = (q / g) * n + c;
                bf16_round((wq[i] as f64 + ov[at]) * sv[at])
            })
            .collect();
        Int8Case { w, scale: store(&sv, groups, s_trans), offset: store(&ov, groups, s_trans), deq }
    }

    #[test]
    fn int8_per_group_equals_dequantise_then_matmul() {
        setup(A2);
        let (m, k, n, g) = (3, 128, 10, 32);
        for w_trans in [false, true] {
            let c = int8_case(k, n, g, w_trans, w_trans);
            let x = x_tensor(m, k, 1);
            let (y, yp) = y_tensor(m, n);
            let before = crate::emu().launches.get("aclnnWeightQuantBatchMatmulV2").copied().unwrap_or(0);
            let a = Args { x, w: c.w, scale: c.scale, offset: c.offset, bias: null(), group: g as i32, y };
            wqbmm(&a).unwrap();
            let after = crate::emu().launches.get("aclnnWeightQuantBatchMatmulV2").copied().unwrap_or(0);
            assert!(after > before, "the launch is counted");
            let got = download(yp, m * n * 2);
            assert_eq!(got, matmul_reference(x, &c.deq, m, k, n), "transposed weight: {w_trans}");
            // Not vacuous: finite, non-zero values.
            let vals: Vec<f32> = got.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            assert!(vals.iter().all(|v| v.is_finite()) && vals.iter().any(|&v| v != 0.0), "{vals:?}");
        }
    }

    #[test]
    fn int8_refusals() {
        setup(A2);
        let (m, k, n) = (2, 128, 8);
        let x = x_tensor(m, k, 2);
        let (y, _) = y_tensor(m, n);
        let refuse = |a: &Args, needle: &str| {
            let err = wqbmm(a).expect_err("refused");
            assert!(err.contains(needle), "{needle:?} not in {err}");
        };
        // The base case passes ...
        let c = int8_case(k, n, 32, false, false);
        let base = Args { x, w: c.w, scale: c.scale, offset: null(), bias: null(), group: 32, y };
        wqbmm(&base).unwrap();
        // ... group 16 (a scale of the matching shape) does not: not a multiple of 32 ...
        let c16 = int8_case(k, n, 16, false, false);
        refuse(&Args { w: c16.w, scale: c16.scale, group: 16, ..base }, "antiquantGroupSize 16");
        // ... nor a group of k or more.
        let ck = int8_case(k, n, 128, false, false);
        refuse(&Args { w: ck.w, scale: ck.scale, group: 128, ..base }, "[32, 127]");
        // A bias is not emulated.
        let bias = tensor(&[n as i64], BF16, device(&bf16_bytes(&vec![0.0; n])));
        refuse(&Args { bias, ..base }, "biasOptional");
        // The scale laid out unlike the weight, either way round.
        let mixed = int8_case(k, n, 32, true, false);
        refuse(&Args { w: mixed.w, scale: mixed.scale, ..base }, "contiguity must be the same as weight's");
        let mixed = int8_case(k, n, 32, false, true);
        refuse(&Args { w: mixed.w, scale: mixed.scale, ..base }, "contiguity must be the same as weight's");
        let same = int8_case(k, n, 32, true, true);
        wqbmm(&Args { w: same.w, scale: same.scale, ..base }).unwrap();
        // A per-group scale with group 0.
        refuse(&Args { group: 0, ..base }, "neither per-tensor");
    }

    /// FLOAT4_E2M1 weight [k, n] (storage [n, k] when `trans`: the checkpoint's [N, K/2] bytes)
    /// with FLOAT8_E8M0 scales [k/32, n] laid out the same way; returns (weight, scale, deq).
    fn fp4_case(k: usize, n: usize, trans: bool, dtype_seed: u64) -> (*mut aclTensor, *mut aclTensor, Vec<f64>) {
        let mut r = lcg(dtype_seed);
        let codes: Vec<u8> = (0..k * n).map(|_| (r() * 16.0) as u8).collect(); // [k][n]
        let groups = k.div_ceil(32);
        let exps: Vec<u8> = (0..groups * n).map(|_| 118 + (r() * 16.0) as u8).collect(); // [G][n]
                                                                                         // Storage order of the codes, packed two a byte, the even offset in the low nibble.
        let order: Vec<u8> = if trans {
            (0..n).flat_map(|c| (0..k).map(move |q| (q, c))).map(|(q, c)| codes[q * n + c]).collect()
        } else {
            codes.clone()
        };
        let packed: Vec<u8> = order.chunks(2).map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4)).collect();
        let sbytes: Vec<u8> = if trans {
            (0..n).flat_map(|c| (0..groups).map(move |q| (q, c))).map(|(q, c)| exps[q * n + c]).collect()
        } else {
            exps.clone()
        };
        let (wp, sp) = (device(&packed), device(&sbytes));
        let (fp4, e8) = (aclDataType::ACL_FLOAT4_E2M1, aclDataType::ACL_FLOAT8_E8M0);
        let (w, s) = if trans {
            (transposed([k as i64, n as i64], fp4, wp), transposed([groups as i64, n as i64], e8, sp))
        } else {
            (tensor(&[k as i64, n as i64], fp4, wp), tensor(&[groups as i64, n as i64], e8, sp))
        };
        let deq = (0..k * n)
            .map(|i| bf16_round(decode_e2m1(codes[i]) * decode_e8m0(exps[(i / n / 32) * n + i % n])))
            .collect();
        (w, s, deq)
    }

    #[test]
    fn mx_fp4_equals_dequantise_then_matmul() {
        setup(S950);
        let (m, k, n) = (3, 96, 6);
        for trans in [true, false] {
            let (w, scale, deq) = fp4_case(k, n, trans, 11);
            let x = x_tensor(m, k, 3);
            let (y, yp) = y_tensor(m, n);
            wqbmm(&Args { x, w, scale, offset: null(), bias: null(), group: 32, y }).unwrap();
            let got = download(yp, m * n * 2);
            assert_eq!(got, matmul_reference(x, &deq, m, k, n), "transposed: {trans}");
            assert!(got.chunks(2).any(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32() != 0.0));
        }
    }

    #[test]
    fn mx_fp4_refusals() {
        let (m, k, n) = (2, 64, 4);
        setup(A2);
        let (w, scale, _) = fp4_case(k, n, true, 5);
        let (y, _) = y_tensor(m, n);
        let a = Args { x: x_tensor(m, k, 4), w, scale, offset: null(), bias: null(), group: 32, y };
        let err = wqbmm(&a).expect_err("FP4 on A2");
        assert!(err.contains("footnote 2") && err.contains("FLOAT4_E2M1"), "{err}");
        setup(S950);
        wqbmm(&a).unwrap();
        let err = wqbmm(&Args { group: 64, ..a }).expect_err("MX group 64");
        assert!(err.contains("supports only 32"), "{err}");
        // The last dimension must be even: n = 5 is refused stored contiguously and stored
        // transposed (where the storage's last dimension, k = 64, is even).
        let (w5, s5, _) = fp4_case(k, 5, false, 6);
        let (y5, _) = y_tensor(m, 5);
        let err = wqbmm(&Args { w: w5, scale: s5, y: y5, ..a }).expect_err("odd last dimension");
        assert!(err.contains("must be even"), "{err}");
        let (w5t, s5t, _) = fp4_case(k, 5, true, 6);
        let (y5t, _) = y_tensor(m, 5);
        let err = wqbmm(&Args { w: w5t, scale: s5t, y: y5t, ..a }).expect_err("odd n, transposed");
        assert!(err.contains("n is 5"), "{err}");
    }

    #[test]
    fn fp8_per_channel_on_the_950_only() {
        let (m, k, n) = (2, 64, 5);
        let mut r = lcg(9);
        let codes: Vec<u8> = (0..k * n).map(|_| (r() * 256.0) as u8 & 0xF7).collect(); // no NaN (0x7F/0xFF)
        let sv: Vec<f64> = (0..n).map(|_| bf16_round(0.01 + r())).collect();
        let fp8 = aclDataType::ACL_FLOAT8_E4M3FN;
        setup(S950);
        let w = tensor(&[k as i64, n as i64], fp8, device(&codes));
        let scale = tensor(&[n as i64], BF16, device(&bf16_bytes(&sv)));
        let x = x_tensor(m, k, 6);
        let (y, yp) = y_tensor(m, n);
        let a = Args { x, w, scale, offset: null(), bias: null(), group: 0, y };
        wqbmm(&a).unwrap();
        let deq: Vec<f64> = (0..k * n).map(|i| bf16_round(decode_e4m3fn(codes[i]) * sv[i % n])).collect();
        assert_eq!(download(yp, m * n * 2), matmul_reference(x, &deq, m, k, n));
        // Per-group FP8 is refused (per-channel only).
        let gs: Vec<f64> = vec![0.5; 2 * n];
        let gscale = tensor(&[2, n as i64], BF16, device(&bf16_bytes(&gs)));
        let err = wqbmm(&Args { scale: gscale, group: 32, ..a }).expect_err("FP8 per-group");
        assert!(err.contains("only per-channel"), "{err}");
        // And FP8 on Atlas A2 at all.
        setup(A2);
        let err = wqbmm(&a).expect_err("FP8 on A2");
        assert!(err.contains("footnote 2") && err.contains("FLOAT8_E4M3FN"), "{err}");
    }
}
