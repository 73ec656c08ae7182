//! Manifold-constrained hyper-connections (mHC, spec §B.2-B.3, §B.6): the residual is `n`
//! parallel streams; each sub-layer reads a learned mix of them (pre), and writes its output
//! back through a learned expansion (post) plus a Sinkhorn-projected stream mixing (comb).

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::loader::Loader;
use crate::precision::Precision;

/// The pre/post/comb projection of one sub-layer (`hc_attn_*` or `hc_ffn_*`).
pub struct HyperConnection<B: Backend> {
    fn_w: B::Weight,
    base: B::Tensor,
    scale: B::Tensor,
    sinkhorn_iters: usize,
    hc_eps: f32,
    norm_eps: f32,
}

/// What the post-mapping needs from the pre-mapping.
pub struct HcMix<B: Backend> {
    post: B::Tensor,
    comb: B::Tensor,
}

impl<B: Backend> HyperConnection<B> {
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, prefix: &str) -> Result<Self> {
        let (n, d, m) = (cfg.hc_mult, cfg.hidden_size, cfg.hc_mix_dim());
        Ok(HyperConnection {
            fn_w: ld.weight(&format!("{prefix}_fn"), &[m, n * d])?,
            base: ld.tensor(&format!("{prefix}_base"), &[m])?,
            scale: ld.tensor(&format!("{prefix}_scale"), &[3])?,
            sinkhorn_iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps as f32,
            norm_eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Streams `[T, n, D]` → the sub-layer input `[T, D]` (in `prec`: the f32 mix cast back
    /// to the activation dtype, spec §B.2 step 5) and the mix for [`Self::post`] (f32).
    pub fn pre(&self, be: &B, x: &B::Tensor, prec: Precision) -> Result<(B::Tensor, HcMix<B>)> {
        let (collapsed, post, comb) =
            be.hc_pre(x, &self.fn_w, &self.base, &self.scale, self.sinkhorn_iters, self.hc_eps, self.norm_eps)?;
        Ok((prec.act_of(be, Ok(collapsed))?, HcMix { post, comb }))
    }

    /// Residual update with the sub-layer output y `[T, D]`, computed in f32 and cast to the
    /// activation dtype (spec §B.7).
    pub fn post(&self, be: &B, x: &B::Tensor, y: &B::Tensor, mix: &HcMix<B>, prec: Precision) -> Result<B::Tensor> {
        prec.act_of(be, be.hc_post(x, y, &mix.post, &mix.comb))
    }
}

/// The final collapse of the streams before the output norm (`hc_head_*`).
pub struct HyperHead<B: Backend> {
    fn_w: B::Weight,
    base: B::Tensor,
    scale: B::Tensor,
    hc_eps: f32,
    norm_eps: f32,
}

impl<B: Backend> HyperHead<B> {
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, prefix: &str) -> Result<Self> {
        let (n, d) = (cfg.hc_mult, cfg.hidden_size);
        Ok(HyperHead {
            fn_w: ld.weight(&format!("{prefix}hc_head_fn"), &[n, n * d])?,
            base: ld.tensor(&format!("{prefix}hc_head_base"), &[n])?,
            scale: ld.tensor(&format!("{prefix}hc_head_scale"), &[1])?,
            hc_eps: cfg.hc_eps as f32,
            norm_eps: cfg.rms_norm_eps as f32,
        })
    }

    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.hc_head(x, &self.fn_w, &self.base, &self.scale, self.hc_eps, self.norm_eps)
    }
}
