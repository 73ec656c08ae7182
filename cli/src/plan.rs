//! `dsv4 plan`: a per-device memory plan for running a model over N devices
//! ([`dsv4_core::parallel::plan`]): what each rank holds of the weights by device form, the KV
//! pool the rest of its memory holds, how many sequences of what length fit, and what one decode
//! step puts into the collectives. Refuses (exit status 1) a layout whose weights do not fit,
//! naming by how much. A config-only directory (configs/deepseek-v4-flash) is enough.

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Result};
use dsv4_core::kv::{human_bytes, KvDtype};
use dsv4_core::parallel::plan::{
    checkpoint_tensors, decode_traffic, fewest_devices, official_tensors, plan, rank_weights, CollectiveLibrary, Plan,
    PlanError, PlanInput, PlanTensor, RankWeights, Split, WeightTarget, DEFAULT_UTILISATION, HCCL_BUFFSIZE_DEFAULT_MB,
};
use dsv4_core::parallel::{CollectiveKind, MoeExchange, ParallelLayout, Traffic};
use dsv4_core::weight_forms::SocFamily;
use dsv4_core::{builtin, ModelConfig, Precision};

/// The flags of `dsv4 plan` (besides `--model`).
#[derive(clap::Args, Clone, Debug)]
pub struct PlanArgs {
    /// The devices and how the model is split over them (`--devices` as for the commands
    /// that run the model: a count or device ids).
    #[command(flatten)]
    pub parallel: crate::parallel_args::ParallelArgs,
    /// Memory of one device: bytes with an optional unit. K/M/G/T and KiB/MiB/GiB/TiB are
    /// powers of 1024, KB/MB/GB/TB powers of 1000: 64GiB = 68719476736 bytes, 64GB =
    /// 64000000000.
    #[arg(long, value_name = "SIZE", value_parser = parse_device_memory)]
    pub device_memory: usize,
    /// The share of each device's memory the plan uses (vLLM's gpu_memory_utilization); the
    /// rest is left for activations, workspaces and the runtime.
    #[arg(long, default_value_t = DEFAULT_UTILISATION, value_parser = parse_utilisation)]
    pub memory_utilization: f64,
    /// Where the weights live and so their form: an Ascend SoC family (910b, 910c: FP8 as
    /// BF16, FP4 experts as INT8 with a BF16 scale per 32; 950: FP8/MXFP4 as stored and fp8 KV
    /// rows, assuming its FP8/FP4 casts pass their self-test at open: `dsv4 devices`), cuda (the
    /// CUDA backend: BF16 as stored, FP8/FP4 with E8M0 scales as BF16, the rest as F32), host
    /// (the CPU backend: every weight as stored) or host-f32 (the CPU backend with
    /// DSV4_CPU_DEQUANTIZE=1).
    #[arg(long, value_name = "910b|910c|950|cuda|host|host-f32", default_value = "host", value_parser = parse_target)]
    pub soc: WeightTarget,
    /// Activation precision, as for the commands that run the model: here it picks the
    /// default --kv-dtype.
    #[arg(long, value_name = "f32|bf16|official|official-f32", default_value = "f32")]
    pub precision: Precision,
    /// Row format of the decoding state (default: the precision's on the backend --soc
    /// implies: f32, bf16, or for official fp8 on the host, CUDA and the Ascend 950, bf16 on
    /// Atlas A2/A3).
    #[arg(long = "kv-dtype", value_name = "f32|bf16|fp8")]
    pub kv_dtype: Option<KvDtype>,
    /// Most tokens a sequence feeds in one step (`serve --prefill-chunk`): the window blocks a
    /// running sequence holds.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

fn parse_device_memory(s: &str) -> std::result::Result<usize, String> {
    let bad = || {
        format!(
            "`{s}` is not a device memory size: give bytes with an optional unit (64GiB, 80GB, 68719476736; K/M/G/T \
             and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000)"
        )
    };
    match s.parse::<crate::kv_args::MemorySize>() {
        Ok(crate::kv_args::MemorySize::Bytes(b)) => Ok(b),
        _ => Err(bad()),
    }
}

fn parse_utilisation(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("--memory-utilization must be a fraction in (0, 1], not `{s}`")),
    }
}

fn parse_target(s: &str) -> std::result::Result<WeightTarget, String> {
    WeightTarget::from_name(s).ok_or_else(|| {
        format!("unknown target `{s}`; expected 910b, 910c, 950 (or a name like Ascend910B3), cuda, host or host-f32")
    })
}

impl PlanArgs {
    /// `--kv-dtype`, or `--precision`'s default on the backend `--soc` implies
    /// ([`Precision::default_kv_dtype`]).
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype.unwrap_or(match self.precision {
            p if !p.simulates_quant() && p.rounds_to_bf16() => KvDtype::Bf16,
            p if !p.simulates_quant() => KvDtype::F32,
            _ if self.soc.has_fp8_kv_rows() => KvDtype::Fp8,
            _ => KvDtype::Bf16,
        })
    }

    pub fn layout(&self, cfg: &ModelConfig) -> Result<ParallelLayout> {
        self.parallel.layout(cfg)
    }

    /// The row format the plan is for, refused where the backend `--soc` implies cannot hold it:
    /// a plan must describe a deployment dsv4 can run.
    pub fn checked_kv_dtype(&self) -> Result<KvDtype> {
        let kv = self.kv_dtype();
        if kv == KvDtype::Fp8 && !self.soc.has_fp8_kv_rows() {
            bail!(
                "--kv-dtype fp8 on {}: the Ascend backend keeps fp8 rows on the 950 only (they need its FLOAT8_E4M3FN casts); plan with --kv-dtype bf16",
                self.soc.name()
            );
        }
        Ok(kv)
    }
}

