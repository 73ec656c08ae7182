//! The multi-token-prediction (MTP) block (spec §D.5; DeepSeek's `inference/model.py`,
//! `MTPBlock.forward`), under `mtp.{i}.*`: the draft model of speculative decoding
//! ([`crate::speculative`]).
//!
//! Official checkpoints ship one MTP layer (Flash: shard 46, 1,575 tensors): a sliding-window
//! block with a score-routed MoE, the `e_proj`/`h_proj` input projections with their norms,
//! and its own `hc_head_*` and `norm`; the embedding and the head are shared with the main
//! model. transformers drops these tensors when it saves a model, so they are optional: a
//! checkpoint without any `mtp.{i}.` tensor loads without MTP, and one with part of them is an
//! error naming the first missing tensor. They are never taken for decoder layers: those are
//! only ever read under `layers.{i}.`.
//!
//! The forward of row i takes the main model's residual streams at position i (after the last
//! block, before `hc_head`) and the token at position i + 1, runs at position i with its own
//! sliding-window state, and its logits predict the token at position i + 2:
//!
//! ```text
//! x = e_proj·enorm(embed(next)) (every stream) + h_proj·hnorm(h) (per stream)
//! x = Block(x)                  (sliding attention, score-routed MoE)
//! logits = head(norm(hc_head_mtp(x)))
//! ```
//!
//! Drafting a second token re-feeds the block's own output streams `x` as `h`.

use crate::backend::{Backend, BinaryOp, DeviceTensor};
use crate::config::{AttentionKind, ModelConfig, RoutingKind};
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvConfig, KvDtype, Sequence};
use crate::model::attention::StepAngles;
use crate::model::batch::Batch;
use crate::model::loader::{mtp_layers_present, Loader};
use crate::model::mhc::HyperHead;
use crate::model::official::Proj;
use crate::model::{Block, Logits, Model};

/// One MTP layer: `Z = h_proj·hnorm(h) + e_proj·enorm(embed(next))`, one block, own head mix.
pub struct MtpLayer<B: Backend> {
    e_proj: Proj<B>,
    h_proj: Proj<B>,
    enorm: B::Tensor,
    hnorm: B::Tensor,
    block: Block<B>,
    norm: B::Tensor,
    hc_head: HyperHead<B>,
}

/// The MTP layers present in the checkpoint (index i of `layers` is `mtp.{i}` for the
/// layers that are present, in order).
pub struct Mtp<B: Backend> {
    pub layers: Vec<MtpLayer<B>>,
    /// The `mtp.{i}` index of each entry of `layers`.
    pub indices: Vec<usize>,
}

fn load_layer<B: Backend>(ld: &mut Loader<B>, cfg: &ModelConfig, i: usize) -> Result<MtpLayer<B>> {
    let p = format!("mtp.{i}");
    let d = cfg.hidden_size;
    Ok(MtpLayer {
        e_proj: ld.proj(&format!("{p}.e_proj.weight"), &[d, d])?,
        h_proj: ld.proj(&format!("{p}.h_proj.weight"), &[d, d])?,
        enorm: ld.tensor(&format!("{p}.enorm.weight"), &[d])?,
        hnorm: ld.tensor(&format!("{p}.hnorm.weight"), &[d])?,
        block: Block::load_at(ld, cfg, &p, AttentionKind::Sliding, RoutingKind::TopK)?,
        norm: ld.tensor(&format!("{p}.norm.weight"), &[d])?,
        hc_head: HyperHead::load(ld, cfg, &format!("{p}."))?,
    })
}

/// The MTP weights, or `None` when the checkpoint holds no `mtp.{i}.` tensor for any
/// `i < num_nextn_predict_layers`. A layer that is only partly present is an error.
pub fn load_mtp<B: Backend>(ld: &mut Loader<B>, cfg: &ModelConfig) -> Result<Option<Mtp<B>>> {
    let indices = mtp_layers_present(cfg, ld.ckpt);
    if indices.is_empty() {
        return Ok(None);
    }
    let layers = indices.iter().map(|&i| load_layer(ld, cfg, i)).collect::<Result<Vec<_>>>()?;
    Ok(Some(Mtp { layers, indices }))
}

