//! The MoE on Huawei's fused kernels, where [`crate::kernels`] allows them:
//! * routing on `aclnnMoeGatingTopKV2` (scores, top-k of scores + bias or hash routing,
//!   renormalisation and scaling in one launch);
//! * the routed experts on `aclnnGroupedMatmulV4`: rows sorted by expert on the host, one
//!   grouped matmul per projection for a whole chunk of experts instead of a gather, three
//!   matmuls and a scatter per expert.
//!
//! In `--precision f32` both keep dsv4's f32 numerics. Atlas A2/A3 run FLOAT32 grouped matmul
//! only with a single 3-D weight, so each chunk's expert matrices are widened (BF16 → F32)
//! into one pooled `[experts, N, K]` block, read as `[experts, K, N]` through strides; chunks
//! are sized to keep that block under [`AscendBackend::set_grouped_matmul_budget`] bytes.
//!
//! Where the activations are BF16 values (`Precision::Bf16`), the experts run on the
//! documented non-quantised BF16 form instead (x, weight and out BFLOAT16, the weights as a
//! list of per-expert `[K, N]` views): BF16 weights as stored, with no copy, and the FP4
//! experts' INT8 form (MXFP4 on the 950) dequantised exactly into a BF16 temporary (a Cast and
//! a Mul by the group scales). Nothing is widened to F32. The A16W8 antiquant form (INT8
//! weight with `antiquantScaleOptional`) is not used: `aclnnGroupedMatmulV4.md` allows INT8
//! weights per-channel only (antiquantScale `[E, N]`), and per-group scales for INT4 weights
//! only, which cannot hold `2·e2m1` (±12); it lists no MXFP4 antiquant form for the 950. See
//! [`AscendBackend::grouped_matmul_bf16`].
//!
//! A token's k weighted expert rows are then gathered into `[T, k, D]` in ascending expert id
//! and reduced over k (a deterministic ReduceSum rather than a scatter-add with repeated rows).
//!
//! Each kernel is checked against the composition on a tiny input when the device opens (an
//! older CANN with different semantics, e.g. gating weights that include the bias, or a build
//! that rejects FLOAT32 grouped matmul, is caught there), and a kernel call that fails at run
//! time switches that kernel off and composes instead.

use std::ptr::{null, null_mut};

use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::{composed, Backend, BinaryOp, ExpertWeights, Precision, ReduceOp};
use dsv4_core::config::ScoringFunc;
use dsv4_core::error::Result;

use crate::acl::{err, AclTensor, AclTensorList, Buffer};
use crate::kernels::KernelState;
use crate::{AscendBackend, AscendIndex, AscendTensor, AscendWeight, Mem};

/// Default size of one widened expert stack (per chunk and projection).
pub(crate) const DEFAULT_STACK_BYTES: usize = 256 << 20;

/// The widest last dimension aclnnGroupedMatmulV4 takes (x and weight).
const GMM_MAX_INNER: usize = 65535;
/// Experts per 3-D weight (groupList length) aclnnGroupedMatmulV4 takes.
const GMM_MAX_GROUPS: usize = 1024;
/// Weight tensors per weight list aclnnGroupedMatmulV4 takes on Atlas A2/A3 (the 950 takes
/// 1024 in the non-quantised form).
const GMM_MAX_LIST: usize = 128;
/// Experts aclnnMoeGatingTopKV2 takes, and the largest k of its hash mode.
const GATING_MAX_EXPERTS: usize = 2048;
const GATING_MAX_HASH_K: usize = 64;

/// Whether a weight's values are BF16 values in the form it is kept: BF16, or a quantised form
/// (INT8 with BF16 group scales, `2·e2m1` times a power of two; MXFP4 and FP8 blocks, kept
/// only with scales that make every value a BF16 value).
pub(crate) fn holds_bf16(w: &AscendWeight) -> bool {
    w.dtype == Dt::ACL_BF16 || w.scales.is_some()
}

