//! The multi-token-prediction (MTP) block's weights (spec §D.5), under `mtp.{i}.*`.
//!
//! Official checkpoints ship one MTP layer (Flash: shard 46, 1,575 tensors): a sliding-window
//! block with a score-routed MoE, the `e_proj`/`h_proj` input projections with their norms,
//! and its own `hc_head_*` and `norm`; the embedding and the head are shared with the main
//! model. transformers drops these tensors when it saves a model, so they are optional: a
//! checkpoint without any `mtp.{i}.` tensor loads without MTP, and one with part of them is an
//! error naming the first missing tensor. They are never taken for decoder layers: those are
//! only ever read under `layers.{i}.`.
//!
//! This module only loads the weights; drafting with them (speculative decoding) is not
//! implemented yet.

use crate::backend::Backend;
use crate::config::{ModelConfig, RoutingKind};
use crate::error::Result;
use crate::model::loader::{mtp_layers_present, Loader};
use crate::model::mhc::{HyperConnection, HyperHead};
use crate::model::moe::Moe;

/// The sliding-window attention weights of an MTP block (`mtp.{i}.attn.*`).
pub struct MtpAttention<B: Backend> {
    pub wq_a: B::Weight,
    pub q_norm: B::Tensor,
    pub wq_b: B::Weight,
    pub wkv: B::Weight,
    pub kv_norm: B::Tensor,
    pub wo_a: B::Weight,
    pub wo_b: B::Weight,
    pub sinks: B::Tensor,
}

/// One MTP layer: `Z = h_proj·hnorm(h) + e_proj·enorm(embed(next))`, one block, own head mix.
pub struct MtpLayer<B: Backend> {
    pub e_proj: B::Weight,
    pub h_proj: B::Weight,
    pub enorm: B::Tensor,
    pub hnorm: B::Tensor,
    pub attn_hc: HyperConnection<B>,
    pub attn_norm: B::Tensor,
    pub attn: MtpAttention<B>,
    pub ffn_hc: HyperConnection<B>,
    pub ffn_norm: B::Tensor,
    pub moe: Moe<B>,
    pub norm: B::Tensor,
    pub hc_head: HyperHead<B>,
}

/// The MTP layers present in the checkpoint (index i of `layers` is `mtp.{i}` for the
/// layers that are present, in order).
pub struct Mtp<B: Backend> {
    pub layers: Vec<MtpLayer<B>>,
    /// The `mtp.{i}` index of each entry of `layers`.
    pub indices: Vec<usize>,
}

fn load_attention<B: Backend>(ld: &mut Loader<B>, cfg: &ModelConfig, p: &str) -> Result<MtpAttention<B>> {
    let (d, h, hd, ql) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
    let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
    Ok(MtpAttention {
        wq_a: ld.weight(&format!("{p}.wq_a.weight"), &[ql, d])?,
        q_norm: ld.tensor(&format!("{p}.q_norm.weight"), &[ql])?,
        wq_b: ld.weight(&format!("{p}.wq_b.weight"), &[h * hd, ql])?,
        wkv: ld.weight(&format!("{p}.wkv.weight"), &[hd, d])?,
        kv_norm: ld.tensor(&format!("{p}.kv_norm.weight"), &[hd])?,
        wo_a: ld.weight(&format!("{p}.wo_a.weight"), &[g * r, h * hd / g])?,
        wo_b: ld.weight(&format!("{p}.wo_b.weight"), &[d, g * r])?,
        sinks: ld.tensor(&format!("{p}.attn_sink"), &[h])?,
    })
}

fn load_layer<B: Backend>(ld: &mut Loader<B>, cfg: &ModelConfig, i: usize) -> Result<MtpLayer<B>> {
    let p = format!("mtp.{i}");
    let d = cfg.hidden_size;
    Ok(MtpLayer {
        e_proj: ld.weight(&format!("{p}.e_proj.weight"), &[d, d])?,
        h_proj: ld.weight(&format!("{p}.h_proj.weight"), &[d, d])?,
        enorm: ld.tensor(&format!("{p}.enorm.weight"), &[d])?,
        hnorm: ld.tensor(&format!("{p}.hnorm.weight"), &[d])?,
        attn_hc: HyperConnection::load(ld, cfg, &format!("{p}.hc_attn"))?,
        attn_norm: ld.tensor(&format!("{p}.attn_norm.weight"), &[d])?,
        attn: load_attention(ld, cfg, &format!("{p}.attn"))?,
        ffn_hc: HyperConnection::load(ld, cfg, &format!("{p}.hc_ffn"))?,
        ffn_norm: ld.tensor(&format!("{p}.ffn_norm.weight"), &[d])?,
        moe: Moe::load_at(ld, cfg, &format!("{p}.ffn"), RoutingKind::TopK)?,
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
