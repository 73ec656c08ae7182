//! Damaged and hostile checkpoints: every one gives an error that names the file and, where
//! there is one, the tensor; none panics or reads outside the mapped file.

mod common;

use std::path::{Path, PathBuf};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::checkpoint::parse_safetensors_header;
use dsv4_core::model::loader::stored_weight;
use dsv4_core::tensor::{DType, HostTensor};
use dsv4_core::{Checkpoint, Model, ModelConfig};

/// The official-format tiny model (FP8 + FP4 + MTP) written to `name` with 3 shards.
fn model_dir(name: &str) -> (PathBuf, ModelConfig, Vec<HostTensor>) {
    let (cfg, q, _) = common::quantized_tiny();
    let dir = common::scratch_dir(name);
    common::write_model_dir(&dir, &dsv4_core::builtin::tiny_config_json(), &q, 3);
    (dir, cfg, q)
}

/// Rewrites the model dir with `edit` applied to its tensor list.
fn model_dir_with(name: &str, edit: impl FnOnce(&mut Vec<HostTensor>)) -> (PathBuf, ModelConfig) {
    let (cfg, mut q, _) = common::quantized_tiny();
    edit(&mut q);
    let dir = common::scratch_dir(name);
    common::write_model_dir(&dir, &dsv4_core::builtin::tiny_config_json(), &q, 3);
    (dir, cfg)
}

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn load_err(dir: &Path, cfg: &ModelConfig) -> String {
    let ckpt = Checkpoint::open(dir).unwrap();
    match Model::load(&CpuBackend::new(), cfg.clone(), &ckpt, &mut |_, _, _| {}) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not name `{p}`: {err}");
    }
}

/// A shard whose header is `header` (JSON) followed by `data`.
fn raw_file(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn shard_holding(dir: &Path, tensor: &str) -> PathBuf {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    dir.join(index["weight_map"][tensor].as_str().unwrap())
}

#[test]
fn truncated_shard() {
    let (dir, _, _) = model_dir("hostile_truncated");
    let shard = shard_holding(&dir, "layers.3.ffn.shared_experts.w2.weight");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&dir);
    let file = shard.file_name().unwrap().to_str().unwrap();
    assert_names(&e, &[file, "truncated"]);
    // The tensor whose data runs past the end is named.
    let entries_before: serde_json::Value = {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        serde_json::from_slice(&bytes[8..8 + n]).unwrap()
    };
    let last = entries_before
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .unwrap()
        .0;
    assert_names(&e, &[last]);

    // Cut inside the header, and down to 3 bytes.
    std::fs::write(&shard, &bytes[..40]).unwrap();
    assert_names(&open_err(&dir), &[file, "header length"]);
    std::fs::write(&shard, &bytes[..3]).unwrap();
    assert_names(&open_err(&dir), &[file, "shorter than the 8-byte header length"]);
}

#[test]
fn header_length_larger_than_the_file() {
    let dir = common::scratch_dir("hostile_header_len");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(dir.join("model.safetensors"), &b).unwrap();
    assert_names(&open_err(&dir), &["model.safetensors", "header length", "larger than the rest of the file"]);
    // Just one byte too long.
    let f = raw_file(&dir, "model.safetensors", "{}", &[]);
    let mut b = std::fs::read(&f).unwrap();
    b[0] += 1;
    std::fs::write(&f, &b).unwrap();
    assert_names(&open_err(&dir), &["model.safetensors", "larger than the rest of the file"]);
}

