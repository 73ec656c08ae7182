//! `aclnnCompressor` (ops-transformer `attention/compressor/docs/aclnnCompressor.md`): the KV
//! compressor of DeepSeek-V4's compressed attention, with the documented constraints per SoC.
//! The semantics follow the operator's own golden (`attention/compressor/tests/pytest/
//! compressor_golden.py`, `cpu_compressor_fp64`, `write_state_page_cache`,
//! `read_state_page_cache`).
//!
//! Per batch `b` with `s` = startPos[b] (0 when NULL) and `u` = seqused[b] (the batch's whole
//! length when NULL), the positions `p` in `s..s + u` (x rows from the batch's first row on):
//! * `kv(p) = x(p) · wkvᵀ` and `score(p) = x(p) · wgateᵀ + ape[p % cmpRatio]` (coff·D values each);
//! * the new `[kv | score]` rows are saved into stateCacheRef (FLOAT `[block_num, block_size,
//!   2·coff·D]`; per row the coff·D kv values, then the coff·D score values: the golden's
//!   torch driver builds the one aclnn tensor as `state_cache[:, :, :half] = kv_state`,
//!   `state_cache[:, :, half:] = score_state`). cacheMode 1 (linear): position `p` is row
//!   `p % block_size` of block `table[b][p / block_size]`, and a table entry 0 means "do not
//!   write" (those positions are skipped). cacheMode 2 (ring buffer, 950 only): row
//!   `p % block_size` of block `table[b]`, only the positions `p ≥ ⌊(s+u)/r⌋·r − (coff−1)·r` (the
//!   golden's `save_flag`, which on its window-aligned chunks is exactly this rule);
//! * every window `k` (positions `k·r .. (k+1)·r`, r = cmpRatio) that this step completes
//!   (`⌊s/r⌋ ≤ k < ⌊(s+u)/r⌋`) is pooled into one row of cmpKvOut: the candidates are, for
//!   coff 2, columns `[0, D)` of the previous window's r positions (kv 0 and score −inf when
//!   k = 0) and columns `[D, 2D)` of window k's positions; for coff 1 the window's r positions.
//!   Positions before `s` are read from the state (through the same addressing), later ones
//!   are this step's new rows. Softmax per column over the coff·r candidates, times kv, summed.
//! * cmpKvOut rows: TND (x `[T, H]`) packed in order over the batches (the golden's
//!   `out_sum_sc_cnt`); BSH (x `[B, S, H]`) row `j` of batch b for its j-th window. Rows after
//!   the last one written are left untouched (the golden masks them out).
//!
//! Numerics: the projections in f64 from the stored x / weight values; the new state rows
//! rounded to f32 once; the pooling in f64 from the new rows' f64 values and the state rows as
//! stored; each output row rounded once to x's dtype. (The real kernel computes in f32; its
//! own checks compare against a float32 golden with bf16/fp16 tolerances.)
//!
//! Arguments. x, wkv, wgate, stateCacheRef, ape, cmpKvOut, softmaxScoreOut and kvOut are
//! required (NULL: ACLNN_ERR_PARAM_NULLPTR). softmaxScoreOut and kvOut are documented outputs
//! (not optional) whose contents are valid only with gradEnabled: the torch wrapper always
//! passes FLOAT `[rows, coff·r, D]` tensors; the emulator checks them so and leaves them
//! untouched. stateBlockTableOptional is documented as optional but the operator's host checks
//! (`op_host/arch35/compressor_tiling.cpp`) require it and NULL's meaning is undocumented: NULL
//! is refused as not emulated. The stored `examples/test_aclnn_compressor.cpp` calls an older
//! prototype (no gradEnabled, softmaxScoreOut, kvOut); the doc's prototype is the one declared.
//!
//! Where the emulator is stricter than the golden, on purpose:
//! * reading the state through a table entry 0 (cacheMode 1) fails the launch: the golden
//!   only prints an error and reads anyway, but entry 0 means "not kept", so that read returns
//!   whatever block 0 holds;
//! * a state row that one call both reads and writes (aliased table entries, or a ring buffer
//!   too small) fails the launch: the result would depend on the kernel's order;
//! * the table must have at least ⌈Smax / block_size⌉ columns (the doc gives exactly that
//!   width; the golden's tables are sized by the model's maximum length, so wider is accepted).
//!
//! SoCs: Atlas A3 (`Ascend910_93*`) and Ascend 950 only. Atlas A2 is "不支持" in
//! aclnnCompressor.md (the op registration / torch docs may list it: the emulator follows
//! aclnnCompressor.md). On A3: cacheMode 1 only, stateCacheRef contiguous in dim 0, cmpRatio in
//! {2, 4, ..., 128}, gradEnabled false. gradEnabled true on the 950 is refused as not emulated.
//! D ∈ {128, 512}, H in 1024..=10240 and a multiple of 512, block_size in 1..=1024, and only the
//! three combinations the doc lists: C4A (D 512, coff 2, r 4), C4Li (D 128, coff 2, r 4),
//! C128A (D 512, coff 1, r 128).
//!
//! Device tensors (cuSeqlens, seqused, startPos, the block table) are read when the stream
//! runs, as in `indexer.rs`; the rules on their values fail the launch there.

use std::collections::HashMap;
use std::ffi::c_void;

use dsv4_ascend_sys::{aclDataType, aclOpExecutor, aclTensor, aclnnStatus, aclrtStream, ACLNN_ERR_PARAM_NULLPTR};

use crate::fused::{family, optional};
use crate::mem::{dtype_name, Desc, Memory};
use crate::ops::{plan, ws_for, R};
use crate::{fail, get_workspace, launch, soc_name, Emu, Plan};

launcher!(aclnnCompressor);

const DOC: &str = "attention/compressor/docs/aclnnCompressor.md";
const OP: &str = "aclnnCompressor";

/// The three combinations (D, coff, cmpRatio) the doc supports.
const COMBOS: [(usize, usize, usize, &str); 3] = [(512, 2, 4, "C4A"), (128, 2, 4, "C4Li"), (512, 1, 128, "C128A")];

/// Everything the kernel needs besides the memory, fixed at planning.
struct Job {
    /// x is [B, S, H] (else [T, H] with cuSeqlens).
    bsh: bool,
    batch: usize,
    /// S (BSH only).
    seq: usize,
    tokens: usize,
    h: usize,
    d: usize,
    coff: usize,
    ratio: usize,
    ring: bool,
    block_num: usize,
    block_size: usize,
    x: Desc,
    wkv: Desc,
    wgate: Desc,
    ape: Desc,
    state: Desc,
    table: Desc,
    cu: Option<Desc>,
    used: Option<Desc>,
    start: Option<Desc>,
    out: Desc,
}

/// A 1-D INT32 tensor of `len` elements, contiguous.
fn int32_1d(d: &Desc, len: usize, name: &str, what: &str) -> R<()> {
    if d.dtype != aclDataType::ACL_INT32 {
        return Err(format!("{name} must be INT32, got {} ({DOC})", dtype_name(d.dtype)));
    }
    if d.dims != [len] {
        return Err(format!("{name} has shape {:?}; it must be [{what}] = [{len}] ({DOC})", d.dims));
    }
    if !d.is_contiguous() {
        return Err(format!("{name} must be contiguous, got {} ({DOC})", d.describe()));
    }
    Ok(())
}

