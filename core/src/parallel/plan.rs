//! A per-device memory plan: what each rank of a [`ParallelLayout`] holds of the weights (bytes
//! by device form), what the rest of its memory holds of the decoding state, how many sequences
//! of what length that is, and what one decode step puts into the collectives. Pure arithmetic
//! on the config and the tensor list; `dsv4 plan` prints it.
//!
//! The split follows [`super`]'s rules: per rank, `RankLayout::vocab` rows of `embed.weight` and
//! `head.weight`; per layer the rows of `wq_b` of its heads, the rows of `wo_a` and the columns
//! of `wo_b` of its output groups, its heads' `attn_sink`, and its routed experts; everything
//! else (`wq_a`, `wkv`, norms, compressors, indexers, routers, shared experts, mHC) replicated.
//! A rank's part of an FP8 (128×128 block scales) or FP4 (1×32 group scales) matrix holds the
//! scales of every block or group its rows and columns touch: a partial block counts as a whole
//! block of scales. (The loader dequantises a cut through a block to F32 instead, see
//! [`super::shard`]; V4's head, group and vocabulary cuts never fall inside a block except the
//! vocabulary's, which is BF16.)
//!
//! Every rank holds the whole decoding state of every sequence (activations are replicated and
//! the K = V head, the compressors and the indexer are not split), so the KV bytes of a sequence
//! are the single-device footprint on every rank, and the ranks serve the same sequences.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::layout::{block_bytes, default_block_tokens, has_compressed, BlockBytes};
use crate::kv::{human_bytes, KvConfig, KvDtype};
use crate::model::loader::{expected_mtp_tensors, expected_tensors, mtp_layers_present, stored_weight, TensorRole};
use crate::parallel::comm::{CollectiveKind, Traffic};
use crate::parallel::layout::{split, MoeExchange, ParallelLayout, RankLayout};
use crate::tensor::{DType, StoredWeight, WeightFormat};
use crate::weight_forms::{official_stored_form, DeviceForm, SocFamily, FP8_BF16_EXACT_SCALES};

/// Where the weights live and in what form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightTarget {
    /// The CPU backend: every weight in its stored form (FP8 with its block scales, FP4 packed
    /// two per byte with its group scales), decoded inside the GEMM.
    Host,
    /// The CPU backend with `DSV4_CPU_DEQUANTIZE=1`: every weight dequantised to f32.
    HostF32,
    /// An Ascend SoC family, each matrix in the form [`DeviceForm::for_stored`] gives.
    Soc(SocFamily),
    /// The CUDA backend (`backend-cuda/src/weights.rs`): F32 and BF16 as stored, F16 and F64
    /// as F32, FP8 blocks and FP4 groups dequantised to BF16 (E8M0 scales: the values are
    /// BF16 values; other scales are counted as F32).
    Cuda,
}

impl WeightTarget {
    /// `host`, `host-f32`, `cuda`, or a `--soc` name (`910b`, `910c`, `950`, `Ascend910B3`, ...).
    pub fn from_name(s: &str) -> Option<WeightTarget> {
        match s.trim().to_ascii_lowercase().as_str() {
            "host" | "cpu" => Some(WeightTarget::Host),
            "host-f32" | "cpu-f32" => Some(WeightTarget::HostF32),
            "cuda" => Some(WeightTarget::Cuda),
            other => SocFamily::from_name(other).map(WeightTarget::Soc),
        }
    }

    pub fn name(self) -> String {
        match self {
            WeightTarget::Host => "host (CPU backend, stored forms)".into(),
            WeightTarget::HostF32 => "host (CPU backend, dequantised to f32)".into(),
            WeightTarget::Soc(soc) => format!("Ascend {}", soc.name()),
            WeightTarget::Cuda => "CUDA (FP8/FP4 dequantised to BF16)".into(),
        }
    }

    /// The form this target keeps for a weight stored as `format` (element dtype `dtype`, scale
    /// dtype `scale`).
    pub fn form(self, format: WeightFormat, dtype: DType, scale: Option<DType>) -> DeviceForm {
        match self {
            // The stored form is what the 950 keeps natively.
            WeightTarget::Host => DeviceForm::for_stored(format, dtype, scale, SocFamily::A5),
            WeightTarget::HostF32 => DeviceForm::F32,
            WeightTarget::Soc(soc) => DeviceForm::for_stored(format, dtype, scale, soc),
            WeightTarget::Cuda => match (format, dtype) {
                (WeightFormat::Float, DType::BF16) => DeviceForm::Bf16,
                (WeightFormat::Float, _) => DeviceForm::F32,
                _ if scale == Some(DType::F8E8M0) => DeviceForm::Bf16,
                _ => DeviceForm::F32,
            },
        }
    }

    /// Whether its backend stores fp8 KV rows: the CPU and CUDA backends do, Ascend's on the 950
    /// only (A2/A3 have no FLOAT8_E4M3FN casts; `backend-ascend/src/pool.rs`).
    pub fn has_fp8_kv_rows(self) -> bool {
        !matches!(self, WeightTarget::Soc(soc) if soc != SocFamily::A5)
    }
}

/// One tensor that loading reads and a device keeps, with the form it keeps it in.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanTensor {
    pub name: String,
    /// Logical shape (for packed FP4 the stored inner dimension is half).
    pub shape: Vec<usize>,
    pub form: DeviceForm,
    /// Part of an MTP block (`mtp.{i}.*`).
    pub mtp: bool,
}

/// The tensors of an official V4 release of `cfg` (spec §D.2 stored forms), MTP block(s)
/// included as the config announces them: what `dsv4 inspect --soc` counts for a config-only
/// directory. Small parameters are f32; `tid2eid` tables stay on the host and are left out.
pub fn official_tensors(cfg: &ModelConfig, target: WeightTarget) -> Vec<PlanTensor> {
    let empty = Checkpoint::from_tensors(vec![]).expect("an empty checkpoint");
    let mut expected = expected_tensors(cfg, &empty);
    for i in 0..cfg.num_mtp_layers {
        expected.extend(expected_mtp_tensors(cfg, &empty, i));
    }
    expected
        .into_iter()
        .filter_map(|e| {
            let form = match e.role {
                TensorRole::Ints => return None,
                TensorRole::Param => DeviceForm::F32,
                TensorRole::Weight | TensorRole::FusedExperts => {
                    let (format, dtype, scale) = official_stored_form(&e.name);
                    target.form(format, dtype, scale)
                }
            };
            Some(PlanTensor { mtp: e.name.starts_with("mtp."), name: e.name, shape: e.shape, form })
        })
        .collect()
}

/// The tensors of a checkpoint as loading reads them (its MTP layers included), each in the
/// form `target` keeps it, with the Ascend backend's fallbacks: FP8 → BF16 needs every scale
/// byte in [`FP8_BF16_EXACT_SCALES`] (else F32), FP4 → INT8 whole groups (else BF16). Errors on
/// a tensor loading would refuse (`dsv4 inspect` lists them all).
pub fn checkpoint_tensors(cfg: &ModelConfig, ckpt: &Checkpoint, target: WeightTarget) -> Result<Vec<PlanTensor>> {
    let mut expected = expected_tensors(cfg, ckpt);
    for i in mtp_layers_present(cfg, ckpt) {
        expected.extend(expected_mtp_tensors(cfg, ckpt, i));
    }
    let mut out = vec![];
    for e in expected {
        let form = match e.role {
            TensorRole::Ints => continue,
            TensorRole::Param => {
                ckpt.require(&e.name, &e.shape)?;
                DeviceForm::F32
            }
            TensorRole::FusedExperts => {
                let t = ckpt.require(&e.name, &e.shape)?;
                target.form(WeightFormat::Float, t.dtype, None)
            }
            TensorRole::Weight => checked_form(&stored_weight(ckpt, &e.name, &e.shape)?, target),
        };
        out.push(PlanTensor { mtp: e.name.starts_with("mtp."), name: e.name, shape: e.shape, form });
    }
    Ok(out)
}

/// [`WeightTarget::form`] of a checkpoint's weight, with the Ascend backend's fallbacks on its
/// data on an Ascend target ([`crate::weight_forms::checkpoint_form`]).
fn checked_form(w: &StoredWeight, target: WeightTarget) -> DeviceForm {
    match target {
        WeightTarget::Soc(soc) => crate::weight_forms::checkpoint_form(w, soc),
        WeightTarget::Cuda => {
            let form = target.form(w.format, w.data.dtype, w.scale.as_ref().map(|s| s.dtype));
            // FP8 codes times a scale past BF16's range ends are not BF16 values: the CUDA
            // backend keeps such a weight as F32.
            let in_range = |s: &crate::tensor::HostTensor| s.bytes().iter().all(|b| FP8_BF16_EXACT_SCALES.contains(b));
            match (form, w.format) {
                (DeviceForm::Bf16, WeightFormat::Fp8Block { .. }) if !w.scale.as_ref().is_some_and(in_range) => {
                    DeviceForm::F32
                }
                _ => form,
            }
        }
        _ => target.form(w.format, w.data.dtype, w.scale.as_ref().map(|s| s.dtype)),
    }
}

