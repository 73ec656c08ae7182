//! `loader::expected_tensors` (what `dsv4 inspect` compares a checkpoint against) lists
//! exactly the tensors `Model::load` reads: checked by recording every tensor the loader
//! fetches, on the built-in model, every fixture (official, transformers, fused and sharded
//! layouts) and an official-format FP8/FP4 checkpoint with an MTP layer.

mod common;

use std::collections::BTreeSet;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::model::loader::{check_expected, expected_mtp_tensors, expected_tensors, mtp_layers_present};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_tests::fixture_cases;

fn check(label: &str, cfg: &ModelConfig, ckpt: &Checkpoint) {
    // Names the list implies: every expected tensor plus the scales of quantised weights.
    let mut want = BTreeSet::new();
    for e in expected_tensors(cfg, ckpt) {
        want.extend(check_expected(ckpt, &e).unwrap_or_else(|err| panic!("{label}: {err}")));
    }
    let mut mtp = BTreeSet::new();
    for i in mtp_layers_present(cfg, ckpt) {
        for e in expected_mtp_tensors(cfg, ckpt, i) {
            mtp.extend(check_expected(ckpt, &e).unwrap_or_else(|err| panic!("{label}: {err}")));
        }
    }
    ckpt.record_access();
    Model::load(&CpuBackend::new(), cfg.clone(), ckpt, &mut |_, _, _| {}).unwrap();
    let got = ckpt.accessed();
    // MTP weights are read by Model::load once it is wired to load them; either way all or none.
    let got_mtp: BTreeSet<String> = got.iter().filter(|n| n.starts_with("mtp.")).cloned().collect();
    assert!(got_mtp.is_empty() || got_mtp == mtp, "{label}: MTP read partially");
    let got_main: BTreeSet<String> = got.difference(&got_mtp).cloned().collect();
    let missing: Vec<_> = want.difference(&got_main).collect();
    let extra: Vec<_> = got_main.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{label}: listed but not loaded {missing:?}; loaded but not listed {extra:?}"
    );
    // Everything in the checkpoint is accounted for (the fixtures and models hold nothing else).
    let all: BTreeSet<String> = ckpt.tensors().map(|t| t.name.clone()).collect();
    let covered: BTreeSet<String> = want.union(&mtp).cloned().collect();
    assert_eq!(all, covered, "{label}: checkpoint tensors vs expected");
}

#[test]
fn builtin_model() {
    let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
    check("builtin:tiny", &cfg, &ckpt);
}

#[test]
fn every_fixture() {
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        check(&name, &ModelConfig::from_dir(&case).unwrap(), &Checkpoint::open(&case).unwrap());
    }
}

#[test]
fn official_format_checkpoint_with_mtp() {
    let (cfg, q, _) = common::quantized_tiny();
    let dir = common::scratch_dir("expected_tensors_official");
    common::write_model_dir(&dir, &dsv4_core::builtin::tiny_config_json(), &q, 4);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.contains("mtp.0.e_proj.scale"));
    check("official FP8/FP4", &cfg, &ckpt);
}