fn float_shaped(d: &Desc, want: &[usize], name: &str) -> R<()> {
    if d.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("{name} must be FLOAT, got {} ({DOC})", dtype_name(d.dtype)));
    }
    if d.dims != want {
        return Err(format!("{name} has shape {:?}, expected {want:?} ({DOC})", d.dims));
    }
    if !d.is_contiguous() {
        return Err(format!("{name} must be contiguous (非连续 ×), got {} ({DOC})", d.describe()));
    }
    Ok(())
}

/// The arguments of GetWorkspaceSize, after the NULL checks.
struct Args {
    x: *const aclTensor,
    wkv: *const aclTensor,
    wgate: *const aclTensor,
    state: *const aclTensor,
    ape: *const aclTensor,
    table: *const aclTensor,
    cu: *const aclTensor,
    used: *const aclTensor,
    start: *const aclTensor,
    ratio: i64,
    coff: i64,
    cache_mode: i64,
    stride0: i64,
    grad: bool,
    out: *const aclTensor,
    softmax: *const aclTensor,
    kv: *const aclTensor,
}

#[no_mangle]
pub unsafe extern "C" fn aclnnCompressorGetWorkspaceSize(
    x: *const aclTensor,
    wkv: *const aclTensor,
    wgate: *const aclTensor,
    stateCacheRef: *mut aclTensor,
    ape: *const aclTensor,
    stateBlockTableOptional: *const aclTensor,
    cuSeqlensOptional: *const aclTensor,
    sequsedOptional: *const aclTensor,
    startPosOptional: *const aclTensor,
    cmpRatio: i64,
    coff: i64,
    cacheMode: i64,
    stateCacheStrideDim0: i64,
    gradEnabled: bool,
    cmpKvOut: *const aclTensor,
    softmaxScoreOut: *const aclTensor,
    kvOut: *const aclTensor,
    workspaceSize: *mut u64,
    executor: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let required = [
        (x, "x"),
        (wkv, "wkv"),
        (wgate, "wgate"),
        (stateCacheRef as *const aclTensor, "stateCacheRef"),
        (ape, "ape"),
        (cmpKvOut, "cmpKvOut"),
        (softmaxScoreOut, "softmaxScoreOut"),
        (kvOut, "kvOut"),
    ];
    if let Some((_, name)) = required.iter().find(|(p, _)| p.is_null()) {
        return fail(
            ACLNN_ERR_PARAM_NULLPTR,
            format!("{OP}GetWorkspaceSize: {name} is NULL; it is a required argument ({DOC})"),
        );
    }
    let a = Args {
        x,
        wkv,
        wgate,
        state: stateCacheRef,
        ape,
        table: stateBlockTableOptional,
        cu: cuSeqlensOptional,
        used: sequsedOptional,
        start: startPosOptional,
        ratio: cmpRatio,
        coff,
        cache_mode: cacheMode,
        stride0: stateCacheStrideDim0,
        grad: gradEnabled,
        out: cmpKvOut,
        softmax: softmaxScoreOut,
        kv: kvOut,
    };
    get_workspace(OP, workspaceSize, executor, |e: &Emu| compressor_plan(e, &a))
}
const _: dsv4_ascend_sys::pfn::aclnnCompressorGetWorkspaceSize = aclnnCompressorGetWorkspaceSize;