impl AscendBackend {
    /// The fused routing, or None when the kernel does not apply (then the trait's composition
    /// runs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn route_fused(
        &self,
        logits: &AscendTensor,
        scoring: ScoringFunc,
        bias: Option<&AscendTensor>,
        hash_ids: Option<&AscendIndex>,
        k: usize,
        routed_scale: f32,
    ) -> Result<Option<(AscendIndex, AscendTensor)>> {
        let norm_type = match scoring {
            ScoringFunc::Softmax => 0,
            ScoringFunc::Sigmoid => 1,
            ScoringFunc::SqrtSoftplus => 2,
        };
        let state = if norm_type == 2 { &self.kernels.gating_sqrt_softplus } else { &self.kernels.gating };
        let usable = state.usable();
        let [t, e] = logits.shape[..] else { return Ok(None) };
        if !usable || t == 0 || e > GATING_MAX_EXPERTS || k == 0 || k > e {
            return Ok(None);
        }
        if hash_ids.is_some_and(|h| h.shape != [t, k]) || (hash_ids.is_some() && k > GATING_MAX_HASH_K) {
            return Ok(None);
        }
        if bias.is_some_and(|b| b.shape != [e]) {
            return Ok(None);
        }
        let (ids, w, norm) = (self.new_index(&[t, k])?, self.new_tensor(&[t, k])?, self.new_tensor(&[t, e])?);
        let xv = self.tv(logits)?;
        let bv = bias.map(|b| self.tv(b)).transpose()?;
        // Hash mode: expert ids = tid2eid[inputIds]; the graph already looked the table up
        // per token, so the table is the step's own `[T, k]` ids and inputIds is 0..T.
        let rows = hash_ids.map(|_| self.upload_index(&(0..t as i32).collect::<Vec<_>>(), &[t])).transpose()?;
        let iv = rows.as_ref().map(|r| self.iv(r)).transpose()?;
        let hv = hash_ids.map(|h| self.iv(h)).transpose()?;
        let (yv, idv, nv) = (self.tv(&w)?, self.iv(&ids)?, self.tv(&norm)?);
        let opt = |v: &Option<crate::acl::AclTensor>| v.as_ref().map_or(null_mut(), |v| v.ptr());
        let launched = self.fused(state, || {
            aclnn!(
                self,
                aclnnMoeGatingTopKV2
                    / aclnnMoeGatingTopKV2GetWorkspaceSize(
                        xv.ptr(),
                        opt(&bv),
                        opt(&iv),
                        opt(&hv),
                        k as i64,
                        1, // kGroup: no group-limited selection
                        1, // groupCount
                        0, // groupSelectMode (unused without groups)
                        1, // renorm: softmax scores are renormalised over the picks too
                        norm_type,
                        false, // outFlag: outOut (the scores) not needed
                        routed_scale as f64,
                        1e-20,
                        yv.ptr(),
                        idv.ptr(),
                        nv.ptr()
                    )
            )
        })?;
        Ok(launched.map(|()| (ids, w)))
    }

    /// The routed experts on grouped matmuls, or None when the kernel does not apply. In
    /// `act` = bf16 the outputs of w1, w3, the SwiGLU and w2 are rounded to BF16, as in the
    /// composition (`Backend::expert_ffn`); there, when every active expert's weights hold
    /// BF16 values (BF16, or a quantised form), the grouped matmuls run in BF16 on the
    /// stored weights ([`Self::grouped_matmul_bf16`]) and round their outputs themselves.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn experts_grouped(
        &self,
        x: &AscendTensor,
        expert_ids: &[i32],
        weights: &AscendTensor,
        experts: &[ExpertWeights<AscendWeight>],
        limit: f32,
        act: Precision,
    ) -> Result<Option<AscendTensor>> {
        let [t, d] = x.shape[..] else { return Ok(None) };
        let Some(first) = experts.first() else { return Ok(None) };
        let i = first.w1.rows;
        let same = experts
            .iter()
            .all(|e| [e.w1.rows, e.w1.cols, e.w3.rows, e.w3.cols, e.w2.rows, e.w2.cols] == [i, d, i, d, d, i]);
        // The official quantisation (weight before w2, e4m3 inputs) is not in this path yet: the
        // composition runs it.
        if !(self.kernels.grouped_matmul.usable() || self.kernels.grouped_matmul_bf16.usable())
            || act.simulates_quant()
            || !same
            || t == 0
            || i * d == 0
            || d > GMM_MAX_INNER
            || i > GMM_MAX_INNER
        {
            return Ok(None);
        }
        let k = expert_ids.len() / t;
        if k == 0 || expert_ids.len() != t * k || weights.shape != [t, k] {
            return Ok(None);
        }
        composed::check_expert_ids(self.name(), expert_ids, experts.len())?;

        // Slots sorted by (expert, slot): gather order, per-expert counts, and for each token
        // where its r-th expert (ascending id) landed, so the final sum runs in that order.
        let mut order: Vec<usize> = (0..expert_ids.len()).collect();
        order.sort_by_key(|&s| (expert_ids[s], s));
        let rows: Vec<i32> = order.iter().map(|&s| (s / k) as i32).collect();
        let slots: Vec<i32> = order.iter().map(|&s| s as i32).collect();
        let mut by_rank = vec![0i32; t * k];
        let mut seen = vec![0usize; t];
        let mut groups: Vec<(usize, usize)> = vec![]; // (expert, rows)
        for (p, &s) in order.iter().enumerate() {
            let tok = s / k;
            by_rank[tok * k + seen[tok]] = p as i32;
            seen[tok] += 1;
            let e = expert_ids[s] as usize;
            match groups.last_mut() {
                Some((last, n)) if *last == e => *n += 1,
                _ => groups.push((e, 1)),
            }
        }
        let m = order.len();
        let xs = self.index_select(x, &self.upload_index(&rows, &[m])?)?;
        let ws = self.index_select(&self.reshape(weights, &[t * k, 1])?, &self.upload_index(&slots, &[m])?)?;

        // BF16 activations and weights whose values BF16 holds: the narrow form. x is a BF16
        // value there (the graph rounds the ffn_norm output, `core/src/precision.rs`), so its
        // cast is exact; a weight kept F32 or F16 (not BF16 values) keeps the f32 form.
        let narrow = act.rounds_to_bf16()
            && self.kernels.grouped_matmul_bf16.usable()
            && groups.iter().all(|g| {
                let e = &experts[g.0];
                [&e.w1, &e.w3, &e.w2].into_iter().all(holds_bf16)
            });
        if !narrow && !self.kernels.grouped_matmul.usable() {
            return Ok(None);
        }
        let xs_bf16 = if narrow { Some(self.cast_to(&xs, Dt::ACL_BF16)?) } else { None };
        // The f32 form's widened stack is 4 bytes per value; the narrow form's dequantised
        // weights 2 (BF16 weights need no temporary), in a weight list of at most 128.
        let chunk = match narrow {
            false => (self.gmm_stack_bytes / (i * d * 4)).clamp(1, GMM_MAX_GROUPS),
            true => (self.gmm_stack_bytes / (i * d * 2)).clamp(1, GMM_MAX_LIST),
        };
        let mut outs = vec![];
        let mut row0 = 0;
        for part in groups.chunks(chunk) {
            let mc: usize = part.iter().map(|g| g.1).sum();
            let counts: Vec<i64> = part.iter().map(|g| g.1 as i64).collect();
            let pick = |f: fn(&ExpertWeights<AscendWeight>) -> &AscendWeight| -> Vec<&AscendWeight> {
                part.iter().map(|g| f(&experts[g.0])).collect()
            };
            let y = if let Some(xb) = &xs_bf16 {
                let xc = Mem { buf: xb, offset: row0 * d, dtype: Dt::ACL_BF16 };
                let gmm = |x: Mem<'_>, w: Vec<&AscendWeight>| {
                    self.fused(&self.kernels.grouped_matmul_bf16, || self.grouped_matmul_bf16(x, mc, &w, &counts))
                };
                // The kernel rounds w1's, w3's and w2's outputs to BF16 (they hold BF16
                // values); the SwiGLU output is rounded by its cast to w2's BF16 input.
                let Some(g) = gmm(xc, pick(|e| &e.w1))? else { return Ok(None) };
                let Some(u) = gmm(xc, pick(|e| &e.w3))? else { return Ok(None) };
                let h = self.cast_to(&self.swiglu(&g, &u, limit)?, Dt::ACL_BF16)?;
                let Some(y) = gmm(Mem { buf: &h, offset: 0, dtype: Dt::ACL_BF16 }, pick(|e| &e.w2))? else {
                    return Ok(None);
                };
                y
            } else {
                let xc = self.narrow(&xs, 0, row0, mc)?;
                let gmm = |x: &AscendTensor, w: Vec<&AscendWeight>| {
                    self.fused(&self.kernels.grouped_matmul, || self.grouped_matmul(x, &w, &counts))
                };
                let Some(g) = gmm(&xc, pick(|e| &e.w1))? else { return Ok(None) };
                let Some(u) = gmm(&xc, pick(|e| &e.w3))? else { return Ok(None) };
                let h = act.act_of(self, self.swiglu(&act.act(self, &g)?, &act.act(self, &u)?, limit))?;
                let Some(y) = gmm(&h, pick(|e| &e.w2))? else { return Ok(None) };
                act.act(self, &y)?
            };
            outs.push(self.binary(&y, &self.narrow(&ws, 0, row0, mc)?, BinaryOp::Mul)?);
            row0 += mc;
        }
        // Every token has exactly k weighted expert rows: gather them into [T, k, D] by rank
        // and reduce over k. (A scatter-add with repeated rows would leave the order of the
        // k additions to the hardware.)
        let refs: Vec<&AscendTensor> = outs.iter().collect();
        let yw = if refs.len() == 1 { outs[0].clone() } else { self.concat(&refs, 0)? };
        let ranked = self.index_select(&yw, &self.upload_index(&by_rank, &[t, k])?)?;
        Ok(Some(self.reshape(&self.reduce(&ranked, 1, ReduceOp::Sum)?, &[t, d])?))
    }

    /// Runs a fused kernel; if it fails (a CANN release that rejects this use of it), the
    /// kernel is switched off for the rest of the process with the reason, which `dsv4 devices`
    /// and a one-time message show, and None tells the caller to compose instead.
    pub(crate) fn fused<T>(&self, state: &KernelState, run: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        match run() {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let why = format!("failed, so the composition is used: {e}");
                eprintln!("dsv4: fused kernel {} {why}", state.name());
                state.disable(why);
                // Anything it queued before failing is on temporaries; make sure the stream
                // itself is healthy before composing.
                self.dev.synchronize()?;
                Ok(None)
            }
        }
    }

    /// Runs a fused kernel's self-test at device open when the kernel is in use: `compare`
    /// checks it against the composition and switches it off itself when they disagree; an
    /// error from `compare` (the kernel failed, or the test could not run) switches it off
    /// with that reason, after the stream is drained, and the device still opens composing.
    pub(crate) fn self_test(&self, state: &KernelState, compare: impl FnOnce() -> Result<()>) -> Result<()> {
        if !state.usable() {
            return Ok(());
        }
        if let Err(e) = compare() {
            state.disable(format!("self-test failed, so the composition is used: {e}"));
            self.dev.synchronize()?;
        }
        Ok(())
    }

    /// `x [M, K]` through one weight `[N, K]` per group, group g taking `counts[g]`
    /// consecutive rows: aclnnGroupedMatmulV4 on the weights widened into one F32 stack.
    fn grouped_matmul(&self, x: &AscendTensor, ws: &[&AscendWeight], counts: &[i64]) -> Result<AscendTensor> {
        let (m, kk) = (x.shape[0], x.shape[1]);
        let n = ws[0].rows;
        let g = ws.len();
        let stack = self.alloc(g * n * kk, Dt::ACL_FLOAT)?;
        for (a, w) in ws.iter().enumerate() {
            self.widen_weight_into(w, Mem { buf: &stack, offset: a * n * kk, dtype: Dt::ACL_FLOAT })?;
        }
        let group_list = self.upload_i64(counts)?;
        let gl = self.cview(Mem { buf: &group_list, offset: 0, dtype: Dt::ACL_INT64 }, &[g])?;
        let out = self.new_tensor(&[m, n])?;
        let api = self.api();
        let xl = AclTensorList::new(api, vec![self.cview(self.tmem(x), &[m, kk])?])?;
        // [g, N, K] read as [g, K, N]: the transpose is expressed through strides.
        let wl = AclTensorList::new(
            api,
            vec![self.view(Mem { buf: &stack, offset: 0, dtype: Dt::ACL_FLOAT }, &[g, kk, n], &[n * kk, 1, kk], 0)?],
        )?;
        let ol = AclTensorList::new(api, vec![self.tv(&out)?])?;
        self.launch_grouped_matmul(&xl, &wl, &gl, &ol)?;
        Ok(out)
    }

    /// `x [M, K]` (BF16, contiguous at `x`) through one weight `[N, K]` per group, group g
    /// taking `counts[g]` consecutive rows: aclnnGroupedMatmulV4 in its non-quantised BF16
    /// form (x, weight and out BFLOAT16; `aclnnGroupedMatmulV4.md`, the non-quantised scenario, on Atlas A2/A3
    /// and the 950), with the weights as a list of `[K, N]` views (one x, a weight list, one
    /// out: groupType 0, splitItem 3, at most 128 weights on A2/A3). Its output is BF16 (the
    /// docs do not state the accumulation type; the cube units accumulate BF16 products in
    /// f32, and the emulator computes in f64 and rounds once); it is widened to f32 (exact).
    ///
    /// Weights: BF16 as stored (no copy); quantised forms (the FP4 experts' INT8 form with BF16
    /// group scales, MXFP4 or FP8 blocks on the 950; `dsv4_core::weight_forms`) dequantised
    /// into a pooled BF16 temporary, exactly (their values are BF16 values), by aclnnCast and
    /// aclnnMul.
    ///
    /// Not the A16W8 antiquant form (INT8 weight, `antiquantScaleOptional`): the docs allow
    /// it per-channel only (scale `[E, N]`, per the A2/A3 constraints; on the 950
    /// per-group only for INT4), and the FP4 experts have a scale per 32 values of K; INT4,
    /// which takes per-group scales, cannot hold `2·e2m1`.
    pub(crate) fn grouped_matmul_bf16(
        &self,
        x: Mem<'_>,
        m: usize,
        ws: &[&AscendWeight],
        counts: &[i64],
    ) -> Result<AscendTensor> {
        let (n, kk) = (ws[0].rows, ws[0].cols);
        // The dequantised weights, alive until the launch is queued (the pool orders reuse
        // after it on the stream).
        let temps: Vec<Option<Buffer>> = ws
            .iter()
            .map(|w| self.bf16_weight(w).map_err(|e| err(format!("grouped_matmul_bf16: {e}"))))
            .collect::<Result<_>>()?;
        let api = self.api();
        let views = ws
            .iter()
            .zip(&temps)
            .map(|(w, t)| {
                let buf = t.as_ref().unwrap_or(&w.buf);
                // [N, K] read as [K, N] through strides (a transposed weight).
                self.view(Mem::bf16(buf), &[kk, n], &[1, kk], 0)
            })
            .collect::<Result<Vec<_>>>()?;
        let wl = AclTensorList::new(api, views)?;
        let xl = AclTensorList::new(api, vec![self.cview(x, &[m, kk])?])?;
        let out = self.alloc(m * n, Dt::ACL_BF16)?;
        let om = Mem { buf: &out, offset: 0, dtype: Dt::ACL_BF16 };
        let ol = AclTensorList::new(api, vec![self.cview(om, &[m, n])?])?;
        let group_list = self.upload_i64(counts)?;
        let gl = self.cview(Mem { buf: &group_list, offset: 0, dtype: Dt::ACL_INT64 }, &[ws.len()])?;
        self.launch_grouped_matmul(&xl, &wl, &gl, &ol)?;
        drop(temps);
        let y = self.new_tensor(&[m, n])?;
        self.cast_into(self.cview(om, &[m, n])?, self.tv(&y)?, Dt::ACL_FLOAT)?;
        Ok(y)
    }

    /// aclnnGroupedMatmulV4 in its non-quantised form: one x, the weight list `wl`, one out,
    /// groups along M with per-group row counts `gl`, every quantisation and activation
    /// argument NULL.
    fn launch_grouped_matmul(
        &self,
        xl: &AclTensorList,
        wl: &AclTensorList,
        gl: &AclTensor,
        ol: &AclTensorList,
    ) -> Result<()> {
        let none: *const sys::aclTensorList = null();
        aclnn!(
            self,
            aclnnGroupedMatmulV4
                / aclnnGroupedMatmulV4GetWorkspaceSize(
                    xl.ptr(),
                    wl.ptr(),
                    none,
                    none,
                    none,
                    none,
                    none,
                    none,
                    gl.ptr(),
                    none,
                    none,
                    none,
                    3, // splitItem: one output tensor
                    0, // groupType: groups along M
                    1, // groupListType: counts
                    0, // actType: none
                    ol.ptr(),
                    null_mut(),
                    null_mut()
                )
        )
    }

    fn upload_i64(&self, v: &[i64]) -> Result<Buffer> {
        let buf = self.alloc(v.len(), Dt::ACL_INT64)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.dev.upload_bytes(&buf, &bytes)?;
        Ok(buf)
    }
}

