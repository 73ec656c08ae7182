//! `config.json` parsing for DeepSeek-V4, in both spellings that exist in the field:
//!
//! * the official DeepSeek one (`compress_ratios` per layer with 0 / 4 / 128 and a trailing
//!   MTP entry, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling` with YaRN), and
//! * the one transformers' `save_pretrained` writes (`layer_types`, `compress_rates`,
//!   `mlp_layer_types`, `partial_rotary_factor`, `rope_parameters` with `main` / `compress`).
//!
//! Both are normalised into [`ModelConfig`], which is what the graph reads. Every
//! inconsistency is an [`Error::Config`] naming the offending field.

use serde_json::{Map, Value};
use std::path::Path;

use crate::error::{Error, Result};

/// The attention flavour of one layer (spec §B.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Sliding window only; uses the `main` rope table.
    Sliding,
    /// Compressed Sparse Attention: overlapping compressor of `ratio` tokens plus the
    /// lightning indexer picking `index_topk` entries per query.
    Csa { ratio: usize },
    /// Heavily Compressed Attention: non-overlapping compressor, every entry visible.
    Hca { ratio: usize },
}

/// `sliding`, `CSA/4`, `HCA/128`: the short form tables print.
impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionKind::Sliding => write!(f, "sliding"),
            AttentionKind::Csa { ratio } => write!(f, "CSA/{ratio}"),
            AttentionKind::Hca { ratio } => write!(f, "HCA/{ratio}"),
        }
    }
}

impl AttentionKind {
    pub fn ratio(&self) -> Option<usize> {
        match *self {
            AttentionKind::Sliding => None,
            AttentionKind::Csa { ratio } | AttentionKind::Hca { ratio } => Some(ratio),
        }
    }

    /// The name transformers uses in `layer_types`.
    pub fn hf_name(&self) -> &'static str {
        match self {
            AttentionKind::Sliding => "sliding_attention",
            AttentionKind::Csa { .. } => "compressed_sparse_attention",
            AttentionKind::Hca { .. } => "heavily_compressed_attention",
        }
    }
}

/// How the MoE of one layer picks its experts (spec §B.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingKind {
    /// Fixed experts per token id through `tid2eid`.
    Hash,
    /// Top-k of the router scores plus the correction bias.
    TopK,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    SqrtSoftplus,
    Softmax,
    Sigmoid,
}

/// YaRN frequency interpolation (spec §A.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
}

/// One rotary table: base, optional YaRN, and the factor transformers multiplies cos/sin by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub yarn: Option<Yarn>,
    pub attention_factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Rotary channels at the end of every head (`qk_rope_head_dim`).
    pub rope_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub sliding_window: usize,
    pub attention: Vec<AttentionKind>,
    pub routing: Vec<RoutingKind>,
    pub rope_main: RopeParams,
    pub rope_compress: RopeParams,
    pub max_position_embeddings: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f64,
    pub rms_norm_eps: f64,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub scoring_func: ScoringFunc,
    pub routed_scaling_factor: f64,
    pub swiglu_limit: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub num_mtp_layers: usize,
    /// Fields that set weight shapes which config.json left out, with the transformers default
    /// assumed for each. A real checkpoint's config names them all, so a default here usually
    /// means a hand-written or truncated config.json; load errors mention them.
    pub assumed_defaults: Vec<AssumedDefault>,
}

/// A weight-shape field config.json did not give, and the value assumed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumedDefault {
    pub field: &'static str,
    pub value: usize,
}

