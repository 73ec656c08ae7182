//! fp8 KV rows (`--kv-dtype fp8`) on the emulator posing as an Ascend 950
//! (`DSV4_ASCEND_EMU_SOC`): the pool keeps the rows' bytes and decodes them on the device
//! (`backend-ascend/src/pool.rs`). A separate test binary, because the SoC is fixed for the
//! process. Emulator-verified, not hardware-verified.
//!
//! * Rows read back bit for bit as `RowFormat::round_trip` gives them (partial scale blocks, an
//!   odd number of codes, rope only, V4's row), `-1` slots as zeros, writes in place.
//! * Sparse attention over an fp8 pool matches the f64 reference over the decoded rows.
//! * The `kv_fp8` fixtures (fp8 state, f32 precision) and the `official_qsim*` fixtures
//!   (official-f32 with an fp8 state) match their references within 1e-4, prefill and decode;
//!   under `official` an fp8 state gives the bf16 state's logits bit for bit.
//! * With the native low-bit forms switched off (`DSV4_ASCEND_FUSED=off`), fp8 pools are
//!   refused, naming the switch and the way out.

use dsv4_core::backend::{Backend, RowFormat};
use dsv4_core::kv::KvDtype;
use dsv4_core::{Batch, Precision};

#[test]
fn fp8_kv_rows_on_a_950() {
    dsv4_tests::use_ascend_emulator();
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("DSV4_ASCEND_EMU_SOC", "Ascend950PR_9599");
    let be = dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"));
    assert!(be.supports_row_format(RowFormat::Fp8 { rope: 64 }));
    dsv4_tests::backend_suite::pool_fp8_rows_round_trip_exactly(&be);
    dsv4_tests::backend_suite::sparse_attention_reads_pools_in_every_format(&be);
    dsv4_tests::fp8_cases::check_fp8_state_cases(&be);
    dsv4_tests::fp8_cases::check_official_cases(&be, KvDtype::Fp8);

    // `official` (BF16 activations) quantises KV rows before storing them, so an fp8 state
    // gives the logits a bf16 state gives, bit for bit (every fp8 value is a BF16 value).
    for case in dsv4_tests::official_cases() {
        let mut model = dsv4_tests::load_model(&be, &case);
        model.precision = Precision::Official;
        let ids = dsv4_tests::read_reference(&case).input_ids;
        let batch = Batch::prefill(&[&ids]).unwrap();
        let run = |kv| be.download(&model.forward_with(&be, &batch, kv, None).unwrap()).unwrap();
        let (fp8, bf16) = (run(KvDtype::Fp8), run(KvDtype::Bf16));
        let same = fp8.iter().zip(&bf16).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{}: max rel {:.2e}", case.display(), dsv4_tests::max_rel_err(&fp8, &bf16));
    }

    let off = dsv4_backend_ascend::open_with(0, dsv4_backend_ascend::FusedPolicy::Off).unwrap();
    assert!(!off.supports_row_format(RowFormat::Fp8 { rope: 64 }));
    let e = off.alloc_pool(4, 512, RowFormat::Fp8 { rope: 64 }).err().expect("refused").to_string();
    for part in ["fp8 KV rows", "FLOAT8_E4M3FN", "DSV4_ASCEND_FUSED=off", "--kv-dtype bf16"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
}
