//! `DSV4_CPU_DEQUANTIZE=1` switches the CPU backend to the dequantise-at-load reference path;
//! a model loaded that way gives bit-identical logits to the packed default. (One test in its
//! own binary: it sets a process-wide environment variable.)

mod common;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::{Backend, Batch, Checkpoint, Model};

#[test]
fn dequantize_at_load_switch_gives_identical_logits() {
    let (cfg, q, _) = common::quantized_tiny();
    let dir = common::scratch_dir("dequantize_env");
    common::write_model_dir(&dir, &dsv4_core::builtin::tiny_config_json(), &q, 1);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let be = CpuBackend::new();
    let ids = [5u32, 17, 42, 7, 250, 1, 2, 3, 4, 5, 6, 8];
    let run = |m: &Model<CpuBackend>| be.download(&m.forward(&be, &Batch::prefill(&[&ids]).unwrap()).unwrap()).unwrap();

    let w = dsv4_core::model::loader::stored_weight(&ckpt, "layers.0.ffn.experts.1.w1.weight", &[32, 64]).unwrap();
    std::env::remove_var("DSV4_CPU_DEQUANTIZE");
    assert!(!be.upload_weight(&w).unwrap().is_dequantized(), "packed by default");
    std::env::set_var("DSV4_CPU_DEQUANTIZE", "1");
    assert!(be.upload_weight(&w).unwrap().is_dequantized(), "the switch dequantises at load");
    std::env::remove_var("DSV4_CPU_DEQUANTIZE");
    let packed = run(&Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap());
    std::env::set_var("DSV4_CPU_DEQUANTIZE", "1");
    let reference = run(&Model::load(&be, cfg, &ckpt, &mut |_, _, _| {}).unwrap());
    std::env::remove_var("DSV4_CPU_DEQUANTIZE");
    assert_eq!(
        packed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}
