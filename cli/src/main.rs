//! `dsv4`: run DeepSeek-V4 checkpoints on CPU, Ascend or CUDA.

#[macro_use]
mod dispatch {
    /// Runs `$body` with `$be` bound to the backend `$choice` resolves to, by value (for a body
    /// that wraps it, e.g. in `Profiled`). The graph is generic over the backend, so each arm
    /// instantiates the body for one backend type.
    macro_rules! with_owned_backend {
        ($choice:expr, |$be:ident| $body:expr) => {{
            match crate::resolve_backend($choice)? {
                crate::Resolved::Cpu => {
                    let $be = dsv4_backend_cpu::CpuBackend::new();
                    $body
                }
                crate::Resolved::Ascend => {
                    let $be = dsv4_backend_ascend::open(0)?;
                    $body
                }
                crate::Resolved::Cuda => {
                    let $be = dsv4_backend_cuda::open(0)?;
                    $body
                }
            }
        }};
    }

    /// Runs `$body` once per rank of `$layout` on the backend `$choice` resolves to, with `$be` a
    /// reference to the rank's backend and `$ctx` its `RankContext`; evaluates to the results of
    /// this process's ranks in rank order (`anyhow::Result<Vec<_>>`). `$parallel` is the
    /// command's `ParallelArgs`. CPU ranks are threads over the in-process communicator; Ascend
    /// ranks are threads, one per device of `--devices`, over HCCL, and with `--nnodes` this
    /// process runs its node's share of a world over several processes; CUDA ranks are threads,
    /// one per GPU of `--devices`, over NCCL, in one process or over several as on Ascend. A CUDA
    /// rank that fails (joining or running) ends the process with its error, after telling the
    /// other nodes: NCCL has no timeout on GPUs, so its peers would wait for ever.
    /// With a third name, `$nodes` is this process's `Option<&Arc<NodeGroup>>`: `Some` in a run
    /// over several processes (e.g. for node 0 to hand the other nodes what only it reads).
    macro_rules! on_ranks {
        ($choice:expr, $parallel:expr, $layout:expr, |$be:ident, $ctx:ident| $body:expr) => {
            on_ranks!($choice, $parallel, $layout, |$be, $ctx, _nodes| $body)
        };
        ($choice:expr, $parallel:expr, $layout:expr, |$be:ident, $ctx:ident, $nodes:ident| $body:expr) => {{
            match crate::resolve_backend($choice)? {
                crate::Resolved::Cpu => match $parallel.nodes() {
                    Some(spec) => Err(crate::cpu_nodes_refused(spec.nnodes)),
                    None => dsv4_core::parallel::run_local($layout, |$ctx| -> anyhow::Result<_> {
                        let owned = dsv4_backend_cpu::CpuBackend::new();
                        let $be = &owned;
                        let $nodes: Option<&std::sync::Arc<dsv4_core::parallel::NodeGroup>> = None;
                        $body
                    }),
                },
                crate::Resolved::Ascend => {
                    let ids = crate::parallel_args::device_ids(&$parallel.devices)?;
                    // With a rank table (--rank-table, RANK_TABLE_FILE) the ranks join with
                    // HcclCommInitClusterInfo, and the nodes also agree on what it says.
                    let table = crate::parallel_args::rank_table().map(|t| t.path.clone());
                    match $parallel.join_nodes(ids.len(), &crate::parallel_args::rank_table_agreement())? {
                        None => {
                            let boot = match &table {
                                Some(t) => dsv4_backend_ascend::HcclBootstrap::from_rank_table(t, &ids, None)?,
                                None => dsv4_backend_ascend::HcclBootstrap::new(&ids)?,
                            };
                            dsv4_backend_ascend::run_bootstrapped(&boot, $layout, |$be, $ctx| {
                                let $nodes: Option<&std::sync::Arc<dsv4_core::parallel::NodeGroup>> = None;
                                crate::rank_body(|| -> anyhow::Result<_> { $body })
                            })
                        }
                        Some(group) => {
                            let boot = match &table {
                                Some(t) => {
                                    dsv4_backend_ascend::HcclBootstrap::from_rank_table(t, &ids, Some(group.clone()))
                                }
                                None => dsv4_backend_ascend::HcclBootstrap::on_nodes(&ids, group.clone()),
                            };
                            let out = boot.map_err(anyhow::Error::from).and_then(|boot| {
                                dsv4_backend_ascend::run_bootstrapped(
                                    &boot,
                                    $layout,
                                    |$be, $ctx| -> anyhow::Result<_> {
                                        let rank = $ctx.layout.rank;
                                        let $nodes = Some(&group);
                                        let out = crate::rank_body(|| -> anyhow::Result<_> { $body });
                                        crate::end_if_failed(rank, out, Some(&group))
                                    },
                                )
                            });
                            match &out {
                                Ok(_) => group.finish(),
                                // A failure before the ranks' bodies (joining the communicator):
                                // the other nodes hear why, not only that this one is gone.
                                Err(e) => group.abort(&format!("{e:#}")),
                            }
                            out
                        }
                    }
                }
                crate::Resolved::Cuda => match $parallel.join_nodes($parallel.devices.0.len(), "")? {
                    None => {
                        let (devices, members) = crate::open_cuda_ranks(&$parallel.devices)?;
                        let stop = |rank: usize, e: &dsv4_core::Error| {
                            eprintln!("error: rank {rank}: {e}");
                            crate::exit_now(1);
                        };
                        dsv4_backend_cuda::run_ranks_with(
                            devices,
                            members,
                            $layout,
                            &stop,
                            |$be, $ctx| -> anyhow::Result<_> {
                                let rank = $ctx.layout.rank;
                                let $nodes: Option<&std::sync::Arc<dsv4_core::parallel::NodeGroup>> = None;
                                let out = crate::rank_body(|| -> anyhow::Result<_> { $body });
                                crate::end_if_failed(rank, out, None)
                            },
                        )
                    }
                    Some(group) => {
                        // A GPU that does not open fails every node, naming this one.
                        let devices = dsv4_backend_cuda::open_devices(&$parallel.devices.0);
                        let stop = |rank: usize, e: &dsv4_core::Error| {
                            eprintln!("error: rank {rank}: {e}");
                            group.abort(&format!("rank {rank}: {e}"));
                            crate::exit_now(1);
                        };
                        let out = dsv4_backend_cuda::run_node_ranks::<_, dsv4_backend_cuda::NcclComm, _, _, _>(
                            devices,
                            $layout,
                            group.clone(),
                            &stop,
                            |$be, $ctx| -> anyhow::Result<_> {
                                let rank = $ctx.layout.rank;
                                let $nodes = Some(&group);
                                let out = crate::rank_body(|| -> anyhow::Result<_> { $body });
                                crate::end_if_failed(rank, out, Some(&group))
                            },
                        );
                        match &out {
                            Ok(_) => group.finish(),
                            Err(e) => group.abort(&format!("{e:#}")),
                        }
                        out
                    }
                },
            }
        }};
    }

