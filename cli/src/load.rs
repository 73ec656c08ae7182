//! Finding a model (directory or built-in) and loading it onto a backend with a progress bar.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsv4_core::kv::human_bytes;
use dsv4_core::parallel::RankContext;
use dsv4_core::{builtin, Backend, Checkpoint, Model, ModelConfig, Precision, WeightMemory};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `--weight-memory`: where the checkpoint's bytes live while the model runs
/// ([`WeightMemory`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightMemoryArg {
    /// resident for the CPU backend's generate, chat, serve and bench when the checkpoint takes
    /// at most 3/4 of the available memory; mapped otherwise
    #[default]
    Auto,
    /// read into memory on transparent huge pages: CPU decode about 15-20% faster; the process
    /// holds the whole checkpoint
    Resident,
    /// memory-mapped from the files: instant load, page cache shared between processes, runs
    /// a checkpoint larger than the memory
    Mapped,
}

impl WeightMemoryArg {
    /// The choice for a command that reads each weight about once (`logits`, `check`):
    /// `auto` maps, since a resident copy only pays off over many decode steps; an explicit
    /// choice stays.
    pub fn one_pass(self) -> Self {
        match self {
            WeightMemoryArg::Auto => WeightMemoryArg::Mapped,
            other => other,
        }
    }
}

/// The share of the available memory a checkpoint may take to be made resident by `auto`:
/// the rest is for the decoding state and the activations (`--kv-cache-memory` fractions are
/// of what is left once the weights are in).
const AUTO_RESIDENT_SHARE: f64 = 0.75;

/// What `arg` means for a checkpoint of `bytes` bytes (its files) on a backend that computes
/// on the host's copy of the weights (`host`: the CPU backend) with `available` bytes of
/// memory available (None: unknown), and a note to print when `auto` leaves a CPU run
/// mapped. Device backends copy the weights to the device, so `auto` maps for them.
pub fn resolve_weight_memory(
    arg: WeightMemoryArg,
    host: bool,
    bytes: u64,
    available: Option<usize>,
) -> (WeightMemory, Option<String>) {
    match arg {
        WeightMemoryArg::Resident => (WeightMemory::Resident, None),
        WeightMemoryArg::Mapped => (WeightMemory::Mapped, None),
        WeightMemoryArg::Auto if !host => (WeightMemory::Mapped, None),
        WeightMemoryArg::Auto => match available {
            Some(a) if bytes as f64 <= a as f64 * AUTO_RESIDENT_SHARE => (WeightMemory::Resident, None),
            Some(a) => (
                WeightMemory::Mapped,
                Some(format!(
                    "note: the weights stay memory-mapped from the files ({} is more than 3/4 of the {} of memory \
                     available to this process), which makes CPU decode slower; --weight-memory resident reads them \
                     into memory anyway",
                    human_bytes(bytes as usize),
                    human_bytes(a)
                )),
            ),
            // No `/proc/meminfo` (not Linux): no transparent huge pages to gain either.
            None => (WeightMemory::Mapped, None),
        },
    }
}

