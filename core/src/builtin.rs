//! `builtin:tiny`: a small V4 model with deterministic seeded weights and every layer type
//! (sliding, CSA, HCA; hash and top-k routing), so the binary does its job with no download.
//! The weights are random: the model computes real V4 math but says nothing meaningful. Its
//! vocabulary is exactly the byte-fallback tokenizer's (271 ids), so every id it emits decodes.

use half::bf16;
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::config::{AttentionKind, ModelConfig, RoutingKind};
use crate::error::Result;
use crate::tensor::{DType, HostTensor};

pub const TINY_NAME: &str = "builtin:tiny";
/// Tiny widths with V4-Flash's attention shape: window 128, CSA ratio 4 with top-512
/// selection, HCA ratio 128, 1M positions. For measuring how decode cost grows with context
/// (`dsv4 bench`) without a real checkpoint.
pub const FLASH_SHAPE_NAME: &str = "builtin:flash-shape";

/// The tiny model with DeepSeek-V4's vocabulary size (129,280 ids), for running with the real V4
/// tokenizer (`dsv4 serve --tokenizer tokenizer.json`). Random weights, as the tiny model's.
pub const TINY_V4_VOCAB_NAME: &str = "builtin:tiny-v4vocab";

/// The tiny model plus an MTP block (`mtp.0.*`, spec §D.5), for speculative decoding
/// (`--speculative-tokens`) with no download. The block's weights are random like the rest, so
/// its drafts are mostly rejected: it exercises the machinery, not the speed-up. The main
/// model's weights are the tiny model's, byte for byte (the block is generated after them).
pub const TINY_MTP_NAME: &str = "builtin:tiny-mtp";

/// The built-in models' names.
pub const NAMES: [&str; 4] = [TINY_NAME, FLASH_SHAPE_NAME, TINY_V4_VOCAB_NAME, TINY_MTP_NAME];

/// The built-in model called `name` (one of [`NAMES`]), or None.
pub fn by_name(name: &str) -> Option<Result<(ModelConfig, Checkpoint)>> {
    match name {
        TINY_NAME => Some(tiny()),
        FLASH_SHAPE_NAME => Some(flash_shape()),
        TINY_V4_VOCAB_NAME => Some(tiny_v4_vocab()),
        TINY_MTP_NAME => Some(tiny_mtp()),
        _ => None,
    }
}

/// `builtin:flash-shape`'s config.json: the tiny model's widths, V4-Flash's window,
/// compression ratios, indexer top-k, YaRN and context.
pub fn flash_shape_config_json() -> serde_json::Value {
    let mut c = tiny_config_json();
    let o = c.as_object_mut().expect("literal object");
    o.insert("sliding_window".into(), json!(128));
    o.insert("compress_rates".into(), json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}));
    o.insert("index_topk".into(), json!(512));
    o.insert("index_n_heads".into(), json!(2));
    o.insert("max_position_embeddings".into(), json!(1 << 20));
    o.insert(
        "rope_parameters".into(),
        json!({
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                         "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                         "attention_factor": 1.0}
        }),
    );
    c
}

/// The tiny model's config.json (transformers spelling).
pub fn tiny_config_json() -> serde_json::Value {
    json!({
        "model_type": "deepseek_v4",
        "vocab_size": 271,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "partial_rotary_factor": 0.25,
        "q_lora_rank": 32,
        "o_groups": 2,
        "o_lora_rank": 16,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "compressed_sparse_attention",
                        "heavily_compressed_attention", "compressed_sparse_attention"],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
                         "attention_factor": 1.0}
        },
        "max_position_embeddings": 131072,
        "index_n_heads": 4,
        "index_head_dim": 16,
        "index_topk": 8,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "scoring_func": "sqrtsoftplus",
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1
    })
}

/// SplitMix64 plus Box-Muller: a fixed, documented sequence, so the tiny model's weights are
/// identical on every machine and every version of dsv4.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn normals(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

struct Builder {
    rng: Rng,
    out: Vec<HostTensor>,
}

impl Builder {
    fn f32(&mut self, name: &str, shape: &[usize], mean: f32, std: f32) -> Result<()> {
        let n = shape.iter().product();
        let v = self.rng.normals(n, mean, std);
        self.out.push(HostTensor::from_f32(name, shape.to_vec(), &v)?);
        Ok(())
    }

