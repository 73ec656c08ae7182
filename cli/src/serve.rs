//! `dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server (crate `dsv4-server`) over the
//! serving engine (crate `dsv4-engine`), which runs the model on a thread of its own.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dsv4_core::chat::EncoderRevision;
use dsv4_core::kv::{KvConfig, KvDtype};
use dsv4_core::parallel::plan::{checkpoint_tensors, PoolAsk, ServingAsk, WeightTarget};
use dsv4_core::parallel::{ParallelLayout, RankContext};
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::{Backend, Checkpoint, ModelConfig};
use dsv4_engine::{EngineConfig, EngineHandle, RankBuild};
use dsv4_server::ServerConfig;

use crate::kv_args::{self, KvArgs};
use crate::serve_plan::RankMemory;
use crate::{load, BackendChoice, Resolved};

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Which official chat encoder the checkpoint ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EncoderChoice {
    /// The encoder of DeepSeek-V4-Flash / -Pro (efforts high, max).
    Preview,
    /// The encoder of DeepSeek-V4-Flash-0731 (efforts low, high, max).
    #[value(name = "0731")]
    Rev0731,
}

/// `dsv4 serve`'s own flags (the model, backend and KV flags are shared with other commands).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients use and /v1/models lists (default: the --model argument). The
    /// --model argument and its last path component are accepted too.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require this key: `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but
    /// /health and /metrics.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most sequences in one step (with --data-parallel-attention, of each rank).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_num_seqs: usize,
    /// Most tokens in one step (decode tokens and prompt chunks together).
    #[arg(long, default_value_t = 2048, value_parser = at_least_one)]
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt and reply together (default: the model's context, capped by
    /// what the KV cache holds).
    #[arg(long, value_parser = max_model_len)]
    pub max_model_len: Option<usize>,
    /// Prompts are computed in chunks of this many tokens.
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub prefill_chunk: usize,
    /// Speculative decoding: the checkpoint's MTP block drafts this many tokens per decode
    /// step of every request, and the main model verifies them in the same step (output
    /// unchanged; greedy replies are token for token the same). 0: off. One device only.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub speculative_tokens: usize,
    /// Most requests waiting for a slot (at least 1; with --data-parallel-attention, on all
    /// ranks together); beyond it requests get 503 (529 on the Anthropic API).
    #[arg(long, default_value_t = 1024, value_parser = max_waiting)]
    pub max_waiting: usize,
    /// A tokenizer.json to use instead of the model directory's.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// Thinking mode for requests that do not say (on, as in DeepSeek's API).
    #[arg(long, value_enum, default_value = "on")]
    pub default_thinking: Switch,
    /// The checkpoint's chat encoder: preview (V4-Flash / V4-Pro) or 0731 (V4-Flash-0731).
    #[arg(long, value_enum, default_value = "preview")]
    pub encoder: EncoderChoice,
}

/// A count flag's value: a whole number, at least 1 (`--max-num-seqs 0` would start a server
/// that cannot run a request); refused by clap as it parses, before anything is printed.
pub(crate) fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    use std::num::IntErrorKind;
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => Err("too large".into()),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

/// `--max-model-len`: [`at_least_one`]; leaving the flag out means the model's context.
fn max_model_len(s: &str) -> std::result::Result<usize, String> {
    at_least_one(s).map_err(|e| {
        format!("{e} (leave the flag out to serve the longest sequence the model's context and the KV cache allow)")
    })
}

/// `--max-waiting`: [`at_least_one`] (with 0 every request would be refused: a request waits,
/// however briefly, before it is admitted).
fn max_waiting(s: &str) -> std::result::Result<usize, String> {
    at_least_one(s).map_err(|e| format!("{e} (with 0 every request would be refused)"))
}

/// Flag values that would give a server that cannot work as asked, refused before anything is
/// loaded: an empty `--api-key` (`--api-key "$KEY"` with `KEY` unset would otherwise serve with
/// no key at all). Counts of 0 are refused as the flags are parsed ([`at_least_one`]).
fn check_args(args: &ServeArgs) -> Result<()> {
    if args.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        anyhow::bail!("--api-key is empty; give the key clients must send, or leave the flag out to serve without one");
    }
    Ok(())
}

/// The tokenizer for `--model spec` or `--tokenizer path`.
fn tokenizer(spec: &str, path: Option<&Path>) -> Result<Tokenizer> {
    match path {
        Some(p) => Tokenizer::from_file(p).with_context(|| format!("loading the tokenizer {}", p.display())),
        None => crate::generate::tokenizer_for(spec),
    }
}

/// The served name's default and the other accepted names: the `--model` argument and its last
/// path component.
fn model_names(spec: &str, served: Option<&str>) -> (String, Vec<String>) {
    let mut aliases = vec![spec.to_string()];
    if let Some(base) = Path::new(spec).file_name().and_then(|b| b.to_str()) {
        if base != spec {
            aliases.push(base.to_string());
        }
    }
    (served.unwrap_or(spec).to_string(), aliases)
}

