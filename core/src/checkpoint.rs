//! Safetensors checkpoints: a single file or shards listed in `model.safetensors.index.json`,
//! memory-mapped, every header validated before any byte is read.
//!
//! Tensor names are canonicalised to the official DeepSeek spelling (`layers.3.attn.wq_a.weight`)
//! whatever the file used: official names, transformers' module names
//! (`model.layers.3.self_attn.q_a_proj.weight`) or the mix that `save_pretrained` writes. The
//! graph only ever asks for official names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, Storage};

/// All tensors of a checkpoint, by canonical name.
pub struct Checkpoint {
    /// Directory it was opened from (None for in-memory checkpoints).
    pub dir: Option<PathBuf>,
    pub files: Vec<PathBuf>,
    tensors: BTreeMap<String, HostTensor>,
}

/// Memory-maps a file read-only.
#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. The usual mmap caveat applies
    // (another process truncating the file while we run would fault); checkpoints are treated
    // as immutable inputs, and every header is validated against the mapped length first.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn describe_safetensors_error(e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file is shorter than the 8-byte header length (truncated?)".into(),
        E::HeaderTooLarge => "header length is implausibly large (corrupt or not a safetensors file)".into(),
        E::InvalidHeaderLength => "header length points past the end of the file (truncated?)".into(),
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(e) => format!("header is not valid JSON metadata: {e}"),
        E::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets that overlap, leave gaps, or are out of order")
        }
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        E::MetadataIncompleteBuffer => {
            "the data section does not match the header's offsets (file truncated or padded)".into()
        }
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        E::MisalignedSlice => "a tensor's size is not a whole number of bytes".into(),
        other => other.to_string(),
    }
}

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` if present, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                msg: format!("{} is not a directory (pass the model directory with --model)", dir.display()),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let (files, index) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Checkpoint { msg: format!("{}: not valid JSON: {e}", index_path.display()) })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
                msg: format!("{}: no `weight_map` object", index_path.display()),
            })?;
            let mut index = BTreeMap::new();
            let mut shards = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                    msg: format!("{}: shard for `{name}` is not a string", index_path.display()),
                })?;
                if file.contains('/') || file.contains('\\') || file.contains("..") {
                    return Err(Error::Checkpoint {
                        msg: format!("{}: shard name `{file}` must be a plain file name", index_path.display()),
                    });
                }
                shards.insert(file.to_string());
                index.insert(name.clone(), file.to_string());
            }
            let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            for f in &files {
                if !f.exists() {
                    return Err(Error::Checkpoint {
                        msg: format!(
                            "{} names shard {} which does not exist",
                            index_path.display(),
                            f.file_name().unwrap_or_default().to_string_lossy()
                        ),
                    });
                }
            }
            (files, Some(index))
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Checkpoint { msg: format!("no *.safetensors files in {}", dir.display()) });
            }
            (files, None)
        };

        let mut ckpt = Checkpoint { dir: Some(dir.to_path_buf()), files: files.clone(), tensors: BTreeMap::new() };
        let mut seen_in_files: BTreeMap<String, String> = BTreeMap::new();
        for path in &files {
            for original in ckpt.add_file(path)? {
                seen_in_files.insert(original, path.file_name().unwrap_or_default().to_string_lossy().to_string());
            }
        }
        if let Some(index) = index {
            for (name, file) in &index {
                match seen_in_files.get(name) {
                    Some(f) if f == file => {}
                    Some(f) => {
                        return Err(Error::Checkpoint {
                            msg: format!("index says `{name}` is in {file} but it is in {f}"),
                        })
                    }
                    None => {
                        return Err(Error::Checkpoint {
                            msg: format!("index says `{name}` is in {file} but that shard does not contain it"),
                        })
                    }
                }
            }
        }
        Ok(ckpt)
    }

    /// One safetensors file on its own (reference outputs, single-file models).
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ckpt = Checkpoint {
            dir: path.parent().map(Path::to_path_buf),
            files: vec![path.to_path_buf()],
            tensors: BTreeMap::new(),
        };
        ckpt.add_file(path)?;
        Ok(ckpt)
    }

    /// Maps one file, validates its header and adds its tensors; returns their stored names.
    fn add_file(&mut self, path: &Path) -> Result<Vec<String>> {
        let file_name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        let mmap = Arc::new(map_file(path)?);
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::Safetensors { file: path.to_path_buf(), msg: describe_safetensors_error(e) })?;
        let data_start = 8 + header_len;
        let mut names = vec![];
        for (name, info) in meta.tensors() {
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                file: file_name.clone(),
                msg: format!("unsupported dtype {:?}", info.dtype),
            })?;
            let (s, e) = info.data_offsets;
            let t = HostTensor::new(
                canonical_name(&name),
                file_name.clone(),
                dtype,
                info.shape.clone(),
                Storage::Mmap(mmap.clone()),
                data_start + s,
                e - s,
            )?;
            self.insert(t)?;
            names.push(name);
        }
        Ok(names)
    }

    /// A checkpoint held in memory (the built-in model, tests).
    pub fn from_tensors(tensors: Vec<HostTensor>) -> Result<Self> {
        let mut c = Checkpoint { dir: None, files: vec![], tensors: BTreeMap::new() };
        for t in tensors {
            c.insert(t)?;
        }
        Ok(c)
    }

    fn insert(&mut self, t: HostTensor) -> Result<()> {
        if let Some(prev) = self.tensors.get(&t.name) {
            return Err(Error::Checkpoint {
                msg: format!(
                    "tensor `{}` appears twice (in {} and {}, possibly under two spellings)",
                    t.name, prev.source, t.source
                ),
            });
        }
        self.tensors.insert(t.name.clone(), t);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor under its official name, with its shape checked.
    pub fn require(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        match self.tensors.get(name) {
            Some(t) => t.expect_shape(shape),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                expected: shape.to_vec(),
                hint: match &self.dir {
                    Some(d) => format!("searched {} file(s) in {}", self.files.len(), d.display()),
                    None => "in-memory checkpoint".into(),
                },
            }),
        }
    }

    pub fn tensors(&self) -> impl Iterator<Item = &HostTensor> {
        self.tensors.values()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Maps any known spelling of a V4 tensor name to the official one.
pub fn canonical_name(name: &str) -> String {
    let mut n = name.strip_prefix("model.").unwrap_or(name).to_string();
    // Globals.
    for (from, to) in [
        ("embed_tokens.weight", "embed.weight"),
        ("lm_head.weight", "head.weight"),
        ("hc_head.hc_fn", "hc_head_fn"),
        ("hc_head.hc_base", "hc_head_base"),
        ("hc_head.hc_scale", "hc_head_scale"),
    ] {
        if n == from {
            return to.to_string();
        }
    }
    if !n.starts_with("layers.") {
        return n;
    }
    // Per-layer renames, most specific first. Each only fires when the transformers
    // spelling is present, so official and mixed names pass through unchanged.
    const RULES: &[(&str, &str)] = &[
        (".self_attn.", ".attn."),
        (".mlp.", ".ffn."),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".attn_hc.fn", ".hc_attn_fn"),
        (".attn_hc.base", ".hc_attn_base"),
        (".attn_hc.scale", ".hc_attn_scale"),
        (".ffn_hc.fn", ".hc_ffn_fn"),
        (".ffn_hc.base", ".hc_ffn_base"),
        (".ffn_hc.scale", ".hc_ffn_scale"),
        (".attn.sinks", ".attn.attn_sink"),
        (".attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
        (".attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
        (".attn.compressor.indexer.", ".attn.indexer.compressor."),
        (".compressor.kv_proj.", ".compressor.wkv."),
        (".compressor.gate_proj.", ".compressor.wgate."),
        (".compressor.kv_norm.", ".compressor.norm."),
        (".compressor.position_bias", ".compressor.ape"),
        // save_pretrained reverses transformers' `.norm.` -> `.kv_norm.` rename everywhere,
        // so the attention's own kv_norm comes back as `attn.norm` (no official tensor has
        // that name; the compressors' `norm` is handled above).
        (".attn.norm.weight", ".attn.kv_norm.weight"),
        (".attn.q_a_proj.", ".attn.wq_a."),
        (".attn.q_a_norm.", ".attn.q_norm."),
        (".attn.q_b_proj.", ".attn.wq_b."),
        (".attn.kv_proj.", ".attn.wkv."),
        (".attn.o_a_proj.", ".attn.wo_a."),
        (".attn.o_b_proj.", ".attn.wo_b."),
        (".ffn.gate.e_score_correction_bias", ".ffn.gate.bias"),
        (".ffn.shared_experts.gate_proj.", ".ffn.shared_experts.w1."),
        (".ffn.shared_experts.up_proj.", ".ffn.shared_experts.w3."),
        (".ffn.shared_experts.down_proj.", ".ffn.shared_experts.w2."),
        (".weight_scale_inv", ".scale"),
    ];
    for (from, to) in RULES {
        if n.contains(from) {
            n = n.replace(from, to);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::canonical_name as c;

    #[test]
    fn canonical_names() {
        assert_eq!(c("model.embed_tokens.weight"), "embed.weight");
        assert_eq!(c("embed.weight"), "embed.weight");
        assert_eq!(c("lm_head.weight"), "head.weight");
        assert_eq!(c("model.hc_head.hc_fn"), "hc_head_fn");
        assert_eq!(c("model.norm.weight"), "norm.weight");
        assert_eq!(c("model.layers.2.self_attn.q_a_proj.weight"), "layers.2.attn.wq_a.weight");
        assert_eq!(c("model.layers.2.attn.wq_a.weight"), "layers.2.attn.wq_a.weight");
        assert_eq!(c("model.layers.0.attn_hc.fn"), "layers.0.hc_attn_fn");
        assert_eq!(c("model.layers.0.self_attn.sinks"), "layers.0.attn.attn_sink");
        assert_eq!(c("model.layers.1.self_attn.kv_norm.weight"), "layers.1.attn.kv_norm.weight");
        assert_eq!(c("model.layers.1.self_attn.compressor.kv_norm.weight"), "layers.1.attn.compressor.norm.weight");
        assert_eq!(c("model.layers.1.self_attn.compressor.position_bias"), "layers.1.attn.compressor.ape");
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.kv_norm.weight"),
            "layers.1.attn.indexer.compressor.norm.weight"
        );
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"),
            "layers.1.attn.indexer.weights_proj.weight"
        );
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"),
            "layers.1.attn.indexer.wq_b.weight"
        );
        assert_eq!(c("model.layers.3.mlp.gate.e_score_correction_bias"), "layers.3.ffn.gate.bias");
        assert_eq!(c("model.layers.3.mlp.shared_experts.up_proj.weight"), "layers.3.ffn.shared_experts.w3.weight");
        assert_eq!(c("model.layers.3.mlp.experts.gate_up_proj"), "layers.3.ffn.experts.gate_up_proj");
        assert_eq!(c("layers.3.ffn.experts.7.w2.weight"), "layers.3.ffn.experts.7.w2.weight");
        assert_eq!(c("mtp.0.enorm.weight"), "mtp.0.enorm.weight");
        // What save_pretrained writes for the attention kv_norm.
        assert_eq!(c("model.layers.1.attn.norm.weight"), "layers.1.attn.kv_norm.weight");
        assert_eq!(c("model.layers.1.attn.compressor.norm.weight"), "layers.1.attn.compressor.norm.weight");
    }
}