/// How a tensor is divided between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Vocabulary rows over the TP group (`embed.weight`, `head.weight`).
    Vocab,
    /// Query heads / output groups over the TP group (`wq_b`, `wo_a`, `wo_b`, `attn_sink`).
    Heads,
    /// Routed experts over the EP group.
    Experts,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Replicated => "replicated",
            Split::Vocab => "vocabulary rows",
            Split::Heads => "attention heads",
            Split::Experts => "routed experts",
        }
    }
}

/// The part of a 2-D view `[rows, cols]` of a tensor one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub split: Split,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// What `rank` holds of tensor `name` of logical shape `shape`, seen as `[shape[0], rest]`
/// (`[n, 1]` for a vector), or None when it holds none of it (another rank's expert).
pub fn held(cfg: &ModelConfig, rank: &RankLayout, name: &str, shape: &[usize]) -> Option<Held> {
    let n = shape.first().copied().unwrap_or(1);
    let k: usize = shape.iter().skip(1).product();
    let all = |split| Some(Held { split, rows: 0..n, cols: 0..k });
    let rows = |split, rows| Some(Held { split, rows, cols: 0..k });
    // The part after `layers.{i}.` / `mtp.{i}.`; top-level names have none.
    let local = ["layers.", "mtp."].iter().find_map(|p| name.strip_prefix(p)?.split_once('.').map(|(_, rest)| rest));
    let Some(rest) = local else {
        return match name {
            "embed.weight" | "head.weight" => rows(Split::Vocab, rank.vocab(cfg)),
            _ => all(Split::Replicated),
        };
    };
    let (hd, r) = (cfg.head_dim, cfg.o_lora_rank);
    let (heads, groups) = (rank.heads(cfg), rank.groups(cfg));
    match rest {
        "attn.wq_b.weight" => rows(Split::Heads, heads.start * hd..heads.end * hd),
        "attn.wo_a.weight" => rows(Split::Heads, groups.start * r..groups.end * r),
        "attn.wo_b.weight" => Some(Held { split: Split::Heads, rows: 0..n, cols: groups.start * r..groups.end * r }),
        "attn.attn_sink" => rows(Split::Heads, heads),
        // transformers' fused experts `[E, ..]`: the rank's experts are rows of dim 0.
        "ffn.experts.gate_up_proj" | "ffn.experts.down_proj" => rows(Split::Experts, rank.experts(cfg)),
        _ => match rest.strip_prefix("ffn.experts.").and_then(|e| e.split('.').next()?.parse::<usize>().ok()) {
            Some(e) if rank.experts(cfg).contains(&e) => all(Split::Experts),
            Some(_) => None,
            None => all(Split::Replicated),
        },
    }
}

/// Blocks of `b` that `r` touches.
fn blocks(r: &Range<usize>, b: usize) -> usize {
    if r.is_empty() {
        0
    } else {
        r.end.div_ceil(b) - r.start / b
    }
}

/// Device bytes of rows `rows` × columns `cols` of a matrix kept as `form`: the values, and the
/// scales of every block (FP8, square blocks) or group (FP4 / INT8, along the columns) the part
/// touches. For a whole matrix whose sides are multiples of the block this is
/// `form.bytes_per_param() × rows × cols` exactly.
pub fn part_bytes(form: DeviceForm, rows: &Range<usize>, cols: &Range<usize>) -> usize {
    let elems = rows.len() * cols.len();
    match form {
        DeviceForm::Bf16 | DeviceForm::F16 => 2 * elems,
        DeviceForm::F32 => 4 * elems,
        DeviceForm::Fp8Blocks { scale_bytes, block } => {
            let side = block.isqrt();
            debug_assert_eq!(side * side, block, "FP8 blocks are square");
            elems + blocks(rows, side) * blocks(cols, side) * scale_bytes
        }
        DeviceForm::Mxfp4 { group } => elems.div_ceil(2) + rows.len() * blocks(cols, group),
        DeviceForm::Int8Groups { group } => elems + rows.len() * blocks(cols, group) * 2,
    }
}

/// Tensors, parameters and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub tensors: usize,
    pub params: usize,
    pub bytes: usize,
}

impl Count {
    fn add(&mut self, params: usize, bytes: usize) {
        self.tensors += 1;
        self.params += params;
        self.bytes += bytes;
    }
}

/// What one rank holds of the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankWeights {
    pub rank: RankLayout,
    /// The main model (what every run loads), by device form.
    pub by_form: BTreeMap<DeviceForm, Count>,
    /// The main model by how it is divided.
    pub by_split: BTreeMap<Split, Count>,
    /// The MTP block(s), by device form.
    pub mtp: BTreeMap<DeviceForm, Count>,
    /// Whether the MTP block is loaded: single-device runs load it, multi-rank runs do not yet.
    pub mtp_loaded: bool,
}

impl RankWeights {
    pub fn main(&self) -> Count {
        sum(self.by_form.values())
    }

    pub fn mtp_total(&self) -> Count {
        sum(self.mtp.values())
    }

    /// Bytes the rank's device holds: the main model, and the MTP block when it is loaded.
    pub fn loaded_bytes(&self) -> usize {
        self.main().bytes + if self.mtp_loaded { self.mtp_total().bytes } else { 0 }
    }

    /// The same holdings up to the rank's id (for folding ranks into one row).
    pub fn same_amounts(&self, other: &RankWeights) -> bool {
        (&self.by_form, &self.by_split, &self.mtp) == (&other.by_form, &other.by_split, &other.mtp)
    }
}

fn sum<'a>(counts: impl Iterator<Item = &'a Count>) -> Count {
    counts.fold(Count::default(), |a, c| Count {
        tensors: a.tensors + c.tensors,
        params: a.params + c.params,
        bytes: a.bytes + c.bytes,
    })
}

/// What every rank of `layout` holds of `tensors`.
pub fn rank_weights(cfg: &ModelConfig, tensors: &[PlanTensor], layout: ParallelLayout) -> Vec<RankWeights> {
    (0..layout.world).map(|r| rank_weights_of(cfg, tensors, layout.rank(r))).collect()
}

/// The loaded bytes of the rank of `layout` holding the most of `tensors` (0 with no rank).
pub fn fullest_rank_bytes(cfg: &ModelConfig, tensors: &[PlanTensor], layout: ParallelLayout) -> usize {
    rank_weights(cfg, tensors, layout).iter().map(RankWeights::loaded_bytes).max().unwrap_or(0)
}

/// What `rank` holds of `tensors`.
pub fn rank_weights_of(cfg: &ModelConfig, tensors: &[PlanTensor], rank: RankLayout) -> RankWeights {
    let mut w = RankWeights {
        rank,
        by_form: BTreeMap::new(),
        by_split: BTreeMap::new(),
        mtp: BTreeMap::new(),
        mtp_loaded: rank.layout.world == 1,
    };
    for t in tensors {
        let Some(h) = held(cfg, &rank, &t.name, &t.shape) else { continue };
        let (params, bytes) = (h.rows.len() * h.cols.len(), part_bytes(t.form, &h.rows, &h.cols));
        if t.mtp {
            w.mtp.entry(t.form).or_default().add(params, bytes);
        } else {
            w.by_form.entry(t.form).or_default().add(params, bytes);
            w.by_split.entry(h.split).or_default().add(params, bytes);
        }
    }
    w
}

/// Device memory a rank's collective library holds for its communicators, outside dsv4's
/// own allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommBuffers {
    /// Communicators the rank holds.
    pub communicators: usize,
    /// Bytes each holds.
    pub bytes_each: usize,
}

/// HCCL_BUFFSIZE's default, in MB (2^20 bytes: CANN's environment variable reference).
pub const HCCL_BUFFSIZE_DEFAULT_MB: usize = 200;

impl CommBuffers {
    pub const NONE: CommBuffers = CommBuffers { communicators: 0, bytes_each: 0 };

    pub fn total(&self) -> usize {
        self.communicators.saturating_mul(self.bytes_each)
    }

    /// What HCCL holds on a rank of `layout`: "each communicator occupies 2 × HCCL_BUFFSIZE
    /// memory, used for receiving and sending" (CANN's environment variable reference,
    /// HCCL_BUFFSIZE; `buffsize_mb` when set, else 200 MB), and a rank holds the world
    /// communicator and, where they have more than one rank, its TP and EP groups'
    /// ([`super::RankContext::new`]). Nothing on one device.
    pub fn hccl(layout: ParallelLayout, buffsize_mb: Option<usize>) -> CommBuffers {
        if layout.world == 1 {
            return CommBuffers::NONE;
        }
        let communicators = 1 + usize::from(layout.tp > 1) + usize::from(layout.ep > 1);
        let mb = buffsize_mb.unwrap_or(HCCL_BUFFSIZE_DEFAULT_MB);
        // Saturating: an absurd HCCL_BUFFSIZE then fills any device (refused by `plan`).
        CommBuffers { communicators, bytes_each: mb.saturating_mul(2 << 20) }
    }
}