/// Starts the engine thread with the backend `make` opens there (backend handles never cross
/// threads), loading the checkpoint `opened` (opened once, memory-mapped, for the plan too) held
/// as `--weight-memory` says, with the planned `pool`. Returns the engine and the model config's
/// EOS ids.
fn spawn_engine<B: Backend + 'static>(
    make: impl FnOnce() -> Result<B> + Send + 'static,
    (cfg, ckpt): (ModelConfig, Checkpoint),
    spec: String,
    kv: KvArgs,
    config: EngineConfig,
    pool: KvConfig,
) -> Result<(EngineHandle, Vec<u32>)> {
    let eos = cfg.eos_token_ids.clone();
    let engine = EngineHandle::spawn(config, move || {
        let be = make()?;
        eprintln!("backend: {}", be.describe());
        let (ckpt, _) = load::hold(&be, ckpt, kv.weight_memory)?;
        let model = load::load_opened(&be, cfg, &ckpt, &spec, kv.precision, RankContext::single())?;
        eprintln!("{}", kv_args::describe(&model.cfg, &pool));
        Ok((be, model, pool))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((engine, eos))
}

/// What a server's memory plan is made for, as its backend reports it: each rank's memory, the
/// KV row format, and the forms the weights take.
struct Measured {
    memory: RankMemory,
    kv_dtype: KvDtype,
    target: WeightTarget,
    /// Whether the backend keeps fp8 KV rows (asked of the backend, not the SoC: a 950 whose
    /// FP8 casts failed their self-test at open does not).
    fp8_rows: bool,
    /// Why the backend does not keep rows of `kv_dtype`, in its own words
    /// ([`kv_args::unkept_rows`]); None when it keeps them.
    unkept: Option<String>,
}

impl Measured {
    fn new<B: Backend>(be: &B, kv: &KvArgs, memory: RankMemory, target: WeightTarget) -> Measured {
        let kv_dtype = kv.kv_dtype(be);
        let fp8_rows = be.supports_row_format(dsv4_core::backend::RowFormat::Fp8 { rope: 0 });
        Measured { memory, kv_dtype, target, fp8_rows, unkept: kv_args::unkept_rows(be, kv_dtype) }
    }
}

/// [`Measured`] of a device backend `be` (Ascend, CUDA): its free memory (None when it does not
/// say, as dsv4's CUDA emulator does not: the plan then takes the asked pool), of which the plan
/// uses [`dsv4_core::parallel::plan::DEFAULT_UTILISATION`].
fn on_device<B: Backend>(be: &B, kv: &KvArgs, target: WeightTarget, device: usize) -> Measured {
    Measured::new(be, kv, RankMemory::device(be.free_memory(), device), target)
}

/// [`Measured`] of the backend `resolved` on `parallel`'s devices, measured before the
/// checkpoint is opened: on the CPU backend the ranks share the memory available to the
/// process; on Ascend and CUDA each device has its own.
fn measure(resolved: &Resolved, kv: &KvArgs, parallel: &crate::parallel_args::ParallelArgs) -> Result<Measured> {
    let world = parallel.world();
    Ok(match resolved {
        Resolved::Ascend => {
            if world > 1 && !matches!(kv.kv_cache_memory, Some(kv_args::MemorySize::Bytes(_))) {
                // Each device has its own memory, but what is free on it depends on the rank's
                // part of the weights: the pools must be the same, so the size is given.
                bail!(
                    "serve --devices on Ascend needs --kv-cache-memory as a size per device (e.g. 16GiB): every \
                     rank's pool must be the same size"
                );
            }
            let first = if world > 1 { parallel.devices.0[0] } else { 0 };
            let be = dsv4_backend_ascend::open(first)?;
            // The forms this device keeps (a 950 whose native forms are off keeps the A2/A3 ones).
            let target = WeightTarget::Soc(be.weight_soc());
            on_device(&be, kv, target, first)
        }
        Resolved::Cuda => {
            if world > 1 && !matches!(kv.kv_cache_memory, Some(kv_args::MemorySize::Bytes(_))) {
                // As on Ascend: every rank's pool must be the same, whatever its GPU has free.
                bail!(
                    "serve --devices on CUDA needs --kv-cache-memory as a size per device (e.g. 16GiB): every \
                     rank's pool must be the same size"
                );
            }
            let first = if world > 1 { parallel.devices.0[0] } else { 0 };
            on_device(&dsv4_backend_cuda::open(first)?, kv, WeightTarget::Cuda, first)
        }
        Resolved::Cpu => {
            let be = dsv4_backend_cpu::CpuBackend::new();
            let dequantized = std::env::var_os("DSV4_CPU_DEQUANTIZE").is_some_and(|v| v == "1");
            let target = if dequantized { WeightTarget::HostF32 } else { WeightTarget::Host };
            let memory = RankMemory::cpu(be.free_memory(), world);
            Measured::new(&be, kv, memory, target)
        }
    })
}

/// The memory plan of a server on `parallel`'s devices (one or more), measured as `measured`,
/// of the checkpoint `cfg`/`ckpt` (opened, not yet loaded), and the pool every rank holds, sized
/// from it, the summary printed on stderr; or the refusal, before any weights are loaded.
fn planned_pool(
    measured: Measured,
    spec: &str,
    kv: &KvArgs,
    config: &EngineConfig,
    parallel: &crate::parallel_args::ParallelArgs,
    (cfg, ckpt): (&ModelConfig, &Checkpoint),
) -> Result<(ParallelLayout, KvConfig)> {
    // Before the pool is planned and described: a draft model that is not there is the first
    // thing to say.
    crate::generate::require_mtp(spec, config.speculative_tokens, cfg, ckpt)?;
    let context = cfg.max_position_embeddings;
    let tokens = match config.max_model_len {
        0 => context,
        n if n > context => bail!(
            "--max-model-len {n} is longer than the model's context ({context} positions); use at most {context}, or \
             leave the flag out"
        ),
        n => n,
    };
    let world = parallel.world();
    if let (true, Some(nodes)) = (parallel.data_parallel_attention, parallel.nodes()) {
        bail!(
            "dsv4 serve runs --data-parallel-attention within one node for now (its requests and their streams stay \
             in the process that took them), not over --nnodes {}: give this node's --devices alone, or drop \
             --data-parallel-attention to replicate attention over the nodes",
            nodes.nnodes
        );
    }
    let layout = parallel.layout(cfg)?;
    if world > 1 {
        eprintln!("{}", parallel.describe_run(&layout, cfg));
    }
    let Measured { mut memory, kv_dtype, target, fp8_rows, unkept } = measured;
    if let Some(refusal) = unkept {
        bail!(refusal);
    }
    let tensors = checkpoint_tensors(cfg, ckpt, target)
        .map_err(|e| anyhow::anyhow!("{e}; `dsv4 inspect --model {spec}` lists what the checkpoint lacks"))?;
    // CPU weights that stay memory-mapped live in the page cache, which the kernel reclaims:
    // they do not take from the memory the pool is planned in (a checkpoint larger than the
    // memory still runs mapped), so each rank's memory gets its weights added back.
    if memory.shared {
        let bytes = ckpt.file_bytes().unwrap_or(0);
        let available = memory.bytes.map(|b| b * world);
        if load::resolve_weight_memory(kv.weight_memory, true, bytes, available).0 == dsv4_core::WeightMemory::Mapped {
            memory = memory.with_mapped_weights(dsv4_core::parallel::plan::fullest_rank_bytes(cfg, &tensors, layout));
        }
    }
    let ask = ServingAsk {
        max_seqs: config.max_num_seqs,
        max_len: tokens,
        len_asked: config.max_model_len != 0,
        pool: match kv.kv_cache_memory {
            Some(kv_args::MemorySize::Bytes(b)) => PoolAsk::Bytes(b),
            Some(kv_args::MemorySize::Fraction(f)) => PoolAsk::Share(f),
            None => PoolAsk::Need,
        },
    };
    let request = crate::serve_plan::Request {
        cfg,
        tensors: &tensors,
        layout,
        kv_dtype,
        fp8_rows,
        comm: crate::plan::collective_library(target, layout)?,
        // Speculating sequences keep the window pages of their rollback depth as well.
        max_step: crate::generate::pool_max_step(config.prefill_chunk, config.speculative_tokens).max(1),
        ask,
    };
    let planned = crate::serve_plan::plan_serving(&request, &memory)?;
    eprint!("{}", crate::serve_plan::summary(&request, &memory, &planned));
    Ok((layout, planned.pool.kv))
}

/// [`spawn_engine`] over the ranks of `parallel`: one engine thread per rank, rank 0's serving
/// (`dsv4_engine`'s replicated engine; with data-parallel attention each rank runs the
/// requests rank 0's hands it); CPU ranks over the in-process communicator, Ascend ranks one
/// per device over HCCL. Every rank gets the same pool configuration, sized here once: replicated
/// ranks' engines must make the same block decisions (data-parallel ranks plan alike).
fn spawn_engine_ranks(
    backend: BackendChoice,
    spec: &str,
    kv: &KvArgs,
    config: EngineConfig,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<RankEngines> {
    use dsv4_backend_ascend::{AscendBackend, HcclBootstrap};
    use dsv4_backend_cpu::CpuBackend;
    use dsv4_core::parallel::{Communicator, LocalComm};
    let resolved = crate::resolve_backend(backend)?;
    if let (Some(nodes), Resolved::Cpu) = (parallel.nodes(), &resolved) {
        return Err(crate::cpu_nodes_refused(nodes.nnodes));
    }
    let mut group = None;
    let leader_ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measured = measure(&resolved, kv, parallel)?;
    let (cfg, ckpt) = load::open(spec)?;
    let (layout, pool) = planned_pool(measured, spec, kv, &config, parallel, (&cfg, &ckpt))?;
    // Once it fits: the checkpoint held as --weight-memory says, shared by the ranks.
    let ckpt = with_backend!(backend, |probe| {
        eprintln!("backend: {}", probe.describe());
        load::hold(probe, ckpt, kv.weight_memory).map(|(ckpt, _)| ckpt)
    })?;
    // Under data-parallel attention each rank's engine admits up to --max-num-seqs of its own.
    let own = match layout.data_parallel_attention {
        true => {
            format!(", each serving sequences of its own: up to {} running at once", layout.world * config.max_num_seqs)
        }
        false => String::new(),
    };
    eprintln!("{} (on each of the {} ranks{own})", kv_args::describe(&cfg, &pool), layout.world);
    let eos = cfg.eos_token_ids.clone();
    let ckpt = std::sync::Arc::new(ckpt);
    let (spec, precision) = (spec.to_string(), kv.precision);
    let engine = match resolved {
        Resolved::Cpu => {
            let builds: Vec<RankBuild<CpuBackend>> = LocalComm::world(layout.world)
                .into_iter()
                .enumerate()
                .map(|(rank, world)| {
                    let (cfg, ckpt, spec) = (cfg.clone(), ckpt.clone(), spec.clone());
                    Box::new(move || {
                        let be = CpuBackend::new();
                        let ctx = RankContext::new(layout.rank(rank), &world as &dyn Communicator<CpuBackend>)?;
                        let model = load::load_opened(&be, cfg, &ckpt, &spec, precision, ctx)?;
                        Ok((be, model, pool))
                    }) as RankBuild<CpuBackend>
                })
                .collect();
            // One node (CPU ranks are refused over several): `group` is None.
            spawn_on_nodes(config, builds, &group, None, leader_ended.clone(), layout.data_parallel_attention)
        }
        Resolved::Cuda => {
            use dsv4_backend_cuda::collective::InitByUniqueId;
            use dsv4_backend_cuda::{CudaBackend, DriverDevice, NcclComm, NcclCommunicator};
            type Gpu = CudaBackend<std::sync::Arc<DriverDevice>>;
            // How a rank gets its NCCL member: made with the others here (ncclCommInitAll), or,
            // over several nodes, joined from node 0's unique id (ncclCommInitRank).
            enum Join {
                Made(NcclComm),
                FromId(std::sync::Arc<Vec<u8>>, usize),
            }
            group = parallel.join_nodes(parallel.devices.0.len(), &pool_agreement(&pool))?;
            let inbox = inbox_of(&group);
            let (devices, joins): (Vec<_>, Vec<Join>) = match &group {
                None => {
                    let (devices, members) = crate::open_cuda_ranks(&parallel.devices)?;
                    (devices, members.into_iter().map(Join::Made).collect())
                }
                Some(g) => {
                    // A GPU that does not open fails every node, naming this one.
                    let devices = dsv4_backend_cuda::open_devices(&parallel.devices.0);
                    let ready = devices.as_ref().map(drop).map_err(|e| e.to_string());
                    let id = dsv4_backend_cuda::node_unique_id::<DriverDevice, NcclComm>(g, ready);
                    let (devices, id) = (devices?, std::sync::Arc::new(id?));
                    let joins = (0..devices.len()).map(|r| Join::FromId(id.clone(), g.base() + r)).collect();
                    (devices, joins)
                }
            };
            let builds: Vec<RankBuild<Gpu>> = devices
                .into_iter()
                .zip(joins)
                .enumerate()
                .map(|(local, (dev, join))| {
                    let (cfg, ckpt, spec, group) = (cfg.clone(), ckpt.clone(), spec.clone(), group.clone());
                    Box::new(move || {
                        let rank = match &join {
                            Join::Made(_) => local,
                            Join::FromId(_, global) => *global,
                        };
                        let build = || -> Result<_, dsv4_engine::BuildError> {
                            let member = match join {
                                Join::Made(m) => m,
                                Join::FromId(id, global) => NcclComm::init_rank(&dev, &id, global, layout.world)?,
                            };
                            let be = CudaBackend::new(dev.clone());
                            let world = NcclCommunicator::new(dev, member);
                            let ctx = RankContext::new(layout.rank(rank), &world as &dyn Communicator<Gpu>)?;
                            let model = load::load_opened(&be, cfg, &ckpt, &spec, precision, ctx)?;
                            Ok((be, model, pool))
                        };
                        // A panic too: its peers would wait inside NCCL for ever (no timeout on
                        // GPUs yet), so say why, tell the other nodes, and end.
                        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).unwrap_or_else(|p| {
                            Err(format!("loading panicked: {}", dsv4_core::parallel::panic_message(p.as_ref())).into())
                        });
                        if let Err(e) = &built {
                            eprintln!("error: rank {rank}: {e}");
                            if let Some(g) = &group {
                                g.abort(&format!("rank {rank}: {e}"));
                            }
                            crate::exit_now(1);
                        }
                        built
                    }) as RankBuild<Gpu>
                })
                .collect();
            spawn_on_nodes(config, builds, &group, inbox, leader_ended.clone(), layout.data_parallel_attention)
        }
        Resolved::Ascend => {
            let ids = crate::parallel_args::device_ids(&parallel.devices)?;
            // Over several nodes every rank's engine must plan the same pool: it is part of
            // what the nodes agree on when they meet.
            // A rank table (--rank-table, RANK_TABLE_FILE), checked when the command started, is
            // also part of what the nodes agree on; its ranks join with HcclCommInitClusterInfo.
            let agree = format!("{}\n{}", pool_agreement(&pool), crate::parallel_args::rank_table_agreement());
            group = parallel.join_nodes(ids.len(), &agree)?;
            let inbox = inbox_of(&group);
            let boot = std::sync::Arc::new(match (crate::parallel_args::rank_table(), &group) {
                (Some(t), g) => HcclBootstrap::from_rank_table(&t.path, &ids, g.clone())?,
                (None, Some(g)) => HcclBootstrap::on_nodes(&ids, g.clone())?,
                (None, None) => HcclBootstrap::new(&ids)?,
            });
            let builds: Vec<RankBuild<AscendBackend>> = (0..ids.len())
                .map(|rank| {
                    let (cfg, ckpt, spec, boot) = (cfg.clone(), ckpt.clone(), spec.clone(), boot.clone());
                    Box::new(move || {
                        let (be, world) = boot.join(rank)?;
                        let global = boot.global_rank(rank);
                        let ctx = RankContext::new(layout.rank(global), &world as &dyn Communicator<AscendBackend>)?;
                        let model = load::load_opened(&be, cfg, &ckpt, &spec, precision, ctx)?;
                        Ok((be, model, pool))
                    }) as RankBuild<AscendBackend>
                })
                .collect();
            spawn_on_nodes(config, builds, &group, inbox, leader_ended.clone(), layout.data_parallel_attention)
        }
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(RankEngines { engine, eos, group, leader_ended })
}

/// Over several nodes every rank's engine must plan the same pool: it is part of what the
/// nodes agree on when they meet.
fn pool_agreement(pool: &KvConfig) -> String {
    format!("the KV pool this node planned (give --kv-cache-memory to plan the same on every node): {pool:?}")
}

/// On a node other than 0, node 0's decisions as they arrive
/// ([`dsv4_core::parallel::NodeGroup::messages`]).
fn inbox_of(
    group: &Option<std::sync::Arc<dsv4_core::parallel::NodeGroup>>,
) -> Option<std::sync::mpsc::Receiver<Vec<u8>>> {
    group.as_ref().filter(|g| g.node_rank() != 0).map(|g| g.messages())
}

/// Starts this process's rank engines: alone, or over several nodes as node 0 (rank 0's
/// decisions also go to the other nodes) or as another node (every rank here replays node 0's
/// decisions from `inbox`; `ended` is set when node 0 says goodbye). With `data_parallel`
/// (one node only) each rank runs sequences of its own.
fn spawn_on_nodes<B: Backend + 'static>(
    config: EngineConfig,
    builds: Vec<RankBuild<B>>,
    group: &Option<std::sync::Arc<dsv4_core::parallel::NodeGroup>>,
    inbox: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    data_parallel: bool,
) -> Result<EngineHandle, dsv4_engine::BuildError> {
    match (group, inbox) {
        // `planned_pool` refused data-parallel attention over several nodes.
        (None, _) if data_parallel => EngineHandle::spawn_data_parallel(config, builds),
        (None, _) => EngineHandle::spawn_ranks(config, builds),
        (Some(g), None) => {
            let g = g.clone();
            EngineHandle::spawn_ranks_leading(config, builds, Box::new(move |tick| g.send_to_all(&tick)))
        }
        (Some(_), Some(inbox)) => {
            EngineHandle::spawn_followers(
                config,
                builds,
                Box::new(move || {
                    let tick = inbox.recv().ok();
                    // The inbox ends only with node 0's goodbye (a lost node 0 exits this process
                    // from the watcher instead).
                    if tick.is_none() {
                        ended.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    tick
                }),
            )
        }
    }
}

/// What [`spawn_engine_ranks`] started.
struct RankEngines {
    engine: EngineHandle,
    /// The model's end-of-sequence ids.
    eos: Vec<u32>,
    /// The processes of a multi-node run.
    group: Option<std::sync::Arc<dsv4_core::parallel::NodeGroup>>,
    /// On a follower node: set when node 0 ended the run (its goodbye).
    leader_ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `dsv4 serve` on a node other than 0 of a run over several processes: no HTTP here; this
/// node's engines replay node 0's decisions until node 0 ends the run (or is lost: then the
/// node watcher exits with that error).
fn follow_node(
    spec: &str,
    backend: BackendChoice,
    kv: &KvArgs,
    config: EngineConfig,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<()> {
    let ranks = spawn_engine_ranks(backend, spec, kv, config, parallel)?;
    eprintln!("serving as a follower node: node 0 takes the requests");
    // A terminal's Ctrl-C (or a launcher's SIGTERM) reaches every process of its group: a
    // follower that died at once would end node 0 mid-drain ("lost node"). It waits for node
    // 0's goodbye instead (node 0 drains, then ends the run); a second signal stops it now.
    std::thread::Builder::new().name("dsv4-follower-signals".into()).spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let signal = dsv4_server::stop_signal().await;
            eprintln!("{signal}: node 0 ends the run once it has drained its requests (a second {signal} stops this node now)");
            let signal = dsv4_server::stop_signal().await;
            eprintln!("stopped at once (a second {signal})");
            crate::exit_now(130);
        });
    })?;
    let mut ended_at = None;
    loop {
        // Node 0 said goodbye, possibly mid-step: ranks waiting in a collective for node 0's
        // would wait until HCCL's timeout, so after a grace period this node just ends.
        if ranks.leader_ended.load(std::sync::atomic::Ordering::SeqCst) {
            let at = *ended_at.get_or_insert_with(std::time::Instant::now);
            if ranks.engine.stopped().is_none() && at.elapsed() > std::time::Duration::from_secs(5) {
                eprintln!("node 0 ended the run; stopping");
                crate::exit_now(0);
            }
        }
        if let Some(why) = ranks.engine.stopped() {
            if ranks.leader_ended.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("node 0 ended the run; stopping");
                return Ok(());
            }
            // This node's own failure: tell the others rather than leave them waiting in a
            // collective for this node's ranks.
            if let Some(g) = &ranks.group {
                g.abort(&why);
            }
            anyhow::bail!("this node's engine stopped: {why}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs the server until Ctrl-C.
pub fn run(
    spec: &str,
    backend: BackendChoice,
    kv: &KvArgs,
    args: &ServeArgs,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<()> {
    check_args(args)?;
    if parallel.world() > 1 {
        crate::generate::refuse_split_speculation(args.speculative_tokens)?;
    }
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len.unwrap_or(0),
        max_waiting: args.max_waiting,
        prefill_chunk: args.prefill_chunk.min(args.max_num_batched_tokens.max(1)),
        speculative_tokens: args.speculative_tokens,
    };
    if parallel.nodes().is_some_and(|n| n.node_rank != 0) {
        return follow_node(spec, backend, kv, config, parallel);
    }
    let tok = tokenizer(spec, args.tokenizer.as_deref())?;
    let (served, aliases) = model_names(spec, args.served_model_name.as_deref());
    let mut server = ServerConfig::new(served);
    server.host = args.host.clone();
    server.port = args.port;
    server.model_aliases = aliases;
    server.api_key = args.api_key.clone();
    server.default_thinking = args.default_thinking == Switch::On;
    server.encoder_revision = match args.encoder {
        EncoderChoice::Preview => EncoderRevision::Preview,
        EncoderChoice::Rev0731 => EncoderRevision::Rev0731,
    };
    // The port first: a taken one is reported before the model is loaded.
    let listener = dsv4_server::bind(&server)?;
    let mut group = None;
    let resolved = crate::resolve_backend(backend)?;
    // Over several ranks, a rank's engine that stops (a failed step, a panic) leaves the others
    // waiting in a collective: HCCL's wait ends only at its execution timeout (the communicators'
    // hcclExecTimeOut, DSV4_COMM_TIMEOUT_S: 600 s by default) and NCCL's blocking one never, so
    // on a device this server ends, as vLLM's does when its engine dies. (The CPU's communicator fails the waiting ranks at once: the server
    // stays up and answers every request with the engine's error.)
    let rank_failure_ends_server = parallel.world() > 1 && !matches!(resolved, Resolved::Cpu);
    let (engine, model_eos) = match resolved {
        _ if parallel.world() > 1 => {
            let ranks = spawn_engine_ranks(backend, spec, kv, config, parallel)?;
            group = ranks.group;
            (ranks.engine, ranks.eos)
        }
        resolved => {
            // The plan on one device: measured and checked before the engine loads the weights
            // of the checkpoint opened here, once.
            let measured = measure(&resolved, kv, parallel)?;
            let opened = load::open(spec)?;
            let (_, pool) = planned_pool(measured, spec, kv, &config, parallel, (&opened.0, &opened.1))?;
            let (spec, kv) = (spec.to_string(), kv.clone());
            match resolved {
                Resolved::Ascend => spawn_engine(|| Ok(dsv4_backend_ascend::open(0)?), opened, spec, kv, config, pool)?,
                Resolved::Cuda => spawn_engine(|| Ok(dsv4_backend_cuda::open(0)?), opened, spec, kv, config, pool)?,
                Resolved::Cpu => {
                    spawn_engine(|| Ok(dsv4_backend_cpu::CpuBackend::new()), opened, spec, kv, config, pool)?
                }
            }
        }
    };
    let vocab = engine.info().vocab_size;
    if tok.vocab_size() > vocab {
        eprintln!(
            "warning: the tokenizer has {} ids but the model only {vocab}; prompts using the others are refused",
            tok.vocab_size()
        );
    }
    server.stop_token_ids = model_eos;
    if group.is_some() || rank_failure_ends_server {
        // An engine of this node stopping leaves the other nodes' ranks waiting in a collective
        // for this node's: tell them.
        let (group, engine) = (group.clone(), engine.clone());
        std::thread::Builder::new().name("dsv4-rank-monitor".into()).spawn(move || loop {
            if let Some(why) = engine.stopped() {
                if let Some(g) = &group {
                    g.abort(&format!("node 0's engine stopped: {why}"));
                }
                if rank_failure_ends_server {
                    // The requests in flight get the error (rank 0, which holds them, is stuck
                    // in the collective); a moment for the HTTP side to write it, then the end.
                    engine.fail_requests(&format!("the engine has stopped: {why}"));
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    eprintln!(
                        "error: {why}\nerror: the server stops: the other ranks would wait for the stopped one in a \
                         collective that cannot be interrupted"
                    );
                    crate::exit_now(1);
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        })?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let served = runtime.block_on(dsv4_server::serve_bound(listener, server, engine, tok));
    // The other nodes' engines stop when node 0 says goodbye (not reported as a lost node).
    if let Some(g) = group {
        g.finish();
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_core::weight_forms::SocFamily;

    #[test]
    fn model_names_accept_the_path_and_its_last_component() {
        assert_eq!(
            model_names("/models/DeepSeek-V4-Flash", None),
            (
                "/models/DeepSeek-V4-Flash".to_string(),
                vec!["/models/DeepSeek-V4-Flash".into(), "DeepSeek-V4-Flash".into()]
            )
        );
        assert_eq!(model_names("builtin:tiny", Some("tiny")).0, "tiny");
    }

    fn kv_args(weight_memory: load::WeightMemoryArg) -> KvArgs {
        KvArgs { precision: dsv4_core::Precision::F32, kv_dtype_arg: None, kv_cache_memory: None, weight_memory }
    }

    fn one_device() -> crate::parallel_args::ParallelArgs {
        crate::parallel_args::ParallelArgs {
            devices: crate::parallel_args::DeviceList(vec![0]),
            tensor_parallel: 1,
            expert_parallel: None,
            moe_exchange: None,
            data_parallel_attention: false,
            nnodes: Some(1),
            node_rank: Some(0),
            master_addr: None,
            master_port: None,
        }
    }

    fn engine_config(max_num_seqs: usize, max_model_len: usize) -> EngineConfig {
        EngineConfig { max_num_seqs, max_model_len, prefill_chunk: 64, ..EngineConfig::default() }
    }

    /// The CUDA path is planned as the CPU and Ascend paths are, on what the device reports:
    /// dsv4's CUDA emulator reports no free memory, so the plan takes the pool the ask needs
    /// (what the old sizing did too), with the weights in the CUDA backend's forms.
    #[test]
    fn cuda_serving_is_planned_on_what_the_device_reports() {
        use dsv4_core::parallel::plan::pool_bytes_for;
        let emu = dsv4_backend_cuda::CudaBackend::new(dsv4_cuda_emu::EmulatedDevice::new());
        let kv = kv_args(Default::default());
        let measured = on_device(&emu, &kv, WeightTarget::Cuda, 0);
        assert_eq!((measured.memory.bytes, measured.kv_dtype), (None, KvDtype::F32));
        assert_eq!(measured.memory.source, "unknown (device 0 does not report its free memory)");
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        let config = engine_config(3, 1000);
        let (layout, pool) =
            planned_pool(measured, "builtin:tiny", &kv, &config, &one_device(), (&cfg, &ckpt)).unwrap();
        assert_eq!(layout, ParallelLayout::SINGLE);
        let step = crate::generate::pool_max_step(config.prefill_chunk, 0);
        let need = pool_bytes_for(&cfg, KvDtype::F32, (3, 3, 1000), step);
        assert_eq!(pool, KvConfig::for_budget(&cfg, KvDtype::F32, need, 3, step).unwrap());
        assert!(pool.token_capacity(&cfg).unwrap() >= 3 * 1000, "{pool:?}");
        // A --max-model-len past the model's context is refused before anything is printed.
        let long = engine_config(3, cfg.max_position_embeddings + 1);
        let measured = on_device(&emu, &kv, WeightTarget::Cuda, 0);
        let e = planned_pool(measured, "builtin:tiny", &kv, &long, &one_device(), (&cfg, &ckpt)).unwrap_err();
        assert!(e.to_string().contains("is longer than the model's context"), "{e}");
    }

    /// Rows the backend does not keep (fp8 on an Ascend A2/A3, or on a 950 whose FP8 casts
    /// failed their self-test) are refused by the plan with the backend's reason, before any
    /// weights load; and the plan never suggests fp8 rows where the backend does not keep them.
    /// (`cli/tests/serve.rs` checks the backend's words on the emulated A2.)
    #[test]
    fn rows_the_backend_does_not_keep_are_refused_and_never_suggested() {
        let (cfg, ckpt) = dsv4_core::builtin::tiny().unwrap();
        let kv = kv_args(Default::default());
        let measured = |kv_dtype, fp8_rows, unkept: Option<&str>| Measured {
            memory: RankMemory::device(Some(1 << 30), 0),
            kv_dtype,
            target: WeightTarget::Soc(SocFamily::A5),
            fp8_rows,
            unkept: unkept.map(str::to_string),
        };
        let plan = |m| planned_pool(m, "builtin:tiny", &kv, &engine_config(2, 256), &one_device(), (&cfg, &ckpt));
        let why = "--kv-dtype fp8: backend `ascend`: not here";
        assert_eq!(plan(measured(KvDtype::Fp8, false, Some(why))).unwrap_err().to_string(), why);
        assert_eq!(plan(measured(KvDtype::Fp8, true, None)).unwrap().1.dtype, KvDtype::Fp8);
        assert_eq!(plan(measured(KvDtype::Bf16, false, None)).unwrap().1.dtype, KvDtype::Bf16);
    }

    /// A model directory holding builtin:tiny, in a fresh temporary directory.
    fn tiny_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dsv4-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dsv4_core::builtin::tiny_config_json();
        std::fs::write(dir.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
        let (_, ckpt) = dsv4_core::builtin::tiny().unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView)> = ckpt
            .tensors()
            .map(|t| {
                let dtype = match t.dtype {
                    dsv4_core::tensor::DType::F32 => safetensors::Dtype::F32,
                    dsv4_core::tensor::DType::BF16 => safetensors::Dtype::BF16,
                    dsv4_core::tensor::DType::F8E4M3 => safetensors::Dtype::F8_E4M3,
                    dsv4_core::tensor::DType::F8E8M0 => safetensors::Dtype::F8_E8M0,
                    dsv4_core::tensor::DType::I8 => safetensors::Dtype::I8,
                    dsv4_core::tensor::DType::I32 => safetensors::Dtype::I32,
                    dsv4_core::tensor::DType::I64 => safetensors::Dtype::I64,
                    other => panic!("{}: {other}", t.name),
                };
                (t.name.clone(), safetensors::tensor::TensorView::new(dtype, t.shape.clone(), t.bytes()).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        dir
    }

    /// On one device the checkpoint is opened once: the engine loads the opening the plan was
    /// made from (memory-mapped: its files are not opened again; here they are gone by then).
    #[test]
    fn one_device_loads_the_checkpoint_the_plan_opened() {
        let dir = tiny_dir("serve-opens-once");
        let spec = dir.to_str().unwrap().to_string();
        let kv = kv_args(load::WeightMemoryArg::Mapped);
        let config = engine_config(2, 256);
        let opened = load::open(&spec).unwrap();
        let measured = measure(&Resolved::Cpu, &kv, &one_device()).unwrap();
        let (_, pool) = planned_pool(measured, &spec, &kv, &config, &one_device(), (&opened.0, &opened.1)).unwrap();
        let (vocab, eos) = (opened.0.vocab_size, opened.0.eos_token_ids.clone());
        std::fs::remove_dir_all(&dir).unwrap();
        let make = || Ok(dsv4_backend_cpu::CpuBackend::new());
        let (engine, model_eos) = spawn_engine(make, opened, spec, kv, config, pool).unwrap();
        assert_eq!((engine.info().vocab_size, model_eos), (vocab, eos));
    }
}