    /// `with_owned_backend!` with `$be` a reference to the backend.
    macro_rules! with_backend {
        ($choice:expr, |$be:ident| $body:expr) => {
            with_owned_backend!($choice, |owned| {
                let $be = &owned;
                $body
            })
        };
    }
}

mod bench;
mod chat_turns;
mod check;
mod generate;
mod inspect;
mod kv_args;
mod load;
mod parallel_args;
mod plan;
mod serve;
mod serve_plan;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::model::Logits;
use dsv4_core::profile::Profiled;
use dsv4_core::{Backend, Batch};

/// mimalloc instead of glibc's malloc: glibc hands allocations above its mmap threshold (a
/// prefill's activations, megabytes each) back to the kernel on free, so the next one faults its
/// pages in and zeroes them again; mimalloc keeps them for reuse (it returns memory unused for
/// about a second to the OS: its `purge_delay`, 1000 ms in v3). `dsv4 bench` prefill 512 on
/// the benchmark model (`gen_synthetic.py mini`), four interleaved pairs: 286-324 tokens/s
/// against 210-289 with glibc; decode unchanged within the noise. `main` makes it keep freed
/// pages for 10 s instead ([`dsv4_backend_cpu::heap`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dsv4", version, about = "DeepSeek-V4 inference engine (Ascend-first; CPU reference backend)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Ascend if its runtime is usable, else CPU (CUDA only when asked for: it has run on one
    /// H200 and is not fast yet).
    Auto,
    /// The reference CPU backend.
    Cpu,
    /// Huawei Ascend NPUs through AscendCL / aclnn (device 0).
    Ascend,
    /// Nvidia GPUs through CUDA.
    Cuda,
}

#[derive(Clone, Copy)]
pub(crate) enum Resolved {
    Cpu,
    Ascend,
    Cuda,
}

