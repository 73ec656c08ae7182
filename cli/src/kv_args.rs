//! `--precision`, `--kv-dtype`, `--kv-cache-memory` and `--weight-memory`: the run's numerics,
//! how the paged decoding state is stored and sized, and where the weights live (flattened into
//! every command that runs the model).
//!
//! `--kv-cache-memory` takes bytes with an optional unit (`8GiB`, `512MiB`, `2G`, `1000000`) or
//! a fraction in (0, 1] of the memory free once the weights are loaded (`0.5`): on the CPU backend
//! `MemAvailable` from `/proc/meminfo` capped by the memory cgroup's headroom, on a device the free
//! device memory its backend reports.
//! Without the flag the pool is sized exactly for the run (or, for `chat`, for the model's whole
//! context, capped at half the free memory).

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use dsv4_core::kv::{human_bytes, KvConfig, KvDtype};
use dsv4_core::{Backend, ModelConfig, Precision};

/// The numerics and decoding-state flags, flattened into every command that runs the model.
#[derive(clap::Args, Clone, Debug)]
pub struct KvArgs {
    /// Activation precision: f32 (every activation f32, the conformance reference); bf16
    /// (what a production deployment computes: BF16 residual stream and sub-layer inputs and
    /// outputs, f32 accumulation, f32 norms, router and mHC); official (bf16 plus what DeepSeek's
    /// own inference computes on top: e4m3 inputs of FP8/FP4 matrices, the routing weight before
    /// w2, fp8 KV rows, Hadamard + FP4 indexer queries and keys, BF16 index scores, the query
    /// norm in BF16 arithmetic); official-f32 (the quantisation steps on f32 activations). See docs/precision.md for the rounding points and the accuracy budgets.
    /// Weights are used in their stored form in every mode.
    #[arg(long, value_name = "f32|bf16|official|official-f32", default_value = "f32")]
    pub precision: Precision,
    /// Row format of the decoding state: f32 (the conformance reference), bf16, or fp8 (the
    /// official inference's KV numerics for attention rows: e4m3 with one power-of-two scale per
    /// 64 channels, rotary channels bf16; 584 bytes per V4 row instead of 2048; indexer keys bf16).
    /// Default: the smallest format that holds the precision's rows exactly: f32 with --precision
    /// f32; bf16 with bf16 (its rows are BF16 values already); fp8 with official / official-f32
    /// (their KV rows are quantised as fp8 rows anyway), or bf16 on a backend without fp8 rows
    /// (Ascend A2/A3, or a 950 whose FP8 casts are switched off: `dsv4 devices`).
    #[arg(long = "kv-dtype", value_name = "f32|bf16|fp8")]
    pub kv_dtype_arg: Option<KvDtype>,
    /// Memory for the decoding state: bytes with an optional unit (8GiB, 512MiB, 2G, 1000000;
    /// K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000), or a
    /// fraction in (0, 1] of the memory free once the weights are loaded (0.5). Default: exactly
    /// what the run needs (chat: the model's whole context, at most half the free memory; serve:
    /// what --max-num-seqs sequences of --max-model-len tokens need, at most half of what the
    /// weights leave, per rank with --devices, from the memory plan printed at start-up). On
    /// Ascend and CUDA a run over several devices (--devices) needs a size per device, not a
    /// fraction: every rank's pool must be the same, whatever its device has free (chat and
    /// serve need it given there).
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub kv_cache_memory: Option<MemorySize>,
    /// Where the checkpoint's bytes live while the model runs (the CPU backend computes on
    /// them in place; device backends copy them to the device).
    #[arg(long, value_enum, value_name = "auto|resident|mapped", default_value = "auto")]
    pub weight_memory: crate::load::WeightMemoryArg,
}

/// A `--kv-cache-memory` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemorySize {
    Bytes(usize),
    /// A share of the free memory, in (0, 1].
    Fraction(f64),
}