/// The checkpoint of `dir` (already opened mapped as `mapped`) held as `memory` says: `mapped`
/// itself, or the files read again into memory with a progress bar on stderr once reading has
/// taken more than a second.
fn with_memory(dir: &Path, mapped: Checkpoint, memory: WeightMemory) -> Result<Checkpoint> {
    if memory == WeightMemory::Mapped {
        return Ok(mapped);
    }
    drop(mapped);
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "reading weights into memory {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}) [{elapsed_precise}]",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let mut shown = false;
    let ckpt = Checkpoint::open_with(dir, memory, &mut |done, total| {
        if !shown && start.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("reading the checkpoint in {} into memory", dir.display()))?;
    bar.finish_and_clear();
    Ok(ckpt)
}

/// The config and checkpoint named by `--model`.
pub fn open(spec: &str) -> Result<(ModelConfig, Checkpoint)> {
    if let Some(model) = builtin::by_name(spec) {
        return Ok(model?);
    }
    if let Some(other) = spec.strip_prefix("builtin:") {
        anyhow::bail!("unknown built-in model `{other}` (available: {})", builtin::NAMES.join(", "));
    }
    let dir = Path::new(spec);
    let cfg = config_from_dir(dir)?;
    let ckpt = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    Ok((cfg, ckpt))
}

/// `dir`'s config.json; a warning on stderr names the weight-shape fields it lacks (their
/// defaults only fit V4-Flash, so a load error usually follows).
pub fn config_from_dir(dir: &Path) -> Result<ModelConfig> {
    let cfg = ModelConfig::from_dir(dir)?;
    if let Some(note) = cfg.assumed_defaults_note() {
        eprintln!("warning: {note} (in {})", dir.join("config.json").display());
    }
    Ok(cfg)
}

/// Loads onto `be`, to run in `precision`, with the checkpoint's bytes held as `memory`
/// resolves to ([`resolve_weight_memory`]); a progress bar appears on stderr once loading has
/// taken more than a second.
pub fn load_model<B: Backend>(be: &B, spec: &str, precision: Precision, memory: WeightMemoryArg) -> Result<Model<B>> {
    Ok(load_model_with_memory(be, spec, precision, memory)?.0)
}

/// [`load_model`], also returning where the checkpoint's bytes ended up (None for a built-in
/// model, which is generated in memory).
pub fn load_model_with_memory<B: Backend>(
    be: &B,
    spec: &str,
    precision: Precision,
    memory: WeightMemoryArg,
) -> Result<(Model<B>, Option<WeightMemory>)> {
    let (cfg, ckpt, held) = open_with_memory(be, spec, memory)?;
    let model = load_opened(be, cfg, &ckpt, spec, precision, RankContext::single())?;
    Ok((model, held))
}

/// The config and checkpoint named by `--model`, the checkpoint's bytes held as `memory`
/// resolves to for `be` ([`resolve_weight_memory`]); also where they ended up (None for a
/// built-in model). Ranks of one process share what this returns.
pub fn open_with_memory<B: Backend>(
    be: &B,
    spec: &str,
    memory: WeightMemoryArg,
) -> Result<(ModelConfig, Checkpoint, Option<WeightMemory>)> {
    let (cfg, ckpt) = open(spec)?;
    let (ckpt, held) = hold(be, ckpt, memory)?;
    Ok((cfg, ckpt, held))
}

/// `ckpt`, as [`open`] opened it (memory-mapped), held as `memory` resolves to for `be`
/// ([`resolve_weight_memory`]): itself when mapped, else its files read into memory; also where
/// its bytes ended up (None for a built-in model).
pub fn hold<B: Backend>(
    be: &B,
    ckpt: Checkpoint,
    memory: WeightMemoryArg,
) -> Result<(Checkpoint, Option<WeightMemory>)> {
    let Some(dir) = ckpt.dir.clone() else { return Ok((ckpt, None)) };
    let host = be.name() == "cpu";
    // Mapped as asked: the files are not looked at again.
    let bytes = if memory == WeightMemoryArg::Mapped { 0 } else { ckpt.file_bytes()? };
    let asked = memory;
    let (memory, note) = resolve_weight_memory(asked, host, bytes, if host { be.free_memory() } else { None });
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let ckpt = with_memory(&dir, ckpt, memory)?;
    if memory == WeightMemory::Resident {
        let why = if asked == WeightMemoryArg::Auto { "auto: it fits the available memory" } else { "asked" };
        eprintln!("weights: {} read into memory (--weight-memory resident, {why})", human_bytes(bytes as usize));
    }
    Ok((ckpt, Some(memory)))
}

/// Loads an opened checkpoint onto `be` (the part `rank` holds), to run in `precision`; a
/// progress bar appears on stderr once loading has taken more than a second (rank 0 only).
pub fn load_opened<B: Backend>(
    be: &B,
    cfg: ModelConfig,
    ckpt: &Checkpoint,
    spec: &str,
    precision: Precision,
    rank: RankContext<B>,
) -> Result<Model<B>> {
    let quiet = rank.layout.rank != 0;
    let bar = ProgressBar::with_draw_target(Some(ckpt.len() as u64), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40} {pos}/{len} tensors, {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut shown = false;
    let progress = &mut |done, _total, bytes| {
        if !quiet && !shown && start.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_position(done as u64);
        bar.set_message(format!("{:.1} MB", bytes as f64 / 1e6));
    };
    let model = if rank.layout.is_single() {
        Model::load(be, cfg, ckpt, progress)
    } else {
        Model::load_rank(be, cfg, ckpt, progress, rank)
    }
    .with_context(|| format!("loading model `{spec}`"))?;
    bar.finish_and_clear();
    let mut model = model;
    model.precision = precision;
    static SAID: std::sync::Once = std::sync::Once::new();
    if precision != Precision::F32 && !quiet {
        SAID.call_once(|| {
            eprintln!("precision: {precision} activations (rounding points and accuracy budget: docs/precision.md)");
            let (linears, low_bit) = model.low_bit_linears;
            if precision.simulates_quant() && low_bit == 0 {
                eprintln!(
                    "precision: this checkpoint stores none of its {linears} projection matrices FP8/FP4, so no input \
                     gets the official e4m3 quantisation (which applies to FP8/FP4 matrices only); the KV, indexer and \
                     expert-order steps still apply"
                );
            } else if precision.simulates_quant() && low_bit < linears {
                eprintln!(
                    "precision: {low_bit} of this checkpoint's {linears} projection matrices are stored FP8/FP4; only \
                     their inputs get the official e4m3 quantisation"
                );
            }
        });
    }
    Ok(model)
}

/// This process's anonymous memory on transparent huge pages (`AnonHugePages` of
/// `/proc/self/smaps_rollup`), in bytes; None where that file does not exist (not Linux).
pub fn anon_huge_page_bytes() -> Option<usize> {
    dsv4_core::kv::proc_bytes_field(&std::fs::read_to_string("/proc/self/smaps_rollup").ok()?, "AnonHugePages")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn auto_makes_the_cpu_backend_resident_when_the_checkpoint_fits() {
        let auto = WeightMemoryArg::Auto;
        // 15 GiB of files, 20 GiB available: exactly 3/4.
        assert_eq!(resolve_weight_memory(auto, true, 15 * GIB as u64, Some(20 * GIB)), (WeightMemory::Resident, None));
        let (memory, note) = resolve_weight_memory(auto, true, 15 * GIB as u64 + 1, Some(20 * GIB));
        assert_eq!(memory, WeightMemory::Mapped);
        let note = note.expect("a CPU run left mapped says so");
        assert!(note.contains("--weight-memory resident") && note.contains("20.00 GiB"), "{note}");
        // Unknown memory (not Linux) and device backends: mapped, silently.
        assert_eq!(resolve_weight_memory(auto, true, 1, None), (WeightMemory::Mapped, None));
        assert_eq!(resolve_weight_memory(auto, false, 1, Some(20 * GIB)), (WeightMemory::Mapped, None));
    }

    #[test]
    fn an_explicit_choice_is_kept() {
        for host in [true, false] {
            for available in [None, Some(1), Some(100 * GIB)] {
                let r = resolve_weight_memory(WeightMemoryArg::Resident, host, 50 * GIB as u64, available);
                assert_eq!(r, (WeightMemory::Resident, None));
                let m = resolve_weight_memory(WeightMemoryArg::Mapped, host, 1, available);
                assert_eq!(m, (WeightMemory::Mapped, None));
            }
        }
    }

    #[test]
    fn one_pass_commands_map_under_auto_only() {
        assert_eq!(WeightMemoryArg::Auto.one_pass(), WeightMemoryArg::Mapped);
        assert_eq!(WeightMemoryArg::Resident.one_pass(), WeightMemoryArg::Resident);
        assert_eq!(WeightMemoryArg::Mapped.one_pass(), WeightMemoryArg::Mapped);
    }

    #[test]
    fn huge_page_bytes_parse_where_linux_has_them() {
        let rollup = "Rss:  5000 kB\nAnonHugePagesX:  1 kB\nAnonHugePages:  2048 kB\n";
        assert_eq!(dsv4_core::kv::proc_bytes_field(rollup, "AnonHugePages"), Some(2 << 20));
        // Linux always has /proc/self/smaps_rollup with an AnonHugePages line (0 kB at least).
        if std::path::Path::new("/proc/self/smaps_rollup").exists() {
            assert!(anon_huge_page_bytes().is_some());
        }
    }
}
