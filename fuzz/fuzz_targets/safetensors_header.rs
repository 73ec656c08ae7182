//! A safetensors file made of the fuzz bytes: the header parser, the checkpoint built on it,
//! reading every tensor, and the stored-form detection and dequantisation of every `.weight`
//! with its `.scale`. Any panic (including an out-of-bounds slice) is a finding.

#![no_main]

use std::path::Path;

use dsv4_core::checkpoint::parse_safetensors_header;
use dsv4_core::quant::{dequantize, scale_name};
use dsv4_core::tensor::{DType, StoredWeight};
use dsv4_core::Checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_safetensors_header(data, Path::new("fuzz.safetensors"));
    let Ok(ckpt) = Checkpoint::from_file_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    for t in ckpt.tensors() {
        let sum = t.bytes().iter().fold(0u64, |a, &b| a.wrapping_add(b as u64));
        std::hint::black_box(sum);
        let _ = t.to_f32_vec();
        let _ = t.to_i64_vec();
        if t.shape.len() == 2 {
            let scale = scale_name(&t.name).and_then(|s| ckpt.get(&s));
            let logical = match t.dtype {
                DType::I8 | DType::U8 => vec![t.shape[0], t.shape[1] * 2],
                _ => t.shape.clone(),
            };
            if let Ok(w) = StoredWeight::detect(t, scale, &logical) {
                let _ = dequantize(&w);
            }
            // Logical shapes that do not match the data must be refused, never read.
            let _ = StoredWeight::detect(t, scale, &[t.shape[0] + 1, t.shape[1]]);
            let _ = StoredWeight::detect(t, scale, &[t.shape[0], t.shape[1] * 2 + 1]);
        }
    }
});