/// Typed access to a JSON object, with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| Error::config(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    /// A field that sets weight shapes: the first of `keys` present, else `default`, which is
    /// recorded in `assumed` under the first key.
    fn shape_field(&self, keys: &[&'static str], default: usize, assumed: &mut Vec<AssumedDefault>) -> Result<usize> {
        for key in keys {
            if let Some(v) = self.usize_opt(key)? {
                return Ok(v);
            }
        }
        assumed.push(AssumedDefault { field: keys[0], value: default });
        Ok(default)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| Error::config(key, format!("expected a finite number, got {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Error::config(key, format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::config(key, format!("expected a string, got {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // Some writers emit integers as floats (`4.0`).
    v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 1e15).map(|f| f as usize)
}

impl ModelConfig {
    /// Reads and parses `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                msg: format!("model directory {} does not exist (pass a directory with config.json and *.safetensors, or builtin:tiny)", dir.display()),
            });
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { field, msg } => Error::Config { field, msg: format!("{msg} (in {})", path.display()) },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::config("<json>", format!("not valid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| Error::config("<json>", "the top level must be an object"))?;
        Self::from_json(obj)
    }

    pub fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        let f = Fields(obj);
        if let Some(mt) = f.str_opt("model_type")? {
            if mt != "deepseek_v4" {
                return Err(Error::config(
                    "model_type",
                    format!("`{mt}` is not a DeepSeek-V4 model (expected `deepseek_v4`)"),
                ));
            }
        }

        // Defaults are transformers' `DeepseekV4Config` dataclass defaults (the V4-Flash values),
        // so a config that transformers accepts parses to the same model here. Those of fields
        // that set weight shapes are remembered: they only fit a V4-Flash checkpoint.
        let mut assumed = vec![];
        let vocab_size = f.shape_field(&["vocab_size"], 129280, &mut assumed)?;
        let hidden_size = f.shape_field(&["hidden_size"], 4096, &mut assumed)?;
        let num_layers = f.shape_field(&["num_hidden_layers"], 43, &mut assumed)?;
        let num_heads = f.shape_field(&["num_attention_heads"], 64, &mut assumed)?;
        let head_dim = f.shape_field(&["head_dim"], 512, &mut assumed)?;
        let q_lora_rank = f.shape_field(&["q_lora_rank"], 1024, &mut assumed)?;
        let o_groups = f.shape_field(&["o_groups"], 8, &mut assumed)?;
        let o_lora_rank = f.shape_field(&["o_lora_rank"], 1024, &mut assumed)?;
        let hc_mult = f.shape_field(&["hc_mult"], 4, &mut assumed)?;
        let n_routed_experts = f.shape_field(&["n_routed_experts", "num_local_experts"], 256, &mut assumed)?;
        let num_experts_per_tok = f.shape_field(&["num_experts_per_tok"], 6, &mut assumed)?;
        let moe_intermediate_size =
            f.shape_field(&["moe_intermediate_size", "intermediate_size"], 2048, &mut assumed)?;
        // `num_key_value_heads` and `n_shared_experts` are read by nothing in the reference:
        // V4 always has one shared K=V head and one shared expert.
        if f.bool_or("mlp_bias", false)? {
            return Err(Error::config("mlp_bias", "biased expert projections are not supported"));
        }

        let rope_dim = match (f.usize_opt("qk_rope_head_dim")?, f.f64_opt("partial_rotary_factor")?) {
            (Some(rd), _) => rd,
            (None, Some(p)) => (head_dim as f64 * p) as usize,
            (None, None) => head_dim * 64 / 512,
        };

        let attention = parse_attention_schedule(&f, num_layers)?;
        // The indexer's widths only shape weights when there are CSA layers.
        let (index_n_heads, index_head_dim) = if attention.iter().any(|a| matches!(a, AttentionKind::Csa { .. })) {
            (
                f.shape_field(&["index_n_heads"], 64, &mut assumed)?,
                f.shape_field(&["index_head_dim"], 128, &mut assumed)?,
            )
        } else {
            (f.usize_or("index_n_heads", 64)?, f.usize_or("index_head_dim", 128)?)
        };
        let routing = parse_routing_schedule(&f, num_layers)?;
        let (rope_main, rope_compress) = parse_rope(&f)?;

        let scoring_func = match f.str_opt("scoring_func")?.unwrap_or("sqrtsoftplus") {
            "sqrtsoftplus" => ScoringFunc::SqrtSoftplus,
            "softmax" => ScoringFunc::Softmax,
            "sigmoid" => ScoringFunc::Sigmoid,
            other => {
                return Err(Error::config(
                    "scoring_func",
                    format!("unknown router scoring function `{other}` (sqrtsoftplus, softmax or sigmoid)"),
                ))
            }
        };
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(Error::config("hidden_act", format!("only `silu` is supported, got `{act}`")));
            }
        }

        let eos_token_ids = match f.get("eos_token_id") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_usize(v).map(|u| u as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::config("eos_token_id", "expected integers"))?,
            Some(v) => vec![as_usize(v).ok_or_else(|| Error::config("eos_token_id", "expected an integer"))? as u32],
        };

        let cfg = ModelConfig {
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            head_dim,
            rope_dim,
            q_lora_rank,
            o_groups,
            o_lora_rank,
            sliding_window: f.usize_or("sliding_window", 128)?,
            attention,
            routing,
            rope_main,
            rope_compress,
            max_position_embeddings: f.usize_or("max_position_embeddings", 1 << 20)?,
            index_n_heads,
            index_head_dim,
            index_topk: f.usize_or("index_topk", 512)?,
            hc_mult,
            hc_sinkhorn_iters: f.usize_or("hc_sinkhorn_iters", 20)?,
            hc_eps: f.f64_or("hc_eps", 1e-6)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            n_routed_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            scoring_func,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.5)?,
            swiglu_limit: f.f64_or("swiglu_limit", 10.0)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.usize_opt("bos_token_id")?.map(|v| v as u32),
            eos_token_ids,
            num_mtp_layers: f.usize_or("num_nextn_predict_layers", 1)?,
            assumed_defaults: assumed,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks. Everything the graph relies on is checked here once.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("sliding_window", self.sliding_window),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::config(name, "must be positive"));
            }
        }
        if self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return Err(Error::config(
                "qk_rope_head_dim",
                format!("rotary dims {} must be even, positive and at most head_dim {}", self.rope_dim, self.head_dim),
            ));
        }
        if !self.num_heads.is_multiple_of(self.o_groups) {
            return Err(Error::config(
                "o_groups",
                format!("{} heads cannot be split into {} groups", self.num_heads, self.o_groups),
            ));
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                format!("{} is more than n_routed_experts {}", self.num_experts_per_tok, self.n_routed_experts),
            ));
        }
        let has_csa = self.attention.iter().any(|a| matches!(a, AttentionKind::Csa { .. }));
        if has_csa {
            for (name, v) in [
                ("index_n_heads", self.index_n_heads),
                ("index_head_dim", self.index_head_dim),
                ("index_topk", self.index_topk),
            ] {
                if v == 0 {
                    return Err(Error::config(name, "must be positive when the model has CSA layers"));
                }
            }
            if self.rope_dim > self.index_head_dim {
                return Err(Error::config(
                    "index_head_dim",
                    format!("must be at least the rotary dims {}", self.rope_dim),
                ));
            }
        }
        for (i, a) in self.attention.iter().enumerate() {
            if a.ratio() == Some(0) {
                return Err(Error::config("compress_rates", format!("layer {i} has compression ratio 0")));
            }
        }
        // Finite by parsing; negative epsilons would make the norms divide by ~0.
        if self.hc_eps < 0.0 {
            return Err(Error::config("hc_eps", "must be non-negative"));
        }
        if self.rms_norm_eps < 0.0 {
            return Err(Error::config("rms_norm_eps", "must be non-negative"));
        }
        Ok(())
    }

    /// What the config assumed for weight-shape fields config.json lacks, e.g. "config.json has
    /// no `hidden_size`; transformers' default 4096 was assumed"; None when it named them all.
    pub fn assumed_defaults_note(&self) -> Option<String> {
        match self.assumed_defaults.as_slice() {
            [] => None,
            [one] => {
                Some(format!("config.json has no `{}`; transformers' default {} was assumed", one.field, one.value))
            }
            many => Some(format!(
                "config.json has no {}; transformers' defaults {} were assumed",
                many.iter().map(|a| format!("`{}`", a.field)).collect::<Vec<_>>().join(", "),
                many.iter().map(|a| format!("{} = {}", a.field, a.value)).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    pub fn rope_for(&self, kind: AttentionKind) -> &RopeParams {
        match kind {
            AttentionKind::Sliding => &self.rope_main,
            _ => &self.rope_compress,
        }
    }

    /// Width of the concatenated mHC projection: pre (n) + post (n) + comb (n²).
    pub fn hc_mix_dim(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }
}

fn parse_attention_schedule(f: &Fields, num_layers: usize) -> Result<Vec<AttentionKind>> {
    // Per-type rates (transformers spelling, with the legacy scalar overrides folded in).
    let mut csa_rate = 4usize;
    let mut hca_rate = 128usize;
    if let Some(rates) = f.get("compress_rates") {
        let rates = rates
            .as_object()
            .ok_or_else(|| Error::config("compress_rates", "expected an object of layer type -> rate"))?;
        for (k, v) in rates {
            let r = as_usize(v)
                .ok_or_else(|| Error::config("compress_rates", format!("rate for `{k}` is not an integer")))?;
            match k.as_str() {
                "compressed_sparse_attention" => csa_rate = r,
                "heavily_compressed_attention" => hca_rate = r,
                other => return Err(Error::config("compress_rates", format!("unknown layer type `{other}`"))),
            }
        }
    }
    if let Some(r) = f.usize_opt("compress_rate_csa")? {
        csa_rate = r;
    }
    if let Some(r) = f.usize_opt("compress_rate_hca")? {
        hca_rate = r;
    }

    let schedule: Vec<AttentionKind> = if let Some(types) = f.get("layer_types") {
        let types = types.as_array().ok_or_else(|| Error::config("layer_types", "expected a list of layer types"))?;
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("sliding_attention") => Ok(AttentionKind::Sliding),
                Some("compressed_sparse_attention") => Ok(AttentionKind::Csa { ratio: csa_rate }),
                Some("heavily_compressed_attention") => Ok(AttentionKind::Hca { ratio: hca_rate }),
                _ => Err(Error::config(
                    "layer_types",
                    format!("entry {i} is {t}; expected sliding_attention, compressed_sparse_attention or heavily_compressed_attention"),
                )),
            })
            .collect::<Result<_>>()?
    } else if let Some(ratios) = f.get("compress_ratios") {
        // Official spelling: the literal ratio decides the flavour, as in the official
        // code (`overlap = ratio == 4`, indexer iff ratio == 4).
        let ratios =
            ratios.as_array().ok_or_else(|| Error::config("compress_ratios", "expected a list of integers"))?;
        ratios
            .iter()
            .enumerate()
            .map(|(i, r)| match as_usize(r) {
                Some(0) => Ok(AttentionKind::Sliding),
                Some(4) => Ok(AttentionKind::Csa { ratio: 4 }),
                Some(r) => Ok(AttentionKind::Hca { ratio: r }),
                None => Err(Error::config("compress_ratios", format!("entry {i} is {r}, not an integer"))),
            })
            .collect::<Result<_>>()?
    } else {
        // transformers' default: two HCA layers, then HCA/CSA alternating starting with HCA.
        // (It disagrees with the official Pro schedule, spec §G.5; real configs always ship one.)
        (0..num_layers)
            .map(|i| {
                if i >= 2 && (i - 2) % 2 == 1 {
                    AttentionKind::Csa { ratio: csa_rate }
                } else {
                    AttentionKind::Hca { ratio: hca_rate }
                }
            })
            .collect()
    };
    // The official list carries one extra trailing entry per MTP layer.
    if schedule.len() < num_layers {
        let field = if f.get("layer_types").is_some() { "layer_types" } else { "compress_ratios" };
        return Err(Error::config(
            field,
            format!("has {} entries but num_hidden_layers is {num_layers}", schedule.len()),
        ));
    }
    if f.get("layer_types").is_some() && schedule.len() != num_layers {
        return Err(Error::config(
            "layer_types",
            format!("has {} entries but num_hidden_layers is {num_layers}", schedule.len()),
        ));
    }
    Ok(schedule[..num_layers].to_vec())
}

fn parse_routing_schedule(f: &Fields, num_layers: usize) -> Result<Vec<RoutingKind>> {
    if let Some(types) = f.get("mlp_layer_types") {
        let types = types.as_array().ok_or_else(|| Error::config("mlp_layer_types", "expected a list"))?;
        if types.len() != num_layers {
            return Err(Error::config(
                "mlp_layer_types",
                format!("has {} entries but num_hidden_layers is {num_layers}", types.len()),
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("hash_moe") => Ok(RoutingKind::Hash),
                Some("moe") => Ok(RoutingKind::TopK),
                _ => Err(Error::config("mlp_layer_types", format!("entry {i} is {t}; expected hash_moe or moe"))),
            })
            .collect();
    }
    let n_hash = f.usize_or("num_hash_layers", 3)?;
    Ok((0..num_layers).map(|i| if i < n_hash { RoutingKind::Hash } else { RoutingKind::TopK }).collect())
}

fn parse_rope_block(obj: &Value, field: &str, default_theta: Option<f64>) -> Result<RopeParams> {
    let o = obj.as_object().ok_or_else(|| Error::config(field, "expected an object"))?;
    let f = Fields(o);
    let theta = f
        .f64_opt("rope_theta")?
        .or(default_theta)
        .ok_or_else(|| Error::config(format!("{field}.rope_theta"), "required field is missing"))?;
    let kind = f.str_opt("rope_type")?.or(f.str_opt("type")?).unwrap_or("default");
    match kind {
        "default" => Ok(RopeParams { theta, yarn: None, attention_factor: 1.0 }),
        "yarn" => {
            let factor =
                f.f64_opt("factor")?.ok_or_else(|| Error::config(format!("{field}.factor"), "YaRN needs a factor"))?;
            let original = f
                .f64_opt("original_max_position_embeddings")?
                .ok_or_else(|| Error::config(format!("{field}.original_max_position_embeddings"), "YaRN needs it"))?;
            // V4 never applies YaRN's mscale to cos/sin: transformers forces
            // attention_factor = 1.0 on the compress branch, the official code has no mscale.
            let attention_factor = f.f64_opt("attention_factor")?.unwrap_or(1.0);
            Ok(RopeParams {
                theta,
                yarn: Some(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: f.f64_opt("beta_fast")?.filter(|v| *v != 0.0).unwrap_or(32.0),
                    beta_slow: f.f64_opt("beta_slow")?.filter(|v| *v != 0.0).unwrap_or(1.0),
                    truncate: f.bool_or("truncate", true)?,
                }),
                attention_factor,
            })
        }
        other => Err(Error::config(
            format!("{field}.rope_type"),
            format!("unsupported rope type `{other}` (default or yarn)"),
        )),
    }
}

fn parse_rope(f: &Fields) -> Result<(RopeParams, RopeParams)> {
    let rope_theta = f.f64_or("rope_theta", 10000.0)?;
    let compress_theta = f.f64_or("compress_rope_theta", 160000.0)?;
    if let Some(rp) = f.get("rope_parameters") {
        let o = rp.as_object().ok_or_else(|| Error::config("rope_parameters", "expected an object"))?;
        if let (Some(main), Some(compress)) = (o.get("main"), o.get("compress")) {
            return Ok((
                parse_rope_block(main, "rope_parameters.main", Some(rope_theta))?,
                parse_rope_block(compress, "rope_parameters.compress", Some(compress_theta))?,
            ));
        }
        // A flat dict: it describes the compress branch's scaling (as `rope_scaling` does).
        return flat_rope(rp, "rope_parameters", rope_theta, compress_theta);
    }
    if let Some(rs) = f.get("rope_scaling") {
        return flat_rope(rs, "rope_scaling", rope_theta, compress_theta);
    }
    Ok((
        RopeParams { theta: rope_theta, yarn: None, attention_factor: 1.0 },
        RopeParams { theta: compress_theta, yarn: None, attention_factor: 1.0 },
    ))
}

/// A flat scaling block applies to the compress branch only; the main branch is always plain
/// RoPE at `rope_theta` (official: "disable YaRN ... in pure sliding-window attention").
fn flat_rope(v: &Value, field: &str, rope_theta: f64, compress_theta: f64) -> Result<(RopeParams, RopeParams)> {
    let mut o = v.as_object().ok_or_else(|| Error::config(field, "expected an object"))?.clone();
    o.insert("rope_theta".into(), Value::from(compress_theta));
    let compress = parse_rope_block(&Value::Object(o), field, None)?;
    Ok((RopeParams { theta: rope_theta, yarn: None, attention_factor: 1.0 }, compress))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "deepseek_v4", "vocab_size": 256, "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32,
            "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 8,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4, "hc_mult": 4
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json(v.as_object().unwrap())
    }

    #[test]
    fn official_spelling() {
        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 4, 128, 4, 0]);
        v["num_hash_layers"] = 1.into();
        v["qk_rope_head_dim"] = 8.into();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1});
        let c = parse(v).unwrap();
        assert_eq!(
            c.attention,
            vec![
                AttentionKind::Sliding,
                AttentionKind::Csa { ratio: 4 },
                AttentionKind::Hca { ratio: 128 },
                AttentionKind::Csa { ratio: 4 }
            ]
        );
        assert_eq!(c.routing, vec![RoutingKind::Hash, RoutingKind::TopK, RoutingKind::TopK, RoutingKind::TopK]);
        assert_eq!(c.rope_dim, 8);
        assert!(c.rope_main.yarn.is_none());
        assert_eq!(c.rope_main.theta, 10000.0);
        assert_eq!(c.rope_compress.theta, 160000.0);
        assert_eq!(c.rope_compress.yarn.unwrap().factor, 16.0);
        assert_eq!(c.rope_compress.attention_factor, 1.0);
    }

    #[test]
    fn transformers_spelling_with_custom_rates() {
        let mut v = base();
        v["layer_types"] = serde_json::json!([
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "sliding_attention",
            "sliding_attention"
        ]);
        v["compress_rates"] = serde_json::json!({"compressed_sparse_attention": 2, "heavily_compressed_attention": 8});
        v["mlp_layer_types"] = serde_json::json!(["hash_moe", "moe", "moe", "moe"]);
        v["partial_rotary_factor"] = 0.25.into();
        v["rope_parameters"] = serde_json::json!({
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0, "original_max_position_embeddings": 64}
        });
        let c = parse(v).unwrap();
        assert_eq!(c.attention[0], AttentionKind::Csa { ratio: 2 });
        assert_eq!(c.attention[1], AttentionKind::Hca { ratio: 8 });
        assert_eq!(c.rope_dim, 8);
        assert_eq!(c.rope_compress.yarn.unwrap().beta_fast, 32.0);
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(serde_json::json!({"num_hidden_layers": 6})).unwrap();
        assert_eq!((c.hidden_size, c.vocab_size, c.routed_scaling_factor, c.swiglu_limit), (4096, 129280, 1.5, 10.0));
        use AttentionKind::*;
        let (h, s) = (Hca { ratio: 128 }, Csa { ratio: 4 });
        assert_eq!(c.attention, vec![h, h, h, s, h, s]);
        assert_eq!(c.routing.iter().filter(|r| **r == RoutingKind::Hash).count(), 3);
    }

    /// Weight-shape fields that fell back to a default are remembered and named; every other
    /// default (epsilons, rope) is not, and a complete config assumes nothing.
    #[test]
    fn assumed_shape_defaults_are_named() {
        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 0, 0, 0]);
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.assumed_defaults, vec![]);
        assert_eq!(c.assumed_defaults_note(), None);

        v.as_object_mut().unwrap().remove("hidden_size");
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.assumed_defaults, vec![AssumedDefault { field: "hidden_size", value: 4096 }]);
        assert_eq!(
            c.assumed_defaults_note().unwrap(),
            "config.json has no `hidden_size`; transformers' default 4096 was assumed"
        );

        // An alias counts as present; a missing pair is named by its first spelling.
        v.as_object_mut().unwrap().remove("n_routed_experts");
        v["num_local_experts"] = 8.into();
        v.as_object_mut().unwrap().remove("moe_intermediate_size");
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.n_routed_experts, 8);
        let note = c.assumed_defaults_note().unwrap();
        assert_eq!(
            note,
            "config.json has no `hidden_size`, `moe_intermediate_size`; transformers' defaults hidden_size = 4096, moe_intermediate_size = 2048 were assumed"
        );

        // The indexer's widths shape weights only on CSA layers.
        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 0, 0, 0]);
        v.as_object_mut().unwrap().remove("index_head_dim");
        assert_eq!(parse(v.clone()).unwrap().assumed_defaults, vec![]);
        v["compress_ratios"] = serde_json::json!([0, 4, 0, 0]);
        v["index_topk"] = 2.into();
        v["qk_rope_head_dim"] = 8.into();
        let e = parse(v).unwrap().assumed_defaults;
        assert_eq!(e, vec![AssumedDefault { field: "index_head_dim", value: 128 }]);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v["layer_types"] = serde_json::json!(["sliding_attention"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("layer_types") && e.contains("num_hidden_layers"), "{e}");

        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 0, 0, 0]);
        v["hidden_size"] = "big".into();
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");

        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 0, 0, 0]);
        v["o_groups"] = 3.into();
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("o_groups"), "{e}");

        let mut v = base();
        v["compress_ratios"] = serde_json::json!([0, 0, 0, 0]);
        v["sliding_window"] = serde_json::json!(-3);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");

        let e = ModelConfig::from_json_str("{not json").unwrap_err().to_string();
        assert!(e.contains("JSON"), "{e}");
    }
}