impl FromStr for MemorySize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        let bad = || {
            format!(
                "`{s}` is not a memory size: give bytes with an optional unit (8GiB, 512MiB, 2G, 1000000) or a \
                 fraction in (0, 1] of the free memory (0.5)"
            )
        };
        let value: f64 = num.parse().map_err(|_| bad())?;
        if !value.is_finite() {
            return Err(bad());
        }
        if unit.is_empty() {
            if value <= 0.0 {
                return Err(format!("--kv-cache-memory must be positive, not `{s}`"));
            }
            if value <= 1.0 {
                return Ok(MemorySize::Fraction(value));
            }
            if num.contains('.') {
                return Err(format!(
                    "`{s}`: a fraction of the free memory must be in (0, 1]; a size in bytes must be a whole number \
                     or carry a unit (e.g. 1.5GiB)"
                ));
            }
            return num.parse::<usize>().map(MemorySize::Bytes).map_err(|_| bad());
        }
        let scale: f64 = match unit.to_ascii_lowercase().as_str() {
            "b" => 1.0,
            "k" | "kib" => 1024f64,
            "m" | "mib" => 1024f64.powi(2),
            "g" | "gib" => 1024f64.powi(3),
            "t" | "tib" => 1024f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            _ => return Err(bad()),
        };
        let bytes = (value * scale).round();
        if bytes < 1.0 || bytes >= usize::MAX as f64 {
            return Err(format!("--kv-cache-memory `{s}` is out of range"));
        }
        Ok(MemorySize::Bytes(bytes as usize))
    }
}

impl MemorySize {
    /// Bytes this stands for, given the free memory (asked only for a fraction).
    pub fn resolve(self, free: impl FnOnce() -> Result<usize>) -> Result<usize> {
        match self {
            MemorySize::Bytes(b) => Ok(b),
            MemorySize::Fraction(f) => Ok((free()? as f64 * f) as usize),
        }
    }
}

/// Memory free for the decoding state on `be` now: host `MemAvailable` (capped by the memory
/// cgroup's headroom) for the CPU backend, free device memory otherwise.
pub fn free_memory<B: Backend>(be: &B) -> Result<usize> {
    be.free_memory().with_context(|| {
        format!(
            "the {} backend does not report its free memory; give --kv-cache-memory as a size (e.g. 8GiB)",
            be.name()
        )
    })
}

/// Bytes [`KvConfig::for_budget`] needs to hold one sequence of `tokens` tokens in steps of up
/// to `max_step`: its windows and compressed blocks, or (when the budget's window share, an
/// eighth, is the larger) enough that seven eighths still hold the compressed blocks.
pub fn budget_for_tokens(cfg: &ModelConfig, dtype: KvDtype, tokens: usize, max_step: usize) -> usize {
    dsv4_core::parallel::plan::pool_bytes_for(cfg, dtype, (1, 1, tokens), max_step)
}

/// Why `be` does not keep KV rows of `dtype` (fp8 off the Ascend 950), in the backend's own
/// words: `--kv-dtype fp8: backend ...: ...; use ...`; None when it keeps them. Every command
/// refuses such a pool with this message before it plans or loads anything.
pub fn unkept_rows<B: Backend>(be: &B, dtype: KvDtype) -> Option<String> {
    let format = dtype.attention_format(0);
    if be.supports_row_format(format) {
        return None;
    }
    // A one-row pool of that format is refused with the reason.
    let why = match be.alloc_pool(1, 64, format) {
        Err(e) => e.to_string(),
        Ok(_) => format!("backend {} does not keep {dtype} KV rows", be.name()),
    };
    Some(format!("--kv-dtype {dtype}: {why}"))
}

impl KvArgs {
    /// The decoding state's row format on `be`: `--kv-dtype`, or the precision's default there
    /// ([`Precision::default_kv_dtype`]).
    pub fn kv_dtype<B: Backend + ?Sized>(&self, be: &B) -> KvDtype {
        self.kv_dtype_arg.unwrap_or_else(|| self.precision.default_kv_dtype(be))
    }

