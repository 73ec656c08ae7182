//! The fixture suite in `bf16` on the Ascend emulator posing as a given SoC, with one of
//! Huawei's fused attention kernels in use, judged against the same SoC with only that kernel
//! switched off (everything else equal). Shared by the per-SoC test binaries (the SoC is fixed
//! per process).
//!
//! A BF16 kernel cannot equal the composition bit for bit: `aclnnSparseFlashMla` rounds its
//! probabilities to BF16 before `P·V`, and any summation order moves a few BF16 roundings by
//! one ulp. On these random-weight models such a difference flips a router or indexer top-k
//! choice somewhere downstream, after which the logits differ by tens of percent (as CPU and
//! emulator do in bf16, docs/precision.md). So the kernel is judged where nothing was selected
//! yet: the first layer's output (a sliding-window, hash-routed layer in `fused_dims`), and
//! the indexer by its picks.

use dsv4_backend_ascend::{AscendBackend, FusedPolicy};
use dsv4_core::backend::DeviceTensor;
use dsv4_core::config::{AttentionKind, RoutingKind};
use dsv4_core::model::Trace;
use dsv4_core::{Backend, Batch, Precision};

use crate::{fixture_cases, load_model, max_rel_err, read_reference};

/// One fixture's bf16 prefill with the kernel and without it.
pub struct FusedRun {
    pub name: String,
    /// Launches of the kernel during the prefill.
    pub launches: u64,
    /// Whether the first layer has no top-k (sliding window, hash routing).
    pub first_layer_unselected: bool,
    /// max |Δ| / max |ref| of the first layer's residual streams, kernel vs composition.
    pub first_layer: f64,
    /// Whether every CSA layer's indexer picked the same key set per query in both runs.
    pub same_picks: bool,
    /// Logits, kernel vs composition.
    pub logits: f64,
    /// Logits (kernel) vs the float64 reference.
    pub vs_reference: f64,
}

fn open(kernel_off: Option<&str>, also_off: &[&str]) -> AscendBackend {
    let be = dsv4_backend_ascend::open_with(0, FusedPolicy::All).unwrap_or_else(|e| panic!("{e}"));
    for k in also_off.iter().copied().chain(kernel_off) {
        assert!(be.switch_off_fused(k) >= 1, "no kernel named {k}");
    }
    be
}

fn sorted_rows(v: Vec<i32>, k: usize) -> Vec<Vec<i32>> {
    v.chunks(k.max(1))
        .map(|r| {
            let mut r = r.to_vec();
            r.sort_unstable();
            r
        })
        .collect()
}

/// Every f32-reference fixture in bf16 on the emulator posing as `soc`, with `kernel` and with
/// it switched off (the kernels in `also_off` off in both).
pub fn bf16_fixtures_on(soc: &str, kernel: &str, also_off: &[&str]) -> Vec<FusedRun> {
    crate::use_ascend_emulator();
    // The only test in its binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", soc);
    let (fused, composed) = (open(None, also_off), open(Some(kernel), also_off));
    assert_eq!(fused.soc(), soc);
    for c in fused.fused_kernels() {
        println!("{soc}: {}: {}", c.name, c.why);
    }
    let mut out = vec![];
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let reference = read_reference(&case);
        let batch = Batch::prefill(&[&reference.input_ids]).unwrap();
        let run = |be: &AscendBackend| {
            let mut m = load_model(be, &case);
            m.precision = Precision::Bf16;
            let mut trace = Trace::default();
            let logits = be.download(&m.forward_traced(be, &batch, Some(&mut trace)).unwrap()).unwrap();
            let first = be.download(&trace.layers[0]).unwrap();
            let picks: Vec<Option<Vec<Vec<i32>>>> = trace
                .indexer_picks
                .iter()
                .map(|p| p.as_ref().map(|p| sorted_rows(be.download_index(p).unwrap(), p.shape()[1])))
                .collect();
            let unselected = m.cfg.attention[0] == AttentionKind::Sliding && m.cfg.routing[0] == RoutingKind::Hash;
            (logits, first, picks, unselected)
        };
        let before = dsv4_backend_ascend::emulator_launches(kernel).unwrap();
        let (a, a_first, a_picks, unselected) = run(&fused);
        let launches = dsv4_backend_ascend::emulator_launches(kernel).unwrap() - before;
        let (o, o_first, o_picks, _) = run(&composed);
        let r = FusedRun {
            name,
            launches,
            first_layer_unselected: unselected,
            first_layer: max_rel_err(&a_first, &o_first),
            same_picks: a_picks == o_picks,
            logits: max_rel_err(&a, &o),
            vs_reference: max_rel_err(&a, &reference.logits),
        };
        println!(
            "{soc} {}: {kernel} launches {}; kernel vs off: first layer {:.2e}, same indexer picks {}, logits {:.2e}; \
             logits vs the f64 reference {:.2e}",
            r.name, r.launches, r.first_layer, r.same_picks, r.logits, r.vs_reference
        );
        out.push(r);
    }
    out
}

/// The first layer, kernel vs composition: a few BF16 ulps (7.8e-3 of a value each) where the
/// kernel's BF16 probabilities and summation order move the attention output's roundings,
/// carried through the output projections and the layer's MoE. Measured 1.0e-2 on `fused_dims`
/// with `aclnnSparseFlashMla`; a wrong mask, sink or scale moves it by tens of percent.
pub const FIRST_LAYER: f64 = 3e-2;
/// The `bf16` budget's bound on max |Δlogit| / max |logit| against the float64 reference
/// (tests/precision.rs).
pub const BF16_MAX_REL: f64 = 1.0;

/// The kernel ran exactly in the cases `launched_in`, at least `per_case` times each; where it
/// ran, the first layer (unselected) stayed within [`FIRST_LAYER`] of the composition and, with
/// `same_picks`, every indexer picked the same sets; where it did not run nothing changed; every
/// case stays within the bf16 budget against its reference.
pub fn judge(runs: &[FusedRun], launched_in: &[&str], per_case: u64, same_picks: bool) {
    let ran: Vec<&str> = runs.iter().filter(|r| r.launches > 0).map(|r| r.name.as_str()).collect();
    assert_eq!(ran, launched_in, "cases where the kernel ran");
    for r in runs {
        let name = &r.name;
        if r.launches == 0 {
            assert_eq!(r.logits, 0.0, "{name}: changed without the kernel running");
            continue;
        }
        assert!(r.launches >= per_case, "{name}: {} launches, expected at least {per_case}", r.launches);
        assert!(r.first_layer_unselected, "{name}: the first layer selects, so it cannot judge the kernel");
        assert!(r.first_layer <= FIRST_LAYER, "{name}: first layer, kernel vs composition {:.2e}", r.first_layer);
        if same_picks {
            assert!(r.same_picks, "{name}: the indexer picked other keys");
        }
        assert!(r.vs_reference <= BF16_MAX_REL, "{name}: vs the f64 reference {:.2e}", r.vs_reference);
    }
}
