//! The CUDA backend's fused V4 ops (backend-cuda/src/fused.rs, kernels/fused.cu) on the emulator:
//! each runs its own kernel (and nothing else but `hc_pre`'s and `hc_head`'s GEMM), as the
//! launch counter shows, and agrees with the op's definition (the trait's default composition,
//! run through `PrimitivesOnly` on the same device) at V4's sizes and in the corners the op-level
//! suite does not reach: several blocks, more than 8 tokens (the GEMM path), 256 experts,
//! all-masked candidates, one or no Sinkhorn iteration, non-square Sinkhorn, broadcast SwiGLU.

use std::collections::BTreeMap;

use dsv4_backend_cuda::CudaBackend;
use dsv4_core::backend::Backend;
use dsv4_core::config::ScoringFunc;
use dsv4_core::primitives_only::PrimitivesOnly;
use dsv4_core::tensor::{HostTensor, StoredWeight};
use dsv4_core::test_data::Rng;
use dsv4_cuda_emu::EmulatedDevice;

type Be = CudaBackend<EmulatedDevice>;

fn backend() -> Be {
    CudaBackend::new(EmulatedDevice::new())
}

fn up(be: &Be, data: &[f32], shape: &[usize]) -> <Be as Backend>::Tensor {
    be.upload(data, shape).unwrap()
}

fn down(be: &Be, t: &<Be as Backend>::Tensor) -> Vec<f32> {
    be.download(t).unwrap()
}

fn weight(be: &Be, shape: &[usize], data: &[f32]) -> <Be as Backend>::Weight {
    let t = HostTensor::from_f32("w.weight", shape.to_vec(), data).unwrap();
    be.upload_weight(&StoredWeight::float(t).unwrap()).unwrap()
}

/// The kernels `f` launched on `be`'s device, with their counts.
fn launches<T>(be: &Be, f: impl FnOnce() -> T) -> (T, BTreeMap<&'static str, u64>) {
    let before: BTreeMap<_, _> = be.device().launch_counts().into_iter().collect();
    let out = f();
    let after = be.device().launch_counts();
    let ran = after.into_iter().map(|(k, n)| (k, n - before.get(k).copied().unwrap_or(0))).filter(|&(_, n)| n > 0);
    (out, ran.collect())
}

