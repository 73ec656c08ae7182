//! `aclnnCompressor` in the V4 graph on the Ascend emulator posing as a given SoC: a model with
//! the kernel's widths (hidden size 1024, attention entries of 512, indexer entries of 128, CSA
//! windows of 4, HCA windows of 128), its seeded random weights
//! ([`dsv4_core::builtin::random_weights`]), run in `bf16` over a schedule of prefill chunks and
//! decode steps, with the kernel and with only the kernel switched off, and on the CPU backend.
//! Shared by the per-SoC test binaries (the SoC is fixed per process). The composition, which
//! every fixture checks, is the reference for these runs; the one fixture at these widths
//! (`tests/fixtures/wide/compressor_dims`) is prefilled too, in bf16 against its float64
//! reference and in `official` with the kernel against without.
//!
//! The model is chosen so that nothing downstream of the compressor is discontinuous: both
//! layers route by token hash, and the indexer's top-k (512) exceeds the entries the sequence
//! ever has (75), so it selects them all. A BF16 rounding that moves by one ulp then moves the
//! logits a little instead of flipping a choice.

use dsv4_backend_ascend::{AscendBackend, FusedPolicy};
use dsv4_core::backend::{DevicePool, RowFormat};
use dsv4_core::kv::layout::CompressorShape;
use dsv4_core::kv::SeqCompressPlan;
use dsv4_core::model::Model;
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::test_data::Rng;
use dsv4_core::{Backend, Precision};
use serde_json::json;

use crate::{max_rel_err, run_in_steps};

/// The kernel's name, as `dsv4 devices` and the emulator's launch counter know it.
pub const KERNEL: &str = "aclnnCompressor";

/// Tokens and the schedule: a prefill chunk that crosses the first HCA window (128) and ends
/// inside a CSA window, decode steps that complete a CSA window and do not, a chunk that
/// completes the second HCA window exactly, then a longer one. Every step size divides nothing
/// in particular on purpose.
pub const STEPS: [usize; 6] = [130, 1, 1, 124, 2, 42];