/// `auto` takes Ascend when its runtime loads and device 0 opens and can run V4, else CPU; CUDA
/// only when asked for (`--backend cuda`) while its backend is being completed. An explicit
/// choice that cannot be used is an error saying why, before any weights load.
pub(crate) fn resolve_backend(choice: BackendChoice) -> Result<Resolved> {
    Ok(match choice {
        BackendChoice::Cpu => Resolved::Cpu,
        BackendChoice::Ascend => {
            if let Some(why) = cannot_run_v4(&dsv4_backend_ascend::open(0)?) {
                anyhow::bail!(why);
            }
            Resolved::Ascend
        }
        BackendChoice::Cuda => {
            dsv4_backend_cuda::open(0)?;
            Resolved::Cuda
        }
        // Decided once per process (a command resolves its backend more than once), so that
        // device 0 opens once and the reason for the CPU is printed once.
        BackendChoice::Auto => {
            static AUTO: std::sync::OnceLock<Resolved> = std::sync::OnceLock::new();
            *AUTO.get_or_init(resolve_auto)
        }
    })
}

/// Why Ascend device 0 (`be`) cannot run V4, as `--backend ascend` and `auto` say it; None
/// when it can.
fn cannot_run_v4(be: &dsv4_backend_ascend::AscendBackend) -> Option<String> {
    be.unable_to_run_v4().map(|why| format!("Ascend device 0 ({}) cannot run V4: {why}", be.soc()))
}

