//! Huawei's MC2 dispatch/combine (`aclnnMoeDistributeDispatchV2` / `CombineV2`) as the EP
//! exchange (`--moe-exchange all-to-all`) on the emulator posing as an Atlas A3: a model at the
//! kernels' widths (hidden 1024, the `fused_compressor` model: 4 hash-routed experts, top-2) in
//! `bf16` over EP 2, prefill chunks and decode steps (a decode step leaves rank 1 without tokens:
//! it dispatches its padding token), with the kernels against the same ranks with only the MC2
//! kernels switched off (the composition over HcclAlltoAllV). The two differ by where the routing
//! weight meets BF16 (A3's combine applies it after `w2`; V4 applies it before), so the bound is
//! the bf16 budget's, 2e-2 of the largest logit. Also: the kernels ran (launch counts), f32 runs
//! compose, as do calls whose dispatch would not fit HCCL's window (`HCCL_BUFFSIZE`), and
//! `dsv4 devices`' entry says why not where they are off; and data-parallel attention (uneven
//! batches, an idle rank) on the kernels. A separate binary: the SoC
//! and the fused policy are fixed per process. Emulator-verified, not hardware-verified.

use dsv4_backend_ascend::{run_ranks, AscendBackend};
use dsv4_core::parallel::{MoeExchange, ParallelLayout, RankContext};
use dsv4_core::{Model, Precision};
use dsv4_tests::{max_rel_err, run_in_steps};

const DISPATCH: &str = "aclnnMoeDistributeDispatchV2";
const COMBINE: &str = "aclnnMoeDistributeCombineV2";
const STEPS: [usize; 5] = [37, 1, 1, 20, 1];
const BF16_BOUND: f64 = 2e-2;