#[test]
fn offsets_outside_the_data() {
    let dir = common::scratch_dir("hostile_offsets_outside");
    raw_file(
        &dir,
        "model.safetensors",
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        &[0u8; 16],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "`b`", "[8, 24]", "past the end of the data section"]);
    // Offsets that overflow when added to the data start.
    raw_file(
        &dir,
        "model.safetensors",
        &format!(r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#, u64::MAX - 1, u64::MAX),
        &[0u8; 16],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "`a`"]);
    // Reversed offsets, and a byte count that does not match dtype and shape.
    raw_file(&dir, "model.safetensors", r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#, &[0u8; 16]);
    assert_names(&open_err(&dir), &["model.safetensors", "`a`", "reversed"]);
    raw_file(&dir, "model.safetensors", r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#, &[0u8; 16]);
    assert_names(&open_err(&dir), &["model.safetensors", "`a`", "needs 6 bytes"]);
    // A shape whose element count overflows.
    raw_file(
        &dir,
        "model.safetensors",
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
        &[0u8; 16],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "`a`", "overflows"]);
}

#[test]
fn overlapping_offsets() {
    let dir = common::scratch_dir("hostile_overlap");
    raw_file(
        &dir,
        "model.safetensors",
        r#"{"first":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"second":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0u8; 16],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "`second`", "overlap", "`first`"]);
    // Two names for the same bytes.
    raw_file(
        &dir,
        "model.safetensors",
        r#"{"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "overlap", "`x`", "`y`"]);
    // The same name twice in one header.
    raw_file(
        &dir,
        "model.safetensors",
        r#"{"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"x":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
        &[0u8; 8],
    );
    assert_names(&open_err(&dir), &["model.safetensors", "`x`", "twice"]);
}

#[test]
fn malformed_headers() {
    let dir = common::scratch_dir("hostile_malformed");
    for (header, what) in [
        ("not json", "not a JSON object"),
        ("[1,2]", "not a JSON object"),
        (r#"{"a":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[0,1]}}"#, "unsupported dtype F8_E5M2"),
        (r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, "not a non-negative integer"),
        (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, "2 numbers"),
        (r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, "dtype"),
        (r#"{"a":7}"#, "not an object"),
    ] {
        raw_file(&dir, "model.safetensors", header, &[0u8; 4]);
        assert_names(&open_err(&dir), &["model.safetensors", what]);
    }
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[0xff, 0xfe, b'{', b'}']);
    std::fs::write(dir.join("model.safetensors"), b).unwrap();
    assert_names(&open_err(&dir), &["model.safetensors", "UTF-8"]);
}

#[test]
fn index_naming_a_missing_shard() {
    let (dir, _, _) = model_dir("hostile_missing_shard");
    let shard = shard_holding(&dir, "embed.weight");
    std::fs::remove_file(&shard).unwrap();
    let e = open_err(&dir);
    assert_names(&e, &["model.safetensors.index.json", shard.file_name().unwrap().to_str().unwrap(), "does not exist"]);
    assert!(e.contains("`embed.weight`") || e.contains("more)"), "{e}");
    // A shard name that tries to leave the directory.
    let (dir, _, _) = model_dir("hostile_escaping_shard");
    let p = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&p).unwrap().replacen("model-00001-of-00003", "../model-00001-of-00003", 1);
    std::fs::write(&p, text).unwrap();
    assert_names(&open_err(&dir), &["model.safetensors.index.json", "plain file name"]);
}

#[test]
fn dtype_or_shape_not_matching_the_config() {
    // A norm stored as integers.
    let (dir, cfg) = model_dir_with("hostile_dtype", |q| {
        let i = q.iter().position(|t| t.name == "layers.1.attn_norm.weight").unwrap();
        q[i] = HostTensor::from_bytes("layers.1.attn_norm.weight", DType::I32, vec![64], vec![0; 256]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.1.attn_norm.weight", "model-0000", "I32"]);
    // A projection of the wrong shape (FP8, with a scale that fits it).
    let (dir, cfg) = model_dir_with("hostile_shape", |q| {
        let i = q.iter().position(|t| t.name == "layers.2.attn.wkv.weight").unwrap();
        q[i] =
            HostTensor::from_bytes("layers.2.attn.wkv.weight", DType::F8E4M3, vec![33, 64], vec![0; 33 * 64]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.2.attn.wkv.weight", "model-0000", "[33, 64]", "[32, 64]"]);
    // A packed FP4 expert whose byte width does not match the config.
    let (dir, cfg) = model_dir_with("hostile_fp4_shape", |q| {
        let i = q.iter().position(|t| t.name == "layers.0.ffn.experts.5.w1.weight").unwrap();
        q[i] =
            HostTensor::from_bytes("layers.0.ffn.experts.5.w1.weight", DType::I8, vec![32, 64], vec![0; 2048]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.0.ffn.experts.5.w1.weight", "model-0000", "[32, 32]"]);
    // A float weight that carries a scale.
    let (dir, cfg) = model_dir_with("hostile_float_with_scale", |q| {
        q.push(
            HostTensor::from_bytes("layers.3.ffn.experts.0.w1.scale", DType::F8E8M0, vec![32, 2], vec![127; 64])
                .unwrap(),
        );
    });
    assert_names(&load_err(&dir, &cfg), &["layers.3.ffn.experts.0.w1.weight", "has a scale", "w1.scale"]);
    // tid2eid out of range.
    let (dir, cfg) = model_dir_with("hostile_tid2eid", |q| {
        let i = q.iter().position(|t| t.name == "layers.0.ffn.gate.tid2eid").unwrap();
        let mut b = q[i].bytes().to_vec();
        b[8..16].copy_from_slice(&99i64.to_le_bytes());
        q[i] = HostTensor::from_bytes("layers.0.ffn.gate.tid2eid", DType::I64, q[i].shape.clone(), b).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.0.ffn.gate.tid2eid", "model-0000", "99"]);
}

#[test]
fn scale_of_the_wrong_shape_or_dtype_or_missing() {
    let (dir, cfg) = model_dir_with("hostile_scale_shape", |q| {
        let i = q.iter().position(|t| t.name == "layers.1.attn.wq_b.scale").unwrap();
        q[i] = HostTensor::from_bytes("layers.1.attn.wq_b.scale", DType::F8E8M0, vec![2, 1], vec![127; 2]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.1.attn.wq_b.scale", "model-0000", "[2, 1]", "expected [1, 1]"]);
    let (dir, cfg) = model_dir_with("hostile_fp4_scale_shape", |q| {
        let i = q.iter().position(|t| t.name == "layers.0.ffn.experts.2.w2.scale").unwrap();
        q[i] = HostTensor::from_bytes("layers.0.ffn.experts.2.w2.scale", DType::F8E8M0, vec![64, 2], vec![127; 128])
            .unwrap();
    });
    assert_names(
        &load_err(&dir, &cfg),
        &["layers.0.ffn.experts.2.w2.scale", "[64, 2]", "expected [64, 1]", "32 inputs"],
    );
    let (dir, cfg) = model_dir_with("hostile_scale_dtype", |q| {
        let i = q.iter().position(|t| t.name == "layers.1.attn.wq_b.scale").unwrap();
        q[i] = HostTensor::from_bytes("layers.1.attn.wq_b.scale", DType::BF16, vec![1, 1], vec![0x80, 0x3f]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.1.attn.wq_b.scale", "F8_E8M0 or F32", "BF16"]);
    let (dir, cfg) = model_dir_with("hostile_scale_missing", |q| q.retain(|t| t.name != "layers.2.attn.wo_a.scale"));
    assert_names(
        &load_err(&dir, &cfg),
        &["layers.2.attn.wo_a.weight", "model-0000", "no scale", "layers.2.attn.wo_a.scale"],
    );
}

#[test]
fn e8m0_nan_scale() {
    let (dir, cfg) = model_dir_with("hostile_nan_scale", |q| {
        let i = q.iter().position(|t| t.name == "layers.1.ffn.experts.6.w3.scale").unwrap();
        let mut b = q[i].bytes().to_vec();
        b[37] = 255;
        q[i] = HostTensor::from_bytes("layers.1.ffn.experts.6.w3.scale", DType::F8E8M0, q[i].shape.clone(), b).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.1.ffn.experts.6.w3.scale", "model-0000", "255", "NaN", "element 37"]);
    // F32 scales must be finite.
    let (dir, cfg) = model_dir_with("hostile_inf_scale", |q| {
        let i = q.iter().position(|t| t.name == "layers.2.ffn.experts.1.w1.scale").unwrap();
        q[i] = HostTensor::from_f32("layers.2.ffn.experts.1.w1.scale", vec![1, 1], &[f32::INFINITY]).unwrap();
    });
    assert_names(&load_err(&dir, &cfg), &["layers.2.ffn.experts.1.w1.scale", "not finite"]);
}

#[test]
fn fp4_tensor_with_odd_k() {
    // A config whose input dimension is odd cannot be stored as packed FP4.
    let dir = common::scratch_dir("hostile_fp4_odd");
    let data = HostTensor::from_bytes("x.weight", DType::I8, vec![4, 3], vec![0; 12]).unwrap();
    let scale = HostTensor::from_bytes("x.scale", DType::F8E8M0, vec![4, 1], vec![127; 4]).unwrap();
    common::write_safetensors(&dir.join("model.safetensors"), &[&data, &scale]);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let e = stored_weight(&ckpt, "x.weight", &[4, 7]).unwrap_err().to_string();
    assert_names(&e, &["x.weight", "model.safetensors", "odd"]);
    // The even neighbour loads.
    assert!(stored_weight(&ckpt, "x.weight", &[4, 6]).is_ok());
}

#[test]
fn mtp_tensors_are_never_layers() {
    // A checkpoint with MTP tensors but a config with no MTP layer: the main model still
    // loads, and nothing under `mtp.` is read.
    let (dir, cfg, _) = model_dir("hostile_mtp_not_layers");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut cfg0 = cfg.clone();
    cfg0.num_mtp_layers = 0;
    ckpt.record_access();
    Model::load(&CpuBackend::new(), cfg0.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
    assert!(ckpt.accessed().iter().all(|n| !n.starts_with("mtp.")));
    assert!(dsv4_core::model::loader::mtp_layers_present(&cfg0, &ckpt).is_empty());
}

/// Every single-byte corruption of a small valid file's header (and a sweep of its length
/// field) is either rejected with an error or yields tensors whose bytes can all be read: no
/// panic, no read outside the buffer.
#[test]
fn corrupted_headers_never_panic() {
    let (_, ckpt) = dsv4_core::builtin::tiny().unwrap();
    let a = ckpt.get("layers.0.attn.attn_sink").unwrap();
    let b = ckpt.get("layers.0.ffn.gate.tid2eid").unwrap();
    let c = HostTensor::from_bytes("s", DType::F8E8M0, vec![2, 3], vec![127; 6]).unwrap();
    let dir = common::scratch_dir("hostile_corrupt");
    let path = dir.join("model.safetensors");
    common::write_safetensors(&path, &[a, b, &c]);
    let mut good = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let (mut ok, mut rejected) = (0, 0);
    let mut try_bytes = |bytes: Vec<u8>| {
        let _ = parse_safetensors_header(&bytes, Path::new("model.safetensors"));
        match Checkpoint::from_file_bytes("model.safetensors", bytes) {
            Ok(c) => {
                for t in c.tensors() {
                    let _ = t.bytes().iter().map(|&x| x as u64).sum::<u64>();
                    let _ = t.to_f32_vec();
                    let _ = t.to_i64_vec();
                }
                ok += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("model.safetensors"), "{e}");
                rejected += 1;
            }
        }
    };
    for i in 0..header_end {
        for v in [0u8, b'0', b'9', b'"', b'{', b'[', b'-', 0xff] {
            let mut m = good.clone();
            m[i] = v;
            try_bytes(m);
        }
    }
    for len in [0, 1, 7, 8, header_end - 1, header_end, good.len() - 1] {
        try_bytes(good[..len].to_vec());
    }
    good.extend_from_slice(&[0; 3]);
    try_bytes(good);
    assert!(ok > 0 && rejected > 0, "{ok} parsed, {rejected} rejected");
}
