//! Multi-rank conformance on Ascend's API (issue 14): every fixture's prefill and decode with
//! the experts and heads split over emulated devices (EP 2 and 4, TP 2, EP 2 × TP 2), the ranks
//! exchanging through HCCL (the emulator's), equal the single-device Ascend result within 1e-5
//! relative; with the MoE exchanged by all-reduce and by token dispatch and combine
//! (`--moe-exchange all-to-all`, HcclAlltoAllV); and with data-parallel attention, each rank
//! serving its own sequences. Emulator-verified, not hardware-verified.
//!
//! Why 1e-5: as on the CPU (tests/parallel.rs), splitting only reorders f32 sums.

use std::path::Path;

use dsv4_backend_ascend::{run_ranks, AscendBackend};
use dsv4_core::parallel::{MoeExchange, ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const TOLERANCE: f64 = 1e-5;
const DEVICES: usize = 4;

/// (world, TP, EP) and a label.
const LAYOUTS: [(usize, usize, usize, &str); 4] =
    [(2, 1, 2, "EP 2"), (4, 1, 4, "EP 4"), (2, 2, 1, "TP 2"), (4, 2, 2, "EP 2 x TP 2")];

/// Decode steps after the 17-token prefill (fewer where a prompt is shorter). The CPU suite
/// (tests/parallel.rs) decodes every fixture to its end; here 24 steps (past several compression
/// boundaries and out of the first window) keep the emulated ranks' run time near a minute.
/// Host memory does not limit it: the emulator drops destroyed objects
/// (tests/ascend_host_memory.rs); the peak RSS of this binary is about 460 MB.
const DECODE_STEPS: usize = 24;

fn check(case: &Path, layouts: &[(usize, usize, usize, &str)], moe: MoeExchange) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let cfg = ModelConfig::from_dir(case).unwrap();
    let ckpt = Checkpoint::open(case).unwrap();
    let ids = read_reference(case).input_ids;
    let dtype = case_kv_dtype(case);
    let want = {
        let be = dsv4_backend_ascend::open(0).unwrap();
        let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
        prefill_and_decode(&be, &model, &ids, dtype, Some(DECODE_STEPS))
    };
    for &(world, tp, ep, label) in layouts {
        let layout = ParallelLayout::new(world, tp, ep, &cfg).unwrap().with_moe(moe);
        let label = format!("{label} / {}", moe.name());
        let devices: Vec<i32> = (0..world as i32).collect();
        let ranks = run_ranks(&devices, layout, |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
            let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
            Ok::<_, dsv4_core::Error>(prefill_and_decode(be, &model, &ids, dtype, Some(DECODE_STEPS)))
        })
        .unwrap_or_else(|e| panic!("{name} / {label}: {e}"));
        assert_ranks_match_one_device(&format!("{name} / {label} over HCCL"), &ranks, &want, TOLERANCE);
    }
}

#[test]
fn every_f32_fixture_splits_over_emulated_devices() {
    let _emu = dsv4_tests::emulated_devices(DEVICES);
    let cases = fixture_cases();
    assert!(cases.len() >= 5, "expected the committed fixture cases, found {}", cases.len());
    for case in cases {
        check(&case, &LAYOUTS, MoeExchange::AllReduce);
    }
}

/// Token dispatch over HCCL's all-to-all-v: EP 4 (decode steps leave ranks without tokens of
/// their own, and with no rows for their experts) and EP 2 × TP 2.
#[test]
fn every_f32_fixture_dispatches_tokens_over_emulated_devices() {
    let _emu = dsv4_tests::emulated_devices(DEVICES);
    for case in fixture_cases() {
        check(&case, &[LAYOUTS[1], LAYOUTS[3]], MoeExchange::AllToAll);
    }
}

/// Data-parallel attention over HCCL (`--data-parallel-attention`): 3 sequences on 4 ranks,
/// EP 4 and EP 2 (two EP groups), rank 3 idle throughout and others idle once their sequences
/// end (`Model::idle_step`: dispatches of no rows over HcclAlltoAllV).
#[test]
fn every_f32_fixture_runs_data_parallel_attention_over_emulated_devices() {
    const FIRST: usize = 9;
    let _emu = dsv4_tests::emulated_devices(DEVICES);
    for case in fixture_cases() {
        let dsv4_tests::DataParallelCase { name, cfg, ckpt, dtype, prompts } =
            dsv4_tests::DataParallelCase::open(&case, Some(FIRST + DECODE_STEPS));
        let want = {
            let be = dsv4_backend_ascend::open(0).unwrap();
            let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
            dsv4_tests::data_parallel_reference(&be, &model, &prompts, FIRST, dtype)
        };
        for ep in [4, 2] {
            let layout = ParallelLayout::new(DEVICES, 1, ep, &cfg).unwrap().with_data_parallel_attention().unwrap();
            let devices: Vec<i32> = (0..DEVICES as i32).collect();
            let ranks = run_ranks(&devices, layout, |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
                let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
                Ok::<_, dsv4_core::Error>(dsv4_tests::data_parallel_logits(be, &model, &prompts, FIRST, dtype))
            })
            .unwrap_or_else(|e| panic!("{name} / data-parallel EP {ep}: {e}"));
            let what = format!("{name} / data-parallel attention, {DEVICES} ranks, EP {ep}, over HCCL");
            dsv4_tests::assert_data_parallel_matches(&what, ranks, &want, TOLERANCE);
        }
    }
}