/// The library a layout's collectives run on, for the device memory it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveLibrary {
    /// The CPU backend's in-process communicator: host memory, nothing held.
    InProcess,
    /// HCCL, with `HCCL_BUFFSIZE` in MB when set.
    Hccl { buffsize_mb: Option<usize> },
    /// NCCL. Its buffers (`NCCL_BUFFSIZE`, 4 MiB by default, per channel and peer connection,
    /// channels and connections chosen at run time from the topology) are not counted: the
    /// share of memory the plan leaves (`--memory-utilization`) must hold them.
    Nccl,
}

impl CollectiveLibrary {
    /// What the library holds on a rank of `layout`.
    pub fn buffers(self, layout: ParallelLayout) -> CommBuffers {
        match self {
            CollectiveLibrary::Hccl { buffsize_mb } => CommBuffers::hccl(layout, buffsize_mb),
            CollectiveLibrary::InProcess | CollectiveLibrary::Nccl => CommBuffers::NONE,
        }
    }
}

/// What a plan is asked.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub cfg: &'a ModelConfig,
    pub tensors: &'a [PlanTensor],
    pub layout: ParallelLayout,
    pub kv_dtype: KvDtype,
    /// Bytes of one device.
    pub device_memory: usize,
    /// The share of it the plan may use, in (0, 1] (vLLM's `gpu_memory_utilization`); the rest
    /// is left for activations, workspaces and the runtime.
    pub utilisation: f64,
    /// Most tokens one sequence feeds in one step (`serve --prefill-chunk`): the window blocks
    /// a running sequence needs.
    pub max_step: usize,
    /// The collectives' library: what it holds on each rank is taken from the usable memory
    /// first.
    pub comm: CollectiveLibrary,
}

/// `n` and `noun`, the noun plural (an `s` added) unless `n` is 1: `1 sequence`, `2 sequences`,
/// `0 tokens`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The default [`PlanInput::utilisation`].
pub const DEFAULT_UTILISATION: f64 = 0.9;

/// Sequence counts the fit table gives the longest context for.
pub const FIT_SEQUENCES: [usize; 4] = [1, 8, 32, 128];

/// Contexts the fit table gives the number of sequences for (those above the model's context
/// are left out; the model's context comes first).
pub const FIT_CONTEXTS: [usize; 3] = [131072, 32768, 4096];

/// The decoding state of one sequence, on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub dtype: KvDtype,
    pub block_tokens: usize,
    pub block_bytes: BlockBytes,
    /// Window blocks a running sequence holds (its window plus a step).
    pub window_blocks_per_sequence: usize,
}

impl KvShape {
    pub fn new(cfg: &ModelConfig, dtype: KvDtype, max_step: usize) -> Self {
        let block_tokens = default_block_tokens(cfg);
        KvShape {
            dtype,
            block_tokens,
            block_bytes: block_bytes(cfg, dtype, block_tokens),
            window_blocks_per_sequence: KvConfig::window_blocks_per_sequence(cfg, block_tokens, max_step),
        }
    }

    /// Bytes of one running sequence's window blocks (bounded, whatever its length).
    pub fn window_bytes(&self) -> usize {
        self.window_blocks_per_sequence * self.block_bytes.window
    }

    /// Bytes of the compressed blocks of `tokens` tokens of one sequence (0 for a sliding-only
    /// model).
    pub fn compressed_bytes(&self, cfg: &ModelConfig, tokens: usize) -> usize {
        if has_compressed(cfg) {
            tokens.div_ceil(self.block_tokens) * self.block_bytes.compressed
        } else {
            0
        }
    }

    /// What one running sequence of `tokens` tokens reserves: its window blocks and its
    /// compressed blocks.
    pub fn sequence_bytes(&self, cfg: &ModelConfig, tokens: usize) -> usize {
        self.window_bytes() + self.compressed_bytes(cfg, tokens)
    }
}

/// How much decoding state a pool holds, split the way the server splits it
/// ([`KvConfig::for_budget`]: window blocks for the running sequences or an eighth of the pool,
/// whichever is more; the rest compressed blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// (sequences, longest context each can reach; 0 when the windows alone do not fit).
    pub by_sequences: Vec<(usize, usize)>,
    /// (context, how many sequences of that length fit).
    pub by_context: Vec<(usize, usize)>,
}

/// The context every one of `seqs` sequences can reach in `pool` bytes (capped at the model's).
pub fn longest_context(cfg: &ModelConfig, kv: &KvShape, pool: usize, seqs: usize, max_step: usize) -> usize {
    match KvConfig::for_budget(cfg, kv.dtype, pool, seqs, max_step) {
        Err(_) => 0,
        Ok(c) => match c.token_capacity(cfg) {
            None => cfg.max_position_embeddings,
            Some(_) => (c.compressed_blocks / seqs.max(1) * kv.block_tokens).min(cfg.max_position_embeddings),
        },
    }
}

/// How many sequences of `tokens` tokens fit in `pool` bytes.
pub fn sequences_at(cfg: &ModelConfig, kv: &KvShape, pool: usize, tokens: usize, max_step: usize) -> usize {
    let per_seq = tokens.div_ceil(kv.block_tokens);
    let fits = |s: usize| {
        s == 0
            || KvConfig::for_budget(cfg, kv.dtype, pool, s, max_step)
                .is_ok_and(|c| !has_compressed(cfg) || c.compressed_blocks >= s * per_seq)
    };
    // Each sequence takes at least its own blocks, so no more than this can fit.
    let (mut lo, mut hi) = (0, pool / kv.sequence_bytes(cfg, tokens).max(1) + 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The fit table for `pool` bytes of decoding state.
pub fn fit(cfg: &ModelConfig, kv: &KvShape, pool: usize, max_step: usize) -> Fit {
    let max = cfg.max_position_embeddings;
    let mut contexts = vec![max];
    contexts.extend(FIT_CONTEXTS.iter().copied().filter(|&c| c < max));
    Fit {
        by_sequences: FIT_SEQUENCES.iter().map(|&s| (s, longest_context(cfg, kv, pool, s, max_step))).collect(),
        by_context: contexts.into_iter().map(|c| (c, sequences_at(cfg, kv, pool, c, max_step))).collect(),
    }
}

/// A layout that fits: every rank's weights, its pool, and the fit of the tightest rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub layout: ParallelLayout,
    pub device_memory: usize,
    pub utilisation: f64,
    /// `device_memory × utilisation`, rounded down, less the communicators' buffers.
    pub available: usize,
    pub comm: CommBuffers,
    pub ranks: Vec<RankWeights>,
    pub kv: KvShape,
    pub max_step: usize,
    /// The rank with the most weights (the least pool): it bounds every rank's sequences, since
    /// every rank holds every sequence's state.
    pub tightest: usize,
    /// `available −` the tightest rank's weights.
    pub pool: usize,
    pub fit: Fit,
}

impl Plan {
    pub fn pool_of(&self, rank: usize) -> usize {
        self.available - self.ranks[rank].loaded_bytes()
    }
}

/// Why a layout does not fit.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    /// A rank's weights alone exceed its usable memory (`available`: after `comm`).
    WeightsDoNotFit {
        rank: usize,
        need: usize,
        available: usize,
        device_memory: usize,
        utilisation: f64,
        comm: CommBuffers,
    },
    /// The collective library's buffers alone take all of `usable` (`device_memory ×
    /// utilisation`).
    CommBuffersDoNotFit { usable: usize, comm: CommBuffers },
    /// The weights fit, but what is left cannot hold one running sequence's window blocks plus
    /// one compressed block.
    StateDoesNotFit { rank: usize, pool: usize, need: usize },
}