/// The library the collectives of `layout`'s ranks on `target` run on: HCCL on Ascend (with
/// `HCCL_BUFFSIZE` from the environment, as HCCL reads it; not read for one device, which has
/// no communicator), NCCL on CUDA, the in-process communicator on the CPU.
///
/// # Errors
/// Over several devices on Ascend, `HCCL_BUFFSIZE` set to something that is not a whole number
/// of MB of at least 1.
pub(crate) fn collective_library(target: WeightTarget, layout: ParallelLayout) -> Result<CollectiveLibrary> {
    Ok(match target {
        WeightTarget::Soc(_) if layout.world == 1 => CollectiveLibrary::Hccl { buffsize_mb: None },
        WeightTarget::Soc(_) => {
            let buffsize_mb = match std::env::var("HCCL_BUFFSIZE") {
                // Unset, or set to nothing (as a shell `HCCL_BUFFSIZE=` leaves it): the default.
                Err(_) => None,
                Ok(v) if v.trim().is_empty() => None,
                Ok(v) => match v.trim().parse::<usize>() {
                    Ok(mb) if mb >= 1 => Some(mb),
                    _ => bail!(
                        "HCCL_BUFFSIZE={v:?} is not a size in MB (a whole number of at least 1; HCCL's default is 200)"
                    ),
                },
            };
            CollectiveLibrary::Hccl { buffsize_mb }
        }
        WeightTarget::Cuda => CollectiveLibrary::Nccl,
        WeightTarget::Host | WeightTarget::HostF32 => CollectiveLibrary::InProcess,
    })
}

/// What the collectives' library holds on each rank of `layout`, as a line of the plan (None
/// where nothing is held or there is one device).
pub(crate) fn comm_line(lib: CollectiveLibrary, layout: ParallelLayout) -> Option<String> {
    if layout.world == 1 {
        return None;
    }
    match lib {
        CollectiveLibrary::InProcess => None,
        CollectiveLibrary::Hccl { buffsize_mb } => {
            let b = lib.buffers(layout);
            let mb = buffsize_mb.unwrap_or(HCCL_BUFFSIZE_DEFAULT_MB);
            Some(format!(
                "communicator buffers: {} per rank, off the usable memory: {} HCCL communicators (the world{}{}) × \
                 2 × HCCL_BUFFSIZE ({mb} MiB{})",
                human_bytes(b.total()),
                b.communicators,
                if layout.tp > 1 { ", TP" } else { "" },
                if layout.ep > 1 { ", EP" } else { "" },
                if buffsize_mb.is_none() { ", the default" } else { "" }
            ))
        }
        CollectiveLibrary::Nccl => Some(
            "communicator buffers: NCCL's are not counted (NCCL_BUFFSIZE per channel and peer, sized at run time): \
             the memory --memory-utilization leaves must hold them"
                .into(),
        ),
    }
}

