//! `--devices`, `--tensor-parallel` and `--expert-parallel`: running one model over several
//! ranks (crate `dsv4_core::parallel`).
//!
//! `--devices` takes a count (`4`) or device ids (`0-7`, `0,2,4,6`), as `vllm`'s
//! `CUDA_VISIBLE_DEVICES`-style lists and `dsv4 serve --devices 0-7` read. On the CPU backend the
//! ranks are threads of this process over the in-process communicator, which checks a layout's
//! numerics on any machine (it is not faster: the ranks share the cores). On Ascend the ranks
//! are threads of this process too, one per device, exchanging through HCCL
//! (`dsv4_backend_ascend::run_ranks`), and so are CUDA ranks, one per GPU, over NCCL
//! (`dsv4_backend_cuda::run_ranks`; emulator-verified, not yet run across GPUs).

use std::str::FromStr;

use anyhow::{bail, Result};
use dsv4_core::parallel::{MoeExchange, NodeGroup, NodeSpec, ParallelLayout};
use dsv4_core::ModelConfig;

use crate::kv_args::{KvArgs, MemorySize};
use crate::BackendChoice;

/// The devices of a run: their ids, in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<usize>);

impl FromStr for DeviceList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}` is not a device list ({why}): give a count (4) or ids (0-7, 0,2,4,6)");
        let t = s.trim();
        if !t.contains([',', '-']) {
            let n: usize = t.parse().map_err(|_| bad("not a number"))?;
            if n == 0 {
                return Err(bad("at least one device"));
            }
            return Ok(DeviceList((0..n).collect()));
        }
        let mut ids = vec![];
        for part in t.split(',').map(str::trim) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (
                        a.trim().parse().map_err(|_| bad("bad range"))?,
                        b.trim().parse().map_err(|_| bad("bad range"))?,
                    );
                    if a > b {
                        return Err(bad("a range must go up"));
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.parse().map_err(|_| bad("bad id"))?),
            }
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(bad("an id appears twice"));
        }
        Ok(DeviceList(ids))
    }
}

/// What every command that splits the model starts with: the checkpoint opened once for all
/// ranks (held as `memory` resolves to on `backend`), the layout checked against its config,
/// and the layout said on stderr.
pub fn open_split(
    backend: BackendChoice,
    spec: &str,
    memory: crate::load::WeightMemoryArg,
    parallel: &ParallelArgs,
) -> Result<(ModelConfig, dsv4_core::Checkpoint, ParallelLayout)> {
    let (cfg, ckpt, _) = with_backend!(backend, |probe| crate::load::open_with_memory(probe, spec, memory))?;
    let layout = parallel.layout(&cfg)?;
    eprintln!("{}", parallel.describe_run(&layout, &cfg));
    Ok((cfg, ckpt, layout))
}

/// What every node of a run must agree on: this process's command line without the flags that
/// differ from node to node (--node-rank, --devices, the rendezvous address), one argument a
/// line (node 0 names the first line that differs).
fn run_fingerprint() -> String {
    // Each node may read its own copy of a rank table: the nodes compare what the tables say
    // (`rank_table_agreement`), not their paths.
    let per_node = ["--node-rank", "--devices", "--master-addr", "--master-port", "--nnodes", "--rank-table"];
    let mut out = vec![];
    let mut args = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = args.next() {
        if per_node.contains(&a.as_str()) {
            args.next();
        } else if !per_node.iter().any(|f| a.starts_with(&format!("{f}="))) {
            out.push(a);
        }
    }
    out.join("\n")
}

/// Device ids as AscendCL numbers them.
pub fn device_ids(devices: &DeviceList) -> Result<Vec<i32>> {
    devices.0.iter().map(|&d| i32::try_from(d).map_err(|_| anyhow::anyhow!("device id {d} is too large"))).collect()
}

/// `kv` with a decoding-state budget every rank resolves to the same pool: a share of the free
/// memory (a `--kv-cache-memory` fraction, or with `open_ended` chat's default: what the
/// model's whole context needs, `(cfg, max_step)`, at most half the free memory) becomes bytes
/// once, here, divided among the ranks' pools, which share one machine's memory on the CPU
/// backend. Ranks whose pools differed would make different block decisions and fall out of
/// step. On Ascend every device has its own memory and the free memory a rank sees depends on
/// its part of the weights, so there a size in bytes is required.
pub fn fixed_kv_budget(
    kv: &KvArgs,
    world: usize,
    backend: BackendChoice,
    open_ended: Option<(&ModelConfig, usize)>,
) -> Result<KvArgs> {
    let shares_free = matches!(kv.kv_cache_memory, Some(MemorySize::Fraction(_)))
        || (open_ended.is_some() && kv.kv_cache_memory.is_none());
    if !shares_free {
        return Ok(kv.clone());
    }
    match crate::resolve_backend(backend)? {
        crate::Resolved::Ascend => bail!(per_device_kv("Ascend")),
        crate::Resolved::Cuda => bail!(per_device_kv("CUDA")),
        crate::Resolved::Cpu => {
            let be = dsv4_backend_cpu::CpuBackend::new();
            let free = crate::kv_args::free_memory(&be)?;
            let per_rank = match (kv.kv_cache_memory, open_ended) {
                (Some(m), _) => m.resolve(|| Ok(free))? / world,
                // Every rank holds the whole context's state (a rank's pool is never larger than
                // one device's), within its share of half the free memory.
                (None, Some((cfg, max_step))) => {
                    let need =
                        crate::kv_args::budget_for_tokens(cfg, kv.kv_dtype(&be), cfg.max_position_embeddings, max_step);
                    need.min(free / 2 / world)
                }
                (None, None) => unreachable!("shares_free"),
            };
            Ok(KvArgs { kv_cache_memory: Some(MemorySize::Bytes(per_rank)), ..kv.clone() })
        }
    }
}

/// Why a share of the free memory cannot size the pools of ranks on their own devices.
fn per_device_kv(backend: &str) -> String {
    format!(
        "with --devices on {backend}, give --kv-cache-memory as a size per device (e.g. 8GiB): every rank's pool must \
         be the same size, so it cannot be sized from what each device has free"
    )
}

/// The parallel flags, flattened into the commands that run the model.
#[derive(clap::Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Devices to split the model over, one rank each: a count (4) or device ids (0-7,
    /// 0,2,4,6). On the CPU backend, N ranks run as threads of this process over the in-process
    /// communicator (to check a layout's numerics; the ranks share the cores, so it is not
    /// faster); on Ascend, one thread per listed device over HCCL; on CUDA, one thread per
    /// listed GPU over NCCL.
    #[arg(long, value_name = "N|IDS", default_value = "1")]
    pub devices: DeviceList,
    /// Tensor-parallel degree of attention: ranks that split each layer's heads (by output
    /// group) and the vocabulary. Divides the number of ranks (devices over all --nnodes); at
    /// most the model's o_groups.
    #[arg(long, value_name = "TP", default_value_t = 1, value_parser = crate::serve::at_least_one)]
    pub tensor_parallel: usize,
    /// Expert-parallel degree: ranks that split each layer's routed experts. Divides the number
    /// of ranks (devices over all --nnodes). Default: the number of ranks (every rank holds 1/N
    /// of the experts).
    #[arg(long, value_name = "EP", value_parser = crate::serve::at_least_one)]
    pub expert_parallel: Option<usize>,
    /// How the ranks of an EP group exchange the MoE's activations. all-reduce: every rank runs
    /// its experts on the tokens routed to them and the group sums the outputs (DeepSeek's inference code;
    /// SGLang's --moe-a2a-backend none). all-to-all: each rank takes a slice of the tokens,
    /// sends each (token, expert) pair to the expert's rank and gets its output back
    /// (dispatch/combine, the exchange DeepEP and Huawei's MC2 kernels implement; over the
    /// communicator's all-to-all-v on every backend), then all-gathers.
    /// With replicated attention (no --data-parallel-attention) it moves more than the all-reduce for V4's
    /// top_k (README "Multi-device"; `dsv4 plan --moe-exchange ...` prints either). Same results
    /// up to the order of f32 sums (on Ascend A3 in bf16/official, with DSV4_ASCEND_FUSED=all,
    /// through Huawei's MC2 kernels, which apply the routing weights after w2: one BF16
    /// rounding apart). Needs an EP group (EP > 1). Default: all-reduce, or all-to-all with
    /// --data-parallel-attention (the only exchange it takes).
    #[arg(long, value_name = "EXCHANGE", value_parser = parse_moe_exchange)]
    pub moe_exchange: Option<MoeExchange>,
    /// Data-parallel attention (SGLang's --enable-dp-attention): every rank holds the whole
    /// attention and serves sequences of its own (its own batch and decoding state), and the
    /// MoE sends each rank's tokens to the experts' ranks and back (--moe-exchange
    /// all-to-all, without the all-gather). The layout DeepSeek deploys V3/V4 with: per rank
    /// it moves about 2·top_k·(EP−1)/EP² × the run's tokens × hidden, against 2(EP−1)/EP for
    /// the ring all-reduce of replicated attention (README "Multi-device"). Needs --tensor-parallel 1
    /// and EP > 1. `dsv4 serve` hands each request to the rank holding the fewest (each rank
    /// its own scheduler, pool and --max-num-seqs; one node for now), `dsv4 bench` runs one
    /// sequence per rank; `logits`, `generate`, `chat` and `check` run their sequence on rank 0
    /// while the others serve their experts; `dsv4 plan` plans it.
    #[arg(long)]
    pub data_parallel_attention: bool,
    /// Processes in a run over several hosts (or one process per device): each runs dsv4 with
    /// the same arguments and its own --node-rank, over its own --devices (the same number on
    /// every node); TP and EP count the ranks of all nodes. Ascend (HCCL) and CUDA (NCCL). Default: where
    /// MASTER_ADDR is set (by a launcher), NNODES, else WORLD_SIZE; else 1.
    #[arg(long, value_name = "N")]
    pub nnodes: Option<usize>,
    /// This process's place among the --nnodes, 0..N; node 0 listens for the others. Default:
    /// where MASTER_ADDR is set, NODE_RANK (with NNODES), else RANK (with WORLD_SIZE); else 0.
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,
    /// Node 0's address as the other nodes reach it. Default: MASTER_ADDR, else 127.0.0.1.
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// The TCP port node 0 listens on for the other nodes. Default: MASTER_PORT, else 29500.
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
}

/// `--moe-exchange`'s values.
fn parse_moe_exchange(s: &str) -> std::result::Result<MoeExchange, String> {
    [MoeExchange::AllReduce, MoeExchange::AllToAll]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| format!("'{s}' is not an exchange: give all-reduce or all-to-all"))
}

/// `--rank-table`, flattened next to [`ParallelArgs`] into the commands that split the model
/// over Ascend ranks.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RankTableArgs {
    /// An HCCL rank table (JSON, version 1.0 or 1.2) describing the run's NPUs: Ascend ranks then
    /// join with HcclCommInitClusterInfo instead of HCCL's root info. Server i of its server_list
    /// is node i (--node-rank), whose ranks i·D..(i+1)·D must sit on this node's --devices in
    /// rank order. Default: RANK_TABLE_FILE (used only for runs over several devices). Ascend only.
    #[arg(long, value_name = "FILE")]
    pub rank_table: Option<std::path::PathBuf>,
}

/// The rank table this run joins through (None: HCCL's root info), set once by
/// [`RankTableArgs::settle`] before any device opens, read where the Ascend ranks start.
static RANK_TABLE: std::sync::OnceLock<Option<dsv4_core::parallel::RankTable>> = std::sync::OnceLock::new();

/// The rank table [`RankTableArgs::settle`] accepted for this run, if any.
pub fn rank_table() -> Option<&'static dsv4_core::parallel::RankTable> {
    RANK_TABLE.get().and_then(Option::as_ref)
}

/// What the nodes of a run must also agree on when they meet: the rank table as dsv4 read it
/// (each node may read its own copy), or nothing.
pub fn rank_table_agreement() -> String {
    rank_table().map(|t| t.fingerprint()).unwrap_or_default()
}

impl RankTableArgs {
    /// The flag, else a non-empty `RANK_TABLE_FILE`, with how it was given (for messages).
    fn given(&self) -> Option<(std::path::PathBuf, String)> {
        if let Some(p) = &self.rank_table {
            return Some((p.clone(), format!("--rank-table {}", p.display())));
        }
        let env = std::env::var_os(dsv4_core::parallel::rank_table::RANK_TABLE_VAR).filter(|v| !v.is_empty())?;
        let p = std::path::PathBuf::from(env);
        let how = format!("{}={}", dsv4_core::parallel::rank_table::RANK_TABLE_VAR, p.display());
        Some((p, how))
    }

    /// Reads and checks the rank table (the flag, else `RANK_TABLE_FILE`) against this run before
    /// any device opens, and records it for the Ascend ranks ([`rank_table`]). `split_backends`
    /// are the backends the ranks of the split run on. A table is refused on CPU and CUDA and
    /// (as a flag) on one device; `RANK_TABLE_FILE` is ignored by a run on one device, which
    /// makes no communicator.
    pub fn settle(&self, split_backends: &[BackendChoice], parallel: &ParallelArgs) -> Result<()> {
        let table = self.check(split_backends, parallel)?;
        let _ = RANK_TABLE.set(table);
        Ok(())
    }

    fn check(
        &self,
        split_backends: &[BackendChoice],
        parallel: &ParallelArgs,
    ) -> Result<Option<dsv4_core::parallel::RankTable>> {
        let Some((path, how)) = self.given() else { return Ok(None) };
        if !parallel.is_split()? {
            if self.rank_table.is_some() {
                bail!(
                    "{how}: a rank table describes an HCCL world over several devices, but this run has one device \
                     (no communicator): give --devices (e.g. --devices 0-7), or drop --rank-table"
                );
            }
            return Ok(None);
        }
        for b in split_backends {
            let other = match b {
                BackendChoice::Cpu => Some("CPU"),
                BackendChoice::Cuda => Some("CUDA"),
                BackendChoice::Auto => match crate::resolve_backend(*b)? {
                    crate::Resolved::Ascend => None,
                    _ => Some("CPU (--backend auto found no Ascend runtime)"),
                },
                BackendChoice::Ascend => None,
            };
            if let Some(other) = other {
                bail!(
                    "{how}: an HCCL rank table is for Ascend runs, and this run's ranks are on {other}: drop \
                     --rank-table / unset RANK_TABLE_FILE (the CPU backend's ranks are threads of one process; CUDA \
                     ranks join through NCCL's unique id), or give --backend ascend"
                );
            }
        }
        // A table from the environment may be a launcher's, not meant for this run: say where
        // it came from, and how to do without it.
        let origin = |e: dsv4_core::parallel::RankTableError| match self.rank_table {
            Some(_) => anyhow::anyhow!("{e}"),
            None => anyhow::anyhow!(
                "{e} (the table comes from the environment, {how}: unset RANK_TABLE_FILE to join through HCCL's root \
                 info instead)"
            ),
        };
        let table = dsv4_core::parallel::RankTable::read_when_ready(
            &path,
            dsv4_core::parallel::local::default_timeout(),
            std::time::Duration::from_secs(1),
            &mut || eprintln!("rank table {}: status \"initializing\": waiting until it is completed", path.display()),
        )
        .map_err(origin)?;
        let spec = parallel.node_spec()?;
        let ids = device_ids(&parallel.devices)?;
        let visible = std::env::var("ASCEND_RT_VISIBLE_DEVICES").ok();
        let physical = dsv4_backend_ascend::physical_devices(&ids, visible.as_deref())?;
        let all = dsv4_backend_ascend::physical_ids(visible.as_deref())?;
        table.check_run_visible(spec.nnodes, spec.node_rank, &physical, Some(&all)).map_err(origin)?;
        eprintln!(
            "rank table {}: {} server(s), {} ranks; this node is {:?}: HCCL joins with HcclCommInitClusterInfo",
            path.display(),
            table.servers.len(),
            table.world(),
            table.servers[spec.node_rank].server_id
        );
        Ok(Some(table))
    }
}

/// The first of `vars` set in the environment, parsed (an unparsable value is an error
/// naming the variable).
fn from_env<T: FromStr>(vars: &[&str]) -> Result<Option<T>> {
    for v in vars {
        if let Ok(text) = std::env::var(v) {
            return match text.trim().parse() {
                Ok(x) => Ok(Some(x)),
                Err(_) => bail!("the environment variable {v}={text:?} is not a number"),
            };
        }
    }
    Ok(None)
}

impl ParallelArgs {
    /// The number of ranks, over every node.
    pub fn world(&self) -> usize {
        self.devices.0.len() * self.nodes().map_or(1, |n| n.nnodes)
    }

    /// Where this process sits in a multi-process run: the flags, else the standard
    /// environment, read in pairs and only where a launcher set `MASTER_ADDR` (a stray
    /// `WORLD_SIZE` alone does not make a run multi-process): `NNODES` with `NODE_RANK`
    /// (one process per node), else `WORLD_SIZE` with `RANK` (torchrun's one process per
    /// device). A bad value or an environment variable that does not parse is an error.
    pub fn node_spec(&self) -> Result<NodeSpec> {
        let launched = std::env::var_os("MASTER_ADDR").is_some();
        let (env_nodes, env_rank) = if !launched {
            (None, None)
        } else {
            let pair = |count: &str, rank: &str| -> Result<Option<(usize, usize)>> {
                match (from_env::<usize>(&[count])?, from_env::<usize>(&[rank])?) {
                    (Some(n), Some(r)) => Ok(Some((n, r))),
                    (None, None) => Ok(None),
                    // Every process would take the default rank 0 and wait for the others.
                    _ if self.nnodes.is_some() && self.node_rank.is_some() => Ok(None),
                    _ => bail!(
                        "MASTER_ADDR is set and so is one of {count} / {rank} but not the other: set both (or give \
                         --nnodes and --node-rank)"
                    ),
                }
            };
            match pair("NNODES", "NODE_RANK")?.or(pair("WORLD_SIZE", "RANK")?) {
                Some((n, r)) => (Some(n), Some(r)),
                None => (None, None),
            }
        };
        let nnodes = self.nnodes.or(env_nodes).unwrap_or(1);
        let node_rank = self.node_rank.or(env_rank).unwrap_or(0);
        let addr = match &self.master_addr {
            Some(a) => a.clone(),
            None => std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into()),
        };
        let port = match self.master_port {
            Some(p) => p,
            None => from_env(&["MASTER_PORT"])?.unwrap_or(29500),
        };
        // An IPv6 literal needs brackets in host:port.
        let host = if addr.contains(':') && !addr.starts_with('[') { format!("[{addr}]") } else { addr };
        let spec = NodeSpec { nnodes, node_rank, master: format!("{host}:{port}") };
        spec.validate().map_err(|e| anyhow::anyhow!("--nnodes / --node-rank: {e}"))?;
        Ok(spec)
    }

    /// [`ParallelArgs::node_spec`] when the run spans more than one process.
    pub fn nodes(&self) -> Option<NodeSpec> {
        self.node_spec().ok().filter(|n| n.nnodes > 1)
    }

    /// Joins the other processes of a multi-process run (None on one node): node 0 listens on
    /// --master-port until every node has connected (`DSV4_COMM_TIMEOUT_S`, default 600 s). A
    /// node whose process dies later ends this one with a clear error on stderr (exit 1),
    /// instead of a collective waiting for it until HCCL's timeout.
    /// `agree` is appended to what the nodes must agree on (the command line): e.g. the pool a
    /// server planned, which every rank's engine must share.
    pub fn join_nodes(&self, local: usize, agree: &str) -> Result<Option<std::sync::Arc<NodeGroup>>> {
        let spec = self.node_spec()?;
        if spec.nnodes == 1 {
            return Ok(None);
        }
        eprintln!(
            "node {} of {}: meeting the other nodes at {} ({} device(s) here, {} ranks in all)",
            spec.node_rank,
            spec.nnodes,
            spec.master,
            local,
            local * spec.nnodes
        );
        let fingerprint = if agree.is_empty() { run_fingerprint() } else { format!("{}\n{agree}", run_fingerprint()) };
        let group = NodeGroup::join(&spec, local, &fingerprint, dsv4_core::parallel::local::default_timeout())?;
        group.watch(|msg| {
            eprintln!("error: {msg}");
            crate::exit_now(1);
        });
        Ok(Some(std::sync::Arc::new(group)))
    }

    /// The layout these flags ask for, checked against the model.
    pub fn layout(&self, cfg: &ModelConfig) -> Result<ParallelLayout> {
        let world = self.world();
        let ep = self.expert_parallel.unwrap_or(world);
        if self.expert_parallel.is_none() && ep > cfg.n_routed_experts {
            bail!(
                "--expert-parallel defaults to the number of ranks ({world}), more than the model's {} routed \
                 experts: give --expert-parallel N with N dividing {world} and at most {}",
                cfg.n_routed_experts,
                cfg.n_routed_experts
            );
        }
        // Core names the layout's fields; the user gave flags.
        let layout = ParallelLayout::new(world, self.tensor_parallel, ep, cfg).map_err(|e| match e {
            dsv4_core::Error::Config { field, msg } if field == "tensor_parallel" || field == "expert_parallel" => {
                let value = if field == "tensor_parallel" { self.tensor_parallel } else { ep };
                anyhow::anyhow!("--{} {value}: {msg}", field.replace('_', "-"))
            }
            e => e.into(),
        })?;
        if self.data_parallel_attention {
            if world == 1 {
                bail!(
                    "--data-parallel-attention gives each device sequences of its own: give --devices N (N > 1) as well"
                );
            }
            if self.moe_exchange == Some(MoeExchange::AllReduce) {
                bail!(
                    "--moe-exchange all-reduce sums the ranks' outputs for the same tokens, but with \
                     --data-parallel-attention each rank's tokens are its own: drop --moe-exchange (all-to-all is the \
                     default there)"
                );
            }
            return layout.with_data_parallel_attention().map_err(|e| match e {
                dsv4_core::Error::Config { field, msg } if field == "tensor_parallel" => {
                    anyhow::anyhow!(
                        "--data-parallel-attention with --tensor-parallel {}: {msg}; drop --tensor-parallel (or \
                         --data-parallel-attention to split heads)",
                        self.tensor_parallel
                    )
                }
                dsv4_core::Error::Config { field, msg } if field == "expert_parallel" => {
                    anyhow::anyhow!(
                        "--data-parallel-attention with EP {ep}: {msg}; give --expert-parallel N with N > 1"
                    )
                }
                e => e.into(),
            });
        }
        let moe = self.moe_exchange.unwrap_or_default();
        if layout.ep == 1 && moe == MoeExchange::AllToAll {
            bail!(
                "--moe-exchange all-to-all exchanges the MoE's rows between the ranks of an EP group, but this layout \
                 has none (EP 1): drop it, or split the experts with --expert-parallel N"
            );
        }
        Ok(layout.with_moe(moe))
    }

    /// Whether the run uses more than one rank; refuses TP/EP flags on a single device.
    pub fn is_split(&self) -> Result<bool> {
        self.node_spec()?;
        if self.world() == 1 && self.devices.0 != [0] {
            // One process on one device runs on device 0 (the backends' `open(0)`): an id would
            // be ignored, so it is refused with the standard way to pick the device.
            let id = self.devices.0[0];
            bail!(
                "--devices {id}-{id} names one device by id, but a run on one device uses the first device the \
                 runtime shows: pick it with CUDA_VISIBLE_DEVICES={id} (CUDA) or ASCEND_RT_VISIBLE_DEVICES={id} \
                 (Ascend) and drop --devices (ids pick devices for runs over several: --devices 0-7, or with --nnodes)"
            );
        }
        if self.world() == 1 && self.moe_exchange == Some(MoeExchange::AllToAll) {
            bail!("--moe-exchange all-to-all exchanges rows between devices: give --devices N (N > 1) as well");
        }
        if self.world() == 1 && self.data_parallel_attention {
            bail!("--data-parallel-attention gives each device sequences of its own: give --devices N (N > 1) as well");
        }
        if self.world() == 1 && (self.tensor_parallel > 1 || self.expert_parallel.is_some_and(|e| e > 1)) {
            bail!("--tensor-parallel / --expert-parallel split the model over ranks: give --devices N (N > 1) as well");
        }
        Ok(self.world() > 1)
    }

    /// One line for stderr describing the layout, and where its ranks run: threads of this
    /// process, or this process's share of a run over several (node rank, global ranks).
    pub fn describe_run(&self, layout: &ParallelLayout, cfg: &ModelConfig) -> String {
        let placement = match self.nodes() {
            None => "threads of this process (CPU: over the in-process communicator; Ascend: one device each, over \
                     HCCL; CUDA: one GPU each, over NCCL)"
                .to_string(),
            Some(spec) => {
                let local = layout.world / spec.nnodes;
                format!(
                    "over {} processes (this one: node {}, global ranks {}..{}, one thread per device; over HCCL or \
                     NCCL)",
                    spec.nnodes,
                    spec.node_rank,
                    spec.node_rank * local,
                    (spec.node_rank + 1) * local
                )
            }
        };
        let r0 = layout.rank(0);
        format!(
            "ranks: {}, {placement}; {}TP {} (rank 0: heads {:?} of {}, vocabulary rows {:?}), EP {} (rank 0: \
             experts {:?} of {}; MoE exchange {})",
            layout.world,
            if layout.data_parallel_attention { "data-parallel attention (each rank its own sequences), " } else { "" },
            layout.tp,
            r0.heads(cfg),
            cfg.num_heads,
            r0.vocab(cfg),
            layout.ep,
            r0.experts(cfg),
            cfg.n_routed_experts,
            layout.moe.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use dsv4_core::kv::KvDtype;

    use super::*;

    /// A chat split over CPU ranks sizes each rank's pool for the model's whole context, as on
    /// one device, not half the free memory per rank (a user saw 5.7 GiB per rank for the
    /// 15 MiB the built-in model's context needs); a fraction is still shared among the ranks.
    #[test]
    fn an_open_ended_split_pool_holds_the_context_not_half_the_memory() {
        let (cfg, _) = dsv4_core::builtin::tiny().unwrap();
        let kv = crate::kv_args::KvArgs {
            precision: dsv4_core::Precision::F32,
            kv_dtype_arg: None,
            kv_cache_memory: None,
            weight_memory: Default::default(),
        };
        let need = crate::kv_args::budget_for_tokens(&cfg, KvDtype::F32, cfg.max_position_embeddings, 64);
        let free = crate::kv_args::free_memory(&dsv4_backend_cpu::CpuBackend::new()).unwrap();
        assert!(free / 4 > need, "this machine has {free} bytes free");
        for world in [2, 4] {
            let fixed = fixed_kv_budget(&kv, world, BackendChoice::Cpu, Some((&cfg, 64))).unwrap();
            assert!(matches!(fixed.kv_cache_memory, Some(MemorySize::Bytes(b)) if b == need), "{fixed:?}");
        }
        let half = crate::kv_args::KvArgs { kv_cache_memory: Some(MemorySize::Fraction(0.5)), ..kv.clone() };
        let fixed = fixed_kv_budget(&half, 4, BackendChoice::Cpu, None).unwrap();
        assert!(matches!(fixed.kv_cache_memory, Some(MemorySize::Bytes(b)) if b > need && b < free / 4), "{fixed:?}");
        assert!(fixed_kv_budget(&kv, 2, BackendChoice::Cpu, None).unwrap().kv_cache_memory.is_none());
    }

    #[test]
    fn device_lists_parse_counts_ranges_and_ids() {
        assert_eq!("4".parse::<DeviceList>().unwrap().0, vec![0, 1, 2, 3]);
        assert_eq!("0-3".parse::<DeviceList>().unwrap().0, vec![0, 1, 2, 3]);
        assert_eq!("4-7".parse::<DeviceList>().unwrap().0, vec![4, 5, 6, 7]);
        assert_eq!("0,2, 4,6".parse::<DeviceList>().unwrap().0, vec![0, 2, 4, 6]);
        assert_eq!("0-1,4-5".parse::<DeviceList>().unwrap().0, vec![0, 1, 4, 5]);
        for bad in ["0", "x", "3-1", "0,0", "1-", ""] {
            let e = bad.parse::<DeviceList>().unwrap_err();
            assert!(e.contains("device list"), "{bad}: {e}");
        }
    }

    /// The layout line says where the ranks run: threads of this process, or this node's
    /// global ranks of a run over several processes.
    #[test]
    fn the_layout_line_names_this_processs_ranks() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            parallel: ParallelArgs,
        }
        let cfg = dsv4_core::builtin::tiny().unwrap().0;
        let line = |args: &[&str]| {
            let cli =
                <Cli as clap::Parser>::try_parse_from(std::iter::once("dsv4").chain(args.iter().copied())).unwrap();
            let layout = cli.parallel.layout(&cfg).unwrap();
            cli.parallel.describe_run(&layout, &cfg)
        };
        let one = line(&["--devices", "2", "--tensor-parallel", "2"]);
        assert!(one.starts_with("ranks: 2, threads of this process (CPU: "), "{one}");
        assert!(one.contains("; TP 2 (rank 0: heads 0..2 of 4,"), "{one}");
        let nodes = [
            "--devices",
            "2",
            "--nnodes",
            "3",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "--master-port",
            "29500",
        ];
        let node_1 = line(&nodes);
        assert!(
            node_1.starts_with("ranks: 6, over 3 processes (this one: node 1, global ranks 2..4, one thread per device; over HCCL or NCCL); TP 1 "),
            "{node_1}"
        );
    }
}