/// The model's config.json: the tiny model's layout at the kernel's widths.
pub fn config() -> serde_json::Value {
    let mut c = dsv4_core::builtin::tiny_config_json();
    let o = c.as_object_mut().expect("literal object");
    for (k, v) in [
        ("hidden_size", json!(1024)),
        ("num_hidden_layers", json!(2)),
        ("num_attention_heads", json!(2)),
        ("head_dim", json!(512)),
        ("partial_rotary_factor", json!(0.125)),
        ("q_lora_rank", json!(64)),
        ("o_lora_rank", json!(32)),
        ("layer_types", json!(["compressed_sparse_attention", "heavily_compressed_attention"])),
        ("compress_rates", json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})),
        ("mlp_layer_types", json!(["hash_moe", "hash_moe"])),
        ("index_n_heads", json!(2)),
        ("index_head_dim", json!(128)),
        ("index_topk", json!(512)),
        ("n_routed_experts", json!(4)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

fn model<B: Backend>(be: &B) -> Model<B> {
    let (cfg, ckpt) = dsv4_core::builtin::random_weights(&config()).unwrap();
    let mut m = Model::load(be, cfg, &ckpt, &mut |_, _, _| {}).unwrap();
    m.precision = Precision::Bf16;
    m
}

fn ids() -> Vec<u32> {
    (0..STEPS.iter().sum::<usize>() as u32).map(|i| (i * 37 + 11) % 271).collect()
}

/// One SoC's run.
pub struct CompressorRun {
    /// Whether `dsv4 devices` lists the kernel as used, and why not.
    pub used: bool,
    pub why: String,
    /// Launches of the kernel over the schedule.
    pub launches: u64,
    /// Logits over the schedule: kernel vs the same SoC with the kernel off, and vs the CPU
    /// backend (both bf16), as max |Δ| / max |logit|.
    pub vs_off: f64,
    pub vs_cpu: f64,
    /// The reference fixture at these widths (`tests/fixtures/wide/compressor_dims`) prefilled
    /// in bf16: launches of the kernel, and the logits against the float64 reference with the
    /// kernel, with it off and on the CPU (max |Δ| / max |logit|).
    pub fixture_launches: u64,
    pub fixture_vs_reference: f64,
    pub fixture_off_vs_reference: f64,
    pub fixture_cpu_vs_reference: f64,
    /// The same prefill in `official` (its KV rows and indexer keys fake-quantised):
    /// launches, and the logits with the kernel vs without.
    pub official_launches: u64,
    pub official_vs_off: f64,
    /// Per compressor shape, through `Backend::compressor_step` alone (kernel vs off):
    /// launches, the worst entry error in BF16 ulps of the entry, and the worst carry error
    /// relative to the carry's largest value.
    pub ops: Vec<OpRun>,
}

/// One compressor shape's steps through `Backend::compressor_step`, kernel vs off.
#[derive(Debug)]
pub struct OpRun {
    pub shape: CompressorShape,
    pub launches: u64,
    /// Windows the steps completed (entries compared).
    pub entries: usize,
    /// max |Δ| / (2⁻⁸·|entry|) over the entries: BF16 half-ulps, so ≤ 2 is one rounding apart.
    pub entry_half_ulps: f64,
    /// max |Δ| / max |value| over the carry rows the steps left.
    pub carry: f64,
}

/// The schedule on the emulator posing as `soc` (fused kernels all opted in), with the
/// compressor kernel and without, and on the CPU.
pub fn run_on(soc: &str) -> CompressorRun {
    crate::use_ascend_emulator();
    // The only test in its binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", soc);
    let open = || dsv4_backend_ascend::open_with(0, FusedPolicy::All).unwrap_or_else(|e| panic!("{e}"));
    let (fused, off): (AscendBackend, AscendBackend) = (open(), open());
    assert_eq!(fused.soc(), soc);
    let choice = fused.fused_kernels().into_iter().find(|c| c.name.contains(KERNEL)).expect("the kernel is listed");
    println!("{soc}: {}: used {} ({})", choice.name, choice.used, choice.why);
    if choice.used {
        assert_eq!(off.switch_off_fused(KERNEL), 1);
    }
    let ids = ids();
    let before = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap();
    let with = run_in_steps(&fused, &model(&fused), &ids, &STEPS);
    let launches = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap() - before;
    let without = run_in_steps(&off, &model(&off), &ids, &STEPS);
    let cpu = dsv4_backend_cpu::CpuBackend::new();
    let on_cpu = run_in_steps(&cpu, &model(&cpu), &ids, &STEPS);
    let case = crate::wide_case("compressor_dims");
    let reference = crate::read_reference(&case);
    let vs_reference = |logits: Vec<f32>| max_rel_err(&logits, &reference.logits);
    let before = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap();
    let fixture_vs_reference = vs_reference(prefill(&fused, &case, &reference.input_ids, Precision::Bf16));
    let fixture_launches = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap() - before;
    let fixture_off_vs_reference = vs_reference(prefill(&off, &case, &reference.input_ids, Precision::Bf16));
    let fixture_cpu_vs_reference = vs_reference(prefill(&cpu, &case, &reference.input_ids, Precision::Bf16));
    let before = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap();
    let official = prefill(&fused, &case, &reference.input_ids, Precision::Official);
    let official_launches = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap() - before;
    let official_vs_off = max_rel_err(&official, &prefill(&off, &case, &reference.input_ids, Precision::Official));
    let ops = [(512, true, 4), (128, true, 4), (512, false, 128)]
        .into_iter()
        .map(|(dim, overlap, ratio)| compare_steps(&fused, &off, CompressorShape { ratio, overlap, dim }))
        .collect();
    let r = CompressorRun {
        used: choice.used,
        why: choice.why,
        launches,
        vs_off: max_rel_err(&with, &without),
        vs_cpu: max_rel_err(&with, &on_cpu),
        fixture_launches,
        fixture_vs_reference,
        fixture_off_vs_reference,
        fixture_cpu_vs_reference,
        official_launches,
        official_vs_off,
        ops,
    };
    println!(
        "{soc}: {KERNEL} launches {}; logits vs the kernel off {:.2e}, vs the CPU {:.2e}",
        r.launches, r.vs_off, r.vs_cpu
    );
    println!(
        "{soc}: compressor_dims in bf16 vs its f64 reference: {:.2e} with {KERNEL} ({} launches), {:.2e} without, \
         {:.2e} on the CPU",
        r.fixture_vs_reference, r.fixture_launches, r.fixture_off_vs_reference, r.fixture_cpu_vs_reference
    );
    println!(
        "{soc}: compressor_dims in official: {} launches, with the kernel vs without {:.2e}",
        r.official_launches, r.official_vs_off
    );
    for op in &r.ops {
        println!("{soc}: {op:?}");
    }
    r
}

/// The logits of a fixture's prompt prefilled on `be` in `precision`.
fn prefill<B: Backend>(be: &B, case: &std::path::Path, ids: &[u32], precision: Precision) -> Vec<f32> {
    let mut m = crate::load_model(be, case);
    m.precision = precision;
    be.download(&m.forward(be, &dsv4_core::Batch::prefill(&[ids]).unwrap()).unwrap()).unwrap()
}

/// Hidden size of the op-level steps (the kernel's smallest).
const HIDDEN: usize = 1024;

/// One compressor of `shape` at [`HIDDEN`] through [`STEPS`] on both backends (random BF16
/// weights and tokens, a carry pool each), comparing the entries and the carry after each step.
fn compare_steps(fused: &AscendBackend, off: &AscendBackend, shape: CompressorShape) -> OpRun {
    let width = shape.width();
    let mut rng = Rng(shape.dim as u64 * 1000 + shape.ratio as u64);
    let bf16 = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| f32::from_bits(x.to_bits() & 0xffff_0000)).collect() };
    let weight = |v: &[f32]| -> StoredWeight {
        let bytes = v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
        StoredWeight::float(HostTensor::from_bytes("w", DType::BF16, vec![width, HIDDEN], bytes).unwrap()).unwrap()
    };
    // Weights of the scale 1/sqrt(H) a real checkpoint has, scores spread by the ape.
    let (wkv, wgate) = (bf16(rng.vec(width * HIDDEN)), bf16(rng.vec(width * HIDDEN)));
    let (wkv, wgate) = (weight(&wkv), weight(&wgate));
    let ape = rng.vec(shape.ratio * width);
    let tokens: usize = STEPS.iter().sum();
    let x_all: Vec<f32> = rng.vec(tokens * HIDDEN).iter().map(|v| v / 32.0).collect();
    let mut run = OpRun { shape, launches: 0, entries: 0, entry_half_ulps: 0.0, carry: 0.0 };
    let side = |be: &AscendBackend| {
        let pool = be.alloc_pool(2 * shape.carry_rows(), width, RowFormat::F32).unwrap();
        (
            be.upload_weight(&wkv).unwrap(),
            be.upload_weight(&wgate).unwrap(),
            be.upload(&ape, &[shape.ratio, width]).unwrap(),
            pool,
        )
    };
    let (mut a, mut b) = (side(fused), side(off));
    let mut start = 0;
    for len in STEPS {
        let x = &x_all[start * HIDDEN..(start + len) * HIDDEN];
        let step = |be: &AscendBackend, (wkv, wgate, ape, pool): &mut (_, _, _, _)| {
            let x = be.round_to_bf16(&be.upload(x, &[len, HIDDEN]).unwrap()).unwrap();
            let plan = SeqCompressPlan::lone(be, &shape, start, len).unwrap();
            let s = plan.compressor_step(&shape, &x, wkv, wgate, ape);
            let entries = be.compressor_step(&s, pool, Precision::Bf16).unwrap();
            let entries = entries.map(|e| be.download(&be.round_to_bf16(&e).unwrap()).unwrap());
            let all: Vec<i32> = (0..pool.rows() as i32).collect();
            let carry =
                be.download(&be.pool_read(pool, &be.upload_index(&all, &[all.len()]).unwrap()).unwrap()).unwrap();
            (entries, carry)
        };
        let before = dsv4_backend_ascend::emulator_launches(KERNEL).unwrap();
        let (got, got_carry) = step(fused, &mut a);
        run.launches += dsv4_backend_ascend::emulator_launches(KERNEL).unwrap() - before;
        let (want, want_carry) = step(off, &mut b);
        assert_eq!(
            got.as_ref().map(Vec::len),
            want.as_ref().map(Vec::len),
            "{shape:?}: entries of the step at {start}"
        );
        if let (Some(g), Some(w)) = (got, want) {
            run.entries += w.len() / shape.dim;
            for (g, w) in g.iter().zip(&w) {
                run.entry_half_ulps = run.entry_half_ulps.max(((g - w).abs() / (w.abs() * 2f32.powi(-8))) as f64);
            }
        }
        run.carry = run.carry.max(max_rel_err(&got_carry, &want_carry));
        start += len;
    }
    run
}

