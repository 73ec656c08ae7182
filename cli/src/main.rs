//! `dsv4`: run DeepSeek-V4 checkpoints on CPU, Ascend or CUDA.

mod bench;
mod inspect;
mod load;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::{Backend, Batch};

#[derive(Parser)]
#[command(name = "dsv4", version, about = "DeepSeek-V4 inference engine (Ascend-first; CPU reference backend)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendChoice {
    /// Ascend if its runtime is usable, then CUDA, then CPU.
    Auto,
    /// The reference CPU backend.
    Cpu,
    /// Huawei Ascend NPUs through AscendCL / aclnn.
    Ascend,
    /// Nvidia GPUs through CUDA.
    Cuda,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model directory (config.json + *.safetensors), or `builtin:tiny` for the built-in
    /// random-weight test model.
    #[arg(long, default_value = dsv4_core::builtin::TINY_NAME)]
    model: String,
}

#[derive(Subcommand)]
enum Command {
    /// Compute prefill logits for a list of token ids and write them to a safetensors file
    /// (one F32 tensor `logits`, shape [n, vocab]).
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. `5,17,42`.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        ids: Vec<String>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a model's layer schedule, parameter counts and storage by dtype, and with
    /// `--context` the decoding-state bytes per sequence. A directory holding only config.json
    /// (e.g. configs/deepseek-v4-flash) is enough for the schedule and the cache sizes.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Report the decoding state one sequence holds at this many tokens.
        #[arg(long)]
        context: Option<usize>,
    },
    /// List the backends, whether their runtime was found, and why not.
    Devices,
    /// Measure prefill and decode speed at several context lengths against the memory
    /// bandwidth measured in the same run.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Context lengths at which decode is timed.
        #[arg(long, value_delimiter = ',', default_value = "1024,8192,65536")]
        contexts: Vec<usize>,
        /// Decode steps timed at each context.
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        /// Prefill chunk size.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
    },
}

fn parse_ids(raw: &[String]) -> Result<Vec<u32>> {
    raw.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id (expected non-negative integers like 5,17,42)"))
        })
        .collect()
}

/// Resolves `--backend` to the CPU backend or an error that explains why another is unusable.
fn cpu_or_explain(choice: BackendChoice) -> Result<CpuBackend> {
    match choice {
        BackendChoice::Cpu => {}
        BackendChoice::Auto => {
            // Ascend and CUDA are not implemented in this build; auto therefore means CPU.
        }
        BackendChoice::Ascend => match dsv4_backend_ascend::open()? {},
        BackendChoice::Cuda => match dsv4_backend_cuda::open()? {},
    }
    Ok(CpuBackend::new())
}

fn run_logits(model: &ModelArgs, ids: &[String], backend: BackendChoice, out: &std::path::Path) -> Result<()> {
    let ids = parse_ids(ids)?;
    let be = cpu_or_explain(backend)?;
    eprintln!("backend: {}", be.describe());
    let model = load::load_model(&be, &model.model)?;
    let start = std::time::Instant::now();
    let logits = model.forward(&be, &Batch::prefill(&[&ids])?)?;
    let data = be.download(&logits)?;
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tokens/s)",
        ids.len(),
        start.elapsed().as_secs_f64(),
        ids.len() as f64 / start.elapsed().as_secs_f64()
    );
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![ids.len(), model.cfg.vocab_size], &bytes)
            .context("building the output tensor")?;
    safetensors::serialize_to_file([("logits", view)], None, out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote logits [{}, {}] to {}", ids.len(), model.cfg.vocab_size, out.display());
    Ok(())
}

fn run_devices() {
    let cpu = CpuBackend::new();
    println!("cpu     available    {}", cpu.describe());
    for (name, probe) in [("ascend", dsv4_backend_ascend::probe()), ("cuda", dsv4_backend_cuda::probe())] {
        match probe {
            Ok(found) => println!("{name:<7} not usable   {found}; this build has no {name} backend yet"),
            Err(why) => println!("{name:<7} unavailable  {why}"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Logits { model, ids, backend, out } => run_logits(model, ids, *backend, out),
        Command::Inspect { model, context } => inspect::run(&model.model, *context),
        Command::Bench { model, backend, contexts, decode_steps, prefill_chunk } => cpu_or_explain(*backend)
            .and_then(|be| bench::run(&be, &model.model, contexts, *decode_steps, *prefill_chunk)),
        Command::Devices => {
            run_devices();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