impl PlanError {
    /// Bytes missing.
    pub fn short(&self) -> usize {
        match *self {
            PlanError::WeightsDoNotFit { need, available, .. } => need - available,
            PlanError::StateDoesNotFit { pool, need, .. } => need - pool,
            PlanError::CommBuffersDoNotFit { usable, comm } => comm.total().saturating_sub(usable),
        }
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlanError::WeightsDoNotFit { rank, need, available, device_memory, utilisation, comm } => write!(
                f,
                "rank {rank} needs {} of weights, {} is available ({} × {utilisation}{}); short by {}",
                human_bytes(need),
                human_bytes(available),
                human_bytes(device_memory),
                match comm.total() {
                    0 => String::new(),
                    c => format!(" - {} of communicator buffers", human_bytes(c)),
                },
                human_bytes(self.short())
            ),
            PlanError::CommBuffersDoNotFit { usable, comm } => write!(
                f,
                "the collective library's buffers ({} communicators × {}) take all of the {} usable on each device",
                comm.communicators,
                human_bytes(comm.bytes_each),
                human_bytes(usable)
            ),
            PlanError::StateDoesNotFit { rank, pool, need } => write!(
                f,
                "rank {rank} has {} left after its weights, one sequence's decoding state needs {} (its window \
                 blocks and one compressed block); short by {}",
                human_bytes(pool),
                human_bytes(need),
                human_bytes(self.short())
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// What a rank of `input` may fill with weights and decoding state: `device_memory ×
/// utilisation`, rounded down, less the communicators' buffers.
fn usable(input: &PlanInput) -> usize {
    let buffers = input.comm.buffers(input.layout).total();
    ((input.device_memory as f64 * input.utilisation).floor() as usize).saturating_sub(buffers)
}

/// The plan of `input`, or why it does not fit (the first rank that does not).
pub fn plan(input: &PlanInput) -> std::result::Result<Plan, PlanError> {
    let cfg = input.cfg;
    let comm = input.comm.buffers(input.layout);
    let gross = (input.device_memory as f64 * input.utilisation).floor() as usize;
    if comm.total() > 0 && comm.total() >= gross {
        return Err(PlanError::CommBuffersDoNotFit { usable: gross, comm });
    }
    let available = gross - comm.total();
    let ranks = rank_weights(cfg, input.tensors, input.layout);
    // The first rank with the most weights.
    let tightest = (0..ranks.len()).rev().max_by_key(|&r| ranks[r].loaded_bytes()).unwrap_or(0);
    let need = ranks[tightest].loaded_bytes();
    if need > available {
        return Err(PlanError::WeightsDoNotFit {
            rank: tightest,
            need,
            available,
            device_memory: input.device_memory,
            utilisation: input.utilisation,
            comm: input.comm.buffers(input.layout),
        });
    }
    let pool = available - need;
    let kv = KvShape::new(cfg, input.kv_dtype, input.max_step);
    if KvConfig::for_budget(cfg, input.kv_dtype, pool, 1, input.max_step).is_err() {
        let need = kv.window_bytes() + if has_compressed(cfg) { kv.block_bytes.compressed } else { 0 };
        return Err(PlanError::StateDoesNotFit { rank: tightest, pool, need });
    }
    let fit = fit(cfg, &kv, pool, input.max_step);
    Ok(Plan {
        layout: input.layout,
        device_memory: input.device_memory,
        utilisation: input.utilisation,
        available,
        comm: input.comm.buffers(input.layout),
        ranks,
        kv,
        max_step: input.max_step,
        tightest,
        pool,
        fit,
    })
}

/// The fewest devices (at most `max_world`, more than `input`'s) of the same memory on which
/// `input`'s model fits with its TP degree and the experts split over all of them (EP = world),
/// or None. Candidates are screened with rank 0's non-expert bytes (which depend on TP only)
/// plus its share of the routed experts, then checked with [`plan`].
pub fn fewest_devices(input: &PlanInput, max_world: usize) -> Option<ParallelLayout> {
    let cfg = input.cfg;
    let tp = input.layout.tp;
    let r0 = rank_weights_of(cfg, input.tensors, input.layout.rank(0));
    let experts = r0.by_split.get(&Split::Experts).map_or(0, |c| c.bytes);
    let per_expert = experts / r0.rank.experts(cfg).len().max(1);
    let rest = r0.loaded_bytes() - experts;
    (input.layout.world + 1..=max_world.min(cfg.n_routed_experts)).filter(|w| w.is_multiple_of(tp)).find_map(|w| {
        let layout = ParallelLayout::new(w, tp, w, cfg).ok()?.with_moe(input.layout.moe);
        let layout = match input.layout.data_parallel_attention {
            true => layout.with_data_parallel_attention().ok()?,
            false => layout,
        };
        let input = PlanInput { layout, ..*input };
        let estimate = rest + cfg.n_routed_experts.div_ceil(w) * per_expert;
        if estimate > usable(&input) {
            return None;
        }
        plan(&input).ok().map(|_| layout)
    })
}

/// Bytes a pool needs for the window blocks of `running` sequences and the compressed blocks
/// of `held` sequences of `tokens` tokens each, split as [`KvConfig::for_budget`] splits it
/// (window blocks for the running sequences or an eighth of the pool, whichever is more): a
/// budget whose `token_capacity` reaches `held × tokens` (each rounded up to whole blocks).
pub fn pool_bytes_for(
    cfg: &ModelConfig,
    dtype: KvDtype,
    (running, held, tokens): (usize, usize, usize),
    max_step: usize,
) -> usize {
    let kv = KvShape::new(cfg, dtype, max_step);
    let bb = kv.block_bytes;
    let windows = running.max(1).saturating_mul(kv.window_bytes());
    let blocks =
        if has_compressed(cfg) { held.max(1).saturating_mul(tokens.div_ceil(kv.block_tokens).max(1)) } else { 0 };
    let compressed = blocks.saturating_mul(bb.compressed);
    windows.saturating_add(compressed).max(compressed.saturating_mul(8).div_ceil(7).saturating_add(bb.window))
}

/// How big the pool of a server is asked to be, per rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolAsk {
    /// This many bytes (`--kv-cache-memory 8GiB`): refused when the plan leaves less.
    Bytes(usize),
    /// This share of what the plan leaves after the weights (`--kv-cache-memory 0.5`).
    Share(f64),
    /// What the running sequences need at their longest, at most half of what the plan leaves
    /// (no `--kv-cache-memory`).
    Need,
}

/// What `dsv4 serve` asks of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServingAsk {
    /// Sequences running at once (`--max-num-seqs`).
    pub max_seqs: usize,
    /// Longest sequence (`--max-model-len`, else the model's context).
    pub max_len: usize,
    /// Whether `max_len` was asked for (`--max-model-len`): only then is a pool that cannot hold
    /// one sequence of it refused (else the server's longest sequence is what the pool holds).
    pub len_asked: bool,
    pub pool: PoolAsk,
}

/// The pool a server runs with on every rank, and what it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServingPool {
    pub kv: KvConfig,
    /// Bytes of the pool ([`KvConfig::total_bytes`]).
    pub bytes: usize,
    /// Tokens one sequence can reach while `max_seqs` run (capped at the model's context).
    pub longest: usize,
}

/// Why a server's pool does not fit a plan that fits (its weights and one sequence do).
#[derive(Debug, Clone, PartialEq)]
pub enum ServingError {
    /// `--kv-cache-memory` asks more than the plan leaves after the weights.
    PoolDoesNotFit { rank: usize, asked: usize, left: usize },
    /// The pool cannot hold the sliding windows of `seqs` running sequences plus one
    /// compressed block; those of `most` sequences fit. The message says only whether none do:
    /// how many sequences fit as asked is the caller's to say (with `--max-model-len` it can
    /// be fewer than `most`), once.
    SequencesDoNotFit { rank: usize, seqs: usize, pool: usize, need: usize, most: usize },
    /// With `seqs` running, the pool holds `longest` tokens, less than the `tokens` asked.
    ContextDoesNotFit { rank: usize, seqs: usize, tokens: usize, pool: usize, need: usize, longest: usize },
}

impl ServingError {
    /// Bytes missing per rank.
    pub fn short(&self) -> usize {
        match *self {
            ServingError::PoolDoesNotFit { asked, left, .. } => asked - left,
            ServingError::SequencesDoNotFit { pool, need, .. } | ServingError::ContextDoesNotFit { pool, need, .. } => {
                need.saturating_sub(pool)
            }
        }
    }
}

impl fmt::Display for ServingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ServingError::PoolDoesNotFit { rank, asked, left } => write!(
                f,
                "--kv-cache-memory asks {} per rank, rank {rank} has {} left after its weights; short by {}",
                human_bytes(asked),
                human_bytes(left),
                human_bytes(self.short())
            ),
            ServingError::SequencesDoNotFit { rank, seqs, pool, need, most } => write!(
                f,
                "a KV pool of {} (rank {rank}) cannot hold the sliding windows of {} plus one compressed block \
                 ({}){}; short by {}",
                human_bytes(pool),
                plural(seqs, "running sequence"),
                human_bytes(need),
                if most == 0 { ", not even one sequence's" } else { "" },
                human_bytes(self.short())
            ),
            ServingError::ContextDoesNotFit { rank, seqs, tokens, pool, need, longest } => write!(
                f,
                "with {} a KV pool of {} (rank {rank}) holds {}, --max-model-len asks {tokens} ({} of pool); short \
                 by {}",
                plural(seqs, "running sequence"),
                human_bytes(pool),
                plural(longest, "token"),
                human_bytes(need),
                human_bytes(self.short())
            ),
        }
    }
}

impl std::error::Error for ServingError {}

/// Tokens one sequence can reach in a pool of `kv` (the model's context for a sliding-only model).
fn capacity(cfg: &ModelConfig, kv: &KvConfig) -> usize {
    kv.token_capacity(cfg).unwrap_or(cfg.max_position_embeddings).min(cfg.max_position_embeddings)
}

