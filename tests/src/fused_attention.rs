//! The fixture suite in `bf16` on the Ascend emulator posing as a given SoC, with Huawei's
//! fused attention kernels in use, against the CPU backend's `bf16` run (like against like)
//! and the float64 reference. Shared by the per-SoC test binaries (the SoC is fixed per
//! process).

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::{Backend, Batch, Precision};

use crate::{fixture_cases, load_model, max_rel_err, read_reference};

/// Per fixture: (name, launches of `kernel` during its prefill, ascend-vs-cpu max rel,
/// ascend-vs-reference max rel).
pub fn bf16_fixtures_on(soc: &str, kernel: &str) -> Vec<(String, u64, f64, f64, f64)> {
    crate::use_ascend_emulator();
    // The only test in its binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", soc);
    let ascend = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ascend.soc(), soc);
    for c in ascend.fused_kernels() {
        println!("{soc}: {}: {}", c.name, c.why);
    }
    // The same SoC with only this kernel switched off (the 950 cannot compose everything).
    let composed = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(composed.switch_off_fused(kernel), 1);
    let cpu = CpuBackend::new();
    let mut out = vec![];
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let reference = read_reference(&case);
        let batch = Batch::prefill(&[&reference.input_ids]).unwrap();
        let before = dsv4_backend_ascend::emulator_launches(kernel).unwrap();
        let mut m = load_model(&ascend, &case);
        m.precision = Precision::Bf16;
        let a = ascend.download(&m.forward(&ascend, &batch).unwrap()).unwrap();
        let launched = dsv4_backend_ascend::emulator_launches(kernel).unwrap() - before;
        let mut m = load_model(&composed, &case);
        m.precision = Precision::Bf16;
        let o = composed.download(&m.forward(&composed, &batch).unwrap()).unwrap();
        let mut m = load_model(&cpu, &case);
        m.precision = Precision::Bf16;
        let c = cpu.download(&m.forward(&cpu, &batch).unwrap()).unwrap();
        let (off, like, reference) = (max_rel_err(&a, &o), max_rel_err(&a, &c), max_rel_err(&a, &reference.logits));
        println!(
            "{soc} {name}: {kernel} launches {launched}; bf16 vs {kernel} off: max rel {off:.2e}; vs bf16 cpu {like:.2e}; \
             vs f64 reference {reference:.2e}"
        );
        out.push((name, launched, off, like, reference));
    }
    out
}

/// The fused kernel's share of the difference: the same backend with fused kernels off.
/// Measured 7.3e-3 of max|logit| on `fused_dims` (one BF16 ulp is 7.8e-3 of a value: the
/// kernel's f32 summation order moves a few BF16 roundings by one ulp, which the later layers
/// carry to the logits); a wrong mask, sink or scale gives tens of percent.
pub const FUSED_VS_COMPOSED: f64 = 2e-2;
/// The `bf16` budget's bound on max |Δlogit| / max |logit| against the float64 reference
/// (tests/precision.rs).
pub const BF16_MAX_REL: f64 = 1.0;

/// The kernel ran exactly in the cases `launched_in` (and on each of their attention layers),
/// changed the logits by at most [`FUSED_VS_COMPOSED`] against the composition, and every
/// case stays within the bf16 budget against its reference.
pub fn judge(runs: &[(String, u64, f64, f64, f64)], launched_in: &[&str], layers: u64) {
    let ran: Vec<&str> = runs.iter().filter(|r| r.1 > 0).map(|r| r.0.as_str()).collect();
    assert_eq!(ran, launched_in, "cases where the kernel ran");
    for (name, launched, off, _, reference) in runs {
        if launched_in.contains(&name.as_str()) {
            assert!(*launched >= layers, "{name}: {launched} launches for {layers} attention layers");
        }
        assert!(*off <= FUSED_VS_COMPOSED, "{name}: fused vs composed {off:.2e}");
        assert!(*reference <= BF16_MAX_REL, "{name}: vs the f64 reference {reference:.2e}");
    }
}