fn once(kernels: &[&'static str]) -> BTreeMap<&'static str, u64> {
    kernels.iter().map(|&k| (k, 1)).collect()
}

/// Within `rel` of the largest magnitude of `want`.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

fn err<T>(r: dsv4_core::error::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const REL: f32 = 64.0 * f32::EPSILON;

/// mHC inputs at V4's n = 4: (x, fn, base, scale, head fn, head base, head scale).
fn mhc_inputs(rng: &mut Rng, t: usize, n: usize, d: usize) -> [Vec<f32>; 7] {
    let mix = (2 + n) * n;
    let x: Vec<f32> = rng.vec(t * n * d).iter().map(|v| 2.0 * v).collect();
    let fn_w: Vec<f32> = rng.vec(mix * n * d).iter().map(|v| v * 0.05).collect();
    let head_w: Vec<f32> = rng.vec(n * n * d).iter().map(|v| v * 0.05).collect();
    [x, fn_w, rng.vec(mix), vec![0.7, 1.3, 2.1], head_w, rng.vec(n), vec![0.8]]
}

#[test]
fn hc_ops_launch_their_kernels_and_match_the_definition() {
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(70);
    // 3 tokens take the GEMV for the mixes, 11 the GEMM; D = 1000 walks the channels in strides.
    for (t, n, d, gemm) in [(3, 4, 1000, "dsv4_gemv_f32"), (11, 4, 96, "gemm"), (2, 3, 5, "dsv4_gemv_f32")] {
        let [x, fn_w, base, scale, head_w, head_base, head_scale] = mhc_inputs(&mut rng, t, n, d);
        let mix = (2 + n) * n;
        let (xt, yt) = (up(&be, &x, &[t, n, d]), up(&be, &rng.vec(t * d), &[t, d]));
        let (fw, bt, st) = (weight(&be, &[mix, n * d], &fn_w), up(&be, &base, &[mix]), up(&be, &scale, &[3]));
        let (hw, hb, hs) = (weight(&be, &[n, n * d], &head_w), up(&be, &head_base, &[n]), up(&be, &head_scale, &[1]));
        let (cx, cy) = (up(&composed.0, &x, &[t, n, d]), up(&composed.0, &down(&be, &yt), &[t, d]));
        let cw = weight(&composed.0, &[mix, n * d], &fn_w);
        let (cb, cs) = (up(&composed.0, &base, &[mix]), up(&composed.0, &scale, &[3]));
        let chw = weight(&composed.0, &[n, n * d], &head_w);
        let (chb, chs) = (up(&composed.0, &head_base, &[n]), up(&composed.0, &head_scale, &[1]));
        let what = format!("T={t} n={n} D={d}");

        for iters in [20, 1, 0] {
            let (got, ran) = launches(&be, || be.hc_pre(&xt, &fw, &bt, &st, iters, 1e-6, 1e-6).unwrap());
            let mut want_ran = once(&["dsv4_hc_pre_f32"]);
            if gemm != "gemm" {
                want_ran.insert(gemm, 1);
            }
            assert_eq!(ran, want_ran, "hc_pre {what}: launches");
            let want = composed.hc_pre(&cx, &cw, &cb, &cs, iters, 1e-6, 1e-6).unwrap();
            let w = format!("hc_pre {what} iters={iters}");
            assert_close(&format!("{w}: collapsed"), &down(&be, &got.0), &down(&composed.0, &want.0), REL);
            assert_close(&format!("{w}: post"), &down(&be, &got.1), &down(&composed.0, &want.1), REL);
            assert_close(&format!("{w}: comb"), &down(&be, &got.2), &down(&composed.0, &want.2), REL * 20.0);

            // post: the mixes feed it, so use the fused comb and post on both sides.
            let (post, comb) = (down(&be, &got.1), down(&be, &got.2));
            let (out, ran) = launches(&be, || be.hc_post(&xt, &yt, &got.1, &got.2).unwrap());
            assert_eq!(ran, once(&["dsv4_hc_post_f32"]), "hc_post {what}: launches");
            let want = composed
                .hc_post(&cx, &cy, &up(&composed.0, &post, &[t, n]), &up(&composed.0, &comb, &[t, n, n]))
                .unwrap();
            assert_close(&format!("hc_post {what}"), &down(&be, &out), &down(&composed.0, &want), REL);
        }

        let (got, ran) = launches(&be, || be.hc_head(&xt, &hw, &hb, &hs, 1e-6, 1e-6).unwrap());
        let mut want_ran = once(&["dsv4_hc_head_f32"]);
        if gemm != "gemm" {
            want_ran.insert(gemm, 1);
        }
        assert_eq!(ran, want_ran, "hc_head {what}: launches");
        let want = composed.hc_head(&cx, &chw, &chb, &chs, 1e-6, 1e-6).unwrap();
        assert_close(&format!("hc_head {what}"), &down(&be, &got), &down(&composed.0, &want), REL);
    }
}

#[test]
fn sinkhorn_launches_one_kernel_for_square_and_rectangular_matrices() {
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(71);
    // 40 matrices: more than one warp; a rectangular shape normalises rows and columns alike.
    for (shape, iters) in [([40, 4, 4], 20), ([3, 4, 4], 1), ([3, 4, 4], 0), ([5, 2, 3], 7)] {
        let data: Vec<f32> = rng.vec(shape.iter().product()).iter().map(|v| v.abs() + 0.01).collect();
        let (got, ran) = launches(&be, || be.sinkhorn(&up(&be, &data, &shape), iters, 1e-3).unwrap());
        assert_eq!(ran, once(&["dsv4_sinkhorn_f32"]), "sinkhorn {shape:?}: launches");
        let want = composed.sinkhorn(&up(&composed.0, &data, &shape), iters, 1e-3).unwrap();
        assert_close(&format!("sinkhorn {shape:?} iters={iters}"), &down(&be, &got), &down(&composed.0, &want), REL);
    }
    let e = err(be.sinkhorn(&up(&be, &[1.0; 16], &[4, 4]), 3, 1e-3));
    assert!(e.contains("sinkhorn") && e.contains("[4, 4]"), "{e}");
}

#[test]
fn compressor_pool_launches_one_kernel_and_masked_channels_pool_to_zero() {
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(72);
    let (w, l, c) = (6, 8, 64);
    let kv = rng.vec(w * l * c);
    let mut score: Vec<f32> = rng.vec(w * l * c).iter().map(|v| 4.0 * v).collect();
    // Window 1 has no candidate at all in channel 3, and only its last one in channel 4.
    for li in 0..l {
        score[(l + li) * c + 3] = f32::NEG_INFINITY;
        if li + 1 < l {
            score[(l + li) * c + 4] = f32::NEG_INFINITY;
        }
    }
    let (got, ran) = launches(&be, || be.compressor_pool(&up(&be, &kv, &[w, l, c]), &up(&be, &score, &[w, l, c])));
    let got = down(&be, &got.unwrap());
    assert_eq!(ran, once(&["dsv4_compressor_pool_f32"]));
    let want = composed.compressor_pool(&up(&composed.0, &kv, &[w, l, c]), &up(&composed.0, &score, &[w, l, c]));
    // Sequential softmax and sum over the candidates, as the composition's column kernels: the
    // same bits.
    assert_eq!(bits(&got), bits(&down(&composed.0, &want.unwrap())));
    assert_eq!(got[c + 3], 0.0);
    assert_eq!(got[c + 4], kv[(2 * l - 1) * c + 4]);
    let e = err(be.compressor_pool(&up(&be, &kv, &[w, l, c]), &up(&be, &score[..w * l], &[w, l, 1])));
    assert!(e.contains("compressor_pool"), "{e}");
}

#[test]
fn swiglu_launches_one_kernel_and_broadcasts_through_the_primitives() {
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(73);
    let gate: Vec<f32> = rng.vec(3 * 300).iter().map(|v| v * 15.0).collect();
    let upv: Vec<f32> = rng.vec(3 * 300).iter().map(|v| v * 15.0).collect();
    let (got, ran) = launches(&be, || be.swiglu(&up(&be, &gate, &[3, 300]), &up(&be, &upv, &[3, 300]), 10.0));
    assert_eq!(ran, once(&["dsv4_swiglu_f32"]));
    let want = composed.swiglu(&up(&composed.0, &gate, &[3, 300]), &up(&composed.0, &upv, &[3, 300]), 10.0);
    assert_eq!(bits(&down(&be, &got.unwrap())), bits(&down(&composed.0, &want.unwrap())));
    // An up row broadcast over the gate's rows: the definition's primitives.
    let (got, ran) = launches(&be, || be.swiglu(&up(&be, &gate, &[3, 300]), &up(&be, &upv[..300], &[300]), 10.0));
    assert!(!ran.contains_key("dsv4_swiglu_f32"), "{ran:?}");
    let want = composed.swiglu(&up(&composed.0, &gate, &[3, 300]), &up(&composed.0, &upv[..300], &[300]), 10.0);
    assert_eq!(bits(&down(&be, &got.unwrap())), bits(&down(&composed.0, &want.unwrap())));
    assert!(be.swiglu(&up(&be, &gate, &[3, 300]), &up(&be, &upv[..200], &[200]), 10.0).is_err());
}

#[test]
fn moe_route_launches_one_kernel_and_gives_the_definitions_bits_for_256_experts() {
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(74);
    let (t, e, k, scale) = (9, 256, 6, 2.5f32);
    let mut logits: Vec<f32> = rng.vec(t * e).iter().map(|v| 4.0 * v).collect();
    // Ties to the lower expert: token 0's best two logits duplicated further up; a softplus past
    // torch's threshold.
    logits[17] = 30.0;
    logits[200] = 30.0;
    logits[e + 5] = 25.0;
    let bias: Vec<f32> = rng.vec(e).iter().map(|v| 0.5 * v).collect();
    let hash: Vec<i32> = (0..t * k).map(|i| ((i * 37 + 11) % e) as i32).collect();
    let (lt, bt, ht) = (up(&be, &logits, &[t, e]), up(&be, &bias, &[e]), be.upload_index(&hash, &[t, k]).unwrap());
    let (clt, cbt) = (up(&composed.0, &logits, &[t, e]), up(&composed.0, &bias, &[e]));
    let cht = composed.0.upload_index(&hash, &[t, k]).unwrap();
    for scoring in [ScoringFunc::SqrtSoftplus, ScoringFunc::Sigmoid, ScoringFunc::Softmax] {
        for (with_bias, with_hash) in [(false, false), (true, false), (false, true)] {
            let what = format!("moe_route {scoring:?} bias {with_bias} hash {with_hash}");
            let ((ids, w), ran) = launches(&be, || {
                be.moe_route(&lt, scoring, with_bias.then_some(&bt), with_hash.then_some(&ht), k, scale).unwrap()
            });
            let kernel = if with_hash { "dsv4_moe_route_hash_f32" } else { "dsv4_moe_route_topk_f32" };
            assert_eq!(ran, once(&[kernel]), "{what}: launches");
            let (cids, cw) = composed
                .moe_route(&clt, scoring, with_bias.then_some(&cbt), with_hash.then_some(&cht), k, scale)
                .unwrap();
            let ids = be.download_index(&ids).unwrap();
            assert_eq!(ids, composed.0.download_index(&cids).unwrap(), "{what}: ids");
            if !with_hash && !with_bias {
                assert_eq!(&ids[..2], &[17, 200], "{what}: the tie goes to the lower expert first");
            }
            // Same scores, same block reductions: the same bits.
            assert_eq!(bits(&down(&be, &w)), bits(&down(&composed.0, &cw)), "{what}: weights");
        }
    }
    // k = E: every expert, in order.
    let (ids, w) = be.moe_route(&lt, ScoringFunc::Sigmoid, None, None, e, 1.0).unwrap();
    let (cids, cw) = composed.moe_route(&clt, ScoringFunc::Sigmoid, None, None, e, 1.0).unwrap();
    assert_eq!(be.download_index(&ids).unwrap(), composed.0.download_index(&cids).unwrap());
    assert_eq!(bits(&down(&be, &w)), bits(&down(&composed.0, &cw)));
    // Bad shapes and hash ids are refused before any launch.
    let (r, ran) = launches(&be, || be.moe_route(&lt, ScoringFunc::Sigmoid, None, None, e + 1, 1.0));
    assert!(r.is_err() && ran.is_empty());
    let bad = be.upload_index(&[0, e as i32], &[2, 1]).unwrap();
    let (r, ran) = launches(&be, || {
        be.moe_route(&up(&be, &logits[..2 * e], &[2, e]), ScoringFunc::Sigmoid, None, Some(&bad), 1, 1.0)
    });
    assert!(r.is_err() && ran.is_empty());
}

#[test]
fn hc_pre_beyond_shared_memory_runs_its_definition() {
    // 111 streams: pre and comb (111 + 111² floats) do not fit in 48 KiB of shared memory, so
    // the op runs the composition (with the fused Sinkhorn inside) rather than fail.
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let mut rng = Rng(75);
    let (t, n, d) = (1, 111, 2);
    let [x, fn_w, base, scale, ..] = mhc_inputs(&mut rng, t, n, d);
    let mix = (2 + n) * n;
    let (xt, fw) = (up(&be, &x, &[t, n, d]), weight(&be, &[mix, n * d], &fn_w));
    let (got, ran) =
        launches(&be, || be.hc_pre(&xt, &fw, &up(&be, &base, &[mix]), &up(&be, &scale, &[3]), 3, 1e-3, 1e-6).unwrap());
    assert!(!ran.contains_key("dsv4_hc_pre_f32") && ran.contains_key("dsv4_sinkhorn_f32"), "{ran:?}");
    let (cx, cw) = (up(&composed.0, &x, &[t, n, d]), weight(&composed.0, &[mix, n * d], &fn_w));
    let (cb, cs) = (up(&composed.0, &base, &[mix]), up(&composed.0, &scale, &[3]));
    let want = composed.hc_pre(&cx, &cw, &cb, &cs, 3, 1e-3, 1e-6).unwrap();
    assert_eq!(bits(&down(&be, &got.0)), bits(&down(&composed.0, &want.0)));
    assert_eq!(bits(&down(&be, &got.1)), bits(&down(&composed.0, &want.1)));
    assert_close("comb", &down(&be, &got.2), &down(&composed.0, &want.2), REL);
}

#[test]
fn moe_route_beyond_shared_memory_runs_its_definition() {
    // 6145 experts: scores and keys (2 · 6145 words) do not fit in 48 KiB of shared memory.
    let be = backend();
    let composed = PrimitivesOnly(backend());
    let (t, e, k) = (2, 6145, 8);
    let logits = Rng(76).vec(t * e);
    let (got, ran) =
        launches(&be, || be.moe_route(&up(&be, &logits, &[t, e]), ScoringFunc::Softmax, None, None, k, 1.5));
    let (ids, w) = got.unwrap();
    assert!(!ran.contains_key("dsv4_moe_route_topk_f32") && ran.contains_key("dsv4_topk_shared"), "{ran:?}");
    let (cids, cw) =
        composed.moe_route(&up(&composed.0, &logits, &[t, e]), ScoringFunc::Softmax, None, None, k, 1.5).unwrap();
    assert_eq!(be.download_index(&ids).unwrap(), composed.0.download_index(&cids).unwrap());
    assert_eq!(bits(&down(&be, &w)), bits(&down(&composed.0, &cw)));
}
