//! Fused V4 ops besides attention (kernels in `kernels/fused.cu`): the mHC pre-mapping, Sinkhorn,
//! post-mapping and head, compressor pooling, the clamped SwiGLU and MoE routing. Each replaces
//! the trait's default composition of primitives (its definition: `dsv4_core::backend::composed`
//! and the trait's default bodies) with one kernel launch (after the mixes' GEMM for `hc_pre` and
//! `hc_head`) and no temporaries but those mixes, doing the definition's f32 operations step by
//! step; sums run in index order, or with the very block reduction of the primitive they replace
//! (see `fused.cu`), so results agree to a few ulp and often bit for bit:
//!
//! | op | here | the composition |
//! |---|---|---|
//! | `hc_pre` | `linear` of the raw streams + `dsv4_hc_pre_f32` | `rms_norm`, `linear` + 14 + 6·iters kernels |
//! | `sinkhorn` | `dsv4_sinkhorn_f32` | 6·iters − 3 kernels |
//! | `hc_post` | `dsv4_hc_post_f32` | 3 kernels + a GEMM |
//! | `hc_head` | `linear` of the raw streams + `dsv4_hc_head_f32` | `rms_norm`, `linear` + 6 kernels |
//! | `compressor_pool` | `dsv4_compressor_pool_f32` | 3 kernels |
//! | `swiglu` | `dsv4_swiglu_f32` | 4 kernels |
//! | `moe_route` | `dsv4_moe_route_topk_f32` / `dsv4_moe_route_hash_f32` | 5 to 8 kernels |
//!
//! `hc_pre` and `hc_head` keep their GEMM in `linear` (GEMV or cuBLAS), applied to the streams
//! as they are rather than to their RMS-normalised copy: the norm's scale `r` is one number per
//! token, so `fn · (x·r) = (fn · x)·r` up to rounding, and the kernel multiplies the mixes by `r`
//! (computed as `rms_norm` computes it) instead of writing the normalised `[T, n·D]` copy.
//!
//! Shapes are checked first (`dsv4_core::backend_checks::moe_route`; the others here, as the
//! model passes them: [`hc_params`]), with errors that name the op; a `swiglu` of two shapes
//! takes the definition's primitives (which broadcast). Where a kernel's per-token state would
//! not fit in a block's dynamic shared memory ([`crate::device::DYNAMIC_SHARED_BUDGET`], 47 KiB:
//! more than 109 mHC streams in `hc_pre`, 12032 in `hc_head`; more than 6016 experts in a top-k
//! route, 12032 in a hash route: far from V4's 4 streams and 256-384 experts), the op runs its
//! composition instead.

use dsv4_core::backend::{composed, BinaryOp, ReduceOp, UnaryOp};
use dsv4_core::backend_checks::{self as checks, weight_matrix};
use dsv4_core::config::ScoringFunc;
use dsv4_core::error::{Error, Result};

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::reduce::row_threads;
use crate::tensor::{CudaIndex, CudaTensor, CudaWeight};

/// Most blocks of a launch (the kernels walk further tokens or lanes grid-stride).
const MAX_BLOCKS: usize = 65_535;
/// Dynamic shared memory a launch may use without opting in.
const MAX_SHARED_BYTES: usize = crate::device::DYNAMIC_SHARED_BUDGET;