/// [`resolve_backend`]'s `auto`. Where Ascend was meant but does not open (a device in use, a
/// bad `DSV4_ASCEND_*` setting, a `DSV4_ASCEND_EMULATOR` that does not load) or opens but cannot
/// run V4 (a 310P or 910A: `unable_to_run_v4`), it says why it runs on the CPU: the run is not
/// where the user expects.
fn resolve_auto() -> Resolved {
    let why = match dsv4_backend_ascend::probe() {
        Err(e) if std::env::var_os("DSV4_ASCEND_EMULATOR").is_some_and(|v| !v.is_empty()) => e,
        Err(_) => return Resolved::Cpu,
        Ok(_) => match dsv4_backend_ascend::open(0) {
            Ok(be) => match cannot_run_v4(&be) {
                None => return Resolved::Ascend,
                Some(why) => why,
            },
            Err(e) => format!("an Ascend runtime was found but device 0 did not open: {e}"),
        },
    };
    eprintln!("dsv4: {why}; running on the CPU backend (--backend ascend makes this an error)");
    Resolved::Cpu
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model directory (config.json + *.safetensors), or a built-in random-weight model:
    /// `builtin:tiny` (every layer type) or `builtin:flash-shape` (tiny widths with V4-Flash's
    /// window 128, compression ratios 4/128, top-512 indexer and 1M positions) or
    /// `builtin:tiny-v4vocab` (tiny with V4's 129,280-id vocabulary, for `serve --tokenizer`) or
    /// `builtin:tiny-mtp` (tiny plus a random MTP block, for `--speculative-tokens`).
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
        /// Token ids, comma- or space-separated, e.g. `5,17,42`.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1.., allow_negative_numbers = true)]
        ids: Vec<String>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text: streams to stdout, reports prefill and decode speed on stderr.
    #[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "ids"]))]
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// A user message, encoded with the V4 chat format.
        #[arg(long)]
        prompt: Option<String>,
        /// Raw prompt token ids (no chat format), comma- or space-separated.
        #[arg(long, value_delimiter = ',', num_args = 1.., allow_negative_numbers = true)]
        ids: Option<Vec<String>>,
        #[command(flatten)]
        chat: generate::ChatArgs,
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        /// After the text, print the generated ids (comma-separated) as the last line.
        #[arg(long)]
        print_ids: bool,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
    },
    /// Print the prompt the V4 chat encoder produces for an OpenAI-style message list.
    Render {
        #[command(flatten)]
        model: ModelArgs,
        /// JSON list of messages (roles system/user/assistant/tool).
        #[arg(long)]
        messages: PathBuf,
        /// JSON list of OpenAI-style tools, attached to the first system message.
        #[arg(long)]
        tools: Option<PathBuf>,
        #[command(flatten)]
        chat: generate::ChatArgs,
        /// Print the token ids instead of the text.
        #[arg(long)]
        ids: bool,
    },
    /// Interactive multi-turn chat: one message per line on stdin; an empty line or Ctrl-D
    /// quits. Split over ranks (--devices, and over processes with --nnodes), global rank 0
    /// (on node 0) reads the terminal and prints; the other ranks and nodes run the same
    /// conversation silently and never read their stdin.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        chat: generate::ChatArgs,
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
    },
    /// Show a model's layer schedule, parameter counts and storage by dtype, and with
    /// `--context` / `--kv-dtype` the decoding state's pools, block sizes and what one sequence
    /// holds. A directory holding only config.json (e.g. configs/deepseek-v4-flash) is enough
    /// for the schedule and the cache sizes.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Report the decoding state one sequence holds at this many tokens.
        #[arg(long)]
        context: Option<usize>,
        /// Row format of the decoding state to report (default f32).
        #[arg(long, value_name = "f32|bf16|fp8")]
        kv_dtype: Option<dsv4_core::kv::KvDtype>,
        /// Report the device bytes of the weights on this Ascend SoC family, each matrix in the
        /// form that SoC keeps it exactly: 950 native FP8/MXFP4; 910b/910c FP8 as BF16 and FP4
        /// experts as INT8 with a BF16 scale per 32 (docs/precision.md).
        #[arg(long, value_name = "910b|910c|950", value_parser = parse_soc)]
        soc: Option<dsv4_core::weight_forms::SocFamily>,
    },
    /// A per-device memory plan for N devices: the layout (TP, EP), each rank's weight bytes by
    /// device form, the KV pool the rest of its memory holds and how many sequences of what
    /// length fit, and the collectives' payload per decoded token. Exits non-zero when a rank's
    /// weights do not fit, naming by how much. A config-only directory (configs/deepseek-v4-pro)
    /// is enough.
    Plan {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        plan: plan::PlanArgs,
    },
    /// Run the same input through several backends and compare them block by block.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Backends to compare; the first is the reference. With --devices, the first runs on
        /// one device and the others split over the ranks (e.g. `--backends cpu,cpu --devices 4`
        /// checks a layout against one device).
        #[arg(long, value_delimiter = ',', default_value = "cpu,ascend")]
        backends: Vec<BackendChoice>,
        /// Token ids, comma- or space-separated, e.g. `5,17,42` (default: a fixed 200-token
        /// sequence).
        #[arg(long, value_delimiter = ',', num_args = 1.., allow_negative_numbers = true)]
        ids: Option<Vec<String>>,
        /// Largest allowed max|Δ| / max|reference| per block. Default: 1e-4 with --precision
        /// f32 on f32 rows; 5e-2 with bf16 or official, or with --kv-dtype bf16/fp8, where a
        /// value that two backends round to different neighbours already differs by a BF16 ulp
        /// (2^-7 to 2^-6 of itself) or an e4m3 one (2^-4 to 2^-3). In bf16 the blocks
        /// after a differing top-k selection are reported but not judged, and the first backend
        /// is also run in f32 to show the distance of bf16 to it (docs/precision.md). A finite
        /// number, 0 or more (0: the same bits).
        #[arg(long, value_parser = parse_tolerance, allow_negative_numbers = true)]
        tolerance: Option<f64>,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
    },
    /// List the backends, whether their runtime was found, and why not.
    Devices,
    /// Serve the model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions,
    /// /v1/models), the Anthropic API (/v1/messages), /tokenize, /detokenize, /health and
    /// Prometheus /metrics. Without --kv-cache-memory the KV cache takes what --max-num-seqs
    /// sequences of --max-model-len tokens (default: the model's context) need, at most half the
    /// memory free once the weights are loaded.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        #[command(flatten)]
        serve: serve::ServeArgs,
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
    },
    /// Measure prefill and decode speed at several context lengths, against the machine's limits
    /// measured in the same run: decode against the read bandwidth (weight bytes one token
    /// reads, in their stored form, plus the decoding state held), prefill against the f32 FMA
    /// peak (the BF16 dot-product peak where `--precision bf16` multiplies in BF16). The CPU
    /// limits are measured with the instruction set the kernels use (`DSV4_CPU_ISA=avx2` or
    /// `scalar` lowers it). Prints the machine figures, then a row per context.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Context lengths (comma-separated) at which decode is timed. They are reached in
        /// increasing order on one sequence: each prefill continues where the previous
        /// context's decode stopped.
        #[arg(long, value_delimiter = ',', default_value = "1024,8192,65536")]
        contexts: Vec<usize>,
        /// Decode steps timed at each context (greedy, one token per step); the row reports
        /// their mean time.
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        /// Largest prefill step in tokens: prompts are fed in chunks of this many (logits are
        /// computed for the last token of each chunk only).
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Threads for the machine measurements (read bandwidth, f32 FMA and BF16 dot-product
        /// peaks). Default: the CPU backend's thread count.
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object (machine figures, weights read per token, a row per context)
        /// instead of the text report and table.
        #[arg(long)]
        json: bool,
        /// Time every backend op (synchronising the device after each) and print, after each
        /// context's prefill and decode, the 15 ops that took longest (decode: per token) with
        /// the share of the phase's wall time they cover. With --json every op goes in the row
        /// instead (`profile`: `prefill`, `decode`: [{op, total_ms, calls}]). Asynchronous
        /// backends (Ascend) run slower profiled, and so do the rows' speeds.
        #[arg(long)]
        profile: bool,
        /// Also measure speculative decoding with K drafts per step by the checkpoint's MTP
        /// block, verified by the main model in one step, in the same run: at each context,
        /// after the plain decode steps, the median time of a (K+1)-token verify step against a
        /// 1-token step (rolled back), then --decode-steps tokens decoded speculatively.
        /// Reports the acceptance rate, tokens per main-model step, the verify-cost ratio and
        /// decode tokens/s with and without speculation (--json: each row's `speculative`).
        /// The acceptance of a pseudo-random prompt (and of random weights) says nothing about
        /// real text; the verify-cost ratio is what decides the speed-up at a given acceptance.
        #[arg(long, value_name = "K", default_value_t = 0)]
        speculative_tokens: usize,
        /// Skip the untimed warm-up (a prefill of the first context, at most --prefill-chunk
        /// tokens, and one decode step unless --decode-steps 0, on a sequence of their own)
        /// that runs before the timed ones, as llama-bench's does: without it the first row
        /// also times the process's first touch of its activation and decoding-state memory.
        #[arg(long)]
        no_warmup: bool,
        #[command(flatten)]
        kv: kv_args::KvArgs,
        /// With --devices N the model is split over N ranks (CPU: threads over the in-process
        /// communicator; Ascend: one device each, over HCCL), the ranks time the same contexts in
        /// step, and after the table each rank's communication per decoded token is printed
        /// beside what `dsv4 plan` computes (--json: each row's `comm`).
        #[command(flatten)]
        parallel: parallel_args::ParallelArgs,
        #[command(flatten)]
        rank_table: parallel_args::RankTableArgs,
    },
}