/// `3`, `0-7`, `0-1, 4-5`.
pub(crate) fn rank_list(ranks: &[usize]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { ranks[i].to_string() } else { format!("{}-{}", ranks[i], ranks[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

fn bytes(n: usize) -> String {
    format!("{n} ({})", human_bytes(n))
}

/// Ranks with the same amounts of everything, folded: (ranks, the first one's weights).
pub(crate) fn classes(ranks: &[RankWeights]) -> Vec<(Vec<usize>, &RankWeights)> {
    let mut out: Vec<(Vec<usize>, &RankWeights)> = vec![];
    for (i, r) in ranks.iter().enumerate() {
        match out.iter_mut().find(|(_, w)| w.same_amounts(r)) {
            Some((list, _)) => list.push(i),
            None => out.push((vec![i], r)),
        }
    }
    out
}

/// [`Subject::source`] of a config-only directory.
const CONFIG_ONLY: &str = "config only: the official release's stored forms, spec §D.2";

/// What is being planned, for the header and the refusal.
pub struct Subject<'a> {
    /// e.g. `deepseek-v4-flash`.
    pub name: &'a str,
    /// e.g. `config only: the official release's stored forms (spec §D.2)`.
    pub source: &'a str,
    pub cfg: &'a ModelConfig,
    pub tensors: &'a [PlanTensor],
}

/// The header and the per-rank weights (what a refused plan still shows).
fn weights_section(
    s: &Subject,
    args: &PlanArgs,
    layout: ParallelLayout,
    comm: CollectiveLibrary,
    ranks: &[RankWeights],
) -> String {
    let cfg = s.cfg;
    let mut o = String::new();
    let available = (args.device_memory as f64 * args.memory_utilization).floor() as usize;
    let _ = writeln!(
        o,
        "plan: {} ({}) on {} device{} of {}, {} usable each ({} × {})",
        s.name,
        s.source,
        layout.world,
        if layout.world == 1 { "" } else { "s" },
        bytes(args.device_memory),
        human_bytes(available),
        human_bytes(args.device_memory),
        args.memory_utilization
    );
    if let Some(line) = comm_line(comm, layout) {
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o, "weights in the forms of {}", args.soc.name());
    let (world, tp, ep) = (layout.world, layout.tp, layout.ep);
    let group = |n: usize, how: String| match n {
        1 => String::new(),
        n if n == world => " (all ranks)".to_string(),
        _ => format!(" (groups of {n} ranks, {how})"),
    };
    let _ = writeln!(
        o,
        "layout: {world} rank{}, TP {tp}{}, EP {ep}{}{}",
        if world == 1 { "" } else { "s" },
        group(tp, "consecutive".into()),
        group(ep, format!("{} apart", world / ep)),
        if layout.data_parallel_attention {
            "; data-parallel attention (each rank runs its own sequences, the MoE by dispatch and combine)"
        } else {
            ""
        }
    );
    let r0 = layout.rank(0);
    if tp > 1 {
        let _ = writeln!(
            o,
            "  split over TP: attention, {} heads in {} output groups: {} heads ({} group{}) per rank; vocabulary, {} \
             rows of embed{}: {} per rank",
            cfg.num_heads,
            cfg.o_groups,
            r0.heads(cfg).len(),
            r0.groups(cfg).len(),
            if r0.groups(cfg).len() == 1 { "" } else { "s" },
            cfg.vocab_size,
            if cfg.tie_word_embeddings { " (tied to the head)" } else { " and head" },
            r0.vocab(cfg).len()
        );
    }
    if ep > 1 {
        let (e, n) = (cfg.n_routed_experts, r0.experts(cfg).len());
        let blocks = if e.is_multiple_of(ep) {
            format!("the rank at position p of its EP group holds experts {n}p..{n}(p+1)")
        } else {
            format!("contiguous blocks, the first {} one larger", e % ep)
        };
        let _ = writeln!(o, "  split over EP: routed experts, {e} per layer: {n} per rank ({blocks})");
    }
    let every = if world == 1 { "one device, holding everything" } else { "replicated on every rank" };
    let _ = writeln!(
        o,
        "  {every}: wq_a, wkv, norms, compressors, indexers, routers, shared experts, mHC{}{}",
        if tp > 1 { "" } else { ", attention heads, vocabulary" },
        if ep > 1 { "" } else { ", routed experts" }
    );

    let mtp_note = if world == 1 {
        "MTP block loaded and counted"
    } else {
        "MTP block not loaded with --devices > 1 yet: listed, not counted"
    };
    let _ = writeln!(o, "weights per rank ({mtp_note}; held: what the rank's memory holds):");
    let _ = writeln!(
        o,
        "  {:<12} {:>6} {:>8} {:>8} {:>14} {:>8} {:>28} {:>12} {:>12}",
        "ranks", "heads", "vocab", "experts", "parameters", "tensors", "bytes", "MTP block", "held"
    );
    let classes = classes(ranks);
    for (list, w) in &classes {
        let (rank, main) = (&w.rank, w.main());
        let _ = writeln!(
            o,
            "  {:<12} {:>6} {:>8} {:>8} {:>14} {:>8} {:>28} {:>12} {:>12}",
            rank_list(list),
            rank.heads(cfg).len(),
            rank.vocab(cfg).len(),
            rank.experts(cfg).len(),
            crate::inspect::human(main.params),
            main.tensors,
            bytes(main.bytes),
            human_bytes(w.mtp_total().bytes),
            human_bytes(w.loaded_bytes())
        );
    }
    for (list, w) in &classes {
        let head = if classes.len() == 1 { "every rank".to_string() } else { format!("ranks {}", rank_list(list)) };
        let _ = writeln!(o, "  {head}, by device form:");
        let _ = writeln!(o, "    {:<28} {:>8} {:>14} {:>28}", "form", "tensors", "parameters", "bytes");
        for (form, c) in &w.by_form {
            let _ = writeln!(
                o,
                "    {:<28} {:>8} {:>14} {:>28}",
                form.name(),
                c.tensors,
                crate::inspect::human(c.params),
                bytes(c.bytes)
            );
        }
        let splits: Vec<String> = [Split::Replicated, Split::Vocab, Split::Heads, Split::Experts]
            .iter()
            .filter_map(|sp| w.by_split.get(sp).map(|c| format!("{} {}", sp.name(), human_bytes(c.bytes))))
            .collect();
        let _ = writeln!(o, "    by split: {}", splits.join(", "));
        let mtp = w.mtp_total();
        if mtp.tensors > 0 {
            let forms: Vec<String> =
                w.mtp.iter().map(|(f, c)| format!("{} {}", f.name(), human_bytes(c.bytes))).collect();
            let _ = writeln!(
                o,
                "    MTP block: {} tensors, {} parameters, {} ({}){}",
                mtp.tensors,
                crate::inspect::human(mtp.params),
                bytes(mtp.bytes),
                forms.join(", "),
                if w.mtp_loaded { "" } else { "; not loaded with --devices > 1 yet" }
            );
        }
    }
    o
}

/// The decoding state and the fit.
fn state_section(cfg: &ModelConfig, p: &Plan) -> String {
    let mut o = String::new();
    let kv = &p.kv;
    let whose = if p.layout.data_parallel_attention {
        format!(
            "data-parallel attention: each rank holds the state of its own sequences, so the run holds {} times the \
             sequences below",
            p.layout.world
        )
    } else {
        "every rank holds every sequence's state: activations are replicated, the K=V head, compressors and indexer \
         are not split"
            .to_string()
    };
    let _ = writeln!(o, "decoding state, --kv-dtype {}, blocks of {} tokens ({whose}):", kv.dtype, kv.block_tokens);
    let per_1k = kv.block_bytes.compressed as f64 * 1024.0 / kv.block_tokens as f64;
    let max = cfg.max_position_embeddings;
    let _ = writeln!(
        o,
        "  one sequence: {} window blocks while it runs ({}, steps of up to {} tokens) + {} of compressed blocks per \
         1K tokens; {} at {max} tokens",
        kv.window_blocks_per_sequence,
        human_bytes(kv.window_bytes()),
        p.max_step,
        human_bytes(per_1k as usize),
        human_bytes(kv.sequence_bytes(cfg, max))
    );
    let weights = p.ranks[p.tightest].loaded_bytes();
    let _ = writeln!(
        o,
        "  KV pool: {} per rank ({} usable{} - {} of weights on rank {}, the fullest), split as `dsv4 serve` splits \
         it: window blocks for the running sequences or an eighth of the pool, the rest compressed blocks",
        bytes(p.pool),
        human_bytes(p.available),
        if p.comm.total() > 0 { " after the communicator buffers" } else { "" },
        human_bytes(weights),
        p.tightest
    );
    let _ = writeln!(o, "  {:>9}  longest context each", "sequences");
    for &(s, c) in &p.fit.by_sequences {
        let note = match c {
            0 => " (their windows do not fit)".to_string(),
            c if c == max => " (the model's context)".to_string(),
            c => format!(" ({})", human_tokens(c)),
        };
        let _ = writeln!(o, "  {s:>9}  {c}{note}");
    }
    let _ = writeln!(o, "  {:>9}  sequences that fit", "context");
    for &(c, s) in &p.fit.by_context {
        let _ = writeln!(o, "  {c:>9}  {s}");
    }
    o
}

/// `256K`, `1M`, `4.5K` tokens.
fn human_tokens(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n >> 10)
    } else if n >= 1024 {
        format!("{:.1}K", n as f64 / 1024.0)
    } else {
        n.to_string()
    }
}

/// One kind's collectives of a [`Traffic`] counted over `per` tokens or steps, per one: how many
/// calls, and the payload of one (the kind's bytes over its calls; said to be an average where
/// the calls' sizes differ: always for all-to-all-v, whose calls carry different things), the
/// kind named as in prose: `9 all-reduces of 256 B each`, `1 all-gather of 544 B`, `3
/// all-to-all-v calls of 333.3 B on average`.
pub(crate) fn kind_calls(kind: CollectiveKind, (calls, bytes): (u64, u64), per: usize) -> String {
    let name = kind.name().replace('_', "-");
    let names = match kind {
        CollectiveKind::AllToAllV => format!("{name} calls"),
        _ => format!("{name}s"),
    };
    // An all-to-all-v's calls differ by design (the rows, their (weight, expert) pairs, the
    // outputs back): never "each".
    let each = match (bytes % calls.max(1) == 0, kind) {
        (true, CollectiveKind::AllToAllV) => format!("{} B on average", bytes / calls.max(1)),
        (true, _) => format!("{} B", bytes / calls.max(1)),
        (false, _) => format!("{:.1} B on average", bytes as f64 / calls as f64),
    };
    let calls = calls as f64 / per.max(1) as f64;
    if calls == 1.0 && kind == CollectiveKind::AllToAllV {
        // One call has no average.
        format!("1 {name} call of {} B", bytes / per.max(1) as u64)
    } else if calls == 1.0 {
        format!("1 {name} of {each}")
    } else if each.ends_with("average") {
        format!("{calls} {names} of {each}")
    } else {
        format!("{calls} {names} of {each} each")
    }
}

/// `t`'s collectives per token or step (`t` counted over `per` of them), kind by kind
/// ([`kind_calls`]): `9 all-reduces of 256 B each, 1 all-gather of 544 B`; `none` without any.
pub(crate) fn kinds(t: &Traffic, per: usize) -> String {
    let parts: Vec<String> = t.by_kind.iter().map(|(&k, &v)| kind_calls(k, v, per)).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Payload bytes per rank of one decode step at a few batch sizes: per kind the calls, the
/// payload of one and the kind's total in the step (`43 all-reduces of 16384 B each = 704512
/// (688.00 KiB)`), then the step's total per token.
fn traffic_section(cfg: &ModelConfig, layout: ParallelLayout) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "decode traffic per rank and step (payload of f32 activations, as the communicator counts it: an all-reduce \
         its buffer, an all-gather this rank's part, an all-to-all-v the rows this rank sends to the others; a ring \
         all-reduce moves about 2(n-1)/n of it each way):"
    );
    let what = match (layout.tp > 1, layout.ep > 1) {
        (false, false) => "  one device: no collectives".to_string(),
        (tp, ep) => {
            let mut w = vec![];
            if ep && layout.data_parallel_attention {
                w.push(format!(
                    "per layer the MoE dispatch and combine over EP {} (data-parallel attention: the batch is this \
                     rank's own tokens, {} rows of {} per token to the experts' ranks and back, expected with every \
                     expert equally likely; no all-gather); per step one all-gather of the group's token counts",
                    layout.ep, cfg.num_experts_per_tok, cfg.hidden_size
                ));
            } else if ep && layout.moe == MoeExchange::AllToAll {
                w.push(format!(
                    "per layer the MoE dispatch and combine over EP {} (--moe-exchange all-to-all: this rank's \
                     slice of the tokens, {} rows of {} per token to the experts' ranks and back, expected with \
                     every expert equally likely; then the slices' all-gather; rank 0's share, the largest slice)",
                    layout.ep, cfg.num_experts_per_tok, cfg.hidden_size
                ));
            } else if ep {
                w.push(format!("per layer the MoE combine over EP {} (tokens x {})", layout.ep, cfg.hidden_size));
            }
            if tp {
                w.push(format!(
                    "per layer the wo_b sum over TP {} (tokens x {}), the embedding's sum and the head's gather of \
                     this rank's {} vocabulary columns",
                    layout.tp,
                    cfg.hidden_size,
                    layout.rank(0).vocab(cfg).len()
                ));
            }
            format!("  {} main layers: {}; MTP not run", cfg.num_layers, w.join("; "))
        }
    };
    let _ = writeln!(o, "{what}");
    if layout.world == 1 {
        return o;
    }
    for tokens in [1, 32] {
        let t = decode_traffic(cfg, layout, tokens);
        let kinds: Vec<String> =
            t.by_kind.iter().map(|(&k, &v)| format!("{} = {}", kind_calls(k, v, 1), bytes(v.1 as usize))).collect();
        let per_token = bytes(t.bytes() as usize / tokens);
        let _ = if layout.data_parallel_attention {
            // Each rank decodes its own batch: the run decodes `world` times as many tokens.
            let run = tokens * layout.world;
            let per_run_token = bytes(t.bytes() as usize / run);
            writeln!(
                o,
                "  batch {tokens:>2} per rank ({run} in the run): {}; {per_token} per token of this rank, \
                 {per_run_token} per token of the run",
                kinds.join(", ")
            )
        } else {
            writeln!(o, "  batch {tokens:>2}: {}; {per_token} per token", kinds.join(", "))
        };
    }
    debug_assert!(decode_traffic(cfg, layout, 1)
        .by_kind
        .keys()
        .all(|k| matches!(k, CollectiveKind::AllReduce | CollectiveKind::AllGather | CollectiveKind::AllToAllV)));
    o
}