/// The pool every rank of a server planned by `p` holds: sized as `ask.pool` says out of what
/// the plan leaves the tightest rank after its weights ([`Plan::pool`]), checked to hold the
/// running sequences' windows and, when `--max-model-len` is asked, one sequence of that length.
pub fn serving_pool(cfg: &ModelConfig, p: &Plan, ask: &ServingAsk) -> std::result::Result<ServingPool, ServingError> {
    let (rank, dtype, step) = (p.tightest, p.kv.dtype, p.max_step);
    let seqs = ask.max_seqs.max(1);
    let bytes = match ask.pool {
        PoolAsk::Bytes(b) if b > p.pool => return Err(ServingError::PoolDoesNotFit { rank, asked: b, left: p.pool }),
        PoolAsk::Bytes(b) => b,
        PoolAsk::Share(f) => (p.pool as f64 * f.clamp(0.0, 1.0)).floor() as usize,
        PoolAsk::Need => pool_bytes_for(cfg, dtype, (seqs, seqs, ask.max_len), step).min(p.pool / 2),
    };
    let kv = match KvConfig::for_budget(cfg, dtype, bytes, seqs, step) {
        Ok(kv) => kv,
        Err(_) => {
            let one = p.kv.window_bytes();
            let compressed = if has_compressed(cfg) { p.kv.block_bytes.compressed } else { 0 };
            let most = bytes.saturating_sub(compressed) / one.max(1);
            return Err(ServingError::SequencesDoNotFit {
                rank,
                seqs,
                pool: bytes,
                need: seqs.saturating_mul(one).saturating_add(compressed),
                most,
            });
        }
    };
    let longest = capacity(cfg, &kv);
    if ask.len_asked && longest < ask.max_len {
        let need = pool_bytes_for(cfg, dtype, (seqs, 1, ask.max_len), step);
        return Err(ServingError::ContextDoesNotFit { rank, seqs, tokens: ask.max_len, pool: bytes, need, longest });
    }
    Ok(ServingPool { kv, bytes: kv.total_bytes(cfg), longest })
}

/// Payload bytes (f32 activations, 4 bytes per element) one rank puts into the collectives for
/// one decode step of `tokens` tokens, counted as [`Traffic`] counts them (all-reduce its whole
/// buffer, all-gather this rank's part): per main layer one all-reduce of `tokens × hidden` over
/// the EP group (the MoE combine; with [`MoeExchange::AllToAll`] the dispatch's three
/// all-to-all-v and one all-gather instead, [`record_dispatch`]) when `ep > 1` and one over the
/// TP group (`wo_b`) when
/// `tp > 1`; with `tp > 1` also the embedding's all-reduce of `tokens × hidden` and the head's
/// all-gather of `tokens ×` this rank's vocabulary rows. Rank 0's share (ranks differ in the
/// head's part when the vocabulary does not divide evenly, and with all-to-all in their slice
/// of the tokens: rank 0's is the largest). The MTP block is not run by
/// multi-rank runs and not counted. With data-parallel attention `tokens` are each rank's own
/// (every rank decodes `tokens` tokens of its sequences): the dispatch sends them all and
/// nothing is all-gathered, but the EP group agrees on its most tokens once a step (one
/// all-gather of one f32, [`crate::Model::step`]).
pub fn decode_traffic(cfg: &ModelConfig, layout: ParallelLayout, tokens: usize) -> Traffic {
    rank_decode_traffic(cfg, &layout.rank(0), tokens)
}

/// [`decode_traffic`] of one rank.
pub fn rank_decode_traffic(cfg: &ModelConfig, rank: &RankLayout, tokens: usize) -> Traffic {
    const F32: u64 = 4;
    let layout = rank.layout;
    let hidden = (tokens * cfg.hidden_size) as u64 * F32;
    let mut t = Traffic::default();
    if layout.tp > 1 {
        t.record(CollectiveKind::AllReduce, hidden);
    }
    for _ in 0..cfg.num_layers {
        if layout.tp > 1 {
            t.record(CollectiveKind::AllReduce, hidden);
        }
        if layout.ep > 1 {
            match layout.moe {
                MoeExchange::AllReduce => t.record(CollectiveKind::AllReduce, hidden),
                MoeExchange::AllToAll => record_dispatch(&mut t, cfg, rank, tokens),
            }
        }
    }
    if layout.tp > 1 {
        t.record(CollectiveKind::AllGather, (tokens * rank.vocab(cfg).len()) as u64 * F32);
    }
    if layout.data_parallel_attention && layout.ep > 1 {
        t.record(CollectiveKind::AllGather, F32);
    }
    t
}