fn parse_soc(s: &str) -> std::result::Result<dsv4_core::weight_forms::SocFamily, String> {
    dsv4_core::weight_forms::SocFamily::from_name(s)
        .ok_or_else(|| format!("unknown Ascend SoC `{s}`; expected 910b, 910c or 950 (or a name like Ascend910B3)"))
}

/// `check --tolerance`: a finite number, 0 or more (a NaN one would pass every comparison).
fn parse_tolerance(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(t) => Err(format!("the tolerance must be a finite number, 0 or more, not {t}")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

pub(crate) fn parse_ids(raw: &[String]) -> Result<Vec<u32>> {
    raw.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id (expected non-negative integers like 5,17,42)"))
        })
        .collect()
}

fn run_logits<B: Backend>(be: &B, model: &ModelArgs, ids: &[u32], out: &Path, kv: &kv_args::KvArgs) -> Result<()> {
    eprintln!("backend: {}", be.describe());
    // One prefill pass reads each weight once: reading the checkpoint into memory first would
    // only add a copy.
    let model = load::load_model(be, &model.model, kv.precision, kv.weight_memory.one_pass())?;
    let data = prefill_logits(be, &model, ids, kv, true)?;
    write_logits(out, ids.len(), model.cfg.vocab_size, &data)
}

/// `dsv4 logits --devices N`: every rank computes the prefill (the ranks' logits are the same
/// bits), rank 0's are written. With --data-parallel-attention the prompt is rank 0's sequence
/// and the other ranks only serve their experts in the step ([`dsv4_core::Model::idle_step`]).
fn run_logits_ranks(
    backend: BackendChoice,
    model: &ModelArgs,
    ids: &[u32],
    out: &Path,
    kv: &kv_args::KvArgs,
    parallel: &parallel_args::ParallelArgs,
) -> Result<()> {
    let (cfg, ckpt, layout) = parallel_args::open_split(backend, &model.model, kv.weight_memory.one_pass(), parallel)?;
    let vocab = cfg.vocab_size;
    let mut ranks = on_ranks!(backend, parallel, layout, |be, ctx| {
        let first = ctx.layout.rank == 0;
        let serves_prompt = ctx.layout.dp_rank() == 0;
        let model = load::load_opened(be, cfg.clone(), &ckpt, &model.model, kv.precision, ctx)?;
        if !serves_prompt {
            // The prompt is one step: one idle step.
            model.idle_step(be)?;
            return Ok(vec![]);
        }
        prefill_logits(be, &model, ids, kv, first)
    })?;
    // Over several nodes every rank holds the same logits (with data-parallel attention rank 0
    // alone holds them); node 0 writes them (the nodes may share a file system).
    match parallel.nodes() {
        Some(spec) if spec.node_rank != 0 => {
            eprintln!("node {}: done; node 0 writes {}", spec.node_rank, out.display());
            Ok(())
        }
        _ => write_logits(out, ids.len(), vocab, &ranks.swap_remove(0)),
    }
}