/// Logits, kernel vs the same SoC with the kernel off, as max |Δ| / max |logit|: two BF16 ulps
/// of the largest logit (2·2⁻⁷). bf16 logits are BF16 values, and the entries' one-ulp
/// differences move them by one such ulp: measured 7.7e-3 (A3) and 6.4e-3 (950). The model's
/// logits are a weak detector on their own (an HCA window read wrongly moved them to 1.5e-2
/// only): the entries below are the strong one.
pub const VS_OFF: f64 = 2.0 / 128.0;
/// Logits, emulator vs CPU (both bf16), the same bound: measured 7.8e-3 with the kernel, 8.3e-3
/// composing (A2).
pub const VS_CPU: f64 = 2.0 / 128.0;
/// The wide fixture in bf16 against its float64 reference: the `bf16` budget's bound for an
/// output with no top-k upstream (docs/precision.md: "the first layer where it has no top-k",
/// 2e-2), which holds here for the logits because the case has no top-k anywhere. Measured
/// 1.07e-2 with the kernel and without, 1.14e-2 on the CPU.
pub const FIXTURE_BF16: f64 = 2e-2;
/// The wide fixture in `official`, kernel vs off: entries one BF16 ulp apart can round to
/// adjacent e4m3 values in the fp8 KV rows (a step of 2⁻³ of that channel), so the logits move
/// more than in bf16: measured 1.30e-2 (A3); bound four BF16 ulps of the largest logit.
pub const OFFICIAL_VS_OFF: f64 = 4.0 / 128.0;
/// Entries, kernel vs off, in units of 2⁻⁸·|entry|: the kernel rounds each entry once, the
/// composition rounds its f32 pooling once, so the two may land on adjacent BF16 values (one
/// ulp, at most 2⁻⁷·|entry|, i.e. 2 units) and never further. Measured 1.56.
pub const ENTRY_HALF_ULPS: f64 = 2.0;
/// Carry (the raw f32 projections and scores), kernel vs off, relative to its largest value:
/// the same products summed in another order over H = 1024 (first-order bound 1024·2⁻²⁴ of
/// the sum of magnitudes); measured 7.5e-8, bound 2⁻¹⁶.
pub const CARRY: f64 = 1.0 / 65536.0;