    /// The budget in bytes when `--kv-cache-memory` is given; first, the backend's refusal of
    /// the row format, if it does not keep it (fp8 off the Ascend 950), so that no pool is
    /// described as if it were taken.
    fn budget<B: Backend>(&self, be: &B) -> Result<Option<usize>> {
        if let Some(refusal) = unkept_rows(be, self.kv_dtype(be)) {
            bail!(refusal);
        }
        self.kv_cache_memory.map(|m| m.resolve(|| free_memory(be))).transpose()
    }

    /// The pool for a run of one sequence of up to `tokens` tokens fed in steps of up to
    /// `max_step`: exactly that without `--kv-cache-memory`, else what the budget holds.
    pub fn config_for_run<B: Backend>(
        &self,
        be: &B,
        cfg: &ModelConfig,
        tokens: usize,
        max_step: usize,
    ) -> Result<KvConfig> {
        let config = match self.budget(be)? {
            None => KvConfig::for_sequences(cfg, self.kv_dtype(be), 1, tokens, max_step),
            Some(bytes) => KvConfig::for_budget(cfg, self.kv_dtype(be), bytes, 1, max_step)?,
        };
        // Refuse up front rather than fail midway through the run.
        if let Some(cap) = config.token_capacity(cfg).filter(|&cap| cap < tokens.min(cfg.max_position_embeddings)) {
            anyhow::bail!(
                "the KV cache ({}) holds {cap} tokens but this run needs {tokens}; raise --kv-cache-memory (or, \
                 for generate, lower --max-new-tokens)",
                human_bytes(config.total_bytes(cfg))
            );
        }
        Ok(config)
    }

    /// The pool of an open-ended session (chat): the budget when given, else what the model's
    /// whole context needs, at most half the free memory.
    pub fn config_open_ended<B: Backend>(&self, be: &B, cfg: &ModelConfig, max_step: usize) -> Result<KvConfig> {
        let bytes = match self.budget(be)? {
            Some(b) => b,
            None => {
                let need = budget_for_tokens(cfg, self.kv_dtype(be), cfg.max_position_embeddings, max_step);
                match free_memory(be) {
                    Ok(free) => need.min(free / 2),
                    Err(e) => {
                        eprintln!("kv cache: {e:#}; sizing for the whole context ({})", human_bytes(need));
                        need
                    }
                }
            }
        };
        Ok(KvConfig::for_budget(cfg, self.kv_dtype(be), bytes, 1, max_step)?)
    }
}