    /// A projection stored in BF16, as real checkpoints store their matrices.
    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<()> {
        let std = (in_dim as f32).powf(-0.5);
        let bytes: Vec<u8> = self
            .rng
            .normals(out_dim * in_dim, 0.0, std)
            .into_iter()
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect();
        self.out.push(HostTensor::from_bytes(name, DType::BF16, vec![out_dim, in_dim], bytes)?);
        Ok(())
    }

    fn norm(&mut self, name: &str, dim: usize) -> Result<()> {
        self.f32(name, &[dim], 1.0, 0.1)
    }
}

/// The tiny model: its config and an in-memory checkpoint under the official names.
pub fn tiny() -> Result<(ModelConfig, Checkpoint)> {
    build(&tiny_config_json(), 0)
}

/// `builtin:flash-shape`: the tiny model's weights generator on [`flash_shape_config_json`].
pub fn flash_shape() -> Result<(ModelConfig, Checkpoint)> {
    build(&flash_shape_config_json(), 0)
}

/// `builtin:tiny-v4vocab`: the tiny model's weights generator with `vocab_size` 129,280.
pub fn tiny_v4_vocab() -> Result<(ModelConfig, Checkpoint)> {
    let mut c = tiny_config_json();
    c["vocab_size"] = json!(129_280);
    build(&c, 0)
}

/// `builtin:tiny-mtp`: the tiny model with `num_nextn_predict_layers: 1` and its MTP block.
pub fn tiny_mtp() -> Result<(ModelConfig, Checkpoint)> {
    let mut c = tiny_config_json();
    c["num_nextn_predict_layers"] = json!(1);
    build(&c, 1)
}

/// The model of `config` (a V4 config.json) with this module's seeded random weights, for
/// shapes no built-in model has (tests of kernels that need V4's real widths). Same generator,
/// so the same config gives the same weights everywhere.
pub fn random_weights(config: &serde_json::Value) -> Result<(ModelConfig, Checkpoint)> {
    build(config, 0)
}

/// The model of `config` with `mtp_layers` MTP blocks (0 for all but `builtin:tiny-mtp`: a
/// config without `num_nextn_predict_layers` means 1, as in the official code, but the other
/// built-in models have none).
fn build(config: &serde_json::Value, mtp_layers: usize) -> Result<(ModelConfig, Checkpoint)> {
    let cfg = ModelConfig::from_json(config.as_object().expect("literal object"))?;
    let mut b = Builder { rng: Rng(0x5EED_D5F4), out: vec![] };
    let (v, d, n) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);

    b.f32("embed.weight", &[v, d], 0.0, 1.0)?;
    b.linear("head.weight", v, d)?;
    b.norm("norm.weight", d)?;
    b.f32("hc_head_fn", &[n, n * d], 0.0, 0.5 * ((n * d) as f32).powf(-0.5))?;
    b.f32("hc_head_base", &[n], 0.0, 0.5)?;
    b.f32("hc_head_scale", &[1], 1.0, 0.2)?;

    for l in 0..cfg.num_layers {
        block(&mut b, &cfg, &format!("layers.{l}"), cfg.attention[l], cfg.routing[l])?;
    }
    // The MTP layers (spec §D.5, `MTPBlock`): a sliding-attention block with a score-routed
    // MoE, the input projections and norms, and their own head mix and norm.
    for m in 0..mtp_layers {
        let p = format!("mtp.{m}");
        block(&mut b, &cfg, &p, AttentionKind::Sliding, RoutingKind::TopK)?;
        b.linear(&format!("{p}.e_proj.weight"), d, d)?;
        b.linear(&format!("{p}.h_proj.weight"), d, d)?;
        b.norm(&format!("{p}.enorm.weight"), d)?;
        b.norm(&format!("{p}.hnorm.weight"), d)?;
        b.norm(&format!("{p}.norm.weight"), d)?;
        b.f32(&format!("{p}.hc_head_fn"), &[n, n * d], 0.0, 0.5 * ((n * d) as f32).powf(-0.5))?;
        b.f32(&format!("{p}.hc_head_base"), &[n], 0.0, 0.5)?;
        b.f32(&format!("{p}.hc_head_scale"), &[1], 1.0, 0.2)?;
    }
    Ok((cfg, Checkpoint::from_tensors(b.out)?))
}

