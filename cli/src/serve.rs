//! `dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server (crate `dsv4-server`) over the
//! serving engine (crate `dsv4-engine`), which runs the model on a thread of its own.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dsv4_core::chat::EncoderRevision;
use dsv4_core::kv::{human_bytes, KvConfig};
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::Backend;
use dsv4_engine::{EngineConfig, EngineHandle, RankBuild};
use dsv4_server::ServerConfig;

use crate::kv_args::{self, KvArgs};
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
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens in one step (decode tokens and prompt chunks together).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt and reply together (default: the model's context, capped by
    /// what the KV cache holds).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Prompts are computed in chunks of this many tokens.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Speculative decoding: the checkpoint's MTP block drafts this many tokens per decode
    /// step of every request, and the main model verifies them in the same step (output
    /// unchanged; greedy replies are token for token the same). 0: off. One device only.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub speculative_tokens: usize,
    /// Most requests waiting for a slot (at least 1); beyond it requests get 503 (529 on the
    /// Anthropic API).
    #[arg(long, default_value_t = 1024)]
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

/// Flag values that would give a server that cannot work as asked, refused before anything is
/// loaded: `--max-waiting 0` (every request would be refused: a request waits, however briefly,
/// before it is admitted) and an empty `--api-key` (`--api-key "$KEY"` with `KEY` unset would
/// otherwise serve with no key at all).
fn check_args(args: &ServeArgs) -> Result<()> {
    if args.max_waiting == 0 {
        anyhow::bail!("--max-waiting must be at least 1 (with 0 every request would be refused)");
    }
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

/// The pool: `--kv-cache-memory` when given; else what `seqs` sequences of `tokens` tokens need,
/// at most half the memory free once the weights are loaded, shared by the `sharing` pools
/// that memory holds (the ranks of a CPU run each hold a pool of this size in the same memory).
fn serving_kv<B: Backend>(
    be: &B,
    cfg: &dsv4_core::ModelConfig,
    kv: &KvArgs,
    (seqs, tokens, chunk): (usize, usize, usize),
    sharing: usize,
) -> Result<KvConfig> {
    let bytes = match kv.kv_cache_memory {
        Some(m) => m.resolve(|| kv_args::free_memory(be))?,
        None => {
            let need = kv_args::budget_for_tokens(cfg, kv.kv_dtype(be), tokens, chunk).saturating_mul(seqs);
            match kv_args::free_memory(be) {
                Ok(free) => need.min(free / 2 / sharing.max(1)),
                Err(e) => {
                    eprintln!(
                        "kv cache: {e:#}; sizing for {seqs} sequences of {tokens} tokens ({})",
                        human_bytes(need)
                    );
                    need
                }
            }
        }
    };
    Ok(KvConfig::for_budget(cfg, kv.kv_dtype(be), bytes, seqs, chunk)?)
}

/// Starts the engine thread with the backend `make` opens there (backend handles never cross
/// threads). Returns the engine and the model config's EOS ids.
fn spawn_engine<B: Backend + 'static>(
    make: impl FnOnce() -> Result<B> + Send + 'static,
    spec: String,
    kv: KvArgs,
    config: EngineConfig,
    planned: Option<KvConfig>,
) -> Result<(EngineHandle, Vec<u32>)> {
    let (eos_tx, eos_rx) = mpsc::channel();
    let engine = EngineHandle::spawn(config, move || {
        let be = make()?;
        eprintln!("backend: {}", be.describe());
        let model = load::load_model(&be, &spec, kv.precision, kv.weight_memory)?;
        let context = model.cfg.max_position_embeddings;
        let tokens = match config.max_model_len {
            0 => context,
            // Refused before the pool is sized and allocated for it (the engine would refuse it
            // too, once the memory is taken).
            n if n > context => {
                return Err(
                    format!("--max-model-len {n} is longer than the model's context ({context} positions)").into()
                )
            }
            n => n,
        };
        // Speculating sequences keep the window pages of their rollback depth as well.
        let step = crate::generate::pool_max_step(config.prefill_chunk, config.speculative_tokens);
        let kv = match planned {
            Some(pool) => pool,
            None => serving_kv(&be, &model.cfg, &kv, (config.max_num_seqs, tokens, step), 1)?,
        };
        eprintln!("{}", kv_args::describe(&model.cfg, &kv));
        let _ = eos_tx.send(model.cfg.eos_token_ids.clone());
        Ok((be, model, kv))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((engine, eos_rx.recv().unwrap_or_default()))
}

/// The memory plan of a server on `parallel`'s devices (one or more) and the pool every rank
/// holds, sized from it, the summary printed on stderr; or the refusal, before any weights are
/// loaded. Each rank's memory is measured before `open` opens the checkpoint: on the CPU backend
/// the ranks share the memory available to the process; on Ascend each device has its own.
fn planned_pool(
    resolved: &Resolved,
    spec: &str,
    kv: &KvArgs,
    config: &EngineConfig,
    parallel: &crate::parallel_args::ParallelArgs,
    open: impl FnOnce() -> Result<(dsv4_core::ModelConfig, dsv4_core::Checkpoint)>,
) -> Result<(dsv4_core::ModelConfig, dsv4_core::Checkpoint, dsv4_core::parallel::ParallelLayout, KvConfig)> {
    use dsv4_core::parallel::plan::{checkpoint_tensors, PoolAsk, ServingAsk, WeightTarget};
    use dsv4_core::weight_forms::SocFamily;

    use crate::serve_plan::RankMemory;
    let world = parallel.world();
    let (memory, kv_dtype, target) = match resolved {
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
            let target = WeightTarget::from_name(be.soc()).unwrap_or(WeightTarget::Soc(SocFamily::A2));
            (RankMemory::device(be.free_memory(), first), kv.kv_dtype(&be), target)
        }
        _ => {
            let be = dsv4_backend_cpu::CpuBackend::new();
            let dequantized = std::env::var_os("DSV4_CPU_DEQUANTIZE").is_some_and(|v| v == "1");
            let target = if dequantized { WeightTarget::HostF32 } else { WeightTarget::Host };
            (RankMemory::cpu(be.free_memory(), world), kv.kv_dtype(&be), target)
        }
    };
    let (cfg, ckpt) = open()?;
    let layout = parallel.layout(&cfg)?;
    if world > 1 {
        eprintln!("{}", crate::parallel_args::ParallelArgs::describe(&layout, &cfg));
    }
    let context = cfg.max_position_embeddings;
    let tokens = match config.max_model_len {
        0 => context,
        n if n > context => bail!("--max-model-len {n} is longer than the model's context ({context} positions)"),
        n => n,
    };
    let tensors = checkpoint_tensors(&cfg, &ckpt, target)
        .map_err(|e| anyhow::anyhow!("{e}; `dsv4 inspect --model {spec}` lists what the checkpoint lacks"))?;
    // CPU weights that stay memory-mapped live in the page cache, which the kernel reclaims:
    // they do not take from the memory the pool is planned in (a checkpoint larger than the
    // memory still runs mapped), so each rank's memory gets its weights added back.
    let mut memory = memory;
    if memory.shared {
        let bytes = ckpt.file_bytes().unwrap_or(0);
        let available = memory.bytes.map(|b| b * world);
        if load::resolve_weight_memory(kv.weight_memory, true, bytes, available).0 == dsv4_core::WeightMemory::Mapped {
            memory = memory.with_mapped_weights(dsv4_core::parallel::plan::fullest_rank_bytes(&cfg, &tensors, layout));
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
        cfg: &cfg,
        tensors: &tensors,
        layout,
        kv_dtype,
        fp8_rows: target.has_fp8_kv_rows(),
        // Speculating sequences keep the window pages of their rollback depth as well.
        max_step: crate::generate::pool_max_step(config.prefill_chunk, config.speculative_tokens).max(1),
        ask,
    };
    let planned = crate::serve_plan::plan_serving(&request, &memory)?;
    eprint!("{}", crate::serve_plan::summary(&request, &memory, &planned));
    let pool = planned.pool.kv;
    drop(tensors);
    Ok((cfg, ckpt, layout, pool))
}

/// [`spawn_engine`] over the ranks of `parallel`: one engine thread per rank, rank 0's serving
/// (`dsv4_engine`'s replicated engine); CPU ranks over the in-process communicator, Ascend ranks
/// one per device over HCCL. Every rank gets the same pool configuration, sized here once: the
/// ranks' engines must make the same block decisions.
fn spawn_engine_ranks(
    backend: BackendChoice,
    spec: &str,
    kv: &KvArgs,
    config: EngineConfig,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<(EngineHandle, Vec<u32>)> {
    use dsv4_backend_ascend::{AscendBackend, HcclBootstrap};
    use dsv4_backend_cpu::CpuBackend;
    use dsv4_core::parallel::{Communicator, LocalComm, RankContext};
    let resolved = crate::resolve_backend(backend)?;
    if matches!(resolved, Resolved::Cuda) {
        return Err(crate::cuda_ranks_refused(parallel.world()));
    }
    let open = || {
        with_backend!(backend, |probe| {
            eprintln!("backend: {}", probe.describe());
            load::open_with_memory(probe, spec, kv.weight_memory).map(|(cfg, ckpt, _)| (cfg, ckpt))
        })
    };
    let (cfg, ckpt, layout, pool) = planned_pool(&resolved, spec, kv, &config, parallel, open)?;
    eprintln!("{} (on each of the {} ranks)", kv_args::describe(&cfg, &pool), layout.world);
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
            EngineHandle::spawn_ranks(config, builds)
        }
        Resolved::Cuda => return Err(crate::cuda_ranks_refused(layout.world)),
        Resolved::Ascend => {
            let boot = std::sync::Arc::new(HcclBootstrap::new(&crate::parallel_args::device_ids(&parallel.devices)?)?);
            let builds: Vec<RankBuild<AscendBackend>> = (0..layout.world)
                .map(|rank| {
                    let (cfg, ckpt, spec, boot) = (cfg.clone(), ckpt.clone(), spec.clone(), boot.clone());
                    Box::new(move || {
                        let (be, world) = boot.join(rank)?;
                        let ctx = RankContext::new(layout.rank(rank), &world as &dyn Communicator<AscendBackend>)?;
                        let model = load::load_opened(&be, cfg, &ckpt, &spec, precision, ctx)?;
                        Ok((be, model, pool))
                    }) as RankBuild<AscendBackend>
                })
                .collect();
            EngineHandle::spawn_ranks(config, builds)
        }
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((engine, eos))
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
    let tok = tokenizer(spec, args.tokenizer.as_deref())?;
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len.unwrap_or(0),
        max_waiting: args.max_waiting,
        prefill_chunk: args.prefill_chunk.min(args.max_num_batched_tokens.max(1)),
        speculative_tokens: args.speculative_tokens,
    };
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
    let (engine, model_eos) = match crate::resolve_backend(backend)? {
        _ if parallel.world() > 1 => spawn_engine_ranks(backend, spec, kv, config, parallel)?,
        resolved @ (Resolved::Cpu | Resolved::Ascend) => {
            // The plan on one device: measured and checked before the engine loads the weights.
            let open = || load::open(spec);
            let (_, _, _, pool) = planned_pool(&resolved, spec, kv, &config, parallel, open)?;
            let (spec, kv) = (spec.to_string(), kv.clone());
            match resolved {
                Resolved::Ascend => spawn_engine(|| Ok(dsv4_backend_ascend::open(0)?), spec, kv, config, Some(pool))?,
                _ => spawn_engine(|| Ok(dsv4_backend_cpu::CpuBackend::new()), spec, kv, config, Some(pool))?,
            }
        }
        Resolved::Cuda => spawn_engine(|| Ok(dsv4_backend_cuda::open(0)?), spec.to_string(), kv.clone(), config, None)?,
    };
    let vocab = engine.info().vocab_size;
    if tok.vocab_size() > vocab {
        eprintln!(
            "warning: the tokenizer has {} ids but the model only {vocab}; prompts using the others are refused",
            tok.vocab_size()
        );
    }
    server.stop_token_ids = model_eos;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(dsv4_server::serve_bound(listener, server, engine, tok))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_default_pool_is_capped_at_half_the_free_memory() {
        let be = dsv4_backend_cpu::CpuBackend::new();
        let cfg = dsv4_core::builtin::tiny().unwrap().0;
        let kv = KvArgs {
            precision: dsv4_core::Precision::F32,
            kv_dtype_arg: Some(dsv4_core::kv::KvDtype::F32),
            kv_cache_memory: None,
            weight_memory: Default::default(),
        };
        let small = serving_kv(&be, &cfg, &kv, (2, 1000, 64), 1).unwrap();
        assert!(small.token_capacity(&cfg).unwrap() >= 2000, "{small:?}");
        let free = kv_args::free_memory(&be).unwrap();
        let big = serving_kv(&be, &cfg, &kv, (64, cfg.max_position_embeddings, 512), 1).unwrap();
        assert!(big.total_bytes(&cfg) <= free / 2 + free / 100, "{big:?}");
        // Four CPU ranks hold four pools in the same memory: together at most half of it.
        let flash = dsv4_core::builtin::flash_shape().unwrap().0;
        let ranks = serving_kv(&be, &flash, &kv, (64, flash.max_position_embeddings, 512), 4).unwrap();
        assert!(4 * ranks.total_bytes(&flash) <= free / 2 + free / 100, "{ranks:?}");
    }
}