/// The whole report, or the weights part and the refusal; `comm`: the collectives' library
/// ([`collective_library`], which reads the environment).
pub fn report(s: &Subject, args: &PlanArgs, comm: CollectiveLibrary) -> Result<String, (String, String)> {
    let layout = args.layout(s.cfg).map_err(|e| (String::new(), format!("{e:#}")))?;
    let input = PlanInput {
        cfg: s.cfg,
        tensors: s.tensors,
        layout,
        kv_dtype: args.kv_dtype(),
        device_memory: args.device_memory,
        utilisation: args.memory_utilization,
        max_step: args.prefill_chunk.max(1),
        comm,
    };
    let ranks = rank_weights(s.cfg, s.tensors, layout);
    let head = weights_section(s, args, layout, comm, &ranks);
    match plan(&input) {
        Ok(p) => Ok(format!("{head}{}{}", state_section(s.cfg, &p), traffic_section(s.cfg, layout))),
        Err(e) => {
            let advice = match (&e, args.soc) {
                // Data-parallel attention keeps TP 1: more devices (EP) is its only split.
                (PlanError::WeightsDoNotFit { .. }, _) if layout.data_parallel_attention => {
                    "Use more devices (a larger EP), or drop --data-parallel-attention to split attention by heads \
                     (--tensor-parallel)."
                }
                (PlanError::WeightsDoNotFit { .. }, WeightTarget::Soc(SocFamily::A2 | SocFamily::A3)) => {
                    "Use more devices, a larger --tensor-parallel, or a smaller weight form (--soc 950 keeps FP8/FP4)."
                }
                (PlanError::WeightsDoNotFit { .. }, WeightTarget::HostF32) => {
                    "Use more devices, a larger --tensor-parallel, or the stored forms (--soc host: without \
                     DSV4_CPU_DEQUANTIZE=1)."
                }
                (PlanError::WeightsDoNotFit { .. }, _) => "Use more devices or a larger --tensor-parallel.",
                (PlanError::StateDoesNotFit { .. }, _) => "Use more devices or a smaller --kv-dtype.",
                (PlanError::CommBuffersDoNotFit { .. }, _) => {
                    "Lower HCCL_BUFFSIZE (MiB per send and per receive buffer; HCCL's default is 200)."
                }
            };
            let fewest = match fewest_devices(&input, 1024) {
                Some(l) => format!(" With TP {}, {} devices of this size fit (EP {}).", l.tp, l.world, l.ep),
                None => String::new(),
            };
            let msg =
                format!("{} on {} × {}: {e}.{fewest} {advice}", s.name, layout.world, human_bytes(args.device_memory));
            Err((head, msg))
        }
    }
}