/// One layer's [`MoeExchange::AllToAll`] traffic of `rank` for `tokens` replicated tokens
/// ([`crate::parallel::dispatch`]): its slice of the tokens sends its (token, expert) rows and
/// their (weight, expert) pairs to the other ranks' experts, gets the outputs of the rows its
/// experts served back to their ranks, and all-gathers its slice. Where the rows go depends on
/// the routing: the all-to-all-v bytes are the expectation when every expert is equally likely
/// (fractional rows, not rounded: at batch 1 a rank sends `top_k·(E − held)/E` rows on
/// average); the calls and the all-gather are exact.
///
/// With data-parallel attention every rank of the group dispatches `tokens` of its own: no
/// slicing and no all-gather.
fn record_dispatch(t: &mut Traffic, cfg: &ModelConfig, rank: &RankLayout, tokens: usize) {
    const F32: f64 = 4.0;
    let (ep, me) = (rank.layout.ep, rank.ep_rank);
    let dp = rank.layout.data_parallel_attention;
    let (d, k, e) = (cfg.hidden_size as f64, cfg.num_experts_per_tok as f64, cfg.n_routed_experts as f64);
    let slice = |r: usize| if dp { tokens as f64 } else { split(tokens, ep, r).len() as f64 };
    let held = |r: usize| split(cfg.n_routed_experts, ep, r).len() as f64;
    let out_rows = slice(me) * k * (e - held(me)) / e;
    let back_rows = (0..ep).filter(|&r| r != me).map(slice).sum::<f64>() * k * held(me) / e;
    t.record(CollectiveKind::AllToAllV, (out_rows * d * F32) as u64);
    t.record(CollectiveKind::AllToAllV, (out_rows * 2.0 * F32) as u64);
    t.record(CollectiveKind::AllToAllV, (back_rows * d * F32) as u64);
    if !dp {
        t.record(CollectiveKind::AllGather, (slice(me) * d * F32) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::layout::sequence_footprint;

    fn tiny() -> ModelConfig {
        crate::builtin::tiny().unwrap().0
    }

    /// The tiny config with 4 heads in 2 output groups and 8 experts, as in the layout tests.
    fn layout(world: usize, tp: usize, ep: usize) -> ParallelLayout {
        ParallelLayout::new(world, tp, ep, &tiny()).unwrap()
    }

    #[test]
    fn part_bytes_by_hand() {
        let fp8 = DeviceForm::Fp8Blocks { scale_bytes: 1, block: 128 * 128 };
        // A whole [256, 256]: 65536 codes + 2×2 scales.
        assert_eq!(part_bytes(fp8, &(0..256), &(0..256)), 65536 + 4);
        // Rows 0..192: 192·256 codes, rows touch blocks 0 and 1 (the partial one counts whole).
        assert_eq!(part_bytes(fp8, &(0..192), &(0..256)), 49152 + 4);
        // Rows 64..192 touch blocks 0 and 1 too; rows 128..256 only block 1.
        assert_eq!(part_bytes(fp8, &(64..192), &(0..256)), 32768 + 4);
        assert_eq!(part_bytes(fp8, &(128..256), &(0..256)), 32768 + 2);
        // F32 block scales: 4 bytes each.
        let fp8_f32 = DeviceForm::Fp8Blocks { scale_bytes: 4, block: 128 * 128 };
        assert_eq!(part_bytes(fp8_f32, &(0..256), &(128..256)), 32768 + 2 * 4);
        // INT8 + a BF16 scale per 32 columns: columns 16..48 touch groups 0 and 1.
        let int8 = DeviceForm::Int8Groups { group: 32 };
        assert_eq!(part_bytes(int8, &(0..4), &(16..48)), 4 * 32 + 4 * 2 * 2);
        assert_eq!(part_bytes(int8, &(0..4), &(0..64)), 256 + 4 * 2 * 2);
        // MXFP4: half a byte per code, one E8M0 per 32.
        let mx = DeviceForm::Mxfp4 { group: 32 };
        assert_eq!(part_bytes(mx, &(0..4), &(0..64)), 128 + 8);
        assert_eq!(part_bytes(mx, &(2..3), &(0..33)), 17 + 2);
        assert_eq!(part_bytes(DeviceForm::Bf16, &(3..5), &(0..7)), 28);
        assert_eq!(part_bytes(DeviceForm::F32, &(3..5), &(0..7)), 56);
        // A whole matrix with block-multiple sides: the form's bytes per parameter.
        for form in [fp8, fp8_f32, int8, mx, DeviceForm::Bf16] {
            let b = part_bytes(form, &(0..1024), &(0..4096));
            assert_eq!(b as f64, form.bytes_per_param() * (1024.0 * 4096.0), "{form:?}");
        }
    }

    #[test]
    fn what_each_rank_holds_of_each_tensor() {
        let c = tiny();
        let (hd, r) = (c.head_dim, c.o_lora_rank);
        // TP 2 × EP 2 on 4 ranks: rank 3 is TP rank 1 (head 2..4, group 1), EP rank 1.
        let l = layout(4, 2, 2);
        let x = l.rank(3);
        let h = |n: &str, s: &[usize]| held(&c, &x, n, s);
        let v = c.vocab_size;
        assert_eq!(h("embed.weight", &[v, 64]), Some(Held { split: Split::Vocab, rows: 136..271, cols: 0..64 }));
        assert_eq!(h("head.weight", &[v, 64]).unwrap().rows, 136..271);
        assert_eq!(h("layers.1.attn.wq_b.weight", &[4 * hd, 32]).unwrap().rows, 2 * hd..4 * hd);
        assert_eq!(h("layers.1.attn.wo_a.weight", &[2 * r, 64]).unwrap().rows, r..2 * r);
        let wo_b = h("layers.1.attn.wo_b.weight", &[64, 2 * r]).unwrap();
        assert_eq!((wo_b.rows, wo_b.cols), (0..64, r..2 * r));
        assert_eq!(h("layers.1.attn.attn_sink", &[4]).unwrap().rows, 2..4);
        // Replicated: the indexer's own wq_b, the compressor, wq_a, the router, shared experts.
        for n in [
            "layers.1.attn.indexer.wq_b.weight",
            "layers.1.attn.compressor.wkv.weight",
            "layers.1.attn.wq_a.weight",
            "layers.1.ffn.gate.weight",
            "layers.1.ffn.shared_experts.w1.weight",
            "layers.1.hc_attn_fn",
            "hc_head_fn",
            "norm.weight",
        ] {
            assert_eq!(h(n, &[8, 8]).unwrap().split, Split::Replicated, "{n}");
        }
        // Experts 4..8 of 8.
        assert_eq!(h("layers.2.ffn.experts.3.w1.weight", &[32, 64]), None);
        assert_eq!(h("layers.2.ffn.experts.4.w2.weight", &[64, 32]).unwrap().split, Split::Experts);
        assert_eq!(h("mtp.0.ffn.experts.7.w3.weight", &[32, 64]).unwrap().split, Split::Experts);
        assert_eq!(h("layers.2.ffn.experts.gate_up_proj", &[8, 64, 64]).unwrap().rows, 4..8);
        assert_eq!(h("mtp.0.attn.wq_b.weight", &[4 * hd, 32]).unwrap().rows, 2 * hd..4 * hd);
        // One device holds everything.
        let one = ParallelLayout::SINGLE.rank(0);
        assert_eq!(held(&c, &one, "embed.weight", &[v, 64]).unwrap().rows, 0..v);
        assert_eq!(held(&c, &one, "layers.1.attn.wo_b.weight", &[64, 2 * r]).unwrap().cols, 0..2 * r);
    }

    /// Every group holds each split tensor exactly once, every rank the replicated ones: summed
    /// over the ranks, the bytes are `world / tp` (heads, vocabulary) or `world / ep` (experts)
    /// times one device's, in BF16 where no block rounding applies.
    #[test]
    fn ranks_add_up_to_one_device() {
        let c = tiny();
        let tensors = official_tensors(&c, WeightTarget::Soc(SocFamily::A2));
        let one = &rank_weights(&c, &tensors, ParallelLayout::SINGLE)[0];
        assert!(one.mtp_loaded && !one.mtp.is_empty());
        for (w, tp, ep) in [(2, 2, 2), (4, 2, 2), (4, 1, 4), (2, 1, 2), (8, 2, 8)] {
            let l = layout(w, tp, ep);
            let ranks = rank_weights(&c, &tensors, l);
            assert!(ranks.iter().all(|r| !r.mtp_loaded));
            let total = |s: Split| ranks.iter().map(|r| r.by_split.get(&s).map_or(0, |c| c.params)).sum::<usize>();
            let single = |s: Split| one.by_split.get(&s).map_or(0, |c| c.params);
            assert_eq!(total(Split::Replicated), w * single(Split::Replicated), "{l:?}");
            assert_eq!(total(Split::Heads), w / tp * single(Split::Heads), "{l:?}");
            assert_eq!(total(Split::Vocab), w / tp * single(Split::Vocab), "{l:?}");
            assert_eq!(total(Split::Experts), w / ep * single(Split::Experts), "{l:?}");
            // INT8 experts (the tiny widths are multiples of 32): bytes add up exactly too.
            let int8 = DeviceForm::Int8Groups { group: 32 };
            let bytes: usize = ranks.iter().map(|r| r.by_form[&int8].bytes).sum();
            assert_eq!(bytes, w / ep * one.by_form[&int8].bytes);
        }
    }

    /// The fit arithmetic on the tiny model with f32 rows, from its block sizes worked out by
    /// hand: head_dim 32 (128 bytes a row), window 16, ratios 4 (CSA, indexer width 16) and 16
    /// (HCA), so blocks of 64 tokens.
    #[test]
    fn fit_by_hand() {
        let c = tiny();
        let kv = KvShape::new(&c, KvDtype::F32, 16);
        assert_eq!(kv.block_tokens, 64);
        // Compressed block: CSA layers 16 entries × (128 + 64 indexer bytes), HCA 4 × 128.
        assert_eq!(kv.block_bytes.compressed, 2 * 16 * (128 + 64) + 4 * 128);
        // Window block: 64 rows × 128 bytes per layer, plus each compressor's carry, f32
        // projections and scores of `carry_rows` rows each: CSA attention 8 rows of 2·32, CSA
        // indexer 8 rows of 2·16, HCA 16 rows of 32.
        let csa_carry = 2 * 8 * 64 * 4 + 2 * 8 * 32 * 4;
        assert_eq!(kv.block_bytes.window, 4 * 64 * 128 + 2 * csa_carry + 2 * 16 * 32 * 4);
        let (cb, wb) = (6656, 49152);
        assert_eq!((kv.block_bytes.compressed, kv.block_bytes.window), (cb, wb));
        // Steps of 16: (15 + 16) / 64 → 1 page, + 1 = 2 window blocks per running sequence.
        assert_eq!(kv.window_blocks_per_sequence, 2);
        // A pool of 80 window blocks' worth. One sequence: an eighth (10 window blocks) stays
        // window blocks, the other 70 · 49152 bytes hold ⌊3440640 / 6656⌋ = 516 compressed
        // blocks of 64 tokens.
        let pool = 80 * wb;
        assert_eq!(longest_context(&c, &kv, pool, 1, 16), 516 * 64);
        // 8 sequences need 16 window blocks: ⌊64 · 49152 / 6656⌋ = 472 left, 59 each.
        assert_eq!(longest_context(&c, &kv, pool, 8, 16), 59 * 64);
        // 32 sequences need 64 window blocks: ⌊16 · 49152 / 6656⌋ = 118 left, 3 each.
        assert_eq!(longest_context(&c, &kv, pool, 32, 16), 3 * 64);
        // 40 sequences need all 80 window blocks: no compressed block left.
        assert_eq!(longest_context(&c, &kv, pool, 40, 16), 0);
        // At 4096 tokens (64 compressed blocks each): 7 sequences take 14 window blocks and
        // leave ⌊66 · 49152 / 6656⌋ = 487 ≥ 448; 8 leave 472 < 512.
        assert_eq!(sequences_at(&c, &kv, pool, 4096, 16), 7);
        // At 64 tokens (1 block each): 37 leave ⌊6 · 49152 / 6656⌋ = 44 ≥ 37; 38 leave 29.
        assert_eq!(sequences_at(&c, &kv, pool, 64, 16), 37);
        // 32768 tokens (512 blocks) once; the model's context (2048 blocks) not at all.
        assert_eq!(sequences_at(&c, &kv, pool, 32768, 16), 1);
        assert_eq!(sequences_at(&c, &kv, pool, 131072, 16), 0);
        // The one-sequence footprint agrees with the layout's at a page boundary.
        assert_eq!(kv.compressed_bytes(&c, 4096), 64 * cb);
        assert_eq!(sequence_footprint(&c, KvDtype::F32, 64, 4096).compressed_blocks, 64);
    }

    /// The refusal names the rank, what it needs, what is available and the shortfall; a plan
    /// that fits pools the rest.
    #[test]
    fn refusal_and_pool_by_hand() {
        let c = tiny();
        let tensors = official_tensors(&c, WeightTarget::HostF32);
        let l = layout(2, 1, 2);
        let ranks = rank_weights(&c, &tensors, l);
        let need = ranks[0].loaded_bytes();
        assert_eq!(need, ranks[1].loaded_bytes());
        // F32: 4 bytes a parameter, MTP not counted with 2 ranks.
        assert_eq!(need, 4 * ranks[0].main().params);
        let input = |device_memory, utilisation| PlanInput {
            cfg: &c,
            tensors: &tensors,
            layout: l,
            kv_dtype: KvDtype::F32,
            device_memory,
            utilisation,
            max_step: 16,
            comm: CollectiveLibrary::InProcess,
        };
        // 1000 bytes short at 0.5: device memory 2·(need − 1000).
        let e = plan(&input(2 * (need - 1000), 0.5)).unwrap_err();
        assert_eq!(
            e,
            PlanError::WeightsDoNotFit {
                rank: 0,
                need,
                available: need - 1000,
                device_memory: 2 * (need - 1000),
                utilisation: 0.5,
                comm: CommBuffers::NONE,
            }
        );
        assert_eq!(e.short(), 1000);
        let msg = e.to_string();
        assert!(msg.starts_with("rank 0 needs ") && msg.ends_with("short by 1000 B"), "{msg}");
        // Weights fit, one sequence's windows (2 · 49152) plus a compressed block do not.
        let e = plan(&input(need + 1000, 1.0)).unwrap_err();
        assert_eq!(e, PlanError::StateDoesNotFit { rank: 0, pool: 1000, need: 2 * 49152 + 6656 });
        assert_eq!(e.short(), 2 * 49152 + 6656 - 1000);
        // 80 window blocks' worth of pool: the fit table of `fit_by_hand`.
        let p = plan(&input(need + 80 * 49152, 1.0)).unwrap();
        assert_eq!((p.pool, p.available, p.pool_of(1)), (80 * 49152, need + 80 * 49152, 80 * 49152));
        assert_eq!(p.fit.by_sequences, vec![(1, 516 * 64), (8, 59 * 64), (32, 3 * 64), (128, 0)]);
        assert_eq!(p.fit.by_context, vec![(131072, 0), (32768, 1), (4096, 7)]);
    }

    /// HCCL's buffers (2 × HCCL_BUFFSIZE per communicator: the world's, and the TP and EP
    /// groups' where they have more than one rank) come out of the usable memory first.
    #[test]
    fn hccl_buffers_come_off_the_usable_memory() {
        let c = tiny();
        let hccl = CollectiveLibrary::Hccl { buffsize_mb: None };
        let mib = 1 << 20;
        assert_eq!(hccl.buffers(layout(1, 1, 1)), CommBuffers::NONE);
        assert_eq!(hccl.buffers(layout(2, 1, 2)), CommBuffers { communicators: 2, bytes_each: 400 * mib });
        assert_eq!(hccl.buffers(layout(4, 2, 2)).total(), 3 * 400 * mib);
        assert_eq!(hccl.buffers(layout(2, 2, 1)).communicators, 2);
        let small = CollectiveLibrary::Hccl { buffsize_mb: Some(50) };
        assert_eq!(small.buffers(layout(2, 1, 2)).total(), 2 * 100 * mib);
        assert_eq!(CollectiveLibrary::Nccl.buffers(layout(2, 1, 2)), CommBuffers::NONE);
        let tensors = official_tensors(&c, WeightTarget::HostF32);
        let l = layout(2, 1, 2);
        let need = rank_weights(&c, &tensors, l)[0].loaded_bytes();
        let input = |device_memory, comm| PlanInput {
            cfg: &c,
            tensors: &tensors,
            layout: l,
            kv_dtype: KvDtype::F32,
            device_memory,
            utilisation: 1.0,
            max_step: 16,
            comm,
        };
        let roomy = need + 800 * mib + 80 * 49152;
        let p = plan(&input(roomy, small)).unwrap();
        assert_eq!((p.available, p.pool, p.comm.total()), (roomy - 200 * mib, 600 * mib + 80 * 49152, 200 * mib));
        assert_eq!(plan(&input(roomy, hccl)).unwrap().pool, 80 * 49152);
        let e = plan(&input(need + 799 * mib, hccl)).unwrap_err();
        assert_eq!(e.short(), mib);
        assert!(e.to_string().contains(" - 800.00 MiB of communicator buffers); short by 1.00 MiB"), "{e}");
        // An HCCL_BUFFSIZE that fills the device (or overflows) is its own refusal.
        for mb in [usize::MAX / 2, 1 << 40] {
            let e = plan(&input(roomy, CollectiveLibrary::Hccl { buffsize_mb: Some(mb) })).unwrap_err();
            assert!(matches!(e, PlanError::CommBuffersDoNotFit { usable, .. } if usable == roomy), "{e}");
            assert!(e.to_string().contains("take all of the"), "{e}");
        }
    }

    /// A server's pool out of the plan of `refusal_and_pool_by_hand` (80 window blocks' worth
    /// left after the weights; f32 rows of tiny: window blocks of 49152 bytes, 2 per running
    /// sequence, compressed blocks of 6656 bytes and 64 tokens), by hand.
    #[test]
    fn serving_pools_by_hand() {
        let c = tiny();
        let tensors = official_tensors(&c, WeightTarget::HostF32);
        let l = layout(2, 1, 2);
        let need = rank_weights(&c, &tensors, l)[0].loaded_bytes();
        let (wb, cb) = (49152, 6656);
        let pool = 80 * wb;
        let p = plan(&PlanInput {
            cfg: &c,
            tensors: &tensors,
            layout: l,
            kv_dtype: KvDtype::F32,
            device_memory: need + pool,
            utilisation: 1.0,
            max_step: 16,
            comm: CollectiveLibrary::InProcess,
        })
        .unwrap();
        assert_eq!(p.pool, pool);
        let ask = |max_seqs, max_len, len_asked, pool| ServingAsk { max_seqs, max_len, len_asked, pool };
        // More than the weights leave.
        let e = serving_pool(&c, &p, &ask(1, 64, true, PoolAsk::Bytes(pool + 1))).unwrap_err();
        assert_eq!(e, ServingError::PoolDoesNotFit { rank: 0, asked: pool + 1, left: pool });
        assert_eq!(e.short(), 1);
        // 41 sequences need 82 window blocks and a compressed block; 39 fit (78 + room for one).
        let e = serving_pool(&c, &p, &ask(41, 64, false, PoolAsk::Bytes(pool))).unwrap_err();
        assert_eq!(e, ServingError::SequencesDoNotFit { rank: 0, seqs: 41, pool, need: 82 * wb + cb, most: 39 });
        assert_eq!(e.short(), 2 * wb + cb);
        assert!(serving_pool(&c, &p, &ask(39, 64, false, PoolAsk::Bytes(pool))).is_ok());
        assert!(serving_pool(&c, &p, &ask(40, 64, false, PoolAsk::Bytes(pool))).is_err());
        // 8 sequences: 16 window blocks, 472 compressed blocks (30208 tokens). One token more
        // needs 473 blocks: 16 · 49152 + 473 · 6656 = 3934720 bytes, 2560 more than the pool.
        let s = serving_pool(&c, &p, &ask(8, 30208, true, PoolAsk::Bytes(pool))).unwrap();
        assert_eq!((s.kv.window_blocks, s.kv.compressed_blocks, s.longest), (16, 472, 30208));
        let e = serving_pool(&c, &p, &ask(8, 30209, true, PoolAsk::Bytes(pool))).unwrap_err();
        assert_eq!(
            e,
            ServingError::ContextDoesNotFit { rank: 0, seqs: 8, tokens: 30209, pool, need: 3934720, longest: 30208 }
        );
        assert_eq!(e.short(), 2560);
        assert!(e.to_string().ends_with("short by 2.50 KiB"), "{e}");
        // Not asked for: the server's longest sequence is what the pool holds.
        assert_eq!(serving_pool(&c, &p, &ask(8, 30209, false, PoolAsk::Bytes(pool))).unwrap().longest, 30208);
        // What 2 sequences of 300 tokens need: 4 window blocks and 2 · 5 compressed blocks.
        let s = serving_pool(&c, &p, &ask(2, 300, true, PoolAsk::Need)).unwrap();
        assert_eq!((s.kv.window_blocks, s.kv.compressed_blocks, s.bytes), (4, 10, 4 * wb + 10 * cb));
        // At most half of what the weights leave; a share of it.
        let s = serving_pool(&c, &p, &ask(2, 131072, false, PoolAsk::Need)).unwrap();
        assert!(s.bytes <= pool / 2 && s.bytes + cb > pool / 2, "{s:?}");
        let s = serving_pool(&c, &p, &ask(2, 131072, false, PoolAsk::Share(0.25))).unwrap();
        assert!(s.bytes <= pool / 4 && s.bytes + cb > pool / 4, "{s:?}");
        // The single-sequence budget is the one `KvConfig::for_budget` needs.
        for tokens in [1, 64, 65, 1000] {
            let b = pool_bytes_for(&c, KvDtype::F32, (1, 1, tokens), 16);
            let kv = KvConfig::for_budget(&c, KvDtype::F32, b, 1, 16).unwrap();
            assert!(kv.token_capacity(&c).unwrap() >= tokens && kv.total_bytes(&c) <= b, "{tokens}");
        }
    }

    /// The refusals' text: counts in the singular for one, and no count of the sequences
    /// whose windows fit (the caller states how many fit as asked, one figure per message).
    #[test]
    fn serving_refusals_in_words() {
        let e = ServingError::SequencesDoNotFit { rank: 0, seqs: 64, pool: 1 << 20, need: 30 << 20, most: 2 };
        assert_eq!(
            e.to_string(),
            "a KV pool of 1.00 MiB (rank 0) cannot hold the sliding windows of 64 running sequences plus one \
             compressed block (30.00 MiB); short by 29.00 MiB"
        );
        let e = ServingError::SequencesDoNotFit { rank: 1, seqs: 1, pool: 1000, need: 2000, most: 0 };
        assert_eq!(
            e.to_string(),
            "a KV pool of 1000 B (rank 1) cannot hold the sliding windows of 1 running sequence plus one compressed \
             block (1.95 KiB), not even one sequence's; short by 1000 B"
        );
        let e = ServingError::ContextDoesNotFit { rank: 0, seqs: 1, tokens: 100, pool: 1000, need: 2000, longest: 1 };
        assert_eq!(
            e.to_string(),
            "with 1 running sequence a KV pool of 1000 B (rank 0) holds 1 token, --max-model-len asks 100 (1.95 KiB \
             of pool); short by 1000 B"
        );
        let e = ServingError::ContextDoesNotFit { rank: 0, seqs: 2, tokens: 100, pool: 1000, need: 2000, longest: 64 };
        assert!(e.to_string().starts_with("with 2 running sequences a KV pool of 1000 B (rank 0) holds 64 tokens,"));
        assert_eq!(
            (plural(0, "rank"), plural(1, "rank"), plural(2, "rank")),
            ("0 ranks".into(), "1 rank".into(), "2 ranks".into())
        );
    }

    /// The CUDA backend's forms (`backend-cuda/src/weights.rs`): F32 and BF16 as stored, other
    /// floats as F32, FP8 and FP4 with E8M0 scales as BF16 (FP8 only when every scale keeps its
    /// codes BF16 values), other scales as F32.
    #[test]
    fn cuda_forms() {
        let t = WeightTarget::Cuda;
        let fp8 = WeightFormat::Fp8Block { rows: 128, cols: 128 };
        let fp4 = WeightFormat::Fp4Group { group: 32 };
        assert_eq!(t.form(WeightFormat::Float, DType::F32, None), DeviceForm::F32);
        assert_eq!(t.form(WeightFormat::Float, DType::BF16, None), DeviceForm::Bf16);
        assert_eq!(t.form(WeightFormat::Float, DType::F16, None), DeviceForm::F32);
        assert_eq!(t.form(fp8, DType::F8E4M3, Some(DType::F8E8M0)), DeviceForm::Bf16);
        assert_eq!(t.form(fp8, DType::F8E4M3, Some(DType::F32)), DeviceForm::F32);
        assert_eq!(t.form(fp4, DType::I8, Some(DType::F8E8M0)), DeviceForm::Bf16);
        assert!(t.has_fp8_kv_rows() && !WeightTarget::Soc(SocFamily::A2).has_fp8_kv_rows());
        assert!(
            !WeightTarget::Soc(SocFamily::A3).has_fp8_kv_rows() && WeightTarget::Soc(SocFamily::A5).has_fp8_kv_rows()
        );
        // A checkpoint's FP8 weight is BF16 with every scale in the exact range, else F32.
        let fp8_weight = |scales: Vec<u8>| {
            let data = crate::tensor::HostTensor::from_bytes("w", DType::F8E4M3, vec![256, 128], vec![0x38; 256 * 128]);
            let scale = crate::tensor::HostTensor::from_bytes("w.scale", DType::F8E8M0, vec![2, 1], scales);
            StoredWeight::detect(&data.unwrap(), Some(&scale.unwrap()), &[256, 128]).unwrap()
        };
        assert_eq!(checked_form(&fp8_weight(vec![127, 3]), t), DeviceForm::Bf16);
        assert_eq!(checked_form(&fp8_weight(vec![127, 2]), t), DeviceForm::F32);
        assert_eq!(checked_form(&fp8_weight(vec![247, 127]), t), DeviceForm::F32);
        // The official forms of tiny: its FP8 and FP4 matrices as BF16, so 2 bytes a parameter.
        let official = official_tensors(&tiny(), t);
        assert!(official.iter().any(|p| p.name.contains(".ffn.experts.") && p.form == DeviceForm::Bf16));
        assert!(official.iter().all(|p| matches!(p.form, DeviceForm::Bf16 | DeviceForm::F32)));
    }

    /// Uneven experts: the rank with more is the tightest and bounds the plan.
    #[test]
    fn the_rank_with_most_weights_bounds_the_plan() {
        let mut c = tiny();
        c.n_routed_experts = 6;
        let tensors = official_tensors(&c, WeightTarget::Host);
        let l = ParallelLayout::new(4, 1, 4, &c).unwrap();
        let ranks = rank_weights(&c, &tensors, l);
        // 6 experts on 4 ranks: 2, 2, 1, 1.
        assert!(ranks[0].same_amounts(&ranks[1]) && ranks[2].same_amounts(&ranks[3]));
        assert!(ranks[0].loaded_bytes() > ranks[2].loaded_bytes());
        let p = plan(&PlanInput {
            cfg: &c,
            tensors: &tensors,
            layout: l,
            kv_dtype: KvDtype::Bf16,
            device_memory: 64 << 20,
            utilisation: DEFAULT_UTILISATION,
            max_step: 512,
            comm: CollectiveLibrary::InProcess,
        })
        .unwrap();
        assert_eq!(p.tightest, 0);
        assert_eq!(p.pool, p.pool_of(0));
        assert!(p.pool_of(3) > p.pool);
    }

    /// The fewest devices that fit: 2 ranks (4 experts each) do not, 4 (2 each) do.
    #[test]
    fn fewest_devices_that_fit() {
        let c = tiny();
        let tensors = official_tensors(&c, WeightTarget::HostF32);
        let l2 = layout(2, 1, 2);
        let w2 = rank_weights(&c, &tensors, l2)[0].loaded_bytes();
        let w4 = rank_weights(&c, &tensors, layout(4, 1, 4))[0].loaded_bytes();
        let one_seq = 2 * 49152 + 6656;
        assert!(w4 + one_seq < w2);
        let input = PlanInput {
            cfg: &c,
            tensors: &tensors,
            layout: l2,
            kv_dtype: KvDtype::F32,
            device_memory: w4 + one_seq,
            utilisation: 1.0,
            max_step: 16,
            comm: CollectiveLibrary::InProcess,
        };
        assert!(plan(&input).is_err());
        assert_eq!(fewest_devices(&input, 64), Some(layout(4, 1, 4)));
        assert_eq!(fewest_devices(&input, 3), None);
        // One byte less: 4 ranks do not fit, nor do 5 to 7 (rank 0 still holds 2 experts); 8
        // (one expert each) do.
        let smaller = PlanInput { device_memory: w4 + one_seq - 1, ..input };
        assert_eq!(fewest_devices(&smaller, 64), Some(layout(8, 1, 8)));
    }

    #[test]
    fn decode_traffic_by_hand() {
        let c = tiny();
        let (layers, d) = (c.num_layers as u64, c.hidden_size as u64);
        assert_eq!(decode_traffic(&c, ParallelLayout::SINGLE, 1), Traffic::default());
        // EP only: one all-reduce of tokens × hidden per layer.
        let t = decode_traffic(&c, layout(4, 1, 4), 3);
        assert_eq!(t.by_kind.len(), 1);
        assert_eq!(t.by_kind[&CollectiveKind::AllReduce], (layers, layers * 3 * d * 4));
        // TP 2 × EP 2: two all-reduces per layer and the embedding's; the head gathers this
        // rank's 136 (rank 0) or 135 (rank 1) vocabulary columns.
        let l = layout(4, 2, 2);
        let t = decode_traffic(&c, l, 2);
        assert_eq!(t.by_kind[&CollectiveKind::AllReduce], (2 * layers + 1, (2 * layers + 1) * 2 * d * 4));
        assert_eq!(t.by_kind[&CollectiveKind::AllGather], (1, 2 * 136 * 4));
        let t1 = rank_decode_traffic(&c, &l.rank(1), 2);
        assert_eq!(t1.by_kind[&CollectiveKind::AllGather], (1, 2 * 135 * 4));
        assert_eq!(t.calls(), 2 * layers + 2);
        assert_eq!(t.bytes(), (2 * layers + 1) * 2 * d * 4 + 2 * 136 * 4);
        // TP only: no MoE combine.
        let t = decode_traffic(&c, layout(2, 2, 1), 1);
        assert_eq!(t.by_kind[&CollectiveKind::AllReduce].0, layers + 1);
    }

    #[test]
    fn targets_by_name() {
        assert_eq!(WeightTarget::from_name("host"), Some(WeightTarget::Host));
        assert_eq!(WeightTarget::from_name("host-f32"), Some(WeightTarget::HostF32));
        assert_eq!(WeightTarget::from_name("910c"), Some(WeightTarget::Soc(SocFamily::A3)));
        assert_eq!(WeightTarget::from_name("Ascend910B3"), Some(WeightTarget::Soc(SocFamily::A2)));
        assert_eq!(WeightTarget::from_name("cuda"), Some(WeightTarget::Cuda));
        assert_eq!(WeightTarget::from_name("CUDA"), Some(WeightTarget::Cuda));
        assert_eq!(WeightTarget::from_name("h100"), None);
    }
}