impl AscendBackend {
    /// Compares each fused kernel in use with the composition on a tiny input, and switches
    /// off those that disagree (or fail), with the reason.
    pub(crate) fn self_test_fused(&self) -> Result<()> {
        let (t, e, k) = (3usize, 8usize, 2usize);
        let logits: Vec<f32> = (0..t * e).map(|v| ((v * 37 % 23) as f32 - 11.0) / 4.0).collect();
        let bias: Vec<f32> = (0..e).map(|v| (v as f32 - 3.5) / 8.0).collect();
        let (lt, bt) = (self.upload(&logits, &[t, e])?, self.upload(&bias, &[e])?);
        let hash = self.upload_index(&[1, 6, 0, 7, 5, 5], &[t, k])?;
        for (state, scoring) in [
            (&self.kernels.gating, ScoringFunc::Sigmoid),
            (&self.kernels.gating, ScoringFunc::Softmax),
            (&self.kernels.gating_sqrt_softplus, ScoringFunc::SqrtSoftplus),
        ] {
            for hash_ids in [None, Some(&hash)] {
                if !state.usable() {
                    continue;
                }
                let bias = hash_ids.is_none().then_some(&bt);
                let fused = match self.route_fused(&lt, scoring, bias, hash_ids, k, 1.5)? {
                    Some(r) => r,
                    None => continue,
                };
                // Where the composition itself cannot run (the 950 has no aclnnSoftplus), there
                // is nothing to compare with.
                let Ok(want) = composed::moe_route(self, &lt, scoring, bias, hash_ids, k, 1.5) else {
                    self.dev.synchronize()?;
                    continue;
                };
                let (gi, wi) = (self.download_index(&fused.0)?, self.download_index(&want.0)?);
                let (gw, ww) = (self.download(&fused.1)?, self.download(&want.1)?);
                let close = gw.iter().zip(&ww).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0));
                if gi != wi || !close {
                    state.disable(format!(
                        "self-test disagreed with the composition ({scoring:?}, hash {}): ids {gi:?} vs {wi:?}, \
                         weights {gw:?} vs {ww:?}",
                        hash_ids.is_some()
                    ));
                }
            }
        }
        if self.kernels.grouped_matmul.usable() {
            let (m, kk, n) = (5usize, 4usize, 3usize);
            let x: Vec<f32> = (0..m * kk).map(|v| (v as f32 - 9.0) / 7.0).collect();
            let xt = self.upload(&x, &[m, kk])?;
            let ws: Vec<AscendWeight> = (0..2)
                .map(|g| {
                    let v: Vec<f32> = (0..n * kk).map(|j| ((j + 5 * g) as f32 - 6.0) / 5.0).collect();
                    self.upload_weight(&dsv4_core::tensor::StoredWeight::float(
                        dsv4_core::tensor::HostTensor::from_f32(format!("self-test expert {g}"), vec![n, kk], &v)?,
                    )?)
                })
                .collect::<Result<_>>()?;
            let refs: Vec<&AscendWeight> = ws.iter().collect();
            let got = self.fused(&self.kernels.grouped_matmul, || self.grouped_matmul(&xt, &refs, &[2, 3]))?;
            if let Some(got) = got {
                let want = self.concat(
                    &[
                        &self.linear(&self.narrow(&xt, 0, 0, 2)?, &ws[0])?,
                        &self.linear(&self.narrow(&xt, 0, 2, 3)?, &ws[1])?,
                    ],
                    0,
                )?;
                let (g, w) = (self.download(&got)?, self.download(&want)?);
                if g.iter().zip(&w).any(|(a, b)| (a - b).abs() > 1e-5 * b.abs().max(1.0)) {
                    self.kernels.grouped_matmul.disable(format!("self-test disagreed with Matmul: {g:?} vs {w:?}"));
                }
            }
        }
        if self.kernels.grouped_matmul_bf16.usable() {
            self.self_test_grouped_matmul_bf16()?;
        }
        Ok(())
    }

    /// The BF16 form of the grouped matmul (`--precision bf16`) on a tiny input, a BF16 weight
    /// and an FP4 one (kept as INT8 + group scales), against Matmul on the same values with its
    /// output rounded to BF16: they may differ by one BF16 ulp (the summation order), not more.
    fn self_test_grouped_matmul_bf16(&self) -> Result<()> {
        let (m, kk, n) = (5usize, 64usize, 3usize);
        let (x, ws) = self.bf16_self_test_operands(m, kk, n)?;
        if !ws.iter().all(holds_bf16) {
            return Ok(());
        }
        let xt = self.upload(&x, &[m, kk])?;
        let xb = self.cast_to(&xt, Dt::ACL_BF16)?;
        let refs: Vec<&AscendWeight> = ws.iter().collect();
        let xm = Mem { buf: &xb, offset: 0, dtype: Dt::ACL_BF16 };
        self.self_test_bf16(
            &self.kernels.grouped_matmul_bf16,
            "self-test of the BF16 form disagreed with Matmul",
            || self.grouped_matmul_bf16(xm, m, &refs, &[2, 3]),
            || {
                let (a, b) = (self.narrow(&xt, 0, 0, 2)?, self.narrow(&xt, 0, 2, 3)?);
                self.round_to_bf16(&self.concat(&[&self.linear(&a, &ws[0])?, &self.linear(&b, &ws[1])?], 0)?)
            },
        )?;
        Ok(())
    }

    /// The BF16 linear and grouped linear (`linear_act` / `grouped_linear_act` in bf16,
    /// [`crate::kernels::LINEAR_BF16`]) on a tiny input against their f32 forms on the same
    /// values with the output rounded to BF16, for a BF16 weight and an FP4 one (INT8 + group
    /// scales): one BF16 ulp apart at most.
    pub(crate) fn self_test_linear_bf16(&self) -> Result<()> {
        let state = &self.kernels.linear_bf16;
        if !state.usable() {
            return Ok(());
        }
        let (m, kk, n) = (5usize, 64usize, 3usize);
        let (x, ws) = self.bf16_self_test_operands(m, kk, n)?;
        let xt = self.round_to_bf16(&self.upload(&x, &[m, kk])?)?;
        // The grouped form: each of the weight's n rows its own group, x's rows repeated per group.
        let xg: Vec<f32> = x.chunks_exact(kk).flat_map(|row| row.repeat(n)).collect();
        let xg = self.round_to_bf16(&self.upload(&xg, &[m, n, kk])?)?;
        // f32 accumulation: 1 + 255 · 2⁻⁹ is 1.498 (1.5 in BF16); a BF16 running sum stays 1.
        use dsv4_core::tensor::{DType, HostTensor};
        let probe = self.upload_weight(&dsv4_core::tensor::StoredWeight::float(HostTensor::from_bytes(
            "self-test accumulation probe",
            DType::BF16,
            vec![1, 256],
            (0..256).flat_map(|j| if j == 0 { 0x3f80u16 } else { 0x3b00 }.to_le_bytes()).collect(),
        )?)?)?;
        let ones = self.upload(&[1.0; 256], &[1, 256])?;
        let (ones_g, probe_ref) = (self.reshape(&ones, &[1, 1, 256])?, &probe);
        let pairs = [(&ws[0], &xt, &xg, n), (&ws[1], &xt, &xg, n), (probe_ref, &ones, &ones_g, 1)];
        for (w, xt, xg, n) in pairs.into_iter().filter(|(w, ..)| holds_bf16(w)) {
            // The BF16 Matmul itself (`linear_bf16` would hand an INT8-group or MXFP4 weight to
            // the weight-quant matmul, which has its own self-test).
            let still_on = self.self_test_bf16(
                state,
                "self-test disagreed with Matmul in f32 rounded to BF16",
                || self.linear_bf16_dequantised(xt, w, xt.shape[0]),
                || self.round_to_bf16(&self.linear(xt, w)?),
            )? && self.self_test_bf16(
                state,
                "self-test disagreed with BatchMatMul in f32 rounded to BF16",
                || self.grouped_linear_bf16(xg, w, n),
                || self.round_to_bf16(&self.grouped_linear(xg, w, n)?),
            )?;
            if !still_on {
                return Ok(());
            }
        }
        Ok(())
    }

    /// aclnnWeightQuantBatchMatmulV2 ([`crate::kernels::WEIGHT_QUANT_MATMUL`]) on this device's
    /// form of FP4 weights (INT8 groups, or MXFP4 on the 950) against the f32 matmul on the
    /// same values with its output rounded to BF16 (independent of the BF16 matmuls, whose own
    /// self-test runs after this one): one BF16 ulp apart at most. Two weights: a tiny random
    /// one, and an accumulation probe, whose row sums 1 + 224 · 2⁻⁹ = 1.4375 in f32 but stay 1
    /// in a BF16 running sum.
    pub(crate) fn self_test_weight_quant_matmul(&self) -> Result<()> {
        let state = &self.kernels.weight_quant_matmul;
        if !state.usable() {
            return Ok(());
        }
        // N even: the MX mode wants the FP4 weight's last dimension 2-aligned.
        let (m, kk, n) = (5usize, 64usize, 4usize);
        let (x, ws) = self.bf16_self_test_operands(m, kk, n)?;
        let xt = self.round_to_bf16(&self.upload(&x, &[m, kk])?)?;
        let ones = self.upload(&[1.0; 256], &[1, 256])?;
        let probe = self.upload_weight(&fp4_accumulation_probe()?)?;
        for (xt, w) in [(&xt, &ws[1]), (&ones, &probe)] {
            let still_on = !self.weight_quant_applies(w, xt.shape[0])
                || self.self_test_bf16(
                    state,
                    "self-test disagreed with Matmul in f32 rounded to BF16",
                    || self.linear_weight_quant(xt, w),
                    || self.round_to_bf16(&self.linear(xt, w)?),
                )?;
            if !still_on {
                return Ok(());
            }
        }
        Ok(())
    }

    /// One comparison of a BF16 self-test: `kernel` run under `state` (an operator error
    /// switches it off, [`Self::fused`]) against `reference` ([`Self::bf16_disagreement`]; a
    /// disagreement switches it off as `"{disagreed}: …"`). Whether `state` is still on.
    fn self_test_bf16(
        &self,
        state: &KernelState,
        disagreed: &str,
        kernel: impl FnOnce() -> Result<AscendTensor>,
        reference: impl FnOnce() -> Result<AscendTensor>,
    ) -> Result<bool> {
        let Some(got) = self.fused(state, kernel)? else {
            return Ok(false);
        };
        if let Some(why) = self.bf16_disagreement(&got, &reference()?)? {
            state.disable(format!("{disagreed}: {why}"));
            return Ok(false);
        }
        Ok(true)
    }

    /// `got` against `want` (both BF16 values): None when every value is within one BF16 ulp
    /// (2⁻⁷ relative, the summation order) plus 2⁻²⁰ of the largest, else both listed.
    pub(crate) fn bf16_disagreement(&self, got: &AscendTensor, want: &AscendTensor) -> Result<Option<String>> {
        let (g, w) = (self.download(got)?, self.download(want)?);
        let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let off = g.iter().zip(&w).any(|(a, b)| (a - b).abs() > 2f32.powi(-7) * b.abs() + 2f32.powi(-20) * scale);
        Ok(off.then(|| format!("{g:?} vs {w:?}")))
    }

    /// The BF16 self-tests' operands: x `[m, kk]` of BF16 values, a BF16 weight `[n, kk]` and an
    /// FP4 one (its form on this device: INT8 + group scales where the SoC keeps FP4 so).
    fn bf16_self_test_operands(&self, m: usize, kk: usize, n: usize) -> Result<(Vec<f32>, [AscendWeight; 2])> {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let bf16 = |v: f32| f32::from_bits(v.to_bits() & 0xffff_0000);
        let x: Vec<f32> = (0..m * kk).map(|v| bf16(((v * 7 % 23) as f32 - 11.0) / 8.0)).collect();
        let w0: Vec<f32> = (0..n * kk).map(|j| bf16(((j * 5 % 17) as f32 - 8.0) / 6.0)).collect();
        let w1: Vec<f32> = (0..n * kk).map(|j| ((j * 11 % 29) as f32 - 14.0) / (1.0 + (j / 32) as f32)).collect();
        let w0_bytes = w0.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let (packed, scales) = dsv4_core::quant::quantize_fp4_group(&w1, n, kk);
        let ws = [
            self.upload_weight(&StoredWeight::float(HostTensor::from_bytes(
                "self-test BF16 expert",
                DType::BF16,
                vec![n, kk],
                w0_bytes,
            )?)?)?,
            self.upload_weight(&StoredWeight::detect(
                &HostTensor::from_bytes("self-test FP4 expert", DType::I8, vec![n, kk / 2], packed)?,
                Some(&HostTensor::from_bytes("self-test FP4 scales", DType::F8E8M0, vec![n, kk / 32], scales)?),
                &[n, kk],
            )?)?,
        ];
        Ok((x, ws))
    }
}