/// The config of the MTP block's decoding state: one sliding-window layer (the block has no
/// compressor, so its pool is window blocks only).
pub fn mtp_state_config(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        num_layers: 1,
        attention: vec![AttentionKind::Sliding],
        routing: vec![RoutingKind::TopK],
        ..cfg.clone()
    }
}

/// The MTP block's decoding state for one sequence: its window rows in a pool of its own.
pub struct MtpState<B: Backend> {
    pub(crate) cache: KvCache<B>,
    pub(crate) seq: Sequence,
    /// The longest step it was sized for.
    max_step: usize,
}

impl<B: Backend> MtpState<B> {
    /// A state for one sequence fed in steps of up to `max_step` rows.
    pub fn new(be: &B, cfg: &ModelConfig, dtype: KvDtype, max_step: usize) -> Result<Self> {
        let mcfg = mtp_state_config(cfg);
        let config = KvConfig::for_sequences(&mcfg, dtype, 1, cfg.sliding_window + max_step, max_step);
        let cache = KvCache::new(be, &mcfg, config)?;
        let seq = cache.new_sequence();
        Ok(MtpState { cache, seq, max_step })
    }

    /// Rows fed so far (= the position of the next row).
    pub fn pos(&self) -> usize {
        self.seq.pos()
    }

    /// The longest step (rows) its pool was sized for.
    pub fn max_step(&self) -> usize {
        self.max_step
    }

    /// Empties the state and starts it at position `pos` (the main sequence continues a cached
    /// prefix of `pos` tokens; see [`KvCache::new_sequence_at`]).
    pub fn restart_at(&mut self, pos: usize) {
        self.cache.release(&mut self.seq);
        let depth = self.seq.rollback_depth();
        self.seq = self.cache.new_sequence_at(pos);
        self.seq.set_rollback_depth(depth);
    }
}