fn compressor_plan(e: &Emu, a: &Args) -> R<Plan> {
    let soc = soc_name();
    let fam = family();
    match fam {
        "A3" | "950" => {}
        "A2" => {
            return Err(format!(
                "not supported on {soc}: {DOC} marks Atlas A2 as 不支持 (Atlas A3 and Ascend 950 only)"
            ))
        }
        _ => return Err(format!("not supported on {soc} ({DOC}: Atlas A3 and Ascend 950 only)")),
    }
    let a3 = fam == "A3";

    // Attributes.
    if !(2..=128).contains(&a.ratio) {
        return Err(format!("cmpRatio {} is outside [2, 128] ({DOC})", a.ratio));
    }
    if a3 && !(a.ratio as u64).is_power_of_two() {
        return Err(format!(
            "cmpRatio {} is not supported on {soc}: Atlas A3 takes only 2/4/8/16/32/64/128 ({DOC})",
            a.ratio
        ));
    }
    if !matches!(a.coff, 1 | 2) {
        return Err(format!("coff {} is not 1 or 2 ({DOC})", a.coff));
    }
    if !matches!(a.cache_mode, 1 | 2) {
        return Err(format!("cacheMode {} is not 1 (linear buffer) or 2 (ring buffer) ({DOC})", a.cache_mode));
    }
    if a3 && a.cache_mode == 2 {
        return Err(format!("cacheMode 2 (ring buffer) is not supported on {soc}: Atlas A3 takes cacheMode 1 ({DOC})"));
    }
    if a.grad {
        return Err(if a3 {
            format!("gradEnabled true is not supported on {soc} (Atlas A3, {DOC})")
        } else {
            "gradEnabled true (softmaxScoreOut / kvOut intermediates for the backward pass) is not emulated".into()
        });
    }
    let (ratio, coff) = (a.ratio as usize, a.coff as usize);

    // x, wkv, wgate.
    let xd = e.tensor(a.x, "x")?;
    if !matches!(xd.dtype, aclDataType::ACL_FLOAT16 | aclDataType::ACL_BF16) {
        return Err(format!("x must be FLOAT16 or BFLOAT16, got {} ({DOC})", dtype_name(xd.dtype)));
    }
    let bsh = match xd.dims.len() {
        3 => true,
        2 => false,
        _ => return Err(format!("x has shape {:?}; it must be [T, H] or [B, S, H] ({DOC})", xd.dims)),
    };
    if !xd.is_contiguous() {
        return Err(format!("x must be contiguous (非连续 ×), got {} ({DOC})", xd.describe()));
    }
    let h = *xd.dims.last().expect("rank checked");
    let wkv = e.tensor(a.wkv, "wkv")?;
    let wgate = e.tensor(a.wgate, "wgate")?;
    for (w, name) in [(&wkv, "wkv"), (&wgate, "wgate")] {
        if w.dtype != xd.dtype {
            return Err(format!(
                "{name} has dtype {}; it must be x's dtype {} ({DOC})",
                dtype_name(w.dtype),
                dtype_name(xd.dtype)
            ));
        }
        if w.dims.len() != 2 || w.dims[1] != h {
            return Err(format!("{name} has shape {:?}; it must be [coff * D, H] with H = {h} from x ({DOC})", w.dims));
        }
        if w.numel() == 0 {
            return Err(format!("{name} {:?} is empty (不支持空Tensor, {DOC})", w.dims));
        }
        if !w.is_contiguous() {
            return Err(format!("{name} must be contiguous (非连续 ×), got {} ({DOC})", w.describe()));
        }
    }
    if wgate.dims != wkv.dims {
        return Err(format!("wgate {:?} must have wkv's shape {:?} ([coff * D, H], {DOC})", wgate.dims, wkv.dims));
    }
    if wkv.dims[0] % coff != 0 {
        return Err(format!("wkv has {} rows, not a multiple of coff {coff} (D = rows / coff, {DOC})", wkv.dims[0]));
    }
    let d = wkv.dims[0] / coff;
    if !matches!(d, 128 | 512) {
        return Err(format!("D = wkv rows / coff = {} / {coff} = {d}; supported: 128, 512 ({DOC})", wkv.dims[0]));
    }
    if !COMBOS.iter().any(|&(cd, cc, cr, _)| (cd, cc, cr) == (d, coff, ratio)) {
        return Err(format!(
            "D {d}, coff {coff}, cmpRatio {ratio} is not one of the supported combinations C4A (512, 2, 4), \
             C4Li (128, 2, 4), C128A (512, 1, 128) ({DOC}: 支持如下三种典型组合场景)"
        ));
    }
    if !(1024..=10240).contains(&h) || h % 512 != 0 {
        return Err(format!(
            "H = {h}: supported 1K..10K, 512-aligned, i.e. a multiple of 512 in [1024, 10240] ({DOC})"
        ));
    }
    let cd = coff * d;

    // stateCacheRef.
    let st = e.tensor(a.state, "stateCacheRef")?;
    if st.dtype != aclDataType::ACL_FLOAT {
        return Err(format!("stateCacheRef must be FLOAT, got {} ({DOC})", dtype_name(st.dtype)));
    }
    if st.dims.len() != 3 || st.dims[2] != 2 * cd {
        return Err(format!(
            "stateCacheRef has shape {:?}; it must be [block_num, block_size, 2 * coff * D] = [.., .., {}] ({DOC})",
            st.dims,
            2 * cd
        ));
    }
    let (block_num, block_size) = (st.dims[0], st.dims[1]);
    if block_num == 0 {
        return Err(format!("stateCacheRef has block_num 0; block_num must be > 0 ({DOC})"));
    }
    if !(1..=1024).contains(&block_size) {
        return Err(format!("stateCacheRef has block_size {block_size}; supported 1..=1024 ({DOC})"));
    }
    let row = 2 * cd;
    if (st.dims[2] != 1 && st.strides[2] != 1) || (block_size != 1 && st.strides[1] != row) {
        return Err(format!(
            "stateCacheRef {}: only dim 0 may be non-contiguous (支持0轴非连续, {DOC})",
            st.describe()
        ));
    }
    let dense0 = block_size * row;
    if block_num > 1 && st.strides[0] != dense0 {
        if a3 {
            return Err(format!(
                "stateCacheRef {} is non-contiguous in dim 0, which {soc} (Atlas A3) does not support ({DOC})",
                st.describe()
            ));
        }
        if st.strides[0] < dense0 {
            return Err(format!(
                "stateCacheRef {}: a dim-0 stride below block_size * 2 * coff * D = {dense0} makes blocks overlap",
                st.describe()
            ));
        }
    }
    if a.stride0 != st.strides[0] as i64 {
        return Err(format!(
            "stateCacheStrideDim0 {} is not stateCacheRef's dim-0 stride {} (the framework passes the actual stride, {DOC})",
            a.stride0, st.strides[0]
        ));
    }

    // ape.
    let ape = e.tensor(a.ape, "ape")?;
    float_shaped(&ape, &[ratio, cd], "ape ([cmp_ratio, coff * D])")?;

    // The batch, cuSeqlens, seqused, startPos.
    let cu = optional(e, a.cu, "cuSeqlensOptional")?;
    let (batch, seq, tokens) = if bsh {
        if cu.is_some() {
            return Err(format!("cuSeqlensOptional must be NULL when x is [B, S, H] ({DOC})"));
        }
        (xd.dims[0], xd.dims[1], xd.dims[0] * xd.dims[1])
    } else {
        let c = cu.as_ref().ok_or_else(|| format!("cuSeqlensOptional is required when x is [T, H] ({DOC})"))?;
        if c.dims.len() != 1 || c.dims[0] == 0 {
            return Err(format!("cuSeqlensOptional has shape {:?}; it must be [B + 1] ({DOC})", c.dims));
        }
        int32_1d(c, c.dims[0], "cuSeqlensOptional", "B + 1")?;
        (c.dims[0] - 1, 0, xd.dims[0])
    };
    let used = optional(e, a.used, "sequsedOptional")?;
    if let Some(u) = &used {
        int32_1d(u, batch, "sequsedOptional", "B")?;
    }
    let start = optional(e, a.start, "startPosOptional")?;
    if let Some(s) = &start {
        int32_1d(s, batch, "startPosOptional", "B")?;
    }

    // The block table.
    let table = optional(e, a.table, "stateBlockTableOptional")?.ok_or_else(|| {
        "stateBlockTableOptional NULL is not emulated (its meaning is undocumented; the operator's host checks \
         require the table)"
            .to_string()
    })?;
    if table.dtype != aclDataType::ACL_INT32 {
        return Err(format!("stateBlockTableOptional must be INT32, got {} ({DOC})", dtype_name(table.dtype)));
    }
    if !table.is_contiguous() {
        return Err(format!("stateBlockTableOptional must be contiguous (非连续 ×), got {} ({DOC})", table.describe()));
    }
    if a.cache_mode == 1 {
        if table.dims.len() != 2 || table.dims[0] != batch {
            return Err(format!(
                "stateBlockTableOptional has shape {:?}; with cacheMode 1 it must be [B, ceil(Smax / block_size)] \
                 with B = {batch} ({DOC})",
                table.dims
            ));
        }
    } else {
        if table.dims != [batch] {
            return Err(format!(
                "stateBlockTableOptional has shape {:?}; with cacheMode 2 it must be [B] = [{batch}] ({DOC})",
                table.dims
            ));
        }
        if block_num < batch {
            return Err(format!(
                "stateCacheRef has {block_num} blocks; with cacheMode 2 it needs at least one per batch ({batch})"
            ));
        }
        if bsh && batch > 0 && seq > 0 && block_size < coff * ratio + seq - 1 {
            return Err(format!(
                "cacheMode 2 needs block_size >= coff * cmp_ratio + S - 1 = {}, got {block_size} ({DOC})",
                coff * ratio + seq - 1
            ));
        }
    }

    // Outputs.
    let out = e.tensor(a.out, "cmpKvOut")?;
    if out.dtype != xd.dtype {
        return Err(format!(
            "cmpKvOut has dtype {}; it must be x's dtype {} ({DOC})",
            dtype_name(out.dtype),
            dtype_name(xd.dtype)
        ));
    }
    let rows: Vec<usize> =
        if bsh { vec![batch, seq.div_ceil(ratio)] } else { vec![tokens.min(tokens / ratio + batch)] };
    let mut out_dims = rows.clone();
    out_dims.push(d);
    if out.dims != out_dims {
        return Err(format!(
            "cmpKvOut has shape {:?}, expected {out_dims:?} ({}; {DOC})",
            out.dims,
            if bsh { "[B, ceil(S / cmp_ratio), D]" } else { "[min(T, T / cmp_ratio + B), D]" }
        ));
    }
    if !out.is_contiguous() {
        return Err(format!("cmpKvOut must be contiguous (非连续 ×), got {} ({DOC})", out.describe()));
    }
    let mut mid_dims = rows;
    mid_dims.extend([coff * ratio, d]);
    let sm = e.tensor(a.softmax, "softmaxScoreOut")?;
    float_shaped(&sm, &mid_dims, "softmaxScoreOut")?;
    let kvo = e.tensor(a.kv, "kvOut")?;
    float_shaped(&kvo, &mid_dims, "kvOut")?;

    // Outputs (the state included) must not share memory with each other or the inputs.
    let ins: Vec<(&Desc, &str)> = [
        (Some(&xd), "x"),
        (Some(&wkv), "wkv"),
        (Some(&wgate), "wgate"),
        (Some(&ape), "ape"),
        (Some(&table), "stateBlockTableOptional"),
        (cu.as_ref(), "cuSeqlensOptional"),
        (used.as_ref(), "sequsedOptional"),
        (start.as_ref(), "startPosOptional"),
    ]
    .into_iter()
    .filter_map(|(d, n)| d.map(|d| (d, n)))
    .collect();
    let outs = [(&st, "stateCacheRef"), (&out, "cmpKvOut"), (&sm, "softmaxScoreOut"), (&kvo, "kvOut")];
    for (i, (o, on)) in outs.iter().enumerate() {
        for (x, xn) in ins.iter().chain(&outs[i + 1..]) {
            if o.overlaps(x) {
                return Err(format!("{on} overlaps {xn}"));
            }
        }
    }

    let mut reads = vec![xd.clone(), wkv.clone(), wgate.clone(), ape.clone(), table.clone(), st.clone()];
    reads.extend([&cu, &used, &start].into_iter().flatten().cloned());
    let writes = vec![st.clone(), out.clone(), sm, kvo];
    let job = Job {
        bsh,
        batch,
        seq,
        tokens,
        h,
        d,
        coff,
        ratio,
        ring: a.cache_mode == 2,
        block_num,
        block_size,
        x: xd,
        wkv,
        wgate,
        ape,
        state: st,
        table,
        cu,
        used,
        start,
        out: out.clone(),
    };
    Ok(plan(ws_for(&out), reads, writes, vec![], move |mem| job.run(mem)))
}