/// A `[2, 256]` FP4 weight with E8M0 scales per 32 whose rows hold 1.0 (group 0, scale 2⁰) and
/// 224 values 2⁻⁹ (0.5 · 2⁻⁸, groups 1 to 7), then zeros: summed in f32 a row of ones gives
/// 1.4375, a BF16 value; summed in BF16 it stays 1.
fn fp4_accumulation_probe() -> Result<dsv4_core::tensor::StoredWeight> {
    use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
    let (rows, k) = (2usize, 256usize);
    // Two codes a byte, the even value in the low nibble: e2m1 code 2 is 1.0, code 1 is 0.5.
    let row: Vec<u8> = (0..k / 2)
        .map(|b| {
            if b == 0 {
                0x02
            } else if b < 16 {
                0x00
            } else {
                0x11
            }
        })
        .collect();
    let scales_row: Vec<u8> = (0..k / 32).map(|g| if g == 0 { 127 } else { 119 }).collect();
    StoredWeight::detect(
        &HostTensor::from_bytes("self-test FP4 accumulation probe", DType::I8, vec![rows, k / 2], row.repeat(rows))?,
        Some(&HostTensor::from_bytes(
            "self-test FP4 probe scales",
            DType::F8E8M0,
            vec![rows, k / 32],
            scales_row.repeat(rows),
        )?),
        &[rows, k],
    )
}
