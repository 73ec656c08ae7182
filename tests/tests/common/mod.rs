//! Helpers for the tests that need official-format (FP8 / FP4) checkpoints: quantising the
//! built-in tiny model the way the official checkpoints are stored, and writing checkpoints
//! to disk as safetensors shards with an index.

#![allow(dead_code)]

use std::path::Path;

use dsv4_core::model::loader::{expected_mtp_tensors, TensorRole};
use dsv4_core::quant::{dequantize, quantize_fp4_group, quantize_fp8_block, scale_name};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::{Checkpoint, ModelConfig};

/// How one weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Keep,
    /// F8_E4M3 with F8_E8M0 128×128 block scales (official).
    Fp8E8m0,
    /// F8_E4M3 with F32 block scales (Base checkpoints' experts).
    Fp8F32,
    /// FP4 e2m1 in I8 `[N, K/2]` with F8_E8M0 scales per 32 inputs (official routed experts).
    Fp4,
}

/// The official layout, varied per layer so that the loader has to follow each tensor's own
/// dtype: routed experts FP4 on layers 0-1 (and MTP), FP8 with F32 scales on layer 2, BF16
/// on layer 3; attention projections and shared experts FP8; the rest as stored.
pub fn official_form(name: &str) -> Form {
    if name.contains(".ffn.experts.") && name.ends_with(".weight") {
        return match name.split('.').nth(1) {
            Some("2") if name.starts_with("layers.") => Form::Fp8F32,
            Some("3") if name.starts_with("layers.") => Form::Keep,
            _ => Form::Fp4,
        };
    }
    if dsv4_core::weight_forms::OFFICIAL_FP8_WEIGHTS.iter().any(|s| name.ends_with(s)) {
        Form::Fp8E8m0
    } else {
        Form::Keep
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Stores `tensors` as `form` says. Returns (the quantised tensors with their scales, the
/// same weights dequantised exactly to F32 under the same names).
pub fn quantize(tensors: &[HostTensor], form: impl Fn(&str) -> Form) -> (Vec<HostTensor>, Vec<HostTensor>) {
    let (mut q, mut deq) = (vec![], vec![]);
    for t in tensors {
        let f = form(&t.name);
        if f == Form::Keep || t.shape.len() != 2 {
            q.push(t.clone());
            deq.push(t.clone());
            continue;
        }
        let (n, k) = (t.shape[0], t.shape[1]);
        let v = t.to_f32_vec().unwrap();
        let sname = scale_name(&t.name).unwrap();
        let (data, scale) = match f {
            Form::Fp8E8m0 | Form::Fp8F32 => {
                let (codes, s) = quantize_fp8_block(&v, n, k);
                let shape = vec![n.div_ceil(128), k.div_ceil(128)];
                let scale = if f == Form::Fp8F32 {
                    let vals: Vec<f32> = s.iter().map(|&b| dsv4_core::quant::e8m0_to_f32(b).unwrap()).collect();
                    HostTensor::from_bytes(&sname, DType::F32, shape, f32_bytes(&vals)).unwrap()
                } else {
                    HostTensor::from_bytes(&sname, DType::F8E8M0, shape, s).unwrap()
                };
                (HostTensor::from_bytes(&t.name, DType::F8E4M3, vec![n, k], codes).unwrap(), scale)
            }
            Form::Fp4 => {
                let (packed, s) = quantize_fp4_group(&v, n, k);
                (
                    HostTensor::from_bytes(&t.name, DType::I8, vec![n, k / 2], packed).unwrap(),
                    HostTensor::from_bytes(&sname, DType::F8E8M0, vec![n, k.div_ceil(32)], s).unwrap(),
                )
            }
            Form::Keep => unreachable!(),
        };
        let exact = dequantize(&StoredWeight::detect(&data, Some(&scale), &[n, k]).unwrap()).unwrap();
        deq.push(HostTensor::from_bytes(&t.name, DType::F32, vec![n, k], f32_bytes(&exact)).unwrap());
        q.push(data);
        q.push(scale);
    }
    (q, deq)
}

/// Deterministic random values in [-0.1, 0.1] (norm-like tensors around 1).
fn values(name: &str, n: usize) -> Vec<f32> {
    let mut s = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 0.2 - 0.1;
            if name.contains("norm") {
                1.0 + u
            } else {
                u
            }
        })
        .collect()
}

/// F32 tensors for MTP layer 0 of `cfg` (I64 zeros for integer tables, which MTP has none of).
pub fn mtp_tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Vec<HostTensor> {
    expected_mtp_tensors(cfg, ckpt, 0)
        .into_iter()
        .map(|e| {
            let n: usize = e.shape.iter().product();
            match e.role {
                TensorRole::Ints => HostTensor::from_bytes(e.name, DType::I64, e.shape, vec![0u8; n * 8]).unwrap(),
                _ => HostTensor::from_f32(e.name.clone(), e.shape, &values(&e.name, n)).unwrap(),
            }
        })
        .collect()
}

/// The built-in tiny model plus an MTP layer, stored the official way. Returns
/// (config, quantised tensors, their exact F32 twin).
pub fn quantized_tiny() -> (ModelConfig, Vec<HostTensor>, Vec<HostTensor>) {
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    let mut all: Vec<HostTensor> = ckpt.tensors().cloned().collect();
    all.extend(mtp_tensors(&cfg, &ckpt));
    let (q, deq) = quantize(&all, official_form);
    (cfg, q, deq)
}

pub fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::F8E4M3 => S::F8_E4M3,
        DType::F8E8M0 => S::F8_E8M0,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

/// One safetensors file holding `tensors` under their (official) names.
pub fn write_safetensors(path: &Path, tensors: &[&HostTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let v = safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), t.bytes()).unwrap();
            (t.name.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A model directory: `config.json`, `shards` shards (tensors dealt round-robin, so a weight
/// and its scale usually land in different shards) and `model.safetensors.index.json`.
pub fn write_model_dir(dir: &Path, config: &serde_json::Value, tensors: &[HostTensor], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let mine: Vec<&HostTensor> = tensors.iter().skip(s).step_by(shards).collect();
        for t in &mine {
            map.insert(t.name.clone(), file.clone().into());
        }
        write_safetensors(&dir.join(&file), &mine);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
}

/// A fresh, empty directory under the target dir's tmp (removed first if it exists).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