/// The prefill logits `[ids, vocab]` of one sequence, the state stored as --kv-dtype; the
/// speed on stderr when `report`.
fn prefill_logits<B: Backend>(
    be: &B,
    model: &dsv4_core::Model<B>,
    ids: &[u32],
    kv: &kv_args::KvArgs,
    report: bool,
) -> Result<Vec<f32>> {
    let batch = Batch::prefill(&[ids])?;
    let start = std::time::Instant::now();
    // The whole prompt in one step, the state stored as --kv-dtype.
    let logits = if kv.kv_cache_memory.is_some() {
        let config = kv.config_for_run(be, &model.cfg, ids.len(), ids.len())?;
        let mut cache = model.new_cache(be, config)?;
        let mut seq = cache.new_sequence();
        model.step(be, &batch, &mut cache, &mut [&mut seq], Logits::All)?
    } else {
        model.forward_with(be, &batch, kv.kv_dtype(be), None)?
    };
    let data = be.download(&logits)?;
    if report {
        eprintln!(
            "prefill: {} tokens in {:.3} s ({:.1} tokens/s)",
            ids.len(),
            start.elapsed().as_secs_f64(),
            ids.len() as f64 / start.elapsed().as_secs_f64()
        );
    }
    Ok(data)
}

/// `--out`'s directory exists, checked before any work (the write goes through a temporary file
/// beside it, which an error would name instead of `out`).
fn check_output_dir(out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("--out {}: the directory {} does not exist", out.display(), dir.display());
    }
    Ok(())
}

/// Writes logits `[n, vocab]` as the F32 tensor `logits` of a safetensors file.
fn write_logits(out: &Path, n: usize, vocab: usize, data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, vocab], &bytes)
        .context("building the output tensor")?;
    safetensors::serialize_to_file([("logits", view)], None, out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote logits [{n}, {vocab}] to {}", out.display());
    Ok(())
}

/// The GPUs of `--devices` opened, and an NCCL communicator over them
/// (`ncclCommInitAll`): rank r on the r-th listed GPU.
pub(crate) fn open_cuda_ranks(
    devices: &parallel_args::DeviceList,
) -> Result<(Vec<std::sync::Arc<dsv4_backend_cuda::DriverDevice>>, Vec<dsv4_backend_cuda::NcclComm>)> {
    let ordinals: Vec<usize> = devices.0.to_vec();
    Ok(dsv4_backend_cuda::open_ranks(&ordinals)?)
}

/// Runs a rank's body with a panic turned into its error: a rank thread that unwinds would leave
/// its peers waiting in a collective (for ever on NCCL), where an error reaches the code that
/// ends the process.
pub(crate) fn rank_body<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
        Err(anyhow::anyhow!("the rank panicked: {}", dsv4_core::parallel::panic_message(p.as_ref())))
    })
}

/// A rank's result, or the end of the process when the rank failed: its peers wait for it in a
/// collective (on every node: HCCL until its execution timeout, NCCL for ever), so this says
/// why, tells the other nodes (`group`, over several processes) and exits (1); they hear it and
/// stop too.
pub(crate) fn end_if_failed<T>(
    rank: usize,
    out: Result<T>,
    group: Option<&dsv4_core::parallel::NodeGroup>,
) -> Result<T> {
    if let Err(e) = &out {
        eprintln!("error: rank {rank}: {e:#}");
        if let Some(g) = group {
            g.abort(&format!("rank {rank}: {e:#}"));
        }
        exit_now(1);
    }
    out
}

/// Ends the process at once from any thread, stdout and stderr flushed first (as far as their
/// locks allow): for a rank of a multi-node run that cannot go on while its peers' threads
/// are still inside collectives.
pub(crate) fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}

pub(crate) fn cpu_nodes_refused(nnodes: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "--nnodes {nnodes} (or NNODES / WORLD_SIZE in the environment) runs one process per node over HCCL, but the CPU \
         backend's ranks are threads of one process: drop --nnodes (and unset NNODES / WORLD_SIZE), and give --devices N"
    )
}