impl<B: Backend> Model<B> {
    /// The first MTP layer's forward over a run of rows of one sequence (spec §D.5): row r has
    /// the residual streams `h[r]` `[T, n, D]` of position `start + r` (the main model's after
    /// its last block, or this block's own output when drafting further) and `next[r]`, the
    /// token at position `start + r + 1`. `start` must be the state's position. Returns the
    /// logits (`[T, vocab]`, or `[1, vocab]` of the last row with [`Logits::LastPerSequence`];
    /// row r predicts the token at `start + r + 2`) and the block's output streams `[T, n, D]`
    /// (the `h` of the next draft).
    ///
    /// Errors when the checkpoint has no MTP block, on shape mismatches, and where a main step
    /// would (ids outside the vocabulary, positions past the context, a full pool).
    pub fn mtp_forward(
        &self,
        be: &B,
        h: &B::Tensor,
        next: &[u32],
        start: usize,
        state: &mut MtpState<B>,
        logits: Logits,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let layer = self
            .mtp
            .as_ref()
            .and_then(|m| m.layers.first())
            .ok_or_else(|| Error::Input("this checkpoint has no MTP block (mtp.0.*) to draft with".into()))?;
        let (t, n, d) = (next.len(), self.cfg.hc_mult, self.cfg.hidden_size);
        if h.shape() != [t, n, d] {
            return Err(Error::Input(format!(
                "MTP input streams have shape {:?}, expected [{t}, {n}, {d}] (one row per next token)",
                h.shape()
            )));
        }
        let batch = Batch::new(&[(next, start)])?;
        self.check_batch(&batch, &[&mut state.seq])?;
        let prec = self.precision;
        let eps = self.cfg.rms_norm_eps as f32;
        let ids: Vec<i32> = next.iter().map(|&x| x as i32).collect();
        let e = prec.act_of(be, self.embed(be, &ids))?;
        let e = prec.act_of(be, be.rms_norm(&e, Some(&layer.enorm), eps))?;
        let hn = prec.act_of(be, be.rms_norm(&be.reshape(h, &[t * n, d])?, Some(&layer.hnorm), eps))?;
        let pe = be.reshape(&layer.e_proj.linear_act(be, &e, prec)?, &[t, 1, d])?;
        let ph = be.reshape(&layer.h_proj.linear_act(be, &hn, prec)?, &[t, n, d])?;
        let x = prec.act_of(be, be.binary(&ph, &pe, BinaryOp::Add))?;

        let plan = state.cache.plan_step(be, &batch, &mut [&mut state.seq])?;
        let angles = StepAngles::new(be, self.rope_main.clone(), &batch.positions)?;
        let (x, _) =
            layer.block.forward(be, &x, &batch, &angles, &plan, &mut state.cache.layers[0], batch.len(), prec)?;
        state.cache.finish_step(&batch, &mut [&mut state.seq]);
        let rows = match logits {
            Logits::All => x.clone(),
            Logits::LastPerSequence => be.narrow(&x, 0, t - 1, 1)?,
        };
        Ok((self.logits(be, &layer.hc_head, &layer.norm, &rows)?, x))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::backend::{Backend, DeviceTensor};
    use crate::checkpoint::Checkpoint;
    use crate::error::Error;
    use crate::model::loader::{expected_mtp_tensors, expected_tensors, TensorRole};
    use crate::tensor::{DType, HostTensor, StoredWeight};

    /// A backend that only records shapes: enough to drive the loader.
    struct Shapes;
    #[derive(Clone)]
    struct S(Vec<usize>);
    impl DeviceTensor for S {
        fn shape(&self) -> &[usize] {
            &self.0
        }
    }

    struct P;
    impl crate::backend::DevicePool for P {
        fn rows(&self) -> usize {
            0
        }
        fn width(&self) -> usize {
            0
        }
        fn format(&self) -> crate::backend::RowFormat {
            crate::backend::RowFormat::F32
        }
    }

    #[allow(unused_variables)]
    impl Backend for Shapes {
        type Tensor = S;
        type Index = S;
        type Weight = Vec<usize>;
        type Pool = P;
        fn alloc_pool(&self, rows: usize, width: usize, format: crate::backend::RowFormat) -> Result<P> {
            unimplemented!()
        }
        fn pool_write(&self, pool: &mut P, slots: &S, values: &S) -> Result<()> {
            unimplemented!()
        }
        fn pool_read(&self, pool: &P, slots: &S) -> Result<S> {
            unimplemented!()
        }
        fn name(&self) -> &str {
            "shapes"
        }
        fn describe(&self) -> String {
            String::new()
        }
        fn upload(&self, data: &[f32], shape: &[usize]) -> Result<S> {
            Ok(S(shape.to_vec()))
        }
        fn download(&self, t: &S) -> Result<Vec<f32>> {
            unimplemented!()
        }
        fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<S> {
            Ok(S(shape.to_vec()))
        }
        fn download_index(&self, t: &S) -> Result<Vec<i32>> {
            unimplemented!()
        }
        fn upload_weight(&self, w: &StoredWeight) -> Result<Vec<usize>> {
            Ok(w.shape.clone())
        }
        fn weight_shape<'w>(&self, w: &'w Vec<usize>) -> &'w [usize] {
            w
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        fn full(&self, shape: &[usize], value: f32) -> Result<S> {
            unimplemented!()
        }
        fn linear(&self, x: &S, w: &Vec<usize>) -> Result<S> {
            unimplemented!()
        }
        fn grouped_linear(&self, x: &S, w: &Vec<usize>, groups: usize) -> Result<S> {
            unimplemented!()
        }
        fn embedding(&self, table: &Vec<usize>, ids: &S) -> Result<S> {
            unimplemented!()
        }
        fn matmul(&self, a: &S, b: &S, transpose_b: bool) -> Result<S> {
            unimplemented!()
        }
        fn unary(&self, x: &S, op: crate::backend::UnaryOp) -> Result<S> {
            unimplemented!()
        }
        fn binary(&self, a: &S, b: &S, op: crate::backend::BinaryOp) -> Result<S> {
            unimplemented!()
        }
        fn affine(&self, x: &S, mul: f32, add: f32) -> Result<S> {
            unimplemented!()
        }
        fn clamp(&self, x: &S, min: f32, max: f32) -> Result<S> {
            unimplemented!()
        }
        fn round_to_bf16(&self, x: &S) -> Result<S> {
            unimplemented!()
        }
        fn reduce(&self, x: &S, axis: usize, op: crate::backend::ReduceOp) -> Result<S> {
            unimplemented!()
        }
        fn softmax(&self, x: &S, axis: usize) -> Result<S> {
            unimplemented!()
        }
        fn rms_norm(&self, x: &S, weight: Option<&S>, eps: f32) -> Result<S> {
            unimplemented!()
        }
        fn rope(&self, x: &S, cos: &S, sin: &S, inverse: bool) -> Result<S> {
            unimplemented!()
        }
        fn reshape(&self, x: &S, shape: &[usize]) -> Result<S> {
            unimplemented!()
        }
        fn transpose(&self, x: &S, a: usize, b: usize) -> Result<S> {
            unimplemented!()
        }
        fn narrow(&self, x: &S, axis: usize, start: usize, len: usize) -> Result<S> {
            unimplemented!()
        }
        fn concat(&self, xs: &[&S], axis: usize) -> Result<S> {
            unimplemented!()
        }
        fn index_select(&self, x: &S, idx: &S) -> Result<S> {
            unimplemented!()
        }
        fn gather_last(&self, x: &S, idx: &S) -> Result<S> {
            unimplemented!()
        }
        fn index_add(&self, dst: &S, idx: &S, src: &S) -> Result<S> {
            unimplemented!()
        }
        fn topk(&self, x: &S, k: usize) -> Result<(S, S)> {
            unimplemented!()
        }
        fn index_mask(&self, idx: &S) -> Result<S> {
            unimplemented!()
        }
        fn concat_index(&self, xs: &[&S], axis: usize) -> Result<S> {
            unimplemented!()
        }
        fn offset_index(&self, idx: &S, offset: i32) -> Result<S> {
            unimplemented!()
        }
    }