/// One block's tensors under `p` (`layers.{l}` or `mtp.{m}`): mHC mixing, norms, attention of
/// the given kind, the MoE with its routing.
fn block(b: &mut Builder, cfg: &ModelConfig, p: &str, attention: AttentionKind, routing: RoutingKind) -> Result<()> {
    let (v, d, n) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);
    let (h, hd, ql) = (cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
    let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
    let (e, i, k) = (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok);
    let mix = cfg.hc_mix_dim();

    for hc in ["hc_attn", "hc_ffn"] {
        b.f32(&format!("{p}.{hc}_fn"), &[mix, n * d], 0.0, 0.5 * ((n * d) as f32).powf(-0.5))?;
        b.f32(&format!("{p}.{hc}_base"), &[mix], 0.0, 0.5)?;
        b.f32(&format!("{p}.{hc}_scale"), &[3], 1.0, 0.2)?;
    }
    b.norm(&format!("{p}.attn_norm.weight"), d)?;
    b.norm(&format!("{p}.ffn_norm.weight"), d)?;

    let a = format!("{p}.attn");
    b.linear(&format!("{a}.wq_a.weight"), ql, d)?;
    b.norm(&format!("{a}.q_norm.weight"), ql)?;
    b.linear(&format!("{a}.wq_b.weight"), h * hd, ql)?;
    b.linear(&format!("{a}.wkv.weight"), hd, d)?;
    b.norm(&format!("{a}.kv_norm.weight"), hd)?;
    b.linear(&format!("{a}.wo_a.weight"), g * r, h * hd / g)?;
    b.linear(&format!("{a}.wo_b.weight"), d, g * r)?;
    b.f32(&format!("{a}.attn_sink"), &[h], 0.0, 1.0)?;
    let compressor = |b: &mut Builder, prefix: &str, ratio: usize, width: usize, dim: usize| -> Result<()> {
        b.linear(&format!("{prefix}.wkv.weight"), width, d)?;
        b.linear(&format!("{prefix}.wgate.weight"), width, d)?;
        b.f32(&format!("{prefix}.ape"), &[ratio, width], 0.0, 0.5)?;
        b.norm(&format!("{prefix}.norm.weight"), dim)
    };
    match attention {
        AttentionKind::Sliding => {}
        AttentionKind::Hca { ratio } => compressor(b, &format!("{a}.compressor"), ratio, hd, hd)?,
        AttentionKind::Csa { ratio } => {
            compressor(b, &format!("{a}.compressor"), ratio, 2 * hd, hd)?;
            let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
            b.linear(&format!("{a}.indexer.wq_b.weight"), ih * id, ql)?;
            b.linear(&format!("{a}.indexer.weights_proj.weight"), ih, d)?;
            compressor(b, &format!("{a}.indexer.compressor"), ratio, 2 * id, id)?;
        }
    }

    let f = format!("{p}.ffn");
    b.linear(&format!("{f}.gate.weight"), e, d)?;
    match routing {
        RoutingKind::TopK => b.f32(&format!("{f}.gate.bias"), &[e], 0.0, 0.1)?,
        RoutingKind::Hash => {
            // k distinct experts per token id.
            let mut ids = Vec::with_capacity(v * k);
            for _ in 0..v {
                let mut perm: Vec<i64> = (0..e as i64).collect();
                for j in 0..k {
                    let pick = j + (b.rng.next_u64() % (e - j) as u64) as usize;
                    perm.swap(j, pick);
                }
                ids.extend_from_slice(&perm[..k]);
            }
            let bytes = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
            b.out.push(HostTensor::from_bytes(format!("{f}.gate.tid2eid"), DType::I64, vec![v, k], bytes)?);
        }
    }
    for x in 0..e {
        b.linear(&format!("{f}.experts.{x}.w1.weight"), i, d)?;
        b.linear(&format!("{f}.experts.{x}.w3.weight"), i, d)?;
        b.linear(&format!("{f}.experts.{x}.w2.weight"), d, i)?;
    }
    b.linear(&format!("{f}.shared_experts.w1.weight"), i, d)?;
    b.linear(&format!("{f}.shared_experts.w3.weight"), i, d)?;
    b.linear(&format!("{f}.shared_experts.w2.weight"), d, i)?;
    Ok(())
}
