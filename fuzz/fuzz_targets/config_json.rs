//! `config.json` parsing (both spellings) and validation on arbitrary text. Any panic
//! (including an arithmetic overflow, which fuzz builds check) is a finding.

#![no_main]

use dsv4_core::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_json_str(text) {
        let _ = cfg.validate();
        std::hint::black_box(cfg.hc_mix_dim());
    }
});