/// The kernel was chosen and ran for every compressor at every step (three compressors: the CSA
/// layer's attention and indexer ones, the HCA layer's), and the logits stayed within the bounds.
pub fn judge(r: &CompressorRun) {
    assert!(r.used, "the kernel was not chosen: {}", r.why);
    assert_eq!(r.launches, 3 * STEPS.len() as u64, "launches");
    for op in &r.ops {
        assert_eq!(op.launches, STEPS.len() as u64, "{op:?}: launches");
        let windows = STEPS.iter().sum::<usize>() / op.shape.ratio;
        assert_eq!(op.entries, windows, "{op:?}: entries");
        assert!(op.entry_half_ulps <= ENTRY_HALF_ULPS, "{op:?}: entries, kernel vs off");
        assert!(op.carry <= CARRY, "{op:?}: carry, kernel vs off");
    }
    assert!(r.vs_off <= VS_OFF, "kernel vs off {:.2e}", r.vs_off);
    assert!(r.vs_cpu <= VS_CPU, "vs the CPU {:.2e}", r.vs_cpu);
    // The fixture's prefill: one launch per compressor (CSA attention, its indexer, HCA).
    assert_eq!(r.fixture_launches, 3, "launches in the fixture's prefill");
    assert_eq!(r.official_launches, 3, "launches in the fixture's prefill in official");
    assert!(r.official_vs_off <= OFFICIAL_VS_OFF, "official, kernel vs off {:.2e}", r.official_vs_off);
    judge_fixture(r);
}

/// The wide fixture within [`FIXTURE_BF16`] of its reference with the kernel, without it and on
/// the CPU.
pub fn judge_fixture(r: &CompressorRun) {
    for (what, err) in [
        ("with the kernel", r.fixture_vs_reference),
        ("without it", r.fixture_off_vs_reference),
        ("on the CPU", r.fixture_cpu_vs_reference),
    ] {
        assert!(err <= FIXTURE_BF16, "compressor_dims in bf16 {what}: {err:.2e} from the reference");
    }
}