pub fn run(spec: &str, args: &PlanArgs) -> Result<()> {
    args.checked_kv_dtype()?;
    let dir = Path::new(spec);
    let config_only = spec != builtin::TINY_NAME
        && dir.join("config.json").exists()
        && !std::fs::read_dir(dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or(spec).to_string();
    let (cfg, tensors, source) = if config_only {
        let cfg = crate::load::config_from_dir(dir)?;
        let tensors = official_tensors(&cfg, args.soc);
        (cfg, tensors, CONFIG_ONLY.to_string())
    } else {
        let (cfg, ckpt) = crate::load::open(spec)?;
        let tensors = checkpoint_tensors(&cfg, &ckpt, args.soc)
            .map_err(|e| anyhow::anyhow!("{e}; `dsv4 inspect --model {spec}` lists what the checkpoint lacks"))?;
        (cfg, tensors, "this checkpoint's stored forms".to_string())
    };
    let subject = Subject { name: &name, source: &source, cfg: &cfg, tensors: &tensors };
    let comm = collective_library(args.soc, args.layout(&cfg)?)?;
    match report(&subject, args, comm) {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err((head, msg)) => {
            print!("{head}");
            bail!("{msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PlanArgs,
    }

    fn args(line: &str) -> PlanArgs {
        Cli::try_parse_from(std::iter::once("plan").chain(line.split_whitespace())).unwrap().args
    }

    fn config(name: &str) -> ModelConfig {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name);
        ModelConfig::from_dir(&dir).unwrap()
    }

    /// The report for a config-only directory: Ok(text) or Err(text + "error: " + message).
    fn plan_of(name: &str, line: &str) -> std::result::Result<String, String> {
        let cfg = config(name);
        let a = args(line);
        let tensors = official_tensors(&cfg, a.soc);
        let s = Subject { name, source: CONFIG_ONLY, cfg: &cfg, tensors: &tensors };
        // HCCL's buffers at HCCL_BUFFSIZE's default, whatever this machine's environment says.
        let comm = match a.soc {
            WeightTarget::Soc(_) => CollectiveLibrary::Hccl { buffsize_mb: None },
            WeightTarget::Cuda => CollectiveLibrary::Nccl,
            _ => CollectiveLibrary::InProcess,
        };
        report(&s, &a, comm).map_err(|(head, msg)| format!("{head}error: {msg}\n"))
    }

    #[test]
    fn plan_flash_on_8_910b() {
        let r = plan_of("deepseek-v4-flash", "--devices 8 --device-memory 64GiB --soc 910b --precision bf16").unwrap();
        insta::assert_snapshot!("plan_flash_8x910b_64gib", r);
    }

    #[test]
    fn plan_pro_on_16_a3_dies_is_refused() {
        let r =
            plan_of("deepseek-v4-pro", "--devices 16 --device-memory 64GiB --soc 910c --precision bf16").unwrap_err();
        assert!(r.contains("error: deepseek-v4-pro on 16 × 64.00 GiB: rank 0 needs "), "{r}");
        insta::assert_snapshot!("plan_pro_16x910c_refused", r);
    }

    /// On CUDA: the weights in the CUDA backend's forms (FP8/FP4 with E8M0 scales as BF16), fp8
    /// rows under the official precision (the CUDA backend has them); eight GPUs run over NCCL.
    #[test]
    fn plan_flash_on_8_cuda() {
        let r =
            plan_of("deepseek-v4-flash", "--devices 8 --device-memory 141GB --soc cuda --precision official").unwrap();
        assert!(r.contains("weights in the forms of CUDA (FP8/FP4 dequantised to BF16)\n"), "{r}");
        assert!(r.contains("decoding state, --kv-dtype fp8,"), "{r}");
        insta::assert_snapshot!("plan_flash_8xcuda_141gb", r);
        // One GPU does not hold V4-Flash in BF16; the advice names no Ascend SoC.
        let e = plan_of("deepseek-v4-flash", "--devices 1 --device-memory 141GB --soc cuda").unwrap_err();
        assert!(e.starts_with("plan: deepseek-v4-flash (config only"), "{e}");
        assert!(!e.contains("what-if)") && e.contains("weights in the forms of CUDA (FP8/FP4 dequantised to BF16)\n"));
        assert!(e.contains("short by 423.81 GiB. With TP 1, 6 devices of this size fit (EP 6)."), "{e}");
        assert!(e.contains("Use more devices or a larger --tensor-parallel.") && !e.contains("--soc 950"), "{e}");
    }

    /// Data-parallel attention: the layout line names it, the state and traffic sections count
    /// each rank's own sequences and tokens, and a layout that does not fit is told to add
    /// devices (TP, which it refuses, is not offered), with a suggestion that keeps it.
    #[test]
    fn plan_with_data_parallel_attention() {
        let r = plan_of("deepseek-v4-flash", "--devices 8 --device-memory 64GB --data-parallel-attention").unwrap();
        assert!(r.contains("EP 8 (all ranks); data-parallel attention (each rank runs its own sequences"), "{r}");
        assert!(r.contains("each rank holds the state of its own sequences, so the run holds 8 times"), "{r}");
        assert!(r.contains("batch 32 per rank (256 in the run): "), "{r}");
        assert!(r.contains("7.06 MiB) per token of this rank, 924897 (903.22 KiB) per token of the run"), "{r}");
        let e = plan_of("deepseek-v4-flash", "--devices 2 --device-memory 64GB --data-parallel-attention").unwrap_err();
        assert!(
            e.contains("With TP 1, 4 devices of this size fit (EP 4). Use more devices (a larger EP), or drop"),
            "{e}"
        );
        assert!(!e.contains("a larger --tensor-parallel"), "{e}");
        let e = plan_of("deepseek-v4-flash", "--device-memory 64GB --data-parallel-attention").unwrap_err();
        assert!(e.contains("give --devices N (N > 1) as well"), "{e}");
    }

    /// The traffic lines say, per kind, how many calls, the payload of one call and the kind's
    /// total in the step (then the step's payload per token), in `dsv4 bench`'s words.
    #[test]
    fn traffic_lines_say_the_calls_the_size_of_each_and_the_total() {
        let mut t = Traffic::default();
        for _ in 0..9 {
            t.record(CollectiveKind::AllReduce, 256);
        }
        t.record(CollectiveKind::AllGather, 544);
        assert_eq!(kinds(&t, 1), "9 all-reduces of 256 B each, 1 all-gather of 544 B");
        assert_eq!(kinds(&t.times(4), 4), "9 all-reduces of 256 B each, 1 all-gather of 544 B");
        assert_eq!(kinds(&t, 2), "4.5 all-reduces of 256 B each, 0.5 all-gathers of 544 B each");
        assert_eq!(kinds(&Traffic::default(), 1), "none");
        assert_eq!(kind_calls(CollectiveKind::AllToAllV, (2, 1000), 1), "2 all-to-all-v calls of 500 B on average");
        assert_eq!(kind_calls(CollectiveKind::AllToAllV, (3, 1000), 1), "3 all-to-all-v calls of 333.3 B on average");
        assert_eq!(kind_calls(CollectiveKind::AllToAllV, (2, 1000), 2), "1 all-to-all-v call of 500 B");
        assert_eq!(kind_calls(CollectiveKind::Barrier, (2, 0), 1), "2 barriers of 0 B each");
        let cfg = config("deepseek-v4-flash");
        let text = traffic_section(&cfg, ParallelLayout::new(8, 1, 8, &cfg).unwrap());
        assert!(
            text.contains(
                "  batch  1: 43 all-reduces of 16384 B each = 704512 (688.00 KiB); 704512 (688.00 KiB) per token\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  batch 32: 43 all-reduces of 524288 B each = 22544384 (21.50 MiB); 704512 (688.00 KiB) per token\n"
            ),
            "{text}"
        );
        let cfg = config("deepseek-v4-pro");
        let text = traffic_section(&cfg, ParallelLayout::new(48, 16, 48, &cfg).unwrap());
        assert!(
            text.contains(
                "  batch  1: 123 all-reduces of 28672 B each = 3526656 (3.36 MiB), 1 all-gather of 32320 B = 32320 \
                 (31.56 KiB); 3558976 (3.39 MiB) per token\n"
            ),
            "{text}"
        );
        assert!(!text.contains("all_"), "{text}");
        assert_eq!(traffic_section(&cfg, ParallelLayout::SINGLE).lines().count(), 2);
    }

    /// 32 dies do not hold V4-Pro in the A3 forms even with the heads split 16 ways (the INT8
    /// experts alone take 47.8 GiB a rank); 48 do.
    #[test]
    fn plan_pro_on_32_and_48_a3_dies() {
        let r = plan_of(
            "deepseek-v4-pro",
            "--devices 32 --tensor-parallel 16 --device-memory 64GiB --soc 910c --precision bf16",
        )
        .unwrap_err();
        assert!(r.contains("short by 5.65 GiB. With TP 16, 48 devices of this size fit (EP 48)."), "{r}");
        insta::assert_snapshot!("plan_pro_32x910c_tp16_refused", r);
        let r = plan_of(
            "deepseek-v4-pro",
            "--devices 48 --tensor-parallel 16 --device-memory 64GiB --soc 910c --precision bf16",
        )
        .unwrap();
        insta::assert_snapshot!("plan_pro_48x910c_tp16", r);
    }

    /// One device: the weights are `dsv4 inspect --soc`'s total (MTP included), byte for byte.
    #[test]
    fn plan_on_one_device_counts_what_inspect_counts() {
        for name in ["deepseek-v4-flash", "deepseek-v4-pro"] {
            let cfg = config(name);
            for soc in [SocFamily::A2, SocFamily::A5] {
                let inspect = crate::inspect::device_bytes_report(&cfg, None, soc);
                let total = inspect.lines().find_map(|l| l.trim().strip_prefix("total ")).unwrap();
                let total: usize = total.split_whitespace().next().unwrap().parse().unwrap();
                let tensors = official_tensors(&cfg, WeightTarget::Soc(soc));
                let w = &rank_weights(&cfg, &tensors, ParallelLayout::SINGLE)[0];
                assert_eq!(w.loaded_bytes(), total, "{name} {soc:?}");
            }
        }
    }

    #[test]
    fn plan_flags() {
        let a = args("--devices 8 --device-memory 64GB");
        assert_eq!(a.device_memory, 64_000_000_000);
        assert_eq!((a.parallel.world(), a.parallel.expert_parallel, a.parallel.tensor_parallel), (8, None, 1));
        assert_eq!(a.memory_utilization, 0.9);
        assert_eq!(a.soc, WeightTarget::Host);
        // cuda: the CUDA backend's forms, fp8 rows by default under the official precision (the
        // CUDA backend has them), and --device-memory required as on every target.
        let a = args("--devices 1 --device-memory 141GB --soc cuda --precision official");
        assert_eq!((a.soc, a.device_memory, a.kv_dtype()), (WeightTarget::Cuda, 141_000_000_000, KvDtype::Fp8));
        assert_eq!(a.checked_kv_dtype().unwrap(), KvDtype::Fp8);
        assert_eq!(args("--devices 1 --device-memory 1G --soc CUDA --precision bf16").kv_dtype(), KvDtype::Bf16);
        for line in ["--devices 1 --soc cuda", "--devices 1 --device-memory 1G --soc h100"] {
            assert!(Cli::try_parse_from(std::iter::once("plan").chain(line.split_whitespace())).is_err(), "{line}");
        }
        assert_eq!(args("--devices 1 --device-memory 68719476736").device_memory, 64 << 30);
        assert_eq!(args("--devices 1 --device-memory 64GiB --precision official").kv_dtype(), KvDtype::Fp8);
        assert_eq!(args("--devices 1 --device-memory 64GiB --precision official --soc 910b").kv_dtype(), KvDtype::Bf16);
        assert_eq!(args("--devices 1 --device-memory 64GiB --precision bf16").kv_dtype(), KvDtype::Bf16);
        assert_eq!(args("--devices 1 --device-memory 1G --kv-dtype fp8 --soc 950").kv_dtype(), KvDtype::Fp8);
        // ... which only the 950 holds among Ascend devices: the plan refuses it on A2/A3.
        assert_eq!(
            args("--devices 1 --device-memory 1G --kv-dtype fp8 --soc 950").checked_kv_dtype().unwrap(),
            KvDtype::Fp8
        );
        assert_eq!(args("--devices 1 --device-memory 64GiB --precision official --soc 950").kv_dtype(), KvDtype::Fp8);
        for soc in ["910b", "910c"] {
            let e = args(&format!("--devices 1 --device-memory 1G --kv-dtype fp8 --soc {soc}")).checked_kv_dtype();
            assert!(format!("{:#}", e.unwrap_err()).contains("--kv-dtype bf16"), "{soc}");
        }
        assert_eq!(args("--devices 1 --device-memory 1G --kv-dtype fp8").checked_kv_dtype().unwrap(), KvDtype::Fp8);
        for bad in ["--device-memory 0.5", "--device-memory 64parsecs", "--memory-utilization 1.5"] {
            let line = format!("--devices 2 --device-memory 1GiB {bad}");
            assert!(Cli::try_parse_from(std::iter::once("plan").chain(line.split_whitespace())).is_err(), "{bad}");
        }
        assert_eq!(rank_list(&[0, 1, 2, 3]), "0-3");
        assert_eq!(rank_list(&[0, 1, 4, 6, 7]), "0-1, 4, 6-7");
    }

    /// The plan's decode traffic is what the CPU communicators count: the built-in tiny model
    /// split over ranks of the in-process communicator, two sequences prefilled, then one decode
    /// step of both (2 tokens); every rank's TP and EP traffic over that step equals
    /// `rank_decode_traffic` for 2 tokens.
    #[test]
    fn plan_decode_traffic_matches_the_cpu_communicator() {
        use dsv4_backend_cpu::CpuBackend;
        use dsv4_core::kv::KvConfig;
        use dsv4_core::model::Logits;
        use dsv4_core::parallel::plan::rank_decode_traffic;
        use dsv4_core::parallel::{run_local, RankContext, Traffic};
        use dsv4_core::{Batch, Model};

        let (cfg, ckpt) = builtin::tiny().unwrap();
        let both = |ctx: &RankContext<CpuBackend>| {
            let mut t = Traffic::default();
            for c in [&ctx.tp, &ctx.ep].into_iter().flatten() {
                for (k, (calls, b)) in c.traffic().by_kind {
                    let e = t.by_kind.entry(k).or_default();
                    e.0 += calls;
                    e.1 += b;
                }
            }
            t
        };
        let layouts = [(2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 1, 4)].map(|(w, t, e)| ParallelLayout::new(w, t, e, &cfg));
        let dispatch = [(2, 1, 2), (4, 2, 2), (4, 1, 4)]
            .map(|(w, t, e)| ParallelLayout::new(w, t, e, &cfg).map(|l| l.with_moe(MoeExchange::AllToAll)));
        // Data-parallel attention: every rank steps two sequences of its own.
        let data_parallel = [(2, 1, 2), (4, 1, 4), (4, 1, 2)]
            .map(|(w, t, e)| ParallelLayout::new(w, t, e, &cfg).and_then(|l| l.with_data_parallel_attention()));
        for layout in layouts.into_iter().chain(dispatch).chain(data_parallel) {
            let layout = layout.unwrap();
            let counted = run_local(layout, |ctx: RankContext<CpuBackend>| {
                let be = CpuBackend::new();
                let model = Model::load_rank(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx.clone())?;
                let kv = KvConfig::for_sequences(&cfg, KvDtype::F32, 2, 16, 8);
                let mut cache = model.new_cache(&be, kv)?;
                let (mut a, mut b) = (cache.new_sequence(), cache.new_sequence());
                let (pa, pb): (&[u32], &[u32]) = (&[5, 17, 42, 7, 9], &[3, 1, 4, 1, 5, 9, 2]);
                model.step(&be, &Batch::new(&[(pa, 0)])?, &mut cache, &mut [&mut a], Logits::LastPerSequence)?;
                model.step(&be, &Batch::new(&[(pb, 0)])?, &mut cache, &mut [&mut b], Logits::LastPerSequence)?;
                let before = both(&ctx);
                let step = Batch::new(&[(&[11], pa.len()), (&[13], pb.len())])?;
                model.step(&be, &step, &mut cache, &mut [&mut a, &mut b], Logits::LastPerSequence)?;
                Ok::<_, dsv4_core::Error>((ctx.layout, both(&ctx).since(&before)))
            })
            .unwrap();
            for (rank, traffic) in counted {
                assert!(traffic.calls() > 0, "{layout:?}");
                let planned = rank_decode_traffic(&cfg, &rank, 2);
                if layout.moe == MoeExchange::AllReduce {
                    assert_eq!(traffic, planned, "{layout:?} rank {}", rank.rank);
                    continue;
                }
                // The all-to-all-v bytes follow the routing: at most this rank's slice's pairs
                // out (rows and their two values) and every other slice's pairs back (with
                // data-parallel attention the slices are every rank's own 2 tokens).
                let a2a = CollectiveKind::AllToAllV;
                let (mut c, mut p) = (traffic.clone(), planned.clone());
                let (calls, bytes) = c.by_kind.remove(&a2a).unwrap();
                assert_eq!((calls, p.by_kind.remove(&a2a).unwrap().0), (3 * cfg.num_layers as u64, calls));
                assert_eq!(c, p, "{layout:?} rank {}", rank.rank);
                let (k, d) = (cfg.num_experts_per_tok, cfg.hidden_size);
                let (mine, others) = match layout.data_parallel_attention {
                    true => (2, 2 * (layout.ep - 1)),
                    false => {
                        let mine = dsv4_core::parallel::layout::split(2, layout.ep, rank.ep_rank).len();
                        (mine, 2 - mine)
                    }
                };
                let most = (mine * k * (d + 2) + others * k * d) * 4 * cfg.num_layers;
                assert!(bytes <= most as u64, "{layout:?} rank {}: {bytes} > {most}", rank.rank);
            }
        }
    }

    #[test]
    fn plan_refuses_impossible_layouts_by_name() {
        let e = plan_of("deepseek-v4-flash", "--devices 8 --tensor-parallel 3 --device-memory 64GiB").unwrap_err();
        assert!(e.contains("TP 3 does not divide the 8 devices"), "{e}");
        let e = plan_of("deepseek-v4-flash", "--devices 2 --device-memory 64GiB --soc host-f32").unwrap_err();
        assert!(e.contains("short by") && e.contains("Use more devices"), "{e}");
    }
}