fn run_devices() {
    let cpu = CpuBackend::new();
    println!("cpu     available    {}", cpu.describe());
    match dsv4_backend_ascend::probe() {
        Ok(found) => match dsv4_backend_ascend::open(0) {
            Ok(be) => match be.unable_to_run_v4() {
                Some(why) => println!("ascend  unusable     {found}; {}; cannot run V4: {why}", be.describe()),
                None => {
                    println!("ascend  available    {found}; {}", be.describe());
                    for k in be.fused_kernels() {
                        println!("        fused kernel {:<68} {}", k.name, k.why);
                    }
                    let cache = if be.executor_cache_stats().is_some() {
                        "on (repeatable aclnn executors per operand layout; DSV4_ASCEND_EXECUTOR_CACHE=off disables)"
                    } else {
                        "off"
                    };
                    println!("        executor cache {cache}");
                }
            },
            Err(e) => println!("ascend  unusable     {found}; {e}"),
        },
        Err(why) => println!("ascend  unavailable  {why}"),
    }
    // The CUDA probe gives a summary line, then one line per missing library: those go under
    // the description column, after the device.
    let split = |s: &str| -> (String, String) {
        let mut lines = s.lines();
        let first = lines.next().unwrap_or_default().to_string();
        (first, lines.map(|l| format!("\n                     {l}")).collect())
    };
    match dsv4_backend_cuda::probe() {
        Ok(found) => {
            let (summary, details) = split(&found);
            match dsv4_backend_cuda::open(0) {
                Ok(be) => println!("cuda    available    {summary}; {}{details}", be.describe()),
                Err(e) => println!("cuda    unusable     {summary}; {e}{details}"),
            }
        }
        Err(why) => {
            let (summary, details) = split(&why);
            println!("cuda    unavailable  {summary}{details}");
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits { model, ids, backend, kv, parallel, rank_table, out } => {
            let ids = parse_ids(&ids)?;
            // Over several processes only node 0 writes the file.
            if parallel.nodes().is_none_or(|n| n.node_rank == 0) {
                check_output_dir(&out)?;
            }
            rank_table.settle(&[backend], &parallel)?;
            if parallel.is_split()? {
                return run_logits_ranks(backend, &model, &ids, &out, &kv, &parallel);
            }
            with_backend!(backend, |be| run_logits(be, &model, &ids, &out, &kv))
        }
        Command::Generate { model, prompt, ids, chat, sampling, print_ids, backend, kv, parallel, rank_table } => {
            let ids = ids.map(|i| parse_ids(&i)).transpose()?;
            sampling.check()?;
            chat.resolved()?;
            rank_table.settle(&[backend], &parallel)?;
            if parallel.is_split()? {
                return generate::run_generate_ranks(
                    backend,
                    &model.model,
                    prompt.as_deref(),
                    ids.as_deref(),
                    &chat,
                    &sampling,
                    &kv,
                    print_ids,
                    &parallel,
                );
            }
            with_backend!(backend, |be| generate::run_generate(
                be,
                &model.model,
                prompt.as_deref(),
                ids.as_deref(),
                &chat,
                &sampling,
                &kv,
                print_ids
            ))
        }
        Command::Render { model, messages, tools, chat, ids } => {
            generate::run_render(&model.model, &messages, tools.as_deref(), &chat, ids)
        }
        Command::Chat { model, chat, sampling, backend, kv, parallel, rank_table } => {
            sampling.check()?;
            chat.resolved()?;
            rank_table.settle(&[backend], &parallel)?;
            if parallel.is_split()? {
                return generate::run_chat_ranks(backend, &model.model, &chat, &sampling, &kv, &parallel);
            }
            with_backend!(backend, |be| generate::run_chat(be, &model.model, &chat, &sampling, &kv))
        }
        Command::Inspect { model, context, kv_dtype, soc } => inspect::run(&model.model, context, kv_dtype, soc),
        Command::Plan { model, plan } => plan::run(&model.model, &plan),
        Command::Check { model, backends, ids, tolerance, kv, parallel, rank_table } => {
            let ids = ids.map(|i| parse_ids(&i)).transpose()?;
            parallel.is_split()?; // the flags' checks
                                  // The first backend is the one-device reference; the others split over the ranks.
            rank_table.settle(backends.get(1..).unwrap_or_default(), &parallel)?;
            check::run(&model.model, &backends, ids, tolerance, &kv, &parallel)
        }
        Command::Devices => {
            run_devices();
            Ok(())
        }
        Command::Serve { model, backend, kv, serve, parallel, rank_table } => {
            parallel.is_split()?; // the flags' checks
            rank_table.settle(&[backend], &parallel)?;
            serve::run(&model.model, backend, &kv, &serve, &parallel)
        }
        Command::Bench {
            model,
            backend,
            contexts,
            decode_steps,
            prefill_chunk,
            threads,
            json,
            profile,
            speculative_tokens,
            no_warmup,
            kv,
            parallel,
            rank_table,
        } => {
            rank_table.settle(&[backend], &parallel)?;
            let opts = bench::Options {
                contexts: &contexts,
                decode_steps,
                chunk: prefill_chunk,
                threads,
                json,
                speculative_tokens,
                warmup: !no_warmup,
            };
            if parallel.is_split()? {
                if profile {
                    anyhow::bail!(
                        "--profile times one backend's ops; with --devices the ranks run on several: profile without \
                         --devices"
                    );
                }
                return bench::run_ranks(backend, &model.model, &kv, &opts, &parallel);
            }
            with_owned_backend!(backend, |be| if profile {
                // Synchronising after each op charges an asynchronous backend's device time to
                // the op that queued it; on the CPU backend it is a no-op.
                let be = Profiled::new(be, true);
                bench::run(&be, &model.model, &kv, &opts, Some(&|| be.take()))
            } else {
                bench::run(&be, &model.model, &kv, &opts, None)
            })
        }
    }
}

fn main() -> ExitCode {
    dsv4_backend_cpu::heap::keep_freed_pages();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token ids of `logits`, `generate` and `check`, given as `5,17,42`, as `5 17 42`, or
    /// both mixed, parse to the same ids; a word that is not an id is an error naming it.
    #[test]
    fn token_ids_take_commas_or_spaces() {
        let ids = |line: &str| -> Vec<String> {
            let cli = Cli::try_parse_from(std::iter::once("dsv4").chain(line.split_whitespace())).unwrap();
            match cli.command {
                Command::Logits { ids, .. } => ids,
                Command::Generate { ids, .. } | Command::Check { ids, .. } => ids.unwrap(),
                _ => unreachable!("{line}"),
            }
        };
        for command in ["logits --out x.bin", "generate", "check"] {
            for given in ["5,17,42", "5 17 42", "5,17 42"] {
                let line = format!("{command} --ids {given}");
                assert_eq!(parse_ids(&ids(&line)).unwrap(), [5, 17, 42], "{line}");
            }
        }
        let e = parse_ids(&ids("check --ids 5 x")).unwrap_err();
        assert!(e.to_string().contains("`x` is not a token id"), "{e}");
    }

    /// A negative number is a value, not an unknown flag: it reaches the check that names what
    /// is wrong with it. `generate` says it needs `--prompt` or `--ids`.
    #[test]
    fn negative_numbers_reach_their_checks() {
        let parse = |line: &str| Cli::try_parse_from(std::iter::once("dsv4").chain(line.split_whitespace()));
        let Ok(Cli { command: Command::Logits { ids, .. } }) = parse("logits --out x --ids -1") else { panic!() };
        assert!(parse_ids(&ids).unwrap_err().to_string().contains("`-1` is not a token id"));
        for (line, says) in [
            ("generate --ids 1 --temperature -1", "temperature must be a finite number"),
            ("generate --ids 1 --temperature nan", "temperature must be a finite number"),
            ("generate --ids 1 --top-p -0.5", "top-p must be in (0, 1]"),
            ("chat --temperature -2", "temperature must be a finite number"),
        ] {
            let sampling = match parse(line).unwrap().command {
                Command::Generate { sampling, .. } | Command::Chat { sampling, .. } => sampling,
                _ => unreachable!(),
            };
            let e = sampling.check().unwrap_err().to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
        for (line, says) in [
            ("generate --ids 1 --top-k -2", "invalid value '-2' for '--top-k <K>'"),
            ("generate --ids 1 --kv-cache-memory -5", "`-5` is not a memory size"),
            ("generate --max-new-tokens 3", "<--prompt <PROMPT>|--ids <IDS>...>"),
        ] {
            let e = parse(line).err().unwrap().to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    /// `logits --out` in a directory that does not exist is refused naming it, not the
    /// temporary file the write would have gone through.
    #[test]
    fn logits_out_needs_an_existing_directory() {
        let e = check_output_dir(Path::new("/nonexistent-dsv4/dir/x.st")).unwrap_err().to_string();
        assert_eq!(e, "--out /nonexistent-dsv4/dir/x.st: the directory /nonexistent-dsv4/dir does not exist");
        check_output_dir(Path::new("x.st")).unwrap();
        check_output_dir(&std::env::temp_dir().join("x.st")).unwrap();
    }

    /// `check --tolerance` takes a finite number, 0 or more: a NaN would pass every comparison.
    #[test]
    fn check_tolerance_is_a_finite_number_not_below_zero() {
        let tolerance = |t: &str| match Cli::try_parse_from(["dsv4", "check", "--tolerance", t]) {
            Ok(Cli { command: Command::Check { tolerance, .. } }) => Ok(tolerance.unwrap()),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(tolerance("1e-5"), Ok(1e-5));
        assert_eq!(tolerance("0"), Ok(0.0));
        for bad in ["nan", "NaN", "inf", "-1", "-0.5", "x"] {
            let e = tolerance(bad).unwrap_err();
            assert!(e.contains("the tolerance must be a finite number") || e.contains("is not a number"), "{bad}: {e}");
        }
    }
}
