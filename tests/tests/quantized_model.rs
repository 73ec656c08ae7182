//! An official-format checkpoint (FP8 block-scaled projections, FP4 routed experts, FP8
//! experts with F32 scales on one layer, BF16 experts on another, an MTP layer), sharded on
//! disk: it loads, the CPU backend keeps it packed, and its logits are bit-identical to those
//! of the same weights dequantised exactly to F32, on the GEMV (few tokens) and GEMM paths.

mod common;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::model::loader::{expected_tensors, mtp_layers_present};
use dsv4_core::{Backend, Batch, Checkpoint, Model};

fn logits(be: &CpuBackend, model: &Model<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    be.download(&model.forward(be, &Batch::prefill(&[ids]).unwrap()).unwrap()).unwrap()
}

#[test]
fn packed_official_checkpoint_matches_its_dequantized_twin() {
    let (cfg, q, deq) = common::quantized_tiny();
    let config = dsv4_core::builtin::tiny_config_json();
    let qdir = common::scratch_dir("quantized_model_q");
    let ddir = common::scratch_dir("quantized_model_deq");
    common::write_model_dir(&qdir, &config, &q, 3);
    common::write_model_dir(&ddir, &config, &deq, 2);

    let qckpt = Checkpoint::open(&qdir).unwrap();
    let dckpt = Checkpoint::open(&ddir).unwrap();
    // The stored dtypes are what the official files use.
    let dtype = |n: &str| qckpt.get(n).unwrap().dtype.name();
    assert_eq!(dtype("layers.1.attn.wq_a.weight"), "F8_E4M3");
    assert_eq!(dtype("layers.1.attn.wq_a.scale"), "F8_E8M0");
    assert_eq!(dtype("layers.0.ffn.experts.3.w2.weight"), "I8");
    assert_eq!(dtype("layers.2.ffn.experts.3.w2.scale"), "F32");
    assert_eq!(dtype("layers.3.ffn.experts.3.w2.weight"), "BF16");
    assert_eq!(mtp_layers_present(&cfg, &qckpt), vec![0]);
    assert!(expected_tensors(&cfg, &qckpt).iter().all(|e| !e.name.starts_with("mtp.")));

    let be = CpuBackend::new();
    let mut seen = (0, 0, 0u64);
    let qm = Model::load(&be, cfg.clone(), &qckpt, &mut |done, total, bytes| seen = (done, total, bytes)).unwrap();
    let dm = Model::load(&be, cfg, &dckpt, &mut |_, _, _| {}).unwrap();
    // Progress counts scales as tensors: everything but the (not yet wired) MTP tensors.
    let mtp = qckpt.tensors().filter(|t| t.name.starts_with("mtp.")).count();
    assert!(seen.0 == seen.1 || seen.0 + mtp == seen.1, "progress {seen:?}, {mtp} MTP tensors");

    for ids in [vec![3u32], vec![5, 17, 42, 7, 250], (0..40).map(|i| (i * 37 + 11) % 271).collect::<Vec<u32>>()] {
        let a = logits(&be, &qm, &ids);
        let b = logits(&be, &dm, &ids);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{} tokens: packed logits differ from the dequantised twin",
            ids.len()
        );
    }
}