/// A 1-D launch with one thread per lane (`lanes` of them, walked grid-stride): whole warps,
/// no more threads per block than the lanes need (at most 256, at least one warp), so that a
/// few lanes do not start a block of idle threads; at most [`MAX_BLOCKS`] blocks, at least one.
pub(crate) fn lane_launch(lanes: usize) -> LaunchConfig {
    let threads = row_threads(lanes);
    let blocks = lanes.div_ceil(threads as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig::linear(blocks as u32, threads)
}

/// One block per token (at most [`MAX_BLOCKS`], walked grid-stride) of `row_threads(width)`
/// threads, `width` being the row the block reduces (the same blockDim as the `rms_norm` or
/// `softmax` launch over such rows, so its block sums give the same bits), with `shared_words`
/// 4-byte words of dynamic shared memory; None when those do not fit in
/// [`crate::device::DYNAMIC_SHARED_BUDGET`].
pub(crate) fn token_launch(tokens: usize, width: usize, shared_words: usize) -> Option<LaunchConfig> {
    let bytes = shared_words.checked_mul(4).filter(|&b| b <= MAX_SHARED_BYTES)?;
    Some(LaunchConfig {
        grid: (tokens.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block: (row_threads(width), 1, 1),
        shared_bytes: bytes as u32,
    })
}

/// `DSV4_SCORE_*` of fused.cu.
fn score_code(scoring: ScoringFunc) -> i32 {
    match scoring {
        ScoringFunc::SqrtSoftplus => 0,
        ScoringFunc::Sigmoid => 1,
        ScoringFunc::Softmax => 2,
    }
}

fn fail<T>(msg: String) -> Result<T> {
    Err(Error::backend("cuda", msg))
}

/// `(T, n, D)` of the streams x `[T, n, D]` of an mHC op.
fn streams(op: &str, x: &[usize]) -> Result<(usize, usize, usize)> {
    match *x {
        [t, n, d] => Ok((t, n, d)),
        _ => fail(format!("{op}: x {x:?} is not [T, n, D]")),
    }
}

/// The parameters of `hc_pre` (`mix` = (2+n)·n mixing rows, 3 scales) or `hc_head` (`mix` = n,
/// 1 scale) for streams x `[T, n, D]`: fn `[mix, n·D]`, base `[mix]`, scale `[scales]`.
/// `mix_of(n)` gives the rows. Returns `(T, n, D)`.
pub(crate) fn hc_params(
    op: &str,
    x: &[usize],
    fn_w: &[usize],
    base: &[usize],
    scale: &[usize],
    mix_of: fn(usize) -> usize,
    scales: usize,
) -> Result<(usize, usize, usize)> {
    let (t, n, d) = streams(op, x)?;
    let (mix, nd) = (mix_of(n), n * d);
    if weight_matrix(fn_w) != (mix, nd) {
        return fail(format!("{op}: fn {fn_w:?} for x {x:?} (want [{mix}, {nd}])"));
    }
    if base != [mix] {
        return fail(format!("{op}: base {base:?} for x {x:?} (want [{mix}])"));
    }
    if scale != [scales] {
        return fail(format!("{op}: scale {scale:?} (want [{scales}])"));
    }
    Ok((t, n, d))
}

/// `(2 + n) · n`: the mixing rows of `hc_pre` (pre, post, comb).
fn hc_pre_mix(n: usize) -> usize {
    (2 + n) * n
}

impl<D: Device> CudaBackend<D> {
    /// `linear` of the streams x `[T, n, D]` as `[T, n·D]` (a view: no copy) against `fn_w`.
    fn hc_mixes(&self, x: &CudaTensor<D>, fn_w: &CudaWeight<D>) -> Result<CudaTensor<D>> {
        let (t, n, d) = (x.shape[0], x.shape[1], x.shape[2]);
        self.linear_op(&self.reshape_op(x, &[t, n * d])?, fn_w)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hc_pre_op(
        &self,
        x: &CudaTensor<D>,
        fn_w: &CudaWeight<D>,
        base: &CudaTensor<D>,
        scale: &CudaTensor<D>,
        iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(CudaTensor<D>, CudaTensor<D>, CudaTensor<D>)> {
        let (t, n, d) = hc_params("hc_pre", &x.shape, &fn_w.shape, &base.shape, &scale.shape, hc_pre_mix, 3)?;
        let Some(config) = token_launch(t, n * d, n + n * n) else {
            return composed::hc_pre(self, x, fn_w, base, scale, iters, hc_eps, norm_eps);
        };
        let (collapsed, post, comb) =
            (self.new_tensor(&[t, d])?, self.new_tensor(&[t, n])?, self.new_tensor(&[t, n, n])?);
        if t == 0 {
            return Ok((collapsed, post, comb));
        }
        let mixes = self.hc_mixes(x, fn_w)?;
        self.dev.launch(
            "dsv4_hc_pre_f32",
            config,
            &[
                KernelArg::In(&x.buf, x.offset),
                KernelArg::In(&mixes.buf, mixes.offset),
                KernelArg::In(&base.buf, base.offset),
                KernelArg::In(&scale.buf, scale.offset),
                KernelArg::Out(&collapsed.buf, 0),
                KernelArg::Out(&post.buf, 0),
                KernelArg::Out(&comb.buf, 0),
                KernelArg::count(t),
                KernelArg::count(n),
                KernelArg::count(d),
                KernelArg::count(iters),
                KernelArg::F32(hc_eps),
                KernelArg::F32(norm_eps),
            ],
        )?;
        Ok((collapsed, post, comb))
    }

    /// comb `[T, n, m]` (square in mHC; the definition normalises any rows and columns).
    pub(crate) fn sinkhorn_op(&self, comb: &CudaTensor<D>, iters: usize, eps: f32) -> Result<CudaTensor<D>> {
        let &[t, rows, cols] = &comb.shape[..] else {
            return fail(format!("sinkhorn: comb {:?} is not [T, n, n]", comb.shape));
        };
        let out = self.new_tensor(&comb.shape)?;
        if t * rows * cols == 0 {
            return Ok(out);
        }
        self.dev.launch(
            "dsv4_sinkhorn_f32",
            lane_launch(t),
            &[
                KernelArg::In(&comb.buf, comb.offset),
                KernelArg::Out(&out.buf, 0),
                KernelArg::count(t),
                KernelArg::count(rows),
                KernelArg::count(cols),
                KernelArg::count(iters),
                KernelArg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    /// x `[T, n, D]`, comb `[T, n, n]`; y and post hold `T·D` and `T·n` values (the composition
    /// reshapes them to `[T, 1, D]` and `[T, n, 1]`).
    pub(crate) fn hc_post_op(
        &self,
        x: &CudaTensor<D>,
        y: &CudaTensor<D>,
        post: &CudaTensor<D>,
        comb: &CudaTensor<D>,
    ) -> Result<CudaTensor<D>> {
        let (t, n, d) = streams("hc_post", &x.shape)?;
        let numel = |s: &[usize]| s.iter().product::<usize>();
        if numel(&y.shape) != t * d {
            return fail(format!("hc_post: y {:?} for x {:?} (want [{t}, {d}])", y.shape, x.shape));
        }
        if numel(&post.shape) != t * n {
            return fail(format!("hc_post: post {:?} for x {:?} (want [{t}, {n}])", post.shape, x.shape));
        }
        if comb.shape != [t, n, n] {
            return fail(format!("hc_post: comb {:?} for x {:?} (want [{t}, {n}, {n}])", comb.shape, x.shape));
        }
        let out = self.new_tensor(&x.shape)?;
        let total = t * n * d;
        if total > 0 {
            self.dev.launch(
                "dsv4_hc_post_f32",
                lane_launch(total),
                &[
                    KernelArg::In(&x.buf, x.offset),
                    KernelArg::In(&y.buf, y.offset),
                    KernelArg::In(&post.buf, post.offset),
                    KernelArg::In(&comb.buf, comb.offset),
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::count(t),
                    KernelArg::count(n),
                    KernelArg::count(d),
                ],
            )?;
        }
        Ok(out)
    }

    pub(crate) fn hc_head_op(
        &self,
        x: &CudaTensor<D>,
        fn_w: &CudaWeight<D>,
        base: &CudaTensor<D>,
        scale: &CudaTensor<D>,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<CudaTensor<D>> {
        let (t, n, d) = hc_params("hc_head", &x.shape, &fn_w.shape, &base.shape, &scale.shape, |n| n, 1)?;
        let Some(config) = token_launch(t, n * d, n) else {
            return self.hc_head_composed(x, fn_w, base, scale, hc_eps, norm_eps);
        };
        let out = self.new_tensor(&[t, d])?;
        if t == 0 {
            return Ok(out);
        }
        let mixes = self.hc_mixes(x, fn_w)?;
        self.dev.launch(
            "dsv4_hc_head_f32",
            config,
            &[
                KernelArg::In(&x.buf, x.offset),
                KernelArg::In(&mixes.buf, mixes.offset),
                KernelArg::In(&base.buf, base.offset),
                KernelArg::In(&scale.buf, scale.offset),
                KernelArg::Out(&out.buf, 0),
                KernelArg::count(t),
                KernelArg::count(n),
                KernelArg::count(d),
                KernelArg::F32(hc_eps),
                KernelArg::F32(norm_eps),
            ],
        )?;
        Ok(out)
    }

    /// The trait's default body of `hc_head` (its definition), for stream counts whose
    /// per-token state does not fit the kernel's shared memory.
    fn hc_head_composed(
        &self,
        x: &CudaTensor<D>,
        fn_w: &CudaWeight<D>,
        base: &CudaTensor<D>,
        scale: &CudaTensor<D>,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<CudaTensor<D>> {
        let (t, n, d) = (x.shape[0], x.shape[1], x.shape[2]);
        let flat = self.rms_norm_op(&self.reshape_op(x, &[t, n * d])?, None, norm_eps)?;
        let mixes = self.linear_op(&flat, fn_w)?;
        let pre = self.binary_op(&self.binary_op(&mixes, scale, BinaryOp::Mul)?, base, BinaryOp::Add)?;
        let pre = self.affine_op(&self.unary_op(&pre, UnaryOp::Sigmoid)?, 1.0, hc_eps)?;
        let weighted = self.binary_op(&self.reshape_op(&pre, &[t, n, 1])?, x, BinaryOp::Mul)?;
        self.reshape_op(&self.reduce_op(&weighted, 1, ReduceOp::Sum)?, &[t, d])
    }

    /// kv and score `[W, L, c]` → `[W, c]`.
    pub(crate) fn compressor_pool_op(&self, kv: &CudaTensor<D>, score: &CudaTensor<D>) -> Result<CudaTensor<D>> {
        let &[w, l, c] = &kv.shape[..] else {
            return fail(format!("compressor_pool: kv {:?} is not [W, L, c]", kv.shape));
        };
        if score.shape != kv.shape {
            return fail(format!(
                "compressor_pool: score {:?} for kv {:?} (want the same shape)",
                score.shape, kv.shape
            ));
        }
        let out = self.new_tensor(&[w, c])?;
        if w * c > 0 {
            self.dev.launch(
                "dsv4_compressor_pool_f32",
                lane_launch(w * c),
                &[
                    KernelArg::In(&kv.buf, kv.offset),
                    KernelArg::In(&score.buf, score.offset),
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::count(w),
                    KernelArg::count(l),
                    KernelArg::count(c),
                ],
            )?;
        }
        Ok(out)
    }

    /// gate and up of one shape (the model's case) in one kernel; shapes that differ take the
    /// definition's primitives, which broadcast them (or say why they cannot).
    pub(crate) fn swiglu_op(&self, gate: &CudaTensor<D>, up: &CudaTensor<D>, limit: f32) -> Result<CudaTensor<D>> {
        if gate.shape != up.shape {
            let g = self.clamp_op(gate, f32::NEG_INFINITY, limit)?;
            let u = self.clamp_op(up, -limit, limit)?;
            return self.binary_op(&self.unary_op(&g, UnaryOp::Silu)?, &u, BinaryOp::Mul);
        }
        let out = self.new_tensor(&gate.shape)?;
        let n: usize = gate.shape.iter().product();
        if n > 0 {
            self.dev.launch(
                "dsv4_swiglu_f32",
                lane_launch(n),
                &[
                    KernelArg::In(&gate.buf, gate.offset),
                    KernelArg::In(&up.buf, up.offset),
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::count(n),
                    KernelArg::F32(limit),
                ],
            )?;
        }
        Ok(out)
    }

    /// Top-k ids are computed on the device (no host values, as `topk`'s); hash ids come back as
    /// given (the same index, as the composition returns them).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_route_op(
        &self,
        logits: &CudaTensor<D>,
        scoring: ScoringFunc,
        bias: Option<&CudaTensor<D>>,
        hash_ids: Option<&CudaIndex<D>>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(CudaIndex<D>, CudaTensor<D>)> {
        let hash = hash_ids.map(|h| (&h.shape[..], h.bounds()));
        let shape = checks::moe_route(Self::NAME, &logits.shape, bias.map(|b| &b.shape[..]), hash, k)?;
        let (t, e) = (logits.shape[0], logits.shape[1]);
        if i32::try_from(e).is_err() {
            return fail(format!("moe_route: {e} experts do not fit i32 ids"));
        }
        // Scores, and for a top-k the selection keys, of one token in shared memory.
        let words = if hash_ids.is_some() { e } else { 2 * e };
        let Some(config) = token_launch(t, e, words) else {
            return composed::moe_route(self, logits, scoring, bias, hash_ids, k, routed_scale);
        };
        let weights = self.new_tensor(&shape)?;
        let scoring = score_code(scoring);
        match hash_ids {
            Some(ids) => {
                if t * k > 0 {
                    self.dev.launch(
                        "dsv4_moe_route_hash_f32",
                        config,
                        &[
                            KernelArg::Out(&weights.buf, 0),
                            KernelArg::In(&logits.buf, logits.offset),
                            KernelArg::In(&ids.buf, ids.offset),
                            KernelArg::count(t),
                            KernelArg::count(e),
                            KernelArg::count(k),
                            KernelArg::I32(scoring),
                            KernelArg::F32(routed_scale),
                        ],
                    )?;
                }
                Ok((ids.clone(), weights))
            }
            None => {
                let ids = self.new_index(&shape)?;
                if t * k > 0 {
                    // Without a bias the kernel is told so and never reads it (logits stand in).
                    let b = bias.unwrap_or(logits);
                    self.dev.launch(
                        "dsv4_moe_route_topk_f32",
                        config,
                        &[
                            KernelArg::Out(&ids.buf, 0),
                            KernelArg::Out(&weights.buf, 0),
                            KernelArg::In(&logits.buf, logits.offset),
                            KernelArg::In(&b.buf, b.offset),
                            KernelArg::count(t),
                            KernelArg::count(e),
                            KernelArg::count(k),
                            KernelArg::I32(scoring),
                            KernelArg::I32(i32::from(bias.is_some())),
                            KernelArg::F32(routed_scale),
                        ],
                    )?;
                }
                Ok((ids, weights))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::kernel_define;

    const SOURCE: &str = include_str!("../kernels/fused.cu");

    #[test]
    fn lane_launches_fit_the_work() {
        // A few lanes: one warp, not a block of 256 mostly idle threads (each is a fiber on
        // the emulator).
        assert_eq!(lane_launch(0), LaunchConfig::linear(1, 32));
        assert_eq!(lane_launch(3), LaunchConfig::linear(1, 32));
        assert_eq!(lane_launch(33), LaunchConfig::linear(1, 64));
        assert_eq!(lane_launch(256), LaunchConfig::linear(1, 256));
        assert_eq!(lane_launch(257), LaunchConfig::linear(2, 256));
        assert_eq!(lane_launch(1 << 40), LaunchConfig::linear(MAX_BLOCKS as u32, 256));
        for lanes in 0..2000 {
            let c = lane_launch(lanes);
            let covered = c.grid.0 as usize * c.threads_per_block() as usize;
            assert!(c.block.0.is_multiple_of(32) && (32..=256).contains(&c.block.0), "{lanes}: {c:?}");
            assert!(covered >= lanes && covered < lanes + 256, "{lanes}: {c:?}");
        }
    }

    #[test]
    fn token_launches_match_the_row_kernels_and_bound_shared_memory() {
        // hc_pre of V4 (n = 4, D = 7168): the rms_norm launch's 256 threads, pre + comb shared.
        let c = token_launch(3, 4 * 7168, 4 + 16).unwrap();
        assert_eq!(c, LaunchConfig { grid: (3, 1, 1), block: (256, 1, 1), shared_bytes: 80 });
        assert_eq!(c.block.0, row_threads(4 * 7168));
        // Routing over 256 experts: softmax_rows' blockDim for rows of 256.
        assert_eq!(token_launch(1, 256, 512).unwrap().block, (256, 1, 1));
        assert_eq!(
            token_launch(5, 8, 16).unwrap(),
            LaunchConfig { grid: (5, 1, 1), block: (32, 1, 1), shared_bytes: 64 }
        );
        assert_eq!(token_launch(0, 8, 0).unwrap().grid, (1, 1, 1));
        assert_eq!(token_launch(1 << 20, 8, 0).unwrap().grid, (MAX_BLOCKS as u32, 1, 1));
        assert!(token_launch(1, 8, MAX_SHARED_BYTES / 4).is_some());
        assert!(token_launch(1, 8, MAX_SHARED_BYTES / 4 + 1).is_none());
        assert!(token_launch(1, 8, usize::MAX).is_none());
        // Where the fallbacks start: 109 mHC streams still fit, 110 do not; 6016 experts.
        assert!(token_launch(1, 8, 109 + 109 * 109).is_some());
        assert!(token_launch(1, 8, 110 + 110 * 110).is_none());
        assert!(token_launch(1, 6016, 2 * 6016).is_some());
        assert!(token_launch(1, 6017, 2 * 6017).is_none());
    }

    #[test]
    fn hc_parameters_are_checked_against_the_streams() {
        let ok = hc_params("hc_pre", &[3, 4, 8], &[24, 32], &[24], &[3], hc_pre_mix, 3);
        assert_eq!(ok.unwrap(), (3, 4, 8));
        assert_eq!(hc_params("hc_head", &[2, 4, 8], &[4, 32], &[4], &[1], |n| n, 1).unwrap(), (2, 4, 8));
        let msg = |r: Result<(usize, usize, usize)>| r.unwrap_err().to_string();
        let e = msg(hc_params("hc_pre", &[3, 32], &[24, 32], &[24], &[3], hc_pre_mix, 3));
        assert!(e.contains("hc_pre") && e.contains("[3, 32]") && e.contains("[T, n, D]"), "{e}");
        let e = msg(hc_params("hc_pre", &[3, 4, 8], &[24, 31], &[24], &[3], hc_pre_mix, 3));
        assert!(e.contains("fn [24, 31]") && e.contains("[24, 32]"), "{e}");
        let e = msg(hc_params("hc_pre", &[3, 4, 8], &[4, 32], &[24], &[3], hc_pre_mix, 3));
        assert!(e.contains("fn [4, 32]"), "{e}");
        let e = msg(hc_params("hc_pre", &[3, 4, 8], &[24, 32], &[4], &[3], hc_pre_mix, 3));
        assert!(e.contains("base [4]") && e.contains("[24]"), "{e}");
        let e = msg(hc_params("hc_head", &[3, 4, 8], &[4, 32], &[4], &[3], |n| n, 1));
        assert!(e.contains("hc_head") && e.contains("scale [3]") && e.contains("[1]"), "{e}");
        assert!(e.contains("cuda"), "{e}");
    }

    #[test]
    fn scoring_codes_match_the_kernels() {
        for s in [ScoringFunc::SqrtSoftplus, ScoringFunc::Sigmoid, ScoringFunc::Softmax] {
            let name = format!("DSV4_SCORE_{}", format!("{s:?}").to_uppercase());
            assert_eq!(kernel_define(SOURCE, &name), Some(score_code(s) as i64), "{name}");
        }
    }

    #[test]
    fn every_kernel_is_defined() {
        let names = crate::kernels::kernel_names(SOURCE);
        for k in [
            "dsv4_hc_pre_f32",
            "dsv4_hc_head_f32",
            "dsv4_sinkhorn_f32",
            "dsv4_hc_post_f32",
            "dsv4_compressor_pool_f32",
            "dsv4_swiglu_f32",
            "dsv4_moe_route_topk_f32",
            "dsv4_moe_route_hash_f32",
        ] {
            assert!(names.contains(&k), "{k} missing from fused.cu");
        }
    }
}
