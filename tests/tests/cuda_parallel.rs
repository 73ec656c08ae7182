//! Multi-rank conformance on the CUDA backend (issue 14): every fixture's prefill and decode
//! with the experts and heads split over emulated GPUs (EP 2 and 4, TP 2, EP 2 × TP 2), the
//! ranks exchanging through the communicator over NCCL's API (`NcclCommunicator` on the
//! emulator's NCCL), equal the single-GPU result within 1e-5 relative; with the MoE exchanged
//! by all-reduce and by token dispatch and combine (`--moe-exchange all-to-all`); and with
//! data-parallel attention, each rank serving its own sequences.
//! Emulator-verified, not run on GPUs.
//!
//! Why 1e-5: as on the CPU (tests/parallel.rs), splitting only reorders f32 sums.

use std::path::Path;
use std::sync::Arc;

use dsv4_backend_cuda::{run_ranks, CudaBackend};
use dsv4_core::parallel::{MoeExchange, ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_cuda_emu::{EmuComm, EmulatedDevice};
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const TOLERANCE: f64 = 1e-5;

/// (world, TP, EP) and a label.
const LAYOUTS: [(usize, usize, usize, &str); 4] =
    [(2, 1, 2, "EP 2"), (4, 1, 4, "EP 4"), (2, 2, 1, "TP 2"), (4, 2, 2, "EP 2 x TP 2")];

/// Decode steps after the prefill (fewer where a prompt is shorter): past several compression
/// boundaries and out of the first window, while the emulated kernels keep the run near a
/// minute (the CPU suite, tests/parallel.rs, decodes every fixture to its end).
const DECODE_STEPS: usize = 24;

type Gpu = CudaBackend<Arc<EmulatedDevice>>;

/// `world` emulated GPUs and an emulated NCCL communicator over them.
fn gpus(world: usize) -> (Vec<Arc<EmulatedDevice>>, Vec<EmuComm>) {
    let devices: Vec<Arc<EmulatedDevice>> = (0..world).map(|_| Arc::new(EmulatedDevice::new())).collect();
    let refs: Vec<&EmulatedDevice> = devices.iter().map(|d| &**d).collect();
    let members = EmuComm::world(&refs).unwrap();
    (devices, members)
}

fn check(case: &Path, layouts: &[(usize, usize, usize, &str)], moe: MoeExchange) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let cfg = ModelConfig::from_dir(case).unwrap();
    let ckpt = Checkpoint::open(case).unwrap();
    let ids = read_reference(case).input_ids;
    let dtype = case_kv_dtype(case);
    let want = {
        let be = CudaBackend::new(EmulatedDevice::new());
        let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
        prefill_and_decode(&be, &model, &ids, dtype, Some(DECODE_STEPS))
    };
    for &(world, tp, ep, label) in layouts {
        let layout = ParallelLayout::new(world, tp, ep, &cfg).unwrap().with_moe(moe);
        let label = format!("{label} / {}", moe.name());
        let (devices, members) = gpus(world);
        let ranks = run_ranks(devices, members, layout, |be: &Gpu, ctx: RankContext<Gpu>| {
            let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
            Ok::<_, dsv4_core::Error>(prefill_and_decode(be, &model, &ids, dtype, Some(DECODE_STEPS)))
        })
        .unwrap_or_else(|e| panic!("{name} / {label}: {e}"));
        assert_ranks_match_one_device(&format!("{name} / {label} over NCCL (emulated)"), &ranks, &want, TOLERANCE);
    }
}

#[test]
fn every_f32_fixture_splits_over_emulated_gpus() {
    let cases = fixture_cases();
    assert!(cases.len() >= 5, "expected the committed fixture cases, found {}", cases.len());
    for case in cases {
        check(&case, &LAYOUTS, MoeExchange::AllReduce);
    }
}

/// Token dispatch over the communicator's all-to-all-v (NCCL send/recv groups): EP 4 and
/// EP 2 × TP 2.
#[test]
fn every_f32_fixture_dispatches_tokens_over_emulated_gpus() {
    for case in fixture_cases() {
        check(&case, &[LAYOUTS[1], LAYOUTS[3]], MoeExchange::AllToAll);
    }
}

/// Data-parallel attention over the communicator (`--data-parallel-attention`): 3 sequences
/// on 4 emulated GPUs, EP 4 and EP 2, rank 3 idle throughout (`Model::idle_step`).
#[test]
fn every_f32_fixture_runs_data_parallel_attention_over_emulated_gpus() {
    const FIRST: usize = 9;
    const WORLD: usize = 4;
    for case in fixture_cases() {
        let dsv4_tests::DataParallelCase { name, cfg, ckpt, dtype, prompts } =
            dsv4_tests::DataParallelCase::open(&case, Some(FIRST + DECODE_STEPS));
        let want = {
            let be = CudaBackend::new(EmulatedDevice::new());
            let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
            dsv4_tests::data_parallel_reference(&be, &model, &prompts, FIRST, dtype)
        };
        for ep in [4, 2] {
            let layout = ParallelLayout::new(WORLD, 1, ep, &cfg).unwrap().with_data_parallel_attention().unwrap();
            let (devices, members) = gpus(WORLD);
            let ranks = run_ranks(devices, members, layout, |be: &Gpu, ctx: RankContext<Gpu>| {
                let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
                Ok::<_, dsv4_core::Error>(dsv4_tests::data_parallel_logits(be, &model, &prompts, FIRST, dtype))
            })
            .unwrap_or_else(|e| panic!("{name} / data-parallel EP {ep}: {e}"));
            let what = format!("{name} / data-parallel attention, {WORLD} ranks, EP {ep}, over NCCL (emulated)");
            dsv4_tests::assert_data_parallel_matches(&what, ranks, &want, TOLERANCE);
        }
    }
}