/// `kv cache: fp8, 8192 blocks of 128 tokens + 6 window blocks (4.2 GiB), up to 1048576 tokens`.
pub fn describe(cfg: &ModelConfig, kv: &KvConfig) -> String {
    let capacity = match kv.token_capacity(cfg) {
        Some(n) if n >= cfg.max_position_embeddings => {
            format!("the model's whole context ({} tokens)", cfg.max_position_embeddings)
        }
        Some(n) => format!("up to {n} tokens"),
        None => "any length (sliding-window layers only)".to_string(),
    };
    use dsv4_core::parallel::plan::plural;
    format!(
        "kv cache: {}, {} of {} tokens + {} ({}), {capacity}",
        kv.dtype,
        plural(kv.compressed_blocks, "block"),
        kv.block_tokens,
        plural(kv.window_blocks, "window block"),
        human_bytes(kv.total_bytes(cfg))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MemorySize, String> {
        s.parse()
    }

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(parse("8GiB"), Ok(MemorySize::Bytes(8 << 30)));
        assert_eq!(parse("512MiB"), Ok(MemorySize::Bytes(512 << 20)));
        assert_eq!(parse("2G"), Ok(MemorySize::Bytes(2 << 30)));
        assert_eq!(parse("2g"), Ok(MemorySize::Bytes(2 << 30)));
        assert_eq!(parse("2GB"), Ok(MemorySize::Bytes(2_000_000_000)));
        assert_eq!(parse("1.5KiB"), Ok(MemorySize::Bytes(1536)));
        assert_eq!(parse("1000000"), Ok(MemorySize::Bytes(1_000_000)));
        assert_eq!(parse(" 64 KiB "), Ok(MemorySize::Bytes(65536)));
        assert_eq!(parse("100B"), Ok(MemorySize::Bytes(100)));
    }

    #[test]
    fn fractions_of_free_memory() {
        assert_eq!(parse("0.5"), Ok(MemorySize::Fraction(0.5)));
        assert_eq!(parse("1"), Ok(MemorySize::Fraction(1.0)));
        assert_eq!(parse(".25"), Ok(MemorySize::Fraction(0.25)));
        assert_eq!(MemorySize::Fraction(0.5).resolve(|| Ok(1000)).unwrap(), 500);
        assert_eq!(MemorySize::Bytes(7).resolve(|| panic!("not asked")).unwrap(), 7);
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        for s in ["", "abc", "8 parsecs", "GiB", "1.2.3", "-1", "inf"] {
            let e = parse(s).unwrap_err();
            assert!(e.contains("not a memory size"), "{s}: {e}");
        }
        assert!(parse("0").unwrap_err().contains("positive"));
        assert!(parse("1.5").unwrap_err().contains("(0, 1]"));
        assert!(parse("0.1B").unwrap_err().contains("out of range"));
    }

    #[test]
    fn meminfo() {
        use dsv4_core::kv::mem_available;
        let text = "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   65536000 kB\n";
        assert_eq!(mem_available(text), Some(65_536_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert!(dsv4_backend_cpu::CpuBackend::new().free_memory().is_some_and(|b| b > 0));
    }

    fn tiny() -> ModelConfig {
        dsv4_core::builtin::tiny().unwrap().0
    }

    #[test]
    fn budget_for_tokens_holds_them() {
        let cfg = tiny();
        for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8] {
            for tokens in [1, 100, 128, 129, 1000] {
                let bytes = budget_for_tokens(&cfg, dtype, tokens, 64);
                let kv = KvConfig::for_budget(&cfg, dtype, bytes, 1, 64).unwrap();
                assert!(kv.token_capacity(&cfg).unwrap() >= tokens, "{dtype} {tokens}");
                assert!(kv.total_bytes(&cfg) <= bytes);
            }
        }
    }

    #[test]
    fn a_budget_too_small_is_an_input_error() {
        let cfg = tiny();
        let args = KvArgs {
            precision: Precision::F32,
            kv_dtype_arg: Some(KvDtype::Fp8),
            kv_cache_memory: Some(MemorySize::Bytes(1000)),
            weight_memory: Default::default(),
        };
        let e = args.config_for_run(&dsv4_backend_cpu::CpuBackend::new(), &cfg, 100, 16).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("cannot hold the sliding windows") && e.contains("--kv-cache-memory"), "{e}");
    }

    #[test]
    fn exact_sizing_and_the_start_up_line() {
        let cfg = tiny();
        let args = KvArgs {
            precision: Precision::F32,
            kv_dtype_arg: Some(KvDtype::Bf16),
            kv_cache_memory: None,
            weight_memory: Default::default(),
        };
        let kv = args.config_for_run(&dsv4_backend_cpu::CpuBackend::new(), &cfg, 300, 64).unwrap();
        assert_eq!(kv, KvConfig::for_sequences(&cfg, KvDtype::Bf16, 1, 300, 64));
        let line = describe(&cfg, &kv);
        assert!(line
            .starts_with(&format!("kv cache: bf16, {} blocks of {} tokens + ", kv.compressed_blocks, kv.block_tokens)));
        assert!(line.ends_with(&format!("up to {} tokens", kv.token_capacity(&cfg).unwrap())), "{line}");
        // One block is singular (`serve --max-num-seqs 1 --kv-cache-memory 487KiB` on tiny).
        let one = KvConfig { compressed_blocks: 1, window_blocks: 1, ..kv };
        let line = describe(&cfg, &one);
        assert!(line.starts_with("kv cache: bf16, 1 block of 64 tokens + 1 window block ("), "{line}");
    }
}