/// Rank 0's logits over the schedule on EP 2 with `--moe-exchange all-to-all`, in `prec`, with
/// the MC2 kernels or without; and whether rank 0 reported them used afterwards, with why.
fn run(prec: Precision, mc2: bool) -> (Vec<f32>, bool, String) {
    let (cfg, ckpt) = dsv4_core::builtin::random_weights(&dsv4_tests::fused_compressor::config()).unwrap();
    let layout = ParallelLayout::new(2, 1, 2, &cfg).unwrap().with_moe(MoeExchange::AllToAll);
    let ids: Vec<u32> = (0..STEPS.iter().sum::<usize>() as u32).map(|i| (i * 37 + 11) % 271).collect();
    let mut ranks = run_ranks(&[0, 1], layout, |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
        if !mc2 {
            assert_eq!(be.switch_off_fused(DISPATCH), 1);
        }
        let mut model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
        model.precision = prec;
        let logits = run_in_steps(be, &model, &ids, &STEPS);
        let choice = be.fused_kernels().into_iter().find(|c| c.name.contains(DISPATCH)).expect("listed");
        Ok::<_, dsv4_core::Error>((logits, choice.used, choice.why))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    ranks.swap_remove(0)
}

/// Data-parallel attention on EP 2 in bf16 (3 sequences: rank 0 steps two, rank 1 one, which
/// ends first, so rank 1 then idle-steps: a padding token against rank 0's batch), with the MC2
/// kernels or without: every sequence's logits, in sequence order.
fn run_data_parallel(mc2: bool) -> Vec<Vec<f32>> {
    const FIRST: usize = 9;
    let (cfg, ckpt) = dsv4_core::builtin::random_weights(&dsv4_tests::fused_compressor::config()).unwrap();
    let layout = ParallelLayout::new(2, 1, 2, &cfg).unwrap().with_data_parallel_attention().unwrap();
    let ids: Vec<u32> = (0..30u32).map(|i| (i * 53 + 7) % 271).collect();
    let prompts = dsv4_tests::data_parallel_prompts(&ids);
    let ranks = run_ranks(&[0, 1], layout, |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
        if !mc2 {
            assert_eq!(be.switch_off_fused(DISPATCH), 1);
        }
        let mut model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
        model.precision = Precision::Bf16;
        let kv = dsv4_core::kv::KvDtype::F32;
        Ok::<_, dsv4_core::Error>(dsv4_tests::data_parallel_logits(be, &model, &prompts, FIRST, kv))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut all: Vec<(usize, Vec<f32>)> = ranks.into_iter().flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    assert_eq!(all.len(), prompts.len());
    all.into_iter().map(|(_, l)| l).collect()
}

fn launches() -> (u64, u64) {
    let n = |op| dsv4_backend_ascend::emulator_launches(op).unwrap();
    (n(DISPATCH), n(COMBINE))
}

#[test]
fn mc2_carries_the_ep_exchange_on_an_a3() {
    let _emu = dsv4_tests::emulated_devices(2);
    // The only test in its binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend910_9391");
    std::env::set_var(dsv4_backend_ascend::FUSED_VAR, "all");

    let before = launches();
    let (with, used, why) = run(Precision::Bf16, true);
    let after = launches();
    // One self-test round trip, then one per MoE layer (2) per step (5).
    let (d, c) = (after.0 - before.0, after.1 - before.1);
    println!("bf16, MC2 on: {d} dispatch and {c} combine launches (rank 0 and 1); used {used} ({why})");
    assert!(used, "{why}");
    assert_eq!((d, c), (2 * (1 + 2 * STEPS.len() as u64), 2 * (1 + 2 * STEPS.len() as u64)));

    let (without, used_off, why_off) = run(Precision::Bf16, false);
    assert_eq!(launches(), after, "the composition launched MC2");
    assert!(!used_off && why_off.contains("switched off"), "{why_off}");
    let err = max_rel_err(&with, &without);
    println!("bf16 logits, MC2 vs the composition over HcclAlltoAllV: max rel err {err:.3e} (bound {BF16_BOUND})");
    assert!(err > 0.0 && err <= BF16_BOUND, "{err:.3e}");

    // f32 activations: the kernels do not apply (their rows are BF16), nothing launches.
    let before = launches();
    let (f32_mc2, _, _) = run(Precision::F32, true);
    let (f32_off, _, _) = run(Precision::F32, false);
    assert_eq!(launches(), before, "MC2 launched for f32 activations");
    assert_eq!(max_rel_err(&f32_mc2, &f32_off), 0.0);

    // An HCCL window too small for the dispatch (HCCL_BUFFSIZE in MiB): the composition runs.
    std::env::set_var("HCCL_BUFFSIZE", "0");
    let (small_window, _, _) = run(Precision::Bf16, true);
    std::env::remove_var("HCCL_BUFFSIZE");
    assert_eq!(launches(), before, "MC2 launched with HCCL_BUFFSIZE=0");
    assert_eq!(max_rel_err(&small_window, &without), 0.0);

    // Data-parallel attention: uneven batches (2 sequences against 1, then 2 tokens against
    // 1) and an idle rank's padding token, on the kernels and on the composition.
    let before = launches();
    let with = run_data_parallel(true);
    let after = launches();
    // The longest prompt (30 tokens) takes 1 + 21 steps, each one exchange per MoE layer (2)
    // on both ranks, after one self-test round trip.
    let steps = dsv4_tests::data_parallel_steps(30, 9).len() as u64;
    assert_eq!((after.0 - before.0, after.1 - before.1), (2 * (1 + 2 * steps), 2 * (1 + 2 * steps)));
    let without = run_data_parallel(false);
    assert_eq!(launches(), after, "the composition launched MC2");
    let err = with.iter().zip(&without).map(|(a, b)| max_rel_err(a, b)).fold(0.0, f64::max);
    println!("data-parallel attention, bf16, MC2 vs the composition: max rel err {err:.3e} (bound {BF16_BOUND})");
    assert!(err > 0.0 && err <= BF16_BOUND, "{err:.3e}");
}