/// Where a state position lives: (block, row).
type Slot = (usize, usize);

impl Job {
    /// Each batch's (first x row, length, used, start position), checked.
    fn batches(&self, mem: &Memory) -> R<Vec<(usize, usize, usize, usize)>> {
        let b = self.batch;
        let spans: Vec<(usize, usize)> = if self.bsh {
            (0..b).map(|i| (i * self.seq, self.seq)).collect()
        } else {
            let v = self.cu.as_ref().expect("TND has cuSeqlens").read(mem, "cuSeqlensOptional")?;
            if v[0] != 0.0 {
                return Err(format!("cuSeqlensOptional must start at 0 (第一位必须为0), got {v:?} ({DOC})"));
            }
            if let Some(i) = (1..v.len()).find(|&i| v[i] < v[i - 1]) {
                return Err(format!(
                    "cuSeqlensOptional must be non-decreasing, but [{i}] = {} < [{}] = {} ({DOC})",
                    v[i],
                    i - 1,
                    v[i - 1]
                ));
            }
            if v[b] as usize != self.tokens {
                return Err(format!("cuSeqlensOptional ends at {}, but x has T = {} rows", v[b], self.tokens));
            }
            v.windows(2).map(|w| (w[0] as usize, (w[1] - w[0]) as usize)).collect()
        };
        let used = match &self.used {
            Some(u) => u.read(mem, "sequsedOptional")?,
            None => spans.iter().map(|s| s.1 as f64).collect(),
        };
        let starts = match &self.start {
            Some(s) => s.read(mem, "startPosOptional")?,
            None => vec![0.0; b],
        };
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let (first, len) = spans[i];
            if used[i] < 0.0 || used[i] as usize > len {
                return Err(format!(
                    "sequsedOptional[{i}] = {}: it must lie in [0, {len}] (0 <= seqused[n] <= {}, {DOC})",
                    used[i],
                    if self.bsh { "S" } else { "cu_seqlens[n+1] - cu_seqlens[n]" }
                ));
            }
            if starts[i] < 0.0 {
                return Err(format!("startPosOptional[{i}] = {} is negative", starts[i]));
            }
            out.push((first, len, used[i] as usize, starts[i] as usize));
        }
        Ok(out)
    }

    fn run(&self, mem: &mut Memory) -> R<()> {
        let batches = self.batches(mem)?;
        if batches.is_empty() || self.tokens == 0 {
            return Ok(()); // B, S or T = 0: the state is not updated, cmpKvOut is empty.
        }
        let (r, coff, d, bs) = (self.ratio, self.coff, self.d, self.block_size);
        let cd = coff * d;
        let tv = self.table.read(mem, "stateBlockTableOptional")?;
        let cols = if self.ring { 1 } else { self.table.dims[1] };
        if self.ring {
            let s_max = batches.iter().map(|b| b.2).max().unwrap_or(0);
            if s_max > 0 && bs < coff * r + s_max - 1 {
                return Err(format!(
                    "cacheMode 2 needs block_size >= coff * cmp_ratio + S - 1 = {} (S = {s_max}, the longest used \
                     sequence), got {bs} ({DOC})",
                    coff * r + s_max - 1
                ));
            }
        } else {
            let longest = batches.iter().map(|b| b.1).max().unwrap_or(0);
            let s_max = batches.iter().map(|b| b.3).max().unwrap_or(0) + longest;
            if cols < s_max.div_ceil(bs) {
                return Err(format!(
                    "stateBlockTableOptional has {cols} columns; cacheMode 1 needs ceil(Smax / block_size) = \
                     ceil({s_max} / {bs}) = {} (Smax = max(start_pos) + {}, {DOC})",
                    s_max.div_ceil(bs),
                    if self.bsh { "S" } else { "max(cu_seqlens[n+1] - cu_seqlens[n])" }
                ));
            }
        }
        // The block of position p of batch b, for a read (`write` false) or a write; None: skip.
        let block_of = |b: usize, p: usize, write: bool| -> R<Option<Slot>> {
            let (at, what) =
                if self.ring { (b, format!("[{b}]")) } else { (b * cols + p / bs, format!("[{b}][{}]", p / bs)) };
            let id = tv[at];
            if id < 0.0 || id as usize >= self.block_num {
                return Err(format!(
                    "stateBlockTableOptional{what} = {id} (position {p} of batch {b}) is outside the {} blocks of \
                     stateCacheRef",
                    self.block_num
                ));
            }
            if !self.ring && id == 0.0 {
                if write {
                    return Ok(None);
                }
                return Err(format!(
                    "position {p} of batch {b} must be read from the state, but stateBlockTableOptional{what} is 0 \
                     (a block that is not kept: the read would return whatever block 0 holds)"
                ));
            }
            Ok(Some((id as usize, p % bs)))
        };

        let xv = self.x.read(mem, "x")?;
        let wk = self.wkv.read(mem, "wkv")?;
        let wg = self.wgate.read(mem, "wgate")?;
        let ape = self.ape.read(mem, "ape")?;
        let h = self.h;
        let dot = |xr: &[f64], w: &[f64], j: usize| -> f64 {
            xr.iter().zip(&w[j * h..(j + 1) * h]).map(|(a, b)| a * b).sum()
        };

        // Pass 1: projections, the windows, the state rows read.
        let mut outputs: Vec<(usize, Vec<f64>)> = vec![];
        let mut state_writes: Vec<(Slot, Vec<f64>, usize, usize)> = vec![];
        let mut read_slots: HashMap<Slot, (usize, usize)> = HashMap::new();
        let mut out_row = 0usize;
        let per_batch_rows = self.seq.div_ceil(r);
        let capacity = if self.bsh { per_batch_rows } else { self.out.dims[0] };
        for (b, &(first, _len, used, s)) in batches.iter().enumerate() {
            // This step's rows [kv | score] in f64.
            let new: Vec<Vec<f64>> = (0..used)
                .map(|i| {
                    let p = s + i;
                    let xr = &xv[(first + i) * h..(first + i + 1) * h];
                    let mut v = vec![0f64; 2 * cd];
                    for j in 0..cd {
                        v[j] = dot(xr, &wk, j);
                        v[cd + j] = dot(xr, &wg, j) + ape[(p % r) * cd + j];
                    }
                    v
                })
                .collect();
            let mut cache: HashMap<usize, Vec<f64>> = HashMap::new();
            let mut row_at = |p: usize, mem: &Memory, read_slots: &mut HashMap<Slot, (usize, usize)>| -> R<Vec<f64>> {
                if p >= s {
                    return Ok(new[p - s].clone());
                }
                if let Some(v) = cache.get(&p) {
                    return Ok(v.clone());
                }
                let slot = block_of(b, p, false)?.expect("reads never skip");
                read_slots.insert(slot, (b, p));
                let v = self.state.slice(0, slot.0).slice(0, slot.1).read(mem, "stateCacheRef")?;
                cache.insert(p, v.clone());
                Ok(v)
            };
            let (k0, k1) = (s / r, (s + used) / r);
            for (j, k) in (k0..k1).enumerate() {
                // Candidates: (kv, score) columns of D values each.
                let mut cands: Vec<(Vec<f64>, Vec<f64>)> = Vec::with_capacity(coff * r);
                if coff == 2 {
                    for q in 0..r {
                        if k == 0 {
                            cands.push((vec![0.0; d], vec![f64::NEG_INFINITY; d]));
                        } else {
                            let v = row_at((k - 1) * r + q, mem, &mut read_slots)?;
                            cands.push((v[..d].to_vec(), v[cd..cd + d].to_vec()));
                        }
                    }
                }
                let off = (coff - 1) * d;
                for q in 0..r {
                    let v = row_at(k * r + q, mem, &mut read_slots)?;
                    cands.push((v[off..off + d].to_vec(), v[cd + off..cd + off + d].to_vec()));
                }
                let mut pooled = vec![0f64; d];
                for (c, o) in pooled.iter_mut().enumerate() {
                    let m = cands.iter().map(|x| x.1[c]).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = cands.iter().map(|x| (x.1[c] - m).exp()).sum();
                    *o = cands.iter().map(|x| (x.1[c] - m).exp() / z * x.0[c]).sum();
                }
                let at = if self.bsh { b * per_batch_rows + j } else { out_row };
                if (self.bsh && j >= capacity) || (!self.bsh && out_row >= capacity) {
                    return Err(format!("batch {b} completes more windows than cmpKvOut has rows ({capacity})"));
                }
                outputs.push((at, pooled));
                out_row += 1;
            }
            // The rows saved.
            let keep_from = if self.ring { ((s + used) / r * r).saturating_sub((coff - 1) * r) } else { 0 };
            for (i, v) in new.into_iter().enumerate() {
                let p = s + i;
                if p < keep_from {
                    continue;
                }
                if let Some(slot) = block_of(b, p, true)? {
                    state_writes.push((slot, v, b, p));
                }
            }
        }
        // A row both read and written (or written twice) would depend on the kernel's order.
        let mut written: HashMap<Slot, (usize, usize)> = HashMap::new();
        for (slot, _, b, p) in &state_writes {
            if let Some((rb, rp)) = read_slots.get(slot) {
                return Err(format!(
                    "stateCacheRef block {} row {} is read (position {rp} of batch {rb}) and written (position {p} of \
                     batch {b}) by the same call: the result would depend on the kernel's order (aliased \
                     stateBlockTableOptional entries{})",
                    slot.0,
                    slot.1,
                    if self.ring { " or a ring buffer too small" } else { "" }
                ));
            }
            if let Some((wb, wp)) = written.insert(*slot, (*b, *p)) {
                return Err(format!(
                    "stateCacheRef block {} row {} is written twice by the same call (position {wp} of batch {wb} and \
                     position {p} of batch {b}): aliased stateBlockTableOptional entries",
                    slot.0, slot.1
                ));
            }
        }
        for (slot, v, _, _) in &state_writes {
            self.state.slice(0, slot.0).slice(0, slot.1).write(mem, v, "stateCacheRef")?;
        }
        for (at, v) in &outputs {
            let row = if self.bsh {
                self.out.slice(0, at / per_batch_rows).slice(0, at % per_batch_rows)
            } else {
                self.out.slice(0, *at)
            };
            row.write(mem, v, "cmpKvOut")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::ptr::null;

    use dsv4_ascend_sys::{aclDataType, aclTensor};

    use crate::test_support::{bf16_bytes, device, download, lcg, run, setup, tensor, view};

    use super::{aclnnCompressor, aclnnCompressorGetWorkspaceSize};

    const A2: &str = "Ascend910B3";
    const A3: &str = "Ascend910_9391";
    const S950: &str = "Ascend950PR_9599";
    const BF16: aclDataType = aclDataType::ACL_BF16;
    const F32: aclDataType = aclDataType::ACL_FLOAT;
    const I32: aclDataType = aclDataType::ACL_INT32;
    /// What cmpKvOut rows hold before the call (exactly representable in BF16).
    const SENTINEL: f64 = 1024.0;
    /// What the state holds before the first call.
    const STATE_FILL: f64 = 0.5;

    #[derive(Clone, Copy)]
    struct Args {
        x: *const aclTensor,
        wkv: *const aclTensor,
        wgate: *const aclTensor,
        state: *mut aclTensor,
        ape: *const aclTensor,
        table: *const aclTensor,
        cu: *const aclTensor,
        used: *const aclTensor,
        start: *const aclTensor,
        ratio: i64,
        coff: i64,
        mode: i64,
        stride0: i64,
        grad: bool,
        out: *const aclTensor,
        sm: *const aclTensor,
        kv: *const aclTensor,
    }

    fn compress(a: &Args) -> Result<(), String> {
        run(
            // SAFETY: tensors created by this test; out-pointers from `run`.
            |ws, ex| unsafe {
                aclnnCompressorGetWorkspaceSize(
                    a.x, a.wkv, a.wgate, a.state, a.ape, a.table, a.cu, a.used, a.start, a.ratio, a.coff, a.mode,
                    a.stride0, a.grad, a.out, a.sm, a.kv, ws, ex,
                )
            },
            aclnnCompressor,
        )
    }

    fn f32_bytes(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
    }

    fn i32_tensor(v: &[i64], dims: &[i64]) -> *mut aclTensor {
        let b: Vec<u8> = v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect();
        tensor(dims, I32, device(&b))
    }

    fn bf16(v: f64) -> f64 {
        half::bf16::from_f64(v).to_f64()
    }

    fn f32r(v: f64) -> f64 {
        v as f32 as f64
    }

    /// Weights, ape and every batch's token sequence (x rows by absolute position).
    struct Model {
        d: usize,
        coff: usize,
        r: usize,
        h: usize,
        wkv: Vec<f64>,
        wgate: Vec<f64>,
        ape: Vec<f64>,
        xs: Vec<Vec<f64>>,
        wkv_t: *mut aclTensor,
        wgate_t: *mut aclTensor,
        ape_t: *mut aclTensor,
    }

    fn model(d: usize, coff: usize, r: usize, h: usize, batches: usize, positions: usize) -> Model {
        let mut g = lcg((d * 31 + coff * 7 + r) as u64);
        let cd = coff * d;
        let mut w = |n: usize, scale: f64| -> Vec<f64> { (0..n).map(|_| bf16((g() * 2.0 - 1.0) * scale)).collect() };
        let wkv = w(cd * h, 1.0 / 16.0);
        let wgate = w(cd * h, 1.0 / 16.0);
        let ape: Vec<f64> = w(r * cd, 1.0).into_iter().map(f32r).collect();
        let xs = (0..batches).map(|_| w(positions * h, 1.0)).collect();
        let wkv_t = tensor(&[cd as i64, h as i64], BF16, device(&bf16_bytes(&wkv)));
        let wgate_t = tensor(&[cd as i64, h as i64], BF16, device(&bf16_bytes(&wgate)));
        let ape_t = tensor(&[r as i64, cd as i64], F32, device(&f32_bytes(&ape)));
        Model { d, coff, r, h, wkv, wgate, ape, xs, wkv_t, wgate_t, ape_t }
    }

    impl Model {
        /// [kv | score] of position p of batch b, exact (f64).
        fn row(&self, b: usize, p: usize) -> Vec<f64> {
            let (cd, h) = (self.coff * self.d, self.h);
            let x = &self.xs[b][p * h..(p + 1) * h];
            let dot = |w: &[f64], j: usize| -> f64 { (0..h).map(|i| x[i] * w[j * h + i]).sum() };
            let mut v: Vec<f64> = (0..cd).map(|j| dot(&self.wkv, j)).collect();
            v.extend((0..cd).map(|j| dot(&self.wgate, j) + self.ape[(p % self.r) * cd + j]));
            v
        }

        /// The compressed rows of a step over positions start..start+used of batch b: the
        /// windows of r consecutive positions that end inside the step, each pooled over its
        /// own positions (coff 2: and the previous window's), positions before `start` as the
        /// state stores them (f32).
        fn expected(&self, b: usize, start: usize, used: usize) -> Vec<Vec<f64>> {
            let (d, r, cd) = (self.d, self.r, self.coff * self.d);
            let value = |p: usize| -> Vec<f64> {
                let v = self.row(b, p);
                if p < start {
                    v.into_iter().map(f32r).collect()
                } else {
                    v
                }
            };
            let mut out = vec![];
            let mut w = 0;
            while (w + 1) * r <= start + used {
                if (w + 1) * r > start {
                    // (kv, score) of every candidate, D columns each.
                    let mut cand: Vec<(Vec<f64>, Vec<f64>)> = vec![];
                    if self.coff == 2 {
                        for p in (w * r).saturating_sub(r)..w * r {
                            let v = value(p);
                            cand.push((v[..d].to_vec(), v[cd..cd + d].to_vec()));
                        }
                    }
                    let lo = (self.coff - 1) * d;
                    for p in w * r..(w + 1) * r {
                        let v = value(p);
                        cand.push((v[lo..lo + d].to_vec(), v[cd + lo..cd + lo + d].to_vec()));
                    }
                    let row = (0..d)
                        .map(|c| {
                            let m = cand.iter().map(|x| x.1[c]).fold(f64::MIN, f64::max);
                            let den: f64 = cand.iter().map(|x| (x.1[c] - m).exp()).sum();
                            cand.iter().map(|x| x.0[c] * (x.1[c] - m).exp()).sum::<f64>() / den
                        })
                        .collect();
                    out.push(row);
                }
                w += 1;
            }
            out
        }
    }

    fn assert_rows(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: row count");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            for (c, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= b.abs() / 128.0 + 1e-12, "{what}: row {i} col {c}: got {a}, want {b}");
            }
        }
        assert!(want.is_empty() || got.iter().flatten().any(|&v| v != 0.0 && v.is_finite()), "{what}: not vacuous");
    }

    /// The state cache and its table.
    struct Session {
        state: *mut aclTensor,
        state_p: *mut c_void,
        stride0: i64,
        table: *mut aclTensor,
        mode: i64,
        dims: [usize; 3],
    }

    fn session(m: &Model, block_num: usize, bs: usize, table: &[i64], table_dims: &[i64], mode: i64) -> Session {
        let row = 2 * m.coff * m.d;
        let p = device(&f32_bytes(&vec![STATE_FILL; block_num * bs * row]));
        let dims = [block_num as i64, bs as i64, row as i64];
        Session {
            state: tensor(&dims, F32, p),
            state_p: p,
            stride0: (bs * row) as i64,
            table: i32_tensor(table, table_dims),
            mode,
            dims: [block_num, bs, row],
        }
    }

    impl Session {
        /// Row `row` of block `block` as stored.
        fn state_row(&self, block: usize, row: usize) -> Vec<f64> {
            let all = download(self.state_p, self.dims.iter().product::<usize>() * 4);
            let at = (block * self.dims[1] + row) * self.dims[2] * 4;
            all[at..at + self.dims[2] * 4]
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect()
        }
    }

    /// One call's arguments: TND over `spans` (start, len) per batch, or BSH when `bsh`.
    struct Step {
        args: Args,
        out_p: *mut c_void,
        out_rows: usize,
    }

    fn step(m: &Model, s: &Session, spans: &[(usize, usize)], used: Option<&[i64]>, bsh: bool) -> Step {
        let (h, d, r) = (m.h, m.d, m.r);
        let b = spans.len();
        let xv: Vec<f64> =
            spans.iter().enumerate().flat_map(|(i, &(st, len))| m.xs[i][st * h..(st + len) * h].to_vec()).collect();
        let t: usize = spans.iter().map(|s| s.1).sum();
        let (x, cu, out_dims, mid): (*mut aclTensor, *const aclTensor, Vec<i64>, Vec<i64>) = if bsh {
            let sl = spans[0].1;
            let rows = sl.div_ceil(r) as i64;
            (
                tensor(&[b as i64, sl as i64, h as i64], BF16, device(&bf16_bytes(&xv))),
                null(),
                vec![b as i64, rows, d as i64],
                vec![b as i64, rows, (m.coff * r) as i64, d as i64],
            )
        } else {
            let mut c = vec![0i64];
            for sp in spans {
                c.push(c.last().unwrap() + sp.1 as i64);
            }
            let rows = t.min(t / r + b) as i64;
            (
                tensor(&[t as i64, h as i64], BF16, device(&bf16_bytes(&xv))),
                i32_tensor(&c, &[b as i64 + 1]),
                vec![rows, d as i64],
                vec![rows, (m.coff * r) as i64, d as i64],
            )
        };
        let n_out: usize = out_dims.iter().product::<i64>() as usize;
        let out_p = device(&bf16_bytes(&vec![SENTINEL; n_out]));
        let n_mid: usize = mid.iter().product::<i64>() as usize;
        let starts: Vec<i64> = spans.iter().map(|s| s.0 as i64).collect();
        let args = Args {
            x,
            wkv: m.wkv_t,
            wgate: m.wgate_t,
            state: s.state,
            ape: m.ape_t,
            table: s.table,
            cu,
            used: used.map_or(null(), |u| i32_tensor(u, &[b as i64]) as *const aclTensor),
            start: i32_tensor(&starts, &[b as i64]),
            ratio: r as i64,
            coff: m.coff as i64,
            mode: s.mode,
            stride0: s.stride0,
            grad: false,
            out: tensor(&out_dims, BF16, out_p),
            sm: tensor(&mid, F32, device(&vec![0u8; n_mid * 4])),
            kv: tensor(&mid, F32, device(&vec![0u8; n_mid * 4])),
        };
        Step { args, out_p, out_rows: n_out / d }
    }

    impl Step {
        fn rows(&self, d: usize) -> Vec<Vec<f64>> {
            download(self.out_p, self.out_rows * d * 2)
                .chunks(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect::<Vec<_>>()
                .chunks(d)
                .map(|c| c.to_vec())
                .collect()
        }

        /// Runs the call and returns cmpKvOut's rows up to the first untouched one (all rows
        /// after it must be untouched too).
        fn written(&self, d: usize) -> Result<Vec<Vec<f64>>, String> {
            compress(&self.args)?;
            let rows = self.rows(d);
            let n = rows.iter().take_while(|r| r.iter().any(|&v| v != SENTINEL)).count();
            assert!(rows[n..].iter().all(|r| r.iter().all(|&v| v == SENTINEL)), "rows after the last written one");
            Ok(rows[..n].to_vec())
        }
    }

    /// Linear-table session: batch i owns blocks 1 + i·cols .. (entry 0 reserved).
    fn linear(m: &Model, batches: usize, bs: usize, cols: usize) -> Session {
        let table: Vec<i64> = (0..batches * cols).map(|i| 1 + i as i64).collect();
        session(m, batches * cols + 1, bs, &table, &[batches as i64, cols as i64], 1)
    }

    #[test]
    fn c4a_prefill_then_decode_steps_equal_one_call() {
        setup(A3);
        let m = model(512, 2, 4, 1024, 1, 17);
        let s = linear(&m, 1, 4, 5);
        let mut all = vec![];
        // Prefill 0..6 (one window), a decode step that completes nothing, one that completes
        // window 1 from the state, an aligned step, and a step starting mid-window.
        for (start, len) in [(0, 6), (6, 1), (7, 1), (8, 3), (11, 6)] {
            let got = step(&m, &s, &[(start, len)], None, false).written(m.d).unwrap();
            assert_rows(&got, &m.expected(0, start, len), &format!("step at {start}"));
            all.extend(got);
        }
        assert_eq!(all.len(), 4);
        // The state holds the new rows, rounded to f32 once: position 9 is block 3, row 1.
        let want: Vec<f64> = m.row(0, 9).into_iter().map(f32r).collect();
        assert_eq!(s.state_row(3, 1), want);
        // One call over all 17 tokens on a fresh state: the same rows.
        let fresh = linear(&m, 1, 4, 5);
        let one = step(&m, &fresh, &[(0, 17)], None, false).written(m.d).unwrap();
        assert_rows(&one, &all, "one call vs steps");
    }

    #[test]
    fn c4li_tnd_two_batches_with_different_start_positions() {
        setup(S950);
        let m = model(128, 2, 4, 1024, 2, 16);
        let s = linear(&m, 2, 4, 4);
        let first = step(&m, &s, &[(0, 3), (0, 5)], None, false).written(m.d).unwrap();
        assert_rows(&first, &m.expected(1, 0, 5), "prefill");
        // Batch 0 from 3 (9 tokens), batch 1 from 5 (7 tokens, 4 used): packed in order.
        let used = [9, 4];
        let got = step(&m, &s, &[(3, 9), (5, 7)], Some(&used), false).written(m.d).unwrap();
        let mut want = m.expected(0, 3, 9);
        want.extend(m.expected(1, 5, 4));
        assert_eq!(want.len(), 4);
        assert_rows(&got, &want, "second step");
    }

    #[test]
    fn c128a_bsh_prefill_and_next_window() {
        setup(A3);
        let m = model(512, 1, 128, 1024, 1, 256);
        let s = linear(&m, 1, 64, 4);
        let st = step(&m, &s, &[(0, 130)], None, true);
        let got = st.written(m.d).unwrap();
        assert_rows(&got, &m.expected(0, 0, 130), "prefill");
        assert_eq!(st.rows(m.d).len(), 2, "[B, ceil(S / r), D]");
        let got = step(&m, &s, &[(130, 126)], None, true).written(m.d).unwrap();
        assert_rows(&got, &m.expected(0, 130, 126), "window 1 with two rows from the state");
    }

    #[test]
    fn table_entry_zero_skips_writes_and_refuses_reads() {
        setup(A3);
        let m = model(128, 2, 4, 1024, 1, 12);
        // Block column 0 (positions 0..4) is not kept.
        let s = session(&m, 4, 4, &[0, 1, 2], &[1, 3], 1);
        let got = step(&m, &s, &[(0, 6)], None, false).written(m.d).unwrap();
        assert_rows(&got, &m.expected(0, 0, 6), "prefill");
        assert!(s.state_row(0, 0).iter().all(|&v| v == STATE_FILL), "block 0 written");
        assert_eq!(s.state_row(1, 1), m.row(0, 5).into_iter().map(f32r).collect::<Vec<_>>());
        // Completing window 1 needs window 0 (positions 0..4) from the state: through entry 0.
        let err = step(&m, &s, &[(6, 2)], None, false).written(m.d).expect_err("read through entry 0");
        assert!(err.contains("stateBlockTableOptional[0][0] is 0"), "{err}");
    }

    #[test]
    fn ring_buffer_on_the_950() {
        setup(S950);
        let m = model(128, 2, 4, 1024, 2, 16);
        // block_size >= coff * r + S - 1 = 8 + 7 - 1.
        let s = session(&m, 3, 14, &[2, 0], &[2], 2);
        let first = step(&m, &s, &[(0, 6), (0, 3)], None, false).written(m.d).unwrap();
        assert_rows(&first, &m.expected(0, 0, 6), "prefill");
        // Only positions >= floor(6 / 4) * 4 - 4 = 0 are kept for batch 0 (all of them); batch 1
        // keeps 0..3 (threshold 0) in block 0.
        assert_eq!(s.state_row(2, 5), m.row(0, 5).into_iter().map(f32r).collect::<Vec<_>>());
        assert_eq!(s.state_row(0, 2), m.row(1, 2).into_iter().map(f32r).collect::<Vec<_>>());
        let got = step(&m, &s, &[(6, 7), (3, 7)], None, false).written(m.d).unwrap();
        let mut want = m.expected(0, 6, 7);
        want.extend(m.expected(1, 3, 7));
        assert_rows(&got, &want, "second step");
        // Batch 0 (13 tokens): threshold 12 - 4 = 8: positions 6 and 7 are not saved.
        // (Row 6 of block 2 still holds position 6 from the prefill; rows 7 and 12 were never
        // written before this step: row 7 (position 7) keeps the fill.)
        assert!(s.state_row(2, 7).iter().all(|&v| v == STATE_FILL), "position 7 saved");
        assert_eq!(s.state_row(2, 8), m.row(0, 8).into_iter().map(f32r).collect::<Vec<_>>());
        // The same on A3 is refused.
        setup(A3);
        let err = compress(&step(&m, &s, &[(13, 1), (10, 1)], None, false).args).expect_err("ring on A3");
        assert!(err.contains("cacheMode 2"), "{err}");
    }

    #[test]
    fn refusals() {
        setup(S950);
        let m = model(128, 2, 4, 1024, 1, 8);
        let s = linear(&m, 1, 4, 2);
        let base = step(&m, &s, &[(0, 5)], None, false).args;
        compress(&base).unwrap();
        let refuse = |a: &Args, needle: &str| {
            let err = compress(a).expect_err(needle);
            assert!(err.contains(needle), "{needle:?} not in {err}");
        };
        // SoCs.
        setup(A2);
        refuse(&base, "Atlas A2");
        setup(S950);
        // Required pointers.
        refuse(&Args { wgate: null(), ..base }, "wgate is NULL");
        refuse(&Args { kv: null(), ..base }, "kvOut is NULL");
        // Attributes.
        refuse(&Args { grad: true, ..base }, "not emulated");
        setup(A3);
        refuse(&Args { grad: true, ..base }, "gradEnabled true is not supported");
        refuse(&Args { ratio: 3, ..base }, "cmpRatio 3");
        setup(S950);
        refuse(&Args { ratio: 129, ..base }, "[2, 128]");
        refuse(&Args { ratio: 128, ..base }, "supported combinations");
        refuse(&Args { coff: 3, ..base }, "coff 3");
        refuse(&Args { mode: 3, ..base }, "cacheMode 3");
        refuse(&Args { stride0: base.stride0 + 1, ..base }, "stateCacheStrideDim0");
        // Dtypes.
        let xf = tensor(&[5, 1024], F32, device(&vec![0u8; 5 * 1024 * 4]));
        refuse(&Args { x: xf, ..base }, "x must be FLOAT16 or BFLOAT16");
        let w16 = tensor(&[256, 1024], aclDataType::ACL_FLOAT16, device(&vec![0u8; 256 * 1024 * 2]));
        refuse(&Args { wkv: w16, ..base }, "x's dtype");
        let ape16 = tensor(&[4, 256], BF16, device(&vec![0u8; 4 * 256 * 2]));
        refuse(&Args { ape: ape16, ..base }, "ape ([cmp_ratio, coff * D]) must be FLOAT");
        // Shapes: H 1000, H 1536 (passes), D 256, a wrong output shape, a wrong table.
        let shaped = |h: usize, rows: usize| -> Args {
            let w = |n| tensor(&[rows as i64, h as i64], BF16, device(&vec![0u8; n]));
            let x = tensor(&[5, h as i64], BF16, device(&vec![0u8; 5 * h * 2]));
            Args { x, wkv: w(rows * h * 2), wgate: w(rows * h * 2), ..base }
        };
        refuse(&shaped(1000, 256), "H = 1000");
        let h1536 = shaped(1536, 256);
        compress(&h1536).unwrap();
        refuse(&shaped(1024, 512), "D = wkv rows / coff = 512 / 2 = 256");
        refuse(&Args { ratio: 128, ..shaped(1024, 1024) }, "D 512, coff 2, cmpRatio 128 is not one of");
        let out = tensor(&[5, 128], BF16, device(&vec![0u8; 5 * 128 * 2]));
        refuse(&Args { out, ..base }, "cmpKvOut has shape [5, 128], expected [2, 128]");
        let sm = tensor(&[2, 4, 128], F32, device(&vec![0u8; 2 * 4 * 128 * 4]));
        refuse(&Args { sm, ..base }, "softmaxScoreOut has shape");
        refuse(&Args { table: null(), ..base }, "stateBlockTableOptional NULL is not emulated");
        refuse(&Args { cu: null(), ..base }, "cuSeqlensOptional is required");
        // A non-contiguous dim 0: fine on the 950 (with the matching stride), refused on A3.
        let row = 2 * 256;
        let padded = device(&f32_bytes(&vec![0.0; 3 * 5 * row]));
        let strided =
            view(&[3, 4, row as i64], &[(5 * row) as i64, row as i64, 1], 0, F32, &[(3 * 5 * row) as i64], padded);
        let sa = Args { state: strided, stride0: (5 * row) as i64, ..base };
        compress(&sa).unwrap();
        setup(A3);
        refuse(&sa, "non-contiguous in dim 0");
        setup(S950);
        // Data-dependent rules, at the launch: a table entry out of range, seqused too long,
        // cuSeqlens not ending at T.
        let bad_table = i32_tensor(&[1, 9], &[1, 2]);
        refuse(&Args { table: bad_table, ..base }, "stateBlockTableOptional[0][1] = 9");
        refuse(&Args { table: i32_tensor(&[1, 1], &[1, 2]), ..base }, "written twice");
        let narrow = i32_tensor(&[1], &[1, 1]);
        refuse(&Args { table: narrow, ..base }, "has 1 columns");
        refuse(&Args { used: i32_tensor(&[6], &[1]), ..base }, "sequsedOptional[0] = 6");
        refuse(&Args { cu: i32_tensor(&[0, 4], &[2]), ..base }, "ends at 4");
        refuse(&Args { cu: i32_tensor(&[1, 5], &[2]), ..base }, "must start at 0");
        refuse(&Args { start: i32_tensor(&[-1], &[1]), ..base }, "negative");
    }
}