    /// Zero-valued F32 tensors for every MTP entry (I64 zeros for integer tables).
    fn mtp_tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Vec<HostTensor> {
        expected_mtp_tensors(cfg, ckpt, 0)
            .into_iter()
            .map(|e| {
                let n: usize = e.shape.iter().product();
                let (dt, bytes) = match e.role {
                    TensorRole::Ints => (DType::I64, vec![0u8; n * 8]),
                    _ => (DType::F32, vec![0u8; n * 4]),
                };
                HostTensor::from_bytes(e.name, dt, e.shape, bytes).unwrap()
            })
            .collect()
    }

    #[test]
    fn mtp_loads_exactly_the_listed_tensors_and_is_optional() {
        let (cfg, ckpt) = crate::builtin::tiny().unwrap();
        let mut quiet = |_: usize, _: usize, _: u64| {};
        let mut ld = Loader::new(&Shapes, &ckpt, &mut quiet);
        assert!(load_mtp(&mut ld, &cfg).unwrap().is_none(), "no mtp.* tensors: no MTP");

        let mut all: Vec<HostTensor> = ckpt.tensors().cloned().collect();
        let extra = mtp_tensors(&cfg, &ckpt);
        let want: BTreeSet<String> = extra.iter().map(|t| t.name.clone()).collect();
        all.extend(extra.clone());
        let with_mtp = Checkpoint::from_tensors(all).unwrap();
        with_mtp.record_access();
        let mut ld = Loader::new(&Shapes, &with_mtp, &mut quiet);
        let mtp = load_mtp(&mut ld, &cfg).unwrap().expect("MTP present");
        assert_eq!(mtp.indices, vec![0]);
        assert_eq!(with_mtp.accessed(), want, "load_mtp reads exactly expected_mtp_tensors");
        // MTP names never land among the decoder layers' expected tensors.
        assert!(expected_tensors(&cfg, &with_mtp).iter().all(|e| !e.name.starts_with("mtp.")));

        // A partial MTP layer names the first missing tensor.
        let mut partial: Vec<HostTensor> = ckpt.tensors().cloned().collect();
        partial.extend(extra.into_iter().filter(|t| t.name != "mtp.0.h_proj.weight"));
        let partial = Checkpoint::from_tensors(partial).unwrap();
        let mut ld = Loader::new(&Shapes, &partial, &mut quiet);
        match load_mtp(&mut ld, &cfg) {
            Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "mtp.0.h_proj.weight"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a partial MTP layer loaded"),
        }
    }
}
